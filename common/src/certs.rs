//! Development certificates: a cluster CA and the leaf certificates signed by
//! it for nodes, routers and clients (`caskade certs`, `caskade local`, tests).
//!
//! Every leaf carries SANs for `localhost`, `127.0.0.1` and `::1` plus the
//! host names asked for, and both the server and client TLS usages, since a
//! node is a server to routers and a client of its peers. Keys are ECDSA
//! P-256, written with mode 0600. This module never overwrites a CA unless
//! told to: replacing it would lock every existing node out of the cluster.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use thiserror::Error;

use crate::config::TlsFiles;

/// Leaf certificates are valid for this many years from the start of the current one.
const VALIDITY_YEARS: i32 = 10;

/// Certificates could not be generated or written.
#[derive(Debug, Error)]
pub enum CertError {
    /// `ca.pem` exists and `force` was not given.
    #[error(
        "{0} already exists; pass --force to replace the CA (existing certificates will stop working)"
    )]
    CaExists(PathBuf),
    /// A host name is not a valid DNS name or IP address.
    #[error("invalid host name {host:?}: {reason}")]
    InvalidHost {
        /// The refused name.
        host: String,
        /// rcgen's reason.
        reason: String,
    },
    /// Signing failed.
    #[error("generating {what}: {reason}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's reason.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

