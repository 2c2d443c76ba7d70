//! Raft calls to other nodes: openraft's messages, as JSON, over the nodes'
//! mutual-TLS gRPC (`Raft` service). Every call carries this node's cluster
//! identity; a peer of another cluster refuses it and is treated as
//! unreachable (openraft backs off), with the reason logged.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::clock_offset::PeerChannel;
use crate::peers::PeerLinks;
use caskade_proto::RaftRequest;
use caskade_proto::raft_client::RaftClient;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;

use super::identity::Identity;
use super::types::{NodeId, RaftNode, TypeConfig};
use crate::replication::puller::channel;

/// Ceiling of one call when openraft gives none shorter.
const MAX_CALL: Duration = Duration::from_secs(10);

/// Makes a [`Peer`] per node the Raft core talks to.
#[derive(Debug, Clone)]
pub struct Network {
    /// This node's id.
    pub me: u32,
    /// How to reach peers: mutual TLS and the clock guard.
    pub links: PeerLinks,
    /// The cluster identity sent with every call.
    pub identity: Arc<Identity>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            channel: channel(&node.addr, &self.links).ok(),
            me: self.me,
            identity: Arc::clone(&self.identity),
        }
    }
}

/// One connection to a Raft peer.
#[derive(Debug)]
pub struct Peer {
    target: NodeId,
    addr: String,
    channel: Option<PeerChannel>,
    me: u32,
    identity: Arc<Identity>,
}

/// A call that got no answer from the peer's Raft.
enum CallError {
    /// Not connected, refused, or the peer belongs to another cluster: back off.
    Unreachable(String),
    /// Failed on the way; retry.
    Network(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Reason(String);

impl Peer {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let Some(channel) = self.channel.clone() else {
            return Err(CallError::Unreachable(format!("bad address {}", self.addr)));
        };
        let payload = serde_json::to_vec(request)
            .map_err(|e| CallError::Network(format!("encoding: {e}")))?;
        let request = RaftRequest {
            cluster_id: self.identity.get().unwrap_or_default(),
            from: self.me,
            payload: payload.into(),
        };
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let call = async {
            match method {
                Method::Append => client.append_entries(request).await,
                Method::Vote => client.vote(request).await,
                Method::Snapshot => client.install_snapshot(request).await,
            }
        };
        let answer = tokio::time::timeout(timeout.min(MAX_CALL), call)
            .await
            .map_err(|_| CallError::Network("no answer in time".into()))?;
        match answer {
            Ok(answer) => serde_json::from_slice(&answer.into_inner().payload)
                .map_err(|e| CallError::Network(format!("decoding the answer: {e}"))),
            Err(status) if status.code() == Code::FailedPrecondition => {
                let peer = u32::try_from(self.target).unwrap_or(u32::MAX);
                if self.identity.shout(peer) {
                    tracing::error!(peer, addr = %self.addr, reason = status.message(), "raft peer refused this node");
                } else {
                    tracing::debug!(
                        peer,
                        reason = status.message(),
                        "raft peer refused this node"
                    );
                }
                Err(CallError::Unreachable(status.message().to_owned()))
            }
            Err(status) if status.code() == Code::Unavailable => {
                Err(CallError::Unreachable(status.message().to_owned()))
            }
            Err(status) => Err(CallError::Network(status.message().to_owned())),
        }
    }

    fn rpc_error<E: std::error::Error>(&self, error: CallError) -> RPCError<NodeId, RaftNode, E> {
        match error {
            CallError::Unreachable(why) => RPCError::Unreachable(Unreachable::new(&Reason(why))),
            CallError::Network(why) => RPCError::Network(NetworkError::new(&Reason(why))),
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

type RpcResult<T> = Result<T, RPCError<NodeId, RaftNode, RaftError<NodeId>>>;

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = self
            .call(Method::Append, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .call(Method::Vote, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let request = (vote, snapshot.meta, *snapshot.snapshot);
        let answer: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> = self
            .call(Method::Snapshot, &request, option.hard_ttl())
            .await
            .map_err(|e| match e {
                CallError::Unreachable(why) => {
                    StreamingError::Unreachable(Unreachable::new(&Reason(why)))
                }
                CallError::Network(why) => StreamingError::Network(NetworkError::new(&Reason(why))),
            })?;
        answer.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
