//! `Idempotency-Key` end to end through a real router: a write retried ten
//! times is applied once and answered the same way each time; the same key
//! with a different request is refused and changes nothing.

// Helpers outside #[test] fns unwrap too: a failed setup should fail loudly.
#![allow(clippy::unwrap_used)]

use caskade_cli::local::LocalCluster;
use caskade_node::config::DurabilityMode;
use caskade_router::config::NodePolicy;
use std::time::Duration;

use caskade_tests::cluster::poll_until;
use caskade_tests::local::{cluster_page, start_local};
use serde_json::Value;

async fn cluster(dir: &std::path::Path) -> (LocalCluster, reqwest::Client) {
    start_local(dir, DurabilityMode::Never, NodePolicy::default())
        .await
        .unwrap()
}

/// Each node's last sequence number, in node order.
async fn node_seqs(client: &reqwest::Client, cluster: &LocalCluster) -> Vec<u64> {
    let page = cluster_page(client, cluster).await.unwrap();
    page["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            n["stats"]["last_seq"]
                .as_u64()
                .expect("stats of every node")
        })
        .collect()
}

/// Writes applied since `before`: with three replicas on three nodes every
/// applied write ends up once on each node, so once replication has
/// settled every node counts the same number of new records.
async fn writes_applied(client: &reqwest::Client, cluster: &LocalCluster, before: &[u64]) -> u64 {
    let applied = std::cell::Cell::new(0);
    poll_until("replication settles", Duration::from_secs(10), || async {
        let deltas: Vec<u64> = node_seqs(client, cluster)
            .await
            .iter()
            .zip(before)
            .map(|(now, then)| now - then)
            .collect();
        applied.set(deltas[0]);
        deltas.iter().all(|&d| d == deltas[0])
    })
    .await;
    applied.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_retried_ten_times_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster(dir.path()).await;
    let url = format!("{}/v1/kv/orders/1001", cluster.url);
    let before = node_seqs(&client, &cluster).await;

    let mut etags = Vec::new();
    for attempt in 0..10 {
        let response = client
            .put(&url)
            .bearer_auth(&cluster.admin_token)
            .header("idempotency-key", "order-1001-create")
            .body("paid")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "attempt {attempt}");
        let replayed = response.headers().get("idempotent-replayed").is_some();
        assert_eq!(replayed, attempt > 0, "attempt {attempt}");
        etags.push(response.headers()["etag"].to_str().unwrap().to_string());
    }
    assert!(etags.iter().all(|e| *e == etags[0]), "{etags:?}");
    assert_eq!(writes_applied(&client, &cluster, &before).await, 1);

    // The same key for a different request: refused, nothing written.
    let response = client
        .put(&url)
        .bearer_auth(&cluster.admin_token)
        .header("idempotency-key", "order-1001-create")
        .body("refunded")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    let value = client
        .get(&url)
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(value.text().await.unwrap(), "paid");
    assert_eq!(writes_applied(&client, &cluster, &before).await, 1);

    // Without the header, every request is applied.
    for _ in 0..2 {
        let response = client
            .put(&url)
            .bearer_auth(&cluster.admin_token)
            .body("paid")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(writes_applied(&client, &cluster, &before).await, 3);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster(dir.path()).await;
    let before = node_seqs(&client, &cluster).await;
    let batch =
        r#"{"ops":[{"op":"put","key":"a","value":"1"},{"op":"put","key":"b","value":"2"}]}"#;
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let response = client
            .post(format!("{}/v1/batch", cluster.url))
            .bearer_auth(&cluster.admin_token)
            .header("idempotency-key", "batch-7")
            .header("content-type", "application/json")
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.text().await.unwrap());
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    assert_eq!(writes_applied(&client, &cluster, &before).await, 2);
    cluster.stop().await.unwrap();
}
