//! The `Kv` gRPC service: get, put, delete, scan and batch against this
//! node's engine.
//!
//! The node coordinating a write assigns its version from its hybrid logical
//! clock. Every engine call blocks (file I/O, and fsync under `always`), so it
//! runs on the node's engine threads or, for writes that wait for a group
//! commit, on tokio's blocking pool; never on a runtime worker. Requests are
//! validated before anything is written: a refused request changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use caskade_common::version::unix_millis;
use caskade_common::{Version, validate_key};
use caskade_proto::batch_op::Op;
use caskade_proto::batch_result::Result as OpResult;
use caskade_proto::kv_server::Kv;
use caskade_proto::{
    BatchOp, BatchRequest, BatchResponse, BatchResult, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, OpError, PutRequest, PutResponse, ReadLevel, ScanEntry, ScanRequest, ScanResponse,
    WriteLevel, condition,
};
use prost::bytes::Bytes;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::admin::ClusterMapStore;
use crate::clock::NodeClock;
use crate::clock_offset::ClockGuard;
use crate::cluster::Cluster;
use crate::engine::{
    Condition, DeleteOptions, Engine, EngineError, Latest, PutOptions, WriteOutcome,
};
use crate::engine_threads::EngineThreads;
use crate::key_locks::KeyLocks;
use crate::observe::Observer;
use crate::replication::{Replication, WritePlan, level_not_met};
use crate::status::engine_status;

/// Default page size of `Scan`.
pub const DEFAULT_SCAN_LIMIT: u32 = 100;
/// Largest page size of `Scan`.
pub const MAX_SCAN_LIMIT: u32 = 1000;
/// Most operations in one `Batch`.
pub const MAX_BATCH_OPS: usize = 1000;
/// A freshly assigned version can lose to a newer one already stored (a
/// version from another node, or a wall clock that stepped back across a
/// restart); the clock then observes it and the write is retried this often.
const STALE_RETRIES: usize = 3;

/// What the node's services share.
#[derive(Debug)]
pub struct NodeCore {
    /// This node's id: the origin of the versions it assigns.
    pub id: u32,
    /// The storage engine.
    pub engine: Arc<Engine>,
    /// The clock versions come from.
    pub hlc: NodeClock,
    /// Request metrics and spans.
    pub observer: Observer,
    /// Where engine calls run.
    pub threads: EngineThreads,
    /// Writes wait for an fsync (`always` durability): run them where any
    /// number can wait at once, so that they commit in groups.
    pub writes_wait_for_fsync: bool,
    /// Placement, peers' acknowledgements, catch-up state and readiness.
    pub replication: Replication,
    /// The newest cluster map this node stored: durable before it is put
    /// into effect (see [`Replication::map_and_takeover_epochs`]).
    pub maps: Arc<ClusterMapStore>,
    /// The cluster map's Raft group.
    pub cluster: Arc<Cluster>,
    /// One write of a key at a time, until it is replicated.
    pub key_locks: KeyLocks,
    /// The check of the peers' clocks against this node's.
    pub clock_guard: Arc<ClockGuard>,
}

impl NodeCore {
    /// Runs `work`, which only reads, on the engine threads.
    pub async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&NodeCore) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let core = Arc::clone(self);
        self.threads.run(move || work(&core)).await
    }

    /// Runs `work`, which may write, where writes run (see [`NodeCore::writes_wait_for_fsync`]).
    pub async fn write<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&NodeCore) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let core = Arc::clone(self);
        if self.writes_wait_for_fsync {
            run_blocking(move || work(&core)).await
        } else {
            self.threads.run(move || work(&core)).await
        }
    }
}

/// A coordinated write that is applied here and waits for its replicas.
#[derive(Debug)]
struct Pending {
    /// Where the write goes and how many replicas must hold it (`None`: no map).
    plan: Option<WritePlan>,
    /// The write's seq in this node's log.
    seq: u64,
    /// The version it was written with.
    version: Version,
}

/// The `Kv` service.
#[derive(Debug, Clone)]
pub struct KvService {
    core: Arc<NodeCore>,
}

