//! The router against clients that mean it harm: connections held open
//! without a word (before, between and during requests), headers and bodies
//! trickled in or never finished, bodies declared larger than any limit,
//! made-up methods that would grow the metrics, routes probed without a
//! token, and bodies and headers built to hurt.
//!
//! Each test starts its own one-node `caskade local` cluster (real HTTPS on
//! a loopback port the OS picks) with the limits under test made short, and
//! attacks it with raw TLS, a raw HTTP/2 client or an HTTPS client. Every
//! attack is bounded in time; a `sleep` is only ever the silence an attacker
//! keeps, never a wait for the router.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Cursor;
use std::time::{Duration, Instant};

use caskade_router::auth::Role;
use caskade_router::config::LimitsConfig;
use reqwest::header::{ALLOW, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Protocol, RestCluster, RestOptions, check_error_body, expect_error, poll_until};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The idle timeout of the clusters that test it.
const IDLE: Duration = Duration::from_millis(1000);
/// How much later than its timer a close may come on a busy test machine.
const SLACK: Duration = Duration::from_secs(3);
/// How long an answer that should come at once may take.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// The router's default limits, changed by `change`.
fn limits(change: impl FnOnce(&mut LimitsConfig)) -> LimitsConfig {
    let mut limits = LimitsConfig::default();
    change(&mut limits);
    limits
}

/// A one-node cluster whose router has `router_limits`.
async fn cluster(router_limits: LimitsConfig) -> RestCluster {
    RestCluster::start_with(RestOptions {
        nodes: 1,
        router_limits,
        ..RestOptions::default()
    })
    .await
}

/// Reads `stream` until the router closes it (end of stream or reset) or
/// `deadline` passes. Returns what was read and, if it was closed, after how long.
async fn read_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    deadline: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut read = Vec::new();
    let closed = tokio::time::timeout(deadline, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            read.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    (read, closed.ok().map(|()| started.elapsed()))
}

/// An HTTP/1.1 answer read off the wire.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    /// The first answer in `bytes`.
    fn parse(bytes: &[u8]) -> RawAnswer {
        let text = String::from_utf8_lossy(bytes);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete answer in {text:?}"));
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        let mut answer = RawAnswer {
            status: status.parse().unwrap(),
            headers,
            body: rest.as_bytes().to_vec(),
        };
        if let Some(length) = answer.header("content-length") {
            answer.body.truncate(length.parse().unwrap());
        }
        answer
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Checks a JSON error answer with `status` and `code` that closes the connection.
    fn expect_closing_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("connection"), Some("close"), "{self:?}");
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{self:?}"
        );
        check_error_body(&serde_json::from_slice(&self.body).unwrap(), code);
    }
}

