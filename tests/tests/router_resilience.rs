//! The router when storage nodes fail: a node that stops, a node that
//! hangs (accepts connections, never answers), a node with no room for
//! another request. Each test starts its own cluster ([`TestCluster`]: real
//! nodes, real mutual TLS, a real HTTPS router, loopback ports the OS picks)
//! with a [`NodePolicy`] of short timeouts, and watches what the router
//! believes through `/readyz`, `/admin/v1/cluster` and `/metrics`.
//!
//! Nothing sleeps to wait for a condition: conditions are polled with a
//! deadline, and every request carries a bound on how long it may take
//! (a bound, not a speed claim: three node timeouts and a second).
//!
//! Reads of a key fail over to its next replica at once. Writes do not:
//! only the key's primary (the first node of its preference list that the
//! committed cluster map does not mark down) coordinates them, and the
//! other replicas refuse them. So while a failing node is still up in the
//! map, writes of the keys it is the primary of are refused, and the
//! answer says whether they may have been applied: 503 `unavailable` with
//! `outcome: not_applied` when nothing reached the node (connection
//! refused, breaker open) or it refused, 504 `timeout` with
//! `outcome: unknown` when the node took the request and hung. Automatic
//! failover (the Raft leader marks the node down, the next replica takes
//! its ranges over) is off in the test cluster; the test about a stopped
//! node's writes failing over turns it on.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, Member, TestCluster, poll_until};
use reqwest::{Response, StatusCode};
use serde_json::Value;

/// How long the router may take to notice that a node stopped or came back.
const NOTICE_DEADLINE: Duration = Duration::from_secs(5);
/// How long an open breaker may take to let a probe through and close.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(10);
/// How long a failover (or a return) may take: the Raft leader marks a node
/// silent for `failover_after_ms` down (or a returned one up), after an
/// election if the node led, and the new primaries copy the ranges and wait
/// out the old primary's lease (about 2.5 s).
const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);
/// How long a primary cut off from its replicas may go on holding its lease
/// (2 s after the last pull they answered), writes in it included.
const LEASE_DEADLINE: Duration = Duration::from_secs(10);

/// Short timeouts, so that failures show within a test: a 300 ms node
/// timeout, a breaker that opens on half of at least 4 calls in 5 s and
/// probes after 500 ms, health checks every 100 ms.
fn quick_policy() -> NodePolicy {
    NodePolicy {
        timeout_ms: 300,
        max_in_flight: 256,
        breaker_failure_ratio: 0.5,
        breaker_min_calls: 4,
        breaker_window_ms: 5_000,
        breaker_open_ms: 500,
        health_interval_ms: 100,
    }
}

/// The longest a request may take when a node misbehaves under `policy`.
fn bound(policy: &NodePolicy) -> Duration {
    Duration::from_millis(3 * policy.timeout_ms) + Duration::from_secs(1)
}

/// Runs `future` and says how long it took.
async fn timed<T>(future: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = future.await;
    (output, started.elapsed())
}

/// Asserts `response` has `status`; returns it.
fn expect_status(response: reqwest::Result<Response>, status: StatusCode, what: &str) -> Response {
    let response = response.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(response.status(), status, "{what}");
    response
}

/// The `error.code` of a JSON error body.
async fn error_code(response: Response) -> String {
    let body: Value = response.json().await.expect("error bodies are JSON");
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_string()
}

/// PUTs `value` (expecting 201) and reads it back (expecting 200 and the value).
async fn write_and_read(tc: &TestCluster, key: &str, value: &str, status: StatusCode) {
    expect_status(tc.put(key, value).await, status, &format!("PUT {key}"));
    let response = expect_status(tc.get(key).await, StatusCode::OK, &format!("GET {key}"));
    assert_eq!(response.text().await.unwrap(), value, "GET {key}");
}

