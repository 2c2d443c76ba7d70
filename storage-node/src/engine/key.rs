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
        match (self, other) {
            (Key::Inline { len: a, bytes: x }, Key::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            _ => self.as_bytes() == other.as_bytes(),
        }
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
        match (self, other) {
            // Start-up sorts and bulk-loads every key, so two inline keys
            // compare word by word instead of through `memcmp`. The zero
            // padding keeps this the byte-string order: if the padded
            // arrays tie, one key is a prefix of the other (up to trailing
            // zero bytes) and the shorter one sorts first.
            (Key::Inline { len: a, bytes: x }, Key::Inline { len: b, bytes: y }) => {
                words(x).cmp(&words(y)).then(a.cmp(b))
            }
            _ => self.as_bytes().cmp(other.as_bytes()),
        }
    }
}

/// An inline key's bytes as big-endian words, which order like the bytes.
fn words(bytes: &[u8; INLINE_CAP]) -> [u64; 3] {
    let mut padded = [0u8; 24];
    padded[..INLINE_CAP].copy_from_slice(bytes);
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&padded[i * 8..i * 8 + 8]);
        u64::from_be_bytes(w)
    };
    [word(0), word(1), word(2)]
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

    #[test]
    fn inline_order_is_byte_order() {
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![0, 1],
            vec![1],
            vec![1, 0],
            vec![1, 0, 0],
            vec![255],
            vec![0; 22],
            vec![255; 22],
            vec![7; 9],
            vec![7; 8],
            [vec![7; 8], vec![0]].concat(),
            vec![0; 23],
            vec![255; 30],
        ];
        for a in &samples {
            for b in &samples {
                assert_eq!(Key::new(a).cmp(&Key::new(b)), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(Key::new(a) == Key::new(b), a == b, "{a:?} == {b:?}");
            }
        }
    }
}
