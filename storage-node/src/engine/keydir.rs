//! The keydir: for every key, where its latest record lives.
//!
//! An ordered map (`BTreeMap<Key, Slot>`), so prefix listing walks a range
//! instead of sorting per request, and start-up can bulk-build it from sorted
//! input with full nodes. Tombstones stay in the keydir until merge drops
//! them: a replica must remember a delete's version to refuse an older put
//! that arrives late. The keydir knows nothing of files or locks; the engine
//! wraps it in an `RwLock` and holds that lock only for in-memory work.
//!
//! Memory is the keydir's budget: a slot is 24 bytes and a short key lives
//! inline (see `key.rs`), 48 bytes per key in a full node. Expiry times are
//! kept aside, for the keys that have one, since most keys never expire.

use std::collections::{BTreeMap, HashMap, btree_map};
use std::ops::Bound;

use caskade_common::Version;

use super::key::{INLINE_CAP, Key};
use super::record::HEADER_LEN;

/// What the engine knows of a key's latest record without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Version's clock.
    pub hlc: u64,
    /// Expiry in Unix ms; 0 = never.
    pub expires_at: u64,
    /// Data file id.
    pub file_id: u32,
    /// Record offset in that file.
    pub offset: u32,
    /// Value length, with [`TOMBSTONE_BIT`] set for tombstones.
    len_and_flags: u32,
    /// Version's origin node.
    pub origin: u32,
}

/// Marks a tombstone in `len_and_flags`; value lengths stay far below it.
const TOMBSTONE_BIT: u32 = 1 << 31;
/// Marks, in a stored slot, a key whose expiry is in `Keydir::expiries`.
const EXPIRES_BIT: u32 = 1 << 30;

impl Entry {
    /// An entry for a record at `file_id`/`offset`.
    pub fn new(
        file_id: u32,
        offset: u32,
        version: Version,
        expires_at: u64,
        value_len: u32,
        tombstone: bool,
    ) -> Self {
        Entry {
            hlc: version.hlc,
            expires_at,
            file_id,
            offset,
            len_and_flags: if tombstone { TOMBSTONE_BIT } else { value_len },
            origin: version.origin,
        }
    }

    /// The record's version.
    pub fn version(&self) -> Version {
        Version::new(self.hlc, self.origin)
    }

    /// True if the key's latest record deletes it.
    pub fn is_tombstone(&self) -> bool {
        self.len_and_flags & TOMBSTONE_BIT != 0
    }

    /// Value length in bytes (0 for tombstones).
    pub fn value_len(&self) -> u32 {
        self.len_and_flags & !(TOMBSTONE_BIT | EXPIRES_BIT)
    }

    /// True if the value has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now_ms
    }

    /// True if the key has a readable value at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        !self.is_tombstone() && !self.is_expired(now_ms)
    }

    /// Expiry as an `Option`.
    pub fn expiry(&self) -> Option<u64> {
        (self.expires_at != 0).then_some(self.expires_at)
    }

    /// Length of the whole record on disk.
    pub fn record_len(&self, key_len: usize) -> u64 {
        (HEADER_LEN + key_len) as u64 + u64::from(self.value_len())
    }
}

/// An entry as stored: without its expiry, 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    hlc: u64,
    file_id: u32,
    offset: u32,
    len_and_flags: u32,
    origin: u32,
}

impl Slot {
    fn of(e: &Entry) -> Slot {
        let expires = if e.expires_at != 0 { EXPIRES_BIT } else { 0 };
        Slot {
            hlc: e.hlc,
            file_id: e.file_id,
            offset: e.offset,
            len_and_flags: e.len_and_flags | expires,
            origin: e.origin,
        }
    }

    fn expires(&self) -> bool {
        self.len_and_flags & EXPIRES_BIT != 0
    }

