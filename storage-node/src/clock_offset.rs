//! The bound on how far apart the nodes' wall clocks may be, and its guard
//! on every message between nodes.
//!
//! Versions come from hybrid logical clocks ([`crate::clock`]): a record
//! from a peer moves this node's clock up to the record's version. A peer
//! whose wall clock runs ahead would drag every node's clock along without
//! bound, its versions beating later writes of nodes with a true clock; one
//! running behind writes expiry times in the past. As CockroachDB does, the
//! nodes assume their clocks agree within `cluster.max_clock_offset_ms`
//! and check it on every message between them:
//!
//! - Every node-to-node request carries the sender's wall clock and id
//!   ([`WALL_MS_HEADER`], [`NODE_HEADER`]); every answer the responder's,
//!   and how long it held the request ([`HELD_MS_HEADER`]): [`ClockLayer`]
//!   on the server, [`PeerChannel`] on the client.
//! - **Answers.** The responder read its clock between the caller's send
//!   (plus the time held) and the caller's receipt, so the caller knows the
//!   least offset that window allows. Beyond the bound, either way, the
//!   answer is replaced by UNAVAILABLE: nothing of it is used. Each answer's
//!   offset is recorded per peer.
//! - **Requests.** A request is refused (UNAVAILABLE, nothing done) if its
//!   sender's clock is ahead of this node's by more than the bound (certain:
//!   it was read before the request arrived), or if that peer's last answer
//!   here, in the last [`RECENT`], was beyond the bound either way. A
//!   request's clock is not otherwise taken as a measurement: a request
//!   delayed on its way (a reconnect, a retransmission, a paused process)
//!   would look like a clock behind.
//! - **The node's own verdict.** It takes its own clock to be off if,
//!   counting itself as within, more of the peers it measured in the last
//!   [`RECENT`] are beyond the bound than within, or if its wall clock has
//!   moved by more than the bound against its monotonic clock since it last
//!   agreed with a peer (a step ahead, seen at once, before any peer could
//!   tell).
//!   While off it refuses writes (UNAVAILABLE: nothing applied, so routers
//!   try another replica) and every peer's request, and reports
//!   NOT_SERVING: the Raft leader's probes of it fail and it is marked down
//!   like a node that does not answer; if it led, its peers stop taking its
//!   messages and elect another leader. Its own requests go on, so it
//!   learns when its clock agrees again.
//! - **Versions.** No version is assigned while the wall clock reads past
//!   the wall clock of the last agreement moved on by the monotonic clock,
//!   plus the bound ([`ClockGuard::wall_ceiling`]): a wall clock that steps
//!   ahead between two writes cannot put one version in the future.
//! - Each change is logged; offsets, refusals and the verdict are metrics
//!   and on the admin page ([`ClockGuard::report`]).
//!
//! Messages without the headers (routers, operators' tools) are not
//! checked: they carry no versions. `Raft/Hello` is measured but never
//! refused (see [`is_exempt`]). With two nodes neither can tell whose clock
//! is off: they refuse each other and neither takes itself to be off. With
//! clocks spread over twice the bound, the nodes at either end refuse each
//! other while both agree with the middle.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use metrics::{counter, gauge};
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::Channel;

/// Request and answer header: the sender's wall clock, Unix milliseconds.
pub const WALL_MS_HEADER: &str = "x-caskade-wall-ms";
/// Request and answer header: the sender's node id.
pub const NODE_HEADER: &str = "x-caskade-node";
/// Answer header: how long the responder held the request before it
/// answered, in milliseconds.
pub const HELD_MS_HEADER: &str = "x-caskade-held-ms";
/// Measurements older than this do not count.
pub const RECENT: Duration = Duration::from_secs(10);

/// Metric names.
pub mod names {
    /// Gauge: the least offset of a peer's clock from this node's that its
    /// last answer allows, in milliseconds (positive: the peer is ahead),
    /// by `node` and `peer`.
    pub const PEER_OFFSET_MS: &str = "caskade_node_peer_clock_offset_ms";
    /// Counter: messages refused for a clock beyond the bound, by `node`,
    /// `peer` and `message` (`request` or `answer`).
    pub const REFUSALS: &str = "caskade_node_clock_refusals_total";
    /// Gauge: 1 while this node takes its own clock to be off.
    pub const CLOCK_OFF: &str = "caskade_node_clock_off";
}

/// A peer's clock as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerClock {
    /// The least offset consistent with the measurement, in milliseconds.
    pub offset_ms: i64,
    /// Whether that is beyond the bound.
    pub beyond: bool,
    /// When it was measured.
    pub at: Instant,
}

