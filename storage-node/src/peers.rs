//! How a node reaches its peers: its mutual-TLS identity, and the clock
//! guard every exchange passes ([`crate::clock_offset`]).

use std::sync::Arc;
use std::time::Duration;

use caskade_common::tls::{TlsMaterial, server_name};
use tonic::transport::Endpoint;

use crate::clock_offset::{ClockGuard, PeerChannel};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// This node's means of reaching its peers.
#[derive(Debug, Clone)]
pub struct PeerLinks {
    /// The node's certificate, key and CA.
    pub tls: TlsMaterial,
    /// The check of the peers' clocks.
    pub clock: Arc<ClockGuard>,
}

/// A lazily connecting mutual-TLS channel to a peer at `addr` (`host:port`),
/// its answers checked by the clock guard.
pub fn channel(addr: &str, links: &PeerLinks) -> Result<PeerChannel, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(links.tls.grpc_client(server_name(addr)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(PeerChannel::new(channel, Arc::clone(&links.clock)))
}
