//! The consistent-hash ring: which storage nodes own a key, and in what order.
//!
//! Owns the placement of virtual nodes on a 64-bit ring and the walk that turns
//! a key into its preference list (DESIGN.md, "Cluster map and ring"). Routers
//! and nodes each build their own `Ring` from the same cluster map and must
//! agree on every key, so everything here is a pure function of its inputs:
//! no I/O, no clock, no randomness, no process-seeded hasher (std's
//! `DefaultHasher` may change between Rust versions). Changing the vnode
//! encoding or the hash moves data between nodes: `placement_is_pinned` guards
//! against that. Lookups never panic and allocate only the returned list.

use std::fmt;

use xxhash_rust::xxh3::xxh3_64;

/// Prefix of a vnode's hash input; part of the placement format, like the
/// big-endian id and index that follow it.
const VNODE_DOMAIN: &[u8; 13] = b"caskade-vnode";

/// A consistent-hash ring over node ids.
#[derive(Clone)]
pub struct Ring {
    /// Vnode points sorted by `(point, node_id)`: ties between nodes resolve the
    /// same way on every process, whatever order the map listed the nodes in.
    points: Vec<(u64, u32)>,
    /// Distinct node ids with at least one point, ascending.
    nodes: Vec<u32>,
    replication_factor: usize,
}

impl Ring {
    /// Builds the ring: `vnodes_per_node` points per distinct node at xxh3_64 of `b"caskade-vnode" ++ id.to_be_bytes() ++ index.to_be_bytes()`.
    pub fn new(node_ids: &[u32], vnodes_per_node: u32, replication_factor: u32) -> Ring {
        let mut nodes = node_ids.to_vec();
        nodes.sort_unstable();
        nodes.dedup();
        if vnodes_per_node == 0 {
            // A node without points owns nothing; counting it would make
            // `node_count` disagree with what `preference_list` can return.
            nodes.clear();
        }
        let mut points = Vec::with_capacity(nodes.len().saturating_mul(vnodes_per_node as usize));
        for &id in &nodes {
            for index in 0..vnodes_per_node {
                points.push((vnode_point(id, index), id));
            }
        }
        points.sort_unstable();
        Ring {
            points,
            nodes,
            replication_factor: replication_factor as usize,
        }
    }

    /// The key's preference list: the first `min(replication_factor, node_count)` distinct node ids clockwise from xxh3_64(key), wrapping; empty for an empty ring.
    pub fn preference_list(&self, key: &[u8]) -> Vec<u32> {
        let want = self.list_len();
        let mut list = Vec::with_capacity(want);
        list.extend(self.replicas(key).take(want));
        list
    }

    /// Number of distinct nodes on the ring.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether `node` has points on the ring.
    pub fn contains(&self, node: u32) -> bool {
        self.nodes.binary_search(&node).is_ok()
    }

    /// Replication factor the ring was built with (lists may be shorter when there are fewer nodes).
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// Whether `node` is in the key's preference list, without allocating.
    pub fn owns(&self, node: u32, key: &[u8]) -> bool {
        self.replicas(key).take(self.list_len()).any(|n| n == node)
    }

    /// Every distinct preference list of the ring: the one of each arc
    /// between two neighbouring points.
    pub fn preference_lists(&self) -> Vec<Vec<u32>> {
        let want = self.list_len();
        let mut lists: Vec<Vec<u32>> = (0..self.points.len())
            .map(|start| {
                Replicas {
                    points: &self.points,
                    start,
                    walked: 0,
                }
                .take(want)
                .collect()
            })
            .collect();
        lists.sort_unstable();
        lists.dedup();
        lists
    }

    fn list_len(&self) -> usize {
        self.replication_factor.min(self.nodes.len())
    }

    /// Distinct nodes clockwise from the key's hash, at most one lap.
    fn replicas(&self, key: &[u8]) -> Replicas<'_> {
        let hash = xxh3_64(key);
        // First point at or after the hash; past the last point wraps to 0.
        let start = self.points.partition_point(|&(point, _)| point < hash);
        Replicas {
            points: &self.points,
            start: if start == self.points.len() { 0 } else { start },
            walked: 0,
        }
    }
}

impl fmt::Debug for Ring {
    // A map-sized ring has thousands of points; logs want the shape, not the points.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("nodes", &self.nodes)
            .field("points", &self.points.len())
            .field("replication_factor", &self.replication_factor)
            .finish()
    }
}

