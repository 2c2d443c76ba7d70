//! Merge (compaction): rewrite the live records of immutable files into new
//! files with hints, switch to them, delete the old ones.
//!
//! Readers and the writer are never blocked: the new files are written
//! beside the old ones, and the keydir is switched to them a chunk at a
//! time, each key only if it still points where merge read it from.
//!
//! Crash safety hinges on one commit point, the `STATE` file naming the
//! inputs and outputs:
//! 1. outputs are written as `*.merge`, fsynced (crash: deleted at open);
//! 2. `STATE` records the pending merge, atomically (commit);
//! 3. outputs are renamed into place, the keydir switched, inputs deleted;
//! 4. `STATE` is cleared. A crash anywhere in 3–4 is finished at open.
//!
//! What merge may drop: records no longer latest for their key, and expired
//! values and tombstones written longer ago than the retention — but the latter two only
//! if no file outside the merge can hold an older record of the key (every
//! such file's records are newer). Otherwise an older value left in an
//! unmerged file would come back to life at the next open
//! (basho/bitcask#82, #156).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::datafile::{self, DataFile, FILE_HEADER_LEN, FileKind, RecordReader};
use super::error::{EngineError, IoContext};
use super::hint::HintWriter;
use super::key::Key;
use super::open::{merge_tmp_data, merge_tmp_hint, remove_if_exists};
use super::options::FaultPoint;
use super::record::{self, Header};
use super::since::SeqMerge;
use super::state::{self, PendingMerge, sync_dir};
use super::types::MergeReport;
use super::{Inner, lock, read, write};

/// A record copied to an output: where it was, where it is now.
struct Moved {
    key: Key,
    from: (u32, u32),
    to: (u32, u32),
    len: u32,
}

/// Says whether merge keeps a key (see [`Engine::retain`](super::Engine::retain)).
pub(super) type KeepKey<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// Keys switched per keydir write lock, so readers wait microseconds at most.
const SWITCH_CHUNK: usize = 4096;

impl Inner {
    /// Merges the immutable files `only` (all of them when `None`).
    pub(super) fn merge(&self, only: Option<&[u32]>) -> Result<MergeReport, EngineError> {
        self.merge_with(only, false, None)
    }

