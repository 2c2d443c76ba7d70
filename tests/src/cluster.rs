//! A cluster for resilience tests: storage nodes, each of which can be
//! stopped and restarted on the same address or replaced by a listener that
//! accepts connections and never answers, a router in front of them with the
//! [`NodePolicy`] the test chooses, an HTTPS client trusting only the
//! cluster CA, and tokens. Everything runs in the test's process on loopback
//! ports the OS picks, over real mutual TLS and real HTTPS.
//!
//! It must never reach past the public interfaces: the nodes form the
//! cluster from their initial members (the Raft bootstrap of separate
//! processes, with the addresses the OS picked), and what the router
//! believes is read from `/readyz`, `/admin/v1/cluster` and `/metrics`.
//! Automatic failover is off unless a suite turns it on
//! (`cluster.failover_after_ms` in [`ClusterSpec::configure`]): the
//! resilience suites test the router's own defences.
//!
//! Node ids are unique within the test process (each cluster takes its own
//! block of 100): the router's metrics recorder is process-global, so two
//! clusters both calling their first node `1` would write the same
//! `caskade_router_breaker_state{node="1"}` gauge.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::LogConfig;
use caskade_common::ring::Ring;
use caskade_common::tls::TlsMaterial;
use caskade_node::config::{
    ClusterConfig, DurabilityMode, EngineConfig, InitialMembers, MetricsConfig, ServerConfig,
};
use caskade_node::{Node, NodeConfig, NodeError};
use caskade_proto::admin_client::AdminClient;
use caskade_proto::kv_client::KvClient;
use caskade_proto::replication_client::ReplicationClient;
use caskade_proto::{ClusterMap, GetClusterMapRequest, ScanRequest};
use caskade_router::auth::{AuthConfig, Role, SecretKeyFile, TokenRequest, issue_hs256};
use caskade_router::config::{HttpsFiles, IdempotencyConfig, LimitsConfig, NodePolicy};
use caskade_router::{Router, RouterConfig, RouterError};
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::node_process::NodeProcess;

/// How long the router may take to adopt the map and see the nodes ready.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long a dead node's ranges may take to get new primaries: marked
/// down, copied, the old primary's lease waited out.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// How long the nodes may take to elect a leader, commit the first map and
/// catch up with each other.
const FORM_DEADLINE: Duration = Duration::from_secs(30);
/// How long a node or the router may take to stop gracefully.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// Pause between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Ceiling of any one HTTP request, so a hung router fails the test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the tokens.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long a stopping node lets in-flight requests finish.
const NODE_SHUTDOWN_GRACE_SECS: u64 = 2;
/// The router's HS256 secret. Test clusters live in a temporary directory
/// for one test; a fixed secret keeps failures reproducible.
const JWT_SECRET: &[u8] = b"caskade-tests-cluster-secret-0123456789abcdef";
/// Node certificates made beyond the members, for nodes added later.
const SPARE_NODES: u32 = 2;
/// Most keys tried when looking for keys with a given preference list.
const MAX_KEY_CANDIDATES: u64 = 1_000_000;

/// Next block of node ids; see the module documentation.
static NEXT_ID_BLOCK: AtomicU32 = AtomicU32::new(1);

/// What occupies a slot of the cluster map when the cluster starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A storage node.
    Node,
    /// A TCP listener that accepts connections and never reads or writes:
    /// a node that hangs (a stopped process, a dead disk under a blocked thread).
    Hanging,
    /// A storage node in a process of its own ([`ClusterSpec::node_binary`]),
    /// which [`TestCluster::kill_node`] can kill with SIGKILL.
    Process,
}

/// The cluster to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// One entry per node of the map, in id order.
    pub members: Vec<Member>,
    /// The map's replication factor.
    pub replication_factor: u32,
    /// The map's ring points per node.
    pub vnodes_per_node: u32,
    /// How the router treats each node.
    pub policy: NodePolicy,
    /// The `caskade-node` executable for [`Member::Process`] members.
    pub node_binary: Option<PathBuf>,
    /// Adjusts each node's configuration before it first starts.
    pub configure: fn(&mut NodeConfig),
    /// Where each node process runs, in member order: empty for loopback
    /// ports the OS picks, else one host per member (all
    /// [`Member::Process`]), such as the hosts of a
    /// [`crate::netns::Network`], then one per spare node process
    /// ([`TestCluster::start_spare_process`]).
    pub hosts: Vec<NodeHost>,
}

/// A host a node process runs on: its address there, and the command
/// prefix that starts a program on it (`ip netns exec …`, perhaps with an
/// environment such as a skewed clock's).
#[derive(Debug, Clone)]
pub struct NodeHost {
    /// The address the node listens on.
    pub ip: std::net::IpAddr,
    /// Prepended to the node's command line.
    pub launcher: Vec<std::ffi::OsString>,
}

/// The port of a node on a host of its own (nothing else listens there).
pub const HOST_NODE_PORT: u16 = 7000;

