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

use crate::model::{Ctx, Effect, Msg, Record, Refusal, ReplicaInfo, Sid, WriteId};

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
}

impl Replica {
    /// An empty replica of a volume with `blocks` blocks, at epoch 1
    /// (`volume create` stamps epoch 1).
    pub fn new(idx: usize, blocks: usize) -> Replica {
        Replica {
            idx,
            epoch: 1,
            follows: History::new(),
            log: Vec::new(),
            durable: 0,
            data: vec![None; blocks],
            failed: false,
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
        }
    }

    /// HelloOk contents.
    pub fn info(&self) -> ReplicaInfo {
        ReplicaInfo { epoch: self.epoch, durable: self.durable, history: self.follows.clone() }
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
        torn
    }

    /// Restart: reload persistent state (the log replays to `durable`).
    pub fn restart(&mut self) {
        self.up = true;
        self.last_seq = self.durable;
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
        if self.sessions.remove(&sid).is_some_and(|s| s.is_ack_sink) {
            self.sink = None;
        }
    }

    /// Dispatch, with the gates of `Server::handle`.
    fn handle(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        match msg {
            Msg::Probe => return self.probe(sid, ctx),
            Msg::Hello(e) => return self.hello(sid, e, ctx),
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
            Msg::Heartbeat => ctx.send(sid, false, Msg::Durable { seq: self.durable, sender_epoch: self.epoch }),
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
        for r in &batch {
            if let Some(b) = self.data.get_mut(r.block as usize) {
                *b = Some(r.id);
            }
        }
        self.log.extend(batch);
        self.durable = durable;
        let Some(sid) = self.sink else { return };
        let sink_epoch = self.sessions.get(&sid).and_then(|s| s.epoch).unwrap_or(0);
        if ctx.rules.may_ack(self.epoch, sink_epoch) {
            ctx.send(sid, false, Msg::Durable { seq: durable, sender_epoch: self.epoch });
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
        if let Standing::Diverged { after } = ctx.rules.standing(&history, last, &self.follows, self.last_seq) {
            ctx.trace(|| format!("replica {} refuses adopt: diverged after seq {after}", self.idx));
            return self.refuse(sid, Refusal::Diverged, ctx);
        }
        self.follows = history;
        ctx.send(sid, false, Msg::Durable { seq: self.durable, sender_epoch: self.epoch });
    }
}
