//! Phase 1, the idle cost: the CPU time each node process (and this one,
//! the router's) uses over a window in which no client asks anything, so
//! all of it is the cluster keeping itself together: Raft heartbeats, the
//! leader's failure probes, replication's long polls, the router's health
//! checks and map long polls. Reads `/proc`; sends nothing.

use std::time::{Duration, Instant};

use crate::deployment::Deployment;
use crate::process::cpu_time;
use crate::report::{Report, percent, secs};

/// Phase 1: CPU time of every process while nothing is asked of them.
pub async fn idle(d: &Deployment, window: Duration, report: &mut Report) -> anyhow::Result<()> {
    const PHASE: &str = "1 idle";
    eprintln!("idle for {} s…", window.as_secs());
    let leader_before = d.admin().leader().await?;
    let nodes = d.founders();
    let pids = nodes
        .iter()
        .map(|&id| d.pid(id))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let before = pids
        .iter()
        .map(|&pid| cpu_time(Some(pid)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let router_before = cpu_time(None)?;
    let started = Instant::now();
    // The measurement window itself, not a wait for a condition.
    tokio::time::sleep(window).await;
    let window = started.elapsed();
    let after = pids
        .iter()
        .map(|&pid| cpu_time(Some(pid)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let router_used = cpu_time(None)?.saturating_sub(router_before);
    let leader_after = d.admin().leader().await?;

    let share = |used: Duration| 100.0 * used.as_secs_f64() / window.as_secs_f64();
    let mut followers = Vec::new();
    let mut leader_share = None;
    for ((&id, before), after) in nodes.iter().zip(&before).zip(&after) {
        let used = share(after.saturating_sub(*before));
        let role = if id == leader_before {
            leader_share = Some(used);
            " (Raft leader)"
        } else {
            followers.push(used);
            ""
        };
        report.add(PHASE, format!("node {id}{role} CPU"), percent(used));
    }
    if let Some(used) = leader_share {
        let figure = if leader_after == leader_before {
            format!("leader (node {leader_before}) CPU")
        } else {
            format!(
                "leader CPU (node {leader_before} at the start, node {leader_after} at the end)"
            )
        };
        report.add(PHASE, figure, percent(used));
    }
    if !followers.is_empty() {
        let mean = followers.iter().sum::<f64>() / followers.len() as f64;
        report.add(PHASE, "follower CPU, mean", percent(mean));
    }
    report.add(
        PHASE,
        "router (this process) CPU",
        percent(share(router_used)),
    );
    report.add(PHASE, "window", secs(window));
    Ok(())
}