impl ClusterSpec {
    /// `nodes` storage nodes with replication factor `replication_factor`.
    pub fn nodes(nodes: usize, replication_factor: u32, policy: NodePolicy) -> ClusterSpec {
        ClusterSpec {
            members: vec![Member::Node; nodes],
            replication_factor,
            vnodes_per_node: 64,
            policy,
            node_binary: None,
            configure: |_| {},
            hosts: Vec::new(),
        }
    }

    /// `nodes` storage nodes, each in a process of its own started from `binary`.
    pub fn processes(
        nodes: usize,
        replication_factor: u32,
        policy: NodePolicy,
        binary: impl Into<PathBuf>,
    ) -> ClusterSpec {
        ClusterSpec {
            members: vec![Member::Process; nodes],
            node_binary: Some(binary.into()),
            ..ClusterSpec::nodes(nodes, replication_factor, policy)
        }
    }
}

/// A listener that accepts connections and holds them without a word.
#[derive(Debug)]
struct HangingListener {
    task: JoinHandle<()>,
}

impl HangingListener {
    /// Binds `addr` and starts accepting.
    async fn bind(addr: SocketAddr) -> anyhow::Result<(HangingListener, SocketAddr)> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding a hanging listener on {addr}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Dropping a socket would tell the peer; holding it says nothing.
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Ok((HangingListener { task }, addr))
    }

    /// Closes the listener and every connection it holds, and waits until
    /// they are closed, so that the address can be bound again.
    async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for HangingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a slot runs now.
#[derive(Debug)]
enum Occupant {
    Node {
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), NodeError>>,
    },
    Hanging(HangingListener),
    Process(NodeProcess),
    Nothing,
}

/// One node of the map: its id, fixed address and configuration.
#[derive(Debug)]
struct Slot {
    id: u32,
    addr: SocketAddr,
    config: NodeConfig,
    /// A storage node (not a hanging listener) when the cluster started.
    real: bool,
    /// The node runs in a process of its own (started from this executable).
    binary: Option<PathBuf>,
    /// The command prefix its process is started with.
    launcher: Vec<std::ffi::OsString>,
    occupant: Occupant,
}

/// A router serving until its sender fires.
type RunningRouter = (oneshot::Sender<()>, JoinHandle<Result<(), RouterError>>);

/// A running test cluster.
#[derive(Debug)]
pub struct TestCluster {
    /// The router's base URL, `https://127.0.0.1:PORT`.
    pub url: String,
    /// A token with the admin role.
    pub admin_token: String,
    /// A token with the writer role.
    pub writer_token: String,
    client: Client,
    ca_pem: Vec<u8>,
    certs: ClusterCertFiles,
    map: ClusterMap,
    ring: Ring,
    slots: Vec<Slot>,
    router_stop: oneshot::Sender<()>,
    router: JoinHandle<Result<(), RouterError>>,
    /// What the router was started with (more routers use it too).
    router_config: RouterConfig,
    /// Routers started with [`TestCluster::start_router`].
    more_routers: Vec<RunningRouter>,
    /// The first id of this cluster's block, and the spec's configuration hook.
    block: u32,
    configure: fn(&mut NodeConfig),
    /// The spec's node binary, and the hosts left for spare node processes.
    node_binary: Option<PathBuf>,
    spare_hosts: Vec<NodeHost>,
    _dir: TempDir,
}

impl TestCluster {
    /// Starts the members, writes the map to the storage nodes, starts the
    /// router seeded with them, and waits until it sees every storage node ready.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<TestCluster> {
        caskade_common::tls::install_crypto_provider();
        if spec.members.is_empty() || spec.members.len() >= 100 {
            bail!("a test cluster has 1 to 99 members");
        }
        if !spec.hosts.is_empty()
            && (spec.hosts.len() < spec.members.len()
                || spec.hosts.len() > spec.members.len() + SPARE_NODES as usize
                || spec.members.iter().any(|m| *m != Member::Process))
        {
            bail!("hosts are for node processes: one per member, then one per spare");
        }
        let dir = tempfile::tempdir()?;
        let count = u32::try_from(spec.members.len())?;
        let host_names: Vec<String> = spec.hosts.iter().map(|h| h.ip.to_string()).collect();
        let certs =
            ensure_cluster_certs(&dir.path().join("certs"), count + SPARE_NODES, &host_names)?;
        let block = NEXT_ID_BLOCK.fetch_add(1, Ordering::Relaxed) * 100;

