//! caskade-proto: the storage node's gRPC API (`proto/caskade/v1/*.proto`) and
//! the tonic/prost code generated from it at build time.
//!
//! Services: [`kv_server::Kv`] (get, put, delete, scan, batch) and
//! [`admin_server::Admin`] (cluster map, stats, merge, backup),
//! [`replication_server::Replication`] (pull, snapshot, apply between nodes and
//! for read repair) and [`raft_server::Raft`] (consensus on the cluster map
//! between nodes). Readiness uses
//! the standard `grpc.health.v1` protocol (tonic-health), not a service here.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

tonic::include_proto!("caskade.v1");

impl ClusterMap {
    /// The nodes that own ranges on the ring: every node except those
    /// leaving the cluster (which stay in the map, as a source for the
    /// others to pull from, until they are removed). Routers and nodes build
    /// their rings from exactly this list, so they agree on every key.
    pub fn ring_members(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.state() != NodeState::Leaving)
            .map(|n| n.id)
            .collect()
    }

    /// Whether node `id` is marked down.
    pub fn is_down(&self, id: u32) -> bool {
        self.nodes.iter().any(|n| n.id == id && n.down)
    }
}

/// The service name whose `grpc.health.v1` status is a node's readiness:
/// SERVING once it has caught up with its peers and serves clients.
pub const READINESS_SERVICE: &str = "caskade.v1.Kv";

/// gRPC metadata keys of the node API, set by nodes, read by routers and peers.
pub mod metadata {
    /// On FAILED_PRECONDITION (a write's condition did not hold): the key's
    /// current version, `<hlc>-<origin>`, if it has one.
    pub const CURRENT_VERSION: &str = "x-caskade-current-version";
    /// On UNAVAILABLE for a write applied below its write level: how many
    /// replicas hold it.
    pub const ACKS: &str = "x-caskade-acks";
    /// ... how many replicas the level needed.
    pub const REQUIRED_ACKS: &str = "x-caskade-required-acks";
    /// ... and the version it was written with.
    pub const WRITTEN_VERSION: &str = "x-caskade-version";
    /// On OUT_OF_RANGE from `Replication/Pull`: the cursor is past the end of
    /// the node's log, which was replaced; no deletes may be inferred from
    /// its snapshot.
    pub const LOG_REPLACED: &str = "x-caskade-log-replaced";
    /// On `Admin/ChangeCluster`: a node passed the change on to the node it
    /// took for the Raft leader, which must not pass it on again.
    pub const FORWARDED: &str = "x-caskade-forwarded";
    /// On ABORTED from a write sent to a replica that is not the key's
    /// primary: the primary's node id under the replica's map.
    pub const PRIMARY: &str = "x-caskade-primary";
}
