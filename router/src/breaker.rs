//! A circuit breaker per storage node, as a tower layer around its gRPC channel.
//!
//! Closed: calls pass and their outcomes fill a sliding window. When the
//! window holds at least `min_calls` and the failure ratio reaches
//! `failure_ratio`, the breaker opens: calls fail at once with
//! [`BreakerOpen`] for `open_for`, sparing a sick node and the callers'
//! latency. Then it is half-open: one probe call goes through; its success
//! closes the breaker, its failure opens it again. A failure is a transport
//! error (the connection, or the router's timeout) or a node answering
//! `DEADLINE_EXCEEDED`; any other answer, error or not, is the node's own
//! and counts as a success: a node that answers is not sick. The breaker
//! never holds its lock across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

/// Most outcomes kept in the window; older ones are dropped first.
const MAX_WINDOW_CALLS: usize = 4096;

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Failure ratio over the window that opens the breaker.
    pub failure_ratio: f64,
    /// Calls the window must hold before the ratio counts.
    pub min_calls: u32,
    /// Length of the sliding window.
    pub window: Duration,
    /// Time an open breaker refuses calls before a probe.
    pub open_for: Duration,
}

/// The breaker's state, as shown in metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerPhase {
    /// Calls pass.
    Closed,
    /// One probe call may pass.
    HalfOpen,
    /// Calls are refused.
    Open,
}

impl BreakerPhase {
    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerPhase::Closed => "closed",
            BreakerPhase::HalfOpen => "half_open",
            BreakerPhase::Open => "open",
        }
    }
}

/// The error of a call refused by an open breaker.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("circuit breaker open")]
pub struct BreakerOpen;

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Outcomes of recent calls while closed: (when, failed).
    window: VecDeque<(Instant, bool)>,
    /// Failed calls in `window`, kept in step with it.
    failures: usize,
}

/// One node's breaker; clones share the state.
#[derive(Clone)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
    on_change: Arc<dyn Fn(BreakerPhase) + Send + Sync>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("config", &self.config)
            .field("phase", &self.phase())
            .finish()
    }
}

/// What a call was let through as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Normal,
    Probe,
}

