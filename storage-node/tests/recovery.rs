//! Crash recovery from damaged files: a data file cut at every byte of its
//! last records, or with garbage after them, opens with every complete record
//! and takes new writes; a bit flipped inside an immutable file is reported as
//! `Corrupt` naming the file and the record's offset, is confined to its key
//! when a hint file exists, and is skipped and counted by a repair open; a
//! failed fsync poisons the engine for writes but loses nothing acknowledged.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use caskade_node::engine::{
    DeleteOptions, Durability, Engine, EngineError, FaultHook, FaultPoint, Options, PutOptions,
    WriteOutcome,
};
use common::{
    DiskRecord, MockClock, T0, copy_dir, data_file_ids, data_path, hint_path, read_records,
    test_options, version_at,
};

/// Large enough that the torn-tail tests never rotate.
const ONE_FILE: u64 = 1 << 20;

/// What a write did, for replaying a prefix of the log as the expected state.
#[derive(Debug, Clone)]
enum LogEntry {
    Put(String, Vec<u8>),
    Delete(String),
}

fn put(engine: &Engine, key: &str, value: &[u8], counter: u16) {
    let opts = PutOptions {
        version: version_at(T0, counter),
        ..Default::default()
    };
    let outcome = engine.put(key.as_bytes(), value, opts).unwrap();
    assert!(
        matches!(outcome, WriteOutcome::Applied { .. }),
        "{outcome:?}"
    );
}

fn delete(engine: &Engine, key: &str, counter: u16) {
    let opts = DeleteOptions {
        version: version_at(T0, counter),
        ..Default::default()
    };
    let outcome = engine.delete(key.as_bytes(), opts).unwrap();
    assert!(
        matches!(outcome, WriteOutcome::Applied { .. }),
        "{outcome:?}"
    );
}

/// The key -> value state after the first `n` writes of `log`.
fn state_after(log: &[LogEntry], n: usize) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut state = BTreeMap::new();
    for write in &log[..n] {
        match write {
            LogEntry::Put(k, v) => state.insert(k.clone(), Some(v.clone())),
            LogEntry::Delete(k) => state.insert(k.clone(), None),
        };
    }
    state
}

fn assert_state(engine: &Engine, state: &BTreeMap<String, Option<Vec<u8>>>, context: &str) {
    for (key, value) in state {
        let got = engine.get(key.as_bytes()).unwrap().map(|v| v.value);
        assert_eq!(&got, value, "{context}: key {key:?}");
    }
    let live: Vec<Vec<u8>> = state
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k.as_bytes().to_vec())
        .collect();
    let scanned: Vec<Vec<u8>> = engine
        .scan(b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(scanned, live, "{context}: scan of everything");
}

/// Writes a log of puts and deletes into one file and crashes (no close, so no
/// hint for the active file). Returns the log and the file's records on disk.
fn write_log_and_crash(dir: &Path, clock: &MockClock) -> (Vec<LogEntry>, Vec<DiskRecord>, u32) {
    let engine = Engine::open(dir, test_options(clock, ONE_FILE)).unwrap();
    let mut log = Vec::new();
    let mut counter = 0u16;
    for i in 0..12 {
        counter += 1;
        let key = format!("k{i:02}");
        let value = format!("value of {key}, written #{counter}").into_bytes();
        put(&engine, &key, &value, counter);
        log.push(LogEntry::Put(key, value));
    }
    // The last three records: an overwrite, a tombstone and a fresh key, so
    // that a cut can tear each kind of record.
    counter += 1;
    put(&engine, "k03", b"k03 overwritten", counter);
    log.push(LogEntry::Put("k03".into(), b"k03 overwritten".to_vec()));
    counter += 1;
    delete(&engine, "k05", counter);
    log.push(LogEntry::Delete("k05".into()));
    counter += 1;
    put(&engine, "k99", b"the very last record", counter);
    log.push(LogEntry::Put(
        "k99".into(),
        b"the very last record".to_vec(),
    ));
    drop(engine);

    let ids = data_file_ids(dir);
    assert_eq!(ids.len(), 1, "expected a single data file, found {ids:?}");
    let records = read_records(&data_path(dir, ids[0]));
    assert_eq!(
        records.len(),
        log.len(),
        "records on disk vs writes acknowledged"
    );
    (log, records, ids[0])
}

