//! Linearizability checking for histories of caskade's key-value API: what
//! concurrent clients sent, when, and what they were told. It owns the
//! sequential model of one key and the search for an order of operations
//! that explains every answer; it never talks to a cluster, and it must
//! never call a history linearizable that no order explains (a false alarm
//! is a bug too, so every uncertainty in the model errs towards "may have
//! happened").
//!
//! # Model
//!
//! Each key is a register holding nothing or a value with a version, the
//! opaque ETag the server returned for the write that stored it. A `PUT`
//! stores its value under a fresh version; `If-None-Match: *` makes it
//! succeed only on an absent key and `If-Match` only on the named version,
//! answering `412` otherwise. A `DELETE` empties the key (an absent key
//! too), `If-Match` again making it conditional. A `GET` must return the
//! current value and version, or not found.
//!
//! An operation whose outcome the client does not know (a timeout, a reset
//! connection, a 503/504 saying so) may take effect at any time after its
//! invocation, or never: it has no return time and no answer to explain,
//! and the search may leave it out. One that the server says was not
//! applied is dropped. The version of an unknown write was never seen by
//! its client, yet later reads and `If-Match` writes may use it. Because
//! the workload writes each value once per key, a read returning that value
//! names the write's version; an unknown write no read ever returned has a
//! version no client knows, so no `If-Match` in the history can name it and
//! no read can return it. Such writes all leave the same observable state,
//! `State::Hidden`. (Binding the version at the first read that sees it,
//! during the search, would be equivalent but makes `412` answers
//! ambiguous; resolving it from the whole history first keeps the model a
//! function.) Two writes of one value on a key whose write is unknown make
//! that naming unsound: such a key is reported undecided, not checked.
//!
//! # Search
//!
//! Wing and Gong's search ("Testing and verifying concurrent objects",
//! 1993) with Lowe's memoisation ("Testing for linearizability", 2017), as
//! in Porcupine (github.com/anishathalye/porcupine): the answered
//! operations' call and return events form a doubly linked list in time
//! order (calls before returns at equal times, so such operations count as
//! concurrent); the search linearizes any operation whose call precedes the
//! first remaining return, removing both its events from the list (dancing
//! links, so backtracking restores them in O(1)), and backtracks when none
//! fits. A configuration — the set of operations linearized and the model
//! state — already explored is not explored again. Keys are independent
//! (P-compositionality, Horn and Kroening 2015), so each key's history is
//! checked alone and a violation names its key.
//!
//! Unknown operations sit outside the list: they are tried after the
//! answered candidates, and only if invoked before the first remaining
//! return. Left at that, every lost request would double the search; three
//! rules prevent it, each kept by some linearization that uses the fewest
//! unknown operations, so none can hide one:
//!
//! - unknown operations of one kind, with one condition and no version a
//!   read saw, are interchangeable: only the earliest-invoked unused one of
//!   such a class is tried, and configurations count them per class;
//! - an unknown operation is placed only if the operation placed right
//!   after it behaves differently for it (else it could be left out);
//! - the memo prunes a configuration if one with the same answered set and
//!   state used no more unknown operations of any class, not only if one
//!   is equal: optional operations left unused never hurt.
//!
//! The search is bounded by a step budget per key (one step is one attempt
//! to place or take back an operation); a key that exhausts it is reported
//! undecided rather than hanging the test. See [`DEFAULT_STEP_BUDGET`] for
//! what fits in it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::mem::{Discriminant, discriminant};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Search steps per key that [`check`] allows before calling a key
/// undecided: some 20 s in a debug build. On simulated histories of one key
/// with 3% of requests lost, 5 clients × 200 operations take 3k steps to
/// accept and 40k to find a stale read; 5 × 1000, 25k and 9M; 20 × 50,
/// 4M to accept. The search grows exponentially with the clients sharing a
/// key and with lost requests: spread a workload over keys.
pub const DEFAULT_STEP_BUDGET: u64 = 5_000_000;

