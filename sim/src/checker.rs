//! The checker: ghost state the nodes cannot see, and the properties a run
//! must keep. A violation names its property; the world adds the seed and
//! the step.

use std::collections::BTreeMap;
use std::fmt;

use starblk_replica::history::History;
use starblk_replica::members::Membership;

use crate::chaos::slot_of;
use crate::model::{Record, Time, WriteId};

/// The properties checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    /// 1. No completed write is lost.
    NoLostWrite,
    /// 2. Reads return the newest completed write or a newer one.
    ReadFresh,
    /// 3. Up-to-date replicas under the final host hold the same blocks.
    Converge,
    /// 4. A superseded host completes nothing on acks sent after the fence.
    FencedHostSilent,
    /// 5. Two hosts never hold the same epoch (docs/semantics.md §8).
    UniqueEpoch,
    /// 6. A replica refuses frames below an epoch it has served (§8).
    OlderFramesRefused,
    /// 7. A finished copy holds exactly the history up to its durable seq.
    CopyExact,
    /// 8. Copy progress never goes backwards and ends at 100%.
    ProgressForward,
    /// 9. No two different sets committed with one (epoch, version).
    MembersAgree,
    /// 10. A host fences with no set older than one committed before.
    NewestSetFound,
    /// 11. Only members of the set in effect count toward Q.
    RemovedNotCounted,
}

impl Property {
    /// Properties 1-4 are about data; 5-6 about the fencing protocol.
    pub fn is_data(self) -> bool {
        !matches!(self, Property::UniqueEpoch | Property::OlderFramesRefused)
    }

    /// Its number in `docs/simulator.md`.
    pub fn number(self) -> u8 {
        self as u8 + 1
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Property::NoLostWrite => "no acknowledged write lost",
            Property::ReadFresh => "reads see the latest completed write",
            Property::Converge => "up-to-date replicas converge",
            Property::FencedHostSilent => "superseded host completes nothing after the fence",
            Property::UniqueEpoch => "epochs are unique",
            Property::OlderFramesRefused => "replicas refuse older epochs",
            Property::CopyExact => "a finished copy holds exactly its history",
            Property::ProgressForward => "copy progress never goes backwards and ends at 100%",
            Property::MembersAgree => "committed replica sets never conflict",
            Property::NewestSetFound => "a host fences the newest committed set",
            Property::RemovedNotCounted => "a removed replica never counts toward Q",
        };
        write!(f, "P{} ({name})", self.number())
    }
}

/// A broken property and what broke it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which.
    pub property: Property,
    /// What happened.
    pub message: String,
}

/// What the checker remembers.
#[derive(Debug, Default)]
pub struct Checker {
    /// Every write issued: its block.
    blocks_of: BTreeMap<WriteId, u32>,
    /// Completed writes, per block.
    completed: Vec<Vec<WriteId>>,
    /// Epoch -> host that fenced with it.
    epochs: BTreeMap<u64, usize>,
    /// Per replica: the highest epoch of a session it joined.
    served: Vec<u64>,
    /// Whether properties 5 and 6 are checked.
    protocol_checks: bool,
    /// Every write by its history position (epoch, seq).
    by_pos: BTreeMap<(u64, u64), (WriteId, u32)>,
    /// Per (host, replica, meter): the last view (fraction, done bytes).
    progress: BTreeMap<(usize, usize, u64), (f64, u64)>,
    /// Committed sets by (epoch, version), with when they took effect.
    committed: BTreeMap<(u64, u64), (Membership, Time)>,
    /// Per host, the slots of the set in effect.
    sets: BTreeMap<usize, Vec<usize>>,
}

impl Checker {
    /// A checker for `blocks` blocks and `replicas` replicas.
    pub fn new(blocks: usize, replicas: usize, protocol_checks: bool) -> Checker {
        Checker {
            blocks_of: BTreeMap::new(),
            completed: vec![Vec::new(); blocks],
            epochs: BTreeMap::new(),
            served: vec![0; replicas],
            protocol_checks,
            by_pos: BTreeMap::new(),
            progress: BTreeMap::new(),
            committed: BTreeMap::new(),
            sets: BTreeMap::new(),
        }
    }

    /// A write was issued.
    pub fn issued(&mut self, r: Record) {
        self.blocks_of.insert(r.id, r.block);
        self.by_pos.entry((r.id.epoch, r.id.seq)).or_insert((r.id, r.block));
    }

