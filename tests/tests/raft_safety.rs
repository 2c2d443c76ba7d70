//! Safety of the cluster map's Raft group against what an operator's
//! cluster goes through: a node whose Raft state is gone must not vote
//! again with an empty log, and the leader's own bookkeeping must never undo
//! a membership change it just answered.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use caskade_proto::StatsRequest;
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use reqwest::StatusCode;
use serde_json::Value;

fn policy() -> NodePolicy {
    NodePolicy {
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

/// The Raft group as node `id` sees it: (role, voters ∪ learners).
async fn group_of(tc: &TestCluster, id: u32) -> Option<(String, BTreeSet<u32>, BTreeSet<u32>)> {
    let mut admin = tc.node_admin(id).await.ok()?;
    let stats = admin.stats(StatsRequest {}).await.ok()?.into_inner();
    let raft = stats.raft?;
    Some((
        raft.role,
        raft.voters.into_iter().collect(),
        raft.learners.into_iter().collect(),
    ))
}

/// The leader's duties read the map at the start of a tick, then probe the
/// nodes (2 s against a hanging one). An add that completes meanwhile must
/// not look like a stray to them: the new voter stays a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_add_stays_in_the_raft_group_while_a_node_hangs() {
    let spec = ClusterSpec {
        configure: |c| c.cluster.failover_after_ms = 5000,
        ..ClusterSpec::nodes(3, 2, policy())
    };
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    // Hang a node that is not the leader, so every probe of it lasts 2 s.
    let mut leader = None;
    for &id in &ids {
        if let Some((role, _, _)) = group_of(&tc, id).await
            && role == "leader"
        {
            leader = Some(id);
        }
    }
    let leader = leader.expect("a leader");
    let hung = *ids.iter().find(|&&id| id != leader).unwrap();
    tc.hang_node(hung).await.unwrap();
    poll_until(
        "the hung node to be marked down",
        Duration::from_secs(30),
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            page["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == hung && n["down"] == true)
        },
    )
    .await;

    let mut undone = Vec::new();
    for attempt in 0..2 {
        let new = tc.start_spare_node().await.unwrap();
        let added = tc.add_to_map(new).await.unwrap();
        let status = added.status();
        let body: Value = added.json().await.unwrap_or(Value::Null);
        if status != StatusCode::OK {
            eprintln!("attempt {attempt}: add answered {status}: {body}");
            continue;
        }
        // The add succeeded: node `new` is in the map and a voter. Watch
        // the leader's Raft group for 5 s.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some((_, voters, learners)) = group_of(&tc, leader).await
                && !voters.contains(&new)
            {
                eprintln!(
                    "attempt {attempt}: node {new} added, then voters={voters:?} learners={learners:?}"
                );
                undone.push(new);
                tokio::time::sleep(Duration::from_secs(3)).await;
                eprintln!(
                    "attempt {attempt}: 3 s later the leader's group is {:?}",
                    group_of(&tc, leader).await
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("adds undone: {undone:?}");
    assert!(
        undone.is_empty(),
        "a node whose add was answered 200 left the voters afterwards: {undone:?}"
    );
    tc.shutdown().await.unwrap();
}

/// A member that lost its Raft state (its data directory replaced) and
/// restarts with the same initial members is refused, with a message that
/// says how to bring it back, instead of voting again with an empty log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_raft_state_is_gone_is_refused() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 2, policy()))
        .await
        .unwrap();
    let victim = tc.node_ids()[2];
    let before = group_of(&tc, victim).await.unwrap();
    // The leader records each node once it holds Raft state.
    poll_until(
        "the victim to be recorded as joined",
        Duration::from_secs(10),
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            page["nodes"].as_array().unwrap().iter().any(|n| {
                n["stats"]["raft"]["joined"]
                    .as_array()
                    .is_some_and(|j| j.iter().any(|id| id == victim))
            })
        },
    )
    .await;
    tc.stop_node(victim).await.unwrap();
    let data_dir = tc.node_config(victim).data_dir.clone();
    std::fs::remove_file(data_dir.join("raft.redb")).unwrap();
    let started = tc.start_node(victim).await;
    let error = format!(
        "{:#}",
        started.expect_err("a member whose Raft state is gone must be refused")
    );
    assert!(error.contains("Raft state"), "{error}");
    assert!(error.contains("DELETE /admin/v1/nodes"), "{error}");
    eprintln!("before: {before:?}");
    // The others still hold it as a voter, and nothing else changed.
    let others = tc.node_ids().into_iter().filter(|&id| id != victim);
    for id in others {
        let (_, voters, _) = group_of(&tc, id).await.unwrap();
        assert!(voters.contains(&victim), "{voters:?}");
    }
    tc.shutdown().await.unwrap();
}

/// The `caskade-node` binary built in this package, for nodes frozen with SIGSTOP.
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");

/// Failover after 1 s, and catch-up in small steps (ten records a pull),
/// so that a node coming back takes a while to catch up.
fn slow_catch_up(config: &mut caskade_node::NodeConfig) {
    config.cluster.failover_after_ms = 1000;
    config.replication.pull_max_records = 10;
}

/// A node cut off without restarting (frozen here) never stopped reporting
/// SERVING. Once it answers again, the leader must not mark it up before it
/// has caught up with the writes it missed: routers would send it reads and
/// conditional writes for which it holds stale copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_a_partition_is_marked_up_only_once_caught_up() {
    const MISSED: usize = 1500;
    let spec = ClusterSpec {
        configure: slow_catch_up,
        ..ClusterSpec::processes(3, 3, policy(), NODE_BINARY)
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let leader = tc.admin_cluster().await.unwrap()["leader"]
        .as_u64()
        .unwrap() as u32;
    let victim = *tc.node_ids().iter().find(|&&id| id != leader).unwrap();
    let is_down = |page: &Value| {
        page["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == victim && n["down"] == true)
    };

    tc.signal_node(victim, "STOP").unwrap();
    // Thaw it whatever happens, so the process can be stopped at the end.
    struct Thaw<'a>(&'a TestCluster, u32);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            let _ = self.0.signal_node(self.1, "CONT");
        }
    }
    let thaw = Thaw(&tc, victim);
    poll_until(
        "the frozen node to be marked down",
        Duration::from_secs(30),
        || async { tc.admin_cluster().await.is_ok_and(|p| is_down(&p)) },
    )
    .await;
    let mut written = Vec::with_capacity(MISSED);
    for n in 0..MISSED {
        let key = format!("missed-{n}");
        let response = tc.put_level(&key, "v", "quorum").await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{key}");
        written.push(key.into_bytes());
    }
    drop(thaw);

    poll_until(
        "the node to be marked up",
        Duration::from_secs(60),
        || async { tc.admin_cluster().await.is_ok_and(|p| !is_down(&p)) },
    )
    .await;
    let held = tc.scan_node(victim).await.unwrap();
    let missing = written.iter().filter(|k| !held.contains_key(*k)).count();
    assert_eq!(
        missing, 0,
        "marked up while {missing} of the {MISSED} writes it missed were not on it yet"
    );
    tc.shutdown().await.unwrap();
}
