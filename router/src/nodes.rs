//! One storage node as the router sees it: its gRPC clients behind the
//! per-node tower stack, its readiness from active health checks, and its
//! breaker.
//!
//! The stack is composed here and only here, outermost first:
//! load shedding (a full node answers at once instead of queueing),
//! a concurrency limit (`max_in_flight`), the circuit breaker
//! ([`crate::breaker`]), and a timeout per call. Timeouts therefore count as
//! breaker failures, and shed calls never reach the breaker's window.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use caskade_common::tls::TlsMaterial;
use caskade_proto::admin_client::AdminClient;
use caskade_proto::kv_client::KvClient;
use caskade_proto::replication_client::ReplicationClient;
use metrics::{counter, gauge};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::timeout::Timeout;
use tower::{BoxError, Service, ServiceBuilder};

use crate::breaker::{Breaker, BreakerConfig, BreakerLayer, BreakerPhase, BreakerService};
use crate::config::NodePolicy;

/// A node's gRPC channel behind the router's resilience layers.
pub type NodeService = NameShed<LoadShed<ConcurrencyLimit<BreakerService<Timeout<Channel>>>>>;

/// The error of a call shed because the node's in-flight limit was reached.
/// (tonic would turn tower's own `Overloaded` into `RESOURCE_EXHAUSTED`,
/// indistinguishable from a full disk; this type reaches `forward` intact.)
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many requests in flight to the node")]
pub struct Shed;

/// Replaces tower's `Overloaded` with [`Shed`] in a service's errors.
#[derive(Debug, Clone)]
pub struct NameShed<S>(S);

impl<S, R> Service<R> for NameShed<S>
where
    S: Service<R, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(name_shed)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let call = self.0.call(request);
        Box::pin(async move { call.await.map_err(name_shed) })
    }
}

fn name_shed(error: BoxError) -> BoxError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        Box::new(Shed)
    } else {
        error
    }
}

/// Room in a gRPC message beyond the value: key and fields.
const MESSAGE_OVERHEAD: usize = 64 << 10;
/// Smallest message limit (tonic's default is 4 MiB).
const MIN_MESSAGE_BYTES: usize = 16 << 20;

/// The health check asks about the `Kv` service: a node catching up reports
/// it not serving while still answering.
const READINESS_SERVICE: &str = "caskade.v1.Kv";

/// One storage node.
#[derive(Debug)]
pub struct NodeHandle {
    /// The node's id in the cluster map.
    pub id: u32,
    /// Its gRPC address.
    pub addr: String,
    kv: KvClient<NodeService>,
    admin: AdminClient<NodeService>,
    replication: ReplicationClient<NodeService>,
    /// For long operator calls (merge, backup): no per-call timeout or
    /// breaker, which are sized for key-value requests.
    operator: AdminClient<Channel>,
    health: HealthClient<Channel>,
    breaker: Breaker,
    ready: AtomicBool,
    /// The node answered the last health check with NOT_SERVING (shutting
    /// down, or catching up): it must not be sent requests. A node that did
    /// not answer at all is only not ready, and is still tried last.
    declined: AtomicBool,
    in_flight: Arc<AtomicI64>,
    policy: NodePolicy,
}