impl Breaker {
    /// A closed breaker; `on_change` is told every phase change (metrics, logs).
    pub fn new(
        config: BreakerConfig,
        on_change: impl Fn(BreakerPhase) + Send + Sync + 'static,
    ) -> Breaker {
        Breaker {
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: State::Closed,
                window: VecDeque::new(),
                failures: 0,
            })),
            on_change: Arc::new(on_change),
        }
    }

    /// The current phase (an open breaker past its wait reads as half-open).
    pub fn phase(&self) -> BreakerPhase {
        let inner = self.lock();
        match inner.state {
            State::Closed => BreakerPhase::Closed,
            State::Open { until } if Instant::now() < until => BreakerPhase::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerPhase::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self) -> Result<Pass, BreakerOpen> {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => Ok(Pass::Normal),
            State::Open { until } if Instant::now() < until => Err(BreakerOpen),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                inner.state = State::HalfOpen { probing: true };
                drop(inner);
                (self.on_change)(BreakerPhase::HalfOpen);
                Ok(Pass::Probe)
            }
            State::HalfOpen { probing: true } => Err(BreakerOpen),
        }
    }

    /// An active health check found the node serving. Once the open wait is
    /// over, that counts as a successful probe: a node that gets no traffic
    /// (its keys are served by other replicas meanwhile) still closes its
    /// breaker when it returns. Before the wait is over it changes nothing.
    pub fn health_check_passed(&self) {
        let inner = self.lock();
        let closes = match inner.state {
            State::Open { until } => Instant::now() >= until,
            State::HalfOpen { probing } => !probing,
            State::Closed => false,
        };
        if closes {
            self.close(inner);
        }
    }

    /// The node came back: its health check passes after it failed (it
    /// restarted, or finished catching up). That is the evidence the open
    /// wait exists to collect, so the breaker closes now; otherwise the
    /// keys of a returned node would stay with fewer replicas for the rest
    /// of the wait, and one more failure meanwhile would leave them none.
    pub fn node_returned(&self) {
        let inner = self.lock();
        let closes = match inner.state {
            State::Open { .. } => true,
            State::HalfOpen { probing } => !probing,
            State::Closed => false,
        };
        if closes {
            self.close(inner);
        }
    }

    /// Closes the breaker with a fresh window, then reports it.
    fn close(&self, mut inner: std::sync::MutexGuard<'_, Inner>) {
        inner.state = State::Closed;
        inner.window.clear();
        inner.failures = 0;
        drop(inner);
        (self.on_change)(BreakerPhase::Closed);
    }

    /// A probe ended without an outcome: let another call probe.
    fn release_probe(&self) {
        let mut inner = self.lock();
        if let State::HalfOpen { probing: true } = inner.state {
            inner.state = State::HalfOpen { probing: false };
        }
    }

    fn record(&self, pass: Pass, failed: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let change = match (pass, &inner.state) {
            (Pass::Probe, _) if failed => {
                inner.state = State::Open {
                    until: now + self.config.open_for,
                };
                Some(BreakerPhase::Open)
            }
            (Pass::Probe, _) => {
                inner.state = State::Closed;
                inner.window.clear();
                inner.failures = 0;
                Some(BreakerPhase::Closed)
            }
            (Pass::Normal, State::Closed) => {
                inner.window.push_back((now, failed));
                inner.failures += usize::from(failed);
                let horizon = now.checked_sub(self.config.window);
                while inner.window.len() > MAX_WINDOW_CALLS
                    || inner
                        .window
                        .front()
                        .is_some_and(|&(at, _)| Some(at) < horizon)
                {
                    if let Some((_, dropped_failure)) = inner.window.pop_front() {
                        inner.failures -= usize::from(dropped_failure);
                    }
                }
                let calls = inner.window.len();
                let trips = calls >= self.config.min_calls as usize
                    && inner.failures as f64 >= self.config.failure_ratio * calls as f64;
                trips.then(|| {
                    inner.state = State::Open {
                        until: now + self.config.open_for,
                    };
                    inner.window.clear();
                    inner.failures = 0;
                    BreakerPhase::Open
                })
            }
            // A call admitted before the breaker opened: its outcome is stale.
            (Pass::Normal, _) => None,
        };
        drop(inner);
        if let Some(phase) = change {
            (self.on_change)(phase);
        }
    }
}

/// Wraps a service in a [`Breaker`].
#[derive(Debug, Clone)]
pub struct BreakerLayer {
    breaker: Breaker,
}

impl BreakerLayer {
    /// A layer applying `breaker`.
    pub fn new(breaker: Breaker) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// A service behind a breaker.
#[derive(Debug, Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
}

/// Whether a node's answer counts as a failure of the node: only a
/// DEADLINE_EXCEEDED does (the node ran out of time). Any other status is
/// an answer the node chose to give (a write level not met, a full disk, a
/// poisoned engine, a corrupt record, a key it does not hold): it is passed
/// to the client as it is, and opening the breaker on it would take the
/// node's reads down with its writes. Transport failures and the router's
/// own timeout never reach here: they are errors, and always count.
fn node_is_unwell(grpc_status: Option<&http::HeaderValue>) -> bool {
    grpc_status.map(http::HeaderValue::as_bytes) == Some(b"4")
}

impl<S, B, RB> Service<http::Request<B>> for BreakerService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let pass = match self.breaker.admit() {
            Ok(pass) => pass,
            Err(open) => return Box::pin(std::future::ready(Err(open.into()))),
        };
        let outcome = Outcome {
            breaker: self.breaker.clone(),
            pass,
            recorded: false,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await.map_err(Into::into);
            // Unary answers carry an error status in the headers
            // ("trailers-only"); a success's status comes in trailers later.
            let failed = match &result {
                Ok(response) => node_is_unwell(response.headers().get("grpc-status")),
                Err(_) => true,
            };
            outcome.record(failed);
            result
        })
    }
}

