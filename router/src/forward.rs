//! Sending one request to the nodes that own a key, and deciding what a
//! node's failure means for the client.
//!
//! Reads try the key's replicas in preference-list order, healthy ones
//! first, and move to the next replica on any failure of the node (not of
//! the request). Writes go to the first healthy replica and fail over only
//! when the failed attempt certainly did not reach the node's engine: the
//! breaker refused it, the node was full, or the connection could not be
//! made. A write that timed out may have been applied, so it is a 504, not
//! a retry elsewhere.

use std::error::Error as _;
use std::sync::Arc;

use caskade_proto::kv_client::KvClient;
use metrics::counter;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::breaker::BreakerOpen;
use crate::cluster::ClusterView;
use crate::error::ApiError;
use crate::nodes::{NodeHandle, NodeService, Shed};

use caskade_proto::metadata::{
    ACKS as ACKS_METADATA, CURRENT_VERSION as CURRENT_VERSION_METADATA,
    REQUIRED_ACKS as REQUIRED_ACKS_METADATA, WRITTEN_VERSION as WRITTEN_VERSION_METADATA,
};

/// Whether a request only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Safe to repeat on another replica.
    Read,
    /// Repeated elsewhere only if it certainly was not applied.
    Write,
}

/// What to do after a node's answer.
enum Verdict {
    /// Give this error to the client.
    Fail(ApiError),
    /// Try the next replica; report this error if none is left.
    Next(ApiError),
}

/// Which healthy replica a request tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The first in the key's preference list: its primary.
    Preference,
    /// The one with the fewest requests in flight from this router (`r=any`).
    LeastLoaded,
}

/// The replicas of `key` to try, in order: healthy ones (ready, breaker not
/// open) by `order`, then the others in preference-list order, which may
/// have recovered since the last check. A node that answered its health
/// check with NOT_SERVING (shutting down, catching up), or that the map
/// marks down, is never tried.
pub fn replicas(view: &ClusterView, key: &[u8], order: Order) -> Vec<Arc<NodeHandle>> {
    let (mut healthy, others): (Vec<_>, Vec<_>) = view
        .preference_list(key)
        .into_iter()
        .filter(|n| !n.declined() && !view.is_down(n.id))
        .partition(|n| n.is_healthy());
    if order == Order::LeastLoaded {
        // Stable: equally loaded replicas keep preference order.
        healthy.sort_by_key(|n| n.in_flight());
    }
    healthy.extend(others);
    healthy
}

/// Calls `call` on the replicas of `key`, primary first, until one answers, per `access`.
pub async fn to_replicas<M, T, F, Fut>(
    view: &ClusterView,
    key: &[u8],
    access: Access,
    request_id: &str,
    message: M,
    call: F,
) -> Result<T, ApiError>
where
    M: Clone,
    F: Fn(KvClient<NodeService>, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    to_replicas_in(
        view,
        key,
        Order::Preference,
        access,
        request_id,
        message,
        call,
    )
    .await
}

/// Calls `call` on the replicas of `key` in `order` until one answers, per `access`.
pub async fn to_replicas_in<M, T, F, Fut>(
    view: &ClusterView,
    key: &[u8],
    order: Order,
    access: Access,
    request_id: &str,
    message: M,
    call: F,
) -> Result<T, ApiError>
where
    M: Clone,
    F: Fn(KvClient<NodeService>, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut last = ApiError::Unavailable;
    for (attempt, node) in replicas(view, key, order).into_iter().enumerate() {
        if attempt > 0 {
            counter!("caskade_router_retries_total", "node" => node.id.to_string()).increment(1);
        }
        match to_node(&node, access, request_id, message.clone(), &call).await {
            Ok(answer) => return Ok(answer),
            Err(Verdict::Fail(error)) => return Err(error),
            Err(Verdict::Next(error)) => last = error,
        }
    }
    Err(last)
}

