//! The storage node's configuration file (`caskade-node --config node.toml`)
//! and its environment overrides (`CASKADE_NODE_…`, `__` between nested keys).
//!
//! Every field is documented with its default here and in the README's
//! configuration reference; the two must say the same. Unknown fields are
//! errors. This module only describes and validates; it opens nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caskade_common::config::{self, ConfigError, LogConfig, TlsFiles};
use caskade_common::limits::DEFAULT_MAX_VALUE_BYTES;
use serde::Deserialize;

use crate::engine::{Durability, MergeOptions, Options};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CASKADE_NODE_";

/// A storage node's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Numeric node id, unique in the cluster and never reused; it is the
    /// `origin` of every version this node assigns. Required.
    pub id: u32,
    /// gRPC listen address (default `127.0.0.1:7001`; port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the data files; created if missing. Required.
    pub data_dir: PathBuf,
    /// Where `Admin/Backup` writes its copies (default `<data_dir>/../backups`).
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
    /// Mutual-TLS files. Required.
    pub tls: TlsFiles,
    /// Storage engine settings.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The cluster this node forms or joins.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Replication between nodes.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// gRPC server settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7001))
}

impl NodeConfig {
    /// Loads `path` (if any) and the `CASKADE_NODE_` environment, and validates it.
    pub fn load(path: Option<&Path>) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = config::load(path, ENV_PREFIX)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: the cluster settings against this node's id.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::Invalid("id: node ids start at 1".into()));
        }
        self.cluster.validate(self.id)
    }

    /// The backup directory, resolved.
    pub fn backup_dir(&self) -> PathBuf {
        self.backup_dir.clone().unwrap_or_else(|| {
            let parent = self.data_dir.parent().unwrap_or(Path::new("."));
            let name = self
                .data_dir
                .file_name()
                .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
            parent.join(format!("{name}-backups"))
        })
    }
}

/// `[engine]`: the Bitcask engine's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `always` (default: fsync before acknowledging, concurrent writers share
    /// one fsync), `interval` (fsync every `fsync_interval_ms`) or `never` (the OS decides).
    pub durability: DurabilityMode,
    /// Period of the background fsync under `interval` (default 100 ms).
    pub fsync_interval_ms: u64,
    /// Size at which the active data file rotates (default 128 MiB, at most 2 GiB).
    pub max_file_size: u64,
    /// Largest value accepted (default 1 MiB, at most 256 MiB).
    pub max_value_bytes: usize,
    /// Open even if immutable files hold damaged records, skipping them (default false).
    pub repair: bool,
    /// Background merge.
    pub merge: MergeConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            durability: DurabilityMode::Always,
            fsync_interval_ms: 100,
            max_file_size: 128 << 20,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            repair: false,
            merge: MergeConfig::default(),
        }
    }
}

/// `[cluster]`: the Raft group that holds the cluster map, and how a new
/// cluster forms (etcd's `--initial-cluster`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The members of a new cluster, `id=host:port` separated by commas, the
    /// same on every one of them (default: none; the node then waits to be
    /// added to a cluster with `POST /admin/v1/nodes`). A node that already
    /// belongs to a cluster ignores it.
    pub initial_members: Option<InitialMembers>,
    /// Serve alone, in no cluster (default false): with no map, the node
    /// replicates to nobody and acknowledges writes by itself. For a single
    /// node under test or benchmark. A node that is not standalone serves
    /// nothing until a cluster map is in effect; one waiting to be added
    /// takes no client request meanwhile.
    pub standalone: bool,
    /// Replicas per key in a new cluster (default 3; at most the number of
    /// initial members).
    pub replication_factor: u32,
    /// Ring points per node in a new cluster (default 64, at most 4096).
    pub vnodes_per_node: u32,
    /// How long a node must be unreachable before the Raft leader marks it
    /// down and routers send its requests to the next replicas (default
    /// 5000 ms; 0 never marks nodes down).
    pub failover_after_ms: u64,
    /// Raft leader heartbeat period (default 250 ms).
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for this long (randomized up to twice
    /// as long) starts an election (default 1500 ms; at least 3 heartbeats).
    pub election_timeout_ms: u64,
    /// How far apart the nodes' wall clocks may be (default 500 ms, at most
    /// a minute; 0 checks nothing). A node refuses messages from a peer
    /// whose clock is further from its own; a node whose clock is that far
    /// from more of its peers' than agree with it, or whose clock stepped
    /// that far since it last agreed, refuses writes and stops serving
    /// until it agrees again (see `clock_offset`).
    pub max_clock_offset_ms: u64,
}

