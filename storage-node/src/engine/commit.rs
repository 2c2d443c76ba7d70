//! Group commit for `Durability::Always`: a queue of writers in which the
//! one at the front appends the whole queue with one `pwrite`, fsyncs once,
//! and only then publishes the records in the keydir (LevelDB's writer
//! queue).
//!
//! While a leader is inside fsync, new writers line up behind its batch; the
//! first of them leads the next batch, so under load every fsync covers
//! everyone who arrived during the previous one. Because the keydir is
//! updated after the fsync, readers never see a write that is not durable,
//! and a write whose fsync failed is not visible (a restart may still find
//! it, as with any write that reported a failure).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use caskade_common::Version;

use super::error::EngineError;
use super::keydir::Entry;
use super::record::{self, HEADER_LEN};
use super::types::{Condition, WriteOutcome};
use super::writer::{RESERVE, Verdict, Write, check};
use super::{Inner, lock, read, write};

/// Most writes one leader commits at once.
const MAX_BATCH_WRITES: usize = 1024;
/// Most times a leader yields to writers still arriving before it commits.
const LEADER_MAX_YIELDS: usize = 8;
/// Most record bytes one leader commits at once (one extra large record allowed).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// The writers waiting for their turn or their outcome.
#[derive(Debug, Default)]
pub(super) struct CommitQueue {
    queue: Mutex<VecDeque<Arc<PendingWrite>>>,
}

/// One write waiting in the queue.
#[derive(Debug)]
pub(super) struct PendingWrite {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    version: Version,
    expires_at: u64,
    condition: Condition,
    /// Set by the leader that committed this write, before `state` says so.
    outcome: Mutex<Option<Result<WriteOutcome, EngineError>>>,
    /// `WAITING`, `LEAD` (reached the front: commit the next batch) or `DONE`.
    state: AtomicU8,
    /// The writer's thread, unparked when `state` changes. Waiting by
    /// parking, rather than on a condvar of the queue mutex, means a
    /// finished writer returns without queueing for that mutex again.
    thread: Thread,
}

const WAITING: u8 = 0;
const LEAD: u8 = 1;
const DONE: u8 = 2;

impl PendingWrite {
    /// A write of `value` (`None`: a tombstone) not yet queued.
    pub(super) fn new(
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        version: Version,
        expires_at: u64,
        condition: Condition,
    ) -> PendingWrite {
        PendingWrite {
            key,
            value,
            version,
            expires_at,
            condition,
            outcome: Mutex::new(None),
            state: AtomicU8::new(WAITING),
            thread: std::thread::current(),
        }
    }

    fn record_len(&self) -> usize {
        HEADER_LEN + self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// A batch being committed by its leader. Dropping it hands every writer of
/// the batch its outcome and the lead to the next writer in line, also when
/// the commit panicked, so that one panic cannot leave the queue without a
/// leader and every later writer parked for good.
struct Leading<'a> {
    inner: &'a Inner,
    /// The writes committed together; the leader's own is the first.
    batch: Vec<Arc<PendingWrite>>,
    /// One per write of `batch`; `None` if the commit did not finish.
    outcomes: Option<Vec<Result<WriteOutcome, EngineError>>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let panicked = self.outcomes.is_none();
        let outcomes = self.outcomes.take().unwrap_or_else(|| {
            // Records may be on disk but neither fsynced nor published:
            // nothing more may be written until a reopen sorts it out.
            self.inner.poison("a commit leader panicked".into());
            self.batch
                .iter()
                .map(|_| Err(self.inner.poisoned_error()))
                .collect()
        });
        let (next_leader, refused) = {
            let mut queue = lock(&self.inner.commit.queue);
            queue.drain(..self.batch.len());
            if panicked {
                // The engine is poisoned: everyone still queued fails now.
                // Handing the lead on could give it to a later write of the
                // panicking thread itself (`write_committed_all`), which is
                // unwinding and would never lead, parking the rest for good.
                (None, queue.drain(..).collect::<Vec<_>>())
            } else {
                (queue.front().cloned(), Vec::new())
            }
        };
        for pending in refused {
            *lock(&pending.outcome) = Some(Err(self.inner.poisoned_error()));
            pending.state.store(DONE, Ordering::Release);
            pending.thread.unpark();
        }
        for (index, (pending, outcome)) in self.batch.iter().zip(outcomes).enumerate() {
            *lock(&pending.outcome) = Some(outcome);
            pending.state.store(DONE, Ordering::Release);
            // The first is the leader itself, which is not parked.
            if index > 0 {
                pending.thread.unpark();
            }
        }
        if let Some(next) = next_leader {
            next.state.store(LEAD, Ordering::Release);
            next.thread.unpark();
        }
    }
}

fn take_outcome(pending: &PendingWrite) -> Result<WriteOutcome, EngineError> {
    lock(&pending.outcome)
        .take()
        .unwrap_or(Err(EngineError::Poisoned("write lost its outcome".into())))
}

/// A record of the batch, appended but not yet in the keydir.
struct Staged {
    index: usize,
    seq: u64,
    entry: Entry,
}

