//! The node's clock: the hybrid logical clock its writes' versions come
//! from, made to never hand out a version twice, across restarts and steps
//! of the wall clock.
//!
//! Two things seed it at start: the highest version the engine holds
//! (written here or received from a peer), and a lease kept in the data
//! directory (`clock`, a ceiling in Unix milliseconds, replaced atomically).
//! Every version the node assigns is below the ceiling on disk: before it
//! assigns one at or past it, it moves the ceiling [`LEASE`] further and
//! fsyncs. A restart starts the clock at the ceiling, so versions assigned
//! before a crash are beaten even if the crash lost them from the log and
//! the wall clock has since stepped back (the same idea as a timestamp
//! oracle's persisted upper bound). The cost is one small fsync per lease
//! period, and after a restart versions run up to one lease ahead of the
//! wall clock until it catches up.

use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use caskade_common::{Hlc, Version};
use tonic::Status;

use crate::engine::is_out_of_space;
use crate::files::write_atomically;

/// The clock lease file in the data directory.
pub const CLOCK_FILE: &str = "clock";
/// How far past the versions assigned so far the ceiling on disk is moved.
pub const LEASE: Duration = Duration::from_secs(3);

/// A hybrid logical clock whose versions are never reissued.
#[derive(Debug)]
pub struct NodeClock {
    hlc: Hlc,
    /// Physical milliseconds that every version assigned is below.
    ceiling_ms: AtomicU64,
    file: PathBuf,
    /// Held while the lease is moved.
    extending: Mutex<()>,
    /// The last attempt to move the lease found the disk full (logged
    /// once, not at every refused write).
    full: AtomicBool,
}

impl NodeClock {
    /// The clock of node `origin` with its lease in `data_dir`, started above
    /// `held` (the highest version the node's data holds) and above the
    /// lease, reading the system wall clock.
    pub fn open(data_dir: &Path, origin: u32, held: Version) -> io::Result<NodeClock> {
        Self::with_wall_clock(data_dir, origin, held, caskade_common::version::unix_millis)
    }