impl NodeHandle {
    /// Clients for node `id` at `addr` (`host:port`); connects lazily.
    /// Answers up to `max_value_bytes` (plus framing) are accepted.
    pub fn new(
        id: u32,
        addr: &str,
        tls: &TlsMaterial,
        policy: &NodePolicy,
        max_value_bytes: usize,
    ) -> Result<NodeHandle, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.grpc_client(caskade_common::tls::server_name(addr)))?
            // Well inside the call timeout: a host that drops packets fails
            // as "could not connect" (the write was never sent, so it may go
            // to the next replica), not as a call timeout (which might
            // have been applied, so it may not).
            .connect_timeout(Duration::from_millis(
                (policy.timeout_ms / 2).clamp(1, 1000),
            ))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let node_label = id.to_string();
        let breaker = Breaker::new(
            BreakerConfig {
                failure_ratio: policy.breaker_failure_ratio,
                min_calls: policy.breaker_min_calls,
                window: Duration::from_millis(policy.breaker_window_ms),
                open_for: Duration::from_millis(policy.breaker_open_ms),
            },
            move |phase| {
                tracing::warn!(node = %node_label, breaker = phase.as_str(), "breaker changed");
                gauge!("caskade_router_breaker_state", "node" => node_label.clone())
                    .set(breaker_gauge(phase));
                if phase == BreakerPhase::Open {
                    counter!("caskade_router_breaker_opens_total", "node" => node_label.clone())
                        .increment(1);
                }
            },
        );
        gauge!("caskade_router_breaker_state", "node" => id.to_string()).set(0.0);
        // Exported from the start, so that a rate over it is 0, not absent.
        counter!("caskade_router_breaker_opens_total", "node" => id.to_string()).increment(0);
        let stack = ServiceBuilder::new()
            .layer_fn(NameShed)
            .load_shed()
            .concurrency_limit(policy.max_in_flight)
            .layer(BreakerLayer::new(breaker.clone()))
            .timeout(Duration::from_millis(policy.timeout_ms))
            .service(channel.clone());
        Ok(NodeHandle {
            id,
            addr: addr.to_string(),
            kv: KvClient::new(stack.clone())
                .max_decoding_message_size(
                    max_value_bytes
                        .saturating_add(MESSAGE_OVERHEAD)
                        .max(MIN_MESSAGE_BYTES),
                )
                .max_encoding_message_size(
                    max_value_bytes
                        .saturating_add(MESSAGE_OVERHEAD)
                        .max(MIN_MESSAGE_BYTES),
                ),
            admin: AdminClient::new(stack.clone()),
            replication: ReplicationClient::new(stack),
            operator: AdminClient::new(channel.clone()),
            health: HealthClient::new(channel),
            breaker,
            ready: AtomicBool::new(false),
            declined: AtomicBool::new(false),
            in_flight: Arc::new(AtomicI64::new(0)),
            policy: policy.clone(),
        })
    }

    /// A `Kv` client for one call (cheap: clones share the stack).
    pub fn kv(&self) -> KvClient<NodeService> {
        self.kv.clone()
    }

    /// An `Admin` client.
    pub fn admin(&self) -> AdminClient<NodeService> {
        self.admin.clone()
    }

    /// A `Replication` client (read repair).
    pub fn replication(&self) -> ReplicationClient<NodeService> {
        self.replication.clone()
    }

    /// An `Admin` client for long operator calls (merge, backup), outside
    /// the per-node stack: bound them with a timeout of their own.
    pub fn operator(&self) -> AdminClient<Channel> {
        self.operator.clone()
    }

    /// The deadline of one call to this node.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.policy.timeout_ms)
    }

    /// Whether the last health check found the node serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The breaker's phase.
    pub fn breaker(&self) -> BreakerPhase {
        self.breaker.phase()
    }

    /// Whether the node said it is not serving (as opposed to not answering).
    pub fn declined(&self) -> bool {
        self.declined.load(Ordering::Relaxed)
    }

    /// Worth sending a request to: ready and its breaker not open.
    pub fn is_healthy(&self) -> bool {
        self.is_ready() && self.breaker() != BreakerPhase::Open
    }

    /// Requests the router has in flight to this node.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard drops.
    pub fn track(&self) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        publish_in_flight(self.id, now);
        InFlight(Arc::clone(&self.in_flight), self.id)
    }

    /// Asks the node whether it serves `Kv`, and remembers the answer.
    pub async fn check_health(&self) -> bool {
        let mut health = self.health.clone();
        let request = HealthCheckRequest {
            service: READINESS_SERVICE.into(),
        };
        let timeout = Duration::from_millis(self.policy.timeout_ms);
        let (serving, declined) = match tokio::time::timeout(timeout, health.check(request)).await {
            Ok(Ok(response)) => {
                let serving = response.get_ref().status == ServingStatus::Serving as i32;
                (serving, !serving)
            }
            _ => (false, false),
        };
        self.declined.store(declined, Ordering::Relaxed);
        let was = self.ready.swap(serving, Ordering::Relaxed);
        match (was, serving) {
            (false, true) => self.breaker.node_returned(),
            (true, true) => self.breaker.health_check_passed(),
            _ => {}
        }
        if was != serving {
            tracing::info!(node = self.id, addr = %self.addr, ready = serving, "node readiness changed");
        }
        // The node's gauges are set at every check, so that they never go
        // idle (and so leave the registry) while the node is in the map.
        gauge!("caskade_router_node_ready", "node" => self.id.to_string())
            .set(f64::from(u8::from(serving)));
        gauge!("caskade_router_breaker_state", "node" => self.id.to_string())
            .set(breaker_gauge(self.breaker()));
        publish_in_flight(self.id, self.in_flight());
        serving
    }
}

/// Decrements a node's in-flight count on drop.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicI64>, u32);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        publish_in_flight(self.1, now);
    }
}

/// Sets `caskade_router_node_in_flight` of node `id`. Looked up at every
/// change rather than held: an idle gauge leaves the registry, and a held
/// handle would then update a series no longer exported.
fn publish_in_flight(id: u32, now: i64) {
    gauge!("caskade_router_node_in_flight", "node" => id.to_string()).set(now as f64);
}

fn breaker_gauge(phase: BreakerPhase) -> f64 {
    match phase {
        BreakerPhase::Closed => 0.0,
        BreakerPhase::HalfOpen => 1.0,
        BreakerPhase::Open => 2.0,
    }
}
