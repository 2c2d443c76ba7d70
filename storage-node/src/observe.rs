//! Per-request bookkeeping shared by the node's gRPC services: the request id
//! (taken from the caller's `x-request-id` metadata or made up), the tracing
//! span every log line of the request carries, the in-flight gauge, and the
//! request counter and latency histogram by method and status code.
//!
//! A [`Call`] is started before a handler does any work and finished with its
//! result; if the client goes away first, dropping the call records it as
//! `CANCELLED`. Nothing here touches the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use caskade_common::telemetry::{self, REQUEST_ID_HEADER};
use metrics::{counter, gauge, histogram};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tracing::Span;

use crate::status::code_label;

/// Metric names, one place.
pub mod names {
    /// Counter: finished requests, by `method` and `code`.
    pub const REQUESTS: &str = "caskade_node_requests_total";
    /// Histogram: request latency in seconds, by `method` and `code`.
    pub const REQUEST_SECONDS: &str = "caskade_node_request_duration_seconds";
    /// Gauge: requests being served.
    pub const IN_FLIGHT: &str = "caskade_node_requests_in_flight";
}

/// Starts [`Call`]s for one node; its id labels every series.
#[derive(Debug, Clone)]
pub struct Observer {
    node: Arc<str>,
    /// Requests being served. The gauge is looked up at every change
    /// rather than held: an idle gauge leaves the registry (see
    /// `caskade_common::telemetry::GAUGE_IDLE_TIMEOUT`), and a held handle
    /// would then update a series no longer exported.
    in_flight: Arc<AtomicI64>,
}

impl Observer {
    /// An observer labelling its series `node="<node_id>"`.
    pub fn new(node_id: u32) -> Observer {
        let node: Arc<str> = node_id.to_string().into();
        Observer {
            node,
            in_flight: Arc::default(),
        }
    }

    /// Adds `change` to the requests in flight and publishes the count.
    fn count_in_flight(&self, change: i64) {
        self.in_flight.fetch_add(change, Ordering::Relaxed);
        self.publish_in_flight();
    }

    /// Publishes the requests in flight: at every change, and before every
    /// scrape (so that the gauge never goes idle, and a set that lost a
    /// race with another thread's is corrected).
    pub fn publish_in_flight(&self) {
        let now = self.in_flight.load(Ordering::Relaxed);
        gauge!(names::IN_FLIGHT, "node" => self.node.to_string()).set(now as f64);
    }

    /// Starts timing a call of `method`.
    pub fn start(&self, method: &'static str, metadata: &MetadataMap) -> Call {
        let caller_id = metadata
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        let request_id = telemetry::request_id(caller_id);
        let span = tracing::info_span!("request", node = %self.node, method, request_id);
        self.count_in_flight(1);
        Call {
            observer: self.clone(),
            method,
            span,
            started: Instant::now(),
            finished: false,
        }
    }
}

/// One request being served.
#[derive(Debug)]
pub struct Call {
    observer: Observer,
    method: &'static str,
    span: Span,
    started: Instant,
    finished: bool,
}

impl Call {
    /// The span to run the handler in.
    pub fn span(&self) -> Span {
        self.span.clone()
    }

    /// Records the outcome and hands `result` back.
    pub fn finish<T>(mut self, result: Result<T, Status>) -> Result<T, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.record(code);
        result
    }

    fn record(&mut self, code: Code) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let code_label = code_label(code);
        let labels = [
            ("node", self.observer.node.to_string()),
            ("method", self.method.to_string()),
            ("code", code_label.to_string()),
        ];
        counter!(names::REQUESTS, &labels).increment(1);
        histogram!(names::REQUEST_SECONDS, &labels).record(elapsed.as_secs_f64());
        self.observer.count_in_flight(-1);
        let _entered = self.span.enter();
        let micros = elapsed.as_micros() as u64;
        match code {
            Code::Internal | Code::DataLoss | Code::Unknown => {
                tracing::warn!(code = code_label, micros, "request failed")
            }
            _ => tracing::debug!(code = code_label, micros, "request done"),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            // The client cancelled or the connection closed mid-request.
            self.record(Code::Cancelled);
        }
    }
}
