//! caskade-bench's shared parts: the seeded workload (keys, values, read
//! order), the timed loops and the network load driver, used by the benchmark
//! binaries: the engine (`caskade-bench`), one node (`caskade-bench-node`)
//! the router (`caskade-bench-router`), replication
//! (`caskade-bench-replication`) and the cluster map
//! (`caskade-bench-cluster`).

pub mod drive;
pub mod http;
pub mod measure;
pub mod workload;
