//! caskade-bench-antientropy: what anti-entropy costs, and how long a
//! replica that missed writes takes to converge through it alone.
//!
//! Two nodes replicate each other (RF 2) in this process. Before they
//! start, the same `--keys` records (16 B keys, 100 B values) are written
//! into both data directories with the same versions, of origin 999, a
//! node outside the cluster.
//!
//! Steady state: every `--interval-ms` each node asks the other for its
//! bucket digests and finds them equal, so nothing is copied. Completed
//! exchanges are counted by Admin Stats `anti_entropy_exchanges`. After
//! each node's first exchange, the window opens when an exchange of node A
//! has just ended (Stats polled every 100 ms) and closes when A has
//! completed `--rounds` more; the exchanges of both nodes inside it are
//! counted, and CPU is also given per exchange. There is no baseline
//! window without exchanges: anti-entropy cannot be paused while a node
//! runs, and the two nodes' rounds are offset by a random jitter, so no
//! window of the same length is free of them. The idle costs (pullers'
//! long polls, this benchmark's Stats polls) are inside the figures.
//!
//! Convergence: `--missed` new records (versions of now, origin 999) are
//! applied to node A only, through `Replication/Apply` in batches of 1000.
//! B's pulls skip them (a caught-up puller takes from a peer only the
//! records that peer coordinated), so only anti-entropy brings them to B;
//! checked twice: B holds fewer than all of them when planting ends, and
//! B's `anti_entropy_repaired` grows by exactly `--missed`. Measured from
//! the end of planting until B holds them all, which includes waiting for
//! B's next round (up to one interval).
//!
//! CPU and I/O are this process's (both nodes and the benchmark), from
//! /proc/self/stat and /proc/self/io: see `caskade_bench::usage` for what
//! each counter includes.
//!
//! Run: `cargo run --release -p caskade-bench --bin caskade-bench-antientropy -- [--keys N] [--missed N] [--interval-ms N]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use caskade_bench::nodes::{TwoNodes, admin, channel, engine_config, start_node, wait_serving};
use caskade_bench::usage::{Spent, Usage};
use caskade_bench::workload::{VALUE_LEN, Workload};
use caskade_common::Hlc;
use caskade_common::tls::install_crypto_provider;
use caskade_node::engine::{Engine, Record};
use caskade_node::kv::to_proto;
use caskade_node::replication::antientropy::BUCKETS;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::replication_client::ReplicationClient;
use caskade_proto::{ApplyRequest, ReplicatedRecord, StatsRequest, StatsResponse};
use clap::Parser;
use prost::bytes::Bytes;
use tonic::transport::Channel;

/// The origin of every record written here: a node outside the cluster,
/// so that neither node's pulls forward them as its own writes.
const OUTSIDER: u32 = 999;
/// Records per engine apply and per `Replication/Apply` (a node's maximum).
const BATCH: usize = 1000;
/// Replication feed per node: holds the planted records, so that B's pulls
/// read them from the feed (where records A did not coordinate are
/// skipped) and not from the data files (where they are not).
const FEED_BYTES: usize = 256 << 20;
/// How often Admin Stats are polled.
const POLL: Duration = Duration::from_millis(100);
/// Longest wait for a node to settle or to converge.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// Benchmark anti-entropy: steady-state exchanges, and convergence.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Records (16 B keys, 100 B values) both nodes hold before they start.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Records written to node A only, for anti-entropy to bring to B.
    #[arg(long, default_value_t = 100_000)]
    missed: usize,
    /// Anti-entropy interval of both nodes, milliseconds.
    #[arg(long, default_value_t = 5000)]
    interval_ms: u64,
    /// Steady-state rounds of node A to measure.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Seed of the keys and values.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.keys > 0 && args.missed > 0 && args.interval_ms > 0 && args.rounds > 0,
        "counts and the interval must be positive"
    );
    install_crypto_provider();
    let root = tempfile::tempdir().context("creating the temporary directory")?;
    let nodes = TwoNodes::new(root.path())?;
    // The first `keys` are on both nodes, the rest are planted on A.
    let workload = Arc::new(Workload::new(args.keys + args.missed, args.seed));

    eprintln!("writing {} records into both data directories…", args.keys);
    let (preloaded, keys) = (Arc::clone(&workload), args.keys);
    let dirs = [nodes.data_dir(1), nodes.data_dir(2)];
    tokio::task::spawn_blocking(move || preload(&preloaded, keys, &dirs)).await??;

    let config = |id: u32| {
        let mut config = nodes.config(id);
        config.replication.anti_entropy_interval_ms = args.interval_ms;
        config.replication.feed_bytes = FEED_BYTES;
        config
    };
    let a = start_node(config(1)).await?;
    let b = start_node(config(2)).await?;
    for addr in nodes.addrs {
        wait_serving(&nodes.certs, addr).await?;
    }
    let mut admins = [
        admin(&nodes.certs, nodes.addrs[0]).await?,
        admin(&nodes.certs, nodes.addrs[1]).await?,
    ];
    for admin in &mut admins {
        wait_settled(admin, args.keys as u64).await?;
    }

    eprintln!("steady state: {} rounds of node A…", args.rounds);
    let steady = steady_state(&args, &mut admins).await?;
    eprintln!("planting {} records on node A only…", args.missed);
    let mut replication = ReplicationClient::new(channel(&nodes.certs, nodes.addrs[0]).await?);
    let converged = converge(&args, &workload, &mut replication, &mut admins).await?;
    b.stop().await?;
    a.stop().await?;
    print_report(&args, &steady, &converged);
    Ok(())
}

