//! What the Raft leader does on its own, once per tick while it leads:
//!
//! - **Forms the map**: a new cluster's first leader proposes the map its
//!   initial members describe (every initial member would propose the same;
//!   a second proposal changes nothing).
//! - **Failover**: it probes every other node's readiness; a node that has
//!   not answered for `failover_after_ms` is marked down in a new epoch, so
//!   routers send its requests to the next replicas at once instead of
//!   each discovering the failure; a down node is marked up once it answers
//!   SERVING, has applied the map that marks it down, and has pulled every
//!   live peer to its end since (a node cut off by a partition never stopped
//!   serving, so SERVING alone would let it answer with stale data). A new leader gives
//!   every node the full delay again before it marks any down.
//! - **Records joins**: each node that holds Raft state is recorded once, so a
//!   node whose data directory was replaced is refused at its next start
//!   ([`super::identity`]).
//! - **Keeps Raft's members equal to the map's nodes**: it finishes what a
//!   leader that crashed mid-change left (a node in the map but not in the
//!   group becomes a learner, a caught-up learner of the map a voter, a
//!   member of the group that left the map is removed).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock_offset::PeerChannel;
use crate::peers::PeerLinks;
use caskade_proto::StatsRequest;
use caskade_proto::admin_client::AdminClient;
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::map::{Change, Command, Map};
use super::{COMMIT_TIMEOUT, Cluster};
use crate::config::InitialMembers;
use crate::replication::puller::channel;

/// Tick when failover is disabled.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// The readiness the probes ask for.
const KV_SERVICE: &str = "caskade.v1.Kv";

/// Runs the leader's duties until `stop` is set.
pub async fn run(
    cluster: Arc<Cluster>,
    initial: Option<InitialMembers>,
    links: PeerLinks,
    mut stop: watch::Receiver<bool>,
) {
    let failover_after = Duration::from_millis(cluster.config.failover_after_ms);
    let tick = if failover_after.is_zero() {
        IDLE_TICK
    } else {
        (failover_after / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
    };
    let mut detector = Detector::new(links, failover_after);
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if cluster.leader() != Some(cluster.me) {
            detector.not_leading();
            continue;
        }
        let Some(map) = cluster.map() else {
            if let Some(members) = &initial {
                let members: Vec<(u32, String)> =
                    members.0.iter().map(|m| (m.id, m.addr.clone())).collect();
                let first = Map::initial(
                    &members,
                    cluster.config.replication_factor,
                    cluster.config.vnodes_per_node,
                );
                let command = Command {
                    expected_epoch: 0,
                    change: Change::Bootstrap(first),
                };
                if let Err(e) = cluster.propose(command).await {
                    tracing::warn!(error = %e, "proposing the first cluster map");
                }
            }
            continue;
        };
        record_joins(&cluster, &map).await;
        // One change per tick: the next decision sees its epoch.
        let decision = if failover_after.is_zero() {
            None
        } else {
            detector.check(&cluster, &map).await.into_iter().next()
        };
        if decision.is_none()
            && let Some(id) = detector.joined(&map).await
        {
            let command = Command {
                expected_epoch: map.epoch,
                change: Change::Serving(id),
            };
            match cluster.propose(command).await {
                Ok(next) => tracing::info!(
                    node = id,
                    epoch = next.epoch,
                    "joining node holds its ranges"
                ),
                Err(e) => {
                    tracing::info!(node = id, error = %e, "marking a joined node serving failed; will retry")
                }
            }
        }
        if let Some((id, down)) = decision {
            let command = Command {
                // Decided on this map: refused if it changed meanwhile.
                expected_epoch: map.epoch,
                change: Change::Down(id, down),
            };
            let state = if down { "down" } else { "up" };
            match cluster.propose(command).await {
                Ok(next) => tracing::warn!(node = id, epoch = next.epoch, "node marked {state}"),
                Err(e) => {
                    tracing::info!(node = id, error = %e, "marking a node {state} failed; will retry")
                }
            }
        }
        reconcile(&cluster).await;
    }
}

