//! Taking over ranges as their primary.
//!
//! Under a committed map, the primary of a key is the first node of its
//! preference list that the map does not mark down, and only it coordinates
//! the key's writes ([`Replication::write_plan`]). A node that becomes the
//! primary of ranges it was not the primary of (at start, or when a map
//! marks a node down or up, or changes the ring) first copies, under the
//! new epoch, the latest record of every key it is now the primary of from
//! every other node of the map that is not marked down
//! (`Replication/Snapshot` with `primary_only`), then waits out the lease a
//! deposed primary may still hold (`takeover_wait`). Until then it refuses
//! those keys' writes (UNAVAILABLE: nothing written). A key waits only for
//! its own replicas: one node that does not answer holds up the keys it
//! replicates, not the others.
//!
//! Why that suffices: a write acknowledged at `quorum` under an older epoch
//! was applied by a majority of its replicas, each acknowledging under the
//! write's own epoch or under a later one through which the deposed
//! primary stayed the key's primary (see [`super::acks`]), so each before
//! it adopted the epoch of this takeover. The new primary copies from every
//! replica that is up, which are at least half of them
//! ([`super::Placement::enough_replicas_up`]), so at least one holds the
//! write. A replica serves the copy only once it has adopted the new epoch,
//! and from then on none of its acknowledgements count for the deposed
//! primary's writes of the key (it is not their primary under that epoch),
//! so nothing acknowledged by the deposed primary can be missed by the
//! copy. Copied records also move the new primary's clock past their
//! versions, so its own writes win over them.
//!
//! A deposed primary that has not heard of the new map (frozen, or cut
//! off) cannot append either: it coordinates only while a lease holds
//! (half of the key's other replicas answered its pulls within
//! `primary_lease`, under its epoch or an earlier one through which it was
//! the key's primary, see [`Replication::write_plan`]). The nodes the
//! new primary copies from include one of those, which stopped answering
//! under the old epoch before it was copied from; the new primary then
//! waits longer than the lease before its first write, so the two never
//! coordinate at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::peers::PeerLinks;
use caskade_common::Version;
use caskade_common::version::unix_millis;
use caskade_proto::SnapshotRequest;
use tokio::sync::watch;
use tonic::Status;

use super::puller::copy_snapshot;
use super::service::apply;
use super::{Placement, Replication};
use crate::clock;
use crate::kv::NodeCore;

/// First pause after a failed copy; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most map changes during one unfinished takeover whose placements are
/// kept to tell the keys held; past that, every key is taken over again.
const MAX_HELD_EPOCHS: usize = 64;
/// The offset assumed between two nodes' wall clocks when the bound is
/// not checked (`cluster.max_clock_offset_ms = 0`).
pub const UNCHECKED_CLOCK_OFFSET: Duration = Duration::from_millis(500);

/// Primary ranges being taken over under one epoch.
#[derive(Debug)]
pub(super) struct Takeover {
    /// The epoch of the map that made this node their primary.
    epoch: u64,
    /// The placements of the epochs just before, one per epoch since this
    /// node last held every range it was the primary of (empty: it holds
    /// none, as at start or after epochs it skipped). A key it was the
    /// primary of under each of them is held: no other node can have been
    /// its primary meanwhile, so it is not taken over again.
    before: Vec<Arc<Placement>>,
    /// Nodes not yet copied from under `epoch`.
    pending: HashSet<u32>,
    /// Nodes copied from, and when the copy ended.
    copied: HashMap<u32, Instant>,
    /// When the takeover began.
    began: Instant,
    /// How long after a copy from a node the keys it replicates wait before
    /// this node writes them: `takeover_wait` of the replication settings
    /// (another node may have been the primary of these ranges under an
    /// older epoch, and may still hold its lease); zero under epoch 1.
    lease_wait: Duration,
}

