//! Opening a data directory: lock it, finish an interrupted merge, load
//! every data file (from its hint when it has a trustworthy one), recover
//! the active file's torn tail, and build the keydir.
//!
//! Recovery rules. The active file (the newest log file) is the only one a
//! crash can leave half-written, because rotation fsyncs a file before it
//! becomes immutable and merge outputs are synced before their commit: so an
//! invalid record in the active file marks the end of what was written and
//! is truncated away (logged with file, offset and bytes dropped). An
//! invalid record in any other file, or one followed by valid records in the
//! active file, is damage: `EngineError::Corrupt`, or, with
//! `Options::repair`, skipped, logged and counted, and the file rewritten.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use super::Inner;
use super::datafile::{self, DataFile, FILE_HEADER_LEN, FileKind, HeaderState, RecordReader};
use super::error::{EngineError, IoContext};
use super::hint::{self, HintProblem};
use super::key::Key;
use super::keydir::{Entry, Keydir};
use super::options::Options;
use super::record::{self, Header};
use super::state::{State, sync_dir};
use super::writer::Writer;

/// One record found while loading: enough to build its keydir entry.
struct Loaded {
    key: Key,
    seq: u64,
    entry: Entry,
}

/// Opens the store in `dir`; also returns the immutable files that need a
/// hint file written (by the background thread, not to delay start-up).
pub(super) fn open(dir: &Path, opts: Options) -> Result<(Inner, Vec<u32>), EngineError> {
    opts.validate()?;
    fs::create_dir_all(dir).ctx("create directory", dir)?;
    let dir = dir.canonicalize().ctx("resolve", dir)?;
    let lock_file = lock_dir(&dir)?;

    let mut state = State::load(&dir).ctx("read state in", &dir)?;
    if let Some(pending) = state.pending_merge.take() {
        tracing::info!(inputs = ?pending.inputs, outputs = ?pending.outputs, "finishing an interrupted merge");
        for &id in &pending.outputs {
            for (tmp, path) in [
                (merge_tmp_data(&dir, id), datafile::data_path(&dir, id)),
                (merge_tmp_hint(&dir, id), datafile::hint_path(&dir, id)),
            ] {
                if tmp.exists() {
                    fs::rename(&tmp, &path).ctx("rename", &tmp)?;
                }
            }
        }
        for &id in &pending.inputs {
            remove_if_exists(&datafile::data_path(&dir, id))?;
            remove_if_exists(&datafile::hint_path(&dir, id))?;
        }
        sync_dir(&dir).ctx("sync", &dir)?;
        state.store(&dir).ctx("write state in", &dir)?;
    }

    // Leftovers of work a crash interrupted before it counted: merge outputs
    // that never committed, and temporary hint or state files.
    let mut ids = Vec::new();
    for dirent in fs::read_dir(&dir).ctx("list", &dir)? {
        let dirent = dirent.ctx("list", &dir)?;
        let name = dirent.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".merge") || name.ends_with(".tmp") {
            remove_if_exists(&dirent.path())?;
        } else if let Some(id) = datafile::parse_data_name(&name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    // A hint without its data file belongs to a file merge removed; a new
    // file reusing the id must not inherit it.
    for dirent in fs::read_dir(&dir).ctx("list", &dir)? {
        let path = dirent.ctx("list", &dir)?.path();
        let orphan =
            path.extension().is_some_and(|e| e == "hint") && !path.with_extension("data").exists();
        if orphan {
            remove_if_exists(&path)?;
        }
    }

    let mut files = BTreeMap::new();
    let mut active_id = None;
    for &id in &ids {
        let path = datafile::data_path(&dir, id);
        let (file, header) = DataFile::open(path.clone(), id).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => EngineError::Corrupt {
                file: path.clone(),
                offset: 0,
                reason: "not a caskade data file header",
            },
            _ => EngineError::Io {
                op: "open",
                path: path.clone(),
                source: e,
            },
        })?;
        if matches!(
            header,
            HeaderState::Valid(FileKind::Log) | HeaderState::Torn
        ) {
            active_id = Some(id);
        }
        files.insert(id, (file, header));
    }

    let mut loaded: Vec<Loaded> = Vec::new();
    let mut repaired = 0u64;
    let mut need_hint = Vec::new();
    let mut damaged = Vec::new();
    let mut retire_active = false;
    for (&id, (file, header)) in &files {
        let is_active = Some(id) == active_id;
        if let HeaderState::Torn = header {
            if !is_active {
                return Err(EngineError::Corrupt {
                    file: file.path.clone(),
                    offset: 0,
                    reason: "data file shorter than its header",
                });
            }
            tracing::warn!(file = %file.path.display(), "active file has a torn header: starting it afresh");
            file.reset_torn().ctx("rewrite header of", &file.path)?;
            continue;
        }
        let mark = loaded.len();
        let mut from = FILE_HEADER_LEN;
        if !opts.repair {
            let hint_path = datafile::hint_path(&dir, id);
            match hint::load(&hint_path, file.len(), |e, key| {
                loaded.push(loaded_from(id, e.offset, &e.header, key));
            }) {
                Ok(covered) => from = covered,
                Err(problem) => {
                    loaded.truncate(mark);
                    match problem {
                        HintProblem::Missing => {}
                        HintProblem::Invalid(why) => {
                            tracing::warn!(hint = %hint_path.display(), why, "ignoring hint file")
                        }
                        HintProblem::Io(e) => {
                            tracing::warn!(hint = %hint_path.display(), error = %e, "ignoring unreadable hint file")
                        }
                    }
                    if !is_active {
                        need_hint.push(id);
                    }
                }
            }
        } else if !is_active {
            need_hint.push(id);
        }
        let skipped = scan(file, from, is_active, opts.repair, &mut loaded)?;
        if skipped > 0 {
            damaged.push(id);
            repaired += skipped;
        }
        if skipped > 0 && is_active {
            // The damaged active file is rewritten below like any other
            // damaged file; writes go to a fresh one.
            retire_active = true;
        }
        if let (Some(min), Some(max)) = (
            loaded[mark..].iter().map(|l| l.seq).min(),
            loaded[mark..].iter().map(|l| l.seq).max(),
        ) {
            file.note_seq(min);
            file.note_seq(max);
        }
    }

    // The latest record of each key wins; seq orders every write this
    // engine ever made, across files and merges. Hint files hold runs
    // sorted by (key, seq), so `loaded` is mostly a few long sorted runs,
    // which the stable sort detects and merges in linear passes.
    loaded.sort_by(|a, b| a.key.cmp(&b.key).then(a.seq.cmp(&b.seq)));
    // Of each run of one key keep the last (highest seq), counting the
    // others as dead bytes of their files.
    let mut dead_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    loaded.dedup_by(|later, kept| {
        if later.key != kept.key {
            return false;
        }
        std::mem::swap(later, kept);
        *dead_bytes.entry(later.entry.file_id).or_default() +=
            later.entry.record_len(later.key.as_bytes().len());
        true
    });
    let keydir = Keydir::from_sorted(loaded.into_iter().map(|l| (l.key, l.entry)));

    let mut next_file_id = ids.last().map_or(1, |id| id + 1);
    let mut table = BTreeMap::new();
    for (id, (file, _)) in files {
        file.add_dead(dead_bytes.get(&id).copied().unwrap_or(0));
        table.insert(id, Arc::new(file));
    }
    if retire_active {
        active_id = None;
    }
    let active = match active_id.and_then(|id| table.get(&id)) {
        Some(f) => Arc::clone(f),
        None => {
            let id = next_file_id;
            next_file_id += 1;
            let path = datafile::data_path(&dir, id);
            let f = DataFile::create(path.clone(), id, FileKind::Log).ctx("create", &path)?;
            f.sync_data().ctx("sync", &path)?;
            sync_dir(&dir).ctx("sync", &dir)?;
            let f = Arc::new(f);
            table.insert(id, Arc::clone(&f));
            f
        }
    };
    for file in table.values().filter(|f| f.id != active.id) {
        file.seal();
    }
    let max_seq = table.values().map(|f| f.max_seq()).max().unwrap_or(0);
    // Seqs are reserved in `STATE` before they are handed out, so no record
    // is above the floor, except in a directory written before seqs were
    // reserved: a lost tail's seqs may then be above every record, and the
    // next numbers start a reservation's width further on.
    let next_seq = if max_seq > state.seq_floor {
        max_seq + super::writer::SEQ_RESERVATION + 1
    } else {
        state.seq_floor + 1
    };
    tracing::info!(
        dir = %dir.display(),
        keys = keydir.len(),
        files = table.len(),
        next_seq,
        repaired,
        "engine open"
    );

    let inner = Inner {
        dir,
        opts,
        keydir: RwLock::new(keydir),
        files: RwLock::new(table),
        writer: Mutex::new(Writer::new(active, next_seq)),
        commit: Default::default(),
        merge_lock: Mutex::new(()),
        syncing: Mutex::new(()),
        state: Mutex::new(state),
        poisoned: OnceLock::new(),
        full: AtomicBool::new(false),
        merge_broken: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        maintenance: Default::default(),
        next_file_id: AtomicU32::new(next_file_id),
        merges: AtomicU64::new(0),
        last_fsync_micros: AtomicU64::new(u64::MAX),
        repaired_records: repaired,
        _lock_file: lock_file,
    };
    if !damaged.is_empty() {
        // Rewrite the damaged files now, so the next open (without repair)
        // finds a clean store instead of the same damage.
        inner.merge_with(Some(&damaged), true, None)?;
    }
    Ok((inner, need_hint))
}

