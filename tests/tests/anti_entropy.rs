//! Anti-entropy: a record that reached one replica but was never delivered
//! to the others by its coordinator (a caught-up puller takes from a peer
//! only the records that peer coordinated) still reaches every replica of
//! its range, and so does a delete; the replicas end with equal contents.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use caskade_common::Version;
use caskade_common::version::unix_millis;
use caskade_node::NodeConfig;
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};

/// The origin of the records planted: no node of the cluster.
const GONE: u32 = 999;

fn often(config: &mut NodeConfig) {
    config.replication.anti_entropy_interval_ms = 200;
}

/// A version of node `origin`, now.
fn version_of(origin: u32) -> caskade_proto::Version {
    let version = Version::from_parts(unix_millis(), 0, origin);
    caskade_proto::Version {
        hlc: version.hlc,
        origin: version.origin,
    }
}

/// Waits until every node holds `value` for `key` (`None`: no live value).
async fn everywhere(tc: &TestCluster, key: &str, value: Option<&str>) {
    poll_until(
        &format!("{key} to be {value:?} on every replica"),
        Duration::from_secs(30),
        || async {
            for id in tc.node_ids() {
                let Ok(held) = tc.scan_node(id).await else {
                    return false;
                };
                let got = held.get(key.as_bytes()).map(|copy| copy.1.clone());
                if got.as_deref() != value.map(str::as_bytes) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Moves every node's cursor on every peer past 0: a pull from the start
/// of a log reads its data files, which sends every record, not only the
/// ones the peer coordinated, and would deliver what is planted below.
async fn pull_past_the_start(tc: &TestCluster) {
    // A write coordinated by each node: every log then has a record.
    for id in tc.node_ids() {
        let key = tc.keys_with_primary(id, "first-", 1).remove(0);
        let response = tc
            .put_level(&key, "moves the cursors", "all")
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    }
    poll_until(
        "every node to pull every peer past the start of its log",
        Duration::from_secs(10),
        || async {
            let Ok(page) = tc.admin_cluster().await else {
                return false;
            };
            let nodes = page["nodes"].as_array().cloned().unwrap_or_default();
            nodes.len() == tc.node_ids().len()
                && nodes.iter().all(|node| {
                    node["stats"]["replication"]
                        .as_array()
                        .is_some_and(|peers| peers.iter().all(|p| p["cursor"].as_u64() >= Some(1)))
                })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_on_one_replica_reaches_the_others_and_so_does_a_delete() {
    let spec = ClusterSpec {
        configure: often,
        ..ClusterSpec::nodes(3, 3, NodePolicy::default())
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    pull_past_the_start(&tc).await;
    // Coordinated by a node since gone, which crashed before the others
    // pulled it: only the first holds it, and the others' pulls from the
    // first skip records that node did not coordinate. Only anti-entropy
    // can bring it to them.
    let planted = tc.apply_on(ids[0], "stranded", Some("only here"), version_of(GONE));
    assert_eq!(planted.await.unwrap(), 1);
    everywhere(&tc, "stranded", Some("only here")).await;

    let planted = tc.apply_on(ids[1], "stranded", None, version_of(GONE));
    assert_eq!(planted.await.unwrap(), 1);
    everywhere(&tc, "stranded", None).await;

    // Without anti-entropy (interval 0) the value never reaches every
    // replica: at least one repair brought it. The admin page counts a
    // repair once its exchange is over.
    let repaired = || async {
        let Ok(page) = tc.admin_cluster().await else {
            return 0;
        };
        page["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["stats"]["anti_entropy"]["repaired"].as_u64())
            .sum::<u64>()
    };
    poll_until(
        "repairs on the admin page",
        Duration::from_secs(10),
        || async { repaired().await >= 1 },
    )
    .await;
    tc.shutdown().await.unwrap();
}

/// Issue 13, bug 4: a coordinator that crashed and lost a write from its
/// unsynced tail, while the one replica that pulled it was unreachable,
/// comes back without it; pulls never bring it back (a caught-up puller
/// takes from that replica only what it coordinated itself). The state is
/// planted directly: the write of node N's key, with N's origin, on one
/// other replica only. Anti-entropy brings it to N and to the third node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_its_coordinator_lost_comes_back_to_every_replica() {
    let spec = ClusterSpec {
        configure: often,
        ..ClusterSpec::nodes(3, 3, NodePolicy::default())
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let (coordinator, holder) = (ids[0], ids[1]);
    pull_past_the_start(&tc).await;
    let key = tc.keys_with_primary(coordinator, "lost-", 1).remove(0);
    let planted = tc.apply_on(holder, &key, Some("acknowledged"), version_of(coordinator));
    assert_eq!(planted.await.unwrap(), 1);
    everywhere(&tc, &key, Some("acknowledged")).await;
    tc.shutdown().await.unwrap();
}

/// Exchanges node `id` has done, from the admin page.
async fn exchanges(tc: &TestCluster, id: u32) -> u64 {
    let page = tc.admin_node(id).await.unwrap();
    page["stats"]["anti_entropy"]["exchanges"].as_u64().unwrap()
}

/// With RF 2 on four nodes, records planted on one node only (those of
/// 26,000 keys it replicates, more than a page of the digests' keydir walk
/// and of a listing, and more than one fetch) reach
/// exactly the other replica of each key's range and no other node; a
/// value older than the tombstone retention is not copied onto a node that
/// holds no record of its key (that node may have deleted it and merged the
/// tombstone away), while one just as old reaches a node holding an older
/// version of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_reach_the_keys_replicas_only_and_nothing_old_onto_a_node_without_the_key() {
    let spec = ClusterSpec {
        configure: often,
        ..ClusterSpec::nodes(4, 2, NodePolicy::default())
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    let source = ids[0];
    pull_past_the_start(&tc).await;

    let keys: Vec<String> = (0..26_000).map(|n| format!("planted-{n:05}")).collect();
    let mut replication = tc.node_replication(source).await.unwrap();
    let mut planted = 0;
    for chunk in keys.chunks(1000) {
        let records = chunk
            .iter()
            .map(|key| caskade_proto::ReplicatedRecord {
                key: key.as_bytes().to_vec().into(),
                value: b"fresh".to_vec().into(),
                tombstone: false,
                version: Some(version_of(GONE)),
                expires_at_ms: 0,
            })
            .collect();
        let request = caskade_proto::ApplyRequest { records, epoch: 0 };
        planted += replication
            .apply(request)
            .await
            .unwrap()
            .into_inner()
            .applied;
    }
    // Only the keys of the source's ranges were taken.
    let mine: Vec<&String> = keys
        .iter()
        .filter(|k| tc.preference_list(k.as_bytes()).contains(&source))
        .collect();
    assert_eq!(planted as usize, mine.len());
    // Some node shares more than a page of a listing with the source.
    let shared = |id: u32| {
        let both = |k: &&&String| {
            let list = tc.preference_list(k.as_bytes());
            list.contains(&id)
        };
        mine.iter().filter(both).count()
    };
    let most = ids[1..].iter().map(|&id| shared(id)).max().unwrap();
    assert!(most > 4096, "more than a page: {most}");

    // Two days old, older than the retention: a key the other replica
    // lacks stays away; one it holds an older version of is repaired.
    let two_days_ago = Version::from_parts(unix_millis() - 2 * 86_400_000, 0, GONE);
    let old = caskade_proto::Version {
        hlc: two_days_ago.hlc,
        origin: GONE,
    };
    let older = caskade_proto::Version {
        hlc: old.hlc - 1,
        ..old
    };
    let with_source = |prefix: &str| {
        tc.keys_where(prefix, 1, |list| list.first() == Some(&source))
            .remove(0)
    };
    let (absent, stale) = (with_source("old-absent-"), with_source("old-stale-"));
    let other = tc.preference_list(stale.as_bytes())[1];
    let other_of_absent = tc.preference_list(absent.as_bytes())[1];
    assert_eq!(
        tc.apply_on(other, &stale, Some("older"), older)
            .await
            .unwrap(),
        1
    );
    for key in [&absent, &stale] {
        assert_eq!(tc.apply_on(source, key, Some("old"), old).await.unwrap(), 1);
    }

    poll_until(
        "every planted key on both of its replicas, and the stale one repaired",
        Duration::from_secs(60),
        || async {
            for &id in &ids {
                let Ok(held) = tc.scan_node(id).await else {
                    return false;
                };
                let wanted = mine
                    .iter()
                    .filter(|k| tc.preference_list(k.as_bytes()).contains(&id))
                    .all(|k| held.contains_key(k.as_bytes()));
                if !wanted {
                    return false;
                }
            }
            let held = tc.scan_node(other).await.unwrap();
            held.get(stale.as_bytes()).map(|c| c.1.clone()) == Some(b"old".to_vec())
        },
    )
    .await;
    // Two more rounds of the absent key's other replica: still absent.
    let done = exchanges(&tc, other_of_absent).await;
    poll_until("two more exchanges", Duration::from_secs(30), || async {
        exchanges(&tc, other_of_absent).await >= done + 2
    })
    .await;
    for &id in &ids {
        let held = tc.scan_node(id).await.unwrap();
        if id != source {
            assert!(
                !held.contains_key(absent.as_bytes()),
                "node {id} got {absent}"
            );
        }
        for key in &mine {
            let replica = tc.preference_list(key.as_bytes()).contains(&id);
            assert_eq!(
                held.contains_key(key.as_bytes()),
                replica,
                "{key} on node {id}"
            );
        }
    }
    tc.shutdown().await.unwrap();
}

/// Records too large to fetch in one answer (1,200 values of 16 KiB, in
/// answers of at most 8 MiB) all arrive: a fetch continues from where the
/// answer stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_are_fetched_over_several_answers() {
    let spec = ClusterSpec {
        configure: often,
        ..ClusterSpec::nodes(2, 2, NodePolicy::default())
    };
    let tc = TestCluster::start(spec).await.unwrap();
    let ids = tc.node_ids();
    pull_past_the_start(&tc).await;
    let value = vec![b'v'; 16 << 10];
    let mut replication = tc.node_replication(ids[0]).await.unwrap();
    for batch in 0..12 {
        let records = (0..100)
            .map(|n| caskade_proto::ReplicatedRecord {
                key: format!("large-{batch:02}-{n:03}").into_bytes().into(),
                value: value.clone().into(),
                tombstone: false,
                version: Some(version_of(GONE)),
                expires_at_ms: 0,
            })
            .collect();
        let request = caskade_proto::ApplyRequest { records, epoch: 0 };
        let applied = replication.apply(request).await.unwrap().into_inner();
        assert_eq!(applied.applied, 100);
    }
    // A fetch of 1,000 of them is answered in part, naming where to go on.
    let page = tc.admin_node(ids[0]).await.unwrap();
    let epoch = page["stats"]["map_epoch"].as_u64().unwrap();
    let only_keys: Vec<_> = (0..1000)
        .map(|n| {
            format!("large-{:02}-{:03}", n / 100, n % 100)
                .into_bytes()
                .into()
        })
        .collect();
    let request = caskade_proto::SnapshotRequest {
        node_id: ids[1],
        epoch,
        only_keys: only_keys.clone(),
        ..Default::default()
    };
    let answer = replication
        .clone()
        .max_decoding_message_size(usize::MAX)
        .snapshot(request)
        .await
        .unwrap()
        .into_inner();
    let served = answer.records.len();
    assert!(
        (1..1000).contains(&served),
        "{served} records in one answer"
    );
    assert_eq!(answer.next.as_ref(), Some(&only_keys[served]));
    // Fields that make no sense together are refused.
    for bad in [
        caskade_proto::SnapshotRequest {
            versions_only: true,
            ..Default::default()
        },
        caskade_proto::SnapshotRequest {
            only_keys: only_keys[..1].to_vec(),
            buckets: 4,
            ..Default::default()
        },
        caskade_proto::SnapshotRequest {
            only_keys: vec![Default::default()],
            ..Default::default()
        },
    ] {
        let request = caskade_proto::SnapshotRequest {
            node_id: ids[1],
            epoch,
            ..bad
        };
        let refused = replication.snapshot(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
    // Counted from the node's stats: a scan page of these is over the
    // client's message limit.
    poll_until(
        "every large record on the other node",
        Duration::from_secs(60),
        || async {
            let Ok(node) = tc.admin_node(ids[1]).await else {
                return false;
            };
            node["stats"]["keys"].as_u64() == Some(1200 + 2)
        },
    )
    .await;
    let mut kv = tc.node_kv(ids[1]).await.unwrap();
    let last = kv.get(caskade_proto::GetRequest {
        key: b"large-11-099".to_vec().into(),
        read_level: 0,
    });
    assert_eq!(last.await.unwrap().into_inner().value.len(), 16 << 10);
    tc.shutdown().await.unwrap();
}
