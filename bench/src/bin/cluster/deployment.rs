//! The cluster under test: storage nodes in processes of their own, each
//! started from a TOML file written as an operator would (`never`
//! durability, the founders with the same `initial_members`, spares with
//! none), and the router serving in this process; certificates, data and
//! logs in one temporary directory, traffic only on loopback ports the OS
//! picked.
//!
//! Dropping a [`Deployment`] kills and reaps every node process, also on an
//! error or a panic; unless [`Deployment::stop`] was reached it first
//! prints the end of every node's log. Nothing here measures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::{LogConfig, TlsFiles};
use caskade_common::tls::TlsMaterial;
use caskade_node::config::ClusterConfig;
use caskade_proto::admin_client::AdminClient;
use caskade_router::auth::{
    AuthConfig, Role, SecretKeyFile, TokenRequest, issue_hs256, load_hs256_secret,
};
use caskade_router::config::{HttpsFiles, IdempotencyConfig, LimitsConfig, NodePolicy};
use caskade_router::{Router, RouterConfig, RouterError};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::admin::{Admin, in_service, page_leader};
use crate::process::{NodeProcess, free_ports, tail};

/// How long the founders may take to form the cluster and be ready.
const FORM_DEADLINE: Duration = Duration::from_secs(60);
/// Ceiling of one gRPC call made to a node directly.
const GRPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two checks of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Ring points per node.
const VNODES_PER_NODE: u32 = 64;
/// The certificate of every node added later: certificates name hosts,
/// not node ids, so one serves them all.
const SPARE_CERT: u32 = 4;
/// The router's HS256 secret (a throwaway cluster in a temporary directory).
const SECRET: &str = "caskade-bench-cluster-secret-0123456789abcdef\n";

/// The `[cluster]` settings of every node.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Founding members, ids `1..=founders`.
    pub founders: u32,
    /// Replicas per key.
    pub replication_factor: u32,
    /// `cluster.failover_after_ms`.
    pub failover_after_ms: u64,
    /// Leave the temporary directory (data, logs, files) behind.
    pub keep_dir: bool,
    /// The nodes' `log.level`.
    pub log_level: String,
}

#[derive(Debug)]
struct NodeSlot {
    addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    process: Option<NodeProcess>,
}

/// The router serving in this process until `stop` is sent.
#[derive(Debug)]
struct RouterTask {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RouterError>>,
}

/// Nodes in processes, the router in this one.
#[derive(Debug)]
pub struct Deployment {
    dir: TempDir,
    certs: ClusterCertFiles,
    settings: Settings,
    nodes: BTreeMap<u32, NodeSlot>,
    router: Option<RouterTask>,
    admin: Admin,
    client_tls: TlsMaterial,
    finished: bool,
}

impl Deployment {
    /// Starts the founders from their files and the router (with `policy`
    /// towards the nodes), and waits until every founder is in service and
    /// a Raft leader is known.
    pub async fn start(settings: Settings, policy: NodePolicy) -> anyhow::Result<Deployment> {
        let mut dir = tempfile::tempdir().context("creating the temporary directory")?;
        dir.disable_cleanup(settings.keep_dir);
        if settings.keep_dir {
            eprintln!("keeping {}", dir.path().display());
        }
        let certs = ensure_cluster_certs(
            &dir.path().join("certs"),
            settings.founders.max(SPARE_CERT),
            &[],
        )?;
        let secret_file = dir.path().join("jwt-secret");
        std::fs::write(&secret_file, SECRET)?;
        let token = issue_hs256(
            &load_hs256_secret(&secret_file)?,
            &TokenRequest {
                subject: "caskade-bench-cluster",
                role: Role::Admin,
                prefix: None,
                ttl: Duration::from_secs(24 * 3600),
                issuer: None,
                audience: None,
                kid: None,
            },
        )?;
        let ids: Vec<u32> = (1..=settings.founders).collect();
        let replication_factor = settings.replication_factor;
        let addrs = free_ports(ids.len())?;
        // Bound now, served once the nodes listen.
        let router = Router::start(RouterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            https: Some(HttpsFiles {
                cert: certs.router.cert.clone(),
                key: certs.router.key.clone(),
            }),
            insecure_http: false,
            node_tls: certs.router.clone(),
            seeds: addrs.iter().map(ToString::to_string).collect(),
            auth: AuthConfig {
                hs256: vec![SecretKeyFile {
                    kid: None,
                    path: secret_file,
                }],
                ..AuthConfig::default()
            },
            limits: LimitsConfig::default(),
            nodes: policy,
            idempotency: IdempotencyConfig::default(),
            metrics: caskade_router::config::MetricsConfig::default(),
            log: LogConfig::default(),
        })
        .await
        .context("starting the router")?;
        let admin = Admin::new(
            &certs.ca,
            format!("https://{}", router.local_addr()),
            &token,
        )?;
        let mut d = Deployment {
            client_tls: TlsMaterial::load(&certs.client)?,
            dir,
            certs,
            settings,
            nodes: BTreeMap::new(),
            router: None,
            admin,
            finished: false,
        };

