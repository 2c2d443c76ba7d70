//! Which acknowledgements and lease confirmations made under one epoch
//! still count under another: only for keys whose primary and replica kept
//! their roles through every epoch in between, as this node adopted them.

use std::sync::Arc;
use std::time::Instant;

use caskade_proto::{ClusterMap, ClusterNode, NodeState};

use super::progress::{Progress, Refill, RingProgress};
use super::{Placement, Replication, cursors::Cursors, feed::Feed, handoff};
use crate::config::ReplicationConfig;

/// Node 1, of nodes 1 to 3, RF 3.
const ME: u32 = 1;

fn map(epoch: u64, down: &[u32]) -> ClusterMap {
    map_of(epoch, &[1, 2, 3], down)
}

fn map_of(epoch: u64, nodes: &[u32], down: &[u32]) -> ClusterMap {
    ClusterMap {
        epoch,
        replication_factor: 3,
        vnodes_per_node: 16,
        nodes: nodes
            .iter()
            .map(|&id| ClusterNode {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id),
                state: NodeState::Active.into(),
                down: down.contains(&id),
            })
            .collect(),
    }
}

/// Node 1 restarting with `first`, whose ring it has fully received.
fn replication(dir: &tempfile::TempDir, first: &ClusterMap) -> Replication {
    let done = Progress {
        shape: Placement::of(first).shape,
        ring_epoch: first.epoch,
        ..Progress::default()
    };
    RingProgress::open(dir.path()).unwrap().store(done).unwrap();
    node_one(dir, Some(first), true)
}

/// Node 1's state in `dir`, placed by `map` if any.
fn node_one(dir: &tempfile::TempDir, map: Option<&ClusterMap>, needs_map: bool) -> Replication {
    Replication::new(
        ME,
        ReplicationConfig::default(),
        Arc::new(Feed::new(1 << 20)),
        Cursors::open(dir.path()).unwrap(),
        RingProgress::open(dir.path()).unwrap(),
        map,
        needs_map,
    )
}

/// A key node 1 is the primary of (every node is a replica with RF 3).
fn key_of_mine(r: &Replication) -> Vec<u8> {
    let placement = r.placement().unwrap();
    (0..)
        .map(|n| format!("key-{n}").into_bytes())
        .find(|k| placement.primary_of(k) == Some(ME))
        .unwrap()
}

#[test]
fn roles_kept_through_consecutive_epochs_count_in_either_order() {
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    let key = key_of_mine(&r);
    r.set_map(&map(2, &[]));
    r.set_map(&map(3, &[3]));
    // Node 3 is down in epoch 3 but still a replica; node 1 stays primary.
    assert!(r.kept_roles(&key, 2, 1, 3));
    assert!(r.kept_roles(&key, 3, 3, 1));
    assert!(r.kept_roles(&key, 2, 2, 2));
    assert!(!r.kept_roles(&key, 2, 1, 4), "an epoch not adopted yet");
    assert!(!r.kept_roles(&key, 4, 1, 2), "not a replica");
}

#[test]
fn a_change_of_primary_in_between_or_a_skipped_epoch_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    let key = key_of_mine(&r);
    // Node 1 marked down in epoch 2: another node is the key's primary.
    r.set_map(&map(2, &[1]));
    r.set_map(&map(3, &[]));
    assert!(!r.kept_roles(&key, 2, 1, 3));
    assert!(r.kept_roles(&key, 2, 3, 3));
    // Epoch 4 skipped: what happened in it is unknown.
    r.set_map(&map(5, &[]));
    assert!(!r.kept_roles(&key, 2, 3, 5));
    assert!(r.kept_roles(&key, 2, 5, 5));
}

#[test]
fn the_history_keeps_its_newest_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    let key = key_of_mine(&r);
    for epoch in 2..=100 {
        r.set_map(&map(epoch, &[]));
    }
    assert!(r.kept_roles(&key, 2, 37, 100));
    assert!(!r.kept_roles(&key, 2, 36, 100), "older than the history");
}

#[test]
fn a_lease_confirmed_under_an_earlier_epoch_holds_only_for_keys_that_kept_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    let key = key_of_mine(&r);
    let replicas = r.placement().unwrap().ring.preference_list(&key);
    r.confirm(2, 1, Instant::now());
    r.set_map(&map(2, &[]));
    assert!(r.check_lease(2, &key, &replicas).is_ok());

    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    r.confirm(2, 1, Instant::now());
    // Node 1 down and up again: another node was the primary in epoch 2.
    r.set_map(&map(2, &[1]));
    r.set_map(&map(3, &[]));
    assert!(r.check_lease(3, &key, &replicas).is_err());
    r.confirm(3, 3, Instant::now());
    assert!(r.check_lease(3, &key, &replicas).is_ok());
}

#[test]
fn a_listing_is_served_only_on_the_routers_ring_and_with_every_range_held() {
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map_of(1, &[1, 2, 3, 4], &[]));
    r.mark_started();
    assert!(r.check_listing(1).is_ok());
    assert!(r.check_listing(0).is_ok(), "no epoch: no check");
    // Node 4 is removed: node 1 gains ranges and pulls them.
    r.set_map(&map_of(2, &[1, 2, 3], &[]));
    let refused = r.check_listing(2).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(r.check_listing(1).unwrap_err().code(), tonic::Code::Aborted);

    // Node 4 added: node 1 only gives ranges away.
    let dir = tempfile::tempdir().unwrap();
    let r = replication(&dir, &map(1, &[]));
    r.mark_started();
    r.set_map(&map_of(2, &[1, 2, 3, 4], &[]));
    assert!(r.check_listing(2).is_ok());
    // A map change that keeps the ring: both epochs have its ring.
    r.set_map(&map_of(3, &[1, 2, 3, 4], &[4]));
    assert!(r.check_listing(2).is_ok() && r.check_listing(3).is_ok());
    assert!(
        r.check_listing(4).is_err(),
        "a ring this node has not adopted"
    );
}

