//! Time to live: a value with `expires_at` is visible until the engine's clock
//! passes it and invisible to `get`, `scan` and conditions afterwards, across
//! clean and crash reopens; merge drops it (and says so in its report and in
//! `stats`); and dropping it never lets an older value of the key reappear.
#![allow(clippy::unwrap_used)]

mod common;

use caskade_node::engine::{Condition, Engine, EngineError, PutOptions, Value, WriteOutcome};
use common::{MockClock, RETENTION_MS, T0, active_id, rotate, test_options, version_at};

const FILE_SIZE: u64 = 4096;

fn put(
    engine: &Engine,
    key: &[u8],
    value: &[u8],
    counter: u16,
    expires_at: Option<u64>,
) -> WriteOutcome {
    let opts = PutOptions {
        version: version_at(T0, counter),
        expires_at,
        ..Default::default()
    };
    engine.put(key, value, opts).unwrap()
}

fn scan_keys(engine: &Engine) -> Vec<Vec<u8>> {
    engine
        .scan(b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect()
}

#[test]
fn expired_value_is_invisible_to_get_and_scan_and_stays_invisible_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    let expires_at = T0 + 1_000;
    put(&engine, b"short", b"lives a second", 1, Some(expires_at));
    put(&engine, b"stays", b"forever", 2, None);

    clock.advance(999);
    assert_eq!(
        engine.get(b"short").unwrap(),
        Some(Value {
            value: b"lives a second".to_vec(),
            version: version_at(T0, 1),
            expires_at: Some(expires_at),
        })
    );
    let page = engine.scan(b"", None, 10).unwrap();
    assert_eq!(page[0].expires_at, Some(expires_at));
    assert_eq!(scan_keys(&engine), [b"short".to_vec(), b"stays".to_vec()]);

    clock.advance(2);
    assert_eq!(engine.get(b"short").unwrap(), None);
    assert_eq!(scan_keys(&engine), [b"stays".to_vec()]);
    assert_eq!(
        engine.stats().keys,
        2,
        "expired values count until merge drops them"
    );

    engine.close().unwrap();
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    assert_eq!(engine.get(b"short").unwrap(), None, "after clean reopen");
    assert_eq!(scan_keys(&engine), [b"stays".to_vec()]);
    drop(engine);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    assert_eq!(engine.get(b"short").unwrap(), None, "after crash reopen");
    assert_eq!(engine.get(b"stays").unwrap().unwrap().value, b"forever");
    engine.close().unwrap();
}

#[test]
fn expired_key_counts_as_absent_for_conditions_and_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    put(&engine, b"k", b"old", 1, Some(T0 + 10));
    clock.advance(20);

    let opts = PutOptions {
        version: version_at(T0, 2),
        expires_at: None,
        condition: Condition::IfVersion(version_at(T0, 1)),
    };
    match engine.put(b"k", b"new", opts) {
        Err(EngineError::ConditionFailed { current: None }) => {}
        other => panic!("IfVersion of an expired value: {other:?}"),
    }
    let opts = PutOptions {
        version: version_at(T0, 3),
        expires_at: None,
        condition: Condition::IfAbsent,
    };
    match engine.put(b"k", b"new", opts).unwrap() {
        WriteOutcome::Applied { previous: None, .. } => {}
        other => panic!("IfAbsent over an expired value: {other:?}"),
    }
    assert_eq!(engine.get(b"k").unwrap().unwrap().value, b"new");
}

#[test]
fn merge_drops_expired_values_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    for i in 0..5u16 {
        let key = format!("ttl{i}");
        put(
            &engine,
            key.as_bytes(),
            b"short-lived",
            i + 1,
            Some(T0 + 500),
        );
    }
    put(&engine, b"stays", b"forever", 10, None);
    let fillers = rotate(&engine, "fill", version_at(T0, 11)) as u64;
    let keys_before = engine.stats().keys;
    assert_eq!(keys_before, 6 + fillers);

    // Expired but written within the retention: kept (invisible), as a
    // replica that missed the write must still be able to learn of it.
    clock.advance(1_000);
    let report = engine.merge().unwrap();
    assert_eq!(engine.stats().keys, keys_before, "{report:?}");
    assert_eq!(engine.stats().tombstone_horizon, 0);
    for i in 0..5 {
        assert_eq!(engine.get(format!("ttl{i}").as_bytes()).unwrap(), None);
    }
    let more = rotate(&engine, "more", version_at(T0, 12)) as u64;

    clock.advance(RETENTION_MS);
    let report = engine.merge().unwrap();
    assert!(report.records_dropped >= 5, "{report:?}");
    assert!(
        engine.stats().tombstone_horizon > 0,
        "dropping expired values moves the horizon"
    );
    let stats = engine.stats();
    assert_eq!(stats.keys, keys_before + more - 5, "{stats:?}");
    for i in 0..5 {
        assert_eq!(engine.get(format!("ttl{i}").as_bytes()).unwrap(), None);
    }
    assert_eq!(engine.get(b"stays").unwrap().unwrap().value, b"forever");
    engine.close().unwrap();

    let engine = Engine::open(dir.path(), test_options(&clock, FILE_SIZE)).unwrap();
    assert_eq!(engine.stats().keys, keys_before + more - 5);
    assert_eq!(engine.get(b"ttl0").unwrap(), None);
    engine.close().unwrap();
}

#[test]
fn dropping_an_expired_value_never_resurrects_an_older_value() {
    for full_merge in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clock = MockClock::new(T0);
        let open =
            |clock: &MockClock| Engine::open(dir.path(), test_options(clock, FILE_SIZE)).unwrap();
        let engine = open(&clock);
        put(&engine, b"k", b"old, never expires", 1, None);
        rotate(&engine, "fill-a-", version_at(T0, 2));
        let expiring_file = active_id(&engine);
        put(&engine, b"k", b"new, expires", 3, Some(T0 + 100));
        rotate(&engine, "fill-b-", version_at(T0, 4));
        clock.advance(RETENTION_MS + 1_000);
        assert_eq!(engine.get(b"k").unwrap(), None);

        if full_merge {
            engine.merge().unwrap();
        } else {
            // Only the file with the expired value: the old value stays on disk.
            engine.merge_files(&[expiring_file]).unwrap();
        }
        let context = format!("full merge: {full_merge}");
        assert_eq!(engine.get(b"k").unwrap(), None, "{context}: after merge");
        assert!(!scan_keys(&engine).contains(&b"k".to_vec()), "{context}");
        engine.close().unwrap();
        let engine = open(&clock);
        assert_eq!(engine.get(b"k").unwrap(), None, "{context}: after reopen");
        engine.merge().unwrap();
        drop(engine);
        let engine = open(&clock);
        assert_eq!(
            engine.get(b"k").unwrap(),
            None,
            "{context}: after a second merge and crash"
        );
        engine.close().unwrap();
    }
}
