//! Replication between storage nodes: primary → secondaries, pulled.
//!
//! Every node long-polls every peer for the records of its own ranges after
//! a per-peer cursor (`Replication/Pull`), applies them by last-writer-wins
//! and asks for the next ones, which acknowledges these. The one mechanism
//! is both the live replication stream (the cursor is at the end of the
//! peer's log: answers come from the peer's in-memory [`feed`]) and catch-up
//! after downtime (the cursor is far behind: answers come from the peer's
//! data files). When the peer has merged away tombstones newer than the
//! cursor it answers OUT_OF_RANGE, and the node copies a snapshot of its
//! ranges instead (full catch-up, [`puller`]).
//!
//! A coordinator appends a write, then waits until the write level's number
//! of replicas hold it ([`acks`]). A node starts *not ready* and becomes
//! ready once it has caught up with every peer it can reach; until then the
//! `Kv` service refuses clients and the health service says NOT_SERVING, so
//! routers read from and coordinate on nodes that are up to date.
//!
//! Nothing here reads or writes data files directly: all storage goes
//! through the engine.

pub mod acks;
pub mod antientropy;
pub mod cursors;
pub mod feed;
pub mod handoff;
pub(crate) mod inference;
pub mod progress;
pub mod puller;
pub mod service;
pub mod takeover;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use caskade_common::{Ring, Version};
use caskade_proto::{ClusterMap, NodeState, WriteLevel};
use prost::bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::config::ReplicationConfig;
use crate::engine::SinceIter;
use crate::epochs::push_consecutive;
use crate::status::{
    ACKS_METADATA, PRIMARY_METADATA, REQUIRED_ACKS_METADATA, WRITTEN_VERSION_METADATA,
};
use acks::Acks;
use cursors::Cursors;
use feed::Feed;
use progress::RingProgress;

/// Where keys live, from one cluster map.
#[derive(Debug)]
pub struct Placement {
    /// The map's epoch.
    pub epoch: u64,
    /// The ring built from it (shared with the placements before it while
    /// the ring stays the same).
    pub ring: Arc<Ring>,
    /// Node id → gRPC address, for every node of the map (leaving ones too).
    pub addrs: BTreeMap<u32, String>,
    /// Nodes the map marks down: they coordinate nothing.
    pub down: BTreeSet<u32>,
    /// Nodes still receiving their ranges: replicas, not yet primaries.
    pub joining: BTreeSet<u32>,
    /// What the ring was built from: members, replication factor, vnodes.
    shape: (Vec<u32>, u32, u32),
    /// The epoch of the map that gave the ring this shape.
    pub ring_epoch: u64,
}

impl Placement {
    /// The placement a map describes.
    pub fn of(map: &ClusterMap) -> Placement {
        let members = map.ring_members();
        Placement {
            epoch: map.epoch,
            ring: Arc::new(Ring::new(
                &members,
                map.vnodes_per_node,
                map.replication_factor,
            )),
            addrs: map.nodes.iter().map(|n| (n.id, n.addr.clone())).collect(),
            down: map.nodes.iter().filter(|n| n.down).map(|n| n.id).collect(),
            joining: map
                .nodes
                .iter()
                .filter(|n| n.state() == NodeState::Joining)
                .map(|n| n.id)
                .collect(),
            shape: (members, map.replication_factor, map.vnodes_per_node),
            ring_epoch: map.epoch,
        }
    }

    /// The primary of `key`: the first node of its preference list that is
    /// neither marked down nor still joining (`None` if there is none).
    /// Only it coordinates the key's writes under this map.
    pub fn primary_of(&self, key: &[u8]) -> Option<u32> {
        self.primary_among(&self.ring.preference_list(key))
    }

    /// The primary of a key whose preference list is `replicas`.
    fn primary_among(&self, replicas: &[u32]) -> Option<u32> {
        replicas
            .iter()
            .copied()
            .find(|n| !self.down.contains(n) && !self.joining.contains(n))
    }

    /// Whether `key` has enough replicas up for a new primary to gather
    /// every write acknowledged at `quorum` by catching up from them: at
    /// least half of its preference list (rounded up), so that they share a
    /// node with every majority.
    pub fn enough_replicas_up(&self, key: &[u8]) -> bool {
        let replicas = self.ring.preference_list(key);
        let up = replicas.iter().filter(|n| !self.down.contains(n)).count();
        up >= replicas.len().div_ceil(2)
    }