/// What a client asked for, on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `GET`.
    Get,
    /// `PUT` without a condition.
    Put { value: String },
    /// `PUT` with `If-None-Match: *`: only if the key is absent.
    PutIfAbsent { value: String },
    /// `PUT` with `If-Match`: only if the key's version is `etag`.
    PutIfMatch { value: String, etag: String },
    /// `DELETE` without a condition; deleting an absent key succeeds too.
    Delete,
    /// `DELETE` with `If-Match`: only if the key's version is `etag`.
    DeleteIfMatch { etag: String },
}

impl Op {
    /// The value this operation stores if it takes effect.
    pub fn written_value(&self) -> Option<&str> {
        match self {
            Op::Put { value } | Op::PutIfAbsent { value } | Op::PutIfMatch { value, .. } => {
                Some(value)
            }
            Op::Get | Op::Delete | Op::DeleteIfMatch { .. } => None,
        }
    }

    /// The version an `If-Match` names.
    fn condition(&self) -> Option<&str> {
        match self {
            Op::PutIfMatch { etag, .. } | Op::DeleteIfMatch { etag } => Some(etag),
            Op::Get | Op::Put { .. } | Op::PutIfAbsent { .. } | Op::Delete => None,
        }
    }
}

/// What the server answered, when it answered with a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A write took effect and created this version (`200`/`201`).
    Written { etag: String },
    /// A delete took effect (`204`).
    Deleted,
    /// A read found the key (`200`).
    Found { value: String, etag: String },
    /// A read found no key (`404`).
    NotFound,
    /// The condition did not hold and nothing was written (`412`).
    PreconditionFailed,
}

/// How an operation ended, as far as its client knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered at `returned` (ns since the start of the run).
    Ok { returned: u64, response: Response },
    /// The server said at `returned` that the operation was not applied
    /// (a 503 marked so): the checker drops it.
    Failed { returned: u64 },
    /// No answer, or one saying the outcome is unknown: the operation may
    /// take effect at any time after its invocation, or never.
    Unknown,
}

/// One operation as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Who sent it; only for reading the history.
    pub client: u32,
    /// The key it addressed.
    pub key: String,
    /// What was asked.
    pub op: Op,
    /// When the client sent it, in ns since the start of the run.
    pub invoked: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A history that concurrent clients append to. The mutex guards only the
/// event list; no method is async, so it is never held across an `.await`.
#[derive(Debug)]
pub struct History {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

/// An operation sent and not yet answered: give it back to the [`History`]
/// with its answer. Dropped unanswered, the operation stays
/// [`Outcome::Unknown`], which is all a cancelled client knows about it.
#[derive(Debug)]
#[must_use = "an invocation dropped without an answer is recorded as unknown"]
pub struct Invocation {
    index: usize,
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Records that `client` is about to send `op` on `key`. Call it before
    /// sending: an invocation time later than the real one could hide a
    /// stale read.
    pub fn invoke(&self, client: u32, key: impl Into<String>, op: Op) -> Invocation {
        let mut events = self.lock();
        events.push(Event {
            client,
            key: key.into(),
            op,
            invoked: self.now(),
            outcome: Outcome::Unknown,
        });
        Invocation {
            index: events.len() - 1,
        }
    }

    /// Records the server's answer, once it has arrived.
    pub fn returned(&self, call: Invocation, response: Response) {
        let returned = self.now();
        self.complete(call, Outcome::Ok { returned, response });
    }

    /// Records that the server said the operation was not applied.
    pub fn failed(&self, call: Invocation) {
        let returned = self.now();
        self.complete(call, Outcome::Failed { returned });
    }

    /// Records that the outcome is unknown: the same as dropping `call`,
    /// said out loud at the call site.
    pub fn unknown(&self, call: Invocation) {
        let Invocation { index: _ } = call;
    }

    /// A copy of the events so far, in invocation order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    fn complete(&self, call: Invocation, outcome: Outcome) {
        if let Some(event) = self.lock().get_mut(call.index) {
            event.outcome = outcome;
        }
    }

    /// A client that panicked mid-record leaves a complete event list: the
    /// push and the outcome assignment are single steps.
    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The verdict on a whole history.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Operations considered: every event but those that failed.
    pub operations: usize,
    /// Distinct keys in the history.
    pub keys: usize,
    /// Keys whose history got a verdict, linearizable or not.
    pub histories_checked: usize,
    /// Keys whose history no order explains.
    pub violations: Vec<Violation>,
    /// Keys the checker could not decide.
    pub undecided: Vec<Undecided>,
}