impl KvService {
    /// A service over `core`.
    pub fn new(core: Arc<NodeCore>) -> KvService {
        KvService { core }
    }

    /// Refuses clients while the node catches up with its peers: what it
    /// holds may be stale, and routers are to use another replica.
    fn serving(&self) -> Result<(), Status> {
        if self.core.replication.is_ready() {
            Ok(())
        } else if self.core.replication.placement().is_none() {
            Err(crate::replication::no_map_yet())
        } else {
            Err(Status::unavailable("node is catching up with its peers"))
        }
    }

    /// A condition refused here was checked against this node's latest
    /// record of the key, which may be a write this node coordinated that
    /// missed its level and that no other replica holds. Answered before
    /// that record holds at the write's level, the refusal would show a
    /// value that a failover can lose and a quorum read may not see. So it
    /// waits, as the write would have, until the peers acknowledge this
    /// node's log up to its last record, within the acknowledgement timeout
    /// counted from `arrived`; UNAVAILABLE (nothing written) if they do not.
    /// (A record another node coordinated, copied here, is held by that
    /// node too: the wait proves nothing more for it, and needs nothing.)
    async fn settled_refusal(
        &self,
        key: &Bytes,
        level: i32,
        arrived: Instant,
        refused: Status,
    ) -> Status {
        if refused.code() != Code::FailedPrecondition {
            return refused;
        }
        let Ok(level) = write_level(level) else {
            return refused;
        };
        let plan = match self.core.replication.write_plan(key, level) {
            Ok(Some(plan)) => plan,
            Ok(None) => return refused,
            Err(status) => return status,
        };
        let seq = self.core.replication.feed.last_seq();
        let timeout = Duration::from_millis(self.core.replication.config.ack_timeout_ms)
            .saturating_sub(arrived.elapsed());
        let acks = self
            .core
            .replication
            .wait_for_within(&plan, seq, timeout)
            .await;
        if acks < plan.needed {
            return Status::unavailable(format!(
                "the key's latest write is held by {acks} of the {} replicas its level needs, \
                 so its condition cannot be answered yet; nothing was written",
                plan.needed
            ));
        }
        refused
    }

    /// Waits until a write meets its level; the replicas holding it.
    async fn replicated(&self, pending: &Pending) -> Result<u32, Status> {
        let Some(plan) = &pending.plan else {
            return Ok(1);
        };
        let acks = self.core.replication.wait_for(plan, pending.seq).await;
        if acks < plan.needed {
            return Err(level_not_met(acks, plan.needed, pending.version));
        }
        Ok(acks as u32)
    }
}