impl Replication {
    /// Starts taking over the ranges `new` makes this node the primary of,
    /// if any may be new to it; `old` is the placement in effect before
    /// (`None` at start or on a node's first map). Only under the map that
    /// formed the cluster (epoch 1) was no other node ever the primary of
    /// anything: there is no lease to wait out, only a lost log tail to
    /// copy back.
    pub(super) fn begin_takeover(&self, old: Option<&Arc<Placement>>, new: &Arc<Placement>) {
        let mut takeover = self
            .takeover
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let consecutive = old.filter(|o| o.epoch + 1 == new.epoch);
        // With the epoch just before, unchanged ring and nodes down, and no
        // takeover under way, no key changed its primary.
        if takeover.is_none()
            && consecutive
                .is_some_and(|o| o.same_ring(new) && o.down == new.down && o.joining == new.joining)
        {
            return;
        }
        let before = match (consecutive, takeover.take()) {
            (None, _) => Vec::new(),
            (Some(old), None) => vec![Arc::clone(old)],
            // A map change while a takeover is under way: what that one
            // held is held if this node stayed the primary through it.
            (Some(old), Some(unfinished))
                if !unfinished.before.is_empty() && unfinished.before.len() < MAX_HELD_EPOCHS =>
            {
                let mut before = unfinished.before;
                before.push(Arc::clone(old));
                before
            }
            (Some(_), Some(_)) => Vec::new(),
        };
        let peers = new.peers_of(self.id);
        let pending: HashSet<u32> = peers
            .iter()
            .copied()
            .filter(|peer| !new.down.contains(peer))
            .collect();
        // Alone, no other node can have been the primary of anything here.
        *takeover = (new.ring.contains(self.id) && !peers.is_empty()).then(|| {
            tracing::info!(
                epoch = new.epoch,
                peers = pending.len(),
                "taking over primary ranges: copying them from the other nodes first"
            );
            Takeover {
                epoch: new.epoch,
                before,
                pending,
                copied: HashMap::new(),
                began: Instant::now(),
                lease_wait: if new.epoch > 1 {
                    self.config.takeover_wait()
                } else {
                    Duration::ZERO
                },
            }
        });
    }

    /// Refuses a write of `key` while this node is still taking over its
    /// range as the primary: until each of the key's replicas that is up was
    /// copied from and the lease wait after that copy is over (with no other
    /// replica up, the lease wait since the takeover began).
    pub(super) fn check_taken_over(&self, placement: &Placement, key: &[u8]) -> Result<(), Status> {
        let takeover = self.takeover.read().unwrap_or_else(PoisonError::into_inner);
        let Some(t) = takeover.as_ref() else {
            return Ok(());
        };
        if !t.before.is_empty() && t.before.iter().all(|b| b.primary_of(key) == Some(self.id)) {
            return Ok(());
        }
        let mut since = vec![t.began];
        for replica in placement.ring.preference_list(key) {
            if replica == self.id || placement.down.contains(&replica) {
                continue;
            }
            match t.copied.get(&replica) {
                Some(&at) => since.push(at),
                None => {
                    return Err(Status::unavailable(
                        "this node is taking over the key's range as its primary and is still copying it",
                    ));
                }
            }
        }
        if since.iter().any(|at| at.elapsed() < t.lease_wait) {
            return Err(Status::unavailable(
                "this node is taking over the key's range as its primary and waits out the lease of the one before",
            ));
        }
        Ok(())
    }

    /// The epoch of the takeover under way, the nodes still to copy from,
    /// and how long to wait after the last copy.
    pub fn takeover_pending(&self) -> Option<(u64, Vec<u32>, Duration)> {
        self.takeover
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|t| (t.epoch, t.pending.iter().copied().collect(), t.lease_wait))
    }

    /// Ends the takeover under way as if every node had been copied from
    /// and the lease wait were over.
    #[cfg(test)]
    pub(super) fn finish_takeover_now(&self) {
        if let Some((epoch, peers, _)) = self.takeover_pending() {
            for peer in peers {
                self.taken_over_from(peer, epoch);
            }
            self.finish_takeover(epoch);
        }
    }

    /// This node's primary ranges under `epoch` were copied from `peer`.
    fn taken_over_from(&self, peer: u32, epoch: u64) {
        let mut takeover = self
            .takeover
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = takeover.as_mut().filter(|t| t.epoch == epoch) {
            t.pending.remove(&peer);
            t.copied.insert(peer, Instant::now());
        }
    }

    /// The takeover under `epoch` is over: every node was copied from, and
    /// the lease a deposed primary may hold has run out.
    fn finish_takeover(&self, epoch: u64) {
        let mut takeover = self
            .takeover
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if takeover
            .as_ref()
            .is_some_and(|t| t.epoch == epoch && t.pending.is_empty())
        {
            tracing::info!(epoch, "took over every primary range");
            *takeover = None;
        }
    }
}

