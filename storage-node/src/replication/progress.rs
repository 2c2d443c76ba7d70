//! How far a node got with the last ring change it adopted, kept across
//! restarts in `<data_dir>/ring-change`.
//!
//! A ring change sends the node's cursors back to 0 and leaves it, until
//! every peer has been pulled from to its end, refusing the keys it did not
//! hold before; its peers drop the ranges they lost only once it reports
//! (`refilled_epoch`) that it pulled everything from them; and it drops the
//! ranges it lost itself once they all report the same of it. A restart in
//! the middle must not forget any of that: a node that forgot which peers
//! it still refills from would pull them as if caught up (taking only
//! what each coordinated), and one that forgot what it refilled would keep
//! every other node from dropping what it lost, for good.
//!
//! The file names the ring it belongs to (members, replication factor,
//! vnodes): a node that starts with a map of another ring (a crash after
//! the map was stored and before this file was) uses none of it, and
//! refills from every peer instead (see `handoff::restore`). It is
//! written, atomically, whenever what it holds changed: when a map is put
//! into effect, and with the cursors every `cursor_sync_ms`.
//!
//! ```text
//! ring 3 64 1,2,3,4        replication factor, vnodes, members
//! epoch 7                  the epoch of the map that gave the ring this shape
//! refill 2 7 7             peer, epoch of its refill, epoch it was refilled under (0: not yet)
//! pending 3 4              a refill under way: peers not yet pulled to their end
//! drop 7                   lost ranges waiting to be dropped, of this epoch
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::files::{bad_line, read_text, write_atomically};

/// File name of the stored progress.
const PROGRESS_FILE: &str = "ring-change";

/// What a node keeps of its last ring change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The ring's shape: members, replication factor, vnodes per node.
    pub shape: (Vec<u32>, u32, u32),
    /// The epoch of the map that gave the ring this shape.
    pub ring_epoch: u64,
    /// Peer → where this node is with refilling from it.
    pub refills: BTreeMap<u32, Refill>,
    /// Peers a refill under way has not yet pulled to their end (`None`:
    /// no refill under way).
    pub pending: Option<BTreeSet<u32>>,
    /// The epoch whose lost ranges wait to be dropped.
    pub drop: Option<u64>,
}

/// Refilling from one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refill {
    /// The epoch of the last ring change that sent the cursor back to 0.
    pub epoch: u64,
    /// The epoch of the last ring change under which the peer was pulled
    /// from to its end (0: never).
    pub done_epoch: u64,
}

impl Refill {
    /// A refill of ring change `epoch`, not done.
    pub fn started(epoch: u64) -> Refill {
        Refill {
            epoch,
            done_epoch: 0,
        }
    }
}

/// The stored progress.
#[derive(Debug)]
pub struct RingProgress {
    path: PathBuf,
    /// As loaded at start, until the node has put it into effect.
    loaded: Mutex<Option<Progress>>,
    /// As last written; also serializes writing.
    stored: Mutex<Option<Progress>>,
}

impl RingProgress {
    /// Loads the progress stored in `data_dir` (none on a first start).
    pub fn open(data_dir: &Path) -> io::Result<RingProgress> {
        let path = data_dir.join(PROGRESS_FILE);
        let loaded = match read_text(&path)? {
            Some(text) => Some(parse(&text).map_err(|line| bad_line(&path, &line))?),
            None => None,
        };
        Ok(RingProgress {
            path,
            stored: Mutex::new(loaded.clone()),
            loaded: Mutex::new(loaded),
        })
    }

    /// The progress loaded at start, once.
    pub fn take_loaded(&self) -> Option<Progress> {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Stores `progress` if it differs from what was stored. Blocks.
    pub fn store(&self, progress: Progress) -> io::Result<()> {
        let mut stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        if stored.as_ref() == Some(&progress) {
            return Ok(());
        }
        write_atomically(&self.path, format(&progress).as_bytes())?;
        *stored = Some(progress);
        Ok(())
    }
}

fn format(p: &Progress) -> String {
    let (members, rf, vnodes) = &p.shape;
    let members: Vec<String> = members.iter().map(u32::to_string).collect();
    let mut text = format!(
        "ring {rf} {vnodes} {}\nepoch {}\n",
        members.join(","),
        p.ring_epoch
    );
    for (peer, refill) in &p.refills {
        let (epoch, done) = (refill.epoch, refill.done_epoch);
        text.push_str(&format!("refill {peer} {epoch} {done}\n"));
    }
    if let Some(pending) = &p.pending {
        text.push_str("pending");
        for peer in pending {
            text.push_str(&format!(" {peer}"));
        }
        text.push('\n');
    }
    if let Some(epoch) = p.drop {
        text.push_str(&format!("drop {epoch}\n"));
    }
    text
}

fn parse(text: &str) -> Result<Progress, String> {
    let mut progress = Progress::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || line.to_string();
        let number = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let id = |s: &str| s.parse::<u32>().map_err(|_| bad());
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["ring", rf, vnodes, members] => {
                let members = members.split(',').map(id).collect::<Result<_, _>>()?;
                progress.shape = (members, id(rf)?, id(vnodes)?);
            }
            ["epoch", epoch] => progress.ring_epoch = number(epoch)?,
            ["refill", peer, epoch, done] => {
                let refill = Refill {
                    epoch: number(epoch)?,
                    done_epoch: number(done)?,
                };
                progress.refills.insert(id(peer)?, refill);
            }
            ["pending", ref peers @ ..] => {
                progress.pending = Some(peers.iter().map(|p| id(p)).collect::<Result<_, _>>()?);
            }
            ["drop", epoch] => progress.drop = Some(number(epoch)?),
            _ => return Err(bad()),
        }
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn progress_survives_a_restart_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RingProgress::open(dir.path()).unwrap().take_loaded(), None);
        let progress = Progress {
            shape: (vec![1, 2, 4], 3, 64),
            ring_epoch: 7,
            refills: BTreeMap::from([
                (
                    2,
                    Refill {
                        epoch: 7,
                        done_epoch: 7,
                    },
                ),
                (4, Refill::started(7)),
            ]),
            pending: Some(BTreeSet::from([4])),
            drop: Some(7),
        };
        RingProgress::open(dir.path())
            .unwrap()
            .store(progress.clone())
            .unwrap();
        let reopened = RingProgress::open(dir.path()).unwrap();
        assert_eq!(reopened.take_loaded(), Some(progress.clone()));
        assert_eq!(reopened.take_loaded(), None, "taken once");

        let done = Progress {
            pending: Some(BTreeSet::new()),
            drop: None,
            ..progress
        };
        reopened.store(done.clone()).unwrap();
        let text = fs::read_to_string(dir.path().join(PROGRESS_FILE)).unwrap();
        assert!(text.contains("pending\n"), "{text}");
        assert_eq!(
            RingProgress::open(dir.path()).unwrap().take_loaded(),
            Some(done)
        );

        fs::write(dir.path().join(PROGRESS_FILE), "epoch x\n").unwrap();
        let err = RingProgress::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("bad line"), "{err}");
    }
}
