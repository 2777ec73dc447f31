//! A small, dependency-free linearizability checker.
//!
//! Given a concurrent *history* (each completed operation with its input,
//! output, call time and return time) and a sequential specification
//! ([`Model`]), [`check`] decides whether the operations can be put in one
//! total order that
//!
//! 1. respects real time: if `a` returned before `b` was called, `a` comes
//!    before `b`; and
//! 2. is a legal sequential execution of the model, each operation producing
//!    exactly the output that was observed.
//!
//! # Algorithm
//!
//! This is the backtracking search of Wing & Gong (J. M. Wing and C. Gong,
//! "Testing and Verifying Concurrent Objects", JPDC 17(1), 1993), with the
//! improvements of Lowe (G. Lowe, "Testing for linearizability", Concurrency
//! and Computation: Practice and Experience 29(4), 2017) as implemented by
//! Porcupine (A. Athalye, <https://github.com/anishathalye/porcupine>):
//!
//! * Every operation becomes two *entries*, a call and a return, sorted by
//!   time into a doubly-linked list. When times tie, calls sort before
//!   returns, so an operation called at the very instant another returned
//!   counts as concurrent with it (the lenient reading of a clock tick).
//! * The candidates for the next linearization point are exactly the call
//!   entries that precede the first return entry in the list: an operation
//!   whose return comes first must be linearized before anything called after
//!   that return.
//! * Linearizing a candidate *lifts* its call and return entries out of the
//!   list (O(1), dancing-links style) and pushes it on a stack together with
//!   the model state before it. Reaching a return entry means that no
//!   remaining candidate fits: pop the stack, *unlift* the entries (the list
//!   is restored exactly, because lifts and unlifts are strictly LIFO) and try
//!   the next candidate after the popped one.
//! * Lowe's memoization: a configuration is fully described by the set of
//!   linearized operations (a bitset) and the model state. Each configuration
//!   is explored at most once; meeting it again means it already failed.
//!
//! The worst case is still exponential (the problem is NP-complete, Gibbons &
//! Korach 1997), but with the memo the cost is roughly the number of distinct
//! (set, state) pairs, which for histories of a few sequential clients stays
//! small: the number of candidates at any point is bounded by the number of
//! concurrently outstanding operations.
//!
//! # Operations with an unknown outcome
//!
//! A client whose request failed or timed out does not know whether the
//! operation took effect. Such an operation must NOT be recorded with the
//! time the client gave up as its return time (it may still take effect
//! later). The caller must either
//!
//! * drop it from the history, which is right for operations without side
//!   effects (a read whose answer was never seen constrains nothing), or
//! * record it with `ret = u64::MAX` ([`PENDING`]) and an output that the
//!   model accepts whatever happened (for [`Register`]: a write with
//!   [`RegisterOut::Unknown`]). Such an operation may be linearized at any
//!   point after its call, or never: the search succeeds as soon as every
//!   operation with a finite `ret` is linearized, so a write that was lost
//!   (and whose value is therefore never read) is accepted too.
//!
//! Each pending operation stays a candidate until the very end, so many of
//! them make the search expensive (up to a factor of 2 each when the history
//! is not linearizable). Keep them few, or bound them by partitioning.
//!
//! # Larger objects
//!
//! Linearizability is local (Herlihy & Wing 1990): a history of a key-value
//! store is linearizable iff, for each key, the sub-history of operations on
//! that key is. Check a store key by key, each with a [`Register`], rather
//! than with one model whose state is the whole map.

use std::collections::HashSet;
use std::fmt::{Debug, Write as _};
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + std::hash::Hash + std::fmt::Debug;
    type Input: std::fmt::Debug;
    type Output: std::fmt::Debug;
    fn init(&self) -> Self::State;
    /// Applies `input` to `state`: Some(next state) if `output` is what a sequential execution would answer, None otherwise.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Option<Self::State>;
}

/// One completed operation of a concurrent history; times are from one monotonic clock (e.g. nanoseconds since the test started). call < ret.
///
/// `ret == u64::MAX` ([`PENDING`]) marks an operation whose outcome is
/// unknown: it may take effect at any time after `call`, or never (see the
/// module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<I, O> {
    pub client: usize,
    pub input: I,
    pub call: u64,
    pub output: O,
    pub ret: u64,
}

/// The `ret` of an operation whose outcome is unknown (the client gave up
/// waiting): it may be linearized anywhere after its call, or not at all.
pub const PENDING: u64 = u64::MAX;

