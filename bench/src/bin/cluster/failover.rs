//! What a client and an operator see after a node fails: rounds of writes
//! that go on until they all succeed again, the moment the Raft leader's
//! map marks the node down, the moment the router's admin page shows it,
//! and the moment the node is back in service.
//!
//! The watchers run concurrently with the writes, so that a round held up
//! by a hung node cannot delay what they observe. Every wait is bounded by
//! a deadline; what did not happen in time is `None`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use caskade_bench::http::{Failures, RouterTarget, put};
use caskade_bench::workload::Workload;
use caskade_proto::GetClusterMapRequest;
use caskade_proto::admin_client::AdminClient;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tonic::transport::Channel;

use crate::admin::Admin;

/// How often a new admin page request goes out while watching it.
const PAGE_POLL: Duration = Duration::from_millis(100);
/// How long one long poll of a node's map waits for a new epoch.
const MAP_WAIT_MS: u32 = 1000;
/// Pause after a failed long poll.
const MAP_RETRY: Duration = Duration::from_millis(50);

/// What the write rounds after a fault saw.
#[derive(Debug)]
pub struct Rounds {
    /// From the fault until the end of the first round whose writes all
    /// succeeded.
    pub first_clean: Option<Duration>,
    /// Writes that failed before that round.
    pub failed_before_clean: u64,
    /// Every failed write, by what the client was told.
    pub failures: Arc<Failures>,
    /// Rounds sent.
    pub rounds: u64,
}

/// Writes every key of `keys` (concurrently, with `query`) once per round,
/// a round starting every `every` or as soon as the previous one ends,
/// from just after the fault at `fault` until a round that started after
/// `settled` turned true succeeded entirely, or `deadline` after the fault.
pub async fn write_rounds(
    target: Arc<RouterTarget>,
    keys: Arc<Workload>,
    query: &str,
    every: Duration,
    fault: Instant,
    deadline: Duration,
    settled: watch::Receiver<bool>,
) -> Rounds {
    let query: Arc<str> = Arc::from(query);
    let failures = Arc::new(Failures::default());
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut result = Rounds {
        first_clean: None,
        failed_before_clean: 0,
        failures: Arc::clone(&failures),
        rounds: 0,
    };
    loop {
        ticker.tick().await;
        let after_settled = *settled.borrow();
        let mut round = JoinSet::new();
        for i in 0..keys.len() {
            let (target, keys, query) =
                (Arc::clone(&target), Arc::clone(&keys), Arc::clone(&query));
            round.spawn(async move { put(&target, &keys, i, &query).await });
        }
        let mut clean = true;
        while let Some(done) = round.join_next().await {
            // A write task cannot panic short of a bug in the client; count
            // it as failed rather than lose it.
            if let Ok(Err(failure)) = &done {
                failures.record(failure);
            }
            clean &= matches!(done, Ok(Ok(())));
        }
        result.rounds += 1;
        if clean && result.first_clean.is_none() {
            result.first_clean = Some(fault.elapsed());
            result.failed_before_clean = failures.total();
        }
        if (clean && after_settled) || fault.elapsed() > deadline {
            return result;
        }
    }
}

/// The time from `since` until the router's admin page first shows
/// `condition`, to within [`PAGE_POLL`]. A page request goes out every
/// [`PAGE_POLL`] without waiting for the earlier ones (a page waits up to
/// the router's node timeout for a node that does not answer); the page
/// shows the router's view as the request arrived, so the earliest request
/// sent whose page shows the condition dates it.
pub async fn page_shows<C>(
    admin: Admin,
    since: Instant,
    deadline: Duration,
    condition: C,
) -> Option<Duration>
where
    C: Fn(&Value) -> bool + Send + Sync + 'static,
{
    let condition = Arc::new(condition);
    let mut requests = JoinSet::new();
    let mut ticker = tokio::time::interval(PAGE_POLL);
    let mut first: Option<Instant> = None;
    loop {
        let sending = first.is_none() && since.elapsed() < deadline;
        tokio::select! {
            _ = ticker.tick(), if sending => {
                let (admin, condition) = (admin.clone(), Arc::clone(&condition));
                requests.spawn(async move {
                    let sent = Instant::now();
                    let shows = admin.cluster_page().await.is_ok_and(|page| condition(&page));
                    (sent, shows)
                });
            }
            Some(done) = requests.join_next() => {
                if let Ok((sent, true)) = done {
                    first = Some(first.map_or(sent, |f| f.min(sent)));
                }
            }
            else => break,
        }
    }
    first.map(|f| f.saturating_duration_since(since))
}

/// The time from `since` until the map of the node `admin` talks to (the
/// Raft leader), long-polled, marks node `victim` down: when the group
/// committed it, as that node applied it.
pub async fn map_marks_down(
    mut admin: AdminClient<Channel>,
    victim: u32,
    since: Instant,
    deadline: Duration,
) -> Option<Duration> {
    let mut after_epoch = 0;
    while since.elapsed() < deadline {
        let request = GetClusterMapRequest {
            after_epoch,
            wait_ms: MAP_WAIT_MS,
        };
        match admin.get_cluster_map(request).await {
            Ok(answer) => {
                if let Some(map) = answer.into_inner().map {
                    if map.nodes.iter().any(|n| n.id == victim && n.down) {
                        return Some(since.elapsed());
                    }
                    after_epoch = map.epoch;
                }
            }
            Err(_) => tokio::time::sleep(MAP_RETRY).await,
        }
    }
    None
}