/// The largest `cluster.max_clock_offset_ms`: a minute.
pub const MAX_CLOCK_OFFSET_MS: u64 = 60_000;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            initial_members: None,
            standalone: false,
            replication_factor: 3,
            vnodes_per_node: 64,
            failover_after_ms: 5000,
            heartbeat_ms: 250,
            election_timeout_ms: 1500,
            max_clock_offset_ms: 500,
        }
    }
}

impl ClusterConfig {
    fn validate(&self, id: u32) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(format!("cluster.{message}")));
        if self.heartbeat_ms == 0 || self.election_timeout_ms < self.heartbeat_ms.saturating_mul(3)
        {
            return invalid(format!(
                "election_timeout_ms ({}) must be at least three heartbeats (heartbeat_ms {})",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        if self.max_clock_offset_ms > MAX_CLOCK_OFFSET_MS {
            return invalid(format!(
                "max_clock_offset_ms {} must be at most {MAX_CLOCK_OFFSET_MS} (0: unchecked)",
                self.max_clock_offset_ms
            ));
        }
        if self.vnodes_per_node == 0 || self.vnodes_per_node > 4096 {
            return invalid(format!(
                "vnodes_per_node {} must be between 1 and 4096",
                self.vnodes_per_node
            ));
        }
        let Some(members) = &self.initial_members else {
            return Ok(());
        };
        if self.standalone {
            return invalid(
                "standalone and initial_members exclude each other: a standalone node forms no cluster"
                    .to_string(),
            );
        }
        if !members.0.iter().any(|m| m.id == id) {
            return invalid(format!(
                "initial_members does not name this node (id {id}): {members}"
            ));
        }
        let count = members.0.len() as u32;
        if self.replication_factor == 0 || self.replication_factor > count {
            return invalid(format!(
                "replication_factor {} must be between 1 and the number of initial members ({count})",
                self.replication_factor
            ));
        }
        Ok(())
    }
}

/// One member of a new cluster: its node id and the `host:port` where the
/// other nodes and the routers reach its gRPC listener.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InitialMember {
    /// The node's id.
    pub id: u32,
    /// Its advertised gRPC address.
    pub addr: String,
}

/// `cluster.initial_members`: `id=host:port,id=host:port,…`, ids and
/// addresses unique, sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct InitialMembers(pub Vec<InitialMember>);

impl TryFrom<String> for InitialMembers {
    type Error = String;

    fn try_from(list: String) -> Result<Self, String> {
        let mut members = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| format!("`{entry}` is not id=host:port"))?;
            let id: u32 = id
                .trim()
                .parse()
                .ok()
                .filter(|&id| id > 0)
                .ok_or_else(|| format!("`{entry}`: the id must be a number from 1"))?;
            let addr = addr.trim();
            validate_addr(addr).map_err(|why| format!("`{entry}`: {why}"))?;
            if members.iter().any(|m: &InitialMember| m.id == id) {
                return Err(format!("node id {id} is listed twice"));
            }
            if members.iter().any(|m: &InitialMember| m.addr == addr) {
                return Err(format!("address {addr} is listed twice"));
            }
            members.push(InitialMember {
                id,
                addr: addr.to_owned(),
            });
        }
        if members.is_empty() {
            return Err("the list is empty; expected id=host:port,id=host:port,…".into());
        }
        members.sort();
        Ok(InitialMembers(members))
    }
}

