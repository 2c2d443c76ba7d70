//! One coordinator per key range: only the range's primary under the
//! committed cluster map coordinates its writes, and a node that becomes
//! primary holds every write acknowledged before it took over. Conditional
//! writes therefore hold at most once, through any router, across failover.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caskade_common::Ring;
use caskade_proto::{Condition, PutRequest, condition};
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Code;

fn policy() -> NodePolicy {
    NodePolicy {
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

fn put_if_absent(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        condition: Some(Condition {
            kind: Some(condition::Kind::IfAbsent(true)),
        }),
        ..PutRequest::default()
    }
}

/// Two routers that disagree on which replica to use (one skips the
/// primary: its breaker is open, or it looked not ready) send the same
/// `If-None-Match: *` write to different replicas. Only the primary may
/// coordinate it: the other replica refuses without writing, so the
/// condition holds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_primary_coordinates_a_write() {
    let tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    for key in tc.keys_where("claim", 5, |_| true) {
        let list = tc.preference_list(key.as_bytes());
        let (primary, secondary) = (list[0], list[1]);
        let by_secondary = tc
            .node_kv(secondary)
            .await
            .unwrap()
            .put(put_if_absent(&key, "via-secondary"))
            .await;
        let by_primary = tc
            .node_kv(primary)
            .await
            .unwrap()
            .put(put_if_absent(&key, "via-primary"))
            .await;
        let refused = by_secondary.expect_err("a secondary coordinated a write");
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
        assert!(by_primary.is_ok(), "{by_primary:?}");
        // The refusal wrote nothing: the secondary ends with the primary's value.
        poll_until(
            "the primary's write to reach the secondary",
            Duration::from_secs(10),
            || async {
                tc.scan_node(secondary)
                    .await
                    .unwrap()
                    .get(key.as_bytes())
                    .is_some_and(|copy| copy.1 == b"via-primary")
            },
        )
        .await;
    }
    tc.shutdown().await.unwrap();
}

/// Waits until every node of `list` holds `value` for `key`.
async fn on_every_replica(tc: &TestCluster, list: &[u32], key: &str, value: &[u8]) {
    poll_until(
        "the write on every replica",
        Duration::from_secs(10),
        || async {
            let mut everywhere = true;
            for &id in list {
                everywhere &= tc
                    .scan_node(id)
                    .await
                    .is_ok_and(|held| held.get(key.as_bytes()).is_some_and(|c| c.1 == value));
            }
            everywhere
        },
    )
    .await;
}

/// The `caskade-node` binary built in this package, for nodes that are
/// frozen (SIGSTOP) and killed (SIGKILL).
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");

/// Marks a node down after 1 s without answers; pulls ten records at a time.
fn quick_failover(config: &mut caskade_node::NodeConfig) {
    config.cluster.failover_after_ms = 1000;
    config.replication.pull_max_records = 10;
}

/// Writes the frozen replica misses before W1.
const BACKLOG: usize = 100;

/// Whether the router's page shows node `id` marked down.
fn is_down(page: &Value, id: u32) -> bool {
    page["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["id"] == id && n["down"] == true)
}

/// W1 is acknowledged at `w=quorum` by the primary and the third replica
/// while the second is frozen; the primary dies, the second thaws and the
/// map makes it the primary. It has never seen W1 (it pulls the primary's
/// writes from the primary), yet it must not accept an `If-Match` on the
/// ETag W1 replaced: that would lose an acknowledged update. It catches up
/// from a majority of the range before it coordinates anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_holds_every_write_acknowledged_before_it_took_over() {
    let spec = ClusterSpec {
        configure: quick_failover,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let leader = tc.admin_cluster().await.unwrap()["leader"]
        .as_u64()
        .unwrap() as u32;
    // The Raft group keeps its leader through the primary's death.
    let key = tc.keys_where("lost-update", 1, |list| list[0] != leader)[0].clone();
    let list = tc.preference_list(key.as_bytes());
    let (primary, second) = (list[0], list[1]);

    let first = tc.put_level(&key, "w0", "quorum").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let w0 = first.headers()["etag"].to_str().unwrap().to_string();
    on_every_replica(&tc, &list, &key, b"w0").await;

    // A frozen process is still killed when the cluster is dropped. Its
    // pull under way is answered into its socket while it is frozen, with
    // at most ten records: the backlog keeps W1 out of that answer.
    tc.signal_node(second, "STOP").unwrap();
    let same_replicas = tc.keys_where("backlog", BACKLOG, |l| l == list.as_slice());
    for other in &same_replicas {
        let response = tc.put_level(other, "b", "quorum").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{other}");
    }
    let acknowledged = tc.put_level(&key, "w1", "quorum").await.unwrap();
    assert_eq!(
        acknowledged.status(),
        StatusCode::OK,
        "w1 with two of three"
    );
    tc.kill_node(primary).unwrap();
    tc.signal_node(second, "CONT").unwrap();
    poll_until(
        "the dead primary to be marked down",
        Duration::from_secs(30),
        || async { tc.admin_cluster().await.is_ok_and(|p| is_down(&p, primary)) },
    )
    .await;

    // Sent to the second replica, as a router whose view prefers it does
    // (the map now makes it the primary): refused while it puts the map
    // into effect (ABORTED: not the primary yet) and catches up
    // (UNAVAILABLE), never accepted.
    let w0: caskade_common::Version = w0.trim_matches('"').parse().unwrap();
    let if_match_w0 = PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"w2".to_vec().into(),
        condition: Some(Condition {
            kind: Some(condition::Kind::IfVersion(caskade_proto::Version {
                hlc: w0.hlc,
                origin: w0.origin,
            })),
        }),
        ..PutRequest::default()
    };
    let mut answer = Code::Unavailable;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let not_now = |code| matches!(code, Code::Unavailable | Code::Aborted);
    while not_now(answer) && tokio::time::Instant::now() < deadline {
        let mut kv = tc.node_kv(second).await.unwrap();
        answer = match kv.put(if_match_w0.clone()).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        if not_now(answer) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        answer,
        Code::FailedPrecondition,
        "an If-Match on the ETag an acknowledged write replaced did not fail its condition"
    );
    let read = tc.get(&key).await.unwrap();
    assert_eq!(read.text().await.unwrap(), "w1");
    tc.shutdown().await.unwrap();
}

