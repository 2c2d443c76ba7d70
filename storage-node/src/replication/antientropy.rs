//! Anti-entropy: the replicas of a range compare digests of what they hold
//! and copy what differs. Replication alone relies on each coordinator to
//! deliver its own writes (a caught-up puller takes from a peer only the
//! records that peer coordinated), so a write that reached some replicas
//! but not all (its coordinator crashed, or lost its unsynced tail, before
//! a replica pulled it) would otherwise stay where it is.
//!
//! Every `anti_entropy_interval_ms` a node asks each peer that is up for
//! the digests of the keys both replicate under the current epoch, split
//! into [`BUCKETS`] buckets by a hash of the key. A bucket's digest is the
//! XOR of a hash of (key, version) over each such key's latest record,
//! tombstones and expired values included. The node computes its own; for
//! the buckets that differ it lists the keys and versions the peer holds
//! (`Snapshot` with `only_buckets` and `versions_only`), then fetches the
//! records of the keys whose version is newer there (`only_keys`, 1,000 a
//! call) and applies them: last writer wins, so only newer versions change
//! anything. The peer does the same in its own rounds, so what this node
//! holds newer reaches it too.
//!
//! Digests and listings walk the keydir in pages (no data file is read;
//! the keydir lock is taken once per page); only fetched records are read.
//! Deletes travel as tombstones like any record: nothing is deleted
//! because a peer lacks a key.
//!
//! Older than the tombstone retention, nothing is repaired onto a node
//! that holds no record of the key: merges drop tombstones and expired
//! values after the retention, at different times on different nodes, so
//! such a node may have deleted the key and dropped the tombstone, and an
//! old value copied back would undo the delete. The digests leave those
//! old deletes out for the same reason (both sides use the asker's
//! cutoff), so that merges do not make digests differ for good.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::clock_offset::PeerChannel;
use crate::peers::PeerLinks;
use caskade_common::Version;
use caskade_common::limits::validate_key;
use caskade_common::version::unix_millis;
use caskade_proto::replication_client::ReplicationClient;
use caskade_proto::{DigestRequest, ReplicatedRecord, SnapshotRequest};
use metrics::counter;
use prost::bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::Placement;
use super::puller::{channel, copy_snapshot};
use super::service::{MAX_CLOCK_AHEAD_MS, apply_now, from_proto, latest_to_proto};
use crate::engine::Record;
use crate::kv::NodeCore;
use crate::status::engine_status;

/// Buckets per exchange: a differing key costs listing its bucket's keys
/// and versions, about 1/1024 of the keys two nodes share.
pub const BUCKETS: u32 = 1024;
/// Most buckets a peer may ask for.
pub const MAX_BUCKETS: u32 = 1 << 16;
/// Keydir entries read under one hold of its lock.
const DIGEST_PAGE: usize = 4096;
/// Seed of the bucket hash (the ring hashes keys unseeded).
const BUCKET_SEED: u64 = 0x6361_736b_6164_6521;
/// One digest, or one fetch of records, answers within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys and versions per page of a differing buckets' listing.
const LISTING_PAGE: u32 = 4096;
/// Most keys one fetch of records may name.
const MAX_FETCH: usize = 1000;

/// The bucket of `key` among `buckets`.
pub fn bucket_of(key: &[u8], buckets: u32) -> u32 {
    (xxh3_64_with_seed(key, BUCKET_SEED) % u64::from(buckets.max(1))) as u32
}

/// What one record adds to its bucket's digest.
fn record_hash(key: &[u8], version: Version) -> u64 {
    let mut bytes = Vec::with_capacity(key.len() + 12);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&version.hlc.to_le_bytes());
    bytes.extend_from_slice(&version.origin.to_le_bytes());
    xxh3_64(&bytes)
}

/// Whether both `me` and `peer` replicate `key` under `placement`.
pub fn shared(placement: &Placement, me: u32, peer: u32, key: &[u8]) -> bool {
    placement.ring.owns(me, key) && placement.ring.owns(peer, key)
}

