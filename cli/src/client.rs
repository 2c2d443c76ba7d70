//! The client commands: `caskade put`, `get`, `del` and `ls` against a router.
//!
//! The router's URL, a token and the CA certificate come from flags or from
//! `CASKADE_URL`, `CASKADE_TOKEN` and `CASKADE_CA`. Keys are percent-encoded
//! here, byte by byte, except `/` and unreserved characters, so any key can
//! be addressed. Errors print the router's `error.code` and message.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use clap::Args;
use reqwest::Method;
use serde::Deserialize;

/// Where the router is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The router's base URL.
    #[arg(
        long,
        global = true,
        env = "CASKADE_URL",
        default_value = "https://127.0.0.1:8443"
    )]
    url: String,
    /// A bearer token (see `caskade token`; `caskade local` writes one to `<data-dir>/admin.token`).
    #[arg(long, global = true, env = "CASKADE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate that signed the router's certificate (PEM).
    #[arg(long, global = true, env = "CASKADE_CA")]
    ca: Option<PathBuf>,
}

impl Connection {
    /// A connection to the router at `url`, with `token` and the CA
    /// certificate at `ca`.
    pub fn new(url: String, token: Option<String>, ca: Option<PathBuf>) -> Connection {
        Connection { url, token, ca }
    }

    /// The router's URL without a trailing `/`.
    pub(crate) fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The CA certificate's file, if one was given.
    pub(crate) fn ca(&self) -> Option<&std::path::Path> {
        self.ca.as_deref()
    }

    /// An HTTPS client that trusts the connection's CA.
    pub(crate) fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        http_client(self)
    }
}

/// A router to send requests to, with the connection's token.
pub(crate) struct Router {
    client: reqwest::Client,
    base: String,
    auth: String,
}

impl Router {
    pub(crate) fn new(connection: &Connection) -> anyhow::Result<Router> {
        let token = connection
            .token
            .as_deref()
            .context("no token: pass --token or set CASKADE_TOKEN")?;
        Ok(Router {
            client: http_client(connection)?,
            base: connection.base_url().to_string(),
            auth: format!("Bearer {}", token.trim()),
        })
    }

    /// A request to `path` (from the root, with its query).
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .header("authorization", &self.auth)
    }

    /// Sends `request`; the router's error, if it answered one, as an error.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        checked(request.send().await?).await
    }
}

/// A client command.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Store a value: `caskade put KEY VALUE`, or `-` (or nothing) to read it from stdin.
    Put {
        /// The key.
        key: String,
        /// The value, or `-` for stdin.
        value: Option<String>,
        /// Expire after this many seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print a value to stdout.
    Get {
        /// The key.
        key: String,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
    },
    /// List keys under a prefix, one per line.
    Ls {
        /// The prefix (empty: every key).
        #[arg(default_value = "")]
        prefix: String,
    },
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Debug, Deserialize)]
struct Page {
    keys: Vec<String>,
    next: Option<String>,
}

/// Runs one client command.
pub async fn run(connection: &Connection, command: ClientCommand) -> anyhow::Result<()> {
    let router = Router::new(connection)?;
    match command {
        ClientCommand::Put { key, value, ttl } => {
            let value = match value.as_deref() {
                None | Some("-") => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the value from stdin")?;
                    buf
                }
                Some(text) => text.as_bytes().to_vec(),
            };
            let mut path = format!("/v1/kv/{}", encode_key(&key));
            if let Some(ttl) = ttl {
                path.push_str(&format!("?ttl={ttl}"));
            }
            let request = router.request(Method::PUT, &path).body(value);
            let response = router.send(request).await?;
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            println!("{etag}");
        }
        ClientCommand::Get { key } => {
            let path = format!("/v1/kv/{}", encode_key(&key));
            let response = router.send(router.request(Method::GET, &path)).await?;
            let value = response.bytes().await?;
            std::io::stdout().write_all(&value)?;
        }
        ClientCommand::Del { key } => {
            let path = format!("/v1/kv/{}", encode_key(&key));
            router.send(router.request(Method::DELETE, &path)).await?;
        }
        ClientCommand::Ls { prefix } => {
            // base64 lists every key, UTF-8 or not; each is printed as its bytes.
            let mut after: Option<String> = None;
            let mut out = std::io::stdout().lock();
            loop {
                let mut path = format!(
                    "/v1/kv?limit=1000&encoding=base64&prefix={}",
                    encode_key(&prefix)
                );
                if let Some(after) = &after {
                    path.push_str(&format!("&after={after}"));
                }
                let response = router.send(router.request(Method::GET, &path)).await?;
                let page: Page = response.json().await.context("reading the key list")?;
                for key in &page.keys {
                    out.write_all(&BASE64.decode(key).context("a listed key is not base64")?)?;
                    out.write_all(b"\n")?;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
    }
    Ok(())
}

fn http_client(connection: &Connection) -> anyhow::Result<reqwest::Client> {
    caskade_common::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder();
    match &connection.ca {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
            builder = builder.tls_certs_only([reqwest::Certificate::from_pem(&pem)?]);
        }
        None if connection.url.starts_with("https://") => {
            bail!(
                "no CA certificate: pass --ca or set CASKADE_CA (caskade local writes <data-dir>/certs/ca.pem)"
            )
        }
        None => {}
    }
    Ok(builder.build()?)
}

/// Returns the response if it is a success, else the router's error as an error.
async fn checked(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => bail!(
            "{} {}: {}",
            status.as_u16(),
            body.error.code,
            body.error.message
        ),
        Err(_) => bail!("{status}: {text}"),
    }
}

/// Percent-encodes every byte except unreserved characters and `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &byte in key.as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_byte_by_byte() {
        assert_eq!(encode_key("a/b c"), "a/b%20c");
        assert_eq!(encode_key("é%+?"), "%C3%A9%25%2B%3F");
    }
}
