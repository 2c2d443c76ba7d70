//! The checker's own tests: the model, the search, and its agreement
//! with brute force on small histories.

use std::collections::HashSet;

use super::*;
use crate::rng::Rng;

const KEY: &str = "k";

fn done(client: u32, op: Op, invoked: u64, returned: u64, response: Response) -> Event {
    Event {
        client,
        key: KEY.into(),
        op,
        invoked,
        outcome: Outcome::Ok { returned, response },
    }
}

fn lost(client: u32, op: Op, invoked: u64) -> Event {
    Event {
        client,
        key: KEY.into(),
        op,
        invoked,
        outcome: Outcome::Unknown,
    }
}

fn on(key: &str, mut event: Event) -> Event {
    event.key = key.into();
    event
}

fn put(value: &str) -> Op {
    Op::Put {
        value: value.into(),
    }
}

fn put_if_absent(value: &str) -> Op {
    Op::PutIfAbsent {
        value: value.into(),
    }
}

fn put_if_match(value: &str, etag: &str) -> Op {
    Op::PutIfMatch {
        value: value.into(),
        etag: etag.into(),
    }
}

fn written(etag: &str) -> Response {
    Response::Written { etag: etag.into() }
}

fn found(value: &str, etag: &str) -> Response {
    Response::Found {
        value: value.into(),
        etag: etag.into(),
    }
}

fn assert_linearizable(history: &[Event]) {
    let report = check(history);
    assert!(report.is_linearizable(), "{report}");
}

fn assert_violation(history: &[Event]) -> Report {
    let report = check(history);
    assert_eq!(report.violations.len(), 1, "{report}");
    assert!(report.undecided.is_empty(), "{report}");
    report
}

fn sequential(stale_read: bool) -> Vec<Event> {
    let (read_value, read_etag) = if stale_read { ("a", "e1") } else { ("b", "e2") };
    vec![
        done(1, put("a"), 0, 1, written("e1")),
        done(2, Op::Get, 2, 3, found("a", "e1")),
        done(1, put_if_match("b", "e1"), 4, 5, written("e2")),
        done(2, Op::Get, 6, 7, found(read_value, read_etag)),
        done(1, Op::Delete, 8, 9, Response::Deleted),
        done(2, Op::Get, 10, 11, Response::NotFound),
        done(1, put_if_absent("c"), 12, 13, written("e3")),
        done(
            2,
            Op::DeleteIfMatch { etag: "e3".into() },
            14,
            15,
            Response::Deleted,
        ),
        done(1, Op::Delete, 16, 17, Response::Deleted),
        done(2, Op::Get, 18, 19, Response::NotFound),
    ]
}

#[test]
fn a_sequential_history_is_linearizable() {
    let report = check(&sequential(false));
    assert!(report.is_linearizable(), "{report}");
    assert_eq!(
        (report.operations, report.keys, report.histories_checked),
        (10, 1, 1)
    );
}

#[test]
fn a_stale_read_after_a_completed_put_is_a_violation() {
    let report = assert_violation(&sequential(true));
    let violation = &report.violations[0];
    assert_eq!(violation.key, KEY);
    assert!(violation.history.contains("found \"a\""), "{report}");
}

#[test]
fn two_concurrent_put_if_absent_cannot_both_succeed() {
    assert_violation(&[
        done(1, put_if_absent("a"), 0, 10, written("e1")),
        done(2, put_if_absent("b"), 1, 9, written("e2")),
    ]);
}

#[test]
fn one_put_if_absent_wins_the_other_fails_its_precondition() {
    assert_linearizable(&[
        done(1, put_if_absent("a"), 0, 10, written("e1")),
        done(2, put_if_absent("b"), 1, 9, Response::PreconditionFailed),
    ]);
}

fn put_if_match_after(overlapping: bool) -> Vec<Event> {
    let put_returned = if overlapping { 6 } else { 3 };
    vec![
        done(1, put("a"), 0, 1, written("e1")),
        done(2, put("b"), 2, put_returned, written("e2")),
        done(1, put_if_match("c", "e1"), 4, 5, written("e3")),
    ]
}

