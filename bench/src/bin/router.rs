//! caskade-bench-router: puts and gets per second, with latency percentiles,
//! through the router over HTTPS (HTTP/2), next to the same operations sent
//! straight to a storage node over mutual-TLS gRPC, in one run against one
//! `caskade local`-style cluster in this process.
//!
//! The direct phase sends every key straight to its primary (the one node
//! that coordinates its writes), as a client that knows the ring would; the
//! router phase sends the same number of keys through the router. Both use `--streams` concurrent requests, one HTTP/2 connection
//! each for the client, and check every value read back.
//!
//! Run: `cargo run --release -p caskade-bench --bin caskade-bench-router -- [--keys N] [--streams 64]`

use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use caskade_bench::drive::{Phase, drive};
use caskade_bench::http::router_phase;
use caskade_bench::workload::{VALUE_LEN, Workload};
use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_common::Ring;
use caskade_common::tls::{TlsMaterial, install_crypto_provider};
use caskade_node::config::{DurabilityMode, EngineConfig};
use caskade_proto::admin_client::AdminClient;
use caskade_proto::kv_client::KvClient;
use caskade_proto::{GetClusterMapRequest, GetRequest, PutRequest, StatsRequest};
use caskade_router::config::{LimitsConfig, NodePolicy};
use clap::Parser;
use prost::bytes::Bytes;
use tonic::transport::Endpoint;

/// Benchmark the router against direct gRPC to a node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Keys (16 B keys, 100 B values) per phase, each put once and read once.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Seed of the keys, values and read order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.keys > 0 && args.streams > 0, "counts must be positive");
    install_crypto_provider();
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
        replication_factor: None,
        router_limits: LimitsConfig::default(),
        router_metrics_listen: None,
    })
    .await?;
    // Two disjoint key sets, so that no phase overwrites the other's keys.
    let direct_keys = Arc::new(Workload::new(args.keys, args.seed));
    let router_keys = Arc::new(Workload::new(args.keys, args.seed ^ 0x5eed));

    wait_ready(&cluster).await?;
    eprintln!(
        "direct gRPC to each key's primary ({} keys, {} streams)…",
        args.keys, args.streams
    );
    let tls = TlsMaterial::load(&cluster.certs.client)?;
    let mut nodes = Vec::new();
    for addr in &cluster.node_addrs {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.grpc_client("127.0.0.1"))?
            .connect()
            .await?;
        nodes.push(channel);
    }
    let primaries = Primaries::of(&nodes).await?;
    let direct_puts = grpc_phase(&primaries, args.streams, &direct_keys, false).await?;
    let direct_gets = grpc_phase(&primaries, args.streams, &direct_keys, true).await?;

    eprintln!(
        "router over HTTPS/2 ({} keys, {} streams)…",
        args.keys, args.streams
    );
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
    let router_puts = router_phase(&base, args.streams, &router_keys, false, "").await?;
    let router_gets = router_phase(&base, args.streams, &router_keys, true, "").await?;
    cluster.stop().await?;

    println!(
        "{} keys per phase, 16 B keys, 100 B values; 3 nodes (`never` durability) and the router in one process; {} streams",
        args.keys, args.streams
    );
    println!();
    println!(
        "| operation | direct gRPC to a node | through the router (HTTPS, HTTP/2) | router share | p50 direct / router | p99 direct / router |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, direct, router) in [
        ("puts", &direct_puts, &router_puts),
        ("gets", &direct_gets, &router_gets),
    ] {
        println!(
            "| {name} | {:.0}/s | {:.0}/s | {:.0} % | {:?} / {:?} | {:?} / {:?} |",
            direct.throughput.per_sec(),
            router.throughput.per_sec(),
            100.0 * router.throughput.per_sec() / direct.throughput.per_sec(),
            direct.at(0.5),
            router.at(0.5),
            direct.at(0.99),
            router.at(0.99),
        );
    }
    Ok(())
}

