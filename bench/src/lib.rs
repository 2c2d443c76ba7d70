//! caskade-bench's shared parts: the seeded workload (keys, values, read
//! order), the timed loops and the network load driver, used by the benchmark
//! binaries: the engine (`caskade-bench`), one node (`caskade-bench-node`)
//! the router (`caskade-bench-router`) and replication
//! (`caskade-bench-replication`).

pub mod drive;
pub mod http;
pub mod measure;
pub mod workload;
