//! Real crash: a `crash-writer` process putting keys from several threads under
//! `Durability::Always` (with rotation and merges) is killed with SIGKILL after
//! it has acknowledged a few hundred keys; reopening the directory in this
//! process must find every acknowledged key with its value, and no key holding
//! anything but a value the writer really wrote. Three rounds run on the same
//! directory, so recovery of an already-recovered store is covered too; while
//! the writer runs, opening its directory from this process is refused.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use caskade_node::engine::{Engine, EngineError, MergeOptions, Options};
use caskade_tests::crash_value;

const ROUNDS: u64 = 3;
const ACKS_BEFORE_KILL: usize = 500;
const WRITER_THREADS: &str = "4";
/// Bounds the wait for acks; reaching it fails the test rather than hanging.
const ACK_DEADLINE: Duration = Duration::from_secs(120);

fn options() -> Options {
    Options {
        merge: MergeOptions {
            auto: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    }
}

/// Runs one writer until it has acknowledged `ACKS_BEFORE_KILL` keys, kills it
/// with SIGKILL and returns every key it acknowledged.
fn run_writer_and_kill(dir: &Path, first_key: u64) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
        .arg(dir)
        .arg(first_key.to_string())
        .arg(WRITER_THREADS)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // A line cut short by the kill has no newline: that key was not acknowledged.
        while stdout.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
            if tx.send(line.trim_end().to_string()).is_err() {
                break;
            }
            line.clear();
        }
    });

    let deadline = Instant::now() + ACK_DEADLINE;
    let mut acked = Vec::new();
    while acked.len() < ACKS_BEFORE_KILL {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(key) => acked.push(key),
            Err(RecvTimeoutError::Timeout) => {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("only {} acks within {ACK_DEADLINE:?}", acked.len());
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "writer exited early ({:?}) after {} acks",
                    child.wait().unwrap(),
                    acked.len()
                );
            }
        }
    }
    // The live writer holds the directory: another process may not open it.
    match Engine::open(dir, options()) {
        Err(EngineError::Locked { .. }) => {}
        Err(e) => panic!("open while the writer runs: expected Locked, got {e}"),
        Ok(_) => panic!("opened a directory another process is writing"),
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success(), "writer was not killed: {status:?}");
    // Acks written before the kill but not yet read are acknowledged too.
    reader.join().unwrap();
    acked.extend(rx.try_iter());
    acked
}

#[test]
fn sigkilled_writer_loses_no_acknowledged_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut all_acked = BTreeSet::new();
    for round in 0..ROUNDS {
        let acked = run_writer_and_kill(dir.path(), round * 1_000_000);
        assert!(acked.len() >= ACKS_BEFORE_KILL);
        for key in acked {
            assert!(
                all_acked.insert(key.clone()),
                "round {round}: {key} acknowledged twice"
            );
        }

        let engine = Engine::open(dir.path(), options())
            .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL failed: {e}"));
        for key in &all_acked {
            let got = engine
                .get(key.as_bytes())
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: acknowledged key {key} lost"));
            assert!(
                got.value == crash_value(key),
                "round {round}: {key} has a wrong value"
            );
        }
        // Keys in flight at the kill may exist, but only with a value written for them.
        for entry in engine.scan(b"crash-", None, usize::MAX).unwrap() {
            let key = String::from_utf8(entry.key).unwrap();
            let value = engine.get(key.as_bytes()).unwrap().unwrap().value;
            let placeholder = format!("pending:{key}").into_bytes();
            assert!(
                value == crash_value(&key) || value == placeholder,
                "round {round}: {key} holds a value never written for it"
            );
        }
        engine.close().unwrap();
    }
}
