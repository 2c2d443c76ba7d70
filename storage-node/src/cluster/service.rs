//! The `Raft` gRPC service: other nodes' Raft calls into this node's Raft
//! core, after checking they come from this node's cluster.

use std::sync::Arc;

use caskade_proto::raft_server::Raft as RaftService;
use caskade_proto::{HelloRequest, HelloResponse, RaftRequest, RaftResponse};
use openraft::Snapshot;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::identity::Identity;
use super::store::{MachineState, MapMachine};
use super::types::{NodeId, Raft, RaftNode, TypeConfig};

/// Serves the Raft calls of the cluster map's group.
#[derive(Clone)]
pub struct RaftServer {
    me: u32,
    raft: Raft,
    identity: Arc<Identity>,
    machine: Arc<MapMachine>,
}

impl std::fmt::Debug for RaftServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftServer")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl RaftServer {
    /// A service in front of `raft`.
    pub fn new(
        me: u32,
        raft: Raft,
        identity: Arc<Identity>,
        machine: Arc<MapMachine>,
    ) -> RaftServer {
        RaftServer {
            me,
            raft,
            identity,
            machine,
        }
    }

    /// Checks the caller's cluster, decodes its payload.
    fn admit<T: DeserializeOwned>(&self, request: Request<RaftRequest>) -> Result<T, Status> {
        let request = request.into_inner();
        if let Err(why) = self.identity.admit(&request.cluster_id) {
            if self.identity.shout(request.from) {
                tracing::error!(from = request.from, reason = %why, "refused a raft call");
            } else {
                tracing::debug!(from = request.from, reason = %why, "refused a raft call");
            }
            return Err(Status::failed_precondition(why));
        }
        serde_json::from_slice(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
    }
}

fn answer<T: Serialize>(value: &T) -> Result<Response<RaftResponse>, Status> {
    let payload = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftResponse {
        payload: payload.into(),
    }))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftResponse>, Status> {
        let rpc = self.admit(request)?;
        answer(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        let rpc = self.admit(request)?;
        answer(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftResponse>, Status> {
        let (vote, meta, state): (
            openraft::Vote<NodeId>,
            openraft::SnapshotMeta<NodeId, RaftNode>,
            MachineState,
        ) = self.admit(request)?;
        let snapshot = Snapshot::<TypeConfig> {
            meta,
            snapshot: Box::new(state),
        };
        answer(&self.raft.install_full_snapshot(vote, snapshot).await)
    }

    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let request = request.into_inner();
        let from = request.from;
        if request.expected_id != 0 && request.expected_id != self.me {
            let asker = match from {
                0 => "a starting node".to_string(),
                id => format!("node {id}"),
            };
            tracing::error!(
                from,
                expected = request.expected_id,
                "{asker} expected node {} at this node's address, but this is node {}: check both nodes' id and cluster.initial_members",
                request.expected_id,
                self.me
            );
        }
        Ok(Response::new(HelloResponse {
            node_id: self.me,
            cluster_id: self.identity.get().unwrap_or_default(),
            caller_joined: from != 0 && self.machine.has_joined(from),
        }))
    }
}
