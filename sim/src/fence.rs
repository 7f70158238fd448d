//! A host's startup, as `src/engine/startup.rs` `fence()` does it: probe
//! every replica, take an epoch above all it saw, raise it on a majority,
//! branch from the highest position among them, and seed the write queue
//! with what the fenced replicas behind the branch point miss.

use starblk_replica::history::Standing;
use starblk_replica::members::{self, Membership};

use crate::chaos::{initial_set, slot_of};
use crate::host::{Host, Phase};
use crate::model::{Ctx, Effect, HostTimer, Msg, Record, Sid, Time};
use crate::rules::Rules;

/// How long each fence stage waits for answers (production: 3 s probes).
const STAGE_TIMEOUT_US: Time = 8_000;
const PROBE: u8 = 0;
const RAISE: u8 = 1;
const SEED: u8 = 2;
/// Most rounds of following stored sets (`STORED_SET_ROUNDS_MAX`).
const STORED_SET_ROUNDS_MAX: usize = 4;

/// One replica's answer to the current stage.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Waiting,
    Failed,
    Got(crate::model::ReplicaInfo),
}

/// Fence progress.
#[derive(Debug)]
pub(crate) struct Fence {
    stage: u8,
    /// The control session to each replica.
    pub ctrl: Vec<Option<Sid>>,
    answers: Vec<Answer>,
    /// In the raise stage: the fresh session's probe was answered.
    probe_replied: Vec<bool>,
    epoch: u64,
    /// After the raise: the branch point, the history, the replicas that
    /// are a prefix of it (with their durable seq), where seeding reads.
    start: u64,
    history: starblk_replica::history::History,
    initial: Vec<Option<u64>>,
    seed_from: Option<usize>,
    low: u64,
    /// Replicas probed so far (the config file's, then the stored set's).
    probed: Vec<bool>,
    rounds: usize,
    /// The set it fences (the newest stored one found).
    set: Membership,
    started: crate::model::Time,
}

impl Host {
    /// Starts fencing: a probe to every replica the config file names
    /// (the volume's first set; `stored_set` follows the newer ones).
    pub fn start(&mut self, ctx: &mut Ctx) {
        let (n, slots) = (self.params.n, self.params.slots);
        let ctrl: Vec<Option<Sid>> = (0..slots).map(|i| (i < n).then(|| ctx.open(self.idx, i))).collect();
        for sid in ctrl.iter().flatten() {
            ctx.send(*sid, true, Msg::Probe);
        }
        self.fence = Some(Fence {
            stage: PROBE,
            ctrl,
            answers: (0..slots).map(|i| if i < n { Answer::Waiting } else { Answer::Failed }).collect(),
            probe_replied: vec![false; slots],
            epoch: 0,
            start: 0,
            history: Default::default(),
            initial: vec![None; slots],
            seed_from: None,
            low: 0,
            probed: (0..slots).map(|i| i < n).collect(),
            rounds: 1,
            set: Membership::default(),
            started: ctx.now,
        });
        self.arm_stage(PROBE, ctx);
    }

    /// `stored_set`: the newest set among the answers; if it names
    /// replicas not probed yet, probes them (a few rounds). Returns true
    /// when resolved, with the set in the fence.
    fn resolve_set(&mut self, ctx: &mut Ctx) -> bool {
        let n = self.params.n;
        let idx = self.idx;
        let Some(f) = self.fence.as_mut() else { return false };
        let mut newest: Option<Membership> = None;
        for a in &f.answers {
            if let Answer::Got(info) = a {
                if info.members.version > 0 && newest.as_ref().is_none_or(|m| info.members.order() > m.order()) {
                    newest = Some(info.members.clone());
                }
            }
        }
        if let Some(set) = &newest {
            let fresh: Vec<usize> = set
                .members
                .iter()
                .chain(&set.previous)
                .filter_map(|m| slot_of(&m.name))
                .filter(|&s| !f.probed[s])
                .collect();
            if !fresh.is_empty() && f.rounds < STORED_SET_ROUNDS_MAX {
                f.rounds += 1;
                for s in fresh {
                    f.probed[s] = true;
                    let sid = ctx.open(idx, s);
                    ctx.send(sid, true, Msg::Probe);
                    f.ctrl[s] = Some(sid);
                    f.answers[s] = Answer::Waiting;
                }
                self.arm_stage(PROBE, ctx);
                return false;
            }
        }
        f.set = newest.unwrap_or_else(|| Membership { version: 0, ..initial_set(n) });
        true
    }

    /// A member of the set, or of the set it replaced (fenced too, as
    /// `startup::fence` does: a majority of both).
    fn in_set(&self, i: usize) -> bool {
        self.in_newest(i)
            || self.fence.as_ref().is_some_and(|f| f.set.previous.iter().any(|m| slot_of(&m.name) == Some(i)))
    }

    fn in_newest(&self, i: usize) -> bool {
        self.fence.as_ref().is_some_and(|f| f.set.members.iter().any(|m| slot_of(&m.name) == Some(i)))
    }

