//! The `Admin` gRPC service: the cluster map (read, long-polled, changed
//! through the Raft group), engine counters, merge and backup.
//!
//! The map this node has *put into effect* is kept in
//! `<data_dir>/cluster-map.pb` (protobuf, written to a temporary file,
//! fsynced and renamed): the Raft group decides the map, and this record
//! says how far the node's data layer has followed it, so a node restarts
//! with the ranges it last served, then puts the newest committed map into
//! effect once its Raft state machine has it. It only moves to higher epochs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use caskade_common::version::unix_millis;
use caskade_proto::admin_server::Admin;
use caskade_proto::{
    BackupRequest, BackupResponse, ChangeClusterRequest, ChangeClusterResponse, ClockStatus,
    ClusterMap, GetClusterMapRequest, GetClusterMapResponse, MergeRequest, MergeResponse,
    PeerClock, PeerReplication, StatsRequest, StatsResponse,
};
use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::clock_offset::ClockReport;
use crate::files::{create_durably, write_atomically};
use crate::kv::{NodeCore, run_blocking};
use crate::status::engine_status;

/// Longest long poll of `GetClusterMap`.
const MAX_MAP_WAIT: Duration = Duration::from_secs(30);

/// File name of the stored cluster map.
pub(crate) const MAP_FILE: &str = "cluster-map.pb";

/// The cluster map as stored on this node.
#[derive(Debug)]
pub struct ClusterMapStore {
    path: PathBuf,
    /// The map last accepted; the lock also serializes writes of the file.
    current: Mutex<Option<ClusterMap>>,
}

impl ClusterMapStore {
    /// Loads the stored map of `data_dir`, if any.
    pub fn open(data_dir: &Path) -> io::Result<ClusterMapStore> {
        let path = data_dir.join(MAP_FILE);
        let current = match fs::read(&path) {
            Ok(raw) => Some(ClusterMap::decode(&raw[..]).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(ClusterMapStore {
            path,
            current: Mutex::new(current),
        })
    }

    /// The stored map.
    pub fn get(&self) -> Option<ClusterMap> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stores `map` if its epoch is higher than the stored one.
    pub fn set(&self, map: ClusterMap) -> Result<(), Status> {
        validate_map(&map)?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref() == Some(&map) {
            // The same map again (a retry, or a peer passed it on first).
            return Ok(());
        }
        if let Some(stored) = current.as_ref()
            && map.epoch <= stored.epoch
        {
            return Err(Status::aborted(format!(
                "epoch {} is not newer than the stored epoch {}",
                map.epoch, stored.epoch
            )));
        }
        write_atomically(&self.path, &map.encode_to_vec()).map_err(|e| {
            tracing::error!(error = %e, path = %self.path.display(), "storing the cluster map");
            Status::internal("could not store the cluster map")
        })?;
        *current = Some(map);
        Ok(())
    }
}

fn validate_map(map: &ClusterMap) -> Result<(), Status> {
    let invalid = |reason: String| Err(Status::invalid_argument(reason));
    if map.epoch == 0 {
        return invalid("epoch must be at least 1".into());
    }
    if map.nodes.is_empty() {
        return invalid("the map has no nodes".into());
    }
    if map.replication_factor == 0 || map.replication_factor as usize > map.nodes.len() {
        return invalid(format!(
            "replication_factor {} must be between 1 and the number of nodes ({})",
            map.replication_factor,
            map.nodes.len()
        ));
    }
    if map.vnodes_per_node == 0 || map.vnodes_per_node > 4096 {
        return invalid(format!(
            "vnodes_per_node {} must be between 1 and 4096",
            map.vnodes_per_node
        ));
    }
    let mut ids: Vec<u32> = map.nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return invalid("node ids must be unique".into());
    }
    if let Some(node) = map.nodes.iter().find(|n| n.addr.is_empty()) {
        return invalid(format!("node {} has no address", node.id));
    }
    Ok(())
}

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    core: Arc<NodeCore>,
    backup_dir: PathBuf,
    /// Set when the node stops: long polls answer at once, so that a
    /// graceful shutdown does not wait for them.
    stopping: watch::Receiver<bool>,
}

