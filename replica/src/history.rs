//! The history model: epochs, positions and branch points
//! (`docs/design.md`, "History"). Pure functions, no I/O: the replica store,
//! the server, the host engine and the fault simulator (`sim/`) all decide
//! through these, so the simulator checks the same rules production runs.
//!
//! A *history* is the sequence of writes a host acknowledges from. Host
//! epoch `e` starts from the history it chose at its branch point `b` and
//! appends records `b+1, b+2, ...` tagged with `e`. So a history is fully
//! described by its steps: "records of epoch `e` follow seq `b`". Two
//! records with the same (epoch, seq) are the same write, because only the
//! one host of that epoch wrote records tagged with it, and it wrote each
//! seq once. Hence if two histories agree at seq `s`, they agree on every
//! seq below `s` too (log matching, as in Raft).

use std::fmt;

/// Most steps a history keeps. Older steps are dropped: a replica whose
/// position falls before the oldest kept step then compares as diverged
/// from seq 0, which is safe (it is rolled back, never trusted).
pub const HISTORY_STEPS_MAX: usize = 64;
/// Encoded bytes of one step.
pub const STEP_BYTES: usize = 16;

/// Records of `epoch` follow seq `branch_seq` in this history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The host epoch that wrote the records.
    pub epoch: u64,
    /// The last seq before that host's first record (its branch point).
    pub branch_seq: u64,
}

/// A history: steps with strictly increasing epochs and non-decreasing
/// branch seqs, at most [`HISTORY_STEPS_MAX`] of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    steps: Vec<Step>,
}

/// Where a replica stands: the epoch of its last durable record, then its
/// durable seq. Positions order by epoch first (derive order follows the
/// field order), as terms do in Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Epoch of the record at `seq` (0 when `seq` is 0 or unknown).
    pub epoch: u64,
    /// Durable seq.
    pub seq: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} (epoch {})", self.seq, self.epoch)
    }
}

/// Why bytes are not a valid encoded history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// Length not a whole number of steps, or too many steps.
    #[error("history of {0} bytes is not 0..={max} steps of {STEP_BYTES} bytes", max = HISTORY_STEPS_MAX)]
    BadLength(usize),
    /// Epochs must increase and branch seqs must not decrease.
    #[error("history steps out of order at step {0}")]
    OutOfOrder(usize),
}

impl History {
    /// The empty history (a fresh volume: nothing written yet).
    pub fn new() -> History {
        History::default()
    }

    /// The steps, oldest first.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The newest epoch that wrote into this history (0 if none).
    pub fn last_epoch(&self) -> u64 {
        self.steps.last().map_or(0, |s| s.epoch)
    }

    /// The history a host of `epoch` writes after choosing this one up to
    /// `branch_seq`: steps whose records all lie past the branch are cut.
    pub fn branch(&self, epoch: u64, branch_seq: u64) -> History {
        assert!(epoch > self.last_epoch(), "epoch {epoch} must exceed {}", self.last_epoch());
        let mut steps: Vec<Step> = self.steps.iter().copied().filter(|s| s.branch_seq < branch_seq).collect();
        steps.push(Step { epoch, branch_seq });
        if steps.len() > HISTORY_STEPS_MAX {
            steps.drain(..steps.len() - HISTORY_STEPS_MAX);
        }
        History { steps }
    }

    /// The epoch of the record at `seq`, or None for seq 0 and for seqs
    /// older than the oldest kept step.
    pub fn epoch_at(&self, seq: u64) -> Option<u64> {
        self.steps.iter().rev().find(|s| s.branch_seq < seq).map(|s| s.epoch)
    }

    /// The position of a replica that follows this history up to `durable`.
    pub fn position(&self, durable: u64) -> Position {
        Position { epoch: self.epoch_at(durable).unwrap_or(0), seq: durable }
    }