    /// As [`NodeClock::open`], reading milliseconds from `wall_ms` (tests).
    pub fn with_wall_clock(
        data_dir: &Path,
        origin: u32,
        held: Version,
        wall_ms: fn() -> u64,
    ) -> io::Result<NodeClock> {
        let file = data_dir.join(CLOCK_FILE);
        let ceiling_ms = match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                io::Error::new(
                    ErrorKind::InvalidData,
                    format!("{} does not hold a time in milliseconds", file.display()),
                )
            })?,
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let hlc = Hlc::with_wall_clock(origin, wall_ms);
        hlc.observe(held);
        hlc.observe(Version::from_parts(ceiling_ms, 0, 0));
        Ok(NodeClock {
            hlc,
            ceiling_ms: AtomicU64::new(ceiling_ms),
            file,
            extending: Mutex::new(()),
            full: AtomicBool::new(false),
        })
    }

    /// A version newer than every version this node assigned (in any earlier
    /// run too) or observed. Blocks for an fsync about once per [`LEASE`].
    pub fn now(&self) -> Result<Version, Status> {
        self.now_unless_wall_past(u64::MAX)
    }

    /// As [`NodeClock::now`], refused (UNAVAILABLE, nothing assigned) if the
    /// wall clock reads past `max_wall_ms`: it is ahead of the time this
    /// node last agreed on with its peers
    /// ([`crate::clock_offset::ClockGuard::wall_ceiling`]).
    pub fn now_unless_wall_past(&self, max_wall_ms: u64) -> Result<Version, Status> {
        let version = self.hlc.now_unless_wall_past(max_wall_ms).ok_or_else(|| {
            Status::unavailable(
                "this node's wall clock stepped ahead of the time its peers agree on",
            )
        })?;
        if version.physical_ms() >= self.ceiling_ms.load(Ordering::Acquire) {
            self.extend_past(version.physical_ms())
                .map_err(|e| self.refused(&e))?;
        }
        Ok(version)
    }

    /// Records a version seen from elsewhere, so later versions exceed it.
    pub fn observe(&self, seen: Version) {
        self.hlc.observe(seen);
    }

    /// The ceiling on disk, in Unix milliseconds.
    pub fn ceiling_ms(&self) -> u64 {
        self.ceiling_ms.load(Ordering::Acquire)
    }

    /// Moves the ceiling on disk above `physical_ms`.
    fn extend_past(&self, physical_ms: u64) -> io::Result<()> {
        let _extending = self
            .extending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if physical_ms < self.ceiling_ms.load(Ordering::Acquire) {
            // Another write moved it meanwhile.
            return Ok(());
        }
        let ceiling = physical_ms.saturating_add(LEASE.as_millis() as u64);
        write_atomically(&self.file, ceiling.to_string().as_bytes())?;
        self.ceiling_ms.store(ceiling, Ordering::Release);
        if self.full.swap(false, Ordering::AcqRel) {
            tracing::info!("clock lease stored again: writes accepted");
        }
        Ok(())
    }

    /// The status for a write refused because the clock lease could not
    /// be stored: nothing was written. A full disk is a 507 like the
    /// engine's, logged once until the lease is stored again.
    fn refused(&self, error: &io::Error) -> Status {
        if is_out_of_space(error) {
            if !self.full.swap(true, Ordering::AcqRel) {
                tracing::warn!(%error, "disk full: cannot store the clock lease; refusing writes");
            }
            return Status::resource_exhausted("node storage is full");
        }
        tracing::error!(%error, "storing the clock lease");
        Status::unavailable("node cannot store its clock lease")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One wall clock per test: tests run in parallel.
    static STEPPED_BACK_MS: AtomicU64 = AtomicU64::new(0);
    static MOVING_MS: AtomicU64 = AtomicU64::new(0);

    fn stepped_back() -> u64 {
        STEPPED_BACK_MS.load(Ordering::SeqCst)
    }

    fn moving() -> u64 {
        MOVING_MS.load(Ordering::SeqCst)
    }

    #[test]
    fn versions_are_not_reissued_after_a_restart_with_the_clock_stepped_back() {
        let dir = tempfile::tempdir().unwrap();
        STEPPED_BACK_MS.store(10_000_000, Ordering::SeqCst);
        let clock = NodeClock::with_wall_clock(dir.path(), 1, Version::ZERO, stepped_back).unwrap();
        let mut issued = Version::ZERO;
        for _ in 0..100 {
            issued = clock.now().unwrap();
        }
        assert!(clock.ceiling_ms() > issued.physical_ms());
        drop(clock);

        // The log lost every write (nothing held) and the wall clock is an
        // hour behind.
        STEPPED_BACK_MS.store(10_000_000 - 3_600_000, Ordering::SeqCst);
        let clock = NodeClock::with_wall_clock(dir.path(), 1, Version::ZERO, stepped_back).unwrap();
        let next = clock.now().unwrap();
        assert!(
            next > issued,
            "{next} reissues a version at or below {issued}"
        );
    }

    #[test]
    fn the_clock_starts_above_what_the_data_holds_and_moves_its_lease_as_time_passes() {
        let dir = tempfile::tempdir().unwrap();
        MOVING_MS.store(5_000, Ordering::SeqCst);
        let held = Version::from_parts(9_000, 4, 2);
        let clock = NodeClock::with_wall_clock(dir.path(), 1, held, moving).unwrap();
        let first = clock.now().unwrap();
        assert!(first > held);
        let ceiling = clock.ceiling_ms();
        assert!(ceiling > first.physical_ms());
        let on_disk = std::fs::read_to_string(dir.path().join(CLOCK_FILE)).unwrap();
        assert_eq!(on_disk.parse::<u64>().ok(), Some(ceiling));
        MOVING_MS.store(ceiling + 10, Ordering::SeqCst);
        let later = clock.now().unwrap();
        assert!(clock.ceiling_ms() > later.physical_ms());
    }
}
