//! Per-peer catch-up cursors: the highest sequence number of each peer's log
//! up to which this node holds every record of its ranges.
//!
//! Kept in `<data_dir>/replication-cursors` as `<peer id> <seq>` lines,
//! replaced atomically. A cursor may only be stored once the records it
//! covers are durable here, so [`Cursors::persist`] syncs the engine first:
//! after a crash a cursor can lag behind the data (those records are pulled
//! again and ignored as already held), never run ahead of it (they would be
//! skipped for good).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::admin::write_atomically;
use crate::engine::{Engine, EngineError};

/// File name of the stored cursors.
const CURSORS_FILE: &str = "replication-cursors";

/// The cursors, in memory and as last stored.
#[derive(Debug)]
pub struct Cursors {
    path: PathBuf,
    /// Peer id → cursor, as applied.
    current: Mutex<BTreeMap<u32, u64>>,
    /// As last written to the file; also serializes writing it.
    stored: Mutex<BTreeMap<u32, u64>>,
}

impl Cursors {
    /// Loads the cursors stored in `data_dir` (none on a first start).
    pub fn open(data_dir: &Path) -> io::Result<Cursors> {
        let path = data_dir.join(CURSORS_FILE);
        let stored = match fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|line| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: bad line {line:?}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Cursors {
            path,
            current: Mutex::new(stored.clone()),
            stored: Mutex::new(stored),
        })
    }

    /// The cursor for `peer` (0: nothing pulled yet).
    pub fn get(&self, peer: u32) -> u64 {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .copied()
            .unwrap_or(0)
    }

    /// Moves the cursor for `peer` to `seq` (also backwards: a peer whose
    /// log restarted is pulled from its start).
    pub fn set(&self, peer: u32, seq: u64) {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer, seq);
    }

    /// Forgets `peer` (it left the cluster).
    pub fn remove(&self, peer: u32) {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
    }

    /// Syncs `engine`, then stores the cursors if they changed. Blocks.
    pub fn persist(&self, engine: &Engine) -> Result<(), EngineError> {
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        // Read before the sync: every record these cursors cover was applied
        // before this point, so the sync makes it durable.
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if current == *stored {
            return Ok(());
        }
        engine.sync()?;
        let text: String = current
            .iter()
            .map(|(peer, seq)| format!("{peer} {seq}\n"))
            .collect();
        write_atomically(&self.path, text.as_bytes()).map_err(|source| EngineError::Io {
            op: "store replication cursors in",
            path: self.path.clone(),
            source,
        })?;
        *stored = current;
        Ok(())
    }
}

fn parse(text: &str) -> Result<BTreeMap<u32, u64>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(peer), Some(seq), None) => Ok((
                    peer.parse().map_err(|_| line.to_string())?,
                    seq.parse().map_err(|_| line.to_string())?,
                )),
                _ => Err(line.to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Options;

    #[test]
    fn cursors_survive_a_restart_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("data"), Options::default()).unwrap();
        let cursors = Cursors::open(dir.path()).unwrap();
        assert_eq!(cursors.get(2), 0);
        cursors.set(2, 41);
        cursors.set(3, 7);
        cursors.set(2, 42);
        cursors.persist(&engine).unwrap();
        let reopened = Cursors::open(dir.path()).unwrap();
        assert_eq!((reopened.get(2), reopened.get(3)), (42, 7));

        fs::write(dir.path().join(CURSORS_FILE), "2 x\n").unwrap();
        let err = Cursors::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("bad line"), "{err}");
    }
}
