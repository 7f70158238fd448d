//! Membership changes by a running host, as `src/engine/membership.rs`
//! makes them: one at a time; `add` probes the new replica and stamps it
//! if it is empty; the next set (version + 1 at the host's epoch) goes to
//! every member of the old and the new set; it takes effect only if a
//! majority of each stored it (`Membership::change_committed`), else
//! those that stored it get the old set back as the version after.
//! `remove` refuses to leave fewer than Q members, fewer than Q up-to-date
//! replicas, or fewer than a majority of the new set connected.

use std::collections::BTreeMap;

use starblk_replica::members::{majority, Membership};

use crate::chaos::{member, slot_of};
use crate::host::{Host, LinkState};
use crate::model::{Ctx, Effect, HostTimer, Msg, Sid, Time};

/// How long each stage waits for answers (production: 3 s calls).
const STAGE_TIMEOUT_US: Time = 8_000;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Add replica slot.
    Add(usize),
    /// Remove replica slot.
    Remove(usize),
}

/// Why a change was refused before anything was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another change runs (`MembershipError::Busy`).
    Busy,
    /// Not running, or nothing to do (already a member, not a member).
    NotApplicable,
    /// `SmallerThanQuorum`.
    SmallerThanQuorum,
    /// `BelowQuorum`.
    BelowQuorum,
    /// `NoMajority`.
    NoMajority,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Probing the replica to add (and stamping it if empty).
    Prepare { slot: usize, stamping: bool },
    /// Storing `next` everywhere.
    Persist,
    /// Storing `back` (the old members) on those that took `next`.
    Rollback { back: Membership, persisted: Vec<String> },
}

/// A change in progress.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    kind: ChangeKind,
    old: Membership,
    next: Membership,
    stage: Stage,
    /// Numbers the stages, for their timers.
    id: u64,
    /// Open sessions of this stage: slot.
    pub sessions: BTreeMap<Sid, usize>,
    /// Answers of this stage by slot: stored (true) or failed (false).
    answers: BTreeMap<usize, Option<bool>>,
}

impl Host {
    /// The operator's `replica add` / `replica remove`.
    pub fn change_members(&mut self, kind: ChangeKind, ctx: &mut Ctx) -> Result<(), Refused> {
        if !self.is_running() || self.params.final_host {
            return Err(Refused::NotApplicable);
        }
        if self.change.is_some() {
            return Err(Refused::Busy);
        }
        let old = self.members.clone();
        let mut next = Membership {
            epoch: self.epoch,
            version: old.version + 1,
            members: old.members.clone(),
            previous: old.members.clone(),
        };
        match kind {
            ChangeKind::Add(slot) => {
                if self.is_member(slot) {
                    return Err(Refused::NotApplicable);
                }
                next.members.push(member(slot));
            }
            ChangeKind::Remove(slot) => {
                if !self.is_member(slot) {
                    return Err(Refused::NotApplicable);
                }
                next.members.retain(|m| slot_of(&m.name) != Some(slot));
                self.check_removal(&next)?;
            }
        }
        ctx.trace(|| format!("host {} {kind:?}: set {:?} -> {:?}", self.idx, old.order(), next.order()));
        let mut c = Change {
            kind,
            old,
            next,
            stage: Stage::Persist,
            id: 0,
            sessions: BTreeMap::new(),
            answers: BTreeMap::new(),
        };
        if let ChangeKind::Add(slot) = kind {
            c.stage = Stage::Prepare { slot, stamping: false };
            self.change = Some(c);
            self.open_stage(&[slot], Msg::Probe, None, ctx);
        } else {
            self.change = Some(c);
            self.persist_stage(ctx);
        }
        Ok(())
    }

