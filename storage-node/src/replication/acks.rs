//! What each peer has acknowledged, and waiting for enough of them to meet a
//! write level.
//!
//! A peer acknowledges every record of this node's log up to `after` by
//! pulling from `after`: it asks for the next records only once it has
//! applied the previous ones. A coordinator's write at seq `s` is on a peer
//! once that peer's acknowledged seq reaches `s` *under the map epoch the
//! write was coordinated under*: a pull carries the puller's epoch, and a
//! peer that has moved on to a newer map (where it may not replicate the
//! key, or where another node is its primary and has already caught up
//! from it) acknowledges nothing for a write of the older one. That is
//! what keeps a deposed primary from gathering a quorum. Peers that have
//! not pulled for a while are presumed down, and a write level that only
//! they could complete fails at once instead of at the timeout.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Acknowledged seqs of the peers that pull from this node.
#[derive(Debug)]
pub struct Acks {
    /// Peer id → its latest pull.
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

#[derive(Debug, Clone, Copy)]
struct PeerAck {
    through: u64,
    /// The map epoch of the peer's latest pull: `through` counts under it.
    epoch: u64,
    seen: Instant,
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
            let ack = peers.entry(peer).or_insert(PeerAck {
                through,
                epoch,
                seen: Instant::now(),
            });
            if epoch > ack.epoch {
                *ack = PeerAck {
                    through,
                    epoch,
                    seen: Instant::now(),
                };
            } else if epoch == ack.epoch {
                // A restarted peer may pull from an older cursor than before
                // (it persists cursors periodically); what it acknowledged
                // earlier it still holds, on disk or through catch-up.
                ack.through = ack.through.max(through);
                ack.seen = Instant::now();
            }
        }
        self.changed.send_replace(());
    }

    /// Waits until `needed` replicas hold the record at `seq`, written under
    /// map `epoch`: this node plus those of `peers` that acknowledged it
    /// under that epoch. Returns how many did, which is less than `needed`
    /// if `timeout` passed first or if the peers that are up (and not on a
    /// newer map) cannot make up the difference.
    pub async fn wait(
        &self,
        seq: u64,
        epoch: u64,
        peers: &[u32],
        needed: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        loop {
            // Counted after subscribing, so no acknowledgement is missed.
            let (acked, possible) = self.count(seq, epoch, peers);
            if acked >= needed || possible < needed {
                return acked;
            }
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return acked;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return self.count(seq, epoch, peers).0,
            }
        }
    }

    /// Replicas holding `seq` of `epoch` (this node included), and those
    /// that may still.
    fn count(&self, seq: u64, epoch: u64, peers: &[u32]) -> (usize, usize) {
        let now = Instant::now();
        let newcomers_may_pull = now.duration_since(
            *self
                .peers_changed
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) < self.alive_for;
        let known = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut acked, mut possible) = (1, 1);
        for peer in peers {
            match known.get(peer) {
                Some(ack) if ack.epoch == epoch && ack.through >= seq => {
                    acked += 1;
                    possible += 1;
                }
                Some(ack)
                    if ack.epoch <= epoch && now.duration_since(ack.seen) < self.alive_for =>
                {
                    possible += 1;
                }
                None if newcomers_may_pull => possible += 1,
                _ => {}
            }
        }
        (acked, possible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_level_is_met_by_acknowledgements_after_its_seq() {
        let acks = std::sync::Arc::new(Acks::new(Duration::from_secs(60)));
        acks.record(2, 5, 1);
        acks.record(3, 5, 1);
        // Quorum of 3 for seq 7: node 2 acknowledges it later.
        let waiter = {
            let acks = std::sync::Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(7, 1, &[2, 3], 2, Duration::from_secs(30)).await })
        };
        acks.record(2, 7, 1);
        assert_eq!(waiter.await.unwrap(), 2);
        assert_eq!(acks.wait(7, 1, &[2, 3], 1, Duration::ZERO).await, 2);
    }

    #[tokio::test]
    async fn a_level_that_peers_known_to_be_down_cannot_meet_fails_at_once() {
        // Node 3 has had its chance to pull and never did.
        let acks = Acks::new(Duration::ZERO);
        acks.record(2, 9, 1);
        // Node 3 never pulled: `all` cannot be met, and that is known now.
        let started = Instant::now();
        assert_eq!(
            acks.wait(9, 1, &[2, 3], 3, Duration::from_secs(30)).await,
            2
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_peer_that_has_not_pulled_yet_is_waited_for() {
        let acks = std::sync::Arc::new(Acks::new(Duration::from_secs(60)));
        let waiter = {
            let acks = std::sync::Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(3, 1, &[2], 2, Duration::from_secs(30)).await })
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
            acks.wait(5, 1, &[2, 3], 3, Duration::from_millis(50)).await,
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
        assert_eq!(acks.wait(5, 1, &[2], 2, Duration::from_secs(30)).await, 1);
        assert!(started.elapsed() < Duration::from_secs(30), "known at once");
        assert_eq!(acks.wait(5, 2, &[2], 2, Duration::ZERO).await, 2);
        // An older epoch's pull after a newer one changes nothing.
        acks.record(2, 9, 1);
        assert_eq!(acks.wait(9, 1, &[2], 2, Duration::ZERO).await, 1);
    }
}