    /// (answered, members, needed) of the first of the set and the set it
    /// replaced that fewer than a majority of `got` covers, as
    /// `short_of_joint_majority` in production.
    fn short(&self, got: &[(usize, crate::model::ReplicaInfo)], rules: &Rules) -> Option<(usize, usize, usize)> {
        let f = self.fence.as_ref()?;
        let answered = |name: &str| got.iter().any(|(g, _)| slot_of(name) == Some(*g));
        members::short_of_majority(rules.fence_sets(&f.set).into_iter().map(|s| &s[..]), answered)
    }

    fn arm_stage(&mut self, stage: u8, ctx: &mut Ctx) {
        let at = ctx.now + STAGE_TIMEOUT_US;
        ctx.effects.push(Effect::Timer { host: self.idx, at, timer: HostTimer::FenceStage(stage) });
    }

    fn ctrl_index(&self, sid: Sid) -> Option<usize> {
        self.fence.as_ref()?.ctrl.iter().position(|s| *s == Some(sid))
    }

    pub(crate) fn on_fence_msg(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        let Some(i) = self.ctrl_index(sid) else { return };
        let Some(f) = self.fence.as_mut() else { return };
        match (f.stage, msg) {
            // The raise session's first Info answers its probe.
            (RAISE, Msg::Info(_)) if !f.probe_replied[i] => {
                f.probe_replied[i] = true;
                return;
            }
            (PROBE | RAISE, Msg::Info(info)) if matches!(f.answers[i], Answer::Waiting) => {
                f.answers[i] = Answer::Got(info)
            }
            (PROBE | RAISE, Msg::Refused(_)) => f.answers[i] = Answer::Failed,
            (SEED, Msg::Log(recs)) => return self.finish_seed(recs, ctx),
            _ => return,
        }
        self.fence_progress(ctx);
    }

    pub(crate) fn on_fence_closed(&mut self, sid: Sid, ctx: &mut Ctx) {
        let Some(i) = self.ctrl_index(sid) else { return };
        let Some(f) = self.fence.as_mut() else { return };
        f.ctrl[i] = None;
        if f.stage == SEED {
            return self.finish_seed(Vec::new(), ctx);
        }
        if matches!(f.answers[i], Answer::Waiting) {
            f.answers[i] = Answer::Failed;
        }
        self.fence_progress(ctx);
    }

    pub(crate) fn on_fence_timeout(&mut self, stage: u8, ctx: &mut Ctx) {
        let Some(f) = self.fence.as_mut().filter(|f| f.stage == stage && self.phase == Phase::Fencing) else {
            return;
        };
        if stage == SEED {
            return self.finish_seed(Vec::new(), ctx);
        }
        for a in f.answers.iter_mut().filter(|a| matches!(a, Answer::Waiting)) {
            *a = Answer::Failed;
        }
        self.fence_progress(ctx);
    }

    fn fence_progress(&mut self, ctx: &mut Ctx) {
        let Some(f) = self.fence.as_ref() else { return };
        if f.answers.iter().any(|a| matches!(a, Answer::Waiting)) {
            return;
        }
        match f.stage {
            PROBE => self.after_probe(ctx),
            RAISE => self.after_raise(ctx),
            _ => {}
        }
    }

    /// The answers of members of the set.
    fn got(&self) -> Vec<(usize, crate::model::ReplicaInfo)> {
        let Some(f) = self.fence.as_ref() else { return Vec::new() };
        let got = f.answers.iter().enumerate().filter(|(i, _)| self.in_set(*i));
        got.filter_map(|(i, a)| if let Answer::Got(h) = a { Some((i, h.clone())) } else { None }).collect()
    }

    /// Epoch strictly above every epoch seen, asked of every probed replica.
    fn after_probe(&mut self, ctx: &mut Ctx) {
        if !self.resolve_set(ctx) {
            return;
        }
        let q = self.params.quorum;
        if self.fence.as_ref().is_some_and(|f| f.set.members.len() < q) {
            return self.fence_failed(format!("the stored set has fewer members than Q = {q}"), ctx);
        }
        let got = self.got();
        if let Some((n, of, need)) = self.short(&got, ctx.rules) {
            return self.fence_failed(format!("only {n} of {of} replicas reachable, {need} needed"), ctx);
        }
        let epoch = ctx.rules.next_epoch(got.iter().map(|(_, h)| h.epoch));
        let idx = self.idx;
        let Some(f) = self.fence.as_mut() else { return };
        f.epoch = epoch;
        f.stage = RAISE;
        f.probe_replied = vec![false; f.ctrl.len()];
        // As `raise_epoch` does: a fresh probe session, then SetEpoch on it.
        for (i, a) in f.answers.iter_mut().enumerate() {
            if !got.iter().any(|(g, _)| *g == i) {
                *a = Answer::Failed;
            }
        }
        for (i, _) in &got {
            if let Some(old) = f.ctrl[*i].take() {
                ctx.effects.push(Effect::Close { sid: old, by_replica: false });
            }
            let sid = ctx.open(idx, *i);
            ctx.send(sid, true, Msg::Probe);
            ctx.send(sid, true, Msg::SetEpoch(epoch));
            f.ctrl[*i] = Some(sid);
            f.answers[*i] = Answer::Waiting;
        }
        ctx.trace(|| format!("host {} asks epoch {epoch} of {} replicas", self.idx, got.len()));
        self.arm_stage(RAISE, ctx);
        self.fence_progress(ctx);
    }

