//! openraft's type configuration for the cluster map's Raft group.

use openraft::BasicNode;

use super::map::{Command, Outcome};
use super::store::MachineState;

/// Raft node ids are caskade node ids.
pub type NodeId = u64;
/// What Raft knows of a node: its advertised gRPC address.
pub type RaftNode = BasicNode;

openraft::declare_raft_types!(
    /// The cluster map's Raft group: commands are map changes, answers the
    /// map after them (or why not), snapshots the whole state machine.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = RaftNode,
        SnapshotData = MachineState,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
