//! Online backup: a consistent copy of the store into a new directory while
//! reads and writes go on.
//!
//! The cut is taken under the writer lock: the set of data files and the
//! length of the active one. Holding the merge lock for the whole copy keeps
//! merge from deleting or rewriting any file of the cut (and `STATE` with
//! them); files are only ever appended to, so bytes below the cut never
//! change. The copy opens like any data directory (hints are rebuilt on
//! open). Backup never writes into the source directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::datafile::{DataFile, data_path};
use super::error::IoContext;
use super::state::{State, sync_dir};
use super::{EngineError, Inner, lock, read};

/// Copy granularity: large enough to stream, small enough not to matter in memory.
const CHUNK: u64 = 1 << 20;

/// What a backup copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// The directory holding the copy.
    pub dir: PathBuf,
    /// Data files copied.
    pub files: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// No record of the copy has a higher sequence number.
    pub last_seq: u64,
}

impl Inner {
    pub(super) fn backup(&self, dest: &Path) -> Result<BackupReport, EngineError> {
        let _no_merge = lock(&self.merge_lock);
        let (files, active_id, active_len, last_seq) = {
            let writer = lock(&self.writer);
            let files: Vec<Arc<DataFile>> = read(&self.files).values().cloned().collect();
            (
                files,
                writer.active.id,
                writer.active.len(),
                writer.next_seq - 1,
            )
        };
        // Every byte below the cut was written before the lengths were read;
        // make the active file's part durable before copying it.
        if let Some(active) = files.iter().find(|f| f.id == active_id) {
            self.fsync(active)?;
        }

        fs::create_dir(dest).ctx("create backup directory", dest)?;
        let mut bytes = 0;
        for file in &files {
            let len = if file.id == active_id {
                active_len
            } else {
                file.len()
            };
            bytes += copy_prefix(file, len, &data_path(dest, file.id))?;
        }
        let state = {
            let current = lock(&self.state);
            State {
                seq_floor: current.seq_floor,
                tombstone_horizon: current.tombstone_horizon,
                pending_merge: None,
            }
        };
        state.store(dest).ctx("write STATE of backup in", dest)?;
        sync_dir(dest).ctx("sync backup directory", dest)?;
        // The backup's own directory entry, or a crash could lose all of it.
        let parent = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        sync_dir(parent).ctx("sync the directory of the backup", parent)?;
        Ok(BackupReport {
            dir: dest.to_path_buf(),
            files: files.len(),
            bytes,
            last_seq,
        })
    }
}

/// Copies the first `len` bytes of `file` to a new file at `to`, durably.
fn copy_prefix(file: &DataFile, len: u64, to: &Path) -> Result<u64, EngineError> {
    let mut out: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .ctx("create backup file", to)?;
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CHUNK);
        // `n` is at most CHUNK, so it fits in usize.
        let chunk = file
            .read_at(offset, n as usize)
            .ctx("read for backup", &file.path)?;
        out.write_all(&chunk).ctx("write backup file", to)?;
        offset += n;
    }
    out.sync_all().ctx("sync backup file", to)?;
    Ok(len)
}
