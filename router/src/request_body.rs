//! How long a client may take to send a request body, and what becomes of
//! its connection when the router answers without reading the body.
//!
//! Every body has a deadline: `limits.body_timeout_ms` after the request's
//! head arrived, moved one second later for every
//! `limits.body_min_bytes_per_sec` bytes received (Apache's mod_reqtimeout
//! `body=…,MinRate=…`). A large upload at a reasonable rate finishes; a
//! client that stops sending does not hold its connection. A body past its
//! deadline ends in an error for whoever is reading it, and the request is
//! then answered 408, whatever the handler made of the error. A 408, or a
//! 413 whose body was not read to its end, closes an HTTP/1.1 connection
//! (`Connection: close`) instead of leaving the rest of the body to be
//! drained; on HTTP/2 only the stream ends.
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

    /// The base time, plus a second for every `min_bytes_per_sec` received.
    fn deadline(&self) -> Instant {
        let allowance = self.received.saturating_mul(1000) / self.min_bytes_per_sec;
        self.started + self.base + Duration::from_millis(allowance)
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
    async fn a_body_that_stops_is_late_after_the_base_time_and_its_allowance() {
        let (sender, body) = channel_body();
        let progress = Arc::new(Progress::default());
        let mut body = DeadlineBody::new(body, &limits(), Arc::clone(&progress));
        let started = Instant::now();
        // 50 bytes at 100 bytes/s: half a second more than the base time.
        sender
            .send(Ok(Frame::data(Bytes::from(vec![b'x'; 50]))))
            .await
            .expect("the body is read");
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.data_ref().map(Bytes::len), Some(50));
        let error = body.frame().await.expect("an end").expect_err("late");
        assert!(
            error.to_string().contains("not received in time"),
            "{error}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(1_500));
        assert!(progress.late.load(Ordering::Acquire));
        assert!(!progress.ended.load(Ordering::Acquire));
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_the_minimum_rate_is_read_whole() {
        let (sender, body) = channel_body();
        let progress = Arc::new(Progress::default());
        let body = DeadlineBody::new(body, &limits(), Arc::clone(&progress));
        // 100 bytes a second for ten seconds: ten times the base time.
        tokio::spawn(async move {
            for _ in 0..10 {
                let frame = Frame::data(Bytes::from(vec![b'x'; 100]));
                if sender.send(Ok(frame)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let whole = body.collect().await.expect("in time").to_bytes();
        assert_eq!(whole.len(), 1_000);
        assert!(progress.ended.load(Ordering::Acquire));
        assert!(!progress.late.load(Ordering::Acquire));
    }
}
