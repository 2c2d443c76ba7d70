//! The key-value routes: `PUT`/`GET`/`DELETE /v1/kv/{key}`, `GET /v1/kv`
//! (listing by scatter-gather) and `POST /v1/batch`.
//!
//! Each handler authenticates, validates everything it was given, and only
//! then talks to a node: a refused request reaches no node and changes
//! nothing. Values are raw bytes in and out; versions travel as ETags.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use caskade_common::Version;
use caskade_proto::{
    Condition, DeleteRequest, GetRequest, PutRequest, ReadLevel, ScanRequest, WriteLevel, condition,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::{AppState, BodyLimit, RequestId, read_body};
use crate::auth::Role;
use crate::error::ApiError;
use crate::forward::{self, Access, Order};
use crate::listing;
use crate::params::{Query, key_from_path, validate_key};
use crate::quorum;

/// Route prefix of single-key requests.
pub const KV_PREFIX: &str = "/v1/kv/";
/// Default and maximum page sizes of a listing.
const DEFAULT_LIST_LIMIT: u64 = 100;
const MAX_LIST_LIMIT: u64 = 1000;
/// Longest TTL accepted: ten years.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// `PUT|GET|DELETE /v1/kv/{key}`.
pub async fn single_key(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.authenticate(&headers)?;
    let key = key_from_path(uri.path(), KV_PREFIX)?;
    match method {
        Method::GET | Method::HEAD => {
            state.authorize(&principal, Role::Reader, Some(&key))?;
            let query = Query::parse(uri.query(), &["r"])?;
            let read_level = read_level(query.text("r")?)?;
            get(&state, &request_id, key, read_level).await
        }
        Method::PUT => {
            state.authorize(&principal, Role::Writer, Some(&key))?;
            let query = Query::parse(uri.query(), &["ttl", "w"])?;
            let ttl_secs = query.number("ttl", 1..=MAX_TTL_SECS)?.unwrap_or(0);
            let write_level = write_level(query.text("w")?)?;
            let condition = condition(&headers)?;
            let value = read_body(body, BodyLimit::value(&state.limits)).await?;
            let put = Put {
                key,
                value,
                ttl_secs,
                condition,
                write_level,
            };
            let (created, etag) = put.send(&state, &request_id).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, [(header::ETAG, etag)]).into_response())
        }
        Method::DELETE => {
            state.authorize(&principal, Role::Writer, Some(&key))?;
            let query = Query::parse(uri.query(), &["w"])?;
            let write_level = write_level(query.text("w")?)?;
            let condition = condition(&headers)?;
            if matches!(
                condition,
                Some(Condition {
                    kind: Some(condition::Kind::IfAbsent(_))
                })
            ) {
                return Err(ApiError::bad_request(
                    "invalid_header",
                    "If-None-Match does not apply to DELETE",
                ));
            }
            delete(&state, &request_id, key, condition, write_level).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => {
            let mut response = ApiError::MethodNotAllowed.into_response();
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, PUT, DELETE"),
            );
            Ok(response)
        }
    }
}

/// `/v1/kv/` with no key.
pub async fn empty_key(State(state): State<AppState>, headers: HeaderMap) -> ApiError {
    match state.authenticate(&headers) {
        Ok(_) => ApiError::bad_request("invalid_key", "key is empty"),
        Err(unauthenticated) => unauthenticated,
    }
}

async fn get(
    state: &AppState,
    request_id: &str,
    key: Vec<u8>,
    read_level: ReadLevel,
) -> Result<Response, ApiError> {
    let Some((value, etag)) = read(state, request_id, key, read_level).await? else {
        return Err(ApiError::NotFound("key not found"));
    };
    let mut response = Response::new(Body::from(value));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response.headers_mut().insert(header::ETAG, etag);
    Ok(response)
}

/// One put, as a route or a batch op.
struct Put {
    key: Vec<u8>,
    value: Bytes,
    ttl_secs: u64,
    condition: Option<Condition>,
    write_level: WriteLevel,
}

impl Put {
    /// Returns whether the key was created, and the new ETag.
    async fn send(
        self,
        state: &AppState,
        request_id: &str,
    ) -> Result<(bool, HeaderValue), ApiError> {
        let view = state.view()?;
        let message = PutRequest {
            key: self.key.clone().into(),
            value: self.value,
            ttl_ms: self.ttl_secs.saturating_mul(1000),
            condition: self.condition,
            write_level: self.write_level as i32,
        };
        let done = forward::to_replicas(
            &view,
            &self.key,
            Access::Write,
            request_id,
            message,
            |mut kv, req| async move { kv.put(req).await },
        )
        .await?;
        Ok((done.created, etag_of(done.version)))
    }
}