        // First every member gets its address (in-process nodes bind port 0,
        // processes get a free port), then all learn the initial members.
        let mut slots = Vec::with_capacity(spec.members.len());
        let mut pending = Vec::new();
        for (index, member) in spec.members.iter().enumerate() {
            let id = block + u32::try_from(index)? + 1;
            let mut config = node_config(dir.path(), &certs, index, id);
            config.cluster.replication_factor = spec.replication_factor;
            config.cluster.vnodes_per_node = spec.vnodes_per_node;
            (spec.configure)(&mut config);
            let binary = match member {
                Member::Process => Some(
                    spec.node_binary
                        .clone()
                        .context("Member::Process needs ClusterSpec::node_binary")?,
                ),
                Member::Node | Member::Hanging => None,
            };
            let (addr, occupant) = match member {
                Member::Node => {
                    let node = Node::start(config.clone())
                        .await
                        .with_context(|| format!("starting node {id}"))?;
                    let addr = node.grpc_addr();
                    pending.push((id, node));
                    (addr, Occupant::Nothing)
                }
                Member::Hanging => {
                    let (hanging, addr) = HangingListener::bind(config.listen).await?;
                    (addr, Occupant::Hanging(hanging))
                }
                Member::Process => match spec.hosts.get(index) {
                    Some(host) => (SocketAddr::new(host.ip, HOST_NODE_PORT), Occupant::Nothing),
                    // A free port, chosen by the OS and handed to the process.
                    None => {
                        let addr = TcpListener::bind(config.listen).await?.local_addr()?;
                        (addr, Occupant::Nothing)
                    }
                },
            };
            // Restarts must come back where the map says the node is.
            config.listen = addr;
            slots.push(Slot {
                id,
                addr,
                config,
                real: *member != Member::Hanging,
                binary,
                launcher: spec
                    .hosts
                    .get(index)
                    .map(|h| h.launcher.clone())
                    .unwrap_or_default(),
                occupant,
            });
        }
        let members = InitialMembers::try_from(
            slots
                .iter()
                .map(|s| format!("{}={}", s.id, s.addr))
                .collect::<Vec<_>>()
                .join(","),
        )
        .map_err(anyhow::Error::msg)?;
        for slot in &mut slots {
            slot.config.cluster.initial_members = Some(members.clone());
        }
        for (id, mut node) in pending {
            node.set_initial_members(members.clone())?;
            let slot = slots.iter_mut().find(|s| s.id == id).context("slot")?;
            slot.occupant = serve_node(node);
        }
        for slot in slots.iter_mut().filter(|s| s.binary.is_some()) {
            let binary = slot.binary.as_deref().context("a node binary")?;
            let process = NodeProcess::start(&slot.launcher, binary, &slot.config)
                .await
                .with_context(|| format!("starting node process {}", slot.id))?;
            slot.occupant = Occupant::Process(process);
        }
        let ids: Vec<u32> = slots.iter().map(|s| s.id).collect();
        let ring = Ring::new(&ids, spec.vnodes_per_node, spec.replication_factor);

        // The nodes elect a leader, which commits the first map; each node
        // then catches up with its peers before it serves. The router
        // starts once they all do.
        let mut map = None;
        for slot in slots.iter().filter(|s| s.real) {
            let addr = slot.addr;
            poll_until(
                &format!("node {} to hold the cluster map and serve", slot.id),
                FORM_DEADLINE,
                || async {
                    node_map_at(&certs, addr).await.is_some()
                        && node_serving_at(&certs, addr).await == Some(true)
                },
            )
            .await;
            map = node_map_at(&certs, addr).await;
        }
        let map = map.context("the cluster formed no map")?;

        let secret_file = dir.path().join("jwt-secret");
        std::fs::write(&secret_file, JWT_SECRET)?;
        let config = RouterConfig {
            listen: "127.0.0.1:0".parse()?,
            https: Some(HttpsFiles {
                cert: certs.router.cert.clone(),
                key: certs.router.key.clone(),
            }),
            insecure_http: false,
            node_tls: certs.router.clone(),
            seeds: slots
                .iter()
                .filter(|s| s.real)
                .map(|s| s.addr.to_string())
                .collect(),
            auth: AuthConfig {
                hs256: vec![SecretKeyFile {
                    kid: None,
                    path: secret_file,
                }],
                ..AuthConfig::default()
            },
            limits: LimitsConfig::default(),
            nodes: spec.policy.clone(),
            idempotency: IdempotencyConfig::default(),
            metrics: caskade_router::config::MetricsConfig::default(),
            log: LogConfig::default(),
        };
        config.validate()?;
        let router_config = config.clone();
        let router = Router::start(config).await?;
        let url = format!("https://{}", router.local_addr());
        let (router_stop, stopped) = oneshot::channel::<()>();
        let router = tokio::spawn(router.serve(async {
            let _ = stopped.await;
        }));

