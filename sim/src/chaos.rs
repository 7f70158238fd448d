//! The workload and the faults. Each seed draws its own mix (swarm
//! testing): some seeds crash replicas often, some never; some take over
//! hosts every few milliseconds; some partition the newcomer from a
//! minority while it fences, so stale replicas come back later.

use starblk_replica::members::{Member, Membership};

use crate::members::ChangeKind;
use crate::model::Time;
use crate::rng::Rng;
use crate::world::{Event, World};

/// Replica slot `i` as a member of the set.
pub fn member(i: usize) -> Member {
    Member { name: format!("r{i}"), addr: format!("r{i}:1"), role: "near".into(), network_sync: false, fec: None }
}

/// The slot of the member called `name`.
pub fn slot_of(name: &str) -> Option<usize> {
    name.strip_prefix('r')?.parse().ok()
}

/// The set `volume create` stamps: replicas 0..n, version 1 at epoch 1.
pub fn initial_set(n: usize) -> Membership {
    Membership { epoch: 1, version: 1, members: (0..n).map(member).collect(), previous: Vec::new() }
}

/// The chaos actions, in the order of [`Params::weights`].
#[derive(Debug, Clone, Copy)]
enum Action {
    CrashReplica,
    BreakSession,
    PartitionReplica,
    PartitionHost,
    CrashHost,
    Takeover,
    DualTakeover,
    IsolatedTakeover,
    AddReplica,
    RemoveReplica,
}

const ACTIONS: [Action; 10] = [
    Action::CrashReplica,
    Action::BreakSession,
    Action::PartitionReplica,
    Action::PartitionHost,
    Action::CrashHost,
    Action::Takeover,
    Action::DualTakeover,
    Action::IsolatedTakeover,
    Action::AddReplica,
    Action::RemoveReplica,
];

/// Most hosts alive at once (fencing or running).
const HOSTS_ALIVE_MAX: usize = 3;
/// Most reads a host has outstanding.
const READS_MAX: usize = 4;

/// One seed's world and fault mix.
#[derive(Debug, Clone)]
pub struct Params {
    /// Replicas, and the quorum (always a majority).
    pub n: usize,
    pub quorum: usize,
    /// Blocks in the volume (few, so writes overlap and reads hit them).
    pub blocks: usize,
    /// Write queue capacity and most writes in flight per host.
    pub queue_cap: usize,
    pub max_inflight: u64,
    /// One-way network delay: a base plus jitter, µs.
    pub delay_base: Time,
    pub delay_jitter: Time,
    /// Group commit duration bounds, µs.
    pub commit_min: Time,
    pub commit_max: Time,
    /// Mean gaps between a host's writes and reads, and between faults, µs.
    pub write_gap: Time,
    /// Chance (per mille) that a write tick starts an idle spell.
    pub idle_per_mille: u64,
    pub read_gap: Time,
    pub chaos_gap: Time,
    /// Weights of the chaos actions (0: never).
    pub weights: [u64; 10],
    /// Replica slots beyond the first set, empty until added.
    pub spares: usize,
    /// Log records a replica keeps for replay.
    pub log_cap: usize,
    /// Live records a copying replica remembers (higher-seq-wins).
    pub recent_cap: usize,
    /// Regions copied between persisted cursors.
    pub persist_every: u64,
    /// Per-commit EIO chance (per mille) and how many disks may fail.
    pub eio_per_mille: u64,
    pub eio_budget: usize,
    /// Per-frame duplication chance (per mille) for writes and acks.
    pub dup_per_mille: u64,
    /// How long the chaos lasts, µs.
    pub run_us: Time,
}

impl Params {
    /// Draws a seed's parameters.
    pub fn draw(rng: &mut Rng) -> Params {
        let n = if rng.chance(500) { 3 } else { 5 };
        let quorum = match n {
            3 => 2 + rng.chance(200) as usize,
            _ => 3 + rng.chance(300) as usize,
        };
        let commit_min = rng.range(50, 300);
        let mut weights = [0; 10];
        for w in &mut weights {
            *w = if rng.chance(750) { rng.range(1, 10) } else { 0 };
        }
        let spares = rng.range(0, 2) as usize;
        let log_cap = if rng.chance(500) { rng.range(2, 24) } else { rng.range(24, 400) } as usize;
        let recent_cap = rng.range(1, 32) as usize;
        let persist_every = rng.range(1, 4);
        Params {
            n,
            quorum,
            blocks: rng.range(4, 16) as usize,
            queue_cap: rng.range(8, 48) as usize,
            max_inflight: rng.range(2, 12),
            delay_base: rng.range(20, 300),
            delay_jitter: rng.range(0, 600),
            commit_min,
            commit_max: commit_min + rng.range(0, 2_000),
            write_gap: rng.range(50, 600),
            idle_per_mille: rng.range(0, 150),
            read_gap: rng.range(100, 1_500),
            chaos_gap: rng.range(1_000, 10_000),
            weights,
            eio_per_mille: if rng.chance(500) { rng.range(1, 100) } else { 0 },
            eio_budget: n - (n / 2 + 1),
            dup_per_mille: if rng.chance(500) { rng.range(1, 50) } else { 0 },
            run_us: rng.range(300_000, 600_000),
            spares,
            log_cap,
            recent_cap,
            persist_every,
        }
    }

