//! The write path: version check, condition check, append, keydir update,
//! rotation, and group commit.
//!
//! One writer at a time holds `Inner::writer` while it checks, appends its
//! record with one `pwrite`, and updates the keydir; it releases the lock
//! before waiting for durability. Under `Durability::Always` the first
//! waiter becomes the *leader*: it fsyncs everything appended so far while
//! the others wait on a condvar, so one fsync acknowledges every writer that
//! appended before it started (group commit). A failed append or fsync
//! poisons the engine: it can no longer tell what is on disk, so it refuses
//! writes rather than acknowledge data it may lose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use caskade_common::Version;

use super::datafile::{self, DataFile, FileKind, RecordReader};
use super::error::{EngineError, IoContext};
use super::hint::{self, HintWriter};
use super::keydir::Entry;
use super::options::{Durability, FaultPoint};
use super::record;
use super::state::sync_dir;
use super::types::{Condition, WriteOutcome};
use super::{Inner, lock, read, write};

/// The single writer's state, behind `Inner::writer`.
#[derive(Debug)]
pub struct Writer {
    /// The file that takes appends.
    pub active: Arc<DataFile>,
    /// The seq the next record gets.
    pub next_seq: u64,
    /// Reused encode buffer.
    scratch: Vec<u8>,
}

impl Writer {
    /// A writer appending to `active`, numbering records from `next_seq`.
    pub fn new(active: Arc<DataFile>, next_seq: u64) -> Self {
        Writer {
            active,
            next_seq,
            scratch: Vec::with_capacity(4096),
        }
    }

    /// Position of the end of the log: file id and offset in one number
    /// that grows across rotations.
    fn end_position(&self) -> u64 {
        position(self.active.id, self.active.len())
    }
}

fn position(file_id: u32, offset: u64) -> u64 {
    (u64::from(file_id) << 32) | offset
}

/// Group commit bookkeeping: how far the log is durable, and whether a
/// leader is fsyncing right now.
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<SyncState>,
    done: Condvar,
    /// Writers between entering `write` and finishing their append: a
    /// leader lets them finish so that its fsync covers them too.
    appending: AtomicUsize,
}

/// Most times a leader yields the CPU to writers still appending before it
/// fsyncs anyway (bounds the latency it adds under constant load).
const LEADER_MAX_YIELDS: usize = 16;

/// Counts a writer in `GroupCommit::appending` until dropped.
struct Appending<'a>(&'a AtomicUsize);

impl<'a> Appending<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Appending(counter)
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct SyncState {
    /// Log position up to which everything is fsynced.
    durable: u64,
    /// A leader is inside fsync.
    syncing: bool,
}

impl GroupCommit {
    /// Records that everything up to `pos` is durable (rotation fsynced it).
    fn advance(&self, pos: u64) {
        let mut st = lock(&self.state);
        st.durable = st.durable.max(pos);
        self.done.notify_all();
    }
}

impl Inner {
    /// Appends a put (`value: Some`) or tombstone (`None`) if `version` is
    /// newer than the key's and `condition` holds.
    pub(super) fn write(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        version: Version,
        expires_at: u64,
        condition: Condition,
    ) -> Result<WriteOutcome, EngineError> {
        self.check_poison()?;
        let always = self.opts.durability == Durability::Always;
        let appending = always.then(|| Appending::new(&self.sync.appending));
        let now = self.opts.clock.now_ms();
        let mut w = lock(&self.writer);
        // The writer lock is held, so no other write can change the key
        // between this check and the append below.
        let current = read(&self.keydir).get(key);
        if let Some(cur) = current
            && version <= cur.version()
        {
            return Ok(WriteOutcome::Stale {
                current: cur.version(),
            });
        }
        let live = current.filter(|e| e.is_live(now)).map(|e| e.version());
        let holds = match condition {
            Condition::None => true,
            Condition::IfAbsent => live.is_none(),
            Condition::IfVersion(v) => live == Some(v),
        };
        if !holds {
            return Err(EngineError::ConditionFailed { current: live });
        }

        let seq = w.next_seq;
        let mut scratch = std::mem::take(&mut w.scratch);
        scratch.clear();
        record::encode(&mut scratch, seq, version, expires_at, key, value);
        let appended = self.append(&mut w, &scratch);
        w.scratch = scratch;
        let offset = appended?;
        w.next_seq += 1;
        let entry = Entry::new(
            w.active.id,
            offset as u32,
            version,
            expires_at,
            value.map_or(0, |v| v.len() as u32),
            value.is_none(),
        );
        let replaced = write(&self.keydir).insert(key, entry);
        if let Some(old) = replaced {
            self.add_dead(old.file_id, old.record_len(key.len()));
        }
        let end = w.end_position();
        drop(w);
        drop(appending);

        if always {
            self.wait_durable(end)?;
        }
        Ok(WriteOutcome::Applied {
            seq,
            previous: live,
        })
    }