        let ca_pem = std::fs::read(&certs.ca)?;
        let ca = reqwest::Certificate::from_pem(&ca_pem)?;
        let client = Client::builder()
            .tls_certs_only([ca])
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        let cluster = TestCluster {
            url,
            admin_token: token(Role::Admin)?,
            writer_token: token(Role::Writer)?,
            client,
            ca_pem,
            certs,
            map,
            ring,
            slots,
            router_stop,
            router,
            router_config,
            more_routers: Vec::new(),
            block,
            configure: spec.configure,
            spare_hosts: spec
                .hosts
                .get(spec.members.len()..)
                .unwrap_or_default()
                .to_vec(),
            node_binary: spec.node_binary,
            _dir: dir,
        };
        let nodes = cluster.slots.iter().filter(|s| s.real).count();
        poll_until(
            "the router to see every storage node ready",
            READY_DEADLINE,
            || async { cluster.nodes_ready().await == Some(nodes) },
        )
        .await;
        // A hanging listener never serves a copy: the keys it replicates
        // stay refused (tests write others), so there is no end to wait for.
        if cluster.slots.iter().all(|s| s.real) {
            poll_until(
                "every storage node to have taken over its primary ranges",
                READY_DEADLINE,
                || cluster.takeovers_done(),
            )
            .await;
        }
        Ok(cluster)
    }

    /// Whether every running storage node has put into effect the newest
    /// map it knows committed (and the router's, when one runs) and
    /// finished taking over the ranges it is the primary of (it takes their
    /// writes), asking each node itself.
    pub async fn takeovers_done(&self) -> bool {
        // The router's epoch, for the nodes its map holds and does not mark
        // down (a node removed from the map, or cut off, hears of no later
        // one).
        let page = self.admin_cluster().await.ok();
        let routers_epoch = |id: u32| {
            page.as_ref()
                .filter(|p| {
                    p["nodes"].as_array().is_some_and(|nodes| {
                        nodes.iter().any(|n| n["id"] == id && n["down"] == false)
                    })
                })
                .and_then(|p| p["epoch"].as_u64())
                .unwrap_or(0)
        };
        for slot in self
            .slots
            .iter()
            .filter(|s| matches!(s.occupant, Occupant::Node { .. } | Occupant::Process(_)))
        {
            let Ok(mut admin) = self.node_admin(slot.id).await else {
                return false;
            };
            let committed = match admin
                .get_cluster_map(caskade_proto::GetClusterMapRequest::default())
                .await
            {
                Ok(answer) => answer.into_inner().map.map_or(0, |m| m.epoch),
                Err(_) => return false,
            };
            match admin.stats(caskade_proto::StatsRequest {}).await {
                Ok(stats)
                    if stats.get_ref().taking_over_epoch == 0
                        && stats.get_ref().map_epoch >= committed.max(routers_epoch(slot.id)) => {}
                _ => return false,
            }
        }
        true
    }

    /// Stops the router, then the nodes, each gracefully; closes hanging listeners.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let TestCluster {
            client,
            slots,
            router_stop,
            router,
            more_routers,
            ..
        } = self;
        // Idle keep-alive connections would hold the router's graceful
        // shutdown for its whole grace period.
        drop(client);
        for (stop, router) in std::iter::once((router_stop, router)).chain(more_routers) {
            let _ = stop.send(());
            tokio::time::timeout(STOP_DEADLINE, router)
                .await
                .context("a router did not stop in time")???;
        }
        for slot in slots {
            stop_occupant(slot.occupant).await?;
        }
        Ok(())
    }

    /// Starts another router in front of the same nodes (its own state,
    /// seeded like the first); returns its base URL.
    pub async fn start_router(&mut self) -> anyhow::Result<String> {
        let router = Router::start(self.router_config.clone()).await?;
        let url = format!("https://{}", router.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(router.serve(async {
            let _ = stopped.await;
        }));
        self.more_routers.push((stop, task));
        let readyz = format!("{url}/readyz");
        poll_until("the new router to be ready", READY_DEADLINE, || async {
            self.client
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        Ok(url)
    }

    /// The node ids of the map, in slot order.
    pub fn node_ids(&self) -> Vec<u32> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// The address of node `id`.
    pub fn addr(&self, id: u32) -> SocketAddr {
        self.slot(id).addr
    }

    /// The map the cluster was started with.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// `key`'s preference list, computed as the router does.
    pub fn preference_list(&self, key: &[u8]) -> Vec<u32> {
        self.ring.preference_list(key)
    }

    /// `count` keys `{prefix}-{n}` whose preference list satisfies `wanted`.
    pub fn keys_where(
        &self,
        prefix: &str,
        count: usize,
        wanted: impl Fn(&[u32]) -> bool,
    ) -> Vec<String> {
        let keys: Vec<String> = (0..MAX_KEY_CANDIDATES)
            .map(|n| format!("{prefix}-{n}"))
            .filter(|key| wanted(&self.preference_list(key.as_bytes())))
            .take(count)
            .collect();
        assert_eq!(
            keys.len(),
            count,
            "no {count} keys with the wanted preference list among {MAX_KEY_CANDIDATES}"
        );
        keys
    }

    /// `count` keys whose preference list starts with node `id`.
    pub fn keys_with_primary(&self, id: u32, prefix: &str, count: usize) -> Vec<String> {
        self.keys_where(prefix, count, |list| list.first() == Some(&id))
    }

    /// Stops node `id` gracefully and waits until it has closed its listener.
    pub async fn stop_node(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot_mut(id);
        if !matches!(slot.occupant, Occupant::Node { .. } | Occupant::Process(_)) {
            bail!("node {id} is not running");
        }
        let occupant = std::mem::replace(&mut slot.occupant, Occupant::Nothing);
        stop_occupant(occupant).await
    }

    /// Starts one more storage node (in this process), not in the cluster
    /// map: a node to add with `POST /admin/v1/nodes`. Returns its id.
    pub async fn start_spare_node(&mut self) -> anyhow::Result<u32> {
        let index = self.slots.len();
        if index >= self.certs.nodes.len() {
            bail!("no certificate left for another node");
        }
        let id = self.block + u32::try_from(index)? + 1;
        let mut config = node_config(self._dir.path(), &self.certs, index, id);
        (self.configure)(&mut config);
        let node = Node::start(config.clone())
            .await
            .with_context(|| format!("starting spare node {id}"))?;
        let addr = node.grpc_addr();
        config.listen = addr;
        self.slots.push(Slot {
            id,
            addr,
            config,
            real: true,
            binary: None,
            launcher: Vec::new(),
            occupant: serve_node(node),
        });
        Ok(id)
    }

    /// Starts one more storage node as a process on the next spare host of
    /// [`ClusterSpec::hosts`], not in the cluster map: a node to add with
    /// `POST /admin/v1/nodes`. Returns its id.
    pub async fn start_spare_process(&mut self) -> anyhow::Result<u32> {
        let index = self.slots.len();
        if index >= self.certs.nodes.len() {
            bail!("no certificate left for another node");
        }
        if self.spare_hosts.is_empty() {
            bail!("no spare host left");
        }
        let host = self.spare_hosts[0].clone();
        let binary = self.node_binary.clone().context("no node binary")?;
        let id = self.block + u32::try_from(index)? + 1;
        let mut config = node_config(self._dir.path(), &self.certs, index, id);
        (self.configure)(&mut config);
        config.listen = SocketAddr::new(host.ip, HOST_NODE_PORT);
        let process = NodeProcess::start(&host.launcher, &binary, &config)
            .await
            .with_context(|| format!("starting spare node process {id}"))?;
        self.spare_hosts.remove(0);
        self.slots.push(Slot {
            id,
            addr: config.listen,
            config,
            real: true,
            binary: Some(binary),
            launcher: host.launcher,
            occupant: Occupant::Process(process),
        });
        Ok(id)
    }

    /// `POST /admin/v1/nodes` as the admin: asks the router to add node
    /// `id` (started, not yet in the map) at its address.
    pub async fn add_to_map(&self, id: u32) -> reqwest::Result<Response> {
        self.client
            .post(self.at("/admin/v1/nodes"))
            .bearer_auth(&self.admin_token)
            .json(&serde_json::json!({"id": id, "addr": self.addr(id).to_string()}))
            .send()
            .await
    }

    /// Stops node `id`, moves its data directory into `dir` (a small disk)
    /// and leaves a link where it was, so the node's configuration and its
    /// log stay as they were, and starts it again.
    pub async fn move_data_onto(&mut self, id: u32, dir: &std::path::Path) -> anyhow::Result<()> {
        self.stop_node(id).await?;
        let data_dir = self.node_config(id).data_dir.clone();
        let moved = dir.join(format!("node-{id}"));
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&data_dir)
            .arg(&moved)
            .status()?;
        if !copied.success() {
            bail!("copying node {id}'s data: {copied}");
        }
        std::fs::remove_dir_all(&data_dir)?;
        std::os::unix::fs::symlink(&moved, &data_dir)?;
        self.start_node(id).await
    }

    /// Every live key node `id` holds, read from the node itself: version,
    /// value and expiry by key.
    pub async fn scan_node(&self, id: u32) -> anyhow::Result<BTreeMap<Vec<u8>, NodeCopy>> {
        let mut kv = self.node_kv(id).await?;
        let mut all = BTreeMap::new();
        let mut after = Vec::new();
        loop {
            let page = kv
                .scan(ScanRequest {
                    prefix: Default::default(),
                    after: after.clone().into(),
                    limit: 1000,
                    include_values: true,
                    include_deleted: false,
                    epoch: 0,
                })
                .await?
                .into_inner();
            for entry in page.entries {
                let version = entry.version.map_or((0, 0), |v| (v.hlc, v.origin));
                all.insert(
                    entry.key.to_vec(),
                    (version, entry.value.to_vec(), entry.expires_at_ms),
                );
            }
            match page.next {
                Some(next) => after = next.to_vec(),
                None => return Ok(all),
            }
        }
    }

    /// Kills node `id`'s process with SIGKILL (a [`Member::Process`] node).
    pub fn kill_node(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot_mut(id);
        match std::mem::replace(&mut slot.occupant, Occupant::Nothing) {
            Occupant::Process(process) => process.kill(),
            other => {
                slot.occupant = other;
                bail!("node {id} is not a running process")
            }
        }
    }

    /// Sends `signal` (`STOP` freezes it, `CONT` thaws it) to node `id`'s
    /// process (a [`Member::Process`] node).
    pub fn signal_node(&self, id: u32, signal: &str) -> anyhow::Result<()> {
        match &self.slot(id).occupant {
            Occupant::Process(process) => process.signal(signal),
            _ => bail!("node {id} is not a running process"),
        }
    }

    /// The cluster's CA certificate (PEM), which signed the router's.
    pub fn ca_path(&self) -> &std::path::Path {
        &self.certs.ca
    }

    /// The operator's client certificate for the nodes, with its CA.
    pub fn client_tls(&self) -> &caskade_common::config::TlsFiles {
        &self.certs.client
    }

    /// The configuration node `id` starts with (its address included).
    pub fn node_config(&self, id: u32) -> &NodeConfig {
        &self.slot(id).config
    }

    /// Changes the configuration node `id` restarts with.
    pub fn set_node_config(&mut self, id: u32, config: NodeConfig) {
        self.slot_mut(id).config = config;
    }

    /// A `Kv` client straight to node `id`, as a cluster client (no router).
    pub async fn node_kv(&self, id: u32) -> anyhow::Result<KvClient<Channel>> {
        Ok(KvClient::new(
            node_channel(&self.certs, self.addr(id)).await?,
        ))
    }

    /// An `Admin` client straight to node `id`, as the operator's client.
    pub async fn node_admin(&self, id: u32) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::new(
            node_channel(&self.certs, self.addr(id)).await?,
        ))
    }

    /// A `Replication` client straight to node `id` (as a router repairing it).
    pub async fn node_replication(&self, id: u32) -> anyhow::Result<ReplicationClient<Channel>> {
        Ok(ReplicationClient::new(
            node_channel(&self.certs, self.addr(id)).await?,
        ))
    }

    /// Gives node `id` alone a record of `key` (`None`: a tombstone) with
    /// `version`, as a repair would; how many records it applied.
    pub async fn apply_on(
        &self,
        id: u32,
        key: &str,
        value: Option<&str>,
        version: caskade_proto::Version,
    ) -> anyhow::Result<u32> {
        let record = caskade_proto::ReplicatedRecord {
            key: key.as_bytes().to_vec().into(),
            value: value.unwrap_or_default().as_bytes().to_vec().into(),
            tombstone: value.is_none(),
            version: Some(version),
            expires_at_ms: 0,
        };
        let request = caskade_proto::ApplyRequest {
            records: vec![record],
            epoch: 0,
        };
        let mut client = self.node_replication(id).await?;
        Ok(client.apply(request).await?.into_inner().applied)
    }

    /// Node `id`'s own answer to a readiness check: `Some(true)` serving,
    /// `Some(false)` not serving (catching up, stopping), `None` no answer.
    pub async fn node_serving(&self, id: u32) -> Option<bool> {
        node_serving_at(&self.certs, self.addr(id)).await
    }

    /// Starts node `id` on its address (its data directory kept) after it
    /// was stopped, or in place of a hanging listener, which is closed
    /// first (that node joins the cluster from the initial members).
    pub async fn start_node(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot_mut(id);
        let previous = std::mem::replace(&mut slot.occupant, Occupant::Nothing);
        match previous {
            Occupant::Node { .. } => {
                slot.occupant = previous;
                bail!("node {id} is already running");
            }
            Occupant::Hanging(hanging) => hanging.close().await,
            Occupant::Process(process) => {
                slot.occupant = Occupant::Process(process);
                bail!("node {id} is already running");
            }
            Occupant::Nothing => {}
        }
        slot.occupant = match &slot.binary {
            Some(binary) => Occupant::Process(
                NodeProcess::start(&slot.launcher, binary, &slot.config)
                    .await
                    .with_context(|| format!("restarting node process {id} on {}", slot.addr))?,
            ),
            None => serve_node(
                Node::start(slot.config.clone())
                    .await
                    .with_context(|| format!("restarting node {id} on {}", slot.addr))?,
            ),
        };
        Ok(())
    }

    /// Stops node `id` and puts a hanging listener on its address: from
    /// now on connections to it are accepted and never answered.
    pub async fn hang_node(&mut self, id: u32) -> anyhow::Result<()> {
        self.stop_node(id).await?;
        let slot = self.slot_mut(id);
        let (hanging, _) = HangingListener::bind(slot.addr).await?;
        slot.occupant = Occupant::Hanging(hanging);
        Ok(())
    }

    fn slot(&self, id: u32) -> &Slot {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("node {id} is not in this cluster"))
    }

    fn slot_mut(&mut self, id: u32) -> &mut Slot {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("node {id} is not in this cluster"))
    }

    // ------------------------------------------------------------ HTTP

    /// The shared HTTPS client (HTTP/2 by ALPN), trusting only the cluster CA.
    /// Drop every clone before [`TestCluster::shutdown`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A new client with connections of its own.
    pub fn new_client(&self) -> anyhow::Result<Client> {
        self.client_with_timeout(REQUEST_TIMEOUT)
    }

    /// A new client whose requests may take up to `timeout`.
    pub fn client_with_timeout(&self, timeout: Duration) -> anyhow::Result<Client> {
        Ok(Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&self.ca_pem)?])
            .no_proxy()
            .timeout(timeout)
            .build()?)
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The URL of `key` (test keys are unreserved characters only).
    pub fn kv_url(&self, key: &str) -> String {
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
            "test keys need no percent-encoding: {key}"
        );
        self.at(&format!("/v1/kv/{key}"))
    }

    /// `GET` `key` at read level `r`, as the writer.
    pub async fn get_level(&self, key: &str, r: &str) -> reqwest::Result<Response> {
        self.client
            .get(format!("{}?r={r}", self.kv_url(key)))
            .bearer_auth(&self.writer_token)
            .send()
            .await
    }

    /// PUT `value` at `key` with write level `w` (`one`, `quorum`, `all`) as the writer.
    pub async fn put_level(&self, key: &str, value: &str, w: &str) -> reqwest::Result<Response> {
        self.client
            .put(format!("{}?w={w}", self.kv_url(key)))
            .bearer_auth(&self.writer_token)
            .body(value.to_string())
            .send()
            .await
    }

    /// `PUT key = value` with the writer token.
    pub async fn put(&self, key: &str, value: &str) -> reqwest::Result<Response> {
        self.client
            .put(self.kv_url(key))
            .bearer_auth(&self.writer_token)
            .body(value.to_string())
            .send()
            .await
    }

    /// `GET key` with the writer token.
    pub async fn get(&self, key: &str) -> reqwest::Result<Response> {
        self.client
            .get(self.kv_url(key))
            .bearer_auth(&self.writer_token)
            .send()
            .await
    }

    /// `GET /admin/v1/cluster`: what the router believes, node by node.
    /// Note that the page asks every node for its statistics through the
    /// router's per-node stack, so it is itself a call to each node.
    pub async fn admin_cluster(&self) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(self.at("/admin/v1/cluster"))
            .bearer_auth(&self.admin_token)
            .send()
            .await?;
        if response.status() != StatusCode::OK {
            bail!("/admin/v1/cluster answered {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Node `id`'s entry of `/admin/v1/cluster`.
    pub async fn admin_node(&self, id: u32) -> anyhow::Result<Value> {
        let page = self.admin_cluster().await?;
        page["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
            .cloned()
            .with_context(|| format!("node {id} missing from {page}"))
    }

    /// Waits until the map marks node `id` down and every running node has
    /// taken over the ranges it became the primary of: the dead node's keys
    /// take writes again. Needs failover on ([`quick_failover`]).
    pub async fn wait_failed_over(&self, id: u32) {
        poll_until(
            &format!("node {id} to be marked down and its ranges taken over"),
            FAILOVER_DEADLINE,
            || self.map_settled(id, true),
        )
        .await;
    }

    /// Whether the router's map marks node `id` `down` (or up, with `down`
    /// false), every node it does not mark down has adopted that map, and
    /// every running node has taken over the primary ranges it gained: each
    /// key's writes are taken by its primary under that map.
    pub async fn map_settled(&self, id: u32, down: bool) -> bool {
        let Ok(page) = self.admin_cluster().await else {
            return false;
        };
        let Some(nodes) = page["nodes"].as_array() else {
            return false;
        };
        let marked = nodes.iter().any(|n| n["id"] == id && n["down"] == down);
        let adopted = nodes
            .iter()
            .filter(|n| n["down"] == false)
            .all(|n| n["stats"]["map_epoch"] == page["epoch"]);
        marked && adopted && self.takeovers_done().await
    }

    /// Whether the admin page shows every node of the map ready, and every
    /// running node has taken over its primary ranges.
    pub async fn all_nodes_ready(&self) -> bool {
        let ready = self.admin_cluster().await.is_ok_and(|page| {
            page["nodes"]
                .as_array()
                .is_some_and(|nodes| nodes.iter().all(|n| n["ready"] == true))
        });
        ready && self.takeovers_done().await
    }

    /// `POST /admin/v1/nodes/{id}/merge` as the admin; the merge report.
    pub async fn merge_node(&self, id: u32) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(self.at(&format!("/admin/v1/nodes/{id}/merge")))
            .bearer_auth(&self.admin_token)
            .send()
            .await?;
        if response.status() != StatusCode::OK {
            bail!("merge of node {id} answered {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// `nodes_ready` of `/readyz` (which, unlike the admin page, calls no node).
    pub async fn nodes_ready(&self) -> Option<usize> {
        let response = self.client.get(self.at("/readyz")).send().await.ok()?;
        let body: Value = response.json().await.ok()?;
        body["nodes_ready"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
    }

    /// The Prometheus text of `/metrics` (calls no node).
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let response = self.client.get(self.at("/metrics")).send().await?;
        if response.status() != StatusCode::OK {
            bail!("/metrics answered {}", response.status());
        }
        Ok(Metrics(response.text().await?))
    }

    /// `caskade_router_breaker_state{node="id"}`: 0 closed, 1 half-open, 2 open.
    pub async fn breaker_gauge(&self, id: u32) -> anyhow::Result<Option<f64>> {
        Ok(self
            .metrics()
            .await?
            .value("caskade_router_breaker_state", &[("node", &id.to_string())]))
    }

    /// `caskade_router_retries_total` summed over this cluster's nodes.
    pub async fn retries(&self) -> anyhow::Result<f64> {
        let metrics = self.metrics().await?;
        Ok(self
            .node_ids()
            .iter()
            .filter_map(|id| {
                metrics.value("caskade_router_retries_total", &[("node", &id.to_string())])
            })
            .sum())
    }
}

/// A Prometheus text page.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let label_text = match rest {
                "" => "",
                _ => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            let found: BTreeMap<&str, &str> = label_text
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|(k, v)| found.get(k) == Some(v))
                .then(|| value.parse().ok())
                .flatten()
        })
    }
}

