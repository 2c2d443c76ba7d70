//! The router's REST API as an operator and a client call it: the admin
//! page (`GET /admin/v1/cluster`), membership changes (`POST
//! /admin/v1/nodes`, `DELETE /admin/v1/nodes/{id}`), and the target the
//! load driver puts through. HTTPS trusting only the cluster CA, one admin
//! token for everything.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use caskade_bench::http::RouterTarget;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::deployment::poll_for;

/// How long the cluster may be without a Raft leader the page names.
const LEADER_DEADLINE: Duration = Duration::from_secs(60);
/// Ceiling of one admin request: a membership change waits for a
/// learner's catch-up or a drain, which the router bounds itself.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The router's admin API.
#[derive(Debug, Clone)]
pub struct Admin {
    client: reqwest::Client,
    /// The CA file, for the clients of [`Admin::target`].
    ca: Arc<Path>,
    url: String,
    auth: String,
}

impl Admin {
    /// The router at `url` (`https://…`), trusted through the CA file `ca`,
    /// called with the admin `token`.
    pub fn new(ca: &Path, url: String, token: &str) -> anyhow::Result<Admin> {
        Ok(Admin {
            client: https_client(ca, ADMIN_TIMEOUT)?,
            ca: Arc::from(ca),
            url,
            auth: format!("Bearer {token}"),
        })
    }

    /// Where the load goes: the router, through a client of its own whose
    /// requests give up after `timeout`.
    pub fn target(&self, timeout: Duration) -> anyhow::Result<Arc<RouterTarget>> {
        Ok(Arc::new((
            https_client(&self.ca, timeout)?,
            self.url.clone(),
            self.auth.clone(),
        )))
    }

    /// `GET /admin/v1/cluster`, which must answer 200.
    pub async fn cluster_page(&self) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}/admin/v1/cluster", self.url))
            .header("authorization", &self.auth)
            .send()
            .await?;
        let status = response.status();
        let page: Value = response.json().await?;
        if status != StatusCode::OK {
            bail!("the admin page answered {status}: {page}");
        }
        Ok(page)
    }

    /// The Raft leader the admin page names, polled until there is one.
    pub async fn leader(&self) -> anyhow::Result<u32> {
        poll_for("a Raft leader", LEADER_DEADLINE, || async {
            page_leader(&self.cluster_page().await.ok()?)
        })
        .await
    }

    /// The map's epoch on the admin page.
    pub async fn epoch(&self) -> anyhow::Result<u64> {
        let page = self.cluster_page().await?;
        page_epoch(&page).with_context(|| format!("no epoch on the admin page: {page}"))
    }

    /// `POST /admin/v1/nodes`: the status and body.
    pub async fn add_node(&self, id: u32, addr: SocketAddr) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .client
            .post(format!("{}/admin/v1/nodes", self.url))
            .header("authorization", &self.auth)
            .json(&json!({ "id": id, "addr": addr.to_string() }))
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `DELETE /admin/v1/nodes/{id}`: the status and body.
    pub async fn remove_node(&self, id: u32) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .client
            .delete(format!("{}/admin/v1/nodes/{id}", self.url))
            .header("authorization", &self.auth)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }
}

/// The entry of node `id` on the admin page.
pub fn page_node(page: &Value, id: u32) -> Option<&Value> {
    page["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

/// The Raft leader the admin page names.
pub fn page_leader(page: &Value) -> Option<u32> {
    page["leader"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
}

/// The map's epoch on the admin page.
pub fn page_epoch(page: &Value) -> Option<u64> {
    page["epoch"].as_u64()
}

/// Whether the admin page shows node `id` in service: in the map, not
/// down, and ready in the router's health checks.
pub fn in_service(page: &Value, id: u32) -> bool {
    page_node(page, id).is_some_and(|n| n["down"] == false && n["ready"] == true)
}

/// Whether the router's circuit breaker for node `id` is closed.
pub fn breaker_closed(page: &Value, id: u32) -> bool {
    page_node(page, id).is_some_and(|n| n["breaker"] == "closed")
}

/// Whether the admin page shows node `id` marked down.
pub fn marked_down(page: &Value, id: u32) -> bool {
    page_node(page, id).is_some_and(|n| n["down"] == true)
}

/// An HTTPS client trusting only the CA in `ca`.
fn https_client(ca: &Path, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca)?)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .timeout(timeout)
        .build()?)
}
