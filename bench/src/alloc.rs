//! Heap accounting for the memory-per-key figures.
//!
//! Installs a counting global allocator (the `cap` crate, with no limit) so
//! the benchmark can read how many bytes are allocated right now and take the
//! difference around an operation. The figure is what the code *requested*
//! (`Layout::size`); the system allocator's own per-block overhead is not in
//! it. This file must stay the only place that touches the allocator.

use cap::Cap;
use std::alloc::System;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes currently allocated by the whole process.
pub fn allocated() -> usize {
    ALLOC.allocated()
}

/// Bytes per key held since `before` (0 if the heap shrank).
pub fn per_key_since(before: usize, keys: usize) -> f64 {
    allocated().saturating_sub(before) as f64 / keys.max(1) as f64
}
