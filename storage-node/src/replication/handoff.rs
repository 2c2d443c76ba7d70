//! Map changes: ranges moving between nodes.
//!
//! When the ring changes, a node pulls everything of its (new) ranges from
//! every peer again, from the start of their logs (its cursors go back to
//! 0): that is how it receives ranges it gained. Until a peer has been
//! pulled from to its end, the node refuses (UNAVAILABLE, so routers use
//! another replica) the keys it did not hold before, and a node that held
//! nothing before — one joining the cluster — is not ready at all.
//!
//! Ranges a node lost are dropped from its engine only after every node of
//! the new ring reports (in its `Admin/Stats`) that it has pulled from this
//! node under the new epoch: until then this node may hold the only copy of
//! some write.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use crate::peers::PeerLinks;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{ClusterMap, StatsRequest};
use tokio::sync::watch;
use tonic::Status;

use super::progress::{Progress, Refill};
use super::puller::channel;
use super::{PeerLag, Placement, Replication};
use crate::kv::NodeCore;
use crate::status::engine_status;

/// How often a node checks whether it may drop the ranges it lost.
const DROP_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// How long a peer may take to report its replication state.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Ranges gained with a map change and still being pulled.
#[derive(Debug)]
pub(super) struct Handoff {
    /// The epoch of the change.
    epoch: u64,
    /// The placement before it (`None`: the node held no range).
    before: Option<Arc<Placement>>,
    /// Peers not yet pulled from to their end since the change.
    pending: HashSet<u32>,
}

/// What a node restarting in the middle of a ring change takes up again
/// (see [`super::progress`]).
#[derive(Debug, Default)]
pub(super) struct Restored {
    pub handoff: Option<Handoff>,
    pub drop: Option<u64>,
    pub lag: BTreeMap<u32, PeerLag>,
}

/// Takes up `saved` progress if it belongs to `placement`'s ring, whose
/// ring epoch it then gives; node `me` restarts with it. A refill under way
/// is taken up as if the node held no range before it (the placement
/// before is not kept): it refuses every key, and is not ready, until the
/// refill is done. Without progress of this ring (none stored, or a crash
/// between storing a ring-changing map and its progress), the node refills
/// from every peer as after a ring change (its cursors went back to 0
/// before that map was stored), and drops what it does not replicate once
/// every peer refilled from it.
pub(super) fn restore(me: u32, placement: &mut Placement, saved: Option<Progress>) -> Restored {
    let peers: BTreeSet<u32> = placement.peers_of(me).into_iter().collect();
    if !placement.ring.contains(me) || peers.is_empty() {
        if let Some(saved) = saved.filter(|s| s.shape == placement.shape) {
            placement.ring_epoch = saved.ring_epoch.min(placement.epoch);
        }
        return Restored::default();
    }
    let saved = match saved {
        Some(saved) if saved.shape == placement.shape && saved.ring_epoch <= placement.epoch => {
            saved
        }
        saved => {
            tracing::warn!(
                saved_epoch = saved.map(|s| s.ring_epoch),
                epoch = placement.epoch,
                "no progress stored for this ring; pulling every peer to its end again"
            );
            Progress {
                shape: placement.shape.clone(),
                ring_epoch: placement.epoch,
                refills: peers
                    .iter()
                    .map(|&peer| (peer, Refill::started(placement.epoch)))
                    .collect(),
                pending: Some(peers.clone()),
                drop: Some(placement.epoch),
            }
        }
    };
    placement.ring_epoch = saved.ring_epoch;
    let lag = saved
        .refills
        .iter()
        .filter(|(peer, _)| peers.contains(peer))
        .map(|(&peer, refill)| {
            let lag = PeerLag {
                refill_epoch: refill.epoch,
                refilled_epoch: refill.done_epoch,
                ..PeerLag::default()
            };
            (peer, lag)
        })
        .collect();
    // A peer removed since (a leaving node) has no puller to finish it.
    let handoff = saved
        .pending
        .map(|pending| {
            pending
                .intersection(&peers)
                .copied()
                .collect::<HashSet<u32>>()
        })
        .filter(|pending| !pending.is_empty())
        .map(|pending| Handoff {
            epoch: saved.ring_epoch,
            before: None,
            pending,
        });
    if let Some(h) = &handoff {
        tracing::info!(epoch = h.epoch, peers = ?h.pending, "taking up an unfinished ring change");
    }
    Restored {
        handoff,
        drop: saved.drop,
        lag,
    }
}

