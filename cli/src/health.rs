//! `caskade health`: exits 0 when the router (or, with `--node`, a storage
//! node) answers, and 1 with the reason otherwise; with `--ready`, when it
//! also serves. A container's health check needs no tool besides the
//! `caskade` binary, and by default does not fail a node that is catching
//! up (which answers, not yet serving), so that it is not restarted then.
//! Every option can come from the environment, so that one image's
//! `HEALTHCHECK CMD ["caskade", "health"]` checks whichever server the
//! container runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use caskade_common::config::{TlsFiles, validate_addr};
use caskade_common::tls::{TlsMaterial, server_name};
use caskade_proto::READINESS_SERVICE;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::Connection;

/// How long a check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What `caskade health` checks.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Check the storage node at this gRPC address (`host:port`) instead of
    /// the router: it must answer its health check.
    #[arg(long, env = "CASKADE_HEALTH_NODE")]
    node: Option<String>,
    /// For `--node`: a certificate the cluster CA signed (the node's own
    /// will do), with `--key`, and the CA as `--ca`.
    #[arg(long, env = "CASKADE_HEALTH_CERT", requires = "node")]
    cert: Option<PathBuf>,
    /// For `--node`: the key of `--cert`.
    #[arg(long, env = "CASKADE_HEALTH_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Require readiness: for the router `/readyz` (every key range has a
    /// ready replica) instead of `/healthz`; for a node, SERVING (caught up
    /// with its peers).
    #[arg(long)]
    ready: bool,
}

/// Runs the check; `Ok` when healthy.
pub async fn run(connection: &Connection, args: &HealthArgs) -> anyhow::Result<()> {
    match &args.node {
        Some(addr) => check_node(connection, args, addr).await,
        None => check_router(connection, args.ready).await,
    }
}

async fn check_router(connection: &Connection, ready: bool) -> anyhow::Result<()> {
    let client = connection.http_client()?;
    let path = if ready { "/readyz" } else { "/healthz" };
    let url = format!("{}{path}", connection.base_url());
    let response = client
        .get(&url)
        .timeout(CHECK_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("GET {url}: {status} {body}");
    }
    Ok(())
}

async fn check_node(connection: &Connection, args: &HealthArgs, addr: &str) -> anyhow::Result<()> {
    let ready = args.ready;
    validate_addr(addr).map_err(anyhow::Error::msg)?;
    let (Some(cert), Some(key), Some(ca)) = (&args.cert, &args.key, connection.ca()) else {
        bail!("--node needs --cert, --key and --ca (the node's mutual TLS)");
    };
    caskade_common::tls::install_crypto_provider();
    let tls = TlsMaterial::load(&TlsFiles {
        ca: ca.to_path_buf(),
        cert: cert.clone(),
        key: key.clone(),
    })?;
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.grpc_client(server_name(addr)))?
        .connect_timeout(CHECK_TIMEOUT)
        .timeout(CHECK_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connecting to the node at {addr}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: READINESS_SERVICE.into(),
        })
        .await
        .with_context(|| format!("health check of the node at {addr}"))?
        .into_inner();
    if ready && answer.status() != ServingStatus::Serving {
        bail!("the node at {addr} is {:?}", answer.status());
    }
    Ok(())
}
