//! `caskade local`: three storage nodes and a router in one process, talking
//! real mutual-TLS gRPC on loopback, with everything a user needs written
//! under the data directory.
//!
//! Layout of `<data-dir>`: `certs/` (CA and certificates, reused on the next
//! run), `jwt-secret` (the router's HS256 secret, reused), `admin.token` (an
//! admin JWT valid 24 h, rewritten on every start), `node-<i>/` (each node's
//! data), `node-<i>-backups/` and `node-addrs` (where each node listens).
//! On the first start the nodes listen on ports the OS picks and form the
//! cluster from them (the same Raft bootstrap as separate processes, with
//! the addresses as initial members); `node-addrs` keeps those ports, so a
//! later start finds its nodes where the cluster map says they are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::LogConfig;
use caskade_common::tls::TlsMaterial;
use caskade_node::config::{
    ClusterConfig, EngineConfig, InitialMembers, MetricsConfig, ReplicationConfig, ServerConfig,
};
use caskade_node::{Node, NodeConfig, NodeError};
use caskade_proto::GetClusterMapRequest;
use caskade_proto::admin_client::AdminClient;
use caskade_router::auth::{AuthConfig, SecretKeyFile};
use caskade_router::config::{HttpsFiles, IdempotencyConfig, LimitsConfig, NodePolicy};
use caskade_router::{Router, RouterConfig, RouterError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::certs::{admin_token, ensure_secret, write_private};

/// Ring points per node of the map `caskade local` forms.
const VNODES_PER_NODE: u32 = 64;
/// Where `caskade local` records its nodes' addresses.
const NODE_ADDRS_FILE: &str = "node-addrs";
/// How long the nodes may take to catch up with each other at start.
const NODES_READY_DEADLINE: Duration = Duration::from_secs(120);
/// How long the printed admin token is valid.
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Where everything is kept.
    pub data_dir: PathBuf,
    /// The router's address.
    pub listen: SocketAddr,
    /// Number of storage nodes.
    pub nodes: u32,
    /// Storage engine settings of every node.
    pub engine: EngineConfig,
    /// Per-node policy of the router.
    pub node_policy: NodePolicy,
    /// Replicas per key (default: 3, or fewer with fewer nodes).
    pub replication_factor: Option<u32>,
    /// The router's connection and request limits.
    pub router_limits: LimitsConfig,
    /// The router's plain-HTTP `/metrics` listener, if any (else `/metrics`
    /// is served on its HTTPS listener).
    pub router_metrics_listen: Option<SocketAddr>,
}

/// A running local cluster.
#[derive(Debug)]
pub struct LocalCluster {
    /// The router's base URL (`https://127.0.0.1:8443`).
    pub url: String,
    /// An admin token.
    pub admin_token: String,
    /// The certificates.
    pub certs: ClusterCertFiles,
    /// The HS256 secret file.
    pub secret_file: PathBuf,
    /// Each node's gRPC address, by node id (1-based).
    pub node_addrs: Vec<SocketAddr>,
    /// The router's `/metrics` listener, when it has one.
    pub router_metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    nodes: Vec<JoinHandle<Result<(), NodeError>>>,
    router: JoinHandle<Result<(), RouterError>>,
}

impl LocalCluster {
    /// Starts the nodes, waits until they form the cluster, starts the router.
    pub async fn start(options: LocalOptions) -> anyhow::Result<LocalCluster> {
        if options.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let certs = ensure_cluster_certs(&dir.join("certs"), options.nodes, &[])?;
        let secret_file = dir.join("jwt-secret");
        ensure_secret(&secret_file)?;
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };

        let addrs_file = dir.join(NODE_ADDRS_FILE);
        let known_addrs = read_node_addrs(&addrs_file, options.nodes)?;
        let replication_factor = options
            .replication_factor
            .unwrap_or(3)
            .clamp(1, options.nodes.max(1));
        let mut node_addrs = Vec::new();
        let mut started = Vec::new();
        for id in 1..=options.nodes {
            let listen = known_addrs
                .as_ref()
                .and_then(|addrs| addrs.get(id as usize - 1).copied())
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let config = NodeConfig {
                id,
                listen,
                data_dir: dir.join(format!("node-{id}")),
                backup_dir: Some(dir.join(format!("node-{id}-backups"))),
                tls: certs.nodes[id as usize - 1].clone(),
                engine: options.engine.clone(),
                cluster: ClusterConfig {
                    replication_factor,
                    vnodes_per_node: VNODES_PER_NODE,
                    ..ClusterConfig::default()
                },
                replication: ReplicationConfig::default(),
                server: ServerConfig::default(),
                metrics: MetricsConfig::default(),
                log: LogConfig::default(),
            };
            let node = Node::start(config).await.with_context(|| {
                format!(
                    "starting node {id} on {listen} (see {})",
                    addrs_file.display()
                )
            })?;
            node_addrs.push(node.grpc_addr());
            started.push(node);
        }
        if known_addrs.is_none() {
            write_node_addrs(&addrs_file, &node_addrs)?;
        }
        let members = InitialMembers::try_from(
            node_addrs
                .iter()
                .zip(1..)
                .map(|(addr, id)| format!("{id}={addr}"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .map_err(anyhow::Error::msg)?;
        let mut nodes = Vec::new();
        for mut node in started {
            node.set_initial_members(members.clone())?;
            nodes.push(tokio::spawn(node.serve(until_stopped())));
        }
        let channels = connect_nodes(&certs, &node_addrs).await?;
        wait_until_serving(&channels).await?;

        let config = RouterConfig {
            listen: options.listen,
            https: Some(HttpsFiles {
                cert: certs.router.cert.clone(),
                key: certs.router.key.clone(),
            }),
            insecure_http: false,
            node_tls: certs.router.clone(),
            seeds: node_addrs.iter().map(ToString::to_string).collect(),
            auth: AuthConfig {
                hs256: vec![SecretKeyFile {
                    kid: None,
                    path: secret_file.clone(),
                }],
                ..AuthConfig::default()
            },
            limits: options.router_limits.clone(),
            nodes: options.node_policy.clone(),
            idempotency: IdempotencyConfig::default(),
            metrics: caskade_router::config::MetricsConfig {
                listen: options.router_metrics_listen,
            },
            log: LogConfig::default(),
        };
        let router = Router::start(config).await.context("starting the router")?;
        let url = format!("https://{}", router.local_addr());
        let router_metrics_addr = router.metrics_addr();
        let router = tokio::spawn(router.serve(until_stopped()));

        let admin_token = admin_token(&secret_file, ADMIN_TOKEN_TTL)?;
        write_private(
            &dir.join("admin.token"),
            format!("{admin_token}\n").as_bytes(),
        )?;
        Ok(LocalCluster {
            url,
            admin_token,
            certs,
            secret_file,
            node_addrs,
            router_metrics_addr,
            stop,
            nodes,
            router,
        })
    }

    /// Stops the router, then the nodes, each gracefully.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.router.await??;
        for node in self.nodes {
            node.await??;
        }
        Ok(())
    }
}

/// Waits until every node holds the committed cluster map and reports
/// SERVING: the cluster forms (a Raft leader is elected and commits the
/// first map), then each node catches up with its peers.
async fn wait_until_serving(channels: &[Channel]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    for channel in channels {
        let mut health = HealthClient::new(channel.clone());
        let mut admin = AdminClient::new(channel.clone());
        loop {
            let has_map = admin
                .get_cluster_map(GetClusterMapRequest::default())
                .await
                .is_ok_and(|r| r.get_ref().map.is_some());
            let request = HealthCheckRequest {
                service: caskade_proto::READINESS_SERVICE.into(),
            };
            let serving = has_map
                && health
                    .check(request)
                    .await
                    .is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32);
            if serving {
                break;
            }
            if started.elapsed() > NODES_READY_DEADLINE {
                bail!(
                    "the storage nodes did not form a cluster and catch up within {NODES_READY_DEADLINE:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// A channel to each node, as the operator's client.
async fn connect_nodes(
    certs: &ClusterCertFiles,
    addrs: &[SocketAddr],
) -> anyhow::Result<Vec<Channel>> {
    let tls = TlsMaterial::load(&certs.client)?;
    let mut channels = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.grpc_client("127.0.0.1"))?
            .connect()
            .await
            .with_context(|| format!("connecting to node at {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The node addresses of an earlier start, if they were recorded for as
/// many nodes.
fn read_node_addrs(path: &Path, nodes: u32) -> anyhow::Result<Option<Vec<SocketAddr>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let addrs = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: one address per line", path.display()))?;
    if addrs.len() != nodes as usize {
        bail!(
            "{} lists {} nodes, not {nodes}: this data directory holds a cluster of another size",
            path.display(),
            addrs.len()
        );
    }
    Ok(Some(addrs))
}

fn write_node_addrs(path: &Path, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    write_private(path, text.as_bytes())
}