/// After recovery the store must take a write that survives the next crash:
/// proves the torn tail was cut off, not merely skipped by the reader.
fn assert_new_write_survives_crash(
    dir: &Path,
    clock: &MockClock,
    mut state: BTreeMap<String, Option<Vec<u8>>>,
    context: &str,
) {
    let engine = Engine::open(dir, test_options(clock, ONE_FILE)).unwrap();
    put(&engine, "after-recovery", b"written after recovery", 900);
    drop(engine);
    let engine = Engine::open(dir, test_options(clock, ONE_FILE)).unwrap();
    state.insert(
        "after-recovery".into(),
        Some(b"written after recovery".to_vec()),
    );
    assert_state(&engine, &state, context);
    engine.close().unwrap();
}

#[test]
fn active_file_cut_at_every_byte_of_its_last_records_keeps_every_complete_record() {
    let clock = MockClock::new(T0);
    let original = tempfile::tempdir().unwrap();
    let (log, records, id) = write_log_and_crash(original.path(), &clock);

    let first_cut = records[records.len() - 3].offset;
    let file_len = fs::metadata(data_path(original.path(), id)).unwrap().len();
    assert_eq!(file_len, records.last().unwrap().end());

    for cut in first_cut..=file_len {
        let context = format!("cut at byte {cut} of {file_len}");
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let file = OpenOptions::new()
            .write(true)
            .open(data_path(copy.path(), id))
            .unwrap();
        file.set_len(cut).unwrap();
        drop(file);

        let complete = records.iter().filter(|r| r.end() <= cut).count();
        let expected = state_after(&log, complete);
        let engine = Engine::open(copy.path(), test_options(&clock, ONE_FILE))
            .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        assert_state(&engine, &expected, &context);
        // The torn record's key, if it is new, must not be visible either.
        if complete < log.len() && !expected.contains_key("k99") {
            assert_eq!(engine.get(b"k99").unwrap(), None, "{context}");
        }
        drop(engine);
        assert_new_write_survives_crash(copy.path(), &clock, expected, &context);
    }
}

/// A crash that loses the unsynced tail of the active file (`interval` or
/// `never` durability) does not make the next start hand out the lost
/// records' seqs again: a replica that pulled them holds a cursor past
/// them, and would skip new records numbered below it for good. Three
/// crashes in a row each lose what was written since the one before.
#[test]
fn seqs_lost_with_an_unsynced_tail_are_never_handed_out_again() {
    let modes = [
        Durability::Always,
        Durability::Interval(Duration::from_secs(3600)),
        Durability::Never,
    ];
    for durability in modes {
        let clock = MockClock::new(T0);
        let dir = tempfile::tempdir().unwrap();
        let (_, records, id) = write_log_and_crash(dir.path(), &clock);
        let mut handed_out = records.iter().map(|r| r.seq).max().unwrap();
        lose_records_after(dir.path(), id, records[records.len() - 4].seq);

        for crash in 0..3u16 {
            let options = Options {
                durability,
                ..test_options(&clock, ONE_FILE)
            };
            let engine = Engine::open(dir.path(), options).unwrap();
            let mut first = None;
            for n in 0..3u16 {
                let opts = PutOptions {
                    version: version_at(T0, 1000 + crash * 10 + n),
                    ..Default::default()
                };
                let outcome = engine
                    .put(b"after", b"written after a crash", opts)
                    .unwrap();
                let WriteOutcome::Applied { seq, .. } = outcome else {
                    panic!("{outcome:?}");
                };
                assert!(
                    seq > handed_out,
                    "{durability:?}, crash {crash}: seq {seq} was handed out before (up to {handed_out})"
                );
                handed_out = seq;
                first.get_or_insert(seq);
            }
            drop(engine);
            let newest = *data_file_ids(dir.path()).last().unwrap();
            lose_records_after(dir.path(), newest, first.unwrap() - 1);
        }
    }
}

