//! caskade-router: the stateless HTTPS front of a caskade cluster.
//!
//! A request passes, in order: [`server`] (TLS, HTTP/1.1 or HTTP/2, connection
//! limit, timeouts, idle connections closed by `idle`) → [`app`] (request id,
//! metrics, the body's deadline from `request_body`, route table) → a handler in [`kv`]
//! that authenticates with [`auth`], validates with [`params`], and sends the
//! request with [`forward`] (or, for `r=quorum`, [`quorum`]) to the key's replicas, found on the ring of the
//! [`cluster`] view, each behind its [`nodes`] stack of timeout,
//! [`breaker`] and concurrency limit. [`error`] is the one table from
//! failures to HTTP statuses.

pub mod admin;
pub mod app;
pub mod auth;
pub mod breaker;
pub mod cluster;
pub mod config;
pub mod error;
pub mod forward;
pub mod idempotency;
pub mod kv;
pub mod listing;
pub mod membership;
pub mod nodes;
pub mod params;
pub mod quorum;
pub mod server;

mod idle;
mod linger;
mod request_body;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use caskade_common::telemetry;
use caskade_common::tls::{TlsError, TlsMaterial, install_crypto_provider};
use tokio::net::TcpListener;

use crate::app::{AppState, Shared};
use crate::auth::{AuthConfigError, Authenticator};
use crate::cluster::Cluster;
pub use crate::config::RouterConfig;

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A setting out of its range, or settings that contradict each other.
    #[error(transparent)]
    Config(#[from] caskade_common::config::ConfigError),
    /// TLS files missing, unreadable or not matching.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// JWT keys missing or unusable.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// A listener could not be bound.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How long open connections may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Most connections to the `/metrics` listener at once: one scraper needs one.
pub const METRICS_MAX_CONNECTIONS: usize = 16;

/// How long a connection to the `/metrics` listener may stay idle, or take
/// to send a request's headers: short, so that a few silent connections
/// cannot lock the scraper out for long (one that reconnects as fast as it
/// is closed can; see the README).
pub const METRICS_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A started router: listeners bound, not yet serving.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    listener: TcpListener,
    /// The plain-HTTP `/metrics` listener, when `metrics.listen` is set.
    metrics: Option<TcpListener>,
    https: Option<Arc<rustls::ServerConfig>>,
    state: AppState,
    cluster: Arc<Cluster>,
}

