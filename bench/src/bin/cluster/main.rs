//! caskade-bench-cluster: what the Raft-backed cluster map costs, and how
//! fast the cluster fails over, in one run of under two minutes.
//!
//! Three storage nodes run as processes of their own (this binary in the
//! node role), formed from the same `initial_members`, replication factor
//! 3, `never` durability; the router runs in this process.
//!
//! 1. **Idle cost**: each node's CPU time (`/proc/<pid>/stat`) over
//!    `--idle-secs` with no requests: Raft heartbeats, the leader's
//!    failure probes, the routers' map long polls and health checks.
//! 2. **Load, then load with map churn**: puts at `w=quorum` through the
//!    router for `--load-secs`, then the same while spare nodes are added
//!    and removed through the admin API, one after the other.
//! 3. **SIGKILL** of a node that is not the Raft leader: rounds of writes
//!    of `--failover-keys` keys until a whole round succeeds, the time until
//!    the leader's map and then the router's admin page mark it down, and
//!    the time until it is back in service once started again.
//! 4. **SIGSTOP** of another follower (a hung node: connections open, no
//!    answers), the same figures, then SIGCONT (also on any error).
//!
//! Run: `cargo run --release -p caskade-bench --bin caskade-bench-cluster -- [--idle-secs 20] [--load-secs 20] [--failover-after-ms 2000]`

mod admin;
mod churn;
mod deployment;
mod failover;
mod idle;
mod process;
mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use caskade_bench::http::{Failures, put, router_puts_for};
use caskade_bench::workload::Workload;
use caskade_common::config::LogConfig;
use caskade_common::telemetry::init_logging;
use caskade_common::tls::install_crypto_provider;
use caskade_node::config::ClusterConfig;
use caskade_router::config::NodePolicy;
use clap::Parser;
use tokio::sync::watch;

use crate::admin::{breaker_closed, in_service, marked_down, page_leader};
use crate::churn::churn;
use crate::deployment::{Deployment, Settings, poll_for};
use crate::failover::{map_marks_down, page_shows, write_rounds};
use crate::idle::idle;
use crate::process::{Frozen, NODE_ROLE, ROLE_ENV};
use crate::report::{Report, mean, ms, secs};

/// Storage nodes of the cluster.
const FOUNDERS: u32 = 3;
/// Replicas per key.
const REPLICATION_FACTOR: u32 = 3;
/// The write level of every put.
const WRITE_LEVEL: &str = "w=quorum";
/// Ceiling of one put of the load phases (a put that takes longer is a
/// failure, not a hang).
const LOAD_PUT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the cluster may take to settle between phases (every founder
/// in service, spares gone, a leader known).
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// Benchmark the Raft-backed cluster map: idle cost, load under map churn,
/// failover after SIGKILL and SIGSTOP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds over which the idle CPU cost is measured.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// Seconds of put load, once without and once with map churn.
    #[arg(long, default_value_t = 20)]
    load_secs: u64,
    /// Pause after each map change of the churn (0: one change right after
    /// the other, the worst case).
    #[arg(long, default_value_t = 2000)]
    churn_pause_ms: u64,
    /// The nodes' `cluster.failover_after_ms`: how long a node must be
    /// unreachable before the Raft leader marks it down.
    #[arg(long, default_value_t = 2000)]
    failover_after_ms: u64,
    /// Concurrent requests of the put load.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Distinct keys (16 B, 100 B values) the put load cycles through.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Keys written in each round after a fault.
    #[arg(long, default_value_t = 50)]
    failover_keys: usize,
    /// A round of writes after a fault starts every this many ms (or as
    /// soon as the previous one ends).
    #[arg(long, default_value_t = 20)]
    round_every_ms: u64,
    /// The client's timeout of one write after a fault. Above the router's
    /// node timeout (2000 ms) by default, so that the router's own answer
    /// (a 504, say) is seen rather than the client giving up first.
    #[arg(long, default_value_t = 3000)]
    write_timeout_ms: u64,
    /// Longest wait for each failover figure.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// The follower to SIGKILL in phase 3 (default: the first follower).
    #[arg(long)]
    kill_node: Option<u32>,
    /// The follower to SIGSTOP in phase 4 (default: a follower other than
    /// phase 3's).
    #[arg(long)]
    stop_node: Option<u32>,
    /// Seed of the keys and values.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the temporary directory (node files, data and logs) and print
    /// where it is.
    #[arg(long)]
    keep_dir: bool,
    /// The nodes' `log.level` (their logs are files in the temporary
    /// directory; see --keep-dir).
    #[arg(long, default_value = "info")]
    node_log: String,
    /// Log the router's events to stderr at this level (a `tracing`
    /// filter such as `info` or `caskade_router=debug`); default none.
    #[arg(long)]
    router_log: Option<String>,
}