impl std::fmt::Display for InitialMembers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self
            .0
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect();
        f.write_str(&list.join(","))
    }
}

pub use caskade_common::config::validate_addr;

/// `[replication]`: how this node pulls from its peers and waits for them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// How long a write waits for the replicas its write level needs before
    /// it is answered with the acknowledgements it got (default 1500 ms;
    /// keep it below the routers' `nodes.timeout_ms`).
    pub ack_timeout_ms: u64,
    /// How long a pull waits on the peer for new records when there are none
    /// (default 1000 ms). A peer that has not pulled for three times this
    /// (at least 2 s) counts as down for write levels.
    pub pull_wait_ms: u64,
    /// Most records per pull (default 1000).
    pub pull_max_records: u32,
    /// Memory for the recent tail of the log that peers pull from (default
    /// 32 MiB); pulls from further back read the data files.
    pub feed_bytes: usize,
    /// How often the catch-up cursors are made durable (default 1000 ms).
    pub cursor_sync_ms: u64,
    /// How often this node compares the digests of the ranges it shares
    /// with each peer and copies what differs (anti-entropy; default
    /// 60000 ms, 0: never).
    pub anti_entropy_interval_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            ack_timeout_ms: 1500,
            pull_wait_ms: 1000,
            pull_max_records: 1000,
            feed_bytes: 32 << 20,
            cursor_sync_ms: 1000,
            anti_entropy_interval_ms: 60_000,
        }
    }
}

impl ReplicationConfig {
    /// A peer silent for this long counts as down.
    pub fn peer_alive_for(&self) -> Duration {
        Duration::from_millis((self.pull_wait_ms * 3).max(2000))
    }

    /// How long a pull's answer lets its puller coordinate writes as the
    /// primary of ranges the peer replicates: twice the pull wait (at least
    /// 1 s), since a healthy peer answers a pull at least that often.
    pub fn primary_lease(&self) -> Duration {
        Duration::from_millis((self.pull_wait_ms * 2).max(1000))
    }

    /// How long a node that takes over primary ranges waits after copying
    /// them before it coordinates their writes: the lease a deposed primary
    /// may still hold, plus a quarter for clock rate differences.
    pub fn takeover_wait(&self) -> Duration {
        let lease = self.primary_lease();
        lease + lease / 4
    }
}

/// When writes reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// fsync before acknowledging.
    Always,
    /// fsync periodically.
    Interval,
    /// Leave it to the OS.
    Never,
}

/// `[engine.merge]`: when merge runs on its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MergeConfig {
    /// Merge automatically (default true).
    pub auto: bool,
    /// Merge once dead bytes reach this share of all bytes (default 0.5)…
    pub dead_ratio: f64,
    /// …and at least this many bytes (default 64 MiB).
    pub min_dead_bytes: u64,
    /// How often the trigger is checked (default 60 s).
    pub check_interval_secs: u64,
    /// How long merge keeps tombstones, so that a replica that was away can
    /// still learn of deletes incrementally (default 86,400 s = 24 h).
    pub tombstone_retention_secs: u64,
}

impl Default for MergeConfig {
    fn default() -> Self {
        let defaults = MergeOptions::default();
        MergeConfig {
            auto: defaults.auto,
            dead_ratio: defaults.dead_ratio,
            min_dead_bytes: defaults.min_dead_bytes,
            check_interval_secs: defaults.check_interval.as_secs(),
            tombstone_retention_secs: defaults.tombstone_retention.as_secs(),
        }
    }
}

