//! A simulated host element: the engine of `src/engine/mod.rs` and the
//! links of `src/engine/link.rs`, reduced to their decisions: sequencing,
//! the bounded write queue, admission by standing, retransmission from the
//! queue, Q-of-N completion in seq order, and read routing. Fencing (the
//! startup) is in `fence.rs`.

use std::collections::{BTreeMap, VecDeque};

use starblk_replica::history::{History, Standing};

use crate::fence::Fence;
use crate::model::{Ctx, Effect, HostTimer, Msg, Record, Refusal, ReplicaInfo, Sid, Time, WriteId};

/// Heartbeat period (production: 100 ms; scaled down with everything else).
const HEARTBEAT_US: Time = 1_000;
/// Reconnect backoff bounds.
const BACKOFF_MIN_US: Time = 300;
const BACKOFF_MAX_US: Time = 10_000;

/// What a host is given.
#[derive(Debug, Clone)]
pub struct HostParams {
    /// Replicas in the set.
    pub n: usize,
    /// Durable acks a write needs.
    pub quorum: usize,
    /// Blocks in the volume.
    pub blocks: usize,
    /// Write-queue capacity, in writes.
    pub queue_cap: usize,
    /// Most writes issued and not completed.
    pub max_inflight: u64,
    /// RTT to each replica (read routing prefers the lowest).
    pub rtt: Vec<Time>,
    /// The final host of a run: it fences and levels, and writes nothing.
    pub final_host: bool,
}

/// A replica as the host sees it (`LinkState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Has every completed write; counts toward Q and serves reads.
    UpToDate,
    /// Connected and catching up from the write queue.
    Recovering,
    /// Missing writes the queue no longer holds, or holding another
    /// history's records: needs a recovery the simulator does not model.
    Lagging,
    /// Not connected.
    Failed,
}

impl LinkState {
    fn is_connected(self) -> bool {
        matches!(self, LinkState::UpToDate | LinkState::Recovering)
    }
}

/// One replica link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub state: LinkState,
    pub durable: u64,
    /// Highest durable seq reported by the replica before it persisted an
    /// epoch above this host's (ghost state for property 4).
    pub clean_durable: u64,
    next_send: u64,
    session: Option<Sid>,
    /// Waiting for HelloOk on `session`.
    greeting: bool,
    backoff: Time,
    reconnect_armed: bool,
}

impl Link {
    pub fn new(durable: u64) -> Link {
        Link {
            state: LinkState::Failed,
            durable,
            clean_durable: durable,
            next_send: durable + 1,
            session: None,
            greeting: false,
            backoff: BACKOFF_MIN_US,
            reconnect_armed: false,
        }
    }
}

/// A write in the queue; `mine` until it completes if this host issued it
/// (seeded history from the leader's log is not).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub rec: Record,
    pub mine: bool,
}

/// A read waiting for, or sent to, a replica.
#[derive(Debug, Clone, Copy)]
struct PendingRead {
    req: u64,
    block: u32,
    /// Replicas tried (bitmask).
    tried: u64,
    /// Seq the serving replica must have durable.
    need_seq: u64,
    /// Ghost: newest completed write to the block when issued.
    floor: Option<WriteId>,
    /// The link it was sent on.
    on: Option<usize>,
}

/// Where a host is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Probing, raising the epoch, seeding.
    Fencing,
    /// Serving.
    Running,
    /// Crashed, or the fence failed.
    Dead,
}

/// One host.
#[derive(Debug)]
pub struct Host {
    /// Index among all hosts of the run (its id in write values).
    pub idx: usize,
    /// Settings.
    pub params: HostParams,
    /// Life phase.
    pub phase: Phase,
    /// Epoch (0 until fenced).
    pub epoch: u64,
    /// The history this host writes.
    pub history: History,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Every write <= this has completed.
    pub completed_seq: u64,
    /// Why it stopped, for the trace.
    pub why_dead: String,
    pub(crate) queue: VecDeque<Entry>,
    pub(crate) links: Vec<Link>,
    pub(crate) fence: Option<Fence>,
    region_seq: Vec<u64>,
    reads: BTreeMap<u64, PendingRead>,
    deferred: Vec<PendingRead>,
    next_req: u64,
}

impl Host {
    /// A host about to fence.
    pub fn new(idx: usize, params: HostParams) -> Host {
        let (n, blocks) = (params.n, params.blocks);
        Host {
            idx,
            params,
            phase: Phase::Fencing,
            epoch: 0,
            history: History::new(),
            next_seq: 1,
            completed_seq: 0,
            why_dead: String::new(),
            queue: VecDeque::new(),
            links: (0..n).map(|_| Link::new(0)).collect(),
            fence: None,
            region_seq: vec![0; blocks],
            reads: BTreeMap::new(),
            deferred: Vec::new(),
            next_req: 1,
        }
    }

