//! `POST /admin/v1/nodes` and `DELETE /admin/v1/nodes/{id}`: changing who
//! is in the cluster.
//!
//! Every change is a proposal to the nodes' Raft group (`Admin/ChangeCluster`
//! on any node, which passes it to the leader), based on the epoch of the
//! map this router holds (or the `epoch` the operator gives): if the map
//! moved meanwhile, the change is refused with 409 and nothing changes, so
//! two operators racing through two routers cannot both win. The router
//! never writes the map itself. The nodes move the data: each pulls its new
//! ranges and drops the ones it lost once the new owners have them.
//!
//! Adding a node makes it a Raft learner that catches up with the map's
//! log, then puts it on the ring; it reports not ready until it has pulled
//! its ranges, and routers skip it until then. Removing a live node is two
//! changes: it is first marked leaving (off the ring, still in the map, so
//! the others pull from it), and removed once every remaining node reports
//! it has pulled everything of its ranges since the ring took that shape.
//! If that takes longer than [`DRAIN_DEADLINE`], the answer is 202 with the
//! node still leaving, and the same DELETE finishes it later. A node marked
//! down (dead) is removed at once: its ranges are pulled again from their
//! surviving replicas; `?force=true` does the same for a node the operator
//! knows is gone when automatic failover is off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use caskade_proto::change_cluster_request::Change;
use caskade_proto::{ChangeClusterRequest, ClusterMap, NodeAddress, NodeState, StatsRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::admin;
use crate::app::{AppState, BodyLimit, RequestId, read_body};
use crate::auth::Role;
use crate::error::ApiError;
use crate::nodes::NodeHandle;
use crate::params::Query;

/// How long a removal waits for the remaining nodes to pull from the leaving one.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two checks of the remaining nodes while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long a proposal may take through one node (a new node's catch-up
/// as a learner included).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(35);
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
    let limit = BodyLimit {
        bytes: MAX_ADD_BODY,
        what: "request body",
    };
    let body = read_body(body, limit).await?;
    let add: AddNode = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("node: {e}")))?;
    let map = state.view()?.map.clone();
    check_epoch(&map, add.epoch)?;
    validate_addr(&add.addr)?;
    if add.id == 0 {
        return Err(ApiError::bad_request(
            "invalid_argument",
            "node ids start at 1",
        ));
    }
    let change = Change::Add(NodeAddress {
        id: add.id,
        addr: add.addr.clone(),
    });
    // Without an operator's epoch the change applies to whatever map is
    // current; the map itself refuses an id or address already in use.
    let next = propose(&state, &request_id, add.epoch.unwrap_or(0), change).await?;
    tracing::info!(node = add.id, addr = %add.addr, epoch = next.epoch, "node added");
    Ok(Json(map_json(&next)))
}

/// `DELETE /admin/v1/nodes/{id}[?epoch=E]`: drains and removes a node.
pub async fn remove(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let query = Query::parse(uri.query(), &["epoch", "force"])?;
    let force = match query.text("force")? {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "force must be true or false",
            ));
        }
    };
    let expected = query
        .text("epoch")?
        .map(|e| {
            e.parse::<u64>()
                .map_err(|_| ApiError::bad_request("invalid_query", "epoch must be a number"))
        })
        .transpose()?;
    let id = admin::node_id(id)?;
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
    let expected = expected.unwrap_or(0);
    if node.down || force {
        // A dead node has nothing to drain: its ranges come back from
        // their surviving replicas once it is off the ring. `force` does
        // the same for a node the operator knows is gone for good.
        let next = propose(&state, &request_id, expected, Change::Remove(id)).await?;
        tracing::info!(node = id, epoch = next.epoch, "down node removed");
        return Ok(Json(map_json(&next)).into_response());
    }
    let mut map = map.clone();
    // The epoch whose ring the others must have pulled from the node under;
    // for a node already leaving, each node's own ring epoch.
    let mut since = 0;
    if node.state() != NodeState::Leaving {
        let leaving = propose(&state, &request_id, expected, Change::Leave(id)).await?;
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
    // Other changes (a node marked down or up) may have moved the epoch
    // while draining; removing a leaving node is right whatever they were.
    let next = propose(&state, &request_id, 0, Change::Remove(id)).await?;
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
    caskade_common::config::validate_addr(addr)
        .map_err(|why| ApiError::bad_request("invalid_argument", format!("addr: {why}")))
}

/// Proposes `change` based on `expected_epoch` to the cluster through any
/// node that answers, and adopts the map it committed.
async fn propose(
    state: &AppState,
    request_id: &str,
    expected_epoch: u64,
    change: Change,
) -> Result<ClusterMap, ApiError> {
    let view = state.view()?;
    // Ready nodes first: any node passes the change to the leader.
    let mut nodes: Vec<Arc<NodeHandle>> = view.nodes.values().cloned().collect();
    nodes.sort_by_key(|n| (!n.is_ready(), view.map.is_down(n.id)));
    let mut last_error = String::from("no node of the cluster map answered");
    for node in nodes {
        let request = crate::admin::with_id(
            ChangeClusterRequest {
                expected_epoch,
                change: Some(change.clone()),
            },
            request_id,
        );
        let answer =
            tokio::time::timeout(CHANGE_TIMEOUT, node.operator().change_cluster(request)).await;
        let status = match answer {
            Ok(Ok(answer)) => {
                let map = answer.into_inner().map.ok_or_else(|| {
                    ApiError::ClusterUnavailable("the node answered no map".into())
                })?;
                if let Err(e) = state.cluster.adopt(map.clone()) {
                    tracing::warn!(error = %e, "adopting the new map");
                }
                return Ok(map);
            }
            Ok(Err(status)) => status,
            // The node may have passed it on: trying another could make it twice.
            Err(_) => {
                return Err(ApiError::ClusterUnavailable(format!(
                    "node {} did not answer in time; the change may still commit: read the map",
                    node.id
                )));
            }
        };
        match status.code() {
            Code::Aborted => return Err(ApiError::Conflict(status.message().to_owned())),
            Code::NotFound => return Err(ApiError::NotFound("no such node")),
            Code::InvalidArgument => {
                return Err(ApiError::bad_request(
                    "invalid_argument",
                    status.message().to_owned(),
                ));
            }
            // The node answered: the change reached the cluster, whose
            // answer this is (no leader, no quorum, not committed in time).
            Code::Unavailable if !is_transport_error(&status) => {
                return Err(ApiError::ClusterUnavailable(status.message().to_owned()));
            }
            // Connection refused or not made: it never reached the cluster.
            _ if is_transport_error(&status) => {
                tracing::debug!(node = node.id, code = ?status.code(), "proposing through node failed");
                last_error = format!("node {}: {}", node.id, status.message());
            }
            _ => {
                return Err(ApiError::ClusterUnavailable(format!(
                    "node {}: {}; the change may still commit: read the map",
                    node.id,
                    status.message()
                )));
            }
        }
    }
    Err(ApiError::ClusterUnavailable(last_error))
}

/// Whether `status` is tonic's report of a connection that failed, rather
/// than the node's own answer.
fn is_transport_error(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
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
        // A node that died while draining has nothing more to give.
        if state.view().is_ok_and(|v| v.map.is_down(leaving)) {
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
            "down": n.down,
        })).collect::<Vec<_>>(),
    })
}
