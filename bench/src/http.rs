//! Load through the router: puts or checked gets over HTTPS (HTTP/2), a
//! fixed workload or as many puts as fit in a span of time, and what a put
//! that failed was told.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, ensure};

use crate::drive::{Phase, drive, drive_for};
use crate::workload::{VALUE_LEN, Workload};

/// Where requests go: the client, the router's base URL, and the
/// `Authorization` header value.
pub type RouterTarget = (reqwest::Client, String, String);

/// Puts every key of `workload`, or reads them all back in random order
/// and checks each value, through the router with `streams` requests in
/// flight; `query` (such as `w=quorum`, or empty) is added to every URL.
/// The first failure ends the phase with an error.
pub async fn router_phase(
    target: &Arc<RouterTarget>,
    streams: usize,
    workload: &Arc<Workload>,
    gets: bool,
    query: &str,
) -> anyhow::Result<Phase> {
    let (target, workload) = (Arc::clone(target), Arc::clone(workload));
    let order = Arc::new(workload.read_order());
    let query: Arc<str> = Arc::from(query);
    drive(streams, workload.len(), move |n| {
        let (target, workload, order, query) = (
            Arc::clone(&target),
            Arc::clone(&workload),
            Arc::clone(&order),
            Arc::clone(&query),
        );
        async move {
            if gets {
                let i = order[n] as usize;
                let (client, _, auth) = &*target;
                let url = key_url(&target, &workload, i, &query);
                let response = client.get(url).header("authorization", auth).send().await?;
                ensure!(
                    response.status().is_success(),
                    "get #{i}: {}",
                    response.status()
                );
                workload.check(i, Some(&response.bytes().await?))?;
            } else {
                put(&target, &workload, n, &query)
                    .await
                    .map_err(|failure| anyhow!("put #{n}: {failure}"))?;
            }
            Ok(())
        }
    })
    .await
}

/// Puts keys of `workload` (in order, starting again at the first after
/// the last) through the router with `streams` requests in flight until
/// `duration` has passed. A put that fails is recorded in `failures` and
/// the load goes on; the phase counts it with the others.
pub async fn router_puts_for(
    target: &Arc<RouterTarget>,
    streams: usize,
    workload: &Arc<Workload>,
    query: &str,
    duration: Duration,
    failures: &Arc<Failures>,
) -> anyhow::Result<Phase> {
    ensure!(!workload.is_empty(), "the workload has no keys");
    let (target, workload, failures) = (
        Arc::clone(target),
        Arc::clone(workload),
        Arc::clone(failures),
    );
    let query: Arc<str> = Arc::from(query);
    drive_for(streams, duration, move |n| {
        let (target, workload, query, failures) = (
            Arc::clone(&target),
            Arc::clone(&workload),
            Arc::clone(&query),
            Arc::clone(&failures),
        );
        async move {
            if let Err(failure) = put(&target, &workload, n % workload.len(), &query).await {
                failures.record(&failure);
            }
            Ok(())
        }
    })
    .await
}

/// Why a put through the router did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The router answered with this status and `error.code` (`-` if the
    /// body had none).
    Status(u16, String),
    /// The client's own timeout passed first.
    ClientTimeout,
    /// The request or its answer did not get through.
    Connection,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(status, code) => write!(f, "{status} {code}"),
            Failure::ClientTimeout => f.write_str("client timeout"),
            Failure::Connection => f.write_str("connection error"),
        }
    }
}

/// Puts key `i` of `workload` with its value; `query` (such as
/// `w=quorum`, or empty) is added to the URL.
pub async fn put(
    target: &RouterTarget,
    workload: &Workload,
    i: usize,
    query: &str,
) -> Result<(), Failure> {
    let (client, _, auth) = target;
    let mut value = [0u8; VALUE_LEN];
    workload.value_into(i, &mut value);
    let sent = client
        .put(key_url(target, workload, i, query))
        .header("authorization", auth)
        .body(value.to_vec())
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Err(Failure::ClientTimeout),
        Err(_) => return Err(Failure::Connection),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let code = match response.json::<serde_json::Value>().await {
        Ok(body) => body["error"]["code"].as_str().unwrap_or("-").to_owned(),
        Err(e) if e.is_timeout() => return Err(Failure::ClientTimeout),
        Err(_) => "-".to_owned(),
    };
    Err(Failure::Status(status.as_u16(), code))
}

/// Failed puts, counted by what they were told. The lock guards the map
/// only while one count is added or read; it is never held across an await.
#[derive(Debug, Default)]
pub struct Failures(Mutex<BTreeMap<String, u64>>);

impl Failures {
    /// Counts one failure.
    pub fn record(&self, failure: &Failure) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(failure.to_string())
            .or_default() += 1;
    }

    /// All failures counted.
    pub fn total(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }

    /// `504 timeout × 3, client timeout × 1`, or `none`.
    pub fn summary(&self) -> String {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.is_empty() {
            return "none".to_owned();
        }
        counts
            .iter()
            .map(|(what, n)| format!("{what} × {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The URL of key `i`, every byte percent-encoded, with `query` (if any).
fn key_url(target: &RouterTarget, workload: &Workload, i: usize, query: &str) -> String {
    let key: String = workload
        .key(i)
        .iter()
        .map(|b| format!("%{b:02X}"))
        .collect();
    let separator = if query.is_empty() { "" } else { "?" };
    format!("{}/v1/kv/{key}{separator}{query}", target.1)
}