impl AdminService {
    /// A service over `core`, writing backups under `backup_dir`.
    pub fn new(core: Arc<NodeCore>, backup_dir: PathBuf, stopping: watch::Receiver<bool>) -> Self {
        AdminService {
            core,
            backup_dir,
            stopping,
        }
    }
}

impl NodeCore {
    /// Stores `map` if its epoch is newer than the stored one, and puts it
    /// into effect (ABORTED otherwise).
    pub async fn adopt_map(self: &Arc<Self>, map: ClusterMap) -> Result<(), Status> {
        if let Some(peers) = self.replication.peers_to_pull_again(&map) {
            // The cursor reset is durable before the map is: a crash in
            // between restarts with the old map and pulls too much, never
            // with the new map and cursors that skip its new ranges.
            let core = Arc::clone(self);
            run_blocking(move || {
                core.replication.cursors.reset(peers);
                core.replication
                    .cursors
                    .persist(&core.engine)
                    .map_err(|e| engine_status(&e))
            })
            .await?;
        }
        let stored = map.clone();
        let store = Arc::clone(&self.maps);
        run_blocking(move || store.set(map)).await?;
        // Waits for writes under way (an fsync each): not on a runtime thread.
        let core = Arc::clone(self);
        run_blocking(move || {
            core.replication.set_map(&stored);
            Ok(())
        })
        .await
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_cluster_map(
        &self,
        request: Request<GetClusterMapRequest>,
    ) -> Result<Response<GetClusterMapResponse>, Status> {
        let call = self
            .core
            .observer
            .start("GetClusterMap", request.metadata());
        let request = request.into_inner();
        let wait = Duration::from_millis(u64::from(request.wait_ms)).min(MAX_MAP_WAIT);
        let map = if wait.is_zero() {
            self.core.cluster.map()
        } else {
            let mut stopping = self.stopping.clone();
            tokio::select! {
                map = self.core.cluster.map_after(request.after_epoch, wait) => map,
                _ = stopping.wait_for(|s| *s) => self.core.cluster.map(),
            }
        };
        call.finish(Ok(Response::new(GetClusterMapResponse {
            map: map.map(|m| m.to_proto()),
            leader_id: self.core.cluster.leader().unwrap_or(0),
        })))
    }

    async fn change_cluster(
        &self,
        request: Request<ChangeClusterRequest>,
    ) -> Result<Response<ChangeClusterResponse>, Status> {
        let call = self
            .core
            .observer
            .start("ChangeCluster", request.metadata());
        let forwarded = request
            .metadata()
            .contains_key(caskade_proto::metadata::FORWARDED);
        let request = request.into_inner();
        let result = async move {
            let change = request
                .change
                .ok_or_else(|| Status::invalid_argument("change is required"))
                .and_then(|c| {
                    crate::cluster::from_proto_change(c).map_err(crate::status::change_status)
                })?;
            let map = self
                .core
                .cluster
                .change(request.expected_epoch, change.clone(), forwarded)
                .await
                .map_err(crate::status::change_status)?;
            tracing::info!(epoch = map.epoch, ?change, "cluster map change committed");
            Ok(Response::new(ChangeClusterResponse {
                map: Some(map.to_proto()),
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(result)
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let call = self.core.observer.start("Stats", request.metadata());
        let core = Arc::clone(&self.core);
        let result = run_blocking(move || Ok(stats_of(&core))).await;
        call.finish(result.map(Response::new))
    }

    async fn merge(
        &self,
        request: Request<MergeRequest>,
    ) -> Result<Response<MergeResponse>, Status> {
        let call = self.core.observer.start("Merge", request.metadata());
        let core = Arc::clone(&self.core);
        let result = async move {
            let report =
                run_blocking(move || core.engine.merge().map_err(|e| engine_status(&e))).await?;
            tracing::info!(?report, "merge requested by admin done");
            Ok(Response::new(MergeResponse {
                input_files: report.input_files as u64,
                output_files: report.output_files as u64,
                records_kept: report.records_kept,
                records_dropped: report.records_dropped,
                bytes_reclaimed: report.bytes_reclaimed,
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(result)
    }

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupResponse>, Status> {
        let call = self.core.observer.start("Backup", request.metadata());
        let core = Arc::clone(&self.core);
        let backup_dir = self.backup_dir.clone();
        let result = async move {
            let report = run_blocking(move || {
                create_durably(&backup_dir).map_err(|e| {
                    tracing::error!(error = %e, dir = %backup_dir.display(), "creating the backup directory");
                    Status::internal("could not create the backup directory")
                })?;
                let dest = backup_dir.join(format!("node-{}-{}", core.id, unix_millis()));
                core.engine.backup(&dest).map_err(|e| engine_status(&e))
            })
            .await?;
            tracing::info!(dir = %report.dir.display(), bytes = report.bytes, "backup done");
            Ok(Response::new(BackupResponse {
                path: report.dir.display().to_string(),
                files: report.files as u64,
                bytes: report.bytes,
                last_seq: report.last_seq,
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(result)
    }
}

/// The clock check as sent by `Admin/Stats`.
fn clock_status(report: &ClockReport) -> ClockStatus {
    ClockStatus {
        max_offset_ms: report.max_offset_ms,
        off: report.off,
        peers: report
            .peers
            .iter()
            .map(|&(peer_id, offset_ms, beyond_bound, age)| PeerClock {
                peer_id,
                offset_ms,
                beyond_bound,
                age_seconds: age.as_secs_f64(),
            })
            .collect(),
    }
}

/// The engine's counters as sent by `Admin/Stats`.
pub fn stats_of(core: &NodeCore) -> StatsResponse {
    let stats = core.engine.stats();
    let (map_epoch, taking_over_epoch) = core.replication.map_and_takeover_epochs();
    StatsResponse {
        node_id: core.id,
        keys: stats.keys,
        tombstones: stats.tombstones,
        live_bytes: stats.live_bytes,
        dead_bytes: stats.dead_bytes,
        files: stats.files as u64,
        merges: stats.merges,
        last_fsync_micros: stats.last_fsync_micros.unwrap_or(0),
        last_seq: stats.last_seq,
        tombstone_horizon: stats.tombstone_horizon,
        ready: core.replication.is_ready(),
        ring_epoch: core.replication.placement().map_or(0, |p| p.ring_epoch),
        raft: Some(core.cluster.status()),
        map_epoch,
        taking_over_epoch,
        anti_entropy_repaired: core.replication.anti_entropy().repaired,
        anti_entropy_last_full_round_age_seconds: core
            .replication
            .anti_entropy()
            .last_full_round
            .map_or(-1.0, |at| at.elapsed().as_secs_f64()),
        anti_entropy_exchanges: core.replication.anti_entropy().exchanges,
        disk_full: stats.full,
        writes_poisoned: stats.poisoned.is_some(),
        clock: Some(clock_status(&core.clock_guard.report())),
        peers: core
            .replication
            .lag()
            .into_iter()
            .map(|(peer_id, lag)| PeerReplication {
                peer_id,
                cursor: lag.cursor,
                peer_last_seq: lag.peer_last_seq,
                lag_records: lag.records(),
                lag_seconds: lag.seconds(core.replication.started()),
                reachable: lag.reachable,
                full_catch_ups: lag.full_catch_ups,
                short_of_space: lag.short_of_space,
                refilled_epoch: lag.refilled_epoch,
            })
            .collect(),
    }
}
