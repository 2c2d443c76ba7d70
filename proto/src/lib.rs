//! caskade-proto: the storage node's gRPC API (`proto/caskade/v1/*.proto`) and
//! the tonic/prost code generated from it at build time.
//!
//! Services: [`kv_server::Kv`] (get, put, delete, scan, batch) and
//! [`admin_server::Admin`] (cluster map, stats, merge, backup) and
//! [`replication_server::Replication`] (pull, snapshot, apply between nodes and
//! for read repair). Readiness uses
//! the standard `grpc.health.v1` protocol (tonic-health), not a service here.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

tonic::include_proto!("caskade.v1");
