//! The admin commands, through the router's admin API (they need an admin
//! token): `caskade nodes` lists the cluster's nodes, `caskade nodes add ID
//! ADDR` and `caskade nodes remove ID` change it, and `caskade status`
//! shows each node's state, readiness, breaker, Raft role, data and
//! replication lag (`--json`: the router's whole admin page).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use caskade_common::config::validate_addr;

use crate::client::{Connection, Router};

/// How long `nodes remove` goes on asking while the others pull a node's
/// ranges (the router itself holds each request up to a minute).
const REMOVE_PATIENCE: Duration = Duration::from_secs(600);
/// The pause before asking again after the router answered 202.
const REMOVE_PAUSE: Duration = Duration::from_secs(1);

/// An admin command.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// List the cluster's nodes; `add` or `remove` one.
    Nodes {
        #[command(subcommand)]
        change: Option<NodesChange>,
    },
    /// One line per node: state, readiness, breaker, Raft role, keys,
    /// bytes, share of dead bytes and replication lag from each peer.
    Status {
        /// The router's admin page as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// A change of the cluster's nodes.
#[derive(Debug, clap::Subcommand)]
pub enum NodesChange {
    /// Add a running node (with the cluster's certificates) at ADDR
    /// (`host:port` of its gRPC listener).
    Add {
        /// The new node's id: unique, never reused, from 1.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        id: u32,
        /// Its gRPC address, `host:port`.
        addr: String,
    },
    /// Remove a node: a node that is up is drained first (its ranges move
    /// to the others); one marked down is removed at once.
    Remove {
        /// The node's id.
        id: u32,
        /// Remove it at once, without draining (a node known to be gone).
        #[arg(long)]
        force: bool,
    },
}

/// Runs one admin command, writing what it prints to `out`.
pub async fn run(
    connection: &Connection,
    command: AdminCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Checked before anything is sent: a bad address changes nothing.
    if let AdminCommand::Nodes {
        change: Some(NodesChange::Add { addr, .. }),
    } = &command
    {
        validate_addr(addr).map_err(|why| anyhow::anyhow!("address: {why}"))?;
    }
    let router = Router::new(connection)?;
    match command {
        AdminCommand::Nodes { change: None } => {
            let page = cluster_page(&router).await?;
            out.write_all(nodes_table(&page).as_bytes())?;
        }
        AdminCommand::Nodes {
            change: Some(NodesChange::Add { id, addr }),
        } => {
            let request = router
                .request(Method::POST, "/admin/v1/nodes")
                .json(&json!({ "id": id, "addr": addr }));
            let map: Value = router.send(request).await?.json().await?;
            writeln!(
                out,
                "node {id} added at {addr}; cluster map epoch {}",
                map["epoch"]
            )?;
        }
        AdminCommand::Nodes {
            change: Some(NodesChange::Remove { id, force }),
        } => {
            let path = format!(
                "/admin/v1/nodes/{id}{}",
                if force { "?force=true" } else { "" }
            );
            // 202: the others still pull from the node; the same request
            // again finishes the removal once they are done.
            let started = Instant::now();
            let map: Value = loop {
                let response = router.send(router.request(Method::DELETE, &path)).await?;
                if response.status() != StatusCode::ACCEPTED {
                    break response.json().await?;
                }
                let waited = started.elapsed();
                if waited > REMOVE_PATIENCE {
                    bail!(
                        "node {id} is still being drained after {}s; it stays leaving, and the same command again finishes the removal",
                        waited.as_secs()
                    );
                }
                eprintln!(
                    "node {id} is being drained ({}s): the others still pull its ranges; Ctrl-C leaves it leaving, and the same command again finishes the removal",
                    waited.as_secs()
                );
                tokio::time::sleep(REMOVE_PAUSE).await;
            };
            writeln!(out, "node {id} removed; cluster map epoch {}", map["epoch"])?;
        }
        AdminCommand::Status { json } => {
            let page = cluster_page(&router).await?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &page)?;
                writeln!(out)?;
            } else {
                out.write_all(status_table(&page).as_bytes())?;
            }
        }
    }
    Ok(())
}

async fn cluster_page(router: &Router) -> anyhow::Result<Value> {
    let response = router
        .send(router.request(Method::GET, "/admin/v1/cluster"))
        .await
        .context("GET /admin/v1/cluster")?;
    response.json().await.context("reading the admin page")
}

