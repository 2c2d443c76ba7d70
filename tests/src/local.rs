//! A `caskade local` cluster for end-to-end suites: started in the test's
//! process the way `caskade local` starts it, on an OS-chosen port, with an
//! HTTPS client that trusts only its CA, returned once the router is ready.

use std::path::Path;
use std::time::Duration;

use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_node::config::{DurabilityMode, EngineConfig};
use caskade_router::config::{LimitsConfig, NodePolicy};

use crate::cluster::poll_until;

/// Starts a 3-node local cluster in `dir` and waits (10 s at most) until
/// `/readyz` answers 200.
pub async fn start_local(
    dir: &Path,
    durability: DurabilityMode,
    node_policy: NodePolicy,
) -> anyhow::Result<(LocalCluster, reqwest::Client)> {
    caskade_common::tls::install_crypto_provider();
    let cluster = LocalCluster::start(LocalOptions {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        nodes: 3,
        engine: EngineConfig {
            durability,
            ..EngineConfig::default()
        },
        node_policy,
        replication_factor: None,
        router_limits: LimitsConfig::default(),
        router_metrics_listen: None,
    })
    .await?;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cluster.certs.ca)?)?;
    let client = reqwest::Client::builder().tls_certs_only([ca]).build()?;
    let readyz = format!("{}/readyz", cluster.url);
    poll_until(
        "the router to be ready",
        Duration::from_secs(10),
        || async {
            let ready = client.get(&readyz).send().await;
            ready.is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    Ok((cluster, client))
}

/// `GET /admin/v1/cluster` with the cluster's admin token, as JSON.
pub async fn cluster_page(
    client: &reqwest::Client,
    cluster: &LocalCluster,
) -> anyhow::Result<serde_json::Value> {
    let response = client
        .get(format!("{}/admin/v1/cluster", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await?
        .error_for_status()?;
    Ok(response.json().await?)
}
