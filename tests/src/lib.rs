//! caskade-tests: suites that drive caskade from the outside, with real
//! processes. The library part holds what several suites share.

pub mod cluster;
pub mod disk;
pub mod history;
pub mod local;
pub mod netns;
pub mod node_process;
pub mod rng;
pub mod skew;
pub mod workload;

/// Name of key number `n` written by the `crash-writer` binary.
pub fn crash_key(n: u64) -> String {
    format!("crash-{n:010}")
}

/// The value `crash-writer` stores under `key`: derived from the key alone,
/// so the test can check it without being told, and of varying length (up to
/// about 2 KiB) so that records straddle page boundaries and files rotate.
pub fn crash_value(key: &str) -> Vec<u8> {
    let seed = key
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let repeat = 1 + (seed % 97) as usize;
    format!("{key}|").repeat(repeat).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_values_differ_per_key_and_name_their_key() {
        let a = crash_value(&crash_key(1));
        let b = crash_value(&crash_key(2));
        assert_ne!(a, b);
        assert!(a.starts_with(crash_key(1).as_bytes()));
    }
}
