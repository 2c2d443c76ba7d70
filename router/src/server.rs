//! Serving the HTTP application: HTTPS with rustls (HTTP/2 and HTTP/1.1 by
//! ALPN), or plain HTTP (`insecure_http`, and the `/metrics` listener).
//!
//! The accept loop holds one permit of a semaphore per open connection, so
//! at most `max_connections` are served; more wait in the kernel's backlog.
//! No client may keep a permit for free: TLS handshakes are bounded by a
//! timeout, in each connection's own task (never in the accept loop);
//! HTTP/1.1 request heads by `header_timeout_ms`; a connection that has
//! done nothing for its client for `idle_timeout_ms` ([`idle`]: no request
//! being handled, no answer taken) is asked to close, and dropped if it
//! then does nothing for `close_timeout`, since a client that takes no
//! answer takes no GOAWAY or last bytes either. Slow request bodies are
//! bounded by the application ([`request_body`]). On shutdown the listener
//! closes and open connections are asked to finish (GOAWAY / `Connection:
//! close`); they get `grace` to do so.
//!
//! [`idle`]: crate::idle
//! [`request_body`]: crate::request_body

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::idle::{Activity, TrackActivity};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections, and how long an answer may take:
/// a peer that has gone away frees its connection slot.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams an HTTP/2 client may reset before the router has accepted them
/// (h2's default, made explicit): past it the connection ends with
/// ENHANCE_YOUR_CALM, the defence against "rapid reset" (CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// The longest an idle connection may do nothing while asked to close.
const MAX_CLOSE_TIME: Duration = Duration::from_secs(5);

/// How long a connection found idle after `idle_timeout` may then do
/// nothing while it closes gracefully (an HTTP/2 GOAWAY and its ping, the
/// last bytes written, TLS `close_notify`) before it is dropped: as long
/// again, at most [`MAX_CLOSE_TIME`].
fn close_timeout(idle_timeout: Duration) -> Duration {
    idle_timeout.min(MAX_CLOSE_TIME)
}

/// A client connection, TLS or plain.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Serves `app` on `listener` with `limits` until `shutdown` resolves, then
/// waits up to `grace` for open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limits: &LimitsConfig,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let builder = Arc::new(connection_builder(limits));
    let idle_timeout = limits.idle_timeout();
    // Tells every connection to finish (a graceful shutdown of its own).
    let (stop, stopping) = watch::channel(false);
    // Every connection's task, so that the ones still open after the grace
    // period can be ended.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // The idle clock starts at accept: the handshake counts as idle time.
        let activity = Activity::new();
        let service =
            TrackActivity::new(TowerToHyperService::new(app.clone()), Arc::clone(&activity));
        let builder = Arc::clone(&builder);
        let stopping = stopping.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let _permit = permit;
            let stream: Box<dyn Connection> = match acceptor {
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => Box::new(stream),
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(stream),
            };
            let io = TokioIo::new(stream);
            let result =
                serve_connection(&builder, io, service, &activity, idle_timeout, stopping).await;
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing open connections");
    let _ = stop.send(true);
    let finished = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(?grace, "grace period over; dropping open connections");
        connections.abort_all();
    }
}

/// hyper's settings for every connection.
fn connection_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper enforces no timeouts at all. The header timeout
    // starts when hyper begins reading a request head: on a new connection
    // only once its first bytes have told HTTP/1.1 from HTTP/2 (before that
    // only the idle timeout applies), and on a keep-alive connection right
    // after the previous answer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS);
    // hyper refuses header blocks over these sizes: 431 for HTTP/1.1; for
    // HTTP/2 a header list far over the limit ends the whole connection
    // (GOAWAY), so other requests on it fail too.
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves one connection until it ends; asks it to finish once it has been
/// idle for `idle_timeout` (and drops it if it then does nothing for
/// `close_timeout`) or when the server stops.
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<Box<dyn Connection>>,
    service: TrackActivity<TowerToHyperService<Router>>,
    activity: &Activity,
    idle_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let idle = tokio::select! {
        // The idle timer first: a stalled connection polled when the timer
        // wakes it may squeeze a few more bytes into a socket its client
        // does not read, which would count as progress and put the close
        // off by another idle timeout, again and again.
        biased;
        () = activity.idle_for(idle_timeout) => true,
        _ = stopping.wait_for(|stop| *stop) => false,
        result = connection.as_mut() => return result,
    };
    // Idle: closed at once (HTTP/1.1), or after a GOAWAY (HTTP/2).
    // Stopping: requests being handled finish first, within the server's
    // grace period.
    connection.as_mut().graceful_shutdown();
    if !idle {
        tracing::debug!("server stopping: closing the connection");
        return connection.await;
    }
    tracing::debug!("idle: closing the connection");
    // The close is bounded like the idle time before it, counted from now:
    // a request that came in just as the connection was found idle is
    // still answered, but a client that takes nothing, not even its
    // GOAWAY or its last bytes, is dropped.
    activity.busy();
    let close_timeout = close_timeout(idle_timeout);
    tokio::select! {
        biased;
        () = activity.idle_for(close_timeout) => {
            // Dropping the connection closes the socket; hyper's HTTP/2
            // stream tasks then end with it.
            tracing::debug!(?close_timeout, "idle connection did not close; dropped");
            Ok(())
        }
        result = connection => result,
    }
}