/// The leader's failure detector.
struct Detector {
    links: PeerLinks,
    failover_after: Duration,
    /// When this node started leading (the grace period counts from here).
    leading_since: Option<Instant>,
    /// When each node last answered a probe.
    seen: HashMap<u32, Instant>,
    channels: HashMap<String, PeerChannel>,
}

impl Detector {
    fn new(links: PeerLinks, failover_after: Duration) -> Detector {
        Detector {
            links,
            failover_after,
            leading_since: None,
            seen: HashMap::new(),
            channels: HashMap::new(),
        }
    }

    fn not_leading(&mut self) {
        self.leading_since = None;
        self.seen.clear();
    }

    /// Probes every other node; returns the nodes to mark down (`true`) or up.
    async fn check(&mut self, cluster: &Cluster, map: &Map) -> Vec<(u32, bool)> {
        let since = *self.leading_since.get_or_insert_with(Instant::now);
        let timeout = (self.failover_after / 2).min(Duration::from_secs(2));
        let mut probes = Vec::new();
        for node in map.nodes.iter().filter(|n| n.id != cluster.me) {
            let channel = match self.channels.get(&node.addr) {
                Some(channel) => channel.clone(),
                None => match channel(&node.addr, &self.links) {
                    Ok(channel) => {
                        self.channels.insert(node.addr.clone(), channel.clone());
                        channel
                    }
                    Err(_) => continue,
                },
            };
            let id = node.id;
            probes.push(async move {
                let request = HealthCheckRequest {
                    service: KV_SERVICE.into(),
                };
                let answer =
                    tokio::time::timeout(timeout, HealthClient::new(channel).check(request)).await;
                let serving = match answer {
                    Ok(Ok(answer)) => {
                        Some(answer.get_ref().status == ServingStatus::Serving as i32)
                    }
                    _ => None,
                };
                (id, serving)
            });
        }
        let answers = futures_util::future::join_all(probes).await;
        let now = Instant::now();
        if self.links.clock.is_off() {
            // Every answer was refused: once the clock agrees again, each
            // node gets the full delay before it can be marked down.
            self.leading_since = Some(now);
        }
        let mut decisions = Vec::new();
        for (id, serving) in answers {
            if serving.is_some() {
                self.seen.insert(id, now);
            }
            let Some(node) = map.node(id) else { continue };
            let last = self.seen.get(&id).copied().unwrap_or(since).max(since);
            // A leader whose own clock is off finds every peer silent
            // (it refuses their answers): it marks no one down.
            if !node.down
                && now.duration_since(last) >= self.failover_after
                && !self.links.clock.is_off()
            {
                decisions.push((id, true));
            } else if node.down
                && serving == Some(true)
                && self.caught_up(id, &node.addr, map).await
            {
                decisions.push((id, false));
            }
        }
        self.channels
            .retain(|addr, _| map.nodes.iter().any(|n| &n.addr == addr));
        decisions
    }

    /// A joining node that now holds its ranges (ready, and caught up with
    /// every live peer), if any: it may become the primary of its ranges.
    async fn joined(&mut self, map: &Map) -> Option<u32> {
        for node in map
            .nodes
            .iter()
            .filter(|n| n.joining && !n.down && !n.leaving)
        {
            if !self.channels.contains_key(&node.addr)
                && let Ok(channel) = channel(&node.addr, &self.links)
            {
                self.channels.insert(node.addr.clone(), channel);
            }
            if self.caught_up(node.id, &node.addr, map).await {
                return Some(node.id);
            }
        }
        None
    }

