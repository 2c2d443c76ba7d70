//! The fault suites' client workload and its checks.
//!
//! Clients send random operations on a few shared keys through the router:
//! `w=quorum` writes (plain, `If-None-Match: *`, `If-Match`), deletes
//! (plain and `If-Match`) and `r=quorum` reads. Every operation is recorded
//! in a [`History`] with what its client was told: an answer, "not
//! applied", or "unknown" (no answer, or an answer saying so).
//!
//! The checks, once the clients stopped:
//! - each key's history, with a final read of every key after the faults
//!   healed, is linearizable ([`crate::history`]): nothing acknowledged was
//!   lost or came back, and no read saw what it could not have;
//! - [`Verdict::lost`] lists, independently of that search, what the final
//!   read of a key contradicts beyond doubt: an acknowledged write or delete
//!   nothing could have superseded; a value whose write ended before an
//!   acknowledged write or delete of the key began (a lost update, or a
//!   delete undone); a value the router said was not applied; a value no
//!   client wrote;
//! - every replica of every key holds the same version ([`converged`]).
//!
//! A failure prints the history of the key concerned.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caskade_common::ring::Ring;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::cluster::{NodeCopy, TestCluster};
use crate::history::{self, Event, History, Op, Outcome, Report, Response};
use crate::rng::Rng;

/// A client gives up on an answer after this (the outcome is then unknown).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Client id of the final reads in the history.
const FINAL_READER: u32 = u32::MAX;

/// How a client's request ended, for the history.
enum Ended {
    Answered(Response),
    NotApplied,
    Unknown,
}

/// Clients at work on shared keys; [`Workload::stop`] ends them.
#[derive(Debug)]
pub struct Workload {
    keys: Vec<(String, String)>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    clients: JoinSet<()>,
    token: String,
    client: reqwest::Client,
}

impl Workload {
    /// Starts `clients` clients on keys `{prefix}-0` … `{prefix}-{keys - 1}`,
    /// their choices drawn from `seed`.
    pub fn start(
        tc: &TestCluster,
        prefix: &str,
        keys: usize,
        clients: u32,
        seed: u64,
    ) -> anyhow::Result<Workload> {
        let keys = (0..keys).map(|k| format!("{prefix}-{k}")).collect();
        Self::start_on(tc, keys, clients, seed)
    }

    /// Starts `clients` clients on `keys`.
    pub fn start_on(
        tc: &TestCluster,
        keys: Vec<String>,
        clients: u32,
        seed: u64,
    ) -> anyhow::Result<Workload> {
        let keys: Arc<Vec<(String, String)>> = Arc::new(
            keys.into_iter()
                .map(|key| {
                    let url = tc.kv_url(&key);
                    (key, url)
                })
                .collect(),
        );
        let history = Arc::new(History::new());
        let stop = Arc::new(AtomicBool::new(false));
        let mut rng = Rng(seed);
        let mut set = JoinSet::new();
        for id in 0..clients {
            set.spawn(client_loop(
                id,
                Rng(rng.next_u64()),
                tc.client_with_timeout(CLIENT_TIMEOUT)?,
                Arc::clone(&keys),
                tc.writer_token.clone(),
                Arc::clone(&history),
                Arc::clone(&stop),
            ));
        }
        Ok(Workload {
            keys: keys.as_ref().clone(),
            history,
            stop,
            clients: set,
            token: tc.writer_token.clone(),
            client: tc.client_with_timeout(CLIENT_TIMEOUT)?,
        })
    }