#[test]
fn put_if_match_on_an_overwritten_version_is_a_lost_update() {
    assert_violation(&put_if_match_after(false));
}

#[test]
fn put_if_match_may_win_against_a_concurrent_put() {
    assert_linearizable(&put_if_match_after(true));
}

#[test]
fn a_read_concurrent_with_a_put_sees_either_value() {
    for read in [found("a", "e1"), found("b", "e2")] {
        assert_linearizable(&[
            done(1, put("a"), 0, 1, written("e1")),
            done(1, put("b"), 2, 6, written("e2")),
            done(2, Op::Get, 3, 5, read),
        ]);
    }
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        done(1, put("b"), 2, 6, written("e2")),
        done(2, Op::Get, 3, 5, Response::NotFound),
    ]);
}

#[test]
fn an_unknown_put_may_be_read_and_its_version_used() {
    assert_linearizable(&[
        done(1, put("a"), 0, 1, written("e1")),
        lost(1, put("b"), 2),
        done(2, Op::Get, 10, 11, found("b", "e9")),
        done(2, put_if_match("c", "e9"), 12, 13, written("e10")),
        done(2, Op::Get, 14, 15, found("c", "e10")),
    ]);
}

#[test]
fn an_unknown_put_read_with_another_writes_version_is_a_violation() {
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        lost(1, put("b"), 2),
        done(2, Op::Get, 10, 11, found("b", "e1")),
    ]);
}

#[test]
fn an_unknown_put_never_observed_is_linearizable() {
    assert_linearizable(&[
        done(1, put("a"), 0, 1, written("e1")),
        lost(1, put("b"), 2),
        done(2, Op::Get, 10, 11, found("a", "e1")),
        done(2, Op::Get, 12, 13, found("a", "e1")),
    ]);
}

#[test]
fn only_an_unknown_put_can_explain_a_failed_put_if_absent() {
    let mut history = vec![
        done(1, Op::Delete, 0, 1, Response::Deleted),
        done(2, put_if_absent("c"), 5, 6, Response::PreconditionFailed),
    ];
    assert_violation(&history);
    history.insert(1, lost(1, put("b"), 2));
    assert_linearizable(&history);
}

#[test]
fn an_unknown_operation_may_be_needed_only_by_another_unknown_one() {
    // `b` can be read only if the lost delete emptied the key first.
    let mut history = vec![
        done(1, put("a"), 0, 1, written("e1")),
        lost(2, put_if_absent("b"), 3),
        done(3, Op::Get, 10, 11, found("b", "e2")),
    ];
    assert_violation(&history);
    history.insert(1, lost(1, Op::Delete, 2));
    assert_linearizable(&history);
}

#[test]
fn an_unknown_put_is_not_before_its_invocation() {
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        done(2, Op::Get, 2, 3, found("b", "e2")),
        lost(1, put("b"), 4),
    ]);
}

#[test]
fn a_read_of_a_value_never_written_is_a_violation() {
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        lost(1, put("b"), 2),
        done(2, Op::Get, 10, 11, found("z", "e7")),
    ]);
}

#[test]
fn a_failed_put_is_dropped() {
    let failed = Event {
        client: 1,
        key: KEY.into(),
        op: put("b"),
        invoked: 2,
        outcome: Outcome::Failed { returned: 3 },
    };
    assert_linearizable(&[
        done(1, put("a"), 0, 1, written("e1")),
        failed.clone(),
        done(2, Op::Get, 10, 11, found("a", "e1")),
    ]);
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        failed,
        done(2, Op::Get, 10, 11, found("b", "e2")),
    ]);
}

#[test]
fn a_read_after_an_acknowledged_delete_cannot_see_the_old_value() {
    assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        done(1, Op::Delete, 2, 3, Response::Deleted),
        done(2, Op::Get, 4, 5, found("a", "e1")),
    ]);
}