    /// `check_removal`.
    fn check_removal(&self, next: &Membership) -> Result<(), Refused> {
        let q = self.params.quorum;
        let left = next.members.len();
        if left < q {
            return Err(Refused::SmallerThanQuorum);
        }
        let slots: Vec<usize> = next.members.iter().filter_map(|m| slot_of(&m.name)).collect();
        let state = |s: &usize| self.links[*s].state;
        if slots.iter().filter(|s| state(s) == LinkState::UpToDate).count() < q {
            return Err(Refused::BelowQuorum);
        }
        let connected = slots.iter().filter(|s| matches!(state(s), LinkState::UpToDate | LinkState::Recovering));
        if connected.count() < majority(left) {
            return Err(Refused::NoMajority);
        }
        Ok(())
    }

    /// Opens one session per slot for a new stage: `first` (Probe or a
    /// Hello), then `then` if any.
    fn open_stage(&mut self, slots: &[usize], first: Msg, then: Option<Msg>, ctx: &mut Ctx) {
        let (idx, epoch) = (self.idx, self.epoch);
        let Some(c) = self.change.as_mut() else { return };
        for sid in std::mem::take(&mut c.sessions).into_keys() {
            ctx.effects.push(Effect::Close { sid, by_replica: false });
        }
        c.answers.clear();
        c.id += 1;
        for &slot in slots {
            let sid = ctx.open(idx, slot);
            ctx.send(sid, true, first.clone());
            if let Some(m) = &then {
                ctx.send(sid, true, m.clone());
            }
            c.sessions.insert(sid, slot);
            c.answers.insert(slot, None);
        }
        let _ = epoch;
        let at = ctx.now + STAGE_TIMEOUT_US;
        ctx.effects.push(Effect::Timer { host: idx, at, timer: HostTimer::Change(c.id) });
    }

    /// `store_everywhere(old, next)`: every member of either set.
    fn persist_stage(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.change.as_mut() else { return };
        c.stage = Stage::Persist;
        let targets = union(&c.old, &c.next);
        let msg = Msg::SetMembers(c.next.clone());
        self.open_stage(&targets, Msg::Hello(self.epoch), Some(msg), ctx);
    }

    pub(crate) fn on_change_msg(&mut self, sid: Sid, msg: Msg, ctx: &mut Ctx) {
        let epoch = self.epoch;
        let Some(c) = self.change.as_mut() else { return };
        let Some(&slot) = c.sessions.get(&sid) else { return };
        match (&c.stage, msg) {
            (Stage::Prepare { stamping: false, .. }, Msg::Info(info)) => {
                if info.stamped {
                    // A replica of this volume (removed earlier): recovery
                    // brings it back.
                    return self.persist_stage(ctx);
                }
                c.stage = Stage::Prepare { slot, stamping: true };
                let members = Membership { epoch, version: 0, members: c.next.members.clone(), previous: Vec::new() };
                ctx.send(sid, true, Msg::Stamp { epoch, members });
            }
            (Stage::Prepare { stamping: true, .. }, Msg::MembersOk) => self.persist_stage(ctx),
            (Stage::Prepare { .. }, Msg::Refused(_)) => self.abandon(ctx),
            (Stage::Persist | Stage::Rollback { .. }, Msg::MembersOk) => {
                c.answers.insert(slot, Some(true));
                self.stage_progress(ctx);
            }
            (Stage::Persist | Stage::Rollback { .. }, Msg::Refused(_)) => {
                c.answers.insert(slot, Some(false));
                self.stage_progress(ctx);
            }
            _ => {}
        }
    }

    pub(crate) fn on_change_closed(&mut self, sid: Sid, ctx: &mut Ctx) {
        let Some(c) = self.change.as_mut() else { return };
        let Some(slot) = c.sessions.remove(&sid) else { return };
        if matches!(c.stage, Stage::Prepare { .. }) {
            return self.abandon(ctx);
        }
        if c.answers.get(&slot) == Some(&None) {
            c.answers.insert(slot, Some(false));
        }
        self.stage_progress(ctx);
    }

