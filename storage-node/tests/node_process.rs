//! The `caskade-node` binary as an operator runs it: a child process started
//! from a TOML file, spoken to over mutual TLS on a loopback port the OS
//! chose, and read through its stderr logs.
//!
//! A caller's `x-request-id`, or else a generated 16-hex-digit id, is on the
//! request's log line. SIGTERM in the middle of a write load stops the node
//! promptly with exit code 0 after "shutting down" and "engine closed": every
//! call the node started it finished with OK and its answer reached the client,
//! every other call failed in the client's transport (none hung), and every
//! write acknowledged under `always` reads back after a restart on the same
//! directory, which opens without cutting a torn tail. A bad configuration
//! exits with code 2, names the offending field and creates nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caskade_common::certs::ClusterCertFiles;
use caskade_common::config::TlsFiles;
use caskade_proto::kv_client::KvClient;
use caskade_proto::{GetRequest, PutRequest};
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

/// Covers a cold start of a debug build on a busy two-core machine.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// For one log line or one request once the node is up.
const STEP_DEADLINE: Duration = Duration::from_secs(10);
/// From SIGTERM to exit. Shorter than the node's 30 s shutdown grace, so a
/// request that hangs fails the test instead of being cut off by the grace.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

const WRITERS: usize = 32;
const PUTS_PER_WRITER: usize = 500;
const ACKS_BEFORE_SIGTERM: usize = 200;
/// Concurrent readers when checking the acknowledged keys after the restart.
const READERS: usize = 8;

/// A `caskade-node` child process and the lines of its stderr. Dropping it
/// kills and reaps the process, so a failing test leaves nothing running.
struct NodeProcess {
    child: Child,
    /// Fed by a thread reading the pipe; closed at the child's exit.
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line received so far.
    seen: Vec<String>,
}

impl NodeProcess {
    fn spawn(config: &Path) -> NodeProcess {
        // A clear environment: `CASKADE_NODE_*` would override the file and
        // `RUST_LOG` would override `log.level`.
        let mut child = Command::new(env!("CARGO_BIN_EXE_caskade-node"))
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        NodeProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// The first line, already seen or still to come, for which `wanted`
    /// returns `Some`; fails the test after `deadline` or at end of stderr.
    async fn wait_for_line<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        wanted: impl Fn(&str) -> Option<T>,
    ) -> T {
        if let Some(found) = self.seen.iter().find_map(|line| wanted(line)) {
            return found;
        }
        let until = Instant::now() + deadline;
        loop {
            match tokio::time::timeout_at(until, self.lines.recv()).await {
                Ok(Some(line)) => {
                    let found = wanted(&line);
                    self.seen.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Ok(None) => panic!("the node's stderr ended before {what}"),
                Err(_) => panic!("no {what} within {deadline:?}"),
            }
        }
    }

    /// Waits for the "serving" line and returns the gRPC address it names.
    async fn grpc_addr(&mut self) -> SocketAddr {
        self.wait_for_line("\"serving\" line", START_DEADLINE, |line| {
            if string_field(line, "message")? != "serving" {
                return None;
            }
            string_field(line, "grpc")?.parse().ok()
        })
        .await
    }

    /// Waits for the process to exit, then for the rest of its stderr.
    async fn exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = support::eventually(deadline, "the node to exit", || {
            std::future::ready(child.try_wait().unwrap())
        })
        .await;
        let until = Instant::now() + STEP_DEADLINE;
        loop {
            match tokio::time::timeout_at(until, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => return status,
                Err(_) => panic!("stderr still open {STEP_DEADLINE:?} after the node exited"),
            }
        }
    }

    /// SIGTERM, as a service manager stops the node, then waits for the exit.
    async fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed: {sent}");
        self.exit(EXIT_DEADLINE).await
    }

    fn stderr(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            let tail = self.seen.len().saturating_sub(60);
            eprintln!(
                "--- last stderr lines of caskade-node ---\n{}",
                self.seen[tail..].join("\n")
            );
        }
    }
}

