//! `POST /admin/v1/nodes` and `DELETE /admin/v1/nodes/{id}`: changing who
//! is in the cluster.
//!
//! A change is a new cluster map with the next epoch, written with
//! `Admin/SetClusterMap` to every node of the old and the new map, then
//! adopted by this router (others find it by their refresh). A node that
//! already holds a different map of that epoch or a newer one refuses it,
//! and the change is a 409: two operators racing cannot both win. The
//! nodes move the data themselves: each pulls its new ranges and drops the
//! ones it lost once the new owners have them.
//!
//! Adding a node puts it on the ring at once; it reports not ready until it
//! has pulled its ranges, and routers skip it until then. Removing a node
//! is two changes: it is first marked leaving (off the ring, still in the
//! map, so the others pull from it), and removed once every remaining node
//! reports it has pulled everything of its ranges since the ring took that
//! shape. If that takes longer than [`DRAIN_DEADLINE`], the answer is 202
//! with the node still leaving, and the same DELETE finishes it later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use caskade_proto::{ClusterMap, ClusterNode, NodeState, SetClusterMapRequest, StatsRequest};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{AppState, RequestId, read_body};
use crate::auth::Role;
use crate::error::ApiError;
use crate::nodes::NodeHandle;
use crate::params::Query;

/// How long a removal waits for the remaining nodes to pull from the leaving one.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two checks of the remaining nodes while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long one node may take to store a new map.
const MAP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest body of `POST /admin/v1/nodes`.
const MAX_ADD_BODY: usize = 4096;

/// The body of `POST /admin/v1/nodes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    /// The new node's id (its `id` setting), unique in the cluster.
    id: u32,
    /// Its gRPC address, `host:port`, as routers and nodes will reach it.
    addr: String,
    /// The epoch the change is based on; a different current epoch is a 409.
    #[serde(default)]
    epoch: Option<u64>,
}

/// `POST /admin/v1/nodes` `{"id", "addr", "epoch"?}`: adds a node.
pub async fn add(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let body = read_body(body, MAX_ADD_BODY, "request body").await?;
    let add: AddNode = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("node: {e}")))?;
    let map = state.view()?.map.clone();
    check_epoch(&map, add.epoch)?;
    validate_addr(&add.addr)?;
    if let Some(node) = map.nodes.iter().find(|n| n.id == add.id) {
        return Err(ApiError::Conflict(format!(
            "node {} is already in the cluster map ({})",
            node.id, node.addr
        )));
    }
    if let Some(node) = map.nodes.iter().find(|n| n.addr == add.addr) {
        return Err(ApiError::Conflict(format!(
            "address {} is node {}'s",
            add.addr, node.id
        )));
    }
    let mut next = map.clone();
    next.epoch += 1;
    next.nodes.push(ClusterNode {
        id: add.id,
        addr: add.addr.clone(),
        state: NodeState::Active as i32,
    });
    publish(&state, &request_id, &map, &next).await?;
    tracing::info!(node = add.id, addr = %add.addr, epoch = next.epoch, "node added");
    Ok(Json(map_json(&next)))
}

/// `DELETE /admin/v1/nodes/{id}[?epoch=E]`: drains and removes a node.
pub async fn remove(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let query = Query::parse(uri.query(), &["epoch"])?;
    let expected = query
        .text("epoch")?
        .map(|e| {
            e.parse::<u64>()
                .map_err(|_| ApiError::bad_request("invalid_query", "epoch must be a number"))
        })
        .transpose()?;
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_argument", "node id must be a number"))?;
    let map = state.view()?.map.clone();
    check_epoch(&map, expected)?;
    let Some(node) = map.nodes.iter().find(|n| n.id == id) else {
        return Err(ApiError::NotFound("no such node"));
    };
    let remaining: Vec<u32> = map
        .ring_members()
        .into_iter()
        .filter(|&n| n != id)
        .collect();
    if remaining.len() < map.replication_factor as usize {
        return Err(ApiError::Conflict(format!(
            "removing node {id} would leave {} nodes for a replication factor of {}",
            remaining.len(),
            map.replication_factor
        )));
    }
    let mut map = map.clone();
    // The epoch whose ring the others must have pulled from the node under;
    // for a node already leaving, each node's own ring epoch.
    let mut since = 0;
    if node.state() != NodeState::Leaving {
        let mut leaving = map.clone();
        leaving.epoch += 1;
        for n in &mut leaving.nodes {
            if n.id == id {
                n.state = NodeState::Leaving as i32;
            }
        }
        publish(&state, &request_id, &map, &leaving).await?;
        tracing::info!(node = id, epoch = leaving.epoch, "node leaving; draining");
        since = leaving.epoch;
        map = leaving;
    }
    if !drained(&state, &map, id, since).await {
        let body = json!({
            "state": "leaving",
            "message": "the remaining nodes are still pulling from this node; send the same DELETE again to finish",
            "map": map_json(&map),
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let mut next = map.clone();
    next.epoch += 1;
    next.nodes.retain(|n| n.id != id);
    publish(&state, &request_id, &map, &next).await?;
    tracing::info!(node = id, epoch = next.epoch, "node removed");
    Ok(Json(map_json(&next)).into_response())
}

fn check_epoch(map: &ClusterMap, expected: Option<u64>) -> Result<(), ApiError> {
    match expected {
        Some(epoch) if epoch != map.epoch => Err(ApiError::Conflict(format!(
            "the cluster map is at epoch {}, not {epoch}",
            map.epoch
        ))),
        _ => Ok(()),
    }
}

fn validate_addr(addr: &str) -> Result<(), ApiError> {
    let port = addr
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|&port| port != 0);
    if port.is_none() || addr.chars().any(char::is_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "addr must be host:port with a port from 1 to 65535",
        ));
    }
    Ok(())
}