/// Writes the first `keys` records of `workload` into the data directory
/// of each node, not yet started, with the same versions in both.
fn preload(workload: &Workload, keys: usize, dirs: &[PathBuf; 2]) -> anyhow::Result<()> {
    let engines = [
        Engine::open(&dirs[0], engine_config().options())?,
        Engine::open(&dirs[1], engine_config().options())?,
    ];
    let clock = Hlc::new(OUTSIDER);
    for start in (0..keys).step_by(BATCH) {
        let records: Vec<Record> = (start..(start + BATCH).min(keys))
            .map(|i| Record {
                seq: 0,
                key: workload.key(i).to_vec(),
                value: Some(value_of(workload, i)),
                version: clock.now(),
                expires_at: None,
            })
            .collect();
        engines[0].apply(records.clone())?;
        engines[1].apply(records)?;
    }
    for engine in engines {
        engine.close()?;
    }
    Ok(())
}

fn value_of(workload: &Workload, i: usize) -> Vec<u8> {
    let mut value = [0; VALUE_LEN];
    workload.value_into(i, &mut value);
    value.to_vec()
}

/// Waits until the node's start-up is over: no takeover under way, no lag
/// behind its peer; then checks it holds the `keys` records written.
async fn wait_settled(admin: &mut AdminClient<Channel>, keys: u64) -> anyhow::Result<()> {
    let stats = poll_until(admin, WAIT_LIMIT, "the end of start-up", |s| {
        s.ready
            && s.taking_over_epoch == 0
            && !s.peers.is_empty()
            && s.peers.iter().all(|p| p.lag_records == 0)
    })
    .await?;
    ensure!(
        stats.keys == keys,
        "node {} holds {} keys, not the {keys} written",
        stats.node_id,
        stats.keys
    );
    Ok(())
}

/// What a window cost and what the nodes did in it.
struct Window {
    spent: Spent,
    /// Exchanges completed by node A and by node B.
    exchanges: [u64; 2],
}

/// Steady-state exchanges over `args.rounds` rounds of node A.
async fn steady_state(
    args: &Args,
    admins: &mut [AdminClient<Channel>; 2],
) -> anyhow::Result<Window> {
    let limit = WAIT_LIMIT + Duration::from_millis(args.interval_ms) * (args.rounds as u32 + 1);
    // The first exchange of each comes after start-up; measure later ones.
    for admin in admins.iter_mut() {
        poll_until(admin, limit, "a first anti-entropy exchange", |s| {
            s.anti_entropy_exchanges > 0
        })
        .await?;
    }
    let [a, b] = admins;
    let seen = stats(a).await?.anti_entropy_exchanges;
    let opened = poll_until(a, limit, "an exchange of node A", |s| {
        s.anti_entropy_exchanges > seen
    })
    .await?;
    let before = Usage::now()?;
    let b_before = stats(b).await?;
    let through = opened.anti_entropy_exchanges + args.rounds;
    let closed = poll_until(a, limit, "node A's measured rounds", |s| {
        s.anti_entropy_exchanges >= through
    })
    .await?;
    let after = Usage::now()?;
    let b_after = stats(b).await?;
    let repaired = (closed.anti_entropy_repaired - opened.anti_entropy_repaired)
        + (b_after.anti_entropy_repaired - b_before.anti_entropy_repaired);
    ensure!(
        repaired == 0,
        "steady-state exchanges repaired {repaired} records: the nodes did not hold the same data"
    );
    Ok(Window {
        spent: after.since(&before),
        exchanges: [
            closed.anti_entropy_exchanges - opened.anti_entropy_exchanges,
            b_after.anti_entropy_exchanges - b_before.anti_entropy_exchanges,
        ],
    })
}

/// What the convergence part measured.
struct Convergence {
    /// From the end of planting until B held every planted record.
    window: Window,
    /// Sending the records to A.
    planting: Duration,
    /// Planted records B held when planting ended.
    held_at_end: u64,
}

