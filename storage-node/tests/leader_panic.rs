//! A commit leader that panics (here through a fault hook) must not wedge
//! the `Always` commit queue: its batch gets errors, the engine is poisoned,
//! and later writers get an answer instead of parking forever.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use caskade_common::Version;
use caskade_node::engine::{Engine, EngineError, FaultHook, FaultPoint, Options, PutOptions};
use common::{MockClock, T0, test_options};

fn put_opts(n: u64) -> PutOptions {
    PutOptions {
        version: Version::new(Version::from_parts(T0, 0, 1).hlc + n, 1),
        ..Default::default()
    }
}

/// A leader that panics inside its commit (here: a fault hook that panics at
/// the fsync) once left its entry at the front of the queue, and every later
/// `Always` writer parked behind it forever. Now the batch is handed errors,
/// the lead passes on, and the engine is poisoned, since the batch's records
/// may be on disk without having been fsynced or published.
#[test]
fn a_panicking_commit_leader_poisons_the_engine_instead_of_wedging_it() {
    let clock = MockClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let hook_armed = Arc::clone(&armed);
    let hook: FaultHook = Arc::new(move |point| {
        if point == FaultPoint::Fsync && hook_armed.swap(false, Ordering::SeqCst) {
            panic!("injected panic inside the commit leader");
        }
        Ok(())
    });
    let opts = Options {
        fault_hook: Some(hook),
        ..test_options(&clock, 1 << 20)
    };
    let engine = Arc::new(Engine::open(dir.path(), opts).unwrap());

    // The first writer leads alone and panics in the middle of its batch.
    let first = {
        let engine = Arc::clone(&engine);
        thread::spawn(move || engine.put(b"k1", b"v1", put_opts(1)))
    };
    assert!(
        first.join().is_err(),
        "the injected panic should unwind the writer"
    );
    assert!(!armed.load(Ordering::SeqCst));

    // A later writer, on a fresh thread, must get an outcome (Ok or an error).
    let (tx, rx) = mpsc::channel();
    {
        let engine = Arc::clone(&engine);
        thread::spawn(move || {
            let refused = matches!(
                engine.put(b"k2", b"v2", put_opts(2)),
                Err(EngineError::Poisoned(_))
            );
            let _ = tx.send(refused);
        });
    }
    // A hang detector, not a wait for a condition: an unwedged queue answers
    // in microseconds (one fsync).
    let answered = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        answered.is_ok(),
        "a write after a panicked commit leader never returned: the commit queue is wedged"
    );
    assert_eq!(
        answered.ok(),
        Some(true),
        "the engine should refuse writes as poisoned"
    );
    assert_eq!(
        engine.get(b"k1").unwrap(),
        None,
        "the panicked write was published"
    );
}