    /// What every block holds after the writes of `history` up to `seq`.
    pub fn state_at(&self, history: &History, seq: u64, blocks: usize) -> Vec<Option<WriteId>> {
        let mut out = vec![None; blocks];
        for s in 1..=seq {
            let Some(e) = history.epoch_at(s) else { continue };
            if let Some(&(id, b)) = self.by_pos.get(&(e, s)) {
                if let Some(v) = out.get_mut(b as usize) {
                    *v = Some(id);
                }
            }
        }
        out
    }

    /// Property 7: `replica` ended a copy claiming `durable` of `history`.
    pub fn copy_finished(
        &self,
        replica: usize,
        durable: u64,
        history: &History,
        data: &[Option<WriteId>],
    ) -> Result<(), Violation> {
        let want = self.state_at(history, durable, data.len());
        match (0..data.len()).find(|&b| data[b] != want[b]) {
            None => Ok(()),
            Some(b) => Err(Violation {
                property: Property::CopyExact,
                message: format!(
                    "replica {replica} ended its copy at durable {durable} with block {b} = {}, but its history \
                     holds {} there",
                    show(data[b]),
                    show(want[b])
                ),
            }),
        }
    }

    /// Property 8: a host's progress view of a copy to `replica`.
    #[allow(clippy::too_many_arguments)]
    pub fn progress(
        &mut self,
        host: usize,
        replica: usize,
        meter: u64,
        fraction: f64,
        done: u64,
        total: u64,
        finished: bool,
    ) -> Result<(), Violation> {
        let prev = self.progress.insert((host, replica, meter), (fraction, done)).unwrap_or((0.0, 0));
        let bad = if fraction < prev.0 || done < prev.1 {
            Some(format!("went from {:.3} ({} bytes) back to {fraction:.3} ({done} bytes)", prev.0, prev.1))
        } else if !(0.0..=1.0).contains(&fraction) || done > total {
            Some(format!("shows {fraction:.3}, {done} of {total} bytes"))
        } else if finished && (fraction != 1.0 || done != total) {
            Some(format!("ended at {fraction:.3}, {done} of {total} bytes"))
        } else {
            None
        };
        match bad {
            None => Ok(()),
            Some(what) => Err(Violation {
                property: Property::ProgressForward,
                message: format!("host {host}'s progress of the copy to replica {replica} {what}"),
            }),
        }
    }

    /// Properties 9 and 11: `host` put `set` in effect at `now`.
    pub fn members_in_effect(
        &mut self,
        host: usize,
        set: Membership,
        committed: bool,
        now: Time,
    ) -> Result<(), Violation> {
        self.sets.insert(host, set.members.iter().filter_map(|m| slot_of(&m.name)).collect());
        if !committed {
            return Ok(());
        }
        let order = set.order();
        match self.committed.get(&order) {
            Some((other, _)) if other.members != set.members => Err(Violation {
                property: Property::MembersAgree,
                message: format!(
                    "two sets committed as (epoch, version) {order:?}: {:?} and {:?}",
                    names(other),
                    names(&set)
                ),
            }),
            Some(_) => Ok(()),
            None => {
                self.committed.insert(order, (set, now));
                Ok(())
            }
        }
    }

