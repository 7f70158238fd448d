//! A simulated replica: the store and server of `replica/src/store.rs` and
//! `replica/src/server.rs`, reduced to their decisions. Every decision is a
//! call into [`Rules`] (production's `history.rs`).
//!
//! Persistent state survives a crash; volatile state does not. Group commit
//! is asynchronous: the world finishes a commit after a disk delay, and may
//! fail it (EIO) or lose it in a crash (torn: the batch is gone, the durable
//! prefix is kept, as the real log's checksummed records guarantee).

use std::collections::{BTreeMap, VecDeque};

use starblk_replica::history::{AppendDecision, HelloDecision, History, Standing};
use starblk_replica::members::Membership;
use starblk_replica::store::CopySetup;
use starblk_replica::superblock::{CopyKind, CopyState};

use crate::model::{Ctx, Effect, Msg, PeerMsg, Record, Refusal, ReplicaInfo, Sid, Time, WriteId};

/// Bytes per region (one block) for copy progress.
pub const REGION_BYTES: u64 = 4096;
/// A copy or replay whose source stays silent this long stops (production:
/// 45 s; scaled down with everything else).
const PEER_SILENCE_US: Time = 30_000;

/// Per-session state on the replica side (`server.rs` `Session`).
#[derive(Debug, Clone, Copy, Default)]
struct RSession {
    /// The epoch the session speaks for; None until Hello.
    epoch: Option<u64>,
    probe: bool,
    /// This session made itself the ack sink (production clears the sink
    /// when such a session ends, even if another took it over since).
    is_ack_sink: bool,
}

/// A store operation that first drains group commit (`Store::drained`).
#[derive(Debug, Clone)]
enum DrainOp {
    SetEpoch(u64),
    /// Hello at a higher epoch: raise, then join.
    Raise(u64),
    Adopt {
        history: History,
        last: u64,
    },
    /// `Store::begin_copy`.
    Copy {
        live_from: u64,
        last: u64,
        kind: CopyKind,
        history: History,
        src: usize,
    },
    /// `Store::finish_copy`.
    FinishCopy,
}

/// Where a running copy is (`copy.rs` `Copier`, one region in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Counting segment `seg` at the source.
    Counting { seg: usize, left: u64 },
    /// Listing the changed regions of segment `seg` from `at`.
    Listing { seg: usize },
    /// Reading `list.front()` of segment `seg`.
    Reading { seg: usize },
    /// The region read waits for this replica's live writes up to its
    /// as-of seq.
    Waiting { seg: usize, region: u64, value: Option<WriteId>, mark: u64, as_of: u64 },
    /// Committing what is appended before the end (`finish_copy`).
    Finishing,
}

/// A running copy (volatile; its persisted part is `Replica::copy`).
#[derive(Debug, Clone)]
struct Copier {
    /// The host session that asked for it.
    sid: Sid,
    chan: u64,
    /// Every region is read as of this seq or later.
    min_seq: u64,
    state: CopyState,
    /// Regions applied since the cursor was last persisted.
    unpersisted: u64,
    stage: Stage,
    list: VecDeque<u64>,
    /// Bumped by every request: a silence timer of an older one is void.
    token: u64,
}

/// A running replay (`replay.rs`).
#[derive(Debug, Clone, Copy)]
struct Replay {
    sid: Sid,
    chan: u64,
    token: u64,
}

/// One replica.
#[derive(Debug)]
pub struct Replica {
    /// Index in the replica set.
    pub idx: usize,
    // Persistent (superblock, log, data file).
    /// Persisted fencing epoch.
    pub epoch: u64,
    /// The history the log follows.
    pub follows: History,
    /// Durable records, in commit order.
    pub log: Vec<Record>,
    /// Published durable seq.
    pub durable: u64,
    /// Data blocks: the value of the last durable write to each.
    pub data: Vec<Option<WriteId>>,
    /// A group commit failed: the disk is failed for good.
    pub failed: bool,
    /// The change map: per region (block), the seq of the last write.
    pub marks: Vec<u64>,
    /// Last seq applied to the data (durable unless a copy runs).
    pub applied: u64,
    /// The copy in progress, as last persisted.
    pub copy: Option<CopyState>,
    /// The replica set it stores.
    pub members: Membership,
    /// It belongs to the volume.
    pub stamped: bool,
    /// Records the log keeps for replay (checkpoints drop older ones).
    log_cap: usize,
    /// Live records a copy remembers for higher-seq-wins.
    recent_cap: usize,
    /// Regions applied between two persisted copy cursors.
    persist_every: u64,
    // Volatile.
    /// Running (not crashed).
    pub up: bool,
    /// Bumped by each crash, so a commit of a former life is ignored.
    pub incarnation: u64,
    appended: Vec<Record>,
    last_seq: u64,
    committing: Option<Vec<Record>>,
    kick_pending: bool,
    sessions: BTreeMap<Sid, RSession>,
    sink: Option<Sid>,
    drain: Option<(Sid, DrainOp)>,
    /// Frames that arrived while a drain held the append lock; None marks
    /// a session end, kept in order with its frames.
    blocked: VecDeque<(Sid, Option<Msg>)>,
    copier: Option<Copier>,
    replay: Option<Replay>,
    /// Live records applied during a copy: (seq, region).
    recent: VecDeque<(u64, u64)>,
    /// Peer requests waiting for their min seq to be applied (source side).
    waiting: Vec<(u64, PeerMsg)>,
    /// Open peer channels where this replica is the source: chan -> epoch.
    serving: BTreeMap<u64, u64>,
    next_token: u64,
}

