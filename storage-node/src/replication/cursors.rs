//! Per-peer catch-up cursors: the highest sequence number of each peer's log
//! up to which this node holds every record of its ranges, and the
//! incarnation of the peer that log belongs to.
//!
//! Kept in `<data_dir>/replication-cursors` as `<peer id> <seq> <incarnation>`
//! lines, replaced atomically. A cursor may only be stored once the records
//! it covers are durable here, so [`Cursors::persist`] syncs the engine
//! first: after a crash a cursor can lag behind the data (those records are
//! pulled again and ignored as already held), never run ahead of it (they
//! would be skipped for good).
//!
//! The incarnation matters because a peer that crashes under `interval` or
//! `never` durability loses its unsynced tail and numbers new records with
//! the same sequence numbers again: a cursor from before its crash is only
//! good up to where its new incarnation started.
//!
//! A map change sends every cursor back to 0 ([`Cursors::reset`]); it bumps a
//! generation, and a pull that started before the reset may not move a
//! cursor afterwards ([`Cursors::advance`]).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::engine::{Engine, EngineError};
use crate::files::{bad_line, read_text, write_atomically};

/// File name of the stored cursors.
const CURSORS_FILE: &str = "replication-cursors";

/// Where this node is in one peer's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every record of this node's ranges up to here is held.
    pub seq: u64,
    /// The peer's incarnation the sequence number belongs to (0: unknown).
    pub incarnation: u64,
}

/// A cursor as read before a pull, with the generation to advance it under.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// The cursor.
    pub cursor: Cursor,
    /// The generation when it was read.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Current {
    cursors: BTreeMap<u32, Cursor>,
    generation: u64,
}

/// The cursors, in memory and as last stored.
#[derive(Debug)]
pub struct Cursors {
    path: PathBuf,
    /// Peer id → cursor, as applied, and the reset generation.
    current: Mutex<Current>,
    /// As last written to the file; also serializes writing it.
    stored: Mutex<BTreeMap<u32, Cursor>>,
}

impl Cursors {
    /// Loads the cursors stored in `data_dir` (none on a first start).
    pub fn open(data_dir: &Path) -> io::Result<Cursors> {
        let path = data_dir.join(CURSORS_FILE);
        let stored = match read_text(&path)? {
            Some(text) => parse(&text).map_err(|line| bad_line(&path, &line))?,
            None => BTreeMap::new(),
        };
        Ok(Cursors {
            path,
            current: Mutex::new(Current {
                cursors: stored.clone(),
                generation: 0,
            }),
            stored: Mutex::new(stored),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cursor for `peer` (seq 0: nothing pulled yet).
    pub fn get(&self, peer: u32) -> Cursor {
        self.lock().cursors.get(&peer).copied().unwrap_or_default()
    }

    /// The cursor for `peer`, read before a pull.
    pub fn read(&self, peer: u32) -> Reading {
        let current = self.lock();
        Reading {
            cursor: current.cursors.get(&peer).copied().unwrap_or_default(),
            generation: current.generation,
        }
    }

    /// Moves the cursor for `peer` to `cursor` unless the cursors were reset
    /// since `reading` was taken; whether it moved.
    pub fn advance(&self, peer: u32, reading: Reading, cursor: Cursor) -> bool {
        let mut current = self.lock();
        if current.generation != reading.generation {
            return false;
        }
        current.cursors.insert(peer, cursor);
        true
    }

    /// Sends the cursors of `peers` back to 0 (a map change: their ranges
    /// are pulled again from the start).
    pub fn reset(&self, peers: impl IntoIterator<Item = u32>) {
        let mut current = self.lock();
        current.generation += 1;
        for peer in peers {
            let cursor = current.cursors.entry(peer).or_default();
            cursor.seq = 0;
        }
    }

    /// Forgets `peer` (it left the cluster).
    pub fn remove(&self, peer: u32) {
        self.lock().cursors.remove(&peer);
    }

    /// Syncs `engine`, then stores the cursors if they changed. Blocks.
    pub fn persist(&self, engine: &Engine) -> Result<(), EngineError> {
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        // Read before the sync: every record these cursors cover was applied
        // before this point, so the sync makes it durable.
        let current = self.lock().cursors.clone();
        if current == *stored {
            return Ok(());
        }
        engine.sync()?;
        let text: String = current
            .iter()
            .map(|(peer, c)| format!("{peer} {} {}\n", c.seq, c.incarnation))
            .collect();
        write_atomically(&self.path, text.as_bytes()).map_err(|source| {
            EngineError::io("store replication cursors in", &self.path, source)
        })?;
        *stored = current;
        Ok(())
    }
}

fn parse(text: &str) -> Result<BTreeMap<u32, Cursor>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let bad = || line.to_string();
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (peer, seq, incarnation) = match fields[..] {
                [peer, seq] => (peer, seq, "0"),
                [peer, seq, incarnation] => (peer, seq, incarnation),
                _ => return Err(bad()),
            };
            Ok((
                peer.parse().map_err(|_| bad())?,
                Cursor {
                    seq: seq.parse().map_err(|_| bad())?,
                    incarnation: incarnation.parse().map_err(|_| bad())?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::engine::Options;

    #[test]
    fn cursors_survive_a_restart_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("data"), Options::default()).unwrap();
        let cursors = Cursors::open(dir.path()).unwrap();
        assert_eq!(cursors.get(2), Cursor::default());
        let at = |seq, incarnation| Cursor { seq, incarnation };
        for (peer, cursor) in [(2, at(41, 9)), (3, at(7, 8)), (2, at(42, 9))] {
            let reading = cursors.read(peer);
            assert!(cursors.advance(peer, reading, cursor));
        }
        cursors.persist(&engine).unwrap();
        let reopened = Cursors::open(dir.path()).unwrap();
        assert_eq!((reopened.get(2), reopened.get(3)), (at(42, 9), at(7, 8)));

        fs::write(dir.path().join(CURSORS_FILE), "2 x\n").unwrap();
        let err = Cursors::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("bad line"), "{err}");
    }

    #[test]
    fn a_pull_that_started_before_a_reset_cannot_move_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let cursors = Cursors::open(dir.path()).unwrap();
        let before = cursors.read(2);
        cursors.reset([2]);
        let moved = cursors.advance(
            2,
            before,
            Cursor {
                seq: 500,
                incarnation: 1,
            },
        );
        assert!(!moved);
        assert_eq!(cursors.get(2).seq, 0);
    }
}