/// When a request was stamped: the wall clock written, and the monotonic
/// clock then.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The wall clock in the stamp, Unix milliseconds.
    pub wall_ms: u64,
    /// The monotonic clock at the same moment.
    pub at: Instant,
}

/// What the admin page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockReport {
    /// The bound, in milliseconds (0: not checked).
    pub max_offset_ms: u64,
    /// Whether this node takes its own clock to be off.
    pub off: bool,
    /// Each peer's last measurement: id, offset, beyond the bound, age.
    pub peers: Vec<(u32, i64, bool, Duration)>,
}

/// This node's check of its peers' clocks.
#[derive(Debug)]
pub struct ClockGuard {
    me: u32,
    me_header: HeaderValue,
    max_offset_ms: u64,
    wall_ms: fn() -> u64,
    /// The monotonic clock's origin, to compare the wall clock with.
    started: Instant,
    state: Mutex<State>,
    off: watch::Sender<bool>,
}

/// What the guard has measured.
#[derive(Debug, Default)]
struct State {
    peers: BTreeMap<u32, PeerClock>,
    /// Wall clock minus monotonic clock, in milliseconds, as of the send of
    /// the latest request whose answer agreed with this node's clock (and
    /// when that send was): a wall clock that steps moves away from it at
    /// once.
    anchor: Option<(i128, Instant)>,
}

/// What [`ClockGuard::verdict`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    off: bool,
    beyond: usize,
    within: usize,
    stepped_ms: i128,
}

impl ClockGuard {
    /// The guard of node `me`, with bound `max_offset_ms` (0 checks
    /// nothing), reading the system wall clock.
    pub fn new(me: u32, max_offset_ms: u64) -> ClockGuard {
        Self::with_wall_clock(me, max_offset_ms, caskade_common::version::unix_millis)
    }

    /// As [`ClockGuard::new`], reading milliseconds from `wall_ms` (tests).
    pub fn with_wall_clock(me: u32, max_offset_ms: u64, wall_ms: fn() -> u64) -> ClockGuard {
        ClockGuard {
            me,
            me_header: HeaderValue::from(me),
            max_offset_ms,
            wall_ms,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            off: watch::Sender::new(false),
        }
    }

    /// The bound, in milliseconds (0: nothing is checked).
    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// Whether this node takes its own clock to be off: it then refuses
    /// writes and its peers' messages, and does not serve. Worked out
    /// afresh (measurements age, and the wall clock may have stepped).
    pub fn is_off(&self) -> bool {
        let state = self.lock();
        let verdict = self.verdict(&state);
        self.publish(verdict);
        verdict.off
    }

    /// Follows [`ClockGuard::is_off`] (call [`ClockGuard::is_off`]
    /// now and then: a verdict that changes only with time is published
    /// when asked for).
    pub fn watch_off(&self) -> watch::Receiver<bool> {
        self.off.subscribe()
    }

    /// The status of a peer's message refused because this node's clock is off.
    fn refused_message(&self) -> Status {
        Status::unavailable(format!(
            "node {}'s clock is more than {} ms from its peers'; it takes no messages",
            self.me, self.max_offset_ms
        ))
    }

    /// The status of a write refused because this node's clock is off.
    pub fn refused_write(&self) -> Status {
        Status::unavailable(format!(
            "this node's clock is more than {} ms from its peers'; it takes no writes",
            self.max_offset_ms
        ))
    }

    /// The latest the wall clock may read when a version is assigned: the
    /// wall clock as of the last agreement with a peer, moved on by the
    /// monotonic clock, plus the bound. Unbounded before any agreement (and
    /// with no bound).
    pub fn wall_ceiling(&self) -> u64 {
        if self.max_offset_ms == 0 {
            return u64::MAX;
        }
        let Some((anchor, _)) = self.lock().anchor else {
            return u64::MAX;
        };
        let agreed_now = anchor + self.monotonic_ms();
        u64::try_from(agreed_now + i128::from(self.max_offset_ms)).unwrap_or(u64::MAX)
    }

    /// Adds this node's clock and id to outgoing `headers`; returns when,
    /// by the wall clock written and by the monotonic clock.
    pub fn stamp(&self, headers: &mut HeaderMap) -> Sent {
        let at = Instant::now();
        let wall_ms = (self.wall_ms)();
        headers.insert(WALL_MS_HEADER, HeaderValue::from(wall_ms));
        headers.insert(NODE_HEADER, self.me_header.clone());
        Sent { wall_ms, at }
    }

