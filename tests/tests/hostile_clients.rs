//! The router against clients that mean it harm: connections held open
//! without a word (before, between and during requests) or with answers
//! never taken (sheltered by cheap requests on other streams or not),
//! headers and bodies trickled in, never finished or sent in a burst and
//! then silence, bodies declared larger than any limit, made-up methods
//! that would grow the metrics, routes probed without a token, and bodies
//! and headers built to hurt; and, so that the defences do not cut them,
//! clients that are merely slow: uploads trickled in, large answers read
//! slowly but steadily.
//!
//! Each test starts its own one-node `caskade local` cluster (real HTTPS on
//! a loopback port the OS picks) with the limits under test made short, and
//! attacks it with raw TLS, a raw HTTP/2 client or an HTTPS client. Every
//! attack is bounded in time; a `sleep` is only ever the silence an attacker
//! keeps, never a wait for the router.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Cursor;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use caskade_router::auth::Role;
use caskade_router::config::LimitsConfig;
use reqwest::header::{ALLOW, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Protocol, RestCluster, RestOptions, check_error_body, expect_error, poll_until};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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
/// Sends `head` and reads until the router closes the connection, which
/// it must do within [`ANSWER_DEADLINE`]; `what` names the request.
async fn answer_then_close(
    tls: &mut (impl AsyncRead + AsyncWrite + Unpin),
    head: &str,
    what: &str,
) -> RawAnswer {
    tls.write_all(head.as_bytes()).await.unwrap();
    let (read, closed) = read_until_closed(tls, ANSWER_DEADLINE).await;
    assert!(
        closed.is_some(),
        "{what}: neither answered nor closed within {ANSWER_DEADLINE:?}: {read:?}"
    );
    RawAnswer::parse(&read)
}

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

/// Reads `stream` until one whole HTTP/1.1 answer has arrived, within
/// `ANSWER_DEADLINE`; whatever came after it in the same read is dropped.
async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> RawAnswer {
    let [answer] = read_answers(stream, ANSWER_DEADLINE).await;
    answer
}