#[test]
fn a_version_returned_by_two_writes_is_a_violation() {
    let report = assert_violation(&[
        done(1, put("a"), 0, 1, written("e1")),
        done(2, put("b"), 2, 3, written("e1")),
    ]);
    assert!(report.violations[0].reason.contains("both created"));
    // The same for two unknown writes that reads say created one version.
    assert_violation(&[
        lost(1, put("a"), 0),
        lost(2, put("b"), 0),
        done(3, Op::Get, 1, 2, found("a", "e1")),
        done(3, Op::Get, 3, 4, found("b", "e1")),
    ]);
}

#[test]
fn keys_are_checked_independently() {
    let report = check(&[
        on("good", done(1, put("a"), 0, 1, written("e1"))),
        on("bad", done(2, put("x"), 0, 1, written("e2"))),
        on("good", done(1, Op::Get, 2, 5, found("a", "e1"))),
        on("bad", done(2, put("y"), 2, 3, written("e3"))),
        on("bad", done(1, Op::Get, 4, 6, found("x", "e2"))),
        on("good", done(2, Op::Get, 6, 7, found("a", "e1"))),
    ]);
    assert_eq!(
        (report.operations, report.keys, report.histories_checked),
        (6, 2, 2)
    );
    assert_eq!(report.violations.len(), 1, "{report}");
    assert_eq!(report.violations[0].key, "bad");
    assert!(!report.violations[0].history.contains("\"a\""));
}

#[test]
fn values_written_twice_with_an_unknown_outcome_are_undecided() {
    let report = check(&[done(1, put("a"), 0, 1, written("e1")), lost(1, put("a"), 2)]);
    assert_eq!(report.undecided.len(), 1, "{report}");
    assert!(!report.is_linearizable());
}

#[test]
fn the_recorder_keeps_answers_failures_and_unknowns() {
    let history = History::new();
    let first = history.invoke(1, "k", put("a"));
    let second = history.invoke(2, "k", Op::Get);
    let third = history.invoke(3, "k", put("b"));
    let fourth = history.invoke(4, "k", Op::Delete);
    history.returned(second, Response::NotFound);
    history.returned(first, written("e1"));
    history.failed(third);
    history.unknown(fourth);
    let events = history.events();
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].invoked <= pair[1].invoked)
    );
    assert!(
        matches!(&events[0].outcome, Outcome::Ok { response, .. } if *response == written("e1"))
    );
    assert!(matches!(
        &events[1].outcome,
        Outcome::Ok {
            response: Response::NotFound,
            ..
        }
    ));
    assert!(matches!(events[2].outcome, Outcome::Failed { .. }));
    assert_eq!(events[3].outcome, Outcome::Unknown);
    assert_linearizable(&events);
}

/// A client of the simulated register.
enum Client {
    Idle,
    /// Sent `event` (index in the history); `applied` once it took effect.
    Waiting {
        event: usize,
        applied: Option<Response>,
    },
}

