//! What this whole process spends, read from Linux's /proc/self: CPU time
//! (`utime` + `stime` of /proc/self/stat) and I/O counters
//! (/proc/self/io). Take a [`Usage`] before and after a window; the
//! difference is a [`Spent`]. Nodes run in the process are included, and so
//! is the benchmark itself.
//!
//! `rchar` and `wchar` count bytes through read and write system calls,
//! page-cache hits and some loopback socket traffic included, but not
//! reads of memory-mapped files; `read_bytes` and `write_bytes` count what
//! reached the block layer (no reads when the page cache holds the data).

use std::time::{Duration, Instant};

use anyhow::Context;

/// Units of `utime` and `stime` in /proc/self/stat: Linux's USER_HZ, 100
/// on every architecture caskade builds for.
const CLOCK_TICKS: u64 = 100;

/// Counters of /proc/self/io, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Bytes read through system calls.
    pub rchar: u64,
    /// Bytes written through system calls.
    pub wchar: u64,
    /// Bytes read from the block layer.
    pub read_bytes: u64,
    /// Bytes sent to the block layer.
    pub write_bytes: u64,
}

/// What this process spent over a window.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    /// Wall-clock time.
    pub wall: Duration,
    /// CPU time, user and system, of all threads (10 ms resolution).
    pub cpu: Duration,
    /// I/O counted in the window.
    pub io: Io,
}

/// A reading of this process's clock, CPU time and I/O counters.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    at: Instant,
    cpu: Duration,
    io: Io,
}

impl Usage {
    /// Reads the counters now.
    pub fn now() -> anyhow::Result<Usage> {
        let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
        // The command name, in parentheses, may hold spaces: count after it.
        // Its closing parenthesis ends field 2; utime and stime are 14 and 15.
        let (_, fields) = stat.rsplit_once(')').context("no ')' in /proc/self/stat")?;
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let ticks = |field: usize| -> anyhow::Result<u64> {
            let text = fields.get(field - 3).context("/proc/self/stat is short")?;
            text.parse().context("a field of /proc/self/stat")
        };
        let cpu = Duration::from_millis((ticks(14)? + ticks(15)?) * 1000 / CLOCK_TICKS);
        let text = std::fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
        let counter = |name: &str| -> anyhow::Result<u64> {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .with_context(|| format!("no {name} in /proc/self/io"))?;
            line.trim().parse().context("a counter of /proc/self/io")
        };
        let io = Io {
            rchar: counter("rchar")?,
            wchar: counter("wchar")?,
            read_bytes: counter("read_bytes")?,
            write_bytes: counter("write_bytes")?,
        };
        Ok(Usage {
            at: Instant::now(),
            cpu,
            io,
        })
    }

    /// What was spent between `earlier` and this reading.
    pub fn since(&self, earlier: &Usage) -> Spent {
        Spent {
            wall: self.at - earlier.at,
            cpu: self.cpu.saturating_sub(earlier.cpu),
            io: Io {
                rchar: self.io.rchar.saturating_sub(earlier.io.rchar),
                wchar: self.io.wchar.saturating_sub(earlier.io.wchar),
                read_bytes: self.io.read_bytes.saturating_sub(earlier.io.read_bytes),
                write_bytes: self.io.write_bytes.saturating_sub(earlier.io.write_bytes),
            },
        }
    }
}
