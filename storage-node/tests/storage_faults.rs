//! What a storage failure must not lead to: after a failed fsync the engine
//! is poisoned, and nothing may then report data as durable that may not
//! be (a later fsync of the same file can return success after the kernel
//! reported the error to someone else), nor seal or describe bytes that may
//! be torn. And what replication reads from the log must be what the
//! engine holds: published records only, every latest record included.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use caskade_node::engine::{
    DeleteOptions, Engine, EngineError, FaultHook, FaultPoint, PutOptions, Record,
};
use common::{
    MockClock, RETENTION_MS, T0, active_id, data_file_ids, hint_path, rotate, test_options,
    version_at,
};

/// Large enough never to rotate unless a test fills it on purpose.
const ONE_FILE: u64 = 1 << 20;
/// Small enough that `rotate` seals a file after a few writes.
const SMALL_FILE: u64 = 4096;

fn put(engine: &Engine, key: &str, value: &[u8], counter: u16) {
    let opts = PutOptions {
        version: version_at(T0, counter),
        ..Default::default()
    };
    engine.put(key.as_bytes(), value, opts).unwrap();
}

/// An engine whose fsyncs fail while the flag returned is set.
fn engine_with_failing_fsync(dir: &Path, clock: &MockClock) -> (Engine, Arc<AtomicBool>) {
    let armed = Arc::new(AtomicBool::new(false));
    let hook: FaultHook = {
        let armed = Arc::clone(&armed);
        Arc::new(move |point| {
            if point == FaultPoint::Fsync && armed.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected writeback error"));
            }
            Ok(())
        })
    };
    let options = caskade_node::engine::Options {
        fault_hook: Some(hook),
        ..test_options(clock, ONE_FILE)
    };
    (Engine::open(dir, options).unwrap(), armed)
}

/// An engine whose fsync failed once (an unknown outcome for the put it
/// covered) and works again afterwards, as Linux reports a writeback error
/// once per file: poisoned, with ten acknowledged keys.
fn poisoned_engine(dir: &Path, clock: &MockClock) -> Engine {
    let (engine, armed) = engine_with_failing_fsync(dir, clock);
    for i in 0..10u16 {
        put(&engine, &format!("acked{i}"), b"value", i + 1);
    }
    armed.store(true, Ordering::SeqCst);
    let opts = PutOptions {
        version: version_at(T0, 100),
        ..Default::default()
    };
    assert!(matches!(
        engine.put(b"doomed", b"unknown", opts),
        Err(EngineError::OutcomeUnknown(_))
    ));
    armed.store(false, Ordering::SeqCst);
    engine
}

#[test]
fn a_poisoned_engine_never_reports_a_sync_as_done() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let engine = poisoned_engine(dir.path(), &clock);
    // The fsync would now return success, though the failed writeback's
    // bytes may be lost: what a sync promises (cursors persisted past
    // those records, say) must not be promised.
    assert!(
        matches!(engine.sync(), Err(EngineError::Poisoned(_))),
        "sync on a poisoned engine"
    );
}

#[test]
fn a_poisoned_engine_writes_no_hint_on_close_and_seals_nothing() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let engine = poisoned_engine(dir.path(), &clock);
    let active = active_id(&engine);
    let files = data_file_ids(dir.path());
    assert!(
        matches!(engine.retain(|_| true), Err(EngineError::Poisoned(_))),
        "retain on a poisoned engine"
    );
    assert_eq!(
        data_file_ids(dir.path()),
        files,
        "a poisoned engine sealed its active file and started another"
    );
    assert!(
        engine.close().is_err(),
        "a poisoned engine closed as if everything were durable"
    );
    // A hint covering bytes whose writeback failed would be trusted by the
    // next open over the data file itself.
    assert!(
        !hint_path(dir.path(), active).exists(),
        "a poisoned engine wrote a hint for its active file"
    );
    let engine = Engine::open(dir.path(), test_options(&clock, ONE_FILE)).unwrap();
    for i in 0..10 {
        assert!(
            engine
                .get(format!("acked{i}").as_bytes())
                .unwrap()
                .is_some()
        );
    }
}

/// A sync (or backup) whose fsync of the active file is the one the kernel
/// reports a writeback error to, while a commit leader fsyncs the same file
/// for a batch: the leader's fsync then returns success although the batch
/// may be lost. The hook holds the syncer's failing fsync back until the
/// leader's has run (or a second has passed, if fsyncs are serialised).
fn a_concurrent_fsync_consumes_the_error(syncer: impl FnOnce(&Engine) + Send) {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new((Mutex::new(0u32), Condvar::new()));
    let (entered, syncer_in_fsync) = mpsc::channel::<()>();
    let entered = Mutex::new(entered);
    let hook: FaultHook = {
        let (armed, calls) = (Arc::clone(&armed), Arc::clone(&calls));
        Arc::new(move |point| {
            if point != FaultPoint::Fsync || !armed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let (count, changed) = &*calls;
            let mut count = count.lock().unwrap();
            *count += 1;
            changed.notify_all();
            if std::thread::current().name() == Some("syncer") && *count == 1 {
                let _ = entered.lock().unwrap().send(());
                let _held = changed
                    .wait_timeout_while(count, Duration::from_secs(1), |c| *c < 2)
                    .unwrap();
                return Err(io::Error::other("injected writeback error"));
            }
            Ok(())
        })
    };
    let options = caskade_node::engine::Options {
        fault_hook: Some(hook),
        ..test_options(&clock, ONE_FILE)
    };
    let engine = Engine::open(dir.path(), options).unwrap();
    put(&engine, "before", b"durable", 1);
    armed.store(true, Ordering::SeqCst);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("syncer".into())
            .spawn_scoped(scope, || syncer(&engine))
            .unwrap();
        syncer_in_fsync
            .recv_timeout(Duration::from_secs(30))
            .expect("the syncer never fsynced");
        let opts = PutOptions {
            version: version_at(T0, 2),
            ..Default::default()
        };
        let answer = engine.put(b"batch", b"maybe lost", opts);
        assert!(
            answer.is_err(),
            "a write was acknowledged by an fsync that came after another \
             caller had consumed the file's writeback error: {answer:?}"
        );
    });
}

