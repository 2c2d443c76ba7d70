//! The router's view of the cluster: the cluster map it last adopted, the
//! ring built from it, and a [`NodeHandle`] per node.
//!
//! The router stores nothing: the map is committed by the nodes' Raft
//! group, and the router fetches it from any seed node at start-up
//! (retrying until one answers), then follows new epochs with a long poll
//! (`GetClusterMap` answers as soon as the node applies a newer map) and,
//! as a safety net against a node cut off from the group, asks every node
//! every ten health intervals. It adopts only higher epochs. Views are
//! immutable and swapped whole, so a request routes on one consistent map
//! even while a new one arrives. Nodes marked down in the map are skipped
//! by every request until they are marked up. Active health checks run
//! here, one round per `health_interval_ms`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use caskade_common::ring::Ring;
use caskade_common::tls::TlsMaterial;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::{ClusterMap, GetClusterMapRequest};
use tonic::transport::Endpoint;

use crate::config::NodePolicy;
use crate::nodes::NodeHandle;

/// One adopted cluster map, with everything derived from it.
#[derive(Debug)]
pub struct ClusterView {
    /// The map.
    pub map: ClusterMap,
    /// The ring over the map's active nodes.
    pub ring: Ring,
    /// Every distinct preference list of the ring (what a listing needs a
    /// majority of), computed once per map.
    pub preference_lists: Vec<Vec<u32>>,
    /// Every node of the map, by id.
    pub nodes: BTreeMap<u32, Arc<NodeHandle>>,
}

impl ClusterView {
    /// Whether the map marks node `id` down.
    pub fn is_down(&self, id: u32) -> bool {
        self.map.is_down(id)
    }

    /// Whether node `id` is still receiving its ranges (not yet a primary).
    pub fn is_joining(&self, id: u32) -> bool {
        self.map
            .nodes
            .iter()
            .any(|n| n.id == id && n.state() == caskade_proto::NodeState::Joining)
    }

    /// The nodes of `key`'s preference list, in order.
    pub fn preference_list(&self, key: &[u8]) -> Vec<Arc<NodeHandle>> {
        self.ring
            .preference_list(key)
            .into_iter()
            .filter_map(|id| self.nodes.get(&id).cloned())
            .collect()
    }
}

/// The cluster as the router knows it.
#[derive(Debug)]
pub struct Cluster {
    seeds: Vec<String>,
    tls: TlsMaterial,
    policy: NodePolicy,
    max_value_bytes: usize,
    /// The current view; replaced whole, never modified in place.
    view: RwLock<Option<Arc<ClusterView>>>,
}

impl Cluster {
    /// A cluster with no map yet.
    pub fn new(
        seeds: Vec<String>,
        tls: TlsMaterial,
        policy: NodePolicy,
        max_value_bytes: usize,
    ) -> Cluster {
        Cluster {
            seeds,
            tls,
            policy,
            max_value_bytes,
            view: RwLock::new(None),
        }
    }

    /// The current view, if a map has been adopted.
    pub fn view(&self) -> Option<Arc<ClusterView>> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Adopts `map` if its epoch is higher than the current one (or there is
    /// none). Nodes whose id and address are unchanged keep their handle, so
    /// their breaker and readiness survive.
    pub fn adopt(&self, map: ClusterMap) -> Result<bool, tonic::transport::Error> {
        let current = self.view();
        if current
            .as_ref()
            .is_some_and(|view| view.map.epoch >= map.epoch)
        {
            return Ok(false);
        }
        let mut nodes = BTreeMap::new();
        for node in &map.nodes {
            let kept = current
                .as_ref()
                .and_then(|view| view.nodes.get(&node.id))
                .filter(|handle| handle.addr == node.addr)
                .cloned();
            let handle = match kept {
                Some(handle) => handle,
                None => Arc::new(NodeHandle::new(
                    node.id,
                    &node.addr,
                    &self.tls,
                    &self.policy,
                    self.max_value_bytes,
                )?),
            };
            nodes.insert(node.id, handle);
        }
        let ring = Ring::new(
            &map.ring_members(),
            map.vnodes_per_node,
            map.replication_factor,
        );
        tracing::info!(
            epoch = map.epoch,
            nodes = map.nodes.len(),
            "adopted cluster map"
        );
        let preference_lists = ring.preference_lists();
        let view = Arc::new(ClusterView {
            map,
            ring,
            preference_lists,
            nodes,
        });
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(view);
        Ok(true)
    }

    /// The handle of node `id` at `addr`: the known one, or a new one for
    /// a node not in the map yet.
    pub fn handle_for(
        &self,
        id: u32,
        addr: &str,
    ) -> Result<Arc<NodeHandle>, tonic::transport::Error> {
        let known = self
            .view()
            .and_then(|view| view.nodes.get(&id).cloned())
            .filter(|handle| handle.addr == addr);
        match known {
            Some(handle) => Ok(handle),
            None => Ok(Arc::new(NodeHandle::new(
                id,
                addr,
                &self.tls,
                &self.policy,
                self.max_value_bytes,
            )?)),
        }
    }

    /// Asks the seeds and the known nodes, concurrently, for their map and
    /// adopts the highest epoch found. Returns whether a map was adopted.
    /// Each node gets one timeout; a node that hangs cannot stall it.
    pub async fn refresh(self: &Arc<Self>) -> bool {
        let mut addrs = self.seeds.clone();
        if let Some(view) = self.view() {
            addrs.extend(view.nodes.values().map(|n| n.addr.clone()));
        }
        addrs.sort();
        addrs.dedup();
        let timeout = Duration::from_millis(self.policy.timeout_ms);
        let mut fetches = tokio::task::JoinSet::new();
        for addr in addrs {
            let cluster = Arc::clone(self);
            fetches.spawn(async move {
                let fetched =
                    tokio::time::timeout(timeout, cluster.fetch_map(&addr, 0, Duration::ZERO))
                        .await
                        .unwrap_or_else(|_| Err("no answer in time".into()));
                (addr, fetched)
            });
        }
        let mut best: Option<ClusterMap> = None;
        while let Some(joined) = fetches.join_next().await {
            let Ok((addr, fetched)) = joined else {
                continue;
            };
            match fetched {
                Ok(Some(map)) if best.as_ref().is_none_or(|b| map.epoch > b.epoch) => {
                    best = Some(map);
                }
                Ok(_) => {}
                Err(reason) => tracing::debug!(%addr, %reason, "could not fetch the cluster map"),
            }
        }
        match best.map(|map| self.adopt(map)) {
            Some(Ok(adopted)) => adopted,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not adopt the cluster map");
                false
            }
            None => false,
        }
    }