    fn entry(&self, expires_at: u64) -> Entry {
        Entry {
            hlc: self.hlc,
            expires_at,
            file_id: self.file_id,
            offset: self.offset,
            len_and_flags: self.len_and_flags & !EXPIRES_BIT,
            origin: self.origin,
        }
    }
}

/// The ordered in-memory index, with its tombstone count.
#[derive(Debug, Default)]
pub struct Keydir {
    map: BTreeMap<Key, Slot>,
    /// Expiry of every key whose slot has `EXPIRES_BIT`.
    expiries: HashMap<Key, u64>,
    tombstones: u64,
}

impl Keydir {
    /// Builds a keydir from entries sorted by key, without duplicates
    /// (start-up path: bulk-built nodes are full, which saves memory).
    pub fn from_sorted(entries: impl Iterator<Item = (Key, Entry)>) -> Self {
        let mut tombstones = 0;
        let mut expiries = HashMap::new();
        let map = entries
            .map(|(key, e)| {
                tombstones += u64::from(e.is_tombstone());
                if e.expires_at != 0 {
                    expiries.insert(key.clone(), e.expires_at);
                }
                (key, Slot::of(&e))
            })
            .collect();
        Keydir {
            map,
            expiries,
            tombstones,
        }
    }

    fn entry(&self, key: &[u8], slot: &Slot) -> Entry {
        let expires_at = if slot.expires() {
            self.expiries.get(key).copied().unwrap_or(0)
        } else {
            0
        };
        slot.entry(expires_at)
    }

    /// The stored slot of `key`.
    fn slot(&self, key: &[u8]) -> Option<&Slot> {
        if key.len() <= INLINE_CAP {
            // Searching with an inline `Key` compares word by word at each
            // node instead of calling `memcmp` per key: a `get` on a large
            // keydir spends most of its time in this descent.
            self.map.get(&Key::new(key))
        } else {
            self.map.get(key)
        }
    }

