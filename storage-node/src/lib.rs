//! caskade-node: a caskade storage node.
//!
//! [`engine`] is the Bitcask storage engine: append-only data files, an
//! in-memory ordered keydir, hint files and background merge. It does no
//! networking; the services reach it only through [`engine::Engine`].
//!
//! Around it: [`kv`] and [`admin`] are the gRPC services, [`replication`]
//! pulls from peers, serves their pulls and waits for write levels, [`status`] the one
//! table from engine errors to gRPC codes, [`observe`] the per-request
//! metrics and log context, [`config`] the configuration file, and
//! [`server`] starts, serves and stops a node ([`run`]).

pub mod admin;
pub mod config;
pub mod engine;
pub mod engine_threads;
pub mod kv;
pub mod observe;
pub mod replication;
pub mod server;
pub mod status;

pub use config::NodeConfig;
pub use server::{Node, NodeError, run};