/// A key whose history no sequential order explains.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Why, in a sentence.
    pub reason: String,
    /// The key's history, one operation a line (see [`Report`]'s `Display`).
    pub history: String,
}

/// A key the checker could not decide.
#[derive(Debug, Clone)]
pub struct Undecided {
    /// The key.
    pub key: String,
    /// Why, in a sentence.
    pub reason: String,
    /// The key's history, one operation a line.
    pub history: String,
}

impl Report {
    /// Whether every key was checked and found linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.violations.is_empty() && self.undecided.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "operations: {}, keys: {}, checked: {}, not linearizable: {}, undecided: {}",
            self.operations,
            self.keys,
            self.histories_checked,
            self.violations.len(),
            self.undecided.len()
        )?;
        for violation in &self.violations {
            writeln!(
                f,
                "\nkey {:?} is not linearizable: {}",
                violation.key, violation.reason
            )?;
            f.write_str(&violation.history)?;
        }
        for undecided in &self.undecided {
            writeln!(
                f,
                "\nkey {:?} is undecided: {}",
                undecided.key, undecided.reason
            )?;
            f.write_str(&undecided.history)?;
        }
        Ok(())
    }
}

/// Checks every key of `history` with [`DEFAULT_STEP_BUDGET`].
pub fn check(history: &[Event]) -> Report {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// Checks every key of `history`, allowing each key `step_budget` search steps.
pub fn check_with_budget(history: &[Event], step_budget: u64) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in history {
        by_key.entry(&event.key).or_default().push(event);
    }
    let mut report = Report {
        operations: history
            .iter()
            .filter(|event| !matches!(event.outcome, Outcome::Failed { .. }))
            .count(),
        keys: by_key.len(),
        ..Report::default()
    };
    for (key, mut events) in by_key {
        events.sort_by_key(|event| event.invoked);
        let key = key.to_string();
        match check_key(&events, step_budget) {
            Verdict::Linearizable => report.histories_checked += 1,
            Verdict::Violation { reason, order } => {
                report.histories_checked += 1;
                let history = render(&events, &order);
                report.violations.push(Violation {
                    key,
                    reason,
                    history,
                });
            }
            Verdict::Undecided { reason } => {
                let history = render(&events, &[]);
                report.undecided.push(Undecided {
                    key,
                    reason,
                    history,
                });
            }
        }
    }
    report
}

/// The verdict on one key.
#[derive(Debug)]
enum Verdict {
    Linearizable,
    /// `order` lists, by position in the key's events, the longest prefix of
    /// a linearization the search found, to show where it got stuck.
    Violation {
        reason: String,
        order: Vec<usize>,
    },
    Undecided {
        reason: String,
    },
}

fn check_key(events: &[&Event], step_budget: u64) -> Verdict {
    let history = match KeyHistory::new(events) {
        Ok(history) => history,
        Err(verdict) => return verdict,
    };
    match Search::new(&history).run(step_budget) {
        Searched::Linearizable => Verdict::Linearizable,
        Searched::Impossible { longest } => {
            let placed = longest
                .iter()
                .filter(|&&call| call < history.answered)
                .count();
            Verdict::Violation {
                reason: format!(
                    "no order of the operations explains the answers; at best {placed} of \
                     the {} answered operations could be ordered (column `lin`)",
                    history.answered
                ),
                order: longest
                    .iter()
                    .map(|&call| history.calls[call].event)
                    .collect(),
            }
        }
        Searched::OutOfSteps => Verdict::Undecided {
            reason: format!("the search used its budget of {step_budget} steps"),
        },
    }
}

/// One operation the search can place.
#[derive(Debug)]
struct Call<'a> {
    /// Position in the key's events, for rendering.
    event: usize,
    op: &'a Op,
    /// `None` if the outcome is unknown.
    response: Option<&'a Response>,
    invoked: u64,
    /// The version this call creates if it writes, when known: from its
    /// answer, or for an unknown write from a read that returned its value.
    version: Option<&'a str>,
}

