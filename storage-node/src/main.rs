//! `caskade-node`: runs one storage node from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use caskade_common::process::run_server;
use caskade_node::NodeConfig;
use clap::Parser;

/// A caskade storage node: Bitcask storage served over mutual-TLS gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; `CASKADE_NODE_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = NodeConfig::load(args.config.as_deref());
    run_server("caskade-node", config, |c| &c.log, caskade_node::run).await
}