    /// The leader is the highest position among the fenced majority; its
    /// history up to its durable seq is the branch point.
    fn after_raise(&mut self, ctx: &mut Ctx) {
        let all = self.got();
        if let Some((n, of, need)) = self.short(&all, ctx.rules) {
            let why = format!("epoch raised on only {n} of {of} replicas, {need} needed (contended)");
            return self.fence_failed(why, ctx);
        }
        let fenced: Vec<_> = all.iter().filter(|(i, _)| self.in_newest(*i)).cloned().collect();
        let positions: Vec<_> = fenced.iter().map(|(_, h)| h.position()).collect();
        let Some(top) = ctx.rules.choose_leader(&positions) else { return self.fence_failed("no leader".into(), ctx) };
        let Some((leader, lh)) = fenced.iter().find(|(_, h)| h.position() == positions[top]) else {
            return self.fence_failed("no leader".into(), ctx);
        };
        // As production: a removed member ahead of every member is in doubt.
        if all.iter().any(|(i, h)| !self.in_newest(*i) && h.position() > lh.position()) {
            return self.fence_failed("a removed member is ahead of every member".into(), ctx);
        }
        let epoch = self.fence.as_ref().map_or(0, |f| f.epoch);
        // `History::branch` asserts this; production would panic here. Only
        // an epoch granted twice (a defect) gets here.
        if epoch <= lh.history.last_epoch() {
            let why = format!("leader {leader}'s history already holds epoch {}", lh.history.last_epoch());
            return self.fence_failed(why, ctx);
        }
        let start = lh.durable;
        let history = lh.history.branch(epoch, start);
        let mut initial = vec![None; self.params.slots];
        for (i, h) in &fenced {
            match ctx.rules.standing(&history, start, &h.history, h.durable) {
                Standing::Prefix => initial[*i] = Some(h.durable),
                d => ctx.trace(|| format!("host {} fence: replica {i} {d}; lagging", self.idx)),
            }
        }
        ctx.trace(|| {
            format!("host {} fenced epoch {epoch}: leader {leader} at {}, branch {start}", self.idx, positions[top])
        });
        self.seed(epoch, start, history, initial, ctx);
    }

    /// `seed_from_leader`: the records (lowest prefix durable, start] from
    /// a replica at the branch point, if they fit half the write queue.
    fn seed(
        &mut self,
        epoch: u64,
        start: u64,
        history: starblk_replica::history::History,
        initial: Vec<Option<u64>>,
        ctx: &mut Ctx,
    ) {
        let low = initial.iter().flatten().copied().min().unwrap_or(start);
        let from = initial.iter().position(|d| *d == Some(start));
        let Some(f) = self.fence.as_mut() else { return };
        (f.epoch, f.start, f.history, f.initial, f.low) = (epoch, start, history, initial, low);
        let sid = from.and_then(|i| f.ctrl[i]);
        let fits = (start - low) as usize <= self.params.queue_cap / 2;
        match sid {
            Some(sid) if low < start && fits => {
                f.stage = SEED;
                f.seed_from = from;
                ctx.send(sid, true, Msg::LogRead { from: low + 1, to: start });
                self.arm_stage(SEED, ctx);
            }
            _ => self.finish_seed(Vec::new(), ctx),
        }
    }

    /// Seeds only a whole, gap-free range (as production checks).
    fn finish_seed(&mut self, recs: Vec<Record>, ctx: &mut Ctx) {
        let Some(f) = self.fence.take() else { return };
        let whole = recs.len() as u64 == f.start - f.low
            && recs.iter().enumerate().all(|(k, r)| r.id.seq == f.low + 1 + k as u64);
        let seed = if whole { recs } else { Vec::new() };
        for sid in f.ctrl.iter().flatten() {
            ctx.effects.push(Effect::Close { sid: *sid, by_replica: false });
        }
        self.epoch = f.epoch;
        let set = f.set.clone();
        self.go_running(f.start, f.history, &f.initial, seed, set.clone());
        ctx.effects.push(Effect::Fenced { host: self.idx, epoch: f.epoch, set, started: f.started });
        self.start_links(ctx);
    }

    fn fence_failed(&mut self, why: String, ctx: &mut Ctx) {
        ctx.trace(|| format!("host {} fence failed: {why}", self.idx));
        if let Some(f) = self.fence.take() {
            for sid in f.ctrl.iter().flatten() {
                ctx.effects.push(Effect::Close { sid: *sid, by_replica: false });
            }
        }
        self.phase = Phase::Dead;
        self.why_dead = why;
    }
}
