//! The engine's replica-facing API: `apply` stores records written elsewhere
//! by last-writer-wins (idempotent, order-independent, all-or-nothing on bad
//! input, durable in groups under `always`); `latest` shows tombstones and
//! expired values with their versions; `keys_after` walks every key held.
#![allow(clippy::unwrap_used)]

mod common;

use caskade_node::engine::{
    DeleteOptions, Durability, Engine, EngineError, Latest, PutOptions, Record, WriteOutcome,
};
use common::{MockClock, T0, test_options, version_at};

const FILE_SIZE: u64 = 1 << 20;

fn record(key: &str, value: Option<&str>, counter: u16) -> Record {
    Record {
        seq: 0,
        key: key.as_bytes().to_vec(),
        value: value.map(|v| v.as_bytes().to_vec()),
        version: version_at(T0, counter),
        expires_at: None,
    }
}

fn open(dir: &std::path::Path, clock: &MockClock, durability: Durability) -> Engine {
    let mut options = test_options(clock, FILE_SIZE);
    options.durability = durability;
    Engine::open(dir, options).unwrap()
}

#[test]
fn apply_is_last_writer_wins_in_any_order_and_idempotent() {
    for durability in [Durability::Always, Durability::Never] {
        let dir = tempfile::tempdir().unwrap();
        let clock = MockClock::new(T0);
        let engine = open(dir.path(), &clock, durability);
        let newest_first = vec![
            record("a", Some("a3"), 3),
            record("a", Some("a1"), 1),
            record("b", None, 5),
            record("b", Some("b4"), 4),
            record("a", Some("a2"), 2),
        ];
        let outcomes = engine.apply(newest_first.clone()).unwrap();
        assert_eq!(outcomes.len(), 5);
        assert!(matches!(outcomes[0], WriteOutcome::Applied { .. }));
        assert_eq!(
            outcomes[1],
            WriteOutcome::Stale {
                current: version_at(T0, 3)
            },
            "{durability:?}"
        );
        assert!(matches!(outcomes[2], WriteOutcome::Applied { .. }));
        assert!(matches!(outcomes[3], WriteOutcome::Stale { .. }));
        assert!(matches!(outcomes[4], WriteOutcome::Stale { .. }));
        let seq = engine.stats().last_seq;

        // Applying everything again changes nothing.
        let again = engine.apply(newest_first).unwrap();
        assert!(
            again
                .iter()
                .all(|o| matches!(o, WriteOutcome::Stale { .. }))
        );
        assert_eq!(engine.stats().last_seq, seq);

        assert_eq!(engine.get(b"a").unwrap().unwrap().value, b"a3");
        assert_eq!(engine.get(b"b").unwrap(), None);
        assert_eq!(
            engine.latest(b"b").unwrap(),
            Some(Latest::Tombstone(version_at(T0, 5)))
        );
        engine.close().unwrap();
        let engine = open(dir.path(), &clock, durability);
        assert_eq!(engine.get(b"a").unwrap().unwrap().value, b"a3");
        assert_eq!(
            engine.latest(b"b").unwrap().unwrap().version(),
            version_at(T0, 5)
        );
        engine.close().unwrap();
    }
}

#[test]
fn apply_with_one_invalid_record_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = open(dir.path(), &clock, Durability::Always);
    let mut records = vec![record("fine", Some("v"), 1), record("", Some("v"), 2)];
    let err = engine.apply(records.clone()).unwrap_err();
    assert!(matches!(err, EngineError::Limit(_)), "{err:?}");
    records[1] = record("big", Some(&"x".repeat(2 << 20)), 2);
    let err = engine.apply(records).unwrap_err();
    assert!(matches!(err, EngineError::Limit(_)), "{err:?}");
    assert_eq!(engine.stats().last_seq, 0);
    assert_eq!(engine.get(b"fine").unwrap(), None);
}