/// Per-replica knobs drawn per seed.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaParams {
    /// Blocks (= regions) in the volume.
    pub blocks: usize,
    /// Log records kept for replay.
    pub log_cap: usize,
    /// Live records remembered during a copy.
    pub recent_cap: usize,
    /// Regions between persisted copy cursors.
    pub persist_every: u64,
}

impl Replica {
    /// An empty replica of a volume with `blocks` blocks, at epoch 1
    /// (`volume create` stamps epoch 1).
    pub fn new(idx: usize, p: ReplicaParams, members: Option<Membership>) -> Replica {
        Replica {
            idx,
            epoch: 1,
            follows: History::new(),
            log: Vec::new(),
            durable: 0,
            data: vec![None; p.blocks],
            failed: false,
            marks: vec![0; p.blocks],
            applied: 0,
            copy: None,
            stamped: members.is_some(),
            members: members.unwrap_or_default(),
            log_cap: p.log_cap,
            recent_cap: p.recent_cap,
            persist_every: p.persist_every,
            up: true,
            incarnation: 0,
            appended: Vec::new(),
            last_seq: 0,
            committing: None,
            kick_pending: false,
            sessions: BTreeMap::new(),
            sink: None,
            drain: None,
            blocked: VecDeque::new(),
            copier: None,
            replay: None,
            recent: VecDeque::new(),
            waiting: Vec::new(),
            serving: BTreeMap::new(),
            next_token: 0,
        }
    }