/// How a write failed, as the client is told: status, `error.code` and
/// `error.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteFailure {
    /// 503 `unavailable`, `not_applied`: nothing was written; send it again.
    NotApplied,
    /// 504 `timeout`, `unknown`: the node took it and did not answer in time.
    TimedOut,
    /// 503 `write_level_not_met`, `unknown`: applied on too few replicas.
    LevelNotMet,
}

/// The [`WriteFailure`] of `response`; panics on any other answer.
async fn write_failure(response: reqwest::Result<Response>, what: &str) -> WriteFailure {
    let response = response.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: {status} with no JSON body: {e}"));
    let error = &body["error"];
    match (status, error["code"].as_str(), error["outcome"].as_str()) {
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"), Some("not_applied")) => {
            WriteFailure::NotApplied
        }
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"), Some("unknown")) => WriteFailure::TimedOut,
        (StatusCode::SERVICE_UNAVAILABLE, Some("write_level_not_met"), Some("unknown")) => {
            WriteFailure::LevelNotMet
        }
        _ => panic!("{what}: {status} {body}"),
    }
}

// ------------------------------------------------------------ a node stops

/// RF 3, failover on. A node stops. At once, reads of its keys are
/// answered by the next replica and other keys' reads never notice, while
/// writes of its keys are refused within the bound (503 `unavailable`,
/// `not_applied`: the map still makes it their primary, and the other
/// replicas refuse them). Once the Raft leader has marked it down and the
/// next replicas have taken its ranges over, its keys are written and read
/// there, other keys are written as before, and no request tries the
/// stopped node any more. When it returns (marked up once it has caught
/// up, its ranges taken back) it holds and serves what it held and what
/// was written while it was away, and takes its keys' writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_costs_no_request() {
    let policy = quick_policy();
    let mut tc = TestCluster::start(ClusterSpec {
        configure: |c| c.cluster.failover_after_ms = 1000,
        ..ClusterSpec::nodes(3, 3, policy.clone())
    })
    .await
    .unwrap();
    let ids = tc.node_ids();
    let down = ids[2];

    let mut before = BTreeMap::new();
    for &id in &ids {
        for key in tc.keys_with_primary(id, &format!("before-{id}"), 3) {
            let value = format!("{key}=old");
            write_and_read(&tc, &key, &value, StatusCode::CREATED).await;
            before.insert(key, (id, value));
        }
    }

    tc.stop_node(down).await.unwrap();
    // Right away: failing over takes the leader `failover_after_ms` of
    // silence and the new primary a lease wait, seconds in all.
    let late = tc.keys_with_primary(down, "late", 3);
    for key in &late {
        let (response, took) = timed(tc.put(key, "refused")).await;
        assert_eq!(
            write_failure(response, &format!("PUT {key} to a stopped primary")).await,
            WriteFailure::NotApplied
        );
        assert!(took < bound(&policy), "PUT {key} took {took:?}");
    }
    for (key, (_, value)) in &before {
        let (response, took) = timed(tc.get(key)).await;
        let response = expect_status(response, StatusCode::OK, key);
        assert_eq!(&response.text().await.unwrap(), value, "GET {key}");
        assert!(took < bound(&policy), "GET {key} took {took:?}");
    }

    poll_until(
        "the leader to mark the stopped node down and its ranges to be taken over",
        FAILOVER_DEADLINE,
        || tc.map_settled(down, true),
    )
    .await;
    // From now on the map skips the stopped node: no request pays a
    // refused attempt before reaching a live replica.
    let retries = tc.retries().await.unwrap();
    for key in &late {
        // 201: the refused writes created nothing.
        write_and_read(&tc, key, &format!("{key}=late"), StatusCode::CREATED).await;
    }
    for (key, (id, value)) in &before {
        if *id == down {
            let response = expect_status(tc.get(key).await, StatusCode::OK, key);
            assert_eq!(&response.text().await.unwrap(), value, "GET {key}");
        } else {
            write_and_read(&tc, key, &format!("{key}=new"), StatusCode::OK).await;
        }
    }
    assert_eq!(
        tc.retries().await.unwrap(),
        retries,
        "a request tried the node the map marks down"
    );

    tc.start_node(down).await.unwrap();
    poll_until(
        "the returned node to be marked up, take its ranges back and be used again",
        FAILOVER_DEADLINE,
        || async {
            let node = tc.admin_node(down).await.unwrap();
            node["ready"] == true
                && node["breaker"] == "closed"
                && tc.map_settled(down, false).await
        },
    )
    .await;
    let held = tc.scan_node(down).await.unwrap();
    for key in &late {
        let copy = held.get(key.as_bytes()).map(|c| c.1.as_slice());
        let value = format!("{key}=late");
        assert_eq!(copy, Some(value.as_bytes()), "{key} on the returned node");
    }
    for (key, (id, value)) in &before {
        if *id == down {
            let response = expect_status(tc.get(key).await, StatusCode::OK, key);
            assert_eq!(
                &response.text().await.unwrap(),
                value,
                "GET {key} after restart"
            );
            write_and_read(&tc, key, &format!("{key}=back"), StatusCode::OK).await;
        }
    }
    tc.shutdown().await.unwrap();
}

