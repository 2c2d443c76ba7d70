//! The caskade engine's phases: the `never`-durability load followed by
//! random gets, start-up with and without hint files, and concurrent
//! `always`-durability writers (group commit).
//!
//! Every put carries a strictly increasing version, so none is refused as
//! stale; a `Stale` outcome is reported as a benchmark failure, not counted.
//! Merge is off throughout so no background work skews a phase.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use caskade_common::Version;
use caskade_node::engine::{
    Durability, Engine, FaultPoint, MergeOptions, Options, PutOptions, WriteOutcome,
};

use crate::alloc;
use crate::measure::{self, Throughput};
use crate::workload::{VALUE_LEN, Workload};

/// Node id stamped into every benchmark version.
const ORIGIN: u32 = 1;

/// What the `never` load and the reads after it measured.
#[derive(Debug)]
pub struct Live {
    /// Single-thread puts.
    pub puts: Throughput,
    /// Random gets with 1 and with 2 threads.
    pub gets: [Throughput; 2],
    /// Heap bytes held by the engine after the load, per key.
    pub bytes_per_key: f64,
}

/// Start-up of the loaded store.
#[derive(Debug)]
pub struct Startup {
    /// Best open time with hint files.
    pub hinted: Duration,
    /// Best open time with every `*.hint` file deleted.
    pub scanned: Duration,
    /// Heap bytes per key held after a hinted open.
    pub hinted_bytes_per_key: f64,
    /// Heap bytes per key held after a scanning open.
    pub scanned_bytes_per_key: f64,
    /// Hint files found after the load was closed.
    pub hint_files: usize,
    /// Data files in the store.
    pub data_files: usize,
}

/// One `always`-durability run.
#[derive(Debug)]
pub struct AlwaysRun {
    /// Concurrent writer threads.
    pub writers: usize,
    /// Puts acknowledged (each one durable) in the measured time.
    pub puts: Throughput,
    /// fsyncs of the active file, as counted at the engine's `Fsync` fault point.
    pub fsyncs: u64,
}

fn options(durability: Durability) -> Options {
    Options {
        durability,
        merge: MergeOptions {
            auto: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    }
}

fn put_options(seq: u64) -> PutOptions {
    PutOptions {
        version: Version::new(seq, ORIGIN),
        ..PutOptions::default()
    }
}

fn applied(outcome: WriteOutcome) -> anyhow::Result<()> {
    match outcome {
        WriteOutcome::Applied { .. } => Ok(()),
        WriteOutcome::Stale { current } => bail!("put refused as stale (stored version {current})"),
    }
}

fn gets(
    engine: &Engine,
    workload: &Workload,
    order: &[u32],
    threads: usize,
) -> anyhow::Result<Throughput> {
    measure::parallel_gets(threads, order, || {
        Ok(|i: usize| {
            let value = engine.get(workload.key(i))?;
            workload.check(i, value.as_ref().map(|v| v.value.as_slice()))
        })
    })
}

/// Loads every key with `never` durability into a new store at `dir`, reads
/// them all back at random, and closes the store (writing its hint files).
pub fn load(dir: &Path, workload: &Workload, order: &[u32]) -> anyhow::Result<Live> {
    let before = alloc::allocated();
    let engine = Engine::open(dir, options(Durability::Never)).context("opening caskade")?;
    let puts = measure::sequential_puts(workload, |i, key, value| {
        applied(engine.put(key, value, put_options(i as u64 + 1))?)
    })?;
    // Hint files of the sealed data files are written by the engine's
    // background thread, which holds a sorted run in memory meanwhile: that
    // is not keydir memory, so let it finish before measuring.
    wait_for_hints(dir)?;
    let bytes_per_key = alloc::per_key_since(before, workload.len());
    let keys = engine.stats().keys;
    ensure!(
        keys == workload.len() as u64,
        "caskade holds {keys} keys after the load"
    );
    let gets = [
        gets(&engine, workload, order, 1)?,
        gets(&engine, workload, order, 2)?,
    ];
    engine.close().context("closing caskade")?;
    Ok(Live {
        puts,
        gets,
        bytes_per_key,
    })
}

/// Polls until every data file but the newest (the active one) has its
/// hint file, for at most a minute.
fn wait_for_hints(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut data = count_files(dir, "data")?;
        data.sort();
        data.pop();
        if data.iter().all(|d| d.with_extension("hint").exists()) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "hint files not written within a minute"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn count_files(dir: &Path, extension: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == extension) {
            found.push(path);
        }
    }
    Ok(found)
}

