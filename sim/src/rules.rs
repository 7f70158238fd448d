//! The decision rules the simulated nodes follow. By default every method
//! calls the production function in `starblk_replica::history`, so the
//! simulator checks the rules production runs.
//!
//! `--reintroduce N` swaps exactly one rule for a known-bad variant (the
//! defects of `docs/simulator.md`). The variants live here, in the
//! simulator, so reintroducing a defect never touches production code. Each
//! is the same edit the manual procedure makes to `replica/src/history.rs`,
//! so both give the same failing seeds.

use starblk_replica::history::{self, AppendDecision, HelloDecision, History, Position, Standing};

/// The defects `--reintroduce` can put back, by number.
pub const DEFECTS: [&str; 6] = [
    "standing() by seq only: Prefix whenever durable <= host_last",
    "may_raise_epoch accepts asked >= mine (an epoch granted twice)",
    "may_ack always true (acks after the fence)",
    "choose_leader by seq only (epoch ignored)",
    "publish_durable ignores failed_before (publishes past a failed batch)",
    "hello_decision joins a higher epoch without raising (older sessions not fenced)",
];

/// Which rules the nodes use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// A defect number (1..=6) to reintroduce, if any.
    pub defect: Option<u8>,
    /// Model a store whose `set_epoch` does not drain group commit first
    /// (a regression of `store.rs`, not of `history.rs`). With the drain,
    /// no commit is ever in flight when the epoch flips, so `may_ack` is
    /// never what stops an ack; without it, `may_ack` is.
    pub no_drain: bool,
}

impl Rules {
    fn is(&self, n: u8) -> bool {
        self.defect == Some(n)
    }

    /// See [`history::standing`].
    pub fn standing(&self, host: &History, host_last: u64, replica: &History, durable: u64) -> Standing {
        if self.is(1) && durable <= host_last {
            return Standing::Prefix;
        }
        history::standing(host, host_last, replica, durable)
    }

    /// See [`history::may_raise_epoch`].
    pub fn may_raise_epoch(&self, mine: u64, asked: u64) -> bool {
        if self.is(2) {
            return asked >= mine;
        }
        history::may_raise_epoch(mine, asked)
    }

    /// See [`history::may_ack`].
    pub fn may_ack(&self, store_epoch: u64, session_epoch: u64) -> bool {
        self.is(3) || history::may_ack(store_epoch, session_epoch)
    }

    /// See [`history::choose_leader`].
    pub fn choose_leader(&self, positions: &[Position]) -> Option<usize> {
        if self.is(4) {
            let seqs: Vec<Position> = positions.iter().map(|p| Position { epoch: 0, seq: p.seq }).collect();
            return history::choose_leader(&seqs);
        }
        history::choose_leader(positions)
    }

    /// See [`history::publish_durable`].
    pub fn publish_durable(&self, durable: u64, through: u64, commit_ok: bool, failed_before: bool) -> Option<u64> {
        if self.is(5) {
            return commit_ok.then_some(through.max(durable));
        }
        history::publish_durable(durable, through, commit_ok, failed_before)
    }

    /// See [`history::hello_decision`].
    pub fn hello_decision(&self, mine: u64, hello: u64) -> HelloDecision {
        match history::hello_decision(mine, hello) {
            HelloDecision::Raise if self.is(6) => HelloDecision::Join,
            d => d,
        }
    }

    /// See [`history::append_decision`]: the session's epoch decides
    /// staleness, the record keeps its own epoch (a host re-sends the
    /// history it branched from with the epochs it was written under).
    pub fn append_decision(
        &self,
        h: &History,
        store_epoch: u64,
        last_seq: u64,
        session_epoch: u64,
        record: (u64, u64),
    ) -> AppendDecision {
        history::append_decision(h, store_epoch, last_seq, session_epoch, record)
    }

    /// See [`history::next_epoch`].
    pub fn next_epoch(&self, seen: impl IntoIterator<Item = u64>) -> u64 {
        history::next_epoch(seen)
    }
}
