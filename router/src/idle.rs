//! Idle client connections: which of a connection's requests are in
//! progress, and when it has had none for `limits.idle_timeout_ms`.
//!
//! A request is in progress from the moment hyper hands it to the
//! application until its answer's body has been sent or dropped. Idle is
//! everything else: before the first request (a TLS client that never
//! speaks), between HTTP/1.1 requests, an HTTP/2 connection with no open
//! stream. Without this, such a connection would hold one of
//! `max_connections` for as long as its client likes. This module only
//! tells the time; the server closes the connection, gracefully, so that
//! it must never cut a request in progress.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The requests in progress on one connection.
#[derive(Debug)]
pub struct Activity {
    /// Held only to read or update the two fields, never across an `.await`.
    state: Mutex<State>,
    /// Woken whenever the last request in progress ends.
    idle_again: Notify,
}

#[derive(Debug)]
struct State {
    in_progress: usize,
    /// When `in_progress` last fell to zero (or the connection opened).
    idle_since: Instant,
}

impl Activity {
    /// A connection that has just opened: idle, with no request yet.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                in_progress: 0,
                idle_since: Instant::now(),
            }),
            idle_again: Notify::new(),
        })
    }

    /// Resolves once the connection has had no request in progress for
    /// `limit` without a break.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let idle_again = self.idle_again.notified();
            tokio::pin!(idle_again);
            // Registered before the state is read, so an end in between wakes it.
            idle_again.as_mut().enable();
            let Some(since) = self.idle_since() else {
                idle_again.await;
                continue;
            };
            let Some(deadline) = since.checked_add(limit) else {
                return std::future::pending().await;
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    // A request that began and ended meanwhile moved `idle_since`.
                    if self.idle_since() == Some(since) {
                        return;
                    }
                }
                () = idle_again => {}
            }
        }
    }

    /// When the connection became idle, or `None` while a request is in progress.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.in_progress == 0).then_some(state.idle_since)
    }

    /// Counts a request in progress until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> InProgress {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.in_progress += 1;
        InProgress(Arc::clone(self))
    }
}

/// One request in progress; dropping it ends it.
#[derive(Debug)]
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut state = activity
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.in_progress -= 1;
        if state.in_progress == 0 {
            state.idle_since = Instant::now();
            drop(state);
            activity.idle_again.notify_waiters();
        }
    }
}

/// A connection's service that counts its requests in progress in an
/// [`Activity`]: each from the call until its answer's body is done.
#[derive(Debug, Clone)]
pub struct TrackActivity<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> TrackActivity<S> {
    /// `inner`, counting into `activity`.
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
        // Counted here, in the connection's own task, before the request
        // can be polled anywhere else: the idle timer never sees a request
        // that has arrived as no request.
        let in_progress = self.activity.begin();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                Body::new(AnswerBody {
                    body,
                    _in_progress: in_progress,
                })
            }))
        })
    }
}

/// An answer's body that keeps its request in progress until it is done.
#[derive(Debug)]
struct AnswerBody {
    body: Body,
    _in_progress: InProgress,
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    /// Whether `idle_for(LIMIT)` resolves within `wait` of virtual time.
    async fn idle_within(activity: &Arc<Activity>, wait: Duration) -> bool {
        tokio::time::timeout(wait, activity.idle_for(LIMIT))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_the_limit() {
        let activity = Activity::new();
        let started = Instant::now();
        activity.idle_for(LIMIT).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle() {
        let activity = Activity::new();
        let request = activity.begin();
        assert!(!idle_within(&activity, LIMIT * 10).await);
        // The limit counts from the end of the request.
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
}