/// The window before a health check notices a stopped node, made
/// deterministic by slowing health checks to once a minute (and failover
/// is off: the map keeps the node its keys' primary). The router still
/// believes the node ready and tries it first. Every read of one of its
/// keys must still be answered, the refused connection sending it to the
/// next replica (which answers 404: nothing was ever written), and the
/// refusals must open the node's breaker after `breaker_min_calls` of
/// them, after which reads stop trying the node. Writes of its keys are
/// then refused by the breaker, `not_applied` (the other replicas refuse
/// them, not being the keys' primary), and none was applied anywhere. The
/// breaker stays open for the rest of the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_the_router_still_believes_ready_is_failed_over() {
    let policy = NodePolicy {
        breaker_open_ms: 60_000,
        health_interval_ms: 60_000,
        ..quick_policy()
    };
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, policy.clone()))
        .await
        .unwrap();
    let down = tc.node_ids()[2];
    let keys = tc.keys_with_primary(down, "unnoticed", 6);
    let retries = tc.retries().await.unwrap();
    tc.stop_node(down).await.unwrap();
    // Reads: a write refused by every replica may be tried again, and
    // reach the node more than once.
    for key in &keys {
        let (response, took) = timed(tc.get(key)).await;
        let response = expect_status(response, StatusCode::NOT_FOUND, &format!("GET {key}"));
        assert_eq!(error_code(response).await, "not_found");
        assert!(took < bound(&policy), "GET {key} took {took:?}");
    }
    assert_eq!(
        tc.retries().await.unwrap() - retries,
        f64::from(policy.breaker_min_calls),
        "each read tries the stopped node first until its breaker opens, and no longer"
    );
    assert_eq!(tc.breaker_gauge(down).await.unwrap(), Some(2.0));

    for key in &keys {
        let (response, took) = timed(tc.put(key, "refused")).await;
        assert_eq!(
            write_failure(response, &format!("PUT {key} with the breaker open")).await,
            WriteFailure::NotApplied
        );
        assert!(took < bound(&policy), "PUT {key} took {took:?}");
    }
    for key in &keys {
        // Not applied by any replica.
        let response = expect_status(tc.get(key).await, StatusCode::NOT_FOUND, key);
        assert_eq!(error_code(response).await, "not_found");
    }
    let node = tc.admin_node(down).await.unwrap();
    assert_eq!(node["ready"], true, "the router has not noticed: {node}");
    assert_eq!(node["breaker"], "open", "{node}");
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ the breaker