    /// The highest seq `s <= min(a_last, b_last)` at which `a` and `b`
    /// hold the same record (0 if none). By log matching they then agree
    /// on every seq below it as well.
    pub fn common_prefix(a: &History, a_last: u64, b: &History, b_last: u64) -> u64 {
        let m = a_last.min(b_last);
        // Both are step functions of seq; between consecutive boundaries
        // each is constant. Walk the intervals from the top.
        let mut bounds: Vec<u64> = a.steps.iter().chain(&b.steps).map(|s| s.branch_seq).filter(|b| *b < m).collect();
        bounds.push(0);
        bounds.sort_unstable();
        bounds.dedup();
        let mut hi = m;
        for lo in bounds.into_iter().rev() {
            // Interval (lo, hi]: both epochs are those at hi.
            if hi > lo {
                if let (Some(x), Some(y)) = (a.epoch_at(hi), b.epoch_at(hi)) {
                    if x == y {
                        return hi;
                    }
                }
            }
            hi = lo;
        }
        0
    }

    /// Encodes as `steps.len()` little-endian (epoch, branch_seq) pairs.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.steps.len() * STEP_BYTES);
        for s in &self.steps {
            b.extend_from_slice(&s.epoch.to_le_bytes());
            b.extend_from_slice(&s.branch_seq.to_le_bytes());
        }
        b
    }

    /// Decodes and validates (length, count, order).
    pub fn decode(b: &[u8]) -> Result<History, HistoryError> {
        if !b.len().is_multiple_of(STEP_BYTES) || b.len() / STEP_BYTES > HISTORY_STEPS_MAX {
            return Err(HistoryError::BadLength(b.len()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let steps: Vec<Step> = (0..b.len() / STEP_BYTES)
            .map(|i| Step { epoch: u64_at(i * STEP_BYTES), branch_seq: u64_at(i * STEP_BYTES + 8) })
            .collect();
        for (i, w) in steps.windows(2).enumerate() {
            if w[1].epoch <= w[0].epoch || w[1].branch_seq < w[0].branch_seq {
                return Err(HistoryError::OutOfOrder(i + 1));
            }
        }
        Ok(History { steps })
    }
}

/// How a replica's log relates to a host's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Every durable record of the replica is in the host's history: it
    /// can catch up by receiving what follows.
    Prefix,
    /// The replica holds records past seq `after` from another history.
    /// They were never acknowledged; it must be rolled back before it
    /// counts toward Q or serves reads.
    Diverged {
        /// The last seq both histories share.
        after: u64,
    },
}

impl fmt::Display for Standing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Standing::Prefix => f.write_str("prefix of the host's history"),
            Standing::Diverged { after } => write!(f, "diverged after seq {after}"),
        }
    }
}

/// Whether a replica that follows `replica` up to `durable` is a prefix of
/// the host history `host`, whose last assigned seq is `host_last`.
pub fn standing(host: &History, host_last: u64, replica: &History, durable: u64) -> Standing {
    if durable == 0 {
        return Standing::Prefix;
    }
    let common = History::common_prefix(host, host_last, replica, durable);
    if common == durable {
        Standing::Prefix
    } else {
        Standing::Diverged { after: common }
    }
}

/// The index of the highest position (ties: the first). The new host's
/// history starts from that replica's history at its durable seq.
pub fn choose_leader(positions: &[Position]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, p) in positions.iter().enumerate() {
        if best.is_none_or(|b| *p > positions[b]) {
            best = Some(i);
        }
    }
    best
}

/// The epoch a new host takes: strictly above every epoch it saw.
pub fn next_epoch(seen: impl IntoIterator<Item = u64>) -> u64 {
    seen.into_iter().max().unwrap_or(0) + 1
}

/// What a replica at epoch `mine` does with a request to move to `asked`
/// (SetEpoch). Epochs are granted once: only a strictly greater one is
/// accepted, so two hosts can never both hold the same epoch on a
/// majority.
pub fn may_raise_epoch(mine: u64, asked: u64) -> bool {
    asked > mine
}

/// What a replica at epoch `mine` does with a session that says Hello at
/// `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloDecision {
    /// Same epoch: the session joins.
    Join,
    /// A newer host: persist its epoch first (fencing every older session),
    /// then join.
    Raise,
    /// An older host: refused.
    Stale,
}

