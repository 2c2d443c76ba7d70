//! caskade-bench's shared parts: the seeded workload (keys, values, read
//! order) and the timed loops, used by both benchmark binaries: the engine
//! benchmark (`caskade-bench`) and the node benchmark (`caskade-bench-node`).

pub mod measure;
pub mod workload;
