//! A full disk is a refusal, not a failure: writes are refused with a typed
//! error (507 through the router) and change nothing, reads go on, nothing
//! written before is damaged, and once space is freed writes are accepted
//! again without a restart.
//!
//! Each test mounts a small tmpfs (`SmallDisk`), so it needs root; without
//! it the test prints why and passes, except in CI, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use caskade_common::Version;
use caskade_node::engine::{
    DeleteOptions, Durability, Engine, EngineError, MergeOptions, Options, PutOptions, WriteOutcome,
};
use caskade_proto::{GetRequest, ReadLevel};
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use caskade_tests::disk::SmallDisk;
use reqwest::StatusCode;

/// The tmpfs each engine test runs on.
const DISK_BYTES: u64 = 4 << 20;
/// Files rotate every few puts, so rotations meet the full disk too.
const FILE_BYTES: u64 = 256 << 10;

fn options(durability: Durability, max_file_size: u64) -> Options {
    Options {
        max_file_size,
        durability,
        merge: MergeOptions {
            auto: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    }
}

/// Value `n`: of varying length (1-40 KiB), so that records end at every
/// kind of offset when the disk runs out.
fn value(n: u64) -> Vec<u8> {
    let len = 1024 + (n * 7919 % 40) as usize * 1024;
    format!("value-{n}|").repeat(len / 8).into_bytes()
}

fn version(n: u64) -> Version {
    Version::from_parts(1_700_000_000_000 + n, 0, 1)
}

fn is_full(error: &EngineError) -> bool {
    matches!(error, EngineError::StorageFull { .. })
}

/// Puts keys until the disk refuses `refusals` of them in a row (each a
/// `StorageFull`; any other error fails the test); returns the acknowledged.
/// Puts key `n` with value `n`: `Some(seq)` if stored, `None` if refused
/// for lack of space; any other answer fails the test.
fn put_n(engine: &Engine, n: u64) -> Option<u64> {
    let key = key(n);
    let put = engine.put(
        key.as_bytes(),
        &value(n),
        PutOptions {
            version: version(n),
            ..Default::default()
        },
    );
    match put {
        Ok(WriteOutcome::Applied { seq, .. }) => Some(seq),
        Ok(other) => panic!("put {key}: {other:?}"),
        Err(error) if is_full(&error) => None,
        Err(error) => panic!("put {key} on a full disk: {error}"),
    }
}

fn key(n: u64) -> String {
    format!("key-{n:06}")
}

/// Refused writes leave no gap in the seqs of the stored ones (the
/// replication feed expects none): each is `last_seq + 1`.
fn put_until_full(
    engine: &Engine,
    first: u64,
    refusals: usize,
    last_seq: &mut u64,
) -> (BTreeMap<String, Vec<u8>>, u64) {
    let mut acknowledged = BTreeMap::new();
    let mut refused = 0;
    let mut n = first;
    while refused < refusals {
        match put_n(engine, n) {
            Some(seq) => {
                assert_eq!(seq, *last_seq + 1, "{}: a gap in the seqs", key(n));
                *last_seq = seq;
                acknowledged.insert(key(n), value(n));
                refused = 0;
            }
            None => refused += 1,
        }
        n += 1;
        assert!(n < first + 10_000, "the disk never filled");
    }
    (acknowledged, n)
}

fn check_reads(engine: &Engine, acknowledged: &BTreeMap<String, Vec<u8>>) {
    for (key, expected) in acknowledged {
        let got = engine
            .get(key.as_bytes())
            .unwrap_or_else(|e| panic!("get {key}: {e}"))
            .unwrap_or_else(|| panic!("acknowledged {key} is missing"));
        assert_eq!(&got.value, expected, "{key}");
    }
    let stored = engine.scan(b"", None, usize::MAX).unwrap().len();
    assert_eq!(
        stored,
        acknowledged.len(),
        "refused writes must not be stored"
    );
}

/// Fills the disk, checks refusals and reads while it is full, frees space,
/// writes again, and reopens to check what is on disk.
fn full_and_freed(durability: Durability, file_bytes: u64) {
    let Some(disk) = SmallDisk::mount(DISK_BYTES) else {
        return;
    };
    let dir = disk.path().join("engine");
    let engine = Engine::open(&dir, options(durability, file_bytes)).unwrap();
    disk.fill_leaving(1 << 20).unwrap();

    let mut last_seq = engine.stats().last_seq;
    let (mut acknowledged, next) = put_until_full(&engine, 0, 20, &mut last_seq);
    assert!(
        acknowledged.len() > 5,
        "only {} puts fit",
        acknowledged.len()
    );
    // Completely full: tombstones are refused too once the last page of the
    // active file is used up (a deleted key reads as absent).
    let rest = disk.fill_up().unwrap();
    let mut deleted = 0;
    loop {
        let key = key(deleted);
        let delete = engine.delete(
            key.as_bytes(),
            DeleteOptions {
                version: version(next + deleted),
                ..Default::default()
            },
        );
        match delete {
            Ok(WriteOutcome::Applied { seq, .. }) => {
                assert_eq!(seq, last_seq + 1, "{key}: a gap in the seqs");
                last_seq = seq;
                acknowledged.remove(&key);
                deleted += 1;
                assert!(deleted < 100, "tombstones never filled the last page");
            }
            Err(error) if is_full(&error) => break,
            other => panic!("delete {key} on a full disk: {other:?}"),
        }
    }
    let next = next + deleted;
    check_reads(&engine, &acknowledged);

    disk.free_ballast().unwrap();
    std::fs::remove_file(rest).unwrap();
    let (more, _) = put_until_full(&engine, next + 1, 1, &mut last_seq);
    assert!(
        more.len() > 5,
        "only {} puts after freeing space",
        more.len()
    );
    acknowledged.extend(more);
    check_reads(&engine, &acknowledged);

    // What the engine acknowledged is what a reopen finds, intact.
    drop(engine);
    let engine = Engine::open(&dir, options(durability, file_bytes)).unwrap();
    check_reads(&engine, &acknowledged);
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_group_commit() {
    full_and_freed(Durability::Always, FILE_BYTES);
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_without_fsync() {
    full_and_freed(Durability::Never, FILE_BYTES);
}

/// Every record rotates to a new file, so the disk fills both while a
/// file is created and while a record is appended to a new one.
#[test]
fn a_full_disk_refuses_new_files_and_recovers() {
    full_and_freed(Durability::Always, 4096);
    full_and_freed(Durability::Never, 4096);
}

/// Many writers at once meet the full disk inside shared commit batches:
/// every write is either acknowledged (and then read back after a reopen)
/// or refused as full; none is left unknown.
#[test]
fn concurrent_writers_on_a_full_disk_get_clear_answers() {
    let Some(disk) = SmallDisk::mount(DISK_BYTES) else {
        return;
    };
    let dir = disk.path().join("engine");
    let engine = Arc::new(Engine::open(&dir, options(Durability::Always, FILE_BYTES)).unwrap());
    disk.fill_leaving(1 << 20).unwrap();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                let mut acknowledged = BTreeMap::new();
                let mut refused = 0;
                for n in (w * 1_000)..(w * 1_000 + 400) {
                    match put_n(&engine, n) {
                        Some(_) => {
                            acknowledged.insert(key(n), value(n));
                        }
                        None => refused += 1,
                    }
                }
                (acknowledged, refused)
            })
        })
        .collect();
    let mut acknowledged = BTreeMap::new();
    let mut refused = 0;
    for writer in writers {
        let (mine, theirs) = writer.join().unwrap();
        acknowledged.extend(mine);
        refused += theirs;
    }
    assert!(refused > 0, "the disk never filled");
    check_reads(&engine, &acknowledged);
    disk.free_ballast().unwrap();
    let after = engine.put(
        b"after",
        b"space freed",
        PutOptions {
            version: version(99_999),
            ..Default::default()
        },
    );
    assert!(
        matches!(after, Ok(WriteOutcome::Applied { .. })),
        "{after:?}"
    );
    acknowledged.insert("after".into(), b"space freed".to_vec());
    drop(engine);
    let engine = Arc::new(Engine::open(&dir, options(Durability::Always, FILE_BYTES)).unwrap());
    check_reads(&engine, &acknowledged);
    Arc::into_inner(engine).unwrap().close().unwrap();
}

