//! Sending one request to the nodes that own a key, and deciding what a
//! node's failure means for the client.
//!
//! Reads try the key's replicas in preference-list order, healthy ones
//! first, and move to the next replica on any failure of the node (not of
//! the request). Writes go to the key's primary under the map; another
//! replica is tried only when the attempt certainly changed nothing: the
//! breaker refused it, the connection could not be made, the node refused
//! the stream or answered that it did not apply it (not the primary, still
//! taking over, catching up). Another replica coordinates only if its newer
//! map makes it the primary. A write whose exchange broke off or timed out
//! may have been applied: it is a 503 or 504 with `outcome: unknown`, never
//! repeated elsewhere.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

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
    /// The node answered that it does not take the request now (not the
    /// key's primary, taking its range over, catching up, no lease):
    /// nothing was applied. Try the next replica; a write may try them all
    /// again shortly, since one of them is about to take it.
    NotNow,
}

/// Pause before a write refused by every replica for now is tried again.
const NOT_NOW_PAUSE: Duration = Duration::from_millis(50);

/// Which healthy replica a request tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The first in the key's preference list: its primary.
    Preference,
    /// The one with the fewest requests in flight from this router (`r=any`).
    LeastLoaded,
    /// The key's primary under the map (the first node of its preference
    /// list not marked down), then the others, whatever their health: only
    /// the primary coordinates a write, and the others refuse it (nothing
    /// written) unless their newer map makes one of them the primary.
    Primary,
}

/// The replicas of `key` to try, in order: for [`Order::Primary`] the
/// preference list as it is; otherwise healthy ones (ready, breaker not
/// open) by `order`, then the others in preference-list order, which may
/// have recovered since the last check. A node that answered its health
/// check with NOT_SERVING (shutting down, catching up), or that the map
/// marks down, is never tried.
pub fn replicas(view: &ClusterView, key: &[u8], order: Order) -> Vec<Arc<NodeHandle>> {
    let candidates = view
        .preference_list(key)
        .into_iter()
        .filter(|n| !n.declined() && !view.is_down(n.id));
    if order == Order::Primary {
        // A joining node is not a primary until the map says it holds its
        // ranges: the first of the others is.
        let (joining, settled): (Vec<_>, Vec<_>) = candidates.partition(|n| view.is_joining(n.id));
        return settled.into_iter().chain(joining).collect();
    }
    let (mut healthy, others): (Vec<_>, Vec<_>) = candidates.partition(|n| n.is_healthy());
    if order == Order::LeastLoaded {
        // Stable: equally loaded replicas keep preference order.
        healthy.sort_by_key(|n| n.in_flight());
    }
    healthy.extend(others);
    healthy
}

