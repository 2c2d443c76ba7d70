//! TLS material for caskade's mutual-TLS links (router → node, node → node)
//! and the router's HTTPS listener.
//!
//! Everything is loaded and checked once at start-up, so a wrong path, an
//! empty file or a key that does not match its certificate is an error naming
//! the file, not a failed handshake later. Only rustls with the `ring`
//! provider is used; [`install_crypto_provider`] makes it the process default
//! and must run before any TLS config is built. Nothing here logs key material.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsFiles;

/// Longest TLS handshake a gRPC client waits for.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// TLS material that could not be loaded or does not fit together.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM section.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file: "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// The files parse but rustls refuses the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration from {cert}: {reason}")]
    Config {
        /// The certificate file of the refused identity.
        cert: PathBuf,
        /// rustls' reason.
        reason: String,
    },
}

/// Makes rustls' `ring` provider the process default. Idempotent; call it at
/// the start of every binary and test that uses TLS.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed; with one crypto backend
    // in the tree that is ring itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA, a certificate chain and its key, read from PEM files and checked.
#[derive(Clone)]
pub struct TlsMaterial {
    cert_path: PathBuf,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_path", &self.cert_path)
            .field("ca_certs", &self.ca.len())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads the three files and verifies that the key matches the certificate.
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        install_crypto_provider();
        let (ca_pem, ca) = read_certs(&files.ca, "CA certificate")?;
        let (cert_pem, chain) = read_certs(&files.cert, "certificate")?;
        let key_pem = read(&files.key, "private key")?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            what: "private key",
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let material = TlsMaterial {
            cert_path: files.cert.clone(),
            ca_pem,
            cert_pem,
            key_pem,
            ca,
            chain,
        };
        // Building a server config checks the key against the certificate.
        material.server_config(true)?;
        Ok(material)
    }

    /// The certificates of the cluster CA.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// A rustls server config presenting this identity; with `require_client_cert`
    /// a client must present a certificate chaining to the CA.
    pub fn server_config(
        &self,
        require_client_cert: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let config_error = |reason: String| TlsError::Config {
            cert: self.cert_path.clone(),
            reason,
        };
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| config_error(e.to_string()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = if require_client_cert {
            let verifier = WebPkiClientVerifier::builder(Arc::new(self.root_store()?))
                .build()
                .map_err(|e| config_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(self.chain.clone(), key)
            .map_err(|e| config_error(e.to_string()))
    }

    /// The gRPC server side of mutual TLS: clients must present a certificate
    /// that chains to the cluster CA, or the handshake fails.
    pub fn grpc_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// The gRPC client side: trust only the cluster CA, present this identity,
    /// and expect `server_name` in the server's certificate. The handshake
    /// must finish within [`HANDSHAKE_TIMEOUT`]: a peer that accepts the
    /// connection and then says nothing must not hold a caller forever.
    pub fn grpc_client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(|e| TlsError::Config {
                cert: self.cert_path.clone(),
                reason: format!("CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.to_path_buf(),
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok((pem, certs))
}

/// The name a node at `addr` (`host:port`, an IPv6 host in brackets) must
/// have in its certificate: the host part.
pub fn server_name(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}
