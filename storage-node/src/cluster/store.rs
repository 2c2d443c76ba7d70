//! Where the Raft group's state lives on a node: `<data_dir>/raft.redb`.
//!
//! One redb database (transactional, crash-safe, every commit fsynced) holds
//! the Raft log (index → entry), the vote, the committed and last purged log
//! ids, the cluster identity, the state machine (the map, applied in the same
//! transaction as its `last_applied`) and the last snapshot. Entries and
//! metadata are JSON: the log holds a few entries per map change, so
//! readability wins over size. A crash between two transactions leaves the
//! state of the first; openraft re-applies entries after `last_applied`.
//!
//! Calls into redb block on fsync, so they run on the blocking pool.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::map::{self, Map};
use super::types::{NodeId, RaftNode, TypeConfig};
use crate::epochs::push_consecutive;

/// File name of the Raft database in the data directory.
pub const RAFT_FILE: &str = "raft.redb";

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const CLUSTER_ID: &str = "cluster_id";
const MACHINE: &str = "machine";
const SNAPSHOT: &str = "snapshot";

/// A failure of the Raft database.
#[derive(Debug, thiserror::Error)]
#[error("raft storage: {0}")]
pub struct StoreError(String);

impl StoreError {
    /// A file-system failure around the database.
    pub fn from_io(e: std::io::Error) -> StoreError {
        StoreError(e.to_string())
    }

    fn of(e: impl std::fmt::Display) -> StoreError {
        StoreError(e.to_string())
    }
}

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The Raft database of one node.
#[derive(Debug)]
pub struct RaftDb {
    /// `None` once closed. The database holds a file lock until dropped;
    /// closing it explicitly lets a node restart in the same process
    /// while tasks that hold this struct are still winding down.
    db: RwLock<Option<Database>>,
}

impl RaftDb {
    /// Opens (or creates) `<data_dir>/raft.redb`.
    pub fn open(data_dir: &Path) -> Result<RaftDb, StoreError> {
        let db = Database::create(data_dir.join(RAFT_FILE)).map_err(StoreError::of)?;
        let txn = db.begin_write().map_err(StoreError::of)?;
        txn.open_table(LOG).map_err(StoreError::of)?;
        txn.open_table(META).map_err(StoreError::of)?;
        txn.commit().map_err(StoreError::of)?;
        Ok(RaftDb {
            db: RwLock::new(Some(db)),
        })
    }

    /// Closes the database; every later call fails.
    pub fn close(&self) {
        self.db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Runs `call` on the open database.
    fn with<T>(
        &self,
        call: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => call(db),
            None => Err(StoreError("the raft database is closed".into())),
        }
    }