/// See [`HelloDecision`].
pub fn hello_decision(mine: u64, hello: u64) -> HelloDecision {
    match hello.cmp(&mine) {
        std::cmp::Ordering::Equal => HelloDecision::Join,
        std::cmp::Ordering::Greater => HelloDecision::Raise,
        std::cmp::Ordering::Less => HelloDecision::Stale,
    }
}

/// What the store does with an incoming record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendDecision {
    /// The next seq of this history: append it.
    Append,
    /// Already appended (a retransmission of the same record): ignore.
    Duplicate,
    /// Its epoch is below the replica's: the host was fenced.
    Stale,
    /// Not the record this replica's history holds at that seq.
    Diverged,
    /// Not the next seq.
    Gap,
}

/// Decides an append of the record (`epoch`, `seq`), sent by a host of
/// `session_epoch`, to a store at epoch `store_epoch` that follows
/// `history` and has appended up to `last_seq`. The record's own epoch may
/// be older than the session's: a host re-sends history it branched from.
pub fn append_decision(
    history: &History,
    store_epoch: u64,
    last_seq: u64,
    session_epoch: u64,
    (epoch, seq): (u64, u64),
) -> AppendDecision {
    if session_epoch < store_epoch {
        return AppendDecision::Stale;
    }
    if history.epoch_at(seq) != Some(epoch) {
        return AppendDecision::Diverged;
    }
    if seq <= last_seq {
        return AppendDecision::Duplicate;
    }
    if seq != last_seq + 1 {
        return AppendDecision::Gap;
    }
    AppendDecision::Append
}

/// Whether a commit's durability may be acknowledged to a session of
/// `session_epoch` by a replica that has persisted `store_epoch`. Once a
/// higher epoch is persisted nothing is acknowledged to an older host,
/// not even records that were committing when the fence arrived.
pub fn may_ack(store_epoch: u64, session_epoch: u64) -> bool {
    session_epoch >= store_epoch
}

