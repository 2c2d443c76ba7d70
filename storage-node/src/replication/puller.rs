//! Pulling from peers: one task per peer of the cluster map, each looping
//! `Pull` → apply → move the cursor, plus the full catch-up from a snapshot
//! when the peer's log no longer reaches back to the cursor.
//!
//! The supervisor starts and stops per-peer tasks as the map changes, keeps
//! the cursors durable, and marks the node ready once every peer it started
//! with was caught up with or found unreachable (a peer that is down has
//! nothing to give, and waiting for it would keep a restarting cluster down).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use caskade_proto::replication_client::ReplicationClient;
use caskade_proto::{PullRequest, SnapshotRequest};
use metrics::counter;
use prost::bytes::Bytes;
use tokio::sync::watch;
use tonic::{Code, Status};

use super::Placement;
use super::cursors::{Cursor, Reading};
use super::inference::{self, Inference};
use super::service::{LOG_REPLACED_METADATA, apply_received, from_proto};
use crate::clock_offset::PeerChannel;
use crate::engine::Record;
use crate::kv::NodeCore;
use crate::peers::PeerLinks;
pub(crate) use crate::peers::channel;

/// First pause after a failed pull; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A pull answers within its wait plus this, or counts as failed.
const PULL_SLACK: Duration = Duration::from_secs(10);
/// An on-disk read of this node's log that its peer has not continued for
/// this long is dropped (the peer starts a new one if it comes back).
const IDLE_SESSION: Duration = Duration::from_secs(30);
/// Failed pulls in a row after which a peer no longer holds up readiness.
const GIVE_UP_AFTER_FAILURES: u32 = 10;
/// At start-up, a peer that has not answered a pull within this long counts
/// as unreachable for readiness (a host that accepts connections and never
/// answers must not keep this node out of service); pulling from it goes on.
const STARTUP_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Peers the node must catch up with (or find down) before it is ready.
#[derive(Debug)]
struct StartupGate {
    pending: Mutex<HashSet<u32>>,
}

impl StartupGate {
    fn is_pending(&self, peer: u32) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&peer)
    }

    fn done(&self, core: &NodeCore, peer: u32) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.remove(&peer) && pending.is_empty() {
            core.replication.mark_started();
        }
    }
}

/// Runs the pullers until `stop` turns true: one per peer of the current
/// map, restarted when a peer's address changes, stopped when it leaves.
pub async fn run(core: Arc<NodeCore>, links: PeerLinks, mut stop: watch::Receiver<bool>) {
    let mut placements = core.replication.watch_placement();
    let initial = placements.borrow_and_update().clone();
    let gate = Arc::new(StartupGate {
        pending: Mutex::new(peers_of(&core, initial.as_deref()).into_iter().collect()),
    });
    if gate
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_empty()
    {
        core.replication.mark_started();
    }
    let persist = tokio::spawn(persist_cursors(Arc::clone(&core), stop.clone()));
    let dropping = tokio::spawn(super::handoff::drop_lost_ranges(
        Arc::clone(&core),
        links.clone(),
        stop.clone(),
    ));
    let mut running: HashMap<u32, (String, watch::Sender<bool>)> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let placement = placements.borrow_and_update().clone();
        let peers = peers_of(&core, placement.as_deref());
        running.retain(|peer, (_, stop_peer)| {
            let keep = peers.contains(peer);
            if !keep {
                let _ = stop_peer.send(true);
                // Nothing more to refill from it.
                core.replication.refill_skipped(*peer);
                core.replication.forget_peer(*peer);
                gate.done(&core, *peer);
                tracing::info!(peer, "peer left the cluster map; no longer pulling from it");
            }
            keep
        });
        if let Some(placement) = &placement {
            for &peer in &peers {
                let Some(addr) = placement.addrs.get(&peer) else {
                    continue;
                };
                if running.get(&peer).is_some_and(|(a, _)| a == addr) {
                    continue;
                }
                let (stop_peer, stopped) = watch::channel(false);
                if let Some((_, old)) = running.insert(peer, (addr.clone(), stop_peer)) {
                    let _ = old.send(true);
                }
                match channel(addr, &links) {
                    Ok(channel) => {
                        let puller = Puller {
                            core: Arc::clone(&core),
                            inference: Inference::new(core.id, links.clone()),
                            peer,
                            client: ReplicationClient::new(channel)
                                .max_decoding_message_size(usize::MAX),
                            gate: Arc::clone(&gate),
                            answered_epoch: 0,
                        };
                        tasks.spawn(puller.run(stopped, stop.clone()));
                    }
                    Err(e) => {
                        tracing::error!(peer, addr, error = %e, "bad peer address; not pulling from it");
                        gate.done(&core, peer);
                    }
                }
            }
        }
        tokio::select! {
            changed = placements.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, (_, stop_peer)) in running {
        let _ = stop_peer.send(true);
    }
    // Pullers hold the engine; the node closes it only after they are gone.
    while tasks.join_next().await.is_some() {}
    let _ = dropping.await;
    let _ = persist.await;
}