/// A certificate authority that signs leaf certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert: IssuedCert,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA with the common name `name`.
    pub fn generate(name: &str) -> Result<ClusterCa, CertError> {
        let failed = |reason: rcgen::Error| CertError::Generate {
            what: format!("CA {name}"),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params);
        let cert = params.self_signed(&key).map_err(failed)?;
        let cert = IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(ClusterCa {
            issuer: Issuer::new(params, key),
            cert,
        })
    }

    /// The CA stored as `cert_pem` and `key_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, CertError> {
        let failed = |reason: rcgen::Error| CertError::Generate {
            what: "the stored CA".into(),
            reason: reason.to_string(),
        };
        let key = KeyPair::from_pem(key_pem).map_err(failed)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(failed)?;
        Ok(ClusterCa {
            issuer,
            cert: IssuedCert {
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
            },
        })
    }

    /// The CA's certificate and key.
    pub fn cert(&self) -> &IssuedCert {
        &self.cert
    }

    /// A leaf certificate for `name`, valid for the loopback names and `hosts`,
    /// usable as both TLS server and TLS client.
    pub fn issue(&self, name: &str, hosts: &[String]) -> Result<IssuedCert, CertError> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        sans.extend(
            hosts
                .iter()
                .filter(|h| !sans.contains(h))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut params = CertificateParams::new(sans).map_err(|e| CertError::InvalidHost {
            host: hosts.join(","),
            reason: e.to_string(),
        })?;
        params.distinguished_name = distinguished_name(name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let failed = |reason: rcgen::Error| CertError::Generate {
            what: format!("certificate {name}"),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Where [`write_cluster_certs`] put each file.
#[derive(Debug, Clone)]
pub struct ClusterCertFiles {
    /// `ca.pem`.
    pub ca: PathBuf,
    /// `node-<i>.pem` / `node-<i>-key.pem` for nodes 1..=n, with the CA.
    pub nodes: Vec<TlsFiles>,
    /// `router.pem` / `router-key.pem`: HTTPS server and client of the nodes.
    pub router: TlsFiles,
    /// `client.pem` / `client-key.pem`: for tools that talk to nodes directly.
    pub client: TlsFiles,
}

/// Writes a new CA and certificates for `nodes` nodes, a router and a client
/// into `out` (created if needed). Refuses to replace an existing `ca.pem`
/// unless `force`.
pub fn write_cluster_certs(
    out: &Path,
    nodes: u32,
    hosts: &[String],
    force: bool,
) -> Result<ClusterCertFiles, CertError> {
    let ca_path = out.join("ca.pem");
    if ca_path.exists() && !force {
        return Err(CertError::CaExists(ca_path));
    }
    for host in hosts {
        validate_host(host)?;
    }
    // Everything is generated before anything is written, so a failure
    // leaves `out` as it was.
    // A unique name: a peer holding a certificate of another caskade CA is
    // then refused as "unknown CA" rather than by a signature mismatch.
    let ca_name = format!("caskade cluster CA {}", crate::telemetry::random_hex_id());
    let ca = ClusterCa::generate(&ca_name)?;
    let mut stems: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    stems.extend(["router".to_string(), "client".to_string()]);
    let issued = stems
        .iter()
        .map(|stem| Ok((stem, ca.issue(&format!("caskade {stem}"), hosts)?)))
        .collect::<Result<Vec<_>, CertError>>()?;

    fs::create_dir_all(out).map_err(|source| CertError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_file(&out.join("ca-key.pem"), &ca.cert.key_pem, true)?;
    let mut written = Vec::with_capacity(issued.len());
    for (stem, cert) in issued {
        let files = TlsFiles {
            ca: ca_path.clone(),
            cert: out.join(format!("{stem}.pem")),
            key: out.join(format!("{stem}-key.pem")),
        };
        write_file(&files.cert, &cert.cert_pem, false)?;
        write_file(&files.key, &cert.key_pem, true)?;
        written.push(files);
    }
    // The CA certificate last: its presence marks a complete set.
    write_file(&ca_path, &ca.cert.cert_pem, false)?;
    let client = written.pop().expect("client was issued last");
    let router = written.pop().expect("router was issued before the client");
    Ok(ClusterCertFiles {
        ca: ca_path,
        nodes: written,
        router,
        client,
    })
}

/// Like [`write_cluster_certs`], but keeps an existing CA and every file
/// already there, issuing only the missing ones (`caskade local` on a data
/// directory it created before, perhaps with more nodes now).
pub fn ensure_cluster_certs(
    out: &Path,
    nodes: u32,
    hosts: &[String],
) -> Result<ClusterCertFiles, CertError> {
    let ca_path = out.join("ca.pem");
    if !ca_path.exists() {
        return write_cluster_certs(out, nodes, hosts, false);
    }
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| CertError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca = ClusterCa::from_pem(&read(&ca_path)?, &read(&out.join("ca-key.pem"))?)?;
    let mut stems: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    stems.extend(["router".to_string(), "client".to_string()]);
    let mut files = Vec::with_capacity(stems.len());
    for stem in &stems {
        let tls = TlsFiles {
            ca: ca_path.clone(),
            cert: out.join(format!("{stem}.pem")),
            key: out.join(format!("{stem}-key.pem")),
        };
        if !(tls.cert.exists() && tls.key.exists()) {
            let cert = ca.issue(&format!("caskade {stem}"), hosts)?;
            write_file(&tls.key, &cert.key_pem, true)?;
            write_file(&tls.cert, &cert.cert_pem, false)?;
        }
        files.push(tls);
    }
    let client = files.pop().expect("client is the last stem");
    let router = files.pop().expect("router comes before the client");
    Ok(ClusterCertFiles {
        ca: ca_path,
        nodes: files,
        router,
        client,
    })
}

/// A host must be a DNS name or an IP address, as a TLS peer would name it.
fn validate_host(host: &str) -> Result<(), CertError> {
    rustls_pki_types::ServerName::try_from(host)
        .map(|_| ())
        .map_err(|e| CertError::InvalidHost {
            host: host.to_string(),
            reason: e.to_string(),
        })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "caskade");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// From the start of the current year (tolerates clocks a little behind) for ten years.
fn set_validity(params: &mut CertificateParams) {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    // Good to within a day around New Year, which the margin below absorbs.
    let year = 1970 + (days as f64 / 365.2425) as i32;
    params.not_before = date_time_ymd(year - 1, 12, 1);
    params.not_after = date_time_ymd(year + VALIDITY_YEARS, 1, 1);
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io_error = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(contents.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsMaterial;

    #[test]
    fn writes_a_usable_set_and_refuses_to_replace_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let files =
            write_cluster_certs(&out, 2, &["node-a.example".into()], false).expect("first run");
        assert_eq!(files.nodes.len(), 2);
        // Each pair loads and its key matches its certificate.
        for tls in files.nodes.iter().chain([&files.router, &files.client]) {
            TlsMaterial::load(tls).expect("usable certificate");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.client.key)
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let ca_before = fs::read(&files.ca).expect("ca");
        let err = write_cluster_certs(&out, 2, &[], false).expect_err("existing CA");
        assert!(matches!(err, CertError::CaExists(_)), "{err}");
        assert_eq!(
            fs::read(&files.ca).expect("ca"),
            ca_before,
            "nothing was replaced"
        );

        write_cluster_certs(&out, 1, &[], true).expect("forced");
        assert_ne!(fs::read(&files.ca).expect("ca"), ca_before);
    }

    #[test]
    fn ensure_keeps_the_ca_and_adds_missing_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ensure_cluster_certs(dir.path(), 1, &[]).expect("first");
        let ca = fs::read(&first.ca).expect("ca");
        let node_1 = fs::read(&first.nodes[0].cert).expect("node 1");
        let second = ensure_cluster_certs(dir.path(), 2, &[]).expect("second");
        assert_eq!(fs::read(&second.ca).expect("ca"), ca);
        assert_eq!(fs::read(&second.nodes[0].cert).expect("node 1"), node_1);
        // The new node's certificate is signed by the kept CA.
        TlsMaterial::load(&second.nodes[1]).expect("node 2 loads");
    }

    #[test]
    fn a_bad_host_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = write_cluster_certs(dir.path(), 1, &["not a host!".into()], false)
            .expect_err("invalid host");
        assert!(matches!(err, CertError::InvalidHost { .. }), "{err}");
        assert_eq!(
            fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "nothing written"
        );
    }
}
