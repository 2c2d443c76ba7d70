//! The cluster map, decided by consensus: a Raft group (openraft) of the
//! storage nodes whose state machine is the map.
//!
//! [`Cluster`] owns this node's part of it: the Raft core, its storage
//! ([`store`]), its transport over the nodes' mutual-TLS gRPC ([`network`],
//! [`service`]), the cluster's identity ([`identity`]) and the map state
//! machine ([`map`]). Every change of the map is a proposal committed by a
//! majority; an epoch has one content everywhere, and a minority cannot
//! change the map. A new cluster forms from the same `initial_members` on
//! every node (etcd's `--initial-cluster`); after that, nodes come and go
//! through [`Cluster::change`] (the admin API). The leader's standing
//! duties — proposing the first map, marking unreachable nodes down and
//! back up, keeping Raft's voters equal to the map's nodes — are in
//! [`leader`].
//!
//! Nothing here touches the data path: the node puts each committed map
//! into effect (pulling gained ranges, dropping lost ones) by watching
//! [`Cluster::watch`].

mod identity;
pub(crate) mod leader;
pub(crate) mod map;
mod network;
mod own_address;
pub(crate) mod service;
mod store;
mod types;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::peers::PeerLinks;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{ChangeClusterRequest, RaftStatus};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

use crate::config::{ClusterConfig, InitialMembers};
use crate::replication::puller::channel;
use identity::{BootstrapError, Identity};
use map::{Change, Command, Map, Refused};
use store::{LogStore, MapMachine, RaftDb, StoreError};
use types::Raft;

/// How long a proposal may take to commit before it is answered UNAVAILABLE.
pub(crate) const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new learner may take to catch up with the map's log.
const LEARNER_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the cluster state could not be opened or formed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Raft database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The initial members disagree with what answers at their addresses.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// openraft refused its configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The map refused it; nothing changed.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// No leader, no quorum, or no commit in time: it may still commit.
    #[error("{0}")]
    Unavailable(String),
    /// The request itself is malformed; nothing was proposed.
    #[error("{0}")]
    Invalid(String),
}

/// This node's member of the cluster map's Raft group.
pub struct Cluster {
    me: u32,
    raft: Raft,
    db: Arc<RaftDb>,
    machine: Arc<MapMachine>,
    identity: Arc<Identity>,
    links: PeerLinks,
    config: ClusterConfig,
    /// Serialises the membership changes this node makes as leader (held
    /// across awaits: it is a tokio mutex).
    changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("identity", &self.identity.get())
            .field("epoch", &self.map().map(|m| m.epoch))
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Whether a node with this data directory and configuration forms a
    /// new cluster: it has no Raft state yet, and initial members.
    pub fn forms_new_cluster(data_dir: &Path, config: &ClusterConfig) -> bool {
        !RaftDb::exists(data_dir) && config.initial_members.is_some()
    }

