//! crash-writer: the process that `tests/engine_sigkill.rs` kills with SIGKILL.
//!
//! Usage: `crash-writer <dir> <first-key-number> <threads>`. Opens an engine at
//! `<dir>` with `Durability::Always` and small files, then runs `<threads>`
//! writer threads that put distinct keys (numbered from `<first-key-number>`,
//! interleaved by thread) until killed. Each key is first put with a
//! placeholder and then with [`caskade_tests::crash_value`], so files collect
//! dead bytes; thread 0 merges every 64 of its keys. A key's name is printed
//! on stdout, one per line, only after its final put returned `Ok`: every
//! printed key is acknowledged and must survive the kill.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use anyhow::{Context, bail};
use caskade_common::Version;
use caskade_node::engine::{Durability, Engine, MergeOptions, Options, PutOptions};
use caskade_tests::{crash_key, crash_value};

/// Bound on keys per thread, so a writer whose test died does not run forever.
const MAX_KEYS_PER_THREAD: u64 = 200_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, first, threads] = args.as_slice() else {
        bail!("usage: crash-writer <dir> <first-key-number> <threads>");
    };
    let dir = PathBuf::from(dir);
    let first: u64 = first.parse().context("first key number")?;
    let threads: u64 = threads.parse().context("thread count")?;
    let options = Options {
        max_file_size: 64 * 1024,
        durability: Durability::Always,
        merge: MergeOptions {
            auto: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    };
    let engine = Arc::new(Engine::open(&dir, options).context("open engine")?);

    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let engine = Arc::clone(&engine);
            thread::spawn(move || write_keys(&engine, first, threads, t))
        })
        .collect();
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => bail!("a writer thread panicked"),
        }
    }
    Ok(())
}

fn write_keys(engine: &Engine, first: u64, threads: u64, t: u64) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    for j in 0..MAX_KEYS_PER_THREAD {
        let n = first + t + threads * j;
        let key = crash_key(n);
        // Distinct keys, so versions only need to order the two puts of one key.
        let placeholder = PutOptions {
            version: Version::new(2 * n + 1, 1),
            ..PutOptions::default()
        };
        engine
            .put(
                key.as_bytes(),
                format!("pending:{key}").as_bytes(),
                placeholder,
            )
            .with_context(|| format!("placeholder put of {key}"))?;
        let last = PutOptions {
            version: Version::new(2 * n + 2, 1),
            ..PutOptions::default()
        };
        engine
            .put(key.as_bytes(), &crash_value(&key), last)
            .with_context(|| format!("put of {key}"))?;
        // One write call per line while holding the lock: lines never interleave.
        let mut out = stdout.lock();
        out.write_all(format!("{key}\n").as_bytes())
            .and_then(|()| out.flush())
            .context("stdout closed")?;
        drop(out);
        if t == 0 && j % 64 == 63 {
            engine.merge().context("merge")?;
        }
    }
    Ok(())
}
