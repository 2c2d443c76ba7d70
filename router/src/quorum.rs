//! Reads at `r=quorum`: ask every replica of the key at once, answer with
//! the newest version once a majority of the preference list holds it, and
//! repair the replicas that answered with an older one: those of the first
//! majority before answering, the slower ones when they answer (within
//! their deadline; the client does not wait for them). A stale replica
//! that refuses its repair (a full disk) is made up for by the next answer.
//!
//! Newest means the highest version, tombstones and expired values
//! included: a replica that still holds a value deleted elsewhere is stale,
//! and is repaired with the tombstone. The answer waits for those repairs
//! (`Replication/Apply` under the router's map epoch; last writer wins on
//! the node, so a repair racing a newer write changes nothing): the newest
//! copy is on a majority before it is returned, so no later quorum read can
//! return an older one (reads are linearizable, as in ABD). Repairs are
//! counted in `caskade_router_read_repairs_total`.

use std::sync::Arc;

use caskade_proto::{ApplyRequest, GetRequest, GetResponse, ReadLevel, ReplicatedRecord};
use metrics::counter;
use tokio::task::JoinSet;

use crate::cluster::ClusterView;
use crate::error::ApiError;
use crate::forward;
use crate::nodes::NodeHandle;

/// The newest answer of a majority of `key`'s replicas.
pub async fn read(
    view: &ClusterView,
    key: &[u8],
    request_id: &str,
) -> Result<GetResponse, ApiError> {
    let list = view.preference_list(key);
    let needed = list.len() / 2 + 1;
    let candidates: Vec<Arc<NodeHandle>> = list
        .into_iter()
        .filter(|n| !n.declined() && !view.is_down(n.id))
        .collect();
    if candidates.len() < needed {
        return Err(ApiError::Unavailable);
    }
    let mut asked = JoinSet::new();
    for node in candidates {
        let message = GetRequest {
            key: key.to_vec().into(),
            read_level: ReadLevel::Quorum as i32,
        };
        let request_id = request_id.to_string();
        asked.spawn(async move {
            let answer =
                forward::to_one_node(&node, &request_id, message, |mut kv, req| async move {
                    kv.get(req).await
                })
                .await;
            (node, answer)
        });
    }
    let mut answers: Vec<Answer> = Vec::with_capacity(needed);
    let mut last_error = ApiError::Unavailable;
    loop {
        // Wait for a majority of answers, or for one more when the
        // majority so far could not be brought to one version.
        let wanted = needed.max(answers.len() + usize::from(answers.len() >= needed));
        while answers.len() < wanted {
            if answers.len() + asked.len() < needed {
                return Err(last_error);
            }
            match asked.join_next().await {
                Some(Ok((node, Ok(answer)))) => answers.push(Answer::new(node, answer)),
                Some(Ok((_, Err(error)))) => last_error = error,
                Some(Err(_)) => last_error = ApiError::Internal,
                // Every replica answered, and too few hold the newest.
                None => return Err(ApiError::Unavailable),
            }
        }
        let newest = answers.iter().map(|a| a.version).max().unwrap_or_default();
        let winner = answers
            .iter()
            .find(|a| a.version == newest)
            .map(|a| a.response.clone())
            .ok_or(ApiError::Internal)?;
        // The newest copy is written back to a majority before it is
        // returned: a later read then finds it whatever replicas it asks,
        // even if the write that made it is still in flight or failed.
        if let Some(record) = record_of(key, &winner) {
            repair_stale(&mut answers, newest, &record, view.map.epoch).await;
            if answers.iter().filter(|a| a.version == newest).count() >= needed {
                // The slower replicas are compared and repaired when they
                // answer, within their deadline; the client does not wait.
                if !asked.is_empty() {
                    tokio::spawn(repair_late(asked, newest, record, view.map.epoch));
                }
                return Ok(winner);
            }
        } else {
            // No replica holds any record of the key.
            return Ok(winner);
        }
        // A stale replica refused its repair (its disk is full, say):
        // another replica's answer may complete the majority.
    }
}

/// One replica's answer to a quorum read.
struct Answer {
    node: Arc<NodeHandle>,
    response: GetResponse,
    /// The version it holds now (raised by a repair that it applied).
    version: (u64, u32),
    /// A repair was sent to it for this version (and failed if `version`
    /// is still older).
    repair_tried: Option<(u64, u32)>,
}

impl Answer {
    fn new(node: Arc<NodeHandle>, response: GetResponse) -> Answer {
        Answer {
            version: version_of(&response),
            node,
            response,
            repair_tried: None,
        }
    }
}

/// The record that repairs a stale replica with `winner`, if it holds one.
fn record_of(key: &[u8], winner: &GetResponse) -> Option<ReplicatedRecord> {
    let version = winner.version?;
    Some(ReplicatedRecord {
        key: key.to_vec().into(),
        value: winner.value.clone(),
        tombstone: !winner.found,
        version: Some(version),
        expires_at_ms: if winner.found {
            winner.expires_at_ms
        } else {
            0
        },
    })
}

/// Repairs the answers older than `newest` that were not sent it yet;
/// those that apply it hold `newest` from then on.
async fn repair_stale(
    answers: &mut [Answer],
    newest: (u64, u32),
    record: &ReplicatedRecord,
    epoch: u64,
) {
    let stale: Vec<&mut Answer> = answers
        .iter_mut()
        .filter(|a| a.version < newest && a.repair_tried != Some(newest))
        .collect();
    let repairs = stale.into_iter().map(|answer| async move {
        answer.repair_tried = Some(newest);
        if repair(&answer.node, record.clone(), epoch).await {
            answer.version = newest;
        }
    });
    futures_util::future::join_all(repairs).await;
}

/// Waits for the replicas that had not answered when the read returned,
/// and repairs those older than `newest`.
async fn repair_late(
    mut asked: JoinSet<(Arc<NodeHandle>, Result<GetResponse, ApiError>)>,
    newest: (u64, u32),
    record: ReplicatedRecord,
    epoch: u64,
) {
    while let Some(joined) = asked.join_next().await {
        if let Ok((node, Ok(answer))) = joined
            && version_of(&answer) < newest
        {
            repair(&node, record.clone(), epoch).await;
        }
    }
}

/// A replica's version of the key; `(0, 0)` if it holds no record of it.
fn version_of(answer: &GetResponse) -> (u64, u32) {
    answer.version.map_or((0, 0), |v| (v.hlc, v.origin))
}

/// Sends `record` to `node` under map `epoch`; whether it applied it.
async fn repair(node: &NodeHandle, record: ReplicatedRecord, epoch: u64) -> bool {
    let request = ApplyRequest {
        records: vec![record],
        epoch,
    };
    match node.replication().apply(request).await {
        Ok(_) => {
            counter!("caskade_router_read_repairs_total", "node" => node.id.to_string())
                .increment(1);
            tracing::debug!(node = node.id, "read repair sent");
            true
        }
        Err(status) => {
            tracing::warn!(node = node.id, code = ?status.code(), "read repair failed");
            false
        }
    }
}
