//! The admin API (`/admin/v1`, admin role): the cluster as the router sees
//! it, and operator calls forwarded to one node (merge, backup).
//!
//! Node statistics are fetched live, concurrently and with the normal
//! per-node timeout; a node that does not answer is shown with its error
//! instead of failing the whole page.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use caskade_proto::{BackupRequest, MergeRequest, NodeState, StatsRequest};
use serde_json::{Value, json};

use crate::app::{AppState, RequestId};
use crate::auth::Role;
use crate::error::ApiError;

/// Merge and backup copy whole data files; give them this long.
const OPERATOR_TIMEOUT: Duration = Duration::from_secs(600);

/// `GET /admin/v1/cluster`.
pub async fn cluster(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let view = state.view()?;
    let mut stats = tokio::task::JoinSet::new();
    for node in view.nodes.values() {
        let node = std::sync::Arc::clone(node);
        // Outside the per-node stack: an operator polling this page must
        // not count against a node's breaker or take its request slots.
        stats.spawn(async move {
            let answer =
                tokio::time::timeout(node.timeout(), node.operator().stats(StatsRequest {})).await;
            let answer = match answer {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
            };
            (node.id, answer)
        });
    }
    let mut by_node = std::collections::BTreeMap::new();
    while let Some(joined) = stats.join_next().await {
        if let Ok((id, answer)) = joined {
            by_node.insert(id, answer);
        }
    }
    let nodes: Vec<Value> = view
        .map
        .nodes
        .iter()
        .map(|entry| {
            let handle = view.nodes.get(&entry.id);
            let stats = match by_node.get(&entry.id) {
                Some(Ok(s)) => json!({
                    "keys": s.keys,
                    "tombstones": s.tombstones,
                    "live_bytes": s.live_bytes,
                    "dead_bytes": s.dead_bytes,
                    "files": s.files,
                    "merges": s.merges,
                    "last_seq": s.last_seq,
                    "caught_up": s.ready,
                    "disk_full": s.disk_full,
                    "writes_poisoned": s.writes_poisoned,
                    "clock": s.clock.as_ref().map(|c| json!({
                        "max_offset_ms": c.max_offset_ms,
                        "off": c.off,
                        "peers": c.peers.iter().map(|p| json!({
                            "peer": p.peer_id,
                            "offset_ms": p.offset_ms,
                            "beyond_bound": p.beyond_bound,
                            "age_seconds": p.age_seconds,
                        })).collect::<Vec<_>>(),
                    })),
                    "map_epoch": s.map_epoch,
                    "taking_over_epoch": s.taking_over_epoch,
                    "anti_entropy": json!({
                        "exchanges": s.anti_entropy_exchanges,
                        "repaired": s.anti_entropy_repaired,
                        "last_full_round_age_seconds":
                            (s.anti_entropy_last_full_round_age_seconds >= 0.0)
                                .then_some(s.anti_entropy_last_full_round_age_seconds),
                    }),
                    "raft": s.raft.as_ref().map(|r| json!({
                        "role": r.role,
                        "term": r.term,
                        "leader": r.leader_id,
                        "last_log_index": r.last_log_index,
                        "last_applied_index": r.last_applied_index,
                        "voters": r.voters,
                        "learners": r.learners,
                        "joined": r.joined,
                    })),
                    "replication": s.peers.iter().map(|p| json!({
                        "peer": p.peer_id,
                        "cursor": p.cursor,
                        "peer_last_seq": p.peer_last_seq,
                        "lag_records": p.lag_records,
                        "lag_seconds": p.lag_seconds,
                        "reachable": p.reachable,
                        "full_catch_ups": p.full_catch_ups,
                        "short_of_space": p.short_of_space,
                        "refilled_epoch": p.refilled_epoch,
                    })).collect::<Vec<_>>(),
                }),
                Some(Err(status)) => json!({ "error": status.code().description() }),
                None => Value::Null,
            };
            json!({
                "id": entry.id,
                "addr": entry.addr,
                "state": state_name(entry.state()),
                "down": entry.down,
                "ready": handle.is_some_and(|h| h.is_ready()),
                "breaker": handle.map(|h| h.breaker().as_str()),
                "in_flight": handle.map(|h| h.in_flight()),
                "stats": stats,
            })
        })
        .collect();
    let leader = by_node
        .values()
        .filter_map(|s| s.as_ref().ok())
        .filter_map(|s| s.raft.as_ref())
        .filter(|r| r.role == "leader")
        .max_by_key(|r| r.term)
        .map(|r| r.leader_id);
    Ok(Json(json!({
        "epoch": view.map.epoch,
        "leader": leader,
        "replication_factor": view.map.replication_factor,
        "vnodes_per_node": view.map.vnodes_per_node,
        "nodes": nodes,
    })))
}

