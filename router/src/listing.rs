//! Listing keys across replicas (`GET /v1/kv`).
//!
//! Every node of the ring is asked for a page of the keys it holds after
//! the cursor, deleted ones included (their tombstone or expired value,
//! with its version). A key is listed when its newest version among the
//! answers is live: like a quorum read, last writer wins, so a key deleted
//! with an acknowledgement is not listed because one replica still holds
//! its older value. The listing is answered only if a majority of every
//! preference list of the ring answered: each such majority shares a node
//! with every majority that acknowledged a write or a delete, so no
//! acknowledged key is missed and no acknowledged delete is ignored.
//! Otherwise it is refused (503), never answered with keys missing.

use std::collections::{BTreeMap, BTreeSet};

use caskade_proto::ScanEntry;

/// One node's page of a listing scan.
#[derive(Debug)]
pub struct NodePage {
    /// The node.
    pub node: u32,
    /// Its entries in key order, deleted ones included.
    pub entries: Vec<ScanEntry>,
    /// Where the node's next page starts (after this key), if it has more.
    pub next: Option<Vec<u8>>,
}

/// A page of the listing.
#[derive(Debug, PartialEq, Eq)]
pub struct Listed {
    /// Live keys, in byte order.
    pub keys: Vec<Vec<u8>>,
    /// Where the next page starts (after this key); `None` on the last page.
    pub next: Option<Vec<u8>>,
}

/// Refuses a listing that `answered` (the nodes whose pages came back)
/// cannot vouch for: some range, of the ring's `preference_lists`, has
/// fewer than a majority of its replicas among them.
pub fn check_answered(
    preference_lists: &[Vec<u32>],
    answered: &BTreeSet<u32>,
) -> Result<(), String> {
    for list in preference_lists {
        let needed = list.len() / 2 + 1;
        let got = list.iter().filter(|n| answered.contains(n)).count();
        if got < needed {
            return Err(format!(
                "only {got} of the {needed} replicas needed for a key range answered the \
                 listing; it could miss keys or list deleted ones"
            ));
        }
    }
    Ok(())
}

