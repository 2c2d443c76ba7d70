//! Idle client connections: when a connection last did anything for its
//! client, and when it has done nothing for `limits.idle_timeout_ms`.
//!
//! A connection is busy while one of its requests is being handled (from
//! the first poll of the handler until it answers: reading the request's
//! body, waiting for the nodes). Each answer is timed on its own, from when
//! its handler hands it over and again each time it moves on (a piece of it
//! is taken for sending) until it ends. The connection is idle once an
//! answer has not moved for the limit, whatever else the connection does
//! (other requests handled, other answers taken: they would otherwise
//! shelter an HTTP/2 stream whose window is never opened, or an HTTP/1.1
//! client that pipelines requests and never reads); or once, with no
//! request being handled, nothing at all has happened for the limit
//! (before the first request, between HTTP/1.1 requests, an HTTP/2
//! connection with no open stream). Without this, such a connection would
//! hold one of `max_connections`, and the answers it holds, for as long as
//! its client likes.
//!
//! Answers are handed out in pieces of at most [`ANSWER_PIECE`] bytes, so
//! that a large answer taken slowly still moves on within the idle
//! timeout. This module only tells the time; the server closes the
//! connection, and must bound how long that close may take.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The most of an answer's body handed out at once: the default largest
/// HTTP/2 frame, and the most plaintext one TLS record carries, so that a
/// piece taken is about a piece on its way to the client. The server keeps
/// no more than this unsent in a client's socket, for the same reason.
pub(crate) const ANSWER_PIECE: usize = 16 << 10;

/// What one connection is doing for its client.
#[derive(Debug)]
pub struct Activity {
    /// Held only to read or update the state, never across an `.await`.
    state: Mutex<State>,
    /// Woken whenever the connection's idle deadline may have come
    /// earlier: the last request being handled answered, or an answer was
    /// handed over while one still is.
    earlier: Notify,
}

#[derive(Debug)]
struct State {
    /// Requests whose handler has been polled and has not answered yet.
    handling: usize,
    /// When the connection last did something for its client: it opened,
    /// a handler answered, or an answer was handed over, moved on or ended.
    last_busy: Instant,
    /// When each answer handed over and not yet ended last moved on, by
    /// the id its [`AnswerBody`] holds. At most one per open HTTP/2 stream
    /// (`max_concurrent_streams`), one at a time over HTTP/1.1.
    answers: HashMap<u64, Instant>,
    /// The id of the next answer handed over.
    next_answer: u64,
}

impl Activity {
    /// A connection that has just opened: idle, with no request yet.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                handling: 0,
                last_busy: Instant::now(),
                answers: HashMap::new(),
                next_answer: 0,
            }),
            earlier: Notify::new(),
        })
    }

    /// Resolves once the connection has been idle for `limit`: an answer
    /// has not moved on for `limit`, or no request has been handled and
    /// nothing has happened for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let earlier = self.earlier.notified();
            tokio::pin!(earlier);
            // Registered before the state is read, so a change in between wakes it.
            earlier.as_mut().enable();
            let Some(deadline) = self.idle_deadline(limit) else {
                earlier.await;
                continue;
            };
            if deadline <= Instant::now() {
                return;
            }
            // Anything done meanwhile can only have moved the deadline
            // later, except what `earlier` tells; either way it is read
            // again.
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = earlier => {}
            }
        }
    }

    /// When the connection will have been idle for `limit` if nothing
    /// happens until then, or `None` while a request is being handled and
    /// no answer is waiting to be taken.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        let state = self.lock();
        let stalled_answer = state.answers.values().min().copied();
        let quiet = (state.handling == 0).then_some(state.last_busy);
        let since = match (stalled_answer, quiet) {
            (Some(answer), Some(quiet)) => answer.min(quiet),
            (answer, quiet) => answer.or(quiet)?,
        };
        // A limit past any clock (not one `LimitsConfig::validate` lets
        // through) never ends.
        since.checked_add(limit)
    }

    /// Counts a request being handled until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> Handling {
        self.lock().handling += 1;
        Handling(Arc::clone(self))
    }

    /// Starts the clock again for the connection and for every answer on
    /// it: the server asks it to close and gives it the close's timeout,
    /// counted from now, to finish what it can.
    pub fn closing(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        state.last_busy = now;
        for moved in state.answers.values_mut() {
            *moved = now;
        }
    }

    /// Registers an answer handed over just now; returns its id.
    fn handed_over(&self) -> u64 {
        let now = Instant::now();
        let mut state = self.lock();
        let id = state.next_answer;
        state.next_answer += 1;
        state.answers.insert(id, now);
        state.last_busy = now;
        let handling = state.handling > 0;
        drop(state);
        // With no request being handled the deadline was `last_busy`'s,
        // no earlier than this answer's.
        if handling {
            self.earlier.notify_waiters();
        }
        id
    }

    /// Notes that answer `id` moved on just now.
    fn moved(&self, id: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(moved) = state.answers.get_mut(&id) {
            *moved = now;
        }
        state.last_busy = now;
    }

    /// Forgets answer `id`: sent whole, or given up. Either way the
    /// connection moved on.
    fn ended(&self, id: u64) {
        let mut state = self.lock();
        state.answers.remove(&id);
        state.last_busy = Instant::now();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One request being handled; dropping it (the handler answered, or the
/// request was given up) ends it.
#[derive(Debug)]
struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut state = activity.lock();
        state.handling -= 1;
        state.last_busy = Instant::now();
        if state.handling == 0 {
            drop(state);
            activity.earlier.notify_waiters();
        }
    }
}