impl EngineConfig {
    /// The engine options these settings describe (validated by `Engine::open`).
    pub fn options(&self) -> Options {
        Options {
            max_file_size: self.max_file_size,
            max_value_bytes: self.max_value_bytes,
            durability: match self.durability {
                DurabilityMode::Always => Durability::Always,
                DurabilityMode::Interval => {
                    Durability::Interval(Duration::from_millis(self.fsync_interval_ms))
                }
                DurabilityMode::Never => Durability::Never,
            },
            merge: MergeOptions {
                auto: self.merge.auto,
                dead_ratio: self.merge.dead_ratio,
                min_dead_bytes: self.merge.min_dead_bytes,
                check_interval: Duration::from_secs(self.merge.check_interval_secs),
                tombstone_retention: Duration::from_secs(self.merge.tombstone_retention_secs),
            },
            repair: self.repair,
            ..Options::default()
        }
    }
}

/// `[server]`: the gRPC server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Concurrent requests per client connection (HTTP/2 streams) (default 1024).
    pub max_concurrent_streams: u32,
    /// On shutdown, how long the node keeps serving while it reports
    /// `NOT_SERVING`, so that routers' health checks see it before it stops
    /// accepting (default 0; set it above the routers' `health_interval_ms`).
    pub shutdown_drain_ms: u64,
    /// Then, how long in-flight requests may take before connections are
    /// dropped (default 30 s).
    pub shutdown_grace_secs: u64,
    /// TLS handshake timeout (default 10 s).
    pub tls_handshake_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: 1024,
            shutdown_drain_ms: 0,
            shutdown_grace_secs: 30,
            tls_handshake_timeout_secs: 10,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP `GET /metrics` listener (default: none, no endpoint).
    pub listen: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 3\ndata_dir = \"/var/lib/caskade\"\n[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n-key.pem\"\n",
        )
        .expect("write");
        let config = NodeConfig::load(Some(&path)).expect("load");
        assert_eq!(config.id, 3);
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.engine, EngineConfig::default());
        assert_eq!(config.server, ServerConfig::default());
        assert_eq!(config.metrics.listen, None);
        assert_eq!(
            config.backup_dir(),
            PathBuf::from("/var/lib/caskade-backups")
        );
        let options = config.engine.options();
        assert!(options.validate().is_ok());
        assert_eq!(options.durability, Durability::Always);
    }

    #[test]
    fn initial_members_are_parsed_strictly() {
        let ok = InitialMembers::try_from("2=b:7002, 1=a:7001,3=[::1]:7003".to_owned()).unwrap();
        let ids: Vec<u32> = ok.0.iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3], "sorted by id");
        assert_eq!(ok.to_string(), "1=a:7001,2=b:7002,3=[::1]:7003");
        for bad in [
            "",
            "1=127.0.0.1",
            "a=127.0.0.1:1",
            "0=h:1",
            "1=h:0",
            "1=h:70000",
            "1=::1:7000",
            "1=h:1?x",
            "1=h:1#x",
            "1=u@h:1",
            "1=h/p:1",
            "1=h:1,1=g:1",
            "1=h:1,2=h:1",
        ] {
            assert!(
                InitialMembers::try_from(bad.to_owned()).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn a_wrong_value_names_its_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 3\ndata_dir = \"d\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[engine]\ndurability = \"sometimes\"\n",
        )
        .expect("write");
        let err = NodeConfig::load(Some(&path)).expect_err("bad durability");
        assert!(err.to_string().contains("engine.durability"), "{err}");
    }

    #[test]
    fn a_standalone_node_forms_no_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let base = "id = 1\ndata_dir = \"d\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[cluster]\nstandalone = true\n";
        std::fs::write(&path, base).expect("write");
        assert!(
            NodeConfig::load(Some(&path))
                .expect("load")
                .cluster
                .standalone
        );
        std::fs::write(&path, format!("{base}initial_members = \"1=h:7001\"\n")).expect("write");
        let err = NodeConfig::load(Some(&path)).expect_err("standalone with members");
        assert!(err.to_string().contains("cluster.standalone"), "{err}");
    }
}
