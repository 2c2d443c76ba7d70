//! Changing the cluster under load: `POST /admin/v1/nodes` adds a fourth
//! node and `DELETE /admin/v1/nodes/{id}` removes one, while a writer and a
//! reader keep going through the router. Every acknowledged key stays
//! readable with its value throughout; afterwards every node holds exactly
//! the keys of its ranges on the new ring (read from each node itself);
//! stale-epoch changes are refused with 409.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use caskade_common::Ring;
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{
    ClusterSpec, TestCluster, deletes_merge_away, full_catch_ups, poll_until,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// How long data may take to settle on the new ring.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

fn policy() -> NodePolicy {
    NodePolicy {
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

/// Acknowledged writes: key → value.
type Acked = Arc<Mutex<BTreeMap<String, String>>>;

/// A writer and a reader through the router until `stop`: the writer puts
/// new keys at `w=quorum`, the reader reads acknowledged keys back and
/// counts every answer that is not that key's value.
struct Load {
    acked: Acked,
    bad_reads: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(tc: &TestCluster, acked: Acked) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let bad_reads = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        {
            let (client, url, token) = (
                tc.new_client().unwrap(),
                tc.url.clone(),
                tc.writer_token.clone(),
            );
            let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
            tasks.spawn(async move {
                let mut n = acked.lock().await.len();
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load-{n}");
                    let value = format!("value {n}");
                    let sent = client
                        .put(format!("{url}/v1/kv/{key}?w=quorum"))
                        .bearer_auth(&token)
                        .body(value.clone())
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        acked.lock().await.insert(key, value);
                    }
                    n += 1;
                }
            });
        }
        {
            let (client, url, token) = (
                tc.new_client().unwrap(),
                tc.url.clone(),
                tc.writer_token.clone(),
            );
            let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
            let (bad_reads, reads) = (Arc::clone(&bad_reads), Arc::clone(&reads));
            tasks.spawn(async move {
                let mut turn = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let pick = {
                        let acked = acked.lock().await;
                        if acked.is_empty() {
                            None
                        } else {
                            acked
                                .iter()
                                .nth(turn % acked.len())
                                .map(|(k, v)| (k.clone(), v.clone()))
                        }
                    };
                    turn = turn.wrapping_add(7);
                    let Some((key, value)) = pick else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let response = client
                        .get(format!("{url}/v1/kv/{key}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    if status != StatusCode::OK || body != value {
                        eprintln!("read of {key} during the change: {status} {body}");
                        bad_reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        Load {
            acked,
            bad_reads,
            reads,
            stop,
            tasks,
        }
    }

    async fn writes(&self) -> usize {
        self.acked.lock().await.len()
    }

    /// Waits until `count` more writes are acknowledged.
    async fn more_writes(&self, count: usize, what: &str) {
        let at = self.writes().await;
        poll_until(what, SETTLE_DEADLINE, || async {
            self.writes().await >= at + count
        })
        .await;
    }

    /// Stops the load; the number of reads that did not return the value.
    async fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            done.unwrap();
        }
        assert!(
            self.reads.load(Ordering::Relaxed) > 0,
            "the reader read nothing"
        );
        self.bad_reads.load(Ordering::Relaxed)
    }
}

async fn cluster_page(tc: &TestCluster) -> Value {
    tc.admin_cluster().await.unwrap()
}

/// The ring of the router's current map, and the ids of its members.
async fn current_ring(tc: &TestCluster) -> (Ring, Vec<u32>, u64) {
    let page = cluster_page(tc).await;
    let members: Vec<u32> = page["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] != "leaving")
        .map(|n| n["id"].as_u64().unwrap() as u32)
        .collect();
    let ring = Ring::new(
        &members,
        page["vnodes_per_node"].as_u64().unwrap() as u32,
        page["replication_factor"].as_u64().unwrap() as u32,
    );
    (ring, members, page["epoch"].as_u64().unwrap())
}

/// Waits until each member holds exactly the acknowledged keys its ranges
/// need, each with its value.
async fn settled(tc: &TestCluster, acked: &Acked) {
    let (ring, members, epoch) = current_ring(tc).await;
    let acked = acked.lock().await.clone();
    poll_until(
        &format!("every node to hold exactly its ranges at epoch {epoch}"),
        SETTLE_DEADLINE,
        || async {
            for &id in &members {
                let held: BTreeMap<String, String> = tc
                    .scan_node(id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(k, (_, v, _))| {
                        (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap())
                    })
                    .collect();
                let wanted: BTreeMap<String, String> = acked
                    .iter()
                    .filter(|(k, _)| ring.owns(id, k.as_bytes()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // Keys written after `acked` was copied may be there too.
                let extra = held
                    .keys()
                    .filter(|k| {
                        !wanted.contains_key(*k)
                            && (acked.contains_key(*k) || !ring.owns(id, k.as_bytes()))
                    })
                    .count();
                let missing = wanted
                    .iter()
                    .filter(|(k, v)| held.get(*k) != Some(v))
                    .count();
                if extra > 0 || missing > 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_and_removing_a_node_under_load_keeps_every_key_readable() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let ids = tc.node_ids();
    let acked: Acked = Arc::default();
    let load = Load::start(&tc, Arc::clone(&acked));
    load.more_writes(200, "writes before the change").await;

    // Add a fourth node.
    let new = tc.start_spare_node().await.unwrap();
    let (_, _, epoch) = current_ring(&tc).await;
    let stale = tc
        .client()
        .post(tc.at("/admin/v1/nodes"))
        .bearer_auth(&tc.admin_token)
        .json(&json!({"id": new, "addr": tc.addr(new).to_string(), "epoch": epoch - 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        stale.status(),
        StatusCode::CONFLICT,
        "a change based on an old epoch"
    );
    let added = tc
        .client()
        .post(tc.at("/admin/v1/nodes"))
        .bearer_auth(&tc.admin_token)
        .json(&json!({"id": new, "addr": tc.addr(new).to_string(), "epoch": epoch}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::OK);
    let map: Value = added.json().await.unwrap();
    assert_eq!(map["epoch"], epoch + 1);
    assert_eq!(map["nodes"].as_array().unwrap().len(), 4);
    let again = tc
        .client()
        .post(tc.at("/admin/v1/nodes"))
        .bearer_auth(&tc.admin_token)
        .json(&json!({"id": new, "addr": tc.addr(new).to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::CONFLICT,
        "the node is already in"
    );

    poll_until("the new node to be ready", SETTLE_DEADLINE, || async {
        tc.all_nodes_ready().await
    })
    .await;
    load.more_writes(100, "writes after the join").await;
    let bad = load.finish().await;
    assert_eq!(bad, 0, "reads that failed while the node joined");
    settled(&tc, &acked).await;

    // Remove one of the first three.
    let load = Load::start(&tc, Arc::clone(&acked));
    load.more_writes(100, "writes before the removal").await;
    let leaving = ids[0];
    let removed = tc
        .client()
        .delete(tc.at(&format!("/admin/v1/nodes/{leaving}")))
        .bearer_auth(&tc.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        removed.status(),
        StatusCode::OK,
        "drained within the deadline"
    );
    let map: Value = removed.json().await.unwrap();
    let ids_left: Vec<u64> = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert!(!ids_left.contains(&u64::from(leaving)), "{map}");
    load.more_writes(100, "writes after the removal").await;
    let bad = load.finish().await;
    assert_eq!(bad, 0, "reads that failed while the node left");
    settled(&tc, &acked).await;

    let too_few = tc
        .client()
        .delete(tc.at(&format!("/admin/v1/nodes/{}", ids[1])))
        .bearer_auth(&tc.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        too_few.status(),
        StatusCode::CONFLICT,
        "three nodes are needed for RF 3"
    );
    tc.shutdown().await.unwrap();
}

/// Starts a spare node and adds it through the router; its id and the
/// epoch of the map that put it on the ring.
async fn add_spare_node(tc: &mut TestCluster) -> (u32, u64) {
    let new = tc.start_spare_node().await.unwrap();
    let added = tc.add_to_map(new).await.unwrap();
    assert_eq!(added.status(), StatusCode::OK);
    let epoch = added.json::<Value>().await.unwrap()["epoch"].as_u64();
    (new, epoch.unwrap())
}

/// Writes `key` with `w=all`, again while the answer is a 503: under load a
/// replica may miss the acknowledgement deadline, and the write, applied
/// where it reached, is then refused for its level. Writing the same value
/// again is safe; a refusal that lasts fails the test with its body.
async fn put_all(tc: &TestCluster, key: &str, value: &str) {
    let deadline = std::time::Instant::now() + SETTLE_DEADLINE;
    loop {
        let response = tc.put_level(key, value, "all").await.unwrap();
        let status = response.status();
        if status.is_success() {
            return;
        }
        let body = response.text().await.unwrap_or_default();
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE && std::time::Instant::now() < deadline,
            "w=all put of {key}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gives node `id` 10,000 records of its ranges (of a node outside the
/// cluster, so no puller takes them from the feed): a long log to pull.
async fn lengthen_log(tc: &TestCluster, id: u32) {
    let mut replication = tc.node_replication(id).await.unwrap();
    for batch in 0..10 {
        let records = (0..1000)
            .map(|n| caskade_proto::ReplicatedRecord {
                key: format!("long-{batch}-{n:04}").into_bytes().into(),
                value: b"in the long log".to_vec().into(),
                tombstone: false,
                version: Some(caskade_proto::Version {
                    hlc: caskade_common::Version::from_parts(1_000_000, 0, 999).hlc,
                    origin: 999,
                }),
                expires_at_ms: 0,
            })
            .collect();
        let request = caskade_proto::ApplyRequest { records, epoch: 0 };
        replication.apply(request).await.unwrap();
    }
}

/// Node `id`'s replication from each peer: peer → refilled epoch.
async fn refilled(tc: &TestCluster, id: u32) -> Option<BTreeMap<u32, u64>> {
    let mut admin = tc.node_admin(id).await.ok()?;
    let stats = admin.stats(caskade_proto::StatsRequest {}).await.ok()?;
    Some(
        stats
            .into_inner()
            .peers
            .iter()
            .map(|p| (p.peer_id, p.refilled_epoch))
            .collect(),
    )
}

/// Issue 13, bug 5: a node restarted in the middle of a ring change takes
/// it up again. A fourth node is added with RF 2, so every node loses
/// ranges; node 1 stops as soon as it has put the new map into effect,
/// before any node could drop what it lost, and starts again. It must still
/// refill from its peers, report that it did, and drop its own lost
/// ranges: a node that forgot its ring change would report nothing
/// refilled, and no node would ever drop a lost range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_during_a_ring_change_finishes_it() {
    let spec = ClusterSpec {
        // One record per pull of a long log: the refill outlasts the
        // restart below.
        configure: |config| config.replication.pull_max_records = 1,
        ..ClusterSpec::nodes(3, 2, policy())
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let (first, long) = (tc.node_ids()[0], tc.node_ids()[1]);
    lengthen_log(&tc, long).await;
    let acked: Acked = Arc::default();
    for n in 0..500 {
        let (key, value) = (format!("r-{n:03}"), format!("value {n}"));
        put_all(&tc, &key, &value).await;
        acked.lock().await.insert(key, value);
    }

    let (_, epoch) = add_spare_node(&mut tc).await;
    poll_until(
        "node 1 to put the new map into effect",
        SETTLE_DEADLINE,
        || async {
            let mut admin = tc.node_admin(first).await.unwrap();
            let stats = admin.stats(caskade_proto::StatsRequest {}).await;
            stats.is_ok_and(|s| s.into_inner().map_epoch >= epoch)
        },
    )
    .await;
    let before = refilled(&tc, first).await.unwrap();
    assert!(
        before.get(&long) < Some(&epoch),
        "node 1 still refills from the long log when it stops: {before:?}"
    );
    tc.stop_node(first).await.unwrap();
    tc.start_node(first).await.unwrap();

    poll_until("every node to be ready", SETTLE_DEADLINE, || async {
        tc.all_nodes_ready().await
    })
    .await;
    settled(&tc, &acked).await;
    let after = refilled(&tc, first).await.unwrap();
    assert!(after.values().all(|&e| e >= epoch), "{after:?}");
    tc.shutdown().await.unwrap();
}

/// Issue 13, bug 2: a refill still under way when a map that keeps the
/// ring arrives (here: a node marked down) finishes under that map. A pull
/// reaching a peer's end used to count only under the epoch of the ring
/// change itself, so such a refill never finished: the node kept refusing
/// its new ranges, and no node ever dropped a range it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refill_finishes_under_a_later_map_that_keeps_the_ring() {
    let spec = ClusterSpec {
        configure: |config| {
            // One record per pull of a long log: the refill outlasts the
            // failover by seconds.
            config.replication.pull_max_records = 1;
            config.cluster.failover_after_ms = 1000;
        },
        ..ClusterSpec::nodes(3, 2, policy())
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let long = ids[0];
    // Not the Raft leader, whose replacement would take an election first.
    let page = tc.admin_node(long).await.unwrap();
    let leader = page["stats"]["raft"]["leader"].as_u64().unwrap() as u32;
    let gone = *ids[1..].iter().find(|&&id| id != leader).unwrap();
    lengthen_log(&tc, long).await;

    let (new, ring_epoch) = add_spare_node(&mut tc).await;
    tc.stop_node(gone).await.unwrap();

    let live: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| id != gone)
        .chain([new])
        .collect();
    poll_until(
        "every live node to finish refilling from every live peer",
        SETTLE_DEADLINE,
        || async {
            for &id in &live {
                let Ok(mut admin) = tc.node_admin(id).await else {
                    return false;
                };
                let Ok(stats) = admin.stats(caskade_proto::StatsRequest {}).await else {
                    return false;
                };
                let stats = stats.into_inner();
                let refilled = |peer: u32| {
                    stats
                        .peers
                        .iter()
                        .any(|p| p.peer_id == peer && p.refilled_epoch >= ring_epoch)
                };
                if !live.iter().filter(|&&p| p != id).all(|&p| refilled(p)) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // A map that keeps the ring came meanwhile: the stopped node is down.
    let page = cluster_page(&tc).await;
    let marked =
        page["nodes"].as_array().unwrap().iter().any(|n| {
            n["id"].as_u64() == Some(u64::from(gone)) && n["down"].as_bool() == Some(true)
        });
    assert!(marked, "{page}");
    tc.shutdown().await.unwrap();
}

/// A ring change sends every cursor back to 0. When the peers have merged
/// deletes away (retention 0 here), those pulls become snapshot copies, and
/// a snapshot from a node that is itself still receiving ranges must not be
/// read as "every key it lacks was deleted". Four nodes, RF 3: removing one
/// moves its ranges to a node that does not hold them yet, which the others
/// copy snapshots from; after the removal every surviving key is still on
/// its replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_change_after_merged_deletes_deletes_nothing_else() {
    let spec = ClusterSpec {
        configure: deletes_merge_away,
        ..ClusterSpec::nodes(4, 3, policy())
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let survivors: Acked = Arc::default();
    // Values large enough that the small files rotate and merge has work.
    let value = "v".repeat(200);
    for n in 0..300 {
        let key = format!("kept-{n}");
        put_all(&tc, &key, &value).await;
        if n % 3 == 0 {
            let response = tc
                .client()
                .delete(format!("{}?w=all", tc.kv_url(&key)))
                .bearer_auth(&tc.writer_token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NO_CONTENT);
        } else {
            survivors.lock().await.insert(key, value.clone());
        }
    }
    for id in tc.node_ids() {
        let report = tc.merge_node(id).await.unwrap();
        assert!(report["records_dropped"].as_u64().unwrap() > 0, "{report}");
    }
    let leaving = tc.node_ids()[3];
    let removed = tc
        .client()
        .delete(tc.at(&format!("/admin/v1/nodes/{leaving}")))
        .bearer_auth(&tc.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), StatusCode::OK);
    poll_until("every node to be ready", SETTLE_DEADLINE, || async {
        tc.all_nodes_ready().await
    })
    .await;
    settled(&tc, &survivors).await;
    let page = cluster_page(&tc).await;
    let full: u64 = page["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(full_catch_ups)
        .sum();
    assert!(
        full > 0,
        "the merged deletes made the re-pulls snapshot copies: {page}"
    );
    tc.shutdown().await.unwrap();
}

/// The `caskade-node` binary built in this package, for nodes killed with SIGKILL.
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");

/// Failover on: the Raft leader marks a node silent for 1 s down.
fn quick_failover(config: &mut caskade_node::NodeConfig) {
    config.cluster.failover_after_ms = 1000;
}

/// Node `id` as the router's admin page shows it.
async fn page_node(tc: &TestCluster, id: u32) -> Option<Value> {
    let page = tc.admin_cluster().await.ok()?;
    page["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
}

/// A node killed for good: the Raft leader marks it down, the router stops
/// sending it requests, and `DELETE` removes it at once (there is nothing
/// to drain from it). Every key it replicated is pulled again from the
/// surviving replicas, so each is back on `replication_factor` nodes, and
/// the node leaves the Raft group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_marked_down_removed_and_its_ranges_get_back_to_three_copies() {
    let spec = ClusterSpec {
        configure: quick_failover,
        ..ClusterSpec::processes(4, 3, policy(), NODE_BINARY)
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let dead = tc.node_ids()[3];
    let acked: Acked = Arc::default();
    for n in 0..200 {
        let (key, value) = (format!("kept-{n}"), format!("value {n}"));
        put_all(&tc, &key, &value).await;
        acked.lock().await.insert(key, value);
    }

    tc.kill_node(dead).unwrap();
    poll_until(
        "the leader to mark the dead node down",
        SETTLE_DEADLINE,
        || async {
            page_node(&tc, dead)
                .await
                .is_some_and(|n| n["down"] == true)
        },
    )
    .await;
    poll_until(
        "the dead node's ranges to be taken over",
        SETTLE_DEADLINE,
        || tc.takeovers_done(),
    )
    .await;
    // Its keys are written and read on the next replicas meanwhile.
    for n in 0..100 {
        let (key, value) = (format!("while-down-{n}"), format!("value {n}"));
        let response = tc.put_level(&key, &value, "quorum").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{key}");
        acked.lock().await.insert(key, value);
    }

    let removed = tc
        .client()
        .delete(tc.at(&format!("/admin/v1/nodes/{dead}")))
        .bearer_auth(&tc.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        removed.status(),
        StatusCode::OK,
        "a down node is removed at once"
    );
    let map: Value = removed.json().await.unwrap();
    assert!(
        map["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["id"] != dead),
        "{map}"
    );
    // Three nodes, RF 3: every node holds every key again.
    settled(&tc, &acked).await;
    poll_until(
        "the dead node to leave the Raft group",
        SETTLE_DEADLINE,
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            page["nodes"].as_array().unwrap().iter().all(|n| {
                let raft = &n["stats"]["raft"];
                let listed = |field: &str| {
                    raft[field]
                        .as_array()
                        .is_some_and(|ids| ids.iter().any(|id| id == dead))
                };
                raft.is_object() && !listed("voters") && !listed("learners")
            })
        },
    )
    .await;
    tc.shutdown().await.unwrap();
}

/// Two operators add two different nodes at the same moment through two
/// routers, each based on the epoch it read: exactly one change commits,
/// the other is a 409 that changed nothing (its node is neither in the map
/// nor in the Raft group), and every node and router ends with one map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_racing_through_two_routers_make_one_change() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let second = tc.start_router().await.unwrap();
    let a = tc.start_spare_node().await.unwrap();
    let b = tc.start_spare_node().await.unwrap();
    let (_, _, epoch) = current_ring(&tc).await;

    let add = |base: String, id: u32| {
        let request = tc
            .client()
            .post(format!("{base}/admin/v1/nodes"))
            .bearer_auth(&tc.admin_token)
            .json(&json!({"id": id, "addr": tc.addr(id).to_string(), "epoch": epoch}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let ((first_status, first), (second_status, second_body)) =
        tokio::join!(add(tc.url.clone(), a), add(second.clone(), b));
    let mut statuses = [first_status, second_status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CONFLICT],
        "{first} {second_body}"
    );
    let (winner, loser, loser_body) = if first_status == StatusCode::OK {
        (a, b, second_body)
    } else {
        (b, a, first)
    };
    assert_eq!(loser_body["error"]["code"], "conflict", "{loser_body}");

    // One map everywhere: the winner in, the loser out, one epoch further.
    for base in [tc.url.clone(), second.clone()] {
        poll_until(
            "both routers to follow the change",
            SETTLE_DEADLINE,
            || async {
                let page = tc
                    .client()
                    .get(format!("{base}/admin/v1/cluster"))
                    .bearer_auth(&tc.admin_token)
                    .send()
                    .await;
                let Ok(page) = page else { return false };
                let Ok(page) = page.json::<Value>().await else {
                    return false;
                };
                page["epoch"] == epoch + 1
            },
        )
        .await;
    }
    let mut maps = Vec::new();
    // Every node but the loser, which belongs to no cluster.
    for id in tc.node_ids().into_iter().filter(|&id| id != loser) {
        let map = tc
            .node_admin(id)
            .await
            .unwrap()
            .get_cluster_map(caskade_proto::GetClusterMapRequest {
                after_epoch: epoch,
                wait_ms: 3_000,
            })
            .await
            .unwrap()
            .into_inner()
            .map
            .unwrap();
        maps.push(map);
    }
    assert!(maps.windows(2).all(|w| w[0] == w[1]), "{maps:?}");
    let ids: Vec<u32> = maps[0].nodes.iter().map(|n| n.id).collect();
    assert_eq!(maps[0].epoch, epoch + 1);
    assert!(ids.contains(&winner) && !ids.contains(&loser), "{ids:?}");
    // The loser never entered the Raft group (or left it again).
    poll_until(
        "the Raft group to equal the map",
        SETTLE_DEADLINE,
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            page["nodes"].as_array().unwrap().iter().all(|n| {
                let raft = &n["stats"]["raft"];
                let mut group: Vec<u64> = ["voters", "learners"]
                    .iter()
                    .filter_map(|f| raft[*f].as_array())
                    .flatten()
                    .filter_map(Value::as_u64)
                    .collect();
                group.sort_unstable();
                let mut want: Vec<u64> = ids.iter().map(|&i| u64::from(i)).collect();
                want.sort_unstable();
                group == want
            })
        },
    )
    .await;
    tc.shutdown().await.unwrap();
}
