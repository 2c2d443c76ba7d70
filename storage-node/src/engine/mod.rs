//! The Bitcask storage engine (Sheehy & Smith, Basho, 2010), with versions,
//! TTLs, group commit and replication hooks.
//!
//! Writes append records to the active data file and point the in-memory
//! keydir at them; reads look the key up and read the record once (a copy
//! from a memory mapping for sealed files, one `pread` otherwise). The
//! active file rotates at `max_file_size`; immutable files get hint files,
//! and merge rewrites their live records so dead ones can be deleted.
//!
//! Concurrency: one writer at a time (the `writer` mutex), any number of
//! readers. Readers only take the keydir and file-table locks, for
//! in-memory work, and never wait for an fsync. The writer lock is held
//! across an append, and across the fsync of a rotation or of a group
//! commit (which publishes the batch before letting go), and across the
//! `STATE` write that reserves seqs (once per 65,536 records). Locks are
//! taken in the order `writer → keydir → files`, and `writer → state`;
//! merge takes `writer` only briefly, to choose its inputs.
//!
//! This module does no networking; the node's services reach it only
//! through [`Engine`].

mod backup;
mod commit;
mod datafile;
mod error;
mod hint;
mod key;
mod keydir;
mod maintenance;
mod merge;
mod open;
mod options;
pub mod record;
mod since;
mod state;
mod types;
mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use caskade_common::{Version, validate_key, validate_value};

pub use backup::BackupReport;
pub use datafile::FILE_HEADER_LEN;
pub use error::EngineError;
pub(crate) use error::is_out_of_space;
pub use options::{
    AppendObserver, Appended, Clock, Durability, FaultHook, FaultPoint, FsyncObserver,
    MergeOptions, Options,
};
pub use since::SinceIter;
pub use types::{
    Condition, DeleteOptions, FileInfo, Latest, MergeReport, PutOptions, Record, ScanEntry, Stats,
    Value, WriteOutcome,
};

use datafile::DataFile;
use keydir::Keydir;
use maintenance::Maintenance;
use state::State;
use writer::{Write, Writer};

/// A Bitcask store in one directory. `Send + Sync`: share it with `Arc`.
///
/// [`close`](Engine::close) syncs and writes hint files; dropping an engine
/// without closing it is what a crash looks like to the next open (tests
/// rely on this), except that the background thread is stopped and the
/// directory lock released.
#[derive(Debug)]
pub struct Engine {
    inner: Arc<Inner>,
    maintenance: Option<Maintenance>,
}

