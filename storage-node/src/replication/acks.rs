//! What each peer has acknowledged, and waiting for enough of them to meet a
//! write level.
//!
//! A peer acknowledges every record of this node's log up to `after` by
//! pulling from `after`: it asks for the next records only once it has
//! applied the previous ones. A pull carries the puller's map epoch and is
//! answered only under the same epoch on both nodes, so an acknowledgement
//! is always made under one epoch. A coordinator's write at seq `s`, made
//! under epoch E, is on a peer once that peer's acknowledged seq under E
//! reaches `s`, or under a later epoch through which the coordinator
//! stayed the key's primary and the peer one of its replicas (the caller
//! says which epochs count, see `Replication::wait_for`). A peer that
//! moved on to a map where it does not replicate the key, or where another
//! node is its primary, acknowledges nothing for the write: that is what
//! keeps a deposed primary from gathering a quorum. Peers that have not
//! pulled for a while are presumed down, and a write level that only they
//! could complete fails at once instead of at the timeout.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Epochs per peer whose acknowledged seq is kept: a write in flight
/// across a few map changes still counts what the peer acknowledged under
/// its own epoch (a ring change sends the peer's cursor back to the start
/// under the next one).
const KEPT_EPOCHS: usize = 4;

/// Acknowledged seqs of the peers that pull from this node.
#[derive(Debug)]
pub struct Acks {
    /// Peer id → its pulls.
    peers: Mutex<HashMap<u32, PeerAck>>,
    /// Bumped on every acknowledgement; waiting writes watch it.
    changed: watch::Sender<()>,
    /// A peer that pulled within this long counts as up.
    alive_for: Duration,
    /// Peers that never pulled count as up until this long after the
    /// last change of peers: a node just started, or just told of new
    /// peers, has not been pulled from yet.
    peers_changed: Mutex<Instant>,
}

#[derive(Debug)]
struct PeerAck {
    /// (epoch, the seq acknowledged under it) of the peer's latest epochs,
    /// oldest first, at most [`KEPT_EPOCHS`].
    through: Vec<(u64, u64)>,
    /// When the peer last pulled under its newest epoch.
    seen: Instant,
}

impl PeerAck {
    /// The newest epoch the peer pulled under.
    fn epoch(&self) -> u64 {
        self.through.last().map_or(0, |&(epoch, _)| epoch)
    }
}

impl Acks {
    /// Counts a peer as down once it has not pulled for `alive_for`.
    pub fn new(alive_for: Duration) -> Acks {
        Acks {
            peers: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(()),
            alive_for,
            peers_changed: Mutex::new(Instant::now()),
        }
    }