/// The nodes to pull from under `placement`.
fn peers_of(core: &NodeCore, placement: Option<&Placement>) -> BTreeSet<u32> {
    placement.map_or_else(BTreeSet::new, |p| p.peers_of(core.id).into_iter().collect())
}

/// One page of a snapshot copy answers within this, or the copy fails.
const COPY_PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Records a snapshot copy received, and how many of them were newer here.
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    /// Records received.
    pub received: u64,
    /// Records that were newer than what this node held.
    pub applied: u64,
}

/// Copies every page of the snapshot `request` (its `after` is moved along)
/// from the peer at `addr` and hands each page's records to `apply_page`,
/// which answers how many were newer here. Nothing is inferred from keys
/// absent from the copy: that is the full catch-up's business
/// ([`Puller`]), not a takeover's or anti-entropy's.
pub(crate) async fn copy_snapshot<F, Fut>(
    links: &PeerLinks,
    addr: &str,
    mut request: SnapshotRequest,
    apply_page: F,
) -> Result<Copied, Status>
where
    F: Fn(Vec<Record>) -> Fut,
    Fut: Future<Output = Result<usize, Status>>,
{
    let channel = channel(addr, links).map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = ReplicationClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut copied = Copied::default();
    loop {
        let page = tokio::time::timeout(COPY_PAGE_TIMEOUT, client.snapshot(request.clone()))
            .await
            .map_err(|_| Status::deadline_exceeded("snapshot page timed out"))??
            .into_inner();
        let records = page
            .records
            .into_iter()
            .map(from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        copied.received += records.len() as u64;
        copied.applied += apply_page(records).await? as u64;
        match page.next {
            Some(next) => request.after = next,
            None => return Ok(copied),
        }
    }
}

/// Makes the cursors durable every `cursor_sync_ms`, and once more at the end.
async fn persist_cursors(core: Arc<NodeCore>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(core.replication.config.cursor_sync_ms.max(10));
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(period) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        core.replication.expire_sessions(IDLE_SESSION);
        let persisted = core
            .write(|core| {
                core.replication
                    .cursors
                    .persist(&core.engine)
                    .map_err(|e| crate::status::engine_status(&e))
            })
            .await;
        if let Err(status) = persisted {
            tracing::warn!(error = %status.message(), "storing replication cursors");
        }
        let progress = Arc::clone(&core);
        let stored = crate::kv::run_blocking(move || {
            progress
                .replication
                .store_progress()
                .map_err(|e| Status::internal(e.to_string()))
        })
        .await;
        if let Err(status) = stored {
            tracing::warn!(error = %status.message(), "storing the ring change's progress");
        }
        if stopping {
            return;
        }
    }
}

/// Pulls from one peer.
struct Puller {
    core: Arc<NodeCore>,
    /// Asks the other replicas before a delete is inferred.
    inference: Inference,
    peer: u32,
    client: ReplicationClient<PeerChannel>,
    gate: Arc<StartupGate>,
    /// The map epoch of the last pull the peer answered.
    answered_epoch: u64,
}