/// State shared by the engine handle, its background thread and iterators.
#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    opts: Options,
    /// Key → latest record.
    keydir: RwLock<Keydir>,
    /// Every data file by id; merge swaps entries here.
    files: RwLock<BTreeMap<u32, Arc<DataFile>>>,
    /// The single writer: active file, next seq, encode buffer.
    writer: Mutex<Writer>,
    /// Writers waiting to be committed together (`Durability::Always`).
    commit: commit::CommitQueue,
    /// Serializes merges.
    merge_lock: Mutex<()>,
    /// Held by every fsync: a writeback error is reported to one fsync of
    /// a file only, so the poison it sets must be seen by the next one.
    syncing: Mutex<()>,
    /// `STATE` as last written; held while it is written (by merge, and by
    /// the writer reserving seqs), which serializes those writes.
    state: Mutex<State>,
    /// Set after a failed write or fsync: the reason writes are refused.
    poisoned: OnceLock<String>,
    /// Set while writes are refused for lack of space (cleared by the
    /// next append that succeeds); only logs and stats read it.
    full: AtomicBool,
    /// Set when a merge failed after its commit point; reopening finishes it.
    merge_broken: AtomicBool,
    /// Set while the engine shuts down; long jobs stop early.
    closing: AtomicBool,
    /// Work for the background thread.
    maintenance: maintenance::MaintenanceQueue,
    next_file_id: std::sync::atomic::AtomicU32,
    merges: AtomicU64,
    last_fsync_micros: AtomicU64,
    repaired_records: u64,
    /// Held (with an exclusive lock) for the engine's lifetime.
    _lock_file: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Opens (or creates) the store in `dir`, recovering from any crash.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Engine, EngineError> {
        let (inner, need_hint) = open::open(dir.as_ref(), options)?;
        let inner = Arc::new(inner);
        for id in need_hint {
            inner.request_hint(id);
        }
        let maintenance =
            Maintenance::start(Arc::clone(&inner)).map_err(|source| EngineError::Io {
                op: "start background thread for",
                path: inner.dir.clone(),
                source,
            })?;
        Ok(Engine {
            inner,
            maintenance: Some(maintenance),
        })
    }

    /// The live value of `key`, if any (tombstones and expired values are absent).
    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, EngineError> {
        validate_key(key)?;
        Ok(match self.inner.latest(key, true)? {
            Some(Latest::Value(value)) => Some(value),
            Some(Latest::Tombstone(_)) | None => None,
        })
    }

    /// The latest record of `key` whatever it is: a live or expired value, or
    /// a tombstone still held. Replicas compare these to find the newest.
    pub fn latest(&self, key: &[u8]) -> Result<Option<Latest>, EngineError> {
        validate_key(key)?;
        self.inner.latest(key, false)
    }

    /// Applies records written elsewhere (replication, catch-up, repair):
    /// each is stored unless the key already holds its version or a newer
    /// one (last writer wins), so applying a record twice, or records out of
    /// order, ends in the same state. Returns once all are durable as the
    /// durability mode defines, one outcome per record in order.
    ///
    /// Every record is validated first: if one is invalid, none is written.
    pub fn apply(&self, records: Vec<Record>) -> Result<Vec<WriteOutcome>, EngineError> {
        for record in &records {
            validate_key(&record.key)?;
            if let Some(value) = &record.value {
                validate_value(value, self.inner.opts.max_value_bytes)?;
            }
        }
        if self.inner.opts.durability == Durability::Always {
            self.inner.check_poison()?;
            let writes = records.into_iter().map(|r| {
                commit::PendingWrite::new(
                    r.key,
                    r.value,
                    r.version,
                    r.expires_at.unwrap_or(0),
                    Condition::None,
                )
            });
            return self.inner.write_committed_all(writes).into_iter().collect();
        }
        // One at a time; the first failure (a full disk) ends the apply,
        // and the caller sends the rest again.
        records
            .iter()
            .map(|r| {
                self.inner.write(Write {
                    key: &r.key,
                    value: r.value.as_deref(),
                    version: r.version,
                    expires_at: r.expires_at.unwrap_or(0),
                    condition: Condition::None,
                })
            })
            .collect()
    }

    /// The highest version of any key's latest record held (tombstones
    /// included); [`Version::ZERO`] when empty. Walks the keydir.
    pub fn max_version(&self) -> Version {
        read(&self.inner.keydir)
            .range_from(b"", None)
            .map(|(_, entry)| entry.version())
            .max()
            .unwrap_or(Version::ZERO)
    }

    /// Up to `limit` keys greater than `after` in byte order, including keys
    /// whose latest record is a tombstone or an expired value: the keys a
    /// replica's snapshot walks.
    pub fn keys_after(&self, after: Option<&[u8]>, limit: usize) -> Vec<Vec<u8>> {
        read(&self.inner.keydir)
            .range_from(b"", after)
            .take(limit)
            .map(|(k, _)| k.as_bytes().to_vec())
            .collect()
    }

    /// Stores `value` under `key` with the version and expiry in `opts`.
    pub fn put(
        &self,
        key: &[u8],
        value: &[u8],
        opts: PutOptions,
    ) -> Result<WriteOutcome, EngineError> {
        validate_key(key)?;
        validate_value(value, self.inner.opts.max_value_bytes)?;
        self.inner.write(Write {
            key,
            value: Some(value),
            version: opts.version,
            expires_at: opts.expires_at.unwrap_or(0),
            condition: opts.condition,
        })
    }

    /// Deletes `key` by writing a tombstone with the version in `opts`.
    pub fn delete(&self, key: &[u8], opts: DeleteOptions) -> Result<WriteOutcome, EngineError> {
        validate_key(key)?;
        self.inner.write(Write {
            key,
            value: None,
            version: opts.version,
            expires_at: 0,
            condition: opts.condition,
        })
    }

    /// Up to `limit` live keys starting with `prefix` and greater than
    /// `after`, in byte order.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<ScanEntry>, EngineError> {
        Ok(self.scan_keydir(prefix, after, limit, false))
    }

    /// Like [`Engine::scan`], with the keys whose latest record is a
    /// tombstone or an expired value (not yet merged away) too, marked
    /// `deleted`: what a listing across replicas compares by version.
    pub fn scan_including_deleted(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<ScanEntry>, EngineError> {
        Ok(self.scan_keydir(prefix, after, limit, true))
    }

    /// The version of `key`'s latest record, and whether that is a delete
    /// (a tombstone or an expired value), from the keydir alone: no data
    /// file is read.
    pub fn held_version(&self, key: &[u8]) -> Option<(Version, bool)> {
        let now = self.inner.opts.clock.now_ms();
        read(&self.inner.keydir)
            .get(key)
            .map(|e| (e.version(), !e.is_live(now)))
    }

    fn scan_keydir(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        include_deleted: bool,
    ) -> Vec<ScanEntry> {
        let now = self.inner.opts.clock.now_ms();
        let keydir = read(&self.inner.keydir);
        keydir
            .range_from(prefix, after)
            .map(|(k, e)| (k, e, !e.is_live(now)))
            .filter(|&(_, _, deleted)| include_deleted || !deleted)
            .take(limit)
            .map(|(k, e, deleted)| ScanEntry {
                key: k.as_bytes().to_vec(),
                version: e.version(),
                expires_at: e.expiry(),
                deleted,
            })
            .collect()
    }

    /// Every record with a seq above `seq` that is still its key's latest
    /// (tombstones included), in seq order: what a replica that has applied
    /// everything up to `seq` is missing.
    pub fn iter_since(&self, seq: u64) -> Result<SinceIter, EngineError> {
        since::SinceIter::new(Arc::clone(&self.inner), seq)
    }

    /// Merges every immutable data file.
    pub fn merge(&self) -> Result<MergeReport, EngineError> {
        self.inner.merge(None)
    }

    /// Drops every key for which `keep` is false (keys of ranges this node
    /// no longer replicates): seals the active file, then merges every
    /// immutable file without them. Like any merge it moves the tombstone
    /// horizon past what it dropped.
    pub fn retain(&self, keep: impl Fn(&[u8]) -> bool) -> Result<MergeReport, EngineError> {
        {
            let mut writer = lock(&self.inner.writer);
            if writer.active.len() > FILE_HEADER_LEN {
                self.inner.rotate(&mut writer)?;
            }
        }
        self.inner.merge_with(None, false, Some(&keep))
    }

    /// Merges only the immutable files `ids`.
    pub fn merge_files(&self, ids: &[u32]) -> Result<MergeReport, EngineError> {
        self.inner.merge(Some(ids))
    }

    /// Copies a consistent snapshot of the store into `dest`, a directory
    /// that must not exist yet, without blocking reads or writes. Merges wait
    /// until the copy is done.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<BackupReport, EngineError> {
        self.inner.backup(dest.as_ref())
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<(), EngineError> {
        self.inner.sync_all()
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let (keys, tombstones) = {
            let keydir = read(&inner.keydir);
            let tombstones = keydir.tombstones();
            (keydir.len() as u64 - tombstones, tombstones)
        };
        // Writer before files: the lock order every path follows. `state`
        // is taken alone: a seq reservation holds it across a write.
        let last_seq = lock(&inner.writer).next_seq - 1;
        let tombstone_horizon = lock(&inner.state).tombstone_horizon;
        let files = read(&inner.files);
        let record_bytes: u64 = files.values().map(|f| f.record_bytes()).sum();
        let dead_bytes: u64 = files.values().map(|f| f.dead_bytes()).sum();
        let fsync = inner.last_fsync_micros.load(Ordering::Relaxed);
        Stats {
            keys,
            tombstones,
            live_bytes: record_bytes.saturating_sub(dead_bytes),
            dead_bytes,
            files: files.len(),
            merges: inner.merges.load(Ordering::Relaxed),
            last_fsync_micros: (fsync != u64::MAX).then_some(fsync),
            last_seq,
            tombstone_horizon,
            repaired_records: inner.repaired_records,
            full: inner.full.load(Ordering::Acquire),
            poisoned: inner.poisoned.get().cloned(),
        }
    }

    /// The data files, by id.
    pub fn files(&self) -> Vec<FileInfo> {
        // Both under the writer lock, so a rotation cannot make the list
        // call the new active file immutable.
        let writer = lock(&self.inner.writer);
        let active = writer.active.id;
        read(&self.inner.files)
            .values()
            .map(|f| FileInfo {
                id: f.id,
                active: f.id == active,
                bytes: f.len(),
                dead_bytes: f.dead_bytes(),
            })
            .collect()
    }

    /// How long merge keeps tombstones and expired values.
    pub fn tombstone_retention(&self) -> std::time::Duration {
        self.inner.opts.merge.tombstone_retention
    }

    /// The directory this engine stores its files in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops background work, makes everything durable and writes a hint
    /// for the active file so the next open reads no values.
    pub fn close(mut self) -> Result<(), EngineError> {
        if let Some(m) = self.maintenance.take() {
            m.stop();
        }
        self.inner.sync_all()?;
        self.inner.write_active_hint()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(m) = self.maintenance.take() {
            m.stop();
        }
    }
}

