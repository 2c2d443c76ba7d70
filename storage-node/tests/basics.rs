//! The engine's everyday contract, end to end on real files: put, get,
//! overwrite, delete, scan, reopen, rotation, merge, versions and conditions.

use caskade_common::Version;
use caskade_node::engine::{
    Condition, DeleteOptions, Durability, Engine, EngineError, Options, PutOptions, WriteOutcome,
};

fn opts() -> Options {
    Options {
        max_file_size: 4096,
        durability: Durability::Never,
        ..Options::default()
    }
}

/// Version number `n` of a write made now (within tombstone retention).
fn v(n: u64) -> Version {
    static NOW: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let now = *NOW.get_or_init(caskade_common::version::unix_millis);
    Version::new((now << 16) + n, 1)
}

fn put(e: &Engine, key: &str, value: &str, n: u64) -> WriteOutcome {
    e.put(
        key.as_bytes(),
        value.as_bytes(),
        PutOptions {
            version: v(n),
            ..PutOptions::default()
        },
    )
    .expect("put")
}

fn get(e: &Engine, key: &str) -> Option<String> {
    e.get(key.as_bytes())
        .expect("get")
        .map(|val| String::from_utf8(val.value).expect("utf8"))
}

#[test]
fn data_survives_reopen_rotation_and_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    {
        let e = Engine::open(dir.path(), opts()).expect("open");
        for round in 0..5 {
            for i in 0..100 {
                n += 1;
                put(
                    &e,
                    &format!("key{i:03}"),
                    &format!("value {i} round {round}"),
                    n,
                );
            }
        }
        for i in (0..100).step_by(3) {
            n += 1;
            e.delete(
                format!("key{i:03}").as_bytes(),
                DeleteOptions {
                    version: v(n),
                    ..Default::default()
                },
            )
            .expect("delete");
        }
        assert!(e.files().len() > 3, "small files rotate");
        e.close().expect("close");
    }
    let check = |e: &Engine| {
        for i in 0..100 {
            let expected = (i % 3 != 0).then(|| format!("value {i} round 4"));
            assert_eq!(get(e, &format!("key{i:03}")), expected, "key{i:03}");
        }
        let page = e.scan(b"key0", Some(b"key010"), 5).expect("scan");
        let keys: Vec<_> = page
            .iter()
            .map(|s| String::from_utf8_lossy(&s.key).into_owned())
            .collect();
        assert_eq!(keys, ["key011", "key013", "key014", "key016", "key017"]);
    };
    {
        let e = Engine::open(dir.path(), opts()).expect("reopen");
        check(&e);
        let before = e.stats();
        assert!(before.dead_bytes > 0);
        let report = e.merge().expect("merge");
        assert!(report.records_dropped > 0);
        check(&e);
        assert!(e.stats().dead_bytes < before.dead_bytes);
        drop(e);
    }
    let e = Engine::open(dir.path(), opts()).expect("reopen after merge");
    check(&e);
    assert_eq!(e.stats().keys, 66);
    let since: Vec<_> = e
        .iter_since(0)
        .expect("iter")
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(
        since.len(),
        100,
        "latest record of every key, tombstones included"
    );
    assert!(since.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn versions_and_conditions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(
        dir.path(),
        Options {
            durability: Durability::Always,
            ..opts()
        },
    )
    .expect("open");
    assert!(matches!(
        put(&e, "k", "a", 5),
        WriteOutcome::Applied { previous: None, .. }
    ));
    assert_eq!(
        put(&e, "k", "old", 4),
        WriteOutcome::Stale { current: v(5) }
    );
    assert_eq!(
        put(&e, "k", "same", 5),
        WriteOutcome::Stale { current: v(5) }
    );
    assert_eq!(get(&e, "k").as_deref(), Some("a"));
    let cas = |cond, n| {
        e.put(
            b"k",
            b"b",
            PutOptions {
                version: v(n),
                expires_at: None,
                condition: cond,
            },
        )
    };
    assert!(
        matches!(cas(Condition::IfAbsent, 6), Err(EngineError::ConditionFailed { current: Some(c) }) if c == v(5))
    );
    assert!(matches!(
        cas(Condition::IfVersion(v(4)), 6),
        Err(EngineError::ConditionFailed { .. })
    ));
    assert!(
        matches!(cas(Condition::IfVersion(v(5)), 6), Ok(WriteOutcome::Applied { previous: Some(p), .. }) if p == v(5))
    );
    assert_eq!(get(&e, "k").as_deref(), Some("b"));
    e.delete(
        b"k",
        DeleteOptions {
            version: v(7),
            ..Default::default()
        },
    )
    .expect("delete");
    assert_eq!(
        put(&e, "k", "late", 6),
        WriteOutcome::Stale { current: v(7) },
        "tombstone version wins"
    );
    assert!(matches!(
        cas(Condition::IfAbsent, 8),
        Ok(WriteOutcome::Applied { previous: None, .. })
    ));
}

/// Polls `done` until it holds or five seconds pass.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn interval_durability_fsyncs_in_the_background() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let fsyncs = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&fsyncs);
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(
        dir.path(),
        Options {
            durability: Durability::Interval(std::time::Duration::from_millis(5)),
            fault_hook: Some(Arc::new(move |point| {
                if point == caskade_node::engine::FaultPoint::Fsync {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            })),
            ..opts()
        },
    )
    .expect("open");
    put(&e, "k", "v", 1);
    eventually("the background thread fsyncs", || {
        fsyncs.load(Ordering::SeqCst) > 0 && e.stats().last_fsync_micros.is_some()
    });
}

#[test]
fn sealed_files_get_hint_files_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Engine::open(dir.path(), opts()).expect("open");
    for i in 0..200 {
        put(
            &e,
            &format!("key{i:03}"),
            "a value long enough to fill small files",
            i + 1,
        );
    }
    let sealed: Vec<u32> = e
        .files()
        .iter()
        .filter(|f| !f.active)
        .map(|f| f.id)
        .collect();
    assert!(sealed.len() > 2, "writes rotate small files");
    eventually("every sealed file has a hint", || {
        sealed
            .iter()
            .all(|id| dir.path().join(format!("{id:010}.hint")).exists())
    });
    drop(e);
    // Open from the hints (and the active file's scan) after a crash.
    let e = Engine::open(dir.path(), opts()).expect("reopen");
    for i in 0..200 {
        assert!(get(&e, &format!("key{i:03}")).is_some(), "key{i:03}");
    }
}
