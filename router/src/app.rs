//! The HTTP application: shared state, the route table, and the middleware
//! every request passes through (request id, metrics, body deadline, error
//! bodies).
//!
//! Routes are listed in [`routes`], the one place that says which handler
//! answers what. Authentication is done by each handler through
//! [`AppState::authenticate`], so the unauthenticated routes (`/healthz`,
//! `/readyz`, `/metrics`) are visibly the ones that don't call it. A
//! request that no handler takes (an unknown route, a wrong method) is
//! authenticated too before it is told so: an anonymous client learns
//! nothing of the routes beyond [`PUBLIC_PATHS`].

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use caskade_common::telemetry::{self, REQUEST_ID_HEADER};
use http_body_util::BodyExt;
use metrics::{counter, histogram};

use crate::auth::{Authenticator, Principal, Role};
use crate::cluster::{Cluster, ClusterView};
use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyStore};
use crate::{admin, kv, membership, request_body};

/// The paths served without a token. Any other path, whether a route or
/// not, answers 401 to a request without a valid token.
pub const PUBLIC_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
#[derive(Debug)]
pub struct Shared {
    /// The cluster map and the nodes.
    pub cluster: Arc<Cluster>,
    /// JWT verification.
    pub auth: Authenticator,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Answers remembered by `Idempotency-Key`.
    pub idempotency: IdempotencyStore,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// State over `shared`.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }

    /// The bearer token's principal; failures are counted by reason and
    /// answered with one indistinct 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        self.auth
            .authenticate(headers.get(header::AUTHORIZATION))
            .map_err(|error| {
                counter!("caskade_router_auth_failures_total", "reason" => error.reason())
                    .increment(1);
                tracing::info!(reason = error.reason(), "authentication failed");
                ApiError::Unauthenticated
            })
    }

    /// Checks `principal` may do what needs `role` on `key`.
    pub fn authorize(
        &self,
        principal: &Principal,
        role: Role,
        key: Option<&[u8]>,
    ) -> Result<(), ApiError> {
        principal.authorize(role, key).map_err(|refusal| {
            counter!("caskade_router_auth_failures_total", "reason" => refusal.reason()).increment(1);
            tracing::info!(subject = %principal.subject, reason = refusal.reason(), "request forbidden");
            ApiError::Forbidden
        })
    }

    /// Checks `principal` may list keys under `prefix`.
    pub fn authorize_prefix(
        &self,
        principal: &Principal,
        role: Role,
        prefix: &[u8],
    ) -> Result<(), ApiError> {
        principal.authorize_prefix(role, prefix).map_err(|refusal| {
            counter!("caskade_router_auth_failures_total", "reason" => refusal.reason()).increment(1);
            tracing::info!(subject = %principal.subject, reason = refusal.reason(), "listing forbidden");
            ApiError::Forbidden
        })
    }

    /// The current cluster view, or 503 before any map is known.
    pub fn view(&self) -> Result<Arc<ClusterView>, ApiError> {
        self.cluster.view().ok_or(ApiError::Unavailable)
    }
}

/// The request id of the current request (the client's `x-request-id`, or a new one).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(telemetry::new_request_id())))
    }
}

/// The largest body a route reads, and what its 413 calls it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    /// Most bytes.
    pub bytes: usize,
    /// The body's name in the error message.
    pub what: &'static str,
}

impl BodyLimit {
    /// A single key's `PUT`: the value.
    pub fn value(limits: &LimitsConfig) -> BodyLimit {
        BodyLimit {
            bytes: limits.max_value_bytes,
            what: "value",
        }
    }

    /// `POST /v1/batch`: the whole batch.
    pub fn batch(limits: &LimitsConfig) -> BodyLimit {
        BodyLimit {
            bytes: limits.max_body_bytes,
            what: "request body",
        }
    }
}

/// Reads a body of at most `limit.bytes`; more is a 413 naming `limit.what`.
///
/// A body whose declared length (`Content-Length`) is over the limit is
/// refused before any of it is read; [`request_body`] then closes an
/// HTTP/1.1 connection rather than drain it.
pub async fn read_body(body: Body, limit: BodyLimit) -> Result<Bytes, ApiError> {
    let BodyLimit { bytes: limit, what } = limit;
    let too_large = || {
        ApiError::TooLarge(format!(
            "{what} is larger than the maximum of {limit} bytes"
        ))
    };
    if hyper::body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => {
            tracing::debug!(%error, "reading the request body failed");
            Err(ApiError::bad_request(
                "invalid_body",
                "the request body could not be read",
            ))
        }
    }
}

