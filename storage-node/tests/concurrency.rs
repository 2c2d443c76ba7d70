//! Concurrency: readers (get, scan, iter_since) running against writers,
//! rotation and a merge loop only ever see values that were really written
//! for the key they asked for, never older than what was acknowledged before
//! the read began and never going back in time; concurrent last-writer-wins
//! puts keep the highest version; and compare-and-set through
//! `Condition::IfVersion` loses no update.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use caskade_common::Version;
use caskade_node::engine::{
    Condition, DeleteOptions, Engine, EngineError, MergeOptions, Options, PutOptions, WriteOutcome,
};
use common::{MockClock, T0, test_options};

const WRITERS: usize = 2;
const KEYS_PER_WRITER: usize = 12;
const WRITES_PER_WRITER: u64 = 1_200;
const READERS: usize = 2;
const FILE_SIZE: u64 = 16 * 1024;

fn key_name(writer: usize, k: usize) -> String {
    format!("w{writer}-key{k:02}")
}

/// Write number `n` (from 1) of a key: every fifth is a delete.
fn is_delete(n: u64) -> bool {
    n % 5 == 4
}

/// The value of write `n` of `key`: names both, with a length that varies up
/// to several KiB so the active file rotates often.
fn value_of(key: &str, n: u64) -> Vec<u8> {
    let mut value = format!("{key}#{n}#").into_bytes();
    let len = value.len() + ((n * 397) % 3000) as usize;
    let mut fill = n;
    while value.len() < len {
        fill = fill
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        value.push(b'a' + (fill >> 59) as u8);
    }
    value
}

fn version_of(n: u64) -> Version {
    Version::new(Version::from_parts(T0, 0, 1).hlc + n, 1)
}

fn n_of(version: Version) -> u64 {
    version.hlc - Version::from_parts(T0, 0, 1).hlc
}

/// Per key: the latest write number started (`issued`) and acknowledged (`acked`).
struct Progress {
    names: Vec<String>,
    issued: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
}

impl Progress {
    fn index(&self, key: &[u8]) -> usize {
        self.names
            .iter()
            .position(|n| n.as_bytes() == key)
            .unwrap_or_else(|| {
                panic!(
                    "engine returned unknown key {:?}",
                    String::from_utf8_lossy(key)
                )
            })
    }

