//! One write of a key at a time on its primary, from its condition check
//! until its write level is met (or known not to be).
//!
//! A primary applies a write locally before its replicas hold it, so a
//! second write of the same key checking its condition (`If-Match`,
//! `If-None-Match`) meanwhile would see the first before a quorum does:
//! its "precondition failed" would tell a client of a value that a quorum
//! read can still miss, and an acknowledged conditional write could rest
//! on a write that is then lost. Writes of a key therefore wait for the
//! previous one to be replicated. Keys share locks by a hash (striped), so
//! unrelated keys rarely wait for each other.

use tokio::sync::{Mutex, MutexGuard};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Lock stripes: with 64 writes in flight, two unrelated keys share one in
/// about 1 of 64 writes.
const STRIPES: usize = 4096;
/// Seed of the stripe hash (the ring hashes keys unseeded).
const SEED: u64 = 0x6b65_795f_6c6f_636b;

/// Striped per-key write locks.
#[derive(Debug)]
pub struct KeyLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl KeyLocks {
    /// Waits until no other write holds any of `keys`, and holds them until
    /// the guards drop. Stripes are taken in one order, so two writes of
    /// several keys never wait for each other in a cycle.
    pub async fn lock<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys
            .into_iter()
            .map(|key| (xxh3_64_with_seed(key, SEED) % STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.stripes[stripe].lock().await);
        }
        guards
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_second_write_of_a_key_waits_for_the_first() {
        let locks = KeyLocks::default();
        let first = locks.lock([&b"k"[..]]).await;
        let second = tokio::time::timeout(Duration::from_millis(50), locks.lock([&b"k"[..]]));
        assert!(second.await.is_err(), "the key was locked twice at once");
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock([&b"other"[..]]));
        assert!(other.await.is_ok(), "another key waited");
        drop(first);
        let again =
            tokio::time::timeout(Duration::from_secs(5), locks.lock([&b"k"[..], &b"k"[..]]));
        assert!(again.await.is_ok());
    }
}
