//! The write path shared by every durability mode: version and condition
//! checks, appends, rotation, fsync and poisoning.
//!
//! Under `Durability::Never` and `Interval` a writer holds `Inner::writer`
//! while it checks, appends its record with one `pwrite` and updates the
//! keydir, so its write is visible as soon as it returns. `Always` goes
//! through the commit queue instead (`commit.rs`), which appends and fsyncs
//! whole batches. A failed append or fsync poisons the engine: it can no
//! longer tell what is on disk, so it refuses writes rather than acknowledge
//! data it may lose.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use caskade_common::Version;

use super::datafile::{self, DataFile, FileKind, RecordReader};
use super::error::{EngineError, IoContext, is_out_of_space};
use super::hint::{self, HintWriter};
use super::keydir::Entry;
use super::options::{Durability, FaultPoint};
use super::record;
use super::state::sync_dir;
use super::types::{Condition, WriteOutcome};
use super::{Inner, lock, read, write};

/// Seqs reserved in `STATE` at a time (see [`Inner::reserve_seqs`]).
pub(super) const SEQ_RESERVATION: u64 = 1 << 16;
/// What a failed reservation reports.
pub(super) const RESERVE: &str = "reserve seqs in STATE in";

/// The single writer's state, behind `Inner::writer`.
#[derive(Debug)]
pub struct Writer {
    /// The file that takes appends.
    pub active: Arc<DataFile>,
    /// The seq the next record gets.
    pub next_seq: u64,
    /// Seqs up to this are reserved in `STATE` (its `seq_floor`): a restart
    /// numbers from above it, so a seq handed out is never handed out
    /// again, not even after a crash that lost the records that had it.
    pub seq_reserved: u64,
    /// The last seq whose record is published (in the keydir): reads of
    /// the log end there, past records whose commit failed.
    pub published: u64,
    /// Reused encode buffer.
    pub scratch: Vec<u8>,
}

impl Writer {
    /// A writer appending to `active`, numbering records from `next_seq`.
    pub fn new(active: Arc<DataFile>, next_seq: u64) -> Self {
        Writer {
            active,
            next_seq,
            seq_reserved: next_seq - 1,
            published: next_seq - 1,
            scratch: Vec::with_capacity(4096),
        }
    }
}

/// One put or delete, as both write paths take it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Write<'a> {
    /// The key, already validated.
    pub key: &'a [u8],
    /// The value, or `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// The record's version (last writer wins).
    pub version: Version,
    /// Unix ms; 0 = never expires.
    pub expires_at: u64,
    /// Precondition on the key's live value.
    pub condition: Condition,
}

/// What a version and condition check decided.
pub(super) enum Verdict {
    /// Write; the key's live version before it (`None`: absent).
    Write(Option<Version>),
    /// Do not write: the key holds this version or a newer one.
    Stale(Version),
}

impl Inner {
    /// Appends a put (`value: Some`) or tombstone (`None`) if `version` is
    /// newer than the key's and `condition` holds.
    pub(super) fn write(&self, op: Write<'_>) -> Result<WriteOutcome, EngineError> {
        self.check_poison()?;
        if self.opts.durability == Durability::Always {
            return self.write_committed(op);
        }
        let Write {
            key,
            value,
            version,
            expires_at,
            condition,
        } = op;
        let now = self.opts.clock.now_ms();
        let mut w = lock(&self.writer);
        // The writer lock is held, so no other write can change the key
        // between this check and the append below.
        let current = read(&self.keydir).get(key);
        let previous = match check(current, version, condition, now)? {
            Verdict::Write(previous) => previous,
            Verdict::Stale(current) => return Ok(WriteOutcome::Stale { current }),
        };
        self.reserve_seqs(&mut w, 1)
            .map_err(|source| self.write_failed(RESERVE, &self.dir, source))?;
        let seq = w.next_seq;
        let mut scratch = std::mem::take(&mut w.scratch);
        scratch.clear();
        record::encode(&mut scratch, seq, version, expires_at, key, value);
        let appended = self.append(&mut w, &scratch);
        w.scratch = scratch;
        let offset = appended?;
        w.active.note_seq(seq);
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
        w.published = seq;
        if let Some(observe) = &self.opts.append_observer {
            observe(super::Appended {
                seq,
                key,
                value,
                version,
                expires_at,
            });
        }
        drop(w);
        if let Some(old) = replaced {
            self.add_dead(old.file_id, old.record_len(key.len()));
        }
        Ok(WriteOutcome::Applied { seq, previous })
    }

