//! The router's REST contract, end to end: each test starts its own
//! `caskade local` cluster (three storage nodes, a router, real HTTPS and
//! mutual-TLS gRPC on loopback ports the OS picks) and talks to it with a
//! real HTTPS client, over HTTP/2 and HTTP/1.1.
//!
//! Covered: the key-value routes, their statuses and ETags, conditional
//! writes, TTLs, listing and its pagination, batches; the authentication
//! matrix (every 401 identical) and roles and key prefixes; the bad-input
//! matrix (status, JSON error and nothing written, every time) and oversized
//! headers; health, readiness and metrics; unknown routes and methods.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use caskade_router::auth::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    Api, Protocol, RestCluster, check_error_body, encode, etag, expect_error, is_version_etag,
    kv_path, poll_until,
};

const REQUEST_ID: &str = "x-request-id";
/// The documented default `max_value_bytes` (1 MiB).
const MAX_VALUE_BYTES: usize = 1 << 20;
/// The documented longest key.
const MAX_KEY_BYTES: usize = 1024;
/// How long a key written with `ttl=1` may take to disappear.
const TTL_DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- contract

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_contract_over_http2_and_http1() {
    let rc = RestCluster::start().await;
    let writer = rc.token(Role::Writer, None);
    for protocol in Protocol::BOTH {
        let ns = format!("{protocol:?}");
        rest_contract(&rc, &rc.api(protocol, &writer), &ns).await;
    }
    rc.stop().await;
}

