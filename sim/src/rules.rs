//! The decision rules the simulated nodes follow. By default every method
//! calls the production function in `starblk_replica::history`, so the
//! simulator checks the rules production runs.
//!
//! `--reintroduce N` swaps exactly one rule for a known-bad variant (the
//! defects of `docs/simulator.md`). The variants live here, in the
//! simulator, so reintroducing a defect never touches production code. Each
//! is the same edit the manual procedure makes to `replica/src/history.rs`,
//! so both give the same failing seeds.

use starblk_recovery::{LagReason, Peer, Plan, Queue, Returning};
use starblk_replica::history::{self, AppendDecision, HelloDecision, History, Position, Standing};
use starblk_replica::members::{self, MembersRefusal, Membership};
use starblk_replica::store::{self, CopySetup};
use starblk_replica::superblock::{CopyKind, CopyState};

/// The defects `--reintroduce` can put back, by number.
pub const DEFECTS: [&str; 14] = [
    "standing() by seq only: Prefix whenever durable <= host_last",
    "may_raise_epoch accepts asked >= mine (an epoch granted twice)",
    "may_ack always true (acks after the fence)",
    "choose_leader by seq only (epoch ignored)",
    "publish_durable ignores failed_before (publishes past a failed batch)",
    "hello_decision joins a higher epoch without raising (older sessions not fenced)",
    "a copied region overwrites newer live writes (higher seq does not win)",
    "a copying replica claims and acks its live writes, and the host promotes it before its copy is done",
    "a membership change commits on a majority of the new set only (benign for one-member changes)",
    "a membership change commits once any one member of the new set stored it (--force without cause)",
    "a resumed copy goes on at its cursor without re-copying regions written meanwhile",
    "admit keeps a diverged replica's own durable seq (link.rs before the simulator found it)",
    "a fencing host needs a majority of the newest stored set only, not of the set it replaced (startup.rs before seed 5969)",
    "CopyDone reports a durable seq to a host the replica was fenced from (server.rs before seed 9035)",
];

/// Which rules the nodes use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// A defect number (1..=14) to reintroduce, if any.
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

    /// Defect 14: CopyDone is sent without the `may_ack` check.
    pub fn copy_done_unchecked(&self) -> bool {
        self.is(14)
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

    /// `Store::apply_copy_region`: live writes newer than the copy's
    /// as-of seq are kept (the higher seq wins). Defect 7 overwrites them.
    pub fn copy_keeps_newer_live_writes(&self) -> bool {
        !self.is(7)
    }

    /// `Shared::advance`: a recovering link is promoted once it has every
    /// completed write and no copy runs. Defect 8 forgets the copy (and
    /// the store acks live writes during a copy, see `acks_during_copy`).
    pub fn promotes(&self, durable: u64, completed: u64, copying: bool) -> bool {
        durable >= completed && (!copying || self.is(8))
    }

    /// `Store::commit`: a copying replica neither publishes nor acks its
    /// live writes until the copy ends. Defect 8 does.
    pub fn acks_during_copy(&self) -> bool {
        self.is(8)
    }

    /// The sets a fencing host needs a majority of (`startup::fence`):
    /// the newest stored set and the set it replaced. Defect 13 drops the
    /// second.
    pub fn fence_sets<'a>(&self, set: &'a Membership) -> Vec<&'a Vec<starblk_replica::members::Member>> {
        if self.is(13) || set.previous.is_empty() {
            return vec![&set.members];
        }
        vec![&set.members, &set.previous]
    }

    /// See [`Membership::change_committed`]; defect 9 counts the new set
    /// only, defect 10 takes any one member of the new set.
    pub fn change_committed(&self, old: &Membership, next: &Membership, persisted: &[String]) -> bool {
        let count = |s: &Membership| s.members.iter().filter(|m| persisted.contains(&m.name)).count();
        if self.is(9) {
            return count(next) >= members::majority(next.members.len());
        }
        if self.is(10) {
            return count(next) >= 1;
        }
        old.change_committed(next, persisted)
    }

    /// See [`members::accept_members`].
    pub fn accept_members(
        &self,
        stored: &Membership,
        store_epoch: u64,
        session_epoch: u64,
        next: &Membership,
    ) -> Result<bool, MembersRefusal> {
        members::accept_members(stored, store_epoch, session_epoch, next)
    }

    /// See [`starblk_recovery::plan`].
    pub fn plan(&self, r: &Returning, q: &Queue, peers: &[Peer]) -> Result<Plan, LagReason> {
        starblk_recovery::plan(r, q, peers)
    }

    /// See [`store::copy_setup`]. Defect 11 keeps a resumed plan and its
    /// cursor when the host goes on past where the replica's log ends.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_setup(
        &self,
        prev: Option<&CopyState>,
        host: &History,
        host_last: u64,
        follows: &History,
        last: u64,
        live_from: u64,
        kind: CopyKind,
        regions: u64,
    ) -> CopySetup {
        let setup = store::copy_setup(prev, host, host_last, follows, last, live_from, kind, regions);
        match (setup, prev) {
            (CopySetup::Begin { keep, .. }, Some(p)) if self.is(11) => {
                CopySetup::Begin { state: CopyState { live_from, ..p.clone() }, keep }
            }
            (s, _) => s,
        }
    }

    /// `link::admit`: the durable seq the host keeps for a replica it
    /// admits; a diverged one holds the host's history only up to `after`.
    /// Defect 12 keeps its own durable seq.
    pub fn admitted_durable(&self, standing: Standing, durable: u64) -> u64 {
        match standing {
            Standing::Diverged { after } if !self.is(12) => after.min(durable),
            _ => durable,
        }
    }

    /// See [`history::next_epoch`].
    pub fn next_epoch(&self, seen: impl IntoIterator<Item = u64>) -> u64 {
        history::next_epoch(seen)
    }
}