/// The breaker sees a node's failures only when requests reach it. With
/// RF ≥ 2, reads stop reaching it once a health check marks it not ready
/// (the router puts it last), and writes of its keys reach it as their
/// primary (the test above). With RF 1 the node is the only replica of its
/// keys and is tried ready or not: the breaker must open on the refused
/// connections, keep answering 503 while open, and close after the node
/// returns and a probe succeeds.
///
/// The breaker's state is read from `/metrics`, which calls no node, after
/// each request, so that the loop stops on the request that opened it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_a_dead_node_and_closes_when_it_returns() {
    const MAX_REQUESTS: usize = 50;
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 1, quick_policy()))
        .await
        .unwrap();
    let ids = tc.node_ids();
    let down = ids[0];
    let key = &tc.keys_with_primary(down, "breaker", 1)[0];
    let calm = &tc.keys_with_primary(ids[1], "calm", 1)[0];
    write_and_read(&tc, key, "kept", StatusCode::CREATED).await;
    assert_eq!(tc.breaker_gauge(down).await.unwrap(), Some(0.0));

    tc.stop_node(down).await.unwrap();
    poll_until(
        "the router to count the node not ready",
        NOTICE_DEADLINE,
        || async { tc.nodes_ready().await == Some(2) },
    )
    .await;
    let mut sent = 0;
    while tc.breaker_gauge(down).await.unwrap() != Some(2.0) {
        assert!(
            sent < MAX_REQUESTS,
            "the breaker stayed closed after {sent} refused requests"
        );
        let (response, took) = timed(tc.get(key)).await;
        let response = expect_status(response, StatusCode::SERVICE_UNAVAILABLE, key);
        assert_eq!(error_code(response).await, "unavailable");
        assert!(took < bound(&quick_policy()), "GET {key} took {took:?}");
        sent += 1;
    }
    assert!(sent >= 1, "the breaker opened with no request");
    let node = tc.admin_node(down).await.unwrap();
    assert_eq!(node["breaker"], "open", "{node}");
    assert_eq!(node["ready"], false, "{node}");
    // Other nodes' keys are not affected.
    write_and_read(&tc, calm, "calm", StatusCode::CREATED).await;

    tc.start_node(down).await.unwrap();
    poll_until(
        "the node's key to be served again",
        RECOVERY_DEADLINE,
        || async {
            let response = tc.get(key).await.unwrap();
            if response.status() == StatusCode::OK {
                assert_eq!(response.text().await.unwrap(), "kept");
                return true;
            }
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            false
        },
    )
    .await;
    poll_until(
        "admin to show the node ready and its breaker closed",
        NOTICE_DEADLINE,
        || async {
            let node = tc.admin_node(down).await.unwrap();
            node["ready"] == true && node["breaker"] == "closed"
        },
    )
    .await;
    assert_eq!(tc.breaker_gauge(down).await.unwrap(), Some(0.0));
    tc.shutdown().await.unwrap();
}