/// Checks `condition` every [`POLL_INTERVAL`] until it holds; panics naming
/// `what` if it does not within `deadline`.
pub async fn poll_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn token(role: Role) -> anyhow::Result<String> {
    Ok(issue_hs256(
        JWT_SECRET,
        &TokenRequest {
            subject: "caskade-tests",
            role,
            prefix: None,
            ttl: TOKEN_TTL,
            issuer: None,
            audience: None,
            kid: None,
        },
    )?)
}

fn serve_node(node: Node) -> Occupant {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(async {
        let _ = stopped.await;
    }));
    Occupant::Node { stop, task }
}

async fn stop_occupant(occupant: Occupant) -> anyhow::Result<()> {
    match occupant {
        Occupant::Node { stop, task } => {
            let _ = stop.send(());
            tokio::time::timeout(STOP_DEADLINE, task)
                .await
                .context("a node did not stop in time")???;
        }
        Occupant::Hanging(hanging) => hanging.close().await,
        Occupant::Process(process) => process.stop().await?,
        Occupant::Nothing => {}
    }
    Ok(())
}

/// A [`ClusterSpec::configure`] for suites about merged-away deletes: merge
/// keeps no tombstone (retention 0) and runs only when asked, files are
/// small so that records reach immutable files, and nothing is kept in the
/// replication feed, so pulls read the data files where the deletes are gone.
pub fn deletes_merge_away(config: &mut NodeConfig) {
    config.engine.merge.tombstone_retention_secs = 0;
    config.engine.merge.auto = false;
    config.engine.max_file_size = 16 << 10;
    config.replication.feed_bytes = 0;
}