        let members: Vec<String> = ids
            .iter()
            .zip(&addrs)
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        let founding = format!(
            "initial_members = {}\nreplication_factor = {}\nvnodes_per_node = {VNODES_PER_NODE}\n{}",
            toml_string(&members.join(",")),
            replication_factor,
            d.timings_section(),
        );
        for (&id, &addr) in ids.iter().zip(&addrs) {
            d.allocate(id, addr, &founding)?;
        }
        for &id in &ids {
            d.spawn(id)?;
        }
        for &id in &ids {
            d.wait_listening(id).await?;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(router.serve(async {
            let _ = stopped.await;
        }));
        d.router = Some(RouterTask { stop, task });

        let admin = d.admin.clone();
        poll_for(
            "the founders to form the cluster, all in service",
            FORM_DEADLINE,
            || async {
                let page = admin.cluster_page().await.ok()?;
                page_leader(&page)?;
                ids.iter().all(|&id| in_service(&page, id)).then_some(())
            },
        )
        .await?;
        Ok(d)
    }

    /// The router's REST API.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The ids of the founders.
    pub fn founders(&self) -> Vec<u32> {
        (1..=self.settings.founders).collect()
    }

    /// The process id of running node `id`.
    pub fn pid(&self, id: u32) -> anyhow::Result<u32> {
        Ok(self.process(id)?.pid())
    }

    /// An operator's gRPC admin client of node `id` (connected lazily).
    pub fn node_admin(&self, id: u32) -> anyhow::Result<AdminClient<Channel>> {
        let channel = Endpoint::from_shared(format!("https://{}", self.slot(id)?.addr))?
            .tls_config(self.client_tls.grpc_client("127.0.0.1"))?
            .connect_timeout(GRPC_TIMEOUT)
            .timeout(GRPC_TIMEOUT)
            .connect_lazy();
        Ok(AdminClient::new(channel))
    }

    /// Starts node `id` (never used before) on a fresh port and data
    /// directory with no initial members, so that it waits to be added;
    /// returns its address once it listens.
    pub async fn start_spare(&mut self, id: u32) -> anyhow::Result<SocketAddr> {
        if self.nodes.contains_key(&id) {
            bail!("node {id} already exists: node ids are never reused");
        }
        let addr = free_ports(1)?[0];
        let timings = self.timings_section();
        self.allocate(id, addr, &timings)?;
        self.spawn(id)?;
        self.wait_listening(id).await?;
        Ok(addr)
    }