    /// The nodes that own ranges.
    pub fn ring_members(&self) -> &[u32] {
        &self.shape.0
    }

    /// Whether both place every key on the same nodes.
    pub fn same_ring(&self, other: &Placement) -> bool {
        self.shape == other.shape
    }

    /// The nodes `me` pulls from: every other node of the map, if `me` is in it.
    pub fn peers_of(&self, me: u32) -> Vec<u32> {
        if !self.addrs.contains_key(&me) {
            return Vec::new();
        }
        self.addrs.keys().copied().filter(|&n| n != me).collect()
    }
}

/// Most placements of consecutive epochs kept to tell which keys kept
/// their primary and replicas across map changes.
const MAX_HISTORY: usize = 64;

/// Which replicas a coordinated write goes to, and how many must hold it.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// The key written.
    pub key: Bytes,
    /// The key's other replicas.
    pub peers: Vec<u32>,
    /// The key's preference list (the lease is checked against it).
    pub replicas: Vec<u32>,
    /// Replicas, this node included, the write level needs.
    pub needed: usize,
    /// The map epoch the write is coordinated under: acknowledgements count
    /// under it, or under a later epoch through which this node stayed the
    /// key's primary and the peer its replica (see [`Replication::kept_roles`]).
    pub epoch: u64,
}

/// What anti-entropy did on this node since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct AntiEntropyStats {
    /// Records copied from peers that were newer here.
    pub repaired: u64,
    /// Exchanges with a peer that completed.
    pub exchanges: u64,
    /// When the last round that compared with every peer ended.
    pub last_full_round: Option<Instant>,
}

/// How far this node is behind one peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLag {
    /// The cursor: this node holds the peer's records up to here.
    pub cursor: u64,
    /// The peer's last seq when it last answered.
    pub peer_last_seq: u64,
    /// When the cursor last reached the peer's end (`None`: not since start).
    pub caught_up_at: Option<Instant>,
    /// Whether the last pull got an answer.
    pub reachable: bool,
    /// The epoch of the last map change that sent this node's cursor on
    /// the peer back to 0 (0: none).
    pub refill_epoch: u64,
    /// The epoch under which this node last pulled everything of its ranges
    /// from the peer after a map change (0: never). The peer drops ranges
    /// it lost once every node reports it.
    pub refilled_epoch: u64,
    /// Full catch-ups from this peer since start.
    pub full_catch_ups: u64,
    /// The last pull from the peer could not be stored for lack of space:
    /// this node may lack the peer's recent writes.
    pub short_of_space: bool,
}

impl PeerLag {
    /// Records this node is behind.
    pub fn records(&self) -> u64 {
        self.peer_last_seq.saturating_sub(self.cursor)
    }

    /// Time since the cursor last reached the peer's end (0 when it is there).
    pub fn seconds(&self, started: Instant) -> f64 {
        if self.records() == 0 && self.reachable {
            return 0.0;
        }
        self.caught_up_at.unwrap_or(started).elapsed().as_secs_f64()
    }
}