/// The result: Ok(()) when linearizable, Err(explanation) otherwise. The explanation names the longest linearizable prefix found and the operations that could not be placed (Debug of their inputs/outputs and times), so a failing test says something useful.
///
/// A malformed history (an operation with `call >= ret`) is also an `Err`.
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
) -> Result<(), String> {
    if let Some((i, op)) = history.iter().enumerate().find(|(_, op)| op.call >= op.ret) {
        return Err(format!(
            "malformed history: operation {} has call >= ret",
            describe(i, op)
        ));
    }
    match search(model, history) {
        Ok(()) => Ok(()),
        Err(failure) => Err(report(model, history, &failure)),
    }
}

// ---------------------------------------------------------------------------
// The entry list.

/// "No node": the end of the list.
const NIL: usize = usize::MAX;
/// Index of the sentinel node that starts the list.
const HEAD: usize = 0;

/// A call or return entry in the doubly-linked list (indices into
/// [`Entries::nodes`]).
struct Node {
    /// Index of the operation in the history (unused for the head).
    op: usize,
    is_call: bool,
    /// For a call entry, its return entry (and vice versa).
    partner: usize,
    prev: usize,
    next: usize,
}

/// The call and return entries of a history, sorted by time, as a
/// doubly-linked list starting at the sentinel [`HEAD`].
struct Entries {
    nodes: Vec<Node>,
}

