//! Helpers shared by the engine's integration suites: a mock clock, engine
//! options suited to tests, and a reader for the on-disk format that lets
//! crash tests find record boundaries without trusting the engine.
//!
//! Not every suite uses every helper, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caskade_common::Version;
use caskade_node::engine::{Clock, Durability, Engine, MergeOptions, Options};

/// A realistic "now" for the mock clock: 2023-11-14, unix ms.
pub const T0: u64 = 1_700_000_000_000;

/// Tombstone retention used by the suites that exercise it.
pub const RETENTION_MS: u64 = 60_000;

/// Bytes before the first record of a data file.
pub const FILE_HEADER_LEN: u64 = 16;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: u64 = 41;

/// A wall clock the test moves by hand.
#[derive(Debug, Clone)]
pub struct MockClock(Arc<AtomicU64>);

impl MockClock {
    pub fn new(start_ms: u64) -> Self {
        MockClock(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn clock(&self) -> Clock {
        let cell = Arc::clone(&self.0);
        Clock::from_fn(move || cell.load(Ordering::SeqCst))
    }
}

/// Options for tests: fsync on every write, no background merge (tests merge
/// explicitly), the given clock and file size.
pub fn test_options(clock: &MockClock, max_file_size: u64) -> Options {
    Options {
        max_file_size,
        durability: Durability::Always,
        merge: MergeOptions {
            auto: false,
            tombstone_retention: Duration::from_millis(RETENTION_MS),
            ..MergeOptions::default()
        },
        clock: clock.clock(),
        ..Options::default()
    }
}

/// A version written "now" by the mock clock, with a logical counter.
pub fn version_at(ms: u64, counter: u16) -> Version {
    Version::from_parts(ms, counter, 1)
}

/// One record as found on disk by [`read_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// Byte offset of the record's header in its file.
    pub offset: u64,
    /// Whole record length, header included.
    pub len: u64,
    pub seq: u64,
    pub key: Vec<u8>,
    pub tombstone: bool,
}

impl DiskRecord {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads the well-formed records of a data file, independently of the engine,
/// stopping at the first record that is short or fails its CRC.
pub fn read_records(path: &Path) -> Vec<DiskRecord> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = FILE_HEADER_LEN as usize;
    let header = RECORD_HEADER_LEN as usize;
    while at + header <= bytes.len() {
        let key_len = le_u32(&bytes, at + 33) as usize;
        let value_len = le_u32(&bytes, at + 37) as usize;
        let len = header + key_len + value_len;
        if at + len > bytes.len() || crc32fast::hash(&bytes[at + 4..at + len]) != le_u32(&bytes, at)
        {
            break;
        }
        out.push(DiskRecord {
            offset: at as u64,
            len: len as u64,
            seq: le_u64(&bytes, at + 4),
            key: bytes[at + header..at + header + key_len].to_vec(),
            tombstone: bytes[at + 32] & 1 != 0,
        });
        at += len;
    }
    out
}

/// Path of data file `id` in `dir`.
pub fn data_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.data"))
}

/// Path of hint file `id` in `dir`.
pub fn hint_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.hint"))
}

/// Ids of the `.data` files in `dir`, ascending.
pub fn data_file_ids(dir: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().ok()?;
            name.strip_suffix(".data")?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Copies the regular files of `src` into `dst` (flat: the engine keeps no subdirectories
/// that matter here; a subdirectory is copied recursively all the same).
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// The id of the engine's active file.
pub fn active_id(engine: &Engine) -> u32 {
    engine
        .files()
        .iter()
        .find(|f| f.active)
        .expect("an open engine always has an active file")
        .id
}

/// Puts filler keys (400-byte values) until the active file changes, so that
/// everything written before is in an immutable file. Returns how many filler
/// keys were written (their names are `{prefix}{n}`).
pub fn rotate(engine: &Engine, prefix: &str, version: Version) -> usize {
    let start = active_id(engine);
    let mut n = 0;
    while active_id(engine) == start {
        let key = format!("{prefix}{n}");
        let opts = caskade_node::engine::PutOptions {
            version,
            ..Default::default()
        };
        engine.put(key.as_bytes(), &[b'f'; 400], opts).unwrap();
        n += 1;
        assert!(n < 10_000, "the active file never rotated");
    }
    n
}
