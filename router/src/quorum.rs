//! Reads at `r=quorum`: ask every replica of the key at once, answer with
//! the newest version once a majority of the preference list has answered,
//! and repair the replicas among them that answered with an older one.
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
    let mut answers: Vec<(Arc<NodeHandle>, GetResponse)> = Vec::with_capacity(needed);
    let mut last_error = ApiError::Unavailable;
    while answers.len() < needed {
        if answers.len() + asked.len() < needed {
            return Err(last_error);
        }
        match asked.join_next().await {
            Some(Ok((node, Ok(answer)))) => answers.push((node, answer)),
            Some(Ok((_, Err(error)))) => last_error = error,
            Some(Err(_)) | None => last_error = ApiError::Internal,
        }
    }
    // The slower replicas are not waited for (dropping the set cancels them).
    drop(asked);
    let newest = answers
        .iter()
        .map(|(_, answer)| version_of(answer))
        .max()
        .unwrap_or_default();
    let Some((_, winner)) = answers.iter().find(|(_, a)| version_of(a) == newest) else {
        return Err(ApiError::Internal);
    };
    let winner = winner.clone();
    let answers_len = answers.len();
    let stale: Vec<Arc<NodeHandle>> = answers
        .into_iter()
        .filter(|(_, answer)| version_of(answer) < newest)
        .map(|(node, _)| node)
        .collect();
    if let (false, Some(version)) = (stale.is_empty(), winner.version) {
        let record = ReplicatedRecord {
            key: key.to_vec().into(),
            value: winner.value.clone(),
            tombstone: !winner.found,
            version: Some(version),
            expires_at_ms: if winner.found {
                winner.expires_at_ms
            } else {
                0
            },
        };
        // The newest copy is written back to a majority before it is
        // returned: a later read then finds it whatever replicas it asks,
        // even if the write that made it is still in flight or failed.
        let holding = answers_len - stale.len();
        let repaired = repair(stale, record, view.map.epoch).await;
        if holding + repaired < needed {
            return Err(ApiError::Unavailable);
        }
    }
    Ok(winner)
}

/// A replica's version of the key; `(0, 0)` if it holds no record of it.
fn version_of(answer: &GetResponse) -> (u64, u32) {
    answer.version.map_or((0, 0), |v| (v.hlc, v.origin))
}

/// Sends `record` to each of `stale` at once, under map `epoch`; how many
/// applied it.
async fn repair(stale: Vec<Arc<NodeHandle>>, record: ReplicatedRecord, epoch: u64) -> usize {
    let repairs = stale.into_iter().map(|node| {
        let request = ApplyRequest {
            records: vec![record.clone()],
            epoch,
        };
        async move {
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
    });
    futures_util::future::join_all(repairs)
        .await
        .into_iter()
        .filter(|&done| done)
        .count()
}