/// The records of a batch bound for the same file, not yet appended.
#[derive(Default)]
struct Segment {
    /// Their encoded bytes.
    buf: Vec<u8>,
    staged: Vec<Staged>,
}

impl Inner {
    /// Writes through the commit queue; returns once the write is durable.
    pub(super) fn write_committed(&self, op: Write<'_>) -> Result<WriteOutcome, EngineError> {
        let mut outcomes = self.write_committed_all(std::iter::once(PendingWrite::new(
            op.key.to_vec(),
            op.value.map(<[u8]>::to_vec),
            op.version,
            op.expires_at,
            op.condition,
        )));
        outcomes
            .pop()
            .unwrap_or(Err(EngineError::Poisoned("write lost its outcome".into())))
    }

    /// Queues `writes` together and returns once they are all durable, one
    /// outcome per write in order. They sit side by side in the queue, so
    /// they share as few fsyncs as the batch limits allow.
    pub(super) fn write_committed_all(
        &self,
        writes: impl IntoIterator<Item = PendingWrite>,
    ) -> Vec<Result<WriteOutcome, EngineError>> {
        let mine: Vec<Arc<PendingWrite>> = writes.into_iter().map(Arc::new).collect();
        if mine.is_empty() {
            return Vec::new();
        }
        {
            let mut queue = lock(&self.commit.queue);
            let leads_now = queue.is_empty();
            queue.extend(mine.iter().cloned());
            if leads_now {
                mine[0].state.store(LEAD, Ordering::Release);
            }
        }
        // Wait for each write in turn: a leader commits it, or the lead is
        // handed to it and this thread commits the next batch itself (unpark
        // before park just makes park return at once).
        for pending in &mine {
            loop {
                match pending.state.load(Ordering::Acquire) {
                    DONE => break,
                    LEAD => self.lead(),
                    _ => std::thread::park(),
                }
            }
        }
        mine.iter().map(|p| take_outcome(p)).collect()
    }