/// The register's state during the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum State {
    Absent,
    /// Holds the value and version written by this call.
    Current(usize),
    /// Holds a value written by an unknown write that no read returned: its
    /// version is one no operation in the history names.
    Hidden,
}

/// One key's history, ready for the search: answered calls first
/// (`calls[..answered]`), then unknown ones, each group in invocation order.
#[derive(Debug)]
struct KeyHistory<'a> {
    calls: Vec<Call<'a>>,
    /// Return time of each answered call.
    returned: Vec<u64>,
    answered: usize,
    /// The unknown calls in classes of interchangeable ones, each in
    /// invocation order: same kind, same condition, and no version a read
    /// saw. Any linearization can be rearranged to use, at every point, the
    /// earliest-invoked calls of each class (an earlier call could be placed
    /// wherever a later one is), so the search only ever uses a prefix of a
    /// class, and lost requests that nothing tells apart do not multiply it.
    classes: Vec<Vec<usize>>,
    /// The classes of unknown `PutIfAbsent` calls, and of unknown `If-Match`
    /// calls by the version they name: the unknown calls another unknown
    /// call can enable (see [`Search::matters`]).
    if_absent: Vec<usize>,
    if_match: HashMap<&'a str, Vec<usize>>,
}

impl<'a> KeyHistory<'a> {
    /// Drops failed operations and unknown reads (no effect, nothing to
    /// explain), checks that no version was returned twice, and names the
    /// versions of unknown writes that reads returned.
    fn new(events: &[&'a Event]) -> Result<KeyHistory<'a>, Verdict> {
        let mut calls = Vec::new();
        let mut returned = Vec::new();
        let mut unknown = Vec::new();
        for (position, event) in events.iter().enumerate() {
            let mut call = Call {
                event: position,
                op: &event.op,
                response: None,
                invoked: event.invoked,
                version: None,
            };
            match &event.outcome {
                Outcome::Failed { .. } => {}
                Outcome::Unknown if event.op == Op::Get => {}
                Outcome::Unknown => unknown.push(call),
                Outcome::Ok {
                    returned: at,
                    response,
                } => {
                    call.response = Some(response);
                    if let (Some(_), Response::Written { etag }) =
                        (event.op.written_value(), response)
                    {
                        call.version = Some(etag.as_str());
                    }
                    calls.push(call);
                    // A clock that ran backwards must not put the return
                    // before the call in the search's event list.
                    returned.push((*at).max(event.invoked));
                }
            }
        }
        let answered = calls.len();

        let mut writers: HashMap<&str, usize> = HashMap::new();
        unique_versions(&calls, &mut writers)?;

        let mut writes_of: HashMap<&str, usize> = HashMap::new();
        for call in calls.iter().chain(&unknown) {
            if let Some(value) = call.op.written_value() {
                *writes_of.entry(value).or_default() += 1;
            }
        }
        // The version a read saw with each value. One that a write answered
        // with belongs to that write, so it cannot name an unknown one.
        let mut seen_with: HashMap<&str, &str> = HashMap::new();
        for call in &calls {
            if let Some(Response::Found { value, etag }) = call.response
                && !writers.contains_key(etag.as_str())
            {
                seen_with.entry(value.as_str()).or_insert(etag.as_str());
            }
        }
        for call in &mut unknown {
            let Some(value) = call.op.written_value() else {
                continue;
            };
            if writes_of.get(value).copied().unwrap_or(0) > 1 {
                return Err(Verdict::Undecided {
                    reason: format!(
                        "value {value:?} is written more than once and one of its writes has an \
                         unknown outcome: the checker needs one write per value to tell them apart"
                    ),
                });
            }
            call.version = seen_with.get(value).copied();
        }
        unique_versions(&unknown, &mut writers)?;

        calls.extend(unknown);
        let mut classes: Vec<Vec<usize>> = Vec::new();
        let mut class_of: HashMap<(Discriminant<Op>, Option<&str>), usize> = HashMap::new();
        let mut if_absent = Vec::new();
        let mut if_match: HashMap<&str, Vec<usize>> = HashMap::new();
        for (call, &Call { op, version, .. }) in calls.iter().enumerate().skip(answered) {
            let shared = version
                .is_none()
                .then(|| (discriminant(op), op.condition()));
            match shared.and_then(|kind| class_of.get(&kind)) {
                Some(&class) => classes[class].push(call),
                None => {
                    if let Some(kind) = shared {
                        class_of.insert(kind, classes.len());
                    }
                    if let Op::PutIfAbsent { .. } = op {
                        if_absent.push(classes.len());
                    }
                    if let Some(etag) = op.condition() {
                        if_match.entry(etag).or_default().push(classes.len());
                    }
                    classes.push(vec![call]);
                }
            }
        }
        Ok(KeyHistory {
            calls,
            returned,
            answered,
            classes,
            if_absent,
            if_match,
        })
    }

    /// Whether the unknown calls on top of `stack` (the last ones placed)
    /// made no difference to `call`, which leaves `after`: if placing it
    /// before some of them leaves the same state, those were used for
    /// nothing, and the configuration without them, which the search
    /// reaches from an ancestor, can do everything this one can.
    fn wasted(&self, stack: &[(Cursor, usize, State)], call: usize, after: State) -> bool {
        stack
            .iter()
            .rev()
            .take_while(|(at, ..)| matches!(at, Cursor::Unknown(_)))
            .any(|&(_, _, before)| self.step(before, call) == Some(after))
    }

    fn version(&self, state: State) -> Option<&'a str> {
        match state {
            State::Current(call) => self.calls[call].version,
            State::Absent | State::Hidden => None,
        }
    }

    /// The sequential specification: the state after `call` runs in
    /// `state`, or `None` if its answer cannot come from `state`.
    fn step(&self, state: State, call: usize) -> Option<State> {
        let (op, response) = (self.calls[call].op, self.calls[call].response);
        if let Op::Get = op {
            return match response? {
                Response::Found { value, etag } => {
                    let State::Current(writer) = state else {
                        return None;
                    };
                    let holds = self.calls[writer].op.written_value() == Some(value.as_str())
                        && self.calls[writer].version == Some(etag.as_str());
                    holds.then_some(state)
                }
                Response::NotFound => (state == State::Absent).then_some(state),
                _ => None,
            };
        }
        let holds = match op {
            Op::Get | Op::Put { .. } | Op::Delete => true,
            Op::PutIfAbsent { .. } => state == State::Absent,
            Op::PutIfMatch { .. } | Op::DeleteIfMatch { .. } => {
                self.version(state).is_some() && self.version(state) == op.condition()
            }
        };
        let written = if op.written_value().is_none() {
            State::Absent
        } else if self.calls[call].version.is_some() {
            State::Current(call)
        } else {
            State::Hidden
        };
        match (response, holds) {
            (None, true) => Some(written),
            (None, false) => Some(state),
            (Some(Response::Written { .. }), true) if op.written_value().is_some() => Some(written),
            (Some(Response::Deleted), true) if op.written_value().is_none() => Some(written),
            (Some(Response::PreconditionFailed), false) => Some(state),
            _ => None,
        }
    }
}

/// Adds the versions `calls` created to `writers` (version to event
/// number), failing if one was created twice: every write makes a new one.
fn unique_versions<'a>(
    calls: &[Call<'a>],
    writers: &mut HashMap<&'a str, usize>,
) -> Result<(), Verdict> {
    for call in calls {
        if let Some(version) = call.version
            && let Some(first) = writers.insert(version, call.event)
        {
            return Err(Verdict::Violation {
                reason: format!(
                    "operations #{first} and #{} both created version {version:?}",
                    call.event
                ),
                order: Vec::new(),
            });
        }
    }
    Ok(())
}

/// A set of call indices.
#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Bits {
        Bits(vec![0; len.div_ceil(64)])
    }

    fn set(&mut self, i: usize, on: bool) {
        let bit = 1 << (i % 64);
        if on {
            self.0[i / 64] |= bit;
        } else {
            self.0[i / 64] &= !bit;
        }
    }

    /// The set, encoded compactly for the memo: the number of leading
    /// words with every bit set, then the words after them up to the last
    /// non-zero one. A linearized set holds every call that returned
    /// before one it holds was invoked, so it is full up to a frontier and
    /// the rest spans a few words, however long the history.
    fn memo_key(&self) -> Vec<u64> {
        let full = self.0.iter().take_while(|&&word| word == u64::MAX).count();
        let rest = &self.0[full..];
        let len = rest
            .iter()
            .rposition(|&word| word != 0)
            .map_or(0, |last| last + 1);
        let mut key = Vec::with_capacity(1 + len);
        key.push(full as u64);
        key.extend_from_slice(&rest[..len]);
        key
    }
}

