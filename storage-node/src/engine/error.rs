//! The engine's one error type. Every failure a caller can see is a variant
//! here, so the node's status-code table can match on it exhaustively.

use std::io;
use std::path::PathBuf;

use caskade_common::{LimitError, Version};
use thiserror::Error;

/// Why an engine operation failed.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The key or value breaks a size limit; nothing was written.
    #[error(transparent)]
    Limit(#[from] LimitError),

    /// The write's condition (`IfAbsent` / `IfVersion`) did not hold; nothing was written.
    #[error("condition failed: current version is {}", fmt_version(.current))]
    ConditionFailed {
        /// The version the key holds now (`None`: absent, deleted or expired).
        current: Option<Version>,
    },

    /// A file holds bytes that fail their checksum or do not parse.
    #[error("corrupt data in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damaged record or entry.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
    },

    /// Another process (or another `Engine` in this one) has the directory open.
    #[error("data directory {} is locked by another engine", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },

    /// An earlier write or fsync failed; the engine refuses writes until it is
    /// reopened, since it can no longer tell what reached the disk.
    #[error("engine refuses writes after an earlier storage failure: {0}")]
    Poisoned(String),

    /// The disk (or the quota) is full. Nothing of the operation was
    /// stored, the engine is not poisoned, and the same operation succeeds
    /// once space is freed: a full disk refuses writes and keeps reads.
    #[error("no space left on the disk of {}", path.display())]
    StorageFull {
        /// The file or directory that could not grow.
        path: PathBuf,
    },

    /// This write's record was handed to the file, but writing or syncing
    /// it failed: it may or may not be there after a restart. Readers do
    /// not see it meanwhile, and the engine is poisoned from here on.
    #[error("the write may or may not have been stored: {0}")]
    OutcomeUnknown(String),

    /// A catch-up cursor older than the oldest tombstone merge dropped: an
    /// incremental catch-up from it could miss deletes; take a snapshot instead.
    #[error("sequence {requested} is older than the tombstone horizon {horizon}")]
    CursorTooOld {
        /// The cursor asked for.
        requested: u64,
        /// Tombstones with seq <= this may have been merged away.
        horizon: u64,
    },

    /// A merge is already running, or is disabled after an earlier failure.
    #[error("merge unavailable: {0}")]
    MergeUnavailable(&'static str),

    /// `merge_files` was given the active file or an id that is not a data file.
    #[error("file {id} is not an immutable data file of this engine")]
    NotMergeable {
        /// The refused id.
        id: u32,
    },

    /// A configuration the engine cannot honour.
    #[error("invalid option {field}: {reason}")]
    InvalidOptions {
        /// The offending field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl EngineError {
    /// An I/O failure of `op` on `path`: [`EngineError::StorageFull`] when
    /// the disk or quota is full, [`EngineError::Io`] otherwise.
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> EngineError {
        if is_out_of_space(&source) {
            EngineError::StorageFull {
                path: path.to_path_buf(),
            }
        } else {
            EngineError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Whether `error` says the disk or the quota is full.
pub(crate) fn is_out_of_space(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

fn fmt_version(v: &Option<Version>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// Attaches an operation name and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, EngineError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, EngineError> {
        self.map_err(|source| EngineError::io(op, path, source))
    }
}
