//! Helpers for the node's service suites: certificates from a throw-away
//! cluster CA, node configurations on OS-chosen loopback ports, in-process
//! nodes with a shutdown handle, and mutual-TLS clients.
//!
//! Not every suite uses every helper, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caskade_common::certs::{ClusterCertFiles, write_cluster_certs};
use caskade_common::config::TlsFiles;
use caskade_common::tls::{TlsMaterial, install_crypto_provider};
use caskade_node::config::{DurabilityMode, EngineConfig, MetricsConfig};
use caskade_node::{Node, NodeConfig, NodeError};
use caskade_proto::admin_client::AdminClient;
use caskade_proto::kv_client::KvClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// Certificates for two nodes, a router and a client, in `dir/certs`.
pub fn certs(dir: &Path) -> ClusterCertFiles {
    install_crypto_provider();
    write_cluster_certs(&dir.join("certs"), 2, &[], false).unwrap()
}

/// A node configuration: id 1, loopback ports chosen by the OS, data in
/// `dir/data`, `/metrics` enabled, `never` durability unless changed.
pub fn node_config(dir: &Path, certs: &ClusterCertFiles) -> NodeConfig {
    NodeConfig {
        id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        backup_dir: Some(dir.join("backups")),
        tls: certs.nodes[0].clone(),
        engine: EngineConfig {
            durability: DurabilityMode::Never,
            ..EngineConfig::default()
        },
        cluster: caskade_node::config::ClusterConfig {
            standalone: true,
            ..Default::default()
        },
        replication: Default::default(),
        server: Default::default(),
        metrics: MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        log: Default::default(),
    }
}

/// A node serving in this process.
pub struct RunningNode {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl RunningNode {
    /// Starts a node from `config` on the current runtime.
    pub async fn start(config: NodeConfig) -> RunningNode {
        RunningNode::serve(Node::start(config).await.unwrap())
    }

    /// Serves `node`, started already, on the current runtime.
    pub fn serve(node: Node) -> RunningNode {
        let (grpc, metrics, data_dir) = (node.grpc_addr(), node.metrics_addr(), node.data_dir());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(async move {
            let _ = stopped.await;
        }));
        RunningNode {
            grpc,
            metrics,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for the node to stop, returning how it ended.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("node stops within 30 s")
            .expect("node task")
    }
}

/// A TLS channel to `addr` presenting `identity` (which may be `None`: no
/// client certificate) and trusting `ca`.
pub async fn channel(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&TlsFiles>,
) -> Result<Channel, tonic::transport::Error> {
    install_crypto_provider();
    let ca_pem = std::fs::read(ca).unwrap();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(files) = identity {
        let cert = std::fs::read(&files.cert).unwrap();
        let key = std::fs::read(&files.key).unwrap();
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

/// A Kv client with the cluster's client certificate.
pub async fn kv_client(node: &RunningNode, certs: &ClusterCertFiles) -> KvClient<Channel> {
    let tls = TlsMaterial::load(&certs.client).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", node.grpc))
        .unwrap()
        .tls_config(tls.grpc_client("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    KvClient::new(channel)
}

/// An Admin client with the cluster's client certificate.
pub async fn admin_client(node: &RunningNode, certs: &ClusterCertFiles) -> AdminClient<Channel> {
    let channel = channel(node.grpc, &certs.ca, Some(&certs.client))
        .await
        .unwrap();
    AdminClient::new(channel)
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
