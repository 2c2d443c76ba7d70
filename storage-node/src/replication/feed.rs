//! The recent tail of this node's log, in memory: what peers that are nearly
//! caught up pull, without a disk read per pull.
//!
//! The engine hands every appended record to [`Feed::push`] under its writer
//! lock, in sequence order and without gaps, so the tail is a deque indexed
//! by `seq - first_seq`. It keeps the newest records up to a byte budget; a
//! pull from before the oldest one held is served from the log on disk
//! instead. Pushing never waits for a reader: readers copy out reference-
//! counted records under the lock and filter them after releasing it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use caskade_common::Version;
use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::engine::Appended;

/// One record of the tail.
#[derive(Debug)]
pub struct FeedRecord {
    /// Its sequence number in this node's log.
    pub seq: u64,
    /// The key.
    pub key: Bytes,
    /// The value; `None` for a tombstone.
    pub value: Option<Bytes>,
    /// The record's version.
    pub version: Version,
    /// Expiry in Unix milliseconds; 0 = never.
    pub expires_at: u64,
}

impl FeedRecord {
    fn size(&self) -> usize {
        // The allocations' overhead counts too, or a tail of tiny records
        // would hold far more memory than its budget.
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len) + 96
    }
}

/// Records from the tail, for one pull.
#[derive(Debug)]
pub struct Tail {
    /// The records that passed the pull's filter, in seq order.
    pub records: Vec<Arc<FeedRecord>>,
    /// Every record up to this seq was either returned or filtered out.
    pub through: u64,
}

/// The in-memory tail of the log and the last sequence number, which pulls
/// wait on.
#[derive(Debug)]
pub struct Feed {
    /// The records held; the lock is taken by the engine's writer for each
    /// push, so nothing slow happens under it.
    tail: Mutex<Records>,
    last_seq: watch::Sender<u64>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Records {
    held: VecDeque<Arc<FeedRecord>>,
    /// Records up to this seq are not held (evicted, or older than the start).
    floor: u64,
    bytes: usize,
}

impl Feed {
    /// An empty feed keeping about `max_bytes` of records.
    pub fn new(max_bytes: usize) -> Feed {
        Feed {
            tail: Mutex::new(Records::default()),
            last_seq: watch::Sender::new(0),
            max_bytes,
        }
    }

    /// Starts the feed after `last_seq`, the engine's last record when it
    /// opened: older records are read from disk.
    pub fn start_after(&self, last_seq: u64) {
        let mut tail = self.lock();
        tail.held.clear();
        tail.bytes = 0;
        tail.floor = last_seq;
        self.last_seq.send_replace(last_seq);
    }

    /// Appends a record the engine just published (the engine's append observer).
    pub fn push(&self, appended: Appended<'_>) {
        let record = Arc::new(FeedRecord {
            seq: appended.seq,
            key: Bytes::copy_from_slice(appended.key),
            value: appended.value.map(Bytes::copy_from_slice),
            version: appended.version,
            expires_at: appended.expires_at,
        });
        {
            let mut tail = self.lock();
            let expected = tail.floor + tail.held.len() as u64 + 1;
            if record.seq != expected {
                // Cannot happen while the engine reports every append in
                // order; if it did, serving from here would skip records.
                tracing::error!(
                    seq = record.seq,
                    expected,
                    "replication feed out of order; restarting it"
                );
                tail.held.clear();
                tail.bytes = 0;
                tail.floor = record.seq - 1;
            }
            tail.bytes += record.size();
            tail.held.push_back(record);
            while tail.bytes > self.max_bytes {
                let Some(oldest) = tail.held.pop_front() else {
                    break;
                };
                tail.bytes -= oldest.size();
                tail.floor = oldest.seq;
            }
        }
        self.last_seq.send_replace(appended.seq);
    }

    /// The last sequence number pushed.
    pub fn last_seq(&self) -> u64 {
        *self.last_seq.borrow()
    }

    /// A receiver that changes whenever a record is pushed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// Up to `max` records (and about `max_bytes`) after `after` for which
    /// `wanted` holds, looking at no more than `max_examined` records;
    /// `None` if records after `after` are no longer held in memory.
    pub fn read(
        &self,
        after: u64,
        max: usize,
        max_examined: usize,
        max_bytes: usize,
        wanted: impl Fn(&FeedRecord) -> bool,
    ) -> Option<Tail> {
        let candidates: Vec<Arc<FeedRecord>> = {
            let tail = self.lock();
            if after < tail.floor {
                return None;
            }
            let start = (after - tail.floor) as usize;
            tail.held
                .iter()
                .skip(start)
                .take(max_examined)
                .cloned()
                .collect()
        };
        let mut through = after;
        let mut records = Vec::new();
        let mut bytes = 0;
        for record in candidates {
            if records.len() == max || bytes >= max_bytes {
                break;
            }
            through = record.seq;
            if wanted(&record) {
                bytes += record.size();
                records.push(record);
            }
        }
        Some(Tail { records, through })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(feed: &Feed, seq: u64, key: &str, origin: u32) {
        feed.push(Appended {
            seq,
            key: key.as_bytes(),
            value: Some(b"value"),
            version: Version::new(seq, origin),
            expires_at: 0,
        });
    }

    #[test]
    fn reads_after_a_seq_with_a_filter_and_reports_how_far_it_looked() {
        let feed = Feed::new(1 << 20);
        feed.start_after(10);
        for seq in 11..=20 {
            push(&feed, seq, &format!("k{seq}"), (seq % 2) as u32);
        }
        assert_eq!(feed.last_seq(), 20);
        let all = feed.read(10, 100, 100, usize::MAX, |_| true).unwrap();
        assert_eq!(all.records.len(), 10);
        assert_eq!(all.through, 20);

        let even = feed
            .read(12, 3, 100, usize::MAX, |r| r.version.origin == 0)
            .unwrap();
        let seqs: Vec<u64> = even.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![14, 16, 18]);
        assert_eq!(even.through, 18, "stops at the last record returned");

        let bounded = feed
            .read(10, 100, 4, usize::MAX, |r| r.version.origin == 7)
            .unwrap();
        assert!(bounded.records.is_empty());
        assert_eq!(bounded.through, 14, "covers what it examined");

        let nothing_new = feed.read(20, 100, 100, usize::MAX, |_| true).unwrap();
        assert!(nothing_new.records.is_empty());
        assert_eq!(nothing_new.through, 20);

        assert!(
            feed.read(9, 100, 100, usize::MAX, |_| true).is_none(),
            "before the start"
        );
    }

    #[test]
    fn evicts_the_oldest_records_past_its_budget() {
        let feed = Feed::new(1_000);
        feed.start_after(0);
        for seq in 1..=100 {
            push(&feed, seq, "key", 1);
        }
        assert!(feed.read(0, 100, 100, usize::MAX, |_| true).is_none());
        let recent = feed.read(95, 100, 100, usize::MAX, |_| true).unwrap();
        assert_eq!(recent.records.len(), 5);
        assert_eq!(recent.through, 100);
    }
}
