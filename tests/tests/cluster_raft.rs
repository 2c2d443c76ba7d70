//! The cluster map decided by the storage nodes' Raft group, driven from the
//! outside: `caskade-node` and `caskade-router` processes started from the
//! configuration files an operator writes, mutual TLS between them, HTTPS
//! in front, on loopback ports the OS picked. Nodes are killed (SIGKILL),
//! frozen (SIGSTOP) and started again with the same files.
//!
//! The map is read from every node itself (`Admin/GetClusterMap`, long
//! polled for the whole test), from the router's admin page and from the
//! answers of `POST /admin/v1/nodes`; wherever an epoch is seen, it must
//! have one content. Bad configurations are separate starts of the node
//! binary that must exit non-zero, say why on stderr and leave no data
//! directory behind.
//!
//! Every test is bounded by [`TEST_DEADLINE`]; conditions are polled with a
//! deadline, nothing sleeps to wait. Processes are killed when their guard
//! drops, so a failing test leaves nothing running, and it prints the tail
//! of every process's log.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use caskade_common::certs::{ClusterCertFiles, ensure_cluster_certs};
use caskade_common::config::TlsFiles;
use caskade_common::tls::TlsMaterial;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{ClusterMap, GetClusterMapRequest};
use caskade_router::auth::{Role, TokenRequest, issue_hs256};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

const NODE_BINARY: &str = env!("CARGO_BIN_EXE_caskade-node-process");
const ROUTER_BINARY: &str = env!("CARGO_BIN_EXE_caskade-router-process");

/// Bound on one whole test.
const TEST_DEADLINE: Duration = Duration::from_secs(50);
/// How long a process may take to accept connections.
const LISTEN_DEADLINE: Duration = Duration::from_secs(15);
/// How long the cluster may take to form and the router to see every node ready.
const FORM_DEADLINE: Duration = Duration::from_secs(20);
/// How long the survivors may take to elect a leader, or the leader to
/// mark a dead node down (failover after 2 s, probes, commit, router).
const ELECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long a dead node's ranges may take to get new primaries: marked
/// down, copied, the old lease waited out.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// How long a restarted or added node may take to catch up.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a node with a bad configuration may take to exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// Ceiling of one HTTP request to the router.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Ceiling of `POST /admin/v1/nodes` (a learner's catch-up included).
const CHANGE_REQUEST_TIMEOUT: Duration = Duration::from_secs(25);
/// Ceiling of one direct gRPC call to a node.
const GRPC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node's map is long-polled per call.
const MAP_WAIT_MS: u32 = 1000;
/// Pause between two checks of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Log lines shown per process when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// The `[cluster]` timings, short so that elections and failover happen
/// within a test.
#[derive(Debug, Clone, Copy)]
struct Timings {
    heartbeat_ms: u64,
    election_timeout_ms: u64,
    failover_after_ms: u64,
}

/// Heartbeat 100 ms, election 500 ms, failover after 2 s.
const FAST: Timings = Timings {
    heartbeat_ms: 100,
    election_timeout_ms: 500,
    failover_after_ms: 2000,
};

/// [`FAST`], but the leader never marks nodes down: the map's epoch moves
/// only when an operator changes it.
const FAST_NO_FAILOVER: Timings = Timings {
    failover_after_ms: 0,
    ..FAST
};

/// Held by each test while it runs: every test starts several node
/// processes and a router, and on two cores the suite's tests run at once
/// would starve each other's pulls past the acknowledgement timeout.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `test` with the crypto provider installed, one test at a time,
/// failing it after [`TEST_DEADLINE`] (its processes are killed as its
/// guards drop).
async fn bounded(test: impl Future<Output = ()>) {
    caskade_common::tls::install_crypto_provider();
    let _alone = ONE_AT_A_TIME.lock().await;
    if tokio::time::timeout(TEST_DEADLINE, test).await.is_err() {
        panic!("the test did not finish within {TEST_DEADLINE:?}");
    }
}

