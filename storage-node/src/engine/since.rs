//! Reading records across files in seq order: the k-way merge that both
//! replication catch-up (`iter_since`) and merge use.
//!
//! Every data file holds its records in ascending seq: log files because the
//! single writer numbers records as it appends them, merge outputs because
//! merge writes in the order this module yields. So a heap over one reader
//! per file yields all records in global seq order.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use super::datafile::{DataFile, FILE_HEADER_LEN, Found, RecordReader};
use super::error::EngineError;
use super::record;
use super::types::Record;
use super::{Inner, lock, read};

/// Records of several files in ascending seq order.
#[derive(Debug)]
pub(super) struct SeqMerge<F> {
    readers: Vec<RecordReader<F>>,
    heads: Vec<Option<Found>>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    /// The reader whose head was handed out last; advanced on the next call
    /// so that the bytes handed out stay valid until then.
    advance: Option<usize>,
    /// Skip damaged records instead of failing (repair).
    skip_damage: bool,
}

impl<F: Borrow<DataFile>> SeqMerge<F> {
    /// Merges `readers`; with `skip_damage`, damaged records are logged and skipped.
    pub(super) fn new(
        readers: Vec<RecordReader<F>>,
        skip_damage: bool,
    ) -> Result<Self, EngineError> {
        let n = readers.len();
        let mut merge = SeqMerge {
            readers,
            heads: vec![None; n],
            heap: BinaryHeap::with_capacity(n),
            advance: None,
            skip_damage,
        };
        for idx in 0..n {
            merge.pull(idx)?;
        }
        Ok(merge)
    }

    fn pull(&mut self, idx: usize) -> Result<(), EngineError> {
        let io_error = |this: &Self, source| EngineError::Io {
            op: "read",
            path: this.readers[idx].file().path.clone(),
            source,
        };
        loop {
            let next = self.readers[idx].next_record();
            match next.map_err(|e| io_error(self, e))? {
                Ok(Some(found)) => {
                    self.heap.push(Reverse((found.header.seq, idx)));
                    self.heads[idx] = Some(found);
                    return Ok(());
                }
                Ok(None) => return Ok(()),
                Err((offset, bad)) if self.skip_damage => {
                    let resumed = self.readers[idx].resync_after(offset);
                    let resumed = resumed.map_err(|e| io_error(self, e))?;
                    tracing::warn!(
                        file = %self.readers[idx].file().path.display(),
                        offset,
                        skipped_bytes = resumed - offset,
                        reason = bad.reason(),
                        "skipping a damaged record"
                    );
                }
                Err((offset, bad)) => {
                    return Err(EngineError::Corrupt {
                        file: self.readers[idx].file().path.clone(),
                        offset,
                        reason: bad.reason(),
                    });
                }
            }
        }
    }

    /// The next record: which file it is in and where. Its bytes are
    /// `self.bytes(idx, &found)` until the next call.
    pub(super) fn next_record(&mut self) -> Result<Option<(usize, Found)>, EngineError> {
        if let Some(idx) = self.advance.take() {
            self.pull(idx)?;
        }
        let Some(Reverse((_, idx))) = self.heap.pop() else {
            return Ok(None);
        };
        let Some(found) = self.heads[idx].take() else {
            return Ok(None);
        };
        self.advance = Some(idx);
        Ok(Some((idx, found)))
    }

    /// The bytes of a record `next_record` just returned.
    pub(super) fn bytes(&self, idx: usize, found: &Found) -> &[u8] {
        self.readers[idx].bytes(found)
    }

    /// The file reader `idx` reads.
    pub(super) fn file(&self, idx: usize) -> &DataFile {
        self.readers[idx].file()
    }
}

/// The records a replica that has applied everything up to a seq is
/// missing; see [`Engine::iter_since`](super::Engine::iter_since).
///
/// It covers what was written before it was created; it holds the files it
/// reads open, so a merge running meanwhile does not disturb it.
#[derive(Debug)]
pub struct SinceIter {
    inner: Arc<Inner>,
    records: SeqMerge<Arc<DataFile>>,
    after: u64,
    /// The last seq published when the iterator was created: it covers no
    /// later record (nor an earlier one whose commit failed).
    upto: u64,
    failed: bool,
}

impl SinceIter {
    pub(super) fn new(inner: Arc<Inner>, after: u64) -> Result<SinceIter, EngineError> {
        // Under the writer lock every appended record is also published in
        // the keydir, so the lengths read here end at published records,
        // except for those of a commit whose fsync failed: `upto` ends
        // before them.
        let writer = lock(&inner.writer);
        let upto = writer.published;
        let readers = read(&inner.files)
            .values()
            .filter(|f| f.max_seq() > after)
            .map(|f| {
                let limit = f.len();
                RecordReader::new(Arc::clone(f), FILE_HEADER_LEN, limit)
            })
            .collect();
        drop(writer);
        // Read after the snapshot: a merge raises the horizon before it
        // switches files, so a merge this snapshot missed left every
        // tombstone it dropped in the files held here.
        let horizon = lock(&inner.state).tombstone_horizon;
        if horizon > after {
            return Err(EngineError::CursorTooOld {
                requested: after,
                horizon,
            });
        }
        Ok(SinceIter {
            records: SeqMerge::new(readers, false)?,
            inner,
            after,
            upto,
            failed: false,
        })
    }

    /// The last seq the iterator covers: once it is exhausted, a replica
    /// that applied everything it yielded holds every record up to here.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// The seq of the last record read (yielded or skipped), or the starting
    /// seq: where a new iterator would resume.
    pub fn position(&self) -> u64 {
        self.after
    }

    fn next_live(&mut self) -> Result<Option<Record>, EngineError> {
        let now = self.inner.opts.clock.now_ms();
        while let Some((idx, found)) = self.records.next_record()? {
            let h = found.header;
            // While a merge switches files, a snapshot can hold a record both
            // in its input and in its output: same seq, adjacent in this
            // stream. Moving the cursor past every record seen skips the copy.
            if h.seq <= self.after {
                continue;
            }
            if h.seq > self.upto {
                // Appended by a commit whose fsync failed, never published.
                continue;
            }
            self.after = h.seq;
            let bytes = self.records.bytes(idx, &found);
            let key = record::key_of(bytes, &h);
            // Superseded records are skipped: the newer one follows later in
            // this same stream. A tombstone or an expired value whose key has
            // left the keydir was dropped by a merge running meanwhile, as
            // the key's latest record: passing it on is still right (a
            // replica that missed it would otherwise keep an older value).
            let latest = match read(&self.inner.keydir).get(key) {
                Some(e) => e.version() == h.version,
                None => h.is_tombstone() || h.expires_at != 0 && h.expires_at <= now,
            };
            if !latest {
                continue;
            }
            return Ok(Some(Record {
                seq: h.seq,
                key: key.to_vec(),
                value: (!h.is_tombstone()).then(|| record::value_of(bytes, &h).to_vec()),
                version: h.version,
                expires_at: (h.expires_at != 0).then_some(h.expires_at),
            }));
        }
        Ok(None)
    }
}

impl Iterator for SinceIter {
    type Item = Result<Record, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_live();
        self.failed = next.is_err();
        next.transpose()
    }
}
