//! How long a client may take to send a request body, and what becomes of
//! its connection when the router answers without reading the body.
//!
//! Every body has two deadlines, and must meet both. A rate:
//! `limits.body_timeout_ms` after the request's head arrived, moved one
//! second later for every `limits.body_min_bytes_per_sec` bytes received
//! (Apache's mod_reqtimeout `body=…,MinRate=…`). And a gap: no more than
//! `limits.body_timeout_ms` without a byte, so that a client cannot send a
//! burst and then stay silent on the allowance it earned. A large upload at
//! a reasonable rate finishes; a client that stops sending does not hold
//! its connection. Both count per request (per stream over HTTP/2): a
//! client's parallel uploads over one link each need the minimum rate. A
//! body past a deadline ends in an error for whoever is reading it, and the
//! request is then answered 408, whatever the handler made of the error. A
//! 408, or a 413 whose body was not read to its end, closes an HTTP/1.1
//! connection (`Connection: close`) instead of leaving the rest of the body
//! to be drained; on HTTP/2 only the stream ends.
//!
//! This layer never reads a body itself, and never answers a request whose
//! body was not late.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::app::AppState;
use crate::config::LimitsConfig;
use crate::error::ApiError;

/// The layer: gives the request's body its deadline and answers 408 when
/// it passed.
pub async fn deadline(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        // No body (most GETs): nothing to wait for.
        return next.run(request).await;
    }
    let http1 = request.version() < Version::HTTP_2;
    let progress = Arc::new(Progress::default());
    let request = request.map(|body| {
        Body::new(DeadlineBody::new(
            body,
            &state.limits,
            Arc::clone(&progress),
        ))
    });
    let mut response = next.run(request).await;
    if progress.late.load(Ordering::Acquire) {
        tracing::info!("request body not received in time");
        response = ApiError::BodyTimeout.into_response();
    }
    let unread = !progress.ended.load(Ordering::Acquire);
    let refused = matches!(
        response.status(),
        StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE
    );
    if http1 && refused && unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// What the layer learns of a body from whoever reads it.
#[derive(Debug, Default)]
struct Progress {
    /// The body was read to its end.
    ended: AtomicBool,
    /// The deadline passed while the body was being read.
    late: AtomicBool,
}

/// Why a late body ended.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time")]
struct BodyTimedOut;

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    body: Body,
    started: Instant,
    base: Duration,
    min_bytes_per_sec: u64,
    received: u64,
    /// Fires at the current deadline; reset as data arrives.
    timer: Pin<Box<Sleep>>,
    progress: Arc<Progress>,
}

impl DeadlineBody {
    /// `body`, whose head arrived just now. `limits` have been validated:
    /// the body timeout is at most a day, far from overflowing the clock.
    fn new(body: Body, limits: &LimitsConfig, progress: Arc<Progress>) -> DeadlineBody {
        let started = Instant::now();
        let base = limits.body_timeout();
        DeadlineBody {
            body,
            started,
            base,
            min_bytes_per_sec: limits.body_min_bytes_per_sec.max(1),
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(started + base)),
            progress,
        }
    }

    /// The earlier of the rate's deadline (the base time, plus a second for
    /// every `min_bytes_per_sec` received) and the gap's (the base time
    /// from now, as data has just arrived).
    fn deadline(&self) -> Instant {
        let gap = Instant::now() + self.base;
        // The allowance grows with what is received, without a limit of
        // its own: a rate deadline past any clock is later than the gap's.
        let allowance = self.received.saturating_mul(1000) / self.min_bytes_per_sec;
        let rate = self
            .started
            .checked_add(self.base.saturating_add(Duration::from_millis(allowance)));
        rate.map_or(gap, |rate| rate.min(gap))
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.progress.late.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    let deadline = this.deadline();
                    this.timer.as_mut().reset(deadline);
                }
                if this.body.is_end_stream() {
                    this.progress.ended.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.progress.ended.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.progress.late.store(true, Ordering::Release);
                    Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.progress.late.load(Ordering::Acquire) || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn limits() -> LimitsConfig {
        LimitsConfig {
            body_timeout_ms: 1_000,
            body_min_bytes_per_sec: 100,
            ..LimitsConfig::default()
        }
    }

    /// A body fed through the returned sender.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        Body,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        (sender, Body::new(StreamBody::new(stream)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_below_the_minimum_rate_is_late_once_its_allowance_is_spent() {
        let (sender, body) = channel_body();
        let progress = Arc::new(Progress::default());
        let body = DeadlineBody::new(body, &limits(), Arc::clone(&progress));
        let started = Instant::now();
        // 10 bytes every half second: 20 bytes/s, never a second's silence.
        tokio::spawn(async move {
            loop {
                let frame = Frame::data(Bytes::from(vec![b'x'; 10]));
                if sender.send(Ok(frame)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let error = body.collect().await.expect_err("late");
        assert!(
            error.to_string().contains("not received in time"),
            "{error}"
        );
        // The base second, and 0.1 s for each of the 30 bytes received by
        // then (at 0, 0.5 and 1 s): the next 10 would come at 1.5 s.
        assert_eq!(started.elapsed(), Duration::from_millis(1_300));
        assert!(progress.late.load(Ordering::Acquire));
        assert!(!progress.ended.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_silent_for_the_base_time_is_late_whatever_it_sent_before() {
        let (sender, body) = channel_body();
        let progress = Arc::new(Progress::default());
        let mut body = DeadlineBody::new(body, &limits(), Arc::clone(&progress));
        // 10,000 bytes at once: 100 s of allowance at 100 bytes/s.
        sender
            .send(Ok(Frame::data(Bytes::from(vec![b'x'; 10_000]))))
            .await
            .expect("the body is read");
        tokio::time::sleep(Duration::from_millis(300)).await;
        body.frame().await.expect("a frame").expect("data");
        let silent_from = Instant::now();
        let error = body.frame().await.expect("an end").expect_err("late");
        assert!(
            error.to_string().contains("not received in time"),
            "{error}"
        );
        assert_eq!(silent_from.elapsed(), Duration::from_millis(1_000));
        assert!(progress.late.load(Ordering::Acquire));
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_the_minimum_rate_is_read_whole() {
        let (sender, body) = channel_body();
        let progress = Arc::new(Progress::default());
        let body = DeadlineBody::new(body, &limits(), Arc::clone(&progress));
        // 100 bytes every 0.9 s for nine seconds: nine times the base time,
        // above the minimum rate, and never silent for the base time.
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let frame = Frame::data(Bytes::from(vec![b'x'; 100]));
                if sender.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        let whole = body.collect().await.expect("in time").to_bytes();
        assert_eq!(whole.len(), 1_000);
        assert!(progress.ended.load(Ordering::Acquire));
        assert!(!progress.late.load(Ordering::Acquire));
    }
}
