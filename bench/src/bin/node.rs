//! caskade-bench-node: puts and gets per second, with latency percentiles,
//! against one storage node over mutual-TLS gRPC, next to the same engine
//! called in process, in one run.
//!
//! The node runs in this process on its own tokio runtime (`--server-threads`
//! workers); the load generator runs on another (`--client-threads`), with
//! `--streams` tasks each issuing one request at a time, spread over
//! `--connections` HTTP/2 connections. Every get is checked against the value
//! written. All data goes to a temporary directory deleted at exit.
//!
//! Run: `cargo run --release -p caskade-bench --bin caskade-bench-node -- [--keys N] [--streams 64]`

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use caskade_bench::drive::{Phase, drive};
use caskade_bench::measure::{self, Throughput};
use caskade_bench::workload::{VALUE_LEN, Workload};
use caskade_common::Version;
use caskade_common::certs::write_cluster_certs;
use caskade_common::tls::{TlsMaterial, install_crypto_provider};
use caskade_node::config::{
    ClusterConfig, DurabilityMode, EngineConfig, MetricsConfig, ServerConfig,
};
use caskade_node::engine::{Durability, Engine, Options, PutOptions};
use caskade_node::{Node, NodeConfig};
use caskade_proto::kv_client::KvClient;
use caskade_proto::{GetRequest, PutRequest};
use clap::Parser;
use prost::bytes::Bytes;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Benchmark one caskade storage node over mutual-TLS gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Number of keys (16 B keys, 100 B values), each put once and read once.
    #[arg(long, default_value_t = 200_000)]
    keys: usize,
    /// Concurrent requests in flight (one task each).
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Worker threads of the node's runtime.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Seed of the keys, values and read order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.keys > 0 && args.streams > 0 && args.connections > 0,
        "counts must be positive"
    );
    install_crypto_provider();
    let workload = Arc::new(Workload::new(args.keys, args.seed));
    let order = Arc::new(workload.read_order());
    let root = tempfile::tempdir().context("creating the temporary directory")?;

    eprintln!("engine in process ({} keys)…", args.keys);
    let (engine_puts, engine_gets) = in_process(&root.path().join("engine"), &workload, &order)?;

    eprintln!(
        "node over mTLS gRPC ({} streams, {} connection(s))…",
        args.streams, args.connections
    );
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .thread_name("node")
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("load")
        .enable_all()
        .build()?;
    let certs = write_cluster_certs(&root.path().join("certs"), 1, &[], false)?;
    let config = NodeConfig {
        id: 1,
        listen: "127.0.0.1:0".parse()?,
        data_dir: root.path().join("node"),
        backup_dir: None,
        tls: certs.nodes[0].clone(),
        engine: EngineConfig {
            durability: DurabilityMode::Never,
            ..EngineConfig::default()
        },
        // A node alone, in no cluster: it serves every key.
        cluster: ClusterConfig {
            standalone: true,
            ..ClusterConfig::default()
        },
        replication: Default::default(),
        server: ServerConfig::default(),
        metrics: MetricsConfig::default(),
        log: Default::default(),
    };
    let node = server.block_on(Node::start(config))?;
    let addr = node.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server.spawn(node.serve(async move {
        let _ = stopped.await;
    }));

    let tls = TlsMaterial::load(&certs.client)?;
    let (ceiling, grpc_puts, grpc_gets) = client.block_on(async {
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let channel = Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls.grpc_client("localhost"))?
                .connect()
                .await?;
            channels.push(channel);
        }
        let ceiling = health_checks(&channels, args.streams, workload.len()).await?;
        let puts = load(&channels, args.streams, &workload, None).await?;
        let gets = load(&channels, args.streams, &workload, Some(&order)).await?;
        anyhow::Ok((ceiling, puts, gets))
    })?;
    let _ = stop.send(());
    server.block_on(serving)??;

    print_report(
        &args,
        &engine_puts,
        &engine_gets,
        &ceiling,
        &grpc_puts,
        &grpc_gets,
    );
    Ok(())
}

