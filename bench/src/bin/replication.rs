//! caskade-bench-replication: what replication costs and how fast a node
//! catches up, in one run.
//!
//! Part 1, write and read levels: puts and gets per second through the
//! router (HTTPS, HTTP/2, `--streams` in flight) against three nodes with
//! replication factor 1, then against three nodes with replication factor 3
//! at `w=one`, `w=quorum`, `w=all` and `r=primary`, `r=quorum`. Every value
//! read back is checked.
//!
//! Part 2, catch-up: two nodes replicate each other (RF 2). Node B stops;
//! `--missed` records are written to node A's engine while B is away; B
//! starts again and the time until it reports SERVING (caught up) is
//! measured, with the records per second it pulled.
//!
//! Run: `cargo run --release -p caskade-bench --bin caskade-bench-replication -- [--keys N] [--streams 64] [--missed 1000000]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use caskade_bench::drive::Phase;
use caskade_bench::http::router_phase;
use caskade_bench::nodes::{TwoNodes, admin, engine_config, start_node, wait_serving};
use caskade_bench::workload::{VALUE_LEN, Workload};
use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_common::tls::install_crypto_provider;
use caskade_common::{Hlc, Version};
use caskade_node::config::{DurabilityMode, EngineConfig};
use caskade_node::engine::{Engine, PutOptions};
use caskade_proto::StatsRequest;
use caskade_router::config::{LimitsConfig, NodePolicy};
use clap::Parser;

/// Benchmark replication: write and read levels, and catch-up.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Keys (16 B keys, 100 B values) per level phase, each put once and read once.
    #[arg(long, default_value_t = 50_000)]
    keys: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Records written while the catching-up node is away.
    #[arg(long, default_value_t = 1_000_000)]
    missed: usize,
    /// Seed of the keys, values and read order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.keys > 0 && args.streams > 0 && args.missed > 0,
        "counts must be positive"
    );
    install_crypto_provider();

    let mut rows = Vec::new();
    let rf1 = levels(&args, 1, &[("one", "primary")]).await?;
    rows.extend(rf1);
    let rf3 = levels(
        &args,
        3,
        &[("one", "primary"), ("quorum", "quorum"), ("all", "primary")],
    )
    .await?;
    rows.extend(rf3);
    let catch_up = catch_up(&args).await?;

    println!(
        "{} keys per phase, 16 B keys, 100 B values; 3 nodes (`never` durability) and the router in one process; {} streams",
        args.keys, args.streams
    );
    println!();
    println!("| replication | operation | level | per second | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for (rf, op, level, phase) in &rows {
        println!(
            "| RF {rf} | {op} | {level} | {:.0} | {:?} | {:?} |",
            phase.throughput.per_sec(),
            phase.at(0.5),
            phase.at(0.99)
        );
    }
    println!();
    println!(
        "catch-up: a node returning after {} missed writes was ready {:.2?} after it started ({:.0} records/s, opening its data files included)",
        catch_up.records,
        catch_up.ready_after,
        catch_up.records as f64 / catch_up.ready_after.as_secs_f64(),
    );
    Ok(())
}

type Row = (u32, &'static str, String, Phase);

/// Puts at each write level, then gets at each read level, through the
/// router of a fresh three-node cluster with replication factor `rf`.
async fn levels(
    args: &Args,
    rf: u32,
    levels: &[(&'static str, &'static str)],
) -> anyhow::Result<Vec<Row>> {
    let root = tempfile::tempdir().context("creating the temporary directory")?;
    let cluster = LocalCluster::start(LocalOptions {
        data_dir: root.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        nodes: 3,
        engine: EngineConfig {
            durability: DurabilityMode::Never,
            ..EngineConfig::default()
        },
        node_policy: NodePolicy::default(),
        replication_factor: Some(rf),
        router_limits: LimitsConfig::default(),
        router_metrics_listen: None,
    })
    .await?;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(
            &cluster.certs.ca,
        )?)?])
        .build()?;
    let base = Arc::new((
        client,
        cluster.url.clone(),
        format!("Bearer {}", cluster.admin_token),
    ));
    let mut rows = Vec::new();
    let mut written = Vec::new();
    for (i, (w, _)) in levels.iter().enumerate() {
        eprintln!("RF {rf}: puts at w={w}…");
        let keys = Arc::new(Workload::new(args.keys, args.seed ^ (i as u64 + 1)));
        let phase = router_phase(&base, args.streams, &keys, false, &format!("w={w}")).await?;
        rows.push((rf, "puts", format!("w={w}"), phase));
        written.push(keys);
    }
    let mut reads: Vec<&str> = Vec::new();
    for (_, r) in levels {
        if !reads.contains(r) {
            reads.push(r);
        }
    }
    for r in reads {
        eprintln!("RF {rf}: gets at r={r}…");
        let phase = router_phase(&base, args.streams, &written[0], true, &format!("r={r}")).await?;
        rows.push((rf, "gets", format!("r={r}"), phase));
    }
    cluster.stop().await?;
    Ok(rows)
}

/// What the catch-up part measured.
struct CatchUp {
    records: usize,
    /// From B's start until it reported SERVING: open, pull, apply.
    ready_after: Duration,
}

async fn catch_up(args: &Args) -> anyhow::Result<CatchUp> {
    let root = tempfile::tempdir().context("creating the temporary directory")?;
    let nodes = TwoNodes::new(root.path())?;
    let certs = &nodes.certs;
    let [a_addr, b_addr] = nodes.addrs;
    let a = start_node(nodes.config(1)).await?;
    let b = start_node(nodes.config(2)).await?;
    wait_serving(certs, a_addr).await?;
    wait_serving(certs, b_addr).await?;
    b.stop().await?;
    a.stop().await?;

    eprintln!("writing {} records to node A while B is away…", args.missed);
    let workload = Workload::new(args.missed, args.seed ^ 0xca7c);
    let a_dir = nodes.data_dir(1);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let engine = Engine::open(&a_dir, engine_config().options())?;
        let clock = Hlc::new(1);
        let mut value = [0u8; VALUE_LEN];
        for i in 0..workload.len() {
            workload.value_into(i, &mut value);
            let version: Version = clock.now();
            engine.put(
                workload.key(i),
                &value,
                PutOptions {
                    version,
                    ..PutOptions::default()
                },
            )?;
        }
        engine.close()?;
        Ok(())
    })
    .await??;

    let a = start_node(nodes.config(1)).await?;
    wait_serving(certs, a_addr).await?;
    eprintln!("node B returns and catches up…");
    let started = Instant::now();
    let b = start_node(nodes.config(2)).await?;
    wait_serving(certs, b_addr).await?;
    let ready_after = started.elapsed();
    // B is ready once caught up: its cursor on A is at A's end.
    let stats = admin(certs, b_addr)
        .await?
        .stats(StatsRequest {})
        .await?
        .into_inner();
    let from_a = stats
        .peers
        .iter()
        .find(|p| p.peer_id == 1)
        .context("B reports no replication from A")?;
    ensure!(from_a.lag_records == 0, "B is still behind A: {from_a:?}");
    ensure!(
        stats.keys as usize >= args.missed,
        "B holds {} keys, fewer than the {} written",
        stats.keys,
        args.missed
    );
    b.stop().await?;
    a.stop().await?;
    Ok(CatchUp {
        records: args.missed,
        ready_after,
    })
}
