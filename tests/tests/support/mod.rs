//! The REST harness: a `caskade local` cluster (three storage nodes and a
//! router, real mutual-TLS gRPC and real HTTPS on ports the OS picks) in a
//! temporary directory, HTTP/2 and HTTP/1.1 clients that trust only its CA,
//! tokens signed with its secret, and the checks every REST suite repeats.
//!
//! What the store holds is checked through the REST API with an admin
//! token, never through a back door, so "nothing was written" means what a
//! client would see.

use std::net::SocketAddr;
use std::time::Duration;

use caskade_cli::local::{LocalCluster, LocalOptions};
use caskade_common::tls::TlsMaterial;
use caskade_node::config::{DurabilityMode, EngineConfig};
use caskade_router::auth::{Role, TokenRequest, issue_hs256, load_hs256_secret};
use caskade_router::config::{LimitsConfig, NodePolicy};
use reqwest::{Body, Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// How long the router may take to adopt the cluster map and see every node ready.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Lifetime of the tokens the tests mint.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Bounds a paging loop, so a cursor that never ends fails instead of hanging.
#[allow(dead_code, reason = "used by `list_all`, which not every suite calls")]
const MAX_PAGES: usize = 1000;
/// How long a raw connection may stay open after the request was sent.
const RAW_READ_DEADLINE: Duration = Duration::from_secs(10);
/// Nodes of a test cluster unless the suite asks for another number.
const NODES: u32 = 3;

/// What a suite may change in the cluster it starts.
#[derive(Debug, Clone)]
pub struct RestOptions {
    /// Storage nodes (default 3).
    pub nodes: u32,
    /// The router's connection and request limits (default: the router's defaults).
    pub router_limits: LimitsConfig,
    /// Serve the router's `/metrics` on a plain-HTTP listener of its own
    /// (on a port the OS picks) instead of its HTTPS listener.
    pub separate_metrics: bool,
}

impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            nodes: NODES,
            router_limits: LimitsConfig::default(),
            separate_metrics: false,
        }
    }
}

/// Which HTTP version a client speaks to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2, chosen by ALPN (reqwest's default over TLS).
    Http2,
    /// HTTP/1.1 only.
    Http11,
}

impl Protocol {
    /// Both, HTTP/2 first.
    pub const BOTH: [Protocol; 2] = [Protocol::Http2, Protocol::Http11];

    /// The version every response on such a client must carry.
    pub fn version(self) -> reqwest::Version {
        match self {
            Protocol::Http2 => reqwest::Version::HTTP_2,
            Protocol::Http11 => reqwest::Version::HTTP_11,
        }
    }
}

/// A running cluster and what a client needs to talk to it.
#[derive(Debug)]
pub struct RestCluster {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    h2: Client,
    h1: Client,
    admin: String,
    secret: Vec<u8>,
    ca_pem: Vec<u8>,
    cluster: LocalCluster,
    _dir: TempDir,
}