/// A client per node, and the ring that tells each key's primary.
#[derive(Clone)]
struct Primaries {
    clients: Arc<Vec<KvClient<tonic::transport::Channel>>>,
    ring: Arc<Ring>,
}

impl Primaries {
    /// Clients over `channels` (node `id` at index `id - 1`), with the ring
    /// of the map node 1 holds.
    async fn of(channels: &[tonic::transport::Channel]) -> anyhow::Result<Primaries> {
        let first = channels.first().context("no node")?;
        let map = AdminClient::new(first.clone())
            .get_cluster_map(GetClusterMapRequest::default())
            .await?
            .into_inner()
            .map
            .context("node 1 has no cluster map")?;
        ensure!(
            map.nodes.iter().all(|n| !n.down),
            "a node is marked down: {map:?}"
        );
        Ok(Primaries {
            clients: Arc::new(channels.iter().cloned().map(KvClient::new).collect()),
            ring: Arc::new(Ring::new(
                &map.ring_members(),
                map.vnodes_per_node,
                map.replication_factor,
            )),
        })
    }

    /// The client of `key`'s primary.
    fn client(&self, key: &[u8]) -> anyhow::Result<KvClient<tonic::transport::Channel>> {
        let primary = *self
            .ring
            .preference_list(key)
            .first()
            .context("empty ring")?;
        self.clients
            .get(primary as usize - 1)
            .cloned()
            .with_context(|| format!("no client for node {primary}"))
    }
}

async fn grpc_phase(
    primaries: &Primaries,
    streams: usize,
    workload: &Arc<Workload>,
    gets: bool,
) -> anyhow::Result<Phase> {
    let (primaries, workload) = (primaries.clone(), Arc::clone(workload));
    let order = Arc::new(workload.read_order());
    drive(streams, workload.len(), move |n| {
        let (primaries, workload, order) =
            (primaries.clone(), Arc::clone(&workload), Arc::clone(&order));
        async move {
            if gets {
                let i = order[n] as usize;
                let mut kv = primaries.client(workload.key(i))?;
                let request = GetRequest {
                    key: Bytes::copy_from_slice(workload.key(i)),
                    ..GetRequest::default()
                };
                let got = kv.get(request).await?.into_inner();
                if !got.found {
                    bail!("key #{i} is missing");
                }
                workload.check(i, Some(&got.value))?;
            } else {
                let mut value = [0u8; VALUE_LEN];
                workload.value_into(n, &mut value);
                let request = PutRequest {
                    key: Bytes::copy_from_slice(workload.key(n)),
                    value: Bytes::copy_from_slice(&value),
                    ..PutRequest::default()
                };
                primaries.client(workload.key(n))?.put(request).await?;
            }
            Ok(())
        }
    })
    .await
}

/// Waits (bounded) until the router has a map and ready nodes, and every
/// node has taken over the ranges it is the primary of.
async fn wait_ready(cluster: &LocalCluster) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(
            &cluster.certs.ca,
        )?)?])
        .build()?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ready = client.get(format!("{}/readyz", cluster.url)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) && taken_over(cluster).await {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the router did not become ready in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Whether every node says it has taken over its primary ranges.
async fn taken_over(cluster: &LocalCluster) -> bool {
    let Ok(tls) = TlsMaterial::load(&cluster.certs.client) else {
        return false;
    };
    for addr in &cluster.node_addrs {
        let Ok(endpoint) = Endpoint::from_shared(format!("https://{addr}")) else {
            return false;
        };
        let Ok(endpoint) = endpoint.tls_config(tls.grpc_client("127.0.0.1")) else {
            return false;
        };
        let Ok(channel) = endpoint.connect().await else {
            return false;
        };
        match AdminClient::new(channel).stats(StatsRequest {}).await {
            Ok(stats) if stats.get_ref().taking_over_epoch == 0 => {}
            _ => return false,
        }
    }
    true
}
