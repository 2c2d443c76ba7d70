//! The HTTP application: shared state, the route table, and the middleware
//! every request passes through (request id, metrics, error bodies).
//!
//! Routes are listed in [`routes`], the one place that says which handler
//! answers what. Authentication is done by each handler through
//! [`AppState::authenticate`], so the unauthenticated routes (`/healthz`,
//! `/readyz`, `/metrics`) are visibly the ones that don't call it.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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
use crate::{admin, kv, membership};

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

/// Reads a body of at most `limit` bytes; more is a 413 naming `what`.
pub async fn read_body(body: Body, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(
            format!("{what} is larger than the maximum of {limit} bytes"),
        )),
        Err(error) => {
            tracing::debug!(%error, "reading the request body failed");
            Err(ApiError::bad_request(
                "invalid_body",
                "the request body could not be read",
            ))
        }
    }
}

/// The route table.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/", any(kv::empty_key))
        .route(
            "/v1/kv/{*key}",
            any(kv::single_key).layer(middleware::from_fn_with_state(
                state.clone(),
                idempotency::middleware,
            )),
        )
        .route(
            "/v1/batch",
            post(kv::batch).layer(middleware::from_fn_with_state(
                state.clone(),
                idempotency::middleware,
            )),
        )
        .route("/admin/v1/cluster", get(admin::cluster))
        .route("/admin/v1/nodes", post(membership::add))
        .route("/admin/v1/nodes/{id}", delete(membership::remove))
        .route("/admin/v1/nodes/{id}/merge", post(admin::merge))
        .route("/admin/v1/nodes/{id}/backup", post(admin::backup))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
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
    let method = request.method().as_str().to_string();
    let span = tracing::info_span!("request", request_id = %request_id, route, method = %method);
    let mut response = {
        use tracing::Instrument;
        next.run(request).instrument(span.clone()).await
    };
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    let status = response.status();
    let labels = [
        ("route", route.to_string()),
        ("method", method),
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