/// Runs `work` on tokio's blocking pool inside the current span.
pub(crate) async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "blocking task failed");
            Status::internal("internal error")
        })?
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let call = self.core.observer.start("Get", request.metadata());
        let request = request.into_inner();
        let result = async {
            self.serving()?;
            self.core.read(move |core| core.get(&request)).await
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let call = self.core.observer.start("Put", request.metadata());
        let request = request.into_inner();
        let result = async {
            self.serving()?;
            let arrived = Instant::now();
            let (key, level) = (request.key.clone(), request.write_level);
            let _key = self.core.key_locks.lock([&key[..]]).await;
            let written = self.core.write(move |core| core.put(&request)).await;
            let (mut response, pending) = match written {
                Ok(written) => written,
                Err(refused) => {
                    return Err(self.settled_refusal(&key, level, arrived, refused).await);
                }
            };
            response.acks = self.replicated(&pending).await?;
            Ok(response)
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let call = self.core.observer.start("Delete", request.metadata());
        let request = request.into_inner();
        let result = async {
            self.serving()?;
            let arrived = Instant::now();
            let (key, level) = (request.key.clone(), request.write_level);
            let _key = self.core.key_locks.lock([&key[..]]).await;
            let written = self.core.write(move |core| core.delete(&request)).await;
            let (mut response, pending) = match written {
                Ok(written) => written,
                Err(refused) => {
                    return Err(self.settled_refusal(&key, level, arrived, refused).await);
                }
            };
            response.acks = self.replicated(&pending).await?;
            Ok(response)
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let call = self.core.observer.start("Scan", request.metadata());
        let request = request.into_inner();
        let result = async {
            self.serving()?;
            self.core.read(move |core| core.scan(&request)).await
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }

    async fn batch(
        &self,
        request: Request<BatchRequest>,
    ) -> Result<Response<BatchResponse>, Status> {
        let call = self.core.observer.start("Batch", request.metadata());
        let request = request.into_inner();
        let result = async {
            self.serving()?;
            let arrived = Instant::now();
            validate_batch(&request)?;
            // Each written key with its write level, by op.
            let written: Vec<Option<(Bytes, i32)>> = request
                .ops
                .iter()
                .map(|op| match &op.op {
                    Some(Op::Put(put)) => Some((put.key.clone(), put.write_level)),
                    Some(Op::Delete(delete)) => Some((delete.key.clone(), delete.write_level)),
                    _ => None,
                })
                .collect();
            let _keys = self
                .core
                .key_locks
                .lock(written.iter().flatten().map(|(key, _)| &key[..]))
                .await;
            let (mut results, pending) =
                self.core.write(move |core| Ok(core.batch(request))).await?;
            // Every write of the batch is applied here; now wait for their
            // replicas, all at once.
            let waits = pending.iter().map(|(_, p)| self.replicated(p));
            let outcomes = futures_util::future::join_all(waits).await;
            for ((index, _), outcome) in pending.iter().zip(outcomes) {
                let result = &mut results[*index].result;
                match (outcome, result.as_mut()) {
                    (Ok(acks), Some(OpResult::Put(put))) => put.acks = acks,
                    (Ok(acks), Some(OpResult::Delete(delete))) => delete.acks = acks,
                    (Err(status), _) => *result = Some(op_error(&status)),
                    (Ok(_), _) => {}
                }
            }
            // Refused conditions, all at once: see `settled_refusal`.
            let refusals: Vec<(usize, &Bytes, i32)> = results
                .iter()
                .zip(&written)
                .enumerate()
                .filter_map(
                    |(index, (result, written))| match (&result.result, written) {
                        (Some(OpResult::Error(error)), Some((key, level)))
                            if error.code == Code::FailedPrecondition as i32 =>
                        {
                            Some((index, key, *level))
                        }
                        _ => None,
                    },
                )
                .collect();
            let settled =
                futures_util::future::join_all(refusals.iter().map(|&(_, key, level)| {
                    let refused = Status::failed_precondition("condition failed");
                    self.settled_refusal(key, level, arrived, refused)
                }))
                .await;
            for (&(index, _, _), status) in refusals.iter().zip(settled) {
                if status.code() != Code::FailedPrecondition {
                    results[index].result = Some(op_error(&status));
                }
            }
            Ok(BatchResponse { results })
        }
        .instrument(call.span())
        .await;
        call.finish(result.map(Response::new))
    }
}

impl NodeCore {
    fn get(&self, request: &GetRequest) -> Result<GetResponse, Status> {
        let level = read_level(request.read_level)?;
        validate_key(&request.key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.replication.check_replica(&request.key)?;
        // A replica whose disk is full may lack writes it could not store:
        // another serves the read (the router moves on). A quorum read
        // compares versions, so a stale answer does no harm there.
        if level != ReadLevel::Quorum && self.replication.short_of_space_for(&request.key) {
            return Err(Status::unavailable(
                "this replica's disk is full and it may lack recent writes: read another",
            ));
        }
        let latest = self
            .engine
            .latest(&request.key)
            .map_err(|e| engine_status(&e))?;
        Ok(match latest {
            Some(Latest::Value(value)) if value.expires_at.is_none_or(|at| at > unix_millis()) => {
                GetResponse {
                    found: true,
                    value: Bytes::from(value.value),
                    version: Some(to_proto(value.version)),
                    expires_at_ms: value.expires_at.unwrap_or(0),
                }
            }
            // Deleted or expired: routers comparing replicas need the version.
            Some(gone) => GetResponse {
                version: Some(to_proto(gone.version())),
                ..GetResponse::default()
            },
            None => GetResponse::default(),
        })
    }

    fn put(&self, request: &PutRequest) -> Result<(PutResponse, Pending), Status> {
        let level = write_level(request.write_level)?;
        let _placement = self.replication.hold_placement();
        let plan = self.replication.write_plan(&request.key, level)?;
        let condition = condition_of(request.condition.as_ref())?;
        let expires_at = (request.ttl_ms > 0).then(|| unix_millis().saturating_add(request.ttl_ms));
        let (version, previous, seq) = self.write_fresh(plan.as_ref(), |version| {
            let options = PutOptions {
                version,
                expires_at,
                condition,
            };
            self.engine.put(&request.key, &request.value, options)
        })?;
        let response = PutResponse {
            version: Some(to_proto(version)),
            created: previous.is_none(),
            acks: 1,
        };
        Ok((response, Pending { plan, seq, version }))
    }

    fn delete(&self, request: &DeleteRequest) -> Result<(DeleteResponse, Pending), Status> {
        let level = write_level(request.write_level)?;
        let _placement = self.replication.hold_placement();
        let plan = self.replication.write_plan(&request.key, level)?;
        let condition = condition_of(request.condition.as_ref())?;
        let (version, previous, seq) = self.write_fresh(plan.as_ref(), |version| {
            let options = DeleteOptions { version, condition };
            self.engine.delete(&request.key, options)
        })?;
        let response = DeleteResponse {
            version: Some(to_proto(version)),
            existed: previous.is_some(),
            acks: 1,
        };
        Ok((response, Pending { plan, seq, version }))
    }

    /// Applies `write` with a fresh version, retrying with a newer one if the
    /// key already holds a newer version. Returns the version written, the
    /// version of the live value it replaced, and the record's seq.
    ///
    /// The primary's lease is checked again once the version is taken: a
    /// node that stalled (frozen, descheduled) between its plan and its
    /// version must not append a version from after its lease ran out,
    /// which could beat the writes of the primary that took over.
    fn write_fresh(
        &self,
        plan: Option<&WritePlan>,
        write: impl Fn(Version) -> Result<WriteOutcome, EngineError>,
    ) -> Result<(Version, Option<Version>, u64), Status> {
        // A version from a clock that is off would misorder the write.
        if self.clock_guard.is_off() {
            return Err(self.clock_guard.refused_write());
        }
        for _ in 0..STALE_RETRIES {
            let ceiling = self.clock_guard.wall_ceiling();
            let version = self.hlc.now_unless_wall_past(ceiling)?;
            if let Some(plan) = plan {
                self.replication.check_plan_lease(plan)?;
            }
            match write(version).map_err(|e| engine_status(&e))? {
                WriteOutcome::Applied { previous, seq } => return Ok((version, previous, seq)),
                WriteOutcome::Stale { current } => self.hlc.observe(current),
            }
        }
        tracing::error!("write kept losing to newer versions");
        Err(Status::unavailable("could not assign a new enough version"))
    }

    fn scan(&self, request: &ScanRequest) -> Result<ScanResponse, Status> {
        let limit = match request.limit {
            0 => DEFAULT_SCAN_LIMIT,
            n if n <= MAX_SCAN_LIMIT => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} is more than the maximum of {MAX_SCAN_LIMIT}"
                )));
            }
        } as usize;
        let too_long = |what: &str, len: usize| {
            Status::invalid_argument(format!(
                "{what} is {len} bytes, more than the maximum key length of {}",
                caskade_common::limits::MAX_KEY_BYTES
            ))
        };
        if request.prefix.len() > caskade_common::limits::MAX_KEY_BYTES {
            return Err(too_long("prefix", request.prefix.len()));
        }
        if request.after.len() > caskade_common::limits::MAX_KEY_BYTES {
            return Err(too_long("after", request.after.len()));
        }
        let after = (!request.after.is_empty()).then_some(&request.after[..]);
        // One more than asked tells whether another page follows.
        let scanned = if request.include_deleted {
            self.replication.check_listing(request.epoch)?;
            self.engine
                .scan_including_deleted(&request.prefix, after, limit + 1)
        } else {
            self.engine.scan(&request.prefix, after, limit + 1)
        };
        let mut entries = scanned.map_err(|e| engine_status(&e))?;
        let more = entries.len() > limit;
        entries.truncate(limit);
        let mut page = Vec::with_capacity(entries.len());
        for entry in entries {
            let value = if request.include_values && !entry.deleted {
                match self.engine.get(&entry.key).map_err(|e| engine_status(&e))? {
                    Some(value) => Bytes::from(value.value),
                    // Deleted since the scan read the keydir.
                    None => continue,
                }
            } else {
                Bytes::new()
            };
            page.push(ScanEntry {
                key: Bytes::from(entry.key),
                version: Some(to_proto(entry.version)),
                expires_at_ms: entry.expires_at.unwrap_or(0),
                value,
                deleted: entry.deleted,
            });
        }
        let next = if more {
            page.last().map(|entry| entry.key.clone())
        } else {
            None
        };
        Ok(ScanResponse {
            entries: page,
            next,
        })
    }

    /// Runs the ops of a batch here; the results, and the writes that must
    /// still wait for their replicas (by op index).
    fn batch(&self, request: BatchRequest) -> (Vec<BatchResult>, Vec<(usize, Pending)>) {
        let mut pending = Vec::new();
        let results = request
            .ops
            .into_iter()
            .enumerate()
            .map(|(index, op)| {
                let result = match op.op {
                    Some(Op::Get(get)) => self.get(&get).map(OpResult::Get),
                    Some(Op::Put(put)) => self.put(&put).map(|(response, wait)| {
                        pending.push((index, wait));
                        OpResult::Put(response)
                    }),
                    Some(Op::Delete(delete)) => self.delete(&delete).map(|(response, wait)| {
                        pending.push((index, wait));
                        OpResult::Delete(response)
                    }),
                    // validate_batch refused empty ops.
                    None => Err(Status::invalid_argument("empty batch op")),
                };
                BatchResult {
                    result: Some(result.unwrap_or_else(|status| op_error(&status))),
                }
            })
            .collect();
        (results, pending)
    }
}