    pub(crate) fn on_change_timeout(&mut self, id: u64, ctx: &mut Ctx) {
        let Some(c) = self.change.as_mut().filter(|c| c.id == id) else { return };
        if matches!(c.stage, Stage::Prepare { .. }) {
            return self.abandon(ctx);
        }
        for a in c.answers.values_mut().filter(|a| a.is_none()) {
            *a = Some(false);
        }
        self.stage_progress(ctx);
    }

    /// The add failed before anything was stored (`prepare_new_replica`).
    fn abandon(&mut self, ctx: &mut Ctx) {
        if let Some(c) = self.change.take() {
            ctx.trace(|| format!("host {} {:?} failed before storing anything", self.idx, c.kind));
            for sid in c.sessions.into_keys() {
                ctx.effects.push(Effect::Close { sid, by_replica: false });
            }
        }
        ctx.effects.push(Effect::Note("membership change failed"));
    }

    fn stage_progress(&mut self, ctx: &mut Ctx) {
        let Some(c) = self.change.as_ref() else { return };
        if c.answers.values().any(Option::is_none) {
            return;
        }
        let stored: Vec<String> =
            c.answers.iter().filter(|(_, a)| **a == Some(true)).map(|(s, _)| member(*s).name).collect();
        match c.stage.clone() {
            Stage::Persist => self.after_persist(stored, ctx),
            Stage::Rollback { back, persisted } => self.after_rollback(back, persisted, stored, ctx),
            Stage::Prepare { .. } => {}
        }
    }

    /// `persist`: in effect on a majority of both sets; else roll back.
    fn after_persist(&mut self, persisted: Vec<String>, ctx: &mut Ctx) {
        let Some(c) = self.change.as_ref() else { return };
        let (kind, old, next) = (c.kind, c.old.clone(), c.next.clone());
        if ctx.rules.change_committed(&old, &next, &persisted) {
            ctx.trace(|| {
                format!("host {} {kind:?} committed as {:?} (stored on {persisted:?})", self.idx, next.order())
            });
            self.end_change(ctx);
            self.members = next.clone();
            match kind {
                ChangeKind::Add(slot) => self.add_link(slot, ctx),
                ChangeKind::Remove(slot) => self.remove_link(slot, ctx),
            }
            ctx.effects.push(Effect::MembersInEffect { host: self.idx, set: next, committed: true });
            return;
        }
        ctx.trace(|| format!("host {} {kind:?} not committed (stored on {persisted:?})", self.idx));
        ctx.effects.push(Effect::Note("membership change not committed"));
        if persisted.is_empty() {
            return self.end_change(ctx);
        }
        let back = Membership {
            epoch: next.epoch,
            version: next.version + 1,
            members: old.members.clone(),
            previous: next.members.clone(),
        };
        let targets = union(&next, &back);
        let msg = Msg::SetMembers(back.clone());
        if let Some(c) = self.change.as_mut() {
            c.stage = Stage::Rollback { back, persisted };
        }
        self.open_stage(&targets, Msg::Hello(self.epoch), Some(msg), ctx);
    }

    fn after_rollback(&mut self, back: Membership, persisted: Vec<String>, restored: Vec<String>, ctx: &mut Ctx) {
        let Some(c) = self.change.as_ref() else { return };
        let old = c.old.clone();
        self.end_change(ctx);
        if restored.len() == persisted.len() || old.change_committed(&back, &restored) {
            self.members = back.clone();
            ctx.effects.push(Effect::MembersInEffect { host: self.idx, set: back, committed: false });
        }
    }

    fn end_change(&mut self, ctx: &mut Ctx) {
        if let Some(c) = self.change.take() {
            for sid in c.sessions.into_keys() {
                ctx.effects.push(Effect::Close { sid, by_replica: false });
            }
        }
    }
}

/// The slots of `a`'s members, then those of `b` not in `a`.
fn union(a: &Membership, b: &Membership) -> Vec<usize> {
    let mut out: Vec<usize> = a.members.iter().filter_map(|m| slot_of(&m.name)).collect();
    for s in b.members.iter().filter_map(|m| slot_of(&m.name)) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}
