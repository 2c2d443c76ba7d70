//! The threads that run engine calls for the gRPC services.
//!
//! Engine calls block (file I/O, and fsync under `always`), so they never run
//! on tokio's workers. Calls that do not wait for an fsync (reads, and writes
//! under `interval` or `never`) go to a fixed set of threads fed by one
//! queue: under load a thread takes the next call without going to sleep,
//! so a request costs no thread wake-up, which tokio's blocking pool pays on
//! every call. Writes under `always` wait for a group commit and go to the
//! blocking pool instead, whose threads grow with the number of waiting
//! writers: a fixed set would cap every commit group at its own size.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crossbeam_channel::{Receiver, Sender};
use tonic::Status;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running engine calls. Dropping it closes the
/// queue; each thread ends once the calls already queued are done. (It is not
/// joined: the last handle may be dropped on one of its own threads.)
#[derive(Debug)]
pub struct EngineThreads {
    queue: Sender<Job>,
}

impl EngineThreads {
    /// Starts `count` threads (at least one).
    pub fn start(count: usize) -> std::io::Result<EngineThreads> {
        let (queue, jobs) = crossbeam_channel::unbounded::<Job>();
        for i in 0..count.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("engine-{i}"))
                .spawn(move || work(&jobs))?;
        }
        Ok(EngineThreads { queue })
    }

    /// Runs `call` on one of the threads, inside the caller's span.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let (done, result) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job: Job = Box::new(move || {
            let _ = done.send(span.in_scope(call));
        });
        self.queue
            .send(job)
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        // The sender is dropped unsent only if the call panicked.
        result.await.map_err(|_| {
            tracing::error!("engine call panicked");
            Status::internal("internal error")
        })?
    }
}

fn work(jobs: &Receiver<Job>) {
    for job in jobs {
        // A panicking call must not take the thread with it; its caller sees
        // the dropped result channel.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_call_fails_alone_and_the_threads_go_on() {
        let threads = EngineThreads::start(1).expect("start");
        let failed = threads
            .run(|| -> Result<(), Status> { panic!("engine call panics") })
            .await
            .expect_err("the panic is an error");
        assert_eq!(failed.code(), tonic::Code::Internal);
        // The one thread survived the panic and serves the next call.
        assert_eq!(threads.run(|| Ok(7)).await.expect("next call"), 7);
    }

    #[tokio::test]
    async fn calls_run_off_the_runtime_threads() {
        let threads = EngineThreads::start(2).expect("start");
        let name = threads
            .run(|| Ok(std::thread::current().name().map(str::to_owned)))
            .await
            .expect("call");
        assert!(name.is_some_and(|n| n.starts_with("engine-")));
    }
}