    /// Replica slots: the first set and the spares.
    pub fn slots(&self) -> usize {
        self.n + self.spares
    }

    /// One frame's delay; now and then a long one (a congested path).
    pub fn delay(&self, rng: &mut Rng) -> Time {
        let d = self.delay_base + rng.below(self.delay_jitter + 1);
        if rng.chance(20) {
            d * 10
        } else {
            d
        }
    }
}

/// A gap drawn around `mean` (half to one and a half times it).
fn around(rng: &mut Rng, mean: Time) -> Time {
    rng.range(mean / 2, mean + mean / 2).max(1)
}

impl World {
    /// The first host, and the first chaos tick.
    pub(crate) fn begin(&mut self) {
        self.spawn_host(false);
        let gap = around(&mut self.rng, self.p.chaos_gap);
        self.schedule(gap, Event::Chaos);
        self.schedule(self.p.run_us, Event::EndChaos);
    }

    /// A host's write workload: random blocks, with idle spells now and
    /// then (so replicas level, and takeovers find quiet moments too).
    pub(crate) fn write_tick(&mut self, host: usize) {
        if !self.hosts[host].is_alive() || !self.chaos_on {
            return;
        }
        if self.hosts[host].is_running() {
            let block = self.rng.below(self.p.blocks as u64) as u32;
            self.with_host(host, |h, ctx| {
                h.try_write(block, ctx);
            });
        }
        let mut gap = around(&mut self.rng, self.p.write_gap);
        if self.rng.chance(self.p.idle_per_mille) {
            gap += self.rng.range(2_000, 30_000);
        }
        self.schedule(self.now + gap, Event::WriteTick { host });
    }

    /// A host's reads; the floor is the checker's ghost state.
    pub(crate) fn read_tick(&mut self, host: usize) {
        if !self.hosts[host].is_alive() || !self.chaos_on {
            return;
        }
        let h = &self.hosts[host];
        if h.is_running() && h.pending_reads() < READS_MAX {
            let block = self.rng.below(self.p.blocks as u64) as u32;
            let floor = self.checker.floor(block, h.epoch);
            self.with_host(host, |h, ctx| h.read(block, floor, ctx));
        }
        let gap = around(&mut self.rng, self.p.read_gap);
        self.schedule(self.now + gap, Event::ReadTick { host });
    }