async fn delete(
    state: &AppState,
    request_id: &str,
    key: Vec<u8>,
    condition: Option<Condition>,
    write_level: WriteLevel,
) -> Result<bool, ApiError> {
    let view = state.view()?;
    let message = DeleteRequest {
        key: key.clone().into(),
        condition,
        write_level: write_level as i32,
    };
    let done = forward::to_replicas(
        &view,
        &key,
        Access::Write,
        request_id,
        message,
        |mut kv, req| async move { kv.delete(req).await },
    )
    .await?;
    Ok(done.existed)
}

/// `GET /v1/kv?prefix=&limit=&after=[&encoding=base64]`: a page of keys in
/// byte order, from every node that holds some, merged and deduplicated.
///
/// Keys are bytes but JSON strings are text: by default keys are listed as
/// UTF-8 text, and a page that would hold a key that is not UTF-8 is refused
/// (400) rather than shown lossily, since a lossy `next` could never be
/// passed back as `after`. With `encoding=base64` keys, `next` and `after`
/// are base64url (no padding) and any key can be listed.
pub async fn list(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = state.authenticate(&headers)?;
    let query = Query::parse(uri.query(), &["prefix", "limit", "after", "encoding"])?;
    let base64 = match query.text("encoding")? {
        None | Some("text") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("encoding must be text or base64, not {other:?}"),
            ));
        }
    };
    let prefix = query.key_bytes("prefix")?;
    let after = if base64 {
        let text = query.text("after")?.unwrap_or_default();
        let after = BASE64.decode(text).map_err(|_| {
            ApiError::bad_request("invalid_query", "after must be base64url without padding")
        })?;
        crate::params::check_cursor(&after)?;
        after
    } else {
        query.key_bytes("after")?
    };
    let limit = query
        .number("limit", 1..=MAX_LIST_LIMIT)?
        .unwrap_or(DEFAULT_LIST_LIMIT);
    state.authorize_prefix(&principal, Role::Reader, &prefix)?;

    let view = state.view()?;
    let message = ScanRequest {
        prefix: prefix.into(),
        after: after.into(),
        // The node reads one more itself to tell whether a next page exists.
        limit: u32::try_from(limit).unwrap_or(1000),
        include_values: false,
        include_deleted: true,
        epoch: view.map.epoch,
    };
    let mut scans = tokio::task::JoinSet::new();
    for node in view.nodes.values().filter(|n| view.ring.contains(n.id)) {
        let (node, message, request_id) = (Arc::clone(node), message.clone(), request_id.clone());
        scans.spawn(async move {
            let answer =
                forward::to_one_node(&node, &request_id, message, |mut kv, req| async move {
                    kv.scan(req).await
                })
                .await;
            (node.id, answer)
        });
    }
    let mut pages = Vec::new();
    let mut answered = BTreeSet::new();
    while let Some(joined) = scans.join_next().await {
        match joined {
            Ok((node, Ok(page))) => {
                answered.insert(node);
                pages.push(listing::NodePage {
                    node,
                    entries: page.entries,
                    next: page.next.map(|next| next.to_vec()),
                });
            }
            Ok((node, Err(error))) => {
                tracing::debug!(node, %error, "a node did not answer the listing");
            }
            Err(error) => tracing::error!(%error, "a listing scan failed"),
        }
    }
    listing::check_answered(&view.preference_lists, &answered).map_err(|refused| {
        tracing::info!(answered = ?answered, "{refused}");
        ApiError::Incomplete(refused)
    })?;
    let owns = |node, key: &[u8]| view.ring.owns(node, key);
    let listing::Listed { keys: page, next } = listing::merge(pages, limit as usize, owns);
    let encode = |key: &[u8]| -> Result<String, ApiError> {
        if base64 {
            return Ok(BASE64.encode(key));
        }
        String::from_utf8(key.to_vec()).map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                "this page holds keys that are not UTF-8; list them with encoding=base64",
            )
        })
    };
    let next = next.map(|key| encode(&key)).transpose()?;
    let keys = page
        .iter()
        .map(|k| encode(k))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(axum::Json(json!({ "keys": keys, "next": next })).into_response())
}