/// The digests, in `buckets` buckets, of the keys this node and `peer`
/// both replicate under `placement`.
/// Deletes and expired values with versions before `retired_before_ms`
/// are left out.
pub fn digests(
    core: &NodeCore,
    placement: &Placement,
    peer: u32,
    buckets: u32,
    retired_before_ms: u64,
) -> Result<Vec<u64>, Status> {
    let mut digests = vec![0u64; buckets as usize];
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = core
            .engine
            .scan_including_deleted(b"", after.as_deref(), DIGEST_PAGE)
            .map_err(|e| engine_status(&e))?;
        for entry in &page {
            let retired = entry.deleted && entry.version.physical_ms() < retired_before_ms;
            if !retired && shared(placement, core.id, peer, &entry.key) {
                digests[bucket_of(&entry.key, buckets) as usize] ^=
                    record_hash(&entry.key, entry.version);
            }
        }
        match page.last() {
            Some(last) if page.len() == DIGEST_PAGE => after = Some(last.key.clone()),
            _ => return Ok(digests),
        }
    }
}

/// What one exchange with a peer found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Exchange {
    /// Buckets whose digests differed.
    pub differing: usize,
    /// Records copied from the peer that were newer here.
    pub repaired: u64,
}

/// Compares the ranges shared with `peer` and copies what differs.
async fn exchange(
    core: &Arc<NodeCore>,
    links: &PeerLinks,
    placement: &Arc<Placement>,
    peer: u32,
) -> Result<Exchange, Status> {
    let addr = placement
        .addrs
        .get(&peer)
        .ok_or_else(|| Status::invalid_argument(format!("node {peer} is not in the map")))?;
    let channel = channel(addr, links).map_err(|e| Status::unavailable(e.to_string()))?;
    let retention = core.engine.tombstone_retention().as_millis() as u64;
    let cutoff = unix_millis().saturating_sub(retention);
    let request = DigestRequest {
        node_id: core.id,
        epoch: placement.epoch,
        buckets: BUCKETS,
        retired_before_ms: cutoff,
    };
    let theirs = tokio::time::timeout(
        CALL_TIMEOUT,
        ReplicationClient::new(channel.clone()).digest(request),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("digest timed out"))??
    .into_inner()
    .digests;
    let mine = {
        let placement = Arc::clone(placement);
        core.read(move |core| digests(core, &placement, peer, BUCKETS, cutoff))
            .await?
    };
    if theirs.len() != mine.len() {
        return Err(Status::internal(format!(
            "node {peer} answered {} digests for {BUCKETS} buckets",
            theirs.len()
        )));
    }
    let differing: Vec<u32> = (0..BUCKETS)
        .filter(|&b| theirs[b as usize] != mine[b as usize])
        .collect();
    if differing.is_empty() {
        return Ok(Exchange::default());
    }
    let repaired = copy_newer(core, links, addr, placement, differing.clone(), cutoff).await?;
    Ok(Exchange {
        differing: differing.len(),
        repaired,
    })
}

/// Lists the keys and versions the peer at `addr` holds in the `differing`
/// buckets, page by page, and for each page fetches and applies the
/// records newer there: values cross the wire, and are read from the
/// peer's data files, only for what this node lacks. Returns how many
/// records were newer here.
async fn copy_newer(
    core: &Arc<NodeCore>,
    links: &PeerLinks,
    addr: &str,
    placement: &Placement,
    differing: Vec<u32>,
    cutoff: u64,
) -> Result<u64, Status> {
    let epoch = placement.epoch;
    let fetching = ReplicationClient::new(
        channel(addr, links).map_err(|e| Status::unavailable(e.to_string()))?,
    )
    .max_decoding_message_size(usize::MAX);
    let listing = SnapshotRequest {
        node_id: core.id,
        epoch,
        max_records: LISTING_PAGE,
        buckets: BUCKETS,
        only_buckets: differing,
        versions_only: true,
        ..SnapshotRequest::default()
    };
    let copied = copy_snapshot(links, addr, listing, |listed| {
        let (core, mut client) = (Arc::clone(core), fetching.clone());
        async move {
            let reader = Arc::clone(&core);
            let newer = reader
                .read(move |core| Ok(newer_there(core, cutoff, &listed)))
                .await?;
            let mut applied = 0;
            for keys in newer.chunks(MAX_FETCH) {
                applied += fetch(&core, &mut client, epoch, cutoff, keys).await?;
            }
            Ok(applied)
        }
    })
    .await?;
    Ok(copied.applied)
}

