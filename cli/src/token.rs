//! `caskade token`: prints an HS256 JWT signed with the router's secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use caskade_router::auth::{Role, TokenRequest, issue_hs256, load_hs256_secret};
use clap::Args;

/// Options of `caskade token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// File holding the router's HS256 secret (`<data-dir>/jwt-secret` for `caskade local`).
    #[arg(long)]
    secret_file: PathBuf,
    /// reader, writer or admin.
    #[arg(long)]
    role: Role,
    /// Restrict the token to keys starting with this prefix (not empty;
    /// leave it out for a token over every key).
    #[arg(long, value_parser = parse_prefix)]
    prefix: Option<String>,
    /// Lifetime: a number with a unit, s, m, h or d (e.g. 90s, 15m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// Subject (`sub` claim).
    #[arg(long, default_value = "caskade-cli")]
    sub: String,
    /// `iss` claim, if the router requires one.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim, if the router requires one.
    #[arg(long)]
    audience: Option<String>,
    /// Key id header, if the router's secret has one.
    #[arg(long)]
    kid: Option<String>,
}

/// Signs and prints the token.
pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    let secret = load_hs256_secret(&args.secret_file)?;
    let token = issue_hs256(
        &secret,
        &TokenRequest {
            subject: &args.sub,
            role: args.role,
            prefix: args.prefix.as_deref(),
            ttl: args.ttl,
            issuer: args.issuer.as_deref(),
            audience: args.audience.as_deref(),
            kid: args.kid.as_deref(),
        },
    )
    .context("signing the token")?;
    println!("{token}");
    Ok(())
}

/// A key prefix; an empty one would look scoped and cover every key, and
/// routers refuse tokens that carry one.
fn parse_prefix(text: &str) -> anyhow::Result<String> {
    if text.is_empty() {
        bail!("the prefix is empty; leave --prefix out for a token that covers every key");
    }
    Ok(text.to_string())
}

/// `90s`, `15m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?}: expected a number with a unit, like 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    if secs == 0 {
        bail!("{text:?}: the lifetime must be positive");
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        for bad in ["", "h", "10", "10w", "0s", "-1h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
