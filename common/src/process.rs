//! The life of a caskade server process, the same for every binary: load the
//! configuration, start logging and the crypto provider, serve until Ctrl-C
//! or SIGTERM, and turn the outcome into an exit status (2 for a bad
//! configuration, 1 for a failure while serving).

use std::fmt::Display;
use std::process::ExitCode;

use crate::config::{ConfigError, LogConfig};
use crate::{telemetry, tls};

/// Runs a server named `name` from `config`: `log` picks its log settings,
/// `serve` runs it until the shutdown future it is given resolves.
pub async fn run_server<C, E, F, Fut>(
    name: &str,
    config: Result<C, ConfigError>,
    log: impl Fn(&C) -> &LogConfig,
    serve: F,
) -> ExitCode
where
    E: Display,
    F: FnOnce(C, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init_logging(log(&config)) {
        eprintln!("{name}: {e}");
        return ExitCode::from(2);
    }
    tls::install_crypto_provider();
    match serve(config, Box::pin(telemetry::shutdown_signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{name} failed");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