/// Opens the store, returning how long it took and the heap bytes per key it holds.
fn timed_open(dir: &Path, keys: usize) -> anyhow::Result<(Duration, f64)> {
    let before = alloc::allocated();
    let start = Instant::now();
    let engine = Engine::open(dir, options(Durability::Never)).context("reopening caskade")?;
    let took = start.elapsed();
    let bytes_per_key = alloc::per_key_since(before, keys);
    let held = engine.stats().keys;
    ensure!(
        held == keys as u64,
        "reopened store holds {held} of {keys} keys"
    );
    engine.close()?;
    Ok((took, bytes_per_key))
}

/// Times opening the loaded store at `dir`, `rounds` times with its hint
/// files and `rounds` times with all of them deleted first; keeps the best.
/// The page cache is warm for both, so the gap is parse work, not disk reads.
pub fn startup(dir: &Path, keys: usize, rounds: usize) -> anyhow::Result<Startup> {
    let hint_files = count_files(dir, "hint")?.len();
    let data_files = count_files(dir, "data")?.len();
    let mut hinted = (Duration::MAX, 0.0);
    for _ in 0..rounds {
        let (took, bytes) = timed_open(dir, keys)?;
        hinted = (hinted.0.min(took), bytes);
    }
    let mut scanned = (Duration::MAX, 0.0);
    for _ in 0..rounds {
        // close() writes hint files again, so delete them before every round.
        for hint in count_files(dir, "hint")? {
            fs::remove_file(&hint).with_context(|| format!("deleting {}", hint.display()))?;
        }
        let (took, bytes) = timed_open(dir, keys)?;
        scanned = (scanned.0.min(took), bytes);
    }
    Ok(Startup {
        hinted: hinted.0,
        scanned: scanned.0,
        hinted_bytes_per_key: hinted.1,
        scanned_bytes_per_key: scanned.1,
        hint_files,
        data_files,
    })
}

/// `writers` threads share one `always` store at `dir` and put distinct keys
/// until `max_ops` puts are done or `max_time` has passed, whichever is first.
pub fn always(
    dir: &Path,
    workload: &Workload,
    writers: usize,
    max_ops: u64,
    max_time: Duration,
) -> anyhow::Result<AlwaysRun> {
    let fsyncs = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&fsyncs);
    let mut opts = options(Durability::Always);
    opts.fault_hook = Some(Arc::new(move |point: FaultPoint| {
        if point == FaultPoint::Fsync {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }));
    let engine = Arc::new(Engine::open(dir, opts).context("opening caskade (always)")?);
    let max_ops = max_ops.min(workload.len() as u64);
    // Hands out key indexes; index i is written with version i + 1, and no
    // index is handed out twice, so no put can be stale.
    let next = Arc::new(AtomicU64::new(0));
    let fsyncs_before = fsyncs.load(Ordering::Relaxed);
    let start = Instant::now();
    let done = thread::scope(|scope| {
        let threads: Vec<_> = (0..writers)
            .map(|_| {
                let engine = Arc::clone(&engine);
                let next = Arc::clone(&next);
                scope.spawn(move || -> anyhow::Result<u64> {
                    let mut value = [0; VALUE_LEN];
                    let mut done = 0;
                    while start.elapsed() < max_time {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= max_ops {
                            break;
                        }
                        let i = i as usize;
                        workload.value_into(i, &mut value);
                        applied(engine.put(workload.key(i), &value, put_options(i as u64 + 1))?)?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        threads.into_iter().try_fold(0, |sum, t| {
            let done = t
                .join()
                .map_err(|_| anyhow!("a writer thread panicked"))??;
            anyhow::Ok(sum + done)
        })
    })?;
    let elapsed = start.elapsed();
    let fsyncs = fsyncs.load(Ordering::Relaxed) - fsyncs_before;
    let engine = Arc::into_inner(engine).context("writer threads still hold the engine")?;
    engine.close()?;
    Ok(AlwaysRun {
        writers,
        puts: Throughput { ops: done, elapsed },
        fsyncs,
    })
}
