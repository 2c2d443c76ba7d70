//! The admin commands of the `caskade` CLI against a cluster: `nodes`
//! lists the map, `status` shows a line per node (or the admin page as
//! JSON), `nodes add` and `nodes remove` change the cluster; a bad address
//! or an id in use is a clear error that changes nothing. `health` checks
//! the router and a node as a container health check would.
#![allow(clippy::unwrap_used)]

use caskade_cli::admin::{self, AdminCommand, NodesChange};
use caskade_cli::client::Connection;
use caskade_cli::health::{self, HealthArgs};
use caskade_router::config::NodePolicy;
use clap::Parser;
use std::time::Duration;

use caskade_tests::cluster::{ClusterSpec, TestCluster, poll_until};
use serde_json::Value;

/// Runs `command` as the operator; what it printed, or its error.
async fn caskade(tc: &TestCluster, command: AdminCommand) -> anyhow::Result<String> {
    let connection = Connection::new(
        tc.url.clone(),
        Some(tc.admin_token.clone()),
        Some(tc.ca_path().to_path_buf()),
    );
    let mut out = Vec::new();
    admin::run(&connection, command, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

fn nodes() -> AdminCommand {
    AdminCommand::Nodes { change: None }
}

/// The Raft leader the admin page names.
async fn page_leader(tc: &TestCluster) -> u64 {
    tc.admin_cluster().await.unwrap()["leader"]
        .as_u64()
        .unwrap()
}

async fn epoch(tc: &TestCluster) -> u64 {
    tc.admin_cluster().await.unwrap()["epoch"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_inspect_add_and_remove_nodes_from_the_cli() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, NodePolicy::default()))
        .await
        .unwrap();
    let ids = tc.node_ids();

    let listed = caskade(&tc, nodes()).await.unwrap();
    for &id in &ids {
        let line = listed
            .lines()
            .find(|l| l.starts_with(&id.to_string()))
            .unwrap_or_else(|| panic!("node {id} in {listed}"));
        assert!(line.contains(&tc.addr(id).to_string()), "{line}");
        assert!(line.contains("active") && line.ends_with("yes"), "{line}");
    }

    let status = caskade(&tc, AdminCommand::Status { json: false })
        .await
        .unwrap();
    assert_eq!(status.lines().count(), 2 + ids.len(), "{status}");
    let leader = page_leader(&tc).await;
    let leader_rows: Vec<&str> = status
        .lines()
        .skip(2)
        .filter(|l| l.split_whitespace().nth(6) == Some("leader"))
        .collect();
    assert_eq!(leader_rows.len(), 1, "{status}");
    assert!(leader_rows[0].starts_with(&leader.to_string()), "{status}");
    assert!(status.contains("closed"), "{status}");
    let json = caskade(&tc, AdminCommand::Status { json: true })
        .await
        .unwrap();
    let page: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(page["nodes"].as_array().unwrap().len(), ids.len());

    // Bad input: a clear error, and the map stays as it was.
    let before = epoch(&tc).await;
    let add = |id: u32, addr: &str| AdminCommand::Nodes {
        change: Some(NodesChange::Add {
            id,
            addr: addr.to_string(),
        }),
    };
    let bad = caskade(&tc, add(999, "not-an-address")).await.unwrap_err();
    assert!(bad.to_string().contains("is not host:port"), "{bad}");
    let taken = caskade(&tc, add(ids[0], "127.0.0.1:1")).await.unwrap_err();
    let taken = taken.to_string();
    assert!(taken.starts_with("409"), "{taken}");
    let message = format!("node {} is already in the cluster map", ids[0]);
    assert!(taken.contains(&message), "{taken}");
    assert_eq!(epoch(&tc).await, before);

    let new = tc.start_spare_node().await.unwrap();
    let added = caskade(&tc, add(new, &tc.addr(new).to_string()))
        .await
        .unwrap();
    assert!(added.starts_with(&format!("node {new} added")), "{added}");
    assert!(
        caskade(&tc, nodes())
            .await
            .unwrap()
            .contains(&tc.addr(new).to_string())
    );

    // Something for the others to pull from it while it is drained, once
    // its ranges have their primaries again.
    poll_until(
        "the new node to serve its ranges",
        Duration::from_secs(30),
        || async { tc.all_nodes_ready().await && tc.takeovers_done().await },
    )
    .await;
    for n in 0..50 {
        let response = tc
            .put_level(&format!("k-{n}"), "v", "quorum")
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    let remove = AdminCommand::Nodes {
        change: Some(NodesChange::Remove {
            id: new,
            force: false,
        }),
    };
    let removed = caskade(&tc, remove).await.unwrap();
    assert!(
        removed.starts_with(&format!("node {new} removed")),
        "{removed}"
    );
    let listed = caskade(&tc, nodes()).await.unwrap();
    assert!(!listed.contains(&tc.addr(new).to_string()), "{listed}");
    for n in 0..50 {
        let response = tc.get(&format!("k-{n}")).await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "k-{n}");
    }
    tc.shutdown().await.unwrap();
}

/// `caskade health` with `args` (after the subcommand's name).
async fn health_of(tc: &TestCluster, args: &[&str]) -> anyhow::Result<()> {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: HealthArgs,
    }
    let cli = Cli::try_parse_from(std::iter::once("health").chain(args.iter().copied()))?;
    let connection = Connection::new(tc.url.clone(), None, Some(tc.ca_path().to_path_buf()));
    health::run(&connection, &cli.args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_the_router_and_a_node() {
    let mut tc = TestCluster::start(ClusterSpec::nodes(3, 3, NodePolicy::default()))
        .await
        .unwrap();
    health_of(&tc, &[]).await.unwrap();
    health_of(&tc, &["--ready"]).await.unwrap();
    let node = tc.node_ids()[0];
    let addr = tc.addr(node).to_string();
    let tls = tc.client_tls().clone();
    let (cert, key) = (tls.cert.to_str().unwrap(), tls.key.to_str().unwrap());
    let node_args = ["--node", &addr, "--cert", cert, "--key", key];
    health_of(&tc, &node_args).await.unwrap();
    let ready_args = [&node_args[..], &["--ready"]].concat();
    health_of(&tc, &ready_args).await.unwrap();

    let bad = health_of(&tc, &["--node", "nohost", "--cert", cert, "--key", key])
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("is not host:port"), "{bad}");
    let unsure = health_of(&tc, &["--node", &addr]).await.unwrap_err();
    assert!(unsure.to_string().contains("--cert"), "{unsure}");
    tc.stop_node(node).await.unwrap();
    let down = health_of(&tc, &node_args).await.unwrap_err();
    assert!(down.to_string().contains(&addr), "{down}");
    tc.shutdown().await.unwrap();
}