/// Replication state shared by the services and the pullers.
#[derive(Debug)]
pub struct Replication {
    /// This node's id.
    pub id: u32,
    /// Settings.
    pub config: ReplicationConfig,
    /// The tail of this node's log.
    pub feed: Arc<Feed>,
    /// What the peers have acknowledged.
    pub acks: Acks,
    /// This node's cursors on its peers.
    pub cursors: Cursors,
    placement: watch::Sender<Option<Arc<Placement>>>,
    /// The placements of consecutive epochs up to the current one, oldest
    /// first (at most [`MAX_HISTORY`]; a skipped epoch starts it anew).
    history: Mutex<VecDeque<Arc<Placement>>>,
    /// Serialises map changes, and the stores of the ring-change progress
    /// with them (an older snapshot must not overwrite a newer one).
    changing: Mutex<()>,
    /// Held shared by a write from its plan to its append, and by a repair
    /// from its epoch check to its apply; held exclusively while a map is
    /// put into effect. Nothing is appended under a map no longer in effect.
    gate: RwLock<()>,
    /// Peer id → (epoch, when this node sent the latest pull the peer
    /// answered under that epoch): the primary's lease.
    confirmed: Mutex<HashMap<u32, (u64, Instant)>>,
    ready: watch::Sender<bool>,
    /// The start-up catch-up is done (or was not needed).
    started_up: AtomicBool,
    /// The node belongs to a cluster (or is forming one): without a map it
    /// does not know its ranges and must not serve.
    needs_map: bool,
    /// Ranges gained with the last map change, still being pulled.
    handoff: RwLock<Option<handoff::Handoff>>,
    /// Primary ranges gained with the last map change (or at start), still
    /// being copied from the other nodes.
    takeover: RwLock<Option<takeover::Takeover>>,
    /// The epoch of a map change that took ranges away from this node:
    /// they are dropped once every peer confirms it pulled from this node.
    drop_pending: Mutex<Option<u64>>,
    /// Peer id → lag, as the pullers last saw it.
    lag: Mutex<BTreeMap<u32, PeerLag>>,
    /// What anti-entropy did.
    anti_entropy: Mutex<AntiEntropyStats>,
    /// How far the last ring change got, as stored.
    progress: RingProgress,
    /// Peer id → the on-disk read of this node's log that peer's pulls are
    /// walking through (one per peer; a pull from elsewhere replaces it),
    /// and when it was last used.
    sessions: Mutex<HashMap<u32, (Instant, SinceIter)>>,
    started: Instant,
    /// Differs at every start of this node (see `PullResponse.incarnation`).
    pub incarnation: u64,
    /// The last seq of the log when this incarnation started.
    pub start_seq: u64,
}

impl Replication {
    /// State for node `id`, placed by `map` if it has one. With a map naming
    /// no other node, or without a map while `needs_map` is false (a node
    /// alone, in no cluster), the node replicates to nobody and is ready at
    /// once; with `needs_map` it is not ready until it has a map.
    pub fn new(
        id: u32,
        config: ReplicationConfig,
        feed: Arc<Feed>,
        cursors: Cursors,
        progress: RingProgress,
        map: Option<&ClusterMap>,
        needs_map: bool,
    ) -> Replication {
        let start_seq = feed.last_seq();
        let mut placement = map.map(Placement::of);
        let restored = placement
            .as_mut()
            .map(|p| handoff::restore(id, p, progress.take_loaded()))
            .unwrap_or_default();
        let placement = placement.map(Arc::new);
        // At start every primary range is taken over: the log may have
        // lost a tail, and others may have been primary meanwhile.
        let has_peers = placement
            .as_ref()
            .is_some_and(|p| !p.peers_of(id).is_empty());
        let replication = Replication {
            id,
            acks: Acks::new(config.peer_alive_for()),
            config,
            feed,
            cursors,
            placement: watch::Sender::new(placement.clone()),
            history: Mutex::new(placement.iter().cloned().collect()),
            changing: Mutex::new(()),
            gate: RwLock::new(()),
            confirmed: Mutex::new(HashMap::new()),
            ready: watch::Sender::new(!(has_peers || needs_map && map.is_none())),
            started_up: AtomicBool::new(!has_peers),
            needs_map,
            handoff: RwLock::new(restored.handoff),
            takeover: RwLock::new(None),
            drop_pending: Mutex::new(restored.drop),
            lag: Mutex::new(restored.lag),
            anti_entropy: Mutex::new(AntiEntropyStats::default()),
            progress,
            sessions: Mutex::new(HashMap::new()),
            started: Instant::now(),
            incarnation: new_incarnation(),
            start_seq,
        };
        if let Some(placement) = &placement {
            replication.begin_takeover(None, placement);
        }
        replication
    }

    /// The current placement, if the node has a cluster map.
    pub fn placement(&self) -> Option<Arc<Placement>> {
        self.placement.borrow().clone()
    }

