//! The cluster map as the Raft state machine holds it, and the one function
//! that applies a command to it.
//!
//! Everything here is deterministic: every node applies the same committed
//! commands in the same order and must reach the same map, so a command is
//! checked against the map it is applied to (not the one its proposer saw),
//! and a refused command changes nothing. No I/O, no clock.

use caskade_proto::{ClusterMap, ClusterNode, NodeState};
use serde::{Deserialize, Serialize};

/// One node of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    /// Node id.
    pub id: u32,
    /// Its advertised gRPC address.
    pub addr: String,
    /// Off the ring, still a source to pull from until removed.
    pub leaving: bool,
    /// Marked unreachable by the Raft leader.
    pub down: bool,
    /// Added to the ring and still receiving its ranges: a replica, not a
    /// primary, until the leader finds it holds them ([`Change::Serving`]).
    #[serde(default)]
    pub joining: bool,
}

/// The cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Map {
    /// Bumped by every change.
    pub epoch: u64,
    /// Replicas per key.
    pub replication_factor: u32,
    /// Ring points per node.
    pub vnodes_per_node: u32,
    /// The nodes, by ascending id.
    pub nodes: Vec<MapNode>,
}

impl Map {
    /// The map a new cluster starts with (epoch 1).
    pub fn initial(
        members: &[(u32, String)],
        replication_factor: u32,
        vnodes_per_node: u32,
    ) -> Map {
        let mut nodes: Vec<MapNode> = members
            .iter()
            .map(|(id, addr)| MapNode {
                id: *id,
                addr: addr.clone(),
                leaving: false,
                down: false,
                joining: false,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        Map {
            epoch: 1,
            replication_factor,
            vnodes_per_node,
            nodes,
        }
    }

    /// The map in its wire form.
    pub fn to_proto(&self) -> ClusterMap {
        ClusterMap {
            epoch: self.epoch,
            replication_factor: self.replication_factor,
            vnodes_per_node: self.vnodes_per_node,
            nodes: self
                .nodes
                .iter()
                .map(|n| ClusterNode {
                    id: n.id,
                    addr: n.addr.clone(),
                    state: if n.leaving {
                        NodeState::Leaving
                    } else if n.joining {
                        NodeState::Joining
                    } else {
                        NodeState::Active
                    } as i32,
                    down: n.down,
                })
                .collect(),
        }
    }

    /// The map from its wire form.
    pub fn from_proto(map: &ClusterMap) -> Map {
        Map {
            epoch: map.epoch,
            replication_factor: map.replication_factor,
            vnodes_per_node: map.vnodes_per_node,
            nodes: map
                .nodes
                .iter()
                .map(|n| MapNode {
                    id: n.id,
                    addr: n.addr.clone(),
                    leaving: n.state() == NodeState::Leaving,
                    down: n.down,
                    joining: n.state() == NodeState::Joining,
                })
                .collect(),
        }
    }

    /// Node `id`, if in the map.
    pub fn node(&self, id: u32) -> Option<&MapNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Nodes on the ring (not leaving).
    pub fn ring_size(&self) -> usize {
        self.nodes.iter().filter(|n| !n.leaving).count()
    }
}

/// A change to the map: what is proposed to the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The first map of a new cluster; a no-op once the cluster has one.
    Bootstrap(Map),
    /// Adds a node on the ring.
    Add {
        /// Node id.
        id: u32,
        /// Its advertised address.
        addr: String,
    },
    /// Takes a node off the ring; it stays in the map as a pull source.
    Leave(u32),
    /// Removes a node from the map.
    Remove(u32),
    /// Marks a node down (`true`) or up again (`false`).
    Down(u32, bool),
    /// A joining node holds its ranges: it may now be their primary.
    Serving(u32),
    /// Records that a node holds Raft state (it acknowledged the log once).
    /// Not part of the map: it changes no epoch.
    Joined(u32),
}

/// A command of the log: a change, and the epoch it was based on (0: any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The epoch the proposer saw; a different current epoch refuses the change.
    pub expected_epoch: u64,
    /// The change.
    pub change: Change,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refused {
    /// It conflicts with the current map (epoch, id or address in use, too few nodes).
    #[error("{0}")]
    Conflict(String),
    /// It names a node that is not in the map.
    #[error("node {0} is not in the cluster map")]
    NotFound(u32),
    /// The cluster has no map yet.
    #[error("the cluster has not formed yet")]
    NoMap,
}

/// What applying a command answers: the map after it, or why nothing changed.
pub type Outcome = Result<Map, Refused>;

/// Applies `command` to `current`; on success the new map (epoch + 1, or
/// the same map for a change that changes nothing).
pub fn apply(current: Option<&Map>, command: &Command) -> Outcome {
    let Some(map) = current else {
        return match &command.change {
            Change::Bootstrap(initial) => Ok(initial.clone()),
            _ => Err(Refused::NoMap),
        };
    };
    if command.expected_epoch != 0 && command.expected_epoch != map.epoch {
        return Err(Refused::Conflict(format!(
            "the cluster map is at epoch {}, not {}; read it and retry",
            map.epoch, command.expected_epoch
        )));
    }
    let mut next = map.clone();
    match &command.change {
        // A second bootstrap (another first leader proposed it too): the
        // cluster keeps the map it has. Joins are kept beside the map.
        Change::Bootstrap(_) | Change::Joined(_) => return Ok(map.clone()),
        Change::Add { id, addr } => {
            if let Some(node) = map.node(*id) {
                return Err(Refused::Conflict(format!(
                    "node {id} is already in the cluster map ({})",
                    node.addr
                )));
            }
            if let Some(node) = map.nodes.iter().find(|n| &n.addr == addr) {
                return Err(Refused::Conflict(format!(
                    "address {addr} is node {}'s",
                    node.id
                )));
            }
            next.nodes.push(MapNode {
                id: *id,
                addr: addr.clone(),
                leaving: false,
                down: false,
                joining: true,
            });
            next.nodes.sort_by_key(|n| n.id);
        }
        Change::Leave(id) => {
            let node = map.node(*id).ok_or(Refused::NotFound(*id))?;
            if node.leaving {
                return Ok(map.clone());
            }
            check_enough_left(map, *id)?;
            check_writes_survive(map, *id)?;
            set(&mut next, *id, |n| n.leaving = true);
        }
        Change::Remove(id) => {
            let node = map.node(*id).ok_or(Refused::NotFound(*id))?;
            if !node.leaving {
                check_enough_left(map, *id)?;
                check_writes_survive(map, *id)?;
            }
            next.nodes.retain(|n| n.id != *id);
        }
        Change::Down(id, down) => {
            let node = map.node(*id).ok_or(Refused::NotFound(*id))?;
            if node.down == *down {
                return Ok(map.clone());
            }
            set(&mut next, *id, |n| n.down = *down);
        }
        Change::Serving(id) => {
            let node = map.node(*id).ok_or(Refused::NotFound(*id))?;
            // A node that left before it joined never serves.
            if !node.joining || node.leaving {
                return Ok(map.clone());
            }
            set(&mut next, *id, |n| n.joining = false);
        }
    }
    next.epoch = map.epoch + 1;
    Ok(next)
}

/// Refuses to take node `id` off the ring if fewer ring nodes than the
/// replication factor would be left.
fn check_enough_left(map: &Map, id: u32) -> Result<(), Refused> {
    let left = map
        .nodes
        .iter()
        .filter(|n| !n.leaving && n.id != id)
        .count();
    if left < map.replication_factor as usize {
        return Err(Refused::Conflict(format!(
            "removing node {id} would leave {left} nodes for a replication factor of {}",
            map.replication_factor
        )));
    }
    Ok(())
}

/// Refuses to take a node marked down off the ring while some range it
/// replicates has too few other replicas up to hold every write
/// acknowledged there: at least half of the range's replicas (rounded up)
/// besides it, so that they share one with every majority. Otherwise the
/// range's next primary could take over from replicas that missed writes
/// the unreachable ones acknowledged, while the removed node, cut off but
/// alive, might still coordinate with them.
fn check_writes_survive(map: &Map, id: u32) -> Result<(), Refused> {
    if !map.node(id).is_some_and(|n| n.down) {
        return Ok(());
    }
    let members: Vec<u32> = map
        .nodes
        .iter()
        .filter(|n| !n.leaving)
        .map(|n| n.id)
        .collect();
    let ring = caskade_common::Ring::new(&members, map.vnodes_per_node, map.replication_factor);
    let up = |n: u32| map.node(n).is_some_and(|n| !n.down);
    for list in ring.preference_lists().iter().filter(|l| l.contains(&id)) {
        let others_up = list.iter().filter(|&&n| n != id && up(n)).count();
        if others_up < list.len().div_ceil(2) {
            return Err(Refused::Conflict(format!(
                "node {id} is down, and with it gone its ranges would keep too few replicas \
                 that are up ({list:?}): wait until more of them are back"
            )));
        }
    }
    Ok(())
}

fn set(map: &mut Map, id: u32, update: impl FnOnce(&mut MapNode)) {
    if let Some(node) = map.nodes.iter_mut().find(|n| n.id == id) {
        update(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Map {
        Map::initial(
            &[(1, "a:1".into()), (2, "b:1".into()), (3, "c:1".into())],
            2,
            8,
        )
    }

    fn command(expected_epoch: u64, change: Change) -> Command {
        Command {
            expected_epoch,
            change,
        }
    }

    #[test]
    fn bootstrap_sets_the_first_map_once() {
        let first = apply(None, &command(0, Change::Bootstrap(three()))).unwrap();
        assert_eq!(first.epoch, 1);
        let other = Map::initial(&[(9, "z:1".into())], 1, 8);
        let again = apply(Some(&first), &command(0, Change::Bootstrap(other))).unwrap();
        assert_eq!(again, first, "a second bootstrap changes nothing");
        assert_eq!(
            apply(None, &command(0, Change::Leave(1))),
            Err(Refused::NoMap)
        );
    }

    #[test]
    fn a_change_based_on_another_epoch_is_refused_and_changes_nothing() {
        let map = three();
        let add = |id, addr: &str| Change::Add {
            id,
            addr: addr.into(),
        };
        let next = apply(Some(&map), &command(1, add(4, "d:1"))).unwrap();
        assert_eq!(next.epoch, 2);
        assert_eq!(next.nodes.len(), 4);
        // A second proposer that also saw epoch 1 loses.
        let lost = apply(Some(&next), &command(1, add(5, "e:1")));
        assert!(matches!(lost, Err(Refused::Conflict(_))), "{lost:?}");
        // Ids and addresses stay unique.
        assert!(matches!(
            apply(Some(&next), &command(0, add(4, "x:1"))),
            Err(Refused::Conflict(_))
        ));
        assert!(matches!(
            apply(Some(&next), &command(0, add(7, "d:1"))),
            Err(Refused::Conflict(_))
        ));
    }

    #[test]
    fn a_node_that_is_down_is_not_taken_off_while_its_ranges_lack_replicas_up() {
        let members: Vec<(u32, String)> = (1..=5).map(|id| (id, format!("n{id}:1"))).collect();
        let map = Map::initial(&members, 3, 16);
        let down = |map: &Map, id| apply(Some(map), &command(0, Change::Down(id, true))).unwrap();
        // One node down: its ranges keep two of three replicas up.
        let one_down = down(&map, 1);
        assert!(apply(Some(&one_down), &command(0, Change::Remove(1))).is_ok());
        // Two down (a partition, say): some range of node 1 has only one
        // replica up besides it, which may have missed acknowledged writes.
        let two_down = down(&one_down, 3);
        for change in [Change::Remove(1), Change::Leave(1)] {
            let refused = apply(Some(&two_down), &command(0, change));
            assert!(matches!(refused, Err(Refused::Conflict(_))), "{refused:?}");
        }
    }

    #[test]
    fn an_added_node_joins_and_serves_once_marked_so() {
        let map = three();
        let add = Change::Add {
            id: 4,
            addr: "d:1".into(),
        };
        let added = apply(Some(&map), &command(0, add)).unwrap();
        assert!(added.node(4).unwrap().joining);
        assert_eq!(
            added.to_proto().nodes[3].state(),
            NodeState::Joining,
            "on the wire"
        );
        assert_eq!(Map::from_proto(&added.to_proto()), added);
        let serving = apply(Some(&added), &command(0, Change::Serving(4))).unwrap();
        assert!(!serving.node(4).unwrap().joining);
        assert_eq!(serving.epoch, added.epoch + 1);
        let again = apply(Some(&serving), &command(0, Change::Serving(4))).unwrap();
        assert_eq!(again, serving, "a second mark changes nothing");
        assert_eq!(
            apply(Some(&serving), &command(0, Change::Serving(9))),
            Err(Refused::NotFound(9))
        );
    }

    #[test]
    fn leaving_removing_and_marking_down_keep_enough_nodes() {
        let map = three();
        let leaving = apply(Some(&map), &command(0, Change::Leave(3))).unwrap();
        assert!(leaving.node(3).unwrap().leaving);
        assert_eq!(leaving.ring_size(), 2);
        // RF 2 with two ring nodes left: neither may leave.
        assert!(matches!(
            apply(Some(&leaving), &command(0, Change::Leave(2))),
            Err(Refused::Conflict(_))
        ));
        let removed = apply(Some(&leaving), &command(0, Change::Remove(3))).unwrap();
        assert_eq!(removed.nodes.len(), 2);
        assert_eq!(removed.epoch, 3);
        assert_eq!(
            apply(Some(&removed), &command(0, Change::Remove(3))),
            Err(Refused::NotFound(3))
        );
        let down = apply(Some(&removed), &command(0, Change::Down(2, true))).unwrap();
        assert!(down.node(2).unwrap().down);
        assert_eq!(down.ring_size(), 2, "a down node keeps its ranges");
        let same = apply(Some(&down), &command(0, Change::Down(2, true))).unwrap();
        assert_eq!(same.epoch, down.epoch, "marking down twice is one change");
        // A dead node (not leaving) can be removed while enough remain.
        let map = three();
        let map = Map {
            replication_factor: 2,
            ..map
        };
        let gone = apply(Some(&map), &command(0, Change::Remove(1))).unwrap();
        assert_eq!(gone.ring_size(), 2);
    }
}