    /// The keys the clients work on.
    pub fn keys(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Operations recorded so far.
    pub fn operations(&self) -> usize {
        self.history.events().len()
    }

    /// Stops the clients and waits until each has had its last answer.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        while let Some(done) = self.clients.join_next().await {
            if let Err(error) = done {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }

    /// After [`Workload::stop`] and once the faults healed: reads every key
    /// at `r=quorum` (retrying what is not answered), adds the reads to the
    /// history and checks it.
    pub async fn verdict(&self) -> Verdict {
        for (key, url) in &self.keys {
            let mut rng = Rng(0);
            for _ in 0..20 {
                let call = self.history.invoke(FINAL_READER, key.clone(), Op::Get);
                match send(&self.client, url, &self.token, &Op::Get).await {
                    Ended::Answered(response) => {
                        self.history.returned(call, response);
                        break;
                    }
                    Ended::NotApplied => self.history.failed(call),
                    Ended::Unknown => self.history.unknown(call),
                }
                tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
            }
        }
        Verdict::of(self.history.events())
    }
}

/// What the checks found.
#[derive(Debug)]
pub struct Verdict {
    /// Writes and deletes the clients were told took effect.
    pub acknowledged: usize,
    /// Reads answered.
    pub reads: usize,
    /// Operations the router said were not applied.
    pub refused: usize,
    /// Operations whose outcome the client never learnt.
    pub unknown: usize,
    /// Acknowledged writes and deletes the final state contradicts, with
    /// nothing that could explain it (see the module documentation): the
    /// key and what happened.
    pub lost: Vec<(String, String)>,
    /// The linearizability check of the whole history.
    pub report: Report,
    events: Vec<Event>,
}

impl Verdict {
    fn of(events: Vec<Event>) -> Verdict {
        let mut verdict = Verdict {
            acknowledged: 0,
            reads: 0,
            refused: 0,
            unknown: 0,
            lost: Vec::new(),
            report: history::check(&events),
            events: Vec::new(),
        };
        for event in events.iter().filter(|e| e.client != FINAL_READER) {
            match (&event.outcome, &event.op) {
                (Outcome::Ok { .. }, Op::Get) => verdict.reads += 1,
                (Outcome::Ok { .. }, _) => verdict.acknowledged += 1,
                (Outcome::Failed { .. }, _) => verdict.refused += 1,
                (Outcome::Unknown, _) => verdict.unknown += 1,
            }
        }
        verdict.lost = lost(&events);
        verdict.events = events;
        verdict
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.report.is_linearizable() && self.lost.is_empty()
    }

    /// One line of counts.
    pub fn counts(&self) -> String {
        format!(
            "{} acknowledged writes and deletes, {} reads answered, {} refused, {} unknown, {} lost",
            self.acknowledged,
            self.reads,
            self.refused,
            self.unknown,
            self.lost.len()
        )
    }

    /// Every operation, the final reads included (client `u32::MAX`).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// `key`'s history, one operation a line.
    pub fn history_of(&self, key: &str) -> String {
        let mut out = String::new();
        for event in self.events.iter().filter(|e| e.key == key) {
            out.push_str(&format!(
                "  client {} at {:.3}s: {:?} -> {:?}\n",
                event.client,
                event.invoked as f64 / 1e9,
                event.op,
                event.outcome
            ));
        }
        out
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.counts())?;
        for (key, why) in &self.lost {
            writeln!(f, "\nlost: {why}; the history of {key:?}:")?;
            f.write_str(&self.history_of(key))?;
        }
        write!(f, "{}", self.report)
    }
}