/// Calls `call` on one node.
async fn to_node<M, T, F, Fut>(
    node: &NodeHandle,
    access: Access,
    request_id: &str,
    message: M,
    call: &F,
) -> Result<T, Verdict>
where
    F: Fn(KvClient<NodeService>, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut request = tonic::Request::new(message);
    if let Ok(id) = MetadataValue::try_from(request_id) {
        request
            .metadata_mut()
            .insert(caskade_common::telemetry::REQUEST_ID_HEADER, id);
    }
    let _in_flight = node.track();
    match call(node.kv(), request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            let verdict = judge(&status, access);
            if let Verdict::Next(_) = verdict {
                tracing::debug!(node = node.id, code = ?status.code(), "replica failed");
            }
            Err(verdict)
        }
    }
}

/// A node's call as a single request's result, for callers that pick the node themselves.
pub async fn to_one_node<M, T, F, Fut>(
    node: &NodeHandle,
    request_id: &str,
    message: M,
    call: F,
) -> Result<T, ApiError>
where
    F: Fn(KvClient<NodeService>, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    to_node(node, Access::Read, request_id, message, &call)
        .await
        .map_err(|verdict| match verdict {
            Verdict::Fail(error) | Verdict::Next(error) => error,
        })
}

/// The one table from a node's gRPC status to the client's answer.
fn judge(status: &Status, access: Access) -> Verdict {
    let source = status.source();
    let is = |check: fn(&(dyn std::error::Error + 'static)) -> bool| {
        let mut cause = source;
        while let Some(error) = cause {
            if check(error) {
                return true;
            }
            cause = error.source();
        }
        false
    };
    if is(|e| e.is::<BreakerOpen>()) {
        return Verdict::Next(ApiError::Unavailable);
    }
    if is(|e| e.is::<Shed>()) {
        counter!("caskade_router_shed_total").increment(1);
        // A busy node is not a failed one: a write shed by the primary must
        // not be coordinated elsewhere (a condition checked on another node
        // could then hold twice).
        return match access {
            Access::Read => Verdict::Next(ApiError::Overloaded),
            Access::Write => Verdict::Fail(ApiError::Overloaded),
        };
    }
    if is(|e| e.is::<tower::timeout::error::Elapsed>()) || status.code() == Code::DeadlineExceeded {
        return match access {
            Access::Read => Verdict::Next(ApiError::Timeout),
            Access::Write => Verdict::Fail(ApiError::Timeout),
        };
    }
    if let Some(acks) = metadata_number(status, ACKS_METADATA) {
        // Applied, but on too few replicas: never retried elsewhere.
        return Verdict::Fail(ApiError::WriteLevelNotMet {
            acks,
            required: metadata_number(status, REQUIRED_ACKS_METADATA).unwrap_or(0),
            version: metadata_text(status, WRITTEN_VERSION_METADATA),
        });
    }
    let node_failed = |error: ApiError| match access {
        Access::Read => Verdict::Next(error),
        Access::Write => Verdict::Fail(error),
    };
    match status.code() {
        Code::InvalidArgument => {
            Verdict::Fail(ApiError::bad_request("invalid_argument", status.message()))
        }
        Code::FailedPrecondition => Verdict::Fail(ApiError::PreconditionFailed {
            current: metadata_text(status, CURRENT_VERSION_METADATA),
        }),
        Code::NotFound => Verdict::Fail(ApiError::NotFound("not found")),
        Code::ResourceExhausted => node_failed(ApiError::InsufficientStorage),
        // The node refused before applying (not serving, catching up,
        // poisoned), or the connection could not be made; or it is not a
        // replica of the key under its newer map (ABORTED): another replica
        // may serve it.
        Code::Unavailable | Code::Aborted => Verdict::Next(ApiError::Unavailable),
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated
        | Code::DeadlineExceeded => {
            tracing::warn!(code = ?status.code(), message = status.message(), "node failed the request");
            node_failed(ApiError::Internal)
        }
    }
}

fn metadata_text(status: &Status, key: &str) -> Option<String> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn metadata_number(status: &Status, key: &str) -> Option<u32> {
    metadata_text(status, key).and_then(|v| v.parse().ok())
}