impl Entries {
    /// Requires `call < ret` for every operation.
    fn new<I, O>(history: &[Operation<I, O>]) -> Self {
        // (time, is_return, op): calls sort before returns at equal times;
        // the op index makes the order (and thus the search) deterministic.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * history.len());
        for (i, op) in history.iter().enumerate() {
            events.push((op.call, false, i));
            events.push((op.ret, true, i));
        }
        events.sort_unstable();

        let last = events.len();
        let mut nodes = Vec::with_capacity(last + 1);
        nodes.push(Node {
            op: NIL,
            is_call: false,
            partner: NIL,
            prev: NIL,
            next: if last == 0 { NIL } else { 1 },
        });
        let mut call_node = vec![NIL; history.len()];
        for (k, &(_, is_return, op)) in events.iter().enumerate() {
            let idx = k + 1;
            let mut partner = NIL;
            if is_return {
                // call < ret, so the call entry was already placed.
                partner = call_node[op];
                nodes[partner].partner = idx;
            } else {
                call_node[op] = idx;
            }
            nodes.push(Node {
                op,
                is_call: !is_return,
                partner,
                prev: idx - 1,
                next: if idx == last { NIL } else { idx + 1 },
            });
        }
        Entries { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn unlink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    /// Re-inserts `n` where it was; valid when everything unlinked after it
    /// has already been relinked.
    fn relink(&mut self, n: usize) {
        let (prev, next) = (self.nodes[n].prev, self.nodes[n].next);
        self.nodes[prev].next = n;
        if next != NIL {
            self.nodes[next].prev = n;
        }
    }

    /// Removes a call entry and its return entry from the list.
    fn lift(&mut self, call: usize) {
        let ret = self.nodes[call].partner;
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes [`Entries::lift`] (in reverse order).
    fn unlift(&mut self, call: usize) {
        let ret = self.nodes[call].partner;
        self.relink(ret);
        self.relink(call);
    }
}

// ---------------------------------------------------------------------------
// The search.

/// The set of linearized operations.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(n: usize) -> Self {
        Bitset(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// What a failed search reached: one longest linearizable prefix (operation
/// indices in linearization order) and the model state after it.
struct Failure<S> {
    prefix: Vec<usize>,
    state: S,
}

fn search<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
) -> Result<(), Failure<M::State>> {
    let n = history.len();
    let finite = |op: usize| history[op].ret != PENDING;
    let must_place = (0..n).filter(|&op| finite(op)).count();

    let mut list = Entries::new(history);
    let mut state = model.init();
    let mut linearized = Bitset::new(n);
    let mut placed = 0; // linearized operations with a finite ret
    // (call entry, state before it) for each linearized operation, in order.
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut seen: HashSet<(Bitset, M::State)> = HashSet::new();
    let mut best = Failure {
        prefix: Vec::new(),
        state: state.clone(),
    };

    let mut entry = list.first();
    loop {
        if placed == must_place {
            // Everything that surely completed is placed; pending operations
            // still in the list may simply never have taken effect.
            return Ok(());
        }
        // `entry` is never NIL here: an operation with a finite ret remains,
        // and the scan never moves past a return entry. Treat NIL like a
        // return entry anyway, to be robust.
        if entry != NIL && list.nodes[entry].is_call {
            let op = list.nodes[entry].op;
            let o = &history[op];
            if let Some(next) = model.step(&state, &o.input, &o.output) {
                linearized.set(op);
                if seen.insert((linearized.clone(), next.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, next)));
                    list.lift(entry);
                    if finite(op) {
                        placed += 1;
                    }
                    if stack.len() > best.prefix.len() {
                        best.prefix = stack.iter().map(|&(e, _)| list.nodes[e].op).collect();
                        best.state = state.clone();
                    }
                    entry = list.first();
                    continue;
                }
                // This configuration was explored before and failed.
                linearized.clear(op);
            }
            entry = list.nodes[entry].next;
        } else {
            // A return entry: the operation it belongs to had to be
            // linearized before anything later, and no candidate fits.
            let Some((call, prev_state)) = stack.pop() else {
                return Err(best);
            };
            let op = list.nodes[call].op;
            state = prev_state;
            linearized.clear(op);
            if finite(op) {
                placed -= 1;
            }
            list.unlift(call);
            entry = list.nodes[call].next;
        }
    }
}

// ---------------------------------------------------------------------------
// Explaining a failure.

/// How many operations of the prefix, and of the blocked candidates, an
/// explanation lists.
const SHOW: usize = 12;

fn describe<I: Debug, O: Debug>(index: usize, op: &Operation<I, O>) -> String {
    let ret = if op.ret == PENDING {
        "pending".to_string()
    } else {
        op.ret.to_string()
    };
    format!(
        "#{index} (client {}) {:?} -> {:?} [call {}, ret {ret}]",
        op.client, op.input, op.output, op.call
    )
}

fn report<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    failure: &Failure<M::State>,
) -> String {
    let n = history.len();
    let pending = history.iter().filter(|op| op.ret == PENDING).count();
    let mut in_prefix = vec![false; n];
    for &op in &failure.prefix {
        in_prefix[op] = true;
    }

    // `write!` into a String cannot fail.
    let mut s = String::new();
    let _ = writeln!(
        s,
        "history of {n} operations ({pending} pending) is not linearizable"
    );
    let _ = writeln!(
        s,
        "longest linearizable prefix found: {} operation(s), leaving the model in state {:?}",
        failure.prefix.len(),
        failure.state
    );
    let skip = failure.prefix.len().saturating_sub(SHOW);
    if skip > 0 {
        let _ = writeln!(s, "  ... {skip} earlier operation(s)");
    }
    for (pos, &op) in failure.prefix.iter().enumerate().skip(skip) {
        let _ = writeln!(s, "  {:>4}. {}", pos + 1, describe(op, &history[op]));
    }

    // The candidates at the end of that prefix: every operation not in it
    // that was called (no later than) when the earliest-returning remaining
    // operation returned.
    let deadline = (0..n)
        .filter(|&op| !in_prefix[op] && history[op].ret != PENDING)
        .min_by_key(|&op| (history[op].ret, op));
    if let Some(d) = deadline {
        let mut blocked: Vec<usize> = (0..n)
            .filter(|&op| !in_prefix[op] && history[op].call <= history[d].ret)
            .collect();
        blocked.sort_by_key(|&op| (history[op].call, op));
        let _ = writeln!(
            s,
            "operations that could not be placed next ({} candidate(s); #{d} had to be placed \
             before anything called after time {}):",
            blocked.len(),
            history[d].ret
        );
        for &op in blocked.iter().take(SHOW) {
            let o = &history[op];
            let verdict = if model.step(&failure.state, &o.input, &o.output).is_some() {
                "accepted by the model, but no continuation succeeds"
            } else {
                "rejected by the model in that state"
            };
            let _ = writeln!(s, "        {} -- {verdict}", describe(op, o));
        }
        if blocked.len() > SHOW {
            let _ = writeln!(s, "        ... and {} more", blocked.len() - SHOW);
        }
    }
    let _ = write!(
        s,
        "{} operation(s) in total are not in that prefix (pending ones may legitimately stay out)",
        n - failure.prefix.len()
    );
    s
}

// ---------------------------------------------------------------------------
// A ready model: one register.

/// A single read/write register of `u64` values, starting at `init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Register {
    pub init: u64,
}

/// The input of a [`Register`] operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    Write(u64),
    Read,
}