/// A failed op of a batch; for a write level not met, with its acknowledgements.
fn op_error(status: &Status) -> OpResult {
    let number = |key: &str| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    OpResult::Error(OpError {
        code: status.code() as i32,
        message: status.message().to_string(),
        acks: number(crate::status::ACKS_METADATA),
        required: number(crate::status::REQUIRED_ACKS_METADATA),
    })
}

/// Refuses a batch that is malformed as a whole, before any op runs.
fn validate_batch(request: &BatchRequest) -> Result<(), Status> {
    if request.ops.len() > MAX_BATCH_OPS {
        return Err(Status::invalid_argument(format!(
            "batch has {} ops, more than the maximum of {MAX_BATCH_OPS}",
            request.ops.len()
        )));
    }
    if let Some(i) = request.ops.iter().position(|op: &BatchOp| op.op.is_none()) {
        return Err(Status::invalid_argument(format!("batch op {i} is empty")));
    }
    Ok(())
}

fn condition_of(condition: Option<&caskade_proto::Condition>) -> Result<Condition, Status> {
    Ok(match condition.and_then(|c| c.kind.as_ref()) {
        None | Some(condition::Kind::IfAbsent(false)) => Condition::None,
        Some(condition::Kind::IfAbsent(true)) => Condition::IfAbsent,
        Some(condition::Kind::IfVersion(v)) => Condition::IfVersion(Version::new(v.hlc, v.origin)),
    })
}

fn write_level(level: i32) -> Result<WriteLevel, Status> {
    WriteLevel::try_from(level)
        .map_err(|_| Status::invalid_argument(format!("unknown write level {level}")))
}

fn read_level(level: i32) -> Result<ReadLevel, Status> {
    ReadLevel::try_from(level)
        .map_err(|_| Status::invalid_argument(format!("unknown read level {level}")))
}

/// The wire form of a version.
pub fn to_proto(version: Version) -> caskade_proto::Version {
    caskade_proto::Version {
        hlc: version.hlc,
        origin: version.origin,
    }
}