    /// SIGKILL: node `id` dies at once, as in a crash.
    pub fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        let process = self.slot_mut(id)?.process.take();
        process
            .with_context(|| format!("node {id} is not running"))?
            .kill()
    }

    /// Kills node `id` and forgets it (its files stay until the end).
    pub fn discard(&mut self, id: u32) -> anyhow::Result<()> {
        self.kill(id)?;
        self.nodes.remove(&id);
        Ok(())
    }

    /// Starts node `id` again from the same file; returns once it listens.
    pub async fn restart(&mut self, id: u32) -> anyhow::Result<()> {
        self.spawn(id)?;
        self.wait_listening(id).await
    }

    /// Stops the router gracefully; the nodes are killed as `self` drops.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.finished = true;
        if let Some(router) = self.router.take() {
            let _ = router.stop.send(());
            router.task.await??;
        }
        Ok(())
    }

    /// `[cluster]` timings: the failover delay asked for, Raft's defaults.
    fn timings_section(&self) -> String {
        let defaults = ClusterConfig::default();
        format!(
            "failover_after_ms = {}\nheartbeat_ms = {}\nelection_timeout_ms = {}\n",
            self.settings.failover_after_ms, defaults.heartbeat_ms, defaults.election_timeout_ms
        )
    }

    /// Gives node `id` the address `addr` and writes its file, with
    /// `cluster` as its `[cluster]` section.
    fn allocate(&mut self, id: u32, addr: SocketAddr, cluster: &str) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let slot = NodeSlot {
            addr,
            config: dir.join(format!("node-{id}.toml")),
            log: dir.join(format!("node-{id}.log")),
            process: None,
        };
        let cert = if id <= self.settings.founders {
            id
        } else {
            SPARE_CERT
        };
        let tls: &TlsFiles = &self.certs.nodes[cert as usize - 1];
        let text = format!(
            "id = {id}\n\
             listen = {listen}\n\
             data_dir = {data_dir}\n\
             \n\
             [engine]\n\
             durability = \"never\"\n\
             \n\
             [tls]\n\
             ca = {ca}\n\
             cert = {cert}\n\
             key = {key}\n\
             \n\
             [log]\n\
             level = {level}\n\
             \n\
             [cluster]\n\
             {cluster}",
            level = toml_string(&self.settings.log_level),
            listen = toml_string(&addr.to_string()),
            data_dir = toml_path(&dir.join(format!("node-{id}"))),
            ca = toml_path(&tls.ca),
            cert = toml_path(&tls.cert),
            key = toml_path(&tls.key),
        );
        std::fs::write(&slot.config, text)
            .with_context(|| format!("writing {}", slot.config.display()))?;
        self.nodes.insert(id, slot);
        Ok(())
    }

    fn spawn(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot_mut(id)?;
        if slot.process.is_some() {
            bail!("node {id} is already running");
        }
        slot.process = Some(NodeProcess::spawn(&slot.config, &slot.log)?);
        Ok(())
    }

    async fn wait_listening(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot_mut(id)?;
        let process = slot
            .process
            .as_mut()
            .with_context(|| format!("node {id} is not running"))?;
        process
            .wait_listening(slot.addr, &slot.log)
            .await
            .with_context(|| format!("node {id}"))
    }

    fn process(&self, id: u32) -> anyhow::Result<&NodeProcess> {
        self.slot(id)?
            .process
            .as_ref()
            .with_context(|| format!("node {id} is not running"))
    }

    fn slot(&self, id: u32) -> anyhow::Result<&NodeSlot> {
        self.nodes.get(&id).with_context(|| format!("no node {id}"))
    }

    fn slot_mut(&mut self, id: u32) -> anyhow::Result<&mut NodeSlot> {
        self.nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(router) = self.router.take() {
            router.task.abort();
        }
        if !self.finished {
            for (id, slot) in &self.nodes {
                eprintln!("----- node {id} log ({}):\n{}", slot.addr, tail(&slot.log));
            }
        }
        // The processes are killed as their slots drop, before the
        // temporary directory they write into is removed.
        self.nodes.clear();
    }
}

/// Checks `condition` every [`POLL_INTERVAL`] until it yields a value,
/// failing naming `what` after `deadline`.
pub async fn poll_for<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut condition: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `value` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(value: &str) -> String {
    Value::from(value).to_string()
}

fn toml_path(path: &Path) -> String {
    toml_string(&path.display().to_string())
}
