//! Faults on a real network: three node processes and the router, each on
//! a host of its own (a network namespace, [`caskade_tests::netns`]),
//! while clients hammer a few keys through the router
//! ([`caskade_tests::workload`]). Each test injects one kind of fault,
//! heals it, lets the cluster settle, and then checks the whole history:
//! linearizable per key, nothing acknowledged lost or brought back, every
//! replica identical.
//!
//! The router and the clients share host 0 (the test's own runtime runs
//! there); node `i` of the cluster runs on host `i`.
//!
//! These tests need root (namespaces, iptables): without it they are
//! skipped with the reason printed, except in CI, where they fail. They run
//! one at a time, each about half a minute. A run is reproduced by its
//! seed: `CASKADE_TEST_SEED=<n>` (the seed in use is printed).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, NodeHost, TestCluster, poll_until};
use caskade_tests::disk::SmallDisk;
use caskade_tests::netns::Network;
use caskade_tests::rng::Rng;
use caskade_tests::skew::SkewedClock;
use caskade_tests::workload::{Workload, converged};
use reqwest::StatusCode;

/// The `caskade-node` binary built in this package.
const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");
/// The router's and the clients' host.
const ROUTER_HOST: usize = 0;
/// Concurrent clients.
const CLIENTS: u32 = 5;
/// Keys they share.
const KEYS: usize = 6;
/// Lines of each node's log shown when a test fails.
const LOG_LINES: usize = 40;
/// Healthy time before a fault and after it heals.
const CALM: Duration = Duration::from_secs(3);
/// How long a fault lasts.
const FAULT: Duration = Duration::from_secs(8);
/// How long the cluster may take to settle once healed.
const SETTLE: Duration = Duration::from_secs(60);

/// One fault test at a time: each runs three node processes.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn seed() -> u64 {
    std::env::var("CASKADE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00fa_0175)
}

fn policy() -> NodePolicy {
    NodePolicy {
        timeout_ms: 3_000,
        health_interval_ms: 100,
        ..NodePolicy::default()
    }
}

/// Failover after a second without answers; anti-entropy every 300 ms.
fn quick(config: &mut caskade_node::NodeConfig) {
    config.cluster.failover_after_ms = 1000;
    config.replication.anti_entropy_interval_ms = 300;
}

/// [`quick`], with the default failover delay.
fn patient(config: &mut caskade_node::NodeConfig) {
    quick(config);
    config.cluster.failover_after_ms =
        caskade_node::config::ClusterConfig::default().failover_after_ms;
}

/// Node `id`'s host.
fn host_of(tc: &TestCluster, id: u32) -> usize {
    1 + tc.node_ids().iter().position(|n| *n == id).unwrap()
}

/// What a fault can act on.
struct Faults<'a> {
    net: &'a Network,
    /// Each node's skewed clock, by node id, when the test asked for them.
    clocks: BTreeMap<u32, SkewedClock>,
}

/// Prints the end of each node's log when the test is failing.
struct LogsOnFailure(Vec<PathBuf>);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            eprintln!("--- the end of {}:", path.display());
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(LOG_LINES)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Faults<'_> {
    /// Node `id`'s clock.
    fn clock(&self, id: u32) -> &SkewedClock {
        &self.clocks[&id]
    }
}

/// What a fault test needs besides three nodes and a router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Nothing more.
    Plain,
    /// Node clocks that can be moved.
    Skewable,
    /// A fourth host, for a spare node process.
    Spare,
    /// Failover after the default 5 s rather than 1 s: a node whose link
    /// loses packets, which can hold a connection up for a second of TCP
    /// retransmissions, is slow, not dead.
    Patient,
}