/// A write that cannot reserve its seq in `STATE` is refused and writes
/// nothing; once `STATE` can be written again, writes go on.
#[test]
fn a_write_whose_seq_cannot_be_reserved_is_refused_and_writes_nothing() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    write_log_and_crash(dir.path(), &clock);
    for (round, durability) in [Durability::Always, Durability::Never]
        .into_iter()
        .enumerate()
    {
        let options = Options {
            durability,
            ..test_options(&clock, ONE_FILE)
        };
        let engine = Engine::open(dir.path(), options).unwrap();
        let before = (
            engine.stats().last_seq,
            engine.iter_since(0).unwrap().count(),
        );
        // `STATE` is replaced through `STATE.tmp`: a directory there fails it.
        fs::create_dir(dir.path().join("STATE.tmp")).unwrap();
        let opts = PutOptions {
            version: version_at(T0, 2000 + round as u16),
            ..Default::default()
        };
        let refused = engine.put(b"refused", b"v", opts);
        assert!(
            matches!(refused, Err(EngineError::Io { .. })),
            "{durability:?}: {refused:?}"
        );
        let after = (
            engine.stats().last_seq,
            engine.iter_since(0).unwrap().count(),
        );
        assert_eq!(after, before, "{durability:?}");
        let held = engine.get(b"refused").unwrap().map(|v| v.version);
        assert!(held < Some(opts.version), "{durability:?}: {held:?}");
        fs::remove_dir(dir.path().join("STATE.tmp")).unwrap();
        let outcome = engine.put(b"refused", b"v", opts).unwrap();
        assert!(
            matches!(outcome, WriteOutcome::Applied { .. }),
            "{outcome:?}"
        );
        engine.close().unwrap();
    }
}

/// Cuts data file `id` before its first record with a seq above `seq`, as
/// a crash that loses the unsynced tail does.
fn lose_records_after(dir: &Path, id: u32, seq: u64) {
    let path = data_path(dir, id);
    let records = read_records(&path);
    let cut = records
        .iter()
        .find(|r| r.seq > seq)
        .map_or_else(|| fs::metadata(&path).unwrap().len(), |r| r.offset);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(cut).unwrap();
}

#[test]
fn garbage_after_the_last_record_of_the_active_file_is_truncated_on_open() {
    let clock = MockClock::new(T0);
    let original = tempfile::tempdir().unwrap();
    let (log, records, id) = write_log_and_crash(original.path(), &clock);
    let file_len = records.last().unwrap().end();
    let expected = state_after(&log, log.len());

    // A header that parses (plausible lengths) but whose CRC is wrong.
    let mut bad_crc = vec![0xde, 0xad, 0xbe, 0xef];
    bad_crc.extend_from_slice(&999u64.to_le_bytes()); // seq
    bad_crc.extend_from_slice(&version_at(T0, 1000).hlc.to_le_bytes());
    bad_crc.extend_from_slice(&1u32.to_le_bytes()); // origin
    bad_crc.extend_from_slice(&0u64.to_le_bytes()); // expires_at
    bad_crc.push(0); // flags
    bad_crc.extend_from_slice(&3u32.to_le_bytes()); // key_len
    bad_crc.extend_from_slice(&5u32.to_le_bytes()); // value_len
    let mut header_only = bad_crc.clone();
    bad_crc.extend_from_slice(b"k77hello");
    // A header announcing a value far longer than the file.
    header_only[37..41].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let mut noise = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..57 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x as u8);
    }

    let garbage: [(&str, Vec<u8>); 7] = [
        ("one zero byte", vec![0]),
        ("a zeroed header", vec![0; 41]),
        ("zeroed blocks", vec![0; 4096]),
        ("0xff bytes", vec![0xff; 100]),
        ("noise", noise),
        ("a record with a bad crc", bad_crc),
        ("a header announcing a long value", header_only),
    ];
    for (what, bytes) in garbage {
        let context = format!("garbage: {what}");
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let path = data_path(copy.path(), id);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();

        let engine = Engine::open(copy.path(), test_options(&clock, ONE_FILE))
            .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            file_len,
            "{context}: the tail was not truncated on open"
        );
        assert_state(&engine, &expected, &context);
        drop(engine);
        assert_new_write_survives_crash(copy.path(), &clock, expected.clone(), &context);
    }
}