    /// Checks an incoming request's `headers`: `Err` if its sender's clock
    /// is ahead of this node's by more than the bound (a request is never
    /// stamped after it arrives, so that is certain), if its last answer
    /// was beyond the bound either way, or if this node's own clock is off.
    pub fn check_request(&self, headers: &HeaderMap) -> Result<(), Status> {
        let Some((peer, their_ms)) = stamp_of(headers) else {
            return Ok(());
        };
        if self.max_offset_ms == 0 || peer == self.me {
            return Ok(());
        }
        // The least the sender is ahead by: its clock was read first.
        let ahead = i128::from(their_ms) - i128::from((self.wall_ms)());
        if ahead > i128::from(self.max_offset_ms) {
            self.record(peer, ahead, true, None);
            return Err(self.refuse(peer, ahead, "request"));
        }
        let state = self.lock();
        if let Some(last) = state.peers.get(&peer)
            && last.beyond
            && last.at.elapsed() < RECENT
        {
            let offset = last.offset_ms;
            drop(state);
            return Err(self.refuse(peer, offset.into(), "request"));
        }
        let verdict = self.verdict(&state);
        drop(state);
        if verdict.off {
            self.count_refusal(peer, "request");
            return Err(self.refused_message());
        }
        Ok(())
    }

    /// Checks an answer's `headers` to a request `sent`, received now:
    /// `Err` if the peer's clock is beyond the bound. The peer read its
    /// clock between our send plus the time it says it held the request,
    /// and our receipt; the least offset that allows counts. The receipt
    /// is the send's wall clock moved on by the monotonic clock, so that
    /// this node's own wall clock stepping during the call cannot widen
    /// the window (the step itself is caught by [`ClockGuard::is_off`]).
    pub fn check_answer(&self, sent: Sent, headers: &HeaderMap) -> Result<(), Status> {
        let Some((peer, their_ms)) = stamp_of(headers) else {
            return Ok(());
        };
        if self.max_offset_ms == 0 || peer == self.me {
            return Ok(());
        }
        let sent_ms = sent.wall_ms;
        let elapsed = i128::try_from(sent.at.elapsed().as_millis()).unwrap_or(i128::MAX);
        let received = i128::from(sent_ms).saturating_add(elapsed);
        let held = headers
            .get(HELD_MS_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(0, i128::from);
        let earliest = (i128::from(sent_ms) + held).min(received);
        let theirs = i128::from(their_ms);
        let offset = if theirs > received {
            theirs - received
        } else if theirs < earliest {
            theirs - earliest
        } else {
            0
        };
        let beyond = offset.unsigned_abs() > u128::from(self.max_offset_ms);
        self.record(peer, offset, beyond, Some(sent));
        if beyond {
            return Err(self.refuse(peer, offset, "answer"));
        }
        Ok(())
    }

    /// What the admin page shows.
    pub fn report(&self) -> ClockReport {
        let state = self.lock();
        ClockReport {
            max_offset_ms: self.max_offset_ms,
            off: self.verdict(&state).off,
            peers: state
                .peers
                .iter()
                .map(|(id, p)| (*id, p.offset_ms, p.beyond, p.at.elapsed()))
                .collect(),
        }
    }

    fn refuse(&self, peer: u32, offset_ms: i128, message: &'static str) -> Status {
        self.count_refusal(peer, message);
        Status::unavailable(format!(
            "node {peer}'s clock is {offset_ms:+} ms from node {}'s, beyond the bound of {} ms",
            self.me, self.max_offset_ms
        ))
    }

    fn count_refusal(&self, peer: u32, message: &'static str) {
        counter!(names::REFUSALS, "node" => self.me.to_string(), "peer" => peer.to_string(), "message" => message)
            .increment(1);
    }

    /// Milliseconds of the monotonic clock since the guard was made.
    fn monotonic_ms(&self) -> i128 {
        i128::try_from(self.started.elapsed().as_millis()).unwrap_or(i128::MAX)
    }

    /// Records a measurement of `peer` (of an answer to a request `sent`)
    /// and publishes this node's verdict on its own clock.
    fn record(&self, peer: u32, offset_ms: i128, beyond: bool, sent: Option<Sent>) {
        let offset_ms =
            i64::try_from(offset_ms).unwrap_or(if offset_ms < 0 { i64::MIN } else { i64::MAX });
        let mut state = self.lock();
        let was = state.peers.insert(
            peer,
            PeerClock {
                offset_ms,
                beyond,
                at: Instant::now(),
            },
        );
        // Agreed: the relation of the wall clock to the monotonic one as
        // of the send, when the compared stamp was read.
        // A late answer to an older request (a long poll sent before an
        // NTP correction) does not take the place of a newer agreement.
        if let (false, Some(sent)) = (beyond, sent)
            && state.anchor.is_none_or(|(_, at)| sent.at > at)
        {
            let mono = i128::try_from(sent.at.saturating_duration_since(self.started).as_millis())
                .unwrap_or(i128::MAX);
            state.anchor = Some((i128::from(sent.wall_ms) - mono, sent.at));
        }
        gauge!(names::PEER_OFFSET_MS, "node" => self.me.to_string(), "peer" => peer.to_string())
            .set(offset_ms as f64);
        if was.is_none_or(|w| w.beyond != beyond) {
            if beyond {
                tracing::warn!(
                    peer,
                    offset_ms,
                    max_offset_ms = self.max_offset_ms,
                    "peer's clock is beyond the bound: refusing its messages"
                );
            } else if was.is_some() {
                tracing::info!(peer, offset_ms, "peer's clock is within the bound again");
            }
        }
        let verdict = self.verdict(&state);
        self.publish(verdict);
    }

    /// This node's verdict on its own clock: off if, counting itself as
    /// within, more peers measured in the last [`RECENT`] are beyond the
    /// bound than within it, or if its wall clock stepped ahead by more than the
    /// bound against the monotonic clock since it last agreed with a peer.
    fn verdict(&self, state: &State) -> Verdict {
        if self.max_offset_ms == 0 {
            return Verdict {
                off: false,
                beyond: 0,
                within: 0,
                stepped_ms: 0,
            };
        }
        let recent = state.peers.values().filter(|p| p.at.elapsed() < RECENT);
        let (beyond, within) = recent.fold(
            (0, 0),
            |(b, w), p| if p.beyond { (b + 1, w) } else { (b, w + 1) },
        );
        let stepped_ms = state.anchor.map_or(0, |(anchor, _)| {
            i128::from((self.wall_ms)()) - self.monotonic_ms() - anchor
        });
        Verdict {
            // Only a step ahead: a clock stepped back assigns no version
            // out of order (the hybrid clock goes on from the last one),
            // and one that is behind is caught by its peers.
            off: beyond > within + 1 || stepped_ms > i128::from(self.max_offset_ms),
            beyond,
            within,
            stepped_ms,
        }
    }

    /// Publishes `verdict`, logging a change.
    fn publish(&self, verdict: Verdict) {
        let changed = self.off.send_if_modified(|current| {
            let changed = *current != verdict.off;
            *current = verdict.off;
            changed
        });
        if !changed {
            return;
        }
        gauge!(names::CLOCK_OFF, "node" => self.me.to_string()).set(if verdict.off {
            1.0
        } else {
            0.0
        });
        if verdict.off {
            tracing::error!(
                beyond = verdict.beyond,
                within = verdict.within,
                stepped_ms = verdict.stepped_ms as i64,
                max_offset_ms = self.max_offset_ms,
                "this node's clock is off from its peers': refusing writes and their messages, not serving"
            );
        } else {
            tracing::warn!("this node's clock agrees with its peers' again: serving");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Calls measured but never refused: a node's checks at start-up
/// (`Raft/Hello`: identity, own address) must get their answer, whatever
/// the clocks, or they would pass for a peer that does not answer.
fn is_exempt(path: &str) -> bool {
    path == "/caskade.v1.Raft/Hello"
}

/// The sender id and wall clock in `headers`, if both are there.
fn stamp_of(headers: &HeaderMap) -> Option<(u32, u64)> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.parse::<u64>().ok();
    Some((
        u32::try_from(number(NODE_HEADER)?).ok()?,
        number(WALL_MS_HEADER)?,
    ))
}

/// A channel to a peer whose requests carry this node's clock and whose
/// answers are checked against it.
#[derive(Debug, Clone)]
pub struct PeerChannel {
    inner: Channel,
    guard: Arc<ClockGuard>,
}

impl PeerChannel {
    /// `inner`, checked by `guard`.
    pub fn new(inner: Channel, guard: Arc<ClockGuard>) -> PeerChannel {
        PeerChannel { inner, guard }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for PeerChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<Result<http::Response<Body>, tonic::transport::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let sent = self.guard.stamp(request.headers_mut());
        let exempt = is_exempt(request.uri().path());
        let answer = self.inner.call(request);
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let answer = answer.await?;
            match guard.check_answer(sent, answer.headers()) {
                Err(status) if !exempt => {
                    // The answer's body is dropped unread.
                    Ok(status.into_http())
                }
                _ => Ok(answer),
            }
        })
    }
}

/// The server side: stamps every answer with this node's clock and id, and
/// refuses requests from peers whose clock is beyond the bound.
#[derive(Debug, Clone)]
pub struct ClockLayer {
    guard: Arc<ClockGuard>,
}

impl ClockLayer {
    /// A layer checking with `guard`.
    pub fn new(guard: Arc<ClockGuard>) -> ClockLayer {
        ClockLayer { guard }
    }
}

impl<S> tower::Layer<S> for ClockLayer {
    type Service = ClockChecked<S>;

