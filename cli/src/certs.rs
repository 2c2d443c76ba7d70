//! `caskade certs`: a cluster CA and certificates for development and for
//! docker compose, optionally with the router's JWT secret and an admin
//! token, so that one command prepares everything a cluster needs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caskade_common::certs::{ensure_cluster_certs, write_cluster_certs};
use caskade_router::auth::{
    AuthConfig, Authenticator, Role, SecretKeyFile, TokenRequest, issue_hs256, load_hs256_secret,
};
use clap::Args;
use reqwest::header::HeaderValue;

use crate::token::parse_ttl;

/// Options of `caskade certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write the files to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Number of node certificates (`node-1.pem` … `node-N.pem`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    nodes: u32,
    /// Extra host names or IP addresses for every certificate, besides
    /// localhost, 127.0.0.1 and ::1 (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Replace an existing CA (certificates signed by the old one stop working).
    #[arg(long, conflicts_with = "keep")]
    force: bool,
    /// Keep what `--out` already holds and write only what is missing (a
    /// container that prepares a cluster's volume runs this at every start).
    #[arg(long)]
    keep: bool,
    /// Also write the router's HS256 secret (`jwt-secret`, unless it
    /// exists) and an admin token signed with it (`admin.token`, unless one
    /// exists that the secret verifies and that is valid for at least
    /// another day, or half its lifetime if that is shorter).
    #[arg(long)]
    auth: bool,
    /// With `--auth`: how long the admin token is valid (s, m, h or d).
    #[arg(long, default_value = "30d", value_parser = parse_ttl, requires = "auth")]
    admin_ttl: Duration,
}

/// Generates the files and lists them.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let files = if args.keep {
        ensure_cluster_certs(&args.out, args.nodes, &args.hosts)
    } else {
        write_cluster_certs(&args.out, args.nodes, &args.hosts, args.force)
    }
    .with_context(|| format!("writing certificates to {}", args.out.display()))?;
    println!("CA:      {}", files.ca.display());
    for (i, node) in files.nodes.iter().enumerate() {
        println!(
            "node {}:  {} {}",
            i + 1,
            node.cert.display(),
            node.key.display()
        );
    }
    println!(
        "router:  {} {}",
        files.router.cert.display(),
        files.router.key.display()
    );
    println!(
        "client:  {} {}",
        files.client.cert.display(),
        files.client.key.display()
    );
    if args.auth {
        let secret_file = args.out.join("jwt-secret");
        ensure_secret(&secret_file)?;
        println!("JWT secret:  {}", secret_file.display());
        let token_file = args.out.join("admin.token");
        let renew_within = (args.admin_ttl / 2).min(Duration::from_secs(86_400));
        let current = std::fs::read_to_string(&token_file).ok();
        if !current.is_some_and(|token| admin_token_lasts(&secret_file, token.trim(), renew_within))
        {
            let token = admin_token(&secret_file, args.admin_ttl)?;
            write_private(&token_file, format!("{token}\n").as_bytes())?;
        }
        println!("admin token: {}", token_file.display());
    }
    println!("Keep ca-key.pem secret; nodes need only ca.pem and their own pair.");
    Ok(())
}

/// An admin JWT valid for `ttl`, signed with the secret in `secret_file`.
pub(crate) fn admin_token(secret_file: &Path, ttl: Duration) -> anyhow::Result<String> {
    let secret = load_hs256_secret(secret_file)?;
    let token = issue_hs256(
        &secret,
        &TokenRequest {
            subject: "admin",
            role: Role::Admin,
            prefix: None,
            ttl,
            issuer: None,
            audience: None,
            kid: None,
        },
    )?;
    Ok(token)
}

/// Whether `token` is an admin token that the secret in `secret_file`
/// verifies and that stays valid for at least `margin`.
fn admin_token_lasts(secret_file: &Path, token: &str, margin: Duration) -> bool {
    let Ok(authenticator) = Authenticator::new(&AuthConfig {
        hs256: vec![SecretKeyFile {
            kid: None,
            path: secret_file.to_path_buf(),
        }],
        ..AuthConfig::default()
    }) else {
        return false;
    };
    let Ok(header) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return false;
    };
    if !authenticator
        .authenticate(Some(&header))
        .is_ok_and(|principal| principal.role == Role::Admin)
    {
        return false;
    }
    // Verified above; only its expiry is read here.
    let expires = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims["exp"].as_u64());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    expires.is_some_and(|exp| exp >= now.saturating_add(margin.as_secs()))
}

/// Creates the HS256 secret (32 random bytes, hex) unless it exists.
pub(crate) fn ensure_secret(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, format!("{hex}\n").as_bytes())
}