/// The Raft leader marks a node down after a second without answers, so
/// that a dead node's keys get a new primary (off by default in the harness).
pub fn quick_failover(config: &mut NodeConfig) {
    config.cluster.failover_after_ms = 1000;
}

/// Full catch-ups a node of the admin page reports, summed over its peers.
pub fn full_catch_ups(node: &Value) -> u64 {
    node["stats"]["replication"].as_array().map_or(0, |peers| {
        peers
            .iter()
            .filter_map(|p| p["full_catch_ups"].as_u64())
            .sum()
    })
}

/// One node's copy of a key: version `(hlc, origin)`, value, expiry.
pub type NodeCopy = ((u64, u32), Vec<u8>, u64);

/// The configuration of node `id`, the `index`-th of the cluster in `dir`.
fn node_config(
    dir: &std::path::Path,
    certs: &ClusterCertFiles,
    index: usize,
    id: u32,
) -> NodeConfig {
    NodeConfig {
        id,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.join(format!("node-{id}")),
        backup_dir: Some(dir.join(format!("node-{id}-backups"))),
        tls: certs.nodes[index].clone(),
        engine: EngineConfig {
            durability: DurabilityMode::Never,
            ..EngineConfig::default()
        },
        cluster: ClusterConfig {
            failover_after_ms: 0,
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            ..ClusterConfig::default()
        },
        replication: Default::default(),
        server: ServerConfig {
            shutdown_grace_secs: NODE_SHUTDOWN_GRACE_SECS,
            ..ServerConfig::default()
        },
        metrics: MetricsConfig::default(),
        log: LogConfig::default(),
    }
}