    /// Whether it serves I/O.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Whether it is alive (fencing or running).
    pub fn is_alive(&self) -> bool {
        self.phase != Phase::Dead
    }

    /// Replicas this host counts as up to date.
    pub fn up_to_date(&self) -> Vec<usize> {
        (0..self.links.len()).filter(|&i| self.links[i].state == LinkState::UpToDate).collect()
    }

    /// Link states, for the trace.
    pub fn link_states(&self) -> Vec<LinkState> {
        self.links.iter().map(|l| l.state).collect()
    }

    /// Reads in flight or deferred.
    pub fn pending_reads(&self) -> usize {
        self.reads.len() + self.deferred.len()
    }

    /// Crash: the host stops; returns every session it had open.
    pub fn crash(&mut self) -> Vec<Sid> {
        self.phase = Phase::Dead;
        self.why_dead = "crashed".into();
        let mut sids: Vec<Sid> = self.links.iter_mut().filter_map(|l| l.session.take()).collect();
        if let Some(f) = self.fence.take() {
            sids.extend(f.ctrl.iter().flatten());
        }
        sids
    }

    /// A frame arrived on `sid`.
    pub fn on_msg(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        if self.phase == Phase::Fencing {
            return self.on_fence_msg(sid, msg, ctx);
        }
        let Some(i) = self.link_of(sid) else { return };
        match msg {
            Msg::Info(info) if self.links[i].greeting => self.admit(i, info, ctx),
            Msg::Durable { seq, sender_epoch } => self.on_durable(i, seq, sender_epoch, ctx),
            Msg::ReadReply { req, value } => self.on_read_reply(i, req, value, ctx),
            Msg::Refused(Refusal::Diverged) => {
                // Lagging, never failed: a reconnect would only diverge again.
                self.links[i].state = LinkState::Lagging;
                self.advance(ctx);
            }
            _ => {}
        }
    }

    /// Session `sid` ended.
    pub fn on_closed(&mut self, sid: Sid, ctx: &mut Ctx) {
        if self.phase == Phase::Fencing {
            return self.on_fence_closed(sid, ctx);
        }
        if let Some(i) = self.link_of(sid) {
            self.links[i].session = None;
            self.mark_failed(i, ctx);
        }
    }

    /// A timer fired.
    pub fn on_timer(&mut self, t: HostTimer, ctx: &mut Ctx) {
        match t {
            HostTimer::FenceStage(stage) => self.on_fence_timeout(stage, ctx),
            HostTimer::Reconnect(i) if self.is_running() => {
                self.links[i].reconnect_armed = false;
                if self.links[i].session.is_none() {
                    self.connect(i, ctx);
                }
            }
            HostTimer::Heartbeat if self.is_running() => self.heartbeat(ctx),
            _ => {}
        }
    }

    fn link_of(&self, sid: Sid) -> Option<usize> {
        self.links.iter().position(|l| l.session == Some(sid))
    }

    /// Starts serving after the fence: links to every replica.
    pub(crate) fn start_links(&mut self, ctx: &mut Ctx) {
        for i in 0..self.links.len() {
            self.connect(i, ctx);
        }
        ctx.effects.push(Effect::Timer { host: self.idx, at: ctx.now + HEARTBEAT_US, timer: HostTimer::Heartbeat });
    }

    fn connect(&mut self, i: usize, ctx: &mut Ctx) {
        let sid = ctx.open(self.idx, i);
        ctx.send(sid, true, Msg::Hello(self.epoch));
        let l = &mut self.links[i];
        l.session = Some(sid);
        l.greeting = true;
    }

    fn heartbeat(&mut self, ctx: &mut Ctx) {
        for l in self.links.iter().filter(|l| !l.greeting && l.state.is_connected()) {
            if let Some(sid) = l.session {
                ctx.send(sid, true, Msg::Heartbeat);
            }
        }
        ctx.effects.push(Effect::Timer { host: self.idx, at: ctx.now + HEARTBEAT_US, timer: HostTimer::Heartbeat });
    }

    /// `link::admit`: only a replica whose log is a prefix of this host's
    /// history joins; then Adopt goes first and the queue follows.
    fn admit(&mut self, i: usize, info: ReplicaInfo, ctx: &mut Ctx) {
        let d = info.durable;
        let first = self.queue.front().map_or(self.next_seq, |e| e.rec.id.seq);
        let last = self.next_seq - 1;
        let l = &mut self.links[i];
        l.greeting = false;
        l.durable = d;
        l.clean_durable = if info.epoch <= self.epoch { d } else { l.clean_durable.min(d) };
        let standing = ctx.rules.standing(&self.history, last, &info.history, d);
        if let Standing::Diverged { after } = standing {
            ctx.trace(|| format!("host {} link {i}: diverged after seq {after} (durable {d}); lagging", self.idx));
            return self.lag_and_cut(i, ctx);
        }
        if d + 1 < first {
            ctx.trace(|| {
                format!("host {} link {i}: needs {}..{} which left the queue; lagging", self.idx, d + 1, first)
            });
            return self.lag_and_cut(i, ctx);
        }
        let l = &mut self.links[i];
        let Some(sid) = l.session else { return };
        l.state = LinkState::Recovering;
        l.next_send = d + 1;
        l.backoff = BACKOFF_MIN_US;
        ctx.send(sid, true, Msg::Adopt { history: self.history.clone(), last });
        self.pump(i, ctx);
        self.advance(ctx);
    }