/// The engine alone, `never` durability: one thread putting every key, then
/// two threads reading every key.
fn in_process(
    dir: &Path,
    workload: &Workload,
    order: &[u32],
) -> anyhow::Result<(Throughput, Throughput)> {
    let options = Options {
        durability: Durability::Never,
        ..Options::default()
    };
    let engine = Engine::open(dir, options)?;
    let puts = measure::sequential_puts(workload, |i, key, value| {
        let opts = PutOptions {
            version: Version::new(i as u64 + 1, 1),
            ..PutOptions::default()
        };
        engine.put(key, value, opts)?;
        Ok(())
    })?;
    let gets = measure::parallel_gets(2, order, || {
        Ok(|i: usize| workload.check(i, engine.get(workload.key(i))?.map(|v| v.value).as_deref()))
    })?;
    engine.close()?;
    Ok((puts, gets))
}

/// The transport's own ceiling: the same number of requests and streams, each
/// a `grpc.health.v1` check, which touches no storage and does no work.
async fn health_checks(
    channels: &[Channel],
    streams: usize,
    requests: usize,
) -> anyhow::Result<Phase> {
    let clients: Arc<Vec<_>> = Arc::new(channels.iter().cloned().map(HealthClient::new).collect());
    drive(streams, requests, move |n| {
        let mut health = clients[n % clients.len()].clone();
        async move {
            health.check(HealthCheckRequest::default()).await?;
            Ok(())
        }
    })
    .await
}

/// Puts in workload order, or gets in `read_order` (every value checked).
async fn load(
    channels: &[Channel],
    streams: usize,
    workload: &Arc<Workload>,
    read_order: Option<&Arc<Vec<u32>>>,
) -> anyhow::Result<Phase> {
    let clients: Arc<Vec<_>> = Arc::new(channels.iter().cloned().map(KvClient::new).collect());
    let (workload, order) = (Arc::clone(workload), read_order.map(Arc::clone));
    let total = workload.len();
    drive(streams, total, move |n| {
        let mut kv = clients[n % clients.len()].clone();
        let (workload, order) = (Arc::clone(&workload), order.clone());
        async move {
            match order {
                None => {
                    let mut value = [0u8; VALUE_LEN];
                    workload.value_into(n, &mut value);
                    let request = PutRequest {
                        key: Bytes::copy_from_slice(workload.key(n)),
                        value: Bytes::copy_from_slice(&value),
                        ..PutRequest::default()
                    };
                    kv.put(request).await?;
                }
                Some(order) => {
                    let i = order[n] as usize;
                    let request = GetRequest {
                        key: Bytes::copy_from_slice(workload.key(i)),
                        ..GetRequest::default()
                    };
                    let got = kv.get(request).await?.into_inner();
                    if !got.found {
                        bail!("key #{i} is missing");
                    }
                    workload.check(i, Some(&got.value))?;
                }
            }
            Ok(())
        }
    })
    .await
}

fn print_report(
    args: &Args,
    engine_puts: &Throughput,
    engine_gets: &Throughput,
    ceiling: &Phase,
    puts: &Phase,
    gets: &Phase,
) {
    println!(
        "{} keys, 16 B keys, 100 B values; node: `never` durability, {} server / {} client threads; {} streams over {} connection(s)",
        args.keys, args.server_threads, args.client_threads, args.streams, args.connections
    );
    println!();
    println!(
        "| operation | engine in process | node over mTLS gRPC | share of engine | share of transport ceiling | p50 | p99 | p99.9 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| health check (transport ceiling) | — | {:.0}/s | — | 100 % | {:?} | {:?} | {:?} |",
        ceiling.throughput.per_sec(),
        ceiling.at(0.5),
        ceiling.at(0.99),
        ceiling.at(0.999),
    );
    for (name, engine, grpc, engine_threads) in [
        ("puts", engine_puts, puts, "1 thread"),
        ("gets", engine_gets, gets, "2 threads"),
    ] {
        println!(
            "| {name} | {:.0}/s ({engine_threads}) | {:.0}/s | {:.1} % | {:.0} % | {:?} | {:?} | {:?} |",
            engine.per_sec(),
            grpc.throughput.per_sec(),
            100.0 * grpc.throughput.per_sec() / engine.per_sec(),
            100.0 * grpc.throughput.per_sec() / ceiling.throughput.per_sec(),
            grpc.at(0.5),
            grpc.at(0.99),
            grpc.at(0.999),
        );
    }
}
