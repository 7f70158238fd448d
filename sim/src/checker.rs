//! The checker: ghost state the nodes cannot see, and the properties a run
//! must keep. A violation names its property; the world adds the seed and
//! the step.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{Record, WriteId};

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
}

impl Property {
    /// Properties 1-4 are about data; 5-6 about the fencing protocol.
    pub fn is_data(self) -> bool {
        matches!(self, Property::NoLostWrite | Property::ReadFresh | Property::Converge | Property::FencedHostSilent)
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
        }
    }

    /// A write was issued.
    pub fn issued(&mut self, r: Record) {
        self.blocks_of.insert(r.id, r.block);
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
