//! The node's gRPC services end to end, in process, over real mutual TLS on
//! loopback: the Kv contract, who may connect, bad input that must change
//! nothing, the Admin calls, and the `/metrics` endpoint.

mod support;

use caskade_common::certs::{ClusterCertFiles, write_cluster_certs};
use caskade_proto::kv_client::KvClient;
use caskade_proto::{
    BatchOp, BatchRequest, Condition, DeleteRequest, GetRequest, PutRequest, ScanRequest,
    StatsRequest, batch_op, batch_result, condition,
};
use prost::bytes::Bytes;
use std::time::Duration;

use support::{RunningNode, admin_client, certs, channel, eventually, kv_client, node_config};
use tonic::Code;
use tonic::transport::Channel;

fn put_request(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value.to_string()),
        ..PutRequest::default()
    }
}

fn get_request(key: &str) -> GetRequest {
    GetRequest {
        key: Bytes::from(key.to_string()),
        ..GetRequest::default()
    }
}

async fn start(dir: &std::path::Path) -> (RunningNode, ClusterCertFiles) {
    let certs = certs(dir);
    let node = RunningNode::start(node_config(dir, &certs)).await;
    (node, certs)
}

/// Every error in a `transport` failure's source chain, as one string.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        chain.push_str(" <- ");
        chain.push_str(&e.to_string());
        source = e.source();
    }
    chain
}

/// The outcome of one Get over `channel`, as an error chain if it failed.
async fn try_get(channel: Result<Channel, tonic::transport::Error>) -> Result<(), String> {
    let channel = channel.map_err(|e| error_chain(&e))?;
    KvClient::new(channel)
        .get(get_request("k"))
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), error_chain(&status)))
}