    /// Appends one encoded record to the active file, rotating first if it
    /// would overflow. Returns the record's offset.
    fn append(&self, w: &mut Writer, bytes: &[u8]) -> Result<u64, EngineError> {
        if !w.active.is_empty() && w.active.len() + bytes.len() as u64 > self.opts.max_file_size {
            self.rotate(w)?;
        }
        match w.active.append(bytes) {
            Ok(offset) => {
                w.active.note_seq(w.next_seq);
                Ok(offset)
            }
            Err(source) => {
                // A short write may have left part of the record on disk; the
                // next open truncates it, but this process must stop writing.
                self.poison(format!(
                    "append to {} failed: {source}",
                    w.active.path.display()
                ));
                Err(EngineError::Io {
                    op: "append to",
                    path: w.active.path.clone(),
                    source,
                })
            }
        }
    }

    /// Seals the active file (fsync) and starts a new one.
    fn rotate(&self, w: &mut Writer) -> Result<(), EngineError> {
        let old = Arc::clone(&w.active);
        self.fsync(&old)?;
        self.sync.advance(w.end_position());
        let id = self.next_file_id.fetch_add(1, Ordering::AcqRel);
        let path = datafile::data_path(&self.dir, id);
        let created = DataFile::create(path.clone(), id, FileKind::Log)
            .and_then(|f| f.sync_data().map(|()| f))
            .and_then(|f| sync_dir(&self.dir).map(|()| f));
        let new = match created {
            Ok(f) => Arc::new(f),
            Err(source) => {
                self.poison(format!("cannot create {}: {source}", path.display()));
                return Err(EngineError::Io {
                    op: "create",
                    path,
                    source,
                });
            }
        };
        write(&self.files).insert(id, Arc::clone(&new));
        w.active = new;
        self.request_hint(old.id);
        Ok(())
    }

    /// Waits until the log is durable up to `pos`, leading an fsync if no
    /// one else is.
    fn wait_durable(&self, pos: u64) -> Result<(), EngineError> {
        let mut st = lock(&self.sync.state);
        loop {
            if st.durable >= pos {
                return Ok(());
            }
            self.check_poison()?;
            if st.syncing {
                st = self
                    .sync
                    .done
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            drop(st);
            // Writers woken by the previous fsync are appending right now;
            // giving them the CPU first lets this fsync cover them too, which
            // is what makes group commit scale with the number of writers.
            for _ in 0..LEADER_MAX_YIELDS {
                if self.sync.appending.load(Ordering::Acquire) == 0 {
                    break;
                }
                std::thread::yield_now();
            }
            // Everything appended before this moment is covered by the fsync.
            let (file, target) = {
                let w = lock(&self.writer);
                (Arc::clone(&w.active), w.end_position())
            };
            let result = self.fsync(&file);
            st = lock(&self.sync.state);
            st.syncing = false;
            if result.is_ok() {
                st.durable = st.durable.max(target);
            }
            self.sync.done.notify_all();
            result?;
        }
    }

    /// fsyncs one data file, timing it; a failure poisons the engine.
    fn fsync(&self, file: &DataFile) -> Result<(), EngineError> {
        let started = Instant::now();
        let result = self
            .opts
            .fault(FaultPoint::Fsync)
            .and_then(|()| file.sync_data());
        match result {
            Ok(()) => {
                let micros = started.elapsed().as_micros() as u64;
                self.last_fsync_micros.store(micros, Ordering::Relaxed);
                Ok(())
            }
            Err(source) => {
                self.poison(format!("fsync of {} failed: {source}", file.path.display()));
                Err(EngineError::Io {
                    op: "fsync",
                    path: file.path.clone(),
                    source,
                })
            }
        }
    }

    /// Makes every append so far durable.
    pub(super) fn sync_all(&self) -> Result<(), EngineError> {
        let end = lock(&self.writer).end_position();
        self.wait_durable(end)
    }

    /// Writes a hint covering the active file as it is now (clean close).
    pub(super) fn write_active_hint(&self) -> Result<(), EngineError> {
        let active = Arc::clone(&lock(&self.writer).active);
        self.write_hint(&active)
    }

    /// Scans data file `file` and writes its hint file.
    pub(super) fn write_hint(&self, file: &DataFile) -> Result<(), EngineError> {
        let limit = file.len();
        let tmp = self.dir.join(format!("{:010}.hint.tmp", file.id));
        let mut hints = HintWriter::create(tmp.clone()).ctx("create", &tmp)?;
        let mut reader = RecordReader::new(file, datafile::FILE_HEADER_LEN, limit);
        while let Some(found) =
            reader
                .next_record()
                .ctx("read", &file.path)?
                .map_err(|(offset, bad)| EngineError::Corrupt {
                    file: file.path.clone(),
                    offset,
                    reason: bad.reason(),
                })?
        {
            let key = record::key_of(reader.bytes(&found), &found.header);
            hints
                .add(found.offset, &found.header, key)
                .ctx("write", &tmp)?;
        }
        let tmp = hints.finish(limit).ctx("sync", &tmp)?;
        let path = datafile::hint_path(&self.dir, file.id);
        hint::install(&tmp, &path).ctx("rename", &path)?;
        sync_dir(&self.dir).ctx("sync", &self.dir)
    }

    fn poison(&self, reason: String) {
        tracing::error!(%reason, "storage failure: refusing further writes");
        let _ = self.poisoned.set(reason);
        self.sync.done.notify_all();
    }

    fn check_poison(&self) -> Result<(), EngineError> {
        match self.poisoned.get() {
            Some(reason) => Err(EngineError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }
}