    /// HelloOk contents.
    pub fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            epoch: self.epoch,
            durable: self.durable,
            history: self.follows.clone(),
            copying: self.copy.as_ref().map(|c| (c.kind, self.last_seq + 1)),
            members: self.members.clone(),
            stamped: self.stamped,
        }
    }

    /// The first seq its log can still serve (`Store::log_first`).
    pub fn log_first(&self) -> u64 {
        if self.copy.is_some() {
            return u64::MAX;
        }
        self.log.first().map_or(self.durable + 1, |r| r.id.seq)
    }

    /// Whether a copy is set up (persisted), running or not.
    pub fn is_copying(&self) -> bool {
        self.copy.is_some()
    }

    fn durable_msg(&self) -> Msg {
        Msg::Durable { seq: self.durable, sender_epoch: self.epoch, log_first: self.log_first() }
    }

    /// Whether a group commit is running (for fault injection).
    pub fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Crash: volatile state is lost, a running commit is torn. Returns
    /// whether a commit was torn.
    pub fn crash(&mut self) -> bool {
        let torn = self.committing.is_some();
        self.up = false;
        self.incarnation += 1;
        self.appended.clear();
        self.committing = None;
        self.kick_pending = false;
        self.sessions.clear();
        self.sink = None;
        self.drain = None;
        self.blocked.clear();
        self.copier = None;
        self.replay = None;
        self.recent.clear();
        self.waiting.clear();
        self.serving.clear();
        torn
    }

    /// Restart: reload persistent state (the log replays to what it holds:
    /// the durable seq, or during a copy the last live write).
    pub fn restart(&mut self) {
        self.up = true;
        self.last_seq = if self.copy.is_some() { self.applied } else { self.durable };
    }

    /// A frame arrived on `sid`.
    pub fn on_msg(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        if self.drain.is_some() {
            self.blocked.push_back((sid, Some(msg)));
            return;
        }
        self.handle(sid, msg, ctx);
    }

    /// Session `sid` ended (the host closed it, or it broke).
    pub fn on_closed(&mut self, sid: Sid, ctx: &mut Ctx) {
        if self.drain.is_some() {
            self.blocked.push_back((sid, None));
            return;
        }
        self.end_session(sid, ctx);
    }

    fn end_session(&mut self, sid: Sid, ctx: &mut Ctx) {
        // Writes appended before the session ended still get committed.
        self.kick(ctx);
        // A copy or replay stops with the session that asked for it (the
        // copy saves its progress); the next session resumes it.
        if self.copier.as_ref().is_some_and(|c| c.sid == sid && c.stage != Stage::Finishing) {
            self.stop_copy(ctx);
        }
        if self.replay.is_some_and(|r| r.sid == sid) {
            self.replay = None;
        }
        if self.sessions.remove(&sid).is_some_and(|s| s.is_ack_sink) {
            self.sink = None;
        }
    }

    /// Dispatch, with the gates of `Server::handle`.
    fn handle(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        match msg {
            Msg::Probe => return self.probe(sid, ctx),
            Msg::Hello(e) => return self.hello(sid, e, ctx),
            Msg::Stamp { epoch, members } => return self.stamp(sid, epoch, members, ctx),
            _ => {}
        }
        // Every session starts with Probe or Hello; frames of a session
        // this replica already ended (held back by a drain) are dropped.
        let Some(&s) = self.sessions.get(&sid) else { return };
        let Some(epoch) = s.epoch else { return self.refuse(sid, Refusal::BadState, ctx) };
        if epoch < self.epoch {
            return self.refuse(sid, Refusal::Stale, ctx);
        }
        if !matches!(msg, Msg::SetEpoch(_)) {
            ctx.effects.push(Effect::Accepted { replica: self.idx, epoch });
        }
        match msg {
            Msg::SetEpoch(e) => self.begin_drain(sid, DrainOp::SetEpoch(e), ctx),
            Msg::Adopt { history, last } => self.adopt(sid, s, epoch, history, last, ctx),
            Msg::Write(rec) => self.write(sid, s, epoch, rec, ctx),
            Msg::Read { req, block } => {
                let value = self.data.get(block as usize).copied().flatten();
                ctx.send(sid, false, Msg::ReadReply { req, value });
            }
            Msg::Heartbeat => ctx.send(sid, false, self.durable_msg()),
            Msg::Copy { live_from, last, kind, history, src } if !s.probe => {
                self.begin_drain(sid, DrainOp::Copy { live_from, last, kind, history, src }, ctx)
            }
            Msg::Replay { from, to, src } if !s.probe && self.copy.is_none() => {
                self.start_replay(sid, from, to, src, ctx)
            }
            Msg::SetMembers(next) if !s.probe => self.set_members(sid, epoch, next, ctx),
            Msg::LogRead { from, to } => {
                let recs = self.log.iter().filter(|r| r.id.seq >= from && r.id.seq <= to.min(self.durable)).copied();
                ctx.send(sid, false, Msg::Log(recs.collect()));
            }
            _ => self.refuse(sid, Refusal::BadState, ctx),
        }
    }

    /// A probe learns the replica's state without an epoch. Production
    /// answers probes even on a failed disk; the SetEpoch that follows is
    /// what fails.
    fn probe(&mut self, sid: Sid, ctx: &mut Ctx) {
        let s = self.sessions.entry(sid).or_default();
        s.probe = true;
        s.epoch = Some(self.epoch);
        ctx.send(sid, false, Msg::Info(self.info()));
    }

    fn hello(&mut self, sid: Sid, e: u64, ctx: &mut Ctx) {
        // A replica of no volume refuses sessions (wrong volume).
        if !self.stamped {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        if self.failed {
            return self.refuse(sid, Refusal::Failed, ctx);
        }
        match ctx.rules.hello_decision(self.epoch, e) {
            HelloDecision::Join => self.join(sid, e, ctx),
            HelloDecision::Raise => self.begin_drain(sid, DrainOp::Raise(e), ctx),
            HelloDecision::Stale => self.refuse(sid, Refusal::Stale, ctx),
        }
    }

    fn join(&mut self, sid: Sid, e: u64, ctx: &mut Ctx) {
        let s = self.sessions.entry(sid).or_default();
        s.epoch = Some(e);
        s.probe = false;
        ctx.effects.push(Effect::Joined { replica: self.idx, epoch: e });
        ctx.send(sid, false, Msg::Info(self.info()));
    }

    /// Refuses with an Error frame and ends the session (`close: true`).
    fn refuse(&mut self, sid: Sid, why: Refusal, ctx: &mut Ctx) {
        ctx.trace(|| format!("replica {} refuses session {sid}: {why:?}", self.idx));
        ctx.send(sid, false, Msg::Refused(why));
        ctx.effects.push(Effect::Close { sid, by_replica: true });
        self.end_session(sid, ctx);
    }

    fn adopt(&mut self, sid: Sid, s: RSession, epoch: u64, history: History, last: u64, ctx: &mut Ctx) {
        if s.probe || history.last_epoch() != epoch {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        self.begin_drain(sid, DrainOp::Adopt { history, last }, ctx);
    }

    /// `Server::write` then `Store::append_inner`.
    fn write(&mut self, sid: Sid, s: RSession, epoch: u64, rec: Record, ctx: &mut Ctx) {
        if s.probe || rec.id.epoch > epoch {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        if !s.is_ack_sink {
            self.sink = Some(sid);
            self.sessions.entry(sid).or_default().is_ack_sink = true;
        }
        if self.failed {
            return self.refuse(sid, Refusal::Failed, ctx);
        }
        let (e, seq) = (rec.id.epoch, rec.id.seq);
        match ctx.rules.append_decision(&self.follows, self.epoch, self.last_seq, epoch, (e, seq)) {
            AppendDecision::Append => {
                self.appended.push(rec);
                self.last_seq = seq;
                self.kick(ctx);
            }
            AppendDecision::Duplicate => {}
            AppendDecision::Stale => self.refuse(sid, Refusal::Stale, ctx),
            AppendDecision::Gap => self.refuse(sid, Refusal::Gap, ctx),
            AppendDecision::Diverged => self.refuse(sid, Refusal::Diverged, ctx),
        }
    }

    /// Asks for a group commit soon, so writes arriving together share it.
    fn kick(&mut self, ctx: &mut Ctx) {
        if !self.kick_pending && self.committing.is_none() && !self.appended.is_empty() {
            self.kick_pending = true;
            ctx.effects.push(Effect::KickCommit { replica: self.idx });
        }
    }

    /// The group-commit timer fired.
    pub fn on_kick(&mut self, ctx: &mut Ctx) {
        self.kick_pending = false;
        if self.committing.is_none() && !self.appended.is_empty() {
            self.start_commit(ctx);
        }
    }

    /// Takes the whole batch (`commit_locked`). Production keeps committing
    /// what was appended even after a failure (`commit_pending` does not
    /// check it); `publish_durable` is what must refuse to publish it.
    fn start_commit(&mut self, ctx: &mut Ctx) {
        let batch = std::mem::take(&mut self.appended);
        ctx.trace(|| {
            format!("replica {} commits seqs {:?}", self.idx, batch.iter().map(|r| r.id.seq).collect::<Vec<_>>())
        });
        self.committing = Some(batch);
        ctx.effects.push(Effect::StartCommit { replica: self.idx });
    }

    /// The disk finished the running commit, well (`ok`) or with EIO.
    pub fn on_commit_done(&mut self, ok: bool, ctx: &mut Ctx) {
        let Some(batch) = self.committing.take() else { return };
        let through = batch.last().map_or(self.durable, |r| r.id.seq);
        let failed_before = self.failed;
        self.failed |= !ok;
        match ctx.rules.publish_durable(self.durable, through, ok, failed_before) {
            Some(d) => {
                if failed_before {
                    ctx.effects.push(Effect::Note("durable seq published past a failed batch"));
                }
                self.persist(batch, d, ctx)
            }
            None => ctx.trace(|| format!("replica {} does not publish seqs ..={through} (ok {ok})", self.idx)),
        }
        if self.drain.is_some() {
            self.continue_drain(ctx);
        } else if !self.appended.is_empty() {
            self.start_commit(ctx);
        }
    }

    /// Applies a committed batch in seq order and acks the sink, if the
    /// sink's epoch still may be acked (checked now, at ack time).
    fn persist(&mut self, batch: Vec<Record>, durable: u64, ctx: &mut Ctx) {
        let copying = self.copy.is_some();
        for r in &batch {
            if let Some(b) = self.data.get_mut(r.block as usize) {
                *b = Some(r.id);
            }
            // `apply_record`: the mark goes up with the data.
            if let Some(m) = self.marks.get_mut(r.block as usize) {
                *m = (*m).max(r.id.seq);
            }
            if copying {
                self.recent.push_back((r.id.seq, u64::from(r.block)));
                if self.recent.len() > self.recent_cap {
                    self.recent.pop_front();
                }
            }
            self.applied = r.id.seq;
        }
        self.log.extend(batch);
        // Checkpoints drop records from the log's tail (`log_first`).
        if self.log.len() > self.log_cap {
            let extra = self.log.len() - self.log_cap;
            self.log.drain(..extra);
        }
        self.serve_waiting(ctx);
        if copying {
            self.copy_applied_more(ctx);
            // Durable in the log and applied, but claimed only when the
            // copy ends (`Store::commit`).
            if !ctx.rules.acks_during_copy() {
                return;
            }
        }
        self.durable = durable;
        let Some(sid) = self.sink else { return };
        let sink_epoch = self.sessions.get(&sid).and_then(|s| s.epoch).unwrap_or(0);
        if ctx.rules.may_ack(self.epoch, sink_epoch) {
            ctx.send(sid, false, self.durable_msg());
        }
    }

    fn begin_drain(&mut self, sid: Sid, op: DrainOp, ctx: &mut Ctx) {
        let skip = ctx.rules.no_drain && matches!(op, DrainOp::SetEpoch(_) | DrainOp::Raise(_));
        self.drain = Some((sid, op));
        if skip {
            return self.finish_drain(ctx);
        }
        self.continue_drain(ctx);
    }

    /// `Store::drained`: commit what is appended, wait for the running
    /// commit, then do the operation with appends held off.
    fn continue_drain(&mut self, ctx: &mut Ctx) {
        if self.failed {
            let Some((sid, _)) = self.drain.take() else { return };
            self.refuse(sid, Refusal::Failed, ctx);
            return self.release_blocked(ctx);
        }
        if self.committing.is_some() {
            return;
        }
        if !self.appended.is_empty() {
            return self.start_commit(ctx);
        }
        self.finish_drain(ctx);
    }

    fn finish_drain(&mut self, ctx: &mut Ctx) {
        let Some((sid, op)) = self.drain.take() else { return };
        match op {
            DrainOp::SetEpoch(e) => self.set_epoch(sid, e, ctx),
            DrainOp::Raise(e) => self.raise(sid, e, ctx),
            DrainOp::Adopt { history, last } => self.finish_adopt(sid, history, last, ctx),
            DrainOp::Copy { live_from, last, kind, history, src } => {
                self.begin_copy(sid, live_from, last, kind, history, src, ctx)
            }
            DrainOp::FinishCopy => self.finish_copy(ctx),
        }
        self.release_blocked(ctx);
    }

    /// Handles the frames that waited, until one starts another drain.
    fn release_blocked(&mut self, ctx: &mut Ctx) {
        while self.drain.is_none() {
            let Some((sid, m)) = self.blocked.pop_front() else { return };
            match m {
                Some(msg) => self.handle(sid, msg, ctx),
                None => self.end_session(sid, ctx),
            }
        }
    }

    /// `Server::set_epoch`: the reply is the state after the fence.
    fn set_epoch(&mut self, sid: Sid, e: u64, ctx: &mut Ctx) {
        if !ctx.rules.may_raise_epoch(self.epoch, e) {
            return self.refuse(sid, Refusal::Stale, ctx);
        }
        ctx.trace(|| format!("replica {} persists epoch {e} (was {})", self.idx, self.epoch));
        self.epoch = e;
        self.join(sid, e, ctx);
    }

    /// Hello at a higher epoch: persist it (fencing every older session
    /// here), then join. Someone else raising to the same epoch meanwhile
    /// is fine, as in production.
    fn raise(&mut self, sid: Sid, e: u64, ctx: &mut Ctx) {
        if ctx.rules.may_raise_epoch(self.epoch, e) {
            ctx.trace(|| format!("replica {} raised to epoch {e} by a hello", self.idx));
            self.epoch = e;
        } else if self.epoch != e {
            return self.refuse(sid, Refusal::Stale, ctx);
        }
        self.join(sid, e, ctx);
    }

    /// `Store::adopt`: the host's history must extend this log.
    fn finish_adopt(&mut self, sid: Sid, history: History, last: u64, ctx: &mut Ctx) {
        let epoch = self.sessions.get(&sid).and_then(|s| s.epoch).unwrap_or(0);
        if epoch < self.epoch {
            return self.refuse(sid, Refusal::Stale, ctx);
        }
        // A half-done copy must be resumed (Copy), not adopted over.
        if self.copy.is_some() {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        if let Standing::Diverged { after } = ctx.rules.standing(&history, last, &self.follows, self.last_seq) {
            ctx.trace(|| format!("replica {} refuses adopt: diverged after seq {after}", self.idx));
            return self.refuse(sid, Refusal::Diverged, ctx);
        }
        self.follows = history;
        ctx.send(sid, false, self.durable_msg());
    }
}

/// Membership (`Store::stamp`, `Store::set_members`).
impl Replica {
    /// Stamps an empty replica (`replica add`); idempotent here, as the
    /// sim has one volume.
    fn stamp(&mut self, sid: Sid, epoch: u64, members: Membership, ctx: &mut Ctx) {
        if !self.sessions.get(&sid).is_some_and(|s| s.probe) {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        self.stamped = true;
        self.epoch = self.epoch.max(epoch);
        self.members = members;
        ctx.send(sid, false, Msg::MembersOk);
    }

    fn set_members(&mut self, sid: Sid, session_epoch: u64, next: Membership, ctx: &mut Ctx) {
        match ctx.rules.accept_members(&self.members, self.epoch, session_epoch, &next) {
            Ok(store) => {
                if store {
                    ctx.trace(|| format!("replica {} stores set {:?}", self.idx, next.order()));
                    self.members = next;
                }
                ctx.send(sid, false, Msg::MembersOk);
            }
            Err(why) => {
                ctx.trace(|| format!("replica {} refuses set {:?}: {why:?}", self.idx, next.order()));
                self.refuse(sid, Refusal::Stale, ctx)
            }
        }
    }
}

/// Recovery on the recovering replica: replay from a peer's log, and the
/// copies (`Store::begin_copy`, `copy.rs`, `Store::apply_copy_region`,
/// `Store::finish_copy`).
impl Replica {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Arms the silence timer of the current request.
    fn arm(&mut self, token: u64, ctx: &mut Ctx) {
        ctx.effects.push(Effect::ReplicaTimer { replica: self.idx, at: ctx.now + PEER_SILENCE_US, token });
    }

    fn session_epoch(&self, sid: Sid) -> u64 {
        self.sessions.get(&sid).and_then(|s| s.epoch).unwrap_or(0)
    }

    fn start_replay(&mut self, sid: Sid, from: u64, to: u64, src: usize, ctx: &mut Ctx) {
        if self.replay.is_some() || self.copier.is_some() {
            return ctx.send(sid, false, Msg::RecoveryFailed { copy: false });
        }
        // The channel speaks for the asking session's epoch (the source
        // refuses it once it has persisted a higher one).
        let chan = ctx.open_peer(self.idx, src, self.session_epoch(sid));
        ctx.effects.push(Effect::PeerSend { chan, to_src: true, msg: PeerMsg::LogRead { from, to } });
        let token = self.token();
        self.replay = Some(Replay { sid, chan, token });
        self.arm(token, ctx);
    }

    /// `Store::begin_copy` (after the drain), then the copier starts.
    #[allow(clippy::too_many_arguments)]
    fn begin_copy(
        &mut self,
        sid: Sid,
        live_from: u64,
        host_last: u64,
        kind: CopyKind,
        host: History,
        src: usize,
        ctx: &mut Ctx,
    ) {
        let epoch = self.session_epoch(sid);
        if epoch < self.epoch {
            return self.refuse(sid, Refusal::Stale, ctx);
        }
        if live_from == 0 || live_from > host_last + 1 {
            return self.refuse(sid, Refusal::BadState, ctx);
        }
        // One copy at a time: an older one stops first (production answers
        // Busy until it has).
        if self.copier.is_some() {
            self.stop_copy(ctx);
        }
        let regions = self.data.len() as u64;
        let setup = ctx.rules.copy_setup(
            self.copy.as_ref(),
            &host,
            host_last,
            &self.follows,
            self.last_seq,
            live_from,
            kind,
            regions,
        );
        let state = match setup {
            CopySetup::Resume(st) => {
                ctx.trace(|| format!("replica {} resumes its {} copy at region {}", self.idx, st.kind, st.cursor));
                self.follows = host;
                st
            }
            CopySetup::Begin { state, keep } => {
                ctx.trace(|| {
                    format!(
                        "replica {} sets up a {} copy: keep {keep}, live from {live_from}, segments {:?}",
                        self.idx, state.kind, state.segments
                    )
                });
                self.follows = host;
                self.durable = self.durable.min(keep);
                self.last_seq = live_from - 1;
                self.applied = live_from - 1;
                self.log.clear();
                self.recent.clear();
                self.copy = Some(state.clone());
                state
            }
        };
        let chan = ctx.open_peer(self.idx, src, epoch);
        let min_seq = state.live_from - 1;
        self.copier = Some(Copier {
            sid,
            chan,
            min_seq,
            state,
            unpersisted: 0,
            stage: Stage::Counting { seg: 0, left: 0 },
            list: VecDeque::new(),
            token: 0,
        });
        self.count_next(ctx);
    }

    /// Counts what is left, segment by segment from the cursor.
    fn count_next(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.copier.as_ref() else { return };
        let Stage::Counting { seg, left } = c.stage else { return };
        let mut seg = seg;
        while seg < c.state.segments.len() {
            let start = if seg == 0 { 0 } else { c.state.segments[seg - 1].end };
            let from = start.max(c.state.cursor);
            if from < c.state.segments[seg].end {
                break;
            }
            seg += 1;
        }
        if seg >= c.state.segments.len() {
            // `all`: the total is done + what is left, persisted.
            let Some(c) = self.copier.as_mut() else { return };
            c.state.total_bytes = c.state.done_bytes + left * REGION_BYTES;
            self.persist_copy(ctx);
            return self.list_next(0, ctx);
        }
        let s = c.state.segments[seg];
        let start = if seg == 0 { 0 } else { c.state.segments[seg - 1].end };
        let from = start.max(c.state.cursor);
        let local = self.local_changed(from, s.end, s.since_local).len() as u64;
        let msg = PeerMsg::Count { from, to: s.end, since: s.since_peer, min_seq: c.min_seq };
        self.request(Stage::Counting { seg, left: left + local }, msg, ctx);
    }

    /// Sends a request to the source in `stage`.
    fn request(&mut self, stage: Stage, msg: PeerMsg, ctx: &mut Ctx) {
        let token = self.token();
        let Some(c) = self.copier.as_mut() else { return };
        c.stage = stage;
        c.token = token;
        ctx.effects.push(Effect::PeerSend { chan: c.chan, to_src: true, msg });
        self.arm(token, ctx);
    }

    /// Regions in `from..to` this replica itself wrote after `since`.
    fn local_changed(&self, from: u64, to: u64, since: u64) -> Vec<u64> {
        if since == u64::MAX {
            return Vec::new();
        }
        (from..to.min(self.marks.len() as u64)).filter(|&r| self.marks[r as usize] > since).collect()
    }

    /// Lists segment `seg` from the cursor, or finishes.
    fn list_next(&mut self, seg: usize, ctx: &mut Ctx) {
        let Some(c) = self.copier.as_ref() else { return };
        let mut seg = seg;
        loop {
            if seg >= c.state.segments.len() {
                return self.begin_finish(ctx);
            }
            let start = if seg == 0 { 0 } else { c.state.segments[seg - 1].end };
            let from = start.max(c.state.cursor);
            let s = c.state.segments[seg];
            if from < s.end {
                let msg = PeerMsg::Changes { from, to: s.end, since: s.since_peer, min_seq: c.min_seq };
                return self.request(Stage::Listing { seg }, msg, ctx);
            }
            seg += 1;
        }
    }

    /// Reads the next listed region, or moves on to the next segment.
    fn read_next(&mut self, seg: usize, ctx: &mut Ctx) {
        let Some(c) = self.copier.as_mut() else { return };
        match c.list.front().copied() {
            Some(region) => {
                let msg = PeerMsg::Read { region, min_seq: c.min_seq };
                self.request(Stage::Reading { seg }, msg, ctx)
            }
            None => {
                // Every region of the segment is done.
                c.state.cursor = c.state.cursor.max(c.state.segments[seg].end);
                self.list_next(seg + 1, ctx)
            }
        }
    }

    /// A reply from the source (or the source's log, for a replay).
    pub fn on_peer_msg(&mut self, chan: u64, msg: PeerMsg, ctx: &mut Ctx) {
        if self.replay.is_some_and(|r| r.chan == chan) {
            return self.on_replay_reply(msg, ctx);
        }
        let Some(c) = self.copier.as_mut().filter(|c| c.chan == chan) else { return };
        match (c.stage.clone(), msg) {
            (_, PeerMsg::Refused) => self.fail_copy(ctx),
            (Stage::Counting { seg, left }, PeerMsg::Counted(n)) => {
                c.stage = Stage::Counting { seg: seg + 1, left: left + n };
                self.count_next(ctx)
            }
            (Stage::Listing { seg }, PeerMsg::Listed(regions)) => {
                let s = c.state.segments[seg];
                let start = if seg == 0 { 0 } else { c.state.segments[seg - 1].end };
                let from = start.max(c.state.cursor);
                let local = self.local_changed(from, s.end, s.since_local);
                let Some(c) = self.copier.as_mut() else { return };
                let mut merged: Vec<u64> = regions.iter().chain(&local).copied().collect();
                merged.sort_unstable();
                merged.dedup();
                let twice = (regions.len() + local.len() - merged.len()) as u64;
                c.state.total_bytes = c.state.total_bytes.saturating_sub(twice * REGION_BYTES).max(c.state.done_bytes);
                c.list = merged.into();
                self.read_next(seg, ctx)
            }
            (Stage::Reading { seg }, PeerMsg::Region { region, value, mark, as_of }) => {
                self.apply_region(seg, region, value, mark, as_of, ctx)
            }
            _ => {}
        }
    }

    /// `apply_copy_region`: once this replica has applied its live writes
    /// up to `as_of`, write the region unless a live write after `as_of`
    /// wrote it (the higher seq wins); if the live writes since `as_of` are
    /// no longer remembered, read it again as of now.
    fn apply_region(&mut self, seg: usize, region: u64, value: Option<WriteId>, mark: u64, as_of: u64, ctx: &mut Ctx) {
        if self.applied < as_of {
            let token = self.token();
            let Some(c) = self.copier.as_mut() else { return };
            c.stage = Stage::Waiting { seg, region, value, mark, as_of };
            c.token = token;
            return self.arm(token, ctx);
        }
        let mut keep = false;
        if self.applied > as_of {
            if self.recent.front().is_none_or(|&(seq, _)| seq > as_of + 1) {
                let min_seq = self.applied;
                ctx.trace(|| format!("replica {} reads region {region} again as of {min_seq}", self.idx));
                return self.request(Stage::Reading { seg }, PeerMsg::Read { region, min_seq }, ctx);
            }
            keep = self.recent.iter().any(|&(seq, r)| seq > as_of && r == region);
        }
        let r = region as usize;
        // The mark first (`premark_copy`): data never outruns its mark.
        self.marks[r] = self.marks[r].max(mark);
        if !keep || !ctx.rules.copy_keeps_newer_live_writes() {
            self.data[r] = value;
        }
        let every = self.persist_every;
        let Some(c) = self.copier.as_mut() else { return };
        c.list.pop_front();
        c.state.done_bytes += REGION_BYTES;
        c.state.total_bytes = c.state.total_bytes.max(c.state.done_bytes);
        // Every listed region below the next one to read is done.
        let next = c.list.front().copied().unwrap_or(c.state.segments[seg].end);
        c.state.cursor = c.state.cursor.max(next);
        c.unpersisted += 1;
        let (sid, done, total) = (c.sid, c.state.done_bytes, c.state.total_bytes);
        if c.unpersisted >= every {
            self.persist_copy(ctx);
        }
        ctx.send(sid, false, Msg::CopyProgress { done, total });
        self.read_next(seg, ctx);
    }

    /// A live write was applied: a region waiting for it may go on.
    fn copy_applied_more(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.copier.as_ref() else { return };
        if let Stage::Waiting { seg, region, value, mark, as_of } = c.stage {
            if self.applied >= as_of {
                self.apply_region(seg, region, value, mark, as_of, ctx);
            }
        }
    }

    /// `persist_copy`: the cursor, done and total reach the superblock.
    fn persist_copy(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.copier.as_mut() else { return };
        c.unpersisted = 0;
        let st = c.state.clone();
        ctx.trace(|| {
            format!(
                "replica {} persists copy cursor {} ({}/{} bytes)",
                self.idx, st.cursor, st.done_bytes, st.total_bytes
            )
        });
        if let Some(p) = self.copy.as_mut() {
            (p.cursor, p.done_bytes, p.total_bytes) = (st.cursor, st.done_bytes, st.total_bytes);
        }
    }

    /// Every region done: commit what is appended, then `finish_copy`.
    fn begin_finish(&mut self, ctx: &mut Ctx) {
        self.persist_copy(ctx);
        let Some(c) = self.copier.as_mut() else { return };
        c.stage = Stage::Finishing;
        ctx.effects.push(Effect::PeerClose { chan: c.chan });
        let sid = c.sid;
        self.begin_drain(sid, DrainOp::FinishCopy, ctx);
    }

    fn finish_copy(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.copier.take() else { return };
        if self.copy.is_none() {
            return;
        }
        let last = self.last_seq;
        self.copy = None;
        self.durable = last;
        self.recent.clear();
        ctx.trace(|| format!("replica {} finished its copy at durable {last}", self.idx));
        ctx.effects.push(Effect::CopyFinished {
            replica: self.idx,
            durable: last,
            history: self.follows.clone(),
            data: self.data.clone(),
        });
        if let Some(sink) = self.sink {
            if ctx.rules.may_ack(self.epoch, self.session_epoch(sink)) {
                ctx.send(sink, false, self.durable_msg());
            }
        }
        // CopyDone claims a durable seq: like an ack, never to a host
        // whose epoch the replica has moved past (`Store::send_if_current`).
        if ctx.rules.copy_done_unchecked() || ctx.rules.may_ack(self.epoch, self.session_epoch(c.sid)) {
            ctx.send(c.sid, false, Msg::CopyDone { durable: last, sender_epoch: self.epoch });
        }
    }

    /// The copy stops (its session ended): progress is saved.
    fn stop_copy(&mut self, ctx: &mut Ctx) {
        self.persist_copy(ctx);
        if let Some(c) = self.copier.take() {
            ctx.effects.push(Effect::PeerClose { chan: c.chan });
        }
    }

    /// The copy failed (source gone, silent or refusing): saved, and the
    /// host is told so it picks another source.
    fn fail_copy(&mut self, ctx: &mut Ctx) {
        let Some(sid) = self.copier.as_ref().map(|c| c.sid) else { return };
        ctx.trace(|| format!("replica {}: copy from its source failed", self.idx));
        self.stop_copy(ctx);
        ctx.send(sid, false, Msg::RecoveryFailed { copy: true });
    }

    fn on_replay_reply(&mut self, msg: PeerMsg, ctx: &mut Ctx) {
        let Some(r) = self.replay.take() else { return };
        ctx.effects.push(Effect::PeerClose { chan: r.chan });
        let PeerMsg::Log(recs) = msg else {
            return ctx.send(r.sid, false, Msg::RecoveryFailed { copy: false });
        };
        let Some(&s) = self.sessions.get(&r.sid) else { return };
        let Some(epoch) = s.epoch else { return };
        for rec in recs {
            if !self.sessions.contains_key(&r.sid) {
                return;
            }
            let s = self.sessions[&r.sid];
            self.write(r.sid, s, epoch, rec, ctx);
        }
        if self.sessions.contains_key(&r.sid) {
            ctx.send(r.sid, false, Msg::ReplayDone { next: self.last_seq + 1 });
        }
    }

    /// A peer channel broke.
    pub fn on_peer_closed(&mut self, chan: u64, ctx: &mut Ctx) {
        self.serving.remove(&chan);
        self.waiting.retain(|w| w.0 != chan);
        if self.replay.is_some_and(|r| r.chan == chan) {
            if let Some(r) = self.replay.take() {
                ctx.send(r.sid, false, Msg::RecoveryFailed { copy: false });
            }
        }
        if self.copier.as_ref().is_some_and(|c| c.chan == chan && c.stage != Stage::Finishing) {
            self.fail_copy(ctx);
        }
    }

    /// A silence timer fired.
    pub fn on_timer(&mut self, token: u64, ctx: &mut Ctx) {
        if self.replay.is_some_and(|r| r.token == token) {
            if let Some(r) = self.replay.take() {
                ctx.effects.push(Effect::PeerClose { chan: r.chan });
                ctx.send(r.sid, false, Msg::RecoveryFailed { copy: false });
            }
        }
        if self.copier.as_ref().is_some_and(|c| c.token == token && c.stage != Stage::Finishing) {
            self.fail_copy(ctx);
        }
    }
}

/// The source side of a recovery (`Store::count_changed`,
/// `changed_regions`, `read_region`, `read_log`).
impl Replica {
    /// A peer opened channel `chan` for a session of `epoch`.
    pub fn on_peer_open(&mut self, chan: u64, epoch: u64) {
        self.serving.insert(chan, epoch);
    }

    /// A request from a recovering peer.
    pub fn on_peer_request(&mut self, chan: u64, msg: PeerMsg, ctx: &mut Ctx) {
        let Some(&epoch) = self.serving.get(&chan) else { return };
        let reply = |ctx: &mut Ctx, msg| ctx.effects.push(Effect::PeerSend { chan, to_src: false, msg });
        // The channel speaks for the asking host's epoch: refused below
        // this replica's (`Server::handle`), and a replica that copies
        // itself is no source.
        if epoch < self.epoch || self.copy.is_some() || self.failed || !self.stamped {
            return reply(ctx, PeerMsg::Refused);
        }
        let min_seq = match msg {
            PeerMsg::Count { min_seq, .. } | PeerMsg::Changes { min_seq, .. } | PeerMsg::Read { min_seq, .. } => {
                min_seq
            }
            _ => 0,
        };
        if self.applied < min_seq {
            // `wait_applied`: answered once the records up to it are applied.
            self.waiting.push((chan, msg));
            return;
        }
        let n = self.marks.len() as u64;
        match msg {
            PeerMsg::Count { from, to, since, .. } => {
                let c = (from..to.min(n)).filter(|&r| self.marks[r as usize] > since).count() as u64;
                reply(ctx, PeerMsg::Counted(c))
            }
            PeerMsg::Changes { from, to, since, .. } => {
                let v = (from..to.min(n)).filter(|&r| self.marks[r as usize] > since).collect();
                reply(ctx, PeerMsg::Listed(v))
            }
            PeerMsg::Read { region, .. } => {
                let r = region as usize;
                let (value, mark) = (self.data.get(r).copied().flatten(), self.marks.get(r).copied().unwrap_or(0));
                let as_of = self.applied;
                reply(ctx, PeerMsg::Region { region, value, mark: mark.min(as_of), as_of })
            }
            PeerMsg::LogRead { from, to } => {
                if self.log_first() > from {
                    return reply(ctx, PeerMsg::Refused);
                }
                let recs = self.log.iter().filter(|r| r.id.seq >= from && r.id.seq <= to.min(self.durable)).copied();
                reply(ctx, PeerMsg::Log(recs.collect()))
            }
            _ => {}
        }
    }

    /// Requests whose min seq is now applied.
    fn serve_waiting(&mut self, ctx: &mut Ctx) {
        if self.waiting.is_empty() {
            return;
        }
        for (chan, msg) in std::mem::take(&mut self.waiting) {
            self.on_peer_request(chan, msg, ctx);
        }
    }
}
