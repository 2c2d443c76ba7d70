//! Storage nodes run inside the benchmark's process, over real mutual TLS
//! on loopback: two nodes that replicate each other, their start and stop,
//! the wait until one serves, and gRPC channels to them. Shared by the
//! replication and anti-entropy benchmarks; nothing here measures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::LogConfig;
use caskade_common::tls::TlsMaterial;
use caskade_node::config::{
    ClusterConfig, DurabilityMode, EngineConfig, InitialMembers, MetricsConfig, ServerConfig,
};
use caskade_node::{Node, NodeConfig};
use caskade_proto::GetClusterMapRequest;
use caskade_proto::admin_client::AdminClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for a node to hold the cluster map and serve.
const READY_WITHIN: Duration = Duration::from_secs(600);

/// Two nodes, ids 1 and 2, that replicate each other (replication factor
/// 2): certificates, data directories under one root, and two loopback
/// ports fixed up front, so that both know each other from the start
/// (their initial members) and come back on the same ports.
#[derive(Debug)]
pub struct TwoNodes {
    /// The CA and the nodes' and client's certificates.
    pub certs: ClusterCertFiles,
    /// Node 1's and node 2's gRPC addresses.
    pub addrs: [SocketAddr; 2],
    members: InitialMembers,
    root: PathBuf,
}

impl TwoNodes {
    /// Certificates under `root/certs`, data under `root/node-<id>`.
    pub fn new(root: &Path) -> anyhow::Result<TwoNodes> {
        let certs = ensure_cluster_certs(&root.join("certs"), 2, &[])?;
        let a = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let b = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let members =
            InitialMembers::try_from(format!("1={a},2={b}")).map_err(anyhow::Error::msg)?;
        Ok(TwoNodes {
            certs,
            addrs: [a, b],
            members,
            root: root.to_path_buf(),
        })
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u32) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }

    /// Node `id`'s (1 or 2) configuration: `never` durability, default
    /// replication settings.
    pub fn config(&self, id: u32) -> NodeConfig {
        let index = id as usize - 1;
        NodeConfig {
            id,
            listen: self.addrs[index],
            data_dir: self.data_dir(id),
            backup_dir: None,
            tls: self.certs.nodes[index].clone(),
            engine: engine_config(),
            cluster: ClusterConfig {
                initial_members: Some(self.members.clone()),
                replication_factor: 2,
                ..ClusterConfig::default()
            },
            replication: Default::default(),
            server: ServerConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The engine settings of the benchmarks' nodes: `never` durability, so
/// that fsyncs do not hide what is measured. Open an engine with
/// `engine_config().options()` to write into a node's data directory.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        durability: DurabilityMode::Never,
        ..EngineConfig::default()
    }
}

/// A node serving in this process until [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), caskade_node::NodeError>>,
}

/// Starts a node and serves it on a task of its own.
pub async fn start_node(config: NodeConfig) -> anyhow::Result<Running> {
    let node = Node::start(config).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(async {
        let _ = stopped.await;
    }));
    Ok(Running { stop, task })
}

impl Running {
    /// Shuts the node down and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// A channel to the node at `addr`, as the client certificate.
pub async fn channel(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<Channel> {
    let tls = TlsMaterial::load(&certs.client)?;
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.grpc_client("127.0.0.1"))?
        .connect()
        .await?)
}

/// The admin service of the node at `addr`.
pub async fn admin(
    certs: &ClusterCertFiles,
    addr: SocketAddr,
) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(certs, addr).await?))
}

/// Polls the node until it holds the cluster map and reports SERVING (at
/// most ten minutes).
pub async fn wait_serving(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut health = HealthClient::new(channel(certs, addr).await?);
    let mut admin = admin(certs, addr).await?;
    loop {
        let has_map = admin
            .get_cluster_map(GetClusterMapRequest::default())
            .await
            .is_ok_and(|r| r.get_ref().map.is_some());
        if !has_map {
            if started.elapsed() > READY_WITHIN {
                bail!("the node at {addr} holds no cluster map");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let answer = health
            .check(HealthCheckRequest {
                service: "caskade.v1.Kv".into(),
            })
            .await;
        if answer.is_ok_and(|a| a.get_ref().status == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if started.elapsed() > READY_WITHIN {
            bail!("the node at {addr} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