/// Replaces `path` with `contents`, readable by its owner only: written and
/// synced beside it, then renamed over it, so that a crash leaves the old
/// file or the new one, never an empty or partial one.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    written
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        certs: CertsArgs,
    }

    fn parse(args: &[&str]) -> Result<CertsArgs, clap::Error> {
        Command::try_parse_from(std::iter::once("certs").chain(args.iter().copied()))
            .map(|c| c.certs)
    }

    /// Every file in `dir` with its contents.
    fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(entry.path()).unwrap())
            })
            .collect()
    }

    #[test]
    fn keep_with_auth_prepares_a_volume_once_and_then_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let out_arg = format!("--out={}", out.display());
        let args = parse(&[
            &out_arg,
            "--keep",
            "--auth",
            "--nodes=2",
            "--hosts=node1,router",
        ])
        .unwrap();
        run(&args).unwrap();
        let first = contents(&out);
        for name in [
            "ca.pem",
            "ca-key.pem",
            "node-1.pem",
            "node-2-key.pem",
            "router.pem",
            "client.pem",
            "jwt-secret",
            "admin.token",
        ] {
            assert!(
                first.contains_key(name),
                "{name} missing: {:?}",
                first.keys()
            );
        }

        // The token is an admin token the router accepts with the secret.
        let authenticator = Authenticator::new(&AuthConfig {
            hs256: vec![SecretKeyFile {
                kid: None,
                path: out.join("jwt-secret"),
            }],
            ..AuthConfig::default()
        })
        .unwrap();
        let token = String::from_utf8(first["admin.token"].clone()).unwrap();
        let header = HeaderValue::from_str(&format!("Bearer {}", token.trim())).unwrap();
        let principal = authenticator.authenticate(Some(&header)).unwrap();
        assert_eq!(principal.role, Role::Admin);

        // Every later start keeps everything as it is.
        run(&args).unwrap();
        assert_eq!(contents(&out), first);

        // A file lost is written again, under the same CA; nothing else changes.
        std::fs::remove_file(out.join("node-2.pem")).unwrap();
        std::fs::remove_file(out.join("admin.token")).unwrap();
        run(&args).unwrap();
        let again = contents(&out);
        assert_eq!(again["ca.pem"], first["ca.pem"]);
        assert_eq!(again["jwt-secret"], first["jwt-secret"]);
        assert!(again.contains_key("node-2.pem") && again.contains_key("admin.token"));
    }

    #[test]
    fn keep_renews_an_admin_token_that_expires_soon_or_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let out_arg = format!("--out={}", dir.path().display());
        let args = parse(&[&out_arg, "--keep", "--auth"]).unwrap();
        run(&args).unwrap();
        let token_file = dir.path().join("admin.token");
        let secret_file = dir.path().join("jwt-secret");
        let lasting = std::fs::read_to_string(&token_file).unwrap();
        let day = Duration::from_secs(86_400);
        assert!(admin_token_lasts(&secret_file, lasting.trim(), day));

        for (what, token) in [
            (
                "one valid for an hour",
                admin_token(&secret_file, Duration::from_secs(3600)).unwrap(),
            ),
            ("garbage", "not a token".to_string()),
            ("a reader's", {
                let secret = load_hs256_secret(&secret_file).unwrap();
                issue_hs256(
                    &secret,
                    &TokenRequest {
                        subject: "someone",
                        role: Role::Reader,
                        prefix: None,
                        ttl: Duration::from_secs(30 * 86_400),
                        issuer: None,
                        audience: None,
                        kid: None,
                    },
                )
                .unwrap()
            }),
        ] {
            std::fs::write(&token_file, format!("{token}\n")).unwrap();
            run(&args).unwrap();
            let renewed = std::fs::read_to_string(&token_file).unwrap();
            assert_ne!(renewed.trim(), token, "{what} was kept");
            assert!(
                admin_token_lasts(&secret_file, renewed.trim(), day),
                "{what}: the renewed token does not last"
            );
        }
    }

    #[test]
    fn keep_keeps_a_short_lived_admin_token_for_half_its_life_and_renews_one_of_another_secret() {
        let dir = tempfile::tempdir().unwrap();
        let out_arg = format!("--out={}", dir.path().display());
        let token_file = dir.path().join("admin.token");
        let hourly = parse(&[&out_arg, "--keep", "--auth", "--admin-ttl=1h"]).unwrap();
        run(&hourly).unwrap();
        let first = std::fs::read_to_string(&token_file).unwrap();
        // A token of an hour is good for half an hour more: kept.
        run(&hourly).unwrap();
        assert_eq!(std::fs::read_to_string(&token_file).unwrap(), first);

        // A new secret: the old token no longer verifies, so it is renewed.
        std::fs::remove_file(dir.path().join("jwt-secret")).unwrap();
        run(&hourly).unwrap();
        let renewed = std::fs::read_to_string(&token_file).unwrap();
        assert_ne!(renewed, first);
        assert!(admin_token_lasts(
            &dir.path().join("jwt-secret"),
            renewed.trim(),
            Duration::from_secs(1800)
        ));
        assert!(!dir.path().join("admin.token.tmp").exists());
    }

    #[test]
    fn without_keep_an_existing_ca_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out_arg = format!("--out={}", dir.path().display());
        run(&parse(&[&out_arg]).unwrap()).unwrap();
        let before = contents(dir.path());
        let error = run(&parse(&[&out_arg, "--auth"]).unwrap()).unwrap_err();
        assert!(format!("{error:#}").contains("ca.pem"), "{error:#}");
        assert_eq!(contents(dir.path()), before);
    }

    #[test]
    fn contradictory_options_are_refused() {
        for bad in [
            &["--out=x", "--keep", "--force"][..],
            &["--out=x", "--admin-ttl=1d"],
            &["--out=x", "--auth", "--admin-ttl=0s"],
            &["--out=x", "--hosts=node1", "--nodes=0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