/// Calls `call` on the replicas of `key` until one answers, per `access`:
/// a write goes to the primary first ([`Order::Primary`]), a read to the
/// first healthy replica in preference order.
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
    let order = match access {
        Access::Read => Order::Preference,
        Access::Write => Order::Primary,
    };
    to_replicas_in(view, key, order, access, request_id, message, call).await
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
    let mut candidates = replicas(view, key, order);
    // A write that every replica refuses for now (a new primary taking the
    // key's range over, a node starting) is tried again within the node
    // timeout, on the replicas that answered: the client sees a delay
    // rather than a 503.
    let patience = candidates.first().map_or(Duration::ZERO, |n| n.timeout());
    let until = tokio::time::Instant::now() + patience;
    loop {
        let mut last = ApiError::Unavailable;
        let mut answered = Vec::new();
        for (attempt, node) in candidates.iter().enumerate() {
            if attempt > 0 {
                counter!("caskade_router_retries_total", "node" => node.id.to_string())
                    .increment(1);
            }
            match to_node(node, access, request_id, message.clone(), &call).await {
                Ok(answer) => return Ok(answer),
                Err(Verdict::Fail(error)) => return Err(error),
                Err(Verdict::Next(error)) => last = error,
                Err(Verdict::NotNow) => {
                    answered.push(Arc::clone(node));
                    last = ApiError::Unavailable;
                }
            }
        }
        let again = access == Access::Write
            && !answered.is_empty()
            && tokio::time::Instant::now() + NOT_NOW_PAUSE < until;
        if !again {
            return Err(last);
        }
        candidates = answered;
        tokio::time::sleep(NOT_NOW_PAUSE).await;
    }
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
            if let Verdict::Next(_) | Verdict::NotNow = verdict {
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
            Verdict::NotNow => ApiError::Unavailable,
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
    if is(|e| e.is::<BreakerOpen>()) || is(never_sent) {
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
    if source.is_some() {
        // The exchange broke off after the request went out (connection
        // lost, keep-alive timed out, stream reset): the node may have
        // applied it, now or when it resumes.
        return match access {
            Access::Read => Verdict::Next(ApiError::Unavailable),
            Access::Write => Verdict::Fail(ApiError::Interrupted),
        };
    }
    // From here on, the status is the node's own answer.
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
        // taking over the key's range, poisoned), or it is not a replica or
        // not the primary of the key under its map (ABORTED): another
        // replica may serve it, or be the primary under a newer map.
        Code::Unavailable | Code::Aborted => Verdict::NotNow,
        // The node cannot tell whether it stored the write.
        Code::Unknown => node_failed(ApiError::Interrupted),
        Code::Ok
        | Code::Cancelled
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

/// Whether `error` proves the request never reached the node: the
/// connection could not be made (TCP or TLS), or the node refused the
/// stream before processing it (HTTP/2 REFUSED_STREAM). A GOAWAY does not
/// prove it here: h2 reports the same error to streams below and above the
/// last stream id the node processed.
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    error.is::<tonic::ConnectError>()
        || error
            .downcast_ref::<h2::Error>()
            .is_some_and(|e| e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `(tries the next replica, the error)` for `status`.
    fn verdict(status: &Status, access: Access) -> (bool, ApiError) {
        match judge(status, access) {
            Verdict::Next(error) => (true, error),
            Verdict::NotNow => (true, ApiError::Unavailable),
            Verdict::Fail(error) => (false, error),
        }
    }

    fn broken_off(code: Code, cause: impl std::error::Error + Send + Sync + 'static) -> Status {
        let mut status = Status::new(code, "transport error");
        status.set_source(Arc::new(cause));
        status
    }

    #[test]
    fn a_write_goes_elsewhere_only_when_it_certainly_changed_nothing() {
        // The node's own refusals: nothing written.
        for refusal in [
            Status::unavailable("node is catching up with its peers"),
            Status::aborted("this node is not the primary of the key"),
        ] {
            assert_eq!(
                verdict(&refusal, Access::Write),
                (true, ApiError::Unavailable)
            );
        }
        // Never sent: the connection could not be made.
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let not_made = broken_off(Code::Unavailable, tonic::ConnectError(Box::new(refused)));
        assert_eq!(
            verdict(&not_made, Access::Write),
            (true, ApiError::Unavailable)
        );
    }

    #[test]
    fn a_write_whose_exchange_broke_off_has_an_unknown_outcome() {
        let lost = broken_off(
            Code::Unavailable,
            std::io::Error::other("keep-alive timed out"),
        );
        assert_eq!(
            verdict(&lost, Access::Write),
            (false, ApiError::Interrupted)
        );
        assert_eq!(ApiError::Interrupted.outcome(), Some(crate::error::UNKNOWN));
        // A read is repeated elsewhere.
        assert_eq!(verdict(&lost, Access::Read), (true, ApiError::Unavailable));
        // The node itself cannot tell whether it stored the write.
        let unsure = Status::unknown("the write may or may not have been stored");
        assert_eq!(
            verdict(&unsure, Access::Write),
            (false, ApiError::Interrupted)
        );
        let timeout = Status::deadline_exceeded("deadline");
        assert_eq!(verdict(&timeout, Access::Write), (false, ApiError::Timeout));
        assert_eq!(ApiError::Timeout.outcome(), Some(crate::error::UNKNOWN));
        assert_eq!(
            ApiError::Unavailable.outcome(),
            Some(crate::error::NOT_APPLIED)
        );
    }
}
