//! Online backup: the copy holds exactly the store as of the backup, opens as
//! a data directory of its own, and the source keeps working during and after.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use caskade_common::Version;
use caskade_node::engine::{DeleteOptions, Durability, Engine, EngineError, Options, PutOptions};

fn opts() -> Options {
    Options {
        max_file_size: 8192,
        durability: Durability::Never,
        ..Options::default()
    }
}

fn version(n: u64) -> Version {
    Version::new((caskade_common::version::unix_millis() << 16) + n, 1)
}

fn put(e: &Engine, key: &str, value: &str, n: u64) {
    let opts = PutOptions {
        version: version(n),
        ..PutOptions::default()
    };
    e.put(key.as_bytes(), value.as_bytes(), opts).expect("put");
}

fn all(e: &Engine) -> Vec<(Vec<u8>, Vec<u8>)> {
    e.scan(b"", None, usize::MAX)
        .expect("scan")
        .into_iter()
        .map(|entry| {
            let value = e
                .get(&entry.key)
                .expect("get")
                .expect("scanned key is live");
            (entry.key, value.value)
        })
        .collect()
}

#[test]
fn backup_is_a_consistent_openable_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("data");
    let engine = Engine::open(&source, opts()).expect("open");
    for i in 0..500 {
        put(
            &engine,
            &format!("k{i:04}"),
            &format!("value {i} {}", "x".repeat(40)),
            i,
        );
    }
    for i in (0..500).step_by(7) {
        engine
            .delete(
                format!("k{i:04}").as_bytes(),
                DeleteOptions {
                    version: version(1000 + i),
                    ..DeleteOptions::default()
                },
            )
            .expect("delete");
    }
    assert!(engine.files().len() > 3, "the copy must span several files");
    let expected = all(&engine);

    let report = engine.backup(dir.path().join("backup")).expect("backup");
    assert_eq!(report.files, engine.files().len());
    assert_eq!(report.last_seq, engine.stats().last_seq);

    // Writes after the backup are not in it, and the source still takes them.
    put(&engine, "after", "later", 5000);
    let copy = Engine::open(&report.dir, opts()).expect("open backup");
    assert_eq!(all(&copy), expected);
    assert!(copy.get(b"after").expect("get").is_none());
    assert_eq!(
        engine.get(b"after").expect("get").expect("present").value,
        b"later"
    );
}

#[test]
fn backup_runs_beside_writers_and_refuses_an_existing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(Engine::open(dir.path().join("data"), opts()).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            // At least one write, however soon the backup ends.
            while n == 0 || !stop.load(Ordering::Relaxed) && n < 20_000 {
                put(
                    &engine,
                    &format!("w{:03}", n % 300),
                    &format!("{n:0>60}"),
                    n,
                );
                n += 1;
            }
            n
        })
    };
    let report = engine.backup(dir.path().join("backup")).expect("backup");
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("writer thread");
    assert!(written > 0);

    // Every record in the copy is intact: open verifies each CRC, and each
    // key holds one of the values the writer wrote.
    let copy = Engine::open(&report.dir, opts()).expect("open backup");
    for (key, value) in all(&copy) {
        assert!(key.starts_with(b"w"));
        assert_eq!(value.len(), 60);
    }

    let err = engine.backup(&report.dir).expect_err("existing directory");
    assert!(matches!(err, EngineError::Io { .. }), "{err}");
}