/// `POST /v1/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    ops: Vec<BatchOp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOp {
    op: OpKind,
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    ttl: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpKind {
    Put,
    Get,
    Delete,
}

#[derive(Debug, Serialize)]
struct OpResult {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    /// A value that is not UTF-8, base64url without padding, instead of `value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

/// `POST /v1/batch`: each op applied on its own, in order.
pub async fn batch(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.authenticate(&headers)?;
    Query::parse(uri.query(), &[])?;
    let body = read_body(body, BodyLimit::batch(&state.limits)).await?;
    let batch: BatchBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("batch body: {e}")))?;
    if batch.ops.len() > state.limits.max_batch_ops {
        return Err(ApiError::TooLarge(format!(
            "batch has {} ops, more than the maximum of {}",
            batch.ops.len(),
            state.limits.max_batch_ops
        )));
    }
    // Every op is checked before any is sent: a bad batch writes nothing.
    for (i, op) in batch.ops.iter().enumerate() {
        let at = |e: ApiError| match e {
            ApiError::BadRequest { code, message } => {
                ApiError::bad_request(code, format!("op {i}: {message}"))
            }
            ApiError::TooLarge(message) => ApiError::TooLarge(format!("op {i}: {message}")),
            other => other,
        };
        validate_key(op.key.as_bytes()).map_err(at)?;
        let needed = match op.op {
            OpKind::Get => Role::Reader,
            OpKind::Put | OpKind::Delete => Role::Writer,
        };
        state.authorize(&principal, needed, Some(op.key.as_bytes()))?;
        match (op.op, &op.value) {
            (OpKind::Put, None) => {
                return Err(at(ApiError::bad_request(
                    "invalid_json",
                    "put needs a value",
                )));
            }
            (OpKind::Put, Some(value)) if value.len() > state.limits.max_value_bytes => {
                return Err(at(ApiError::TooLarge(format!(
                    "value is {} bytes, more than the maximum of {}",
                    value.len(),
                    state.limits.max_value_bytes
                ))));
            }
            (OpKind::Get | OpKind::Delete, Some(_)) => {
                return Err(at(ApiError::bad_request(
                    "invalid_json",
                    "only put takes a value",
                )));
            }
            _ => {}
        }
        match (op.op, op.ttl) {
            (OpKind::Put, Some(ttl)) if !(1..=MAX_TTL_SECS).contains(&ttl) => {
                return Err(at(ApiError::bad_request(
                    "invalid_json",
                    format!("ttl must be from 1 to {MAX_TTL_SECS}"),
                )));
            }
            (OpKind::Get | OpKind::Delete, Some(_)) => {
                return Err(at(ApiError::bad_request(
                    "invalid_json",
                    "only put takes a ttl",
                )));
            }
            _ => {}
        }
    }

    let mut results = Vec::with_capacity(batch.ops.len());
    // The answer is bounded like the request: values read past this budget
    // are refused op by op instead of building a huge response.
    let mut answer_budget = state.limits.max_body_bytes;
    for op in batch.ops {
        let key = op.key.into_bytes();
        let result = match op.op {
            OpKind::Get => match read(&state, &request_id, key, ReadLevel::Unspecified).await {
                Ok(Some((value, _))) if value.len() > answer_budget => {
                    error_result(&ApiError::TooLarge(
                        "the batch answer would exceed the body limit; read this key on its own"
                            .into(),
                    ))
                }
                Ok(Some((value, etag))) => {
                    answer_budget -= value.len();
                    let etag = etag.to_str().ok().map(str::to_string);
                    let mut result = ok_result(StatusCode::OK, etag, None);
                    match String::from_utf8(value.to_vec()) {
                        Ok(text) => result.value = Some(text),
                        Err(_) => result.value_base64 = Some(BASE64.encode(&value)),
                    }
                    result
                }
                Ok(None) => error_result(&ApiError::NotFound("key not found")),
                Err(error) => error_result(&error),
            },
            OpKind::Put => {
                let put = Put {
                    key,
                    value: Bytes::from(op.value.unwrap_or_default()),
                    ttl_secs: op.ttl.unwrap_or(0),
                    condition: None,
                    write_level: WriteLevel::Unspecified,
                };
                match put.send(&state, &request_id).await {
                    Ok((created, etag)) => {
                        let status = if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        ok_result(status, etag.to_str().ok().map(str::to_string), None)
                    }
                    Err(error) => error_result(&error),
                }
            }
            OpKind::Delete => {
                match delete(&state, &request_id, key, None, WriteLevel::Unspecified).await {
                    Ok(_) => ok_result(StatusCode::NO_CONTENT, None, None),
                    Err(error) => error_result(&error),
                }
            }
        };
        results.push(result);
    }
    Ok(axum::Json(json!({ "results": results })).into_response())
}