impl RestCluster {
    /// Starts three nodes and a router, and waits until the router sees
    /// every node ready.
    ///
    /// `/readyz` turns 200 as soon as every key range has one ready replica;
    /// the tests wait for all of them, so that no key is written to a
    /// fallback replica and then read from its primary.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub async fn start() -> RestCluster {
        RestCluster::start_with(RestOptions::default()).await
    }

    /// Starts a cluster as `options` say, and waits until the router sees
    /// every node ready.
    pub async fn start_with(options: RestOptions) -> RestCluster {
        caskade_common::tls::install_crypto_provider();
        let nodes = options.nodes;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cluster = LocalCluster::start(LocalOptions {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("a literal socket address"),
            nodes,
            engine: EngineConfig {
                durability: DurabilityMode::Never,
                ..EngineConfig::default()
            },
            node_policy: NodePolicy::default(),
            replication_factor: None,
            router_limits: options.router_limits,
            router_metrics_listen: options
                .separate_metrics
                .then(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        })
        .await
        .expect("the local cluster starts");
        let ca_pem = std::fs::read(&cluster.certs.ca).expect("the cluster CA is readable");
        let secret = load_hs256_secret(&cluster.secret_file).expect("the HS256 secret loads");
        let this = RestCluster {
            url: cluster.url.clone(),
            h2: client(&ca_pem, Protocol::Http2),
            h1: client(&ca_pem, Protocol::Http11),
            admin: cluster.admin_token.clone(),
            secret,
            ca_pem,
            cluster,
            _dir: dir,
        };
        let readyz = this.at("/readyz");
        poll_until(
            "the router to see every node ready",
            READY_DEADLINE,
            || async {
                let Ok(response) = this.h2.get(&readyz).send().await else {
                    return false;
                };
                let ready = response.status() == StatusCode::OK;
                let body: Value = response.json().await.unwrap_or_default();
                ready && body["nodes_ready"] == nodes
            },
        )
        .await;
        this
    }

    /// Stops the router and the nodes, gracefully.
    pub async fn stop(self) {
        // Idle keep-alive connections would otherwise hold the router's
        // graceful shutdown for its grace period.
        drop(self.h1);
        drop(self.h2);
        self.cluster
            .stop()
            .await
            .expect("the cluster stops cleanly");
    }

    /// A new client with connections of its own, trusting only the cluster CA.
    pub fn new_client(&self, protocol: Protocol) -> Client {
        client(&self.ca_pem, protocol)
    }

    /// The shared client for `protocol`.
    pub fn client(&self, protocol: Protocol) -> &Client {
        match protocol {
            Protocol::Http2 => &self.h2,
            Protocol::Http11 => &self.h1,
        }
    }

    /// `http://ADDR` of the router's own `/metrics` listener, when it has one.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub fn metrics_url(&self) -> Option<String> {
        self.cluster
            .router_metrics_addr
            .map(|addr| format!("http://{addr}"))
    }

    /// A TLS connection of its own to the router, offering `alpn` (e.g.
    /// `http/1.1` or `h2`), handshake done and nothing sent.
    pub async fn tls_connect(&self, alpn: &[u8]) -> TlsStream<TcpStream> {
        self.tls_dialer(alpn).connect().await
    }

    /// What a task of its own needs to open TLS connections to the router,
    /// offering `alpn`.
    pub fn tls_dialer(&self, alpn: &[u8]) -> TlsDialer {
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            TlsMaterial::load(&self.cluster.certs.client).expect("the client certificates load");
        for cert in ca.ca_certs() {
            roots
                .add(cert.clone())
                .expect("the cluster CA is a usable root");
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsDialer {
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            addr: self.url.trim_start_matches("https://").to_string(),
        }
    }

    /// Sends `request` (raw HTTP/1.1) over a TLS connection of its own and
    /// returns everything the router answered before closing.
    ///
    /// Unlike an HTTP client, this keeps reading when writing fails: a
    /// server that refuses a request before reading all of it (431, 413)
    /// closes while the client may still be writing, and hyper's client then
    /// reports the broken pipe instead of the answer already received.
    pub async fn raw_http1(&self, request: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = self.tls_connect(b"http/1.1").await;
        let _ = async {
            tls.write_all(request).await?;
            tls.flush().await
        }
        .await;
        let mut answer = Vec::new();
        // Stops at the end of the stream or at the reset that follows it.
        let read = tokio::time::timeout(RAW_READ_DEADLINE, async {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = tls.read(&mut chunk).await {
                answer.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "the router neither answered nor closed within {RAW_READ_DEADLINE:?}"
        );
        answer
    }

    /// The HS256 secret the router verifies tokens with.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// A valid token for `role`, optionally scoped to keys starting with `prefix`.
    pub fn token(&self, role: Role, prefix: Option<&str>) -> String {
        issue_hs256(
            &self.secret,
            &TokenRequest {
                subject: "router-rest-test",
                role,
                prefix,
                ttl: TOKEN_TTL,
                issuer: None,
                audience: None,
                kid: None,
            },
        )
        .expect("the cluster's secret signs tokens")
    }

    /// The API over the shared `protocol` client, with `Authorization: Bearer <token>`.
    pub fn api(&self, protocol: Protocol, token: &str) -> Api {
        self.api_on(self.client(protocol).clone(), protocol, Some(token))
    }

    /// The API over `client` (which speaks `protocol`), with `token` if any.
    pub fn api_on(&self, client: Client, protocol: Protocol, token: Option<&str>) -> Api {
        Api {
            client,
            url: self.url.clone(),
            token: token.map(str::to_string),
            protocol,
        }
    }

    /// `{url}{path_and_query}`.
    pub fn at(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.url)
    }

    fn admin(&self) -> Api {
        self.api(Protocol::Http2, &self.admin)
    }

    /// The value of `key` as an admin reads it, `None` when absent.
    pub async fn read(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.read_versioned(key).await.map(|(value, _)| value)
    }

    /// The value of `key` and its ETag as an admin reads them, `None` when absent.
    pub async fn read_versioned(&self, key: &[u8]) -> Option<(Vec<u8>, String)> {
        let response = self.admin().get(key).await;
        match response.status() {
            StatusCode::OK => {
                let version = etag(&response);
                Some((
                    response.bytes().await.expect("a GET body").to_vec(),
                    version,
                ))
            }
            StatusCode::NOT_FOUND => {
                expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
                None
            }
            other => panic!("GET {} answered {other}", String::from_utf8_lossy(key)),
        }
    }

    /// Writes `value` under `key` as an admin and returns the ETag.
    pub async fn write(&self, key: &[u8], value: &[u8]) -> String {
        let response = self.admin().put(key, value.to_vec()).await;
        assert!(
            matches!(response.status(), StatusCode::CREATED | StatusCode::OK),
            "PUT {} answered {}",
            String::from_utf8_lossy(key),
            response.status()
        );
        etag(&response)
    }

    /// Every key under `prefix`, as an admin pages through them `limit` at a time.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub async fn list_all(&self, prefix: &str, limit: usize) -> Vec<String> {
        let admin = self.admin();
        let mut keys = Vec::new();
        let mut after = String::new();
        for _ in 0..MAX_PAGES {
            let query = format!(
                "prefix={}&limit={limit}&after={}",
                encode(prefix.as_bytes()),
                encode(after.as_bytes())
            );
            let response = admin.list(&query).await;
            assert_eq!(response.status(), StatusCode::OK, "listing {prefix:?}");
            let page: Value = response.json().await.expect("a JSON page");
            let page_keys = page["keys"].as_array().expect("keys is an array");
            assert!(page_keys.len() <= limit, "a page holds at most limit keys");
            keys.extend(
                page_keys
                    .iter()
                    .map(|k| k.as_str().expect("keys are strings").to_string()),
            );
            match &page["next"] {
                Value::Null => return keys,
                Value::String(next) => after = next.clone(),
                other => panic!("next is neither null nor a string: {other}"),
            }
        }
        panic!("listing {prefix:?} did not end within {MAX_PAGES} pages");
    }
}