/// `POST /admin/v1/nodes/{id}/merge`.
pub async fn merge(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let node = node(&state, node_id(id)?)?;
    let report = operator_call(
        &request_id,
        node.operator().merge(with_id(MergeRequest {}, &request_id)),
    )
    .await?;
    Ok(Json(json!({
        "node": node.id,
        "input_files": report.input_files,
        "output_files": report.output_files,
        "records_kept": report.records_kept,
        "records_dropped": report.records_dropped,
        "bytes_reclaimed": report.bytes_reclaimed,
    })))
}

/// `POST /admin/v1/nodes/{id}/backup`.
pub async fn backup(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = state.authenticate(&headers)?;
    state.authorize(&principal, Role::Admin, None)?;
    let node = node(&state, node_id(id)?)?;
    let report = operator_call(
        &request_id,
        node.operator()
            .backup(with_id(BackupRequest {}, &request_id)),
    )
    .await?;
    Ok(Json(json!({
        "node": node.id,
        "path": report.path,
        "files": report.files,
        "bytes": report.bytes,
        "last_seq": report.last_seq,
    })))
}

/// The node id of an `/admin/v1/nodes/{id}…` path. Taken by handlers as
/// the path extractor's result, not the extractor itself, so that a path
/// axum cannot decode is refused only after the token was checked, and in
/// the router's JSON.
pub(crate) fn node_id(path: Result<Path<String>, PathRejection>) -> Result<u32, ApiError> {
    let id = match path {
        Ok(Path(id)) => id.parse().ok(),
        Err(rejection) => {
            // The client gets the router's own message; why axum refused
            // the path is for whoever debugs it.
            tracing::debug!(%rejection, "admin path not decoded");
            None
        }
    };
    id.ok_or_else(|| ApiError::bad_request("invalid_argument", "node id must be a number"))
}

fn node(state: &AppState, id: u32) -> Result<std::sync::Arc<crate::nodes::NodeHandle>, ApiError> {
    state
        .view()?
        .nodes
        .get(&id)
        .cloned()
        .ok_or(ApiError::NotFound("no such node"))
}

pub(crate) fn with_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(id) = tonic::metadata::MetadataValue::try_from(request_id) {
        request
            .metadata_mut()
            .insert(caskade_common::telemetry::REQUEST_ID_HEADER, id);
    }
    request
}

async fn operator_call<T>(
    request_id: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(OPERATOR_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => {
            tracing::warn!(request_id, code = ?status.code(), message = status.message(), "operator call failed");
            Err(match status.code() {
                tonic::Code::Unavailable => ApiError::Unavailable,
                tonic::Code::ResourceExhausted => ApiError::InsufficientStorage,
                _ => ApiError::Internal,
            })
        }
        Err(_) => Err(ApiError::Timeout),
    }
}

pub(crate) fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Unspecified => "unspecified",
        NodeState::Active => "active",
        NodeState::Joining => "joining",
        NodeState::Leaving => "leaving",
    }
}
