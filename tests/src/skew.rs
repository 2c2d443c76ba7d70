//! A process clock that can be moved while the process runs: libfaketime
//! (Debian's `faketime` package) preloaded into it, reading its offset
//! from a file the test rewrites. Only the wall clock moves; the monotonic
//! clock (timers, leases, timeouts) stays true, as when NTP is wrong or a
//! clock was set by hand.
//!
//! Where libfaketime is missing the test is skipped with the reason
//! printed, except in CI (`CI` set), where it fails.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where Debian installs the thread-safe libfaketime.
const LIBRARIES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

/// One process's clock offset, kept in a file.
#[derive(Debug)]
pub struct SkewedClock {
    library: PathBuf,
    file: PathBuf,
}

impl SkewedClock {
    /// A clock whose offset lives in `file` (created, offset zero), or
    /// `None` with the reason printed (outside CI only).
    pub fn new(file: &Path) -> Option<SkewedClock> {
        let Some(library) = LIBRARIES.iter().map(PathBuf::from).find(|p| p.is_file()) else {
            let why = "libfaketime is not installed (Debian package `faketime`)";
            if std::env::var_os("CI").is_some() {
                panic!("a clock skew test cannot run in CI: {why}");
            }
            eprintln!("skipped: {why}");
            return None;
        };
        let clock = SkewedClock {
            library,
            file: file.to_path_buf(),
        };
        clock.set("+0");
        Some(clock)
    }

    /// The command prefix that starts a process on this clock.
    pub fn launcher(&self) -> Vec<OsString> {
        let var = |name: &str, value: &Path| {
            let mut pair = OsString::from(format!("{name}="));
            pair.push(value);
            pair
        };
        vec![
            "/usr/bin/env".into(),
            var("LD_PRELOAD", &self.library),
            var("FAKETIME_TIMESTAMP_FILE", &self.file),
            // The file is read again at most once a second.
            "FAKETIME_CACHE_DURATION=1".into(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        ]
    }

    /// Moves the clock to `offset` from the true time, in libfaketime's
    /// relative form (`+10m`, `-10m`, `+0`); processes see it within a
    /// second.
    pub fn set(&self, offset: &str) {
        // Replaced whole, so that a process never reads half a line.
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).expect("writing the clock offset");
        std::fs::rename(&tmp, &self.file).expect("replacing the clock offset");
    }
}
