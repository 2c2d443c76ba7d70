//! `Idempotency-Key`: a write retried with the same key and the same request
//! is answered with the first answer instead of being applied again.
//!
//! Keys are scoped by the token's subject, role and prefix (a token with
//! other rights never sees another's remembered answer), remembered for
//! `window_secs`, and at most `max_keys` of them (the oldest finished ones
//! are forgotten first). A request is identified by a hash of its method,
//! path, query, condition headers and body: the same key with a different
//! request is a 422. While the first request is still running, a retry gets
//! 409 and may try again. The first request runs to completion even if its
//! client goes away, so its outcome is always recorded. Only answers that
//! prove nothing was applied (429, 507, and a 503 whose `error.outcome` is
//! `not_applied`) are forgotten, so that a retry really retries; any other
//! (a 500, a 504, a 503 with `outcome: unknown`) is replayed rather than
//! risk applying the write twice. The lock is never held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use xxhash_rust::xxh3::Xxh3;

use crate::app::{AppState, BodyLimit, read_body};
use crate::config::IdempotencyConfig;
use crate::error::ApiError;

/// The request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer replayed from an earlier request.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest accepted key.
const MAX_KEY_LEN: usize = 255;
/// Largest answer remembered (a batch answer is bounded well below this).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The first answer to a key, as remembered.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    etag: Option<HeaderValue>,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

#[derive(Debug)]
enum Slot {
    Running { fingerprint: u128 },
    Done { fingerprint: u128, answer: Answer },
}

#[derive(Debug, Default)]
struct Entries {
    slots: HashMap<(String, String), (Instant, Slot)>,
    /// Insertion order, for expiry and the size bound.
    order: VecDeque<(Instant, (String, String))>,
}

/// Remembered answers.
#[derive(Debug)]
pub struct IdempotencyStore {
    window: Duration,
    max_keys: usize,
    entries: Mutex<Entries>,
}

enum Claim {
    /// First time: run it.
    Run,
    Replay(Answer),
    InProgress,
    Reused,
}

impl IdempotencyStore {
    /// An empty store.
    pub fn new(config: &IdempotencyConfig) -> IdempotencyStore {
        IdempotencyStore {
            window: Duration::from_secs(config.window_secs),
            max_keys: config.max_keys.max(1),
            entries: Mutex::new(Entries::default()),
        }
    }

    fn claim(&self, scope: &(String, String), fingerprint: u128) -> Claim {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut entries, now);
        match entries.slots.get(scope) {
            Some((_, Slot::Running { fingerprint: f })) if *f == fingerprint => Claim::InProgress,
            Some((
                _,
                Slot::Done {
                    fingerprint: f,
                    answer,
                },
            )) if *f == fingerprint => Claim::Replay(answer.clone()),
            Some(_) => Claim::Reused,
            None => {
                entries
                    .slots
                    .insert(scope.clone(), (now, Slot::Running { fingerprint }));
                entries.order.push_back((now, scope.clone()));
                Claim::Run
            }
        }
    }

    fn finish(&self, scope: &(String, String), fingerprint: u128, answer: Option<Answer>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match answer {
            Some(answer) => {
                if let Some((_, slot)) = entries.slots.get_mut(scope) {
                    *slot = Slot::Done {
                        fingerprint,
                        answer,
                    };
                }
            }
            None => {
                entries.slots.remove(scope);
            }
        }
    }

    fn expire(&self, entries: &mut Entries, now: Instant) {
        while let Some((at, scope)) = entries.order.front() {
            let expired = now.duration_since(*at) >= self.window;
            let running = matches!(
                entries.slots.get(scope),
                Some((created, Slot::Running { .. })) if created == at
            );
            // A running request is never forgotten for room, only when its
            // window is over: forgetting it would let a retry run it twice.
            if !expired && (entries.order.len() <= self.max_keys || running) {
                break;
            }
            let scope = scope.clone();
            let at = *at;
            entries.order.pop_front();
            // Only if the slot is still the one this order entry was made for.
            if entries
                .slots
                .get(&scope)
                .is_some_and(|(created, _)| *created == at)
            {
                entries.slots.remove(&scope);
            }
        }
    }
}

/// The middleware's state on one write route.
#[derive(Debug, Clone)]
pub struct WriteRoute {
    /// The application's state.
    pub state: AppState,
    /// The limit the route's handler holds its body to: the middleware
    /// reads the body first, and refuses a declared length over it before
    /// reading any.
    pub body_limit: BodyLimit,
}

