//! The `STATE` file: the few facts about a data directory that no record
//! carries, and the commit record of a merge in progress.
//!
//! - `seq_floor`: every seq ever assigned is at or below this. The writer
//!   reserves seqs here ahead of use and merge raises it to what it drops,
//!   so a restart never hands out a seq twice, even if the newest records
//!   were merged away or lost with an unsynced tail.
//! - `tombstone_horizon`: the highest seq of a tombstone merge has dropped;
//!   a catch-up cursor below it cannot be served incrementally.
//! - `pending_merge`: written at a merge's commit point, cleared when it is
//!   done. Its presence at open means "finish this merge": rename the outputs
//!   into place and delete the inputs.
//!
//! The file is replaced atomically (write temporary, fsync, rename, fsync
//! the directory) and checksummed, so it is either the old or the new state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CASKSTAT";
const FORMAT: u16 = 1;
/// File name of the state file in a data directory.
pub const STATE_FILE: &str = "STATE";

/// A merge that has committed but may not have finished.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingMerge {
    /// Data files to delete.
    pub inputs: Vec<u32>,
    /// Data files to rename into place.
    pub outputs: Vec<u32>,
}

/// The contents of `STATE`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// No seq above this was ever assigned (reserved by the writer,
    /// raised by merge).
    pub seq_floor: u64,
    /// Highest seq of a tombstone dropped by merge.
    pub tombstone_horizon: u64,
    /// A committed merge not yet finished.
    pub pending_merge: Option<PendingMerge>,
}

impl State {
    /// Reads `dir/STATE`; a missing file is the empty state, a damaged one an error.
    pub fn load(dir: &Path) -> io::Result<State> {
        let raw = match fs::read(dir.join(STATE_FILE)) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(e),
        };
        decode(&raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "STATE file is damaged"))
    }

    /// Replaces `dir/STATE` atomically and durably.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let tmp = self.prepare(dir)?;
        install(&tmp, dir)
    }

    /// Writes and syncs `dir/STATE.tmp`, the first half of
    /// [`store`](State::store): when it fails `STATE` is untouched (and a
    /// partial `STATE.tmp` removed). Returns the temporary file's path.
    pub fn prepare(&self, dir: &Path) -> io::Result<PathBuf> {
        let tmp = dir.join("STATE.tmp");
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(&encode(self))?;
                file.sync_all()
            });
        match written {
            Ok(()) => Ok(tmp),
            Err(error) => {
                let _ = fs::remove_file(&tmp);
                Err(error)
            }
        }
    }
}

/// Puts a prepared `STATE.tmp` in place of `STATE`, durably. After a failure
/// either may be the one on disk.
pub fn install(tmp: &Path, dir: &Path) -> io::Result<()> {
    fs::rename(tmp, dir.join(STATE_FILE))?;
    sync_dir(dir)
}

/// fsyncs a directory, making renames and new files in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn encode(state: &State) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&state.seq_floor.to_le_bytes());
    out.extend_from_slice(&state.tombstone_horizon.to_le_bytes());
    let empty = PendingMerge::default();
    let pending = state.pending_merge.as_ref();
    out.push(u8::from(pending.is_some()));
    for ids in [
        &pending.unwrap_or(&empty).inputs,
        &pending.unwrap_or(&empty).outputs,
    ] {
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(raw: &[u8]) -> Option<State> {
    let (body, crc) = raw.split_at_checked(raw.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let mut r = body.strip_prefix(MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = r.split_at_checked(n)?;
        r = rest;
        Some(head)
    };
    if take(2)? != FORMAT.to_le_bytes() {
        return None;
    }
    let seq_floor = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let tombstone_horizon = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let has_pending = take(1)?[0] == 1;
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
        for _ in 0..n {
            list.push(u32::from_le_bytes(take(4)?.try_into().ok()?));
        }
    }
    let [inputs, outputs] = lists;
    Some(State {
        seq_floor,
        tombstone_horizon,
        pending_merge: has_pending.then_some(PendingMerge { inputs, outputs }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let state = State {
            seq_floor: 42,
            tombstone_horizon: 7,
            pending_merge: Some(PendingMerge {
                inputs: vec![1, 2],
                outputs: vec![9],
            }),
        };
        let raw = encode(&state);
        assert_eq!(decode(&raw), Some(state));
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "byte {i}");
        }
        assert_eq!(decode(&raw[..raw.len() - 1]), None);
        assert_eq!(decode(&encode(&State::default())), Some(State::default()));
    }
}