    /// The epoch of the map in effect and the epoch of the takeover under
    /// way (0: none of either). A map is in effect once its placement is
    /// published, which [`Self::set_map`] does only after it began the
    /// takeover of the ranges the map made this node the primary of; read in
    /// this order, an epoch in effect with no takeover means none is left.
    /// (The map store holds a newer map a moment earlier, while `set_map`
    /// waits for the writes under way.)
    pub fn map_and_takeover_epochs(&self) -> (u64, u64) {
        let map = self.placement.borrow().as_ref().map_or(0, |p| p.epoch);
        let takeover = self.takeover_pending().map_or(0, |(epoch, _, _)| epoch);
        (map, takeover)
    }

    /// A receiver that changes with the placement.
    pub fn watch_placement(&self) -> watch::Receiver<Option<Arc<Placement>>> {
        self.placement.subscribe()
    }

    /// Whether the node has caught up and serves clients.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// A receiver that changes when the node becomes ready.
    pub fn watch_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The node belongs to a cluster (it is not standalone): it serves and
    /// takes records only under a map.
    pub(crate) fn needs_map(&self) -> bool {
        self.needs_map
    }

    /// The start-up catch-up is over: ready unless still joining.
    pub fn mark_started(&self) {
        self.started_up.store(true, Ordering::Release);
        self.update_ready();
    }

    /// Ready: started up, not joining the cluster, and placed by a map if
    /// the node belongs to a cluster.
    fn update_ready(&self) {
        // Computed under the sender's lock: two updates at once cannot
        // publish their verdicts in the wrong order.
        self.ready.send_if_modified(|current| {
            let placed = !self.needs_map || self.placement.borrow().is_some();
            let ready = self.started_up.load(Ordering::Acquire) && !self.joining() && placed;
            if *current == ready {
                return false;
            }
            *current = ready;
            tracing::info!(ready, "readiness changed");
            true
        });
    }

    /// The replicas of `key` a write coordinated here must reach for
    /// `level`; `None` when the node stands alone, in no cluster. Refuses
    /// unless this node is the key's primary and holds every write
    /// acknowledged before it became primary.
    pub fn write_plan(&self, key: &Bytes, level: WriteLevel) -> Result<Option<WritePlan>, Status> {
        let Some(placement) = self.placement() else {
            if self.needs_map {
                return Err(no_map_yet());
            }
            return Ok(None);
        };
        let replicas = placement.ring.preference_list(key);
        if !replicas.contains(&self.id) {
            return Err(not_a_replica(placement.epoch));
        }
        if placement.primary_of(key) != Some(self.id) {
            return Err(not_the_primary(&placement, key));
        }
        if !placement.enough_replicas_up(key) {
            return Err(Status::unavailable(format!(
                "too few of the key's replicas are up in cluster map epoch {} to take its writes",
                placement.epoch
            )));
        }
        self.check_received(key)?;
        self.check_taken_over(&placement, key)?;
        self.check_lease(placement.epoch, key, &replicas)?;
        let needed = match level {
            WriteLevel::One => 1,
            WriteLevel::Unspecified | WriteLevel::Quorum => replicas.len() / 2 + 1,
            WriteLevel::All => replicas.len(),
        };
        Ok(Some(WritePlan {
            key: key.clone(),
            peers: replicas.iter().copied().filter(|&n| n != self.id).collect(),
            needed,
            epoch: placement.epoch,
            replicas,
        }))
    }

