//! The router's configuration file (`caskade-router --config router.toml`)
//! and its environment overrides (`CASKADE_ROUTER_…`, `__` between nested
//! keys). Defaults are documented on each field and in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caskade_common::config::{self, ConfigError, LogConfig, TlsFiles};
use caskade_common::limits::DEFAULT_MAX_VALUE_BYTES;
use serde::Deserialize;

use crate::auth::AuthConfig;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CASKADE_ROUTER_";

/// The router's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// HTTPS listen address (default `127.0.0.1:8443`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The HTTPS certificate and key; required unless `insecure_http`.
    #[serde(default)]
    pub https: Option<HttpsFiles>,
    /// Serve plain HTTP instead of HTTPS (default false). Only for a
    /// loopback test or behind a TLS-terminating proxy; logs a warning.
    #[serde(default)]
    pub insecure_http: bool,
    /// Mutual TLS towards the nodes: the cluster CA and the router's client
    /// certificate. Required.
    pub node_tls: TlsFiles,
    /// Storage nodes to fetch the cluster map from (`host:port`). Required.
    pub seeds: Vec<String>,
    /// JWT verification.
    pub auth: AuthConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-node resilience.
    #[serde(default)]
    pub nodes: NodePolicy,
    /// Idempotency keys.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// Where `GET /metrics` is served.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

impl RouterConfig {
    /// Loads `path` (if any) and the `CASKADE_ROUTER_` environment.
    pub fn load(path: Option<&Path>) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = config::load(path, ENV_PREFIX)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: &str| Err(ConfigError::Invalid(message.to_string()));
        if self.https.is_none() && !self.insecure_http {
            return invalid("https: required unless insecure_http = true");
        }
        if self.seeds.is_empty() {
            return invalid("seeds: at least one storage node address is required");
        }
        if self.limits.max_batch_ops == 0 || self.limits.max_batch_ops > 1000 {
            return invalid("limits.max_batch_ops: must be between 1 and 1000");
        }
        if self.nodes.timeout_ms == 0 {
            return invalid("nodes.timeout_ms: must be positive");
        }
        self.limits.validate()
    }
}

/// Longest accepted connection or request timeout: a day. Longer ones are
/// a typo, and an unbounded one would overflow the clock's arithmetic.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl LimitsConfig {
    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `header_timeout_ms` as a duration.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// `body_timeout_ms` as a duration.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let timeouts = [
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            ("limits.header_timeout_ms", self.header_timeout_ms),
            ("limits.body_timeout_ms", self.body_timeout_ms),
        ];
        for (name, ms) in timeouts {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(ConfigError::Invalid(format!(
                    "{name}: must be between 1 and {MAX_TIMEOUT_MS} (a day)"
                )));
            }
        }
        let positive = [
            ("limits.body_min_bytes_per_sec", self.body_min_bytes_per_sec),
            ("limits.max_connections", self.max_connections as u64),
            (
                "limits.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name}: must be positive")));
            }
        }
        Ok(())
    }
}

/// `[https]`: the router's server certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// `[limits]`: what one request may carry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest value (default 1 MiB; must not exceed the nodes' `max_value_bytes`).
    pub max_value_bytes: usize,
    /// Largest request body (default 8 MiB); a batch must fit in it.
    pub max_body_bytes: usize,
    /// Most operations in one batch (default and maximum 1000).
    pub max_batch_ops: usize,
    /// Largest total size of a request's headers (default 16 KiB).
    pub max_header_bytes: usize,
    /// Most open client connections (default 10,000); more wait to be accepted.
    pub max_connections: usize,
    /// Most concurrent requests (streams) on one HTTP/2 connection (default 200).
    pub max_concurrent_streams: u32,
    /// A client connection idle for this long is closed, ms (default
    /// 60,000): one with an answer of which its client has taken no piece
    /// (16 KiB) for this long, whatever else it does (each answer is timed
    /// on its own); and one that, with no request being handled, does
    /// nothing at all for this long (before its first request, between
    /// HTTP/1.1 requests, an HTTP/2 connection with no open stream). It
    /// ends the whole connection, requests being handled on it included
    /// (see the README on HTTP/2 proxies). A connection asked to close
    /// that then stays idle for this long again (at least 1 s, at most
    /// 5 s) is dropped.
    pub idle_timeout_ms: u64,
    /// How long an HTTP/1.1 client may take to send a request's headers, ms
    /// (default 10,000), counted from the connection's first byte or from
    /// the end of the previous answer: an idle HTTP/1.1 keep-alive
    /// connection is closed after the shorter of this and `idle_timeout_ms`.
    pub header_timeout_ms: u64,
    /// How long a client may take to send a request body, ms (default
    /// 10,000), plus one second for every `body_min_bytes_per_sec` bytes
    /// received; and the longest it may go without sending a byte of it.
    /// Past either the router answers 408 and closes the connection
    /// (HTTP/1.1) or the stream (HTTP/2).
    pub body_timeout_ms: u64,
    /// The slowest body upload the router waits for, bytes per second
    /// (default 1,024), per request: over HTTP/2 each stream needs it.
    pub body_min_bytes_per_sec: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_body_bytes: 8 << 20,
            max_batch_ops: 1000,
            max_header_bytes: 16 << 10,
            max_connections: 10_000,
            max_concurrent_streams: 200,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            body_min_bytes_per_sec: 1 << 10,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of a plain-HTTP listener serving only `GET /metrics`
    /// (default: none, and `/metrics` is served on the HTTPS listener).
    /// When set, the HTTPS listener no longer serves `/metrics`.
    pub listen: Option<SocketAddr>,
}