/// Writes `next` to every node of `current` and `next`, then adopts it.
async fn publish(
    state: &AppState,
    request_id: &str,
    current: &ClusterMap,
    next: &ClusterMap,
) -> Result<(), ApiError> {
    let mut targets: Vec<Arc<NodeHandle>> = Vec::new();
    for node in current.nodes.iter().chain(&next.nodes) {
        if targets.iter().any(|t| t.id == node.id) {
            continue;
        }
        let handle = state.cluster.handle_for(node.id, &node.addr).map_err(|e| {
            tracing::warn!(node = node.id, error = %e, "no channel to node");
            ApiError::bad_request(
                "invalid_argument",
                format!("node {} has an unusable address", node.id),
            )
        })?;
        targets.push(handle);
    }
    let mut unreachable = Vec::new();
    for node in &targets {
        let request = crate::admin::with_id(
            SetClusterMapRequest {
                map: Some(next.clone()),
            },
            request_id,
        );
        let answer =
            tokio::time::timeout(MAP_WRITE_TIMEOUT, node.operator().set_cluster_map(request)).await;
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(status)) if status.code() == tonic::Code::Aborted => {
                return Err(ApiError::Conflict(format!(
                    "node {} holds a newer or different cluster map; read the map and retry",
                    node.id
                )));
            }
            Ok(Err(status)) => {
                tracing::warn!(node = node.id, code = ?status.code(), "writing the cluster map failed");
                unreachable.push(node.id);
            }
            Err(_) => unreachable.push(node.id),
        }
    }
    // Nodes that missed it learn the new map from their peers' pulls.
    if unreachable.len() == targets.len() {
        return Err(ApiError::Unavailable);
    }
    if !unreachable.is_empty() {
        tracing::warn!(
            ?unreachable,
            epoch = next.epoch,
            "nodes did not take the new map; peers will pass it on"
        );
    }
    if let Err(e) = state.cluster.adopt(next.clone()) {
        tracing::error!(error = %e, "adopting the new map");
        return Err(ApiError::Internal);
    }
    Ok(())
}

/// Waits (up to [`DRAIN_DEADLINE`]) until every node on the ring of `map`
/// reports it pulled everything of its ranges from `leaving` since its ring
/// took its current shape.
async fn drained(state: &AppState, map: &ClusterMap, leaving: u32, since: u64) -> bool {
    let started = Instant::now();
    loop {
        if all_pulled_from(state, map, leaving, since).await {
            return true;
        }
        if started.elapsed() > DRAIN_DEADLINE {
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

async fn all_pulled_from(state: &AppState, map: &ClusterMap, leaving: u32, since: u64) -> bool {
    for id in map.ring_members() {
        let Some(node) = map.nodes.iter().find(|n| n.id == id) else {
            return false;
        };
        let Ok(handle) = state.cluster.handle_for(node.id, &node.addr) else {
            return false;
        };
        let answer =
            tokio::time::timeout(handle.timeout(), handle.operator().stats(StatsRequest {})).await;
        let Ok(Ok(stats)) = answer else {
            return false;
        };
        let stats = stats.into_inner();
        let needed = since.max(stats.ring_epoch).max(1);
        let pulled = stats
            .peers
            .iter()
            .any(|p| p.peer_id == leaving && p.refilled_epoch >= needed);
        if !pulled {
            return false;
        }
    }
    true
}

/// The map as the admin API shows it.
pub fn map_json(map: &ClusterMap) -> Value {
    json!({
        "epoch": map.epoch,
        "replication_factor": map.replication_factor,
        "vnodes_per_node": map.vnodes_per_node,
        "nodes": map.nodes.iter().map(|n| json!({
            "id": n.id,
            "addr": n.addr,
            "state": crate::admin::state_name(n.state()),
        })).collect::<Vec<_>>(),
    })
}
