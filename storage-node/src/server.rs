//! Starting, serving and stopping a storage node.
//!
//! [`Node::start`] opens the engine, loads TLS material and binds the
//! listeners (port 0 picks free ones, which tests read back); [`Node::serve`]
//! runs the gRPC services over mutual TLS until `shutdown` resolves, then
//! stops gracefully: readiness turns `NOT_SERVING`, no new connections are
//! accepted, in-flight requests finish (for at most the grace period), and the
//! engine is synced and closed so the next start reads hints, not values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caskade_common::telemetry::{self, serve_metrics};
use caskade_common::tls::{TlsError, TlsMaterial};
use caskade_proto::admin_server::AdminServer;
use caskade_proto::kv_server::KvServer;
use caskade_proto::raft_server::RaftServer;
use caskade_proto::replication_server::ReplicationServer;
use metrics::{counter, gauge, histogram};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::admin::{AdminService, ClusterMapStore, stats_of};
use crate::clock::NodeClock;
use crate::clock_offset::{ClockGuard, ClockLayer};
use crate::cluster::service::RaftServer as RaftService;
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::InitialMembers;
use crate::config::{DurabilityMode, NodeConfig};
use crate::engine::{Engine, EngineError, FsyncObserver};
use crate::engine_threads::EngineThreads;
use crate::key_locks::KeyLocks;
use crate::kv::{KvService, NodeCore};
use crate::observe::Observer;
use crate::peers::PeerLinks;
use crate::replication::cursors::Cursors;
use crate::replication::feed::Feed;
use crate::replication::progress::RingProgress;
use crate::replication::service::ReplicationService;
use crate::replication::{Replication, antientropy, puller, takeover};

/// The readiness the health service reports: the `Kv` service's name.
const KV_SERVICE: &str = <KvServer<KvService> as tonic::server::NamedService>::NAME;
/// Largest gRPC message above `max_value_bytes`: room for the key and fields.
const MESSAGE_OVERHEAD: usize = 64 << 10;
/// How often readiness looks again at the clock verdict.
const CLOCK_RECHECK: Duration = Duration::from_secs(1);
/// Smallest decoding limit, so batches of small values fit.
const MIN_MESSAGE_BYTES: usize = 16 << 20;

