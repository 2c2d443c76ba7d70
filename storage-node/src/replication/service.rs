//! The `Replication` gRPC service: what peers pull from this node, and the
//! records routers send to repair stale replicas.
//!
//! `Pull` answers from the in-memory feed when it can and from the data
//! files otherwise (each peer's on-disk read is kept between pulls, so a
//! long catch-up reads the log once, not once per page). `Snapshot` pages
//! through the keydir for a full catch-up. Served while the node is still
//! catching up itself: a cluster restarting as a whole must be able to
//! catch up from each other.

use std::sync::Arc;
use std::time::Duration;

use caskade_common::Version;
use caskade_common::version::unix_millis;
use caskade_proto::replication_server::Replication as ReplicationApi;
use caskade_proto::{
    ApplyRequest, ApplyResponse, DigestRequest, DigestResponse, PullRequest, PullResponse,
    ReplicatedRecord, SnapshotRequest, SnapshotResponse, VersionsRequest, VersionsResponse,
};
use prost::bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Placement;
use super::antientropy::{self, MAX_BUCKETS};
use super::feed::FeedRecord;
use super::inference;
use crate::engine::{Latest, Record, WriteOutcome};
use crate::kv::{NodeCore, to_proto};
use crate::status::engine_status;

/// Records per answer when the puller does not say.
const DEFAULT_MAX_RECORDS: u32 = 1000;
/// Most records per answer.
const MAX_RECORDS: u32 = 10_000;
/// Records (or keys) looked at per answer, per record asked for: bounds the
/// work of one pull when few records belong to the puller's ranges.
const EXAMINED_PER_RECORD: usize = 16;
/// Longest a pull may wait for new records.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Most records in one repair.
const MAX_APPLY_RECORDS: usize = 1000;
/// Record bytes per answer, past which it ends early (it always holds at
/// least one record).
const MAX_ANSWER_BYTES: usize = 8 << 20;
/// How far ahead of this node's clock a repaired record's version may be: a
/// version far in the future would drag this node's clock along with it.
pub const MAX_CLOCK_AHEAD_MS: u64 = 10 * 60 * 1000;
pub use caskade_proto::metadata::LOG_REPLACED as LOG_REPLACED_METADATA;

/// The `Replication` service.
#[derive(Debug, Clone)]
pub struct ReplicationService {
    core: Arc<NodeCore>,
}

impl ReplicationService {
    /// A service over `core`.
    pub fn new(core: Arc<NodeCore>) -> ReplicationService {
        ReplicationService { core }
    }
}