/// The output of a [`Register`] operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegisterOut {
    /// A write was acknowledged.
    Ok,
    /// A read returned this value.
    Value(u64),
    /// The client does not know the outcome (error or timeout). Give the
    /// operation `ret = PENDING`; then it may take effect after its call, or
    /// never. (A read with an unknown outcome is better dropped altogether;
    /// the model accepts it anyway, leaving the state unchanged.)
    Unknown,
}

impl Model for Register {
    type State = u64;
    type Input = RegisterOp;
    type Output = RegisterOut;

    fn init(&self) -> u64 {
        self.init
    }

    fn step(&self, state: &u64, input: &RegisterOp, output: &RegisterOut) -> Option<u64> {
        match (input, output) {
            (RegisterOp::Write(v), RegisterOut::Ok | RegisterOut::Unknown) => Some(*v),
            (RegisterOp::Read, RegisterOut::Value(v)) => (v == state).then_some(*state),
            (RegisterOp::Read, RegisterOut::Unknown) => Some(*state),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use RegisterOp::{Read, Write};
    use RegisterOut::{Unknown, Value};

    type History = Vec<Operation<RegisterOp, RegisterOut>>;

    fn op(
        client: usize,
        input: RegisterOp,
        output: RegisterOut,
        call: u64,
        ret: u64,
    ) -> Operation<RegisterOp, RegisterOut> {
        Operation {
            client,
            input,
            call,
            output,
            ret,
        }
    }
    fn w(client: usize, v: u64, call: u64, ret: u64) -> Operation<RegisterOp, RegisterOut> {
        op(client, Write(v), RegisterOut::Ok, call, ret)
    }
    fn r(client: usize, v: u64, call: u64, ret: u64) -> Operation<RegisterOp, RegisterOut> {
        op(client, Read, Value(v), call, ret)
    }

    const REG: Register = Register { init: 0 };

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check(&REG, &[]), Ok(()));
    }

