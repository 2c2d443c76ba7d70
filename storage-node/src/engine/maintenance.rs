//! The engine's background thread: hint files for freshly sealed data
//! files, periodic fsync under `Durability::Interval`, and merges when the
//! dead-bytes triggers are met.
//!
//! It owns no state of its own beyond its queue; everything it does goes
//! through the same `Inner` methods callers use, so it needs no locking
//! rules of its own. Stopping it sets `Inner::closing`, which also cuts a
//! running merge short (a merge stopped before its commit changes nothing).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::options::Durability;
use super::{Inner, lock, read};

/// Free space a background merge leaves beyond its outputs and their hints.
const MERGE_ROOM_MARGIN: u64 = 16 << 20;

/// Work queued for the background thread.
#[derive(Debug, Default)]
pub(super) struct MaintenanceQueue {
    state: Mutex<Queued>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Queued {
    stop: bool,
    hints: Vec<u32>,
}

/// Handle to the running background thread.
#[derive(Debug)]
pub(super) struct Maintenance {
    inner: Arc<Inner>,
    thread: JoinHandle<()>,
}

impl Maintenance {
    pub(super) fn start(inner: Arc<Inner>) -> std::io::Result<Maintenance> {
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("caskade-engine-bg".into())
            .spawn(move || run(&worker))?;
        Ok(Maintenance { inner, thread })
    }

    /// Asks the thread to stop, cutting a merge short, and waits for it.
    pub(super) fn stop(self) {
        self.inner.closing.store(true, Ordering::Release);
        lock(&self.inner.maintenance.state).stop = true;
        self.inner.maintenance.wake.notify_all();
        if self.thread.join().is_err() {
            tracing::error!("engine background thread panicked");
        }
    }
}

impl Inner {
    /// Queues writing the hint file of sealed data file `id`.
    pub(super) fn request_hint(&self, id: u32) {
        lock(&self.maintenance.state).hints.push(id);
        self.maintenance.wake.notify_all();
    }

    /// Merges the immutable files whose dead ratio passed the trigger, if
    /// together they hold enough dead bytes.
    fn merge_if_due(&self) {
        let policy = &self.opts.merge;
        let writer = lock(&self.writer);
        let active = writer.active.id;
        let candidates: Vec<(u32, u64)> = read(&self.files)
            .values()
            .filter(|f| f.id != active && f.record_bytes() > 0)
            .filter(|f| f.dead_bytes() as f64 >= policy.dead_ratio * f.record_bytes() as f64)
            .map(|f| (f.id, f.dead_bytes()))
            .collect();
        drop(writer);
        let dead: u64 = candidates.iter().map(|(_, d)| d).sum();
        if candidates.is_empty() || dead < policy.min_dead_bytes {
            return;
        }
        // The outputs need room for the live records until the inputs go,
        // and for their hints, with a margin for the writes that go on
        // meanwhile: on a disk without it, the merge would only fill it up.
        let live: u64 = read(&self.files)
            .values()
            .filter(|f| candidates.iter().any(|(id, _)| *id == f.id))
            .map(|f| f.record_bytes().saturating_sub(f.dead_bytes()))
            .sum();
        let room = live + live / 8 + MERGE_ROOM_MARGIN;
        if let Ok(stat) = rustix::fs::statvfs(&self.dir)
            && stat.f_bavail.saturating_mul(stat.f_frsize) < room
        {
            tracing::debug!(
                live_bytes = live,
                "merge due, but the disk lacks room for its output"
            );
            return;
        }
        let ids: Vec<u32> = candidates.iter().map(|(id, _)| *id).collect();
        tracing::info!(files = ?ids, dead_bytes = dead, "merge triggered");
        if let Err(e) = self.merge(Some(&ids)) {
            tracing::warn!(error = %e, "background merge failed");
        }
    }
}

/// `from + period`, or a day from `from` for a period too long to add.
fn later(from: Instant, period: Duration) -> Instant {
    from.checked_add(period)
        .unwrap_or(from + Duration::from_secs(24 * 60 * 60))
}

fn run(inner: &Inner) {
    let sync_period = match inner.opts.durability {
        Durability::Interval(period) => Some(period),
        _ => None,
    };
    let merge_period = inner
        .opts
        .merge
        .auto
        .then_some(inner.opts.merge.check_interval);
    // `None`: that job never runs, and the thread sleeps until woken.
    let mut next_sync = sync_period.map(|p| later(Instant::now(), p));
    let mut next_merge = merge_period.map(|p| later(Instant::now(), p));
    loop {
        let hints = {
            let mut q = lock(&inner.maintenance.state);
            loop {
                if q.stop {
                    return;
                }
                if !q.hints.is_empty() {
                    break std::mem::take(&mut q.hints);
                }
                let now = Instant::now();
                let due = next_sync.into_iter().chain(next_merge).min();
                q = match due {
                    Some(due) if due <= now => break Vec::new(),
                    Some(due) => {
                        inner
                            .maintenance
                            .wake
                            .wait_timeout(q, due - now)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                    None => inner
                        .maintenance
                        .wake
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                };
            }
        };
        for id in hints {
            // The file may have been merged away since it was sealed.
            let Some(file) = read(&inner.files).get(&id).cloned() else {
                continue;
            };
            if let Err(e) = inner.write_hint(&file) {
                tracing::warn!(file = id, error = %e, "could not write hint file");
            }
            // A merge may have taken the file while its hint was written: a
            // hint must not outlive its data file (a later file could reuse
            // the id after a restart).
            if !read(&inner.files).contains_key(&id) {
                let _ = std::fs::remove_file(super::datafile::hint_path(&inner.dir, id));
            }
        }
        let now = Instant::now();
        if let (Some(period), Some(due)) = (sync_period, next_sync)
            && now >= due
        {
            if let Err(e) = inner.sync_all() {
                tracing::error!(error = %e, "periodic fsync failed");
            }
            next_sync = Some(later(now, period));
        }
        if let (Some(period), Some(due)) = (merge_period, next_merge)
            && now >= due
        {
            inner.merge_if_due();
            next_merge = Some(later(Instant::now(), period));
        }
    }
}