/// Starts three node processes on hosts 1 to 3 of a network (see
/// [`Setup`] for more), clients on a few keys, runs `fault` (which injects
/// a fault and holds it), heals every link and clock, and checks the
/// history and the replicas. Skipped where namespaces (or skewed clocks)
/// cannot be made.
fn with_fault(
    name: &str,
    setup: Setup,
    fault: impl AsyncFnOnce(&Faults<'_>, &mut TestCluster, &mut Rng),
) {
    let _serial = serial();
    let members = 3;
    let spares = usize::from(setup == Setup::Spare);
    let Some(net) = Network::new(1 + members + spares) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut clocks = Vec::new();
    if setup == Setup::Skewable {
        for i in 1..=members {
            let Some(clock) = SkewedClock::new(&dir.path().join(format!("clock-{i}"))) else {
                return;
            };
            clocks.push(clock);
        }
    }
    let seed = seed();
    eprintln!("{name}: seed {seed} (CASKADE_TEST_SEED)");
    let runtime = net.runtime_on(ROUTER_HOST).unwrap();
    runtime.block_on(async {
        let spec = ClusterSpec {
            configure: if setup == Setup::Patient { patient } else { quick },
            hosts: (1..net.len())
                .map(|i| {
                    let mut launcher = net.launcher(i);
                    if let Some(clock) = clocks.get(i - 1) {
                        launcher.extend(clock.launcher());
                    }
                    NodeHost {
                        ip: net.host(i).ip.into(),
                        launcher,
                    }
                })
                .collect(),
            ..ClusterSpec::processes(members, 3, policy(), NODE_BINARY)
        };
        let mut tc = TestCluster::start(spec).await.unwrap();
        // Dropped before the cluster (and its directory).
        let _logs = LogsOnFailure(
            tc.node_ids()
                .into_iter()
                .map(|id| tc.node_config(id).data_dir.with_extension("log"))
                .collect(),
        );
        let faults = Faults {
            net: &net,
            clocks: tc.node_ids().into_iter().zip(clocks).collect(),
        };
        let mut rng = Rng(seed);
        let mut workload = Workload::start(&tc, name, KEYS, CLIENTS, rng.next_u64()).unwrap();
        tokio::time::sleep(CALM).await;
        fault(&faults, &mut tc, &mut rng).await;
        net.heal().unwrap();
        for clock in faults.clocks.values() {
            clock.set("+0");
        }
        tokio::time::sleep(CALM).await;
        workload.stop().await;

        poll_until("every node to be ready again", SETTLE, || async {
            tc.all_nodes_ready().await
        })
        .await;
        // The final reads come after the replicas converged: nothing may
        // come back while they do.
        let convergence = converged(&tc, SETTLE).await;
        let verdict = workload.verdict().await;
        eprintln!("{name}: {}", verdict.counts());
        assert!(verdict.passed(), "seed {seed}: {verdict}");
        if let Err(differences) = convergence {
            let histories: String = workload
                .keys()
                .iter()
                .filter(|key| differences.contains(&format!("{key}:")))
                .map(|key| format!("\nthe history of {key:?}:\n{}", verdict.history_of(key)))
                .collect();
            let mut pages = String::new();
            for id in tc.node_ids() {
                if let Ok(node) = tc.admin_node(id).await {
                    pages.push_str(&format!("\nnode {id}: {}", node["stats"]));
                }
            }
            panic!(
                "seed {seed}: the replicas did not converge:\n{differences}{histories}\nthe nodes' pages:{pages}"
            );
        }
        assert!(
            verdict.acknowledged > 0 && verdict.reads > 0,
            "the clients got answers: {}",
            verdict.counts()
        );
        versions_are_true(&tc, &workload.keys()).await;
        tc.shutdown().await.unwrap();
    });
}

/// Whether `version`, assigned between `before` and `after` by the test's
/// clock, is from a true clock: at most a second behind, and ahead by no
/// more than a primary that took over moves its clock on purpose (past the
/// old primary's clock lease and the clock bound: 3.5 s), and a second.
fn from_a_true_clock(version: caskade_common::Version, before: u64, after: u64) -> bool {
    (before.saturating_sub(1_000)..=after + 4_500).contains(&version.physical_ms())
}

/// Writes each of `keys` once more and checks its version is from a true
/// clock: no node's clock was dragged by the fault.
async fn versions_are_true(tc: &TestCluster, keys: &[String]) {
    for key in keys {
        let (version, before, after) = written(tc, key, "w=quorum", "after the fault").await;
        assert!(
            from_a_true_clock(version, before, after),
            "{key}: version {version} written after the fault is not from a true clock ({before}..{after})"
        );
    }
}

/// PUTs `value` at `key` (query `query`) until it is written; a 503
/// `not_applied` (a replica still taking its ranges over, say) is tried
/// again, as a client would, anything else fails the test. Returns the
/// version and the test's clock before and after the write.
async fn written(
    tc: &TestCluster,
    key: &str,
    query: &str,
    value: &str,
) -> (caskade_common::Version, u64, u64) {
    let url = format!("{}?{query}", tc.kv_url(key));
    for tries in 1.. {
        let before = caskade_common::version::unix_millis();
        let response = tc
            .client()
            .put(&url)
            .bearer_auth(&tc.writer_token)
            .body(value.to_string())
            .send()
            .await
            .unwrap();
        let after = caskade_common::version::unix_millis();
        let status = response.status();
        if status.is_success() {
            let etag = response.headers()["etag"]
                .to_str()
                .unwrap()
                .trim_matches('"');
            return (etag.parse().unwrap(), before, after);
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !(status == StatusCode::SERVICE_UNAVAILABLE
            && body["error"]["outcome"] == "not_applied"
            && tries < 100)
        {
            panic!(
                "{key}: {status} {body} (try {tries}); the cluster: {}",
                tc.admin_cluster().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("the loop returns or fails")
}

/// Whether a write of `key` at level one straight to node `id` is refused
/// (or never answered, within 5 s); the node must be reachable.
async fn refuses_alone(tc: &TestCluster, id: u32, key: &str) -> bool {
    let mut kv = tc.node_kv(id).await.unwrap();
    let put = caskade_proto::PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"written alone".to_vec().into(),
        write_level: caskade_proto::WriteLevel::One as i32,
        ..Default::default()
    };
    match tokio::time::timeout(Duration::from_secs(5), kv.put(put)).await {
        Ok(Ok(_)) => false,
        Ok(Err(status)) => {
            // Refused before anything was written: not its key to write
            // (ABORTED), or no lease (UNAVAILABLE).
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Aborted | tonic::Code::Unavailable
                ),
                "node {id} answered {status:?}"
            );
            true
        }
        Err(_) => true,
    }
}

#[test]
fn a_primary_cut_from_its_secondaries_acknowledges_nothing_alone() {
    with_fault("cut-primary", Setup::Plain, async |f, tc, _| {
        // The primary of the first key keeps its link to the router.
        let primary = tc.preference_list(b"cut-primary-0")[0];
        let others: Vec<u32> = tc
            .node_ids()
            .into_iter()
            .filter(|n| *n != primary)
            .collect();
        for other in others {
            f.net.cut(host_of(tc, primary), host_of(tc, other)).unwrap();
        }
        // Its ranges fail over; it still hears from the router, and takes
        // no write, even at level one.
        tc.wait_failed_over(primary).await;
        let key = "cut-primary-0";
        assert!(
            refuses_alone(tc, primary, key).await,
            "the deposed primary {primary} took a write alone"
        );
        tokio::time::sleep(FAULT).await;
    });
}

#[test]
fn the_map_leader_isolated_from_everyone() {
    with_fault("leader", Setup::Plain, async |f, tc, _| {
        let leader = leader(tc).await;
        f.net.isolate(host_of(tc, leader)).unwrap();
        // (Not `wait_failed_over`: the test, on the router's host, cannot
        // reach the isolated node either.)
        poll_until(
            "the others to elect another leader and mark the old one down",
            SETTLE,
            || async {
                let page = tc.admin_cluster().await;
                page.is_ok_and(|p| {
                    p["leader"].as_u64().is_some_and(|l| l != u64::from(leader))
                        && p["nodes"].as_array().is_some_and(|nodes| {
                            nodes.iter().any(|n| n["id"] == leader && n["down"] == true)
                        })
                })
            },
        )
        .await;
        tokio::time::sleep(FAULT).await;
    });
}

#[test]
fn a_node_cut_from_the_router_only() {
    with_fault("router-cut", Setup::Plain, async |f, tc, _| {
        let node = tc.preference_list(b"router-cut-0")[0];
        f.net.cut(ROUTER_HOST, host_of(tc, node)).unwrap();
        poll_until("the router to see the node not ready", SETTLE, || async {
            tc.admin_node(node).await.is_ok_and(|n| n["ready"] == false)
        })
        .await;
        tokio::time::sleep(FAULT).await;
        // Its peers still hear it: it is not failed over.
        let page = tc.admin_node(node).await.unwrap();
        assert_eq!(page["down"], false, "node {node} was marked down: {page}");
    });
}

#[test]
fn the_nodes_split_one_against_two() {
    with_fault("split", Setup::Plain, async |f, tc, rng| {
        let ids = tc.node_ids();
        let alone = ids[rng.below(ids.len() as u64) as usize];
        for other in ids.iter().filter(|n| **n != alone) {
            f.net.cut(host_of(tc, alone), host_of(tc, *other)).unwrap();
        }
        tc.wait_failed_over(alone).await;
        tokio::time::sleep(FAULT).await;
    });
}

#[test]
fn a_flapping_link() {
    with_fault("flap", Setup::Plain, async |f, tc, rng| {
        let node = tc.preference_list(b"flap-0")[0];
        let host = host_of(tc, node);
        let until = tokio::time::Instant::now() + FAULT;
        while tokio::time::Instant::now() < until {
            f.net.set_link(host, false).unwrap();
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
            f.net.set_link(host, true).unwrap();
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        }
    });
}

/// How long a node may take to find its clock off, and its peers to say so.
const SKEW_SEEN: Duration = Duration::from_secs(20);

/// Moves node `victim`'s wall clock by `skew` (`+10m`, `-10m`) and checks,
/// while it is off: the node says its clock is off and its peers say it is
/// beyond the bound (admin page); it is failed over; writes of the keys it
/// was the primary of, and of the others, are acknowledged with versions
/// from a true clock, and values written with a time to live read back
/// (a node behind would have written them already expired, a node ahead
/// read them as expired).
async fn skewed(f: &Faults<'_>, tc: &mut TestCluster, victim: u32, skew: &str) {
    f.clock(victim).set(skew);
    poll_until(
        &format!("node {victim} to find its clock off and its peers to refuse it"),
        SKEW_SEEN,
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            page["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().all(|n| {
                    let clock = &n["stats"]["clock"];
                    if n["id"] == victim {
                        clock["off"] == true
                    } else {
                        clock["off"] == false
                            && clock["peers"].as_array().is_some_and(|peers| {
                                peers
                                    .iter()
                                    .any(|p| p["peer"] == victim && p["beyond_bound"] == true)
                            })
                    }
                })
            })
        },
    )
    .await;
    tc.wait_failed_over(victim).await;

    let theirs = tc.keys_with_primary(victim, &format!("skew-{victim}"), 3);
    let others = tc.keys_where("skew-other", 3, |list| list[0] != victim);
    for key in theirs.iter().chain(&others) {
        let value = format!("{key} written while node {victim}'s clock is {skew}");
        let (version, before, after) = written(tc, key, "ttl=300&w=quorum", &value).await;
        assert!(
            from_a_true_clock(version, before, after),
            "{key}: version {version} is not from a true clock ({before}..{after})"
        );
        for level in ["quorum", "primary", "any"] {
            let read = tc.get_level(key, level).await.unwrap();
            let status = read.status();
            let body = read.text().await.unwrap_or_default();
            assert_eq!(
                (status.as_u16(), body.as_str()),
                (200, value.as_str()),
                "{key} at r={level}"
            );
        }
    }
    // The fault lasts as long as the others.
    tokio::time::sleep(CALM).await;
}

