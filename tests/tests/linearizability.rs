//! Clients hammer a few keys through the router with `w=quorum` writes
//! (plain, `If-None-Match: *`, `If-Match`), deletes (plain and `If-Match`)
//! and `r=quorum` reads, while node processes are killed and restarted,
//! frozen and thawed, and primaries fail over. Every operation is recorded
//! with its invocation and response times and what the client was told
//! (an answer, "not applied", or "unknown"), and each key's history is
//! checked for linearizability ([`caskade_tests::history`]).
//!
//! A run is reproduced by its seed: `CASKADE_TEST_SEED=<n>` (the seed in
//! use is printed).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use caskade_tests::history::{self, History, Op, Response};
use caskade_tests::rng::Rng;
use reqwest::StatusCode;
use serde_json::Value;

/// The `caskade-node` binary built in this package.
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");
/// Concurrent clients.
const CLIENTS: u32 = 6;
/// Keys they share: few, so that operations on one key overlap.
const KEYS: usize = 5;
/// How long clients run.
const RUN: Duration = Duration::from_secs(30);
/// A client gives up on an answer after this (the outcome is then unknown).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn seed() -> u64 {
    std::env::var("CASKADE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00ca_5cad_e012)
}

fn policy() -> NodePolicy {
    NodePolicy {
        timeout_ms: 3_000,
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

/// Failover after 1 s without answers; anti-entropy rounds every 300 ms,
/// so that they run under the faults too.
fn quick_failover(config: &mut caskade_node::NodeConfig) {
    config.cluster.failover_after_ms = 1000;
    config.replication.anti_entropy_interval_ms = 300;
}

/// How a client's request ended, for the history.
enum Ended {
    Answered(Response),
    NotApplied,
    Unknown,
}

/// Sends one operation and classifies the answer.
async fn send(client: &reqwest::Client, url: &str, token: &str, op: &Op) -> Ended {
    let request = match op {
        Op::Get => client.get(format!("{url}?r=quorum")),
        Op::Put { value } => client.put(format!("{url}?w=quorum")).body(value.clone()),
        Op::PutIfAbsent { value } => client
            .put(format!("{url}?w=quorum"))
            .header("if-none-match", "*")
            .body(value.clone()),
        Op::PutIfMatch { value, etag } => client
            .put(format!("{url}?w=quorum"))
            .header("if-match", format!("\"{etag}\""))
            .body(value.clone()),
        Op::Delete => client.delete(format!("{url}?w=quorum")),
        Op::DeleteIfMatch { etag } => client
            .delete(format!("{url}?w=quorum"))
            .header("if-match", format!("\"{etag}\"")),
    };
    let Ok(response) = request.bearer_auth(token).send().await else {
        return Ended::Unknown;
    };
    let status = response.status();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_string());
    let Ok(body) = response.bytes().await else {
        return Ended::Unknown;
    };
    match (status, op) {
        (StatusCode::OK, Op::Get) => Ended::Answered(Response::Found {
            value: String::from_utf8_lossy(&body).into_owned(),
            etag: etag.unwrap(),
        }),
        (StatusCode::NOT_FOUND, Op::Get) => Ended::Answered(Response::NotFound),
        (StatusCode::OK | StatusCode::CREATED, _) => Ended::Answered(Response::Written {
            etag: etag.unwrap(),
        }),
        (StatusCode::NO_CONTENT, _) => Ended::Answered(Response::Deleted),
        (StatusCode::PRECONDITION_FAILED, _) => Ended::Answered(Response::PreconditionFailed),
        (StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE, _) => Ended::NotApplied,
        (status, _) if status.is_server_error() => {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            if body["error"]["outcome"] == "not_applied" {
                Ended::NotApplied
            } else {
                Ended::Unknown
            }
        }
        (status, op) => panic!(
            "{op:?} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// One client: random operations on the shared keys until `until`.
async fn client_loop(
    id: u32,
    mut rng: Rng,
    client: reqwest::Client,
    urls: Arc<Vec<(String, String)>>,
    token: String,
    history: Arc<History>,
    until: Instant,
) {
    // The last version this client saw of each key, for `If-Match`.
    let mut seen: HashMap<usize, String> = HashMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let k = rng.below(urls.len() as u64) as usize;
        let (key, url) = &urls[k];
        n += 1;
        let value = format!("c{id}-{n}");
        let op = match (rng.below(10), seen.get(&k)) {
            (0..=3, _) => Op::Get,
            (4, _) => Op::Put { value },
            (5, _) => Op::PutIfAbsent { value },
            (6 | 7, Some(etag)) => Op::PutIfMatch {
                value,
                etag: etag.clone(),
            },
            (8, Some(etag)) => Op::DeleteIfMatch { etag: etag.clone() },
            (6..=8, None) => Op::PutIfAbsent { value },
            _ => Op::Delete,
        };
        let call = history.invoke(id, key.clone(), op.clone());
        match send(&client, url, &token, &op).await {
            Ended::Answered(response) => {
                match &response {
                    Response::Written { etag } | Response::Found { etag, .. } => {
                        seen.insert(k, etag.clone());
                    }
                    Response::Deleted | Response::NotFound => {
                        seen.remove(&k);
                    }
                    Response::PreconditionFailed => {}
                }
                history.returned(call, response);
            }
            Ended::NotApplied => history.failed(call),
            Ended::Unknown => history.unknown(call),
        }
    }
}

/// Kills, restarts, freezes and thaws nodes one at a time until `until`;
/// every node is running and thawed when it returns.
async fn nemesis(tc: &mut TestCluster, mut rng: Rng, until: Instant) -> Vec<String> {
    let ids = tc.node_ids();
    let mut log = Vec::new();
    while Instant::now() + Duration::from_secs(6) < until {
        let victim = ids[rng.below(ids.len() as u64) as usize];
        let pause = Duration::from_millis(1500 + rng.below(2500));
        if rng.below(2) == 0 {
            log.push(format!("kill {victim} for {pause:?}"));
            tc.kill_node(victim).unwrap();
            tokio::time::sleep(pause).await;
            tc.start_node(victim).await.unwrap();
        } else {
            log.push(format!("freeze {victim} for {pause:?}"));
            tc.signal_node(victim, "STOP").unwrap();
            tokio::time::sleep(pause).await;
            tc.signal_node(victim, "CONT").unwrap();
        }
        // Let the cluster settle a little between faults.
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1500))).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_key_histories_are_linearizable_through_kills_freezes_and_failovers() {
    let seed = seed();
    eprintln!("seed {seed} (CASKADE_TEST_SEED)");
    let spec = ClusterSpec {
        configure: quick_failover,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let urls: Arc<Vec<(String, String)>> = Arc::new(
        (0..KEYS)
            .map(|k| {
                let key = format!("lin-{k}");
                let url = tc.kv_url(&key);
                (key, url)
            })
            .collect(),
    );
    let history = Arc::new(History::new());
    let until = Instant::now() + RUN;
    let mut rng = Rng(seed);
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        clients.spawn(client_loop(
            id,
            Rng(rng.next_u64()),
            tc.client_with_timeout(CLIENT_TIMEOUT).unwrap(),
            Arc::clone(&urls),
            tc.writer_token.clone(),
            Arc::clone(&history),
            until,
        ));
    }
    let faults = nemesis(&mut tc, Rng(rng.next_u64()), until).await;
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    eprintln!("faults: {faults:?}");
    poll_until(
        "every node to be ready again",
        Duration::from_secs(60),
        || async { tc.all_nodes_ready().await },
    )
    .await;

    let events = history.events();
    let report = history::check(&events);
    let answered = events
        .iter()
        .filter(|e| matches!(e.outcome, history::Outcome::Ok { .. }))
        .count();
    let not_applied = events
        .iter()
        .filter(|e| matches!(e.outcome, history::Outcome::Failed { .. }))
        .count();
    eprintln!(
        "{} ({answered} answered, {not_applied} not applied, {} unknown)",
        report.to_string().lines().next().unwrap_or_default(),
        events.len() - answered - not_applied
    );
    assert!(report.is_linearizable(), "seed {seed}: {report}");
    assert!(
        answered * 2 > events.len(),
        "most operations must be answered: {answered} of {}",
        events.len()
    );
    tc.shutdown().await.unwrap();
}