/// A connection's service that tells its [`Activity`] what its requests
/// and their answers do.
#[derive(Debug, Clone)]
pub struct TrackActivity<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> TrackActivity<S> {
    /// `inner`, telling `activity`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        TrackActivity { inner, activity }
    }
}

impl<S, R> hyper::service::Service<R> for TrackActivity<S>
where
    S: hyper::service::Service<R, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: R) -> Self::Future {
        let answer = self.inner.call(request);
        let activity = Arc::clone(&self.activity);
        Box::pin(async move {
            // Counted from the first poll, not from the call: HTTP/1.1
            // reads (and calls for) the next request while the previous
            // answer is still being written, and polls it only once that
            // answer is out. A client that never reads would keep such a
            // request "handled" for ever. A request that arrives as the
            // connection is found idle is not cut either way: the close
            // is graceful.
            let handling = activity.begin();
            let response = answer.await?;
            drop(handling);
            Ok(response.map(|body| Body::new(AnswerBody::new(body, activity))))
        })
    }
}

/// An answer's body that tells its connection's [`Activity`] each time a
/// piece of it is taken, and when it ends.
#[derive(Debug)]
struct AnswerBody {
    body: Body,
    /// What is left of the last data frame, handed out next.
    rest: Bytes,
    activity: Arc<Activity>,
    /// This answer's id in `activity`.
    id: u64,
}

