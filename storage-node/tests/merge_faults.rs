//! Crash inside a merge: for each of the five merge fault points, and for a
//! full and a partial merge, a store holding overwrites, deletes and expired
//! values across several files is merged with a fault at that point, the
//! engine is dropped without close, and the reopened store must hold exactly
//! what the model says, before and after a later, successful merge and reopen.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use caskade_common::Version;
use caskade_node::engine::{
    DeleteOptions, Engine, FaultHook, FaultPoint, Options, PutOptions, WriteOutcome,
};
use common::{MockClock, RETENTION_MS, T0, test_options};

const MERGE_POINTS: [FaultPoint; 5] = [
    FaultPoint::MergeOutputWritten,
    FaultPoint::MergeCommitted,
    FaultPoint::MergeRenamed,
    FaultPoint::MergeSwapped,
    FaultPoint::MergeInputsDeleted,
];
const FILE_SIZE: u64 = 4096;

/// Latest write per key: value (None = deleted), version, expiry.
type Model = BTreeMap<String, (Option<Vec<u8>>, Version, Option<u64>)>;

struct Writer {
    hlc: u64,
    model: Model,
}

impl Writer {
    fn version(&mut self, clock: &MockClock) -> Version {
        self.hlc = (Version::from_parts(clock.now(), 0, 1).hlc).max(self.hlc + 1);
        Version::new(self.hlc, 1)
    }

    fn put(
        &mut self,
        engine: &Engine,
        clock: &MockClock,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
    ) {
        let version = self.version(clock);
        let expires_at = ttl.map(|t| clock.now() + t);
        let opts = PutOptions {
            version,
            expires_at,
            ..Default::default()
        };
        let outcome = engine.put(key.as_bytes(), &value, opts).unwrap();
        assert!(
            matches!(outcome, WriteOutcome::Applied { .. }),
            "{key}: {outcome:?}"
        );
        self.model
            .insert(key.into(), (Some(value), version, expires_at));
    }

    fn delete(&mut self, engine: &Engine, clock: &MockClock, key: &str) {
        let version = self.version(clock);
        let opts = DeleteOptions {
            version,
            ..Default::default()
        };
        let outcome = engine.delete(key.as_bytes(), opts).unwrap();
        assert!(
            matches!(outcome, WriteOutcome::Applied { .. }),
            "{key}: {outcome:?}"
        );
        self.model.insert(key.into(), (None, version, None));
    }

    /// Three rounds over 24 keys: every round overwrites, some keys are deleted
    /// (and some of those written again), some get TTLs that will expire.
    fn fill(&mut self, engine: &Engine, clock: &MockClock) {
        for round in 0..3u64 {
            for k in 0..24u64 {
                let key = format!("key{k:02}");
                match (k + round) % 6 {
                    0 => self.delete(engine, clock, &key),
                    1 => {
                        let value = format!("{key} round {round} short-lived").into_bytes();
                        self.put(engine, clock, &key, value, Some(5_005));
                    }
                    _ => {
                        let value = format!("{key} round {round} ").repeat(20).into_bytes();
                        self.put(engine, clock, &key, value, None);
                    }
                }
            }
            clock.advance(1_000);
        }
    }
}

