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

use std::time::{Duration, Instant};

use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use caskade_tests::rng::Rng;
use caskade_tests::workload::Workload;

/// The `caskade-node` binary built in this package.
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");
/// Concurrent clients.
const CLIENTS: u32 = 6;
/// Keys they share: few, so that operations on one key overlap.
const KEYS: usize = 5;
/// How long clients run.
const RUN: Duration = Duration::from_secs(30);

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
    let mut rng = Rng(seed);
    let mut workload = Workload::start(&tc, "lin", KEYS, CLIENTS, rng.next_u64()).unwrap();
    let faults = nemesis(&mut tc, Rng(rng.next_u64()), Instant::now() + RUN).await;
    workload.stop().await;
    eprintln!("faults: {faults:?}");
    poll_until(
        "every node to be ready again",
        Duration::from_secs(60),
        || async { tc.all_nodes_ready().await },
    )
    .await;

    let verdict = workload.verdict().await;
    eprintln!("{}", verdict.counts());
    assert!(verdict.passed(), "seed {seed}: {verdict}");
    let operations = workload.operations();
    assert!(
        verdict.acknowledged + verdict.reads > operations / 2,
        "most operations must be answered: {} of {operations}",
        verdict.acknowledged + verdict.reads
    );
    tc.shutdown().await.unwrap();
}