impl AnswerBody {
    /// `body`, handed over to its connection just now.
    fn new(body: Body, activity: Arc<Activity>) -> AnswerBody {
        let id = activity.handed_over();
        AnswerBody {
            body,
            rest: Bytes::new(),
            activity,
            id,
        }
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(frame) => {
                        this.activity.moved(this.id);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                other => return other,
            }
        }
        let take = this.rest.len().min(ANSWER_PIECE);
        let last = take == this.rest.len() && this.body.is_end_stream();
        let piece = if last && take > 1 {
            // The final byte goes out as a piece of its own, copied out of
            // the answer's buffer. hyper drops a body as soon as its last
            // piece is queued, which over HTTP/2 can be long before it is
            // sent (one free byte of window is enough): held back, the
            // byte keeps the answer timed until everything before it was
            // taken, and a stuck byte does not keep the answer's memory.
            let piece = this.rest.split_to(take - 1);
            this.rest = Bytes::copy_from_slice(&this.rest);
            piece
        } else {
            this.rest.split_to(take)
        };
        this.activity.moved(this.id);
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let body = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(rest));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        self.activity.ended(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Body as _;

    const LIMIT: Duration = Duration::from_secs(60);

    /// Whether `idle_for(LIMIT)` resolves within `wait` of virtual time.
    async fn idle_within(activity: &Arc<Activity>, wait: Duration) -> bool {
        tokio::time::timeout(wait, activity.idle_for(LIMIT))
            .await
            .is_ok()
    }

    /// The answer `body` as its connection's service hands it to hyper.
    fn answer(activity: &Arc<Activity>, body: impl Into<Body>) -> AnswerBody {
        AnswerBody::new(body.into(), Arc::clone(activity))
    }

    /// A task that waits for `activity` to be idle for `LIMIT`, and
    /// returns when it was.
    fn idle_waiter(activity: &Arc<Activity>) -> tokio::task::JoinHandle<Instant> {
        let activity = Arc::clone(activity);
        tokio::spawn(async move {
            activity.idle_for(LIMIT).await;
            Instant::now()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_the_limit() {
        let activity = Activity::new();
        let started = Instant::now();
        activity.idle_for(LIMIT).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_handled_is_never_idle() {
        let activity = Activity::new();
        let request = activity.begin();
        assert!(!idle_within(&activity, LIMIT * 10).await);
        // The limit counts from the answer.
        drop(request);
        assert!(!idle_within(&activity, LIMIT - Duration::from_secs(1)).await);
        assert!(idle_within(&activity, Duration::from_secs(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_ends_while_waiting_restarts_the_limit() {
        let activity = Activity::new();
        let waiter = idle_waiter(&activity);
        tokio::time::sleep(LIMIT / 2).await;
        drop(activity.begin());
        tokio::time::sleep(LIMIT / 2 + Duration::from_secs(1)).await;
        assert!(
            !waiter.is_finished(),
            "idle only half a limit since the request"
        );
        tokio::time::sleep(LIMIT / 2).await;
        assert!(waiter.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_requests_end_when_the_last_one_does() {
        let activity = Activity::new();
        let first = activity.begin();
        let second = activity.begin();
        drop(first);
        assert!(!idle_within(&activity, LIMIT * 2).await);
        drop(second);
        assert!(idle_within(&activity, LIMIT + Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_its_client_does_not_take_is_idle_after_the_limit() {
        let activity = Activity::new();
        // Answered, and the body is never polled (no window, a full socket).
        drop(activity.begin());
        let answered = Instant::now();
        let body = answer(&activity, "never taken");
        activity.idle_for(LIMIT).await;
        assert_eq!(answered.elapsed(), LIMIT);
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_answer_is_idle_after_the_limit_whatever_else_its_connection_does() {
        let activity = Activity::new();
        // A request handled throughout (a slow upload on another stream).
        let upload = activity.begin();
        let stalled = answer(&activity, "never taken");
        let handed_over = Instant::now();
        let waiter = idle_waiter(&activity);
        // Four times a limit, another request answered and its answer
        // taken whole: the connection is never quiet.
        while !waiter.is_finished() && handed_over.elapsed() < LIMIT * 2 {
            tokio::time::sleep(LIMIT / 4).await;
            drop(activity.begin());
            let mut taken = answer(&activity, vec![b'x'; ANSWER_PIECE * 2]);
            while taken.frame().await.is_some() {}
        }
        let idle_at = waiter.await.expect("the waiter does not panic");
        assert_eq!(idle_at - handed_over, LIMIT);
        drop((upload, stalled));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_handed_over_while_a_request_is_handled_starts_its_clock() {
        let activity = Activity::new();
        let upload = activity.begin();
        let waiter = idle_waiter(&activity);
        tokio::time::sleep(LIMIT * 2).await;
        assert!(!waiter.is_finished(), "idle while a request is handled");
        // Another request on the connection answers; its client never
        // takes the answer.
        drop(activity.begin());
        let stalled = answer(&activity, "never taken");
        let handed_over = Instant::now();
        let idle_at = tokio::time::timeout(LIMIT * 2, waiter)
            .await
            .expect("idle once the answer has stalled for the limit")
            .expect("the waiter does not panic");
        assert_eq!(idle_at - handed_over, LIMIT);
        drop((upload, stalled));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_taken_piece_by_piece_keeps_its_connection_busy() {
        let activity = Activity::new();
        drop(activity.begin());
        let mut body = answer(&activity, vec![b'x'; ANSWER_PIECE * 5 / 2]);
        assert_eq!(body.size_hint().exact(), Some(ANSWER_PIECE as u64 * 5 / 2));
        let mut pieces = Vec::new();
        // Each piece taken just before the limit: never idle.
        while let Some(frame) = body.frame().await {
            let piece = frame.expect("a full body").into_data().expect("data");
            pieces.push(piece.len());
            assert!(!idle_within(&activity, LIMIT - Duration::from_secs(1)).await);
        }
        // The final byte comes on its own (see `poll_frame`).
        assert_eq!(
            pieces,
            [ANSWER_PIECE, ANSWER_PIECE, ANSWER_PIECE / 2 - 1, 1]
        );
        assert!(body.is_end_stream());
        // Ended: the limit counts from then, and for the connection only.
        drop(body);
        assert!(!idle_within(&activity, LIMIT - Duration::from_secs(1)).await);
        assert!(idle_within(&activity, Duration::from_secs(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_gives_every_answer_the_limit_again() {
        let activity = Activity::new();
        let stalled = answer(&activity, "never taken");
        tokio::time::sleep(LIMIT / 2).await;
        activity.closing();
        let closing = Instant::now();
        activity.idle_for(LIMIT).await;
        assert_eq!(closing.elapsed(), LIMIT);
        drop(stalled);
    }
}
