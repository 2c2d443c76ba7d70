//! Bad input and refused writes: keys and values outside the limits, failed
//! conditions and stale versions are refused with the documented error or
//! outcome and leave no trace (not in `get`, `scan`, `stats`, `iter_since`,
//! the files, nor after reopening); a locked directory and invalid options
//! are refused at open.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use caskade_common::LimitError;
use caskade_common::limits::MAX_KEY_BYTES;
use caskade_node::engine::{
    Condition, DeleteOptions, Durability, Engine, EngineError, FileInfo, Options, PutOptions,
    Value, WriteOutcome,
};
use common::{MockClock, T0, test_options, version_at};

const MAX_VALUE: usize = 100;

fn options(clock: &MockClock) -> Options {
    Options {
        max_value_bytes: MAX_VALUE,
        ..test_options(clock, 1 << 20)
    }
}

fn put_opts(counter: u16) -> PutOptions {
    PutOptions {
        version: version_at(T0, counter),
        ..Default::default()
    }
}

fn del_opts(counter: u16) -> DeleteOptions {
    DeleteOptions {
        version: version_at(T0, counter),
        ..Default::default()
    }
}

/// Everything observable about the store's contents.
#[derive(Debug, PartialEq)]
struct Snapshot {
    values: Vec<(Vec<u8>, Option<Value>)>,
    scan: Vec<Vec<u8>>,
    last_seq: u64,
    keys: u64,
    tombstones: u64,
    since_zero: usize,
    files: Vec<FileInfo>,
}

fn snapshot(engine: &Engine, probe: &[&[u8]]) -> Snapshot {
    let stats = engine.stats();
    Snapshot {
        values: probe
            .iter()
            .map(|k| (k.to_vec(), engine.get(k).unwrap()))
            .collect(),
        scan: engine
            .scan(b"", None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect(),
        last_seq: stats.last_seq,
        keys: stats.keys,
        tombstones: stats.tombstones,
        since_zero: engine.iter_since(0).unwrap().count(),
        files: engine.files(),
    }
}

const PROBE: [&[u8]; 4] = [b"present", b"deleted", b"absent", b"big"];

/// A store with one live key and one deleted key.
fn seeded(dir: &Path, clock: &MockClock) -> Engine {
    let engine = Engine::open(dir, options(clock)).unwrap();
    engine.put(b"present", b"here", put_opts(10)).unwrap();
    engine.put(b"deleted", b"gone soon", put_opts(11)).unwrap();
    engine.delete(b"deleted", del_opts(12)).unwrap();
    engine
}

/// Runs `refused` against a seeded store and checks it changed nothing, in
/// the running engine and after a crash and reopen.
fn assert_writes_nothing(name: &str, refused: impl Fn(&Engine)) {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = seeded(dir.path(), &clock);
    let before = snapshot(&engine, &PROBE);
    refused(&engine);
    assert_eq!(
        snapshot(&engine, &PROBE),
        before,
        "{name}: changed the running engine"
    );
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let mut after = snapshot(&engine, &PROBE);
    // A reopen may start a new active file, and numbers new records from
    // above the seqs reserved before the crash; no record may be above
    // the last one written before.
    after.files = before.files.clone();
    assert!(after.last_seq >= before.last_seq, "{name}");
    assert_eq!(
        engine.iter_since(before.last_seq).unwrap().count(),
        0,
        "{name}: a record after the last one written"
    );
    after.last_seq = before.last_seq;
    assert_eq!(after, before, "{name}: changed the store on disk");
}

fn expect_limit(result: Result<WriteOutcome, EngineError>, expected: LimitError, what: &str) {
    match result {
        Err(EngineError::Limit(got)) => assert_eq!(got, expected, "{what}"),
        other => panic!("{what}: expected Limit({expected:?}), got {other:?}"),
    }
}

#[test]
fn empty_key_is_refused_and_writes_nothing() {
    assert_writes_nothing("empty key", |engine| {
        expect_limit(
            engine.put(b"", b"v", put_opts(20)),
            LimitError::EmptyKey,
            "put",
        );
        expect_limit(
            engine.delete(b"", del_opts(21)),
            LimitError::EmptyKey,
            "delete",
        );
    });
}

#[test]
fn key_longer_than_the_limit_is_refused_and_writes_nothing() {
    let long = vec![b'k'; MAX_KEY_BYTES + 1];
    let expected = LimitError::KeyTooLong {
        len: MAX_KEY_BYTES + 1,
        max: MAX_KEY_BYTES,
    };
    assert_writes_nothing("key of 1025 bytes", |engine| {
        expect_limit(engine.put(&long, b"v", put_opts(20)), expected, "put");
        expect_limit(engine.delete(&long, del_opts(21)), expected, "delete");
    });
}

#[test]
fn value_larger_than_max_value_bytes_is_refused_and_writes_nothing() {
    let expected = LimitError::ValueTooLarge {
        len: MAX_VALUE + 1,
        max: MAX_VALUE,
    };
    assert_writes_nothing("value over max_value_bytes", |engine| {
        expect_limit(
            engine.put(b"big", &[7; MAX_VALUE + 1], put_opts(20)),
            expected,
            "put",
        );
    });
}

#[test]
fn keys_and_values_at_the_limits_are_accepted_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let longest = vec![b'k'; MAX_KEY_BYTES];
    engine.put(&longest, &[7; MAX_VALUE], put_opts(1)).unwrap();
    engine.put(b"e", b"", put_opts(2)).unwrap();
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(
        engine.get(&longest).unwrap().unwrap().value,
        vec![7; MAX_VALUE]
    );
    assert_eq!(engine.get(b"e").unwrap().unwrap().value, b"");
}

