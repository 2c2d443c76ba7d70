//! `caskade local` as a user meets it: the files it promises under the data
//! directory, a restart that reuses certificates, secret and data, and the
//! admin calls that reach one node through the router (merge, backup).

// Helpers outside #[test] fns unwrap too: a failed setup should fail loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use caskade_cli::local::LocalCluster;
use caskade_node::config::DurabilityMode;
use caskade_router::config::NodePolicy;
use caskade_tests::local::start_local;
use serde_json::Value;

async fn start(dir: &Path) -> (LocalCluster, reqwest::Client) {
    start_local(dir, DurabilityMode::Always, NodePolicy::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_certificates_secret_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    for file in [
        "certs/ca.pem",
        "certs/router.pem",
        "jwt-secret",
        "admin.token",
    ] {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    let token_file = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    assert_eq!(token_file.trim(), cluster.admin_token);
    let put = client
        .put(format!("{}/v1/kv/kept", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .body("across restarts")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let ca = std::fs::read(dir.path().join("certs/ca.pem")).unwrap();
    let secret = std::fs::read(dir.path().join("jwt-secret")).unwrap();
    let first_token = cluster.admin_token.clone();
    cluster.stop().await.unwrap();

    let (cluster, client) = start(dir.path()).await;
    assert_eq!(std::fs::read(dir.path().join("certs/ca.pem")).unwrap(), ca);
    assert_eq!(
        std::fs::read(dir.path().join("jwt-secret")).unwrap(),
        secret
    );
    // Same secret: a token from the first run still works.
    let got = client
        .get(format!("{}/v1/kv/kept", cluster.url))
        .bearer_auth(&first_token)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "across restarts");
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_and_backup_reach_one_node_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    for i in 0..20 {
        client
            .put(format!("{}/v1/kv/k{i}", cluster.url))
            .bearer_auth(&cluster.admin_token)
            .body("v")
            .send()
            .await
            .unwrap();
    }
    let admin = |path: String| {
        client
            .post(format!("{}/admin/v1/nodes/{path}", cluster.url))
            .bearer_auth(&cluster.admin_token)
            .send()
    };
    let merged: Value = admin("1/merge".into()).await.unwrap().json().await.unwrap();
    assert_eq!(merged["node"], 1, "{merged}");
    let response = admin("2/backup".into()).await.unwrap();
    assert_eq!(response.status(), 200);
    let backup: Value = response.json().await.unwrap();
    let path = backup["path"].as_str().unwrap();
    assert!(
        Path::new(path).starts_with(dir.path().join("node-2-backups")),
        "{path}"
    );
    assert!(Path::new(path).is_dir());

    let missing = admin("9/merge".into()).await.unwrap();
    assert_eq!(missing.status(), 404);
    let bad = admin("x/backup".into()).await.unwrap();
    assert_eq!(bad.status(), 400);
    // Writers are not operators.
    let writer_token = caskade_router::auth::issue_hs256(
        &caskade_router::auth::load_hs256_secret(&cluster.secret_file).unwrap(),
        &caskade_router::auth::TokenRequest {
            subject: "w",
            role: caskade_router::auth::Role::Writer,
            prefix: None,
            ttl: Duration::from_secs(60),
            issuer: None,
            audience: None,
            kid: None,
        },
    )
    .unwrap();
    let forbidden = client
        .post(format!("{}/admin/v1/nodes/1/merge", cluster.url))
        .bearer_auth(writer_token)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    cluster.stop().await.unwrap();
}