/// A probe whose client hangs up must not leave the breaker waiting for its
/// answer forever. Node 2 hangs, so the probe stays in flight until the
/// client gives up (after 1 s, well before the router's 3 s timeout, while
/// an open breaker answers at once); then a real node replaces the hanging
/// listener. The breaker must probe again and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_probe_does_not_wedge_the_breaker() {
    let policy = NodePolicy {
        timeout_ms: 3_000,
        breaker_min_calls: 2,
        breaker_window_ms: 30_000,
        breaker_open_ms: 300,
        ..quick_policy()
    };
    let mut tc = TestCluster::start(ClusterSpec {
        // A third node keeps a Raft quorum while one member hangs.
        members: vec![Member::Node, Member::Hanging, Member::Node],
        replication_factor: 1,
        vnodes_per_node: 64,
        policy: policy.clone(),
        node_binary: None,
        configure: |_| {},
        hosts: Vec::new(),
    })
    .await
    .unwrap();
    let hung = tc.node_ids()[1];
    let key = tc.keys_with_primary(hung, "probe", 1).remove(0);

    // Two timeouts open the breaker.
    let timeouts: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, token) = (
                tc.client().clone(),
                tc.kv_url(&key),
                tc.writer_token.clone(),
            );
            tokio::spawn(async move { client.get(url).bearer_auth(token).send().await })
        })
        .collect();
    for timeout in timeouts {
        let response = expect_status(timeout.await.unwrap(), StatusCode::GATEWAY_TIMEOUT, &key);
        assert_eq!(error_code(response).await, "timeout");
    }
    assert_eq!(tc.breaker_gauge(hung).await.unwrap(), Some(2.0));

    // While open the breaker answers at once; the first request after
    // `breaker_open_ms` is the probe, and it hangs: give up on it.
    poll_until("a probe to be let through", RECOVERY_DEADLINE, || async {
        let sent = tc
            .client()
            .get(tc.kv_url(&key))
            .bearer_auth(&tc.writer_token)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        match sent {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                false
            }
            Err(e) if e.is_timeout() => true,
            Err(e) => panic!("GET {key}: {e}"),
        }
    })
    .await;

    tc.start_node(hung).await.unwrap();
    poll_until(
        "the router to see the new node ready",
        NOTICE_DEADLINE,
        || async { tc.nodes_ready().await == Some(2) },
    )
    .await;
    poll_until("the node's key to be served", RECOVERY_DEADLINE, || async {
        let response = tc.put(&key, "back").await.unwrap();
        if response.status() == StatusCode::CREATED {
            return true;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        false
    })
    .await;
    assert_eq!(tc.admin_node(hung).await.unwrap()["breaker"], "closed");
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ a node hangs

/// A listener that accepts and never answers sits in the map as node 3
/// (RF 2, failover off). It never passes a health check, so reads of its
/// keys go straight to the next replica. But the map keeps it the primary
/// of its keys, and it never answers the copies and pulls a live primary
/// needs from it (to take a range over, to hold its lease), so no key it
/// replicates can be written: each write is refused within the bound and
/// marked for what it is, 504 `timeout` with `outcome: unknown` when it
/// waited for the hanging node, 503 `unavailable` with `not_applied` once
/// the node's breaker keeps it from the node. Keys it does not replicate are
/// written and read meanwhile, and the admin page (which does ask it)
/// returns within the bound, showing it not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_node_in_the_map_costs_at_most_the_timeout() {
    let policy = quick_policy();
    let tc = TestCluster::start(ClusterSpec {
        members: vec![Member::Node, Member::Node, Member::Hanging],
        replication_factor: 2,
        vnodes_per_node: 64,
        policy: policy.clone(),
        node_binary: None,
        configure: |_| {},
        hosts: Vec::new(),
    })
    .await
    .unwrap();
    let hung = tc.node_ids()[2];

    let readyz = expect_status(
        tc.client().get(tc.at("/readyz")).send().await,
        StatusCode::OK,
        "every range has a ready replica",
    );
    let readyz: Value = readyz.json().await.unwrap();
    assert_eq!(readyz["nodes_ready"], 2, "{readyz}");

    // Keys it is the primary of, and keys a live primary shares with it.
    let mut keys = tc.keys_with_primary(hung, "hung", 4);
    keys.extend(tc.keys_where("shared", 2, |list| list[1] == hung));
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let (client, url, token) =
                (tc.client().clone(), tc.kv_url(key), tc.writer_token.clone());
            let key = key.clone();
            tokio::spawn(async move {
                let (put, put_took) =
                    timed(client.put(&url).bearer_auth(&token).body("lost").send()).await;
                let (get, get_took) = timed(client.get(&url).bearer_auth(&token).send()).await;
                (key, put, put_took, get, get_took)
            })
        })
        .collect();
    // Keys the hanging node does not hold, meanwhile.
    for key in tc.keys_where("calm", 6, |list| !list.contains(&hung)) {
        write_and_read(&tc, &key, &key, StatusCode::CREATED).await;
    }
    let mut failures = BTreeMap::<String, WriteFailure>::new();
    for task in tasks {
        let (key, put, put_took, get, get_took) = task.await.unwrap();
        let failure = write_failure(put, &format!("PUT {key}")).await;
        assert!(
            matches!(failure, WriteFailure::TimedOut | WriteFailure::NotApplied),
            "PUT {key}: {failure:?}"
        );
        failures.insert(key.clone(), failure);
        // Answered by a live replica, and nothing was written.
        let get = expect_status(get, StatusCode::NOT_FOUND, &format!("GET {key}"));
        assert_eq!(error_code(get).await, "not_found");
        assert!(put_took < bound(&policy), "PUT {key} took {put_took:?}");
        assert!(get_took < bound(&policy), "GET {key} took {get_took:?}");
    }
    // A closed breaker refuses nothing: the first writes waited for the node.
    assert!(
        failures.values().any(|f| *f == WriteFailure::TimedOut),
        "no write reached the hanging node: {failures:?}"
    );

    let (page, took) = timed(tc.admin_node(hung)).await;
    let node = page.unwrap();
    assert!(took < bound(&policy), "/admin/v1/cluster took {took:?}");
    assert_eq!(node["ready"], false, "{node}");
    assert!(node["stats"]["error"].is_string(), "{node}");
    tc.shutdown().await.unwrap();
}