/// A merge that runs out of space stops before its commit point and
/// removes its partial outputs at once, giving their space back; it
/// succeeds once there is room.
#[test]
fn a_merge_on_a_full_disk_gives_its_space_back() {
    let Some(disk) = SmallDisk::mount(DISK_BYTES) else {
        return;
    };
    let dir = disk.path().join("engine");
    let engine = Engine::open(&dir, options(Durability::Always, 64 << 10)).unwrap();
    let mut acknowledged = BTreeMap::new();
    for n in 0..60u64 {
        assert!(put_n(&engine, n).is_some(), "{} did not fit", key(n));
        acknowledged.insert(key(n), value(n));
    }
    let rest = disk.fill_up().unwrap();
    let available = disk.available().unwrap();

    let merge = engine.merge();
    assert!(
        matches!(&merge, Err(e) if is_full(e)),
        "a merge without room: {merge:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".merge"))
        .collect();
    assert!(leftovers.is_empty(), "outputs left behind: {leftovers:?}");
    assert!(
        disk.available().unwrap() >= available,
        "space not given back"
    );
    check_reads(&engine, &acknowledged);

    std::fs::remove_file(rest).unwrap();
    let report = engine.merge().unwrap();
    assert!(report.input_files > 0, "{report:?}");
    check_reads(&engine, &acknowledged);
}

// ------------------------------------------------------------ a cluster

/// How long replicas may take to converge once space is freed.
const CONVERGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A value of about 16 KiB for write `n`.
fn cluster_value(n: usize) -> String {
    format!("{n:08}|")
        .repeat(16 << 10 >> 4)
        .chars()
        .take(16 << 10)
        .collect()
}

/// How often the router opened node `id`'s breaker.
async fn breaker_opens(tc: &TestCluster, id: u32) -> f64 {
    tc.metrics()
        .await
        .unwrap()
        .value(
            "caskade_router_breaker_opens_total",
            &[("node", &id.to_string())],
        )
        .unwrap_or(0.0)
}

/// Reads `key` at every read level and checks each answers `expected`.
async fn reads_back(tc: &TestCluster, key: &str, expected: &str) {
    for level in ["primary", "any", "quorum"] {
        let response = tc.get_level(key, level).await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{key} at r={level}: {body}");
        assert!(body == expected, "{key} at r={level}: another value");
    }
}

/// Node 1 of three (replication factor 3) runs on a small disk that fills
/// while clients write through the router at `w=quorum`:
/// - writes whose primary is the full node answer 507 `insufficient_storage`,
///   the others 201 (the other two replicas make the quorum);
/// - every acknowledged write reads back at every read level, throughout;
/// - the router never opens the full node's breaker;
/// - once space is freed, the full node takes writes again without a
///   restart, and replication to it resumes until all three hold the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_full_node_of_three_refuses_its_writes_and_recovers() {
    let Some(disk) = SmallDisk::mount(24 << 20) else {
        return;
    };
    let policy = NodePolicy {
        health_interval_ms: 100,
        ..NodePolicy::default()
    };
    let mut spec = ClusterSpec::nodes(3, 3, policy);
    spec.configure = |config| config.engine.max_file_size = 1 << 20;
    let mut tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let full = ids[0];

    // Node `full` moves its data onto the small disk.
    tc.move_data_onto(full, disk.path()).await.unwrap();
    poll_until("every node ready", CONVERGE_DEADLINE, || {
        tc.all_nodes_ready()
    })
    .await;
    let opens_before = breaker_opens(&tc, full).await;
    disk.fill_leaving(2 << 20).unwrap();

    // Write until the full node has refused a dozen writes.
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = 0;
    let mut n = 0;
    while refused < 12 {
        let key = format!("fill-{n:05}");
        let value = cluster_value(n);
        let response = tc.put_level(&key, &value, "quorum").await.unwrap();
        let primary = tc.preference_list(key.as_bytes())[0];
        match response.status() {
            StatusCode::CREATED | StatusCode::OK => {
                acknowledged.insert(key, value);
            }
            StatusCode::INSUFFICIENT_STORAGE => {
                assert_eq!(primary, full, "{key}: 507 from a node with space");
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
                refused += 1;
            }
            status => panic!(
                "{key} (primary {primary}): {status}: {}",
                response.text().await.unwrap()
            ),
        }
        n += 1;
        assert!(n < 2_000, "the disk never filled");
    }
    // The full node is a secondary of every key it refused; it missed those.
    for (key, value) in &acknowledged {
        reads_back(&tc, key, value).await;
    }
    assert_eq!(
        breaker_opens(&tc, full).await,
        opens_before,
        "the full node's breaker opened"
    );
    let page = tc.admin_node(full).await.unwrap();
    assert_eq!(page["stats"]["disk_full"], true, "{page}");
    // Asked directly for a key it is not the primary of, the full node
    // declines (the router then reads another replica): it may lack it.
    let held = tc.scan_node(full).await.unwrap();
    let missed = acknowledged
        .keys()
        .find(|key| !held.contains_key(key.as_bytes()))
        .expect("the full node missed no write");
    for level in [ReadLevel::Any, ReadLevel::Primary] {
        let answer = tc
            .node_kv(full)
            .await
            .unwrap()
            .get(GetRequest {
                key: missed.clone().into_bytes().into(),
                read_level: level as i32,
            })
            .await;
        assert_eq!(
            answer.as_ref().map_err(tonic::Status::code).err(),
            Some(tonic::Code::Unavailable),
            "{missed} at {level:?} from the full node: {answer:?}"
        );
    }

    // `w=all` cannot be met while one replica cannot store: 503, applied.
    let key = (0..)
        .map(|m| format!("all-{m:05}"))
        .find(|key| tc.preference_list(key.as_bytes())[0] != full)
        .unwrap();
    let response = tc.put_level(&key, "at w=all", "all").await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{key} at w=all"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "write_level_not_met", "{body}");
    acknowledged.insert(key, "at w=all".into());

    // Restarted on its full disk, the node opens, and stays out of service
    // while it cannot store what it missed; reads go to the others.
    tc.stop_node(full).await.unwrap();
    tc.start_node(full).await.unwrap();
    poll_until(
        "the restarted node to answer",
        CONVERGE_DEADLINE,
        || async { tc.node_serving(full).await.is_some() },
    )
    .await;
    for (key, value) in &acknowledged {
        reads_back(&tc, key, value).await;
    }
    assert_eq!(
        tc.node_serving(full).await,
        Some(false),
        "serving what it lacks"
    );

    // Space is freed: the node takes its writes again at once (among them
    // those it is the primary of), and catches up.
    disk.free_ballast().unwrap();
    poll_until(
        "the router to see the full node serve again",
        CONVERGE_DEADLINE,
        || tc.all_nodes_ready(),
    )
    .await;
    let mut primaries = std::collections::BTreeSet::new();
    for m in n..n + 20 {
        let key = format!("fill-{m:05}");
        let value = cluster_value(m);
        let response = tc.put_level(&key, &value, "quorum").await.unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "{key} (primary {}) after space was freed: {status}: {}",
            tc.preference_list(key.as_bytes())[0],
            response.text().await.unwrap()
        );
        primaries.insert(tc.preference_list(key.as_bytes())[0]);
        acknowledged.insert(key, value);
    }
    assert!(
        primaries.contains(&full),
        "no write had the full node as primary"
    );
    poll_until("the full node to catch up", CONVERGE_DEADLINE, || async {
        let first = tc.scan_node(ids[1]).await.unwrap();
        tc.scan_node(full).await.unwrap() == first && tc.scan_node(ids[2]).await.unwrap() == first
    })
    .await;
    let held = tc.scan_node(full).await.unwrap();
    for (key, value) in &acknowledged {
        let copy = held
            .get(key.as_bytes())
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(copy.1, value.as_bytes(), "{key}");
        reads_back(&tc, key, value).await;
    }
    assert_eq!(
        held.len(),
        acknowledged.len(),
        "refused writes must not be stored"
    );
    assert_eq!(
        breaker_opens(&tc, full).await,
        opens_before,
        "the full node's breaker opened"
    );
    let page = tc.admin_node(full).await.unwrap();
    assert_eq!(page["stats"]["disk_full"], false, "{page}");
    tc.shutdown().await.unwrap();
}