/// A write that missed its level is held by its primary alone; a failover
/// now would lose it. A conditional write of the key must not be refused
/// on it (FAILED_PRECONDITION): the client would learn of a value no
/// majority holds, and a quorum read just after, or the primary that takes
/// over, shows the value before it. The primary answers only once what the
/// condition was checked against holds at the write's level, and UNAVAILABLE
/// (nothing written) otherwise. Both secondaries are frozen here, and their
/// lease confirmations still hold the primary's lease (2 s) when the
/// conditional write arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_is_not_refused_on_a_write_that_missed_its_level() {
    let spec = ClusterSpec {
        configure: |config| config.replication.ack_timeout_ms = 300,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let key = tc.keys_where("unreplicated", 1, |_| true)[0].clone();
    let list = tc.preference_list(key.as_bytes());
    let first = tc.put_level(&key, "w0", "quorum").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let w0: caskade_common::Version = first.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap();
    on_every_replica(&tc, &list, &key, b"w0").await;

    for &secondary in &list[1..] {
        tc.signal_node(secondary, "STOP").unwrap();
    }
    let mut primary = tc.node_kv(list[0]).await.unwrap();
    let put = |value: &str, condition| PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        condition,
        write_level: caskade_proto::WriteLevel::Quorum as i32,
        ..PutRequest::default()
    };
    let missed = primary.put(put("w1", None)).await;
    let if_match_w0 = Some(Condition {
        kind: Some(condition::Kind::IfVersion(caskade_proto::Version {
            hlc: w0.hlc,
            origin: w0.origin,
        })),
    });
    let conditional = primary.put(put("w2", if_match_w0)).await;
    for &secondary in &list[1..] {
        tc.signal_node(secondary, "CONT").unwrap();
    }
    let missed = missed.expect_err("w1 acknowledged with both secondaries frozen");
    assert_eq!(missed.code(), Code::Unavailable, "{missed:?}");
    let refused = conditional.expect_err("the If-Match on w0 applied over w1");
    assert_eq!(
        refused.code(),
        Code::Unavailable,
        "refused on a write no majority holds: {refused:?}"
    );
    assert!(
        refused.message().contains("nothing was written"),
        "refused for another reason (a lease that ran out proves nothing here): {refused:?}"
    );
    // Thawed, the secondaries take w1 and the condition fails, once w1
    // holds at the write level; w2 was never written.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let Err(refused) = primary.put(put("w2", if_match_w0)).await else {
            panic!("the If-Match on w0 applied over w1");
        };
        if refused.code() != Code::Unavailable || tokio::time::Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    on_every_replica(&tc, &list, &key, b"w1").await;
    tc.shutdown().await.unwrap();
}