    /// Appends encoded records to the active file, rotating first if they
    /// would overflow it. Returns the offset of the first.
    pub(super) fn append(&self, w: &mut Writer, bytes: &[u8]) -> Result<u64, EngineError> {
        if !w.active.is_empty() && w.active.len() + bytes.len() as u64 > self.opts.max_file_size {
            self.rotate(w)?;
        }
        self.append_to_active(w, bytes)
    }

    /// Appends encoded records to the active file as it is. Returns the
    /// offset of the first.
    ///
    /// A full disk is a refusal: what a short write left past the last
    /// record is cut off again, and nothing was stored. Any other failure
    /// (or a cut that fails) poisons the engine.
    pub(super) fn append_to_active(&self, w: &Writer, bytes: &[u8]) -> Result<u64, EngineError> {
        let source = match w.active.append(bytes) {
            Ok(offset) => {
                self.note_space();
                return Ok(offset);
            }
            Err(source) => source,
        };
        if is_out_of_space(&source) {
            match w.active.discard_partial_append() {
                Ok(()) => {
                    // A refused write must not come back after a power
                    // loss: the cut is made durable (a failure poisons).
                    self.fsync(&w.active)?;
                    return Err(self.out_of_space(&w.active.path));
                }
                Err(error) => tracing::error!(
                    file = %w.active.path.display(),
                    %error,
                    "cannot cut a partial append off a full disk"
                ),
            }
        }
        // A short write may have left part of a record on disk; the next
        // open truncates it, but this process must stop writing.
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

    /// Seals the active file (fsync) and starts a new one. On a full disk
    /// the active file stays as it is and the next write tries again.
    pub(super) fn rotate(&self, w: &mut Writer) -> Result<(), EngineError> {
        let old = Arc::clone(&w.active);
        self.fsync(&old)?;
        let id = self.next_file_id.fetch_add(1, Ordering::AcqRel);
        let path = datafile::data_path(&self.dir, id);
        let new = match DataFile::create(path.clone(), id, FileKind::Log) {
            Ok(f) => f,
            Err(source) if is_out_of_space(&source) => {
                // The file may exist, without its header or part of it.
                let _ = std::fs::remove_file(&path);
                // The id is given back unless a merge took the next one
                // meanwhile, so that refused writes do not use ids up.
                let _ = self.next_file_id.compare_exchange(
                    id + 1,
                    id,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Err(self.out_of_space(&path));
            }
            Err(source) => {
                self.poison(format!("cannot create {}: {source}", path.display()));
                return Err(EngineError::Io {
                    op: "create",
                    path,
                    source,
                });
            }
        };
        let synced = new.sync_data().and_then(|()| sync_dir(&self.dir));
        if let Err(source) = synced {
            self.poison(format!("cannot sync new {}: {source}", path.display()));
            return Err(EngineError::Io {
                op: "sync",
                path,
                source,
            });
        }
        let new = Arc::new(new);
        write(&self.files).insert(id, Arc::clone(&new));
        w.active = new;
        old.seal();
        self.request_hint(old.id);
        Ok(())
    }

    /// A write refused for lack of space at `path`; the first after space
    /// was there is logged.
    pub(super) fn out_of_space(&self, path: &std::path::Path) -> EngineError {
        if !self.full.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                dir = %self.dir.display(),
                "disk full: refusing writes until space is freed; reads go on"
            );
        }
        EngineError::StorageFull {
            path: path.to_path_buf(),
        }
    }

