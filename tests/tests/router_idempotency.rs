//! `Idempotency-Key` end to end through a real router: a write retried ten
//! times is applied once and answered the same way each time; the same key
//! with a different request is refused and changes nothing.

// Helpers outside #[test] fns unwrap too: a failed setup should fail loudly.
#![allow(clippy::unwrap_used)]

use caskade_cli::local::LocalCluster;
use caskade_node::config::DurabilityMode;
use caskade_router::config::NodePolicy;
use caskade_tests::local::{cluster_page, start_local};
use serde_json::Value;

async fn cluster(dir: &std::path::Path) -> (LocalCluster, reqwest::Client) {
    start_local(dir, DurabilityMode::Never, NodePolicy::default())
        .await
        .unwrap()
}

/// Records written on all nodes so far (the engines' sequence numbers).
async fn writes_applied(client: &reqwest::Client, cluster: &LocalCluster) -> u64 {
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
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_retried_ten_times_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster(dir.path()).await;
    let url = format!("{}/v1/kv/orders/1001", cluster.url);
    let before = writes_applied(&client, &cluster).await;

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
    assert_eq!(writes_applied(&client, &cluster).await - before, 1);

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
    assert_eq!(writes_applied(&client, &cluster).await - before, 1);

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
    assert_eq!(writes_applied(&client, &cluster).await - before, 3);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster(dir.path()).await;
    let before = writes_applied(&client, &cluster).await;
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
    assert_eq!(writes_applied(&client, &cluster).await - before, 2);
    cluster.stop().await.unwrap();
}