    /// Commits a batch from the front of the queue; called by the writer
    /// whose write reached the front.
    fn lead(&self) {
        let batch = {
            let mut queue = lock(&self.commit.queue);
            // Writers that the previous batch released are on their way back
            // into the queue; letting them in first makes this batch, and
            // so the fsync it shares, cover them too. A lone writer pays
            // one yield.
            let mut queued = queue.len();
            for _ in 0..LEADER_MAX_YIELDS {
                drop(queue);
                std::thread::yield_now();
                queue = lock(&self.commit.queue);
                if queue.len() == queued {
                    break;
                }
                queued = queue.len();
            }
            // Lead: take the front of the queue, leaving it queued so that
            // nobody else leads until this batch is done.
            let mut bytes = 0;
            queue
                .iter()
                .take(MAX_BATCH_WRITES)
                .take_while(|p| {
                    let first = bytes == 0;
                    bytes += p.record_len();
                    first || bytes <= MAX_BATCH_BYTES
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut leading = Leading {
            inner: self,
            batch,
            outcomes: None,
        };
        // The leader's own write is the first of the batch; it is marked
        // done when `leading` drops, like the others.
        leading.outcomes = Some(self.commit_batch(&leading.batch));
    }

    /// Checks, appends and fsyncs `batch`, then publishes it; one outcome per write.
    ///
    /// The records go out in segments: a rotation first commits what is
    /// staged for the old file (append, fsync, publish), so that a failure
    /// to start the new file (a full disk) concerns only the writes after
    /// it. Once a segment fails, the rest of the batch gets the same answer.
    fn commit_batch(&self, batch: &[Arc<PendingWrite>]) -> Vec<Result<WriteOutcome, EngineError>> {
        let now = self.opts.clock.now_ms();
        let mut outcomes: Vec<Result<WriteOutcome, EngineError>> = Vec::with_capacity(batch.len());
        let mut segment = Segment::default();
        // Records accepted earlier in this batch, which later writes of the
        // same key must be checked against.
        let mut batch_view: HashMap<&[u8], Entry> = HashMap::new();
        let mut dead = Vec::new();
        let mut w = lock(&self.writer);
        segment.buf = std::mem::take(&mut w.scratch);
        segment.buf.clear();
        // Why the rest of the batch is refused, after a failed segment.
        let mut failed: Option<EngineError> = None;
        for (index, pending) in batch.iter().enumerate() {
            if let Some(error) = &failed {
                outcomes.push(Err(self.same_failure(error)));
                continue;
            }
            if let Err(e) = self.check_poison() {
                outcomes.push(Err(e));
                continue;
            }
            let key = pending.key.as_slice();
            let current = match batch_view.get(key) {
                Some(e) => Some(*e),
                None => read(&self.keydir).get(key),
            };
            let previous = match check(current, pending.version, pending.condition, now) {
                Ok(Verdict::Write(previous)) => previous,
                Ok(Verdict::Stale(current)) => {
                    outcomes.push(Ok(WriteOutcome::Stale { current }));
                    continue;
                }
                Err(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            };
            let len = pending.record_len() as u64;
            let start = w.active.len() + segment.buf.len() as u64;
            if start > super::FILE_HEADER_LEN && start + len > self.opts.max_file_size {
                let rotated = self
                    .commit_segment(&mut w, &mut segment, batch, &mut outcomes, &mut dead)
                    .and_then(|()| self.rotate(&mut w));
                if let Err(error) = rotated {
                    outcomes.push(Err(self.same_failure(&error)));
                    failed = Some(error);
                    continue;
                }
            }
            // Enough for the rest of the batch: later writes find them reserved.
            let rest = (batch.len() - index) as u64;
            if let Err(source) = self.reserve_seqs(&mut w, rest) {
                let error = self.write_failed(RESERVE, &self.dir, source);
                outcomes.push(Err(self.same_failure(&error)));
                failed = Some(error);
                continue;
            }
            let seq = w.next_seq;
            w.next_seq += 1;
            let offset = w.active.len() + segment.buf.len() as u64;
            record::encode(
                &mut segment.buf,
                seq,
                pending.version,
                pending.expires_at,
                key,
                pending.value.as_deref(),
            );
            let entry = Entry::new(
                w.active.id,
                offset as u32,
                pending.version,
                pending.expires_at,
                pending.value.as_ref().map_or(0, |v| v.len() as u32),
                pending.value.is_none(),
            );
            batch_view.insert(key, entry);
            segment.staged.push(Staged { index, seq, entry });
            outcomes.push(Ok(WriteOutcome::Applied { seq, previous }));
        }
        // A failed segment already answered for itself.
        let _ = self.commit_segment(&mut w, &mut segment, batch, &mut outcomes, &mut dead);
        segment.buf.clear();
        w.scratch = segment.buf;
        drop(w);
        for (file_id, bytes) in dead {
            self.add_dead(file_id, bytes);
        }
        outcomes
    }

    /// Appends the staged records of `segment` to the active file, fsyncs
    /// it and publishes them, leaving the segment empty. On failure the
    /// staged writes' outcomes say what became of them: refused for lack of
    /// space (cut off the file again, nothing stored), or unknown. The
    /// writer lock stays held throughout: a merge reads the active file id
    /// under it, and must not take a sealed file whose records are still
    /// unpublished for dead.
    fn commit_segment(
        &self,
        w: &mut super::writer::Writer,
        segment: &mut Segment,
        batch: &[Arc<PendingWrite>],
        outcomes: &mut [Result<WriteOutcome, EngineError>],
        dead: &mut Vec<(u32, u64)>,
    ) -> Result<(), EngineError> {
        if segment.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut segment.staged);
        let appended = self.append_to_active(w, &segment.buf);
        segment.buf.clear();
        if let (Err(EngineError::StorageFull { .. }), Some(first)) = (&appended, staged.first()) {
            // Nothing of the segment was stored, and the rest of the batch
            // is refused: its seqs are handed out again, so that the
            // published records stay numbered without a gap.
            w.next_seq = first.seq;
        }
        if let Err(error) = appended {
            for s in &staged {
                outcomes[s.index] = Err(match &error {
                    EngineError::StorageFull { .. } => self.same_failure(&error),
                    // Part of the records may be in the file: they may
                    // come back when the store is reopened.
                    _ => EngineError::OutcomeUnknown(error.to_string()),
                });
            }
            return Err(error);
        }
        for s in &staged {
            w.active.note_seq(s.seq);
        }
        if let Err(error) = self.fsync(&w.active) {
            for s in &staged {
                outcomes[s.index] = Err(EngineError::OutcomeUnknown(error.to_string()));
            }
            return Err(error);
        }
        {
            let mut keydir = write(&self.keydir);
            for s in &staged {
                let key = &batch[s.index].key;
                if let Some(old) = keydir.insert(key, s.entry) {
                    dead.push((old.file_id, old.record_len(key.len())));
                }
            }
        }
        if let Some(last) = staged.last() {
            // Not `next_seq - 1`: a failed batch before this one took seqs
            // it never published.
            w.published = last.seq;
        }
        if let Some(observe) = &self.opts.append_observer {
            for s in &staged {
                let pending = &batch[s.index];
                observe(super::Appended {
                    seq: s.seq,
                    key: &pending.key,
                    value: pending.value.as_deref(),
                    version: pending.version,
                    expires_at: pending.expires_at,
                });
            }
        }
        Ok(())
    }

    /// The answer for a write refused because of `error`, an earlier
    /// failure of the same batch: full again, the same I/O error, or
    /// poisoned.
    fn same_failure(&self, error: &EngineError) -> EngineError {
        match error {
            EngineError::StorageFull { path } => EngineError::StorageFull { path: path.clone() },
            EngineError::Io { op, path, source } if self.check_poison().is_ok() => {
                EngineError::Io {
                    op,
                    path: path.clone(),
                    source: io::Error::new(source.kind(), source.to_string()),
                }
            }
            _ => self.poisoned_error(),
        }
    }

    fn poisoned_error(&self) -> EngineError {
        self.check_poison()
            .err()
            .unwrap_or_else(|| EngineError::Poisoned("storage failure".into()))
    }
}