/// Simulates `clients` clients sending `ops` operations each to a
/// linearizable register: every operation takes effect at one instant
/// between its invocation and its answer. About `lost_percent` are lost
/// (unknown: they take effect at once, later or never) and 2% fail unapplied.
fn simulate(seed: u64, clients: u32, ops: usize, lost_percent: u64) -> Vec<Event> {
    let mut rng = Rng(seed);
    let mut register: Option<(String, String)> = None;
    let mut versions = 0;
    let mut history: Vec<Event> = Vec::new();
    let mut state: Vec<Client> = (0..clients).map(|_| Client::Idle).collect();
    let mut sent = vec![0; clients as usize];
    let mut known_etag: Vec<String> = vec!["none".into(); clients as usize];
    let mut lost_ops: Vec<Op> = Vec::new();
    let mut apply = |op: &Op, register: &mut Option<(String, String)>| -> Response {
        let current = register.as_ref().map(|(_, etag)| etag.clone());
        let holds = match op {
            Op::Get | Op::Put { .. } | Op::Delete => true,
            Op::PutIfAbsent { .. } => current.is_none(),
            Op::PutIfMatch { etag, .. } | Op::DeleteIfMatch { etag } => {
                current.as_ref() == Some(etag)
            }
        };
        match (op, op.written_value()) {
            (Op::Get, _) => match register {
                Some((value, etag)) => found(value, etag),
                None => Response::NotFound,
            },
            _ if !holds => Response::PreconditionFailed,
            (_, Some(value)) => {
                versions += 1;
                let etag = format!("e{versions}");
                *register = Some((value.to_string(), etag.clone()));
                written(&etag)
            }
            (_, None) => {
                *register = None;
                Response::Deleted
            }
        }
    };
    let mut now = 0;
    while sent.iter().any(|&n| n < ops) || state.iter().any(|c| matches!(c, Client::Waiting { .. }))
    {
        now += 1;
        if !lost_ops.is_empty() && rng.percent(2) {
            let op = lost_ops.swap_remove(rng.below(lost_ops.len() as u64) as usize);
            apply(&op, &mut register);
        }
        let client = rng.below(u64::from(clients)) as usize;
        match &mut state[client] {
            Client::Idle if sent[client] < ops => {
                sent[client] += 1;
                let value = format!("v{client}.{}", sent[client]);
                let etag = known_etag[client].clone();
                let op = match rng.below(100) {
                    0..35 => Op::Get,
                    35..55 => put(&value),
                    55..65 => put_if_absent(&value),
                    65..85 => put_if_match(&value, &etag),
                    85..93 => Op::Delete,
                    _ => Op::DeleteIfMatch { etag },
                };
                history.push(Event {
                    client: client as u32,
                    key: KEY.into(),
                    op,
                    invoked: now,
                    outcome: Outcome::Unknown,
                });
                state[client] = Client::Waiting {
                    event: history.len() - 1,
                    applied: None,
                };
            }
            Client::Idle => {}
            Client::Waiting { event, applied } => {
                let event = *event;
                if applied.is_none() && rng.percent(lost_percent) {
                    let op = history[event].op.clone();
                    if rng.percent(50) {
                        apply(&op, &mut register);
                    } else {
                        lost_ops.push(op);
                    }
                    state[client] = Client::Idle;
                } else if applied.is_none() && rng.percent(2) {
                    history[event].outcome = Outcome::Failed { returned: now };
                    state[client] = Client::Idle;
                } else if applied.is_none() {
                    *applied = Some(apply(&history[event].op, &mut register));
                } else if let Some(response) = applied.take() {
                    if let Response::Written { etag } | Response::Found { etag, .. } = &response {
                        known_etag[client] = etag.clone();
                    }
                    history[event].outcome = Outcome::Ok {
                        returned: now,
                        response,
                    };
                    state[client] = Client::Idle;
                }
            }
        }
    }
    history
}

#[test]
fn a_simulated_linearizable_history_passes_and_one_stale_read_fails_it() {
    let mut history = simulate(7, 5, 200, 3);
    assert_eq!(history.len(), 1000);
    assert!(history.iter().any(|e| e.outcome == Outcome::Unknown));
    let report = check(&history);
    assert!(report.is_linearizable(), "{report}");

    // The last successful read now returns the first write's value and
    // version, long overwritten.
    let first_write = history
        .iter()
        .find_map(|e| match (&e.outcome, e.op.written_value()) {
            (
                Outcome::Ok {
                    response: Response::Written { etag },
                    ..
                },
                Some(value),
            ) => Some(found(value, etag)),
            _ => None,
        })
        .expect("the simulation writes");
    let last_read = history
        .iter_mut()
        .rev()
        .find(|e| {
            matches!(
                e.outcome,
                Outcome::Ok {
                    response: Response::Found { .. },
                    ..
                }
            )
        })
        .expect("the simulation reads");
    if let Outcome::Ok { response, .. } = &mut last_read.outcome {
        *response = first_write;
    }
    let report = check(&history);
    assert_eq!(report.violations.len(), 1, "{report}");
}

