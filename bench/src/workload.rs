//! The deterministic workload every engine runs: `n` distinct 16-byte keys,
//! 100-byte values, and a read order, all derived from one seed.
//!
//! Keys are generated up front (they are also the read-side lookup table);
//! values are regenerated on demand into a caller's buffer, so the timed put
//! loops allocate nothing on the benchmark's side and the allocator deltas
//! measured around them belong to the engine. Nothing here does I/O.

use anyhow::bail;

/// Key length in bytes.
pub const KEY_LEN: usize = 16;
/// Value length in bytes.
pub const VALUE_LEN: usize = 100;

/// splitmix64's increment; odd, so `seed + i * GAMMA` never repeats for distinct `i`.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Stream tags mixed into the seed so values and read order are independent of the keys.
const VALUE_STREAM: u64 = 0x5641_4C55_4553; // "VALUES"
const ORDER_STREAM: u64 = 0x004F_5244_4552; // "ORDER"

/// splitmix64's finaliser: a bijection on `u64`, so distinct inputs give distinct outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A splitmix64 stream.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }
}

/// The keys and values of one benchmark run.
#[derive(Debug)]
pub struct Workload {
    seed: u64,
    keys: Vec<[u8; KEY_LEN]>,
}

impl Workload {
    /// `n` keys in insertion order, which is random with respect to key order.
    pub fn new(n: usize, seed: u64) -> Self {
        let keys = (0..n as u64)
            .map(|i| {
                // The first half is mix(seed + (i+1)·GAMMA): unique per i, so keys never collide.
                let mut stream = SplitMix(seed.wrapping_add(i.wrapping_mul(GAMMA)));
                let mut key = [0; KEY_LEN];
                key[..8].copy_from_slice(&stream.next().to_be_bytes());
                key[8..].copy_from_slice(&stream.next().to_be_bytes());
                key
            })
            .collect();
        Workload { seed, keys }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `i`th key.
    pub fn key(&self, i: usize) -> &[u8] {
        &self.keys[i]
    }

    /// Writes the `i`th key's value into `buf`.
    pub fn value_into(&self, i: usize, buf: &mut [u8; VALUE_LEN]) {
        let mut stream = SplitMix(mix(self.seed ^ VALUE_STREAM) ^ i as u64);
        for chunk in buf.chunks_mut(8) {
            let word = stream.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// Fails unless `got` is the `i`th key's value: every read is checked.
    pub fn check(&self, i: usize, got: Option<&[u8]>) -> anyhow::Result<()> {
        let mut want = [0; VALUE_LEN];
        self.value_into(i, &mut want);
        match got {
            Some(got) if got == want => Ok(()),
            Some(_) => bail!("key #{i} read back a wrong value"),
            None => bail!("key #{i} is missing"),
        }
    }

    /// Every key index once, in a seeded random order (Fisher–Yates).
    pub fn read_order(&self) -> Vec<u32> {
        let n = u32::try_from(self.len()).expect("--keys is capped below u32::MAX");
        let mut order: Vec<u32> = (0..n).collect();
        let mut stream = SplitMix(mix(self.seed ^ ORDER_STREAM));
        for i in (1..order.len()).rev() {
            let j = (stream.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_deterministic() {
        let a = Workload::new(10_000, 7);
        let b = Workload::new(10_000, 7);
        let mut keys: Vec<&[u8]> = (0..a.len()).map(|i| a.key(i)).collect();
        assert!((0..a.len()).all(|i| a.key(i) == b.key(i)));
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 10_000);
    }

    #[test]
    fn read_order_is_a_permutation() {
        let w = Workload::new(1_000, 3);
        let mut order = w.read_order();
        assert_ne!(order, (0..1_000).collect::<Vec<u32>>());
        order.sort_unstable();
        assert_eq!(order, (0..1_000).collect::<Vec<u32>>());
    }

    #[test]
    fn check_accepts_only_the_right_value() {
        let w = Workload::new(2, 1);
        let mut v = [0; VALUE_LEN];
        w.value_into(1, &mut v);
        assert!(w.check(1, Some(&v)).is_ok());
        assert!(w.check(0, Some(&v)).is_err());
        assert!(w.check(1, None).is_err());
    }
}