    /// Whether `data_dir` holds a Raft database (without creating one).
    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join(RAFT_FILE).exists()
    }

    /// A metadata value.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.with(|db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(META).map_err(StoreError::of)?;
            let Some(raw) = table.get(key).map_err(StoreError::of)? else {
                return Ok(None);
            };
            serde_json::from_slice(raw.value())
                .map(Some)
                .map_err(StoreError::of)
        })
    }

    /// Stores metadata values in one transaction.
    fn put(&self, values: &[(&str, Vec<u8>)]) -> Result<(), StoreError> {
        self.with(|db| {
            let txn = db.begin_write().map_err(StoreError::of)?;
            {
                let mut table = txn.open_table(META).map_err(StoreError::of)?;
                for (key, value) in values {
                    table
                        .insert(*key, value.as_slice())
                        .map_err(StoreError::of)?;
                }
            }
            txn.commit().map_err(StoreError::of)
        })
    }

    fn put_one<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put(&[(key, encode(value)?)])
    }

    /// Stores `snapshot` unless the stored one is of a later log entry,
    /// checked and written in one transaction.
    fn put_snapshot_if_newer(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let encoded = encode(snapshot)?;
        self.with(|db| {
            let txn = db.begin_write().map_err(StoreError::of)?;
            {
                let mut table = txn.open_table(META).map_err(StoreError::of)?;
                let stored: Option<StoredSnapshot> = match table
                    .get(SNAPSHOT)
                    .map_err(StoreError::of)?
                {
                    Some(raw) => Some(serde_json::from_slice(raw.value()).map_err(StoreError::of)?),
                    None => None,
                };
                if stored.is_some_and(|s| s.meta.last_log_id > snapshot.meta.last_log_id) {
                    return Ok(());
                }
                table
                    .insert(SNAPSHOT, encoded.as_slice())
                    .map_err(StoreError::of)?;
            }
            txn.commit().map_err(StoreError::of)
        })
    }

    /// The identity of the cluster this node belongs to, if any.
    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        self.get(CLUSTER_ID)
    }

    /// Records the cluster this node belongs to.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        self.put_one(CLUSTER_ID, &id)
    }

    fn entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        self.with(|db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(LOG).map_err(StoreError::of)?;
            let mut entries = Vec::new();
            for item in table.range::<u64>(range).map_err(StoreError::of)? {
                let (_, raw) = item.map_err(StoreError::of)?;
                entries.push(serde_json::from_slice(raw.value()).map_err(StoreError::of)?);
            }
            Ok(entries)
        })
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        self.with(|db| {
            let txn = db.begin_read().map_err(StoreError::of)?;
            let table = txn.open_table(LOG).map_err(StoreError::of)?;
            let Some((_, raw)) = table.last().map_err(StoreError::of)? else {
                return Ok(None);
            };
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(raw.value()).map_err(StoreError::of)?;
            Ok(Some(entry.log_id))
        })
    }

    fn append(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), StoreError> {
        self.with(|db| {
            let txn = db.begin_write().map_err(StoreError::of)?;
            {
                let mut table = txn.open_table(LOG).map_err(StoreError::of)?;
                for entry in &entries {
                    table
                        .insert(entry.log_id.index, encode(entry)?.as_slice())
                        .map_err(StoreError::of)?;
                }
            }
            txn.commit().map_err(StoreError::of)
        })
    }

    /// Removes entries with an index in `range`; `purged` is recorded first
    /// in the same transaction.
    fn remove(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<&LogId<NodeId>>,
    ) -> Result<(), StoreError> {
        self.with(|db| {
            let txn = db.begin_write().map_err(StoreError::of)?;
            {
                if let Some(purged) = purged {
                    let mut meta = txn.open_table(META).map_err(StoreError::of)?;
                    meta.insert(LAST_PURGED, encode(purged)?.as_slice())
                        .map_err(StoreError::of)?;
                }
                let mut table = txn.open_table(LOG).map_err(StoreError::of)?;
                table
                    .retain_in::<u64, _>(range, |_, _| false)
                    .map_err(StoreError::of)?;
            }
            txn.commit().map_err(StoreError::of)
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::of)
}

/// Runs a database call on the blocking pool.
async fn blocking<T: Send + 'static>(
    db: &Arc<RaftDb>,
    call: impl FnOnce(&RaftDb) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || call(&db))
        .await
        .map_err(StoreError::of)?
}

/// The Raft log and vote.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<RaftDb>,
}