    /// Merge; with `skip_damage`, damaged records are skipped (repair); keys
    /// for which `keep` is false are dropped whatever their records.
    pub(super) fn merge_with(
        &self,
        only: Option<&[u32]>,
        skip_damage: bool,
        keep: Option<&KeepKey<'_>>,
    ) -> Result<MergeReport, EngineError> {
        let _merging = lock(&self.merge_lock);
        if self.merge_broken.load(Ordering::Acquire) {
            return Err(EngineError::MergeUnavailable(
                "an earlier merge failed after its commit point; reopen the engine to finish it",
            ));
        }
        let (inputs, outside_min_seq) = {
            // The writer lock is held while the inputs are chosen, so a
            // rotation cannot slip in and make the file taken for immutable
            // the active one (lock order writer → files).
            let writer = lock(&self.writer);
            let active_id = writer.active.id;
            let files = read(&self.files);
            let inputs: Vec<Arc<DataFile>> = match only {
                None => files
                    .values()
                    .filter(|f| f.id != active_id)
                    .cloned()
                    .collect(),
                Some(ids) => {
                    let mut picked = Vec::with_capacity(ids.len());
                    for &id in ids {
                        match files.get(&id) {
                            Some(f) if id != active_id => picked.push(Arc::clone(f)),
                            _ => return Err(EngineError::NotMergeable { id }),
                        }
                    }
                    picked.sort_by_key(|f| f.id);
                    picked.dedup_by_key(|f| f.id);
                    picked
                }
            };
            let outside_min_seq = files
                .values()
                .filter(|f| !inputs.iter().any(|i| i.id == f.id))
                .map(|f| f.min_seq())
                .min()
                .unwrap_or(u64::MAX);
            (inputs, outside_min_seq)
        };
        if inputs.is_empty() {
            return Ok(MergeReport::default());
        }
        remove_leftover_outputs(&self.dir)?;
        let mut uncommitted = UncommittedOutputs {
            dir: &self.dir,
            committed: false,
        };

        let now = self.opts.clock.now_ms();
        let retention_ms =
            u64::try_from(self.opts.merge.tombstone_retention.as_millis()).unwrap_or(u64::MAX);
        let readers = inputs
            .iter()
            .map(|f| RecordReader::new(Arc::clone(f), FILE_HEADER_LEN, f.len()))
            .collect();
        let mut records = SeqMerge::new(readers, skip_damage)?;
        let mut out = Outputs::new(self);
        let mut moved = Vec::new();
        let mut dropped = Vec::new();
        let mut report = MergeReport {
            input_files: inputs.len(),
            ..MergeReport::default()
        };
        let (mut max_seq, mut horizon) = (0, 0);
        while let Some((idx, found)) = records.next_record()? {
            if self.closing.load(Ordering::Acquire) {
                return Err(EngineError::MergeUnavailable("engine is closing"));
            }
            let h = found.header;
            let bytes = records.bytes(idx, &found);
            let key = record::key_of(bytes, &h);
            let at = (records.file(idx).id, found.offset as u32);
            max_seq = max_seq.max(h.seq);
            let latest = read(&self.keydir)
                .get(key)
                .is_some_and(|e| (e.file_id, e.offset) == at);
            // Dropping a key's latest record is only safe when no file left
            // out of this merge can hold an older record of the key: all
            // their records must be newer than this one.
            let droppable = h.seq < outside_min_seq;
            // To a replica that missed it, an expired value is a delete like
            // a tombstone: both are kept for the retention, and dropping
            // either moves the horizon past which catch-up must be full.
            let expired = h.expires_at != 0 && h.expires_at <= now;
            let retired = (expired || h.is_tombstone())
                && now.saturating_sub(h.version.physical_ms()) >= retention_ms;
            let unwanted = keep.is_some_and(|keep| !keep(key));
            if !latest {
                report.records_dropped += 1;
            } else if droppable && (retired || unwanted) {
                horizon = u64::max(horizon, h.seq);
                dropped.push((Key::new(key), at));
                report.records_dropped += 1;
            } else {
                let to = out.append(bytes, &h, key)?;
                moved.push(Moved {
                    key: Key::new(key),
                    from: at,
                    to,
                    len: bytes.len() as u32,
                });
                report.records_kept += 1;
            }
        }
        let outputs = out.finish()?;
        self.opts
            .fault(FaultPoint::MergeOutputWritten)
            .ctx("merge", &self.dir)?;

        {
            let mut state = lock(&self.state);
            let mut next = state.clone();
            next.seq_floor = next.seq_floor.max(max_seq);
            next.tombstone_horizon = next.tombstone_horizon.max(horizon);
            next.pending_merge = Some(PendingMerge {
                inputs: inputs.iter().map(|f| f.id).collect(),
                outputs: outputs.iter().map(|o| o.id).collect(),
            });
            // A STATE.tmp that cannot be written (a full disk) leaves STATE
            // as it was: the merge has not happened, and its outputs go.
            let prepared = next.prepare(&self.dir).ctx("write state in", &self.dir)?;
            // Commit point.
            uncommitted.committed = true;
            if let Err(e) = state::install(&prepared, &self.dir) {
                // The new STATE may be on disk even though installing it
                // failed (say, the directory fsync did): its outputs must
                // survive until an open settles the merge one way or the other.
                self.merge_broken.store(true, Ordering::Release);
                return Err(EngineError::io("write state in", &self.dir, e));
            }
            *state = next;
        }
        let finished = self.finish_merge(&inputs, &outputs, &moved, &dropped);
        if finished.is_err() {
            self.merge_broken.store(true, Ordering::Release);
        }
        finished?;
        report.output_files = outputs.len();
        let before: u64 = inputs.iter().map(|f| f.len()).sum();
        let after: u64 = outputs.iter().map(|o| o.len).sum();
        report.bytes_reclaimed = before.saturating_sub(after);
        self.merges.fetch_add(1, Ordering::Relaxed);
        tracing::info!(?report, "merge done");
        Ok(report)
    }