/// The application of the HTTPS listener: the route table, and `/metrics`
/// when `serve_metrics` (else the metrics have a listener of their own).
pub fn routes(state: AppState, serve_metrics: bool) -> Router {
    // Idempotency keys on a write route, whose body the middleware reads
    // first, held to the limit the route's handler applies.
    let idempotent = |body_limit| {
        middleware::from_fn_with_state(
            idempotency::WriteRoute {
                state: state.clone(),
                body_limit,
            },
            idempotency::middleware,
        )
    };
    let mut table = Router::new()
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/", any(kv::empty_key))
        .route(
            "/v1/kv/{*key}",
            any(kv::single_key).layer(idempotent(BodyLimit::value(&state.limits))),
        )
        .route(
            "/v1/batch",
            post(kv::batch).layer(idempotent(BodyLimit::batch(&state.limits))),
        )
        .route("/admin/v1/cluster", get(admin::cluster))
        .route("/admin/v1/nodes", post(membership::add))
        .route("/admin/v1/nodes/{id}", delete(membership::remove))
        .route("/admin/v1/nodes/{id}/merge", post(admin::merge))
        .route("/admin/v1/nodes/{id}/backup", post(admin::backup))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if serve_metrics {
        table = table.route("/metrics", get(metrics_text));
    }
    let table = table
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // The table is this router's fallback so that these layers run around
    // routing itself, outside axum's method router, which adds `Allow` to
    // the answer of every method mismatch, a 401 included.
    Router::new()
        .fallback_service(table)
        .layer(middleware::from_fn_with_state(
            state,
            request_body::deadline,
        ))
        .layer(middleware::from_fn(allow_only_on_405))
        .layer(middleware::from_fn(observe))
}

/// The application of the `/metrics` listener.
pub fn metrics_routes() -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::NotFound("no such route") })
}

/// 401 unless `path` is public or the request carries a valid token.
fn token_first(state: &AppState, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if PUBLIC_PATHS.contains(&path) {
        return Ok(());
    }
    state.authenticate(headers).map(|_| ())
}

async fn not_found(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> ApiError {
    match token_first(&state, uri.path(), &headers) {
        Ok(()) => ApiError::NotFound("no such route"),
        Err(unauthenticated) => unauthenticated,
    }
}

async fn method_not_allowed(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiError {
    match token_first(&state, uri.path(), &headers) {
        Ok(()) => ApiError::MethodNotAllowed,
        Err(unauthenticated) => unauthenticated,
    }
}

/// Drops the `Allow` header from every answer but a 405: on a 401 to a
/// wrong method it would name the methods of a route to a client without
/// a token.
async fn allow_only_on_405(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().remove(header::ALLOW);
    }
    response
}

/// `GET /healthz`: the process is alive.
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 once a map is held and every key range has a ready replica.
async fn readyz(State(state): State<AppState>) -> Response {
    let Some(view) = state.cluster.view() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "no cluster map" })),
        )
            .into_response();
    };
    let ready = view.nodes.values().filter(|n| n.is_ready()).count();
    let not_ready = view.nodes.len() - ready;
    // With fewer unready nodes than replicas, every range has a ready one.
    let covered = ready > 0 && not_ready < view.ring.replication_factor().max(1);
    let status = if covered {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if covered { "ready" } else { "not ready" },
        "epoch": view.map.epoch,
        "nodes_ready": ready,
        "nodes": view.nodes.len(),
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text.
async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        telemetry::metrics_handle().render(),
    )
}

/// Gives every request an id (kept from the client's `x-request-id` when
/// usable), runs it in a span carrying it, echoes it in the response, and
/// counts it by route, method and status with its latency.
async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let caller_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok());
    let request_id = telemetry::request_id(caller_id);
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let route = route_label(request.uri().path());
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        route,
        method = %request.method()
    );
    let mut response = {
        use tracing::Instrument;
        next.run(request).instrument(span.clone()).await
    };
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    let status = response.status();
    // Every label from a fixed set: the status is one the router answers
    // with, never one a client chose.
    let labels = [
        ("route", route.to_string()),
        ("method", method.to_string()),
        ("status", status.as_u16().to_string()),
    ];
    counter!("caskade_router_requests_total", &labels).increment(1);
    histogram!("caskade_router_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request done"
        )
    });
    response
}

/// A request method as a metric label: the standard methods by name, any
/// other (a client may make up as many as it likes) as `other`.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// A request path as a metric label: a fixed route template, never a key.
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/kv" => "/v1/kv",
        p if p.starts_with(kv::KV_PREFIX) => "/v1/kv/{key}",
        "/v1/batch" => "/v1/batch",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        p if p.starts_with("/admin/") => "/admin",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_come_from_fixed_sets() {
        assert_eq!(method_label(&Method::PUT), "PUT");
        for made_up in ["FOOBAR1", "get", "PROPFIND", "X"] {
            let method = Method::from_bytes(made_up.as_bytes()).expect("a valid token");
            assert_eq!(method_label(&method), "other", "{made_up}");
        }
        assert_eq!(route_label("/v1/kv/secret-key"), "/v1/kv/{key}");
        assert_eq!(route_label("/admin/v1/nodes/7"), "/admin");
        assert_eq!(route_label("/anything/else"), "other");
    }
}