    /// One fault, drawn with the seed's weights.
    pub(crate) fn chaos(&mut self) {
        if !self.chaos_on {
            return;
        }
        if let Some(a) = self.rng.weighted(&self.p.weights) {
            self.act(ACTIONS[a]);
        }
        let gap = around(&mut self.rng, self.p.chaos_gap);
        self.schedule(self.now + gap, Event::Chaos);
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::CrashReplica => self.crash_some_replica(),
            Action::BreakSession => self.break_some_session(),
            Action::PartitionReplica => {
                let Some(r) = self.rng.index(self.p.n) else { return };
                self.cut(None, vec![r]);
            }
            Action::PartitionHost => {
                let Some(h) = self.pick_alive_host() else { return };
                let replicas = self.some_replicas(self.p.n - 1);
                self.cut(Some(h), replicas);
            }
            Action::CrashHost => {
                if let Some(h) = self.pick_alive_host() {
                    self.fault("host crash");
                    self.crash_host(h);
                }
            }
            Action::Takeover => self.takeover(1, false),
            Action::DualTakeover => self.takeover(2, false),
            Action::IsolatedTakeover => self.takeover(1, true),
            Action::AddReplica | Action::RemoveReplica => self.membership_change_of(matches!(a, Action::AddReplica)),
        }
    }

    /// The operator asks a running host to add a replica that is not a
    /// member (an empty spare, or one removed earlier) or to remove one.
    /// The operator keeps Q a majority of the set (adds stop at 2Q - 1
    /// members) unless `--grow-past-quorum`.
    fn membership_change_of(&mut self, add: bool) {
        let running: Vec<usize> = (0..self.hosts.len()).filter(|&h| self.hosts[h].is_running()).collect();
        let Some(k) = self.rng.index(running.len()) else { return };
        let h = running[k];
        let members: Vec<usize> = (0..self.p.slots()).filter(|&i| self.hosts[h].is_member(i)).collect();
        let pool: Vec<usize> = (0..self.p.slots()).filter(|&i| self.hosts[h].is_member(i) != add).collect();
        if add && 2 * self.p.quorum <= members.len() + 1 && !self.grow_past_quorum() {
            return;
        }
        let Some(j) = self.rng.index(pool.len()) else { return };
        let kind = if add { ChangeKind::Add(pool[j]) } else { ChangeKind::Remove(pool[j]) };
        self.fault(if add { "replica add" } else { "replica remove" });
        let mut res = Ok(());
        self.with_host(h, |host, ctx| res = host.change_members(kind, ctx));
        if let Err(why) = res {
            self.out.notes.entry(refusal_note(why)).and_modify(|n| *n += 1).or_insert(1);
        }
    }

    fn crash_some_replica(&mut self) {
        let up: Vec<usize> = (0..self.p.n).filter(|&i| self.replicas[i].up).collect();
        // Prefer a replica with a commit in flight: the torn-commit case.
        let committing: Vec<usize> = up.iter().copied().filter(|&i| self.replicas[i].is_committing()).collect();
        let pool = if !committing.is_empty() && self.rng.chance(500) { committing } else { up };
        let Some(k) = self.rng.index(pool.len()) else { return };
        let i = pool[k];
        self.crash_replica(i);
        let back = self.now + self.rng.range(500, 15_000);
        self.schedule(back, Event::RestartReplica { replica: i });
    }

    fn break_some_session(&mut self) {
        let open = self.net.open_sessions();
        if let Some(k) = self.rng.index(open.len()) {
            self.fault("session break");
            self.abort(open[k]);
        }
    }

    /// Cuts `host` (or every host) from `replicas` until it heals; the
    /// sessions across the cut break.
    fn cut(&mut self, host: Option<usize>, replicas: Vec<usize>) {
        if replicas.is_empty() {
            return;
        }
        self.fault("partition");
        let id = self.net.partition(host, replicas);
        for sid in self.net.open_sessions() {
            let s = &self.net.sessions[sid as usize];
            if self.net.is_cut(s.host, s.replica) {
                self.abort(sid);
            }
        }
        let heal = self.now + self.rng.range(500, 15_000);
        self.schedule(heal, Event::Heal { id });
    }

    /// 1..=max distinct random replicas.
    fn some_replicas(&mut self, max: usize) -> Vec<usize> {
        let k = self.rng.range(1, max.max(1) as u64) as usize;
        let mut all: Vec<usize> = (0..self.p.n).collect();
        let mut out = Vec::new();
        while out.len() < k {
            let Some(j) = self.rng.index(all.len()) else { break };
            out.push(all.swap_remove(j));
        }
        out
    }

    fn pick_alive_host(&mut self) -> Option<usize> {
        let alive: Vec<usize> = (0..self.hosts.len()).filter(|&h| self.hosts[h].is_alive()).collect();
        let k = self.rng.index(alive.len())?;
        Some(alive[k])
    }

    /// New hosts start while the old ones still run. `isolated`: the
    /// newcomer cannot reach a minority while it fences, so those replicas
    /// keep the old history's tail and come back to it later.
    fn takeover(&mut self, count: usize, isolated: bool) {
        let alive = self.hosts.iter().filter(|h| h.is_alive()).count();
        if alive + count > HOSTS_ALIVE_MAX {
            return;
        }
        self.fault(if count > 1 { "dual takeover" } else { "takeover" });
        for _ in 0..count {
            if isolated {
                let minority = self.some_replicas(self.p.n - (self.p.n / 2 + 1));
                let id = self.net.partition(Some(self.hosts.len()), minority);
                let heal = self.now + self.rng.range(2_000, 20_000);
                self.schedule(heal, Event::Heal { id });
            }
            self.spawn_host(false);
        }
    }
}

fn refusal_note(r: crate::members::Refused) -> &'static str {
    use crate::members::Refused;
    match r {
        Refused::Busy => "membership change refused: another in progress",
        Refused::NotApplicable => "membership change refused: not applicable",
        Refused::SmallerThanQuorum => "replica remove refused: fewer than Q members",
        Refused::BelowQuorum => "replica remove refused: fewer than Q up to date",
        Refused::NoMajority => "replica remove refused: no majority connected",
    }
}