/// Opens TLS connections to the router; see [`RestCluster::tls_dialer`].
#[derive(Clone)]
pub struct TlsDialer {
    connector: tokio_rustls::TlsConnector,
    addr: String,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TlsDialer {
    /// A new connection, handshake done and nothing sent.
    pub async fn connect(&self) -> TlsStream<TcpStream> {
        self.handshake(self.tcp().await).await
    }

    /// A new TCP connection to the router, without TLS yet.
    pub async fn tcp(&self) -> TcpStream {
        TcpStream::connect(&self.addr)
            .await
            .expect("the router accepts")
    }

    /// The client's side of a TLS handshake on `tcp`.
    pub async fn handshake(&self, tcp: TcpStream) -> TlsStream<TcpStream> {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an IP server name");
        self.connector
            .connect(name, tcp)
            .await
            .expect("the TLS handshake succeeds")
    }
}

/// The REST API as one client with one token sees it. Every response is
/// checked to come over the client's protocol.
#[derive(Debug, Clone)]
pub struct Api {
    client: Client,
    url: String,
    token: Option<String>,
    protocol: Protocol,
}

impl Api {
    /// A request to `path_and_query`, authorized with the token.
    pub fn request(&self, method: Method, path_and_query: &str) -> RequestBuilder {
        let request = self
            .client
            .request(method, format!("{}{path_and_query}", self.url));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request` (built by [`Api::request`]) and checks the protocol.
    pub async fn send(&self, request: RequestBuilder) -> Response {
        let response = request.send().await.expect("the router answers");
        assert_eq!(
            response.version(),
            self.protocol.version(),
            "{}",
            response.url()
        );
        response
    }

    /// `GET /v1/kv/{key}`.
    pub async fn get(&self, key: &[u8]) -> Response {
        self.send(self.request(Method::GET, &kv_path(key))).await
    }

    /// `PUT /v1/kv/{key}` with `value`.
    pub async fn put(&self, key: &[u8], value: impl Into<Body>) -> Response {
        self.send(self.request(Method::PUT, &kv_path(key)).body(value))
            .await
    }

    /// `DELETE /v1/kv/{key}`.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub async fn delete(&self, key: &[u8]) -> Response {
        self.send(self.request(Method::DELETE, &kv_path(key))).await
    }

    /// `GET /v1/kv?{query}`.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub async fn list(&self, query: &str) -> Response {
        self.send(self.request(Method::GET, &format!("/v1/kv?{query}")))
            .await
    }

    /// `POST /v1/batch` with `body` as JSON.
    #[allow(dead_code, reason = "not every suite uses it")]
    pub async fn batch(&self, body: &Value) -> Response {
        self.send(self.request(Method::POST, "/v1/batch").json(body))
            .await
    }
}

fn client(ca_pem: &[u8], protocol: Protocol) -> Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("the cluster CA is PEM");
    let builder = Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .timeout(Duration::from_secs(30));
    let builder = match protocol {
        Protocol::Http2 => builder,
        Protocol::Http11 => builder.http1_only(),
    };
    builder.build().expect("the HTTPS client builds")
}

/// `/v1/kv/{key}`, the key percent-encoded.
pub fn kv_path(key: &[u8]) -> String {
    format!("/v1/kv/{}", encode(key))
}

/// Percent-encodes every byte that is not unreserved (RFC 3986), `/` included.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The response's ETag, checked to be `"<hlc>-<origin>"` (both decimal).
pub fn etag(response: &Response) -> String {
    let value = response
        .headers()
        .get(reqwest::header::ETAG)
        .expect("the response has an ETag")
        .to_str()
        .expect("the ETag is text")
        .to_string();
    assert!(
        is_version_etag(&value),
        "ETag {value:?} is not \"<hlc>-<origin>\""
    );
    value
}

/// Whether `value` is `"<digits>-<digits>"`, quotes included.
pub fn is_version_etag(value: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.split_once('-'))
        .is_some_and(|(hlc, origin)| digits(hlc) && digits(origin))
}

/// Checks an error answer: `status`, JSON, and a body that is exactly
/// `{"error": {"code": code, "message": <non-empty text>}}`. Returns the body.
pub async fn expect_error(response: Response, status: StatusCode, code: &str) -> Value {
    let what = format!("{} {}", response.url(), response.status());
    assert_eq!(response.status(), status, "{what}");
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: error content-type is {content_type:?}"
    );
    let body: Value = response.json().await.expect("an error body is JSON");
    check_error_body(&body, code);
    body
}

/// Checks `body` is exactly `{"error": {"code": code, "message": <non-empty text>}}`.
pub fn check_error_body(body: &Value, code: &str) {
    let outer = body.as_object().expect("the error body is an object");
    assert_eq!(outer.len(), 1, "only `error` at the top: {body}");
    let error = body["error"].as_object().expect("`error` is an object");
    assert_eq!(error.len(), 2, "only code and message: {body}");
    assert_eq!(body["error"]["code"], code, "error code of {body}");
    let message = body["error"]["message"].as_str().expect("message is text");
    assert!(!message.is_empty(), "the message is not empty: {body}");
}

pub use caskade_tests::cluster::poll_until;