    #[test]
    fn malformed_operation_is_reported() {
        let err = check(&REG, &[w(0, 1, 5, 5)]).unwrap_err();
        assert!(err.contains("malformed"), "{err}");
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            r(0, 0, 0, 1),
            w(0, 1, 2, 3),
            r(1, 1, 4, 5),
            w(1, 2, 6, 7),
            r(0, 2, 8, 9),
        ];
        assert_eq!(check(&REG, &h), Ok(()));
        assert_eq!(check(&Register { init: 7 }, &[r(0, 7, 0, 1)]), Ok(()));
    }

    #[test]
    fn overlapping_operations_linearizable_in_some_order() {
        // Only the order w2, r2, w1, r1 works: w1 must take effect after the
        // read of 2, although w1 was called first.
        let h = vec![
            w(0, 1, 0, 10),
            w(1, 2, 1, 11),
            r(2, 2, 2, 5),
            r(2, 1, 12, 13),
        ];
        assert_eq!(check(&REG, &h), Ok(()));
        // Same with reads on both sides of a pair of concurrent writes.
        let h = vec![
            w(0, 1, 0, 10),
            w(1, 2, 0, 10),
            r(2, 1, 1, 3),
            r(2, 2, 4, 6),
            r(2, 1, 7, 9), // would need w1 twice
        ];
        assert!(check(&REG, &h).is_err());
    }

    #[test]
    fn call_at_the_instant_of_a_return_counts_as_concurrent() {
        assert_eq!(check(&REG, &[w(0, 1, 0, 5), r(1, 0, 5, 6)]), Ok(()));
        assert!(check(&REG, &[w(0, 1, 0, 5), r(1, 0, 6, 7)]).is_err());
    }

    #[test]
    fn stale_read_is_rejected() {
        let h = vec![w(0, 1, 0, 1), w(1, 2, 2, 3), r(2, 1, 4, 5)];
        let err = check(&REG, &h).unwrap_err();
        println!("{err}");
        assert!(
            err.contains("longest linearizable prefix found: 2 operation(s)"),
            "{err}"
        );
        assert!(
            err.contains("#2 (client 2) Read -> Value(1) [call 4, ret 5]"),
            "{err}"
        );
        assert!(err.contains("rejected by the model"), "{err}");
    }

    #[test]
    fn read_of_unwritten_value_is_rejected() {
        let h = vec![w(0, 1, 0, 10), r(1, 7, 2, 4)];
        let err = check(&REG, &h).unwrap_err();
        assert!(err.contains("Read -> Value(7)"), "{err}");
    }

    #[test]
    fn pending_write_observed_later_is_accepted() {
        let h = vec![
            op(0, Write(5), Unknown, 0, PENDING),
            r(1, 0, 1, 2),
            r(1, 5, 10, 11),
            r(2, 5, 12, 13),
        ];
        assert_eq!(check(&REG, &h), Ok(()));
    }

    #[test]
    fn pending_write_never_observed_is_accepted() {
        let h = vec![
            op(0, Write(5), Unknown, 0, PENDING),
            r(1, 0, 10, 11),
            w(1, 6, 12, 13),
            r(2, 6, 14, 15),
        ];
        assert_eq!(check(&REG, &h), Ok(()));
    }

    #[test]
    fn pending_write_cannot_take_effect_twice_or_before_its_call() {
        // Observed, then the old value again: not linearizable.
        let h = vec![
            op(0, Write(5), Unknown, 0, PENDING),
            r(1, 5, 10, 11),
            r(1, 0, 12, 13),
        ];
        assert!(check(&REG, &h).is_err());
        // Observed before it was called.
        let h = vec![r(1, 5, 0, 1), op(0, Write(5), Unknown, 2, PENDING)];
        assert!(check(&REG, &h).is_err());
    }

    // -- randomized -----------------------------------------------------------

    /// xorshift64: enough randomness for tests, no crates.
    struct XorShift(u64);

    impl XorShift {
        fn new(seed: u64) -> Self {
            XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        /// Uniform-ish in 0..n; n > 0.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A history of a real sequential execution of a register (initially 0)
    /// by `clients` clients, each issuing one operation at a time. The k-th
    /// operation takes effect at time 10k; its call and return lie up to
    /// `window` before and after. Written values are unique (1, 2, ...).
    /// `pending_pct` percent of writes time out: half of those took effect,
    /// half were lost; both are recorded with `ret = PENDING`.
    fn generate(
        rng: &mut XorShift,
        clients: usize,
        ops: usize,
        window: u64,
        pending_pct: u64,
    ) -> History {
        let mut value = 0;
        let mut next_value = 1;
        let mut busy_until = vec![0u64; clients];
        let mut history = Vec::with_capacity(ops);
        let mut t = 0u64;
        while history.len() < ops {
            t += 10;
            let free: Vec<usize> = (0..clients).filter(|&c| busy_until[c] + 1 < t).collect();
            if free.is_empty() {
                continue;
            }
            let c = free[rng.below(free.len() as u64) as usize];
            let call = t
                .saturating_sub(1 + rng.below(window))
                .max(busy_until[c] + 1);
            let ret = t + 1 + rng.below(window);
            busy_until[c] = ret;
            let (input, output, ret) = if rng.below(2) == 0 {
                let v = next_value;
                next_value += 1;
                let p = rng.below(100);
                if p < pending_pct / 2 {
                    value = v; // timed out, but took effect
                    (Write(v), Unknown, PENDING)
                } else if p < pending_pct {
                    (Write(v), Unknown, PENDING) // timed out and lost
                } else {
                    value = v;
                    (Write(v), RegisterOut::Ok, ret)
                }
            } else {
                (Read, Value(value), ret)
            };
            history.push(Operation {
                client: c,
                input,
                call,
                output,
                ret,
            });
        }
        history
    }

    /// Makes one read return a value that is provably stale: a value `u`
    /// whose (only) write W_u completed before another write W_x started,
    /// where W_x completed before the read started. Returns false if the
    /// history has no such read.
    fn corrupt_stale(rng: &mut XorShift, history: &mut History) -> bool {
        // Acknowledged writes (value, call, ret); the initial value counts
        // as a write that completed at time 0.
        let mut writes = vec![(0u64, 0u64, 0u64)];
        for o in history.iter() {
            if let (Write(v), RegisterOut::Ok) = (o.input, o.output) {
                writes.push((v, o.call, o.ret));
            }
        }
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].output, Value(_)))
            .collect();
        if reads.is_empty() {
            return false;
        }
        let start = rng.below(reads.len() as u64) as usize;
        for k in 0..reads.len() {
            let i = reads[(start + k) % reads.len()];
            let (read_call, current) = match history[i].output {
                Value(v) => (history[i].call, v),
                _ => continue,
            };
            let stale: Vec<u64> = writes
                .iter()
                .filter(|&&(u, _, u_ret)| {
                    u != current
                        && writes
                            .iter()
                            .any(|&(_, x_call, x_ret)| u_ret < x_call && x_ret < read_call)
                })
                .map(|&(u, _, _)| u)
                .collect();
            if !stale.is_empty() {
                history[i].output = Value(stale[rng.below(stale.len() as u64) as usize]);
                return true;
            }
        }
        false
    }

    #[test]
    fn random_real_executions_accepted_and_stale_reads_rejected() {
        let mut rng = XorShift::new(42);
        let mut corrupted = 0;
        for round in 0..400 {
            let clients = 2 + rng.below(3) as usize;
            let ops = 5 + rng.below(56) as usize;
            let window = 1 + rng.below(40);
            let pending_pct = if round % 2 == 0 { 0 } else { 10 };
            let mut h = generate(&mut rng, clients, ops, window, pending_pct);
            if let Err(e) = check(&REG, &h) {
                panic!("round {round}: real execution rejected:\n{e}\n{h:#?}");
            }
            if corrupt_stale(&mut rng, &mut h) {
                corrupted += 1;
                assert!(
                    check(&REG, &h).is_err(),
                    "round {round}: stale read accepted: {h:#?}"
                );
            }
        }
        println!("{corrupted} of 400 histories corrupted and rejected");
        assert!(
            corrupted > 200,
            "too few corruptible histories: {corrupted}"
        );
    }

    /// Independent reference: tries every order (and every subset of the
    /// pending operations) directly.
    fn brute_force<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>]) -> bool {
        fn go<M: Model>(
            model: &M,
            history: &[Operation<M::Input, M::Output>],
            placed: &mut [bool],
            state: &M::State,
        ) -> bool {
            let n = history.len();
            if (0..n).all(|j| placed[j] || history[j].ret == PENDING) {
                return true;
            }
            for i in 0..n {
                if placed[i] {
                    continue;
                }
                // i may go next unless an unplaced op returned before i's call.
                if (0..n).any(|j| !placed[j] && history[j].ret < history[i].call) {
                    continue;
                }
                if let Some(next) = model.step(state, &history[i].input, &history[i].output) {
                    placed[i] = true;
                    if go(model, history, placed, &next) {
                        return true;
                    }
                    placed[i] = false;
                }
            }
            false
        }
        go(
            model,
            history,
            &mut vec![false; history.len()],
            &model.init(),
        )
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = XorShift::new(7);
        let (mut yes, mut no) = (0, 0);
        for round in 0..3000 {
            let n = 1 + rng.below(6) as usize;
            let h: History = (0..n)
                .map(|i| {
                    let call = rng.below(10);
                    let mut ret = call + 1 + rng.below(5);
                    let input = if rng.below(2) == 0 {
                        Write(rng.below(3))
                    } else {
                        Read
                    };
                    let output = match (input, rng.below(10)) {
                        (_, 0) => {
                            ret = PENDING;
                            Unknown
                        }
                        (Write(_), 1) => Value(1), // never valid
                        (Write(_), _) => RegisterOut::Ok,
                        (Read, _) => Value(rng.below(3)),
                    };
                    op(i % 3, input, output, call, ret)
                })
                .collect();
            let expected = brute_force(&REG, &h);
            let got = check(&REG, &h);
            assert_eq!(got.is_ok(), expected, "round {round}: {got:?}\n{h:#?}");
            if expected { yes += 1 } else { no += 1 }
        }
        println!("brute force agreement: {yes} linearizable, {no} not");
        assert!(yes > 300 && no > 300, "unbalanced sample: {yes} / {no}");
    }

    #[test]
    fn performance_3_clients_300_ops_each() {
        let mut rng = XorShift::new(2024);
        for (window, pending_pct) in [(15, 0), (40, 0), (40, 2)] {
            let h = generate(&mut rng, 3, 900, window, pending_pct);
            let pending = h.iter().filter(|o| o.ret == PENDING).count();
            let start = std::time::Instant::now();
            let result = check(&REG, &h);
            let accepted = start.elapsed();
            assert_eq!(result, Ok(()));

            let mut bad = h.clone();
            assert!(corrupt_stale(&mut rng, &mut bad));
            let start = std::time::Instant::now();
            let result = check(&REG, &bad);
            let rejected = start.elapsed();
            let err = result.unwrap_err();
            println!(
                "900 ops, window {window}, {pending} pending: linearizable checked in {accepted:?}, \
                 corrupted rejected in {rejected:?}"
            );
            if pending_pct == 0 {
                println!("sample explanation:\n{err}");
            }
        }
    }
}