    /// The entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.slot(key).map(|slot| self.entry(key, slot))
    }

    /// Sets `key`'s entry, returning the one it replaces.
    pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
        let slot = Slot::of(&entry);
        let old = if key.len() <= INLINE_CAP {
            // One descent of the tree, and `Key::new` costs no allocation.
            match self.map.entry(Key::new(key)) {
                btree_map::Entry::Occupied(mut stored) => Some(stored.insert(slot)),
                btree_map::Entry::Vacant(vacant) => {
                    vacant.insert(slot);
                    None
                }
            }
        } else {
            // Long keys: allocate the key only when it is new.
            match self.map.get_mut(key) {
                Some(stored) => Some(std::mem::replace(stored, slot)),
                None => {
                    self.map.insert(Key::new(key), slot);
                    None
                }
            }
        };
        let old_expiry = match old {
            Some(o) if o.expires() => self.expiries.remove(key).unwrap_or(0),
            _ => 0,
        };
        if entry.expires_at != 0 {
            self.expiries.insert(Key::new(key), entry.expires_at);
        }
        let old = old.map(|o| o.entry(old_expiry));
        self.count(old.as_ref(), -1);
        self.count(Some(&entry), 1);
        old
    }

    /// Points `key` at a new location if it still points at `from`
    /// (merge moving a record); false if a newer write got there first.
    pub fn relocate(&mut self, key: &[u8], from: (u32, u32), to: (u32, u32)) -> bool {
        match self.map.get_mut(key) {
            Some(s) if (s.file_id, s.offset) == from => {
                (s.file_id, s.offset) = to;
                true
            }
            _ => false,
        }
    }

    /// Removes `key` if it still points at `at` (merge dropping a record).
    pub fn remove_if_at(&mut self, key: &[u8], at: (u32, u32)) -> bool {
        match self.map.get(key) {
            Some(s) if (s.file_id, s.offset) == at => {
                let old = self.map.remove(key);
                let expires_at = if old.is_some_and(|o| o.expires()) {
                    self.expiries.remove(key).unwrap_or(0)
                } else {
                    0
                };
                let old = old.map(|o| o.entry(expires_at));
                self.count(old.as_ref(), -1);
                true
            }
            _ => false,
        }
    }

    /// Entries with keys starting with `prefix` and greater than `after`, in order.
    pub fn range_from<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a Key, Entry)> + 'a {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.map
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(move |(k, _)| k.as_bytes().starts_with(prefix))
            .map(|(k, slot)| (k, self.entry(k.as_bytes(), slot)))
    }

    /// Keys held, tombstones included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Keys whose latest record is a tombstone.
    pub fn tombstones(&self) -> u64 {
        self.tombstones
    }

    fn count(&mut self, entry: Option<&Entry>, delta: i64) {
        if entry.is_some_and(Entry::is_tombstone) {
            self.tombstones = self.tombstones.wrapping_add_signed(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u32, tombstone: bool) -> Entry {
        Entry::new(
            1,
            offset,
            Version::new(u64::from(offset), 1),
            0,
            5,
            tombstone,
        )
    }

    #[test]
    fn stored_slot_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    #[test]
    fn expiry_is_kept_aside_and_follows_its_key() {
        let mut kd = Keydir::default();
        let ttl =
            |offset, expires_at| Entry::new(1, offset, Version::new(1, 1), expires_at, 5, false);
        kd.insert(b"a", ttl(1, 500));
        assert_eq!(kd.get(b"a").map(|e| e.expires_at), Some(500));
        assert_eq!(kd.get(b"a").map(|e| e.value_len()), Some(5));
        kd.insert(b"a", ttl(2, 0));
        assert_eq!(kd.get(b"a").map(|e| e.expires_at), Some(0));
        assert!(kd.expiries.is_empty());
        kd.insert(b"a", ttl(3, 700));
        assert!(kd.remove_if_at(b"a", (1, 3)));
        assert!(kd.expiries.is_empty());
    }

    #[test]
    fn counts_tombstones_through_overwrites() {
        let mut kd = Keydir::default();
        kd.insert(b"a", entry(1, false));
        kd.insert(b"a", entry(2, true));
        kd.insert(b"b", entry(3, true));
        assert_eq!((kd.len(), kd.tombstones()), (2, 2));
        kd.insert(b"b", entry(4, false));
        assert_eq!(kd.tombstones(), 1);
        assert!(kd.remove_if_at(b"a", (1, 2)));
        assert_eq!((kd.len(), kd.tombstones()), (1, 0));
    }

    #[test]
    fn relocate_only_moves_the_expected_record() {
        let mut kd = Keydir::default();
        kd.insert(b"a", entry(1, false));
        assert!(!kd.relocate(b"a", (1, 9), (2, 0)));
        assert!(kd.relocate(b"a", (1, 1), (2, 0)));
        assert_eq!(kd.get(b"a").map(|e| (e.file_id, e.offset)), Some((2, 0)));
    }

    #[test]
    fn prefix_range_respects_after() {
        let mut kd = Keydir::default();
        for (i, k) in [&b"a"[..], b"ab", b"abc", b"abd", b"b"].iter().enumerate() {
            kd.insert(k, entry(i as u32, false));
        }
        let keys = |prefix: &[u8], after: Option<&[u8]>| -> Vec<Vec<u8>> {
            kd.range_from(prefix, after)
                .map(|(k, _)| k.as_bytes().to_vec())
                .collect()
        };
        assert_eq!(
            keys(b"ab", None),
            vec![b"ab".to_vec(), b"abc".to_vec(), b"abd".to_vec()]
        );
        assert_eq!(keys(b"ab", Some(b"abc")), vec![b"abd".to_vec()]);
        assert_eq!(keys(b"ab", Some(b"a")), keys(b"ab", None));
        assert_eq!(keys(b"", Some(b"abd")), vec![b"b".to_vec()]);
    }
}