#[test]
fn failed_conditions_report_the_current_version_and_write_nothing() {
    let present = Some(version_at(T0, 10));
    assert_writes_nothing("failed conditions", |engine| {
        let cases: [(&[u8], Condition, Option<_>); 5] = [
            (b"present", Condition::IfAbsent, present),
            (b"present", Condition::IfVersion(version_at(T0, 9)), present),
            (b"absent", Condition::IfVersion(version_at(T0, 10)), None),
            // A deleted key is absent: no version matches it, not even the tombstone's.
            (b"deleted", Condition::IfVersion(version_at(T0, 12)), None),
            (b"deleted", Condition::IfVersion(version_at(T0, 11)), None),
        ];
        for (i, (key, condition, current)) in cases.into_iter().enumerate() {
            let what = format!("case {i}: {} {condition:?}", String::from_utf8_lossy(key));
            let opts = PutOptions {
                condition,
                ..put_opts(30 + i as u16)
            };
            match engine.put(key, b"v", opts) {
                Err(EngineError::ConditionFailed { current: got }) => {
                    assert_eq!(got, current, "put {what}");
                }
                other => panic!("put {what}: expected ConditionFailed, got {other:?}"),
            }
            let opts = DeleteOptions {
                condition,
                ..del_opts(40 + i as u16)
            };
            match engine.delete(key, opts) {
                Err(EngineError::ConditionFailed { current: got }) => {
                    assert_eq!(got, current, "delete {what}");
                }
                other => panic!("delete {what}: expected ConditionFailed, got {other:?}"),
            }
        }
    });
}

#[test]
fn conditions_that_hold_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = seeded(dir.path(), &clock);
    let opts = PutOptions {
        condition: Condition::IfAbsent,
        ..put_opts(20)
    };
    // A deleted key is absent for IfAbsent.
    assert!(matches!(
        engine.put(b"deleted", b"back", opts).unwrap(),
        WriteOutcome::Applied { previous: None, .. }
    ));
    let opts = PutOptions {
        condition: Condition::IfVersion(version_at(T0, 10)),
        ..put_opts(21)
    };
    assert!(matches!(
        engine.put(b"present", b"replaced", opts).unwrap(),
        WriteOutcome::Applied { previous, .. } if previous == Some(version_at(T0, 10))
    ));
    assert_eq!(engine.get(b"present").unwrap().unwrap().value, b"replaced");
}

#[test]
fn stale_versions_are_ignored_before_conditions_and_write_nothing() {
    assert_writes_nothing("stale writes", |engine| {
        let live = version_at(T0, 10);
        let tombstone = version_at(T0, 12);
        // Equal and older versions, against a live value and against a tombstone.
        for (key, current, counter) in [
            (&b"present"[..], live, 10),
            (b"present", live, 9),
            (b"deleted", tombstone, 12),
            (b"deleted", tombstone, 11),
        ] {
            let what = format!("{} at counter {counter}", String::from_utf8_lossy(key));
            // IfAbsent fails for "present": LWW must win and report Stale.
            let opts = PutOptions {
                condition: Condition::IfAbsent,
                ..put_opts(counter)
            };
            assert_eq!(
                engine.put(key, b"stale", opts).unwrap(),
                WriteOutcome::Stale { current },
                "put {what}"
            );
            assert_eq!(
                engine.delete(key, del_opts(counter)).unwrap(),
                WriteOutcome::Stale { current },
                "delete {what}"
            );
        }
    });
}