/// The first string value named `name` in a JSON log line, which
/// tracing-subscriber writes compactly (`"name":"value"`). Enough for the
/// values read here (messages, addresses, ids, method names), which contain
/// no quote or escape; it spares the suite a JSON parser.
fn string_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = line.find(&key)? + key.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// A throw-away directory with the cluster's certificates.
struct Cluster {
    dir: tempfile::TempDir,
    certs: ClusterCertFiles,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = support::certs(dir.path());
        Cluster { dir, certs }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The text of a valid node 1 configuration on `127.0.0.1:0`.
    fn config_text(&self, durability: &str, log_format: &str, log_level: &str) -> String {
        let TlsFiles { ca, cert, key } = &self.certs.nodes[0];
        format!(
            "id = 1\n\
             listen = \"127.0.0.1:0\"\n\
             data_dir = {data_dir}\n\
             [tls]\n\
             ca = {ca}\n\
             cert = {cert}\n\
             key = {key}\n\
             [cluster]\n\
             standalone = true\n\
             [engine]\n\
             durability = \"{durability}\"\n\
             [log]\n\
             format = \"{log_format}\"\n\
             level = \"{log_level}\"\n",
            data_dir = toml_path(&self.data_dir()),
            ca = toml_path(ca),
            cert = toml_path(cert),
            key = toml_path(key),
        )
    }

    fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn kv_client(&self, addr: SocketAddr) -> KvClient<Channel> {
        let channel = support::channel(addr, &self.certs.ca, Some(&self.certs.client))
            .await
            .unwrap();
        KvClient::new(channel)
    }
}

/// A TOML literal string: no escapes, so any path without `'` is written as is.
fn toml_path(path: &Path) -> String {
    let path = path.to_str().unwrap();
    assert!(
        !path.contains('\''),
        "path {path:?} cannot be a TOML literal"
    );
    format!("'{path}'")
}

fn put_request(key: &str) -> PutRequest {
    PutRequest {
        key: Bytes::from(key.as_bytes().to_vec()),
        value: value_of(key),
        ttl_ms: 0,
        condition: None,
        write_level: 0,
    }
}

/// The value written under `key`, so a read can tell it from another key's.
fn value_of(key: &str) -> Bytes {
    Bytes::from(format!("value of {key};").repeat(4))
}

/// The debug event the node logs as each call ends. `method` and
/// `request_id` come from the request's span, which JSON logs carry on every
/// event inside it.
#[derive(Debug)]
struct RequestDone<'a> {
    method: &'a str,
    request_id: &'a str,
    code: &'a str,
}