#[test]
fn fresh_active_file_with_a_torn_file_header_opens_with_all_older_files() {
    // A crash right after rotation can leave the new file empty or with part
    // of its header: the store must open with everything in older files.
    let clock = MockClock::new(T0);
    let original = tempfile::tempdir().unwrap();
    let engine = Engine::open(original.path(), test_options(&clock, 4096)).unwrap();
    let mut written = BTreeMap::new();
    for i in 0..30u16 {
        let key = format!("key{i:02}");
        let value = format!("{key}:").repeat(40).into_bytes();
        put(&engine, &key, &value, i + 1);
        written.insert(key, Some(value));
    }
    drop(engine);
    let ids = data_file_ids(original.path());
    assert!(ids.len() >= 3, "{ids:?}");
    let active = *ids.last().unwrap();
    // Keys whose only record is in the newest file are lost with it.
    for record in read_records(&data_path(original.path(), active)) {
        written.remove(std::str::from_utf8(&record.key).unwrap());
    }

    for cut in 0..=common::FILE_HEADER_LEN {
        let context = format!("newest file cut to {cut} bytes");
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let file = OpenOptions::new()
            .write(true)
            .open(data_path(copy.path(), active))
            .unwrap();
        file.set_len(cut).unwrap();
        drop(file);
        let engine = Engine::open(copy.path(), test_options(&clock, 4096))
            .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        assert_state(&engine, &written, &context);
        drop(engine);
        let copy_dir_path = copy.path().to_path_buf();
        let engine = Engine::open(&copy_dir_path, test_options(&clock, 4096)).unwrap();
        put(&engine, "after-recovery", b"written after recovery", 900);
        drop(engine);
        let engine = Engine::open(&copy_dir_path, test_options(&clock, 4096)).unwrap();
        let mut expected = written.clone();
        expected.insert(
            "after-recovery".into(),
            Some(b"written after recovery".to_vec()),
        );
        assert_state(&engine, &expected, &context);
    }
}

#[test]
fn bit_flip_before_the_tail_of_the_active_file_does_not_silently_drop_later_records() {
    // Damage followed by valid records is not a torn tail: truncating there
    // would silently lose acknowledged writes. Refusing to open (Corrupt) or
    // skipping only the damaged record are both acceptable.
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let (log, records, id) = write_log_and_crash(dir.path(), &clock);
    let victim = &records[4];
    flip_bit(&data_path(dir.path(), id), victim.end() - 3);
    match Engine::open(dir.path(), test_options(&clock, ONE_FILE)) {
        Err(err) => assert_corrupt_at(err, dir.path(), id, victim.offset, "open"),
        Ok(engine) => {
            let mut expected = state_after(&log, log.len());
            expected.remove(std::str::from_utf8(&victim.key).unwrap());
            let lost: Vec<&String> = expected
                .iter()
                .filter(|(key, value)| {
                    engine.get(key.as_bytes()).unwrap().map(|v| v.value) != **value
                })
                .map(|(key, _)| key)
                .collect();
            assert!(
                lost.is_empty(),
                "open succeeded after damage at offset {} but lost the acknowledged \
                 writes to {lost:?} that follow it",
                victim.offset
            );
        }
    }
}

/// Fills several files (closing cleanly, so every immutable file has a hint)
/// and returns the values written, keyed by name. Keys are all distinct.
fn fill_several_files(dir: &Path, clock: &MockClock) -> BTreeMap<String, Vec<u8>> {
    let engine = Engine::open(dir, test_options(clock, 4096)).unwrap();
    let mut written = BTreeMap::new();
    let mut i = 0u16;
    while engine.files().len() < 4 {
        let key = format!("key{i:04}");
        let value = format!("{key}:").repeat(30).into_bytes();
        put(&engine, &key, &value, i + 1);
        written.insert(key, value);
        i += 1;
    }
    engine.close().unwrap();
    written
}

/// The damaged record: the middle record of the second data file (immutable).
fn victim(dir: &Path) -> (u32, DiskRecord) {
    let ids = data_file_ids(dir);
    let id = ids[1];
    let records = read_records(&data_path(dir, id));
    assert!(
        records.len() >= 3,
        "file {id} holds only {} records",
        records.len()
    );
    (id, records[records.len() / 2].clone())
}

fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

fn assert_corrupt_at(err: EngineError, dir: &Path, id: u32, offset: u64, context: &str) {
    match err {
        EngineError::Corrupt {
            file,
            offset: got,
            reason,
        } => {
            assert_eq!(
                file.file_name(),
                data_path(dir, id).file_name(),
                "{context}: Corrupt names the wrong file ({reason})"
            );
            assert_eq!(
                got, offset,
                "{context}: Corrupt names the wrong offset ({reason})"
            );
        }
        other => panic!("{context}: expected Corrupt, got {other}"),
    }
}

fn assert_others_intact(engine: &Engine, written: &BTreeMap<String, Vec<u8>>, damaged: &[u8]) {
    for (key, value) in written {
        if key.as_bytes() != damaged {
            let got = engine.get(key.as_bytes()).unwrap().map(|v| v.value);
            assert_eq!(got.as_ref(), Some(value), "key {key}");
        }
    }
}

#[test]
fn bit_flip_in_an_immutable_file_without_hint_fails_open_naming_file_and_offset() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    fill_several_files(dir.path(), &clock);
    let (id, record) = victim(dir.path());
    // One bit in the middle of the value, one in the key-length field.
    for (what, at) in [
        ("value bit", record.offset + record.len - 10),
        ("key_len bit", record.offset + 34),
    ] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        fs::remove_file(hint_path(copy.path(), id)).unwrap();
        flip_bit(&data_path(copy.path(), id), at);
        let err = Engine::open(copy.path(), test_options(&clock, 4096))
            .err()
            .unwrap_or_else(|| panic!("{what}: open of a damaged immutable file succeeded"));
        assert_corrupt_at(err, copy.path(), id, record.offset, what);
    }
}

#[test]
fn repair_open_skips_and_counts_a_damaged_record_and_keeps_all_others() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let written = fill_several_files(dir.path(), &clock);
    let (id, record) = victim(dir.path());
    // Repair must ignore hints, so it finds the damage with or without one;
    // a damaged length field must not cost the records after it either.
    for (what, at, keep_hint) in [
        ("value bit, no hint", record.offset + record.len - 10, false),
        (
            "value bit, hint kept",
            record.offset + record.len - 10,
            true,
        ),
        ("key_len bit, no hint", record.offset + 34, false),
    ] {
        let context = what.to_string();
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        if !keep_hint {
            fs::remove_file(hint_path(copy.path(), id)).unwrap();
        }
        flip_bit(&data_path(copy.path(), id), at);
        let options = Options {
            repair: true,
            ..test_options(&clock, 4096)
        };
        let engine = Engine::open(copy.path(), options)
            .unwrap_or_else(|e| panic!("{context}: repair open failed: {e}"));
        assert!(
            engine.stats().repaired_records >= 1,
            "{context}: {:?}",
            engine.stats()
        );
        assert_eq!(
            engine.get(&record.key).unwrap(),
            None,
            "{context}: damaged key"
        );
        assert_others_intact(&engine, &written, &record.key);
        let scanned = engine.scan(b"", None, usize::MAX).unwrap().len();
        assert_eq!(scanned, written.len() - 1, "{context}: scan count");
    }
}

#[test]
fn bit_flip_in_a_hinted_immutable_file_fails_only_reads_of_that_key() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let written = fill_several_files(dir.path(), &clock);
    let (id, record) = victim(dir.path());
    assert!(
        hint_path(dir.path(), id).exists(),
        "a clean close leaves a hint for file {id}"
    );
    flip_bit(&data_path(dir.path(), id), record.offset + record.len - 10);

    let engine = Engine::open(dir.path(), test_options(&clock, 4096)).unwrap();
    let err = engine
        .get(&record.key)
        .expect_err("get of the damaged record must fail");
    assert_corrupt_at(err, dir.path(), id, record.offset, "get");
    assert_others_intact(&engine, &written, &record.key);
}

