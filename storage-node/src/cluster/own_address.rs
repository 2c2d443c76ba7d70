//! A new node's check that the address its initial members list for its own
//! id leads back to it.
//!
//! Two nodes started with one id (a copied configuration, a container given
//! another's id) would both assign versions with that id as their origin
//! and both speak for it in the Raft group. Before it writes anything, a
//! node forming a cluster therefore connects to the address listed for
//! itself, sends a random token over plain TCP and waits for the token on
//! its own listener, which is bound but does not serve yet.
//!
//! The check is best effort and refuses only on evidence. If the token does
//! not come back, the node asks the address who it is (`Raft/Hello`, for up
//! to 10 s, as a node there may be starting too): since this node does not
//! serve gRPC yet, an answer comes from another caskade node of the
//! cluster's CA, and the node stops with an error naming it. No answer (a
//! proxy that accepts before its backend is ready, a process that is not a
//! caskade node) is logged as a warning and the node goes on; so does an
//! address that cannot be reached at all (not yet in DNS, a network that
//! does not loop back), which includes a real owner whose process has not
//! bound its port yet.

use std::net::SocketAddr;
use std::time::Duration;

use crate::peers::PeerLinks;
use caskade_common::telemetry::random_hex_id;
use caskade_proto::HelloRequest;
use caskade_proto::raft_client::RaftClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::identity::BootstrapError;
use crate::replication::puller::channel;

/// How long the listed address may fail to resolve or connect before the
/// check gives up (the process that owns it may be starting too).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Limit of one name lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Limit of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long the token may take to arrive once connected.
const ARRIVAL_DEADLINE: Duration = Duration::from_secs(3);
/// How long one accepted connection may take to send the token.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one `Raft/Hello` may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to keep asking the address who it is: a node there may be
/// starting too (bound, not yet serving).
const HELLO_DEADLINE: Duration = Duration::from_secs(10);

/// Checks that `addr`, listed for node `me`, reaches `listener`. Other
/// connections `listener` accepts meanwhile are closed; peers retry.
pub async fn check(
    me: u32,
    addr: &str,
    listener: &TcpListener,
    links: &PeerLinks,
) -> Result<(), BootstrapError> {
    let token = format!("caskade own-address check {}\n", random_hex_id());
    let Some(mut stream) = connect(addr).await else {
        tracing::warn!(
            addr,
            "cannot reach {addr}, the address cluster.initial_members gives this node (id {me}), within {CONNECT_DEADLINE:?}: whether another node holds it is not checked, and peers may not reach this node there either"
        );
        return Ok(());
    };
    // A failed write means another process took the connection and closed
    // it: the token then never arrives, which is the answer.
    let _ = stream.write_all(token.as_bytes()).await;
    if token_arrives(listener, token.as_bytes()).await {
        return Ok(());
    }
    drop(stream);
    match who_answers(addr, me, links).await {
        Some(found) => Err(BootstrapError::AddressTaken {
            id: me,
            addr: addr.to_owned(),
            found,
        }),
        None => {
            tracing::warn!(
                addr,
                "{addr}, the address cluster.initial_members gives this node (id {me}), accepts connections that do not reach this node, and no caskade node answers there: a proxy in between? Not checked further"
            );
            Ok(())
        }
    }
}

/// A connection to `addr`, retried until [`CONNECT_DEADLINE`].
async fn connect(addr: &str) -> Option<TcpStream> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        let resolved: Vec<SocketAddr> =
            match timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(addr)).await {
                Ok(Ok(found)) => found.collect(),
                Ok(Err(e)) => {
                    tracing::debug!(addr, error = %e, "own address does not resolve yet");
                    Vec::new()
                }
                Err(_) => {
                    tracing::debug!(addr, "looking up the own address timed out");
                    Vec::new()
                }
            };
        for target in resolved {
            match timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(stream)) => return Some(stream),
                Ok(Err(e)) => tracing::debug!(%target, error = %e, "own address refuses"),
                Err(_) => tracing::debug!(%target, "own address did not answer in time"),
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Whether `token` arrives on `listener` within [`ARRIVAL_DEADLINE`]. Each
/// accepted connection is read on its own, so that idle ones cannot delay
/// the one that carries the token.
async fn token_arrives(listener: &TcpListener, token: &[u8]) -> bool {
    let mut reads = JoinSet::new();
    let wait = async {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((mut incoming, _)) => {
                        let mut received = vec![0; token.len()];
                        reads.spawn(async move {
                            let read = timeout(READ_TIMEOUT, incoming.read_exact(&mut received)).await;
                            matches!(read, Ok(Ok(_))).then_some(received)
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed during the own-address check");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                },
                Some(read) = reads.join_next(), if !reads.is_empty() => {
                    if read.is_ok_and(|received| received.as_deref() == Some(token)) {
                        return;
                    }
                }
            }
        }
    };
    timeout(ARRIVAL_DEADLINE, wait).await.is_ok()
}

/// The id of the caskade node that answers `Raft/Hello` at `addr` within
/// [`HELLO_DEADLINE`], if any.
async fn who_answers(addr: &str, me: u32, links: &PeerLinks) -> Option<u32> {
    let channel = channel(addr, links).ok()?;
    let request = HelloRequest {
        cluster_id: String::new(),
        expected_id: me,
        from: 0,
    };
    let deadline = Instant::now() + HELLO_DEADLINE;
    loop {
        let asked = Instant::now();
        let answer = timeout(
            HELLO_TIMEOUT,
            RaftClient::new(channel.clone()).hello(request.clone()),
        )
        .await;
        if let Ok(Ok(answer)) = answer {
            return Some(answer.into_inner().node_id);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Not faster than once a second, whatever made the call fail.
        tokio::time::sleep_until(asked + Duration::from_secs(1)).await;
    }
}
