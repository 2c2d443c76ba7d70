//! The router holds no state of its own: it takes the cluster map the
//! nodes' Raft group committed, and follows a new epoch without a restart,
//! by its long poll (not by its slow periodic refresh).

// Helpers outside #[test] fns unwrap too: a failed setup should fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use caskade_proto::ChangeClusterRequest;
use caskade_proto::change_cluster_request::Change;
use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_follows_a_committed_change_without_restart() {
    // The periodic refresh runs every ten health rounds: ten minutes here,
    // so only the long poll can bring the new map in time.
    let policy = NodePolicy {
        health_interval_ms: 60_000,
        ..NodePolicy::default()
    };
    let tc = TestCluster::start(ClusterSpec::nodes(3, 2, policy))
        .await
        .unwrap();
    let page = tc.admin_cluster().await.unwrap();
    assert_eq!(page["epoch"], 1);
    let ids = tc.node_ids();

    // An operator's change, proposed through a node (not through the router).
    let committed = tc
        .node_admin(ids[0])
        .await
        .unwrap()
        .change_cluster(ChangeClusterRequest {
            expected_epoch: 1,
            change: Some(Change::Leave(ids[2])),
        })
        .await
        .unwrap()
        .into_inner()
        .map
        .unwrap();
    assert_eq!(committed.epoch, 2);
    poll_until(
        "the router to follow epoch 2",
        Duration::from_secs(10),
        || async { tc.admin_cluster().await.is_ok_and(|p| p["epoch"] == 2) },
    )
    .await;
    let page = tc.admin_cluster().await.unwrap();
    let leaving = page["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == ids[2])
        .unwrap();
    assert_eq!(leaving["state"], "leaving");

    // Every node holds the same map for that epoch.
    for &id in &ids {
        let map = tc
            .node_admin(id)
            .await
            .unwrap()
            .get_cluster_map(caskade_proto::GetClusterMapRequest {
                after_epoch: 1,
                wait_ms: 5_000,
            })
            .await
            .unwrap()
            .into_inner()
            .map
            .unwrap();
        assert_eq!(map, committed, "node {id}");
    }

    // The router still serves on the new map, once the nodes that became
    // primaries of ranges under it have taken them over.
    poll_until(
        "the new primaries to take their ranges over",
        Duration::from_secs(10),
        || tc.takeovers_done(),
    )
    .await;
    let put = tc.put("after-epoch-2", "v").await.unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let got = tc.get("after-epoch-2").await.unwrap();
    assert_eq!(got.text().await.unwrap(), "v");
    tc.shutdown().await.unwrap();
}