/// Copies primary ranges from the other nodes whenever a takeover is under
/// way, until `stop` turns true.
pub async fn run(core: Arc<NodeCore>, links: PeerLinks, mut stop: watch::Receiver<bool>) {
    let mut placements = core.replication.watch_placement();
    let mut backoff = MIN_BACKOFF;
    loop {
        placements.borrow_and_update();
        let pending = core.replication.takeover_pending();
        let placement = core.replication.placement();
        let retry = match (pending, placement) {
            (Some((epoch, peers, lease_wait)), Some(placement)) if placement.epoch == epoch => {
                let copies = peers.into_iter().map(|peer| {
                    let core = Arc::clone(&core);
                    let (placement, links) = (Arc::clone(&placement), links.clone());
                    async move {
                        match copy_from(&core, &links, &placement, peer).await {
                            Ok(copied) => {
                                tracing::debug!(peer, copied, epoch, "copied primary ranges");
                                // Before any key it replicates is written
                                // here: see `clock_floor`.
                                core.hlc.observe(clock_floor(&core));
                                core.replication.taken_over_from(peer, epoch);
                                true
                            }
                            Err(status) => {
                                tracing::debug!(peer, epoch, error = %status.message(), "copying primary ranges failed; will retry");
                                false
                            }
                        }
                    }
                });
                let copied = tokio::select! {
                    copied = futures_util::future::join_all(copies) => copied.iter().all(|&ok| ok),
                    _ = stop.wait_for(|s| *s) => return,
                };
                if copied {
                    // Every node copied from has left the older epochs
                    // behind and confirms no lease of a deposed primary any
                    // more: the last it confirmed runs out within the wait.
                    tokio::select! {
                        () = tokio::time::sleep(lease_wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    core.replication.finish_takeover(epoch);
                }
                !copied
            }
            // A takeover waits for its placement; nothing to do otherwise.
            _ => false,
        };
        if retry {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = MIN_BACKOFF;
        tokio::select! {
            changed = placements.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A version the new primary's clock moves past before it writes the keys
/// it took over: the deposed primary's versions may run ahead of this
/// node's clock, by its clock lease after a restart ([`clock::LEASE`]) and
/// by the offset between the two clocks, assumed below
/// `cluster.max_clock_offset_ms` ([`UNCHECKED_CLOCK_OFFSET`] when that is
/// 0). Every write it made before its lease ran out then loses to the
/// writes made here. The wall clock is read no later than the clock guard
/// allows ([`crate::clock_offset::ClockGuard::wall_ceiling`]).
fn clock_floor(core: &NodeCore) -> Version {
    let guard = &core.clock_guard;
    let offset = match guard.max_offset_ms() {
        0 => UNCHECKED_CLOCK_OFFSET,
        ms => Duration::from_millis(ms),
    };
    let ahead = clock::LEASE + offset;
    let wall = unix_millis().min(guard.wall_ceiling());
    Version::from_parts(wall.saturating_add(ahead.as_millis() as u64), 0, 0)
}

/// Copies from `peer` the latest record of every key this node is the
/// primary of under `placement`; how many records it received.
async fn copy_from(
    core: &Arc<NodeCore>,
    links: &PeerLinks,
    placement: &Placement,
    peer: u32,
) -> Result<u64, Status> {
    let addr = placement
        .addrs
        .get(&peer)
        .ok_or_else(|| Status::invalid_argument(format!("node {peer} is not in the map")))?;
    let request = SnapshotRequest {
        node_id: core.id,
        epoch: placement.epoch,
        max_records: core.replication.config.pull_max_records,
        primary_only: true,
        ..SnapshotRequest::default()
    };
    let copied = copy_snapshot(links, addr, request, |records| apply(core, records)).await?;
    Ok(copied.received)
}