/// Records a call's outcome, or, if the call is dropped unfinished (its
/// client went away), releases a probe so that the next call can probe:
/// a cancelled probe must not leave the breaker half-open forever.
struct Outcome {
    breaker: Breaker,
    pass: Pass,
    recorded: bool,
}

impl Outcome {
    fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.record(self.pass, failed);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded && self.pass == Pass::Probe {
            self.breaker.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_ratio: 0.5,
            min_calls: 4,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failures_probes_and_closes() {
        let changes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&changes);
        let breaker = Breaker::new(config(), move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        // Below min_calls nothing trips, even all failures.
        for _ in 0..3 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, true);
        }
        assert_eq!(breaker.phase(), BreakerPhase::Closed);
        let pass = breaker.admit().unwrap();
        breaker.record(pass, true);
        assert_eq!(breaker.phase(), BreakerPhase::Open);
        assert!(breaker.admit().is_err());

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(breaker.phase(), BreakerPhase::HalfOpen);
        let probe = breaker.admit().unwrap();
        assert!(breaker.admit().is_err(), "one probe at a time");
        breaker.record(probe, true);
        assert_eq!(
            breaker.phase(),
            BreakerPhase::Open,
            "a failed probe reopens"
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = breaker.admit().unwrap();
        breaker.record(probe, false);
        assert_eq!(breaker.phase(), BreakerPhase::Closed);
        // open, half-open, open, half-open, closed
        assert_eq!(changes.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_lets_the_next_call_probe() {
        let breaker = Breaker::new(config(), |_| {});
        for _ in 0..4 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, true);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = Outcome {
            breaker: breaker.clone(),
            pass: breaker.admit().unwrap(),
            recorded: false,
        };
        assert!(breaker.admit().is_err());
        drop(probe);
        let next = breaker.admit().expect("the probe slot is free again");
        assert_eq!(next, Pass::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_health_check_closes_only_after_the_wait() {
        let breaker = Breaker::new(config(), |_| {});
        for _ in 0..4 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, true);
        }
        breaker.health_check_passed();
        assert_eq!(
            breaker.phase(),
            BreakerPhase::Open,
            "the open wait is respected"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        breaker.health_check_passed();
        assert_eq!(breaker.phase(), BreakerPhase::Closed);
    }

    #[test]
    fn a_node_that_comes_back_closes_the_breaker_at_once() {
        let breaker = Breaker::new(config(), |_| {});
        for _ in 0..4 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, true);
        }
        assert_eq!(breaker.phase(), BreakerPhase::Open);
        breaker.node_returned();
        assert_eq!(breaker.phase(), BreakerPhase::Closed);
        assert!(breaker.admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let breaker = Breaker::new(config(), |_| {});
        for _ in 0..3 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, true);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..3 {
            let pass = breaker.admit().unwrap();
            breaker.record(pass, false);
        }
        let pass = breaker.admit().unwrap();
        breaker.record(pass, true);
        assert_eq!(
            breaker.phase(),
            BreakerPhase::Closed,
            "1 failure in 4 recent calls"
        );
    }

    #[test]
    fn only_a_timeout_among_answers_counts_as_failure() {
        let status = |s: &'static str| http::HeaderValue::from_static(s);
        assert!(node_is_unwell(Some(&status("4"))), "DEADLINE_EXCEEDED");
        for (code, what) in [
            ("3", "INVALID_ARGUMENT is the client's"),
            ("9", "FAILED_PRECONDITION is the client's"),
            (
                "14",
                "UNAVAILABLE (level not met, poisoned, catching up) is an answer",
            ),
            ("8", "RESOURCE_EXHAUSTED (full) is an answer"),
            ("15", "DATA_LOSS of one record is an answer"),
            ("13", "INTERNAL is an answer"),
        ] {
            assert!(!node_is_unwell(Some(&status(code))), "{what}");
        }
        assert!(!node_is_unwell(None));
    }
}