#[tokio::test]
async fn a_cluster_client_can_put_get_delete_and_scan() {
    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    let mut kv = kv_client(&node, &certs).await;

    let first = kv
        .put(put_request("fruit/apple", "red"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert_eq!(first.acks, 1);
    let second = kv
        .put(put_request("fruit/apple", "green"))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.created);
    let (v1, v2) = (first.version.unwrap(), second.version.unwrap());
    assert!((v2.hlc, v2.origin) > (v1.hlc, v1.origin), "versions grow");
    assert_eq!(v2.origin, 1, "the coordinating node is the origin");

    let got = kv
        .get(get_request("fruit/apple"))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    assert_eq!(got.value, "green");
    assert_eq!(got.version, Some(v2));

    for key in ["fruit/banana", "fruit/cherry", "veg/leek", "fruit/date"] {
        kv.put(put_request(key, "x")).await.unwrap();
    }
    // Paged scan in byte order, restricted to the prefix.
    let page = |after: &str| ScanRequest {
        prefix: Bytes::from_static(b"fruit/"),
        after: Bytes::from(after.to_string()),
        limit: 2,
        include_values: true,
        ..ScanRequest::default()
    };
    let first_page = kv.scan(page("")).await.unwrap().into_inner();
    let keys: Vec<_> = first_page.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, ["fruit/apple", "fruit/banana"]);
    assert_eq!(first_page.entries[0].value, "green");
    assert_eq!(first_page.next.as_deref(), Some(&b"fruit/banana"[..]));
    let second_page = kv.scan(page("fruit/banana")).await.unwrap().into_inner();
    let keys: Vec<_> = second_page.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, ["fruit/cherry", "fruit/date"]);
    let last = kv.scan(page("fruit/date")).await.unwrap().into_inner();
    assert!(last.entries.is_empty());
    assert_eq!(last.next, None);

    let deleted = kv
        .delete(DeleteRequest {
            key: Bytes::from_static(b"fruit/apple"),
            ..DeleteRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    assert!(
        !kv.get(get_request("fruit/apple"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    // A listing across replicas compares deleted keys' versions too.
    let with_deleted = ScanRequest {
        include_deleted: true,
        ..page("")
    };
    let entries = kv.scan(with_deleted).await.unwrap().into_inner().entries;
    assert_eq!(entries[0].key, "fruit/apple");
    assert!(entries[0].deleted && entries[0].value.is_empty());
    assert_eq!(entries[0].version, deleted.version);
    assert!(!entries[1].deleted);
    let live = kv.scan(page("")).await.unwrap().into_inner().entries;
    assert_eq!(live[0].key, "fruit/banana");

    node.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_uses_the_standard_health_protocol() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    let channel = channel(node.grpc, &certs.ca, Some(&certs.client))
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "caskade.v1.Kv"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    node.stop().await.unwrap();
}

#[tokio::test]
async fn conditions_are_checked_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    let mut kv = kv_client(&node, &certs).await;

    let if_absent = Some(Condition {
        kind: Some(condition::Kind::IfAbsent(true)),
    });
    let created = kv
        .put(PutRequest {
            condition: if_absent,
            ..put_request("k", "one")
        })
        .await
        .unwrap()
        .into_inner();
    let status = kv
        .put(PutRequest {
            condition: if_absent,
            ..put_request("k", "two")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let current = created.version.unwrap();
    let sent = status.metadata().get("x-caskade-current-version").unwrap();
    assert_eq!(
        sent.to_str().unwrap(),
        format!("{}-{}", current.hlc, current.origin)
    );

    let stale = caskade_proto::Version {
        hlc: current.hlc - 1,
        origin: current.origin,
    };
    let status = kv
        .put(PutRequest {
            condition: Some(Condition {
                kind: Some(condition::Kind::IfVersion(stale)),
            }),
            ..put_request("k", "three")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    kv.put(PutRequest {
        condition: Some(Condition {
            kind: Some(condition::Kind::IfVersion(current)),
        }),
        ..put_request("k", "four")
    })
    .await
    .unwrap();
    assert_eq!(
        kv.get(get_request("k")).await.unwrap().into_inner().value,
        "four"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn only_certificates_of_the_cluster_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    let foreign = write_cluster_certs(&dir.path().join("foreign"), 1, &[], false).unwrap();

    try_get(channel(node.grpc, &certs.ca, Some(&certs.client)).await)
        .await
        .expect("a cluster client gets in");

    // No client certificate: the server demands one and aborts the handshake.
    let refused = try_get(channel(node.grpc, &certs.ca, None).await)
        .await
        .unwrap_err();
    assert!(
        refused.contains("CertificateRequired") || refused.contains("certificate required"),
        "{refused}"
    );

    // A certificate from another CA: the server does not trust its issuer.
    let refused = try_get(channel(node.grpc, &certs.ca, Some(&foreign.client)).await)
        .await
        .unwrap_err();
    assert!(
        refused.contains("UnknownCA") || refused.contains("unknown ca"),
        "{refused}"
    );

    // The client side checks too: a client of another cluster refuses this node.
    let refused = try_get(channel(node.grpc, &foreign.ca, Some(&foreign.client)).await)
        .await
        .unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    node.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    let mut kv = kv_client(&node, &certs).await;
    let mut admin = admin_client(&node, &certs).await;

    let huge_key = "k".repeat(1025);
    let huge_value = "v".repeat((1 << 20) + 1);
    let bad_puts = [
        put_request("", "value"),
        put_request(&huge_key, "value"),
        put_request("key", &huge_value),
        PutRequest {
            write_level: 99,
            ..put_request("key", "value")
        },
    ];
    for request in bad_puts {
        let status = kv.put(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(!status.message().is_empty());
    }
    let status = kv
        .delete(DeleteRequest {
            key: Bytes::new(),
            ..DeleteRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = kv.get(get_request("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let bad_scans = [
        ScanRequest {
            limit: 1001,
            ..ScanRequest::default()
        },
        ScanRequest {
            prefix: Bytes::from(huge_key.clone()),
            ..ScanRequest::default()
        },
    ];
    for request in bad_scans {
        let status = kv.scan(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    // A batch over the op limit is refused whole: not even its valid ops run.
    let op = BatchOp {
        op: Some(batch_op::Op::Put(put_request("batched", "x"))),
    };
    let status = kv
        .batch(BatchRequest {
            ops: vec![op.clone(); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Within the limit, a bad op fails alone.
    let mixed = BatchRequest {
        ops: vec![
            op.clone(),
            BatchOp {
                op: Some(batch_op::Op::Put(put_request("", "x"))),
            },
        ],
    };
    let results = kv.batch(mixed).await.unwrap().into_inner().results;
    assert!(matches!(
        results[0].result,
        Some(batch_result::Result::Put(_))
    ));
    match &results[1].result {
        Some(batch_result::Result::Error(e)) => assert_eq!(e.code, Code::InvalidArgument as i32),
        other => panic!("expected an error result, got {other:?}"),
    }

    // Only the one valid batched put was written.
    let stats = admin.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.keys, stats.tombstones), (1, 0));
    let all = kv.scan(ScanRequest::default()).await.unwrap().into_inner();
    let keys: Vec<_> = all.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys, ["batched"]);
    node.stop().await.unwrap();
}

/// A node forming a one-node cluster (RF 1, fast Raft timings), listed in
/// its initial members at `listed`, or where it listens.
fn one_node_cluster(
    dir: &std::path::Path,
    certs: &ClusterCertFiles,
    listed: Option<std::net::SocketAddr>,
) -> caskade_node::NodeConfig {
    use caskade_node::config::InitialMembers;

    let mut config = node_config(dir, certs);
    config.listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let listed = listed.unwrap_or(config.listen);
    config.cluster.standalone = false;
    config.cluster.initial_members =
        Some(InitialMembers::try_from(format!("1={listed}")).expect("one valid member"));
    config.cluster.replication_factor = 1;
    config.cluster.heartbeat_ms = 50;
    config.cluster.election_timeout_ms = 300;
    config
}

/// The first map `admin`'s node commits.
async fn first_map(
    admin: &caskade_proto::admin_client::AdminClient<Channel>,
) -> caskade_proto::ClusterMap {
    use caskade_proto::GetClusterMapRequest;

    eventually(Duration::from_secs(20), "the first map", || {
        let mut admin = admin.clone();
        async move {
            admin
                .get_cluster_map(GetClusterMapRequest::default())
                .await
                .ok()
                .and_then(|r| r.into_inner().map)
        }
    })
    .await
}

/// A node in a cluster serves no client and coordinates no write alone
/// until a cluster map is in effect: neither one given its initial members
/// once started, as `caskade local` does (each node's address is known only
/// once it listens), nor one waiting to be added. Here the other member
/// never starts and nobody adds the spare, so no map ever is.
#[tokio::test]
async fn a_node_in_a_cluster_serves_nothing_without_a_map() {
    use caskade_node::Node;
    use caskade_node::config::InitialMembers;
    use caskade_proto::replication_client::ReplicationClient;
    use caskade_proto::{ApplyRequest, ReplicatedRecord};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    for given_members in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let mut config = node_config(dir.path(), &certs);
        config.cluster.standalone = false;
        config.cluster.replication_factor = 2;
        let absent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut node = Node::start(config).await.unwrap();
        if given_members {
            let members = format!("1={},2={}", node.grpc_addr(), absent.local_addr().unwrap());
            node.set_initial_members(InitialMembers::try_from(members).unwrap())
                .unwrap();
        }
        let node = RunningNode::serve(node);
        let case = if given_members {
            "members given after start"
        } else {
            "waiting to be added"
        };

        let mut admin = admin_client(&node, &certs).await;
        let stats = admin.stats(StatsRequest {}).await.unwrap().into_inner();
        assert!(!stats.ready, "{case}: ready with no cluster map: {stats:?}");
        let health = channel(node.grpc, &certs.ca, Some(&certs.client))
            .await
            .unwrap();
        let status = HealthClient::new(health)
            .check(HealthCheckRequest {
                service: "caskade.v1.Kv".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32, "{case}");
        let mut kv = kv_client(&node, &certs).await;
        let refused = kv
            .put(put_request("alone", "v"))
            .await
            .expect_err("a write coordinated with no cluster map");
        assert_eq!(refused.code(), Code::Unavailable, "{case}: {refused:?}");
        assert_eq!(
            kv.get(get_request("alone")).await.unwrap_err().code(),
            Code::Unavailable,
            "{case}"
        );
        // Nor does it take a router's read repair.
        let replication = channel(node.grpc, &certs.ca, Some(&certs.client))
            .await
            .unwrap();
        let repair = ReplicationClient::new(replication)
            .apply(ApplyRequest {
                records: vec![ReplicatedRecord {
                    key: Bytes::from_static(b"repaired"),
                    value: Bytes::from_static(b"v"),
                    version: Some(caskade_proto::Version {
                        hlc: 1 << 20,
                        origin: 2,
                    }),
                    ..ReplicatedRecord::default()
                }],
                epoch: 0,
            })
            .await;
        assert!(repair.is_err(), "{case}: {repair:?}");
        let stats = admin.stats(StatsRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (stats.keys, stats.last_seq),
            (0, 0),
            "{case}: nothing written"
        );
        drop(absent);
        node.stop().await.unwrap();
    }
}

/// A node of a cluster restarted as standalone would acknowledge writes
/// alone that later reach the cluster: it refuses to start.
#[tokio::test]
async fn a_node_of_a_cluster_does_not_start_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let config = one_node_cluster(dir.path(), &certs, None);
    let node = RunningNode::start(config.clone()).await;
    first_map(&admin_client(&node, &certs).await).await;
    node.stop().await.unwrap();

    let mut alone = config;
    alone.cluster.initial_members = None;
    alone.cluster.standalone = true;
    let Err(refused) = caskade_node::Node::start(alone).await else {
        panic!("a node of a cluster started standalone");
    };
    assert!(
        refused.to_string().contains("cluster.standalone"),
        "{refused}"
    );
}

/// The own-address check refuses only on evidence: an address listed for
/// the node that accepts connections without leading to it, and where no
/// caskade node answers (a proxy whose backend is not up), is not a reason
/// to stop.
#[tokio::test]
async fn a_new_node_whose_listed_address_answers_as_no_node_still_forms_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // Accepts connections (the kernel completes them) and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listed = black_hole.local_addr().unwrap();
    let node = RunningNode::start(one_node_cluster(dir.path(), &certs, Some(listed))).await;
    let map = first_map(&admin_client(&node, &certs).await).await;
    assert_eq!(map.nodes.len(), 1);
    assert_eq!(map.nodes[0].addr, listed.to_string());
    drop(black_hole);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_single_node_forms_its_cluster_refuses_bad_changes_and_keeps_its_map() {
    use caskade_proto::change_cluster_request::Change;
    use caskade_proto::{ChangeClusterRequest, GetClusterMapRequest, NodeAddress};

    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let config = one_node_cluster(dir.path(), &certs, None);
    let node = RunningNode::start(config.clone()).await;
    let mut admin = admin_client(&node, &certs).await;
    let map = first_map(&admin).await;
    assert_eq!(map.epoch, 1);
    assert_eq!(map.replication_factor, 1);
    assert_eq!(map.nodes.len(), 1);
    assert_eq!(map.nodes[0].addr, config.listen.to_string());

    let change = |expected_epoch, change| ChangeClusterRequest {
        expected_epoch,
        change: Some(change),
    };
    let add = |id, addr: &str| {
        Change::Add(NodeAddress {
            id,
            addr: addr.into(),
        })
    };
    let cases = [
        (change(0, add(0, "127.0.0.1:9")), Code::InvalidArgument),
        (change(0, add(2, "no-port")), Code::InvalidArgument),
        (change(0, add(2, "127.0.0.1:0")), Code::InvalidArgument),
        (change(7, add(2, "127.0.0.1:9")), Code::Aborted),
        (change(0, add(1, "127.0.0.1:9")), Code::Aborted),
        (change(0, Change::Remove(9)), Code::NotFound),
        // The only node of an RF 1 cluster cannot leave it.
        (change(0, Change::Remove(1)), Code::Aborted),
        (change(0, Change::Leave(1)), Code::Aborted),
        (
            ChangeClusterRequest {
                expected_epoch: 0,
                change: None,
            },
            Code::InvalidArgument,
        ),
    ];
    for (request, code) in cases {
        let status = admin.change_cluster(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
    }
    // Nothing changed.
    let after = admin
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner()
        .map
        .unwrap();
    assert_eq!(after, map);
    // A long poll for a newer epoch answers with the current map when none comes.
    let polled = admin
        .get_cluster_map(GetClusterMapRequest {
            after_epoch: 1,
            wait_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(polled.map.map(|m| m.epoch), Some(1));
    assert_eq!(polled.leader_id, 1);

    // Restarted with other initial settings, the node keeps its cluster's map.
    node.stop().await.unwrap();
    let mut changed = config.clone();
    changed.cluster.vnodes_per_node = 8;
    let node = RunningNode::start(changed).await;
    let mut admin = admin_client(&node, &certs).await;
    let stored = admin
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner()
        .map;
    assert_eq!(stored, Some(map));
    node.stop().await.unwrap();
}

#[tokio::test]
async fn backup_and_merge_through_admin() {
    use caskade_node::engine::{Engine, Options};
    use caskade_proto::{BackupRequest, MergeRequest};

    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let mut config = node_config(dir.path(), &certs);
    config.engine.max_file_size = 64 << 10;
    let node = RunningNode::start(config).await;
    let mut kv = kv_client(&node, &certs).await;
    let mut admin = admin_client(&node, &certs).await;
    let value = "v".repeat(1000);
    for round in 0..3 {
        for i in 0..100 {
            kv.put(put_request(
                &format!("key-{i:03}"),
                &format!("{round}{value}"),
            ))
            .await
            .unwrap();
        }
    }
    let before = admin.stats(StatsRequest {}).await.unwrap().into_inner();
    assert!(before.files > 2 && before.dead_bytes > 0, "{before:?}");

    let merged = admin.merge(MergeRequest {}).await.unwrap().into_inner();
    assert!(
        merged.input_files > 0 && merged.bytes_reclaimed > 0,
        "{merged:?}"
    );
    let after = admin.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(after.keys, 100);
    assert!(after.dead_bytes < before.dead_bytes);

    let backup = admin.backup(BackupRequest {}).await.unwrap().into_inner();
    assert!(
        backup
            .path
            .starts_with(&dir.path().join("backups").display().to_string())
    );
    assert_eq!(backup.last_seq, after.last_seq);
    node.stop().await.unwrap();

    let copy = Engine::open(&backup.path, Options::default()).unwrap();
    assert_eq!(copy.stats().keys, 100);
    let value = copy.get(b"key-042").unwrap().unwrap().value;
    assert!(value.starts_with(b"2v"));
}

#[tokio::test]
async fn metrics_count_requests_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // The recorder is process-wide and other tests run beside this one: a
    // node id of its own tells this node's series apart.
    let mut config = node_config(dir.path(), &certs);
    config.id = 77;
    let node = RunningNode::start(config).await;
    let mut kv = kv_client(&node, &certs).await;
    for i in 0..3 {
        kv.put(put_request(&format!("m{i}"), "x")).await.unwrap();
    }
    kv.get(get_request("m1")).await.unwrap();
    kv.get(get_request("")).await.unwrap_err();

    let url = format!("http://{}/metrics", node.metrics.unwrap());
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let value = |name: &str, labels: &[&str]| {
        body.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains(r#"node="77""#)
                    && labels.iter().all(|x| l.contains(x))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    let requests = "caskade_node_requests_total{";
    assert_eq!(
        value(requests, &[r#"method="Put""#, r#"code="OK""#]),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(requests, &[r#"method="Get""#, r#"code="OK""#]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(requests, &[r#"method="Get""#, r#"code="INVALID_ARGUMENT""#]),
        Some(1.0),
        "{body}"
    );
    let put_latency = value(
        "caskade_node_request_duration_seconds_count",
        &[r#"method="Put""#],
    );
    assert_eq!(put_latency, Some(3.0), "{body}");
    assert_eq!(value("caskade_engine_keys", &[]), Some(3.0), "{body}");
    let total = value("caskade_node_disk_total_bytes", &[]).expect("disk size");
    let available = value("caskade_node_disk_available_bytes", &[]).expect("free space");
    assert!(total > 0.0 && (0.0..=total).contains(&available), "{body}");
    assert_eq!(
        value("caskade_node_requests_in_flight", &[]),
        Some(0.0),
        "{body}"
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn on_shutdown_the_node_reports_not_serving_while_it_drains() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let mut config = node_config(dir.path(), &certs);
    config.server.shutdown_drain_ms = 3_000;
    let mut node = RunningNode::start(config).await;
    let channel = channel(node.grpc, &certs.ca, Some(&certs.client))
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut kv = KvClient::new(channel);
    let check = HealthCheckRequest {
        service: "caskade.v1.Kv".into(),
    };

    node.signal_stop();
    support::eventually(std::time::Duration::from_secs(3), "NOT_SERVING", || {
        let (mut health, check) = (health.clone(), check.clone());
        async move {
            let status = health.check(check).await.ok()?.into_inner().status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    // Still draining: requests are answered while routers take notice.
    kv.put(put_request("during-drain", "v")).await.unwrap();
    assert!(health.check(check).await.is_ok());
    node.stop().await.unwrap();
}

/// A node's clock starts above every version its data holds: restarted with
/// its wall clock behind a version it stored (one it assigned before its
/// clock stepped back, or a peer's), it never assigns an older version, so
/// it cannot hand out a version twice.
#[tokio::test]
async fn a_restarted_node_assigns_versions_above_every_version_it_holds() {
    use caskade_common::Version;
    use caskade_common::version::unix_millis;
    use caskade_proto::replication_client::ReplicationClient;
    use caskade_proto::{ApplyRequest, ReplicatedRecord};

    let dir = tempfile::tempdir().unwrap();
    let (node, certs) = start(dir.path()).await;
    // A record the node holds from a time its clock has not reached.
    let ahead = Version::from_parts(unix_millis() + 5 * 60 * 1000, 7, 1);
    let replication = channel(node.grpc, &certs.ca, Some(&certs.client))
        .await
        .unwrap();
    ReplicationClient::new(replication)
        .apply(ApplyRequest {
            records: vec![ReplicatedRecord {
                key: Bytes::from_static(b"written-ahead"),
                value: Bytes::from_static(b"v"),
                version: Some(caskade_proto::Version {
                    hlc: ahead.hlc,
                    origin: ahead.origin,
                }),
                ..ReplicatedRecord::default()
            }],
            epoch: 0,
        })
        .await
        .unwrap();
    node.stop().await.unwrap();

    let node = RunningNode::start(node_config(dir.path(), &certs)).await;
    let written = kv_client(&node, &certs)
        .await
        .put(put_request("written-after-restart", "v"))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    let written = Version::new(written.hlc, written.origin);
    assert!(
        written > ahead,
        "version {written} assigned after a restart is not above {ahead}, held before it"
    );
    node.stop().await.unwrap();
}
