//! The peer engines caskade is compared with, fjall 3 (an LSM tree) and
//! redb 4 (a copy-on-write B-tree), each running the same puts and random
//! gets as caskade's `never` phase. Compiled only with the `peers` feature.
//!
//! Each peer uses its fastest setting that, like caskade's `never`, does no
//! fsync per write and commits every put on its own; [`PeerRun::setting`] says
//! exactly which, and the report prints it. Caches are sized to hold the
//! whole data set, as caskade's reads are served from the OS page cache.

use std::path::Path;

use anyhow::Context;
use redb::{ReadableDatabase, TableDefinition};

use crate::measure;
use crate::report::PeerRun;
use crate::workload::Workload;

/// Block cache for both peers: larger than the data set at the default 1M keys.
const CACHE_BYTES: u64 = 512 << 20;

/// fjall with its default journal mode: every `insert` writes its journal
/// entry and flushes it to the OS (`PersistMode::Buffer`), never fsyncs.
pub fn fjall(dir: &Path, workload: &Workload, order: &[u32]) -> anyhow::Result<PeerRun> {
    let db = fjall::Database::builder(dir)
        .cache_size(CACHE_BYTES)
        .open()
        .context("opening fjall")?;
    let items = db.keyspace("bench", fjall::KeyspaceCreateOptions::default)?;
    let puts = measure::sequential_puts(workload, |_, key, value| Ok(items.insert(key, value)?))?;
    let mut gets = [puts; 2];
    for (slot, threads) in gets.iter_mut().zip([1, 2]) {
        *slot = measure::parallel_gets(threads, order, || {
            Ok(|i: usize| {
                let value = items.get(workload.key(i))?;
                workload.check(i, value.as_deref())
            })
        })?;
    }
    Ok(PeerRun {
        name: "fjall 3",
        setting: "default journal: each insert is its own write, flushed to the OS \
                  (PersistMode::Buffer), no fsync; 512 MiB block cache",
        puts,
        gets,
    })
}

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bench");

/// redb with one write transaction per put, each committed with
/// `Durability::None` (redb's fastest commit; it needs a transaction per write).
pub fn redb(dir: &Path, workload: &Workload, order: &[u32]) -> anyhow::Result<PeerRun> {
    let db = redb::Database::builder()
        .set_cache_size(CACHE_BYTES as usize)
        .create(dir.join("bench.redb"))
        .context("creating redb")?;
    let puts = measure::sequential_puts(workload, |_, key, value| {
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        tx.open_table(TABLE)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    })?;
    // Make the load durable once, untimed, as caskade's close() does.
    let tx = db.begin_write()?;
    tx.commit()?;
    let mut gets = [puts; 2];
    for (slot, threads) in gets.iter_mut().zip([1, 2]) {
        *slot = measure::parallel_gets(threads, order, || {
            let table = db.begin_read()?.open_table(TABLE)?;
            Ok(move |i: usize| {
                let value = table.get(workload.key(i))?;
                workload.check(i, value.as_ref().map(|v| v.value()))
            })
        })?;
    }
    Ok(PeerRun {
        name: "redb 4",
        setting: "one write transaction per put, commit with Durability::None (no fsync; \
                  a crash loses every commit since the last durable one); gets share one \
                  read transaction per thread; 512 MiB cache",
        puts,
        gets,
    })
}