/// Merges the nodes' pages into at most `limit` live keys; `owns(node,
/// key)` tells whether a node replicates a key (a copy left on a node
/// that no longer does has no say).
///
/// Each page that has more stops at its last key, and keys past it may
/// be on that node: only keys up to the smallest such last key are
/// decided. The next page starts after the last key listed, or after that
/// bound if fewer than `limit` live keys lie below it (a page may then hold
/// fewer keys than `limit`, even none, while `next` is set). Of two equal
/// versions, the deleted one wins: nodes may disagree on whether a value
/// has expired.
pub fn merge(pages: Vec<NodePage>, limit: usize, owns: impl Fn(u32, &[u8]) -> bool) -> Listed {
    let bound: Option<Vec<u8>> = pages.iter().filter_map(|p| p.next.clone()).min();
    let mut newest: BTreeMap<Vec<u8>, ((u64, u32), bool)> = BTreeMap::new();
    for page in pages {
        for entry in page.entries {
            if bound.as_ref().is_some_and(|b| entry.key[..] > b[..]) || !owns(page.node, &entry.key)
            {
                continue;
            }
            let version = entry.version.map_or((0, 0), |v| (v.hlc, v.origin));
            let seen = newest
                .entry(entry.key.to_vec())
                .or_insert((version, entry.deleted));
            if (version, entry.deleted) > *seen {
                *seen = (version, entry.deleted);
            }
        }
    }
    let mut live = newest
        .into_iter()
        .filter(|(_, (_, deleted))| !deleted)
        .map(|(key, _)| key);
    let keys: Vec<Vec<u8>> = live.by_ref().take(limit).collect();
    let next = if live.next().is_some() {
        keys.last().cloned()
    } else {
        bound
    };
    Listed { keys, next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caskade_common::ring::Ring;
    use caskade_proto::Version;

    fn entry(key: &str, hlc: u64, deleted: bool) -> ScanEntry {
        ScanEntry {
            key: key.as_bytes().to_vec().into(),
            version: Some(Version { hlc, origin: 1 }),
            deleted,
            ..ScanEntry::default()
        }
    }

    /// Node `node`'s page; with `more`, its next page starts after its last entry.
    fn page(node: u32, entries: Vec<ScanEntry>, more: bool) -> NodePage {
        let next = more.then(|| entries.last().unwrap().key.to_vec());
        NodePage {
            node,
            entries,
            next,
        }
    }

    fn merged(pages: Vec<NodePage>, limit: usize) -> Listed {
        merge(pages, limit, |_, _| true)
    }

    fn keys(listed: &Listed) -> Vec<&str> {
        listed
            .keys
            .iter()
            .map(|k| std::str::from_utf8(k).unwrap())
            .collect()
    }

    #[test]
    fn a_key_deleted_on_some_replicas_is_not_listed_from_a_stale_one() {
        let listed = merged(
            vec![
                page(1, vec![entry("a", 1, false), entry("k", 5, true)], false),
                page(2, vec![entry("a", 1, false), entry("k", 5, true)], false),
                // The third replica has not applied the delete yet.
                page(3, vec![entry("a", 1, false), entry("k", 4, false)], false),
            ],
            10,
        );
        assert_eq!(keys(&listed), ["a"]);
        assert_eq!(listed.next, None);
    }

    #[test]
    fn a_value_written_after_a_delete_is_listed() {
        let listed = merged(
            vec![
                page(1, vec![entry("k", 5, true)], false),
                page(2, vec![entry("k", 6, false)], false),
            ],
            10,
        );
        assert_eq!(keys(&listed), ["k"]);
    }

    #[test]
    fn of_equal_versions_the_deleted_one_wins_whatever_the_order() {
        for pages in [
            vec![
                page(1, vec![entry("k", 5, false)], false),
                page(2, vec![entry("k", 5, true)], false),
            ],
            vec![
                page(2, vec![entry("k", 5, true)], false),
                page(1, vec![entry("k", 5, false)], false),
            ],
        ] {
            assert!(merged(pages, 10).keys.is_empty());
        }
    }

    #[test]
    fn a_copy_on_a_node_that_no_longer_replicates_the_key_has_no_say() {
        let pages = vec![
            page(1, vec![entry("a", 1, false)], false),
            // Node 9 lost the range; the owners merged the delete away.
            page(
                9,
                vec![entry("a", 1, false), entry("gone", 1, false)],
                false,
            ),
        ];
        let listed = merge(pages, 10, |node, _| node != 9);
        assert_eq!(keys(&listed), ["a"]);
    }

    #[test]
    fn keys_past_a_full_page_of_one_node_wait_for_the_next_page() {
        // Node one stopped at "c": "d" may be deleted there, so it is not
        // decided on this page.
        let listed = merged(
            vec![
                page(1, vec![entry("a", 1, false), entry("c", 1, true)], true),
                page(2, vec![entry("b", 1, false), entry("d", 1, false)], false),
            ],
            10,
        );
        assert_eq!(keys(&listed), ["a", "b"]);
        assert_eq!(listed.next.as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn a_page_of_deleted_keys_still_moves_on() {
        let listed = merged(
            vec![page(
                1,
                vec![entry("a", 1, true), entry("b", 1, true)],
                true,
            )],
            2,
        );
        assert!(listed.keys.is_empty());
        assert_eq!(listed.next.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_page_ends_at_its_limit() {
        let listed = merged(
            vec![page(
                1,
                vec![
                    entry("a", 1, false),
                    entry("b", 1, false),
                    entry("c", 1, false),
                ],
                false,
            )],
            2,
        );
        assert_eq!(keys(&listed), ["a", "b"]);
        assert_eq!(listed.next.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_listing_needs_a_majority_of_every_range() {
        let lists = Ring::new(&[1, 2, 3, 4], 16, 3).preference_lists();
        let all: BTreeSet<u32> = [1, 2, 3, 4].into();
        assert!(check_answered(&lists, &all).is_ok());
        let one_down: BTreeSet<u32> = [1, 2, 3].into();
        assert!(check_answered(&lists, &one_down).is_ok());
        let two_down: BTreeSet<u32> = [1, 2].into();
        assert!(check_answered(&lists, &two_down).is_err());
    }
}