impl Puller {
    async fn run(
        mut self,
        mut stopped: watch::Receiver<bool>,
        mut node_stop: watch::Receiver<bool>,
    ) {
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        let labels = [
            ("node", self.core.id.to_string()),
            ("peer", self.peer.to_string()),
        ];
        loop {
            if *stopped.borrow() || *node_stop.borrow() {
                return;
            }
            let result = tokio::select! {
                result = self.pull_once(&labels) => result,
                _ = stopped.wait_for(|s| *s) => return,
                _ = node_stop.wait_for(|s| *s) => return,
            };
            match result {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    failures = 0;
                }
                Err(status) => {
                    // This node's own disk is full: the peer answered, and
                    // what it sent waits there until space is freed (the
                    // engine logs it). No failure of the peer: a node
                    // catching up stays out of service rather than serve
                    // what it could not store.
                    let full = status.code() == Code::ResourceExhausted;
                    // Another epoch on the peer is no failure of it: the
                    // map change reaches both in moments.
                    if status.code() != Code::Aborted && !full {
                        failures += 1;
                    }
                    let unreachable = matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                    );
                    self.core.replication.note_lag(self.peer, |lag| {
                        // Cleared only once a pull from the peer is stored.
                        lag.short_of_space |= full;
                        // A full disk refused what the peer did send.
                        lag.reachable = full;
                    });
                    if unreachable || full {
                        tracing::debug!(peer = self.peer, error = %status.message(), "peer unreachable or disk full");
                    } else {
                        tracing::warn!(peer = self.peer, code = ?status.code(), error = %status.message(), "pull failed");
                    }
                    // Nothing to catch up from a peer that is down, or that
                    // keeps refusing (mismatched settings): waiting for it
                    // would keep this node out of service for good. Pulling
                    // from it goes on.
                    if unreachable || failures >= GIVE_UP_AFTER_FAILURES {
                        self.gate.done(&self.core, self.peer);
                        self.core.replication.refill_skipped(self.peer);
                    }
                    counter!("caskade_node_replication_pull_failures_total", &labels).increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopped.wait_for(|s| *s) => return,
                        _ = node_stop.wait_for(|s| *s) => return,
                    }
                    // Another epoch on the peer is a map change still on
                    // its way to one of the two: it passes in moments, and
                    // the next answer renews this node's lease.
                    if status.code() != Code::Aborted {
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// One pull, applied; or a full catch-up if the peer asks for one.
    async fn pull_once(
        &mut self,
        labels: &[(&'static str, String); 2],
    ) -> Result<(), tonic::Status> {
        let replication = &self.core.replication;
        let Some(placement) = replication.placement() else {
            return Err(tonic::Status::failed_precondition("no cluster map"));
        };
        let config = &replication.config;
        let reading = replication.cursors.read(self.peer);
        let after = reading.cursor.seq;
        // Until the first answer, ask without waiting: the answer says
        // whether this node is caught up, which readiness waits for.
        let starting = self.gate.is_pending(self.peer);
        let refilling = replication.is_refilling(self.peer);
        // The first pull under a new map does not wait: its answer is
        // what lets this node coordinate writes under that map.
        let new_epoch = self.answered_epoch != placement.epoch;
        let request = PullRequest {
            node_id: self.core.id,
            after,
            epoch: placement.epoch,
            max_records: config.pull_max_records,
            wait_ms: if starting || refilling || new_epoch {
                0
            } else {
                config.pull_wait_ms as u32
            },
            live: replication.is_ready() && !refilling,
            incarnation: reading.cursor.incarnation,
        };
        let timeout = if starting {
            STARTUP_ANSWER_TIMEOUT
        } else {
            Duration::from_millis(config.pull_wait_ms) + PULL_SLACK
        };
        let sent = Instant::now();
        let answer = match tokio::time::timeout(timeout, self.client.pull(request)).await {
            Ok(Ok(answer)) => {
                replication.confirm(self.peer, placement.epoch, sent);
                self.answered_epoch = placement.epoch;
                answer.into_inner()
            }
            Ok(Err(status)) if status.code() == Code::OutOfRange => {
                // Deletes may only be inferred from a snapshot when this
                // node's cursor was a real position in the peer's log that
                // the peer has merged past; not when the peer's log was
                // replaced, nor when re-pulling after a map change.
                let log_replaced = status.metadata().contains_key(LOG_REPLACED_METADATA);
                let infer_deletes = !log_replaced && !refilling && after > 0;
                tracing::info!(peer = self.peer, cursor = after, infer_deletes, reason = %status.message(), "full catch-up from a snapshot");
                return self
                    .full_catch_up(&placement, reading, infer_deletes, labels)
                    .await;
            }
            Ok(Err(status))
                if matches!(status.code(), Code::Aborted | Code::FailedPrecondition) =>
            {
                // Another epoch, or no map at all: the Raft group brings
                // the lagging node the committed map; pull again then.
                return Err(status);
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(tonic::Status::deadline_exceeded("pull timed out")),
        };
        if reading.cursor.incarnation != 0
            && answer.incarnation != reading.cursor.incarnation
            && after > answer.start_seq
        {
            // The peer restarted from a data directory that ends before
            // this cursor (one restored from a backup: a crash alone never
            // makes the engine number records again, see `reserve_seqs`),
            // and records after its new start may be numbered like ones it
            // lost: pull again from where it started.
            tracing::info!(
                peer = self.peer,
                cursor = after,
                resume_at = answer.start_seq,
                "peer restarted; pulling again from its start"
            );
            let rewound = Cursor {
                seq: answer.start_seq,
                incarnation: answer.incarnation,
            };
            replication.cursors.advance(self.peer, reading, rewound);
            return Ok(());
        }
        let count = apply_received(&self.core, answer.records).await?;
        let moved = replication.cursors.advance(
            self.peer,
            reading,
            Cursor {
                seq: answer.through,
                incarnation: answer.incarnation,
            },
        );
        if moved {
            self.observe(
                placement.ring_epoch,
                answer.through,
                answer.last_seq,
                count,
                labels,
            );
        }
        Ok(())
    }

    /// Records progress: lag, metrics, and readiness. `ring_epoch` is the
    /// epoch of the map that gave the ring of the pull its shape: a re-pull
    /// after a ring change completes under any later map with the same ring.
    fn observe(
        &self,
        ring_epoch: u64,
        through: u64,
        peer_last_seq: u64,
        applied: u64,
        labels: &[(&'static str, String); 2],
    ) {
        let replication = &self.core.replication;
        let caught_up = through >= peer_last_seq;
        replication.note_lag(self.peer, |lag| {
            lag.cursor = through;
            lag.peer_last_seq = peer_last_seq;
            lag.reachable = true;
            lag.short_of_space = false;
            if caught_up {
                lag.caught_up_at = Some(Instant::now());
            }
        });
        counter!("caskade_node_replication_records_total", labels).increment(applied);
        if caught_up {
            self.gate.done(&self.core, self.peer);
            replication.caught_up_with(self.peer, ring_epoch);
        }
    }

    /// Copies the peer's records of this node's ranges page by page. With
    /// `infer_deletes`, also deletes keys of ranges both hold that the peer
    /// no longer has, that are older than its retention, and that enough
    /// other replicas lack too (see `inference`); that needs a peer holding
    /// all its ranges, and waits for one.
    async fn full_catch_up(
        &mut self,
        placement: &Arc<Placement>,
        reading: Reading,
        infer_deletes: bool,
        labels: &[(&'static str, String); 2],
    ) -> Result<(), tonic::Status> {
        let replication = &self.core.replication;
        let mut after = Bytes::new();
        let mut first: Option<(u64, u64)> = None;
        let mut copied = 0u64;
        loop {
            let request = SnapshotRequest {
                node_id: self.core.id,
                epoch: placement.epoch,
                after: after.clone(),
                max_records: replication.config.pull_max_records,
                ..SnapshotRequest::default()
            };
            let page = self.client.snapshot(request).await?.into_inner();
            if infer_deletes && !page.complete {
                return Err(tonic::Status::unavailable(
                    "the peer is still receiving ranges; full catch-up waits for it",
                ));
            }
            let (as_of_seq, incarnation) = *first.get_or_insert((page.as_of_seq, page.incarnation));
            if page.incarnation != incarnation {
                return Err(tonic::Status::unavailable(
                    "the peer restarted during a full catch-up",
                ));
            }
            let held: HashSet<Bytes> = page.records.iter().map(|r| r.key.clone()).collect();
            copied += apply_received(&self.core, page.records).await?;
            if infer_deletes {
                let cutoff_ms = page.now_ms.saturating_sub(page.retention_ms);
                let (start, end) = (after.clone(), page.next.clone());
                let peer = self.peer;
                let placement_for_delete = Arc::clone(placement);
                let candidates = self
                    .core
                    .read(move |core| {
                        Ok(inference::absent_since(
                            core,
                            &placement_for_delete,
                            peer,
                            &start,
                            end.as_deref(),
                            &held,
                            cutoff_ms,
                        ))
                    })
                    .await?;
                let deleted = self
                    .inference
                    .deletes(replication, placement, self.peer, candidates, cutoff_ms)
                    .await?;
                inference::apply_inferred(&self.core, placement.epoch, deleted).await?;
            }
            match page.next {
                Some(next) => after = next,
                None => {
                    let done = Cursor {
                        seq: as_of_seq,
                        incarnation,
                    };
                    if !replication.cursors.advance(self.peer, reading, done) {
                        return Ok(());
                    }
                    replication.note_lag(self.peer, |lag| lag.full_catch_ups += 1);
                    counter!("caskade_node_replication_full_catch_ups_total", labels).increment(1);
                    tracing::info!(
                        peer = self.peer,
                        records = copied,
                        resume_at = as_of_seq,
                        "full catch-up done"
                    );
                    self.observe(placement.ring_epoch, as_of_seq, as_of_seq, copied, labels);
                    return Ok(());
                }
            }
        }
    }
}