#[tonic::async_trait]
impl ReplicationApi for ReplicationService {
    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let call = self.core.observer.start("Pull", request.metadata());
        let request = request.into_inner();
        let result = pull(Arc::clone(&self.core), request)
            .instrument(call.span())
            .await;
        call.finish(result.map(Response::new))
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let call = self.core.observer.start("Snapshot", request.metadata());
        let request = request.into_inner();
        let core = Arc::clone(&self.core);
        let result = async move {
            let placement = puller_placement(&core, request.node_id, request.epoch)?;
            core.read(move |core| snapshot_page(core, &placement, &request))
                .await
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let call = self.core.observer.start("Digest", request.metadata());
        let request = request.into_inner();
        let core = Arc::clone(&self.core);
        let result = async move {
            if !(1..=MAX_BUCKETS).contains(&request.buckets) {
                return Err(Status::invalid_argument(format!(
                    "{} buckets; 1 to {MAX_BUCKETS} are allowed",
                    request.buckets
                )));
            }
            let placement = puller_placement(&core, request.node_id, request.epoch)?;
            antientropy::check_holds_all_ranges(&core)?;
            let digests = core
                .read(move |core| {
                    antientropy::digests(
                        core,
                        &placement,
                        request.node_id,
                        request.buckets,
                        request.retired_before_ms,
                    )
                })
                .await?;
            Ok(DigestResponse { digests })
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn versions(
        &self,
        request: Request<VersionsRequest>,
    ) -> Result<Response<VersionsResponse>, Status> {
        let call = self.core.observer.start("Versions", request.metadata());
        let request = request.into_inner();
        let core = Arc::clone(&self.core);
        let result = async move {
            if request.keys.len() > inference::MAX_KEYS {
                return Err(Status::invalid_argument(format!(
                    "{} keys; at most {} are allowed",
                    request.keys.len(),
                    inference::MAX_KEYS
                )));
            }
            puller_placement(&core, request.node_id, request.epoch)?;
            let held = core
                .read(move |core| Ok(inference::held_versions(core, &request.keys)))
                .await?;
            Ok(VersionsResponse { held })
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let call = self.core.observer.start("Apply", request.metadata());
        let request = request.into_inner();
        let core = Arc::clone(&self.core);
        let result = async move {
            if request.records.len() > MAX_APPLY_RECORDS {
                return Err(Status::invalid_argument(format!(
                    "{} records, more than the maximum of {MAX_APPLY_RECORDS}",
                    request.records.len()
                )));
            }
            let mut records = Vec::with_capacity(request.records.len());
            let horizon = unix_millis().saturating_add(MAX_CLOCK_AHEAD_MS);
            for record in request.records {
                if record
                    .version
                    .is_some_and(|v| Version::new(v.hlc, v.origin).physical_ms() > horizon)
                {
                    return Err(Status::invalid_argument(
                        "a record's version is more than 10 minutes ahead of this node's clock",
                    ));
                }
                records.push(from_proto(record)?);
            }
            let epoch = request.epoch;
            let applied = core.write(move |core| repair(core, epoch, records)).await?;
            Ok(Response::new(ApplyResponse {
                applied: applied as u32,
            }))
        }
        .instrument(call.span())
        .await;
        call.finish(result)
    }
}

/// Applies records written elsewhere, where writes run; how many were newer
/// than what this node held.
pub async fn apply(core: &Arc<NodeCore>, records: Vec<Record>) -> Result<usize, Status> {
    if records.is_empty() {
        return Ok(0);
    }
    core.write(move |core| apply_now(core, records)).await
}

/// Applies records written elsewhere, on this thread; how many were newer
/// than what this node held.
pub(super) fn apply_now(core: &NodeCore, records: Vec<Record>) -> Result<usize, Status> {
    if let Some(newest) = records.iter().map(|r| r.version).max() {
        // Versions this node assigns from now on must beat what it has seen.
        core.hlc.observe(newest);
    }
    let outcomes = core.engine.apply(records).map_err(|e| engine_status(&e))?;
    Ok(outcomes
        .iter()
        .filter(|o| matches!(o, WriteOutcome::Applied { .. }))
        .count())
}

/// Applies records received from a peer in their wire form; how many
/// were received.
pub async fn apply_received(
    core: &Arc<NodeCore>,
    received: Vec<ReplicatedRecord>,
) -> Result<u64, Status> {
    let records = received
        .into_iter()
        .map(from_proto)
        .collect::<Result<Vec<Record>, _>>()?;
    let count = records.len() as u64;
    apply(core, records).await?;
    Ok(count)
}

/// Applies a repair sent under map `epoch`; how many records were newer.
///
/// A repair made under another epoch is refused whole, and the check holds
/// until the records are appended: a quorum read that writes back a value
/// it found must not reach a node whose newer map has another primary,
/// which may already have copied the range without it.
fn repair(core: &NodeCore, epoch: u64, records: Vec<Record>) -> Result<usize, Status> {
    let _placement = core.replication.hold_placement();
    match core.replication.placement() {
        Some(placement) if epoch != 0 && epoch != placement.epoch => {
            return Err(Status::aborted(format!(
                "repair under cluster map epoch {epoch}, but this node has epoch {}",
                placement.epoch
            )));
        }
        // In a cluster with no map in effect, it knows none of its ranges.
        None if core.replication.needs_map() => {
            return Err(Status::failed_precondition("this node has no cluster map"));
        }
        _ => {}
    }
    // A router with an older map may repair a node that no longer holds
    // the key; that copy would only be dropped again.
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| core.replication.check_replica(&r.key).is_ok())
        .collect();
    apply_now(core, records)
}

/// The placement a pull or snapshot by `puller` with `epoch` is served under.
fn puller_placement(core: &NodeCore, puller: u32, epoch: u64) -> Result<Arc<Placement>, Status> {
    let placement = core
        .replication
        .placement()
        .ok_or_else(|| Status::failed_precondition("this node has no cluster map"))?;
    if epoch != placement.epoch {
        return Err(Status::aborted(format!(
            "pull with cluster map epoch {epoch}, but this node has epoch {}",
            placement.epoch
        )));
    }
    if puller == core.id || !placement.addrs.contains_key(&puller) {
        return Err(Status::invalid_argument(format!(
            "node {puller} is not a peer in cluster map epoch {epoch}"
        )));
    }
    Ok(placement)
}

async fn pull(core: Arc<NodeCore>, request: PullRequest) -> Result<PullResponse, Status> {
    let replication = &core.replication;
    let placement = puller_placement(&core, request.node_id, request.epoch)?;
    let peer = request.node_id;
    let after = request.after;
    if after > replication.feed.last_seq() {
        let mut status = Status::out_of_range(format!(
            "cursor {after} is past the end of this node's log ({}): its data was replaced; take a snapshot",
            replication.feed.last_seq()
        ));
        status.metadata_mut().insert(
            LOG_REPLACED_METADATA,
            tonic::metadata::MetadataValue::from(1u64),
        );
        return Err(status);
    }
    // Only a cursor into this incarnation's log acknowledges anything: one
    // from before a crash may count records that were lost.
    let acknowledges = request.incarnation == replication.incarnation;
    if acknowledges {
        replication.acks.record(peer, after, placement.epoch);
    }
    if after == replication.feed.last_seq() && request.wait_ms > 0 {
        let wait = Duration::from_millis(u64::from(request.wait_ms)).min(MAX_WAIT);
        let mut appended = replication.feed.subscribe();
        let _ = tokio::time::timeout(wait, appended.wait_for(|&last| last > after)).await;
        // Waiting is being up: keep counting the peer in write levels.
        if acknowledges {
            replication.acks.record(peer, after, placement.epoch);
        }
    }
    let max = match request.max_records {
        0 => DEFAULT_MAX_RECORDS,
        n => n.min(MAX_RECORDS),
    } as usize;
    let me = core.id;
    let live = request.live;
    let tail = replication.feed.read(
        after,
        max,
        max * EXAMINED_PER_RECORD,
        MAX_ANSWER_BYTES,
        |record| (!live || record.version.origin == me) && placement.ring.owns(peer, &record.key),
    );
    if let Some(tail) = tail {
        return Ok(PullResponse {
            records: tail.records.iter().map(|r| feed_to_proto(r)).collect(),
            through: tail.through,
            last_seq: replication.feed.last_seq(),
            incarnation: replication.incarnation,
            start_seq: replication.start_seq,
        });
    }
    core.read(move |core| read_log(core, &placement, peer, after, max))
        .await
}

/// A pull from further back than the feed holds: read the data files.
fn read_log(
    core: &NodeCore,
    placement: &Placement,
    peer: u32,
    after: u64,
    max: usize,
) -> Result<PullResponse, Status> {
    let replication = &core.replication;
    let mut since = match replication.take_session(peer) {
        Some(session) if session.position() == after => session,
        _ => core
            .engine
            .iter_since(after)
            .map_err(|e| engine_status(&e))?,
    };
    let mut records = Vec::new();
    let mut examined = 0;
    let mut bytes = 0;
    let mut exhausted = false;
    while records.len() < max && examined < max * EXAMINED_PER_RECORD && bytes < MAX_ANSWER_BYTES {
        match since.next() {
            None => {
                exhausted = true;
                break;
            }
            Some(Err(e)) => return Err(engine_status(&e)),
            Some(Ok(record)) => {
                examined += 1;
                if placement.ring.owns(peer, &record.key) {
                    bytes += record.key.len() + record.value.as_ref().map_or(0, Vec::len);
                    records.push(record_to_proto(record));
                }
            }
        }
    }
    let through = if exhausted {
        since.upto()
    } else {
        let position = since.position();
        replication.keep_session(peer, since);
        position
    };
    Ok(PullResponse {
        records,
        through,
        last_seq: replication.feed.last_seq(),
        incarnation: replication.incarnation,
        start_seq: replication.start_seq,
    })
}

/// One page of a full catch-up: the latest record of each key of the
/// puller's ranges (with `primary_only`, of the ranges it is the primary
/// of) after `request.after`.
fn snapshot_page(
    core: &NodeCore,
    placement: &Placement,
    request: &SnapshotRequest,
) -> Result<SnapshotResponse, Status> {
    // Read first: records written while the pages are read are covered by
    // pulling from here afterwards.
    let as_of_seq = core.replication.feed.last_seq();
    let complete = core.replication.holds_all_ranges();
    let now_ms = unix_millis();
    let max = match request.max_records {
        0 => DEFAULT_MAX_RECORDS,
        n => n.min(MAX_RECORDS),
    } as usize;
    antientropy::check_request(request)?;
    let mut after = (!request.after.is_empty()).then(|| request.after.to_vec());
    let buckets = antientropy::requested_buckets(request);
    if buckets.is_some() || !request.only_keys.is_empty() {
        antientropy::check_holds_all_ranges(core)?;
    }
    let page = |records, next| SnapshotResponse {
        records,
        next,
        as_of_seq,
        now_ms,
        retention_ms: u64::try_from(core.engine.tombstone_retention().as_millis())
            .unwrap_or(u64::MAX),
        complete,
        incarnation: core.replication.incarnation,
    };
    if !request.only_keys.is_empty() {
        let (records, next) = antientropy::latest_of(core, placement, request, MAX_ANSWER_BYTES)?;
        return Ok(page(records, next));
    }
    let mut records = Vec::new();
    let mut examined = 0;
    let mut bytes = 0;
    let mut next = None;
    'pages: while records.len() < max && bytes < MAX_ANSWER_BYTES {
        let keys = core.engine.keys_after(after.as_deref(), 1024);
        if keys.is_empty() {
            break;
        }
        for key in keys {
            if records.len() == max
                || examined == max * EXAMINED_PER_RECORD
                || bytes >= MAX_ANSWER_BYTES
            {
                break 'pages;
            }
            examined += 1;
            let wanted = if request.primary_only {
                placement.primary_of(&key) == Some(request.node_id)
            } else if let Some((count, only)) = &buckets {
                only.contains(&antientropy::bucket_of(&key, *count))
                    && antientropy::shared(placement, core.id, request.node_id, &key)
            } else {
                placement.ring.owns(request.node_id, &key)
            };
            if wanted && let Some(record) = snapshot_record(core, &key, request.versions_only)? {
                bytes += record.key.len() + record.value.len();
                records.push(record);
            }
            next = Some(key.clone());
            after = Some(key);
        }
    }
    // `next` is the last key looked at; unset once the keydir ended.
    let more = after
        .as_deref()
        .is_some_and(|a| !core.engine.keys_after(Some(a), 1).is_empty());
    Ok(page(
        records,
        if more { next.map(Bytes::from) } else { None },
    ))
}

/// The latest record of `key` for a snapshot page, if there is one; with
/// `versions_only`, its version (and whether it is a delete) from the
/// keydir, without reading the value.
fn snapshot_record(
    core: &NodeCore,
    key: &[u8],
    versions_only: bool,
) -> Result<Option<ReplicatedRecord>, Status> {
    if versions_only {
        return Ok(core
            .engine
            .held_version(key)
            .map(|(version, deleted)| ReplicatedRecord {
                key: Bytes::copy_from_slice(key),
                value: Bytes::new(),
                tombstone: deleted,
                version: Some(to_proto(version)),
                expires_at_ms: 0,
            }));
    }
    let latest = core.engine.latest(key).map_err(|e| engine_status(&e))?;
    Ok(latest.map(|latest| latest_to_proto(key, latest)))
}

/// The wire form of a record of the feed.
fn feed_to_proto(record: &FeedRecord) -> ReplicatedRecord {
    ReplicatedRecord {
        key: record.key.clone(),
        value: record.value.clone().unwrap_or_default(),
        tombstone: record.value.is_none(),
        version: Some(to_proto(record.version)),
        expires_at_ms: record.expires_at,
    }
}

/// The wire form of a record read from the log.
fn record_to_proto(record: Record) -> ReplicatedRecord {
    ReplicatedRecord {
        key: Bytes::from(record.key),
        tombstone: record.value.is_none(),
        value: record.value.map(Bytes::from).unwrap_or_default(),
        version: Some(to_proto(record.version)),
        expires_at_ms: record.expires_at.unwrap_or(0),
    }
}

/// The wire form of a key's latest record.
pub fn latest_to_proto(key: &[u8], latest: Latest) -> ReplicatedRecord {
    match latest {
        Latest::Value(value) => ReplicatedRecord {
            key: Bytes::copy_from_slice(key),
            value: Bytes::from(value.value),
            tombstone: false,
            version: Some(to_proto(value.version)),
            expires_at_ms: value.expires_at.unwrap_or(0),
        },
        Latest::Tombstone(version) => ReplicatedRecord {
            key: Bytes::copy_from_slice(key),
            value: Bytes::new(),
            tombstone: true,
            version: Some(to_proto(version)),
            expires_at_ms: 0,
        },
    }
}

/// A record received from a peer or a router, as the engine applies it.
pub fn from_proto(record: ReplicatedRecord) -> Result<Record, Status> {
    let version = record
        .version
        .ok_or_else(|| Status::invalid_argument("a replicated record needs a version"))?;
    Ok(Record {
        seq: 0,
        key: record.key.to_vec(),
        value: (!record.tombstone).then(|| record.value.to_vec()),
        version: Version::new(version.hlc, version.origin),
        expires_at: (record.expires_at_ms != 0).then_some(record.expires_at_ms),
    })
}