#[test]
fn a_restart_takes_up_an_unfinished_ring_change_without_peers_gone_since() {
    let first = map_of(4, &[1, 2, 3, 4], &[]);
    let mut placement = Placement::of(&first);
    let saved = Progress {
        shape: placement.shape.clone(),
        ring_epoch: 3,
        refills: [(2, Refill::started(3)), (5, Refill::started(3))].into(),
        // Node 5 left the map since: no puller would ever finish it.
        pending: Some([2, 5].into()),
        drop: Some(3),
    };
    let restored = handoff::restore(ME, &mut placement, Some(saved));
    assert_eq!(placement.ring_epoch, 3);
    assert_eq!(restored.drop, Some(3));
    assert_eq!(restored.lag.keys().copied().collect::<Vec<_>>(), vec![2]);
    let pending = restored.handoff.map(|h| h.pending_peers());
    assert_eq!(pending, Some(vec![2]));
}

#[test]
fn a_restart_without_progress_of_its_ring_refills_from_every_peer() {
    let first = map(7, &[]);
    let mut placement = Placement::of(&first);
    // Progress of the ring before: the map was stored, its progress not.
    let before = Placement::of(&map_of(6, &[1, 2], &[]));
    let saved = Progress {
        shape: before.shape.clone(),
        ring_epoch: 6,
        ..Progress::default()
    };
    let restored = handoff::restore(ME, &mut placement, Some(saved));
    assert_eq!(placement.ring_epoch, 7);
    assert_eq!(restored.drop, Some(7), "dropped once every peer refilled");
    let refills: Vec<(u32, u64)> = restored
        .lag
        .iter()
        .map(|(&peer, lag)| (peer, lag.refill_epoch))
        .collect();
    assert_eq!(refills, vec![(2, 7), (3, 7)]);
    let pending = restored.handoff.map(|h| h.pending_peers());
    assert_eq!(pending, Some(vec![2, 3]));

    let dir = tempfile::tempdir().unwrap();
    let r = Replication::new(
        ME,
        ReplicationConfig::default(),
        Arc::new(Feed::new(1 << 20)),
        Cursors::open(dir.path()).unwrap(),
        RingProgress::open(dir.path()).unwrap(),
        Some(&first),
        true,
    );
    r.mark_started();
    assert!(
        !r.is_ready(),
        "not ready until every peer was pulled to its end"
    );
    assert!(r.is_refilling(2) && r.is_refilling(3));
}

#[test]
fn a_map_is_in_effect_only_with_the_takeover_it_makes_begun() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(replication(&dir, &map(1, &[])));
    r.finish_takeover_now();
    assert_eq!(r.map_and_takeover_epochs(), (1, 0));
    let (before, after) = (r.placement().unwrap(), Placement::of(&map(2, &[2])));
    let of = |primaries: (u32, u32)| {
        (0..10_000)
            .map(|n| format!("key-{n}").into_bytes())
            .find(|k| {
                (before.primary_of(k), after.primary_of(k))
                    == (Some(primaries.0), Some(primaries.1))
            })
            .expect("such a key among the first 10,000")
    };
    let (moved, kept) = (of((2, ME)), of((ME, ME)));

    // A write under way holds the map change back: epoch 1 stays in
    // effect, with nothing to take over.
    let write = r.hold_placement();
    let change = std::thread::spawn({
        let r = Arc::clone(&r);
        move || r.set_map(&map(2, &[2]))
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(r.map_and_takeover_epochs(), (1, 0));
    drop(write);
    change.join().unwrap();

    assert_eq!(r.map_and_takeover_epochs(), (2, 2));
    let (_, pending, _) = r.takeover_pending().unwrap();
    assert_eq!(pending, [3], "node 3 is copied from; node 2 is down");
    let placement = r.placement().unwrap();
    assert!(
        r.check_taken_over(&placement, &moved).is_err(),
        "a key node 2 was the primary of waits for the copy"
    );
    assert!(
        r.check_taken_over(&placement, &kept).is_ok(),
        "a key node 1 stayed the primary of is written on"
    );
}

#[test]
fn a_node_in_a_cluster_coordinates_nothing_without_a_map() {
    let dir = tempfile::tempdir().unwrap();
    let replication = |needs_map| node_one(&dir, None, needs_map);
    let key = prost::bytes::Bytes::from_static(b"key");
    let in_a_cluster = replication(true);
    assert!(!in_a_cluster.is_ready());
    let refused = in_a_cluster
        .write_plan(&key, caskade_proto::WriteLevel::Quorum)
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let standalone = replication(false);
    assert!(standalone.is_ready());
    assert!(
        standalone
            .write_plan(&key, caskade_proto::WriteLevel::Quorum)
            .unwrap()
            .is_none(),
        "a standalone node writes alone"
    );
}