    /// Keeps the placement in effect until the guard drops: a write holds it
    /// from [`Replication::write_plan`] until its record is appended.
    pub fn hold_placement(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// `peer` answered a pull this node sent at `sent` under map `epoch`:
    /// it was on that epoch at some time after `sent`.
    pub fn confirm(&self, peer: u32, epoch: u64, sent: Instant) {
        let mut confirmed = self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = confirmed.entry(peer).or_insert((epoch, sent));
        if (epoch, sent) > *entry {
            *entry = (epoch, sent);
        }
    }

    /// Refuses to coordinate a write unless this node's primacy under the
    /// placement's epoch is confirmed: half of the key's other replicas
    /// (rounded down) answered a pull under it that was sent within the
    /// lease. A node cut off or frozen past its lease therefore writes
    /// nothing, and a node that takes over waits out the lease (see
    /// [`takeover`]) before it writes, so two primaries never overlap.
    ///
    /// A confirmation under an earlier epoch counts too if this node was
    /// the key's primary, and the peer its replica, in every epoch since:
    /// another node becomes the key's primary only under a later epoch,
    /// and the peer serves its takeover only once on that epoch, after the
    /// answer that confirmed this node. Map changes that leave a key where
    /// it was therefore do not interrupt its writes.
    fn check_lease(&self, epoch: u64, key: &[u8], replicas: &[u32]) -> Result<(), Status> {
        let needed = replicas.len() / 2;
        if needed == 0 {
            return Ok(());
        }
        let lease = self.config.primary_lease();
        let (mut confirmed, mut earlier) = (0, Vec::new());
        {
            let confirmations = self
                .confirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &peer in replicas.iter().filter(|&&n| n != self.id) {
                match confirmations.get(&peer) {
                    Some(&(under, sent)) if sent.elapsed() < lease && under == epoch => {
                        confirmed += 1;
                    }
                    Some(&(under, sent)) if sent.elapsed() < lease && under < epoch => {
                        earlier.push((peer, under));
                    }
                    _ => {}
                }
            }
        }
        // Only right after a map change: the placements are looked up then.
        for (peer, under) in earlier {
            if confirmed < needed && self.kept_roles(key, peer, under, epoch) {
                confirmed += 1;
            }
        }
        if confirmed < needed {
            return Err(Status::unavailable(format!(
                "this node cannot confirm it is still the key's primary: {confirmed} of the \
                 {needed} other replicas it needs answered its pulls in the last {} ms under \
                 cluster map epoch {epoch} (or an earlier one with the same roles for the key)",
                lease.as_millis()
            )));
        }
        Ok(())
    }

    /// Checks again the lease `plan` was made under (see [`Replication::write_plan`]).
    pub fn check_plan_lease(&self, plan: &WritePlan) -> Result<(), Status> {
        self.check_lease(plan.epoch, &plan.key, &plan.replicas)
    }

    /// Whether, in every epoch from `from` to `to` (in either order), this
    /// node was the primary of `key` and `peer` one of its replicas, as far
    /// as the placements this node adopted tell (an epoch it skipped tells
    /// nothing: then no).
    fn kept_roles(&self, key: &[u8], peer: u32, from: u64, to: u64) -> bool {
        let (first, last) = (from.min(to), from.max(to));
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let (Some(oldest), Some(newest)) = (history.front(), history.back()) else {
            return false;
        };
        if first < oldest.epoch || last > newest.epoch {
            return false;
        }
        // The history holds consecutive epochs: epoch e is at e - oldest.
        let (start, end) = (
            (first - oldest.epoch) as usize,
            (last - oldest.epoch) as usize,
        );
        history.range(start..=end).all(|p| {
            debug_assert!((first..=last).contains(&p.epoch));
            let replicas = p.ring.preference_list(key);
            replicas.contains(&peer) && p.primary_among(&replicas) == Some(self.id)
        })
    }

    /// Whether this node holds `key` under the current map (or has no map).
    pub fn check_replica(&self, key: &[u8]) -> Result<(), Status> {
        match self.placement() {
            Some(p) if !p.ring.owns(self.id, key) => Err(not_a_replica(p.epoch)),
            _ => self.check_received(key),
        }
    }

    /// Whether this node may lack recent writes of `key`: it could not
    /// store what it last pulled from some peer (its disk is full), and it
    /// is not the key's primary, which wrote them first.
    pub fn short_of_space_for(&self, key: &[u8]) -> bool {
        let primary = self.placement().and_then(|p| p.primary_of(key));
        primary != Some(self.id)
            && self
                .lag
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|lag| lag.short_of_space)
    }

    /// Waits until the write at `seq` meets `plan`; the replicas holding it.
    pub async fn wait_for(&self, plan: &WritePlan, seq: u64) -> usize {
        self.wait_for_within(plan, seq, Duration::from_millis(self.config.ack_timeout_ms))
            .await
    }

    /// [`Self::wait_for`], waiting at most `timeout`.
    pub async fn wait_for_within(&self, plan: &WritePlan, seq: u64, timeout: Duration) -> usize {
        if plan.needed <= 1 {
            return 1;
        }
        // A peer on a later map still applied the key's record, and no
        // other node can have been its primary meanwhile, if the two kept
        // their roles for the key through every epoch in between.
        let counts = |peer: u32, epoch: u64| self.kept_roles(&plan.key, peer, plan.epoch, epoch);
        self.acks
            .wait(seq, plan.epoch, &plan.peers, plan.needed, timeout, counts)
            .await
    }