    /// Lagging, and the session ends; the manager keeps retrying.
    fn lag_and_cut(&mut self, i: usize, ctx: &mut Ctx) {
        self.links[i].state = LinkState::Lagging;
        self.cut(i, ctx);
        self.advance(ctx);
    }

    /// Ends link `i`'s session from this side and schedules a reconnect.
    fn cut(&mut self, i: usize, ctx: &mut Ctx) {
        if let Some(sid) = self.links[i].session.take() {
            ctx.effects.push(Effect::Close { sid, by_replica: false });
        }
        self.links[i].greeting = false;
        self.reroute_reads_of(i, ctx);
        self.arm_reconnect(i, ctx);
    }

    /// `link::mark_failed`: Failed unless Lagging (which says more).
    fn mark_failed(&mut self, i: usize, ctx: &mut Ctx) {
        let l = &mut self.links[i];
        l.greeting = false;
        if l.state.is_connected() {
            l.state = LinkState::Failed;
        }
        self.reroute_reads_of(i, ctx);
        self.arm_reconnect(i, ctx);
        self.advance(ctx);
    }

    fn arm_reconnect(&mut self, i: usize, ctx: &mut Ctx) {
        let running = self.is_running();
        let l = &mut self.links[i];
        if l.reconnect_armed || !running {
            return;
        }
        l.reconnect_armed = true;
        let at = ctx.now + l.backoff;
        l.backoff = (l.backoff * 2).min(BACKOFF_MAX_US);
        ctx.effects.push(Effect::Timer { host: self.idx, at, timer: HostTimer::Reconnect(i) });
    }

    /// Streams queued writes the link has not been sent (the sender loop).
    fn pump(&mut self, i: usize, ctx: &mut Ctx) {
        let first = self.queue.front().map_or(self.next_seq, |e| e.rec.id.seq);
        let l = &self.links[i];
        let Some(sid) = l.session.filter(|_| !l.greeting && l.state.is_connected()) else { return };
        if l.next_send < first {
            return self.lag_and_cut(i, ctx);
        }
        for e in self.queue.range((l.next_send - first) as usize..) {
            ctx.send(sid, true, Msg::Write(e.rec));
        }
        self.links[i].next_send = self.next_seq;
    }

    /// `Shared::on_durable`.
    fn on_durable(&mut self, i: usize, seq: u64, sender_epoch: u64, ctx: &mut Ctx) {
        let l = &mut self.links[i];
        if sender_epoch <= self.epoch {
            l.clean_durable = l.clean_durable.max(seq);
        }
        if seq <= l.durable && l.state != LinkState::Recovering {
            return;
        }
        l.durable = l.durable.max(seq);
        self.advance(ctx);
    }

    /// `Shared::advance`: link states, the quorum seq, completions in seq
    /// order, deferred reads.
    fn advance(&mut self, ctx: &mut Ctx) {
        let completed = self.completed_seq;
        for l in self.links.iter_mut() {
            if l.state == LinkState::Recovering && l.durable >= completed {
                l.state = LinkState::UpToDate;
            }
        }
        let mut durable: Vec<u64> =
            self.links.iter().filter(|l| l.state == LinkState::UpToDate).map(|l| l.durable).collect();
        let q = self.params.quorum;
        if durable.len() >= q {
            durable.sort_unstable_by(|a, b| b.cmp(a));
            let quorum_seq = durable[q - 1].min(self.next_seq - 1);
            if quorum_seq > self.completed_seq {
                self.complete_through(quorum_seq, ctx);
            }
        }
        self.retry_deferred(ctx);
    }

    fn complete_through(&mut self, seq: u64, ctx: &mut Ctx) {
        let first = self.queue.front().map_or(self.next_seq, |e| e.rec.id.seq);
        let start = (self.completed_seq + 1).saturating_sub(first) as usize;
        let end = ((seq + 1).saturating_sub(first) as usize).min(self.queue.len());
        for k in start..end {
            let e = &mut self.queue[k];
            if std::mem::take(&mut e.mine) {
                let id = e.rec.id;
                let clean_support =
                    self.links.iter().filter(|l| l.state == LinkState::UpToDate && l.clean_durable >= id.seq).count();
                ctx.effects.push(Effect::Completed { host: self.idx, id, clean_support });
            }
        }
        self.completed_seq = seq;
    }