/// Lowe's memo: for each set of linearized answered calls, the states
/// reached with it and how many calls of each unknown class had been used.
/// A configuration in the memo was either explored without success or is
/// an ancestor of the current one; either way, one that used at least as
/// many unknown calls of every class, with the same answered calls and
/// state, can do nothing more and needs no exploring.
#[derive(Debug, Default)]
struct Memo {
    /// Keyed by [`Bits::memo_key`] and state.
    seen: HashMap<(Vec<u64>, State), Vec<Used>>,
}

/// How many unknown calls of each class a configuration used.
#[derive(Debug)]
struct Used {
    /// Their sum: one with a larger total cannot have used at most as many.
    total: u32,
    per_class: Vec<u32>,
}

impl Used {
    fn at_most(&self, total: u32, per_class: &[u32]) -> bool {
        self.total <= total && self.per_class.iter().zip(per_class).all(|(a, b)| a <= b)
    }

    fn at_least(&self, total: u32, per_class: &[u32]) -> bool {
        self.total >= total && self.per_class.iter().zip(per_class).all(|(a, b)| a >= b)
    }
}

impl Memo {
    /// Records a configuration, or returns false if one dominating it is known.
    fn visit(&mut self, linearized: &Bits, state: State, used: &[u32]) -> bool {
        let total: u32 = used.iter().sum();
        let reached = self.seen.entry((linearized.memo_key(), state)).or_default();
        if reached.iter().any(|seen| seen.at_most(total, used)) {
            return false;
        }
        reached.retain(|seen| !seen.at_least(total, used));
        reached.push(Used {
            total,
            per_class: used.to_vec(),
        });
        true
    }
}