/// Checks `condition` every [`POLL_INTERVAL`] until it yields a value;
/// panics naming `what` if it does not within `deadline`.
async fn poll_for<T, F, Fut>(what: &str, deadline: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A server process started from a configuration file. Dropping it kills
/// it (SIGKILL) and reaps it.
#[derive(Debug)]
struct ServerProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    fn spawn(name: &str, binary: &str, config: &Path, log: &Path) -> ServerProcess {
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        // A clean environment: the test's own CASKADE_* variables would
        // override the file.
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({binary}): {e}"));
        ServerProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    async fn wait_listening(&mut self, addr: SocketAddr) {
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                panic!(
                    "{} exited with {status} before listening on {addr}; its log ends:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            assert!(
                started.elapsed() < LISTEN_DEADLINE,
                "{} not listening on {addr} after {LISTEN_DEADLINE:?}",
                self.name
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(name: &str, pid: u32) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{name} {pid} failed");
}

/// Processes frozen with SIGSTOP; SIGCONT on [`Frozen::thaw`] or drop,
/// so that a failing test does not leave them stopped.
#[derive(Debug)]
struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    fn freeze(pids: Vec<u32>) -> Frozen {
        let mut frozen = Frozen { pids: Vec::new() };
        for pid in pids {
            signal("STOP", pid);
            frozen.pids.push(pid);
        }
        frozen
    }

    fn thaw(mut self) {
        for pid in std::mem::take(&mut self.pids) {
            signal("CONT", pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.pids) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of `log`.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// `n` distinct loopback ports that were free a moment ago (the listeners
/// are held until all are chosen, so the OS gives different ones).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

// ---------------------------------------------------------------------------
// Configuration files, as the README shows them

/// `value` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(value: &str) -> String {
    serde_json::to_string(value).expect("a string serializes")
}

fn toml_path(path: &Path) -> String {
    toml_string(&path.display().to_string())
}

/// A node's configuration file with `cluster` as its `[cluster]` section.
fn node_toml(id: u32, listen: &str, data_dir: &Path, tls: &TlsFiles, cluster: &str) -> String {
    format!(
        "id = {id}\n\
         listen = {listen}\n\
         data_dir = {data_dir}\n\
         \n\
         [tls]\n\
         ca = {ca}\n\
         cert = {cert}\n\
         key = {key}\n\
         \n\
         [cluster]\n\
         {cluster}\
         \n\
         [log]\n\
         level = \"info\"\n",
        listen = toml_string(listen),
        data_dir = toml_path(data_dir),
        ca = toml_path(&tls.ca),
        cert = toml_path(&tls.cert),
        key = toml_path(&tls.key),
    )
}

/// The `[cluster]` section of a member of a new cluster.
fn founding_section(members: &str, replication_factor: u32, timings: Timings) -> String {
    format!(
        "initial_members = {members}\n\
         replication_factor = {replication_factor}\n\
         vnodes_per_node = 64\n\
         {timings}",
        members = toml_string(members),
        timings = timings_section(timings),
    )
}

/// The `[cluster]` section of a node that waits to be added: timings only.
fn timings_section(timings: Timings) -> String {
    format!(
        "failover_after_ms = {}\nheartbeat_ms = {}\nelection_timeout_ms = {}\n",
        timings.failover_after_ms, timings.heartbeat_ms, timings.election_timeout_ms
    )
}

// ---------------------------------------------------------------------------
// What the map looked like, wherever it was seen

/// A node's map in the form the router's admin API shows it, so that it
/// compares with the router's pages and answers.
fn map_content(map: &ClusterMap) -> Value {
    caskade_router::membership::map_json(map)
}

/// The map part of the admin page or of a `POST /admin/v1/nodes` answer.
fn json_content(page: &Value) -> Value {
    let nodes = page["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {page}"));
    json!({
        "epoch": page["epoch"],
        "replication_factor": page["replication_factor"],
        "vnodes_per_node": page["vnodes_per_node"],
        "nodes": nodes.iter().map(|n| json!({
            "id": n["id"],
            "addr": n["addr"],
            "state": n["state"],
            "down": n["down"],
        })).collect::<Vec<_>>(),
    })
}

/// How many times node `id` is in the map `content`.
fn occurrences(content: &Value, id: u32) -> usize {
    content["nodes"]
        .as_array()
        .expect("nodes is an array")
        .iter()
        .filter(|n| n["id"] == id)
        .count()
}

/// Every map content seen, by epoch, and every disagreement.
#[derive(Debug, Default)]
struct MapHistory {
    /// The lock guards both fields; it is never held across an await.
    inner: Mutex<HistoryInner>,
}

#[derive(Debug, Default)]
struct HistoryInner {
    /// epoch → (content, who saw it first).
    seen: BTreeMap<u64, (Value, String)>,
    /// Two contents for one epoch, or a node's epoch going back.
    violations: Vec<String>,
}

impl MapHistory {
    fn record(&self, source: &str, content: &Value) {
        let epoch = content["epoch"].as_u64().expect("an epoch");
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.seen.get(&epoch) {
            None => {
                inner
                    .seen
                    .insert(epoch, (content.clone(), source.to_string()));
            }
            Some((first, who)) if first != content => {
                let violation =
                    format!("epoch {epoch}: {who} saw {first}, but {source} saw {content}");
                inner.violations.push(violation);
            }
            Some(_) => {}
        }
    }

    fn violation(&self, violation: String) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .violations
            .push(violation);
    }

    fn epochs(&self) -> BTreeMap<u64, Value> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .seen
            .iter()
            .map(|(epoch, (content, _))| (*epoch, content.clone()))
            .collect()
    }

    fn assert_consistent(&self) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(
            inner.violations.is_empty(),
            "the map history is inconsistent:\n{}",
            inner.violations.join("\n")
        );
        assert!(!inner.seen.is_empty(), "no map was ever seen");
    }
}