    /// A read that began after write `lo` was acknowledged and ended before
    /// any write past `hi` began saw the key absent: valid only if nothing
    /// was acknowledged yet or a delete falls in `[lo, hi]`.
    fn absent_is_valid(lo: u64, hi: u64) -> bool {
        lo == 0 || (lo..=hi).any(is_delete)
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn writer(engine: &Engine, progress: &Progress, w: usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
    let mut next = [1u64; KEYS_PER_WRITER];
    for _ in 0..WRITES_PER_WRITER {
        let k = rng.below(KEYS_PER_WRITER);
        let i = w * KEYS_PER_WRITER + k;
        let n = next[k];
        next[k] += 1;
        let key = &progress.names[i];
        progress.issued[i].store(n, Ordering::SeqCst);
        let outcome = if is_delete(n) {
            let opts = DeleteOptions {
                version: version_of(n),
                condition: Condition::None,
            };
            engine.delete(key.as_bytes(), opts)
        } else {
            let opts = PutOptions {
                version: version_of(n),
                ..Default::default()
            };
            engine.put(key.as_bytes(), &value_of(key, n), opts)
        };
        match outcome {
            Ok(WriteOutcome::Applied { .. }) => {}
            other => panic!("{key} write {n}: {other:?}"),
        }
        progress.acked[i].store(n, Ordering::SeqCst);
    }
}

/// Checks one observed value (or absence) of key `i` against the window `[lo, hi]`.
fn check_observation(
    progress: &Progress,
    i: usize,
    seen: Option<Version>,
    value: Option<&[u8]>,
    lo: u64,
    hi: u64,
) {
    let key = &progress.names[i];
    match seen {
        Some(version) => {
            let n = n_of(version);
            assert!(
                (lo..=hi).contains(&n) && !is_delete(n),
                "{key}: saw write {n}, expected a put in [{lo}, {hi}]"
            );
            if let Some(value) = value {
                assert!(
                    value == value_of(key, n),
                    "{key}: value is not the one written by write {n}"
                );
            }
        }
        None => assert!(
            Progress::absent_is_valid(lo, hi),
            "{key}: absent, but acked write {lo} is a put and no delete came by {hi}"
        ),
    }
}

fn get_reader(engine: &Engine, progress: &Progress, done: &AtomicBool, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut newest_seen = vec![0u64; progress.names.len()];
    let mut reads = 0;
    while !done.load(Ordering::SeqCst) {
        let i = rng.below(progress.names.len());
        let lo = progress.acked[i].load(Ordering::SeqCst);
        let got = engine.get(progress.names[i].as_bytes()).unwrap();
        let hi = progress.issued[i].load(Ordering::SeqCst);
        check_observation(
            progress,
            i,
            got.as_ref().map(|v| v.version),
            got.as_ref().map(|v| &v.value[..]),
            lo,
            hi,
        );
        if let Some(v) = got {
            let n = n_of(v.version);
            assert!(
                n >= newest_seen[i],
                "{}: read write {n} after having read {}",
                progress.names[i],
                newest_seen[i]
            );
            newest_seen[i] = n;
        }
        reads += 1;
    }
    reads
}

fn scan_reader(engine: &Engine, progress: &Progress, done: &AtomicBool) -> u64 {
    let mut scans = 0;
    while !done.load(Ordering::SeqCst) {
        let lo: Vec<u64> = progress
            .acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        // Pages of 5, to exercise `after` while files change underneath.
        let mut entries = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(b"w", after.as_deref(), 5).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            entries.extend(page);
        }
        let hi: Vec<u64> = progress
            .issued
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        assert!(
            entries.windows(2).all(|w| w[0].key < w[1].key),
            "scan not strictly ascending"
        );
        let mut seen = vec![None; progress.names.len()];
        for entry in &entries {
            seen[progress.index(&entry.key)] = Some(entry.version);
        }
        for (i, version) in seen.into_iter().enumerate() {
            check_observation(progress, i, version, None, lo[i], hi[i]);
        }
        // Catch-up iteration: ascending seq, every value is one really written for its key.
        let mut last: Option<(u64, Vec<u8>)> = None;
        for record in engine.iter_since(0).unwrap() {
            let record = record.unwrap();
            if let Some((seq, key)) = &last {
                assert!(
                    record.seq > *seq,
                    "iter_since not in ascending seq order: seq {seq} (key {}) then seq {} (key {})",
                    String::from_utf8_lossy(key),
                    record.seq,
                    String::from_utf8_lossy(&record.key),
                );
            }
            last = Some((record.seq, record.key.clone()));
            let i = progress.index(&record.key);
            let n = n_of(record.version);
            match &record.value {
                Some(value) => assert!(
                    !is_delete(n) && *value == value_of(&progress.names[i], n),
                    "{}: bad record for write {n}",
                    progress.names[i]
                ),
                None => assert!(
                    is_delete(n),
                    "{}: tombstone with the version of put {n}",
                    progress.names[i]
                ),
            }
        }
        scans += 1;
    }
    scans
}

fn merger(engine: &Engine, done: &AtomicBool) -> u64 {
    let mut merges = 0;
    let mut partial = false;
    while !done.load(Ordering::SeqCst) {
        let result = if partial {
            let ids: Vec<u32> = engine
                .files()
                .iter()
                .filter(|f| !f.active)
                .map(|f| f.id)
                .step_by(2)
                .collect();
            if ids.is_empty() {
                Ok(Default::default())
            } else {
                engine.merge_files(&ids)
            }
        } else {
            engine.merge()
        };
        partial = !partial;
        match result {
            Ok(report) => merges += u64::from(report.input_files > 0),
            Err(EngineError::MergeUnavailable(_)) => {}
            // The background merge took the file between `files()` and our call.
            Err(EngineError::NotMergeable { id }) if !engine.files().iter().any(|f| f.id == id) => {
            }
            Err(e) => panic!("merge failed: {e}"),
        }
    }
    merges
}

#[test]
fn readers_see_only_written_values_while_writers_rotate_and_merges_run() {
    let clock = MockClock::new(T0);
    run_readers_against_writers(&clock, test_options(&clock, FILE_SIZE));
}

#[test]
fn readers_see_only_written_values_while_background_merges_also_run() {
    let clock = MockClock::new(T0);
    let mut options = test_options(&clock, FILE_SIZE);
    options.merge = MergeOptions {
        auto: true,
        dead_ratio: 0.3,
        min_dead_bytes: 4096,
        check_interval: Duration::from_millis(2),
        ..options.merge
    };
    run_readers_against_writers(&clock, options);
}

/// Writers, get and scan readers and a merge loop, all at once; then the
/// final state must match the last acknowledged write of every key, also
/// after a merge and a reopen.
fn run_readers_against_writers(clock: &MockClock, options: Options) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let names: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..KEYS_PER_WRITER).map(move |k| key_name(w, k)))
        .collect();
    let progress = Arc::new(Progress {
        issued: names.iter().map(|_| AtomicU64::new(0)).collect(),
        acked: names.iter().map(|_| AtomicU64::new(0)).collect(),
        names,
    });
    let done = Arc::new(AtomicBool::new(false));

    thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                s.spawn({
                    let (engine, progress) = (&engine, &progress);
                    move || writer(engine, progress, w)
                })
            })
            .collect();
        let getters: Vec<_> = (0..READERS)
            .map(|r| {
                s.spawn({
                    let (engine, progress, done) = (&engine, &progress, &done);
                    move || get_reader(engine, progress, done, 0x1234_5678 + r as u64)
                })
            })
            .collect();
        let scanner = s.spawn(|| scan_reader(&engine, &progress, &done));
        let merges = s.spawn(|| merger(&engine, &done));
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        for g in getters {
            g.join().unwrap();
        }
        scanner.join().unwrap();
        merges.join().unwrap();
    });

    let final_state = |engine: &Engine, context: &str| {
        for (i, key) in progress.names.iter().enumerate() {
            let n = progress.acked[i].load(Ordering::SeqCst);
            let got = engine.get(key.as_bytes()).unwrap();
            if n == 0 || is_delete(n) {
                assert_eq!(got, None, "{context}: {key}");
            } else {
                let got = got.unwrap_or_else(|| panic!("{context}: {key} lost write {n}"));
                assert_eq!(
                    (n_of(got.version), got.value),
                    (n, value_of(key, n)),
                    "{context}: {key}"
                );
            }
        }
    };
    final_state(&engine, "after the run");
    engine.merge().unwrap();
    final_state(&engine, "after a final merge");
    let engine = Arc::into_inner(engine).unwrap();
    engine.close().unwrap();
    let engine = Engine::open(dir.path(), test_options(clock, FILE_SIZE)).unwrap();
    final_state(&engine, "after reopen");
}

