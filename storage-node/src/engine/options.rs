//! Engine configuration: file size, durability, merge policy, recovery mode,
//! and the two seams tests use (the clock and fault hooks).
//!
//! `Options::validate` is the single place that decides whether a
//! configuration is usable; the engine never starts with one it refused.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use caskade_common::limits::{DEFAULT_MAX_VALUE_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES_CEILING};

use super::error::EngineError;
use super::record::HEADER_LEN;

/// When appended records reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before a write returns; concurrent writers share one fsync (group commit).
    Always,
    /// A background thread fsyncs at this period; a crash loses at most one period.
    Interval(Duration),
    /// Never fsync explicitly (rotation and close still do); the OS decides.
    Never,
}

/// When and how merge (compaction) runs.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Run merges on the background thread when the triggers below are met.
    pub auto: bool,
    /// A file is merged once this fraction of its bytes is dead (default 0.5).
    pub dead_ratio: f64,
    /// ... and the store holds at least this many dead bytes in such files.
    pub min_dead_bytes: u64,
    /// How often the background thread checks the triggers.
    pub check_interval: Duration,
    /// Tombstones and expired values written less than this long ago are kept
    /// by merge, so that replicas that were away can still learn of the delete
    /// by incremental catch-up (default 24 h).
    pub tombstone_retention: Duration,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            auto: true,
            dead_ratio: 0.5,
            min_dead_bytes: 64 << 20,
            check_interval: Duration::from_secs(60),
            tombstone_retention: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, as the engine sees them
/// (TTL expiry and tombstone retention). Replaceable so tests need no sleeps.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(Arc::new(caskade_common::version::unix_millis))
    }

    /// A clock that reads `now_ms`.
    pub fn from_fn(now_ms: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now_ms))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Named points in the engine's write, sync and merge paths where a
/// [`FaultHook`] may inject an I/O error.
///
/// An error at a merge point stops the merge right there, leaving the files
/// exactly as a crash at that point would; dropping the engine then and
/// reopening the directory is how tests exercise crash recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Just before an fsync of the active data file.
    Fsync,
    /// Merge: output data and hint files are written and synced, not yet committed.
    MergeOutputWritten,
    /// Merge: the commit record is durable, outputs still carry temporary names.
    MergeCommitted,
    /// Merge: outputs renamed to their final names, in-memory state not yet switched.
    MergeRenamed,
    /// Merge: keydir switched to the outputs, inputs not yet deleted.
    MergeSwapped,
    /// Merge: inputs deleted, commit record not yet cleared.
    MergeInputsDeleted,
}

/// Called at each [`FaultPoint`]; an `Err` is treated as an I/O failure there.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> io::Result<()> + Send + Sync>;

/// Told the duration of every successful fsync of a data file (metrics).
pub type FsyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// A record just appended and published, as an [`AppendObserver`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Appended<'a> {
    /// Its sequence number: observers see every one, in increasing order.
    pub seq: u64,
    /// The key.
    pub key: &'a [u8],
    /// The value, or `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// The record's version.
    pub version: caskade_common::Version,
    /// Expiry, Unix milliseconds (0: never).
    pub expires_at: u64,
}

/// Told every appended record, in seq order with no gaps, under the writer
/// lock once the record is visible to readers (replication's in-memory
/// feed). Must be quick and must not call back into the engine.
pub type AppendObserver = Arc<dyn Fn(Appended<'_>) + Send + Sync>;

/// Everything [`Engine::open`](super::Engine::open) needs to know.
#[derive(Clone)]
pub struct Options {
    /// The active data file rotates once it would grow past this (default 128 MiB, at most 2 GiB).
    pub max_file_size: u64,
    /// Largest value accepted (default 1 MiB).
    pub max_value_bytes: usize,
    /// When writes reach stable storage (default `Always`).
    pub durability: Durability,
    /// Merge policy.
    pub merge: MergeOptions,
    /// Skip (and count) damaged records in immutable files instead of
    /// refusing to open; also ignores hint files so every record is checked.
    pub repair: bool,
    /// The engine's wall clock.
    pub clock: Clock,
    /// Fault injection for tests; `None` in production.
    pub fault_hook: Option<FaultHook>,
    /// Called after each fsync with its latency; must be cheap and never block.
    pub fsync_observer: Option<FsyncObserver>,
    /// Called with every record appended by a put, delete or apply.
    pub append_observer: Option<AppendObserver>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_file_size: 128 << 20,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            durability: Durability::Always,
            merge: MergeOptions::default(),
            repair: false,
            clock: Clock::system(),
            fault_hook: None,
            fsync_observer: None,
            append_observer: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("max_file_size", &self.max_file_size)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("durability", &self.durability)
            .field("merge", &self.merge)
            .field("repair", &self.repair)
            .field("fault_hook", &self.fault_hook.is_some())
            .field("fsync_observer", &self.fsync_observer.is_some())
            .field("append_observer", &self.append_observer.is_some())
            .finish()
    }
}

/// Largest accepted `max_file_size`: offsets in the keydir are `u32`, and the
/// largest record must still fit behind a full file.
const MAX_FILE_SIZE_CEILING: u64 = 2 << 30;

impl Options {
    /// Refuses configurations the engine cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), EngineError> {
        let invalid =
            |field: &'static str, reason: String| EngineError::InvalidOptions { field, reason };
        let smallest_file = (HEADER_LEN + MAX_KEY_BYTES) as u64 * 2;
        if !(smallest_file..=MAX_FILE_SIZE_CEILING).contains(&self.max_file_size) {
            return Err(invalid(
                "max_file_size",
                format!("must be between {smallest_file} and {MAX_FILE_SIZE_CEILING} bytes"),
            ));
        }
        if self.max_value_bytes > MAX_VALUE_BYTES_CEILING {
            return Err(invalid(
                "max_value_bytes",
                format!("must be at most {MAX_VALUE_BYTES_CEILING}"),
            ));
        }
        if let Durability::Interval(period) = self.durability
            && period.is_zero()
        {
            return Err(invalid("durability", "interval must be positive".into()));
        }
        if !(self.merge.dead_ratio > 0.0 && self.merge.dead_ratio <= 1.0) {
            return Err(invalid("merge.dead_ratio", "must be in (0, 1]".into()));
        }
        if self.merge.check_interval.is_zero() {
            return Err(invalid("merge.check_interval", "must be positive".into()));
        }
        Ok(())
    }

    pub(crate) fn fault(&self, point: FaultPoint) -> io::Result<()> {
        match &self.fault_hook {
            Some(hook) => hook(point),
            None => Ok(()),
        }
    }
}