fn main() -> ExitCode {
    if std::env::var_os(ROLE_ENV).is_some_and(|role| role == NODE_ROLE) {
        return caskade_node::main();
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("caskade-bench-cluster: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::default();
    let outcome = runtime.block_on(async {
        // On Ctrl-C the run is dropped, which thaws and kills the nodes.
        tokio::select! {
            outcome = run(&args, &mut report) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // What was measured before a failure is still worth seeing.
    report.print(&setup(&args));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caskade-bench-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    ensure!(
        args.idle_secs > 0 && args.load_secs > 0 && args.deadline_secs > 0,
        "durations must be positive"
    );
    ensure!(
        args.streams > 0 && args.keys > 0 && args.failover_keys > 0,
        "counts must be positive"
    );
    install_crypto_provider();
    if let Some(level) = &args.router_log {
        init_logging(&LogConfig {
            level: level.clone(),
            ..LogConfig::default()
        })
        .map_err(anyhow::Error::msg)?;
    }
    eprintln!("starting {FOUNDERS} node processes and the router…");
    let started = Instant::now();
    let settings = Settings {
        founders: FOUNDERS,
        replication_factor: REPLICATION_FACTOR,
        failover_after_ms: args.failover_after_ms,
        keep_dir: args.keep_dir,
        log_level: args.node_log.clone(),
    };
    let mut d = Deployment::start(settings, NodePolicy::default()).await?;
    report.add(
        "setup",
        "cluster formed, every node ready",
        secs(started.elapsed()),
    );
    idle(&d, Duration::from_secs(args.idle_secs), report).await?;
    load(&mut d, args, report).await?;
    let killed = failover(&mut d, args, report, Fault::Kill, args.kill_node, None).await?;
    failover(
        &mut d,
        args,
        report,
        Fault::Stop,
        args.stop_node,
        Some(killed),
    )
    .await?;
    d.stop().await
}

/// Phase 2: the put load alone, then with nodes added and removed.
async fn load(d: &mut Deployment, args: &Args, report: &mut Report) -> anyhow::Result<()> {
    const PHASE: &str = "2 load";
    let target = d.admin().target(LOAD_PUT_TIMEOUT)?;
    let workload = Arc::new(Workload::new(args.keys, args.seed));
    let duration = Duration::from_secs(args.load_secs);

    eprintln!("put load for {} s, no map changes…", args.load_secs);
    let failures = Arc::new(Failures::default());
    let quiet = router_puts_for(
        &target,
        args.streams,
        &workload,
        WRITE_LEVEL,
        duration,
        &failures,
    )
    .await?;
    report_load(report, PHASE, "no changes", &quiet, &failures);

    eprintln!(
        "the same load for {} s while nodes are added and removed…",
        args.load_secs
    );
    let epoch_before = d.admin().epoch().await?;
    let failures = Arc::new(Failures::default());
    let until = Instant::now() + duration;
    let (loaded, churned) = tokio::join!(
        router_puts_for(
            &target,
            args.streams,
            &workload,
            WRITE_LEVEL,
            duration,
            &failures
        ),
        churn(
            d,
            FOUNDERS + 1,
            until,
            Duration::from_millis(args.churn_pause_ms)
        ),
    );
    let (loaded, churned) = (loaded?, churned?);
    let epoch_after = d.admin().epoch().await?;
    report_load(report, PHASE, "map churn", &loaded, &failures);
    report.add(
        PHASE,
        "map changes during the churn (epochs)",
        (epoch_after - epoch_before).to_string(),
    );
    report.add(
        PHASE,
        "nodes added / removed",
        format!("{} / {}", churned.adds.len(), churned.removes.len()),
    );
    report.add(PHASE, "add (POST), mean", mean(&churned.adds));
    report.add(
        PHASE,
        "remove (DELETE, drain included), mean",
        mean(&churned.removes),
    );
    if churned.conflicts > 0 {
        report.add(
            PHASE,
            "changes refused with 409 and sent again",
            churned.conflicts.to_string(),
        );
    }
    let settled = settle(d).await?;
    report.add(
        PHASE,
        "after the churn, until every node is in service with its breaker closed",
        secs(settled),
    );
    Ok(())
}

fn report_load(
    report: &mut Report,
    phase: &str,
    what: &str,
    load: &caskade_bench::drive::Phase,
    failures: &Failures,
) {
    let failed = failures.total();
    let succeeded = load.throughput.ops.saturating_sub(failed);
    report.add(
        phase,
        format!("{what}: puts/s"),
        format!(
            "{:.0}",
            succeeded as f64 / load.throughput.elapsed.as_secs_f64()
        ),
    );
    report.add(
        phase,
        format!("{what}: p50 / p99 (every put, failed ones included)"),
        format!("{} / {}", ms(load.at(0.5)), ms(load.at(0.99))),
    );
    report.add(
        phase,
        format!("{what}: failed puts"),
        if failed == 0 {
            "0".to_owned()
        } else {
            format!(
                "{failed} of {} ({})",
                load.throughput.ops,
                failures.summary()
            )
        },
    );
}

/// How a node fails in phases 3 and 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL, then started again from the same file.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Stop,
}

/// Phases 3 and 4: follower `chosen` (by default one that is not `avoid`,
/// if another is left) fails; returns its id.
async fn failover(
    d: &mut Deployment,
    args: &Args,
    report: &mut Report,
    fault: Fault,
    chosen: Option<u32>,
    avoid: Option<u32>,
) -> anyhow::Result<u32> {
    let (phase, salt) = match fault {
        Fault::Kill => ("3 SIGKILL", 0x6b11),
        Fault::Stop => ("4 SIGSTOP", 0x5709),
    };
    let admin = d.admin().clone();
    let leader = admin.leader().await?;
    let followers: Vec<u32> = d
        .founders()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let victim = match chosen {
        Some(id) if followers.contains(&id) => id,
        Some(id) => bail!(
            "{phase}: node {id} is not a follower (the founders are {:?}, the Raft leader is node {leader})",
            d.founders()
        ),
        None => followers
            .iter()
            .copied()
            .find(|&id| Some(id) != avoid)
            .or(followers.first().copied())
            .context("no node other than the leader")?,
    };
    let keys = Arc::new(Workload::new(args.failover_keys, args.seed ^ salt));
    let target = admin.target(Duration::from_millis(args.write_timeout_ms))?;
    // Every key once before the fault: the connections are warm, and each
    // write after it overwrites a key all replicas hold.
    for i in 0..keys.len() {
        if let Err(failure) = put(&target, &keys, i, WRITE_LEVEL).await {
            let page = admin.cluster_page().await.unwrap_or_default();
            bail!(
                "writing key #{i} before the fault: {failure}; the router sees {}",
                nodes_summary(&page)
            );
        }
    }
    let deadline = Duration::from_secs(args.deadline_secs);
    let leader_map = d.node_admin(leader)?;
    let (settled, settled_seen) = watch::channel(false);

    eprintln!("{phase}: node {victim} (the leader is node {leader})…");
    let mut frozen = None;
    let at = Instant::now();
    match fault {
        Fault::Kill => d.kill(victim)?,
        Fault::Stop => frozen = Some(Frozen::freeze(d.pid(victim)?)?),
    }
    let map_down = tokio::spawn(map_marks_down(leader_map, victim, at, deadline));
    let page_down = tokio::spawn({
        let admin = admin.clone();
        async move {
            let shown =
                page_shows(admin, at, deadline, move |page| marked_down(page, victim)).await;
            let _ = settled.send(true);
            shown
        }
    });
    let rounds = write_rounds(
        target,
        Arc::clone(&keys),
        WRITE_LEVEL,
        Duration::from_millis(args.round_every_ms),
        at,
        deadline,
        settled_seen,
    )
    .await;
    let map_down = map_down.await?;
    let page_down = page_down.await?;

    let back_at = Instant::now();
    let how = match fault {
        Fault::Kill => {
            d.restart(victim).await?;
            "started again"
        }
        Fault::Stop => {
            if let Some(frozen) = frozen.take() {
                frozen.thaw()?;
            }
            "SIGCONT"
        }
    };
    let back = page_shows(admin, back_at, deadline, move |page| {
        in_service(page, victim)
    })
    .await;

    let within = |figure: Option<Duration>| {
        figure.map_or_else(|| format!("not within {}", secs(deadline)), secs)
    };
    report.add(
        phase,
        "node",
        format!("node {victim} (leader: node {leader})"),
    );
    report.add(
        phase,
        format!("until a whole round of {} writes succeeds", keys.len()),
        within(rounds.first_clean),
    );
    report.add(
        phase,
        "failed writes before that round",
        rounds.failed_before_clean.to_string(),
    );
    report.add(
        phase,
        "failed writes in all rounds",
        format!(
            "{} in {} rounds ({})",
            rounds.failures.total(),
            rounds.rounds,
            rounds.failures.summary()
        ),
    );
    report.add(
        phase,
        format!("the leader's map marks node {victim} down"),
        within(map_down),
    );
    report.add(
        phase,
        "the router's admin page shows it down",
        within(page_down),
    );
    report.add(
        phase,
        format!("{how}: until in service (up, ready)"),
        within(back),
    );
    settle(d).await?;
    Ok(victim)
}

/// Each node as the admin page shows it, in one line.
fn nodes_summary(page: &serde_json::Value) -> String {
    let Some(nodes) = page["nodes"].as_array() else {
        return format!("no nodes: {page}");
    };
    let nodes: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "node {} (down {}, ready {}, breaker {}, caught up {}, map epoch {})",
                n["id"],
                n["down"],
                n["ready"],
                n["breaker"],
                n["stats"]["caught_up"],
                n["stats"]["map_epoch"]
            )
        })
        .collect();
    format!("epoch {}: {}", page["epoch"], nodes.join("; "))
}

/// Waits until the map holds exactly the founders, all in service with
/// their breakers in the router closed and their primary ranges taken
/// over, and a leader is known, so that a
/// phase does not measure what the one before left behind; returns how
/// long that took.
async fn settle(d: &Deployment) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let admin = d.admin().clone();
    let founders = d.founders();
    poll_for(
        "the founders, and only they, in service with their breakers closed",
        SETTLE_DEADLINE,
        || async {
            let page = admin.cluster_page().await.ok()?;
            page_leader(&page)?;
            let only_founders = page["nodes"].as_array()?.len() == founders.len();
            // Every node has taken over the ranges it is the primary of:
            // their writes are taken again.
            let taken_over = founders.iter().all(|&id| {
                page["nodes"].as_array().is_some_and(|nodes| {
                    nodes.iter().any(|n| {
                        n["id"] == id
                            && n["stats"]["map_epoch"] == page["epoch"]
                            && n["stats"]["taking_over_epoch"] == 0
                    })
                })
            });
            let settled = founders
                .iter()
                .all(|&id| in_service(&page, id) && breaker_closed(&page, id));
            let settled = settled && taken_over;
            (only_founders && settled).then_some(())
        },
    )
    .await?;
    Ok(started.elapsed())
}

/// What ran, in one line above the table.
fn setup(args: &Args) -> String {
    let raft = ClusterConfig::default();
    let router = NodePolicy::default();
    format!(
        "{FOUNDERS} storage nodes in processes of their own (RF {REPLICATION_FACTOR}, `never` durability, \
         failover_after_ms {}, Raft heartbeat {} ms, election timeout {} ms); the router in this process \
         (node timeout {} ms, health checks every {} ms); puts at {WRITE_LEVEL}, 16 B keys, 100 B values; \
         load: {} streams over {} keys; failover rounds: {} keys, client timeout {} ms",
        args.failover_after_ms,
        raft.heartbeat_ms,
        raft.election_timeout_ms,
        router.timeout_ms,
        router.health_interval_ms,
        args.streams,
        args.keys,
        args.failover_keys,
        args.write_timeout_ms,
    )
}
