//! Logs, request ids and Prometheus metrics, the same way in every caskade
//! process.
//!
//! Logging and the metrics recorder are process-global (a `tracing`
//! subscriber and a `metrics` recorder); both are installed at most once, so
//! several servers in one process (`caskade local`, tests) share them and
//! tell their series apart by labels. The `/metrics` listener only renders;
//! it never blocks on a server's locks beyond the `refresh` hook it is given.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The gRPC metadata key / HTTP header that carries a request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Latency buckets, in seconds, for every `*_seconds` histogram: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Directives added to `log.level`: the Raft library logs every election
/// step at INFO and WARN; caskade logs what an operator needs of them.
const QUIET_DEPENDENCIES: &str = "openraft=error";

/// Installs the process's log subscriber. Later calls (another server in the
/// same process) keep the first one. `RUST_LOG`, when set, overrides `level`.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(format!("{},{QUIET_DEPENDENCIES}", config.level)),
    }
    .map_err(|e| format!("log.level {:?}: {e}", config.level))?;
    // A line that cannot be written (the disk under the log is full) is
    // dropped: the library's fallback would print its own error to the same
    // stderr, and `eprintln!` panics when that fails too, killing whichever
    // task was logging.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    // Err means a subscriber is already installed; keep it.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    Ok(())
}

/// The caller's request id if it sent a usable one, else a new random one.
pub fn request_id(from_caller: Option<&str>) -> String {
    match from_caller {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_string()
        }
        _ => new_request_id(),
    }
}

/// A new request id: 64 random bits in hex.
pub fn new_request_id() -> String {
    random_hex_id()
}

/// 64 random bits in hex, for ids that must not collide (not for secrets).
/// `RandomState` is seeded from the OS per instance.
pub fn random_hex_id() -> String {
    let hasher = std::collections::hash_map::RandomState::new().build_hasher();
    format!("{:016x}", hasher.finish())
}

/// How long a gauge may go without an update before it leaves the
/// exported metrics: the series of a node or peer that left the cluster
/// then ends instead of repeating its last value (a lag, a readiness of 0)
/// for ever. Every gauge of a live node or peer is set at least at every
/// scrape or health check, and none may be held as a handle across idle
/// periods (its updates would go to a series no longer exported).
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The process's Prometheus recorder, installed on first use. Every
/// `*_seconds` histogram gets [`LATENCY_BUCKETS`].
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("the bucket list is a non-empty constant")
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is already global (a test harness); render
                // from a private one rather than fail the server.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Called before each scrape so servers can publish gauges read from their state.
pub type RefreshHook = Arc<dyn Fn() + Send + Sync>;

/// Serves `GET /metrics` (Prometheus text) on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    refresh: RefreshHook,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = metrics_handle();
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            let refresh = Arc::clone(&refresh);
            async move {
                refresh();
                handle.render()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM: the shutdown signal of every caskade binary.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding {what} listener on {addr}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_replaced() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        let fresh = request_id(None);
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, request_id(None));
        assert_ne!(request_id(Some("")), "");
        assert_ne!(request_id(Some("has space")), "has space");
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert_ne!(request_id(Some(&long)), long);
    }
}
