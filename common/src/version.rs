//! Record versions and the hybrid logical clock that assigns them.
//!
//! Every write carries a [`Version`] `(hlc, origin)`: `hlc` packs 48 bits of
//! wall-clock milliseconds above a 16-bit logical counter, `origin` is the id
//! of the node that coordinated the write. Versions are totally ordered
//! (hlc first, then origin), so "the newest version wins" is the same decision
//! on every replica, whatever order records arrive in. The version is also the
//! HTTP `ETag`, so its text form is a contract: `<hlc>-<origin>` in decimal.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the logical counter below the physical milliseconds.
const COUNTER_BITS: u32 = 16;

/// The version of one record: totally ordered, newest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Hybrid logical clock: `physical_ms << 16 | counter`.
    pub hlc: u64,
    /// Numeric id of the node that coordinated the write.
    pub origin: u32,
}

impl Version {
    /// The version older than every real write.
    pub const ZERO: Version = Version { hlc: 0, origin: 0 };

    /// A version from its parts.
    pub const fn new(hlc: u64, origin: u32) -> Self {
        Version { hlc, origin }
    }

    /// A version whose clock reads `physical_ms` with logical counter `counter`.
    pub const fn from_parts(physical_ms: u64, counter: u16, origin: u32) -> Self {
        Version {
            hlc: (physical_ms << COUNTER_BITS) | counter as u64,
            origin,
        }
    }

    /// Wall-clock milliseconds since the Unix epoch at which the write was coordinated.
    pub const fn physical_ms(&self) -> u64 {
        self.hlc >> COUNTER_BITS
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hlc, self.origin)
    }
}

/// A version string that is not `<hlc>-<origin>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a version (expected <hlc>-<origin> in decimal)")]
pub struct ParseVersionError;

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hlc, origin) = s.split_once('-').ok_or(ParseVersionError)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(hlc) || !digits(origin) {
            return Err(ParseVersionError);
        }
        Ok(Version {
            hlc: hlc.parse().map_err(|_| ParseVersionError)?,
            origin: origin.parse().map_err(|_| ParseVersionError)?,
        })
    }
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A hybrid logical clock (Kulkarni et al., 2014) for one node.
///
/// `now` never returns the same or a smaller value twice, even when the wall
/// clock steps back; `observe` folds in versions received from other nodes so
/// that anything this node writes afterwards is newer than what it has seen.
pub struct Hlc {
    origin: u32,
    wall_ms: fn() -> u64,
    /// The last hlc value handed out or observed.
    last: Mutex<u64>,
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hlc").field("origin", &self.origin).finish()
    }
}

impl Hlc {
    /// A clock for node `origin`, reading the system wall clock.
    pub fn new(origin: u32) -> Self {
        Self::with_wall_clock(origin, unix_millis)
    }

    /// A clock for node `origin` reading milliseconds from `wall_ms` (tests).
    pub fn with_wall_clock(origin: u32, wall_ms: fn() -> u64) -> Self {
        Hlc {
            origin,
            wall_ms,
            last: Mutex::new(0),
        }
    }

    /// A new version, newer than every version this clock has produced or observed.
    pub fn now(&self) -> Version {
        self.now_unless_wall_past(u64::MAX)
            .expect("no wall clock reads past the largest time")
    }

    /// As [`Hlc::now`], unless the wall clock reads past `max_wall_ms` (it
    /// stepped ahead): then `None`, and the clock is left as it was. A
    /// version may still run ahead of `max_wall_ms` by what the clock
    /// observed.
    pub fn now_unless_wall_past(&self, max_wall_ms: u64) -> Option<Version> {
        let wall = (self.wall_ms)();
        if wall > max_wall_ms {
            return None;
        }
        let physical = wall << COUNTER_BITS;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // When the wall clock has not moved past `last` the counter advances;
        // a counter overflow carries into the millisecond part, which is the
        // standard HLC answer to more than 65,536 writes in one millisecond.
        *last = physical.max(last.saturating_add(1));
        Some(Version::new(*last, self.origin))
    }

    /// Records a version seen from elsewhere, so later `now` values exceed it.
    pub fn observe(&self, seen: Version) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = (*last).max(seen.hlc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static WALL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5_000);

    fn wall() -> u64 {
        WALL_MS.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_wall_clock_past_the_ceiling_assigns_nothing_but_a_lead_observed_does() {
        let hlc = Hlc::with_wall_clock(1, wall);
        // What the clock observed may run ahead of the ceiling.
        hlc.observe(Version::from_parts(9_000, 0, 2));
        let next = hlc.now_unless_wall_past(6_000).unwrap();
        assert!(next.physical_ms() == 9_000 && next > Version::from_parts(9_000, 0, 2));
        // A wall clock past the ceiling assigns nothing and changes nothing.
        WALL_MS.store(700_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(hlc.now_unless_wall_past(6_000), None);
        WALL_MS.store(5_000, std::sync::atomic::Ordering::SeqCst);
        assert!(hlc.now_unless_wall_past(6_000).unwrap() > next);
        assert!(hlc.now().physical_ms() < 10_000);
    }

    #[test]
    fn text_form_round_trips() {
        let v = Version::from_parts(1_700_000_000_000, 7, 3);
        let s = v.to_string();
        assert_eq!(s.parse::<Version>(), Ok(v));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "1 -2",
            "+1-2",
            "99999999999999999999-1",
        ] {
            assert_eq!(bad.parse::<Version>(), Err(ParseVersionError), "{bad:?}");
        }
    }

    #[test]
    fn order_is_hlc_then_origin() {
        assert!(Version::new(2, 0) > Version::new(1, 9));
        assert!(Version::new(1, 2) > Version::new(1, 1));
        assert_eq!(Version::from_parts(5, 1, 0).physical_ms(), 5);
    }

    #[test]
    fn hlc_is_monotonic_when_the_wall_clock_stands_still() {
        let clock = Hlc::with_wall_clock(1, || 1_000);
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        assert_eq!(b.physical_ms(), 1_000);
    }

    #[test]
    fn hlc_moves_past_observed_versions() {
        let clock = Hlc::with_wall_clock(1, || 1_000);
        let remote = Version::from_parts(5_000, 3, 2);
        clock.observe(remote);
        let next = clock.now();
        assert!(next.hlc > remote.hlc);
        assert_eq!(next.origin, 1);
    }
}