/// The router's background loop (map refresh and health checks) must keep
/// running while a node of the map hangs: a node that stops and starts
/// again, over and over, is noticed each time. Ten health rounds pass
/// between two map refreshes, and a round lasts at least the health
/// interval plus the hanging node's check (the timeout), so the loop runs
/// for twelve rounds' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_go_on_while_a_node_hangs() {
    const MAX_CYCLES: usize = 30;
    let policy = quick_policy();
    let mut tc = TestCluster::start(ClusterSpec {
        members: vec![Member::Node, Member::Node, Member::Hanging],
        replication_factor: 2,
        vnodes_per_node: 64,
        policy: policy.clone(),
        node_binary: None,
        configure: |_| {},
        hosts: Vec::new(),
    })
    .await
    .unwrap();
    let flapping = tc.node_ids()[0];
    let rounds = Duration::from_millis(12 * (policy.health_interval_ms + policy.timeout_ms));
    let started = Instant::now();
    let mut cycles = 0;
    while started.elapsed() < rounds {
        assert!(
            cycles < MAX_CYCLES,
            "{cycles} cycles in {:?}",
            started.elapsed()
        );
        tc.stop_node(flapping).await.unwrap();
        poll_until(
            &format!("cycle {cycles}: the router to notice the node stopped"),
            NOTICE_DEADLINE,
            || async { tc.nodes_ready().await == Some(1) },
        )
        .await;
        tc.start_node(flapping).await.unwrap();
        poll_until(
            &format!("cycle {cycles}: the router to notice the node is back"),
            NOTICE_DEADLINE,
            || async { tc.nodes_ready().await == Some(2) },
        )
        .await;
        cycles += 1;
    }
    tc.shutdown().await.unwrap();
}