/// Reads `stream` until `N` whole HTTP/1.1 answers have arrived, within
/// `deadline`; whatever came after them in the same read is dropped.
async fn read_answers<const N: usize>(
    stream: &mut (impl AsyncRead + Unpin),
    deadline: Duration,
) -> [RawAnswer; N] {
    let mut read = Vec::new();
    let mut answers = Vec::new();
    let all = tokio::time::timeout(deadline, async {
        let mut chunk = [0u8; 4096];
        let mut start = 0;
        loop {
            while let Some((answer, length)) = RawAnswer::complete(&read[start..]) {
                answers.push(answer);
                start += length;
                if answers.len() == N {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(n @ 1..) => read.extend_from_slice(&chunk[..n]),
                _ => panic!(
                    "closed before {N} whole answers, {} read: {:?}",
                    answers.len(),
                    String::from_utf8_lossy(&read[start..])
                ),
            }
        }
    })
    .await;
    if all.is_err() {
        panic!(
            "not {N} whole answers within {deadline:?}, {} read: {:?}",
            answers.len(),
            String::from_utf8_lossy(&read)
        );
    }
    answers.try_into().expect("as many answers as asked for")
}

/// Reads `stream` until the head of an HTTP/1.1 answer has arrived, within
/// `ANSWER_DEADLINE`, and not much more: a few KiB of its body at most.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> RawAnswer {
    let mut read = Vec::new();
    let head = tokio::time::timeout(ANSWER_DEADLINE, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                return RawAnswer::head(&read[..end]);
            }
            match stream.read(&mut chunk).await {
                Ok(n @ 1..) => read.extend_from_slice(&chunk[..n]),
                _ => panic!("closed before an answer's head: {read:?}"),
            }
        }
    })
    .await;
    head.unwrap_or_else(|_| panic!("no answer's head within {ANSWER_DEADLINE:?}: {read:?}"))
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
        RawAnswer::complete(bytes)
            .map(|(answer, _)| answer)
            .unwrap_or_else(|| panic!("no complete answer in {:?}", String::from_utf8_lossy(bytes)))
    }

    /// The first answer in `bytes` and how many bytes it takes, once its
    /// head and its `Content-Length` body are all there. Looks no further
    /// than the head until then, so that reading a large answer a chunk at
    /// a time stays cheap.
    fn complete(bytes: &[u8]) -> Option<(RawAnswer, usize)> {
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let mut answer = RawAnswer::head(&bytes[..head_end]);
        let rest = &bytes[head_end + 4..];
        let body = match answer.header("content-length") {
            Some(length) => rest.get(..length.parse::<usize>().unwrap())?,
            None => rest,
        };
        answer.body = body.to_vec();
        Some((answer, head_end + 4 + body.len()))
    }

    /// An answer's status and headers, from its `head` (without the blank
    /// line that ends it); no body yet.
    fn head(head: &[u8]) -> RawAnswer {
        let head = String::from_utf8_lossy(head);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        RawAnswer {
            status: status.parse().unwrap(),
            headers,
            body: Vec::new(),
        }
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

/// A TLS connection to the router offering `alpn`, handshake done, whose
/// socket has a receive buffer of `receive_buffer` bytes (doubled by Linux
/// for its bookkeeping), not grown by the kernel as it would by default.
async fn tls_connect_receiving(
    rc: &RestCluster,
    alpn: &[u8],
    receive_buffer: u32,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = rc.url.trim_start_matches("https://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // Before connecting: the window scale is agreed in the handshake.
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    rc.tls_dialer(alpn).handshake(tcp).await
}

/// The most a [`Paced`] connection reads at once.
const PACED_READ: usize = 4096;

/// A connection whose reads are paced to `bytes_per_sec`, a few KiB at a
/// time: a client that reads slowly but steadily. Its pauses are the
/// client's own pace, never a wait for the router.
struct Paced<S> {
    inner: S,
    bytes_per_sec: u64,
    started: tokio::time::Instant,
    read: u64,
    /// Until the bytes read so far are due at the pace.
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Paced<S> {
    fn new(inner: S, bytes_per_sec: u64) -> Paced<S> {
        let started = tokio::time::Instant::now();
        Paced {
            inner,
            bytes_per_sec,
            started,
            read: 0,
            pause: Box::pin(tokio::time::sleep_until(started)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let due = this.started + Duration::from_micros(this.read * 1_000_000 / this.bytes_per_sec);
        if this.pause.deadline() != due {
            this.pause.as_mut().reset(due);
        }
        ready!(this.pause.as_mut().poll(cx));
        let mut chunk = [0u8; PACED_READ];
        let wanted = buf.remaining().min(PACED_READ);
        let mut limited = ReadBuf::new(&mut chunk[..wanted]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        buf.put_slice(limited.filled());
        this.read += limited.filled().len() as u64;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
    // 30 bytes, one every 100 ms: three idle timeouts long, well within
    // the body timeout (10 s by default), never silent for long.
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
    let answer = read_answer(&mut tls).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    // Had the idle timer fired meanwhile, the answer would close the
    // connection (the graceful close of HTTP/1.1).
    assert_eq!(answer.header("connection"), None, "{answer:?}");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut tls).await;
    assert_eq!(answer.status, 200, "the connection serves on: {answer:?}");

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
    // Had the idle timer fired meanwhile, the router would have sent a
    // GOAWAY, and a new stream would be refused.
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);

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
    let client = rc.new_client(Protocol::Http11);
    let health = tokio::time::timeout(deadline, client.get(rc.at("/healthz")).send()).await;
    let health = health.unwrap_or_else(|_| {
        panic!("{SLOTS} idle connections locked a client out for more than {deadline:?}")
    });
    assert_eq!(health.unwrap().status(), StatusCode::OK);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_an_http2_client_never_takes_do_not_hold_its_connection() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    // Window 0: the answer's body waits for send capacity that never comes.
    // Window 1: one byte is sent and the rest waits in the router's HTTP/2
    // buffer, so the GOAWAY of the idle close waits for a stream that
    // never ends.
    // The client reads every frame and answers pings, just never opens
    // a window.
    for window in [0, 1] {
        let tls = rc.tls_connect(b"h2").await;
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Cursor<Vec<u8>>>(tls)
            .await
            .unwrap();
        let started = Instant::now();
        let mut connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(request_get(&rc, "/healthz"), true)
            .unwrap();
        // Headers take no window.
        let response = tokio::time::timeout(ANSWER_DEADLINE, response)
            .await
            .expect("the head of the answer in time")
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        // Held, never read: dropping it would reset the stream.
        let _body = response.into_body();
        // The idle timeout from the last of the answer the router could
        // send, then as long again at most for the close.
        let deadline = IDLE * 2 + SLACK;
        let ended = tokio::time::timeout(deadline, &mut connection).await;
        assert!(
            ended.is_ok(),
            "window {window}: the connection is still open after {:?}",
            started.elapsed()
        );
        let ended = started.elapsed();
        assert!(
            ended >= IDLE / 2,
            "window {window}: closed after only {ended:?}"
        );
    }
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_other_streams_do_not_shelter_an_answer_never_taken() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    // Window 0: no answer's body ever moves, the 1 MiB value's least of
    // all. Window 1: one byte of a value smaller than a piece goes out,
    // and hyper takes the whole answer as soon as its window opens at all.
    for (window, size) in [(0, 1 << 20), (1, 8 << 10)] {
        sheltered(&rc, window, size).await;
    }
    rc.stop().await;
}

/// A value of `size` read over HTTP/2 with a stream window of `window`
/// bytes, never read further, while cheap requests come and go on other
/// streams: the connection must end within the idle timeout and the close.
async fn sheltered(rc: &RestCluster, window: u32, size: usize) {
    let key = format!("stalled-{window}");
    rc.write(key.as_bytes(), &vec![b'x'; size]).await;
    let reader = bearer(&rc.token(Role::Reader, None));
    let tls = rc.tls_connect(b"h2").await;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Cursor<Vec<u8>>>(tls)
        .await
        .unwrap();
    let mut connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let started = Instant::now();
    let get = request(
        "GET",
        &rc.at(&format!("/v1/kv/{key}")),
        &[("authorization", &reader)],
    );
    let (response, _) = client.send_request(get, true).unwrap();
    let response = tokio::time::timeout(ANSWER_DEADLINE, response)
        .await
        .expect("the head of the answer in time")
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    // Held, never read: dropping it would reset the stream.
    let _stalled = response.into_body();
    // Every half idle timeout, a request that needs no token on a fresh
    // stream: its head is read and the stream reset. A handler answers
    // and an answer ends each time, yet the stalled answer never moves.
    let cheap_answers = Arc::new(AtomicUsize::new(0));
    let healthz = rc.at("/healthz");
    let counted = Arc::clone(&cheap_answers);
    let pester = tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE / 2).await;
            let Ok(ready) = client.ready().await else {
                return;
            };
            client = ready;
            let Ok((response, _)) = client.send_request(request("GET", &healthz, &[]), true) else {
                return;
            };
            match tokio::time::timeout(ANSWER_DEADLINE, response).await {
                // Dropped with its body unread: the stream is reset.
                Ok(Ok(_response)) => counted.fetch_add(1, Ordering::Relaxed),
                _ => return,
            };
        }
    });
    // The stalled answer's idle timeout, then the close's.
    let deadline = IDLE * 2 + SLACK;
    let ended = tokio::time::timeout(deadline, &mut connection).await;
    pester.abort();
    let cheap_answers = cheap_answers.load(Ordering::Relaxed);
    assert!(
        ended.is_ok(),
        "window {window}: the connection is still open after {:?}, {cheap_answers} cheap requests answered meanwhile",
        started.elapsed()
    );
    let ended = started.elapsed();
    assert!(
        ended >= IDLE / 2,
        "window {window}: closed after only {ended:?}"
    );
    assert!(
        cheap_answers >= 1,
        "window {window}: no cheap request was answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_being_handled_keeps_its_http2_connection_while_other_streams_sit_idle() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    let writer = bearer(&rc.token(Role::Writer, None));
    rc.write(b"earlier", &vec![b'x'; 100_000]).await;
    let mut h2 = H2::connect(&rc).await;
    let started = Instant::now();
    // An answer of several pieces and a small one, taken whole before the
    // uploads: once ended, they must not count against the connection.
    let get = request(
        "GET",
        &rc.at("/v1/kv/earlier"),
        &[("authorization", &writer)],
    );
    let (response, _) = h2.start(get, true).await;
    let (status, body) = H2::answer(response).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 100_000));
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);

    // One upload sits silent after its first bytes, within the body
    // timeout (10 s by default); another trickles its body in over three
    // idle timeouts, a byte every 100 ms.
    let value = b"abcdefghijklmnopqrstuvwxyz0123";
    let length = value.len().to_string();
    let put = |key: &str| {
        request(
            "PUT",
            &rc.at(&format!("/v1/kv/{key}")),
            &[("authorization", &writer), ("content-length", &length)],
        )
    };
    let (silent_response, mut silent_body) = h2.start(put("sitting%2Fidle"), false).await;
    silent_body
        .send_data(Cursor::new(value[..10].to_vec()), false)
        .unwrap();
    let (trickled_response, mut trickled_body) = h2.start(put("sitting%2Fbusy"), false).await;
    for (i, byte) in value.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = i + 1 == value.len();
        trickled_body
            .send_data(Cursor::new(vec![*byte]), last)
            .unwrap();
    }
    assert_eq!(H2::answer(trickled_response).await.0, StatusCode::CREATED);
    silent_body
        .send_data(Cursor::new(value[10..].to_vec()), true)
        .unwrap();
    assert_eq!(H2::answer(silent_response).await.0, StatusCode::CREATED);
    let busy_for = started.elapsed();
    assert!(busy_for >= IDLE * 3, "the uploads took only {busy_for:?}");
    // Had the idle timer fired meanwhile, the router would have sent a
    // GOAWAY, and a new stream would be refused.
    let (response, _) = h2.start(request_get(&rc, "/healthz"), true).await;
    assert_eq!(H2::answer(response).await.0, StatusCode::OK);
    for key in [b"sitting/idle".as_slice(), b"sitting/busy"] {
        assert_eq!(rc.read(key).await.unwrap(), value);
    }
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answers_never_read_do_not_hold_the_connection() {
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    // Answers of 512 KiB: a few fill every buffer between the router
    // and a client that never reads (answers as small as /healthz's take
    // tens of thousands, seconds of work for a debug build).
    rc.write(b"pipelined", &vec![b'x'; 512 << 10]).await;
    let reader = bearer(&rc.token(Role::Reader, None));
    let request = format!(
        "GET /v1/kv/pipelined HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {reader}\r\n\r\n"
    );
    let requests = request.repeat(1000);
    let (mut reader, mut writer) = tokio::io::split(rc.tls_connect(b"http/1.1").await);
    // The answers fill the buffers, then the router stops reading requests
    // and these writes block; once the router drops the connection, they
    // fail.
    let started = Instant::now();
    let writing = async { while writer.write_all(requests.as_bytes()).await.is_ok() {} };
    tokio::pin!(writing);
    // The head of the first answer, then not another read.
    let head = tokio::select! {
        head = read_head(&mut reader) => head,
        () = &mut writing => panic!("closed before the first answer"),
    };
    assert_eq!(head.status, 200, "{head:?}");
    let deadline = IDLE * 2 + SLACK;
    let closed = tokio::time::timeout(deadline.saturating_sub(started.elapsed()), writing).await;
    assert!(
        closed.is_ok(),
        "a client that never reads its answers is still connected after {:?}",
        started.elapsed()
    );
    let closed = started.elapsed();
    assert!(closed >= IDLE / 2, "closed after only {closed:?}");
    rc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_steady_reader_gets_large_answers_whole_and_keeps_its_connection() {
    // Seven answers of 1 MB on one connection, read at 640 KiB/s: eleven
    // seconds, never a pause. Linux reopens a slow reader's TCP window
    // about a receive buffer at a time: with 64 KiB asked for (128 KiB
    // taken), five times a second at this pace. The router's socket, its
    // send buffer grown to about 4 MiB on loopback, must neither hold the
    // next piece back until a third of that buffer has drained (seconds
    // at this pace) nor take in so much that the last answer is handed out
    // seconds before the client can read it: either way the idle timer
    // would end a connection whose client reads all along.
    const RATE: u64 = 640 << 10;
    const RECEIVE_BUFFER: u32 = 64 << 10;
    const VALUES: usize = 7;
    const VALUE_BYTES: usize = 1_000_000;
    let rc = cluster(limits(|l| l.idle_timeout_ms = IDLE.as_millis() as u64)).await;
    let value = vec![b'v'; VALUE_BYTES];
    let keys: Vec<String> = (0..VALUES).map(|i| format!("large%2F{i}")).collect();
    for i in 0..VALUES {
        rc.write(format!("large/{i}").as_bytes(), &value).await;
    }
    let reader = bearer(&rc.token(Role::Reader, None));
    // Twice the time the answers take at the pace, and some.
    let deadline = Duration::from_secs((VALUES * VALUE_BYTES) as u64 * 2 / RATE) + SLACK;
    let connect = |alpn: &'static [u8]| {
        let rc = &rc;
        async move { Paced::new(tls_connect_receiving(rc, alpn, RECEIVE_BUFFER).await, RATE) }
    };

    // HTTP/1.1: the requests pipelined, and one more once every answer has
    // been read, served only if the connection was not found idle (and
    // closed) meanwhile.
    let http1 = async {
        let mut tls = connect(b"http/1.1").await;
        let requests: String = keys
            .iter()
            .map(|key| {
                format!(
                    "GET /v1/kv/{key} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {reader}\r\n\r\n"
                )
            })
            .collect();
        tls.write_all(requests.as_bytes()).await.unwrap();
        let answers: [RawAnswer; VALUES] = read_answers(&mut tls, deadline).await;
        for answer in answers {
            assert_eq!(answer.status, 200, "HTTP/1.1: {:?}", answer.headers);
            assert!(
                answer.body == value,
                "HTTP/1.1: {} bytes",
                answer.body.len()
            );
        }
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let next = read_answer(&mut tls).await;
        assert_eq!(next.status, 200, "HTTP/1.1: {next:?}");
    };
    // HTTP/2: a stream per answer, all at once, and one more opened late
    // (but before the router has handed out its last piece), which a
    // GOAWAY would have refused.
    let http2 = async {
        let tls = connect(b"h2").await;
        // Windows wider than the answers: TCP, not HTTP/2, sets the pace.
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(8 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake::<_, Cursor<Vec<u8>>>(tls)
            .await
            .unwrap();
        let mut h2 = H2 {
            client,
            connection: tokio::spawn(connection),
        };
        // Bytes of the answers received so far, and whether one broke off.
        let received = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let mut answers = tokio::task::JoinSet::new();
        for key in &keys {
            let get = request(
                "GET",
                &rc.at(&format!("/v1/kv/{key}")),
                &[("authorization", &reader)],
            );
            let (response, _) = h2.start(get, true).await;
            let (received, broken) = (Arc::clone(&received), Arc::clone(&broken));
            answers.spawn(async move {
                let answer = async {
                    let response = response.await?;
                    let status = response.status();
                    let mut body = response.into_body();
                    let mut bytes = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk?;
                        let _ = body.flow_control().release_capacity(chunk.len());
                        received.fetch_add(chunk.len(), Ordering::Relaxed);
                        bytes.extend_from_slice(&chunk);
                    }
                    Ok::<_, h2::Error>((status, bytes))
                }
                .await;
                broken.fetch_or(answer.is_err(), Ordering::Relaxed);
                answer
            });
        }
        let read_all = async {
            poll_until("7/8 of the answers read", deadline, || async {
                broken.load(Ordering::Relaxed)
                    || received.load(Ordering::Relaxed) >= VALUES * VALUE_BYTES * 7 / 8
            })
            .await;
            // After an answer broke off, its error tells more.
            let late_stream = if broken.load(Ordering::Relaxed) {
                None
            } else {
                Some(h2.start(request_get(&rc, "/healthz"), true).await.0)
            };
            while let Some(answer) = answers.join_next().await {
                let (status, body) = answer
                    .expect("the reading task does not panic")
                    .unwrap_or_else(|error| panic!("HTTP/2: an answer broke off: {error}"));
                assert_eq!(status, http::StatusCode::OK, "HTTP/2");
                assert!(body == value, "HTTP/2: {} bytes", body.len());
            }
            let late_stream = late_stream.expect("no answer broke off");
            assert_eq!(H2::answer(late_stream).await.0, StatusCode::OK, "HTTP/2");
        };
        tokio::time::timeout(deadline, read_all)
            .await
            .expect("HTTP/2: every answer in time");
    };
    tokio::join!(http1, http2);
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
        answer_then_close(&mut tls, &head, key)
            .await
            .expect_closing_error(408, "request_timeout");
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
async fn a_body_that_goes_silent_after_a_burst_is_answered_408() {
    let body_timeout = Duration::from_millis(500);
    let rc = cluster(limits(|l| {
        l.body_timeout_ms = body_timeout.as_millis() as u64;
        l.body_min_bytes_per_sec = 1000;
    }))
    .await;
    let writer = bearer(&rc.token(Role::Writer, None));
    // 200 KB at once earns 200 s at the minimum rate; then silence. The
    // body must still come on within the body timeout.
    let burst = vec![b'x'; 200_000];
    let mut tls = rc.tls_connect(b"http/1.1").await;
    let head = format!(
        "PUT /v1/kv/banked%2Fh1 HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {writer}\r\n\
         content-length: 1000000\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&burst).await.unwrap();
    let (read, closed) = read_until_closed(&mut tls, body_timeout + SLACK).await;
    assert!(
        closed.is_some(),
        "HTTP/1.1: neither answered nor closed within {:?}: {read:?}",
        body_timeout + SLACK
    );
    RawAnswer::parse(&read).expect_closing_error(408, "request_timeout");

    let mut h2 = H2::connect(&rc).await;
    let put = request(
        "PUT",
        &rc.at("/v1/kv/banked%2Fh2"),
        &[("authorization", &writer), ("content-length", "1000000")],
    );
    let (response, mut body) = h2.start(put, false).await;
    body.send_data(Cursor::new(burst), false).unwrap();
    let (status, answer) = H2::answer(response).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    check_error_body(&serde_json::from_slice(&answer).unwrap(), "request_timeout");
    drop(body);

    for key in ["banked/h1", "banked/h2"] {
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
        answer_then_close(&mut tls, &head, &format!("{method} {path}"))
            .await
            .expect_closing_error(413, "too_large");
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

/// A client that goes on sending a body the router refused from its
/// declared length, as most HTTP/1.1 clients do, still gets its 413: the
/// router closes its side and drops what comes after (a lingering close)
/// rather than resetting the connection under the client's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_a_refused_body_gets_its_413() {
    let rc = cluster(LimitsConfig::default()).await;
    let token = rc.token(Role::Writer, None);
    let client = rc.new_client(Protocol::Http11);
    // Far more than the sockets between them hold.
    let body = vec![b'x'; 8 << 20];
    for round in 0..5 {
        let answer = client
            .put(rc.at(&format!("/v1/kv/big%2Fsent-{round}")))
            .bearer_auth(&token)
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: no answer: {e:?}"));
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        check_error_body(&answer.json().await.unwrap(), "too_large");
    }
    drop(client);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_lock_the_metrics_listener_for_seconds_only() {
    // The HTTPS listener keeps its default idle timeout (60 s): the
    // metrics listener must not inherit it.
    let rc = RestCluster::start_with(RestOptions {
        nodes: 1,
        separate_metrics: true,
        ..RestOptions::default()
    })
    .await;
    let metrics = rc.metrics_url().expect("the router has a metrics listener");
    let addr = metrics.trim_start_matches("http://").to_string();
    // Every connection the listener serves, silent, ahead of the scraper
    // in the accept queue.
    let mut silent = Vec::new();
    for _ in 0..caskade_router::METRICS_MAX_CONNECTIONS {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let deadline = caskade_router::METRICS_IDLE_TIMEOUT + SLACK;
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let scraped = plain
        .get(format!("{metrics}/metrics"))
        .timeout(deadline)
        .send()
        .await
        .unwrap_or_else(|error| {
            panic!("silent connections locked the scraper out for {deadline:?}: {error}")
        });
    assert_eq!(scraped.status(), StatusCode::OK);
    drop(silent);
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
    let not_allowed = (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let not_a_node_id = (StatusCode::BAD_REQUEST, "invalid_argument");
    let long_key = "k".repeat(256);
    // (method, path, Idempotency-Key, the answer with a valid token): wrong
    // methods; requests a handler refuses for their form (a node id that is
    // not UTF-8, an Idempotency-Key too long); a route that does not exist.
    let probes = [
        (patch.clone(), "/v1/kv", None, not_allowed),
        (Method::DELETE, "/v1/kv", None, not_allowed),
        (Method::GET, "/v1/batch", None, not_allowed),
        (Method::PUT, "/v1/batch", None, not_allowed),
        (Method::GET, "/admin/v1/nodes", None, not_allowed),
        (Method::PUT, "/admin/v1/cluster", None, not_allowed),
        (Method::GET, "/admin/v1/nodes/1/merge", None, not_allowed),
        (patch, "/admin/v1/nodes/1", None, not_allowed),
        (
            Method::POST,
            "/admin/v1/nodes/%FF/merge",
            None,
            not_a_node_id,
        ),
        (
            Method::POST,
            "/admin/v1/nodes/%FF/backup",
            None,
            not_a_node_id,
        ),
        (Method::DELETE, "/admin/v1/nodes/%FF", None, not_a_node_id),
        (
            Method::PUT,
            "/v1/kv/probe",
            Some(long_key.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_header"),
        ),
        (
            Method::GET,
            "/v1/no-such-route",
            None,
            (StatusCode::NOT_FOUND, "not_found"),
        ),
    ];
    for protocol in Protocol::BOTH {
        let api = rc.api_on(rc.client(protocol).clone(), protocol, None);
        let authenticated = rc.api(protocol, &admin);
        for (method, path, idempotency_key, (status, code)) in &probes {
            let with_key = |request: reqwest::RequestBuilder| match idempotency_key {
                Some(key) => request.header("idempotency-key", *key),
                None => request,
            };
            // Without a valid token: the same 401 as for any route.
            for token in [None, Some("not-a-jwt"), Some(empty_prefix.as_str())] {
                let request = with_key(api.request(method.clone(), path));
                let request = match token {
                    Some(token) => request.header(AUTHORIZATION, bearer(token)),
                    None => request,
                };
                let response = api.send(request).await;
                let what = format!("{protocol:?} {method} {path} with {token:?}");
                assert_eq!(response.headers().get(ALLOW), None, "{what}");
                expect_error(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
            }
            // With one, the client learns what is wrong (and the methods).
            let response = authenticated
                .send(with_key(authenticated.request(method.clone(), path)))
                .await;
            assert_eq!(
                response.headers().contains_key(ALLOW),
                *status == StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            expect_error(response, *status, code).await;
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
    assert_eq!(rc.read(b"probe").await, None, "a refused PUT wrote");
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