#[test]
fn concurrent_puts_to_one_key_keep_the_highest_version() {
    const THREADS: u64 = 4;
    const PUTS: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    // Each thread puts versions interleaved with the others', so writes arrive
    // out of version order and some must come back Stale.
    thread::scope(|s| {
        for t in 0..THREADS {
            let engine = &engine;
            s.spawn(move || {
                for i in 0..PUTS {
                    let n = 1 + if (i + t) % 2 == 0 {
                        i * THREADS + t
                    } else {
                        (PUTS - i) * THREADS + t
                    };
                    let opts = PutOptions {
                        version: version_of(n),
                        ..Default::default()
                    };
                    match engine.put(b"hot", format!("{n}").as_bytes(), opts).unwrap() {
                        WriteOutcome::Applied { previous, .. } => {
                            assert!(
                                previous.is_none_or(|p| p < version_of(n)),
                                "applied {n} over {previous:?}"
                            );
                        }
                        WriteOutcome::Stale { current } => {
                            assert!(
                                current > version_of(n),
                                "write {n} called stale against {current:?}"
                            );
                        }
                    }
                }
            });
        }
    });
    let highest = (0..THREADS)
        .flat_map(|t| {
            (0..PUTS).map(move |i| {
                1 + if (i + t) % 2 == 0 {
                    i * THREADS + t
                } else {
                    (PUTS - i) * THREADS + t
                }
            })
        })
        .max()
        .unwrap();
    let got = engine.get(b"hot").unwrap().unwrap();
    assert_eq!(got.version, version_of(highest));
    assert_eq!(got.value, format!("{highest}").into_bytes());
}

