//! Tombstone safety: once a key's tombstone is past retention, no merge (of
//! the tombstone's file alone, of the older files alone, of both, in two
//! steps, or of everything) may let an older value of the key come back,
//! neither in the running engine nor after a clean or crash reopen; and
//! `iter_since` either still yields the tombstone or has moved its horizon
//! past it, so a replica catching up never misses the delete.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use caskade_node::engine::{DeleteOptions, Engine, EngineError, PutOptions};
use common::{
    MockClock, RETENTION_MS, T0, data_file_ids, data_path, read_records, rotate, test_options,
    version_at,
};

const FILE_SIZE: u64 = 4096;
const KEY: &[u8] = b"victim";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// merge_files with only the file holding the tombstone.
    TombstoneFileOnly,
    /// merge_files with only the files holding the older values.
    OldFilesOnly,
    /// merge_files with every file holding a record of the key.
    AllFilesOfKey,
    /// The tombstone's file first, then the older files, as two merges.
    TombstoneFileThenOldFiles,
    /// merge() of every immutable file.
    Full,
}

/// Where the key's records ended up: ids of files holding its older values,
/// and the tombstone's file and seq.
#[derive(Debug)]
struct Layout {
    value_files: Vec<u32>,
    tombstone_file: u32,
    tombstone_seq: u64,
}

fn locate(dir: &Path) -> Layout {
    let mut value_files = Vec::new();
    let mut tombstone = None;
    for id in data_file_ids(dir) {
        for record in read_records(&data_path(dir, id)) {
            if record.key == KEY {
                if record.tombstone {
                    tombstone = Some((id, record.seq));
                } else {
                    value_files.push(id);
                }
            }
        }
    }
    let (tombstone_file, tombstone_seq) = tombstone.expect("the tombstone is on disk");
    Layout {
        value_files,
        tombstone_file,
        tombstone_seq,
    }
}

/// The key is deleted, and a catch-up from the horizon either yields its
/// tombstone or the horizon covers the tombstone's seq.
fn assert_deleted(engine: &Engine, tombstone_seq: u64, context: &str) {
    assert_eq!(
        engine.get(KEY).unwrap(),
        None,
        "{context}: deleted key came back"
    );
    let scanned = engine.scan(b"v", None, usize::MAX).unwrap();
    assert!(scanned.is_empty(), "{context}: scan shows {scanned:?}");
    let horizon = engine.stats().tombstone_horizon;
    let records: Vec<_> = engine
        .iter_since(horizon)
        .unwrap()
        .collect::<Result<_, EngineError>>()
        .unwrap();
    let of_key: Vec<_> = records.iter().filter(|r| r.key == KEY).collect();
    if tombstone_seq > horizon {
        assert_eq!(
            of_key.len(),
            1,
            "{context}: iter_since({horizon}) lost the tombstone: {of_key:?}"
        );
        assert_eq!(of_key[0].seq, tombstone_seq, "{context}");
        assert_eq!(of_key[0].value, None, "{context}");
    } else {
        assert!(
            of_key.is_empty(),
            "{context}: iter_since({horizon}) yields {of_key:?}"
        );
        match engine.iter_since(0) {
            Err(EngineError::CursorTooOld { requested: 0, .. }) => {}
            other => panic!(
                "{context}: iter_since(0) below horizon {horizon}: {:?}",
                other.map(|_| ())
            ),
        }
    }
}

fn run(plan: Plan, overwrites: usize) {
    let context = format!("{plan:?} with {overwrites} overwrite(s)");
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::new(T0);
    let open =
        |clock: &MockClock| Engine::open(dir.path(), test_options(clock, FILE_SIZE)).unwrap();
    let engine = open(&clock);

    let mut counter = 0u16;
    let mut next = || {
        counter += 1;
        version_at(T0, counter)
    };
    for n in 0..=overwrites {
        let opts = PutOptions {
            version: next(),
            ..Default::default()
        };
        engine
            .put(KEY, format!("value {n}").as_bytes(), opts)
            .unwrap();
        rotate(&engine, &format!("fill{n}-"), next());
    }
    let opts = DeleteOptions {
        version: next(),
        ..Default::default()
    };
    engine.delete(KEY, opts).unwrap();
    rotate(&engine, "fill-after-delete-", next());

    let layout = locate(dir.path());
    assert_eq!(
        layout.value_files.len(),
        overwrites + 1,
        "{context}: {layout:?}"
    );
    assert!(
        layout
            .value_files
            .iter()
            .all(|id| *id < layout.tombstone_file),
        "{context}: {layout:?}"
    );
    clock.advance(RETENTION_MS + 10);
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, before merge"),
    );

    let mut all_of_key = layout.value_files.clone();
    all_of_key.push(layout.tombstone_file);
    match plan {
        Plan::TombstoneFileOnly => drop(engine.merge_files(&[layout.tombstone_file]).unwrap()),
        Plan::OldFilesOnly => drop(engine.merge_files(&layout.value_files).unwrap()),
        Plan::AllFilesOfKey => drop(engine.merge_files(&all_of_key).unwrap()),
        Plan::TombstoneFileThenOldFiles => {
            engine.merge_files(&[layout.tombstone_file]).unwrap();
            assert_deleted(
                &engine,
                layout.tombstone_seq,
                &format!("{context}, between merges"),
            );
            engine.merge_files(&layout.value_files).unwrap();
        }
        Plan::Full => drop(engine.merge().unwrap()),
    }
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, after merge"),
    );
    engine.close().unwrap();

    let engine = open(&clock);
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, after clean reopen"),
    );
    drop(engine);
    let engine = open(&clock);
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, after crash reopen"),
    );
    engine.merge().unwrap();
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, after a later full merge"),
    );
    drop(engine);
    let engine = open(&clock);
    assert_deleted(
        &engine,
        layout.tombstone_seq,
        &format!("{context}, after final crash reopen"),
    );
    engine.close().unwrap();
}

const PLANS: [Plan; 5] = [
    Plan::TombstoneFileOnly,
    Plan::OldFilesOnly,
    Plan::AllFilesOfKey,
    Plan::TombstoneFileThenOldFiles,
    Plan::Full,
];

#[test]
fn tombstone_past_retention_never_resurrects_a_value_from_an_older_file() {
    for plan in PLANS {
        run(plan, 0);
    }
}

#[test]
fn tombstone_past_retention_never_resurrects_any_of_several_overwritten_values() {
    for plan in PLANS {
        run(plan, 2);
    }
}
