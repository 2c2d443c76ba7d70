//! caskade-bench's shared parts: the seeded workload (keys, values, read
//! order), the timed loops, the network load driver, the storage nodes run
//! in the benchmark's own process and what that process spends. They serve
//! the benchmark binaries: the engine (`caskade-bench`), one node
//! (`caskade-bench-node`), the router (`caskade-bench-router`), replication
//! (`caskade-bench-replication`), anti-entropy (`caskade-bench-antientropy`)
//! and the cluster map (`caskade-bench-cluster`).

pub mod drive;
pub mod http;
pub mod measure;
pub mod nodes;
pub mod usage;
pub mod workload;