/// A channel to the node at `addr` as the operator's client.
async fn node_channel(certs: &ClusterCertFiles, addr: SocketAddr) -> anyhow::Result<Channel> {
    let tls = TlsMaterial::load(&certs.client)?;
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.grpc_client("127.0.0.1"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the node at {addr}"))
}

/// The readiness the node at `addr` reports; `None` if it does not answer.
async fn node_serving_at(certs: &ClusterCertFiles, addr: SocketAddr) -> Option<bool> {
    let channel = node_channel(certs, addr).await.ok()?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "caskade.v1.Kv".into(),
        })
        .await
        .ok()?;
    Some(answer.get_ref().status == ServingStatus::Serving as i32)
}

/// The cluster map the node at `addr` holds, if it answers and has one.
async fn node_map_at(certs: &ClusterCertFiles, addr: SocketAddr) -> Option<ClusterMap> {
    let channel = node_channel(certs, addr).await.ok()?;
    AdminClient::new(channel)
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .ok()?
        .into_inner()
        .map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_values_are_found_by_name_and_labels() {
        let page = Metrics(
            "# TYPE caskade_router_breaker_state gauge\n\
             caskade_router_breaker_state{node=\"101\"} 2\n\
             caskade_router_breaker_state{node=\"10\"} 0\n\
             caskade_router_retries_total{node=\"10\"} 7\n\
             caskade_up 1\n"
                .to_string(),
        );
        let node = |id: &'static str| [("node", id)];
        assert_eq!(
            page.value("caskade_router_breaker_state", &node("101")),
            Some(2.0)
        );
        assert_eq!(
            page.value("caskade_router_breaker_state", &node("10")),
            Some(0.0)
        );
        assert_eq!(page.value("caskade_router_breaker_state", &node("1")), None);
        assert_eq!(
            page.value("caskade_router_retries_total", &node("10")),
            Some(7.0)
        );
        assert_eq!(page.value("caskade_up", &[]), Some(1.0));
        assert_eq!(page.value("caskade_router_breaker", &node("10")), None);
    }
}
