//! Serving the HTTP application: HTTPS with rustls (HTTP/2 and HTTP/1.1 by
//! ALPN), or plain HTTP (`insecure_http`, and the `/metrics` listener).
//!
//! The accept loop holds one permit of a semaphore per open connection, so
//! at most `max_connections` are served; more wait in the kernel's backlog.
//! No client may keep a permit for free: TLS handshakes are bounded by a
//! timeout, in each connection's own task (never in the accept loop);
//! HTTP/1.1 request heads by `header_timeout_ms`; a connection found idle
//! for `idle_timeout_ms` ([`idle`]: an answer not taken for that long, or
//! no request being handled and nothing happening) is asked to close, and
//! dropped if it is then idle for `close_timeout`, since a client that
//! takes no answer takes no GOAWAY or last bytes either. Slow request
//! bodies are bounded by the application ([`request_body`]). On shutdown
//! the listener closes and open connections are asked to finish (GOAWAY /
//! `Connection: close`); they get `grace` to do so.
//!
//! Answers wait in few buffers on their way out, so that a piece taken is
//! about a piece sent: an HTTP/2 stream buffers one piece, and accepted
//! sockets keep at most about one unsent (`TCP_NOTSENT_LOWAT`, on Linux).
//! Otherwise the kernel takes more only once a third of a send buffer of
//! up to several MiB has drained, and a client reading a large answer
//! slowly but steadily would be found idle.
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
use crate::idle::{ANSWER_PIECE, Activity, TrackActivity};
use crate::linger::Lingering;

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
/// The shortest and the longest an idle connection may stay idle while
/// asked to close: time for a GOAWAY's ping to come back even with a tiny
/// idle timeout, and no more than a few seconds with a long one.
const MIN_CLOSE_TIME: Duration = Duration::from_secs(1);
const MAX_CLOSE_TIME: Duration = Duration::from_secs(5);

/// How long a connection found idle after `idle_timeout` may then stay
/// idle while it closes gracefully (an HTTP/2 GOAWAY and its ping, the
/// last bytes written, TLS `close_notify`) before it is dropped: as long
/// again, between [`MIN_CLOSE_TIME`] and [`MAX_CLOSE_TIME`].
fn close_timeout(idle_timeout: Duration) -> Duration {
    idle_timeout.clamp(MIN_CLOSE_TIME, MAX_CLOSE_TIME)
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
        keep_little_unsent(&stream);
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
                        Ok(Ok(stream)) => Box::new(Lingering::new(stream)),
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
                None => Box::new(Lingering::new(stream)),
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

/// Has the kernel report `stream` writable only while less than about one
/// piece of an answer waits unsent in it. Without it, Linux reports a full
/// socket writable again only once a third of its send buffer (grown to
/// several MiB on a fast link) has drained, so the next piece of an answer
/// would be taken only that much later: a client reading at a few KiB/s
/// would be found idle although it reads steadily. Data sent and not yet
/// acknowledged is not limited, so a fast client loses little throughput;
/// the cost is more wakeups of the connection's task.
fn keep_little_unsent(stream: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let lowat = u32::try_from(ANSWER_PIECE).unwrap_or(u32::MAX);
        if let Err(error) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(lowat) {
            tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
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
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        // A piece of an answer at a time waits in a stream's buffer (400
        // KiB by default): what the router still holds once the last piece
        // has been taken is no longer timed, and must reach a slow client
        // within the idle timeout and the close.
        .max_send_buf_size(ANSWER_PIECE);
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
        // A tie-break: when the idle timer and the connection wake
        // together, the timer wins. Polling a stalled connection then may
        // squeeze a few more bytes into a socket its client does not read,
        // which would count as progress and put the close off by another
        // idle timeout, again and again.
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
    // The close is bounded like the idle time before it, counted from now
    // for the connection and for each of its answers: a request that came
    // in just as the connection was found idle is still answered, and
    // answers being taken may finish, but a client that takes nothing,
    // not even its GOAWAY or its last bytes, is dropped.
    activity.closing();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_takes_as_long_as_the_idle_timeout_within_bounds() {
        let ms = Duration::from_millis;
        // A tiny idle timeout still leaves time for a GOAWAY's ping.
        assert_eq!(close_timeout(ms(1)), MIN_CLOSE_TIME);
        assert_eq!(close_timeout(ms(2_500)), ms(2_500));
        assert_eq!(close_timeout(ms(60_000)), MAX_CLOSE_TIME);
    }
}