#[test]
fn a_node_whose_clock_runs_ten_minutes_ahead() {
    with_fault("ahead", Setup::Skewable, async |f, tc, _| {
        // The map's leader: its peers must also elect another.
        let leader = leader(tc).await;
        skewed(f, tc, leader, "+10m").await;
    });
}

#[test]
fn a_node_whose_clock_runs_ten_minutes_behind() {
    with_fault("behind", Setup::Skewable, async |f, tc, _| {
        let leader = leader(tc).await;
        let victim = tc.node_ids().into_iter().find(|n| *n != leader).unwrap();
        skewed(f, tc, victim, "-10m").await;
    });
}

/// Times the router gave up on a node, by node.
async fn breaker_opens(tc: &TestCluster) -> BTreeMap<u32, f64> {
    let metrics = tc.metrics().await.unwrap();
    tc.node_ids()
        .into_iter()
        .map(|id| {
            let opens = metrics.value(
                "caskade_router_breaker_opens_total",
                &[("node", &id.to_string())],
            );
            (id, opens.unwrap_or(0.0))
        })
        .collect()
}

#[test]
fn a_slow_lossy_link() {
    with_fault("slow", Setup::Patient, async |f, tc, rng| {
        let slow = tc.preference_list(b"slow-0")[0];
        let opens = breaker_opens(tc).await;
        let host = host_of(tc, slow);
        f.net
            .slow(
                host,
                Duration::from_millis(50),
                Duration::from_millis(20),
                5,
                rng.next_u64(),
            )
            .unwrap();

        // Writes of keys the slow node is the primary of, and of keys it
        // is only a secondary of, all answered within the router's timeout.
        let theirs = tc.keys_with_primary(slow, "slow-theirs", 4);
        let others = tc.keys_where("slow-others", 4, |list| list[0] != slow);
        let timeout = Duration::from_millis(policy().timeout_ms);
        let mut worst = [Duration::ZERO; 2];
        let until = tokio::time::Instant::now() + FAULT;
        let mut n = 0;
        while tokio::time::Instant::now() < until {
            n += 1;
            for (i, keys) in [&theirs, &others].into_iter().enumerate() {
                for key in keys {
                    let started = tokio::time::Instant::now();
                    let response = tc.put_level(key, &format!("{key}-{n}"), "quorum").await;
                    let took = started.elapsed();
                    let status = response.map(|r| r.status());
                    assert!(
                        matches!(status, Ok(s) if s.is_success()),
                        "{key} (primary {}): {status:?} after {took:?}",
                        tc.preference_list(key.as_bytes())[0]
                    );
                    assert!(took < timeout, "{key}: {took:?}, beyond the timeout");
                    worst[i] = worst[i].max(took);
                }
            }
        }
        eprintln!(
            "slow: {n} rounds; slowest write of the slow node's keys {:?}, of the others' {:?}",
            worst[0], worst[1]
        );
        // A slow link is not a dead node: no breaker opened.
        assert_eq!(breaker_opens(tc).await, opens, "breakers opened");
    });
}

