//! Idle client connections: when a connection last did anything for its
//! client, and when it has done nothing for `limits.idle_timeout_ms`.
//!
//! A connection is busy while one of its requests is being handled (from
//! the first poll of the handler until it answers: reading the request's
//! body, waiting for the nodes), and each time an answer's body moves on
//! (a piece of it is taken for sending, or it ends). Idle is the time
//! between: before the first request (a TLS client that never speaks),
//! between HTTP/1.1 requests, an HTTP/2 connection with no open stream,
//! and an answer its client does not take (an HTTP/2 window never opened,
//! an HTTP/1.1 client that pipelines requests and never reads). Without
//! this, such a connection would hold one of `max_connections` for as long
//! as its client likes.
//!
//! Answers are handed out in pieces of at most [`ANSWER_PIECE`] bytes, so
//! that a large answer taken slowly still moves on within the idle
//! timeout. This module only tells the time; the server closes the
//! connection, and must bound how long that close may take.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The most of an answer's body handed out at once: an HTTP/2 frame's
/// default size, and what fits hyper's HTTP/1.1 write buffer.
const ANSWER_PIECE: usize = 16 << 10;

/// What one connection is doing for its client.
#[derive(Debug)]
pub struct Activity {
    /// Held only to read or update the two fields, never across an `.await`.
    state: Mutex<State>,
    /// Woken whenever the last request being handled has answered.
    handled: Notify,
}

#[derive(Debug)]
struct State {
    /// Requests whose handler has been polled and has not answered yet.
    handling: usize,
    /// When the connection last did something for its client: it opened,
    /// a handler answered, or an answer's body moved on.
    last_busy: Instant,
}

impl Activity {
    /// A connection that has just opened: idle, with no request yet.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                handling: 0,
                last_busy: Instant::now(),
            }),
            handled: Notify::new(),
        })
    }

    /// Resolves once the connection has done nothing for its client for
    /// `limit` without a break.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let handled = self.handled.notified();
            tokio::pin!(handled);
            // Registered before the state is read, so an answer in between wakes it.
            handled.as_mut().enable();
            let Some(since) = self.idle_since() else {
                handled.await;
                continue;
            };
            let Some(deadline) = since.checked_add(limit) else {
                return std::future::pending().await;
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    // Anything done meanwhile moved `idle_since`.
                    if self.idle_since() == Some(since) {
                        return;
                    }
                }
                () = handled => {}
            }
        }
    }

    /// When the connection was last busy, or `None` while a request is
    /// being handled.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.lock();
        (state.handling == 0).then_some(state.last_busy)
    }

    /// Counts a request being handled until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> Handling {
        self.lock().handling += 1;
        Handling(Arc::clone(self))
    }

    /// Notes that the connection did something for its client just now
    /// (the server asking it to close counts too).
    pub fn busy(&self) {
        self.lock().last_busy = Instant::now();
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
            activity.handled.notify_waiters();
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
            Ok(response.map(|body| {
                Body::new(AnswerBody {
                    body,
                    rest: Bytes::new(),
                    activity,
                })
            }))
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
                        this.activity.busy();
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                other => return other,
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(ANSWER_PIECE));
        this.activity.busy();
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
        // Sent whole, or given up: either way the connection moved on.
        self.activity.busy();
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
        AnswerBody {
            body: body.into(),
            rest: Bytes::new(),
            activity: Arc::clone(activity),
        }
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
        let waiter = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.idle_for(LIMIT).await })
        };
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
        assert_eq!(pieces, [ANSWER_PIECE, ANSWER_PIECE, ANSWER_PIECE / 2]);
        assert!(body.is_end_stream());
        drop(body);
        assert!(!idle_within(&activity, LIMIT - Duration::from_secs(1)).await);
        assert!(idle_within(&activity, Duration::from_secs(2)).await);
    }
}