    /// Whether down node `id` may serve again: SERVING alone is not enough
    /// (a node cut off by a partition never restarted, so it never stopped
    /// serving), so it must have applied the map that marks it down and
    /// have pulled every live peer to its end since.
    async fn caught_up(&self, id: u32, addr: &str, map: &Map) -> bool {
        let Some(channel) = self.channels.get(addr).cloned() else {
            return false;
        };
        let timeout = if self.failover_after.is_zero() {
            Duration::from_secs(2)
        } else {
            (self.failover_after / 2).min(Duration::from_secs(2))
        };
        let mut admin = AdminClient::new(channel);
        let stats = tokio::time::timeout(timeout, admin.stats(StatsRequest {})).await;
        let Ok(Ok(stats)) = stats else {
            return false;
        };
        let stats = stats.into_inner();
        let live_peers = map.nodes.iter().filter(|n| n.id != id && !n.down);
        stats.ready
            && stats.map_epoch >= map.epoch
            && live_peers.into_iter().all(|peer| {
                stats
                    .peers
                    .iter()
                    .any(|p| p.peer_id == peer.id && p.reachable && p.lag_records == 0)
            })
    }
}

/// Records every node of the map that holds Raft state (this leader, and
/// every node that acknowledged part of the log), so that one restarted
/// without it is refused instead of voting with an empty log.
async fn record_joins(cluster: &Cluster, map: &Map) {
    let metrics = cluster.raft.metrics().borrow().clone();
    for node in &map.nodes {
        if cluster.machine.has_joined(node.id) {
            continue;
        }
        let holds_state = node.id == cluster.me
            || metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&u64::from(node.id)).copied().flatten())
                .is_some();
        if holds_state {
            let command = Command {
                expected_epoch: 0,
                change: Change::Joined(node.id),
            };
            if let Err(e) = cluster.propose(command).await {
                tracing::info!(node = node.id, error = %e, "recording a node's join failed; will retry");
            }
        }
    }
}

/// Brings Raft's membership in line with the map's nodes.
async fn reconcile(cluster: &Cluster) {
    // An operator's change in progress owns the membership.
    let Ok(_one_at_a_time) = cluster.changes.try_lock() else {
        return;
    };
    // The map as it is now, under the lock: one read before it (at the top
    // of the tick) may predate a change that just finished, and would undo it.
    let Some(map) = cluster.map() else {
        return;
    };
    let metrics = cluster.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let in_map: BTreeSet<u64> = map.nodes.iter().map(|n| u64::from(n.id)).collect();
    let strays: Vec<u64> = membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| !in_map.contains(id))
        .collect();
    for stray in strays {
        tracing::info!(
            node = stray,
            "removing a node that left the map from the raft group"
        );
        cluster.forget_node(stray).await;
    }
    for node in &map.nodes {
        let id = u64::from(node.id);
        if membership.get_node(&id).is_none() {
            tracing::info!(node = node.id, "adding a node of the map to the raft group");
            let added = tokio::time::timeout(
                COMMIT_TIMEOUT,
                cluster
                    .raft
                    .add_learner(id, BasicNode::new(&node.addr), false),
            )
            .await;
            if !matches!(added, Ok(Ok(_))) {
                tracing::warn!(node = node.id, "adding a learner failed; will retry");
            }
        }
    }
    let last = metrics.last_log_index.unwrap_or(0);
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let caught_up: BTreeSet<u64> = membership
        .learner_ids()
        .filter(|id| in_map.contains(id) && !voters.contains(id))
        .filter(|id| {
            metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(id).copied().flatten())
                .is_some_and(|matched| matched.index >= last)
        })
        .collect();
    if !caught_up.is_empty() {
        tracing::info!(nodes = ?caught_up, "promoting caught-up learners to voters");
        let promoted = tokio::time::timeout(
            COMMIT_TIMEOUT,
            cluster
                .raft
                .change_membership(ChangeMembers::AddVoterIds(caught_up), false),
        )
        .await;
        if !matches!(promoted, Ok(Ok(_))) {
            tracing::warn!("promoting learners failed; will retry");
        }
    }
}