/// Why a node could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum NodeError {
    /// TLS files missing, unreadable or not matching.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The engine refused to open (locked, corrupt, bad options…).
    #[error("opening the data directory: {0}")]
    Engine(#[from] EngineError),
    /// A listener could not be bound, or another I/O failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Invalid log settings.
    #[error("{0}")]
    Log(String),
    /// Settings that do not fit together.
    #[error(transparent)]
    Config(#[from] caskade_common::config::ConfigError),
    /// The cluster map's Raft state could not be opened, or the cluster
    /// could not be formed as configured.
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
}

/// A started node: engine open, listeners bound, not yet serving.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    core: Arc<NodeCore>,
    tls: TlsMaterial,
    links: PeerLinks,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

impl Node {
    /// Opens the engine and binds the listeners named by `config`.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        // Metric handles taken before the recorder exists would record nothing.
        telemetry::metrics_handle();
        let tls = TlsMaterial::load(&config.tls)?;
        let links = PeerLinks {
            tls: tls.clone(),
            clock: Arc::new(ClockGuard::new(
                config.id,
                config.cluster.max_clock_offset_ms,
            )),
        };
        // First: a node forming a cluster checks its initial members, and
        // that its own listed address leads to its listener, before it
        // writes anything. Other nodes bind only once they can serve, so
        // that peers and routers are refused meanwhile rather than left
        // waiting on a handshake.
        let early_grpc = if Cluster::forms_new_cluster(&config.data_dir, &config.cluster) {
            Some(telemetry::bind(config.listen, "gRPC").await?)
        } else {
            None
        };
        let cluster = Arc::new(
            Cluster::open(
                config.id,
                &config.data_dir,
                &config.cluster,
                &links,
                early_grpc.as_ref(),
            )
            .await?,
        );
        if config.cluster.standalone
            && let Some(id) = cluster.identity().get()
        {
            // Writes it acknowledged alone would reach the cluster later.
            return Err(NodeError::Config(
                caskade_common::config::ConfigError::Invalid(format!(
                    "cluster.standalone: {} belongs to cluster {id}; a node of a cluster cannot run alone",
                    config.data_dir.display()
                )),
            ));
        }
        if cluster.map().is_none() {
            // The Raft group has given this node no map yet, so a stored
            // one is not from it (a map written before maps were decided by
            // Raft, or by a Raft state since lost): it is not authoritative.
            let stale = config.data_dir.join(crate::admin::MAP_FILE);
            if stale.exists() {
                std::fs::remove_file(&stale)?;
            }
        }
        let node_label = config.id.to_string();
        let mut options = config.engine.options();
        let fsync_seconds =
            histogram!("caskade_engine_fsync_duration_seconds", "node" => node_label);
        let observer: FsyncObserver =
            Arc::new(move |d: Duration| fsync_seconds.record(d.as_secs_f64()));
        options.fsync_observer = Some(observer);
        let feed = Arc::new(Feed::new(config.replication.feed_bytes));
        let feed_in = Arc::clone(&feed);
        options.append_observer = Some(Arc::new(move |appended| feed_in.push(appended)));
        let data_dir = config.data_dir.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::open(&data_dir, options))
            .await
            .map_err(std::io::Error::other)??;
        feed.start_after(engine.stats().last_seq);
        let hlc = NodeClock::open(&config.data_dir, config.id, engine.max_version())?;
        let map = ClusterMapStore::open(&config.data_dir)?;
        let cursors = Cursors::open(&config.data_dir)?;
        let progress = RingProgress::open(&config.data_dir)?;
        let replication = Replication::new(
            config.id,
            config.replication.clone(),
            feed,
            cursors,
            progress,
            map.get().as_ref(),
            // In a cluster, forming one, or waiting to be added: no map
            // means no ranges yet.
            !config.cluster.standalone,
        );
        let grpc = match early_grpc {
            Some(listener) => listener,
            None => telemetry::bind(config.listen, "gRPC").await?,
        };
        let metrics = match config.metrics.listen {
            Some(addr) => Some(telemetry::bind(addr, "metrics").await?),
            None => None,
        };
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let core = Arc::new(NodeCore {
            id: config.id,
            engine: Arc::new(engine),
            hlc,
            observer: Observer::new(config.id),
            threads: EngineThreads::start(threads)?,
            writes_wait_for_fsync: config.engine.durability == DurabilityMode::Always,
            replication,
            maps: Arc::new(map),
            cluster,
            key_locks: KeyLocks::default(),
            clock_guard: Arc::clone(&links.clock),
        });
        Ok(Node {
            config,
            core,
            tls,
            links,
            grpc,
            metrics,
        })
    }

    /// The address the gRPC listener is bound to.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.listen)
    }

    /// The address of the `/metrics` listener, if one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Sets the members of a new cluster after the listeners are bound: for
    /// clusters in one process (`caskade local`, tests) whose nodes listen
    /// on ports the OS picks. Ignored by a node that belongs to a cluster.
    pub fn set_initial_members(&mut self, members: InitialMembers) -> Result<(), NodeError> {
        self.config.cluster.initial_members = Some(members);
        Ok(self.config.validate()?)
    }

    /// Serves until `shutdown` resolves, then stops gracefully.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let Node {
            config,
            core,
            tls,
            links,
            grpc,
            metrics,
        } = self;
        let grpc_addr = grpc.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        let metrics_task = metrics.map(|listener| {
            let refresh_core = Arc::clone(&core);
            let refresh = Arc::new(move || publish_engine_gauges(&refresh_core));
            tokio::spawn(serve_metrics(listener, refresh, stopped(stop_rx.clone())))
        });

        // NOT_SERVING until caught up with the peers; routers skip the node.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<KvServer<KvService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Readiness follows replication: not serving while catching up at
        // start or while joining the cluster after a map change; nor while
        // this node's clock is off from most of its peers'.
        let readiness = {
            let health = health.clone();
            let mut ready = core.replication.watch_ready();
            let mut clock_off = core.clock_guard.watch_off();
            let clock_guard = Arc::clone(&core.clock_guard);
            tokio::spawn(async move {
                loop {
                    let serving = *ready.borrow_and_update() && !*clock_off.borrow_and_update();
                    let status = if serving {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health.set_service_status(KV_SERVICE, status).await;
                    health.set_service_status("", status).await;
                    let changed = tokio::select! {
                        changed = ready.changed() => changed,
                        changed = clock_off.changed() => changed,
                        // The clock verdict also changes with time alone
                        // (measurements age, the wall clock steps).
                        () = tokio::time::sleep(CLOCK_RECHECK) => {
                            clock_guard.is_off();
                            Ok(())
                        }
                    };
                    if changed.is_err() {
                        return;
                    }
                }
            })
        };
        let initial = core
            .cluster
            .bootstrap(config.cluster.initial_members.as_ref())
            .await?;
        let pullers = tokio::spawn(puller::run(
            Arc::clone(&core),
            links.clone(),
            stop_rx.clone(),
        ));
        let takeovers = tokio::spawn(takeover::run(
            Arc::clone(&core),
            links.clone(),
            stop_rx.clone(),
        ));
        let maps = tokio::spawn(follow_maps(Arc::clone(&core), stop_rx.clone()));
        let anti_entropy = tokio::spawn(antientropy::run(
            Arc::clone(&core),
            links.clone(),
            stop_rx.clone(),
        ));
        let leader = tokio::spawn(cluster::leader::run(
            Arc::clone(&core.cluster),
            initial,
            links.clone(),
            stop_rx.clone(),
        ));

        let max_message = config
            .engine
            .max_value_bytes
            .saturating_add(MESSAGE_OVERHEAD)
            .max(MIN_MESSAGE_BYTES);
        let kv = KvServer::new(KvService::new(Arc::clone(&core)))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let replication = ReplicationServer::new(ReplicationService::new(Arc::clone(&core)))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let admin = AdminServer::new(AdminService::new(
            Arc::clone(&core),
            config.backup_dir(),
            stop_rx.clone(),
        ));
        let raft = RaftServer::new(RaftService::new(
            core.id,
            core.cluster.raft().clone(),
            Arc::clone(core.cluster.identity()),
            Arc::clone(core.cluster.machine()),
        ))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        let tls_config = tls.grpc_server().timeout(Duration::from_secs(
            config.server.tls_handshake_timeout_secs,
        ));
        let server = Server::builder()
            .tls_config(tls_config)?
            .max_concurrent_streams(config.server.max_concurrent_streams)
            .layer(ClockLayer::new(Arc::clone(&core.clock_guard)))
            .add_service(health_service)
            .add_service(kv)
            .add_service(replication)
            .add_service(admin)
            .add_service(raft);

        tracing::info!(node = core.id, grpc = %grpc_addr, data_dir = %config.data_dir.display(), "serving");
        let drain = Duration::from_millis(config.server.shutdown_drain_ms);
        let on_stop = {
            let health = health.clone();
            let stop_rx = stop_rx.clone();
            async move {
                stopped(stop_rx).await;
                readiness.abort();
                health.set_not_serving::<KvServer<KvService>>().await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                if !drain.is_zero() {
                    tracing::info!(
                        ?drain,
                        "shutting down: reporting not serving while routers notice"
                    );
                    tokio::time::sleep(drain).await;
                }
                tracing::info!("shutting down: finishing in-flight requests");
            }
        };
        let grace = drain + Duration::from_secs(config.server.shutdown_grace_secs);
        let serving = server.serve_with_incoming_shutdown(incoming, on_stop);
        tokio::select! {
            result = serving => result?,
            () = async { stopped(stop_rx).await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "grace period over; dropping open connections");
            }
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        // Both hold the node's state; they are gone once awaited, so the
        // engine and the Raft database close (and unlock) below.
        leader.abort();
        maps.abort();
        let _ = leader.await;
        let _ = maps.await;
        core.cluster.shutdown().await;
        // The pullers stop with the server and store their cursors last.
        if let Err(e) = pullers.await {
            tracing::error!(error = %e, "replication task failed");
        }
        if let Err(e) = takeovers.await {
            tracing::error!(error = %e, "takeover task failed");
        }
        if let Err(e) = anti_entropy.await {
            tracing::error!(error = %e, "anti-entropy task failed");
        }
        close_engine(core).await
    }
}

