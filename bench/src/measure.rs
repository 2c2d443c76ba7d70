//! How throughput is measured: the timed put and get loops shared by every
//! engine, so that caskade, the naive baseline and the peers run exactly the
//! same key sequence with the same per-operation checks.
//!
//! The loops own only timing and key order; what an operation does is the
//! caller's closure. They never sleep and never print.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::workload::{VALUE_LEN, Workload};

/// Operations completed in a measured span of wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Operations completed.
    pub ops: u64,
    /// Wall-clock time they took.
    pub elapsed: Duration,
}

impl Throughput {
    /// Operations per second.
    pub fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Puts every key once, in workload order, on the calling thread.
/// `put(i, key, value)` stores the `i`th pair.
pub fn sequential_puts(
    workload: &Workload,
    mut put: impl FnMut(usize, &[u8], &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Throughput> {
    let mut value = [0; VALUE_LEN];
    let start = Instant::now();
    for i in 0..workload.len() {
        workload.value_into(i, &mut value);
        put(i, workload.key(i), &value)?;
    }
    Ok(Throughput {
        ops: workload.len() as u64,
        elapsed: start.elapsed(),
    })
}

/// Reads every key in `order` once, spread over `threads` threads (thread
/// `t` takes positions `t, t + threads, …`). Each thread first builds its own
/// reader with `make_reader` (a read transaction, say); `reader(i)` must read
/// and check key `i`.
pub fn parallel_gets<M, R>(
    threads: usize,
    order: &[u32],
    make_reader: M,
) -> anyhow::Result<Throughput>
where
    M: Fn() -> anyhow::Result<R> + Sync,
    R: FnMut(usize) -> anyhow::Result<()>,
{
    let start = Instant::now();
    let ops = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let make_reader = &make_reader;
                scope.spawn(move || -> anyhow::Result<u64> {
                    let mut read = make_reader()?;
                    let mut done = 0;
                    for &i in order.iter().skip(t).step_by(threads) {
                        read(i as usize)?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        workers.into_iter().try_fold(0, |sum, worker| {
            let done = worker
                .join()
                .map_err(|_| anyhow!("a reader thread panicked"))??;
            anyhow::Ok(sum + done)
        })
    })?;
    Ok(Throughput {
        ops,
        elapsed: start.elapsed(),
    })
}