#[test]
fn the_search_stops_at_its_budget() {
    let history = simulate(11, 5, 200, 3);
    let report = check_with_budget(&history, 100);
    assert_eq!(report.undecided.len(), 1);
    assert_eq!(report.histories_checked, 0);
    assert!(report.undecided[0].reason.contains("budget"));
}

/// Whether some order of `history`'s calls (answered ones all, unknown
/// ones any subset) respects real time and the model, by trying them
/// all; `failed` remembers (calls still pending, state) pairs that led
/// nowhere, which only saves repeating the same work.
fn brute_force(
    history: &KeyHistory<'_>,
    pending: u32,
    state: State,
    failed: &mut HashSet<(u32, State)>,
) -> bool {
    let answered_pending = pending & ((1 << history.answered) - 1);
    if answered_pending == 0 {
        return true;
    }
    if failed.contains(&(pending, state)) {
        return false;
    }
    for call in (0..history.calls.len()).filter(|&call| pending & (1 << call) != 0) {
        let invoked = history.calls[call].invoked;
        let must_wait = (0..history.answered)
            .any(|j| answered_pending & (1 << j) != 0 && history.returned[j] < invoked);
        if must_wait {
            continue;
        }
        if let Some(after) = history.step(state, call)
            && brute_force(history, pending & !(1 << call), after, failed)
        {
            return true;
        }
    }
    failed.insert((pending, state));
    false
}

/// Changes one answer of `history` at random: often into one no order explains.
fn mutate(rng: &mut Rng, history: &mut [Event]) {
    let answers: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i].outcome, Outcome::Ok { .. }))
        .collect();
    let writes: Vec<Response> = history
        .iter()
        .filter_map(|e| match (&e.outcome, e.op.written_value()) {
            (
                Outcome::Ok {
                    response: Response::Written { etag },
                    ..
                },
                Some(value),
            ) => Some(found(value, etag)),
            _ => None,
        })
        .collect();
    if answers.is_empty() {
        return;
    }
    let event = answers[rng.below(answers.len() as u64) as usize];
    let is_read = history[event].op == Op::Get;
    let is_write = history[event].op.written_value().is_some();
    let Outcome::Ok { response, .. } = &mut history[event].outcome else {
        return;
    };
    *response = match response {
        _ if is_read && !writes.is_empty() && rng.percent(70) => {
            writes[rng.below(writes.len() as u64) as usize].clone()
        }
        _ if is_read => Response::NotFound,
        Response::PreconditionFailed if is_write => written(&format!("fresh{event}")),
        Response::PreconditionFailed => Response::Deleted,
        _ => Response::PreconditionFailed,
    };
}

#[test]
fn the_search_agrees_with_brute_force_on_small_histories() {
    let mut rng = Rng(3);
    let (mut linearizable, mut not, mut interchangeable) = (0, 0, 0);
    for seed in 0..3000 {
        let clients = 2 + (seed % 3) as u32;
        let lost = [0, 10, 30][(seed / 3 % 3) as usize];
        let mut history = simulate(seed, clients, 3 + (seed / 9 % 2) as usize, lost);
        if rng.percent(60) {
            mutate(&mut rng, &mut history);
        }
        let events: Vec<&Event> = history.iter().collect();
        let key_history = KeyHistory::new(&events).expect("values are unique");
        if key_history.classes.iter().any(|class| class.len() > 1) {
            interchangeable += 1;
        }
        let all = (1u32 << key_history.calls.len()) - 1;
        let expected = brute_force(&key_history, all, State::Absent, &mut HashSet::new());
        let report = check(&history);
        assert_eq!(report.is_linearizable(), expected, "seed {seed}\n{report}");
        if expected {
            linearizable += 1;
        } else {
            not += 1;
        }
    }
    assert!(linearizable > 500 && not > 500, "{linearizable} vs {not}");
    assert!(interchangeable > 100, "{interchangeable}");
}
