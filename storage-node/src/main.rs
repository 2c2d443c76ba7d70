//! `caskade-node`: runs one storage node from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;

use caskade_common::{telemetry, tls};
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
    let config = match NodeConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("caskade-node: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init_logging(&config.log) {
        eprintln!("caskade-node: {e}");
        return ExitCode::from(2);
    }
    tls::install_crypto_provider();
    match caskade_node::run(config, telemetry::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("caskade-node: {e}");
            ExitCode::FAILURE
        }
    }
}