/// Put, get, conditional writes, delete, odd keys and request ids, under `ns/`.
async fn rest_contract(rc: &RestCluster, api: &Api, ns: &str) {
    let key = format!("{ns}/plain");
    let key = key.as_bytes();
    let precondition_failed = StatusCode::PRECONDITION_FAILED;

    // Create, then replace: 201 then 200, each with a new version.
    let created = api.put(key, "v1").await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let etag1 = etag(&created);
    let fetched = api.get(key).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(etag(&fetched), etag1);
    assert_eq!(fetched.headers()[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(fetched.bytes().await.unwrap(), "v1");
    let replaced = api.put(key, "v2").await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let etag2 = etag(&replaced);
    assert_ne!(etag2, etag1, "a replacement has a new version");

    // If-None-Match: * only creates.
    let put_if = |key: &[u8], header, value: &str, body: &'static str| {
        let request = api.request(Method::PUT, &kv_path(key));
        api.send(request.header(header, value).body(body))
    };
    let refused = put_if(key, IF_NONE_MATCH, "*", "v-x").await;
    expect_error(refused, precondition_failed, "precondition_failed").await;
    assert_eq!(
        rc.read(key).await.unwrap(),
        b"v2",
        "a refused create changes nothing"
    );
    let fresh = format!("{ns}/create-only");
    let fresh = fresh.as_bytes();
    let first = put_if(fresh, IF_NONE_MATCH, "*", "first").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let second = put_if(fresh, IF_NONE_MATCH, "*", "second").await;
    expect_error(second, precondition_failed, "precondition_failed").await;
    assert_eq!(rc.read(fresh).await.unwrap(), b"first");

    // If-Match: the current ETag replaces; a stale one is refused, with the
    // current ETag in the answer and nothing changed.
    let matched = put_if(key, IF_MATCH, &etag2, "v3").await;
    assert_eq!(matched.status(), StatusCode::OK);
    let etag3 = etag(&matched);
    assert_ne!(etag3, etag2);
    let stale = put_if(key, IF_MATCH, &etag2, "v-stale").await;
    assert_eq!(etag(&stale), etag3, "a 412 carries the current ETag");
    expect_error(stale, precondition_failed, "precondition_failed").await;
    assert_eq!(
        rc.read(key).await.unwrap(),
        b"v3",
        "a stale If-Match changes nothing"
    );

    // DELETE: a stale If-Match is refused; then 204, and 204 again when absent.
    let request = api.request(Method::DELETE, &kv_path(key));
    let stale = api.send(request.header(IF_MATCH, &etag1)).await;
    expect_error(stale, precondition_failed, "precondition_failed").await;
    assert_eq!(rc.read(key).await.unwrap(), b"v3");
    for when in ["present", "absent"] {
        let deleted = api.delete(key).await;
        assert_eq!(
            deleted.status(),
            StatusCode::NO_CONTENT,
            "delete when {when}"
        );
        assert!(
            deleted.bytes().await.unwrap().is_empty(),
            "a 204 has no body"
        );
    }
    let gone = api.get(key).await;
    assert!(gone.headers().get(ETAG).is_none(), "a 404 has no ETag");
    expect_error(gone, StatusCode::NOT_FOUND, "not_found").await;
    let revived = put_if(key, IF_MATCH, &etag3, "v-revived").await;
    expect_error(revived, precondition_failed, "precondition_failed").await;
    assert_eq!(
        rc.read(key).await,
        None,
        "If-Match on a deleted key creates nothing"
    );

    // Keys are bytes: `/`, spaces, `+`, reserved characters and non-ASCII
    // survive percent-encoding, and a raw `/` names the same key as `%2F`.
    let mut odd_keys: Vec<String> = [
        "dir/sub/leaf",
        "with space",
        "a+b",
        "q?#&=%",
        "ключ/日本語",
        "tab\tand\"quote",
    ]
    .iter()
    .map(|k| format!("{ns}/{k}"))
    .collect();
    for odd in &odd_keys {
        let value = format!("value of {odd}");
        let put = api.put(odd.as_bytes(), value.clone()).await;
        assert_eq!(put.status(), StatusCode::CREATED, "{odd:?}");
        let got = api.get(odd.as_bytes()).await;
        assert_eq!(got.status(), StatusCode::OK, "{odd:?}");
        assert_eq!(got.bytes().await.unwrap(), value.as_bytes(), "{odd:?}");
    }
    let raw_slashes = api.request(Method::GET, &format!("/v1/kv/{ns}/dir/sub/leaf"));
    let raw_slashes = api.send(raw_slashes).await;
    assert_eq!(raw_slashes.status(), StatusCode::OK);
    let expected = format!("value of {ns}/dir/sub/leaf");
    assert_eq!(raw_slashes.bytes().await.unwrap(), expected.as_bytes());
    odd_keys.push(String::from_utf8(fresh.to_vec()).unwrap());
    odd_keys.sort();
    assert_eq!(rc.list_all(&format!("{ns}/"), 100).await, odd_keys);

    // x-request-id: a usable one is echoed (on errors too), an unusable one
    // is replaced, a missing one is made up.
    let with_id = |path: &str, id: &'static str| {
        api.send(api.request(Method::GET, path).header(REQUEST_ID, id))
    };
    let echoed = with_id(&kv_path(key), "rest-id-1").await;
    assert_eq!(echoed.headers()[REQUEST_ID], "rest-id-1");
    let on_error = with_id("/v1/kv/x?bogus=1", "rest-on-error").await;
    assert_eq!(on_error.headers()[REQUEST_ID], "rest-on-error");
    expect_error(on_error, StatusCode::BAD_REQUEST, "invalid_query").await;
    let unusable = with_id(&kv_path(key), "has space").await;
    let made_up = unusable.headers()[REQUEST_ID].to_str().unwrap();
    assert!(!made_up.is_empty() && made_up != "has space");
    let missing = api.get(key).await;
    assert!(!missing.headers()[REQUEST_ID].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_keys_expire_and_long_ttls_stay() {
    let rc = RestCluster::start().await;
    let api = rc.api(Protocol::Http2, &rc.token(Role::Writer, None));
    let put_ttl = |path: &str| api.send(api.request(Method::PUT, path).body("soon gone"));
    let short = put_ttl("/v1/kv/ttl%2Fshort?ttl=1&w=quorum").await;
    assert_eq!(short.status(), StatusCode::CREATED);
    let long = put_ttl("/v1/kv/ttl%2Flong?ttl=3600").await;
    assert_eq!(long.status(), StatusCode::CREATED);

    poll_until("the ttl=1 key to expire", TTL_DEADLINE, || async {
        rc.read(b"ttl/short").await.is_none()
    })
    .await;
    assert_eq!(
        rc.list_all("ttl/", 10).await,
        ["ttl/long"],
        "expired keys are not listed"
    );
    assert_eq!(rc.read(b"ttl/long").await.unwrap(), b"soon gone");
    rc.stop().await;
}

/// One page of `GET /v1/kv?{query}`: its keys and `next`.
async fn page(api: &Api, query: &str) -> (Vec<String>, Value) {
    let response = api.list(query).await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    let content_type = response.headers()[CONTENT_TYPE].to_str().unwrap();
    assert!(content_type.starts_with("application/json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "only keys and next: {body}"
    );
    let keys = body["keys"].as_array().unwrap();
    let keys = keys
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    (keys, body["next"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_a_prefix_in_byte_order() {
    let rc = RestCluster::start().await;
    // 25 keys, written in an order that is not their byte order, and
    // neighbours of the prefix that must not be listed.
    let mut inside: Vec<String> = (0..21).map(|n| format!("page/k{n:02}")).collect();
    inside.extend(["page/ space", "page/Z", "page/~", "page/é"].map(String::from));
    let outside = ["page", "pagd/x", "pagf/x", "page0", "other/page/x"];
    let mut write_order: Vec<&String> = inside.iter().collect();
    write_order.sort_by_key(|k| k.bytes().rev().collect::<Vec<u8>>());
    for key in write_order {
        rc.write(key.as_bytes(), key.as_bytes()).await;
    }
    for key in outside {
        rc.write(key.as_bytes(), b"outside").await;
    }
    let mut expected = inside.clone();
    expected.sort();

    let api = rc.api(Protocol::Http2, &rc.token(Role::Reader, None));
    // limit=10: pages of 10, 10 and 5, each key once, in byte order.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut after = String::new();
    loop {
        let query = format!("prefix=page%2F&limit=10&after={}", encode(after.as_bytes()));
        let (keys, next) = page(&api, &query).await;
        sizes.push(keys.len());
        seen.extend(keys);
        match next {
            Value::Null => break,
            Value::String(next) => after = next,
            other => panic!("next is {other}"),
        }
        assert!(sizes.len() < 3, "25 keys take 3 pages of 10: {sizes:?}");
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(seen, expected, "every key once, in byte order");

    // The default limit (100) holds them all; a page exactly as long as
    // what is left has no next.
    let all = (expected.clone(), Value::Null);
    assert_eq!(page(&api, "prefix=page%2F").await, all);
    assert_eq!(page(&api, "prefix=page%2F&limit=25").await, all);
    // `after` is exclusive and need not be a key that exists.
    let query = format!(
        "prefix=page%2F&limit=3&after={}",
        encode(expected[4].as_bytes())
    );
    let (keys, next) = page(&api, &query).await;
    assert_eq!(keys, expected[5..8]);
    assert_eq!(next, Value::String(expected[7].clone()));
    let (keys, _) = page(&api, "prefix=page%2F&limit=2&after=page%2Fk05x").await;
    assert_eq!(keys, ["page/k06", "page/k07"]);
    // No prefix lists everything; a prefix nothing has gives an empty page.
    let (everything, next) = page(&api, "limit=1000").await;
    assert_eq!(everything.len(), inside.len() + outside.len());
    assert_eq!(next, Value::Null);
    assert_eq!(page(&api, "prefix=nothing").await, (vec![], Value::Null));
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_are_not_utf8_are_listed_in_base64() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;

    let rc = RestCluster::start().await;
    // Keys are bytes (DESIGN: Router), JSON strings are text.
    let keys: Vec<Vec<u8>> = (1..=3u8)
        .map(|n| vec![b'b', b'/', 0xff, b'0' + n])
        .collect();
    for key in &keys {
        rc.write(key, b"binary key").await;
    }
    let api = rc.api(Protocol::Http2, &rc.token(Role::Reader, None));
    // As text they would be shown lossily, and a lossy `next` is no cursor:
    // the page is refused with a pointer to the encoding that works.
    let body = expect_error(
        api.list("prefix=b%2F").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("encoding=base64")
    );

    // In base64, paging one key at a time visits each exactly once, then ends.
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..=keys.len() {
        let query = format!("prefix=b%2F&limit=1&encoding=base64&after={after}");
        let (page_keys, next) = page(&api, &query).await;
        seen.extend(page_keys.iter().map(|k| BASE64.decode(k).unwrap()));
        match next {
            Value::String(next) => after = next,
            _ => break,
        }
    }
    assert_eq!(seen, keys, "each key once, in byte order, then next = null");
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_applies_each_op_in_order() {
    let rc = RestCluster::start().await;
    let writer = rc.token(Role::Writer, None);
    rc.write(b"batch/existing", b"old").await;
    let ops = json!({"ops": [
        {"op": "put", "key": "batch/a", "value": "1"},
        {"op": "put", "key": "batch/a", "value": "2"},
        {"op": "get", "key": "batch/a"},
        {"op": "delete", "key": "batch/a"},
        {"op": "get", "key": "batch/a"},
        {"op": "put", "key": "batch/b", "value": "värde", "ttl": 3600},
        {"op": "delete", "key": "batch/never-written"},
        {"op": "get", "key": "batch/existing"},
        {"op": "delete", "key": "batch/existing"},
    ]});
    // The same batch twice: the second run finds batch/b and no batch/existing.
    let expected_statuses = [
        [201, 200, 200, 204, 404, 201, 204, 200, 204],
        [201, 200, 200, 204, 404, 200, 204, 404, 204],
    ];
    for (protocol, expected_statuses) in Protocol::BOTH.into_iter().zip(expected_statuses) {
        let response = rc.api(protocol, &writer).batch(&ops).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        let results = body["results"].as_array().unwrap();
        let statuses: Vec<u64> = results
            .iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, expected_statuses, "{protocol:?}: {body}");
        let etag_of = |i: usize| results[i]["etag"].as_str().unwrap().to_string();
        assert!(is_version_etag(&etag_of(0)) && is_version_etag(&etag_of(1)));
        assert_ne!(etag_of(0), etag_of(1));
        assert_eq!(results[2]["value"], "2");
        assert_eq!(
            etag_of(2),
            etag_of(1),
            "the get sees the version the put made"
        );
        check_error_body(&json!({"error": results[4]["error"]}), "not_found");
        if protocol == Protocol::Http2 {
            assert_eq!(results[7]["value"], "old");
        }
    }
    assert_eq!(rc.read(b"batch/a").await, None);
    assert_eq!(rc.read(b"batch/b").await.unwrap(), "värde".as_bytes());
    assert_eq!(rc.list_all("batch/", 100).await, ["batch/b"]);

    // An empty batch is valid and does nothing.
    let empty = rc
        .api(Protocol::Http2, &writer)
        .batch(&json!({"ops": []}))
        .await;
    assert_eq!(empty.status(), StatusCode::OK);
    assert_eq!(empty.json::<Value>().await.unwrap(), json!({"results": []}));
    rc.stop().await;
}

// ------------------------------------------------------------ auth matrix

/// An HS256 token over `claims`, signed with `secret`, with an optional `kid`.
fn sign(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_failure_is_the_same_401() {
    let rc = RestCluster::start().await;
    let secret = rc.secret();
    let now = jsonwebtoken::get_current_timestamp();
    let admin_until = |exp: u64| json!({"sub": "m", "role": "admin", "exp": exp});
    let valid = rc.token(Role::Admin, None);
    let wrong_signature = sign(
        b"another secret, also 32 bytes or more",
        None,
        &admin_until(now + 3600),
    );
    let expired = sign(secret, None, &admin_until(now - 3600));
    // `alg: none` over the claims of a genuine admin token, no signature.
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let unsigned = format!("{none_header}.{}.", valid.split('.').nth(1).unwrap());
    let unknown_kid = sign(secret, Some("no-such-kid"), &admin_until(now + 3600));
    let no_exp = sign(secret, None, &json!({"sub": "m", "role": "admin"}));
    let early = json!({"sub": "m", "role": "admin", "nbf": now + 3600, "exp": now + 7200});
    let not_yet_valid = sign(secret, None, &early);
    let unknown_role = sign(
        secret,
        None,
        &json!({"sub": "m", "role": "root", "exp": now + 3600}),
    );
    let truncated = valid[..valid.len() - 4].to_string();
    let oversized = "a".repeat(10 * 1024);
    let bearer = |token: &str| Some(format!("Bearer {token}"));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("not bearer", Some("Basic YWRtaW46YWRtaW4=".into())),
        ("empty bearer", Some("Bearer".into())),
        ("garbage", bearer("not-a-jwt")),
        ("three garbage parts", bearer("aaa.bbb.ccc")),
        ("wrong signature", bearer(&wrong_signature)),
        ("expired", bearer(&expired)),
        ("alg none", bearer(&unsigned)),
        ("unknown kid", bearer(&unknown_kid)),
        ("no exp", bearer(&no_exp)),
        ("not yet valid", bearer(&not_yet_valid)),
        ("unknown role", bearer(&unknown_role)),
        ("truncated signature", bearer(&truncated)),
        ("oversized token", bearer(&oversized)),
    ];
    rc.write(b"auth/existing", b"kept").await;
    let put_in_batch = json!({"ops": [{"op": "put", "key": "auth/batch", "value": "x"}]});
    let api = rc.api_on(rc.client(Protocol::Http2).clone(), Protocol::Http2, None);

    let mut first: Option<Value> = None;
    for (name, authorization) in &cases {
        let requests = [
            api.request(Method::GET, "/v1/kv/auth/existing"),
            api.request(Method::PUT, "/v1/kv/auth/new").body("written?"),
            api.request(Method::DELETE, "/v1/kv/auth/existing"),
            api.request(Method::GET, "/v1/kv?prefix=auth%2F"),
            api.request(Method::POST, "/v1/batch").json(&put_in_batch),
        ];
        for request in requests {
            let request = match authorization {
                Some(value) => request.header(AUTHORIZATION, value),
                None => request,
            };
            let response = api.send(request).await;
            let what = format!("{name}: {}", response.url());
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
            let body = expect_error(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
            let first = first.get_or_insert_with(|| body.clone());
            assert_eq!(&body, first, "{what}: the 401 tells which check failed");
        }
    }
    assert_eq!(rc.read(b"auth/existing").await.unwrap(), b"kept");
    assert_eq!(
        rc.list_all("auth/", 100).await,
        ["auth/existing"],
        "no 401 wrote anything"
    );
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_reads_and_who_writes() {
    let rc = RestCluster::start().await;
    let reader = rc.api(Protocol::Http2, &rc.token(Role::Reader, None));
    rc.write(b"roles/existing", b"kept").await;

    // A reader reads and lists…
    let got = reader.get(b"roles/existing").await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap(), "kept");
    assert_eq!(page(&reader, "prefix=roles%2F").await.0, ["roles/existing"]);
    let gets = reader
        .batch(&json!({"ops": [{"op": "get", "key": "roles/existing"}]}))
        .await;
    assert_eq!(gets.status(), StatusCode::OK);
    assert_eq!(
        gets.json::<Value>().await.unwrap()["results"][0]["value"],
        "kept"
    );

    // …and nothing else, with one 403 body for all of it.
    let put_op = json!({"op": "put", "key": "roles/from-batch", "value": "x"});
    let refusals = [
        reader.put(b"roles/new", "x").await,
        reader.put(b"roles/existing", "x").await,
        reader.delete(b"roles/existing").await,
        reader
            .batch(&json!({"ops": [{"op": "get", "key": "roles/existing"}, put_op]}))
            .await,
        reader
            .batch(&json!({"ops": [{"op": "delete", "key": "roles/existing"}]}))
            .await,
    ];
    let mut bodies = Vec::new();
    for response in refusals {
        bodies.push(expect_error(response, StatusCode::FORBIDDEN, "forbidden").await);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one 403 body: {bodies:?}"
    );
    assert_eq!(rc.read(b"roles/existing").await.unwrap(), b"kept");
    assert_eq!(rc.list_all("roles/", 100).await, ["roles/existing"]);

    // Writers and admins write.
    for role in [Role::Writer, Role::Admin] {
        let api = rc.api(Protocol::Http2, &rc.token(role, None));
        let key = format!("roles/by-{role}");
        let put = api.put(key.as_bytes(), role.to_string()).await;
        assert_eq!(put.status(), StatusCode::CREATED, "{role}");
        let ops = json!({"ops": [{"op": "put", "key": format!("{key}-batch"), "value": "x"}]});
        let batch = api.batch(&ops).await;
        assert_eq!(batch.status(), StatusCode::OK, "{role}");
        assert_eq!(
            batch.json::<Value>().await.unwrap()["results"][0]["status"],
            201
        );
        let delete = api.delete(key.as_bytes()).await;
        assert_eq!(delete.status(), StatusCode::NO_CONTENT, "{role}");
    }
    let listed = rc.list_all("roles/", 100).await;
    assert_eq!(
        listed,
        [
            "roles/by-admin-batch",
            "roles/by-writer-batch",
            "roles/existing"
        ]
    );
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_scoped_tokens_stay_inside_their_prefix() {
    let rc = RestCluster::start().await;
    let team_a = rc.api(Protocol::Http2, &rc.token(Role::Writer, Some("team-a/")));
    let team_a_reader = rc.api(Protocol::Http2, &rc.token(Role::Reader, Some("team-a/")));
    rc.write(b"team-b/x", b"b's").await;

    // Inside the prefix: the whole writer contract.
    assert_eq!(
        team_a.put(b"team-a/x", "a's").await.status(),
        StatusCode::CREATED
    );
    let got = team_a.get(b"team-a/x").await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap(), "a's");
    for query in ["prefix=team-a%2F", "prefix=team-a%2Fx&limit=5"] {
        assert_eq!(page(&team_a, query).await.0, ["team-a/x"], "{query}");
    }
    let inside = json!({"ops": [
        {"op": "put", "key": "team-a/y", "value": "y"},
        {"op": "get", "key": "team-a/x"},
    ]});
    assert_eq!(team_a.batch(&inside).await.status(), StatusCode::OK);
    assert_eq!(
        team_a.delete(b"team-a/y").await.status(),
        StatusCode::NO_CONTENT
    );

    // Outside it: 403 on every route, and nothing written or deleted.
    let straddling = json!({"ops": [
        {"op": "put", "key": "team-a/z", "value": "inside"},
        {"op": "put", "key": "team-b/z", "value": "outside"},
    ]});
    let refusals = [
        team_a.get(b"team-b/x").await,
        team_a.put(b"team-b/x", "overwritten").await,
        team_a.put(b"team-b/new", "new").await,
        team_a.delete(b"team-b/x").await,
        // Prefixes are bytes: "team-a" alone is outside "team-a/".
        team_a.put(b"team-a", "sibling").await,
        team_a.list("prefix=team-b%2F").await,
        team_a.list("").await,
        team_a.list("prefix=team-a").await,
        team_a.batch(&straddling).await,
        team_a
            .batch(&json!({"ops": [{"op": "get", "key": "team-b/x"}]}))
            .await,
        // Inside the prefix but above the role: the same 403.
        team_a_reader.put(b"team-a/x", "overwritten").await,
    ];
    let mut bodies = Vec::new();
    for response in refusals {
        bodies.push(expect_error(response, StatusCode::FORBIDDEN, "forbidden").await);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "a 403 does not tell role from prefix: {bodies:?}"
    );
    assert_eq!(rc.read(b"team-a/x").await.unwrap(), b"a's");
    assert_eq!(rc.read(b"team-b/x").await.unwrap(), b"b's");
    assert_eq!(
        rc.read(b"team-a/z").await,
        None,
        "a refused batch applies none of its ops"
    );
    assert_eq!(rc.list_all("", 100).await, ["team-a/x", "team-b/x"]);
    rc.stop().await;
}

// ------------------------------------------------------- bad-input matrix

/// What a refused request must not have changed: every key and the one
/// existing key's value and version, as an admin sees them.
async fn store_state(
    rc: &RestCluster,
    existing: &[u8],
) -> (Vec<String>, Option<(Vec<u8>, String)>) {
    (
        rc.list_all("", 1000).await,
        rc.read_versioned(existing).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_single_key_requests_are_refused_and_write_nothing() {
    let rc = RestCluster::start().await;
    let writer = rc.token(Role::Writer, None);
    let existing = rc.write(b"bad/existing", b"original").await;
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);

    // (method, path and query, status, code); `{long}` stands for a key of
    // 1025 bytes. Every request carries a small body.
    let cases = [
        ("PUT", "/v1/kv/bad%zz", 400, "invalid_key"),
        ("PUT", "/v1/kv/bad%2", 400, "invalid_key"),
        ("PUT", "/v1/kv/", 400, "invalid_key"),
        ("GET", "/v1/kv/", 400, "invalid_key"),
        ("PUT", "/v1/kv/{long}", 413, "too_large"),
        ("PUT", "/v1/kv/bad/q?tll=60", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=0", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=abc", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=-1", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=315360001", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=5&ttl=6", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?ttl=%zz", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?w=most", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?w=", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/q?r=any", 400, "invalid_query"),
        ("PUT", "/v1/kv/bad/existing?ttl=0", 400, "invalid_query"),
        (
            "GET",
            "/v1/kv/bad/existing?r=sometimes",
            400,
            "invalid_query",
        ),
        ("GET", "/v1/kv/bad/existing?ttl=5", 400, "invalid_query"),
        ("DELETE", "/v1/kv/bad/existing?w=most", 400, "invalid_query"),
        ("DELETE", "/v1/kv/bad/existing?ttl=5", 400, "invalid_query"),
        ("GET", "/v1/kv?limit=0", 400, "invalid_query"),
        ("GET", "/v1/kv?limit=1001", 400, "invalid_query"),
        ("GET", "/v1/kv?limit=ten", 400, "invalid_query"),
        ("GET", "/v1/kv?prefx=bad", 400, "invalid_query"),
        ("GET", "/v1/kv?prefix={long}", 400, "invalid_query"),
    ];
    // Condition headers the API does not accept, on the existing key.
    let unquoted = existing.trim_matches('"').to_string();
    let weak = format!("W/{existing}");
    let conditions = [
        ("PUT", vec![("if-match", unquoted.as_str())]),
        ("PUT", vec![("if-match", "\"abc\"")]),
        ("PUT", vec![("if-match", weak.as_str())]),
        (
            "PUT",
            vec![("if-match", existing.as_str()), ("if-none-match", "*")],
        ),
        ("PUT", vec![("if-none-match", existing.as_str())]),
        ("DELETE", vec![("if-match", "garbage")]),
        ("DELETE", vec![("if-none-match", "*")]),
    ];
    let too_big = vec![b'v'; MAX_VALUE_BYTES + 1];

    for protocol in Protocol::BOTH {
        // A client of its own: a refused upload may cost its connection.
        let api = rc.api_on(rc.new_client(protocol), protocol, Some(&writer));
        let before = store_state(&rc, b"bad/existing").await;
        let mut refusals = Vec::new();
        for (method, path, status, code) in cases {
            let path = path.replace("{long}", &long_key);
            let request = api.request(method.parse().unwrap(), &path).body("x");
            refusals.push((format!("{method} {path:.60}"), request, status, code));
        }
        for (method, headers) in &conditions {
            let mut request = api.request(method.parse().unwrap(), "/v1/kv/bad/existing");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            refusals.push((
                format!("{method} {headers:?}"),
                request.body("changed"),
                400,
                "invalid_header",
            ));
        }
        for key in ["bad/big", "bad/existing"] {
            let request = api
                .request(Method::PUT, &format!("/v1/kv/{key}"))
                .body(too_big.clone());
            refusals.push((format!("PUT {key} 1 MiB + 1"), request, 413, "too_large"));
        }
        for (what, request, status, code) in refusals {
            let response = api.send(request).await;
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(response.status(), status, "{protocol:?} {what}");
            expect_error(response, status, code).await;
            let after = store_state(&rc, b"bad/existing").await;
            assert_eq!(after, before, "{protocol:?} {what}: changed the store");
        }
    }

    // The limits are where they are documented: a key of 1024 bytes and a
    // value of 1 MiB are accepted.
    let api = rc.api(Protocol::Http2, &writer);
    let longest = "k".repeat(MAX_KEY_BYTES);
    let put = api.put(longest.as_bytes(), "x").await;
    assert_eq!(
        put.status(),
        StatusCode::CREATED,
        "a key of exactly 1024 bytes"
    );
    let largest = vec![b'v'; MAX_VALUE_BYTES];
    let put = api.put(b"bad/largest", largest.clone()).await;
    assert_eq!(
        put.status(),
        StatusCode::CREATED,
        "a value of exactly 1 MiB"
    );
    assert_eq!(rc.read(b"bad/largest").await.unwrap(), largest);
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_whole_and_write_nothing() {
    let rc = RestCluster::start().await;
    let writer = rc.token(Role::Writer, None);
    rc.write(b"bb/existing", b"original").await;

    // Bodies that are not a batch at all.
    let malformed = [
        r#"{"ops": [{"op": "put""#,
        "ops=put",
        "",
        "[]",
        "{}",
        r#"{"ops": [], "w": 1}"#,
    ];
    let mut cases: Vec<(String, u16, &str)> = malformed
        .iter()
        .map(|body| (body.to_string(), 400, "invalid_json"))
        .collect();
    // One bad op after two good ones, of which neither may be applied.
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let big_value = "v".repeat(MAX_VALUE_BYTES + 1);
    let mut bad_ops: Vec<(Value, u16, &str)> = [
        r#"{"op": "incr", "key": "bb/n"}"#,
        r#"{"op": "put", "key": "bb/n", "value": "x", "w": "all"}"#,
        r#"{"op": "put", "key": "bb/n"}"#,
        r#"{"op": "get", "key": "bb/n", "value": "x"}"#,
        r#"{"op": "delete", "key": "bb/n", "ttl": 5}"#,
        r#"{"op": "put", "key": "bb/n", "value": "x", "ttl": 0}"#,
        r#"{"op": "put", "key": "bb/n", "value": "x", "ttl": -1}"#,
        r#"{"op": "put", "key": "bb/n", "value": 42}"#,
    ]
    .iter()
    .map(|op| (serde_json::from_str(op).unwrap(), 400, "invalid_json"))
    .collect();
    bad_ops.push((
        json!({"op": "put", "key": "", "value": "x"}),
        400,
        "invalid_key",
    ));
    bad_ops.push((json!({"op": "get", "key": long_key}), 413, "too_large"));
    bad_ops.push((
        json!({"op": "put", "key": "bb/n", "value": big_value}),
        413,
        "too_large",
    ));
    for (bad_op, status, code) in bad_ops {
        let ops = json!([
            {"op": "put", "key": "bb/first", "value": "x"},
            {"op": "delete", "key": "bb/existing"},
            bad_op,
        ]);
        cases.push((json!({ "ops": ops }).to_string(), status, code));
    }
    // Too many ops; and a body over 8 MiB made of ops that are each fine.
    let many: Vec<Value> = (0..1001)
        .map(|n| json!({"op": "put", "key": format!("bb/{n}"), "value": "x"}))
        .collect();
    cases.push((json!({ "ops": many }).to_string(), 413, "too_large"));
    let heavy_value = "h".repeat(MAX_VALUE_BYTES);
    let heavy: Vec<Value> = (0..9)
        .map(|n| json!({"op": "put", "key": format!("bb/h{n}"), "value": heavy_value}))
        .collect();
    cases.push((json!({ "ops": heavy }).to_string(), 413, "too_large"));

    let api = rc.api(Protocol::Http2, &writer);
    let before = store_state(&rc, b"bb/existing").await;
    for (body, status, code) in cases {
        let what = format!("{body:.80}");
        let response = api
            .send(api.request(Method::POST, "/v1/batch").body(body))
            .await;
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(response.status(), status, "{what}");
        expect_error(response, status, code).await;
        assert_eq!(
            store_state(&rc, b"bb/existing").await,
            before,
            "{what}: changed the store"
        );
    }

    // 1000 ops is the limit, not over it.
    let most: Vec<Value> = (0..1000)
        .map(|n| json!({"op": "get", "key": format!("bb/{n}")}))
        .collect();
    let response = api.batch(&json!({ "ops": most })).await;
    assert_eq!(response.status(), StatusCode::OK, "a batch of 1000 ops");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"].as_array().unwrap().len(), 1000);
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_refuses_unknown_query_parameters() {
    let rc = RestCluster::start().await;
    let api = rc.api(Protocol::Http2, &rc.token(Role::Writer, None));
    let ops = json!({"ops": [{"op": "put", "key": "bq/k", "value": "x"}]});
    let response = api
        .send(api.request(Method::POST, "/v1/batch?w=all").json(&ops))
        .await;
    expect_error(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    assert_eq!(rc.read(b"bq/k").await, None);
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_the_router_keeps_serving() {
    let rc = RestCluster::start().await;
    let writer = rc.token(Role::Writer, None);
    let filler = "a".repeat(64 * 1024);
    // HTTP/1.1: hyper answers 431 and closes the connection. (Raw, see
    // `raw_http1`: reqwest may report the closing instead of the answer.)
    let request = format!(
        "PUT /v1/kv/hdr%2Fk HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {writer}\r\n\
         x-filler: {filler}\r\ncontent-length: 1\r\n\r\nx"
    );
    let answer = rc.raw_http1(request.as_bytes()).await;
    let status_line = answer.split(|&b| b == b'\r').next().unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(status_line),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let oversized = |client: reqwest::Client| {
        let request = client.put(rc.at("/v1/kv/hdr%2Fk")).bearer_auth(&writer);
        request.header("x-filler", filler.as_str()).body("x").send()
    };
    // Through an HTTP client: HTTP/1.1 gets the 431 or sees the connection
    // closed under its feet; HTTP/2 gets the stream refused, by the router or
    // by a client that honours its SETTINGS_MAX_HEADER_LIST_SIZE. Never a 5xx.
    for protocol in Protocol::BOTH {
        match oversized(rc.new_client(protocol)).await {
            Ok(answer) => assert!(
                answer.status().is_client_error(),
                "{protocol:?}: {}",
                answer.status()
            ),
            Err(error) => assert!(!error.is_timeout(), "{protocol:?} timed out: {error}"),
        }
    }
    assert_eq!(
        rc.read(b"hdr/k").await,
        None,
        "a refused request writes nothing"
    );

    // Headers under the limit pass, and old and new connections are served.
    for protocol in Protocol::BOTH {
        for api in [
            rc.api(protocol, &writer),
            rc.api_on(rc.new_client(protocol), protocol, Some(&writer)),
        ] {
            let request = api.request(Method::PUT, "/v1/kv/hdr%2Fk");
            let fine = api
                .send(request.header("x-filler", "a".repeat(4 * 1024)).body("x"))
                .await;
            assert!(
                fine.status().is_success(),
                "{protocol:?}: {}",
                fine.status()
            );
            assert_eq!(api.get(b"hdr/k").await.status(), StatusCode::OK);
        }
    }
    rc.stop().await;
}

// --------------------------------------------------- health and metrics

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.rsplit_once("} ")?;
        let has =
            |(k, v): &(&str, &str)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\""));
        if labels.iter().all(has) {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let rc = RestCluster::start().await;
    for protocol in Protocol::BOTH {
        let anonymous = rc.api_on(rc.client(protocol).clone(), protocol, None);
        let health = anonymous
            .send(anonymous.request(Method::GET, "/healthz"))
            .await;
        assert_eq!(health.status(), StatusCode::OK);
        assert_eq!(
            health.json::<Value>().await.unwrap(),
            json!({"status": "ok"})
        );
        let ready = anonymous
            .send(anonymous.request(Method::GET, "/readyz"))
            .await;
        assert_eq!(ready.status(), StatusCode::OK);
        let ready: Value = ready.json().await.unwrap();
        assert_eq!(
            ready,
            json!({"status": "ready", "epoch": 1, "nodes_ready": 3, "nodes": 3})
        );
    }

    let anonymous = rc.api_on(rc.client(Protocol::Http2).clone(), Protocol::Http2, None);
    let scrape = || async {
        let response = anonymous
            .send(anonymous.request(Method::GET, "/metrics"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        response.text().await.unwrap()
    };
    let requests = "caskade_router_requests_total";
    let failures = "caskade_router_auth_failures_total";
    let put_201 = [
        ("route", "/v1/kv/{key}"),
        ("method", "PUT"),
        ("status", "201"),
    ];
    let get_401 = [
        ("route", "/v1/kv/{key}"),
        ("method", "GET"),
        ("status", "401"),
    ];
    let missing = [("reason", "missing")];
    // Every cluster of this process shares one recorder: compare before
    // and after rather than with absolute values.
    let before = scrape().await;
    let canary = b"metrics-canary-key";
    rc.write(canary, b"x").await;
    expect_error(
        anonymous.get(canary).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    let after = scrape().await;

    let grew = |name, labels: &[(&str, &str)]| {
        let was = sample(&before, name, labels).unwrap_or(0.0);
        let is = sample(&after, name, labels).unwrap_or(0.0);
        assert!(is > was, "{name}{labels:?}: {was} → {is}");
    };
    grew(requests, &put_201);
    grew(requests, &get_401);
    grew(failures, &missing);
    assert!(after.contains("caskade_router_request_duration_seconds_bucket{"));
    assert!(
        !after.contains("metrics-canary-key"),
        "keys never become metric labels"
    );
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_json_errors() {
    let rc = RestCluster::start().await;
    let admin = rc.token(Role::Admin, None);
    for protocol in Protocol::BOTH {
        let api = rc.api(protocol, &admin);
        for path in ["/", "/nope", "/v1", "/v1/kvx", "/v2/kv/x", "/v1/batch/x"] {
            let request = api
                .request(Method::GET, path)
                .header(REQUEST_ID, "unknown-route");
            let response = api.send(request).await;
            assert_eq!(response.headers()[REQUEST_ID], "unknown-route");
            expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
        }
        let patch = Method::from_bytes(b"PATCH").unwrap();
        let wrong_methods = [
            (patch.clone(), "/v1/kv/x"),
            (Method::POST, "/v1/kv/x"),
            (patch, "/v1/kv"),
            (Method::DELETE, "/v1/kv"),
            (Method::GET, "/v1/batch"),
            (Method::PUT, "/v1/batch"),
            (Method::POST, "/healthz"),
            (Method::DELETE, "/metrics"),
        ];
        for (method, path) in wrong_methods {
            let response = api.send(api.request(method, path).body("x")).await;
            expect_error(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            )
            .await;
        }
    }
    assert_eq!(rc.read(b"x").await, None, "a refused method writes nothing");
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_gets_return_binary_values_in_base64() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;

    let rc = RestCluster::start().await;
    let binary = [0u8, 0xff, 0xfe, b'x'];
    rc.write(b"bin/value", &binary).await;
    rc.write(b"bin/text", "värde".as_bytes()).await;
    let api = rc.api(Protocol::Http2, &rc.token(Role::Reader, None));
    let ops = json!({"ops": [
        {"op": "get", "key": "bin/value"},
        {"op": "get", "key": "bin/text"},
    ]});
    let response = api.batch(&ops).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    // Lossless: bytes that are not UTF-8 come back in base64, never altered.
    assert_eq!(results[0]["value"], Value::Null);
    let value = BASE64
        .decode(results[0]["value_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(value, binary);
    assert_eq!(results[1]["value"], "värde");
    assert_eq!(results[1]["value_base64"], Value::Null);
    rc.stop().await;
}
