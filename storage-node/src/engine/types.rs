//! The values that go in and out of the engine's public API.

use caskade_common::Version;

/// A precondition checked atomically with a write, against the key's current
/// live value (a deleted or expired key counts as absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    /// Write unconditionally.
    #[default]
    None,
    /// Write only if the key is absent (`If-None-Match: *`).
    IfAbsent,
    /// Write only if the key's current version is exactly this (`If-Match`).
    IfVersion(Version),
}

/// How to put a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PutOptions {
    /// The record's version; a put with a version not newer than the stored
    /// one is ignored and reported as [`WriteOutcome::Stale`].
    pub version: Version,
    /// Unix milliseconds after which the value is invisible and merge drops it.
    pub expires_at: Option<u64>,
    /// Precondition on the current value.
    pub condition: Condition,
}

/// How to delete a key (writes a tombstone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeleteOptions {
    /// The tombstone's version; same rule as [`PutOptions::version`].
    pub version: Version,
    /// Precondition on the current value.
    pub condition: Condition,
}

/// What a put or delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The record was appended with this sequence number.
    Applied {
        /// The record's sequence number.
        seq: u64,
        /// Version of the live value it replaced (`None`: the key was absent).
        previous: Option<Version>,
    },
    /// The key already holds this version or a newer one; nothing was written.
    Stale {
        /// The version the key holds (possibly a tombstone's).
        current: Version,
    },
}

/// A live value read by [`Engine::get`](super::Engine::get).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The value bytes.
    pub value: Vec<u8>,
    /// The value's version.
    pub version: Version,
    /// Expiry, Unix milliseconds.
    pub expires_at: Option<u64>,
}

/// A key's latest record, read by [`Engine::latest`](super::Engine::latest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Latest {
    /// A value, live or expired (`expires_at` tells).
    Value(Value),
    /// A tombstone with this version.
    Tombstone(Version),
}

impl Latest {
    /// The record's version.
    pub fn version(&self) -> Version {
        match self {
            Latest::Value(value) => value.version,
            Latest::Tombstone(version) => *version,
        }
    }
}

/// One key of a [`Engine::scan`](super::Engine::scan) page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The key.
    pub key: Vec<u8>,
    /// Its current version.
    pub version: Version,
    /// Expiry, Unix milliseconds.
    pub expires_at: Option<u64>,
    /// The latest version is a tombstone, or a value that has expired.
    pub deleted: bool,
}

/// One record as stored, yielded by [`Engine::iter_since`](super::Engine::iter_since)
/// for replication catch-up. Tombstones are included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number, unique and increasing in write order on this engine.
    pub seq: u64,
    /// The key.
    pub key: Vec<u8>,
    /// The value, or `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// The record's version.
    pub version: Version,
    /// Expiry, Unix milliseconds.
    pub expires_at: Option<u64>,
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Keys with a value (expired values are counted until merge drops them).
    pub keys: u64,
    /// Keys whose latest record is a tombstone still kept in the keydir.
    pub tombstones: u64,
    /// Bytes of records the keydir points to.
    pub live_bytes: u64,
    /// Bytes of records superseded by newer ones, reclaimable by merge.
    pub dead_bytes: u64,
    /// Data files, the active one included.
    pub files: usize,
    /// Merges completed since open.
    pub merges: u64,
    /// Latency of the latest fsync of the active file, in microseconds.
    pub last_fsync_micros: Option<u64>,
    /// Highest sequence number assigned so far; right after an open, the
    /// seq the next record follows (a restart leaves a gap of seqs that
    /// were reserved, see `STATE`).
    pub last_seq: u64,
    /// Tombstones with a seq at or below this may have been merged away.
    pub tombstone_horizon: u64,
    /// Damaged records skipped by a repair open.
    pub repaired_records: u64,
    /// Writes are being refused for lack of space (until one gets through).
    pub full: bool,
    /// Why writes are refused for good, until a restart (see
    /// [`EngineError::Poisoned`](super::EngineError::Poisoned)).
    pub poisoned: Option<String>,
}

/// What one merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Files merged (0: nothing to do).
    pub input_files: usize,
    /// Files written.
    pub output_files: usize,
    /// Records copied to the outputs.
    pub records_kept: u64,
    /// Records dropped: superseded, expired, or tombstones past retention.
    pub records_dropped: u64,
    /// Bytes freed on disk.
    pub bytes_reclaimed: u64,
}

/// One data file, as listed by [`Engine::files`](super::Engine::files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The file id (its name is `{id:010}.data`).
    pub id: u32,
    /// True for the file that takes writes.
    pub active: bool,
    /// Size in bytes.
    pub bytes: u64,
    /// Bytes of superseded records in it.
    pub dead_bytes: u64,
}
