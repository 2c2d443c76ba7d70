//! The router's configuration file (`caskade-router --config router.toml`)
//! and its environment overrides (`CASKADE_ROUTER_…`, `__` between nested
//! keys). Defaults are documented on each field and in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_body_bytes: 8 << 20,
            max_batch_ops: 1000,
            max_header_bytes: 16 << 10,
            max_connections: 10_000,
        }
    }
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
