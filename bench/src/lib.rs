//! caskade-bench's shared parts: the seeded workload (keys, values, read
//! order), the timed loops and the network load driver, used by the benchmark
//! binaries: the engine (`caskade-bench`), one node (`caskade-bench-node`)
//! and the router (`caskade-bench-router`).

pub mod drive;
pub mod measure;
pub mod workload;
