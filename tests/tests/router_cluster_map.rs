//! The router holds no state of its own: it takes the cluster map from the
//! nodes and adopts a newer epoch without a restart.

// Helpers outside #[test] fns unwrap too: a failed setup should fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use caskade_cli::local::LocalCluster;
use caskade_common::tls::TlsMaterial;
use caskade_node::config::DurabilityMode;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{GetClusterMapRequest, SetClusterMapRequest};
use caskade_router::config::NodePolicy;
use caskade_tests::local::{cluster_page, start_local};
use tonic::transport::Endpoint;

async fn router_epoch(client: &reqwest::Client, cluster: &LocalCluster) -> Option<u64> {
    cluster_page(client, cluster).await.ok()?["epoch"].as_u64()
}

async fn until_epoch(client: &reqwest::Client, cluster: &LocalCluster, epoch: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while router_epoch(client, cluster).await != Some(epoch) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "router did not adopt epoch {epoch} in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_adopts_a_newer_map_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The map is re-read every ten health rounds: every 0.5 s here.
    let policy = NodePolicy {
        health_interval_ms: 50,
        ..NodePolicy::default()
    };
    let (cluster, client) = start_local(dir.path(), DurabilityMode::Never, policy)
        .await
        .unwrap();
    until_epoch(&client, &cluster, 1).await;

    // An operator writes epoch 2 (replication factor 2 now) to every node.
    let tls = TlsMaterial::load(&cluster.certs.client).unwrap();
    let mut admins = Vec::new();
    for addr in &cluster.node_addrs {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls.grpc_client("127.0.0.1"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        admins.push(AdminClient::new(channel));
    }
    let mut map = admins[0]
        .get_cluster_map(GetClusterMapRequest {})
        .await
        .unwrap()
        .into_inner()
        .map
        .unwrap();
    map.epoch = 2;
    map.replication_factor = 2;
    for admin in &mut admins {
        admin
            .set_cluster_map(SetClusterMapRequest {
                map: Some(map.clone()),
            })
            .await
            .unwrap();
    }
    until_epoch(&client, &cluster, 2).await;
    let page = cluster_page(&client, &cluster).await.unwrap();
    assert_eq!(page["replication_factor"], 2);

    // The router still serves on the new map.
    let url = format!("{}/v1/kv/after-epoch-2", cluster.url);
    let put = client
        .put(&url)
        .bearer_auth(&cluster.admin_token)
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let got = client
        .get(&url)
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.text().await.unwrap(), "v");
    cluster.stop().await.unwrap();
}