/// Kills node `victim` with SIGKILL and starts it again after `down`.
async fn crash(tc: &mut TestCluster, victim: u32, down: Duration) {
    tc.kill_node(victim).unwrap();
    tokio::time::sleep(down).await;
    tc.start_node(victim).await.unwrap();
}

/// The map's Raft leader, as the router's admin page tells.
async fn leader(tc: &TestCluster) -> u32 {
    let cluster = tc.admin_cluster().await.unwrap();
    u32::try_from(cluster["leader"].as_u64().expect("a leader")).unwrap()
}

#[test]
fn a_node_killed_while_a_node_is_added_and_while_one_is_removed() {
    with_fault("membership", Setup::Spare, async |_, tc, rng| {
        // Added: the Raft leader dies as soon as the change is committed,
        // while the new node pulls its ranges.
        let new = tc.start_spare_process().await.unwrap();
        let added = tc.add_to_map(new).await.unwrap();
        assert_eq!(added.status(), StatusCode::OK, "adding node {new}");
        let victim = leader(tc).await;
        crash(tc, victim, Duration::from_millis(1000 + rng.below(1000))).await;
        poll_until(
            "every node, the new one too, to be ready",
            SETTLE,
            || async { tc.all_nodes_ready().await },
        )
        .await;

        // Removed: one of the first three leaves; another (not the new
        // node) dies while the others drain it.
        let first = tc.node_ids()[..3].to_vec();
        let leaving = first[rng.below(3) as usize];
        let stays: Vec<u32> = first.into_iter().filter(|n| *n != leaving).collect();
        let victim = stays[rng.below(2) as usize];
        let (client, url, token) = (
            tc.client().clone(),
            tc.at(&format!("/admin/v1/nodes/{leaving}")),
            tc.admin_token.clone(),
        );
        let removal = tokio::spawn(async move {
            // A drain cut short answers 202 (still leaving) or fails; the
            // same request finishes it.
            for _ in 0..10 {
                let answer = client.delete(&url).bearer_auth(&token).send().await;
                if answer.as_ref().is_ok_and(|a| a.status() == StatusCode::OK) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            false
        });
        tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
        crash(tc, victim, Duration::from_millis(1000 + rng.below(1000))).await;
        assert!(removal.await.unwrap(), "node {leaving} was not removed");
        eprintln!("membership: added {new}, killed leader then node {victim}, removed {leaving}");
    });
}

#[test]
fn a_full_disk_under_replication() {
    // Outlives the cluster: a node's files must not lose their disk
    // before the node stops.
    let Some(disk) = SmallDisk::mount(24 << 20) else {
        return;
    };
    with_fault("full", Setup::Plain, async |_, tc, _| {
        // The primary of a workload key moves its data onto the small disk;
        // its log stays where it was, on a disk with room (as a
        // deployment's logs would).
        let full = tc.preference_list(b"full-0")[0];
        let mut config = tc.node_config(full).clone();
        config.engine.max_file_size = 1 << 20;
        tc.set_node_config(full, config);
        tc.move_data_onto(full, disk.path()).await.unwrap();
        poll_until("every node ready", SETTLE, || tc.all_nodes_ready()).await;

        // Fill it: 2 MiB left, then 64 KiB values (every node holds every
        // key) until it says its disk is full.
        disk.fill_leaving(2 << 20).unwrap();
        let bulk = "x".repeat(64 << 10);
        let mut n = 0;
        let tc: &TestCluster = tc;
        poll_until(
            &format!("node {full} to find its disk full"),
            SETTLE,
            || {
                n += 1;
                let key = format!("full-bulk-{n}");
                let bulk = &bulk;
                async move {
                    // Refused (507) when the full node coordinates it.
                    let _ = tc.put_level(&key, bulk, "quorum").await;
                    tc.admin_node(full)
                        .await
                        .is_ok_and(|node| node["stats"]["disk_full"] == true)
                }
            },
        )
        .await;
        // Full while the clients go on.
        tokio::time::sleep(FAULT).await;
        disk.free_ballast().unwrap();
        let freed = tokio::time::timeout(SETTLE, async {
            loop {
                let node = tc.admin_node(full).await;
                if node.is_ok_and(|n| n["stats"]["disk_full"] == false) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if freed.is_err() {
            let listing = std::process::Command::new("ls")
                .args(["-laR"])
                .arg(disk.path())
                .output()
                .unwrap();
            panic!(
                "node {full} still finds its disk full, {} bytes free: {}\n{}",
                disk.available().unwrap(),
                tc.admin_node(full).await.unwrap(),
                String::from_utf8_lossy(&listing.stdout)
            );
        }
        eprintln!("full: node {full} filled its disk with {n} bulk writes, then got space back");
    });
}