/// A write that reached its primary and whose exchange then broke off may
/// have been applied, or may be later. Here the primary freezes with the
/// request in its socket; the router's HTTP/2 keep-alive gives up on the
/// connection (10 s ping, 5 s timeout) and fails the stream. The write must
/// not be sent to another replica (the frozen primary applies it when it
/// resumes), and the client is told the outcome is unknown. With an
/// `Idempotency-Key`, a retry is answered the same and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_off_after_reaching_its_primary_has_an_unknown_outcome() {
    // The router's own timeout must not end the exchange first.
    let policy = NodePolicy {
        timeout_ms: 60_000,
        ..policy()
    };
    let tc = TestCluster::start(ClusterSpec::processes(3, 3, policy, NODE_BINARY))
        .await
        .unwrap();
    let leader = tc.admin_cluster().await.unwrap()["leader"]
        .as_u64()
        .unwrap() as u32;
    let key = tc.keys_where("cut-off", 1, |list| list[0] != leader)[0].clone();
    let list = tc.preference_list(key.as_bytes());
    let primary = list[0];
    let warm = tc.put_level(&key, "w0", "quorum").await.unwrap();
    assert_eq!(warm.status(), StatusCode::CREATED);
    on_every_replica(&tc, &list, &key, b"w0").await;

    let patient = tc.client_with_timeout(Duration::from_secs(60)).unwrap();
    let send = || async {
        let response = patient
            .put(tc.kv_url(&key))
            .bearer_auth(&tc.writer_token)
            .header("idempotency-key", "cut-off-once")
            .body("w1")
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    };
    // A frozen process is still killed when the cluster is dropped.
    tc.signal_node(primary, "STOP").unwrap();
    let (status, body) = send().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["outcome"], "unknown", "{body}");
    for &id in &list[1..] {
        let held = tc.scan_node(id).await.unwrap();
        assert_eq!(
            held.get(key.as_bytes()).map(|c| c.1.clone()),
            Some(b"w0".to_vec()),
            "node {id} holds a write re-sent to it"
        );
    }
    // The same request again is the same answer.
    let (again, again_body) = send().await;
    assert_eq!((again, &again_body), (status, &body));
    tc.signal_node(primary, "CONT").unwrap();
    tc.shutdown().await.unwrap();
}

/// DELETEs of a node sent while it is still draining, at most.
const REMOVAL_ATTEMPTS: usize = 5;

/// Map changes that leave a key's replicas and primary as they were cost
/// its writes nothing. Two spare nodes are added and removed in turn (each
/// cycle is several epochs: joining, serving, leaving, removed) while
/// writers put keys whose preference list holds neither spare, at
/// `w=quorum`. Their primary stays their primary and their replicas stay
/// theirs in every epoch, so a peer's acknowledgement or lease confirmation
/// made under a later or earlier of those epochs still proves what it
/// proved under the write's own: every one of these writes must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_changes_that_keep_a_keys_replicas_do_not_fail_its_writes() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let founders = tc.node_ids();
    let spares = [
        tc.start_spare_node().await.unwrap(),
        tc.start_spare_node().await.unwrap(),
    ];
    let map = tc.map().clone();
    // The ring with each spare added (a leaving node is off the ring).
    let rings: Vec<Ring> = spares
        .iter()
        .map(|&spare| {
            let mut members = founders.clone();
            members.push(spare);
            Ring::new(&members, map.vnodes_per_node, map.replication_factor)
        })
        .collect();
    let keys: Vec<String> = (0..)
        .map(|n| format!("steady-{n}"))
        .filter(|key| {
            spares
                .iter()
                .zip(&rings)
                .all(|(spare, ring)| !ring.preference_list(key.as_bytes()).contains(spare))
        })
        .take(8)
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..3 {
        let (client, url, token) = (
            tc.new_client().unwrap(),
            tc.url.clone(),
            tc.writer_token.clone(),
        );
        let (keys, stop) = (keys.clone(), Arc::clone(&stop));
        writers.spawn(async move {
            let (mut written, mut failed) = (0usize, Vec::new());
            let mut n = writer;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[n % keys.len()];
                let sent = client
                    .put(format!("{url}/v1/kv/{key}?w=quorum"))
                    .bearer_auth(&token)
                    .body(format!("{writer}-{n}"))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => written += 1,
                    Ok(response) => failed.push(format!(
                        "{key}: {} {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    )),
                    Err(error) => failed.push(format!("{key}: {error}")),
                }
                n += 3;
            }
            (written, failed)
        });
    }

    let mut epochs = Vec::new();
    for spare in spares {
        let added = tc
            .client()
            .post(tc.at("/admin/v1/nodes"))
            .bearer_auth(&tc.admin_token)
            .json(&json!({"id": spare, "addr": tc.addr(spare).to_string()}))
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), StatusCode::OK, "adding node {spare}");
        poll_until("the new node to serve", Duration::from_secs(60), || async {
            tc.all_nodes_ready().await
        })
        .await;
        // Each DELETE waits for the drain up to a deadline of its own; 202
        // says the node is still draining.
        let mut removed = StatusCode::ACCEPTED;
        for _ in 0..REMOVAL_ATTEMPTS {
            removed = tc
                .client()
                .delete(tc.at(&format!("/admin/v1/nodes/{spare}")))
                .bearer_auth(&tc.admin_token)
                .send()
                .await
                .unwrap()
                .status();
            if removed != StatusCode::ACCEPTED {
                break;
            }
        }
        assert_eq!(removed, StatusCode::OK, "removing node {spare}");
        epochs.push(tc.admin_cluster().await.unwrap()["epoch"].as_u64().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let (mut written, mut failed) = (0, Vec::new());
    while let Some(done) = writers.join_next().await {
        let (w, f) = done.unwrap();
        written += w;
        failed.extend(f);
    }
    assert!(written > 0, "nothing was written");
    assert!(
        failed.is_empty(),
        "{} of {} writes failed across epochs {epochs:?}: {failed:#?}",
        failed.len(),
        written + failed.len()
    );
    tc.shutdown().await.unwrap();
}