    fn layer(&self, inner: S) -> ClockChecked<S> {
        ClockChecked {
            inner,
            guard: Arc::clone(&self.guard),
        }
    }
}

/// A service behind [`ClockLayer`].
#[derive(Debug, Clone)]
pub struct ClockChecked<S> {
    inner: S,
    guard: Arc<ClockGuard>,
}

impl<S> tower::Service<http::Request<Body>> for ClockChecked<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let guard = Arc::clone(&self.guard);
        let arrived = Instant::now();
        if !is_exempt(request.uri().path())
            && let Err(status) = guard.check_request(request.headers())
        {
            let mut answer: http::Response<Body> = status.into_http();
            guard.stamp(answer.headers_mut());
            return Box::pin(std::future::ready(Ok(answer)));
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut answer = answer.await?;
            // Stamped when the answer's head leaves, with how long the
            // request was held here (a long poll), which narrows the
            // caller's window.
            guard.stamp(answer.headers_mut());
            let held = u64::try_from(arrived.elapsed().as_millis()).unwrap_or(u64::MAX);
            answer
                .headers_mut()
                .insert(HELD_MS_HEADER, HeaderValue::from(held));
            Ok(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    // One wall clock per test: tests run in parallel.
    static STILL_MS: AtomicU64 = AtomicU64::new(1_000_000);
    static REQUESTS_MS: AtomicU64 = AtomicU64::new(1_000_000);
    static STEPPING_MS: AtomicU64 = AtomicU64::new(1_000_000);

    fn still() -> u64 {
        STILL_MS.load(Ordering::SeqCst)
    }

    fn requests() -> u64 {
        REQUESTS_MS.load(Ordering::SeqCst)
    }

    fn stepping() -> u64 {
        STEPPING_MS.load(Ordering::SeqCst)
    }

    static STEPPING_DURING_A_CALL_MS: AtomicU64 = AtomicU64::new(1_000_000);

    fn stepping_during_a_call() -> u64 {
        STEPPING_DURING_A_CALL_MS.load(Ordering::SeqCst)
    }

    /// A request stamped `ago_ms` before `now_ms`.
    fn sent(now_ms: u64, ago_ms: u64) -> Sent {
        Sent {
            wall_ms: now_ms - ago_ms,
            at: Instant::now() - Duration::from_millis(ago_ms),
        }
    }

    fn headers(peer: u32, wall_ms: u64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(WALL_MS_HEADER, HeaderValue::from(wall_ms));
        headers.insert(NODE_HEADER, HeaderValue::from(peer));
        headers
    }

    #[test]
    fn answers_beyond_the_bound_either_way_are_refused_and_the_odd_node_knows_itself() {
        let guard = ClockGuard::with_wall_clock(1, 500, still);
        let now = still();
        // Within the window of send and receipt, or just outside it: fine.
        assert!(
            guard
                .check_answer(sent(now, 0), &headers(2, now + 400))
                .is_ok()
        );
        assert!(
            guard
                .check_answer(sent(now, 300), &headers(3, now - 700))
                .is_ok()
        );
        assert!(!guard.is_off());
        // Ten minutes ahead: refused; one peer of two beyond is not enough
        // to take itself to be off.
        let ahead = guard.check_answer(sent(now, 0), &headers(2, now + 600_000));
        assert_eq!(ahead.unwrap_err().code(), tonic::Code::Unavailable);
        assert!(!guard.is_off());
        // Both peers disagree with this node: it is the one that is off.
        assert!(
            guard
                .check_answer(sent(now, 0), &headers(3, now - 600_000))
                .is_err()
        );
        assert!(guard.is_off());
        let report = guard.report();
        assert!(report.off);
        assert_eq!(
            report
                .peers
                .iter()
                .map(|p| (p.0, p.1, p.2))
                .collect::<Vec<_>>(),
            [(2, 600_000, true), (3, -600_000, true)]
        );
        // While off, it takes no peer's request.
        assert!(guard.check_request(&headers(3, now)).is_err());
        // One agrees again: one beyond, one within, not off.
        assert!(guard.check_answer(sent(now, 0), &headers(3, now)).is_ok());
        assert!(!guard.is_off());
    }

    #[test]
    fn a_long_poll_narrows_the_window_by_the_time_it_was_held() {
        let guard = ClockGuard::with_wall_clock(1, 500, still);
        let now = still();
        // Sent 2 s ago, held 1.9 s by the peer: it read its clock in the
        // last 100 ms, so a clock 1 s behind is 900 ms beyond.
        let mut held = headers(2, now - 1_000);
        held.insert(HELD_MS_HEADER, HeaderValue::from(1_900u64));
        assert!(guard.check_answer(sent(now, 2_000), &held).is_err());
        // Without the hold, the same clock may have been read at the send.
        assert!(
            guard
                .check_answer(sent(now, 2_000), &headers(2, now - 1_000))
                .is_ok()
        );
    }

    #[test]
    fn requests_ahead_or_from_a_peer_measured_beyond_are_refused() {
        let guard = ClockGuard::with_wall_clock(1, 500, requests);
        let here = requests();
        assert!(guard.check_request(&headers(2, here + 500)).is_ok());
        assert!(guard.check_request(&headers(2, here + 501)).is_err());
        // Behind, however far: it may have been on its way that long.
        assert!(guard.check_request(&headers(3, here - 600_000)).is_ok());
        // ... unless its last answer was beyond the bound.
        assert!(
            guard
                .check_answer(sent(here, 0), &headers(3, here - 600_000))
                .is_err()
        );
        assert!(guard.check_request(&headers(3, here)).is_err());
        // Requests without a stamp (routers, tools) are not checked.
        assert!(guard.check_request(&HeaderMap::new()).is_ok());
        // A stamp at the end of time does not overflow.
        assert!(guard.check_request(&headers(4, u64::MAX)).is_err());
        assert!(
            guard
                .check_answer(sent(here, 0), &headers(4, u64::MAX))
                .is_err()
        );
    }

    #[test]
    fn a_wall_clock_that_steps_after_agreeing_is_off_and_assigns_no_version_past_the_bound() {
        let guard = ClockGuard::with_wall_clock(1, 500, stepping);
        assert_eq!(guard.wall_ceiling(), u64::MAX, "no agreement yet");
        let now = stepping();
        assert!(guard.check_answer(sent(now, 0), &headers(2, now)).is_ok());
        assert!(guard.wall_ceiling() <= now + 500 + 1_000);
        assert!(!guard.is_off());
        STEPPING_MS.store(now + 600_000, Ordering::SeqCst);
        assert!(guard.is_off(), "a step of ten minutes is seen at once");
        assert!(guard.wall_ceiling() < now + 600_000);
        STEPPING_MS.store(now, Ordering::SeqCst);
        assert!(!guard.is_off(), "stepped back");
    }

    #[test]
    fn a_wall_clock_that_steps_during_a_call_neither_widens_the_window_nor_moves_the_agreement() {
        let guard = ClockGuard::with_wall_clock(1, 500, stepping_during_a_call);
        let now = stepping_during_a_call();
        assert!(guard.check_answer(sent(now, 0), &headers(2, now)).is_ok());
        // A long poll is sent, the wall clock steps, the answer comes back
        // with the peer's true clock.
        let long_poll = sent(now, 0);
        STEPPING_DURING_A_CALL_MS.store(now + 600_000, Ordering::SeqCst);
        assert!(guard.check_answer(long_poll, &headers(2, now + 10)).is_ok());
        assert!(guard.is_off(), "the step is seen, not taken as agreement");
        assert!(guard.wall_ceiling() < now + 600_000);
    }

    #[test]
    fn a_zero_bound_checks_nothing() {
        let guard = ClockGuard::with_wall_clock(1, 0, still);
        assert!(
            guard
                .check_request(&headers(2, still() + 3_600_000))
                .is_ok()
        );
        assert!(guard.check_answer(sent(still(), 0), &headers(2, 0)).is_ok());
        assert!(!guard.is_off());
        assert_eq!(guard.wall_ceiling(), u64::MAX);
    }
}
