//! `caskade`: the command-line tool for caskade clusters.
//!
//! Subcommands: `local` (a whole cluster in this process), `token` (sign a
//! JWT), `certs` (a cluster CA and certificates), the client commands
//! `put`, `get`, `del`, `ls`, the admin commands `nodes` and `status`, and
//! `health` (for container health checks).
//! Each lives in its own
//! module of the library; this file only parses and dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_cli::{admin, certs, client, health, token};
use caskade_common::config::LogConfig;
use caskade_common::telemetry;
use caskade_node::config::EngineConfig;
use caskade_router::config::{LimitsConfig, NodePolicy};
use clap::{Args, Parser, Subcommand};

/// caskade: a distributed key-value store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Router connection of the client commands.
    #[command(flatten)]
    connection: client::Connection,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run three storage nodes and a router in this process.
    Local(LocalArgs),
    /// Print a signed JWT for the router.
    Token(token::TokenArgs),
    /// Generate a cluster CA and certificates for nodes, the router and a client.
    Certs(certs::CertsArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
    #[command(flatten)]
    Admin(admin::AdminCommand),
    /// Exit 0 if the router (or `--node`) serves: a container health check.
    Health(health::HealthArgs),
}

#[derive(Debug, Args)]
struct LocalArgs {
    /// Where certificates, the JWT secret, the admin token and data are kept.
    #[arg(long, default_value = "./caskade-data")]
    data_dir: PathBuf,
    /// The router's HTTPS address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=32))]
    nodes: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local(args) => local(args),
        Command::Token(args) => token::run(&args),
        Command::Certs(args) => certs::run(&args),
        Command::Client(command) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(client::run(&cli.connection, command))),
        Command::Health(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(health::run(&cli.connection, &args))),
        Command::Admin(command) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                let mut out = std::io::stdout().lock();
                runtime.block_on(admin::run(&cli.connection, command, &mut out))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caskade: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn local(args: LocalArgs) -> anyhow::Result<()> {
    telemetry::init_logging(&LogConfig::default()).map_err(anyhow::Error::msg)?;
    caskade_common::tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let cluster = LocalCluster::start(LocalOptions {
            data_dir: args.data_dir.clone(),
            listen: args.listen,
            nodes: args.nodes,
            engine: EngineConfig::default(),
            node_policy: NodePolicy::default(),
            replication_factor: None,
            router_limits: LimitsConfig::default(),
            router_metrics_listen: None,
        })
        .await?;
        let ca = cluster.certs.ca.display();
        let token_file = args.data_dir.join("admin.token");
        println!();
        println!("caskade is running: {} nodes, router at {}", args.nodes, cluster.url);
        println!("  CA certificate: {ca}");
        println!("  admin token (24 h, also in {}):", token_file.display());
        println!("    {}", cluster.admin_token);
        println!();
        println!("Try:");
        println!(
            "  curl --cacert {ca} -H \"Authorization: Bearer $(cat {})\" -X PUT --data-binary 'hello' {}/v1/kv/greeting",
            token_file.display(),
            cluster.url
        );
        println!(
            "  curl --cacert {ca} -H \"Authorization: Bearer $(cat {})\" {}/v1/kv/greeting",
            token_file.display(),
            cluster.url
        );
        println!("The cluster map, each node's readiness and its replication lag:");
        println!(
            "  curl --cacert {ca} -H \"Authorization: Bearer $(cat {})\" {}/admin/v1/cluster",
            token_file.display(),
            cluster.url
        );
        println!();
        println!("Ctrl-C stops it; data stays in {}.", args.data_dir.display());
        telemetry::shutdown_signal().await;
        tracing::info!("stopping");
        cluster.stop().await
    })
}
