//! caskade-bench: measures caskade's Bitcask engine against a naive
//! append-only log and (with `--features peers`) against fjall and redb, and
//! prints one table of the results with a verdict per performance target.
//!
//! This file owns the flags and the order of the phases; each phase lives in
//! its own module. All data goes to one temporary directory that is deleted
//! at exit. Every fsync-heavy phase is bounded by a count and a time.
//!
//! Run: `cargo run --release -p caskade-bench --features peers -- [--keys N] [--dir PATH] [--seed N]`
//! (progress goes to stderr, the table to stdout).

mod alloc;
mod caskade;
mod naive;
#[cfg(feature = "peers")]
mod peers;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use caskade_bench::{measure, workload};
use clap::Parser;

use crate::naive::{Flush, NaiveLog};
use crate::report::Results;
use crate::workload::Workload;

/// Benchmark caskade's storage engine.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Number of keys (16 B keys, 100 B values).
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Directory to create the temporary data directory in (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the keys, values and read order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Time bound, in seconds, of each `always`-durability phase.
    #[arg(long, default_value_t = 3.0)]
    always_secs: f64,
}

/// Writer counts of the `always` phases.
const ALWAYS_WRITERS: [usize; 3] = [1, 16, 64];
/// Opens per start-up variant; the best one is reported.
const OPEN_ROUNDS: usize = 3;

/// Prints a progress line with the time since the run began.
fn progress(began: Instant, what: &str) {
    eprintln!("[{:>7.1} s] {what}", began.elapsed().as_secs_f64());
}

fn naive_phase(
    root: &Path,
    workload: &Workload,
    order: &[u32],
    began: Instant,
) -> anyhow::Result<(
    measure::Throughput,
    measure::Throughput,
    [measure::Throughput; 2],
    f64,
)> {
    let mut buffered = NaiveLog::create(&root.join("naive-buffered.log"), Flush::Buffered)?;
    let buffered_puts = measure::sequential_puts(workload, |_, k, v| buffered.put(k, v))?;
    let flush_start = Instant::now();
    buffered.flush()?;
    let buffered_puts = measure::Throughput {
        ops: buffered_puts.ops,
        elapsed: buffered_puts.elapsed + flush_start.elapsed(),
    };
    drop(buffered);
    fs::remove_file(root.join("naive-buffered.log"))?;
    progress(
        began,
        &format!("naive BufWriter puts: {:.0} ops/s", buffered_puts.per_sec()),
    );

    let before = alloc::allocated();
    let mut log = NaiveLog::create(&root.join("naive.log"), Flush::PerPut)?;
    let puts = measure::sequential_puts(workload, |_, k, v| log.put(k, v))?;
    let bytes_per_key = alloc::per_key_since(before, workload.len());
    progress(
        began,
        &format!("naive write_all-per-put puts: {:.0} ops/s", puts.per_sec()),
    );
    let mut gets = [puts; 2];
    for (slot, threads) in gets.iter_mut().zip([1, 2]) {
        *slot = measure::parallel_gets(threads, order, || {
            Ok(|i: usize| workload.check(i, log.get(workload.key(i))?.as_deref()))
        })?;
        progress(
            began,
            &format!(
                "naive gets, {threads} thread(s): {:.0} ops/s",
                slot.per_sec()
            ),
        );
    }
    drop(log);
    fs::remove_file(root.join("naive.log"))?;
    Ok((puts, buffered_puts, gets, bytes_per_key))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.keys > 0 && args.keys < u32::MAX as usize,
        "--keys must be in 1..2^32-1"
    );
    ensure!(args.always_secs > 0.0, "--always-secs must be positive");
    let phase_time = Duration::from_secs_f64(args.always_secs);
    let mut temp = tempfile::Builder::new();
    temp.prefix("caskade-bench-");
    let root = match &args.dir {
        Some(dir) => temp.tempdir_in(dir),
        None => temp.tempdir(),
    }
    .context("creating the temporary data directory")?;
    let began = Instant::now();
    progress(
        began,
        &format!("generating {} keys in {}", args.keys, root.path().display()),
    );
    let workload = Workload::new(args.keys, args.seed);
    let order = workload.read_order();

    let (naive_per_put, naive_buffered, naive_gets, naive_bytes_per_key) =
        naive_phase(root.path(), &workload, &order, began)?;

    let store = root.path().join("caskade-never");
    let live = caskade::load(&store, &workload, &order)?;
    progress(
        began,
        &format!(
            "caskade never: {:.0} puts/s, gets {:.0}/s (1 thread) {:.0}/s (2 threads)",
            live.puts.per_sec(),
            live.gets[0].per_sec(),
            live.gets[1].per_sec()
        ),
    );
    let startup = caskade::startup(&store, args.keys, OPEN_ROUNDS)?;
    progress(
        began,
        &format!(
            "caskade open: hints {:?}, scan {:?}",
            startup.hinted, startup.scanned
        ),
    );
    fs::remove_dir_all(&store)?;

    let mut always = Vec::new();
    for writers in ALWAYS_WRITERS {
        let dir = root.path().join(format!("caskade-always-{writers}"));
        let run = caskade::always(&dir, &workload, writers, args.keys as u64, phase_time)?;
        progress(
            began,
            &format!(
                "caskade always, {writers} writer(s): {:.0} puts/s, {} fsyncs",
                run.puts.per_sec(),
                run.fsyncs
            ),
        );
        always.push(run);
        fs::remove_dir_all(&dir)?;
    }

    let peers = run_peers(root.path(), &workload, &order, began)?;

    let results = Results {
        keys: args.keys,
        seed: args.seed,
        dir: root.path().to_path_buf(),
        phase_time,
        naive_per_put,
        naive_buffered,
        naive_gets,
        naive_bytes_per_key,
        live,
        startup,
        always,
        peers,
    };
    progress(began, "done");
    println!("{}", report::render(&results));
    root.close()
        .context("deleting the temporary data directory")?;
    Ok(())
}

#[cfg(feature = "peers")]
fn run_peers(
    root: &Path,
    workload: &Workload,
    order: &[u32],
    began: Instant,
) -> anyhow::Result<Option<Vec<report::PeerRun>>> {
    type PeerFn = fn(&Path, &Workload, &[u32]) -> anyhow::Result<report::PeerRun>;
    let mut runs = Vec::new();
    for (name, run) in [("fjall", peers::fjall as PeerFn), ("redb", peers::redb)] {
        let dir = root.join(name);
        fs::create_dir(&dir)?;
        let result = run(&dir, workload, order)?;
        progress(
            began,
            &format!(
                "{name}: {:.0} puts/s, gets {:.0}/s (1 thread) {:.0}/s (2 threads)",
                result.puts.per_sec(),
                result.gets[0].per_sec(),
                result.gets[1].per_sec()
            ),
        );
        runs.push(result);
        fs::remove_dir_all(&dir)?;
    }
    Ok(Some(runs))
}

#[cfg(not(feature = "peers"))]
fn run_peers(
    _: &Path,
    _: &Workload,
    _: &[u32],
    began: Instant,
) -> anyhow::Result<Option<Vec<report::PeerRun>>> {
    progress(
        began,
        "peer comparison skipped: build with --features peers for fjall and redb",
    );
    Ok(None)
}