impl Handoff {
    /// The peers not yet pulled from to their end, in order.
    #[cfg(test)]
    pub(super) fn pending_peers(&self) -> Vec<u32> {
        let mut peers: Vec<u32> = self.pending.iter().copied().collect();
        peers.sort_unstable();
        peers
    }
}

impl Replication {
    /// Stores how far the last ring change got, if that changed. Blocks.
    pub fn store_progress(&self) -> io::Result<()> {
        // Not between a map change's placement and its own store: an older
        // snapshot must not overwrite a newer one.
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        self.store_progress_now()
    }

    /// [`Self::store_progress`], with `changing` held by the caller.
    fn store_progress_now(&self) -> io::Result<()> {
        let Some(placement) = self.placement() else {
            return Ok(());
        };
        let refills = self
            .lag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, lag)| lag.refill_epoch > 0 || lag.refilled_epoch > 0)
            .map(|(&peer, lag)| {
                let refill = Refill {
                    epoch: lag.refill_epoch,
                    done_epoch: lag.refilled_epoch,
                };
                (peer, refill)
            })
            .collect();
        let pending = self
            .handoff
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|h| h.pending.iter().copied().collect());
        self.progress.store(Progress {
            shape: placement.shape.clone(),
            ring_epoch: placement.ring_epoch,
            refills,
            pending,
            drop: self.drop_pending(),
        })
    }

    /// Adopts a newly stored cluster map, unless a newer one already was,
    /// and starts pulling the ranges it moves here.
    pub fn set_map(&self, map: &ClusterMap) {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        // Waits for writes and repairs under the current map to be appended.
        let gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut new = Placement::of(map);
        let old = self.placement();
        if old.as_ref().is_some_and(|p| p.epoch >= new.epoch) {
            return;
        }
        if let Some(old) = old.as_ref().filter(|p| p.same_ring(&new)) {
            new.ring_epoch = old.ring_epoch;
            new.ring = Arc::clone(&old.ring);
        }
        let new = Arc::new(new);
        let member = new.ring.contains(self.id);
        let was_member = old.as_ref().is_some_and(|p| p.ring.contains(self.id));
        let ring_changed = old.as_ref().is_none_or(|p| !p.same_ring(&new));
        if ring_changed {
            let peers: HashSet<u32> = new.peers_of(self.id).into_iter().collect();
            let mut current = self.handoff.write().unwrap_or_else(PoisonError::into_inner);
            // Ranges gained by an earlier change and not yet received are
            // not held: they stay refused until this change's pulls are done.
            let before = match current.take() {
                Some(unfinished) => unfinished.before,
                None => old.clone().filter(|_| was_member),
            };
            *current = (member && !peers.is_empty()).then(|| {
                // Before the new placement is published, so that no pull
                // under it starts from an old cursor; a pull already under
                // way cannot move a cursor past the reset.
                self.cursors.reset(peers.iter().copied());
                for &peer in &peers {
                    self.note_lag(peer, |lag| lag.refill_epoch = new.epoch);
                }
                Handoff {
                    epoch: new.epoch,
                    before,
                    pending: peers,
                }
            });
            drop(current);
            if was_member {
                *self
                    .drop_pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(new.epoch);
            }
            tracing::info!(
                epoch = new.epoch,
                member,
                "cluster map changed the ring; pulling this node's ranges again"
            );
        }
        // Before the placement is published: a map in effect has its
        // takeover begun (see `map_and_takeover_epochs`).
        self.begin_takeover(old.as_ref(), &new);
        self.remember(&new);
        self.placement.send_replace(Some(new));
        self.acks.peers_changed();
        self.update_ready();
        // Writes go on while the file is written.
        drop(gate);
        if ring_changed && let Err(e) = self.store_progress_now() {
            // Stored again with the cursors; until then a restart refills
            // from every peer (see `restore`).
            tracing::warn!(error = %e, "storing the ring change's progress");
        }
    }

    /// The peers whose logs this node must pull again from the start if it
    /// adopts `map`: all of them when `map` is newer and changes the ring
    /// with this node on it; `None` otherwise.
    pub fn peers_to_pull_again(&self, map: &ClusterMap) -> Option<Vec<u32>> {
        let new = Placement::of(map);
        let old = self.placement();
        let newer = old.as_ref().is_none_or(|p| p.epoch < new.epoch);
        let ring_changed = old.as_ref().is_none_or(|p| !p.same_ring(&new));
        (newer && ring_changed && new.ring.contains(self.id)).then(|| new.peers_of(self.id))
    }

    /// Whether the node is joining: it held no range before the change it
    /// is still pulling for.
    pub(super) fn joining(&self) -> bool {
        self.handoff
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|h| h.before.is_none())
    }

    /// Refuses `key` while its range is still being received here.
    pub(super) fn check_received(&self, key: &[u8]) -> Result<(), Status> {
        let handoff = self.handoff.read().unwrap_or_else(PoisonError::into_inner);
        match handoff.as_ref() {
            Some(h) if h.before.as_ref().is_none_or(|b| !b.ring.owns(self.id, key)) => Err(
                Status::unavailable("this node is still receiving the key's range"),
            ),
            _ => Ok(()),
        }
    }

    /// Refuses a listing scan (one that compares deleted keys across
    /// replicas) made under a router's map `epoch` whose ring is not this
    /// node's, or while this node is still receiving ranges it did not hold
    /// before: its page could then hold keys of others' ranges, or miss
    /// keys of its own.
    pub fn check_listing(&self, epoch: u64) -> Result<(), Status> {
        if let Some(p) = self.placement()
            && epoch != 0
            && !(p.ring_epoch..=p.epoch).contains(&epoch)
        {
            return Err(Status::aborted(format!(
                "listing under cluster map epoch {epoch}, but this node's ring is the one of \
                 epochs {} to {}",
                p.ring_epoch, p.epoch
            )));
        }
        if self.receiving_ranges() {
            return Err(Status::unavailable(
                "this node is still receiving ranges it did not hold before",
            ));
        }
        Ok(())
    }

    /// Whether the ring change being pulled for gave this node ranges it did
    /// not hold before. Nodes added to a ring only take ranges from others
    /// (a preference list gains the new node and drops its last one), so
    /// only removals and changes of the replication factor or vnodes do.
    fn receiving_ranges(&self) -> bool {
        let handoff = self.handoff.read().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = handoff.as_ref() else {
            return false;
        };
        let (Some(before), Some(now)) = (&h.before, self.placement()) else {
            return true;
        };
        let ((old_members, old_rf, old_vnodes), (new_members, new_rf, new_vnodes)) =
            (&before.shape, &now.shape);
        !(old_rf == new_rf
            && old_vnodes == new_vnodes
            && old_members.iter().all(|m| new_members.contains(m)))
    }

    /// Whether `peer` has not been pulled from to its end since its cursor
    /// went back to 0: pulls ask it for every record, not just its own.
    pub fn is_refilling(&self, peer: u32) -> bool {
        self.lag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .is_some_and(|lag| lag.refill_epoch > lag.refilled_epoch)
    }

    /// A pull under a map whose ring took its shape at `epoch` reached
    /// `peer`'s end.
    pub fn caught_up_with(&self, peer: u32, epoch: u64) {
        self.note_lag(peer, |lag| {
            if lag.refill_epoch == epoch {
                lag.refilled_epoch = epoch;
            }
        });
        self.refill_done(peer, Some(epoch));
    }

    /// `peer` could not be reached: there is nothing to pull from it now.
    pub fn refill_skipped(&self, peer: u32) {
        self.refill_done(peer, None);
    }

    fn refill_done(&self, peer: u32, epoch: Option<u64>) {
        {
            let mut handoff = self.handoff.write().unwrap_or_else(PoisonError::into_inner);
            let Some(h) = handoff.as_mut() else {
                return;
            };
            if epoch.is_some_and(|e| e != h.epoch) {
                return;
            }
            h.pending.remove(&peer);
            if h.pending.is_empty() {
                tracing::info!(epoch = h.epoch, "received every range of the new map");
                *handoff = None;
            }
        }
        self.update_ready();
    }

    /// The epoch whose lost ranges are waiting to be dropped, if any.
    pub fn drop_pending(&self) -> Option<u64> {
        *self
            .drop_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The lost ranges of `epoch` were dropped.
    pub fn dropped(&self, epoch: u64) {
        let mut pending = self
            .drop_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *pending == Some(epoch) {
            *pending = None;
        }
    }

    /// Whether ranges gained with a map change are still being pulled.
    pub fn handoff_pending(&self) -> bool {
        self.handoff
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether start-up catch-up is over.
    pub fn started_up(&self) -> bool {
        self.started_up.load(Ordering::Acquire)
    }
}

/// Drops the ranges this node lost with a map change, once every node of
/// the new ring reports it has pulled from this node under that epoch.
/// A node that is leaving (in the map, not on the ring) keeps everything:
/// the others pull from it until the operator removes it.
pub async fn drop_lost_ranges(
    core: Arc<NodeCore>,
    links: PeerLinks,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(DROP_CHECK_PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(epoch) = core.replication.drop_pending() else {
            continue;
        };
        let Some(placement) = core.replication.placement() else {
            continue;
        };
        // A later map that kept the ring (a leaving node removed) does not
        // change what was lost.
        if placement.ring_epoch != epoch || !placement.ring.contains(core.id) {
            continue;
        }
        if !every_peer_refilled(&core, &links, &placement).await {
            continue;
        }
        let me = core.id;
        let kept = Arc::clone(&placement);
        let dropped = core
            .write(move |core| {
                core.engine
                    .retain(|key| kept.ring.owns(me, key))
                    .map_err(|e| engine_status(&e))
            })
            .await;
        match dropped {
            Ok(report) => {
                tracing::info!(
                    epoch,
                    dropped = report.records_dropped,
                    "dropped the ranges this node no longer replicates"
                );
                core.replication.dropped(epoch);
            }
            Err(status) => {
                tracing::warn!(epoch, error = %status.message(), "dropping lost ranges failed; will retry");
            }
        }
    }
}

/// Whether every other node of the ring says it pulled everything of its
/// ranges from this node under the placement's epoch.
async fn every_peer_refilled(core: &NodeCore, links: &PeerLinks, placement: &Placement) -> bool {
    for &peer in placement.ring_members() {
        if peer == core.id {
            continue;
        }
        let Some(Ok(channel)) = placement.addrs.get(&peer).map(|addr| channel(addr, links)) else {
            return false;
        };
        let answer = tokio::time::timeout(
            STATS_TIMEOUT,
            AdminClient::new(channel).stats(StatsRequest {}),
        )
        .await;
        let Ok(Ok(stats)) = answer else {
            return false;
        };
        let refilled = stats
            .into_inner()
            .peers
            .iter()
            .any(|p| p.peer_id == core.id && p.refilled_epoch >= placement.ring_epoch);
        if !refilled {
            return false;
        }
    }
    true
}