impl LogStore {
    /// The log kept in `db`.
    pub fn new(db: Arc<RaftDb>) -> LogStore {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(&self.db, move |db| db.entries(bounds))
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let (last, purged) = blocking(&self.db, |db| {
            Ok((db.last_log_id()?, db.get::<LogId<NodeId>>(LAST_PURGED)?))
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let vote = *vote;
        blocking(&self.db, move |db| db.put_one(VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        blocking(&self.db, |db| db.get(VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        blocking(&self.db, move |db| db.put_one(COMMITTED, &committed))
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        blocking(&self.db, |db| {
            Ok(db.get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
        })
        .await
        .map_err(|e| StorageIOError::read(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let written = blocking(&self.db, move |db| db.append(entries)).await;
        match written {
            Ok(()) => {
                // The commit fsynced: the entries are durable.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let range = (Bound::Included(log_id.index), Bound::Unbounded);
        blocking(&self.db, move |db| db.remove(range, None))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let range = (Bound::Unbounded, Bound::Included(log_id.index));
        blocking(&self.db, move |db| db.remove(range, Some(&log_id)))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// The state machine: the cluster map and what Raft needs beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The last membership of the Raft group applied.
    pub membership: StoredMembership<NodeId, RaftNode>,
    /// The cluster map (`None` until the cluster has formed).
    pub map: Option<Map>,
    /// Nodes that have held Raft state (acknowledged the log) at least once.
    #[serde(default)]
    pub joined: std::collections::BTreeSet<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, RaftNode>,
    state: MachineState,
}

/// The map state machine, persisted in the Raft database at every apply.
/// It publishes every map it applies on a watch channel.
#[derive(Debug)]
pub struct MapMachine {
    db: Arc<RaftDb>,
    /// The state; the lock is held only to read or replace it, never across an await.
    state: Mutex<MachineState>,
    maps: watch::Sender<Option<Map>>,
    /// The maps applied since start, of consecutive epochs, oldest first
    /// (at most [`RECENT_MAPS`]; a snapshot installed starts it anew): a
    /// node that falls behind puts each into effect in turn.
    recent: Mutex<VecDeque<Map>>,
}

/// Most maps kept in [`MapMachine`]'s recent maps.
const RECENT_MAPS: usize = 64;

impl MapMachine {
    /// The state machine stored in `db` (empty for a new node).
    pub fn open(db: Arc<RaftDb>) -> Result<Arc<MapMachine>, StoreError> {
        let state: MachineState = db.get(MACHINE)?.unwrap_or_default();
        let maps = watch::Sender::new(state.map.clone());
        let recent = Mutex::new(state.map.iter().cloned().collect());
        Ok(Arc::new(MapMachine {
            db,
            state: Mutex::new(state),
            maps,
            recent,
        }))
    }

    /// A receiver of every map applied.
    pub fn watch(&self) -> watch::Receiver<Option<Map>> {
        self.maps.subscribe()
    }

    /// The current map.
    pub fn map(&self) -> Option<Map> {
        self.maps.borrow().clone()
    }

    /// The maps applied after epoch `after`, oldest first, one per epoch if
    /// they are all still known; otherwise only the current one (if newer).
    pub fn maps_after(&self, after: u64) -> Vec<Map> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.front().is_some_and(|m| m.epoch <= after + 1) {
            return recent.iter().filter(|m| m.epoch > after).cloned().collect();
        }
        drop(recent);
        self.map().into_iter().filter(|m| m.epoch > after).collect()
    }

    /// The nodes recorded as holding Raft state.
    pub fn joined(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .joined
            .iter()
            .copied()
            .collect()
    }

    /// Whether node `id` has held Raft state in this cluster.
    pub fn has_joined(&self, id: u32) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .joined
            .contains(&id)
    }

    fn state(&self) -> MachineState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Persists `state`, then makes it current; `applied` are the maps it
    /// went through, oldest first (`None`: a snapshot, which skips epochs).
    async fn replace(
        &self,
        state: MachineState,
        snapshot: Option<StoredSnapshot>,
        applied: Option<Vec<Map>>,
    ) -> Result<(), StoreError> {
        let mut values = vec![(MACHINE, encode(&state)?)];
        if let Some(snapshot) = &snapshot {
            values.push((SNAPSHOT, encode(snapshot)?));
        }
        blocking(&self.db, move |db| db.put(&values)).await?;
        let map = state.map.clone();
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let applied = applied.unwrap_or_else(|| {
                recent.clear();
                map.iter().cloned().collect()
            });
            for next in applied {
                push_consecutive(&mut recent, next, |m| m.epoch, RECENT_MAPS);
            }
        }
        self.maps.send_if_modified(|current| {
            let changed = *current != map;
            *current = map;
            changed
        });
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for Arc<MapMachine> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, RaftNode>)> {
        let state = self.state();
        Ok((state.last_applied, state.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<map::Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state();
        let mut outcomes = Vec::new();
        let mut applied = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => state.map.clone().ok_or(map::Refused::NoMap),
                EntryPayload::Normal(command) => {
                    if let map::Change::Joined(id) = command.change {
                        state.joined.insert(id);
                    }
                    let outcome = map::apply(state.map.as_ref(), &command);
                    match &outcome {
                        Ok(next) => {
                            if let map::Change::Remove(id) = command.change {
                                // Added again later, it starts afresh.
                                state.joined.remove(&id);
                            }
                            if state.map.as_ref() != Some(next) {
                                tracing::info!(epoch = next.epoch, change = ?command.change, "cluster map changed");
                                applied.push(next.clone());
                            }
                            state.map = Some(next.clone());
                        }
                        Err(refused) => {
                            tracing::info!(change = ?command.change, %refused, "cluster map change refused");
                        }
                    }
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    state.map.clone().ok_or(map::Refused::NoMap)
                }
            };
            outcomes.push(outcome);
        }
        self.replace(state, None, Some(applied))
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // openraft builds the snapshot later, on a task of its own: it must
        // be of the state as of now, not of whatever is applied by then.
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            state: self.state(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<MachineState>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<MachineState>,
    ) -> StorageResult<()> {
        let state = *snapshot;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state: state.clone(),
        };
        self.replace(state, Some(stored), None)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored = blocking(&self.db, |db| db.get::<StoredSnapshot>(SNAPSHOT))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(s.state),
        }))
    }
}

/// A snapshot of the state machine as it was when openraft asked for it.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<RaftDb>,
    state: MachineState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let state = self.state.clone();
        let snapshot_id = match state.last_applied {
            Some(last) => format!("{}-{}", last.leader_id, last.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state: state.clone(),
        };
        // A snapshot installed meanwhile may be newer: never replace it
        // with an older one (the log before it may be purged already).
        blocking(&self.db, move |db| db.put_snapshot_if_newer(&stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(state),
        })
    }
}
