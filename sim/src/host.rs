//! A simulated host element: the engine of `src/engine/mod.rs` and the
//! links of `src/engine/link.rs`, reduced to their decisions: sequencing,
//! the bounded write queue, admission by standing, retransmission from the
//! queue, Q-of-N completion in seq order, and read routing. Fencing (the
//! startup) is in `fence.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use starblk_recovery::{Meter, Peer, Plan, Queue, Returning};
use starblk_replica::history::History;
use starblk_replica::members::Membership;

use crate::chaos::slot_of;
use crate::fence::Fence;
use crate::members::Change;
use crate::model::{Ctx, Effect, HostTimer, Msg, Record, Refusal, ReplicaInfo, Sid, Time, WriteId};

/// A copy source that failed is passed over this long (production: 5 s).
const COPY_FAILED_FOR_US: Time = 5_000;

/// Heartbeat period (production: 100 ms; scaled down with everything else).
const HEARTBEAT_US: Time = 1_000;
/// Reconnect backoff bounds.
const BACKOFF_MIN_US: Time = 300;
const BACKOFF_MAX_US: Time = 10_000;

/// What a host is given.
#[derive(Debug, Clone)]
pub struct HostParams {
    /// Replicas in the configured set (the config file names 0..n).
    pub n: usize,
    /// Replica slots in the world (members and spares).
    pub slots: usize,
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
    /// Not a member of the set in effect (removed, or never added).
    Removed,
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
    /// A replay this session asked for: its source; live writes wait.
    replay: Option<usize>,
    /// A copy this session asked for: its source.
    copy: Option<usize>,
    /// First seq the replica's log can serve (heartbeat replies).
    log_first: Option<u64>,
    /// Replay sources that failed for this first seq (bitmask).
    replay_failed: Option<(u64, u64)>,
    /// Copy sources that failed recently (bitmask, when).
    copy_failed: Option<(u64, Time)>,
    /// Copy progress as status shows it, kept across sessions; numbered.
    meter: Option<(u64, Meter)>,
}