/// Long-polls node `id`'s map until aborted, recording every map it
/// answers; the epoch one process reports must never go back.
async fn watch_node(id: u32, mut admin: AdminClient<Channel>, history: Arc<MapHistory>) {
    let source = format!("node {id}");
    let mut last = 0;
    loop {
        let request = GetClusterMapRequest {
            after_epoch: last,
            wait_ms: MAP_WAIT_MS,
        };
        let answer = tokio::time::timeout(GRPC_TIMEOUT, admin.get_cluster_map(request)).await;
        match answer {
            Ok(Ok(answer)) => {
                if let Some(map) = answer.into_inner().map {
                    if map.epoch < last {
                        history.violation(format!(
                            "{source} went back from epoch {last} to {}",
                            map.epoch
                        ));
                    }
                    history.record(&source, &map_content(&map));
                    last = map.epoch;
                }
            }
            // Killed, frozen or not started yet: ask again.
            _ => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

// ---------------------------------------------------------------------------
// A deployment: certificates, configuration files, processes

#[derive(Debug)]
struct NodeSlot {
    addr: SocketAddr,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<ServerProcess>,
    watcher: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct RouterSlot {
    url: String,
    log: PathBuf,
    _process: ServerProcess,
}

/// Nodes and a router in processes of their own, in a temporary
/// directory. Dropping it kills them all; unless [`Deployment::finish`]
/// was called, it first prints the tail of every log.
#[derive(Debug)]
struct Deployment {
    dir: TempDir,
    certs: ClusterCertFiles,
    secret_file: PathBuf,
    secret: Vec<u8>,
    timings: Timings,
    nodes: BTreeMap<u32, NodeSlot>,
    router: Option<RouterSlot>,
    https: Client,
    client_tls: TlsMaterial,
    history: Arc<MapHistory>,
    finished: bool,
}

impl Deployment {
    /// Certificates for nodes `1..=certified_nodes`, a router and a client,
    /// and an HS256 secret; nothing started.
    fn new(certified_nodes: u32, timings: Timings) -> Deployment {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certs = ensure_cluster_certs(&dir.path().join("certs"), certified_nodes, &[])
            .expect("the certificates are written");
        let secret = b"cluster-raft-test-secret-0123456789abcdef".to_vec();
        let secret_file = dir.path().join("jwt-secret");
        std::fs::write(&secret_file, &secret).expect("the secret is written");
        let ca_pem = std::fs::read(&certs.ca).expect("the CA is readable");
        let https = Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).expect("the CA is PEM")])
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("the HTTPS client builds");
        let client_tls = TlsMaterial::load(&certs.client).expect("the client certificate loads");
        Deployment {
            dir,
            certs,
            secret_file,
            secret,
            timings,
            nodes: BTreeMap::new(),
            router: None,
            https,
            client_tls,
            history: Arc::new(MapHistory::default()),
            finished: false,
        }
    }

    /// Gives nodes `ids` a loopback address each and returns the
    /// `initial_members` list naming them.
    fn allocate(&mut self, ids: &[u32]) -> String {
        let ports = free_ports(ids.len());
        for (&id, port) in ids.iter().zip(ports) {
            let slot = NodeSlot {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                config: self.dir.path().join(format!("node-{id}.toml")),
                data_dir: self.dir.path().join(format!("node-{id}")),
                log: self.dir.path().join(format!("node-{id}.log")),
                process: None,
                watcher: None,
            };
            self.nodes.insert(id, slot);
        }
        ids.iter()
            .map(|id| format!("{id}={}", self.nodes[id].addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn addr(&self, id: u32) -> String {
        self.nodes[&id].addr.to_string()
    }

    fn node_tls(&self, id: u32) -> &TlsFiles {
        &self.certs.nodes[id as usize - 1]
    }

    /// Writes node `id`'s file with `cluster` as its `[cluster]` section.
    fn write_node_config(&self, id: u32, cluster: &str) {
        let slot = &self.nodes[&id];
        let text = node_toml(
            id,
            &slot.addr.to_string(),
            &slot.data_dir,
            self.node_tls(id),
            cluster,
        );
        std::fs::write(&slot.config, text).expect("the node's configuration is written");
    }

    /// Node `id` as a member of a new cluster of `members`.
    fn write_founding_config(&self, id: u32, members: &str, replication_factor: u32) {
        self.write_node_config(
            id,
            &founding_section(members, replication_factor, self.timings),
        );
    }

    /// Node `id` without `initial_members`: it waits to be added.
    fn write_joining_config(&self, id: u32) {
        self.write_node_config(id, &timings_section(self.timings));
    }

    /// Starts node `id` from its file, waits until it listens, and starts
    /// recording the maps it answers.
    /// Allocates `ids`, writes each its founding configuration (RF 3, the
    /// members being `ids`) and starts them.
    async fn start_founders(&mut self, ids: &[u32]) {
        let members = self.allocate(ids);
        for &id in ids {
            self.write_founding_config(id, &members, 3);
        }
        for &id in ids {
            self.start_node(id).await;
        }
    }

    async fn start_node(&mut self, id: u32) {
        let client = self.admin_client(id);
        let history = Arc::clone(&self.history);
        let slot = self.nodes.get_mut(&id).expect("an allocated node");
        assert!(slot.process.is_none(), "node {id} is already running");
        let mut process =
            ServerProcess::spawn(&format!("node {id}"), NODE_BINARY, &slot.config, &slot.log);
        process.wait_listening(slot.addr).await;
        slot.process = Some(process);
        if let Some(old) = slot.watcher.take() {
            old.abort();
        }
        slot.watcher = Some(tokio::spawn(watch_node(id, client, history)));
    }

    /// SIGKILL.
    fn kill_node(&mut self, id: u32) {
        let slot = self.nodes.get_mut(&id).expect("an allocated node");
        let process = slot.process.take().expect("the node is running");
        drop(process);
        if let Some(watcher) = slot.watcher.take() {
            watcher.abort();
        }
    }

    fn pid(&self, id: u32) -> u32 {
        self.nodes[&id]
            .process
            .as_ref()
            .expect("the node is running")
            .pid()
    }

    /// Starts the router with nodes `seeds` as its seeds and waits until it
    /// listens.
    async fn start_router(&mut self, seeds: &[u32]) {
        let port = free_ports(1)[0];
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let seeds: Vec<String> = seeds
            .iter()
            .map(|id| toml_string(&self.addr(*id)))
            .collect();
        let router = &self.certs.router;
        let text = format!(
            "listen = {listen}\n\
             seeds = [{seeds}]\n\
             \n\
             [https]\n\
             cert = {cert}\n\
             key = {key}\n\
             \n\
             [node_tls]\n\
             ca = {ca}\n\
             cert = {cert}\n\
             key = {key}\n\
             \n\
             [[auth.hs256]]\n\
             path = {secret}\n\
             \n\
             [nodes]\n\
             health_interval_ms = 100\n\
             \n\
             [log]\n\
             level = \"info\"\n",
            listen = toml_string(&listen.to_string()),
            seeds = seeds.join(", "),
            cert = toml_path(&router.cert),
            key = toml_path(&router.key),
            ca = toml_path(&router.ca),
            secret = toml_path(&self.secret_file),
        );
        let config = self.dir.path().join("router.toml");
        std::fs::write(&config, text).expect("the router's configuration is written");
        let log = self.dir.path().join("router.log");
        let mut process = ServerProcess::spawn("the router", ROUTER_BINARY, &config, &log);
        process.wait_listening(listen).await;
        self.router = Some(RouterSlot {
            url: format!("https://{listen}"),
            log,
            _process: process,
        });
    }

    fn url(&self, path_and_query: &str) -> String {
        let router = self.router.as_ref().expect("the router is running");
        format!("{}{path_and_query}", router.url)
    }

    fn token(&self, role: Role) -> String {
        issue_hs256(
            &self.secret,
            &TokenRequest {
                subject: "cluster-raft-test",
                role,
                prefix: None,
                ttl: Duration::from_secs(3600),
                issuer: None,
                audience: None,
                kid: None,
            },
        )
        .expect("the secret signs tokens")
    }

    /// Waits until `/readyz` is 200 with `nodes` nodes ready.
    async fn wait_ready(&self, nodes: u64) {
        let readyz = self.url("/readyz");
        poll_for(
            &format!("the router's /readyz to be 200 with {nodes} nodes ready"),
            FORM_DEADLINE,
            || async {
                let response = self.https.get(&readyz).send().await.ok()?;
                let status = response.status();
                let body: Value = response.json().await.ok()?;
                (status == StatusCode::OK && body["nodes_ready"] == nodes).then_some(())
            },
        )
        .await;
    }

    /// Waits until the map marks `dead` down and every other node has put
    /// that map into effect and taken over the ranges it became the primary
    /// of: the dead node's keys take writes again. Returns the epoch.
    async fn wait_failed_over(&self, dead: u32) -> u64 {
        poll_for(
            &format!("node {dead} marked down and its ranges taken over"),
            FAILOVER_DEADLINE,
            || async {
                let page = self.cluster_page().await?;
                let epoch = page["epoch"].as_u64()?;
                let nodes = page["nodes"].as_array()?;
                let taken_over = nodes.iter().filter(|n| n["id"] != dead).all(|n| {
                    n["stats"]["map_epoch"] == epoch && n["stats"]["taking_over_epoch"] == 0
                });
                (page_node(&page, dead)?["down"] == true && taken_over).then_some(epoch)
            },
        )
        .await
    }

    /// `GET /admin/v1/cluster`, recorded in the history; `None` unless 200.
    async fn cluster_page(&self) -> Option<Value> {
        let response = self
            .https
            .get(self.url("/admin/v1/cluster"))
            .bearer_auth(self.token(Role::Admin))
            .send()
            .await
            .ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let page: Value = response.json().await.ok()?;
        self.history.record("the router", &json_content(&page));
        Some(page)
    }

    /// `POST /admin/v1/nodes` adding node `id` based on `epoch`: the status
    /// and body, or the client's error (a timeout) after
    /// [`CHANGE_REQUEST_TIMEOUT`].
    async fn add_node(&self, id: u32, epoch: u64) -> Result<(StatusCode, Value), reqwest::Error> {
        let response = self
            .https
            .post(self.url("/admin/v1/nodes"))
            .bearer_auth(self.token(Role::Admin))
            .timeout(CHANGE_REQUEST_TIMEOUT)
            .json(&json!({ "id": id, "addr": self.addr(id), "epoch": epoch }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status == StatusCode::OK {
            self.history.record("the POST answer", &json_content(&body));
        }
        Ok((status, body))
    }

    fn admin_client(&self, id: u32) -> AdminClient<Channel> {
        let channel = Endpoint::from_shared(format!("https://{}", self.addr(id)))
            .expect("a valid URI")
            .tls_config(self.client_tls.grpc_client("127.0.0.1"))
            .expect("a valid TLS configuration")
            .connect_timeout(GRPC_TIMEOUT)
            .connect_lazy();
        AdminClient::new(channel)
    }

    /// Node `id`'s map as it answers now, `None` if it has none or does not answer.
    /// The first map, once nodes 1 and 2 both hold it.
    async fn first_map_of_1_and_2(&self) -> ClusterMap {
        poll_for(
            "nodes 1 and 2 to commit the first map",
            FORM_DEADLINE,
            || async {
                let map = self.node_map(1).await?;
                (self.node_map(2).await? == map).then_some(map)
            },
        )
        .await
    }

    async fn node_map(&self, id: u32) -> Option<ClusterMap> {
        let request = GetClusterMapRequest {
            after_epoch: 0,
            wait_ms: 0,
        };
        let mut admin = self.admin_client(id);
        let answer = tokio::time::timeout(GRPC_TIMEOUT, admin.get_cluster_map(request))
            .await
            .ok()?
            .ok()?;
        let map = answer.into_inner().map?;
        self.history
            .record(&format!("node {id}"), &map_content(&map));
        Some(map)
    }

    /// `PUT /v1/kv/{key}{query}`.
    async fn put(&self, key: &str, value: &str, query: &str) -> StatusCode {
        let response = self
            .https
            .put(self.url(&format!("/v1/kv/{key}{query}")))
            .bearer_auth(self.token(Role::Writer))
            .body(value.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        let status = response.status();
        if !status.is_success() {
            // Why, for the failure message of the test.
            let body = response.text().await.unwrap_or_default();
            eprintln!("PUT {key}: {status} {body}");
        }
        status
    }

    /// `GET /v1/kv/{key}`: the status and body.
    async fn get(&self, key: &str) -> (StatusCode, String) {
        let response = self
            .https
            .get(self.url(&format!("/v1/kv/{key}")))
            .bearer_auth(self.token(Role::Reader))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {key}: {e}"));
        let status = response.status();
        (status, response.text().await.expect("a body"))
    }

    /// `DELETE /v1/kv/{key}{query}`.
    async fn delete(&self, key: &str, query: &str) -> StatusCode {
        self.https
            .delete(self.url(&format!("/v1/kv/{key}{query}")))
            .bearer_auth(self.token(Role::Writer))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {key}: {e}"))
            .status()
    }

    /// Every key under `prefix`, paging through `GET /v1/kv`.
    async fn list(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut after = String::new();
        for _ in 0..100 {
            let response = self
                .https
                // The tests' keys are unreserved characters only: no escaping.
                .get(self.url(&format!("/v1/kv?prefix={prefix}&limit=7&after={after}")))
                .bearer_auth(self.token(Role::Reader))
                .send()
                .await
                .expect("the router answers a list");
            assert_eq!(response.status(), StatusCode::OK, "listing {prefix}");
            let page: Value = response.json().await.expect("a JSON page");
            keys.extend(
                page["keys"]
                    .as_array()
                    .expect("keys is an array")
                    .iter()
                    .map(|k| k.as_str().expect("a key is text").to_string()),
            );
            match &page["next"] {
                Value::String(next) => after = next.clone(),
                _ => return keys,
            }
        }
        panic!("listing {prefix} did not end within 100 pages");
    }

    /// Marks the test passed: logs are not printed on drop.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for slot in self.nodes.values_mut() {
            if let Some(watcher) = slot.watcher.take() {
                watcher.abort();
            }
        }
        if self.finished {
            return;
        }
        for (id, slot) in &self.nodes {
            eprintln!("----- node {id} log ({}):\n{}", slot.addr, tail(&slot.log));
        }
        if let Some(router) = &self.router {
            eprintln!("----- router log:\n{}", tail(&router.log));
        }
    }
}

/// The entry of node `id` on the admin page.
fn page_node(page: &Value, id: u32) -> Option<&Value> {
    page["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

/// The leader the admin page names.
fn page_leader(page: &Value) -> Option<u32> {
    page["leader"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
}

fn value_of(key: &str) -> String {
    format!("value of {key}")
}

// ---------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_form_a_cluster_from_their_configuration_files() {
    bounded(async {
        let mut d = Deployment::new(3, FAST);
        d.start_founders(&[1, 2, 3]).await;
        d.start_router(&[1, 2, 3]).await;
        d.wait_ready(3).await;

        let page = d.cluster_page().await.expect("the admin page answers");
        assert_eq!(page["replication_factor"], 3, "{page}");
        let ids: Vec<u64> = page["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3], "the map holds the initial members: {page}");
        for id in 1..=3u32 {
            let node = page_node(&page, id).unwrap();
            assert_eq!(node["addr"], d.addr(id), "{page}");
            assert_eq!(node["state"], "active", "{page}");
        }

        // The data path over the map the Raft group committed.
        let mut live = BTreeMap::new();
        for i in 0..10 {
            let key = format!("raft-before-{i:02}");
            assert_eq!(
                d.put(&key, &value_of(&key), "").await,
                StatusCode::CREATED,
                "{key}"
            );
            live.insert(key.clone(), value_of(&key));
        }
        for (key, value) in &live {
            assert_eq!(d.get(key).await, (StatusCode::OK, value.clone()), "{key}");
        }
        assert_eq!(
            d.list("raft-before-").await,
            live.keys().cloned().collect::<Vec<_>>()
        );
        assert_eq!(d.delete("raft-before-00", "").await, StatusCode::NO_CONTENT);
        live.remove("raft-before-00");
        assert_eq!(d.get("raft-before-00").await.0, StatusCode::NOT_FOUND);

        // One node dies; once the map marks it down and its ranges have new
        // primaries, a majority of replicas acknowledges writes again.
        d.kill_node(3);
        d.wait_failed_over(3).await;
        // The first write may still find a new primary renewing its lease
        // under the new map (a 503): sent again, as a
        // client would, until the dead node's keys take writes.
        let first = "raft-during-00";
        let status = poll_for(
            "the first write after the failover",
            FAILOVER_DEADLINE,
            || async {
                let status = d.put(first, &value_of(first), "?w=quorum").await;
                (status != StatusCode::SERVICE_UNAVAILABLE).then_some(status)
            },
        )
        .await;
        assert!(status.is_success(), "{first} with node 3 dead: {status}");
        live.insert(first.to_string(), value_of(first));
        for i in 1..30 {
            let key = format!("raft-during-{i:02}");
            assert_eq!(
                d.put(&key, &value_of(&key), "?w=quorum").await,
                StatusCode::CREATED,
                "{key} with node 3 dead"
            );
            live.insert(key.clone(), value_of(&key));
        }
        assert_eq!(
            d.delete("raft-before-01", "?w=quorum").await,
            StatusCode::NO_CONTENT
        );
        live.remove("raft-before-01");

        // Started again with the same file: it rejoins, catches up (the
        // delete included) and is put back into service.
        d.start_node(3).await;
        let expected_keys = live.len() as u64;
        let page = poll_for(
            "node 3 back: ready, not down, holding as many keys as the others",
            CATCH_UP_DEADLINE,
            || async {
                let page = d.cluster_page().await?;
                let epoch = page["epoch"].as_u64()?;
                let all_in_service = (1..=3).all(|id| {
                    page_node(&page, id).is_some_and(|n| {
                        n["ready"] == true
                            && n["down"] == false
                            && n["stats"]["keys"] == expected_keys
                            && n["stats"]["map_epoch"] == epoch
                    })
                });
                all_in_service.then_some(page)
            },
        )
        .await;
        let keys: Vec<&Value> = (1..=3)
            .map(|id| &page_node(&page, id).unwrap()["stats"]["keys"])
            .collect();
        assert!(keys.iter().all(|k| **k == expected_keys), "{page}");

        for (key, value) in &live {
            assert_eq!(d.get(key).await, (StatusCode::OK, value.clone()), "{key}");
        }
        assert_eq!(d.get("raft-before-01").await.0, StatusCode::NOT_FOUND);
        d.history.assert_consistent();
        d.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_leader_killed_a_new_one_is_elected_and_changes_still_apply() {
    bounded(async {
        let mut d = Deployment::new(4, FAST);
        d.start_founders(&[1, 2, 3]).await;
        d.start_router(&[1, 2, 3]).await;
        d.wait_ready(3).await;

        let (old_leader, old_term) = poll_for("a leader", ELECTION_DEADLINE, || async {
            let page = d.cluster_page().await?;
            let leader = page_leader(&page)?;
            let term = page_node(&page, leader)?["stats"]["raft"]["term"].as_u64()?;
            Some((leader, term))
        })
        .await;
        d.kill_node(old_leader);
        let survivors: Vec<u32> = (1..=3).filter(|&id| id != old_leader).collect();

        let new_leader = poll_for("another leader", ELECTION_DEADLINE, || async {
            let page = d.cluster_page().await?;
            let leader = page_leader(&page).filter(|&l| l != old_leader)?;
            let term = page_node(&page, leader)?["stats"]["raft"]["term"].as_u64()?;
            assert!(
                term > old_term,
                "a new leader in term {term} after {old_term}: {page}"
            );
            Some(leader)
        })
        .await;
        assert!(survivors.contains(&new_leader));

        // The new leader's duties go on: the dead node is marked down, and
        // its ranges get new primaries.
        let epoch = d.wait_failed_over(old_leader).await;
        let key = "raft-after-election";
        assert_eq!(
            d.put(key, &value_of(key), "?w=quorum").await,
            StatusCode::CREATED
        );

        // A fourth node, started with no initial members, added by an operator.
        d.allocate(&[4]);
        d.write_joining_config(4);
        d.start_node(4).await;
        let (status, added) = d
            .add_node(4, epoch)
            .await
            .expect("the router answers the add");
        assert_eq!(status, StatusCode::OK, "{added}");
        assert_eq!(added["epoch"], epoch + 1, "one change, one epoch: {added}");
        assert_eq!(occurrences(&added, 4), 1, "{added}");
        let entry = added["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == 4)
            .unwrap();
        assert_eq!(entry["addr"], d.addr(4), "{added}");
        // A replica receiving its ranges; the leader makes it a primary
        // of them once it holds them.
        assert_eq!(entry["state"], "joining", "{added}");

        // Every live node applies it; node 4 becomes a voter.
        let added_epoch = epoch + 1;
        poll_for(
            "the survivors and node 4 to apply the add, node 4 a voter",
            CATCH_UP_DEADLINE,
            || async {
                for &id in survivors.iter().chain([4].iter()) {
                    let map = d.node_map(id).await?;
                    if map.epoch < added_epoch {
                        return None;
                    }
                }
                let page = d.cluster_page().await?;
                let leader = page_leader(&page)?;
                let voters = page_node(&page, leader)?["stats"]["raft"]["voters"].as_array()?;
                voters.contains(&json!(4)).then_some(())
            },
        )
        .await;

        // The old leader comes back with the same file: it takes the
        // group's map, whatever epoch it had, and is marked up again.
        d.start_node(old_leader).await;
        poll_for(
            "every node ready and not down, on one epoch",
            CATCH_UP_DEADLINE,
            || async {
                let page = d.cluster_page().await?;
                let epoch = page["epoch"].as_u64()?;
                let settled = (1..=4).all(|id| {
                    page_node(&page, id).is_some_and(|n| {
                        n["ready"] == true && n["down"] == false && n["stats"]["map_epoch"] == epoch
                    })
                });
                if !settled {
                    return None;
                }
                for id in 1..=4 {
                    if d.node_map(id).await?.epoch != epoch {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        assert_eq!(d.get(key).await, (StatusCode::OK, value_of(key)));

        // The epoch sequence: one content per epoch wherever it was seen,
        // node 4 absent before the add and present exactly once after it.
        d.history.assert_consistent();
        let epochs = d.history.epochs();
        assert_eq!(
            epochs.get(&added_epoch).map(|c| occurrences(c, 4)),
            Some(1),
            "the add's epoch was seen with node 4 once: {epochs:?}"
        );
        for (e, content) in &epochs {
            let expected = usize::from(*e >= added_epoch);
            assert_eq!(
                occurrences(content, 4),
                expected,
                "node 4 in the map of epoch {e}: {content}"
            );
        }
        d.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_cannot_change_the_map() {
    bounded(async {
        let mut d = Deployment::new(4, FAST_NO_FAILOVER);
        d.start_founders(&[1, 2, 3]).await;
        // Node 4 runs and could join: only the missing quorum can stop the add.
        d.allocate(&[4]);
        d.write_joining_config(4);
        d.start_node(4).await;
        d.start_router(&[1, 2, 3]).await;
        d.wait_ready(3).await;

        let (leader, before) = poll_for("a leader", ELECTION_DEADLINE, || async {
            let page = d.cluster_page().await?;
            Some((page_leader(&page)?, json_content(&page)))
        })
        .await;
        let epoch = before["epoch"].as_u64().unwrap();
        let followers: Vec<u32> = (1..=3).filter(|&id| id != leader).collect();

        // The two followers freeze: the leader is alone, a minority.
        let frozen = Frozen::freeze(followers.iter().map(|&id| d.pid(id)).collect());
        // So that the router proposes through the leader first, rather than
        // waiting on a frozen node.
        poll_for(
            "the router to see the frozen nodes not ready",
            ELECTION_DEADLINE,
            || async {
                let page = d.cluster_page().await?;
                followers
                    .iter()
                    .all(|&id| page_node(&page, id).is_some_and(|n| n["ready"] == false))
                    .then_some(())
            },
        )
        .await;
        match d.add_node(4, epoch).await {
            Ok((status, body)) => {
                assert_eq!(
                    status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "a minority answered the add with {body}"
                );
                assert_eq!(body["error"]["code"], "cluster_unavailable", "{body}");
            }
            Err(e) => assert!(
                e.is_timeout(),
                "the add failed otherwise than by no answer in time: {e}"
            ),
        }
        let alone = d.node_map(leader).await.expect("the leader answers");
        assert_eq!(
            map_content(&alone),
            before,
            "the map changed while the majority was frozen"
        );

        frozen.thaw();
        // Back together: the nodes agree on one map, and the Raft group is
        // exactly the map's nodes (a learner added for the refused change is
        // gone again, or the change completed).
        let after = poll_for(
            "the three nodes to agree once the majority is back",
            CATCH_UP_DEADLINE,
            || async {
                let mut maps = Vec::new();
                for id in 1..=3 {
                    maps.push(map_content(&d.node_map(id).await?));
                }
                if maps.iter().any(|m| *m != maps[0]) {
                    return None;
                }
                let page = d.cluster_page().await?;
                let leader = page_leader(&page)?;
                let raft = &page_node(&page, leader)?["stats"]["raft"];
                let mut group: Vec<u64> = raft["voters"]
                    .as_array()?
                    .iter()
                    .chain(raft["learners"].as_array()?)
                    .filter_map(Value::as_u64)
                    .collect();
                group.sort_unstable();
                let mut in_map: Vec<u64> = maps[0]["nodes"]
                    .as_array()?
                    .iter()
                    .filter_map(|n| n["id"].as_u64())
                    .collect();
                in_map.sort_unstable();
                (group == in_map).then(|| maps.remove(0))
            },
        )
        .await;
        let after_epoch = after["epoch"].as_u64().unwrap();
        match occurrences(&after, 4) {
            0 => assert_eq!(after, before, "the map moved without the add"),
            1 => assert_eq!(
                after_epoch,
                epoch + 1,
                "the add committed late must be the only change: {after}"
            ),
            n => panic!("node 4 is {n} times in the map: {after}"),
        }
        d.history.assert_consistent();
        for (e, content) in d.history.epochs() {
            assert!(
                occurrences(&content, 4) <= 1,
                "epoch {e} lists node 4 more than once"
            );
            if e <= epoch {
                assert_eq!(occurrences(&content, 4), 0, "epoch {e}: {content}");
            }
        }
        d.finish();
    })
    .await;
}

/// A start of the node binary that must be refused.
#[derive(Debug)]
struct BadStart {
    what: &'static str,
    id: u32,
    initial_members: String,
    replication_factor: u32,
    /// What stderr must say.
    says: &'static [&'static str],
}

impl BadStart {
    fn new(
        what: &'static str,
        id: u32,
        initial_members: String,
        replication_factor: u32,
    ) -> BadStart {
        BadStart {
            what,
            id,
            initial_members,
            replication_factor,
            says: &[],
        }
    }

    fn says(self, says: &'static [&'static str]) -> BadStart {
        BadStart { says, ..self }
    }

    fn check_stderr(&self, stderr: &str) {
        for fragment in self.says {
            assert!(
                stderr.contains(fragment),
                "{}: stderr lacks {fragment:?}: {stderr}",
                self.what
            );
        }
    }
}

/// Starts the node binary on `config` (written to `path`), which must exit
/// with a non-zero status within [`EXIT_DEADLINE`] without creating
/// `data_dir`; returns its exit code and stderr.
async fn start_rejected(path: &Path, config: &str, data_dir: &Path) -> (i32, String) {
    std::fs::write(path, config).expect("the configuration is written");
    let log = path.with_extension("stderr");
    let mut process = ServerProcess::spawn("a misconfigured node", NODE_BINARY, path, &log);
    let status = poll_for(
        &format!("the node started on {} to exit", path.display()),
        EXIT_DEADLINE,
        || {
            let exited = process
                .child
                .try_wait()
                .expect("the child can be waited for");
            async move { exited }
        },
    )
    .await;
    let stderr = std::fs::read_to_string(&log).expect("its stderr was kept");
    // An exit, not a crash by a signal.
    let code = status
        .code()
        .unwrap_or_else(|| panic!("the node started on\n{config}\ndied by {status}: {stderr}"));
    assert_ne!(
        code, 0,
        "the node started on\n{config}\nexited successfully: {stderr}"
    );
    assert!(
        !data_dir.exists(),
        "the node started on\n{config}\ncreated its data directory {}; stderr: {stderr}",
        data_dir.display()
    );
    (code, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_bad_or_disagreeing_configuration_exits_before_writing() {
    bounded(async {
        let mut d = Deployment::new(3, FAST_NO_FAILOVER);
        let members = d.allocate(&[1, 2, 3]);
        let [a, b, c] = [d.addr(1), d.addr(2), d.addr(3)];
        let unused = format!("127.0.0.1:{}", free_ports(1)[0]);

        // Settings that are wrong whatever else is running: exit status 2.
        let config_errors = [
            BadStart::new("no port", 1, format!("1=127.0.0.1,2={b}"), 2).says(&[
                "initial_members",
                "`1=127.0.0.1`",
                "host:port",
            ]),
            BadStart::new("id not a number", 1, format!("a=127.0.0.1:1,1={a}"), 1).says(&[
                "initial_members",
                "`a=127.0.0.1:1`",
                "id must be a number",
            ]),
            BadStart::new("id zero", 1, format!("0={b},1={a}"), 1)
                .says(&["initial_members", "id must be a number from 1"]),
            BadStart::new("this node not listed", 3, format!("1={a},2={b}"), 2)
                .says(&["initial_members does not name this node (id 3)"]),
            BadStart::new("port 0", 1, format!("1=127.0.0.1:0,2={b}"), 2).says(&[
                "initial_members",
                "`127.0.0.1:0`",
                "port from 1 to 65535",
            ]),
            BadStart::new("nonsense address", 1, format!("1=host:port,2={b}"), 2)
                .says(&["initial_members", "`host:port` is not host:port"]),
            BadStart::new("duplicate id", 1, format!("1={a},1={b}"), 1)
                .says(&["initial_members", "node id 1 is listed twice"]),
            BadStart::new("duplicate address", 1, format!("1={a},2={a}"), 1)
                .says(&["initial_members", "is listed twice"]),
            BadStart::new(
                "replication factor above the members",
                1,
                format!("1={a},2={b}"),
                3,
            )
            .says(&["replication_factor 3", "number of initial members (2)"]),
        ];
        for (n, bad) in config_errors.iter().enumerate() {
            let data_dir = d.dir.path().join(format!("bad-{n}-data"));
            let config = node_toml(
                bad.id,
                &d.addr(bad.id),
                &data_dir,
                d.node_tls(bad.id),
                &founding_section(&bad.initial_members, bad.replication_factor, d.timings),
            );
            let path = d.dir.path().join(format!("bad-{n}.toml"));
            let (code, stderr) = start_rejected(&path, &config, &data_dir).await;
            assert_eq!(
                code, 2,
                "{}: a configuration error exits 2: {stderr}",
                bad.what
            );
            bad.check_stderr(&stderr);
        }

        // Nodes 1 and 2 form the cluster of `members` (a majority of it).
        for id in [1, 2] {
            d.write_founding_config(id, &members, 3);
            d.start_node(id).await;
        }
        let formed = d.first_map_of_1_and_2().await;

        // Node 3 with a list or settings that describe another cluster:
        // refused by what answers at the listed addresses, before writing.
        let node_3_data = d.nodes[&3].data_dir.clone();
        let disagreeing = [
            BadStart::new(
                "another address for node 2",
                3,
                format!("1={a},2={unused},3={c}"),
                3,
            )
            .says(&["initial member 1", "belongs to cluster", "disagree"]),
            BadStart::new("another replication factor", 3, members.clone(), 2).says(&[
                "initial member",
                "belongs to cluster",
                "disagree",
            ]),
            BadStart::new("nodes 1 and 2 swapped", 3, format!("1={b},2={a},3={c}"), 3).says(&[
                "initial member 1",
                "answers as node 2",
                "initial_members",
            ]),
        ];
        for (n, bad) in disagreeing.iter().enumerate() {
            let config = node_toml(
                3,
                &c,
                &node_3_data,
                d.node_tls(3),
                &founding_section(&bad.initial_members, bad.replication_factor, d.timings),
            );
            let path = d.dir.path().join(format!("disagreeing-{n}.toml"));
            let (_, stderr) = start_rejected(&path, &config, &node_3_data).await;
            bad.check_stderr(&stderr);
        }
        for id in [1, 2] {
            assert_eq!(
                d.node_map(id).await.as_ref().map(map_content),
                Some(map_content(&formed)),
                "the refused starts changed node {id}'s map"
            );
        }

        // The same node with the agreeing file joins: the refusals were
        // about the files, not the node.
        d.write_founding_config(3, &members, 3);
        d.start_node(3).await;
        poll_for(
            "node 3 to take the cluster's map",
            CATCH_UP_DEADLINE,
            || async {
                let map = d.node_map(3).await?;
                (map_content(&map) == map_content(&formed)).then_some(())
            },
        )
        .await;
        d.history.assert_consistent();
        d.finish();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_the_id_of_a_running_node_exits_before_writing() {
    bounded(async {
        let mut d = Deployment::new(2, FAST_NO_FAILOVER);
        let members = d.allocate(&[1, 2]);
        // Node 1 starts and waits for node 2 to form the cluster.
        d.write_founding_config(1, &members, 2);
        d.start_node(1).await;

        // Node 2's machine is started with node 1's id: the address listed
        // for id 1 answers, but not with this process.
        let data_dir = d.nodes[&2].data_dir.clone();
        let config = node_toml(
            1,
            &d.addr(2),
            &data_dir,
            d.node_tls(2),
            &founding_section(&members, 2, d.timings),
        );
        let path = d.dir.path().join("node-2-as-1.toml");
        let (_, stderr) = start_rejected(&path, &config, &data_dir).await;
        let listed = format!("lists {} for this node (id 1)", d.addr(1));
        for fragment in [listed.as_str(), "another process answers there as node 1"] {
            assert!(
                stderr.contains(fragment),
                "stderr lacks {fragment:?}: {stderr}"
            );
        }

        // With its own id the same machine forms the cluster with node 1.
        d.write_founding_config(2, &members, 2);
        d.start_node(2).await;
        d.first_map_of_1_and_2().await;
    })
    .await;
}