/// Opens an engine whose fsyncs fail while the returned flag is set, writes
/// ten acknowledged keys, then puts `doomed` with fsync failing and checks
/// that put fails. Returns the engine (fsync working again) and the acked state.
fn engine_after_failed_fsync(
    dir: &Path,
    clock: &MockClock,
) -> (Engine, BTreeMap<String, Option<Vec<u8>>>) {
    let armed = Arc::new(AtomicBool::new(false));
    let fsyncs_failed = Arc::new(AtomicU64::new(0));
    let hook: FaultHook = {
        let armed = Arc::clone(&armed);
        let failed = Arc::clone(&fsyncs_failed);
        Arc::new(move |point| {
            if point == FaultPoint::Fsync && armed.load(Ordering::SeqCst) {
                failed.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::other("injected fsync failure"));
            }
            Ok(())
        })
    };
    let options = Options {
        fault_hook: Some(hook),
        ..test_options(clock, ONE_FILE)
    };
    let engine = Engine::open(dir, options).unwrap();
    let mut acked = BTreeMap::new();
    for i in 0..10u16 {
        let key = format!("acked{i}");
        let value = format!("value {i}").into_bytes();
        put(&engine, &key, &value, i + 1);
        acked.insert(key, Some(value));
    }

    armed.store(true, Ordering::SeqCst);
    let opts = PutOptions {
        version: version_at(T0, 100),
        ..Default::default()
    };
    // Its record was appended: whether it survives is unknown, and the
    // error must say so (a coordinator must not report it as refused).
    match engine.put(b"doomed", b"never acknowledged", opts) {
        Err(EngineError::OutcomeUnknown(_)) => {}
        other => panic!("put whose fsync failed: expected an unknown outcome, got {other:?}"),
    }
    assert!(
        fsyncs_failed.load(Ordering::SeqCst) >= 1,
        "the fsync hook was never called"
    );
    // From here on fsync works again: the engine must stay poisoned anyway,
    // since it cannot know what reached the disk.
    armed.store(false, Ordering::SeqCst);
    (engine, acked)
}

#[test]
fn failed_fsync_poisons_writes_keeps_reads_and_loses_nothing_acknowledged() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut acked) = engine_after_failed_fsync(dir.path(), &clock);
    let later = PutOptions {
        version: version_at(T0, 101),
        ..Default::default()
    };
    assert!(
        matches!(
            engine.put(b"later", b"x", later),
            Err(EngineError::Poisoned(_))
        ),
        "put after a failed fsync"
    );
    let del = DeleteOptions {
        version: version_at(T0, 102),
        ..Default::default()
    };
    assert!(
        matches!(engine.delete(b"acked0", del), Err(EngineError::Poisoned(_))),
        "delete after a failed fsync"
    );
    // Whether the failed put is visible is the next test's concern.
    let mut readable = acked.clone();
    if let Some(v) = engine.get(b"doomed").unwrap() {
        readable.insert("doomed".into(), Some(v.value));
    }
    assert_state(&engine, &readable, "reads on the poisoned engine");
    drop(engine);

    let engine = Engine::open(dir.path(), test_options(&clock, ONE_FILE)).unwrap();
    // The put whose fsync failed may or may not have reached the disk; if it
    // did, it must be whole.
    if let Some(v) = engine.get(b"doomed").unwrap() {
        assert_eq!(
            v.value, b"never acknowledged",
            "a half-written put came back wrong"
        );
        acked.insert("doomed".into(), Some(v.value));
    }
    assert_state(&engine, &acked, "after reopen");
    assert_eq!(engine.get(b"later").unwrap(), None);
    put(&engine, "after-reopen", b"ok", 200);
    assert_eq!(engine.get(b"after-reopen").unwrap().unwrap().value, b"ok");
    engine.close().unwrap();
}

/// A write reported as failed is never served to readers: under `Always` the
/// keydir learns of a record only after the fsync that makes it durable.
#[test]
fn write_whose_fsync_failed_is_not_visible_to_readers() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let (engine, acked) = engine_after_failed_fsync(dir.path(), &clock);
    assert_eq!(
        engine.get(b"doomed").unwrap(),
        None,
        "get serves a put that returned an error"
    );
    assert!(
        engine.scan(b"doomed", None, 10).unwrap().is_empty(),
        "scan lists a failed put"
    );
    assert_state(&engine, &acked, "reads on the poisoned engine");
}
