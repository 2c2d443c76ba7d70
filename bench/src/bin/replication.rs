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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use caskade_bench::drive::Phase;
use caskade_bench::http::router_phase;
use caskade_bench::workload::{VALUE_LEN, Workload};
use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::LogConfig;
use caskade_common::tls::{TlsMaterial, install_crypto_provider};
use caskade_common::{Hlc, Version};
use caskade_node::config::{
    ClusterConfig, DurabilityMode, EngineConfig, InitialMembers, MetricsConfig, ServerConfig,
};
use caskade_node::engine::{Engine, PutOptions};
use caskade_node::{Node, NodeConfig};
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{GetClusterMapRequest, StatsRequest};
use caskade_router::config::NodePolicy;
use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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

/// A node serving in this process until `stop` is sent.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), caskade_node::NodeError>>,
}

async fn start_node(config: NodeConfig) -> anyhow::Result<Running> {
    let node = Node::start(config).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(async {
        let _ = stopped.await;
    }));
    Ok(Running { stop, task })
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

async fn catch_up(args: &Args) -> anyhow::Result<CatchUp> {
    let root = tempfile::tempdir().context("creating the temporary directory")?;
    let certs = ensure_cluster_certs(&root.path().join("certs"), 2, &[])?;
    // Two free ports, so that both nodes know each other from the start
    // (their initial members) and come back on them.
    let a_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let b_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let members =
        InitialMembers::try_from(format!("1={a_addr},2={b_addr}")).map_err(anyhow::Error::msg)?;
    let config = |id: u32, listen: SocketAddr| NodeConfig {
        id,
        listen,
        data_dir: root.path().join(format!("node-{id}")),
        backup_dir: None,
        tls: certs.nodes[id as usize - 1].clone(),
        engine: EngineConfig {
            durability: DurabilityMode::Never,
            ..EngineConfig::default()
        },
        cluster: ClusterConfig {
            initial_members: Some(members.clone()),
            replication_factor: 2,
            ..ClusterConfig::default()
        },
        replication: Default::default(),
        server: ServerConfig::default(),
        metrics: MetricsConfig::default(),
        log: LogConfig::default(),
    };
    let a = start_node(config(1, a_addr)).await?;
    let b = start_node(config(2, b_addr)).await?;
    wait_serving(&certs, a_addr).await?;
    wait_serving(&certs, b_addr).await?;
    b.stop().await?;
    a.stop().await?;

    eprintln!("writing {} records to node A while B is away…", args.missed);
    let workload = Workload::new(args.missed, args.seed ^ 0xca7c);
    let a_dir = root.path().join("node-1");
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let engine = Engine::open(&a_dir, config_engine_options())?;
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

    let a = start_node(config(1, a_addr)).await?;
    wait_serving(&certs, a_addr).await?;
    eprintln!("node B returns and catches up…");
    let started = Instant::now();
    let b = start_node(config(2, b_addr)).await?;
    wait_serving(&certs, b_addr).await?;
    let ready_after = started.elapsed();
    // B is ready once caught up: its cursor on A is at A's end.
    let stats = admin(&certs, b_addr)
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

/// The engine options node A's configuration gives.
fn config_engine_options() -> caskade_node::engine::Options {
    EngineConfig {
        durability: DurabilityMode::Never,
        ..EngineConfig::default()
    }
    .options()
}

async fn channel(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<Channel> {
    let tls = TlsMaterial::load(&certs.client)?;
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.grpc_client("127.0.0.1"))?
        .connect()
        .await?)
}

async fn admin(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(certs, addr).await?))
}

/// Polls the node until it holds the cluster map and reports SERVING (at
/// most ten minutes).
async fn wait_serving(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut health = HealthClient::new(channel(certs, addr).await?);
    let mut admin = admin(certs, addr).await?;
    loop {
        let has_map = admin
            .get_cluster_map(GetClusterMapRequest::default())
            .await
            .is_ok_and(|r| r.get_ref().map.is_some());
        if !has_map {
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the node at {addr} holds no cluster map");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let answer = health
            .check(HealthCheckRequest {
                service: "caskade.v1.Kv".into(),
            })
            .await;
        if answer.is_ok_and(|a| a.get_ref().status == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the node at {addr} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