/// Where the search looks for the next call to place.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// An event of the answered calls' list (or `NIL` past its end).
    Event(usize),
    /// A class of unknown calls, by index in `KeyHistory::classes`.
    Unknown(usize),
}

/// End of the event list.
const NIL: usize = usize::MAX;
/// The list's head sentinel.
const HEAD: usize = 0;

/// The Wing–Gong search over one key's history.
#[derive(Debug)]
struct Search<'h, 'a> {
    history: &'h KeyHistory<'a>,
    /// The answered calls' call and return events; index 0 is the head.
    events: Vec<ListEvent>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per answered call, its return event (the cursor knows its call event).
    return_event: Vec<usize>,
}

/// An answered call's invocation or return, in the search's event list.
#[derive(Debug, Clone, Copy)]
struct ListEvent {
    call: usize,
    time: u64,
    is_return: bool,
}

/// How a search ended.
#[derive(Debug)]
enum Searched {
    Linearizable,
    /// `longest` is the longest prefix found, as call indices.
    Impossible {
        longest: Vec<usize>,
    },
    OutOfSteps,
}

impl<'h, 'a> Search<'h, 'a> {
    fn new(history: &'h KeyHistory<'a>) -> Search<'h, 'a> {
        let answered = history.answered;
        let mut order = Vec::with_capacity(2 * answered);
        for call in 0..answered {
            let (invoked, returned) = (history.calls[call].invoked, history.returned[call]);
            order.push(ListEvent {
                call,
                time: invoked,
                is_return: false,
            });
            order.push(ListEvent {
                call,
                time: returned,
                is_return: true,
            });
        }
        // Calls before returns at equal times: such operations overlap.
        order.sort_by_key(|event| (event.time, event.is_return));
        let head = ListEvent {
            call: NIL,
            time: 0,
            is_return: false,
        };
        let mut events = vec![head];
        events.extend(order);
        let len = events.len();
        let mut return_event = vec![0; answered];
        for (index, event) in events.iter().enumerate().skip(1) {
            if event.is_return {
                return_event[event.call] = index;
            }
        }
        Search {
            history,
            events,
            next: (1..=len).map(|i| if i == len { NIL } else { i }).collect(),
            prev: (0..len).map(|i| i.wrapping_sub(1)).collect(),
            return_event,
        }
    }