/// The durable seq a store publishes when a group commit through `through`
/// ends: none after any failure (a later batch must never publish past the
/// hole a failed one left), else `through`, which never goes down.
pub fn publish_durable(durable: u64, through: u64, commit_ok: bool, failed_before: bool) -> Option<u64> {
    if !commit_ok || failed_before {
        return None;
    }
    debug_assert!(through > durable, "durable seq never goes down ({durable} -> {through})");
    Some(through.max(durable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(steps: &[(u64, u64)]) -> History {
        History { steps: steps.iter().map(|&(epoch, branch_seq)| Step { epoch, branch_seq }).collect() }
    }

    #[test]
    fn epoch_at_and_position() {
        let x = h(&[(2, 0), (4, 10), (7, 25)]);
        assert_eq!(x.epoch_at(0), None);
        assert_eq!(x.epoch_at(1), Some(2));
        assert_eq!(x.epoch_at(10), Some(2));
        assert_eq!(x.epoch_at(11), Some(4));
        assert_eq!(x.epoch_at(26), Some(7));
        assert_eq!(x.position(12), Position { epoch: 4, seq: 12 });
        assert!(x.position(12) > h(&[(2, 0)]).position(100), "epoch orders first");
    }

    #[test]
    fn branch_cuts_steps_past_the_branch_point() {
        // Host 4 wrote 11..; host 5 branches from seq 8 of host 2's records.
        let x = h(&[(2, 0), (4, 10)]).branch(5, 8);
        assert_eq!(x, h(&[(2, 0), (5, 8)]));
    }

    #[test]
    fn the_issue_scenario_stale_tail_is_diverged() {
        // Host 2 wrote 1..=100; r3 alone took 101..=120 (never acked).
        // Host 3 branched at 100 from r1/r2 and wrote 101..=150.
        let r3 = h(&[(2, 0)]);
        let host = r3.branch(3, 100);
        assert_eq!(standing(&host, 150, &r3, 120), Standing::Diverged { after: 100 });
        assert_eq!(standing(&host, 150, &r3, 100), Standing::Prefix);
        assert_eq!(standing(&host, 150, &r3, 90), Standing::Prefix);
        // Seq alone would pick r3 (120 > 100); positions say otherwise
        // once host 3's history has a record.
        let positions = [r3.position(120), host.position(101)];
        assert_eq!(choose_leader(&positions), Some(1));
    }

    #[test]
    fn append_rules() {
        let x = h(&[(2, 0), (3, 5)]);
        assert_eq!(append_decision(&x, 3, 5, 3, (3, 6)), AppendDecision::Append);
        assert_eq!(append_decision(&x, 3, 6, 3, (3, 6)), AppendDecision::Duplicate);
        // Host 3 re-sends host 2's record 4 (quick recovery of a replica
        // behind its branch point): the record keeps epoch 2.
        assert_eq!(append_decision(&x, 3, 3, 3, (2, 4)), AppendDecision::Append);
        assert_eq!(append_decision(&x, 3, 6, 2, (2, 6)), AppendDecision::Stale);
        assert_eq!(append_decision(&x, 4, 6, 3, (3, 7)), AppendDecision::Stale);
        assert_eq!(append_decision(&x, 3, 6, 3, (3, 8)), AppendDecision::Gap);
        // A record of epoch 3 at seq 4 is not what this history holds.
        assert_eq!(append_decision(&x, 2, 3, 3, (3, 4)), AppendDecision::Diverged);
        assert_eq!(append_decision(&x, 3, 6, 3, (2, 6)), AppendDecision::Diverged);
    }

    #[test]
    fn epochs_are_granted_once() {
        assert!(may_raise_epoch(3, 4));
        assert!(!may_raise_epoch(4, 4));
        assert_eq!(hello_decision(4, 4), HelloDecision::Join);
        assert_eq!(hello_decision(4, 5), HelloDecision::Raise);
        assert_eq!(hello_decision(4, 3), HelloDecision::Stale);
        assert!(!may_ack(5, 4));
        assert!(may_ack(5, 5));
        assert_eq!(next_epoch([3, 7, 5]), 8);
    }

    #[test]
    fn decode_rejects_bad_input() {
        assert_eq!(History::decode(&[0; 15]), Err(HistoryError::BadLength(15)));
        assert_eq!(
            History::decode(&[0; STEP_BYTES * (HISTORY_STEPS_MAX + 1)]),
            Err(HistoryError::BadLength(STEP_BYTES * (HISTORY_STEPS_MAX + 1)))
        );
        let bad = h(&[(3, 0), (3, 1)]).encode();
        assert_eq!(History::decode(&bad), Err(HistoryError::OutOfOrder(1)));
        let ok = h(&[(2, 0), (3, 9)]);
        assert_eq!(History::decode(&ok.encode()), Ok(ok));
    }

    /// The record (its epoch) at each seq, listed explicitly.
    fn records(x: &History, last: u64) -> Vec<Option<u64>> {
        (1..=last).map(|s| x.epoch_at(s)).collect()
    }

    proptest! {
        /// common_prefix equals the longest prefix on which the explicit
        /// record lists agree, for histories built by branching.
        #[test]
        fn common_prefix_matches_explicit_records(
            ops in proptest::collection::vec((0usize..3, 0u64..40), 1..12),
            a_last in 0u64..60, b_last in 0u64..60,
        ) {
            // Build a family of histories by branching from earlier ones.
            let mut all = vec![History::new()];
            let mut epoch = 1;
            for (from, at) in ops {
                epoch += 1;
                let base = &all[from % all.len()];
                all.push(base.branch(epoch, at));
            }
            let (a, b) = (&all[all.len() - 1], &all[all.len() / 2]);
            let (ra, rb) = (records(a, a_last), records(b, b_last));
            // The last seq at which both hold the same record...
            let mut expect = 0;
            for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
                if x.is_some() && x == y { expect = i as u64 + 1 }
            }
            prop_assert_eq!(History::common_prefix(a, a_last, b, b_last), expect);
            // ...and below it they never disagree (log matching).
            for (x, y) in ra.iter().zip(&rb).take(expect as usize) {
                prop_assert!(x.is_none() || y.is_none() || x == y);
            }
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = History::decode(&b);
        }
    }
}