    /// Issues a write of `block` unless backpressure holds it back.
    pub fn try_write(&mut self, block: u32, ctx: &mut Ctx) -> bool {
        let inflight = self.next_seq - 1 - self.completed_seq;
        if !self.is_running() || self.params.final_host || inflight >= self.params.max_inflight || !self.evict(ctx) {
            return false;
        }
        let id = WriteId { epoch: self.epoch, seq: self.next_seq, host: self.idx as u32 };
        let rec = Record { id, block };
        self.next_seq += 1;
        self.queue.push_back(Entry { rec, mine: true });
        self.region_seq[block as usize] = id.seq;
        ctx.effects.push(Effect::Issued { record: rec });
        for i in 0..self.links.len() {
            self.pump(i, ctx);
        }
        true
    }

    /// `Shared::evict`: drops completed writes from the front until one
    /// more fits; a link that still needed one falls out of the window.
    fn evict(&mut self, ctx: &mut Ctx) -> bool {
        while self.queue.len() >= self.params.queue_cap {
            let Some(front) = self.queue.front().filter(|e| e.rec.id.seq <= self.completed_seq) else {
                return false;
            };
            let seq = front.rec.id.seq;
            self.queue.pop_front();
            for i in 0..self.links.len() {
                let l = &self.links[i];
                if l.state.is_connected() && l.next_send <= seq {
                    ctx.trace(|| format!("host {} link {i} fell out of the write queue at seq {seq}", self.idx));
                    self.lag_and_cut(i, ctx);
                }
            }
        }
        true
    }

    /// Starts a read of `block`; `floor` is the checker's ghost state.
    pub fn read(&mut self, block: u32, floor: Option<WriteId>, ctx: &mut Ctx) {
        if !self.is_running() || self.params.final_host {
            return;
        }
        let need_seq = self.region_seq[block as usize];
        let r = PendingRead { req: self.next_req, block, tried: 0, need_seq, floor, on: None };
        self.next_req += 1;
        self.route_read(r, ctx);
    }

    /// `Shared::route_read`: the lowest-RTT up-to-date replica whose
    /// durable seq covers the block's last write; else wait (suspend mode)
    /// or fail once every candidate was tried.
    fn route_read(&mut self, mut r: PendingRead, ctx: &mut Ctx) {
        let mut best: Option<(usize, Sid)> = None;
        let mut any_candidate = false;
        for (i, l) in self.links.iter().enumerate() {
            let Some(sid) = l.session.filter(|_| l.state == LinkState::UpToDate && r.tried & (1 << i) == 0) else {
                continue;
            };
            any_candidate = true;
            if l.durable >= r.need_seq && best.is_none_or(|(b, _)| self.params.rtt[i] < self.params.rtt[b]) {
                best = Some((i, sid));
            }
        }
        match best {
            Some((i, sid)) => {
                r.on = Some(i);
                ctx.send(sid, true, Msg::Read { req: r.req, block: r.block });
                self.reads.insert(r.req, r);
            }
            None if any_candidate || r.tried == 0 => self.deferred.push(r),
            None => ctx.trace(|| format!("host {} read of block {} failed everywhere", self.idx, r.block)),
        }
    }

    fn retry_deferred(&mut self, ctx: &mut Ctx) {
        for r in std::mem::take(&mut self.deferred) {
            self.route_read(r, ctx);
        }
    }

    fn reroute_reads_of(&mut self, i: usize, ctx: &mut Ctx) {
        let lost: Vec<u64> = self.reads.values().filter(|r| r.on == Some(i)).map(|r| r.req).collect();
        for req in lost {
            if let Some(mut r) = self.reads.remove(&req) {
                r.tried |= 1 << i;
                r.on = None;
                self.route_read(r, ctx);
            }
        }
    }

    fn on_read_reply(&mut self, i: usize, req: u64, value: Option<WriteId>, ctx: &mut Ctx) {
        let Some(r) = self.reads.remove(&req).filter(|r| r.on == Some(i)) else { return };
        ctx.effects.push(Effect::ReadDone { host: self.idx, block: r.block, value, floor: r.floor });
    }

    /// Ends the fence: serve from `start` with the leader's records that
    /// some replicas miss in the queue.
    pub(crate) fn go_running(&mut self, start: u64, history: History, initial: &[Option<u64>], seed: Vec<Record>) {
        self.phase = Phase::Running;
        self.history = history;
        self.completed_seq = start;
        self.next_seq = start + 1;
        self.queue = seed.into_iter().map(|rec| Entry { rec, mine: false }).collect();
        self.links = initial.iter().map(|d| Link::new(d.unwrap_or(0))).collect();
    }
}