/// `[nodes]`: how the router treats each storage node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodePolicy {
    /// Deadline of one request to a node (default 2,000 ms); past it the
    /// router answers 504 (or tries the next replica for a read).
    pub timeout_ms: u64,
    /// Requests in flight to one node before the router sheds load with 429 (default 256).
    pub max_in_flight: usize,
    /// Circuit breaker: failure ratio over the window that opens it (default 0.5)…
    pub breaker_failure_ratio: f64,
    /// …once the window holds at least this many calls (default 20).
    pub breaker_min_calls: u32,
    /// Length of the sliding window, ms (default 10,000).
    pub breaker_window_ms: u64,
    /// How long an open breaker waits before letting a probe through, ms (default 5,000).
    pub breaker_open_ms: u64,
    /// Interval of active readiness checks, ms (default 1,000).
    pub health_interval_ms: u64,
}

impl Default for NodePolicy {
    fn default() -> Self {
        NodePolicy {
            timeout_ms: 2_000,
            max_in_flight: 256,
            breaker_failure_ratio: 0.5,
            breaker_min_calls: 20,
            breaker_window_ms: 10_000,
            breaker_open_ms: 5_000,
            health_interval_ms: 1_000,
        }
    }
}

/// `[idempotency]`: replayed writes with the same `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long a key's first answer is kept, seconds (default 600).
    pub window_secs: u64,
    /// Most keys remembered at once; the oldest are forgotten first (default 100,000).
    pub max_keys: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            window_secs: 600,
            max_keys: 100_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "insecure_http = true\nseeds = [\"n1:7001\"]\n\
        [node_tls]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r-key.pem\"\n\
        [auth]\nhs256 = [{ path = \"jwt-secret\" }]\n";

    fn load(extra: &str) -> Result<RouterConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("router.toml");
        std::fs::write(&path, format!("{MINIMAL}{extra}")).expect("write");
        RouterConfig::load(Some(&path))
    }

    #[test]
    fn connection_limits_have_the_documented_defaults() {
        let config = load("").expect("a minimal file loads");
        let limits = &config.limits;
        assert_eq!(limits.max_connections, 10_000);
        assert_eq!(limits.max_concurrent_streams, 200);
        assert_eq!(limits.idle_timeout(), Duration::from_secs(60));
        assert_eq!(limits.header_timeout(), Duration::from_secs(10));
        assert_eq!(limits.body_timeout(), Duration::from_secs(10));
        assert_eq!(limits.body_min_bytes_per_sec, 1_024);
        assert_eq!(config.metrics.listen, None);

        let config = load("[metrics]\nlisten = \"127.0.0.1:9464\"\n").expect("loads");
        assert_eq!(config.metrics.listen, Some(([127, 0, 0, 1], 9464).into()));
    }

    #[test]
    fn zero_and_huge_connection_limits_are_refused_by_name() {
        let cases = [
            ("idle_timeout_ms = 0", "limits.idle_timeout_ms"),
            ("header_timeout_ms = 0", "limits.header_timeout_ms"),
            ("body_timeout_ms = 0", "limits.body_timeout_ms"),
            ("idle_timeout_ms = 86400001", "limits.idle_timeout_ms"),
            (
                "body_timeout_ms = 9223372036854775807",
                "limits.body_timeout_ms",
            ),
            (
                "body_min_bytes_per_sec = 0",
                "limits.body_min_bytes_per_sec",
            ),
            ("max_connections = 0", "limits.max_connections"),
            (
                "max_concurrent_streams = 0",
                "limits.max_concurrent_streams",
            ),
        ];
        for (line, name) in cases {
            let error = load(&format!("[limits]\n{line}\n")).expect_err(line);
            assert!(error.to_string().contains(name), "{line}: {error}");
        }
        assert!(load("[limits]\nidle_timeout_ms = 86400000\n").is_ok());
    }
}
