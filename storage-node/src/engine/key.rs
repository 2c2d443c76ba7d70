//! `Key`: the keydir's key type, 24 bytes with short keys stored inline.
//!
//! The keydir holds every key in memory, so its per-key overhead is the
//! engine's main memory cost. A `Box<[u8]>` costs 16 bytes plus a heap block
//! (32 bytes or more with the allocator's header) for every key; most keys
//! are short, so keys of up to [`INLINE_CAP`] bytes live inside the value
//! itself and need no allocation. Ordering and equality are those of the
//! byte strings, whichever form a key takes.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;

/// Longest key stored without a heap allocation.
pub const INLINE_CAP: usize = 22;

/// A key as held by the keydir.
#[derive(Clone)]
pub enum Key {
    /// Keys of up to `INLINE_CAP` bytes.
    Inline {
        /// Used bytes of `bytes`.
        len: u8,
        /// Key bytes, zero-padded.
        bytes: [u8; INLINE_CAP],
    },
    /// Longer keys.
    Heap(Box<[u8]>),
}

impl Key {
    /// Copies `key` into a `Key`.
    pub fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_CAP {
            let mut bytes = [0u8; INLINE_CAP];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(bytes) => bytes,
        }
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Must hash like the `[u8]` it borrows as.
        self.as_bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_small() {
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }

    #[test]
    fn order_matches_bytes_across_forms() {
        let short = Key::new(&[1; INLINE_CAP]);
        let long = Key::new(&[1; INLINE_CAP + 1]);
        assert!(matches!(short, Key::Inline { .. }));
        assert!(matches!(long, Key::Heap(_)));
        assert!(short < long);
        assert!(Key::new(b"a\0") > Key::new(b"a"));
        assert_eq!(Key::new(b"abc").as_bytes(), b"abc");
        assert_eq!(Key::new(&[9; 40]).as_bytes(), &[9; 40][..]);
    }
}
