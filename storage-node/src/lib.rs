//! caskade-node: a caskade storage node.
//!
//! [`engine`] is the Bitcask storage engine: append-only data files, an
//! in-memory ordered keydir, hint files and background merge. It does no
//! networking; the services reach it only through [`engine::Engine`].
//!
//! Around it: `cluster` is the cluster map decided by the nodes' Raft
//! group, [`kv`] and [`admin`] are the gRPC services, [`replication`]
//! pulls from peers, serves their pulls and waits for write levels, [`status`] the one
//! table from engine errors to gRPC codes, [`observe`] the per-request
//! metrics and log context, [`config`] the configuration file, and
//! [`clock`] the versions' clock, [`server`] starts, serves and stops a node ([`run`]).

pub mod admin;
pub mod clock;
pub mod clock_offset;
pub(crate) mod cluster;
pub mod config;
pub mod engine;
pub mod engine_threads;
mod epochs;
mod files;
pub mod key_locks;
pub mod kv;
pub mod observe;
pub mod peers;
pub mod replication;
pub mod server;
pub mod status;

pub use config::NodeConfig;
pub use server::{Node, NodeError, run};

use std::path::PathBuf;
use std::process::ExitCode;

use caskade_common::process::run_server;
use clap::Parser;

/// A caskade storage node: Bitcask storage served over mutual-TLS gRPC.
#[derive(Debug, Parser)]
#[command(name = "caskade-node", version)]
struct Args {
    /// TOML configuration file; `CASKADE_NODE_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// The `caskade-node` command: parses its flags, loads the configuration
/// and runs the node until SIGTERM or Ctrl-C.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("caskade-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let config = NodeConfig::load(args.config.as_deref());
        run_server("caskade-node", config, |c| &c.log, run).await
    })
}