#[test]
fn a_sync_that_takes_a_writeback_error_fails_the_batch_it_covered() {
    a_concurrent_fsync_consumes_the_error(|engine| {
        assert!(engine.sync().is_err());
    });
}

#[test]
fn a_backup_that_takes_a_writeback_error_fails_the_batch_it_covered() {
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("backup");
    a_concurrent_fsync_consumes_the_error(move |engine| {
        assert!(engine.backup(&dest).is_err());
    });
}

/// A replica that holds an older value of a key must get its newer value
/// even when that one expired and a merge dropped it while the replica's
/// read of the log was under way: the dropped value is the key's latest
/// record. Skipped, the replica would keep the older value for good.
#[test]
fn a_read_of_the_log_yields_an_expired_value_a_merge_dropped_meanwhile() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), test_options(&clock, SMALL_FILE)).unwrap();
    put(&engine, "key", b"older", 1);
    let replica_has = engine.stats().last_seq;
    let expiring = PutOptions {
        version: version_at(T0, 2),
        expires_at: Some(T0 + 1_000),
        ..Default::default()
    };
    engine.put(b"key", b"newer, expiring", expiring).unwrap();
    rotate(&engine, "filler", version_at(T0, 3));
    let since = engine.iter_since(replica_has).unwrap();

    clock.advance(RETENTION_MS + 1_000);
    let merged = engine.merge().unwrap();
    // The older value, superseded, and the newer one, expired.
    assert_eq!(merged.records_dropped, 2, "{merged:?}");
    assert_eq!(engine.get(b"key").unwrap(), None);

    let of_key: Vec<_> = since
        .map(Result::unwrap)
        .filter(|r| r.key == b"key")
        .collect();
    assert_eq!(
        of_key.len(),
        1,
        "the replica missing the newer value gets it: {of_key:?}"
    );
    assert_eq!(of_key[0].version, version_at(T0, 2));
}

/// A delete whose fsync failed is not in the store (its outcome is unknown
/// to the client, and the engine does not serve it): a replica reading the
/// log must not receive it either.
#[test]
fn a_read_of_the_log_yields_no_record_whose_fsync_failed() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let engine = poisoned_engine(dir.path(), &clock);
    let seen: Vec<_> = engine.iter_since(0).unwrap().map(Result::unwrap).collect();
    assert!(
        seen.iter().all(|r| r.key != b"doomed"),
        "a put whose fsync failed was read from the log"
    );
    drop(engine);

    let dir = tempfile::tempdir().unwrap();
    let (engine, armed) = engine_with_failing_fsync(dir.path(), &clock);
    put(&engine, "kept", b"value", 1);
    armed.store(true, Ordering::SeqCst);
    let delete = DeleteOptions {
        version: version_at(T0, 2),
        ..Default::default()
    };
    // A key this node never held: the delete's tombstone has no entry in
    // the keydir to be compared with.
    assert!(engine.delete(b"never-held", delete).is_err());
    let seen: Vec<_> = engine.iter_since(0).unwrap().map(Result::unwrap).collect();
    assert!(
        seen.iter().all(|r| r.key != b"never-held"),
        "a delete whose fsync failed was read from the log: {seen:?}"
    );
}

/// The records of a commit whose fsync failed stay unpublished when a later
/// batch commits nothing (every write in it refused by the poison): here a
/// replicated apply larger than one batch, whose first batch fails.
#[test]
fn records_of_a_failed_batch_stay_unread_after_the_batches_refused_behind_it() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let (engine, armed) = engine_with_failing_fsync(dir.path(), &clock);
    put(&engine, "kept", b"value", 1);
    let published = engine.stats().last_seq;
    armed.store(true, Ordering::SeqCst);
    let tombstones: Vec<Record> = (0..3_000u16)
        .map(|n| Record {
            seq: 0,
            key: format!("never-held-{n}").into_bytes(),
            value: None,
            version: version_at(T0, n + 10),
            expires_at: None,
        })
        .collect();
    assert!(engine.apply(tombstones).is_err());
    let since = engine.iter_since(0).unwrap();
    assert_eq!(
        since.upto(),
        published,
        "the log's end moved past the failed batch"
    );
    let seen: Vec<_> = since.map(Result::unwrap).collect();
    assert!(
        seen.iter().all(|r| r.key == b"kept"),
        "records of a failed batch were read from the log: {} of them",
        seen.len() - 1
    );
}