impl Link {
    pub fn new(durable: u64, member: bool) -> Link {
        Link {
            state: if member { LinkState::Failed } else { LinkState::Removed },
            durable,
            clean_durable: durable,
            next_send: durable + 1,
            session: None,
            greeting: false,
            backoff: BACKOFF_MIN_US,
            reconnect_armed: false,
            replay: None,
            copy: None,
            log_first: None,
            replay_failed: None,
            copy_failed: None,
            meter: None,
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
    /// The replica set in effect.
    pub members: Membership,
    /// A membership change in progress.
    pub(crate) change: Option<Change>,
    /// Time zero of the progress meters (they take `Instant`s).
    base: Instant,
    meters: u64,
    region_seq: Vec<u64>,
    reads: BTreeMap<u64, PendingRead>,
    deferred: Vec<PendingRead>,
    next_req: u64,
}

impl Host {
    /// A host about to fence.
    pub fn new(idx: usize, params: HostParams) -> Host {
        let (slots, blocks) = (params.slots, params.blocks);
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
            links: (0..slots).map(|_| Link::new(0, false)).collect(),
            fence: None,
            members: Membership::default(),
            change: None,
            base: Instant::now(),
            meters: 0,
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
        if let Some(c) = self.change.take() {
            sids.extend(c.sessions.keys());
        }
        sids
    }

    /// A frame arrived on `sid`.
    pub fn on_msg(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        if self.phase == Phase::Fencing {
            return self.on_fence_msg(sid, msg, ctx);
        }
        if self.change.as_ref().is_some_and(|c| c.sessions.contains_key(&sid)) {
            return self.on_change_msg(sid, msg, ctx);
        }
        let Some(i) = self.link_of(sid) else { return };
        match msg {
            Msg::Info(info) if self.links[i].greeting => self.admit(i, info, ctx),
            Msg::Durable { seq, sender_epoch, log_first } => {
                self.links[i].log_first = Some(log_first);
                self.on_durable(i, seq, sender_epoch, ctx)
            }
            Msg::ReadReply { req, value } => self.on_read_reply(i, req, value, ctx),
            Msg::Refused(Refusal::Diverged) => {
                // Lagging, never failed: a reconnect would only diverge again.
                self.links[i].state = LinkState::Lagging;
                self.advance(ctx);
            }
            Msg::ReplayDone { next } => self.on_replay_done(i, next, ctx),
            Msg::RecoveryFailed { copy } => self.on_recovery_failed(i, copy, ctx),
            Msg::CopyProgress { done, total } => self.on_copy_progress(i, done, total, ctx),
            Msg::CopyDone { durable, sender_epoch } => self.on_copy_done(i, durable, sender_epoch, ctx),
            _ => {}
        }
    }

    /// Session `sid` ended.
    pub fn on_closed(&mut self, sid: Sid, ctx: &mut Ctx) {
        if self.phase == Phase::Fencing {
            return self.on_fence_closed(sid, ctx);
        }
        if self.change.as_ref().is_some_and(|c| c.sessions.contains_key(&sid)) {
            return self.on_change_closed(sid, ctx);
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
                // A removed replica's manager stops for good.
                if self.links[i].session.is_none() && self.links[i].state != LinkState::Removed {
                    self.connect(i, ctx);
                }
            }
            HostTimer::Heartbeat if self.is_running() => self.heartbeat(ctx),
            HostTimer::Change(stage) if self.is_running() => self.on_change_timeout(stage, ctx),
            _ => {}
        }
    }

    fn link_of(&self, sid: Sid) -> Option<usize> {
        self.links.iter().position(|l| l.session == Some(sid))
    }

    /// Starts serving after the fence: links to every replica.
    pub(crate) fn start_links(&mut self, ctx: &mut Ctx) {
        for i in 0..self.links.len() {
            if self.links[i].state != LinkState::Removed {
                self.connect(i, ctx);
            }
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

    /// `link::admit`: `starblk_recovery::plan` decides how the replica
    /// catches up (quick, replay, a copy) or why it lags; only a replica
    /// whose log is a prefix of this host's history joins as it is, and a
    /// copying one counts only once its copy is done.
    fn admit(&mut self, i: usize, info: ReplicaInfo, ctx: &mut Ctx) {
        let d = info.durable;
        let first = self.queue.front().map_or(self.next_seq, |e| e.rec.id.seq);
        let last = self.next_seq - 1;
        let now = ctx.now;
        if self.links[i].state == LinkState::Removed {
            return self.cut(i, ctx);
        }
        let l = &mut self.links[i];
        l.greeting = false;
        l.durable = d;
        l.clean_durable = if info.epoch <= self.epoch { d } else { l.clean_durable.min(d) };
        l.replay = None;
        l.copy = None;
        let standing = ctx.rules.standing(&self.history, last, &info.history, d);
        self.links[i].durable = ctx.rules.admitted_durable(standing, d);
        let returning = Returning { durable_seq: d, standing, copying: info.copying.map(|c| c.0) };
        let peers = self.recovery_peers(i, d, now);
        let plan = match ctx.rules.plan(&returning, &Queue { first, last }, &peers) {
            Ok(p) => p,
            Err(why) => {
                ctx.trace(|| format!("host {} link {i}: lagging: {why}", self.idx));
                return self.lag_and_cut(i, ctx);
            }
        };
        ctx.trace(|| format!("host {} link {i}: {standing}, durable {d}: {plan:?}", self.idx));
        let history = self.history.clone();
        let l = &mut self.links[i];
        let Some(sid) = l.session else { return };
        l.state = LinkState::Recovering;
        l.next_send = d + 1;
        l.backoff = BACKOFF_MIN_US;
        match plan {
            Plan::Quick => {
                l.meter = None;
                ctx.send(sid, true, Msg::Adopt { history, last });
            }
            Plan::Replay { peer } => {
                l.meter = None;
                l.replay = Some(peer);
                ctx.send(sid, true, Msg::Adopt { history, last });
                ctx.send(sid, true, Msg::Replay { from: d + 1, to: last, src: peer });
            }
            Plan::Incremental { peer, .. } | Plan::Full { peer } | Plan::Rollback { peer, .. } => {
                let kind = plan.copy_kind().expect("a copy plan");
                // Live writes from where a resuming replica's log ends if
                // the queue still has it; else from now.
                let live_from = match info.copying {
                    Some((_, next)) => next.clamp(first, last + 1),
                    None => last + 1,
                };
                l.copy = Some(peer);
                l.next_send = live_from;
                if info.copying.is_none() || l.meter.is_none() {
                    self.meters += 1;
                    l.meter = Some((self.meters, Meter::new()));
                }
                ctx.send(sid, true, Msg::Copy { live_from, last, kind, history, src: peer });
            }
        }
        self.pump(i, ctx);
        self.advance(ctx);
    }

    /// `recovery_peers`: the other members as sources.
    fn recovery_peers(&self, i: usize, d: u64, now: Time) -> Vec<Peer> {
        let replay_failed = match self.links[i].replay_failed {
            Some((from, mask)) if from == d + 1 => mask,
            _ => 0,
        };
        let copy_failed = match self.links[i].copy_failed {
            Some((mask, at)) if now < at + COPY_FAILED_FOR_US => mask,
            _ => 0,
        };
        (0..self.links.len())
            .filter(|&k| k != i && self.links[k].state != LinkState::Removed)
            .map(|k| Peer {
                idx: k,
                up_to_date: self.links[k].state == LinkState::UpToDate,
                reachable: true,
                rtt_us: self.params.rtt[k],
                log_first: self.links[k].log_first,
                replay_failed: replay_failed & (1 << k) != 0,
                copy_failed: copy_failed & (1 << k) != 0,
            })
            .collect()
    }

    /// `on_replay_done`: live writes go on from `next` if the queue still
    /// holds it; else another replay round, or lagging.
    fn on_replay_done(&mut self, i: usize, next: u64, ctx: &mut Ctx) {
        let first = self.queue.front().map_or(self.next_seq, |e| e.rec.id.seq);
        let last = self.next_seq - 1;
        let Some(peer) = self.links[i].replay.take() else { return };
        let next = next.max(self.links[i].durable + 1);
        if next < first {
            let d = next - 1;
            let now = ctx.now;
            let src = if self.links[peer].state == LinkState::UpToDate {
                Some(peer)
            } else {
                let peers = self.recovery_peers(i, d, now);
                let ok = peers.iter().filter(|p| p.up_to_date && !p.replay_failed);
                ok.min_by_key(|p| p.rtt_us).map(|p| p.idx)
            };
            let Some(sid) = self.links[i].session else { return };
            return match src {
                Some(src) => {
                    self.links[i].replay = Some(src);
                    ctx.send(sid, true, Msg::Replay { from: next, to: last, src });
                }
                None => self.lag_and_cut(i, ctx),
            };
        }
        self.links[i].next_send = next;
        self.pump(i, ctx);
        self.advance(ctx);
    }

    /// A replay or a copy ended on an error: the source is passed over and
    /// the next session plans again (the copy resumes at its cursor).
    fn on_recovery_failed(&mut self, i: usize, copy: bool, ctx: &mut Ctx) {
        let now = ctx.now;
        let l = &mut self.links[i];
        if copy {
            let Some(peer) = l.copy.take() else { return };
            let mask = match l.copy_failed {
                Some((m, at)) if now < at + COPY_FAILED_FOR_US => m,
                _ => 0,
            };
            l.copy_failed = Some((mask | 1 << peer, now));
        } else {
            let Some(peer) = l.replay.take() else { return };
            let from = l.durable + 1;
            let mask = match l.replay_failed {
                Some((f, m)) if f == from => m,
                _ => 0,
            };
            l.replay_failed = Some((from, mask | 1 << peer));
        }
        self.cut(i, ctx);
        self.mark_failed(i, ctx);
    }

    fn on_copy_progress(&mut self, i: usize, done: u64, total: u64, ctx: &mut Ctx) {
        let at = self.base + Duration::from_micros(ctx.now);
        let (idx, l) = (self.idx, &mut self.links[i]);
        if l.copy.is_none() {
            return;
        }
        let Some((id, m)) = l.meter.as_mut() else { return };
        m.update(done, total, at);
        progress_effect(idx, i, *id, m, false, ctx);
    }

    /// `on_copy_done`: it catches up from the write queue (it took live
    /// writes all along) and counts once it has every completed write.
    fn on_copy_done(&mut self, i: usize, durable: u64, sender_epoch: u64, ctx: &mut Ctx) {
        let (idx, epoch, l) = (self.idx, self.epoch, &mut self.links[i]);
        if l.copy.take().is_none() {
            return;
        }
        // Sent before the replica was fenced (the checker's property 4).
        if sender_epoch <= epoch {
            l.clean_durable = l.clean_durable.max(durable);
        }
        l.copy_failed = None;
        l.durable = l.durable.max(durable);
        if let Some((id, m)) = l.meter.as_mut() {
            m.finish();
            progress_effect(idx, i, *id, m, true, ctx);
        }
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
        l.replay = None;
        l.copy = None;
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
        if l.reconnect_armed || !running || l.state == LinkState::Removed {
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
        let Some(sid) = l.session.filter(|_| !l.greeting && l.state.is_connected() && l.replay.is_none()) else {
            return;
        };
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
            if l.state == LinkState::Recovering && ctx.rules.promotes(l.durable, completed, l.copy.is_some()) {
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
                let counted = (0..self.links.len())
                    .filter(|&r| self.links[r].state == LinkState::UpToDate && self.links[r].durable >= id.seq)
                    .collect();
                ctx.effects.push(Effect::Completed { host: self.idx, id, clean_support, counted });
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
                if l.state.is_connected() && l.replay.is_none() && l.next_send <= seq {
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
    pub(crate) fn go_running(
        &mut self,
        start: u64,
        history: History,
        initial: &[Option<u64>],
        seed: Vec<Record>,
        members: Membership,
    ) {
        self.phase = Phase::Running;
        self.history = history;
        self.completed_seq = start;
        self.next_seq = start + 1;
        self.queue = seed.into_iter().map(|rec| Entry { rec, mine: false }).collect();
        let member = |i: usize| members.members.iter().any(|m| slot_of(&m.name) == Some(i));
        self.links = initial.iter().enumerate().map(|(i, d)| Link::new(d.unwrap_or(0), member(i))).collect();
        self.members = members;
    }

    /// Whether replica slot `i` is a member of the set in effect.
    pub fn is_member(&self, i: usize) -> bool {
        self.links.get(i).is_some_and(|l| l.state != LinkState::Removed)
    }

    /// A link starts (a replica was added).
    pub(crate) fn add_link(&mut self, i: usize, ctx: &mut Ctx) {
        self.links[i] = Link::new(0, true);
        self.connect(i, ctx);
    }

    /// A link stops for good (a replica was removed): it never counts again.
    pub(crate) fn remove_link(&mut self, i: usize, ctx: &mut Ctx) {
        self.links[i].state = LinkState::Removed;
        self.cut(i, ctx);
        self.advance(ctx);
    }
}

/// Reports a copy meter's view to the checker (property 8).
fn progress_effect(host: usize, replica: usize, meter: u64, m: &Meter, finished: bool, ctx: &mut Ctx) {
    let v = m.view();
    ctx.effects.push(Effect::Progress {
        host,
        replica,
        meter,
        fraction: v.fraction,
        done: v.done_bytes,
        total: v.total_bytes,
        finished,
    });
}
