//! `caskade-router`: runs one router from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use caskade_common::process::run_server;
use caskade_router::RouterConfig;
use clap::Parser;

/// The caskade router: HTTPS REST API in front of the storage nodes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; `CASKADE_ROUTER_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = RouterConfig::load(args.config.as_deref());
    run_server("caskade-router", config, |c| &c.log, caskade_router::run).await
}
