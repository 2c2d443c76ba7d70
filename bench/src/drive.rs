//! The closed-loop load driver of the network benchmarks: `streams` tasks
//! share one cursor over the operations (a fixed number of them, or as many
//! as fit in a span of time), each task issuing one request at a time and
//! timing it on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::measure::Throughput;

/// Throughput and latency (microseconds) of one phase.
#[derive(Debug)]
pub struct Phase {
    /// Operations and wall-clock time.
    pub throughput: Throughput,
    /// Latency of each operation, microseconds.
    pub latency: Histogram<u64>,
}

impl Phase {
    /// Latency at quantile `q`.
    pub fn at(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }
}

/// When the tasks stop taking operations.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// After operation `total - 1`.
    Ops(usize),
    /// At this instant; operations already sent are finished and counted.
    Until(Instant),
}

impl Bound {
    fn reached(self, n: usize) -> bool {
        match self {
            Bound::Ops(total) => n >= total,
            Bound::Until(deadline) => Instant::now() >= deadline,
        }
    }
}

/// Runs `op(n)` for every `n` in `0..total` from `streams` concurrent tasks.
pub async fn drive<F, Fut>(streams: usize, total: usize, op: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    run(streams, Bound::Ops(total), op).await
}

/// Runs `op(0)`, `op(1)`, … from `streams` concurrent tasks until `duration`
/// has passed; the phase counts the operations completed.
pub async fn drive_for<F, Fut>(streams: usize, duration: Duration, op: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    run(streams, Bound::Until(Instant::now() + duration), op).await
}

async fn run<F, Fut>(streams: usize, bound: Bound, op: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (next, op) = (Arc::clone(&next), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3)?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if bound.reached(n) {
                    break;
                }
                let sent = Instant::now();
                op(n).await?;
                latency.record(sent.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(latency)
        }));
    }
    let mut latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    Ok(Phase {
        throughput: Throughput {
            ops: latency.len(),
            elapsed: started.elapsed(),
        },
        latency,
    })
}