/// An HTTP/2 connection over TLS to the router, driven by a task of its own.
struct H2 {
    client: h2::client::SendRequest<Cursor<Vec<u8>>>,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2 {
    async fn connect(rc: &RestCluster) -> H2 {
        let tls = rc.tls_connect(b"h2").await;
        let (client, connection) = h2::client::Builder::new()
            .handshake::<_, Cursor<Vec<u8>>>(tls)
            .await
            .unwrap();
        H2 {
            client,
            connection: tokio::spawn(connection),
        }
    }

    /// Sends the head of a request; the body follows on the returned stream
    /// unless `end` (no body).
    async fn start(
        &mut self,
        request: http::Request<()>,
        end: bool,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Cursor<Vec<u8>>>) {
        let client = self.client.clone().ready().await.unwrap();
        self.client = client;
        self.client.send_request(request, end).unwrap()
    }

    /// The status and the whole body of `response`, within `ANSWER_DEADLINE`.
    async fn answer(response: h2::client::ResponseFuture) -> (StatusCode, Vec<u8>) {
        tokio::time::timeout(ANSWER_DEADLINE, async {
            let response = response.await.unwrap();
            let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            (status, bytes)
        })
        .await
        .expect("the router answers the HTTP/2 request in time")
    }
}

fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ------------------------------------------------------- idle connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_a_request_are_closed() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    for alpn in [b"http/1.1".as_slice(), b"h2"] {
        let mut tls = rc.tls_connect(alpn).await;
        let (read, closed) = read_until_closed(&mut tls, IDLE + SLACK).await;
        let name = String::from_utf8_lossy(alpn);
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "{name}: a silent connection is still open after {:?}",
                IDLE + SLACK
            )
        });
        assert!(closed >= IDLE / 2, "{name}: closed after only {closed:?}");
        assert!(read.is_empty(), "{name}: the router said {read:?}");
    }
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_closed_once_idle() {
    // The header timeout stays at its default (10 s): the idle timer, not
    // it, must close the HTTP/1.1 connection.
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;

    let mut tls = rc.tls_connect(b"http/1.1").await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (read, closed) = read_until_closed(&mut tls, IDLE + SLACK).await;
    assert_eq!(RawAnswer::parse(&read).status, 200);
    assert!(
        closed.is_some(),
        "HTTP/1.1: an idle keep-alive connection is still open after {:?}",
        IDLE + SLACK
    );

    // HTTP/2: answered, then no open stream: the router says GOAWAY and
    // closes, although the client would answer its pings for ever.
    let mut h2 = H2::connect(&rc).await;
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);
    let ended = tokio::time::timeout(IDLE + SLACK, &mut h2.connection).await;
    assert!(
        ended.is_ok(),
        "HTTP/2: a connection with no open stream is still open after {:?}",
        IDLE + SLACK
    );
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_outlives_the_idle_timeout() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    let writer = bearer(&rc.token(Role::Writer, None));
    // 30 bytes, one every 100 ms: three idle timeouts long, and far above
    // the slowest body rate the router waits for.
    let value = b"abcdefghijklmnopqrstuvwxyz0123";
    let pause = Duration::from_millis(100);

    let mut tls = rc.tls_connect(b"http/1.1").await;
    let head = format!(
        "PUT /v1/kv/slow%2Fh1 HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {writer}\r\n\
         content-length: {}\r\n\r\n",
        value.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    for byte in value {
        tokio::time::sleep(pause).await;
        tls.write_all(&[*byte]).await.unwrap();
    }
    let mut read = Vec::new();
    let answered = tokio::time::timeout(ANSWER_DEADLINE, async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&read).contains("\r\n\r\n") {
            match tls.read(&mut chunk).await {
                Ok(n @ 1..) => read.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer to the slow PUT");
    assert_eq!(RawAnswer::parse(&read).status, 201, "{read:?}");

    let mut h2 = H2::connect(&rc).await;
    let length = value.len().to_string();
    let put = request(
        "PUT",
        &rc.at("/v1/kv/slow%2Fh2"),
        &[("authorization", &writer), ("content-length", &length)],
    );
    let (response, mut body) = h2.start(put, false).await;
    for (i, byte) in value.iter().enumerate() {
        tokio::time::sleep(pause).await;
        let last = i + 1 == value.len();
        body.send_data(Cursor::new(vec![*byte]), last).unwrap();
    }
    assert_eq!(H2::answer(response).await.0, StatusCode::CREATED);

    for key in [b"slow/h1".as_slice(), b"slow/h2"] {
        assert_eq!(rc.read(key).await.unwrap(), value);
    }
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_attackers_lock_clients_out_for_no_longer_than_the_idle_timeout() {
    const SLOTS: usize = 3;
    let rc = cluster(limits(|l| {
        l.idle_timeout_ms = IDLE.as_millis() as u64;
        l.max_connections = SLOTS;
    }))
    .await;
    // As many silent TLS connections as the router serves at once, in the
    // accept queue before the client. Their handshakes finish as slots free
    // up (the harness's own client may still hold one), so each runs in a
    // task of its own.
    let dialer = rc.tls_dialer(b"http/1.1");
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..SLOTS {
        let tcp = dialer.tcp().await;
        let dialer = dialer.clone();
        attackers.spawn(async move {
            let mut tls = dialer.handshake(tcp).await;
            read_until_closed(&mut tls, IDLE * 4 + SLACK).await
        });
    }

    // A real client gets through once the attackers have been idle too long.
    let deadline = IDLE * 2 + SLACK;
    let started = Instant::now();
    let client = rc.new_client(Protocol::Http11);
    let health = tokio::time::timeout(deadline, client.get(rc.at("/healthz")).send()).await;
    let health = health.unwrap_or_else(|_| {
        panic!("{SLOTS} idle connections locked a client out for more than {deadline:?}")
    });
    assert_eq!(health.unwrap().status(), StatusCode::OK);
    assert!(started.elapsed() < deadline);
    drop(client);
    let all_closed = tokio::time::timeout(IDLE * 4 + SLACK, async {
        while let Some(attacker) = attackers.join_next().await {
            assert!(
                attacker.unwrap().1.is_some(),
                "an attacker is still connected"
            );
        }
    })
    .await;
    assert!(all_closed.is_ok(), "an attacker is still connected");
    rc.stop().await;
}

// ---------------------------------------------------- slow headers, bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickled_in_are_cut_at_the_header_timeout() {
    let header_timeout = Duration::from_millis(500);
    let rc = cluster(limits(|l| {
        l.header_timeout_ms = header_timeout.as_millis() as u64;
    }))
    .await;
    let tls = rc.tls_connect(b"http/1.1").await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let slowloris = async move {
        let _ = writer
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            .await;
        for n in 0.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = writer
                .write_all(format!("x-slow-{n}: 1\r\n").as_bytes())
                .await;
        }
    };
    let (read, closed) = tokio::select! {
        closed = read_until_closed(&mut reader, header_timeout + SLACK) => closed,
        () = slowloris => unreachable!("the attacker never stops"),
    };
    assert!(
        closed.is_some(),
        "a client trickling headers is still connected after {:?}",
        header_timeout + SLACK
    );
    assert!(
        read.is_empty(),
        "no answer to a request never sent: {read:?}"
    );
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_is_answered_408_and_the_connection_closed() {
    let rc = cluster(limits(|l| {
        l.body_timeout_ms = 500;
        l.body_min_bytes_per_sec = 1000;
    }))
    .await;
    let writer = bearer(&rc.token(Role::Writer, None));
    // A million bytes announced, ten sent, then silence: over HTTP/1.1,
    // with and without an Idempotency-Key (which reads the body first).
    for (key, extra) in [
        ("stalled%2Fh1", ""),
        ("stalled%2Fidempotent", "idempotency-key: stalled-1\r\n"),
    ] {
        let mut tls = rc.tls_connect(b"http/1.1").await;
        let head = format!(
            "PUT /v1/kv/{key} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {writer}\r\n\
             {extra}content-length: 1000000\r\n\r\n0123456789"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let (read, closed) = read_until_closed(&mut tls, ANSWER_DEADLINE).await;
        assert!(
            closed.is_some(),
            "{key}: neither answered nor closed within {ANSWER_DEADLINE:?}: {read:?}"
        );
        RawAnswer::parse(&read).expect_closing_error(408, "request_timeout");
    }

    // HTTP/2: the stream is answered 408; other streams are not affected.
    let mut h2 = H2::connect(&rc).await;
    let put = request(
        "PUT",
        &rc.at("/v1/kv/stalled%2Fh2"),
        &[("authorization", &writer), ("content-length", "1000000")],
    );
    let (response, mut body) = h2.start(put, false).await;
    body.send_data(Cursor::new(b"0123456789".to_vec()), false)
        .unwrap();
    let (status, answer) = H2::answer(response).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    check_error_body(&serde_json::from_slice(&answer).unwrap(), "request_timeout");
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);
    drop(body);

    for key in ["stalled/h1", "stalled/idempotent", "stalled/h2"] {
        assert_eq!(rc.read(key.as_bytes()).await, None, "{key} was written");
    }
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_declared_over_the_limit_are_refused_before_they_are_read() {
    let rc = cluster(LimitsConfig::default()).await;
    let writer = bearer(&rc.token(Role::Writer, None));
    let over_value = (LimitsConfig::default().max_value_bytes + 1).to_string();
    let over_body = (LimitsConfig::default().max_body_bytes + 1).to_string();
    // The head only: a router that waited for the body would never answer.
    let cases = [
        ("PUT", "/v1/kv/big%2Fvalue", "", &over_value),
        (
            "PUT",
            "/v1/kv/big%2Fidem",
            "idempotency-key: big-1\r\n",
            &over_value,
        ),
        ("POST", "/v1/batch", "", &over_body),
        (
            "POST",
            "/v1/batch",
            "idempotency-key: big-2\r\n",
            &over_body,
        ),
    ];
    for (method, path, extra, length) in cases {
        let mut tls = rc.tls_connect(b"http/1.1").await;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {writer}\r\n\
             {extra}content-length: {length}\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let (read, closed) = read_until_closed(&mut tls, ANSWER_DEADLINE).await;
        assert!(
            closed.is_some(),
            "{method} {path}: neither answered nor closed within {ANSWER_DEADLINE:?}: {read:?}"
        );
        RawAnswer::parse(&read).expect_closing_error(413, "too_large");
    }

    let mut h2 = H2::connect(&rc).await;
    let put = request(
        "PUT",
        &rc.at("/v1/kv/big%2Fh2"),
        &[("authorization", &writer), ("content-length", &over_value)],
    );
    let (response, _body) = h2.start(put, false).await;
    let (status, answer) = H2::answer(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    check_error_body(&serde_json::from_slice(&answer).unwrap(), "too_large");

    for key in ["big/value", "big/idem", "big/h2"] {
        assert_eq!(rc.read(key.as_bytes()).await, None, "{key} was written");
    }
    rc.stop().await;
}

// ------------------------------------------------------------------ metrics

/// The methods a metric label may name.
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// Every value of label `label` in the series of `metric` in `text`.
fn label_values(text: &str, metric: &str, label: &str) -> std::collections::BTreeSet<String> {
    let key = format!("{label}=\"");
    text.lines()
        .filter(|line| line.starts_with(metric))
        .filter_map(|line| {
            let rest = &line[line.find(&key)? + key.len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_the_metrics() {
    let rc = cluster(LimitsConfig::default()).await;
    let anonymous = rc.api_on(rc.new_client(Protocol::Http2), Protocol::Http2, None);
    let scrape = || async {
        let response = anonymous
            .send(anonymous.request(Method::GET, "/metrics"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    };
    let before = scrape().await;
    for i in 0..300 {
        let method = Method::from_bytes(format!("FOOBAR{i}").as_bytes()).unwrap();
        let path = ["/healthz", "/v1/kv/x", "/nope"][i % 3];
        let response = anonymous.send(anonymous.request(method, path)).await;
        assert!(response.status().is_client_error(), "{path}");
    }
    let after = scrape().await;

    assert!(!after.contains("FOOBAR"), "a made-up method became a label");
    for metric in [
        "caskade_router_requests_total",
        "caskade_router_request_duration_seconds",
    ] {
        for method in label_values(&after, metric, "method") {
            assert!(
                METHOD_LABELS.contains(&method.as_str()),
                "{metric}: {method}"
            );
        }
    }
    // Before the fix each method added a counter and a histogram: over
    // 600 KiB for these 300 requests. Other tests of this process share the
    // recorder and may add a few series meanwhile.
    let grew = after.len().saturating_sub(before.len());
    assert!(grew < 64 << 10, "/metrics grew by {grew} bytes");
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_a_listener_of_their_own() {
    let rc = RestCluster::start_with(RestOptions {
        nodes: 1,
        separate_metrics: true,
        ..RestOptions::default()
    })
    .await;
    let metrics = rc.metrics_url().expect("the router has a metrics listener");
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let scraped = plain
        .get(format!("{metrics}/metrics"))
        .timeout(ANSWER_DEADLINE)
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(
        scraped
            .text()
            .await
            .unwrap()
            .contains("caskade_router_requests_total"),
        "the router's series are on the metrics listener"
    );

    // The HTTPS listener no longer serves them, to anyone.
    let admin = rc.token(Role::Admin, None);
    for protocol in Protocol::BOTH {
        let api = rc.api(protocol, &admin);
        let response = api.send(api.request(Method::GET, "/metrics")).await;
        expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
        let anonymous = rc.api_on(rc.client(protocol).clone(), protocol, None);
        let response = anonymous
            .send(anonymous.request(Method::GET, "/metrics"))
            .await;
        expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
        let health = anonymous
            .send(anonymous.request(Method::GET, "/healthz"))
            .await;
        assert_eq!(health.status(), StatusCode::OK);
    }
    rc.stop().await;
}

// ------------------------------------------------------- routes and tokens

fn sign(secret: &[u8], claims: &Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_no_one_without_a_token() {
    let rc = cluster(LimitsConfig::default()).await;
    let admin = rc.token(Role::Admin, None);
    let now = jsonwebtoken::get_current_timestamp();
    let empty_prefix = sign(
        rc.secret(),
        &json!({"sub": "m", "role": "admin", "prefix": "", "exp": now + 3600}),
    );
    let patch = Method::from_bytes(b"PATCH").unwrap();
    let wrong_methods = [
        (patch.clone(), "/v1/kv"),
        (Method::DELETE, "/v1/kv"),
        (Method::GET, "/v1/batch"),
        (Method::PUT, "/v1/batch"),
        (Method::GET, "/admin/v1/nodes"),
        (Method::PUT, "/admin/v1/cluster"),
        (Method::GET, "/admin/v1/nodes/1/merge"),
        (patch, "/admin/v1/nodes/1"),
    ];
    for protocol in Protocol::BOTH {
        let api = rc.api_on(rc.client(protocol).clone(), protocol, None);
        let tokens = [None, Some("not-a-jwt"), Some(empty_prefix.as_str())];
        for token in tokens {
            for (method, path) in &wrong_methods {
                let request = api.request(method.clone(), path);
                let request = match token {
                    Some(token) => request.header(AUTHORIZATION, bearer(token)),
                    None => request,
                };
                let response = api.send(request).await;
                let what = format!("{protocol:?} {method} {path} with {token:?}");
                assert_eq!(response.headers().get(ALLOW), None, "{what}");
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
                expect_error(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
            }
            // Routes that do not exist answer the same as the ones that do.
            let request = api.request(Method::GET, "/v1/no-such-route");
            let request = match token {
                Some(token) => request.header(AUTHORIZATION, bearer(token)),
                None => request,
            };
            expect_error(
                api.send(request).await,
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
            )
            .await;
        }
        // An authenticated client learns the methods.
        let authenticated = rc.api(protocol, &admin);
        for (method, path) in &wrong_methods {
            let response = authenticated
                .send(authenticated.request(method.clone(), path))
                .await;
            assert!(response.headers().contains_key(ALLOW), "{method} {path}");
            expect_error(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            )
            .await;
        }
        // The unauthenticated routes keep their 405.
        for (method, path) in [(Method::POST, "/healthz"), (Method::DELETE, "/metrics")] {
            let response = api.send(api.request(method, path)).await;
            expect_error(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            )
            .await;
        }
    }
    let metrics = rc
        .api_on(rc.client(Protocol::Http2).clone(), Protocol::Http2, None)
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("caskade_router_auth_failures_total{reason=\"empty_prefix\"}"),
        "tokens with an empty prefix are counted"
    );
    rc.stop().await;
}

// ------------------------------------------- headers, JSON and HTTP/2 streams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_json_and_streams_are_refused() {
    let streams = 7;
    let rc = cluster(limits(|l| l.max_concurrent_streams = streams)).await;
    let writer = rc.token(Role::Writer, None);

    // JSON nested far deeper than any batch: serde_json's recursion limit
    // makes it a 400, not a stack overflow.
    let deep = format!(
        "{{\"ops\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for protocol in Protocol::BOTH {
        let api = rc.api(protocol, &writer);
        let request = api
            .request(Method::POST, "/v1/batch")
            .header("content-type", "application/json")
            .body(deep.clone());
        expect_error(
            api.send(request).await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        )
        .await;
    }

    // Many small headers: 431 from hyper's header count limit.
    let many: String = (0..200).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let request = format!("GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n{many}\r\n");
    let answer = rc.raw_http1(request.as_bytes()).await;
    assert_eq!(RawAnswer::parse(&answer).status, 431);

    // HTTP/2: the router announces the configured stream limit.
    let mut h2 = H2::connect(&rc).await;
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);
    assert_eq!(h2.client.current_max_send_streams(), streams as usize);

    // The router still serves.
    poll_until(
        "the router to serve after the attacks",
        ANSWER_DEADLINE,
        || async {
            let api = rc.api(Protocol::Http11, &writer);
            api.send(api.request(Method::GET, "/healthz"))
                .await
                .status()
                == StatusCode::OK
        },
    )
    .await;
    rc.stop().await;
}

fn request_get(rc: &RestCluster, path: &str) -> http::Request<()> {
    request("GET", &rc.at(path), &[])
}