fn loaded_from(file_id: u32, offset: u32, header: &Header, key: &[u8]) -> Loaded {
    Loaded {
        key: Key::new(key),
        seq: header.seq,
        entry: Entry::new(
            file_id,
            offset,
            header.version,
            header.expires_at,
            header.value_len,
            header.is_tombstone(),
        ),
    }
}

/// Reads the records of `file` from `from` to its end into `loaded`.
/// Returns how many damaged records repair skipped.
fn scan(
    file: &DataFile,
    from: u64,
    is_active: bool,
    repair: bool,
    loaded: &mut Vec<Loaded>,
) -> Result<u64, EngineError> {
    let len = file.len();
    let mut reader = RecordReader::new(file, from, len);
    let mut skipped = 0;
    loop {
        match reader.next_record().ctx("read", &file.path)? {
            Ok(Some(found)) => {
                let key = record::key_of(reader.bytes(&found), &found.header);
                loaded.push(loaded_from(
                    file.id,
                    found.offset as u32,
                    &found.header,
                    key,
                ));
            }
            Ok(None) => return Ok(skipped),
            Err((offset, bad)) => {
                // A torn tail of the active file has no valid record after
                // it. Anything else is damage in the middle of acknowledged
                // data: refuse it, or skip it under repair.
                let corrupt = || EngineError::Corrupt {
                    file: file.path.clone(),
                    offset,
                    reason: bad.reason(),
                };
                if !is_active && !repair {
                    return Err(corrupt());
                }
                let resumed = reader.resync_after(offset).ctx("read", &file.path)?;
                if is_active && resumed >= len {
                    tracing::warn!(
                        file = %file.path.display(),
                        offset,
                        dropped_bytes = len - offset,
                        reason = bad.reason(),
                        "truncating the torn tail of the active file"
                    );
                    file.truncate(offset).ctx("truncate", &file.path)?;
                    return Ok(skipped);
                }
                if !repair {
                    return Err(corrupt());
                }
                tracing::warn!(
                    file = %file.path.display(),
                    offset,
                    skipped_bytes = resumed - offset,
                    reason = bad.reason(),
                    "repair: skipping a damaged record"
                );
                skipped += 1;
            }
        }
    }
}

/// Takes the directory's exclusive lock, held until the engine is dropped.
fn lock_dir(dir: &Path) -> Result<fs::File, EngineError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .ctx("open", &path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(EngineError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(EngineError::Io {
            op: "lock",
            path,
            source: e,
        }),
    }
}

pub(super) fn remove_if_exists(path: &Path) -> Result<(), EngineError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(EngineError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Temporary name of merge output data file `id` before its commit.
pub(super) fn merge_tmp_data(dir: &Path, id: u32) -> std::path::PathBuf {
    dir.join(format!("{id:010}.data.merge"))
}

/// Temporary name of merge output hint file `id` before its commit.
pub(super) fn merge_tmp_hint(dir: &Path, id: u32) -> std::path::PathBuf {
    dir.join(format!("{id:010}.hint.merge"))
}