    /// Keeps `new` in the history of consecutive placements.
    fn remember(&self, new: &Arc<Placement>) {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        push_consecutive(&mut history, Arc::clone(new), |p| p.epoch, MAX_HISTORY);
    }

    /// Updates what the puller of `peer` last saw.
    pub fn note_lag(&self, peer: u32, update: impl FnOnce(&mut PeerLag)) {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        update(lag.entry(peer).or_default());
    }

    /// An anti-entropy exchange completed and copied `repaired` records
    /// that were newer here.
    pub fn note_anti_entropy(&self, repaired: u64) {
        let mut stats = self
            .anti_entropy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        stats.exchanges += 1;
        stats.repaired += repaired;
    }

    /// An anti-entropy round compared with every peer.
    pub fn note_full_anti_entropy(&self) {
        self.anti_entropy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_full_round = Some(Instant::now());
    }

    /// What anti-entropy did since start.
    pub fn anti_entropy(&self) -> AntiEntropyStats {
        *self
            .anti_entropy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Lag behind every peer pulled from.
    pub fn lag(&self) -> BTreeMap<u32, PeerLag> {
        self.lag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets a peer that left the map.
    pub fn forget_peer(&self, peer: u32) {
        self.lag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
        self.cursors.remove(peer);
    }

    /// When replication state was created (lag before the first catch-up counts from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    fn take_session(&self, peer: u32) -> Option<SinceIter> {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
            .map(|(_, session)| session)
    }

    fn keep_session(&self, peer: u32, session: SinceIter) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer, (Instant::now(), session));
    }

    /// Drops the on-disk reads of peers that stopped pulling: each holds
    /// data files open, so files merged away meanwhile keep their space.
    pub fn expire_sessions(&self, idle: Duration) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (used, _)| used.elapsed() < idle);
    }
}

/// A number that differs at every start: the wall clock in nanoseconds
/// (never 0, which means "unknown" on the wire).
fn new_incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    nanos.max(1)
}

impl Replication {
    /// Whether the node holds all of its ranges: started up, and not
    /// receiving ranges from a map change.
    pub fn holds_all_ranges(&self) -> bool {
        self.started_up() && !self.handoff_pending()
    }
}

/// The refusal of a node in a cluster with no map in effect yet.
pub fn no_map_yet() -> Status {
    Status::unavailable("this node has no cluster map in effect yet")
}

/// The status for a request about a key this node does not hold.
fn not_a_replica(epoch: u64) -> Status {
    Status::aborted(format!(
        "this node is not a replica of the key in cluster map epoch {epoch}"
    ))
}

/// The status for a write sent to a replica that is not the key's primary:
/// nothing was written, and the primary (if any) is named for the router.
fn not_the_primary(placement: &Placement, key: &[u8]) -> Status {
    let mut status = Status::aborted(format!(
        "this node is not the primary of the key in cluster map epoch {}",
        placement.epoch
    ));
    if let Some(primary) = placement.primary_of(key) {
        status
            .metadata_mut()
            .insert(PRIMARY_METADATA, MetadataValue::from(u64::from(primary)));
    }
    status
}

/// The status for a write applied (with `version`) on fewer replicas than its level needs.
pub fn level_not_met(acks: usize, needed: usize, version: Version) -> Status {
    let mut status = Status::unavailable(format!(
        "the write reached {acks} of the {needed} replicas its write level needs; \
         it was not rolled back and will reach the others when they catch up"
    ));
    let metadata = status.metadata_mut();
    metadata.insert(ACKS_METADATA, MetadataValue::from(acks as u64));
    metadata.insert(REQUIRED_ACKS_METADATA, MetadataValue::from(needed as u64));
    if let Ok(value) = MetadataValue::try_from(version.to_string()) {
        metadata.insert(WRITTEN_VERSION_METADATA, value);
    }
    status
}

#[cfg(test)]
mod tests;
