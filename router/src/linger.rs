//! Lingering close, as Apache and nginx do it. When the router closes a
//! connection whose client may still be sending (a body refused before it
//! was read: a 413 for a declared length over the limit, a 408), closing
//! the socket at once with unread bytes in it makes the kernel reset the
//! connection, and the client, still busy writing its body, gets a broken
//! pipe instead of the answer it was sent. So the router first closes its
//! own side (the client sees the end of the answer), then reads and drops
//! whatever the client still sends, until it has been quiet for [`QUIET`],
//! has closed its side too, or [`MAX`] has passed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client that sends nothing for this long is done.
pub const QUIET: Duration = Duration::from_millis(200);
/// The longest a close lingers.
pub const MAX: Duration = Duration::from_secs(2);
/// Reads of one poll, before the task yields.
const READS_PER_POLL: usize = 32;

/// A connection that lingers when it is shut down.
#[derive(Debug)]
pub struct Lingering<S> {
    inner: S,
    state: State,
}

#[derive(Debug)]
enum State {
    Open,
    Draining {
        until: Instant,
        quiet: Pin<Box<Sleep>>,
    },
    Closed,
}

impl<S> Lingering<S> {
    /// `inner`, lingering when shut down.
    pub fn new(inner: S) -> Lingering<S> {
        Lingering {
            inner,
            state: State::Open,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    if shut.is_err() {
                        this.state = State::Closed;
                        return Poll::Ready(shut);
                    }
                    let now = Instant::now();
                    this.state = State::Draining {
                        until: now + MAX,
                        quiet: Box::pin(tokio::time::sleep_until(now + QUIET)),
                    };
                }
                State::Draining { until, quiet } => {
                    let mut scratch = [0u8; 16 << 10];
                    // Deadlines are read off the clock, not only from the
                    // timer: a timer polled after the task's budget was
                    // spent on reads would not fire.
                    for _ in 0..READS_PER_POLL {
                        if Instant::now() >= *until {
                            this.state = State::Closed;
                            return Poll::Ready(Ok(()));
                        }
                        let mut buf = ReadBuf::new(&mut scratch);
                        match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                            // More from the client: dropped; it is not quiet yet.
                            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                                let next = (Instant::now() + QUIET).min(*until);
                                quiet.as_mut().reset(next);
                            }
                            // Its end, or a broken connection: done.
                            Poll::Ready(_) => {
                                this.state = State::Closed;
                                return Poll::Ready(Ok(()));
                            }
                            Poll::Pending => {
                                if quiet.as_mut().poll(cx).is_ready()
                                    || Instant::now() >= quiet.deadline()
                                {
                                    this.state = State::Closed;
                                    return Poll::Ready(Ok(()));
                                }
                                return Poll::Pending;
                            }
                        }
                    }
                    // Still sending: let other tasks run, then read on.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_shutdown_drains_what_the_peer_still_sends_then_ends() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Lingering::new(near);
        let writer = tokio::spawn(async move {
            // Far more than the pipe holds: only a reader lets it through.
            far.write_all(&[7u8; 64 << 10]).await.unwrap();
            let mut end = Vec::new();
            far.read_to_end(&mut end).await.unwrap();
            end
        });
        near.shutdown().await.unwrap();
        // The peer sent everything and saw our end, with nothing after it.
        assert!(writer.await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_holds_the_close_for_the_quiet_time_only() {
        let (near, _far) = tokio::io::duplex(64);
        let mut near = Lingering::new(near);
        let started = Instant::now();
        near.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_stops_sending_holds_the_close_no_longer_than_max() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Lingering::new(near);
        tokio::spawn(async move {
            loop {
                if far.write_all(&[1u8; 16]).await.is_err() {
                    return;
                }
                tokio::time::sleep(QUIET / 4).await;
            }
        });
        let started = Instant::now();
        near.shutdown().await.unwrap();
        assert!(started.elapsed() >= MAX && started.elapsed() <= MAX + QUIET);
    }
}