#[test]
fn apply_of_many_records_under_always_shares_fsyncs_with_other_writers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = std::sync::Arc::new(open(dir.path(), &clock, Durability::Always));
    // Local writers run beside a large apply: every write is stored once,
    // and the apply's outcomes come back in order.
    let writer = {
        let engine = std::sync::Arc::clone(&engine);
        std::thread::spawn(move || {
            for i in 0..200u16 {
                let opts = PutOptions {
                    version: version_at(T0 + 1, i),
                    ..PutOptions::default()
                };
                engine
                    .put(format!("local{i}").as_bytes(), b"v", opts)
                    .unwrap();
            }
        })
    };
    let records: Vec<Record> = (0..3000u16)
        .map(|i| record(&format!("applied{i:05}"), Some("v"), i))
        .collect();
    let outcomes = engine.apply(records).unwrap();
    writer.join().unwrap();
    let mut seqs = outcomes.iter().map(|o| match o {
        WriteOutcome::Applied { seq, .. } => *seq,
        other => panic!("{other:?}"),
    });
    let mut last = seqs.next().unwrap();
    for seq in seqs {
        assert!(seq > last, "outcomes are in record order");
        last = seq;
    }
    assert_eq!(engine.stats().keys, 3200);
    assert_eq!(engine.stats().last_seq, 3200);
}

#[test]
fn latest_shows_expired_values_and_tombstones_that_get_hides() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = open(dir.path(), &clock, Durability::Always);
    let put = |key: &[u8], counter, expires_at| {
        let opts = PutOptions {
            version: version_at(T0, counter),
            expires_at,
            ..PutOptions::default()
        };
        engine.put(key, b"v", opts).unwrap();
    };
    put(b"live", 1, None);
    put(b"expiring", 2, Some(T0 + 10));
    put(b"deleted", 3, None);
    let opts = DeleteOptions {
        version: version_at(T0, 4),
        ..DeleteOptions::default()
    };
    engine.delete(b"deleted", opts).unwrap();
    clock.advance(100);

    assert_eq!(engine.get(b"expiring").unwrap(), None);
    match engine.latest(b"expiring").unwrap() {
        Some(Latest::Value(value)) => {
            assert_eq!(value.version, version_at(T0, 2));
            assert_eq!(value.expires_at, Some(T0 + 10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        engine.latest(b"deleted").unwrap(),
        Some(Latest::Tombstone(version_at(T0, 4)))
    );
    assert_eq!(engine.latest(b"absent").unwrap(), None);

    let all = engine.keys_after(None, 10);
    assert_eq!(
        all,
        vec![b"deleted".to_vec(), b"expiring".to_vec(), b"live".to_vec()]
    );
    assert_eq!(
        engine.keys_after(Some(b"deleted"), 1),
        vec![b"expiring".to_vec()]
    );
}

#[test]
fn retain_drops_unwanted_keys_for_good_and_moves_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let engine = open(dir.path(), &clock, Durability::Always);
    let records: Vec<Record> = (0..100u16)
        .map(|i| {
            record(
                &format!("{}-{i}", if i % 2 == 0 { "keep" } else { "drop" }),
                Some("v"),
                i + 1,
            )
        })
        .collect();
    engine.apply(records).unwrap();
    let report = engine.retain(|key| key.starts_with(b"keep")).unwrap();
    assert_eq!(report.records_dropped, 50, "{report:?}");
    assert_eq!(engine.stats().keys, 50);
    assert!(engine.stats().tombstone_horizon > 0);
    assert_eq!(engine.get(b"drop-1").unwrap(), None);
    assert!(engine.get(b"keep-0").unwrap().is_some());
    // Gone for good: a crash and a reopen do not bring them back.
    drop(engine);
    let engine = open(dir.path(), &clock, Durability::Always);
    assert_eq!(engine.stats().keys, 50);
    assert_eq!(engine.latest(b"drop-1").unwrap(), None);
}