fn nodes_of(page: &Value) -> &[Value] {
    page["nodes"].as_array().map_or(&[], Vec::as_slice)
}

/// `caskade nodes`: id, address, state, whether marked down, readiness.
fn nodes_table(page: &Value) -> String {
    let rows = nodes_of(page).iter().map(node_cells).collect();
    let mut table = format!("cluster map epoch {}\n", page["epoch"]);
    table.push_str(&columns(
        &["NODE", "ADDRESS", "STATE", "DOWN", "READY"],
        rows,
    ));
    table
}

/// The cells both tables start with: id, address, state, whether marked
/// down, readiness.
fn node_cells(n: &Value) -> Vec<String> {
    vec![
        n["id"].to_string(),
        text(&n["addr"]),
        text(&n["state"]),
        yes_no(&n["down"]),
        yes_no(&n["ready"]),
    ]
}

/// `caskade status`: a line per node.
fn status_table(page: &Value) -> String {
    let rows = nodes_of(page)
        .iter()
        .map(|n| {
            let stats = &n["stats"];
            let live = stats["live_bytes"].as_u64();
            let dead = stats["dead_bytes"].as_u64();
            let dead_share = match (live, dead) {
                (Some(live), Some(dead)) if live + dead > 0 => {
                    format!("{:.0}%", 100.0 * dead as f64 / (live + dead) as f64)
                }
                (Some(_), Some(_)) => "0%".to_string(),
                _ => "-".to_string(),
            };
            // The node's own view of each peer; why it gave none, if not.
            let lag = match (stats["replication"].as_array(), stats["error"].as_str()) {
                (Some(peers), _) => peers
                    .iter()
                    .map(|p| match p["reachable"].as_bool() {
                        Some(false) => format!("{}:unreachable", p["peer"]),
                        _ => format!("{}:{}", p["peer"], p["lag_records"]),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                (None, Some(error)) => format!("no stats: {error}"),
                (None, None) => "-".to_string(),
            };
            let mut cells = node_cells(n);
            cells.extend([
                text(&n["breaker"]),
                text(&stats["raft"]["role"]),
                stats["keys"]
                    .as_u64()
                    .map_or("-".to_string(), |k| k.to_string()),
                live.map_or("-".to_string(), bytes),
                dead_share,
                lag,
            ]);
            cells
        })
        .collect();
    let mut table = format!(
        "cluster map epoch {}, Raft leader {}\n",
        page["epoch"],
        text(&page["leader"])
    );
    table.push_str(&columns(
        &[
            "NODE",
            "ADDRESS",
            "STATE",
            "DOWN",
            "READY",
            "BREAKER",
            "RAFT",
            "KEYS",
            "LIVE",
            "DEAD%",
            "LAG (PEER:SEQS)",
        ],
        rows,
    ));
    table
}

/// A JSON string's text, or a number's; `-` for anything else.
fn text(value: &Value) -> String {
    value.as_str().map_or_else(
        || {
            value
                .as_u64()
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        },
        str::to_string,
    )
}

fn yes_no(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
    .to_string()
}

/// `n` bytes in B, KiB, MiB or GiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `header` and `rows` in columns padded to their widest cell.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut table = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        table.push_str(cells.join("  ").trim_end());
        table.push('\n');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_has_a_line_per_node() {
        let page = json!({
            "epoch": 4,
            "leader": 1,
            "nodes": [
                {"id": 1, "addr": "a:1", "state": "active", "down": false, "ready": true,
                 "breaker": "closed", "stats": {"keys": 10, "live_bytes": 3072, "dead_bytes": 1024,
                 "raft": {"role": "leader"}, "replication": [{"peer": 2, "lag_records": 0},
                 {"peer": 3, "lag_records": 0, "reachable": false}]}},
                {"id": 2, "addr": "b:1", "state": "active", "down": true, "ready": false,
                 "breaker": "open", "stats": {"error": "unavailable"}},
            ],
        });
        let table = status_table(&page);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("epoch 4") && lines[0].contains("leader 1"));
        assert!(lines[2].contains("leader") && lines[2].contains("3.0 KiB"));
        assert!(
            lines[2].contains("25%") && lines[2].ends_with("2:0 3:unreachable"),
            "{table}"
        );
        assert!(
            lines[3].contains("yes") && lines[3].contains("open"),
            "{table}"
        );
        assert!(lines[3].ends_with("no stats: unavailable"), "{table}");
    }
}
