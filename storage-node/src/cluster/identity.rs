//! Which cluster a node belongs to, and the checks a new node makes before
//! it writes anything.
//!
//! A cluster's identity is a digest of what formed it: the initial members
//! (ids and addresses, sorted), the replication factor and the ring points
//! per node, like etcd's cluster id. Every Raft call carries it and a node
//! refuses calls from another cluster, so nodes started with disagreeing
//! initial lists never merge into one group. A node that joins through
//! `POST /admin/v1/nodes` has no initial list; it takes the identity of the
//! first leader that calls it.
//!
//! Before a new node forms a cluster, it asks every other initial member
//! that answers who it is (`Raft/Hello`): another node id at a listed
//! address, or a member of another cluster, is a configuration error that
//! stops the node before its data directory is touched. So is a member that
//! says this node already took part in the cluster (the leader records each
//! node once it holds Raft state): its data directory was replaced, and a
//! voter that forgot its log and its votes could let two leaders commit
//! different maps for one epoch. Such a node must be removed and added back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::peers::PeerLinks;
use caskade_proto::HelloRequest;
use caskade_proto::raft_client::RaftClient;
use xxhash_rust::xxh3::xxh3_64;

use super::store::{RaftDb, StoreError};
use crate::config::{ClusterConfig, InitialMembers};
use crate::replication::puller::channel;

/// How often a refused Raft call between two nodes is logged as an error.
const SHOUT_EVERY: Duration = Duration::from_secs(30);
/// How long a starting node waits for each other member's answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The identity of the cluster described by a new cluster's settings.
pub fn cluster_id(members: &InitialMembers, config: &ClusterConfig) -> String {
    let description = format!(
        "caskade-cluster members={members} replication_factor={} vnodes_per_node={}",
        config.replication_factor, config.vnodes_per_node
    );
    format!("{:016x}", xxh3_64(description.as_bytes()))
}

/// The cluster this node belongs to, shared by the Raft service and client.
#[derive(Debug)]
pub struct Identity {
    db: Arc<RaftDb>,
    /// `None` until the node forms or joins a cluster.
    current: Mutex<Option<String>>,
    /// When a refusal between this node and each peer was last logged as
    /// an error (Raft retries every half second).
    shouted: Mutex<HashMap<u32, Instant>>,
}

impl Identity {
    /// The identity stored in `db`.
    pub fn open(db: Arc<RaftDb>) -> Result<Identity, StoreError> {
        let current = db.cluster_id()?;
        Ok(Identity {
            db,
            current: Mutex::new(current),
            shouted: Mutex::new(HashMap::new()),
        })
    }

    /// The cluster id, if the node belongs to a cluster.
    pub fn get(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a call from cluster `theirs` may be served: it is ours, or
    /// the node belongs to none yet and joins `theirs` (stored first).
    pub fn admit(&self, theirs: &str) -> Result<(), String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        match current.as_deref() {
            Some(ours) if ours == theirs => Ok(()),
            Some(ours) => Err(format!(
                "this node belongs to cluster {ours}, the caller to cluster {theirs}: \
                 their initial member lists or replication settings disagree"
            )),
            None if theirs.is_empty() => Err("the caller belongs to no cluster".into()),
            None => {
                self.db
                    .set_cluster_id(theirs)
                    .map_err(|e| format!("storing the cluster id: {e}"))?;
                tracing::info!(cluster = theirs, "joined a cluster");
                *current = Some(theirs.to_owned());
                Ok(())
            }
        }
    }

    /// Whether a refusal between this node and `peer` should be logged as an
    /// error now: once per [`SHOUT_EVERY`] per peer; the rest are debug.
    pub fn shout(&self, peer: u32) -> bool {
        let mut shouted = self.shouted.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match shouted.get(&peer) {
            Some(at) if now.duration_since(*at) < SHOUT_EVERY => false,
            _ => {
                shouted.insert(peer, now);
                true
            }
        }
    }

    /// Records the identity of the cluster this node forms.
    pub fn form(&self, id: &str) -> Result<(), StoreError> {
        self.db.set_cluster_id(id)?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(id.to_owned());
        Ok(())
    }
}

/// Why a new node must not form its cluster.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Another node answers at a member's address.
    #[error(
        "initial member {expected} at {addr} answers as node {found}: check cluster.initial_members"
    )]
    WrongNode {
        /// The id the list gives.
        expected: u32,
        /// The address.
        addr: String,
        /// The id that answered.
        found: u32,
    },
    /// Another process answers at the address listed for this node.
    #[error(
        "cluster.initial_members lists {addr} for this node (id {id}), but another process answers there as node {found}: is this node's id right? Two nodes with one id would corrupt the cluster"
    )]
    AddressTaken {
        /// This node.
        id: u32,
        /// The address listed for it.
        addr: String,
        /// The id the process there gave.
        found: u32,
    },
    /// This node took part in the cluster once and its Raft state is gone.
    #[error(
        "node {id} already belongs to this cluster, but its Raft state (raft.redb) is gone: a voter that forgot its log and votes would break the cluster's consensus. Remove it (DELETE /admin/v1/nodes/{id}), then add it back with an empty data directory and no cluster.initial_members"
    )]
    StateLost {
        /// This node.
        id: u32,
    },
    /// A member belongs to another cluster.
    #[error(
        "initial member {id} at {addr} belongs to cluster {theirs}, not {ours}: the initial member lists (or replication settings) of the nodes disagree"
    )]
    OtherCluster {
        /// The member.
        id: u32,
        /// Its address.
        addr: String,
        /// Its cluster.
        theirs: String,
        /// The one this node's settings describe.
        ours: String,
    },
}

/// Asks every other initial member that answers who it is and which
/// cluster it belongs to; members that do not answer are not checked.
pub async fn check_members(
    me: u32,
    members: &InitialMembers,
    ours: &str,
    links: &PeerLinks,
) -> Result<(), BootstrapError> {
    let checks = members
        .0
        .iter()
        .filter(|m| m.id != me)
        .map(|member| async move {
            let Ok(channel) = channel(&member.addr, links) else {
                return Ok(());
            };
            let request = HelloRequest {
                cluster_id: ours.to_owned(),
                expected_id: member.id,
                from: me,
            };
            let answer =
                tokio::time::timeout(HELLO_TIMEOUT, RaftClient::new(channel).hello(request)).await;
            let Ok(Ok(answer)) = answer else {
                return Ok(());
            };
            let answer = answer.into_inner();
            if answer.node_id != member.id {
                return Err(BootstrapError::WrongNode {
                    expected: member.id,
                    addr: member.addr.clone(),
                    found: answer.node_id,
                });
            }
            if !answer.cluster_id.is_empty() && answer.cluster_id != ours {
                return Err(BootstrapError::OtherCluster {
                    id: member.id,
                    addr: member.addr.clone(),
                    theirs: answer.cluster_id,
                    ours: ours.to_owned(),
                });
            }
            if answer.caller_joined {
                return Err(BootstrapError::StateLost { id: me });
            }
            Ok(())
        });
    for result in futures_util::future::join_all(checks).await {
        result?;
    }
    Ok(())
}