/// The key's value and ETag from its replicas, or `None` if it has none.
async fn read(
    state: &AppState,
    request_id: &str,
    key: Vec<u8>,
    read_level: ReadLevel,
) -> Result<Option<(Bytes, HeaderValue)>, ApiError> {
    let view = state.view()?;
    let order = match read_level {
        ReadLevel::Quorum => {
            let found = quorum::read(&view, &key, request_id).await?;
            return Ok(found.found.then(|| (found.value, etag_of(found.version))));
        }
        ReadLevel::Any => Order::LeastLoaded,
        ReadLevel::Unspecified | ReadLevel::Primary => Order::Preference,
    };
    let message = GetRequest {
        key: key.clone().into(),
        read_level: read_level as i32,
    };
    let found = forward::to_replicas_in(
        &view,
        &key,
        order,
        Access::Read,
        request_id,
        message,
        |mut kv, req| async move { kv.get(req).await },
    )
    .await?;
    Ok(found.found.then(|| (found.value, etag_of(found.version))))
}

fn ok_result(status: StatusCode, etag: Option<String>, value: Option<String>) -> OpResult {
    OpResult {
        status: status.as_u16(),
        etag,
        value,
        value_base64: None,
        error: None,
    }
}

fn error_result(error: &ApiError) -> OpResult {
    OpResult {
        status: error.status().as_u16(),
        etag: None,
        value: None,
        value_base64: None,
        error: Some(error.body()["error"].clone()),
    }
}

/// `ETag: "<hlc>-<origin>"`.
fn etag_of(version: Option<caskade_proto::Version>) -> HeaderValue {
    let version = version.map_or(Version::ZERO, |v| Version::new(v.hlc, v.origin));
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0-0\""))
}

/// `If-None-Match: *` or `If-Match: "<version>"`, at most one of them.
fn condition(headers: &HeaderMap) -> Result<Option<Condition>, ApiError> {
    let text = |name: header::HeaderName| -> Result<Option<&str>, ApiError> {
        headers
            .get(&name)
            .map(|v| {
                v.to_str().map_err(|_| {
                    ApiError::bad_request("invalid_header", format!("{name} is not text"))
                })
            })
            .transpose()
    };
    let if_match = text(header::IF_MATCH)?;
    let if_none_match = text(header::IF_NONE_MATCH)?;
    let kind = match (if_match, if_none_match) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_header",
                "send If-Match or If-None-Match, not both",
            ));
        }
        (None, Some(value)) if value.trim() == "*" => condition::Kind::IfAbsent(true),
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_header",
                "If-None-Match supports only *",
            ));
        }
        (Some(value), None) => {
            let version: Version = value
                .trim()
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_header",
                        "If-Match must be one ETag: \"<version>\"",
                    )
                })?;
            condition::Kind::IfVersion(caskade_proto::Version {
                hlc: version.hlc,
                origin: version.origin,
            })
        }
    };
    Ok(Some(Condition { kind: Some(kind) }))
}

fn write_level(text: Option<&str>) -> Result<WriteLevel, ApiError> {
    match text {
        None => Ok(WriteLevel::Unspecified),
        Some("one") => Ok(WriteLevel::One),
        Some("quorum") => Ok(WriteLevel::Quorum),
        Some("all") => Ok(WriteLevel::All),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("w must be one, quorum or all, not {other:?}"),
        )),
    }
}

fn read_level(text: Option<&str>) -> Result<ReadLevel, ApiError> {
    match text {
        None => Ok(ReadLevel::Unspecified),
        Some("primary") => Ok(ReadLevel::Primary),
        Some("any") => Ok(ReadLevel::Any),
        Some("quorum") => Ok(ReadLevel::Quorum),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("r must be primary, any or quorum, not {other:?}"),
        )),
    }
}