/// A node that the router believes ready stops answering (its address now
/// accepts connections and says nothing). Health checks are slowed to once
/// a minute so that the router keeps believing it for the whole test: this
/// is the window before a health check notices, made deterministic.
/// Failover is off, so the map keeps it the primary of its keys.
///
/// Before the breaker opens, a read of one of its keys waits one timeout
/// and is answered by the next replica, a write waits one timeout and is a
/// 504 with `outcome: unknown` (the node took it and may apply it), and
/// other keys are served meanwhile. The four timeouts open the breaker;
/// then its keys' writes are refused without reaching it, `not_applied`
/// (the other replicas are not their primary), its keys' reads go to the
/// next replica, and none of the writes was applied there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_answering_costs_at_most_the_timeout() {
    let policy = NodePolicy {
        timeout_ms: 1_500,
        breaker_window_ms: 30_000,
        breaker_open_ms: 60_000,
        health_interval_ms: 60_000,
        ..quick_policy()
    };
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 2, policy.clone()))
        .await
        .unwrap();
    let hung = tc.node_ids()[2];
    let put_keys = tc.keys_with_primary(hung, "put", 2);
    let get_keys = tc.keys_with_primary(hung, "get", 2);
    let calm = tc.keys_where("calm", 6, |list| !list.contains(&hung));
    tc.hang_node(hung).await.unwrap();

    let send = |put: bool, key: &str| {
        let (client, url, token) = (tc.client().clone(), tc.kv_url(key), tc.writer_token.clone());
        let key = key.to_string();
        tokio::spawn(async move {
            let request = if put {
                client.put(&url).body("lost")
            } else {
                client.get(&url)
            };
            let (response, took) = timed(request.bearer_auth(token).send()).await;
            (key, response, took)
        })
    };
    let puts: Vec<_> = put_keys.iter().map(|k| send(true, k)).collect();
    let gets: Vec<_> = get_keys.iter().map(|k| send(false, k)).collect();
    for key in &calm {
        write_and_read(&tc, key, key, StatusCode::CREATED).await;
    }
    assert!(
        puts.iter().chain(&gets).any(|t| !t.is_finished()),
        "every request to the hanging node returned before the other keys were served"
    );
    for put in puts {
        let (key, response, took) = put.await.unwrap();
        assert_eq!(
            write_failure(response, &format!("PUT {key}")).await,
            WriteFailure::TimedOut
        );
        assert!(took < bound(&policy), "PUT {key} took {took:?}");
    }
    for get in gets {
        // Answered by the next replica, which never held the key.
        let (key, response, took) = get.await.unwrap();
        let response = expect_status(response, StatusCode::NOT_FOUND, &format!("GET {key}"));
        assert_eq!(error_code(response).await, "not_found");
        assert!(took < bound(&policy), "GET {key} took {took:?}");
    }

    assert_eq!(
        tc.breaker_gauge(hung).await.unwrap(),
        Some(2.0),
        "four timeouts in four calls open the breaker"
    );
    for key in &put_keys {
        let (response, took) = timed(tc.put(key, "refused")).await;
        assert_eq!(
            write_failure(response, &format!("PUT {key} with the breaker open")).await,
            WriteFailure::NotApplied
        );
        assert!(took < bound(&policy), "PUT {key} took {took:?}");
        let (response, took) = timed(tc.get(key)).await;
        let response = expect_status(response, StatusCode::NOT_FOUND, &format!("GET {key}"));
        assert_eq!(error_code(response).await, "not_found");
        assert!(took < bound(&policy), "GET {key} took {took:?}");
    }
    let node = tc.admin_node(hung).await.unwrap();
    assert_eq!(node["breaker"], "open", "{node}");
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------------------ load shedding

/// With `max_in_flight = 1`, a node that hangs holds its one slot for a
/// timeout; every other request for it in that time is shed at once with
/// 429 `overloaded` (RF 1: no other replica to fall back on), while the
/// other node is not affected. The breaker is kept out of it (its minimum
/// of calls is never reached) so that only the limit decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_sheds_load_with_429() {
    const REQUESTS: usize = 8;
    let policy = NodePolicy {
        timeout_ms: 1_000,
        max_in_flight: 1,
        breaker_min_calls: 1_000,
        ..quick_policy()
    };
    let tc = TestCluster::start(ClusterSpec {
        // A third node keeps a Raft quorum while one member hangs.
        members: vec![Member::Node, Member::Hanging, Member::Node],
        replication_factor: 1,
        vnodes_per_node: 64,
        policy: policy.clone(),
        node_binary: None,
        configure: |_| {},
        hosts: Vec::new(),
    })
    .await
    .unwrap();
    let ids = tc.node_ids();
    let key = tc.keys_with_primary(ids[1], "full", 1).remove(0);
    let calm = tc.keys_with_primary(ids[0], "calm", 3);

    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (client, url, token) = (
                tc.client().clone(),
                tc.kv_url(&key),
                tc.writer_token.clone(),
            );
            tokio::spawn(async move { timed(client.get(url).bearer_auth(token).send()).await })
        })
        .collect();
    for key in &calm {
        write_and_read(&tc, key, key, StatusCode::CREATED).await;
    }
    let mut by_code = BTreeMap::<String, usize>::new();
    for task in tasks {
        let (response, took) = task.await.unwrap();
        let response = response.unwrap();
        assert!(took < bound(&policy), "GET {key} took {took:?}");
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        let code = error_code(response).await;
        match code.as_str() {
            "overloaded" => assert_eq!(status, StatusCode::TOO_MANY_REQUESTS),
            "timeout" => assert_eq!(status, StatusCode::GATEWAY_TIMEOUT),
            other => panic!("GET {key}: {status} {other}"),
        }
        *by_code.entry(code).or_default() += 1;
    }
    assert!(by_code.get("overloaded") >= Some(&1), "{by_code:?}");
    assert!(by_code.get("timeout") >= Some(&1), "{by_code:?}");
    tc.shutdown().await.unwrap();
}

