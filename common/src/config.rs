//! Loading a process's configuration: one TOML file, then environment
//! overrides, into a typed struct whose defaults are documented on its fields.
//!
//! Each process has its own environment prefix (`CASKADE_NODE_`,
//! `CASKADE_ROUTER_`), and a double underscore separates nested keys:
//! `CASKADE_NODE_ENGINE__DURABILITY=never` sets `engine.durability`. The
//! structs refuse unknown fields, so a typo is an error that names the field
//! instead of a setting silently ignored. This module never reads anything
//! but the file and the environment it is given.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// A configuration that could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist.
    #[error("config file {0} not found")]
    NotFound(PathBuf),
    /// A field is missing, unknown or has the wrong type; the message names it
    /// and where its value came from (file or environment variable).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from the TOML file at `path` (if given), then from environment
/// variables starting with `env_prefix`, later sources overriding earlier ones.
pub fn load<T: DeserializeOwned>(path: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::NotFound(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(Env::prefixed(env_prefix).split("__"))
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(e)))
}

/// figment reports each error with the key path and its source; keep all of them.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Log output, shared by every caskade process (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default; for a terminal) or `json` (one object per line, for collectors).
    pub format: LogFormat,
    /// A `tracing` filter such as `info` (default) or `caskade_node=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Certificate files for mutual TLS (`[tls]`); all PEM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA; peers must present a certificate that chains to it.
    pub ca: PathBuf,
    /// This process's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This process's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Checks that `addr` is a node address, `host:port` with a port from 1 to
/// 65535, usable as the authority of the `https://` URI its channels use.
pub fn validate_addr(addr: &str) -> Result<(), String> {
    let port = addr
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && host != &"[]")
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|&port| port != 0);
    // The address becomes the authority of an `https://` URI for the
    // nodes' and routers' channels: it must parse as exactly that.
    let whole = addr
        .parse::<http::uri::Authority>()
        .is_ok_and(|a| a.as_str() == addr && a.port_u16().is_some());
    if port.is_none() || !whole || addr.contains('@') {
        return Err(format!(
            "`{addr}` is not host:port with a port from 1 to 65535"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        #[serde(default)]
        log: LogConfig,
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("sample.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn file_values_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "name = \"a\"\n[log]\nformat = \"json\"\n");
        let sample: Sample = load(Some(&path), "CASKADE_CONFIG_TEST_A_").unwrap();
        assert_eq!(sample.name, "a");
        assert_eq!(sample.log.format, LogFormat::Json);
        assert_eq!(sample.log.level, "info");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "name = \"a\"\n");
        figment::Jail::expect_with(|jail| {
            jail.set_env("CASKADE_CONFIG_TEST_B_NAME", "b");
            jail.set_env("CASKADE_CONFIG_TEST_B_LOG__LEVEL", "debug");
            let sample: Sample = load(Some(&path), "CASKADE_CONFIG_TEST_B_").unwrap();
            assert_eq!(sample.name, "b");
            assert_eq!(sample.log.level, "debug");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let missing = write(dir.path(), "[log]\nlevel = \"info\"\n");
        let err = load::<Sample>(Some(&missing), "CASKADE_CONFIG_TEST_C_").unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");

        let typo = write(dir.path(), "name = \"a\"\n[log]\nformat = \"xml\"\n");
        let err = load::<Sample>(Some(&typo), "CASKADE_CONFIG_TEST_C_").unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");

        let unknown = write(dir.path(), "name = \"a\"\nnmae = \"b\"\n");
        let err = load::<Sample>(Some(&unknown), "CASKADE_CONFIG_TEST_C_").unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");

        let err = load::<Sample>(Some(&dir.path().join("absent.toml")), "X_").unwrap_err();
        assert!(matches!(err, ConfigError::NotFound(_)), "{err}");
    }
}