    /// Property 10: `host` fenced with `set`, having started at `started`.
    pub fn fenced_set(&mut self, host: usize, set: &Membership, started: Time) -> Result<(), Violation> {
        self.sets.insert(host, set.members.iter().filter_map(|m| slot_of(&m.name)).collect());
        let newest =
            self.committed.iter().filter(|(_, (_, t))| *t < started).map(|(o, (m, _))| (*o, m)).max_by_key(|x| x.0);
        match newest {
            Some((o, m)) if set.order() < o => Err(Violation {
                property: Property::NewestSetFound,
                message: format!(
                    "host {host} fenced with set {:?} {:?}, but set {o:?} {:?} was committed before it started",
                    set.order(),
                    names(set),
                    names(m)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Property 11: the replicas whose durable seqs completed `id`.
    pub fn counted(&self, host: usize, id: WriteId, counted: &[usize]) -> Result<(), Violation> {
        let Some(set) = self.sets.get(&host) else { return Ok(()) };
        match counted.iter().find(|r| !set.contains(r)) {
            None => Ok(()),
            Some(r) => Err(Violation {
                property: Property::RemovedNotCounted,
                message: format!("host {host} counted replica {r}, not a member of its set {set:?}, for {id}"),
            }),
        }
    }

    /// The newest completed write to `block` among epochs up to `epoch`
    /// (what a host of `epoch` must not read behind).
    pub fn floor(&self, block: u32, epoch: u64) -> Option<WriteId> {
        self.completed[block as usize].iter().filter(|w| w.epoch <= epoch).max().copied()
    }

    /// A host completed `id`. Property 4: if a majority had persisted an
    /// epoch above the host's, the completion must rest on Q reports sent
    /// before those replicas were fenced.
    pub fn completed(
        &mut self,
        id: WriteId,
        clean_support: usize,
        quorum: usize,
        fenced_majority: Option<u64>,
    ) -> Result<(), Violation> {
        if let Some(b) = self.blocks_of.get(&id) {
            self.completed[*b as usize].push(id);
        }
        match fenced_majority {
            Some(e) if clean_support < quorum => Err(Violation {
                property: Property::FencedHostSilent,
                message: format!(
                    "host {} (epoch {}) completed seq {} after epoch {e} was persisted on a majority; only {clean_support} \
                     of the {quorum} acks it needed were sent before their replica was fenced",
                    id.host, id.epoch, id.seq
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Property 2 for a read of `block` that returned `value`.
    pub fn read(
        &self,
        host: usize,
        block: u32,
        value: Option<WriteId>,
        floor: Option<WriteId>,
    ) -> Result<(), Violation> {
        if let Some(v) = value {
            if self.blocks_of.get(&v) != Some(&block) {
                let message = format!("host {host} read {v} from block {block}, which that write never touched");
                return Err(Violation { property: Property::ReadFresh, message });
            }
        }
        match (floor, value) {
            (Some(f), v) if v.is_none_or(|v| v < f) => Err(Violation {
                property: Property::ReadFresh,
                message: format!("host {host} read block {block} = {} but {f} had completed before the read", show(v)),
            }),
            _ => Ok(()),
        }
    }

    /// Property 5: a host fenced with `epoch`.
    pub fn fenced(&mut self, host: usize, epoch: u64) -> Result<(), Violation> {
        match self.epochs.insert(epoch, host) {
            Some(other) if self.protocol_checks => Err(Violation {
                property: Property::UniqueEpoch,
                message: format!("hosts {other} and {host} both fenced a majority with epoch {epoch}"),
            }),
            _ => Ok(()),
        }
    }

    /// A replica joined a session of `epoch`.
    pub fn joined(&mut self, replica: usize, epoch: u64) {
        self.served[replica] = self.served[replica].max(epoch);
    }

    /// Property 6: a replica accepted a frame of a session of `epoch`.
    pub fn accepted(&self, replica: usize, epoch: u64) -> Result<(), Violation> {
        let served = self.served[replica];
        if self.protocol_checks && epoch < served {
            let message = format!("replica {replica} accepted a frame of epoch {epoch} after serving epoch {served}");
            return Err(Violation { property: Property::OlderFramesRefused, message });
        }
        Ok(())
    }

    /// Properties 1 and 3 on the data of the replicas up to date under
    /// the final host, `(replica, data)`.
    pub fn final_state(&self, replicas: &[(usize, &[Option<WriteId>])]) -> Result<(), Violation> {
        for (r, data) in replicas {
            self.no_lost_write(*r, data)?;
        }
        let Some((r0, d0)) = replicas.first() else { return Ok(()) };
        for (r, d) in &replicas[1..] {
            if let Some(b) = (0..d0.len()).find(|&b| d0[b] != d[b]) {
                let message = format!(
                    "replicas {r0} and {r} are both up to date but block {b} holds {} and {}",
                    show(d0[b]),
                    show(d[b])
                );
                return Err(Violation { property: Property::Converge, message });
            }
        }
        Ok(())
    }

    /// Each block holds its newest completed write, or a newer write.
    fn no_lost_write(&self, replica: usize, data: &[Option<WriteId>]) -> Result<(), Violation> {
        for (b, done) in self.completed.iter().enumerate() {
            let Some(newest) = done.iter().max() else { continue };
            let v = data.get(b).copied().flatten();
            if v.is_none_or(|v| v < *newest) {
                let message =
                    format!("completed {newest} to block {b} is lost: final replica {replica} holds {} there", show(v));
                return Err(Violation { property: Property::NoLostWrite, message });
            }
        }
        Ok(())
    }

    /// Writes completed so far.
    pub fn completed_count(&self) -> usize {
        self.completed.iter().map(Vec::len).sum()
    }
}

fn show(v: Option<WriteId>) -> String {
    v.map_or_else(|| "nothing".to_string(), |w| w.to_string())
}

fn names(m: &Membership) -> Vec<&str> {
    m.members.iter().map(|m| m.name.as_str()).collect()
}
