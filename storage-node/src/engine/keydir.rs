//! The keydir: for every key, where its latest record lives.
//!
//! An ordered map (`BTreeMap<Key, Entry>`), so prefix listing walks a range
//! instead of sorting per request, and start-up can bulk-build it from sorted
//! input with full nodes. Tombstones stay in the keydir until merge drops
//! them: a replica must remember a delete's version to refuse an older put
//! that arrives late. The keydir knows nothing of files or locks; the engine
//! wraps it in an `RwLock` and holds that lock only for in-memory work.

use std::collections::BTreeMap;
use std::ops::Bound;

use caskade_common::Version;

use super::key::Key;
use super::record::HEADER_LEN;

/// Where a key's latest record is and what the engine must know without
/// reading it: 32 bytes, laid out without padding.
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
    len_and_flag: u32,
    /// Version's origin node.
    pub origin: u32,
}

/// Marks a tombstone in `Entry::len_and_flag`; value lengths stay far below it.
const TOMBSTONE_BIT: u32 = 1 << 31;

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
            len_and_flag: if tombstone { TOMBSTONE_BIT } else { value_len },
            origin: version.origin,
        }
    }

    /// The record's version.
    pub fn version(&self) -> Version {
        Version::new(self.hlc, self.origin)
    }

    /// True if the key's latest record deletes it.
    pub fn is_tombstone(&self) -> bool {
        self.len_and_flag & TOMBSTONE_BIT != 0
    }

    /// Value length in bytes (0 for tombstones).
    pub fn value_len(&self) -> u32 {
        self.len_and_flag & !TOMBSTONE_BIT
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

/// The ordered in-memory index, with live-key and tombstone counts.
#[derive(Debug, Default)]
pub struct Keydir {
    map: BTreeMap<Key, Entry>,
    tombstones: u64,
}

impl Keydir {
    /// Builds a keydir from entries sorted by key, without duplicates
    /// (start-up path: bulk-built nodes are full, which saves memory).
    pub fn from_sorted(entries: Vec<(Key, Entry)>) -> Self {
        let tombstones = entries.iter().filter(|(_, e)| e.is_tombstone()).count() as u64;
        Keydir {
            map: entries.into_iter().collect(),
            tombstones,
        }
    }

    /// The entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Sets `key`'s entry, returning the one it replaces.
    pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
        let old = match self.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, entry)),
            None => {
                self.map.insert(Key::new(key), entry);
                None
            }
        };
        self.count(old.as_ref(), -1);
        self.count(Some(&entry), 1);
        old
    }

    /// Points `key` at a new location if it still points at `from`
    /// (merge moving a record); false if a newer write got there first.
    pub fn relocate(&mut self, key: &[u8], from: (u32, u32), to: (u32, u32)) -> bool {
        match self.map.get_mut(key) {
            Some(e) if (e.file_id, e.offset) == from => {
                (e.file_id, e.offset) = to;
                true
            }
            _ => false,
        }
    }

    /// Removes `key` if it still points at `at` (merge dropping a record).
    pub fn remove_if_at(&mut self, key: &[u8], at: (u32, u32)) -> bool {
        match self.map.get(key) {
            Some(e) if (e.file_id, e.offset) == at => {
                let old = self.map.remove(key);
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
    ) -> impl Iterator<Item = (&'a Key, &'a Entry)> + 'a {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.map
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(move |(k, _)| k.as_bytes().starts_with(prefix))
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
    fn entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
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