#[test]
fn compare_and_set_increments_lose_no_update() {
    const THREADS: usize = 4;
    const INCREMENTS: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    let next_version = AtomicU64::new(1);
    let opts = PutOptions {
        version: version_of(next_version.fetch_add(1, Ordering::SeqCst)),
        ..Default::default()
    };
    engine.put(b"counter", b"0", opts).unwrap();

    let failures: Vec<HashMap<&str, u64>> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (engine, next_version) = (&engine, &next_version);
                s.spawn(move || {
                    let mut outcomes = HashMap::new();
                    let mut done = 0;
                    while done < INCREMENTS {
                        let current = engine.get(b"counter").unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&current.value)
                            .unwrap()
                            .parse()
                            .unwrap();
                        let opts = PutOptions {
                            version: version_of(next_version.fetch_add(1, Ordering::SeqCst)),
                            expires_at: None,
                            condition: Condition::IfVersion(current.version),
                        };
                        match engine.put(b"counter", format!("{}", n + 1).as_bytes(), opts) {
                            Ok(WriteOutcome::Applied { previous, .. }) => {
                                assert_eq!(
                                    previous,
                                    Some(current.version),
                                    "CAS replaced a version it did not check"
                                );
                                done += 1;
                            }
                            Ok(WriteOutcome::Stale { .. }) => {
                                *outcomes.entry("stale").or_default() += 1
                            }
                            Err(EngineError::ConditionFailed { .. }) => {
                                *outcomes.entry("condition").or_default() += 1
                            }
                            Err(e) => panic!("CAS failed: {e}"),
                        }
                    }
                    outcomes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let got = engine.get(b"counter").unwrap().unwrap();
    assert_eq!(
        got.value,
        format!("{}", THREADS as u64 * INCREMENTS).into_bytes(),
        "lost updates (retries per thread: {failures:?})"
    );
}

#[test]
fn iter_since_yields_each_latest_record_once_while_merges_swap_files() {
    const KEYS: u64 = 150;
    const MERGES: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, 4096)).unwrap();
    for n in 1..=KEYS {
        let key = format!("k{n:03}");
        let opts = PutOptions {
            version: version_of(n),
            ..Default::default()
        };
        engine.put(key.as_bytes(), &[b'v'; 300], opts).unwrap();
    }
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..MERGES {
                engine.merge().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        s.spawn(|| {
            // No writes run: every pass must yield exactly one record per key.
            while !done.load(Ordering::SeqCst) {
                let seqs: Vec<u64> = engine
                    .iter_since(0)
                    .unwrap()
                    .map(|r| r.unwrap().seq)
                    .collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() as u64 == KEYS,
                    "iter_since(0) during a merge yielded {} records for {KEYS} keys \
                     (first repeated seqs: {:?})",
                    seqs.len(),
                    seqs.windows(2)
                        .filter(|w| w[0] >= w[1])
                        .map(|w| w[1])
                        .take(10)
                        .collect::<Vec<_>>()
                );
            }
        });
    });
}
