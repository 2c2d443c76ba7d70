//! Replication end to end: write levels, read levels and read repair,
//! catch-up after a crash (incremental and full), failover of a killed
//! primary, and convergence of conflicting writes.
//!
//! Crash cases run each storage node in a process of its own and kill it
//! with SIGKILL; the others run nodes in the test's process. Replicas are
//! compared through each node's own `Kv/Scan` (keys, versions, values and
//! expiries), never through the router, which would hide a stale replica.
//! Conditions are polled with a deadline; nothing sleeps to wait.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caskade_proto::{GetRequest, Version};
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{
    ClusterSpec, NodeCopy, TestCluster, deletes_merge_away, full_catch_ups, poll_until,
    quick_failover,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Mutex;

/// How long replicas may take to converge or a node to catch up.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the router may take to notice a node stopped or returned.
const NOTICE_DEADLINE: Duration = Duration::from_secs(10);
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");

fn policy() -> NodePolicy {
    NodePolicy {
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

/// Every live key of node `id`, read from the node itself.
async fn scan_node(tc: &TestCluster, id: u32) -> BTreeMap<Vec<u8>, NodeCopy> {
    tc.scan_node(id).await.unwrap()
}

/// Waits until nodes `ids` hold exactly the same keys, versions, values
/// and expiries; returns that content.
async fn converged(tc: &TestCluster, ids: &[u32]) -> BTreeMap<Vec<u8>, NodeCopy> {
    let content = std::cell::RefCell::new(BTreeMap::new());
    poll_until("replicas to converge", CONVERGE_DEADLINE, || async {
        let first = scan_node(tc, ids[0]).await;
        for &id in &ids[1..] {
            if scan_node(tc, id).await != first {
                return false;
            }
        }
        *content.borrow_mut() = first;
        true
    })
    .await;
    content.into_inner()
}

/// Waits until node `id` answers its readiness check with SERVING; says
/// whether it answered NOT_SERVING (catching up) before that.
async fn wait_serving(tc: &TestCluster, id: u32) -> bool {
    let saw_not_serving = std::cell::Cell::new(false);
    poll_until(
        &format!("node {id} to serve"),
        CONVERGE_DEADLINE,
        || async {
            match tc.node_serving(id).await {
                Some(true) => true,
                Some(false) => {
                    saw_not_serving.set(true);
                    false
                }
                None => false,
            }
        },
    )
    .await;
    saw_not_serving.get()
}

fn etag_version(response: &reqwest::Response) -> String {
    response.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// A version just after the one `response`'s ETag names, from an origin
/// that is no node of the cluster.
fn just_after(response: &reqwest::Response) -> Version {
    let etag = etag_version(response);
    let (hlc, _) = etag.split_once('-').unwrap();
    Version {
        hlc: hlc.parse::<u64>().unwrap() + 1,
        origin: 99,
    }
}

async fn get_level(tc: &TestCluster, key: &str, r: &str) -> reqwest::Response {
    tc.client()
        .get(format!("{}?r={r}", tc.kv_url(key)))
        .bearer_auth(&tc.writer_token)
        .send()
        .await
        .unwrap()
}

async fn delete(tc: &TestCluster, key: &str) -> reqwest::Response {
    tc.client()
        .delete(tc.kv_url(key))
        .bearer_auth(&tc.writer_token)
        .send()
        .await
        .unwrap()
}

/// The value node `id` holds for `key`, asked directly.
async fn node_value(tc: &TestCluster, id: u32, key: &str) -> Option<(String, String)> {
    let answer = tc
        .node_kv(id)
        .await
        .unwrap()
        .get(GetRequest {
            key: key.as_bytes().to_vec().into(),
            read_level: 0,
        })
        .await
        .unwrap()
        .into_inner();
    answer.found.then(|| {
        let v = answer.version.unwrap();
        (
            String::from_utf8(answer.value.to_vec()).unwrap(),
            format!("{}-{}", v.hlc, v.origin),
        )
    })
}

// ------------------------------------------------------------ write levels

/// Three nodes, RF 3. `w=all` is on every node when acknowledged, and an
/// `r=any` read finds it. With one node down `w=quorum` succeeds and
/// `w=all` is a 503 `write_level_not_met` that was not rolled back; the
/// node, back, catches up on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_levels_are_met_or_reported() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let ids = tc.node_ids();

    let response = tc.put_level("everywhere", "v1", "all").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let version = etag_version(&response);
    for &id in &ids {
        assert_eq!(
            node_value(&tc, id, "everywhere").await,
            Some(("v1".into(), version.clone())),
            "node {id} holds a w=all write when it is acknowledged"
        );
    }
    for _ in 0..ids.len() {
        let response = get_level(&tc, "everywhere", "any").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "v1");
    }

    let down = ids[2];
    tc.stop_node(down).await.unwrap();
    poll_until("the router to notice", NOTICE_DEADLINE, || async {
        tc.nodes_ready().await == Some(2)
    })
    .await;
    // Keys whose primary is up: with failover off, the stopped node's own
    // keys take no writes at all.
    let up_primary = |prefix: &str| tc.keys_where(prefix, 1, |list| list[0] != down).remove(0);
    let (quorum_key, all_key) = (up_primary("quorum-key"), up_primary("all-key"));
    let response = tc.put_level(&quorum_key, "q", "quorum").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = tc.put_level(&all_key, "a", "all").await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let written = etag_version(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "write_level_not_met", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("reached 2 of the 3"), "{message}");
    // Not rolled back: a quorum read finds it.
    let response = get_level(&tc, &all_key, "quorum").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(etag_version(&response), written);

    tc.start_node(down).await.unwrap();
    wait_serving(&tc, down).await;
    assert_eq!(node_value(&tc, down, &all_key).await.unwrap().1, written);
    assert_eq!(node_value(&tc, down, &quorum_key).await.unwrap().0, "q");
    converged(&tc, &ids).await;
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ read repair

/// A quorum read answers with the newest copy among a majority and repairs
/// the older one: node A is given a newer version directly (as a replica
/// that alone received a write would be), node C is down, and a read at
/// `r=quorum` must answer A's version and bring B up to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_reads_return_the_newest_copy_and_repair_stale_replicas() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let ids = tc.node_ids();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let response = tc.put_level("repaired", "old", "all").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    tc.stop_node(c).await.unwrap();

    // A newer version on A only. Its origin is no node of the cluster, so
    // live replication (which forwards a node's own writes) leaves it there.
    let newer = just_after(&response);
    let applied = tc
        .apply_on(a, "repaired", Some("new"), newer)
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(node_value(&tc, b, "repaired").await.unwrap().0, "old");

    let response = get_level(&tc, "repaired", "quorum").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(etag_version(&response), format!("{}-99", newer.hlc));
    assert_eq!(response.text().await.unwrap(), "new");
    poll_until("B to be repaired", NOTICE_DEADLINE, || async {
        node_value(&tc, b, "repaired").await.map(|v| v.0) == Some("new".into())
    })
    .await;
    let repairs = tc.metrics().await.unwrap().value(
        "caskade_router_read_repairs_total",
        &[("node", &b.to_string())],
    );
    assert_eq!(repairs, Some(1.0));

    // A deleted key is repaired too. (A's clock has moved past the version
    // it was given, so the delete's version is taken from the value's.) Its
    // primary is up: C's keys take no writes while C is down.
    let gone = &tc.keys_where("gone", 1, |list| list[0] != c)[0];
    let response = tc.put_level(gone, "x", "quorum").await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    tc.apply_on(a, gone, None, just_after(&response))
        .await
        .unwrap();
    let response = get_level(&tc, gone, "quorum").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    poll_until("B to learn of the delete", NOTICE_DEADLINE, || async {
        node_value(&tc, b, gone).await.is_none()
    })
    .await;
    tc.shutdown().await.unwrap();
}

/// A quorum read also compares the replicas that answer after the first
/// majority, and repairs them (within their deadline, after the client has
/// its answer): twenty keys are newer on A and B than on C, so for most of
/// them A and B make the first majority and C answers last. Anti-entropy is
/// off, so only the reads can repair C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_reads_repair_the_slower_replicas_too() {
    let mut spec = ClusterSpec::nodes(3, 3, policy());
    spec.configure = |config| config.replication.anti_entropy_interval_ms = 0;
    let tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let mut keys = Vec::new();
    for n in 0..20 {
        let key = format!("late-{n}");
        let response = tc.put_level(&key, "old", "all").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let newer = just_after(&response);
        for id in [a, b] {
            let applied = tc.apply_on(id, &key, Some("new"), newer).await.unwrap();
            assert_eq!(applied, 1);
        }
        keys.push(key);
    }
    let repairs = || async {
        tc.metrics()
            .await
            .unwrap()
            .value(
                "caskade_router_read_repairs_total",
                &[("node", &c.to_string())],
            )
            .unwrap_or(0.0)
    };
    let before = repairs().await;
    for key in &keys {
        let response = get_level(&tc, key, "quorum").await;
        assert_eq!(response.status(), StatusCode::OK, "{key}");
        assert_eq!(response.text().await.unwrap(), "new", "{key}");
    }
    poll_until("C to be repaired", NOTICE_DEADLINE, || async {
        for key in &keys {
            if node_value(&tc, c, key).await.map(|v| v.0) != Some("new".into()) {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(repairs().await - before, 20.0, "one repair per key");
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ catch-up

/// What the test expects of a key after its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Value(String),
    Deleted,
}

/// Writes `count` keys `{prefix}-{n}` through the router at `w=quorum`:
/// every fifth is deleted again, every seventh overwritten, every eleventh
/// written with a TTL of an hour. Returns what each key must hold.
async fn write_mix(tc: &TestCluster, prefix: &str, count: usize) -> BTreeMap<String, Expected> {
    let expected = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, url, token) = (tc.client().clone(), tc.url.clone(), tc.writer_token.clone());
        let expected = Arc::clone(&expected);
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            for n in (worker..count).step_by(8) {
                let key = format!("{prefix}-{n}");
                let at = format!("{url}/v1/kv/{key}");
                let ttl = if n % 11 == 0 { "&ttl=3600" } else { "" };
                // A write the cluster could not complete in time (a 503 or
                // 504 on a loaded machine) is sent again: the test is about
                // what acknowledged writes leave behind.
                let send = |method: reqwest::Method, value: Option<String>| {
                    let (client, token) = (&client, &token);
                    let url = match value {
                        Some(_) => format!("{at}?w=quorum{ttl}"),
                        None => at.clone(),
                    };
                    async move {
                        for attempt in 0..5 {
                            let mut request =
                                client.request(method.clone(), &url).bearer_auth(token);
                            if let Some(value) = &value {
                                request = request.body(value.clone());
                            }
                            let response = request.send().await.unwrap();
                            if !response.status().is_server_error() || attempt == 4 {
                                return response.status();
                            }
                            eprintln!("{method} {url}: {}, sent again", response.status());
                        }
                        unreachable!("the last attempt returns")
                    }
                };
                let status = send(reqwest::Method::PUT, Some(format!("first-{n}"))).await;
                assert!(status.is_success(), "PUT {key}: {status}");
                let mut state = Expected::Value(format!("first-{n}"));
                if n % 7 == 0 {
                    let status = send(reqwest::Method::PUT, Some(format!("second-{n}"))).await;
                    assert!(status.is_success(), "overwrite {key}: {status}");
                    state = Expected::Value(format!("second-{n}"));
                }
                if n % 5 == 0 {
                    let status = send(reqwest::Method::DELETE, None).await;
                    assert_eq!(status, StatusCode::NO_CONTENT, "DELETE {key}");
                    state = Expected::Deleted;
                }
                expected.lock().await.insert(key, state);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    Arc::try_unwrap(expected).unwrap().into_inner()
}

/// Asserts node `id` holds exactly `expected`, asked key by key.
async fn assert_holds(tc: &TestCluster, id: u32, expected: &BTreeMap<String, Expected>) {
    for (key, want) in expected {
        let got = node_value(tc, id, key).await.map(|(value, _)| value);
        match want {
            Expected::Value(value) => {
                assert_eq!(got.as_deref(), Some(value.as_str()), "node {id}: {key}")
            }
            Expected::Deleted => assert_eq!(got, None, "node {id}: {key} was deleted"),
        }
    }
}

/// Kill -9 a node, write 1,000 keys (deletes, overwrites, TTLs) once its
/// ranges have failed over, restart it: it says NOT_SERVING while it
/// catches up, and once it serves, its data equals the others' exactly.
/// Then kill -9 the other two: every acknowledged write is read back from
/// the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_catches_up_before_it_serves_and_survives_alone() {
    let spec = ClusterSpec {
        configure: quick_failover,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let returning = ids[2];
    write_mix(&tc, "before", 50).await;

    tc.kill_node(returning).unwrap();
    tc.wait_failed_over(returning).await;
    let expected = write_mix(&tc, "missed", 1000).await;

    // Small pulls, so that catching up takes many round trips and its
    // NOT_SERVING phase is seen.
    let mut config = tc.node_config(returning).clone();
    config.replication.pull_max_records = 2;
    tc.set_node_config(returning, config);
    tc.start_node(returning).await.unwrap();
    let saw_catching_up = wait_serving(&tc, returning).await;
    assert!(saw_catching_up, "the node served before it had caught up");
    // Nothing is written now: serving means it already holds everything.
    let first = scan_node(&tc, returning).await;
    for &id in &ids[..2] {
        assert_eq!(
            scan_node(&tc, id).await,
            first,
            "node {id} and the returned node"
        );
    }
    assert_holds(&tc, returning, &expected).await;

    tc.kill_node(ids[0]).unwrap();
    tc.kill_node(ids[1]).unwrap();
    assert_holds(&tc, returning, &expected).await;
    poll_until(
        "the router to see the survivor alone",
        NOTICE_DEADLINE,
        || async { tc.nodes_ready().await == Some(1) },
    )
    .await;
    for (key, want) in expected.iter().take(100) {
        let response = tc.get(key).await.unwrap();
        match want {
            Expected::Value(value) => {
                assert_eq!(response.status(), StatusCode::OK, "{key}");
                assert_eq!(&response.text().await.unwrap(), value);
            }
            Expected::Deleted => assert_eq!(response.status(), StatusCode::NOT_FOUND, "{key}"),
        }
    }
    tc.shutdown().await.unwrap();
}

/// Pause before a writer sends a failed write again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Writers keep writing keys whose primary is node P; P is killed -9 in the
/// middle. Once the map marks P down, the next replica takes the range over
/// and writes resume there; P comes back and catches up; no acknowledged
/// write is lost and all replicas converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_no_acknowledged_write() {
    let spec = ClusterSpec {
        configure: quick_failover,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let primary = ids[0];
    let keys = tc.keys_with_primary(primary, "stream", 1200);
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let client = tc.new_client().unwrap();
        let (url, token) = (tc.url.clone(), tc.writer_token.clone());
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        let mine: Vec<String> = keys.iter().skip(worker).step_by(4).cloned().collect();
        writers.spawn(async move {
            for key in mine {
                // Errors while the primary dies and its range fails over
                // are expected: not acknowledged, and sent again (a put of
                // the same value may be repeated).
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let sent = client
                        .put(format!("{url}/v1/kv/{key}?w=quorum"))
                        .bearer_auth(&token)
                        .body(format!("value of {key}"))
                        .send()
                        .await;
                    if let Ok(response) = sent
                        && response.status().is_success()
                    {
                        acked.lock().await.insert(key);
                        break;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        });
    }
    let acked_count = || async { acked.lock().await.len() };
    poll_until("writes before the kill", CONVERGE_DEADLINE, || async {
        acked_count().await >= 150
    })
    .await;
    tc.kill_node(primary).unwrap();
    let at_kill = acked_count().await;
    poll_until("writes failing over", CONVERGE_DEADLINE, || async {
        acked_count().await >= at_kill + 150
    })
    .await;
    tc.start_node(primary).await.unwrap();
    wait_serving(&tc, primary).await;
    poll_until("writes after the return", CONVERGE_DEADLINE, || async {
        acked_count().await >= at_kill + 300
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }

    let content = converged(&tc, &ids).await;
    let acked = acked.lock().await;
    for key in acked.iter() {
        let copy = content.get(key.as_bytes());
        assert_eq!(
            copy.map(|c| c.1.clone()),
            Some(format!("value of {key}").into_bytes()),
            "acknowledged {key} is on every replica"
        );
    }
    tc.shutdown().await.unwrap();
}

/// Full catch-up: with a tombstone retention of zero, the healthy nodes
/// merge away the deletes a stopped node missed. Returning, it finds its
/// cursor behind their horizon, copies their snapshot and drops the keys
/// deleted meanwhile instead of bringing them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_catch_up_does_not_resurrect_deleted_keys() {
    let spec = ClusterSpec {
        configure: |config| {
            deletes_merge_away(config);
            quick_failover(config);
        },
        ..ClusterSpec::nodes(3, 3, policy())
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let away = ids[2];
    for n in 0..200 {
        let response = tc.put_level(&format!("k-{n}"), "v1", "all").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    tc.stop_node(away).await.unwrap();
    tc.wait_failed_over(away).await;
    for n in 0..200 {
        let key = format!("k-{n}");
        match n % 4 {
            0 | 1 => {
                let response = delete(&tc, &key).await;
                let status = response.status();
                assert_eq!(
                    status,
                    StatusCode::NO_CONTENT,
                    "{}",
                    response.text().await.unwrap()
                );
            }
            2 => assert_eq!(tc.put(&key, "v2").await.unwrap().status(), StatusCode::OK),
            _ => {}
        }
        let fresh = tc.put(&format!("new-{n}"), "fresh").await.unwrap();
        assert_eq!(fresh.status(), StatusCode::CREATED);
    }
    for &id in &ids[..2] {
        tc.merge_node(id).await.unwrap();
        let node = tc.admin_node(id).await.unwrap();
        assert!(
            node["stats"]["tombstones"].as_u64().unwrap() < 100,
            "merge dropped the tombstones: {node}"
        );
    }

    tc.start_node(away).await.unwrap();
    wait_serving(&tc, away).await;
    let content = converged(&tc, &ids).await;
    for n in 0..200 {
        let held = content
            .get(format!("k-{n}").as_bytes())
            .map(|c| c.1.clone());
        let want = match n % 4 {
            0 | 1 => None,
            2 => Some(b"v2".to_vec()),
            _ => Some(b"v1".to_vec()),
        };
        assert_eq!(held, want, "k-{n}");
        assert!(content.contains_key(format!("new-{n}").as_bytes()));
    }
    let node = tc.admin_node(away).await.unwrap();
    assert!(
        full_catch_ups(&node) >= 1,
        "the node took the full catch-up path: {node}"
    );
    tc.shutdown().await.unwrap();
}

/// A full catch-up that must infer deletes, set up for issue 13, bug 1.
/// RF 3 on {N, P, Q}. K reached N and Q but not P (a caught-up puller
/// takes from a peer only what that peer coordinated, and K's coordinator
/// is gone). A second key's value reached N only and its later delete Q
/// only (N's pull from Q skipped it the same way). Then N is away while P
/// deletes every other `p-` key and merges the deletes away; N is left
/// stopped, so that its next start takes a full catch-up from P, where
/// both keys are absent and older than the retention.
struct Stranded {
    tc: TestCluster,
    p: u32,
    q: u32,
    n: u32,
    /// K: on N and Q.
    held: String,
    /// On N as a value, on Q as a newer tombstone.
    deleted_on_q: String,
    /// Every other one was deleted while N was away.
    on_p: Vec<String>,
}

async fn strand_and_merge() -> Stranded {
    let spec = ClusterSpec {
        configure: |config| {
            deletes_merge_away(config);
            quick_failover(config);
            // The feed is what filters a caught-up puller's records by
            // their coordinator; anti-entropy would copy K onto P.
            config.replication.feed_bytes = 32 << 20;
            config.replication.anti_entropy_interval_ms = 0;
        },
        ..ClusterSpec::nodes(3, 3, policy())
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let (p, q, n) = (ids[0], ids[1], ids[2]);
    let filler = "f".repeat(200);
    let on_p = tc.keys_with_primary(p, "p-", 200);
    for key in &on_p {
        let response = tc.put_level(key, &filler, "all").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // Q's keys, so that no takeover below copies them to P.
    let held = tc.keys_with_primary(q, "held-", 1).remove(0);
    let an_hour_ago = caskade_common::version::unix_millis() - 3_600_000;
    let version = Version {
        hlc: caskade_common::Version::from_parts(an_hour_ago, 0, 999).hlc,
        origin: 999,
    };
    for id in [n, q] {
        let applied = tc.apply_on(id, &held, Some("acknowledged"), version);
        assert_eq!(applied.await.unwrap(), 1);
    }
    let deleted_on_q = tc.keys_with_primary(q, "gone-", 1).remove(0);
    let applied = tc.apply_on(n, &deleted_on_q, Some("deleted later"), version);
    assert_eq!(applied.await.unwrap(), 1);
    let later = Version {
        hlc: version.hlc + 1,
        ..version
    };
    let applied = tc.apply_on(q, &deleted_on_q, None, later);
    assert_eq!(applied.await.unwrap(), 1);

    tc.stop_node(n).await.unwrap();
    tc.wait_failed_over(n).await;
    for key in on_p.iter().step_by(2) {
        assert_eq!(delete(&tc, key).await.status(), StatusCode::NO_CONTENT);
    }
    for key in tc.keys_with_primary(p, "more-", 100) {
        let response = tc.put(&key, &filler).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // A restart empties P's feed, so N's pull reads P's data files, where
    // the merge leaves a gap after N's cursor.
    tc.stop_node(p).await.unwrap();
    tc.start_node(p).await.unwrap();
    wait_serving(&tc, p).await;
    tc.merge_node(p).await.unwrap();
    assert!(
        !scan_node(&tc, p).await.contains_key(held.as_bytes()),
        "P never received K"
    );
    Stranded {
        tc,
        p,
        q,
        n,
        held,
        deleted_on_q,
        on_p,
    }
}

/// Waits until N serves after a full catch-up; asserts it took one.
async fn n_caught_up_in_full(s: &Stranded) {
    wait_serving(&s.tc, s.n).await;
    let node = s.tc.admin_node(s.n).await.unwrap();
    assert!(
        full_catch_ups(&node) >= 1,
        "N took a full catch-up from P: {node}"
    );
}

/// Issue 13, bug 1: a full catch-up infers no delete of a key that another
/// replica still holds. K's absence from P alone used to delete it on N:
/// with P never holding it, the acknowledged write would then be gone from
/// a majority. A key whose newer tombstone is on Q is still deleted, and so
/// is every key P deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_catch_up_deletes_no_key_another_replica_holds() {
    let mut s = strand_and_merge().await;
    s.tc.start_node(s.n).await.unwrap();
    n_caught_up_in_full(&s).await;
    for id in [s.n, s.q] {
        let value = node_value(&s.tc, id, &s.held).await;
        assert_eq!(
            value.map(|(value, _)| value).as_deref(),
            Some("acknowledged"),
            "node {id} still holds K"
        );
    }
    let gone = node_value(&s.tc, s.n, &s.deleted_on_q).await;
    assert_eq!(gone, None, "N deleted {}", s.deleted_on_q);
    for key in s.on_p.iter().step_by(2) {
        assert_eq!(node_value(&s.tc, s.n, key).await, None, "{key}");
    }
    s.tc.shutdown().await.unwrap();
}

/// With the only other replica that could tell stopped, the catch-up
/// cannot decide whether K was deleted or never delivered: it keeps K
/// after a bounded wait and finishes, and N serves again (it used to wait
/// for that replica for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_catch_up_keeps_what_too_few_replicas_answer_for_and_finishes() {
    let mut s = strand_and_merge().await;
    s.tc.stop_node(s.q).await.unwrap();
    s.tc.start_node(s.n).await.unwrap();
    n_caught_up_in_full(&s).await;
    let value = node_value(&s.tc, s.n, &s.held).await;
    assert_eq!(
        value.map(|(value, _)| value).as_deref(),
        Some("acknowledged")
    );
    assert!(!scan_node(&s.tc, s.p).await.is_empty(), "P still serves");
    s.tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ conflicts

/// The same key written at once through every node directly and through
/// the router: only its primary coordinates (the others refuse, writing
/// nothing), and every replica ends with the same version and value, the
/// newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_writes_converge() {
    let tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy()))
        .await
        .unwrap();
    let ids = tc.node_ids();
    let primary = tc.preference_list(b"contended")[0];
    let mut writers = tokio::task::JoinSet::new();
    for (i, &id) in ids.iter().enumerate() {
        let mut kv = tc.node_kv(id).await.unwrap();
        writers.spawn(async move {
            let mut accepted = 0;
            for round in 0..50 {
                let answer = kv
                    .put(caskade_proto::PutRequest {
                        key: b"contended".to_vec().into(),
                        value: format!("node {i} round {round}").into_bytes().into(),
                        write_level: caskade_proto::WriteLevel::One as i32,
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(_) => accepted += 1,
                    Err(status) => assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}"),
                }
            }
            (id, accepted)
        });
    }
    for round in 0..50 {
        let response = tc
            .put("contended", &format!("router round {round}"))
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    while let Some(done) = writers.join_next().await {
        let (id, accepted) = done.unwrap();
        let expected = if id == primary { 50 } else { 0 };
        assert_eq!(accepted, expected, "writes node {id} coordinated");
    }
    let content = converged(&tc, &ids).await;
    let (version, value, _) = &content[b"contended".as_slice()];
    let newest = tc.get("contended").await.unwrap();
    assert_eq!(
        etag_version(&newest),
        format!("{}-{}", version.0, version.1)
    );
    assert_eq!(newest.text().await.unwrap().as_bytes(), value.as_slice());
    tc.shutdown().await.unwrap();
}