/// Acknowledged operations the final read of their key contradicts
/// beyond any doubt. Values are unique per write, so a value names the
/// write that stored it.
fn lost(events: &[Event]) -> Vec<(String, String)> {
    let returned = |e: &Event| match e.outcome {
        Outcome::Ok { returned, .. } => Some(returned),
        _ => None,
    };
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_key.entry(event.key.as_str()).or_default().push(event);
    }
    let mut lost = Vec::new();
    for (key, events) in by_key {
        let Some(last_read) = events
            .iter()
            .filter(|e| e.client == FINAL_READER)
            .find_map(|e| match &e.outcome {
                Outcome::Ok { response, .. } => Some(response.clone()),
                _ => None,
            })
        else {
            lost.push((key.to_string(), "no final read was answered".into()));
            continue;
        };
        let final_value = match &last_read {
            Response::Found { value, .. } => Some(value.as_str()),
            _ => None,
        };
        if let Some(value) = final_value {
            let wrote = events
                .iter()
                .filter(|e| e.op.written_value() == Some(value))
                .collect::<Vec<_>>();
            match wrote.as_slice() {
                [] => lost.push((
                    key.to_string(),
                    format!("the final read returns {value:?}, which no client wrote"),
                )),
                [write] => {
                    if matches!(write.outcome, Outcome::Failed { .. }) {
                        lost.push((
                            key.to_string(),
                            format!("the final read returns {value:?}, whose write the router said was not applied"),
                        ));
                    }
                    if let Some(ended) = returned(write)
                        && let Some(later) = events
                            .iter()
                            .find(|e| acknowledged_mutation(e) && e.invoked > ended)
                    {
                        lost.push((
                            key.to_string(),
                            format!(
                                "the final read returns {value:?}, written before {:?} (acknowledged) began",
                                later.op
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        let acknowledged = acknowledged_mutation;
        // Writes and deletes that may have taken effect.
        let mutations = || {
            events.iter().filter(|e| {
                !matches!(e.op, Op::Get)
                    && (acknowledged(e) || matches!(e.outcome, Outcome::Unknown))
            })
        };
        for event in mutations().filter(|e| acknowledged(e)) {
            // Could anything have come after it? Any mutation not known to
            // have ended before it was sent.
            let superseded = mutations().any(|other| {
                !std::ptr::eq(*other, *event) && returned(other).is_none_or(|r| r > event.invoked)
            });
            if superseded {
                continue;
            }
            match event.op.written_value() {
                Some(value) if final_value != Some(value) => lost.push((
                    key.to_string(),
                    format!("acknowledged write of {value:?} reads back as {last_read:?}"),
                )),
                None if final_value.is_some() => lost.push((
                    key.to_string(),
                    format!("acknowledged delete, yet it reads back as {last_read:?}"),
                )),
                _ => {}
            }
        }
    }
    lost
}

/// Whether `event` is a write or delete that the server said took effect.
fn acknowledged_mutation(event: &Event) -> bool {
    matches!(
        &event.outcome,
        Outcome::Ok {
            response: Response::Written { .. } | Response::Deleted,
            ..
        }
    )
}

/// Whether every replica of every key the nodes hold has the same version:
/// polls until so, for up to `deadline`; on failure, says which keys
/// differ and how (see [`Verdict::history_of`] for their histories).
pub async fn converged(tc: &TestCluster, deadline: Duration) -> Result<(), String> {
    let started = std::time::Instant::now();
    loop {
        let differences = differences(tc).await;
        match differences {
            Ok(found) if found.is_empty() => return Ok(()),
            Ok(found) if started.elapsed() > deadline => return Err(found.join("\n")),
            Err(error) if started.elapsed() > deadline => return Err(error),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Keys whose replicas under the router's current map differ, read from
/// each node of the map.
async fn differences(tc: &TestCluster) -> Result<Vec<String>, String> {
    let page = tc
        .admin_cluster()
        .await
        .map_err(|e| format!("reading the cluster page: {e:#}"))?;
    let members: Vec<u32> = page["nodes"]
        .as_array()
        .ok_or("the cluster page lists no nodes")?
        .iter()
        .filter(|n| n["state"] != "leaving")
        .filter_map(|n| u32::try_from(n["id"].as_u64()?).ok())
        .collect();
    let number = |field: &str| {
        page[field]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(format!("the cluster page has no {field}"))
    };
    let ring = Ring::new(
        &members,
        number("vnodes_per_node")?,
        number("replication_factor")?,
    );
    let mut copies: HashMap<u32, BTreeMap<Vec<u8>, NodeCopy>> = HashMap::new();
    for &id in &members {
        let scan = tc
            .scan_node(id)
            .await
            .map_err(|e| format!("scanning node {id}: {e:#}"))?;
        copies.insert(id, scan);
    }
    let mut keys: Vec<&Vec<u8>> = copies.values().flat_map(|c| c.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut found = Vec::new();
    for key in keys {
        let replicas = ring.preference_list(key);
        let held: Vec<(u32, Option<(u64, u32)>)> = replicas
            .iter()
            .map(|id| (*id, copies.get(id).and_then(|c| c.get(key)).map(|c| c.0)))
            .collect();
        if held.windows(2).any(|w| w[0].1 != w[1].1) {
            found.push(format!(
                "{}: versions by replica {held:?}",
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(found)
}

/// Sends one operation and classifies the answer.
async fn send(client: &reqwest::Client, url: &str, token: &str, op: &Op) -> Ended {
    let request = match op {
        Op::Get => client.get(format!("{url}?r=quorum")),
        Op::Put { value } => client.put(format!("{url}?w=quorum")).body(value.clone()),
        Op::PutIfAbsent { value } => client
            .put(format!("{url}?w=quorum"))
            .header("if-none-match", "*")
            .body(value.clone()),
        Op::PutIfMatch { value, etag } => client
            .put(format!("{url}?w=quorum"))
            .header("if-match", format!("\"{etag}\""))
            .body(value.clone()),
        Op::Delete => client.delete(format!("{url}?w=quorum")),
        Op::DeleteIfMatch { etag } => client
            .delete(format!("{url}?w=quorum"))
            .header("if-match", format!("\"{etag}\"")),
    };
    let Ok(response) = request.bearer_auth(token).send().await else {
        return Ended::Unknown;
    };
    let status = response.status();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_string());
    let Ok(body) = response.bytes().await else {
        return Ended::Unknown;
    };
    match (status, op, etag) {
        (StatusCode::OK, Op::Get, Some(etag)) => Ended::Answered(Response::Found {
            value: String::from_utf8_lossy(&body).into_owned(),
            etag,
        }),
        (StatusCode::NOT_FOUND, Op::Get, _) => Ended::Answered(Response::NotFound),
        (StatusCode::OK | StatusCode::CREATED, _, Some(etag)) => {
            Ended::Answered(Response::Written { etag })
        }
        (StatusCode::NO_CONTENT, _, _) => Ended::Answered(Response::Deleted),
        (StatusCode::PRECONDITION_FAILED, _, _) => Ended::Answered(Response::PreconditionFailed),
        (StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE, _, _) => {
            Ended::NotApplied
        }
        (status, _, _) if status.is_server_error() => {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            if body["error"]["outcome"] == "not_applied" {
                Ended::NotApplied
            } else {
                Ended::Unknown
            }
        }
        (status, op, _) => panic!(
            "{op:?} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// One client: random operations on the shared keys until told to stop.
async fn client_loop(
    id: u32,
    mut rng: Rng,
    client: reqwest::Client,
    keys: Arc<Vec<(String, String)>>,
    token: String,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    // The last version this client saw of each key, for `If-Match`.
    let mut seen: HashMap<usize, String> = HashMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let k = rng.below(keys.len() as u64) as usize;
        let (key, url) = &keys[k];
        n += 1;
        let value = format!("c{id}-{n}");
        let op = match (rng.below(10), seen.get(&k)) {
            (0..=3, _) => Op::Get,
            (4, _) => Op::Put { value },
            (5, _) => Op::PutIfAbsent { value },
            (6 | 7, Some(etag)) => Op::PutIfMatch {
                value,
                etag: etag.clone(),
            },
            (8, Some(etag)) => Op::DeleteIfMatch { etag: etag.clone() },
            (6..=8, None) => Op::PutIfAbsent { value },
            _ => Op::Delete,
        };
        let call = history.invoke(id, key.clone(), op.clone());
        match send(&client, url, &token, &op).await {
            Ended::Answered(response) => {
                match &response {
                    Response::Written { etag } | Response::Found { etag, .. } => {
                        seen.insert(k, etag.clone());
                    }
                    Response::Deleted | Response::NotFound => {
                        seen.remove(&k);
                    }
                    Response::PreconditionFailed => {}
                }
                history.returned(call, response);
            }
            Ended::NotApplied => history.failed(call),
            Ended::Unknown => history.unknown(call),
        }
    }
}