/// Middleware on the write routes: replays, refuses or records.
pub async fn middleware(State(route): State<WriteRoute>, request: Request, next: Next) -> Response {
    let WriteRoute { state, body_limit } = route;
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY).cloned() else {
        return next.run(request).await;
    };
    if !matches!(
        *request.method(),
        Method::PUT | Method::DELETE | Method::POST
    ) {
        return next.run(request).await;
    }
    // Unauthenticated requests go on to be refused (and counted) by their
    // handler, unrecorded, before anything about them is judged: a client
    // without a token learns nothing of the route.
    let authorization = request.headers().get(header::AUTHORIZATION);
    let Ok(principal) = state.auth.authenticate(authorization) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_KEY_LEN => k.to_string(),
        _ => {
            return ApiError::bad_request(
                "invalid_header",
                format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
            )
            .into_response();
        }
    };
    let (parts, body) = request.into_parts();
    let body = match read_body(body, body_limit).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let fingerprint = fingerprint(&parts.method, &parts.uri, &parts.headers, &body);
    let rights = format!(
        "{}\0{}\0{:?}",
        principal.subject, principal.role, principal.prefix
    );
    let scope = (rights, key);
    match state.idempotency.claim(&scope, fingerprint) {
        Claim::Replay(answer) => {
            metrics::counter!("caskade_router_idempotent_replays_total").increment(1);
            return replay(answer);
        }
        Claim::InProgress => {
            return ApiError::Conflict(
                "a request with this Idempotency-Key is still running; retry".into(),
            )
            .into_response();
        }
        Claim::Reused => return ApiError::IdempotencyKeyReused.into_response(),
        Claim::Run => {}
    }
    // In a task of its own: if the client goes away, the request still
    // finishes and its outcome is recorded for the retry.
    let task_state = state.clone();
    let task_scope = scope.clone();
    let run = tokio::spawn(async move {
        let response = next.run(Request::from_parts(parts, Body::from(body))).await;
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, MAX_ANSWER_BYTES).await else {
            task_state
                .idempotency
                .finish(&task_scope, fingerprint, None);
            return ApiError::Internal.into_response();
        };
        let answer = Answer {
            status: parts.status,
            etag: parts.headers.get(header::ETAG).cloned(),
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            body: body.clone(),
        };
        let keep = !never_applied(parts.status, &body);
        task_state
            .idempotency
            .finish(&task_scope, fingerprint, keep.then_some(answer));
        Response::from_parts(parts, Body::from(body))
    });
    match run.await {
        Ok(response) => response,
        Err(_) => {
            state.idempotency.finish(&scope, fingerprint, None);
            ApiError::Internal.into_response()
        }
    }
}

/// Answers that prove the write was not applied: forgotten, so a retry runs.
/// Every other answer, an `outcome: unknown` among them, is kept and
/// replayed: the write may have been applied, or may still be.
fn never_applied(status: StatusCode, body: &[u8]) -> bool {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE => true,
        StatusCode::SERVICE_UNAVAILABLE => serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|b| b["error"]["outcome"] == crate::error::NOT_APPLIED),
        _ => false,
    }
}

fn replay(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    if let Some(etag) = answer.etag {
        headers.insert(header::ETAG, etag);
    }
    if let Some(content_type) = answer.content_type {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// What identifies "the same request".
fn fingerprint(method: &Method, uri: &axum::http::Uri, headers: &HeaderMap, body: &[u8]) -> u128 {
    let mut hash = Xxh3::new();
    for part in [
        method.as_str().as_bytes(),
        b"\0",
        uri.path().as_bytes(),
        b"\0",
        uri.query().unwrap_or("").as_bytes(),
    ] {
        hash.update(part);
    }
    for name in [header::IF_MATCH, header::IF_NONE_MATCH] {
        hash.update(b"\0");
        hash.update(headers.get(&name).map_or(&b""[..], HeaderValue::as_bytes));
    }
    hash.update(b"\0");
    hash.update(body);
    hash.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(window_secs: u64, max_keys: usize) -> IdempotencyStore {
        IdempotencyStore::new(&IdempotencyConfig {
            window_secs,
            max_keys,
        })
    }

    fn answer() -> Answer {
        Answer {
            status: StatusCode::CREATED,
            etag: None,
            content_type: None,
            body: Bytes::new(),
        }
    }

    #[test]
    fn first_runs_then_replays_and_refuses_a_different_request() {
        let store = store(600, 10);
        let scope = ("alice".to_string(), "k1".to_string());
        assert!(matches!(store.claim(&scope, 1), Claim::Run));
        assert!(matches!(store.claim(&scope, 1), Claim::InProgress));
        store.finish(&scope, 1, Some(answer()));
        assert!(matches!(store.claim(&scope, 1), Claim::Replay(_)));
        assert!(matches!(store.claim(&scope, 2), Claim::Reused));
        // Another subject's same key is its own.
        assert!(matches!(
            store.claim(&("bob".into(), "k1".into()), 2),
            Claim::Run
        ));
    }

    #[test]
    fn failures_are_forgotten_and_the_size_is_bounded() {
        let store = store(600, 2);
        let scope = |k: &str| ("alice".to_string(), k.to_string());
        assert!(matches!(store.claim(&scope("a"), 1), Claim::Run));
        store.finish(&scope("a"), 1, None);
        assert!(
            matches!(store.claim(&scope("a"), 1), Claim::Run),
            "a 5xx is retried for real"
        );
        store.finish(&scope("a"), 1, Some(answer()));
        for k in ["b", "c"] {
            assert!(matches!(store.claim(&scope(k), 1), Claim::Run));
            store.finish(&scope(k), 1, Some(answer()));
        }
        assert!(
            matches!(store.claim(&scope("a"), 1), Claim::Run),
            "the oldest key was forgotten"
        );
    }
}