    /// A write that failed before anything was appended: refused for lack
    /// of space, or an I/O error.
    pub(super) fn write_failed(
        &self,
        op: &'static str,
        path: &std::path::Path,
        source: io::Error,
    ) -> EngineError {
        if is_out_of_space(&source) {
            self.out_of_space(path)
        } else {
            EngineError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// An append went through: if the disk was full, it no longer is.
    fn note_space(&self) {
        if self.full.load(Ordering::Acquire) && self.full.swap(false, Ordering::AcqRel) {
            tracing::info!(dir = %self.dir.display(), "disk has space again: writes accepted");
        }
    }

    /// fsyncs one data file, timing it; a failure poisons the engine.
    ///
    /// Once poisoned, the engine fsyncs nothing more: Linux reports a
    /// writeback error to one fsync of a file only, so a later fsync can
    /// succeed although bytes it would vouch for are lost. For the same
    /// reason fsyncs run one at a time (a commit's, a sync's, a backup's):
    /// the one that gets the error poisons the engine before the next one
    /// can report success.
    pub(super) fn fsync(&self, file: &DataFile) -> Result<(), EngineError> {
        let _one_at_a_time = lock(&self.syncing);
        self.check_poison()?;
        let started = Instant::now();
        let result = self
            .opts
            .fault(FaultPoint::Fsync)
            .and_then(|()| file.sync_data());
        match result {
            Ok(()) => {
                let elapsed = started.elapsed();
                if let Some(observe) = &self.opts.fsync_observer {
                    observe(elapsed);
                }
                let micros = elapsed.as_micros() as u64;
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

    /// Makes every append so far durable. (Under `Always` every
    /// acknowledged append already is; this also covers a batch in flight.)
    pub(super) fn sync_all(&self) -> Result<(), EngineError> {
        let active = Arc::clone(&lock(&self.writer).active);
        self.fsync(&active)
    }

    /// Writes a hint covering the active file as it is now (clean close).
    pub(super) fn write_active_hint(&self) -> Result<(), EngineError> {
        let active = Arc::clone(&lock(&self.writer).active);
        self.write_hint(&active)
    }

    /// Scans data file `file` and writes its hint file.
    pub(super) fn write_hint(&self, file: &DataFile) -> Result<(), EngineError> {
        let tmp = self.dir.join(format!("{:010}.hint.tmp", file.id));
        let written = self.write_hint_to(file, &tmp);
        if written.is_err() {
            // On a full disk, most often: the partial hint gives its space back.
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn write_hint_to(&self, file: &DataFile, tmp: &std::path::Path) -> Result<(), EngineError> {
        let limit = file.len();
        let mut hints = HintWriter::create(tmp.to_path_buf()).ctx("create", tmp)?;
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
                .ctx("write", tmp)?;
        }
        let tmp = hints.finish(limit).ctx("sync", tmp)?;
        let path = datafile::hint_path(&self.dir, file.id);
        hint::install(&tmp, &path).ctx("rename", &path)?;
        sync_dir(&self.dir).ctx("sync", &self.dir)
    }

    pub(super) fn poison(&self, reason: String) {
        tracing::error!(%reason, "storage failure: refusing further writes");
        let _ = self.poisoned.set(reason);
    }

    /// Makes sure the next `count` seqs are reserved in `STATE` before they
    /// are handed out. Under `interval` or `never` durability a crash can
    /// lose records that replicas already pulled; their cursors are past
    /// those seqs, so a restart must never number new records with them.
    /// Reserving [`SEQ_RESERVATION`] at a time costs one `STATE` write per
    /// that many records, and leaves a gap of at most that many at a restart.
    /// When this fails no record is appended (`STATE` may already hold the
    /// raised floor, which only widens the gap).
    pub(super) fn reserve_seqs(&self, w: &mut Writer, count: u64) -> io::Result<()> {
        let last = w.next_seq + count - 1;
        if last <= w.seq_reserved {
            return Ok(());
        }
        let mut state = lock(&self.state);
        let mut next = state.clone();
        next.seq_floor = next.seq_floor.max(last + SEQ_RESERVATION);
        next.store(&self.dir)?;
        w.seq_reserved = next.seq_floor;
        *state = next;
        Ok(())
    }

    pub(super) fn check_poison(&self) -> Result<(), EngineError> {
        match self.poisoned.get() {
            Some(reason) => Err(EngineError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }
}

/// Decides whether a write of `version` under `condition` goes ahead, given
/// the key's `current` entry: last writer wins first, then the condition,
/// which sees deleted and expired keys as absent.
pub(super) fn check(
    current: Option<Entry>,
    version: Version,
    condition: Condition,
    now: u64,
) -> Result<Verdict, EngineError> {
    if let Some(cur) = current
        && version <= cur.version()
    {
        return Ok(Verdict::Stale(cur.version()));
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
    Ok(Verdict::Write(live))
}