fn vnode_point(id: u32, index: u32) -> u64 {
    let mut input = [0u8; VNODE_DOMAIN.len() + 8];
    let (domain, rest) = input.split_at_mut(VNODE_DOMAIN.len());
    domain.copy_from_slice(VNODE_DOMAIN);
    rest[..4].copy_from_slice(&id.to_be_bytes());
    rest[4..].copy_from_slice(&index.to_be_bytes());
    xxh3_64(&input)
}

/// Walks the ring clockwise from `start`, yielding each node the first time one
/// of its points is passed. Distinctness is checked against the points already
/// walked rather than a set, so the walk needs no allocation; the walk is short
/// (about `n * (H(n) - H(n - rf))` points for `n` nodes), so the rescan is cheap.
struct Replicas<'a> {
    points: &'a [(u64, u32)],
    start: usize,
    walked: usize,
}

impl Replicas<'_> {
    /// Whether `node` owns one of the points walked so far.
    fn seen(&self, node: u32) -> bool {
        let end = self.start + self.walked;
        let (lap_tail, wrapped) = if end <= self.points.len() {
            (&self.points[self.start..end], &[][..])
        } else {
            (
                &self.points[self.start..],
                &self.points[..end - self.points.len()],
            )
        };
        lap_tail.iter().chain(wrapped).any(|&(_, n)| n == node)
    }
}