    /// Opens the node's Raft state in `data_dir` and starts its Raft core.
    /// A node that [forms a new cluster](Self::forms_new_cluster) first
    /// checks, before writing anything, that the address listed for it
    /// reaches `listener` (its gRPC listener, bound for this and not yet
    /// serving) and that the other members that answer agree.
    pub async fn open(
        me: u32,
        data_dir: &Path,
        config: &ClusterConfig,
        links: &PeerLinks,
        listener: Option<&TcpListener>,
    ) -> Result<Cluster, ClusterError> {
        if !RaftDb::exists(data_dir)
            && let Some(members) = &config.initial_members
        {
            if let (Some(mine), Some(listener)) = (members.0.iter().find(|m| m.id == me), listener)
            {
                own_address::check(me, &mine.addr, listener, links).await?;
            }
            identity::check_members(me, members, &identity::cluster_id(members, config), links)
                .await?;
        }
        std::fs::create_dir_all(data_dir).map_err(StoreError::from_io)?;
        let db = Arc::new(RaftDb::open(data_dir)?);
        let identity = Arc::new(Identity::open(Arc::clone(&db))?);
        let machine = MapMachine::open(Arc::clone(&db))?;
        let raft_config = openraft::Config {
            cluster_name: "caskade".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms,
            election_timeout_max: config.election_timeout_ms.saturating_mul(2),
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let network = network::Network {
            me,
            links: links.clone(),
            identity: Arc::clone(&identity),
        };
        let raft = Raft::new(
            u64::from(me),
            Arc::new(raft_config),
            network,
            LogStore::new(Arc::clone(&db)),
            Arc::clone(&machine),
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(Cluster {
            me,
            raft,
            db,
            machine,
            identity,
            links: links.clone(),
            config: config.clone(),
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// Forms the cluster of `initial_members` if this node belongs to none
    /// yet (every initial member does the same; Raft elects one leader).
    /// A node that already belongs to a cluster ignores the list. Returns
    /// the list if it describes this node's cluster (the first leader
    /// proposes the map it describes).
    pub async fn bootstrap(
        &self,
        members: Option<&InitialMembers>,
    ) -> Result<Option<InitialMembers>, ClusterError> {
        let Some(members) = members else {
            if self.identity.get().is_none() {
                tracing::info!("no cluster.initial_members: waiting to be added to a cluster");
            }
            return Ok(None);
        };
        let described = identity::cluster_id(members, &self.config);
        match self.identity.get() {
            Some(ours) if ours != described => {
                tracing::warn!(
                    cluster = ours,
                    "cluster.initial_members describe another cluster than the one this node belongs to; ignored"
                );
                return Ok(None);
            }
            Some(_) => {}
            // The members were checked when the Raft state was created
            // (`open`), before anything was written.
            None => self.identity.form(&described)?,
        }
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if initialized {
            return Ok(Some(members.clone()));
        }
        let nodes: BTreeMap<u64, BasicNode> = members
            .0
            .iter()
            .map(|m| (u64::from(m.id), BasicNode::new(&m.addr)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => {
                tracing::info!(cluster = described, members = %members, "forming a new cluster");
                Ok(Some(members.clone()))
            }
            Err(RaftError::APIError(e)) => {
                tracing::debug!(error = %e, "raft already initialized");
                Ok(Some(members.clone()))
            }
            Err(e) => Err(ClusterError::Raft(e.to_string())),
        }
    }

    /// The committed map as this node has applied it.
    pub fn map(&self) -> Option<Map> {
        self.machine.map()
    }

    /// A receiver of every map this node applies.
    pub fn watch(&self) -> watch::Receiver<Option<Map>> {
        self.machine.watch()
    }

    /// The maps applied after epoch `after`, oldest first: one per epoch
    /// while this node still knows them all, else only the current one.
    pub fn maps_after(&self, after: u64) -> Vec<Map> {
        self.machine.maps_after(after)
    }

    /// Waits until the applied map is newer than `after_epoch`, at most `wait`.
    pub async fn map_after(&self, after_epoch: u64, wait: Duration) -> Option<Map> {
        let mut maps = self.watch();
        let newer = |m: &Option<Map>| m.as_ref().is_some_and(|m| m.epoch > after_epoch);
        let _ = tokio::time::timeout(wait, maps.wait_for(newer)).await;
        self.map()
    }

    /// The leader as this node knows it.
    pub fn leader(&self) -> Option<u32> {
        self.raft
            .metrics()
            .borrow()
            .current_leader
            .and_then(|id| u32::try_from(id).ok())
    }

    /// This node's view of the Raft group.
    pub fn status(&self) -> RaftStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let to_u32 = |id: &u64| u32::try_from(*id).unwrap_or(u32::MAX);
        RaftStatus {
            role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            term: metrics.current_term,
            leader_id: metrics.current_leader.map_or(0, |id| to_u32(&id)),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            last_applied_index: metrics.last_applied.map_or(0, |l| l.index),
            voters: membership.voter_ids().map(|id| to_u32(&id)).collect(),
            learners: membership.learner_ids().map(|id| to_u32(&id)).collect(),
            joined: self.machine.joined(),
        }
    }

    /// The Raft handle (for the leader's duties and the service).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The cluster identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The map state machine.
    pub fn machine(&self) -> &Arc<MapMachine> {
        &self.machine
    }

    /// Proposes `change` based on `expected_epoch` (0: any) and waits until
    /// it is committed: here if this node leads, otherwise through the leader.
    /// A change `forwarded` by another node is not passed on again: two
    /// nodes that each take the other for the leader cannot bounce it.
    pub async fn change(
        &self,
        expected_epoch: u64,
        change: Change,
        forwarded: bool,
    ) -> Result<Map, ChangeError> {
        let deadline = tokio::time::Instant::now() + COMMIT_TIMEOUT;
        loop {
            let metrics = self.raft.metrics().borrow().clone();
            match metrics.current_leader {
                Some(leader) if leader == u64::from(self.me) => {
                    return self.change_as_leader(expected_epoch, change).await;
                }
                Some(_) if forwarded => {
                    return Err(ChangeError::Unavailable(
                        "this node is not the Raft leader any more; retry".into(),
                    ));
                }
                Some(leader) => {
                    let membership = metrics.membership_config.membership();
                    if let Some(node) = membership.get_node(&leader) {
                        return self.forward(&node.addr, expected_epoch, change).await;
                    }
                }
                None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ChangeError::Unavailable(
                    "the cluster has no leader (no quorum of nodes reachable)".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends the change to the leader at `addr`.
    async fn forward(
        &self,
        addr: &str,
        expected_epoch: u64,
        change: Change,
    ) -> Result<Map, ChangeError> {
        let Some(proto) = to_proto_change(&change) else {
            return Err(ChangeError::Unavailable(
                "only the leader makes this change".into(),
            ));
        };
        let channel =
            channel(addr, &self.links).map_err(|e| ChangeError::Unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(ChangeClusterRequest {
            expected_epoch,
            change: Some(proto),
        });
        request.metadata_mut().insert(
            caskade_proto::metadata::FORWARDED,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let answer = tokio::time::timeout(
            COMMIT_TIMEOUT + LEARNER_TIMEOUT,
            AdminClient::new(channel).change_cluster(request),
        )
        .await
        .map_err(|_| ChangeError::Unavailable("the leader did not answer in time".into()))?;
        match answer {
            Ok(answer) => answer
                .into_inner()
                .map
                .map(|m| Map::from_proto(&m))
                .ok_or_else(|| ChangeError::Unavailable("the leader answered no map".into())),
            Err(status) => Err(match status.code() {
                Code::Aborted => Refused::Conflict(status.message().to_owned()).into(),
                Code::NotFound => match &change {
                    Change::Leave(id)
                    | Change::Remove(id)
                    | Change::Down(id, _)
                    | Change::Serving(id) => Refused::NotFound(*id).into(),
                    _ => ChangeError::Unavailable(status.message().to_owned()),
                },
                Code::InvalidArgument => ChangeError::Invalid(status.message().to_owned()),
                _ => {
                    ChangeError::Unavailable(format!("the leader at {addr}: {}", status.message()))
                }
            }),
        }
    }

    /// Makes `change` as the leader. Adding a node first makes it a Raft
    /// learner that has caught up with the log, then puts it in the map,
    /// then makes it a voter; removing one takes it out of the map, then
    /// out of the group. If this node crashes in between, the next leader's
    /// duties finish the Raft side ([`leader`]).
    async fn change_as_leader(
        &self,
        expected_epoch: u64,
        change: Change,
    ) -> Result<Map, ChangeError> {
        self.check_quorum()?;
        let _one_at_a_time = tokio::time::timeout(COMMIT_TIMEOUT, self.changes.lock())
            .await
            .map_err(|_| {
                ChangeError::Unavailable(
                    "another membership change is still in progress; retry".into(),
                )
            })?;
        let command = Command {
            expected_epoch,
            change: change.clone(),
        };
        match &change {
            Change::Add { id, addr } => {
                // A quick answer for a change that cannot apply, before a
                // learner is added for nothing; the state machine checks again.
                let current = self.map().ok_or(Refused::NoMap)?;
                map::apply(Some(&current), &command)?;
                let node = u64::from(*id);
                let learner = tokio::time::timeout(
                    LEARNER_TIMEOUT,
                    self.raft.add_learner(node, BasicNode::new(addr), true),
                )
                .await;
                let learned = match learner {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "node {id} at {addr} did not catch up within {LEARNER_TIMEOUT:?}; is it running, with the cluster's certificates?"
                    )),
                };
                if let Err(why) = learned {
                    self.forget_node(node).await;
                    return Err(ChangeError::Unavailable(why));
                }
                match self.propose(command).await {
                    Ok(map) => {
                        let promoted = tokio::time::timeout(
                            COMMIT_TIMEOUT,
                            self.raft.change_membership(
                                ChangeMembers::AddVoterIds([node].into()),
                                false,
                            ),
                        )
                        .await;
                        if !matches!(promoted, Ok(Ok(_))) {
                            tracing::warn!(
                                node = id,
                                "promoting the new node to voter failed; the leader retries"
                            );
                        }
                        Ok(map)
                    }
                    Err(e) => {
                        self.forget_node(node).await;
                        Err(e)
                    }
                }
            }
            Change::Remove(id) => {
                let map = self.propose(command).await?;
                self.forget_node(u64::from(*id)).await;
                Ok(map)
            }
            Change::Bootstrap(_)
            | Change::Leave(_)
            | Change::Down(..)
            | Change::Serving(_)
            | Change::Joined(_) => self.propose(command).await,
        }
    }

    /// Refuses at once when this leader has not heard from a majority for
    /// two election timeouts: a change could not commit.
    fn check_quorum(&self) -> Result<(), ChangeError> {
        let since = self.raft.metrics().borrow().millis_since_quorum_ack;
        let limit = self.config.election_timeout_ms * 2;
        match since {
            Some(ms) if ms <= limit => Ok(()),
            _ => Err(ChangeError::Unavailable(
                "the leader has not reached a majority of the nodes recently (no quorum); nothing was changed".into(),
            )),
        }
    }

    /// Takes `node` out of the Raft group (voter or learner), if it is in it.
    async fn forget_node(&self, node: u64) {
        let in_group = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .is_some();
        if !in_group {
            return;
        }
        let remove = |members: ChangeMembers<u64, BasicNode>| {
            tokio::time::timeout(COMMIT_TIMEOUT, self.raft.change_membership(members, false))
        };
        let removed = match remove(ChangeMembers::RemoveNodes([node].into())).await {
            Ok(Ok(_)) => Ok(()),
            // A voter must leave the voters first.
            _ => match remove(ChangeMembers::RemoveVoters([node].into())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("not committed in time".to_owned()),
            },
        };
        if let Err(e) = removed {
            tracing::warn!(node, error = %e, "removing a node from the raft group; the leader retries");
        }
    }

    /// Proposes `command` and waits for it to be applied.
    pub(crate) async fn propose(&self, command: Command) -> Result<Map, ChangeError> {
        let written = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(command)).await;
        match written {
            Ok(Ok(response)) => Ok(response.data?),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(
                ChangeError::Unavailable("this node stopped leading; retry".into()),
            ),
            Ok(Err(e)) => Err(ChangeError::Unavailable(e.to_string())),
            Err(_) => Err(ChangeError::Unavailable(format!(
                "the change was not committed within {COMMIT_TIMEOUT:?} (no quorum?); it may still commit: read the map"
            ))),
        }
    }

    /// Stops the Raft core and closes its database.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping raft");
        }
        self.db.close();
    }
}

/// The wire form of an operator's change (the others are the leader's own).
fn to_proto_change(change: &Change) -> Option<caskade_proto::change_cluster_request::Change> {
    use caskade_proto::change_cluster_request::Change as Proto;
    match change {
        Change::Add { id, addr } => Some(Proto::Add(caskade_proto::NodeAddress {
            id: *id,
            addr: addr.clone(),
        })),
        Change::Leave(id) => Some(Proto::Leave(*id)),
        Change::Remove(id) => Some(Proto::Remove(*id)),
        Change::Bootstrap(_) | Change::Down(..) | Change::Serving(_) | Change::Joined(_) => None,
    }
}

/// The change an operator's request asks for.
pub fn from_proto_change(
    change: caskade_proto::change_cluster_request::Change,
) -> Result<Change, ChangeError> {
    use caskade_proto::change_cluster_request::Change as Proto;
    Ok(match change {
        Proto::Add(node) => {
            if node.id == 0 {
                return Err(ChangeError::Invalid("node ids start at 1".into()));
            }
            crate::config::validate_addr(&node.addr).map_err(ChangeError::Invalid)?;
            Change::Add {
                id: node.id,
                addr: node.addr,
            }
        }
        Proto::Leave(id) => Change::Leave(id),
        Proto::Remove(id) => Change::Remove(id),
    })
}