#[test]
fn delete_of_an_absent_key_writes_a_tombstone_that_wins_over_older_puts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    let outcome = engine.delete(b"never", del_opts(5)).unwrap();
    assert!(
        matches!(outcome, WriteOutcome::Applied { previous: None, .. }),
        "{outcome:?}"
    );
    // A replica's older put arriving late must lose to the delete.
    assert_eq!(
        engine.put(b"never", b"late", put_opts(4)).unwrap(),
        WriteOutcome::Stale {
            current: version_at(T0, 5)
        }
    );
    drop(engine);
    let engine = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(
        engine.put(b"never", b"late", put_opts(4)).unwrap(),
        WriteOutcome::Stale {
            current: version_at(T0, 5)
        },
        "after reopen"
    );
    assert_eq!(engine.get(b"never").unwrap(), None);
}

#[test]
fn second_open_of_a_directory_is_locked_until_the_first_engine_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let first = Engine::open(dir.path(), options(&clock)).unwrap();
    first.put(b"k", b"v", put_opts(1)).unwrap();
    match Engine::open(dir.path(), options(&clock)) {
        Err(EngineError::Locked { dir: locked }) => {
            assert_eq!(locked.file_name(), dir.path().file_name());
        }
        Err(other) => panic!("second open: expected Locked, got {other}"),
        Ok(_) => panic!("second open of a locked directory succeeded"),
    }
    assert_eq!(
        first.get(b"k").unwrap().unwrap().value,
        b"v",
        "first engine still works"
    );
    drop(first);
    let second = Engine::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(second.get(b"k").unwrap().unwrap().value, b"v");
}

#[test]
fn invalid_options_are_refused_at_open_naming_the_field_and_create_no_data() {
    let clock = MockClock::new(T0);
    let base = || test_options(&clock, 1 << 20);
    let mut cases: Vec<(&str, Options)> = vec![
        (
            "max_file_size",
            Options {
                max_file_size: 0,
                ..base()
            },
        ),
        (
            "max_file_size",
            Options {
                max_file_size: 2 * (41 + 1024) - 1,
                ..base()
            },
        ),
        (
            "max_file_size",
            Options {
                max_file_size: u64::MAX,
                ..base()
            },
        ),
        (
            "max_value_bytes",
            Options {
                max_value_bytes: usize::MAX,
                ..base()
            },
        ),
        (
            "durability",
            Options {
                durability: Durability::Interval(Duration::ZERO),
                ..base()
            },
        ),
    ];
    let mut merge_case = |field, edit: &dyn Fn(&mut Options)| {
        let mut options = base();
        edit(&mut options);
        cases.push((field, options));
    };
    merge_case("merge.dead_ratio", &|o| o.merge.dead_ratio = 0.0);
    merge_case("merge.dead_ratio", &|o| o.merge.dead_ratio = f64::NAN);
    merge_case("merge.dead_ratio", &|o| o.merge.dead_ratio = 1.5);
    merge_case("merge.check_interval", &|o| {
        o.merge.check_interval = Duration::ZERO
    });

    for (field, options) in cases {
        let dir = tempfile::tempdir().unwrap();
        match Engine::open(dir.path(), options.clone()) {
            Err(EngineError::InvalidOptions { field: got, .. }) => {
                assert_eq!(got, field, "{options:?}");
            }
            Err(other) => panic!("{options:?}: expected InvalidOptions, got {other}"),
            Ok(_) => panic!("{options:?}: open accepted invalid options"),
        }
        let data_files = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".data")
            })
            .count();
        assert_eq!(data_files, 0, "{field}: refused open created data files");
    }
    // The smallest allowed file size is accepted.
    let dir = tempfile::tempdir().unwrap();
    let smallest = Options {
        max_file_size: 2 * (41 + 1024),
        ..base()
    };
    Engine::open(dir.path(), smallest).unwrap().close().unwrap();
}