    /// The set of peers changed: give new ones time to pull.
    pub fn peers_changed(&self) {
        *self
            .peers_changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// `peer`, pulling under map `epoch`, holds everything up to `through`
    /// (it pulled after it), and is up.
    pub fn record(&self, peer: u32, through: u64, epoch: u64) {
        {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            let ack = peers.entry(peer).or_insert_with(|| PeerAck {
                through: Vec::with_capacity(KEPT_EPOCHS),
                seen: Instant::now(),
            });
            if let Some(kept) = ack.through.iter_mut().find(|(e, _)| *e == epoch) {
                // A restarted peer may pull from an older cursor than before
                // (it persists cursors periodically); what it acknowledged
                // earlier it still holds, on disk or through catch-up.
                kept.1 = kept.1.max(through);
            } else if epoch > ack.epoch() {
                if ack.through.len() == KEPT_EPOCHS {
                    ack.through.remove(0);
                }
                ack.through.push((epoch, through));
            }
            if epoch == ack.epoch() {
                ack.seen = Instant::now();
            }
        }
        self.changed.send_replace(());
    }

    /// Waits until `needed` replicas hold the record at `seq`, written under
    /// map `epoch`: this node plus those of `peers` that acknowledged it
    /// under that epoch, or under a later one for which `counts(peer,
    /// later)` says the peer's acknowledgement still proves it holds the
    /// record. Returns how many did, which is less than `needed` if
    /// `timeout` passed first or if the peers that are up (and not on a
    /// map that does not count) cannot make up the difference.
    pub async fn wait(
        &self,
        seq: u64,
        epoch: u64,
        peers: &[u32],
        needed: usize,
        timeout: Duration,
        counts: impl Fn(u32, u64) -> bool,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        loop {
            // Counted after subscribing, so no acknowledgement is missed.
            let (acked, possible) = self.count(seq, epoch, peers, &counts);
            if acked >= needed || possible < needed {
                return acked;
            }
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return acked;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return self.count(seq, epoch, peers, &counts).0;
                }
            }
        }
    }

    /// Replicas holding `seq` of `epoch` (this node included), and those
    /// that may still.
    fn count(
        &self,
        seq: u64,
        epoch: u64,
        peers: &[u32],
        counts: impl Fn(u32, u64) -> bool,
    ) -> (usize, usize) {
        let now = Instant::now();
        let newcomers_may_pull = now.duration_since(
            *self
                .peers_changed
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) < self.alive_for;
        // `counts` takes no lock of this module's: it may run under `peers`.
        let known = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut acked, mut possible) = (1, 1);
        for &peer in peers {
            let Some(ack) = known.get(&peer) else {
                possible += usize::from(newcomers_may_pull);
                continue;
            };
            let holds = ack.through.iter().any(|&(under, through)| {
                through >= seq && (under == epoch || under > epoch && counts(peer, under))
            });
            // Under an older epoch the peer may still move on to this one.
            let newest = ack.epoch();
            let may_yet = (newest <= epoch || counts(peer, newest))
                && now.duration_since(ack.seen) < self.alive_for;
            if holds {
                acked += 1;
                possible += 1;
            } else if may_yet {
                possible += 1;
            }
        }
        (acked, possible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits counting acknowledgements under the write's own epoch only.
    async fn wait(
        acks: &Acks,
        seq: u64,
        epoch: u64,
        peers: &[u32],
        needed: usize,
        timeout: Duration,
    ) -> usize {
        acks.wait(seq, epoch, peers, needed, timeout, |_, _| false)
            .await
    }

    #[tokio::test]
    async fn a_write_level_is_met_by_acknowledgements_after_its_seq() {
        let acks = std::sync::Arc::new(Acks::new(Duration::from_secs(60)));
        acks.record(2, 5, 1);
        acks.record(3, 5, 1);
        // Quorum of 3 for seq 7: node 2 acknowledges it later.
        let waiter = {
            let acks = std::sync::Arc::clone(&acks);
            tokio::spawn(
                async move { wait(&acks, 7, 1, &[2, 3], 2, Duration::from_secs(30)).await },
            )
        };
        acks.record(2, 7, 1);
        assert_eq!(waiter.await.unwrap(), 2);
        assert_eq!(wait(&acks, 7, 1, &[2, 3], 1, Duration::ZERO).await, 2);
    }

    #[tokio::test]
    async fn a_level_that_peers_known_to_be_down_cannot_meet_fails_at_once() {
        // Node 3 has had its chance to pull and never did.
        let acks = Acks::new(Duration::ZERO);
        acks.record(2, 9, 1);
        // Node 3 never pulled: `all` cannot be met, and that is known now.
        let started = Instant::now();
        assert_eq!(
            wait(&acks, 9, 1, &[2, 3], 3, Duration::from_secs(30)).await,
            2
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_peer_that_has_not_pulled_yet_is_waited_for() {
        let acks = std::sync::Arc::new(Acks::new(Duration::from_secs(60)));
        let waiter = {
            let acks = std::sync::Arc::clone(&acks);
            tokio::spawn(async move { wait(&acks, 3, 1, &[2], 2, Duration::from_secs(30)).await })
        };
        acks.record(2, 3, 1);
        assert_eq!(waiter.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_level_not_met_in_time_reports_the_acknowledgements_it_got() {
        let acks = Acks::new(Duration::from_secs(60));
        acks.record(2, 5, 1);
        acks.record(3, 1, 1);
        assert_eq!(
            wait(&acks, 5, 1, &[2, 3], 3, Duration::from_millis(50)).await,
            2
        );
    }

    #[tokio::test]
    async fn a_peer_on_a_newer_map_acknowledges_nothing_of_an_older_one() {
        let acks = Acks::new(Duration::from_secs(60));
        // Node 2 pulled past seq 5 under epoch 2: a write of epoch 1 at seq
        // 5 is not on a replica of epoch 1's placement, and never will be.
        acks.record(2, 6, 2);
        let started = Instant::now();
        assert_eq!(wait(&acks, 5, 1, &[2], 2, Duration::from_secs(30)).await, 1);
        assert!(started.elapsed() < Duration::from_secs(30), "known at once");
        assert_eq!(wait(&acks, 5, 2, &[2], 2, Duration::ZERO).await, 2);
        // An older epoch's pull after a newer one changes nothing.
        acks.record(2, 9, 1);
        assert_eq!(wait(&acks, 9, 1, &[2], 2, Duration::ZERO).await, 1);
    }

    #[tokio::test]
    async fn a_peer_on_a_later_map_that_kept_the_key_acknowledges_it() {
        let acks = Acks::new(Duration::from_secs(60));
        acks.record(2, 6, 3);
        // The placements say node 2 stayed a replica through epochs 1 to 3.
        let kept = |peer: u32, epoch: u64| peer == 2 && epoch <= 3;
        assert_eq!(acks.wait(5, 1, &[2], 2, Duration::ZERO, kept).await, 2);
        // Node 3 pulled only under epoch 4, through which this node did not
        // keep its roles: that acknowledgement proves nothing, and as node 3
        // will never pull under a counting epoch again, that is known now.
        acks.record(3, 9, 4);
        let started = Instant::now();
        assert_eq!(
            acks.wait(5, 1, &[3], 2, Duration::from_secs(30), kept)
                .await,
            1
        );
        assert!(started.elapsed() < Duration::from_secs(30), "known at once");
        // What node 2 acknowledged under epoch 3 stays acknowledged after
        // it moved on to epoch 4.
        acks.record(2, 9, 4);
        assert_eq!(acks.wait(5, 1, &[2], 2, Duration::ZERO, kept).await, 2);
    }

    #[tokio::test]
    async fn an_acknowledgement_under_the_writes_epoch_outlives_the_next_epochs_pull() {
        let acks = Acks::new(Duration::from_secs(60));
        acks.record(2, 6, 1);
        // A ring change: the peer pulls again from the start under epoch 2.
        acks.record(2, 0, 2);
        let never = |_: u32, _: u64| false;
        assert_eq!(acks.wait(5, 1, &[2], 2, Duration::ZERO, never).await, 2);
        assert_eq!(acks.wait(5, 2, &[2], 2, Duration::ZERO, never).await, 1);
    }
}