impl Inner {
    /// The key's latest record; with `live_only`, `None` unless it is a live value.
    fn latest(&self, key: &[u8], live_only: bool) -> Result<Option<Latest>, EngineError> {
        let now = self.opts.clock.now_ms();
        // Look the file up while still holding the keydir lock: merge
        // repoints keys before it removes files, so a key seen pointing at a
        // file means that file is still in the table (lock order keydir → files).
        let (entry, fetched) = {
            let keydir = read(&self.keydir);
            let Some(entry) = keydir.get(key) else {
                return Ok(None);
            };
            if live_only && !entry.is_live(now) {
                return Ok(None);
            }
            if entry.is_tombstone() {
                return Ok(Some(Latest::Tombstone(entry.version())));
            }
            let files = read(&self.files);
            let Some(file) = files.get(&entry.file_id) else {
                return Err(EngineError::Corrupt {
                    file: datafile::data_path(&self.dir, entry.file_id),
                    offset: u64::from(entry.offset),
                    reason: "keydir points at a missing file",
                });
            };
            let (offset, len) = (
                u64::from(entry.offset),
                entry.record_len(key.len()) as usize,
            );
            // A sealed file is copied from right here; cloning its `Arc`
            // instead would make every reader bump one shared counter.
            let fetched = match file.read_mapped(offset, len) {
                Some(Ok(bytes)) => Ok(bytes),
                Some(Err(e)) => Err((Arc::clone(file), e)),
                None => {
                    let file = Arc::clone(file);
                    drop(files);
                    drop(keydir);
                    file.read_at(offset, len).map_err(|e| (file, e))
                }
            };
            (entry, fetched)
        };
        let offset = u64::from(entry.offset);
        let corrupt = |path: &Path, reason| EngineError::Corrupt {
            file: path.to_path_buf(),
            offset,
            reason,
        };
        let bytes = fetched.map_err(|(file, e)| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                corrupt(&file.path, "record extends past the end of the file")
            }
            _ => EngineError::Io {
                op: "read",
                path: file.path.clone(),
                source: e,
            },
        })?;
        let mismatch = |reason| corrupt(&datafile::data_path(&self.dir, entry.file_id), reason);
        let header = record::verify(&bytes).map_err(|bad| mismatch(bad.reason()))?;
        if record::key_of(&bytes, &header) != key || header.version != entry.version() {
            return Err(mismatch("record does not match the keydir"));
        }
        let mut value = bytes;
        value.drain(..record::HEADER_LEN + key.len());
        Ok(Some(Latest::Value(Value {
            value,
            version: header.version,
            expires_at: entry.expiry(),
        })))
    }

    /// Counts `bytes` as dead in file `id` (if it still exists).
    fn add_dead(&self, id: u32, bytes: u64) {
        if let Some(file) = read(&self.files).get(&id) {
            file.add_dead(bytes);
        }
    }
}