    /// Everything after the commit point; a failure here is finished at open.
    fn finish_merge(
        &self,
        inputs: &[Arc<DataFile>],
        outputs: &[Output],
        moved: &[Moved],
        dropped: &[(Key, (u32, u32))],
    ) -> Result<(), EngineError> {
        self.opts
            .fault(FaultPoint::MergeCommitted)
            .ctx("merge", &self.dir)?;
        let mut opened = Vec::with_capacity(outputs.len());
        for o in outputs {
            let path = datafile::data_path(&self.dir, o.id);
            fs::rename(merge_tmp_data(&self.dir, o.id), &path).ctx("rename", &path)?;
            let hint = datafile::hint_path(&self.dir, o.id);
            fs::rename(merge_tmp_hint(&self.dir, o.id), &hint).ctx("rename", &hint)?;
            let (file, _) = DataFile::open(path.clone(), o.id).ctx("open", &path)?;
            file.note_seq(o.min_seq);
            file.note_seq(o.max_seq);
            file.seal();
            opened.push(Arc::new(file));
        }
        sync_dir(&self.dir).ctx("sync", &self.dir)?;
        self.opts
            .fault(FaultPoint::MergeRenamed)
            .ctx("merge", &self.dir)?;

        // Switch: outputs in, keys repointed, then inputs out — in this order
        // a reader that finds a key's file id always finds the file.
        {
            let mut files = write(&self.files);
            for f in &opened {
                files.insert(f.id, Arc::clone(f));
            }
        }
        for chunk in moved.chunks(SWITCH_CHUNK) {
            let mut stale = Vec::new();
            {
                let mut keydir = write(&self.keydir);
                for m in chunk {
                    if !keydir.relocate(m.key.as_bytes(), m.from, m.to) {
                        // Overwritten while merge ran: the copy is dead already.
                        stale.push((m.to.0, u64::from(m.len)));
                    }
                }
            }
            for (id, len) in stale {
                self.add_dead(id, len);
            }
        }
        for chunk in dropped.chunks(SWITCH_CHUNK) {
            let mut keydir = write(&self.keydir);
            for (key, at) in chunk {
                keydir.remove_if_at(key.as_bytes(), *at);
            }
        }
        {
            let mut files = write(&self.files);
            for f in inputs {
                files.remove(&f.id);
            }
        }
        self.opts
            .fault(FaultPoint::MergeSwapped)
            .ctx("merge", &self.dir)?;

        // Readers still holding an input keep reading it through their open
        // descriptor; the name can go now.
        for f in inputs {
            remove_if_exists(&f.path)?;
            remove_if_exists(&datafile::hint_path(&self.dir, f.id))?;
        }
        sync_dir(&self.dir).ctx("sync", &self.dir)?;
        self.opts
            .fault(FaultPoint::MergeInputsDeleted)
            .ctx("merge", &self.dir)?;

        let mut state = lock(&self.state);
        let mut next = state.clone();
        next.pending_merge = None;
        next.store(&self.dir).ctx("write state in", &self.dir)?;
        *state = next;
        Ok(())
    }
}

/// Deletes `*.merge` files a failed merge left behind (none is committed:
/// a committed merge is finished before the engine runs another).
fn remove_leftover_outputs(dir: &std::path::Path) -> Result<(), EngineError> {
    for dirent in fs::read_dir(dir).ctx("list", dir)? {
        let path = dirent.ctx("list", dir)?.path();
        if path.extension().is_some_and(|e| e == "merge") {
            remove_if_exists(&path)?;
        }
    }
    Ok(())
}

