//! The one table from what can go wrong in the router to an HTTP status and
//! a stable `error.code`.
//!
//! Every answer that is not a success goes through [`ApiError`], whose
//! `status` and `code` are exhaustive matches: a new variant cannot become a
//! 500 by accident. Messages are short and safe to show: no node addresses,
//! paths, internal errors or hints about which authentication check failed.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// `error.outcome` of a request that certainly changed nothing.
pub const NOT_APPLIED: &str = "not_applied";
/// `error.outcome` of a write that may or may not have been applied.
pub const UNKNOWN: &str = "unknown";

/// Why a request failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: bad key encoding, query value, header or JSON.
    #[error("{message}")]
    BadRequest {
        /// `invalid_key`, `invalid_query`, `invalid_header`, `invalid_json` or `invalid_argument`.
        code: &'static str,
        /// What was wrong.
        message: String,
    },
    /// No valid bearer token (missing, malformed, expired, bad signature…).
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// The token does not allow this operation or key.
    #[error("the token does not allow this request")]
    Forbidden,
    /// The key (or route, or node) does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// The route exists but not with this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// `If-Match` / `If-None-Match` did not hold; `current` is the key's version, if any.
    #[error("precondition failed")]
    PreconditionFailed {
        /// The current ETag value, without quotes.
        current: Option<String>,
    },
    /// An admin change based on a stale cluster map epoch.
    #[error("{0}")]
    Conflict(String),
    /// The same `Idempotency-Key` was sent with a different request.
    #[error("Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// A key, value, batch, body or header over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// The request body did not arrive within its deadline.
    #[error("the request body was not received in time")]
    BodyTimeout,
    /// The router sheds load: too many requests in flight to the node.
    #[error("too many requests in flight; retry later")]
    Overloaded,
    /// No replica of the key could be reached, or every one refused: the
    /// request was certainly not applied.
    #[error("no replica is available for this key")]
    Unavailable,
    /// The request reached a storage node and then the exchange broke off
    /// (connection lost, stream reset) or the node could not tell whether
    /// it stored the write: it may or may not have been applied.
    #[error(
        "the storage node stopped answering after it got the request; it may or may not have been applied"
    )]
    Interrupted,
    /// Too few replicas of some range answered a request that needs a
    /// majority of every range (a listing).
    #[error("{0}")]
    Incomplete(String),
    /// A cluster map change could not be committed: no Raft leader, no
    /// quorum of nodes, or no node reachable. It may still commit.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// The write was applied on fewer replicas than its write level needs.
    /// It is not rolled back: the others get it when they catch up.
    #[error(
        "the write reached {acks} of the {required} replicas its write level needs; \
         it was not rolled back and will reach the others when they catch up"
    )]
    WriteLevelNotMet {
        /// Replicas holding the write.
        acks: u32,
        /// Replicas the level needed.
        required: u32,
        /// The version written (the ETag value, without quotes).
        version: Option<String>,
    },
    /// A node's storage is full.
    #[error("node storage is full")]
    InsufficientStorage,
    /// The node did not answer within the timeout.
    #[error("the storage node did not answer in time")]
    Timeout,
    /// Anything else: a bug or a storage failure; details are in the router's log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// A 400 with `code` and `message`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable
            | ApiError::Interrupted
            | ApiError::Incomplete(_)
            | ApiError::ClusterUnavailable(_)
            | ApiError::WriteLevelNotMet { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PreconditionFailed { .. } => "precondition_failed",
            ApiError::Conflict(_) => "conflict",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::TooLarge(_) => "too_large",
            ApiError::BodyTimeout => "request_timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable | ApiError::Interrupted | ApiError::Incomplete(_) => {
                "unavailable"
            }
            ApiError::ClusterUnavailable(_) => "cluster_unavailable",
            ApiError::WriteLevelNotMet { .. } => "write_level_not_met",
            ApiError::InsufficientStorage => "insufficient_storage",
            ApiError::Timeout => "timeout",
            ApiError::Internal => "internal",
        }
    }

    /// What became of a write that failed this way: `not_applied` (safe to
    /// send again), `unknown` (it may have been applied, now or later), or
    /// `None` where the question does not arise.
    pub fn outcome(&self) -> Option<&'static str> {
        match self {
            ApiError::Unavailable | ApiError::Overloaded | ApiError::InsufficientStorage => {
                Some(NOT_APPLIED)
            }
            ApiError::Interrupted
            | ApiError::Timeout
            | ApiError::Internal
            | ApiError::WriteLevelNotMet { .. } => Some(UNKNOWN),
            ApiError::BadRequest { .. }
            | ApiError::Unauthenticated
            | ApiError::Forbidden
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed
            | ApiError::PreconditionFailed { .. }
            | ApiError::Conflict(_)
            | ApiError::IdempotencyKeyReused
            | ApiError::TooLarge(_)
            | ApiError::BodyTimeout
            | ApiError::Incomplete(_)
            | ApiError::ClusterUnavailable(_) => None,
        }
    }

    /// The JSON body `{"error": {"code", "message"[, "outcome"]}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        if let Some(outcome) = self.outcome() {
            error["outcome"] = json!(outcome);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        match &self {
            ApiError::Unauthenticated => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::PreconditionFailed {
                current: Some(current),
            }
            | ApiError::WriteLevelNotMet {
                version: Some(current),
                ..
            } => {
                if let Ok(etag) = HeaderValue::from_str(&format!("\"{current}\"")) {
                    response.headers_mut().insert(header::ETAG, etag);
                }
            }
            ApiError::Overloaded
            | ApiError::Unavailable
            | ApiError::Interrupted
            | ApiError::Incomplete(_)
            | ApiError::ClusterUnavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
