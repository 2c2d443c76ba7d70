//! Map churn: nodes added and removed again, one after the other, through
//! the router's admin API, as an operator would.
//!
//! Each cycle starts a spare node process with a new id (ids are never
//! reused), adds it (`POST /admin/v1/nodes`: a Raft learner that catches
//! up, then a ring member), removes it (`DELETE /admin/v1/nodes/{id}`:
//! leaving, drained by the others, removed) and kills the process. Only the
//! two admin calls are timed; starting the process is not.

use std::time::{Duration, Instant};

use anyhow::bail;
use reqwest::StatusCode;

use crate::deployment::Deployment;

/// How many times one change is retried after a 409 (the map moved under
/// it, say because the leader marked a node down or up).
const CONFLICT_RETRIES: u32 = 5;
/// How many times a DELETE answered 202 (still draining) is sent again.
const DRAIN_RETRIES: u32 = 10;

/// What the churn did.
#[derive(Debug, Default)]
pub struct Churn {
    /// Each add, from the POST to its answer.
    pub adds: Vec<Duration>,
    /// Each removal, from the first DELETE to the answer that removed it.
    pub removes: Vec<Duration>,
    /// Changes refused with 409 and sent again.
    pub conflicts: u32,
}

/// Adds and removes spare nodes, ids from `first_id` on, until `until`
/// (the cycle under way then is finished), pausing `pause` after each change.
pub async fn churn(
    d: &mut Deployment,
    first_id: u32,
    until: Instant,
    pause: Duration,
) -> anyhow::Result<Churn> {
    let mut churn = Churn::default();
    let mut id = first_id;
    while Instant::now() < until {
        let addr = d.start_spare(id).await?;
        let admin = d.admin().clone();

        let started = Instant::now();
        let mut conflicts = 0;
        loop {
            let (status, body) = admin.add_node(id, addr).await?;
            match status {
                StatusCode::OK => break,
                StatusCode::CONFLICT if conflicts < CONFLICT_RETRIES => conflicts += 1,
                _ => bail!("adding node {id} answered {status}: {body}"),
            }
        }
        churn.adds.push(started.elapsed());
        tokio::time::sleep(pause).await;

        let started = Instant::now();
        let mut drains = 0;
        loop {
            let (status, body) = admin.remove_node(id).await?;
            match status {
                StatusCode::OK => break,
                StatusCode::ACCEPTED if drains < DRAIN_RETRIES => drains += 1,
                StatusCode::CONFLICT if conflicts < CONFLICT_RETRIES => conflicts += 1,
                _ => bail!("removing node {id} answered {status}: {body}"),
            }
        }
        churn.removes.push(started.elapsed());
        churn.conflicts += conflicts;
        d.discard(id)?;
        id += 1;
        tokio::time::sleep(pause).await;
    }
    Ok(churn)
}