    /// The map of the node at `addr`; with a `wait`, once it is newer than
    /// `after_epoch` or the wait is over.
    async fn fetch_map(
        &self,
        addr: &str,
        after_epoch: u64,
        wait: Duration,
    ) -> Result<Option<ClusterMap>, String> {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let connect = Duration::from_millis(self.policy.timeout_ms);
        let timeout = connect + wait;
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(
                self.tls
                    .grpc_client(host.trim_start_matches('[').trim_end_matches(']')),
            )
            .map_err(|e| e.to_string())?
            .connect_timeout(connect)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let response = AdminClient::new(channel)
            .get_cluster_map(GetClusterMapRequest {
                after_epoch,
                wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.into_inner().map)
    }

    /// Health-checks every node of the current view once, concurrently.
    pub async fn check_health(&self) {
        let Some(view) = self.view() else { return };
        let mut checks = tokio::task::JoinSet::new();
        for node in view.nodes.values() {
            let node = Arc::clone(node);
            checks.spawn(async move { node.check_health().await });
        }
        while checks.join_next().await.is_some() {}
    }

    /// Keeps the map and the nodes' readiness fresh (run as a task): health
    /// checks every interval, and, in a loop of its own so that neither can
    /// hold the other up, a look for a newer map every ten intervals (every
    /// 200 ms while no map is known).
    pub async fn maintain(self: Arc<Self>) {
        let interval = Duration::from_millis(self.policy.health_interval_ms);
        let maps = {
            let cluster = Arc::clone(&self);
            tokio::spawn(async move {
                loop {
                    cluster.refresh().await;
                    let pause = if cluster.view().is_none() {
                        Duration::from_millis(200)
                    } else {
                        interval * 10
                    };
                    tokio::time::sleep(pause).await;
                }
            })
        };
        // Aborts the map loops when this task is aborted (router shutdown).
        let _maps = AbortOnDrop(maps);
        let _follow = AbortOnDrop(tokio::spawn(Arc::clone(&self).follow()));
        loop {
            self.check_health().await;
            let pause = if self.view().is_none() {
                Duration::from_millis(50)
            } else {
                interval
            };
            tokio::time::sleep(pause).await;
        }
    }
}

impl Cluster {
    /// Long-polls up to [`MAP_POLLERS`] nodes at once for maps newer than
    /// the current one, so that a committed change reaches this router
    /// within a round trip, and neither a node that hangs (its poll never
    /// answers) nor one cut off from the others (it never learns a newer
    /// map) holds the router up: the first newer map wins.
    async fn follow(self: Arc<Self>) {
        let mut turn = 0usize;
        loop {
            let Some(view) = self.view() else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut addrs: Vec<String> = view
                .nodes
                .values()
                .filter(|n| !view.is_down(n.id))
                .map(|n| n.addr.clone())
                .collect();
            if addrs.is_empty() {
                addrs = self.seeds.clone();
            }
            if addrs.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            // A different set of nodes each round when there are more.
            let start = turn % addrs.len();
            addrs.rotate_left(start);
            turn += 1;
            let mut polls = tokio::task::JoinSet::new();
            for addr in addrs.into_iter().take(MAP_POLLERS) {
                let cluster = Arc::clone(&self);
                let epoch = view.map.epoch;
                polls.spawn(async move {
                    let fetched = cluster.fetch_map(&addr, epoch, MAP_LONG_POLL).await;
                    (addr, fetched)
                });
            }
            let mut failed = 0;
            while let Some(joined) = polls.join_next().await {
                let Ok((addr, fetched)) = joined else {
                    continue;
                };
                match fetched {
                    Ok(Some(map)) if map.epoch > view.map.epoch => {
                        if let Err(e) = self.adopt(map) {
                            tracing::warn!(error = %e, "could not adopt the cluster map");
                        }
                        // The others are still waiting for this very map.
                        polls.abort_all();
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        tracing::debug!(%addr, %reason, "long poll for the cluster map failed");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How many nodes a router long-polls at once.
const MAP_POLLERS: usize = 3;

/// How long one long poll for a newer map waits on a node.
const MAP_LONG_POLL: Duration = Duration::from_secs(20);

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