/// Fetches the latest records of `keys` (at most [`MAX_FETCH`]) from the
/// peer and applies them; how many were newer here. An answer that stops
/// at its size limit is continued from the key it names.
async fn fetch(
    core: &Arc<NodeCore>,
    client: &mut ReplicationClient<PeerChannel>,
    epoch: u64,
    cutoff: u64,
    mut keys: &[Bytes],
) -> Result<usize, Status> {
    let mut applied = 0;
    while !keys.is_empty() {
        let request = SnapshotRequest {
            node_id: core.id,
            epoch,
            only_keys: keys.to_vec(),
            ..SnapshotRequest::default()
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.snapshot(request))
            .await
            .map_err(|_| Status::deadline_exceeded("fetching records timed out"))??
            .into_inner();
        let records = answer
            .records
            .into_iter()
            .map(from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let core = Arc::clone(core);
        applied += core
            .write(move |core| apply_repairs(core, epoch, cutoff, records))
            .await?;
        keys = match answer.next {
            Some(next) => match keys.iter().position(|k| *k == next) {
                Some(at) if at > 0 => &keys[at..],
                _ => return Err(Status::internal("a fetch answered no progress")),
            },
            None => &[],
        };
    }
    Ok(applied)
}

/// The keys of a listing (`versions_only`) whose version there is newer
/// than what this node holds, leaving out what [`apply_repairs`] would.
fn newer_there(core: &NodeCore, cutoff: u64, listed: &[Record]) -> Vec<Bytes> {
    let ahead = unix_millis().saturating_add(MAX_CLOCK_AHEAD_MS);
    listed
        .iter()
        .filter(|theirs| {
            let physical = theirs.version.physical_ms();
            physical <= ahead
                && match core.engine.held_version(&theirs.key) {
                    Some((mine, _)) => theirs.version > mine,
                    None => physical >= cutoff,
                }
        })
        .map(|theirs| Bytes::copy_from_slice(&theirs.key))
        .collect()
}

/// Refuses a snapshot request whose anti-entropy fields make no sense
/// together: a listing (`versions_only`) is of buckets only, and a fetch
/// (`only_keys`) names at most [`MAX_FETCH`] valid keys and nothing else.
pub(super) fn check_request(request: &SnapshotRequest) -> Result<(), Status> {
    if request.versions_only && request.buckets == 0 {
        return Err(Status::invalid_argument(
            "versions_only lists anti-entropy buckets: buckets must be set",
        ));
    }
    if request.only_keys.is_empty() {
        return Ok(());
    }
    if request.primary_only
        || request.versions_only
        || request.buckets > 0
        || !request.after.is_empty()
    {
        return Err(Status::invalid_argument(
            "only_keys goes with no other choice of keys and no page position",
        ));
    }
    if request.only_keys.len() > MAX_FETCH {
        return Err(Status::invalid_argument(format!(
            "{} keys; at most {MAX_FETCH} are allowed",
            request.only_keys.len()
        )));
    }
    for key in &request.only_keys {
        validate_key(key).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(())
}

/// The latest records of a fetch's `only_keys` that this node and the
/// asking one both replicate under `placement`, in the order asked, up to
/// `max_bytes` of values (at least one record); the first key not looked
/// at when the answer is full.
pub(super) fn latest_of(
    core: &NodeCore,
    placement: &Placement,
    request: &SnapshotRequest,
    max_bytes: usize,
) -> Result<(Vec<ReplicatedRecord>, Option<Bytes>), Status> {
    let mut records = Vec::new();
    let mut bytes = 0;
    for key in &request.only_keys {
        if bytes >= max_bytes {
            return Ok((records, Some(key.clone())));
        }
        if !shared(placement, core.id, request.node_id, key) {
            continue;
        }
        if let Some(latest) = core.engine.latest(key).map_err(|e| engine_status(&e))? {
            let record = latest_to_proto(key, latest);
            bytes += record.key.len() + record.value.len();
            records.push(record);
        }
    }
    Ok((records, None))
}

/// Refuses to take part in an exchange while this node does not hold all
/// of its ranges (catching up after a start, or receiving ranges): a key
/// it still holds that the others deleted, with the tombstone merged away
/// since, would otherwise be copied back to them.
pub fn check_holds_all_ranges(core: &NodeCore) -> Result<(), Status> {
    if core.replication.is_ready() && core.replication.holds_all_ranges() {
        Ok(())
    } else {
        Err(Status::unavailable(
            "this node does not hold all of its ranges yet; no anti-entropy exchange",
        ))
    }
}

/// Applies records an exchange under map `epoch` copied, by
/// last-writer-wins; how many were newer here. The exchange stops if the
/// map changed (its ranges may have); records of keys this node does not
/// replicate with the peer are left out, so are versions far ahead of this
/// node's clock, and so are records older than `cutoff` of keys this node
/// holds no record of (see the module documentation).
fn apply_repairs(
    core: &NodeCore,
    epoch: u64,
    cutoff: u64,
    records: Vec<Record>,
) -> Result<usize, Status> {
    let _placement = core.replication.hold_placement();
    let placement = core
        .replication
        .placement()
        .filter(|p| p.epoch == epoch)
        .ok_or_else(|| Status::aborted("the cluster map changed during the exchange"))?;
    let ahead = unix_millis().saturating_add(MAX_CLOCK_AHEAD_MS);
    let mut wanted = Vec::with_capacity(records.len());
    for record in records {
        let physical = record.version.physical_ms();
        if !placement.ring.owns(core.id, &record.key) || physical > ahead {
            continue;
        }
        if physical < cutoff
            && core
                .engine
                .latest(&record.key)
                .map_err(|e| engine_status(&e))?
                .is_none()
        {
            continue;
        }
        wanted.push(record);
    }
    apply_now(core, wanted)
}

/// The buckets a snapshot request restricts itself to, if any.
pub fn requested_buckets(request: &SnapshotRequest) -> Option<(u32, HashSet<u32>)> {
    (request.buckets > 0).then(|| {
        (
            request.buckets,
            request.only_buckets.iter().copied().collect(),
        )
    })
}

/// Up to half of `period`, different at every call.
fn jitter(period: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    period.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// Runs anti-entropy rounds every `anti_entropy_interval_ms` until `stop`.
pub async fn run(core: Arc<NodeCore>, links: PeerLinks, mut stop: watch::Receiver<bool>) {
    let interval = core.replication.config.anti_entropy_interval_ms;
    if interval == 0 {
        return;
    }
    let period = Duration::from_millis(interval);
    let node = core.id.to_string();
    // Nodes started together do not all walk their keydirs at once.
    let mut next = period + jitter(period);
    loop {
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        next = period;
        let Some(placement) = core.replication.placement() else {
            continue;
        };
        if check_holds_all_ranges(&core).is_err() || !placement.ring.contains(core.id) {
            continue;
        }
        let peers: Vec<u32> = placement
            .peers_of(core.id)
            .into_iter()
            .filter(|p| placement.ring.contains(*p) && !placement.down.contains(p))
            .collect();
        let mut complete = true;
        for peer in peers {
            let result = tokio::select! {
                result = exchange(&core, &links, &placement, peer) => result,
                _ = stop.wait_for(|s| *s) => return,
            };
            let labels = [("node", node.clone()), ("peer", peer.to_string())];
            match result {
                Ok(found) => {
                    counter!("caskade_node_anti_entropy_exchanges_total", &labels).increment(1);
                    counter!("caskade_node_anti_entropy_buckets_differing_total", &labels)
                        .increment(found.differing as u64);
                    counter!("caskade_node_anti_entropy_keys_repaired_total", &labels)
                        .increment(found.repaired);
                    if found.repaired > 0 {
                        tracing::info!(
                            peer,
                            buckets = found.differing,
                            repaired = found.repaired,
                            "anti-entropy copied records this node lacked"
                        );
                    }
                    core.replication.note_anti_entropy(found.repaired);
                }
                Err(status) => {
                    complete = false;
                    counter!("caskade_node_anti_entropy_failures_total", &labels).increment(1);
                    tracing::debug!(peer, error = %status.message(), "anti-entropy exchange failed");
                }
            }
        }
        if complete {
            // Published with the other gauges at every scrape.
            core.replication.note_full_anti_entropy();
        }
    }
}