/// Removes a merge's output files when it stops before its commit point,
/// so that a merge that failed (on a full disk, most often) gives the space
/// back at once rather than at the next merge.
struct UncommittedOutputs<'a> {
    dir: &'a std::path::Path,
    committed: bool,
}

impl Drop for UncommittedOutputs<'_> {
    fn drop(&mut self) {
        if !self.committed
            && let Err(error) = remove_leftover_outputs(self.dir)
        {
            tracing::warn!(%error, "could not remove the outputs of a failed merge");
        }
    }
}

/// A finished output file.
struct Output {
    id: u32,
    len: u64,
    min_seq: u64,
    max_seq: u64,
}

/// The output file being written, with its hint, and the finished ones.
struct Outputs<'a> {
    inner: &'a Inner,
    current: Option<Current>,
    done: Vec<Output>,
}

struct Current {
    file: DataFile,
    hint: HintWriter,
    /// Records not yet written to `file`.
    buf: Vec<u8>,
    /// Length of `file` once `buf` is written.
    len: u64,
    min_seq: u64,
    max_seq: u64,
}

const OUTPUT_BUFFER: usize = 1 << 20;

impl Outputs<'_> {
    fn new(inner: &Inner) -> Outputs<'_> {
        Outputs {
            inner,
            current: None,
            done: Vec::new(),
        }
    }

    /// Copies one verified record; returns its new (file id, offset).
    fn append(
        &mut self,
        bytes: &[u8],
        header: &Header,
        key: &[u8],
    ) -> Result<(u32, u32), EngineError> {
        let full = self.current.as_ref().is_some_and(|c| {
            c.len > FILE_HEADER_LEN && c.len + bytes.len() as u64 > self.inner.opts.max_file_size
        });
        if full {
            self.seal()?;
        }
        let cur = match &mut self.current {
            Some(cur) => cur,
            None => self.current.insert(self.start()?),
        };
        let offset = cur.len;
        cur.hint
            .add(offset, header, key)
            .ctx("write", &cur.file.path)?;
        cur.buf.extend_from_slice(bytes);
        cur.len += bytes.len() as u64;
        cur.min_seq = cur.min_seq.min(header.seq);
        cur.max_seq = cur.max_seq.max(header.seq);
        if cur.buf.len() >= OUTPUT_BUFFER {
            cur.file.append(&cur.buf).ctx("write", &cur.file.path)?;
            cur.buf.clear();
        }
        Ok((cur.file.id, offset as u32))
    }

    fn start(&self) -> Result<Current, EngineError> {
        let dir = &self.inner.dir;
        let id = self.inner.next_file_id.fetch_add(1, Ordering::AcqRel);
        let path = merge_tmp_data(dir, id);
        let file = DataFile::create(path.clone(), id, FileKind::Merged).ctx("create", &path)?;
        let hint_tmp = merge_tmp_hint(dir, id);
        let hint = HintWriter::create(hint_tmp.clone()).ctx("create", &hint_tmp)?;
        Ok(Current {
            file,
            hint,
            buf: Vec::with_capacity(OUTPUT_BUFFER),
            len: FILE_HEADER_LEN,
            min_seq: u64::MAX,
            max_seq: 0,
        })
    }

    fn seal(&mut self) -> Result<(), EngineError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        cur.file.append(&cur.buf).ctx("write", &cur.file.path)?;
        cur.file.sync_data().ctx("sync", &cur.file.path)?;
        cur.hint.finish(cur.len).ctx("sync", &cur.file.path)?;
        self.done.push(Output {
            id: cur.file.id,
            len: cur.len,
            min_seq: cur.min_seq,
            max_seq: cur.max_seq,
        });
        Ok(())
    }

    /// Seals the last output and syncs the directory.
    fn finish(mut self) -> Result<Vec<Output>, EngineError> {
        self.seal()?;
        sync_dir(&self.inner.dir).ctx("sync", &self.inner.dir)?;
        Ok(self.done)
    }
}
