//! The on-disk record format and its codec.
//!
//! ```text
//! crc32 u32 | seq u64 | hlc u64 | origin u32 | expires_at u64 | flags u8 | key_len u32 | value_len u32 | key | value
//! ```
//! Little-endian, 41 header bytes. The CRC (crc32fast, IEEE) covers every byte
//! after itself, so a record is either entirely as written or detectably not.
//! `expires_at` 0 means "never". This module never touches files: it turns
//! bytes into records and back, and says precisely why bytes are not a record.

use caskade_common::Version;
use caskade_common::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES_CEILING};

/// Bytes before the key.
pub const HEADER_LEN: usize = 41;

/// Flag bit: the record is a tombstone (no value).
pub const FLAG_TOMBSTONE: u8 = 1;
/// Every flag bit this version understands; others mean a newer format or damage.
const KNOWN_FLAGS: u8 = FLAG_TOMBSTONE;

/// The fixed-size part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Write order on this engine.
    pub seq: u64,
    /// Version assigned by the coordinating node.
    pub version: Version,
    /// Unix ms; 0 = never expires.
    pub expires_at: u64,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Key length in bytes.
    pub key_len: u32,
    /// Value length in bytes (0 for a tombstone).
    pub value_len: u32,
}

impl Header {
    /// Whole record length: header, key and value.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.key_len as usize + self.value_len as usize
    }

    /// True if this record deletes its key.
    pub fn is_tombstone(&self) -> bool {
        self.flags & FLAG_TOMBSTONE != 0
    }
}

/// Why a byte range is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecord {
    /// Fewer bytes remain than the header or the lengths it announces.
    Truncated,
    /// Lengths or flags no writer of this format produces.
    Malformed(&'static str),
    /// The checksum does not match the bytes.
    Checksum,
}

impl BadRecord {
    /// Short description for errors and logs.
    pub fn reason(self) -> &'static str {
        match self {
            BadRecord::Truncated => "truncated record",
            BadRecord::Malformed(why) => why,
            BadRecord::Checksum => "checksum mismatch",
        }
    }
}

/// The little-endian `u32` at `at`.
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The little-endian `u64` at `at`.
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Parses and sanity-checks a header without verifying the CRC (which needs
/// the whole record). Refuses lengths beyond the format's hard limits so a
/// damaged length can never make a reader allocate gigabytes.
pub fn parse_header(bytes: &[u8]) -> Result<Header, BadRecord> {
    if bytes.len() < HEADER_LEN {
        return Err(BadRecord::Truncated);
    }
    let header = Header {
        seq: u64_at(bytes, 4),
        version: Version::new(u64_at(bytes, 12), u32_at(bytes, 20)),
        expires_at: u64_at(bytes, 24),
        flags: bytes[32],
        key_len: u32_at(bytes, 33),
        value_len: u32_at(bytes, 37),
    };
    if header.flags & !KNOWN_FLAGS != 0 {
        return Err(BadRecord::Malformed("unknown record flags"));
    }
    if header.key_len == 0 || header.key_len as usize > MAX_KEY_BYTES {
        return Err(BadRecord::Malformed("key length out of range"));
    }
    if header.value_len as usize > MAX_VALUE_BYTES_CEILING {
        return Err(BadRecord::Malformed("value length out of range"));
    }
    if header.is_tombstone() && header.value_len != 0 {
        return Err(BadRecord::Malformed("tombstone with a value"));
    }
    if header.seq == 0 {
        return Err(BadRecord::Malformed("sequence number zero"));
    }
    Ok(header)
}

/// Verifies a whole record (`bytes` must start at the record; extra bytes
/// after it are ignored) and returns its header.
pub fn verify(bytes: &[u8]) -> Result<Header, BadRecord> {
    let header = parse_header(bytes)?;
    let len = header.record_len();
    if bytes.len() < len {
        return Err(BadRecord::Truncated);
    }
    if crc32fast::hash(&bytes[4..len]) != u32_at(bytes, 0) {
        return Err(BadRecord::Checksum);
    }
    Ok(header)
}

/// Appends one encoded record to `out`.
pub fn encode(
    out: &mut Vec<u8>,
    seq: u64,
    version: Version,
    expires_at: u64,
    key: &[u8],
    value: Option<&[u8]>,
) {
    let start = out.len();
    let flags = if value.is_none() { FLAG_TOMBSTONE } else { 0 };
    let value = value.unwrap_or_default();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&version.hlc.to_le_bytes());
    out.extend_from_slice(&version.origin.to_le_bytes());
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.push(flags);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The key bytes of a verified record.
pub fn key_of<'a>(record: &'a [u8], header: &Header) -> &'a [u8] {
    &record[HEADER_LEN..HEADER_LEN + header.key_len as usize]
}

/// The value bytes of a verified record.
pub fn value_of<'a>(record: &'a [u8], header: &Header) -> &'a [u8] {
    let start = HEADER_LEN + header.key_len as usize;
    &record[start..start + header.value_len as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, 7, Version::new(99, 3), 1234, b"key", value);
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample(Some(b"value"));
        let h = verify(&bytes).expect("fresh record verifies");
        assert_eq!(h.seq, 7);
        assert_eq!(h.version, Version::new(99, 3));
        assert_eq!(h.expires_at, 1234);
        assert!(!h.is_tombstone());
        assert_eq!(key_of(&bytes, &h), b"key");
        assert_eq!(value_of(&bytes, &h), b"value");
        assert_eq!(h.record_len(), bytes.len());
    }

    #[test]
    fn tombstone_round_trip() {
        let bytes = sample(None);
        let h = verify(&bytes).expect("fresh tombstone verifies");
        assert!(h.is_tombstone());
        assert_eq!(h.value_len, 0);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = sample(Some(b"value"));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(verify(&damaged).is_err(), "bit {bit} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = sample(Some(b"value"));
        for len in 0..bytes.len() {
            assert!(
                verify(&bytes[..len]).is_err(),
                "cut at {len} went unnoticed"
            );
        }
    }
}