    fn unlink(&mut self, event: usize) {
        let (prev, next) = (self.prev[event], self.next[event]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes `unlink(event)`; undone in reverse order, the neighbours it
    /// remembers are the right ones again.
    fn relink(&mut self, event: usize) {
        let (prev, next) = (self.prev[event], self.next[event]);
        self.next[prev] = event;
        if next != NIL {
            self.prev[next] = event;
        }
    }

    /// The time of the first remaining return: a call invoked later must
    /// follow that operation, so it cannot be placed now.
    fn horizon(&self) -> u64 {
        let mut event = self.next[HEAD];
        while event != NIL {
            let ListEvent {
                time, is_return, ..
            } = self.events[event];
            if is_return {
                return time;
            }
            event = self.next[event];
        }
        u64::MAX
    }

    /// The next call to try from `cursor` in `state`: an answered call up to
    /// the first remaining return, then, class by class, the first unused
    /// unknown call invoked before that return, if placing it changes the
    /// state (one that does not only uses the call up) and [matters](Self::matters).
    fn next_candidate(
        &self,
        cursor: Cursor,
        state: State,
        used: &[u32],
    ) -> Option<(Cursor, usize)> {
        let first_class = match cursor {
            Cursor::Event(event) if event != NIL && !self.events[event].is_return => {
                return Some((cursor, self.events[event].call));
            }
            Cursor::Event(_) => 0,
            Cursor::Unknown(class) => class,
        };
        let history = self.history;
        let horizon = self.horizon();
        (first_class..history.classes.len()).find_map(|class| {
            let &call = history.classes[class].get(used[class] as usize)?;
            if history.calls[call].invoked > horizon {
                return None;
            }
            let after = history.step(state, call)?;
            let useful = after != state && self.matters(state, after, class, used, horizon);
            useful.then_some((Cursor::Unknown(class), call))
        })
    }

    /// Whether placing an unknown call of `class`, which takes `state` to
    /// `after`, can lead anywhere: some call that could come next must
    /// behave differently after it, or [`KeyHistory::wasted`] would discard
    /// every continuation. Checking first spares the search placing it. The
    /// next call is an answered one before the first remaining return, or
    /// an unknown call whose condition `after` makes true: unconditional
    /// ones act the same from any state.
    fn matters(
        &self,
        state: State,
        after: State,
        class: usize,
        used: &[u32],
        horizon: u64,
    ) -> bool {
        let history = self.history;
        let differs = |next: usize| {
            let with = history.step(after, next);
            with.is_some() && with != history.step(state, next)
        };
        let mut event = self.next[HEAD];
        while event != NIL && !self.events[event].is_return {
            if differs(self.events[event].call) {
                return true;
            }
            event = self.next[event];
        }
        let enabled = match after {
            State::Absent => history.if_absent.as_slice(),
            State::Current(_) | State::Hidden => history
                .version(after)
                .and_then(|version| history.if_match.get(version))
                .map_or(&[][..], Vec::as_slice),
        };
        enabled.iter().any(|&next_class| {
            let next_used = used[next_class] as usize + usize::from(next_class == class);
            history.classes[next_class]
                .get(next_used)
                .is_some_and(|&next| {
                    history.calls[next].invoked <= horizon
                        && history.step(after, next) != Some(after)
                        && differs(next)
                })
        })
    }

    fn run(&mut self, step_budget: u64) -> Searched {
        let history = self.history;
        let answered = history.answered;
        let mut linearized = Bits::new(answered);
        let mut used = vec![0u32; history.classes.len()];
        let mut placed = 0;
        let mut state = State::Absent;
        let mut memo = Memo::default();
        memo.visit(&linearized, state, &used);
        // The calls placed so far: where each was found, and the state before it.
        let mut stack: Vec<(Cursor, usize, State)> = Vec::new();
        let mut longest: Vec<usize> = Vec::new();
        let mut longest_placed = 0;
        let mut cursor = Cursor::Event(self.next[HEAD]);

        for _ in 0..step_budget {
            if placed == answered {
                return Searched::Linearizable;
            }
            let Some((at, call)) = self.next_candidate(cursor, state, &used) else {
                // Nothing fits here: take back the last call placed.
                let Some((at, call, before)) = stack.pop() else {
                    return Searched::Impossible { longest };
                };
                state = before;
                cursor = match at {
                    Cursor::Event(event) => {
                        linearized.set(call, false);
                        self.relink(self.return_event[call]);
                        self.relink(event);
                        placed -= 1;
                        Cursor::Event(self.next[event])
                    }
                    Cursor::Unknown(class) => {
                        used[class] -= 1;
                        Cursor::Unknown(class + 1)
                    }
                };
                continue;
            };

            if let Some(after) = history.step(state, call)
                && !history.wasted(&stack, call, after)
            {
                match at {
                    Cursor::Event(_) => linearized.set(call, true),
                    Cursor::Unknown(class) => used[class] += 1,
                }
                if memo.visit(&linearized, after, &used) {
                    stack.push((at, call, state));
                    state = after;
                    if let Cursor::Event(event) = at {
                        self.unlink(event);
                        self.unlink(self.return_event[call]);
                        placed += 1;
                        if placed > longest_placed {
                            longest_placed = placed;
                            longest = stack.iter().map(|&(_, call, _)| call).collect();
                        }
                    }
                    cursor = Cursor::Event(self.next[HEAD]);
                    continue;
                }
                match at {
                    Cursor::Event(_) => linearized.set(call, false),
                    Cursor::Unknown(class) => used[class] -= 1,
                }
            }
            cursor = match at {
                Cursor::Event(event) => Cursor::Event(self.next[event]),
                Cursor::Unknown(class) => Cursor::Unknown(class + 1),
            };
        }
        if placed == answered {
            Searched::Linearizable
        } else {
            Searched::OutOfSteps
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Get => f.write_str("get"),
            Op::Put { value } => write!(f, "put {value:?}"),
            Op::PutIfAbsent { value } => write!(f, "put {value:?} if-none-match *"),
            Op::PutIfMatch { value, etag } => write!(f, "put {value:?} if-match {etag:?}"),
            Op::Delete => f.write_str("delete"),
            Op::DeleteIfMatch { etag } => write!(f, "delete if-match {etag:?}"),
        }
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Written { etag } => write!(f, "written, version {etag:?}"),
            Response::Deleted => f.write_str("deleted"),
            Response::Found { value, etag } => write!(f, "found {value:?}, version {etag:?}"),
            Response::NotFound => f.write_str("not found"),
            Response::PreconditionFailed => f.write_str("precondition failed"),
        }
    }
}

/// Nanoseconds as milliseconds, to the nanosecond.
fn millis(ns: u64) -> String {
    format!("{}.{:06}ms", ns / 1_000_000, ns % 1_000_000)
}

/// One line per event: its number, its place in `order` if it has one,
/// client, invocation and return times, operation and outcome.
fn render(events: &[&Event], order: &[usize]) -> String {
    let mut place = vec![None; events.len()];
    for (rank, &event) in order.iter().enumerate() {
        place[event] = Some(rank + 1);
    }
    let mut out = String::from("  #     lin  client  invoked .. returned  op  =>  outcome\n");
    for (number, (event, place)) in events.iter().zip(place).enumerate() {
        let place = place.map_or_else(|| "-".to_string(), |rank| rank.to_string());
        let (returned, outcome) = match &event.outcome {
            Outcome::Ok { returned, response } => (millis(*returned), response.to_string()),
            Outcome::Failed { returned } => (millis(*returned), "failed, not applied".into()),
            Outcome::Unknown => ("?".to_string(), "unknown".to_string()),
        };
        let _ = writeln!(
            out,
            "  #{number:<5} {place:>3}  c{:<6} {} .. {returned}  {}  =>  {outcome}",
            event.client,
            millis(event.invoked),
            event.op,
        );
    }
    out
}

#[cfg(test)]
mod tests;
