//! `caskade-router`: runs one router from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use caskade_common::{telemetry, tls};
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
    let config = match RouterConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("caskade-router: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init_logging(&config.log) {
        eprintln!("caskade-router: {e}");
        return ExitCode::from(2);
    }
    tls::install_crypto_provider();
    match caskade_router::run(config, telemetry::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "router failed");
            eprintln!("caskade-router: {e}");
            ExitCode::FAILURE
        }
    }
}