impl Router {
    /// Loads keys and certificates and binds the listeners.
    pub async fn start(config: RouterConfig) -> Result<Router, RouterError> {
        // A configuration built in code has not been through `load`.
        config.validate()?;
        install_crypto_provider();
        telemetry::metrics_handle();
        let node_tls = TlsMaterial::load(&config.node_tls)?;
        let https = match &config.https {
            Some(files) => {
                let material = TlsMaterial::load(&caskade_common::config::TlsFiles {
                    ca: config.node_tls.ca.clone(),
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                })?;
                let mut server = material.server_config(false)?;
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(Arc::new(server))
            }
            None => None,
        };
        let auth = Authenticator::new(&config.auth)?;
        let cluster = Arc::new(Cluster::new(
            config.seeds.clone(),
            node_tls,
            config.nodes.clone(),
            config.limits.max_value_bytes,
        ));
        let state = AppState::new(Shared {
            cluster: Arc::clone(&cluster),
            auth,
            limits: config.limits.clone(),
            idempotency: idempotency::IdempotencyStore::new(&config.idempotency),
        });
        let listener = telemetry::bind(config.listen, "HTTPS").await?;
        let metrics = match config.metrics.listen {
            Some(addr) => Some(telemetry::bind(addr, "metrics").await?),
            None => None,
        };
        Ok(Router {
            config,
            listener,
            metrics,
            https,
            state,
            cluster,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The address of the `/metrics` listener, if one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops gracefully.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RouterError> {
        let Router {
            config,
            listener,
            metrics,
            https,
            state,
            cluster,
        } = self;
        // Everything that can fail, before anything is started.
        let addr = listener.local_addr()?;
        let metrics: Option<(TcpListener, SocketAddr)> = metrics
            .map(|listener| listener.local_addr().map(|addr| (listener, addr)))
            .transpose()?;
        if https.is_none() {
            tracing::warn!(
                "serving plain HTTP (insecure_http = true): tokens and values travel unencrypted"
            );
        }
        // One round before the first request: without it, requests in the
        // first health interval would see every node as not ready and
        // could be sent to a secondary while the primary is fine (and,
        // until replication exists, not be found there afterwards).
        cluster.refresh().await;
        cluster.check_health().await;
        // The only task of its own; a JoinSet aborts it when dropped, so
        // it ends with this future however it ends.
        let mut maintenance = tokio::task::JoinSet::new();
        maintenance.spawn(Arc::clone(&cluster).maintain());

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        // Tells both listeners to stop; run alongside them, not spawned.
        let fan_out = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let scheme = if https.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "router serving");
        let app = app::routes(state, metrics.is_none());
        let https_server = server::serve(
            listener,
            https,
            app,
            &config.limits,
            SHUTDOWN_GRACE,
            until_stopped(),
        );
        // The metrics listener is plain HTTP, for the monitoring network,
        // with few connections and short timeouts: a handful of silent
        // sockets must not lock the scraper out for long. A client that
        // keeps reconnecting can still keep every slot taken; only binding
        // the monitoring network's address keeps such clients away.
        let metrics_limits = config::LimitsConfig {
            max_connections: METRICS_MAX_CONNECTIONS,
            idle_timeout_ms: METRICS_IDLE_TIMEOUT.as_millis() as u64,
            header_timeout_ms: METRICS_IDLE_TIMEOUT.as_millis() as u64,
            ..config.limits.clone()
        };
        let metrics_server = async {
            if let Some((listener, addr)) = metrics {
                tracing::info!(%addr, "router metrics serving");
                let app = app::metrics_routes();
                server::serve(
                    listener,
                    None,
                    app,
                    &metrics_limits,
                    SHUTDOWN_GRACE,
                    until_stopped(),
                )
                .await;
            }
        };
        tokio::join!(fan_out, https_server, metrics_server);
        maintenance.abort_all();
        tracing::info!("router stopped");
        Ok(())
    }
}

/// Starts a router from `config` and serves until `shutdown` resolves.
pub async fn run(
    config: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    Router::start(config).await?.serve(shutdown).await
}

/// The caskade router: HTTPS REST API in front of the storage nodes.
#[derive(Debug, clap::Parser)]
#[command(name = "caskade-router", version)]
struct Args {
    /// TOML configuration file; `CASKADE_ROUTER_*` environment variables override it.
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
}

/// The `caskade-router` command: parses its flags, loads the configuration
/// and runs the router until SIGTERM or Ctrl-C.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("caskade-router: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let config = RouterConfig::load(args.config.as_deref());
        caskade_common::process::run_server("caskade-router", config, |c| &c.log, run).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose files do not exist: starting it fails at the
    /// first thing it checks.
    fn config(limits: config::LimitsConfig) -> RouterConfig {
        let missing = std::path::PathBuf::from("/nonexistent/caskade");
        RouterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            https: None,
            insecure_http: true,
            node_tls: caskade_common::config::TlsFiles {
                ca: missing.join("ca.pem"),
                cert: missing.join("router.pem"),
                key: missing.join("router-key.pem"),
            },
            seeds: vec!["127.0.0.1:1".to_string()],
            auth: auth::AuthConfig::default(),
            limits,
            nodes: config::NodePolicy::default(),
            idempotency: config::IdempotencyConfig::default(),
            metrics: config::MetricsConfig::default(),
            log: caskade_common::config::LogConfig::default(),
        }
    }

    #[tokio::test]
    async fn a_configuration_built_in_code_is_validated_at_start() {
        let limits = config::LimitsConfig {
            body_timeout_ms: u64::MAX,
            ..config::LimitsConfig::default()
        };
        match Router::start(config(limits)).await {
            Err(RouterError::Config(error)) => {
                assert!(error.to_string().contains("body_timeout_ms"), "{error}");
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("started with a body timeout of u64::MAX ms"),
        }
    }
}