fn assert_matches_model(engine: &Engine, model: &Model, now: u64, context: &str) {
    let mut live = Vec::new();
    for (key, (value, version, expires_at)) in model {
        let visible = value.is_some() && expires_at.is_none_or(|at| now < at);
        let got = engine.get(key.as_bytes()).unwrap();
        if visible {
            let got = got.unwrap_or_else(|| panic!("{context}: {key} lost"));
            assert_eq!(Some(&got.value), value.as_ref(), "{context}: {key} value");
            assert_eq!(got.version, *version, "{context}: {key} version");
            assert_eq!(got.expires_at, *expires_at, "{context}: {key} expiry");
            live.push(key.as_bytes().to_vec());
        } else {
            assert_eq!(got, None, "{context}: {key} must be absent");
        }
    }
    let scanned: Vec<Vec<u8>> = engine
        .scan(b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(scanned, live, "{context}: scan of everything");
}

fn failing_at(
    point: FaultPoint,
    armed: &Arc<Mutex<Option<FaultPoint>>>,
    hits: &Arc<Mutex<u32>>,
) -> FaultHook {
    let armed = Arc::clone(armed);
    let hits = Arc::clone(hits);
    Arc::new(move |at| {
        if *armed.lock().unwrap() == Some(at) && at == point {
            *hits.lock().unwrap() += 1;
            return Err(io::Error::other(format!("injected crash at {at:?}")));
        }
        Ok(())
    })
}

fn crash_inside_merge(point: FaultPoint, partial: bool) {
    let context = format!("{point:?}, partial merge: {partial}");
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let armed = Arc::new(Mutex::new(None));
    let hits = Arc::new(Mutex::new(0));
    let options = Options {
        fault_hook: Some(failing_at(point, &armed, &hits)),
        ..test_options(&clock, FILE_SIZE)
    };
    let engine = Engine::open(dir.path(), options).unwrap();
    let mut writer = Writer {
        hlc: 0,
        model: Model::new(),
    };
    writer.fill(&engine, &clock);
    let immutable: Vec<u32> = engine
        .files()
        .iter()
        .filter(|f| !f.active)
        .map(|f| f.id)
        .collect();
    assert!(
        immutable.len() >= 4,
        "{context}: only {immutable:?} immutable"
    );
    // Past retention and every TTL: merge may drop tombstones and expired values.
    clock.advance(RETENTION_MS + 10);
    assert_matches_model(
        &engine,
        &writer.model,
        clock.now(),
        &format!("{context}, before merge"),
    );

    *armed.lock().unwrap() = Some(point);
    // The partial merge leaves the oldest file out, so dropping a tombstone
    // whose key has an older value there would resurrect it.
    let result = if partial {
        engine.merge_files(&immutable[1..immutable.len() - 1])
    } else {
        engine.merge()
    };
    assert!(
        result.is_err(),
        "{context}: merge succeeded despite the fault: {result:?}"
    );
    assert_eq!(*hits.lock().unwrap(), 1, "{context}: fault point reached");
    drop(engine);

    let reopen =
        |clock: &MockClock| Engine::open(dir.path(), test_options(clock, FILE_SIZE)).unwrap();
    let engine = reopen(&clock);
    assert_matches_model(
        &engine,
        &writer.model,
        clock.now(),
        &format!("{context}, after crash"),
    );

    // The recovered store takes writes and merges, and still agrees after reopening.
    for k in 0..6 {
        let key = format!("key{k:02}");
        writer.put(
            &engine,
            &clock,
            &key,
            format!("{key} after crash").into_bytes(),
            None,
        );
    }
    writer.delete(&engine, &clock, "key07");
    engine.merge().unwrap();
    assert_matches_model(
        &engine,
        &writer.model,
        clock.now(),
        &format!("{context}, after second merge"),
    );
    drop(engine);
    let engine = reopen(&clock);
    assert_matches_model(
        &engine,
        &writer.model,
        clock.now(),
        &format!("{context}, after second crash"),
    );
    engine.merge().unwrap();
    engine.close().unwrap();
    let engine = reopen(&clock);
    assert_matches_model(
        &engine,
        &writer.model,
        clock.now(),
        &format!("{context}, after clean close"),
    );
    engine.close().unwrap();
    assert_no_leftovers(dir.path(), &context);
}

/// After a successful merge and a clean close nothing but data, hint and the
/// engine's own bookkeeping files remain: a crashed merge's outputs must not
/// pile up forever.
fn assert_no_leftovers(dir: &Path, context: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let known =
            name.ends_with(".data") || name.ends_with(".hint") || name == "LOCK" || name == "STATE";
        assert!(
            known,
            "{context}: unexpected file {name:?} left in the data directory"
        );
    }
}

#[test]
fn crash_inside_full_merge_at_every_fault_point_loses_and_resurrects_nothing() {
    for point in MERGE_POINTS {
        crash_inside_merge(point, false);
    }
}

#[test]
fn crash_inside_partial_merge_at_every_fault_point_loses_and_resurrects_nothing() {
    for point in MERGE_POINTS {
        crash_inside_merge(point, true);
    }
}