fn request_done(line: &str) -> Option<RequestDone<'_>> {
    if string_field(line, "message")? != "request done" {
        return None;
    }
    Some(RequestDone {
        method: string_field(line, "method")?,
        request_id: string_field(line, "request_id")?,
        code: string_field(line, "code")?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_reach_the_node_logs() {
    let cluster = Cluster::new();
    let config = cluster.write_config(&cluster.config_text("never", "json", "debug"));
    let mut node = NodeProcess::spawn(&config);
    let addr = node.grpc_addr().await;
    let mut kv = cluster.kv_client(addr).await;

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let request_id = format!("test-req-{}-{nanos}", std::process::id());
    let mut put = tonic::Request::new(put_request("traced"));
    put.metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    kv.put(put).await.unwrap();
    let code = node
        .wait_for_line(
            "the Put's line with the caller's request id",
            STEP_DEADLINE,
            |line| {
                let done = request_done(line)?;
                (done.method == "Put" && done.request_id == request_id)
                    .then(|| done.code.to_owned())
            },
        )
        .await;
    assert_eq!(code, "OK");

    // The only Get of the test, so its line is the one of this untagged call.
    let got = kv
        .get(GetRequest {
            key: Bytes::from_static(b"traced"),
            read_level: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    let generated = node
        .wait_for_line("the Get's line", STEP_DEADLINE, |line| {
            let done = request_done(line)?;
            (done.method == "Get").then(|| done.request_id.to_owned())
        })
        .await;
    assert!(
        generated.len() == 16
            && generated
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "generated request id {generated:?} is not 16 hex digits"
    );

    let status = node.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// Whether `status` was made by the client's transport because the
/// connection went away, rather than sent by the node as its answer. The code
/// does not tell: tonic says `Unavailable` when nothing listens any more,
/// `Cancelled` for a call queued on a connection that closed, `Internal` for a
/// stream refused by a graceful GOAWAY (grpc-rust#612) and `Unknown` for one
/// written to a socket the node had just closed. The source does.
fn is_transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|source| source.is::<tonic::transport::Error>())
}

/// What one writer saw.
struct WriterReport {
    acked: Vec<String>,
    /// The status that ended the writer early, after SIGTERM.
    refused: Option<Status>,
}

/// Puts `k-{writer}-{i}` in order until the node refuses one or the cap is
/// reached. A refusal before SIGTERM or a Put that hangs fails the test.
async fn write_until_refused(
    mut kv: KvClient<Channel>,
    writer: usize,
    acked_total: Arc<AtomicUsize>,
    terminated: Arc<AtomicBool>,
) -> WriterReport {
    let mut acked = Vec::new();
    for i in 0..PUTS_PER_WRITER {
        let key = format!("k-{writer}-{i}");
        let outcome = tokio::time::timeout(EXIT_DEADLINE, kv.put(put_request(&key)))
            .await
            .unwrap_or_else(|_| panic!("Put {key} hung for {EXIT_DEADLINE:?}"));
        match outcome {
            Ok(_) => {
                acked.push(key);
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                assert!(
                    terminated.load(Ordering::SeqCst),
                    "Put {key} failed before SIGTERM: {status:?}"
                );
                return WriterReport {
                    acked,
                    refused: Some(status),
                };
            }
        }
    }
    WriterReport {
        acked,
        refused: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_keeps_acknowledged_writes() {
    let cluster = Cluster::new();
    // The node's own debug events count the calls it finished; the
    // libraries' stay at info.
    let config_text = cluster.config_text("always", "json", "caskade_node=debug,info");
    let config = cluster.write_config(&config_text);
    let mut node = NodeProcess::spawn(&config);
    let addr = node.grpc_addr().await;

    // Several connections, so shutdown has to drain more than one.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(cluster.kv_client(addr).await);
    }
    let acked_total = Arc::new(AtomicUsize::new(0));
    let terminated = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            tokio::spawn(write_until_refused(
                clients[writer % clients.len()].clone(),
                writer,
                Arc::clone(&acked_total),
                Arc::clone(&terminated),
            ))
        })
        .collect();

    support::eventually(START_DEADLINE, "acknowledged puts before SIGTERM", || {
        std::future::ready(
            (acked_total.load(Ordering::Relaxed) >= ACKS_BEFORE_SIGTERM).then_some(()),
        )
    })
    .await;
    // Set before the signal, so any refusal it causes finds it set.
    terminated.store(true, Ordering::SeqCst);
    let status = node.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status}");

    let mut acked = Vec::new();
    let mut refusals = Vec::new();
    let until = Instant::now() + STEP_DEADLINE;
    for writer in writers {
        let report = tokio::time::timeout_at(until, writer)
            .await
            .expect("writers end once the node is gone")
            .unwrap();
        acked.extend(report.acked);
        refusals.extend(report.refused);
    }
    assert!(
        !refusals.is_empty(),
        "every writer finished before SIGTERM took effect; the load was not cut"
    );
    for status in &refusals {
        assert!(
            is_transport_failure(status),
            "the node answered a Put at shutdown with {status:?}"
        );
    }
    let log = node.stderr();
    for message in ["shutting down", "engine closed"] {
        assert!(log.contains(message), "no {message:?} in the log:\n{log}");
    }
    // Graceful means every request the node started it finished, and every
    // answer reached the client: as many successful Puts in the node's log as
    // acknowledgements in the writers, and no call cancelled or failed.
    let finished: Vec<_> = node
        .seen
        .iter()
        .filter_map(|line| request_done(line))
        .filter(|done| done.method == "Put")
        .collect();
    let not_ok: Vec<_> = finished.iter().filter(|done| done.code != "OK").collect();
    assert!(not_ok.is_empty(), "Puts that did not succeed: {not_ok:?}");
    assert!(!log.contains("request failed"), "{log}");
    assert_eq!(
        finished.len(),
        acked.len(),
        "Puts the node finished vs Puts acknowledged to the writers"
    );
    assert!(
        !log.contains("grace period over"),
        "in-flight requests outlived the grace period:\n{log}"
    );
    drop(node);

    let mut node = NodeProcess::spawn(&config);
    let addr = node.grpc_addr().await;
    let reopened = node.stderr();
    assert!(
        !reopened.contains("torn"),
        "the store was not closed cleanly:\n{reopened}"
    );
    let kv = cluster.kv_client(addr).await;
    let acked = Arc::new(acked);
    let readers: Vec<_> = (0..READERS)
        .map(|reader| {
            let (mut kv, acked) = (kv.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                for key in acked.iter().skip(reader).step_by(READERS) {
                    let got = kv
                        .get(GetRequest {
                            key: Bytes::from(key.as_bytes().to_vec()),
                            read_level: 0,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(got.found, "acknowledged key {key} lost");
                    assert!(got.value == value_of(key), "{key} has a wrong value");
                }
            })
        })
        .collect();
    let until = Instant::now() + EXIT_DEADLINE;
    for reader in readers {
        tokio::time::timeout_at(until, reader)
            .await
            .expect("reading back the acknowledged keys")
            .unwrap();
    }

    let status = node.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// Runs the node on `config_text`, which must be refused.
async fn refused_config(cluster: &Cluster, config_text: &str) -> String {
    let config = cluster.write_config(config_text);
    let mut node = NodeProcess::spawn(&config);
    let status = node.exit(START_DEADLINE).await;
    let stderr = node.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("caskade-node: "), "{stderr}");
    assert!(
        !cluster.data_dir().exists(),
        "a refused configuration created the data directory"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_names_its_field_and_exits_with_code_2() {
    let cluster = Cluster::new();
    let valid = cluster.config_text("always", "text", "info");

    let bad_value = valid.replace("durability = \"always\"", "durability = \"sometimes\"");
    let stderr = refused_config(&cluster, &bad_value).await;
    assert!(
        stderr.contains("engine.durability") && stderr.contains("sometimes"),
        "{stderr}"
    );

    let missing = valid.replace("id = 1\n", "");
    assert_ne!(missing, valid);
    let stderr = refused_config(&cluster, &missing).await;
    assert!(stderr.contains("`id`"), "{stderr}");

    let typo = valid.replace("listen =", "listne =");
    let stderr = refused_config(&cluster, &typo).await;
    assert!(stderr.contains("`listne`"), "{stderr}");
}

/// A node whose log cannot be written (its stderr is `/dev/full`, as when
/// the disk under its log fills up) serves on: a log line that cannot be
/// written is dropped. (The log library's fallback, printing its own
/// error to that same stderr, panicked whichever task was logging: a node
/// whose log disk filled lost its pullers and anti-entropy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_cannot_be_written_serves_on() {
    let cluster = Cluster::new();
    // The node cannot say where it listens: it gets a port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = cluster
        .config_text("never", "json", "debug")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = cluster.write_config(&text);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_caskade-node"))
        .arg("--config")
        .arg(&config)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    let mut node = Reaped(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut kv = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            panic!("the node exited with {status} before serving");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break cluster.kv_client(addr).await;
        }
        assert!(
            started.elapsed() < START_DEADLINE,
            "the node never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Every request logs a line (at debug) that cannot be written.
    for n in 0..50 {
        let key = format!("unlogged-{n}");
        kv.put(put_request(&key)).await.unwrap();
        let got = kv
            .get(GetRequest {
                key: key.clone().into_bytes().into(),
                ..GetRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, value_of(&key));
    }
    assert!(node.0.try_wait().unwrap().is_none(), "the node exited");
}

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