// ------------------------------------------------ a node's own answers

/// A node that answers is not a sick node, whatever it answers. RF 2, two
/// nodes: the survivor's keys are written while both run, then the other
/// node stops. The survivor stays its keys' primary (failover is off) but
/// cannot renew its lease without the other replica: while the lease it
/// holds lasts, a write is applied on it alone and misses its level (503
/// `write_level_not_met`, `outcome: unknown`); then every write is refused
/// (503 `unavailable`, `not_applied`). Both are the survivor's answers,
/// not failures of it: its breaker must stay closed, and its keys must
/// still be read, with the values written before the refused writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_that_a_write_missed_its_level_keeps_its_breaker_closed() {
    // Longer than the node's wait for acknowledgements: the node answers.
    let policy = NodePolicy {
        timeout_ms: 3_000,
        ..quick_policy()
    };
    // Enough answers to fill the breaker's window, whatever else the router sends.
    let writes = usize::try_from(policy.breaker_min_calls).unwrap();
    let mut tc = TestCluster::start(ClusterSpec::nodes(2, 2, policy.clone()))
        .await
        .unwrap();
    let ids = tc.node_ids();
    let (survivor, stopped) = (ids[0], ids[1]);
    let keys = tc.keys_with_primary(survivor, "level", writes);
    let lease_probe = tc.keys_with_primary(survivor, "lease", 1).remove(0);
    for key in &keys {
        write_and_read(&tc, key, key, StatusCode::CREATED).await;
    }
    tc.stop_node(stopped).await.unwrap();
    poll_until(
        "the router to count the stopped node not ready",
        NOTICE_DEADLINE,
        || async { tc.nodes_ready().await == Some(1) },
    )
    .await;

    // A key of its own, so that writes applied under the lease change
    // none of the keys checked below.
    poll_until("the survivor's lease to lapse", LEASE_DEADLINE, || async {
        let (response, took) = timed(tc.put(&lease_probe, "probe")).await;
        let failure = write_failure(response, &format!("PUT {lease_probe}")).await;
        assert!(took < bound(&policy), "PUT {lease_probe} took {took:?}");
        match failure {
            WriteFailure::LevelNotMet => false,
            WriteFailure::NotApplied => true,
            WriteFailure::TimedOut => panic!("PUT {lease_probe} timed out"),
        }
    })
    .await;
    for key in &keys {
        let (response, took) = timed(tc.put(key, "refused")).await;
        assert_eq!(
            write_failure(response, &format!("PUT {key} with one of two replicas")).await,
            WriteFailure::NotApplied
        );
        assert!(took < bound(&policy), "PUT {key} took {took:?}");
    }
    assert_eq!(
        tc.breaker_gauge(survivor).await.unwrap(),
        Some(0.0),
        "the survivor's breaker opened on its own answers"
    );
    for key in &keys {
        let response = expect_status(tc.get(key).await, StatusCode::OK, &format!("GET {key}"));
        assert_eq!(response.text().await.unwrap(), *key);
    }
    tc.shutdown().await.unwrap();
}