impl Iterator for Replicas<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.walked < self.points.len() {
            let mut index = self.start + self.walked;
            if index >= self.points.len() {
                index -= self.points.len();
            }
            let node = self.points[index].1;
            let new = !self.seen(node);
            self.walked += 1;
            if new {
                return Some(node);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;

    const KEYS: usize = 100_000;

    fn keys() -> impl Iterator<Item = String> {
        (0..KEYS).map(|i| format!("key-{i}"))
    }

    fn share(count: usize) -> f64 {
        count as f64 / KEYS as f64
    }

    #[test]
    fn preference_lists_are_distinct_deterministic_and_capped() {
        let ring = Ring::new(&[1, 2, 3, 4, 5], 64, 3);
        let shuffled = Ring::new(&[5, 3, 1, 4, 2], 64, 3);
        let duplicated = Ring::new(&[4, 5, 3, 3, 1, 4, 2, 1], 64, 3);
        assert_eq!((ring.node_count(), ring.replication_factor()), (5, 3));
        assert_eq!(duplicated.node_count(), 5);
        for key in keys() {
            let list = ring.preference_list(key.as_bytes());
            assert_eq!(list.len(), 3, "{key}");
            assert!(list[0] != list[1] && list[0] != list[2] && list[1] != list[2]);
            assert_eq!(shuffled.preference_list(key.as_bytes()), list, "{key}");
            assert_eq!(duplicated.preference_list(key.as_bytes()), list, "{key}");
        }

        let small = Ring::new(&[9, 7], 16, 3);
        for key in keys().take(1_000) {
            let mut list = small.preference_list(key.as_bytes());
            list.sort_unstable();
            assert_eq!(list, [7, 9]);
        }
    }

    #[test]
    fn every_keys_preference_list_is_among_the_rings_lists() {
        let ring = Ring::new(&[1, 2, 3, 4, 5], 16, 3);
        let lists = ring.preference_lists();
        assert!(lists.len() > 1 && lists.len() <= 5 * 16);
        for key in keys() {
            let list = ring.preference_list(key.as_bytes());
            assert!(lists.contains(&list), "{key}: {list:?}");
        }
        assert!(
            Ring::new(&[], 16, 3)
                .preference_lists()
                .iter()
                .all(Vec::is_empty)
        );
    }

    /// Routers and nodes of different builds must place keys identically: a
    /// change here moves data between nodes and needs a migration, not a test edit.
    #[test]
    fn placement_is_pinned() {
        // XXH3-64 of the empty input, seed 0, from the reference implementation.
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        let ring = Ring::new(&[1, 2, 3, 4, 5], 128, 3);
        let pinned: [(&str, [u32; 3]); 4] = [
            ("", [1, 3, 4]),
            ("key-0", [3, 4, 2]),
            ("key-99999", [3, 5, 4]),
            ("users/42/profile", [2, 4, 1]),
        ];
        for (key, list) in pinned {
            assert_eq!(ring.preference_list(key.as_bytes()), list, "{key:?}");
        }
    }

    #[test]
    fn primaries_are_balanced() {
        let nodes = [1, 2, 3, 4, 5];
        let ring = Ring::new(&nodes, 128, 3);
        let mut primary_of = [0usize; 5];
        for key in keys() {
            let primary = ring.preference_list(key.as_bytes())[0];
            primary_of[(primary - 1) as usize] += 1;
        }
        let shares: Vec<f64> = primary_of.iter().map(|&c| share(c)).collect();
        println!("primary shares with 5 nodes x 128 vnodes: {shares:.4?}");
        // Ideal is 0.20; 128 vnodes put each node within a few points of it.
        for (node, s) in nodes.iter().zip(&shares) {
            assert!(
                (0.12..=0.28).contains(s),
                "node {node} is primary for {s:.4}"
            );
        }
    }

    #[test]
    fn adding_a_node_only_moves_keys_to_it() {
        let before = Ring::new(&[1, 2, 3, 4], 128, 3);
        let after = Ring::new(&[1, 2, 3, 4, 5], 128, 3);
        let (mut primary_moved, mut list_changed) = (0, 0);
        for key in keys() {
            let old = before.preference_list(key.as_bytes());
            let new = after.preference_list(key.as_bytes());
            if new[0] != old[0] {
                assert_eq!(new[0], 5, "{key} moved between old nodes");
                primary_moved += 1;
            }
            // The others keep their relative order; the new node may push the
            // last one out of the list.
            let others: Vec<u32> = new.iter().copied().filter(|&n| n != 5).collect();
            assert_eq!(others, old[..others.len()], "{key}: {old:?} -> {new:?}");
            if new != old {
                list_changed += 1;
            }
        }
        println!(
            "4 -> 5 nodes: primary moved {:.4}, list changed {:.4}",
            share(primary_moved),
            share(list_changed)
        );
        assert!((0.12..=0.28).contains(&share(primary_moved)));
    }

    #[test]
    fn removing_a_node_only_changes_lists_it_was_in() {
        let before = Ring::new(&[1, 2, 3, 4, 5], 128, 3);
        let after = Ring::new(&[1, 2, 4, 5], 128, 3);
        let (mut primary_moved, mut list_changed) = (0, 0);
        for key in keys() {
            let old = before.preference_list(key.as_bytes());
            let new = after.preference_list(key.as_bytes());
            if !old.contains(&3) {
                assert_eq!(new, old, "{key}");
                continue;
            }
            list_changed += 1;
            // The survivors keep their order and one node joins at the end,
            // so a failed-over primary is the old list's next replica.
            let survivors: Vec<u32> = old.iter().copied().filter(|&n| n != 3).collect();
            assert_eq!(new.len(), 3, "{key}");
            assert_eq!(new[..2], survivors, "{key}: {old:?} -> {new:?}");
            if old[0] == 3 {
                primary_moved += 1;
            }
        }
        println!(
            "5 -> 4 nodes: primary moved {:.4}, list changed {:.4}",
            share(primary_moved),
            share(list_changed)
        );
        assert!((0.12..=0.28).contains(&share(primary_moved)));
    }

    #[test]
    fn empty_and_degenerate_rings() {
        let empty = Ring::new(&[], 128, 3);
        assert_eq!(empty.node_count(), 0);
        assert_eq!(empty.preference_list(b"k"), Vec::<u32>::new());
        assert!(!empty.owns(1, b"k"));

        let single = Ring::new(&[42, 42], 128, 3);
        assert_eq!(single.node_count(), 1);
        for key in keys().take(1_000) {
            assert_eq!(single.preference_list(key.as_bytes()), [42]);
            assert!(single.owns(42, key.as_bytes()));
            assert!(!single.owns(7, key.as_bytes()));
        }

        let no_vnodes = Ring::new(&[1, 2, 3], 0, 3);
        assert_eq!(no_vnodes.node_count(), 0);
        assert!(no_vnodes.preference_list(b"k").is_empty());

        let no_replicas = Ring::new(&[1, 2, 3], 16, 0);
        assert!(no_replicas.preference_list(b"k").is_empty());
        assert!(!no_replicas.owns(1, b"k"));
    }

    proptest! {
        #[test]
        fn preference_lists_are_distinct_members(
            nodes in btree_set(any::<u32>(), 1..=10),
            vnodes in 1u32..64,
            rf in 1u32..4,
            keys in vec(vec(any::<u8>(), 0..64), 1..32),
        ) {
            let ids: Vec<u32> = nodes.iter().copied().collect();
            let ring = Ring::new(&ids, vnodes, rf);
            prop_assert_eq!(ring.node_count(), ids.len());
            for key in &keys {
                let list = ring.preference_list(key);
                prop_assert_eq!(list.len(), (rf as usize).min(ids.len()));
                for (i, node) in list.iter().enumerate() {
                    prop_assert!(nodes.contains(node));
                    prop_assert!(!list[..i].contains(node));
                }
                for &node in &ids {
                    prop_assert_eq!(ring.owns(node, key), list.contains(&node));
                }
            }
        }
    }
}