/// Plants `args.missed` records on node A only and waits until anti-entropy
/// has brought them all to node B.
async fn converge(
    args: &Args,
    workload: &Workload,
    replication: &mut ReplicationClient<Channel>,
    admins: &mut [AdminClient<Channel>; 2],
) -> anyhow::Result<Convergence> {
    let [a, b] = admins;
    let b_before = stats(b).await?;
    let clock = Hlc::new(OUTSIDER);
    let total = args.keys + args.missed;
    let started = Instant::now();
    let mut applied = 0u64;
    for start in (args.keys..total).step_by(BATCH) {
        let records = (start..(start + BATCH).min(total))
            .map(|i| ReplicatedRecord {
                key: Bytes::copy_from_slice(workload.key(i)),
                value: Bytes::from(value_of(workload, i)),
                tombstone: false,
                version: Some(to_proto(clock.now())),
                expires_at_ms: 0,
            })
            .collect();
        // Epoch 0: whatever map A has.
        let request = ApplyRequest { records, epoch: 0 };
        applied += u64::from(replication.apply(request).await?.into_inner().applied);
    }
    let planting = started.elapsed();
    let missed = args.missed as u64;
    ensure!(
        applied == missed,
        "A applied {applied} of the {missed} records"
    );

    let before = Usage::now()?;
    let planted = stats(b).await?;
    let a_planted = stats(a).await?;
    let all = total as u64;
    ensure!(
        planted.keys < all,
        "B held every planted record as soon as planting ended: something other than anti-entropy brought them"
    );
    let done = poll_until(b, WAIT_LIMIT, "B holding every planted record", |s| {
        s.keys >= all
    })
    .await?;
    let after = Usage::now()?;
    let a_after = stats(a).await?;
    let repaired = done.anti_entropy_repaired - b_before.anti_entropy_repaired;
    ensure!(
        repaired == missed,
        "anti-entropy repaired {repaired} of the {missed} planted records on B: the rest came another way"
    );
    Ok(Convergence {
        window: Window {
            spent: after.since(&before),
            exchanges: [
                a_after.anti_entropy_exchanges - a_planted.anti_entropy_exchanges,
                done.anti_entropy_exchanges - planted.anti_entropy_exchanges,
            ],
        },
        planting,
        held_at_end: planted.keys.saturating_sub(args.keys as u64),
    })
}

async fn stats(admin: &mut AdminClient<Channel>) -> anyhow::Result<StatsResponse> {
    Ok(admin.stats(StatsRequest {}).await?.into_inner())
}

/// Polls the node's Stats every [`POLL`] until `done` holds (at most
/// `limit`); returns the Stats that satisfied it.
async fn poll_until(
    admin: &mut AdminClient<Channel>,
    limit: Duration,
    what: &str,
    done: impl Fn(&StatsResponse) -> bool,
) -> anyhow::Result<StatsResponse> {
    let deadline = Instant::now() + limit;
    loop {
        let stats = stats(admin).await?;
        if done(&stats) {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            bail!(
                "waited {limit:?} for {what}; node {} is at {stats:?}",
                stats.node_id
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn print_report(args: &Args, steady: &Window, converged: &Convergence) {
    println!(
        "{} keys per node (16 B keys, 100 B values); 2 nodes, RF 2, `never` durability, in one process; anti-entropy every {} ms over {BUCKETS} buckets",
        args.keys, args.interval_ms
    );
    println!();
    println!(
        "| window | wall | exchanges A + B | CPU | CPU per exchange | rchar | wchar | read_bytes | write_bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let row = |name: String, window: &Window| {
        let Spent { wall, cpu, io } = window.spent;
        let [a, b] = window.exchanges;
        println!(
            "| {name} | {wall:.2?} | {a} + {b} | {cpu:.2?} | {:.2?} | {} | {} | {} | {} |",
            cpu.div_f64((a + b).max(1) as f64),
            mib(io.rchar),
            mib(io.wchar),
            mib(io.read_bytes),
            mib(io.write_bytes),
        );
    };
    row(format!("steady state, {} rounds of A", args.rounds), steady);
    row(
        format!("convergence of {} missed writes", args.missed),
        &converged.window,
    );
    println!();
    println!(
        "steady state: {:.2?} of CPU per round of A (in which each node asks the other once)",
        steady.spent.cpu.div_f64(args.rounds as f64),
    );
    println!(
        "convergence: planting on A took {:.2?}; B held {} of the {} records when it ended and all of them {:.2?} later, every one repaired by anti-entropy",
        converged.planting, converged.held_at_end, args.missed, converged.window.spent.wall,
    );
    println!(
        "CPU and I/O are this process's: both nodes and the benchmark's Stats polls (every {POLL:?})"
    );
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
