//! Listing keys across replicas: a key is listed when its newest version on
//! the replicas that answered is live, and a listing is answered only when
//! a majority of every range's replicas answered; otherwise it is refused,
//! never answered with acknowledged keys missing.
#![allow(clippy::unwrap_used)]

use caskade_router::config::NodePolicy;
use caskade_tests::cluster::{ClusterSpec, TestCluster};
use reqwest::StatusCode;
use serde_json::Value;

/// `GET /v1/kv?prefix=…`: the status and body.
async fn list(tc: &TestCluster, prefix: &str) -> (StatusCode, Value) {
    let response = tc
        .client()
        .get(tc.at(&format!("/v1/kv?prefix={prefix}")))
        .bearer_auth(&tc.writer_token)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_shows_acknowledged_keys_or_refuses() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, NodePolicy::default()))
        .await
        .unwrap();
    for n in 0..5 {
        let put = tc
            .put_level(&format!("list-{n}"), "v", "quorum")
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::CREATED);
    }
    let deleted = tc
        .client()
        .delete(tc.kv_url("list-0"))
        .bearer_auth(&tc.writer_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let (status, body) = list(&tc, "list-").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["keys"],
        serde_json::json!(["list-1", "list-2", "list-3", "list-4"])
    );

    // With two of three replicas gone, keys acknowledged by those two only
    // could be missing from the third: the listing is refused.
    let ids = tc.node_ids();
    tc.stop_node(ids[0]).await.unwrap();
    tc.stop_node(ids[1]).await.unwrap();
    let (status, body) = list(&tc, "list-").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    tc.shutdown().await.unwrap();
}