/// Starts a node from `config` and serves until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    Node::start(config).await?.serve(shutdown).await
}

/// Puts the maps the Raft group commits into effect on this node (ranges
/// to pull, to refuse, to drop), one epoch after the other while the Raft
/// state machine still has each (a snapshot installed skips epochs; what a
/// map change does is computed from the map in effect and the new one, so
/// that is safe, only slower for writes in flight). A map that could not be
/// put into effect (a failed cursor write) is tried again.
async fn follow_maps(core: Arc<NodeCore>, stop: watch::Receiver<bool>) {
    let mut maps = core.cluster.watch();
    // After a failure, the newest map only: an intermediate one that
    // cannot be put into effect (its cursor reset needs an engine sync that
    // a failed disk refuses) must not hold back the ones after it.
    let mut newest_only = false;
    loop {
        maps.borrow_and_update();
        let adopted = core.maps.get().map_or(0, |m| m.epoch);
        // Each epoch in turn where this node still has them: what a peer
        // acknowledged, or a lease it confirmed, under one epoch still
        // counts under the next for the keys that kept their roles (see
        // `Replication::kept_roles`), which a skipped epoch cannot tell.
        let pending = if newest_only {
            core.cluster
                .map()
                .into_iter()
                .filter(|m| m.epoch > adopted)
                .collect()
        } else {
            core.cluster.maps_after(adopted)
        };
        let mut again = false;
        for map in pending {
            let epoch = map.epoch;
            if let Err(status) = core.adopt_map(map.to_proto()).await {
                tracing::error!(epoch, error = %status.message(), "putting the cluster map into effect; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stopped(stop.clone()) => return,
                }
                again = true;
                newest_only = true;
                break;
            }
            tracing::info!(epoch, "cluster map in effect");
        }
        if again {
            continue;
        }
        newest_only = false;
        tokio::select! {
            changed = maps.changed() => if changed.is_err() { return },
            () = stopped(stop.clone()) => return,
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Syncs and closes the engine. Requests still running on the blocking pool
/// (after an expired grace period) hold the engine; it is then synced and
/// left to close when they finish.
async fn close_engine(core: Arc<NodeCore>) -> Result<(), NodeError> {
    let engine = Arc::clone(&core.engine);
    drop(core);
    tokio::task::spawn_blocking(move || match Arc::try_unwrap(engine) {
        Ok(engine) => engine.close(),
        Err(shared) => {
            tracing::warn!("requests still running at shutdown; syncing without closing");
            shared.sync()
        }
    })
    .await
    .map_err(std::io::Error::other)??;
    tracing::info!("engine closed");
    Ok(())
}

/// Publishes the engine's counters as gauges (called before each scrape).
fn publish_engine_gauges(core: &NodeCore) {
    let stats = stats_of(core);
    let node = core.id.to_string();
    let set =
        |name: &'static str, value: u64| gauge!(name, "node" => node.clone()).set(value as f64);
    set("caskade_engine_keys", stats.keys);
    set("caskade_engine_tombstones", stats.tombstones);
    set("caskade_engine_live_bytes", stats.live_bytes);
    set("caskade_engine_dead_bytes", stats.dead_bytes);
    set("caskade_engine_files", stats.files);
    set("caskade_engine_last_seq", stats.last_seq);
    counter!("caskade_engine_merges_total", "node" => node.clone()).absolute(stats.merges);
    match rustix::fs::statvfs(core.engine.dir()) {
        Ok(fs) => {
            let block = fs.f_frsize;
            set("caskade_node_disk_total_bytes", fs.f_blocks * block);
            set("caskade_node_disk_available_bytes", fs.f_bavail * block);
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the data directory's file system size"),
    }
    set("caskade_node_disk_full", u64::from(stats.disk_full));
    set("caskade_engine_poisoned", u64::from(stats.writes_poisoned));
    set(
        crate::clock_offset::names::CLOCK_OFF,
        u64::from(core.clock_guard.is_off()),
    );
    core.observer.publish_in_flight();
    let replication = &core.replication;
    gauge!("caskade_node_ready", "node" => node.clone()).set(f64::from(u8::from(stats.ready)));
    if let Some(at) = replication.anti_entropy().last_full_round {
        let when = SystemTime::now()
            .checked_sub(at.elapsed())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        gauge!("caskade_node_anti_entropy_last_full_round_timestamp_seconds", "node" => node.clone())
            .set(when);
    }
    for (peer, lag) in replication.lag() {
        let labels = [("node", node.clone()), ("peer", peer.to_string())];
        gauge!("caskade_node_replication_lag_records", &labels).set(lag.records() as f64);
        gauge!("caskade_node_replication_lag_seconds", &labels)
            .set(lag.seconds(replication.started()));
    }
}
