//! The world: one seeded event queue that drives replicas, hosts, the
//! network and the disk, single-threaded, so a seed replays exactly.
//! Fault injection and the workload are in `chaos.rs`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use crate::chaos::Params;
use crate::checker::{Checker, Violation};
use crate::host::{Host, HostParams};
use crate::model::PeerMsg;
use crate::model::{Ctx, Effect, HostTimer, Msg, Sid, Time};
use crate::net::Net;
use crate::replica::{Replica, ReplicaParams};
use crate::rng::Rng;
use crate::rules::Rules;

/// How long the final host gets to fence and level the replicas, µs.
const FINAL_SETTLE_US: Time = 55_000;
/// Extra final hosts started when one fails to fence.
const FINAL_TRIES: u32 = 3;

/// How to run a seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print every step.
    pub verbose: bool,
    /// The rules (production's, or with one defect put back).
    pub rules: Rules,
    /// Check only the data properties (not the protocol ones, 5-6).
    pub data_only: bool,
    /// Let the operator add replicas past 2Q - 1 members (Q is then no
    /// longer a majority of the set).
    pub grow_past_quorum: bool,
}

/// What happened in one run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// The first violation, with the step and time it was seen at.
    pub violation: Option<(Violation, u64, Time)>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Other things counted (liveness findings), by kind.
    pub notes: BTreeMap<&'static str, u64>,
    /// Events processed.
    pub steps: u64,
    /// Writes issued and completed, reads checked.
    pub writes: u64,
    pub completed: u64,
    pub reads: u64,
    /// Hosts that finished fencing.
    pub fenced: u64,
    /// Recovery copies finished; membership changes committed.
    pub copies: u64,
    pub member_changes: u64,
    /// Replicas up to date under the final host (0: final state unchecked).
    pub final_replicas: usize,
}

/// Something that happens at a time.
#[derive(Debug)]
pub(crate) enum Event {
    Deliver {
        sid: Sid,
        to_replica: bool,
        msg: Msg,
    },
    /// One end learns that the session ended.
    Ended {
        sid: Sid,
        to_replica: bool,
    },
    CommitKick {
        replica: usize,
        life: u64,
    },
    CommitDone {
        replica: usize,
        life: u64,
        ok: bool,
    },
    HostTimer {
        host: usize,
        timer: HostTimer,
    },
    WriteTick {
        host: usize,
    },
    ReadTick {
        host: usize,
    },
    Chaos,
    RestartReplica {
        replica: usize,
    },
    ReplicaTimer {
        replica: usize,
        life: u64,
        token: u64,
    },
    PeerDeliver {
        chan: u64,
        to_src: bool,
        msg: PeerMsg,
    },
    /// The recovering end learns that its peer channel broke.
    PeerEnded {
        chan: u64,
    },

    Heal {
        id: u64,
    },
    EndChaos,
    FinalHost,
    Finish,
}

struct Scheduled {
    at: Time,
    order: u64,
    ev: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest, then the first scheduled.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.order).cmp(&(self.at, self.order))
    }
}

/// A channel between a recovering replica (`dst`) and its source.
#[derive(Debug, Clone)]
pub(crate) struct PeerChan {
    dst: usize,
    src: usize,
    lives: (u64, u64),
    open: bool,
    /// Arrival of the last frame each way (0: to dst, 1: to src).
    last: [Time; 2],
}

/// The simulated world.
pub struct World {
    pub(crate) p: Params,
    pub(crate) rng: Rng,
    pub(crate) now: Time,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) hosts: Vec<Host>,
    pub(crate) net: Net,
    pub(crate) peers: Vec<PeerChan>,
    pub(crate) checker: Checker,
    pub(crate) out: Outcome,
    pub(crate) chaos_on: bool,
    pub(crate) done: bool,
    /// Replicas whose disk has failed or will (an EIO is on its way).
    doomed: Vec<bool>,
    final_tries: u32,
    opts: Options,
    queue: BinaryHeap<Scheduled>,
    order: u64,
}

/// Runs one seed to the end (or to its first violation).
pub fn run_seed(seed: u64, opts: &Options) -> Outcome {
    let mut rng = Rng::new(seed);
    let p = Params::draw(&mut rng);
    let initial = crate::chaos::initial_set(p.n);
    let rp = ReplicaParams {
        blocks: p.blocks,
        log_cap: p.log_cap,
        recent_cap: p.recent_cap,
        persist_every: p.persist_every,
    };
    let replicas = (0..p.slots()).map(|i| Replica::new(i, rp, (i < p.n).then(|| initial.clone()))).collect();
    let mut w = World {
        replicas,
        hosts: Vec::new(),
        net: Net::default(),
        peers: Vec::new(),
        checker: Checker::new(p.blocks, p.slots(), !opts.data_only),
        out: Outcome { seed, ..Outcome::default() },
        chaos_on: true,
        done: false,
        doomed: vec![false; p.slots()],
        final_tries: 0,
        now: 0,
        opts: *opts,
        queue: BinaryHeap::new(),
        order: 0,
        rng,
        p,
    };
    if opts.verbose {
        println!("seed {seed}: {:?}", w.p);
    }
    w.begin();
    w.run();
    w.out
}

impl World {
    pub(crate) fn grow_past_quorum(&self) -> bool {
        self.opts.grow_past_quorum
    }

    pub(crate) fn schedule(&mut self, at: Time, ev: Event) {
        self.order += 1;
        self.queue.push(Scheduled { at, order: self.order, ev });
    }

    fn run(&mut self) {
        while let Some(s) = self.queue.pop() {
            self.now = s.at;
            self.out.steps += 1;
            if self.opts.verbose {
                println!("[{} t={}us]{} {}", self.out.steps, self.now, self.ends(&s.ev), brief(&s.ev));
            }
            self.dispatch(s.ev);
            if self.done || self.out.violation.is_some() {
                return;
            }
        }
    }

    /// " host H -> replica R" for a session's events (the trace).
    fn ends(&self, ev: &Event) -> String {
        if let Event::PeerDeliver { chan, to_src, .. } = ev {
            let c = &self.peers[*chan as usize];
            return match to_src {
                true => format!(" replica {} -> source {}", c.dst, c.src),
                false => format!(" source {} -> replica {}", c.src, c.dst),
            };
        }
        let (Event::Deliver { sid, to_replica, .. } | Event::Ended { sid, to_replica }) = ev else {
            return String::new();
        };
        let s = &self.net.sessions[*sid as usize];
        match to_replica {
            true => format!(" host {} -> replica {}", s.host, s.replica),
            false => format!(" replica {} -> host {}", s.replica, s.host),
        }
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Deliver { sid, to_replica, msg } => self.deliver(sid, to_replica, msg),
            Event::Ended { sid, to_replica } => self.ended(sid, to_replica),
            Event::CommitKick { replica, life } if self.alive(replica, life) => {
                self.with_replica(replica, |r, ctx| r.on_kick(ctx))
            }
            Event::CommitDone { replica, life, ok } if self.alive(replica, life) => {
                self.with_replica(replica, |r, ctx| r.on_commit_done(ok, ctx))
            }
            Event::HostTimer { host, timer } if self.hosts[host].is_alive() => {
                self.with_host(host, |h, ctx| h.on_timer(timer, ctx))
            }
            Event::WriteTick { host } => self.write_tick(host),
            Event::ReadTick { host } => self.read_tick(host),
            Event::Chaos => self.chaos(),
            Event::RestartReplica { replica } => self.restart_replica(replica),
            Event::ReplicaTimer { replica, life, token } if self.alive(replica, life) => {
                self.with_replica(replica, |r, ctx| r.on_timer(token, ctx))
            }
            Event::PeerDeliver { chan, to_src, msg } => self.peer_deliver(chan, to_src, msg),
            Event::PeerEnded { chan } => {
                let c = &self.peers[chan as usize];
                let (dst, life) = (c.dst, c.lives.0);
                if self.alive(dst, life) {
                    self.with_replica(dst, |r, ctx| r.on_peer_closed(chan, ctx));
                }
            }

            Event::Heal { id } => self.net.heal(id),
            Event::EndChaos => self.end_chaos(),
            Event::FinalHost => self.spawn_host(true),
            Event::Finish => self.finish(),
            _ => {}
        }
    }

    fn alive(&self, replica: usize, life: u64) -> bool {
        let r = &self.replicas[replica];
        r.up && r.incarnation == life
    }

    /// Runs a replica handler and applies its effects.
    pub(crate) fn with_replica(&mut self, i: usize, f: impl FnOnce(&mut Replica, &mut Ctx)) {
        let rules = self.opts.rules;
        let mut ctx = Ctx::new(self.now, &rules, self.opts.verbose, self.net.next_sid(), self.peers.len() as u64);
        f(&mut self.replicas[i], &mut ctx);
        self.apply(ctx.effects);
    }

    /// Runs a host handler and applies its effects.
    pub(crate) fn with_host(&mut self, i: usize, f: impl FnOnce(&mut Host, &mut Ctx)) {
        let rules = self.opts.rules;
        let mut ctx = Ctx::new(self.now, &rules, self.opts.verbose, self.net.next_sid(), self.peers.len() as u64);
        f(&mut self.hosts[i], &mut ctx);
        self.apply(ctx.effects);
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            self.apply_one(e);
        }
    }

    fn apply_one(&mut self, e: Effect) {
        match e {
            Effect::Open { sid, host, replica } => self.net.open(sid, host, replica),
            Effect::Send { sid, to_replica, msg } => self.send(sid, to_replica, msg),
            Effect::Close { sid, by_replica } => self.close(sid, by_replica),
            Effect::StartCommit { replica } => self.start_commit(replica),
            Effect::KickCommit { replica } => {
                let (at, life) = (self.now + self.rng.below(100), self.replicas[replica].incarnation);
                self.schedule(at, Event::CommitKick { replica, life });
            }
            Effect::Timer { host, at, timer } => self.schedule(at, Event::HostTimer { host, timer }),
            Effect::ReplicaTimer { replica, at, token } => {
                let life = self.replicas[replica].incarnation;
                self.schedule(at, Event::ReplicaTimer { replica, life, token })
            }
            Effect::PeerOpen { chan, dst, src, epoch } => self.peer_open(chan, dst, src, epoch),
            Effect::PeerSend { chan, to_src, msg } => self.peer_send(chan, to_src, msg),
            Effect::PeerClose { chan } => self.peers[chan as usize].open = false,
            Effect::Trace(line) => println!("    {line}"),
            Effect::Note(what) => *self.out.notes.entry(what).or_insert(0) += 1,
            ghost => self.observe(ghost),
        }
    }

    /// Effects that only the checker sees.
    fn observe(&mut self, e: Effect) {
        if self.opts.verbose && !matches!(e, Effect::Accepted { .. } | Effect::Joined { .. }) {
            println!("    ghost: {e:?}");
        }
        let res = match e {
            Effect::Issued { record } => {
                self.out.writes += 1;
                self.checker.issued(record);
                Ok(())
            }
            Effect::Completed { host, id, clean_support, counted } => {
                self.out.completed += 1;
                let fenced = self.majority_epoch_above(self.hosts[host].epoch);
                self.checker
                    .completed(id, clean_support, self.p.quorum, fenced)
                    .and_then(|()| self.checker.counted(host, id, &counted))
            }
            Effect::CopyFinished { replica, durable, history, data } => {
                self.out.copies += 1;
                self.checker.copy_finished(replica, durable, &history, &data)
            }
            Effect::Progress { host, replica, meter, fraction, done, total, finished } => {
                self.checker.progress(host, replica, meter, fraction, done, total, finished)
            }
            Effect::MembersInEffect { host, set, committed } => {
                self.out.member_changes += committed as u64;
                self.checker.members_in_effect(host, set, committed, self.now)
            }
            Effect::ReadDone { host, block, value, floor } => {
                self.out.reads += 1;
                self.checker.read(host, block, value, floor)
            }
            Effect::Fenced { host, epoch, set, started } => {
                self.out.fenced += 1;
                self.checker.fenced(host, epoch).and_then(|()| self.checker.fenced_set(host, &set, started))
            }
            Effect::Joined { replica, epoch } => {
                self.checker.joined(replica, epoch);
                Ok(())
            }
            Effect::Accepted { replica, epoch } => self.checker.accepted(replica, epoch),
            _ => Ok(()),
        };
        if let Err(v) = res {
            self.violated(v);
        }
    }

    pub(crate) fn violated(&mut self, v: Violation) {
        if self.out.violation.is_none() {
            self.out.violation = Some((v, self.out.steps, self.now));
        }
    }

    /// The highest epoch above `epoch` that a majority of the replicas
    /// that belong to the volume has persisted.
    fn majority_epoch_above(&self, epoch: u64) -> Option<u64> {
        let mut epochs: Vec<u64> = self.replicas.iter().filter(|r| r.stamped).map(|r| r.epoch).collect();
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        let e = epochs[epochs.len() / 2];
        (e > epoch).then_some(e)
    }

    fn peer_open(&mut self, chan: u64, dst: usize, src: usize, epoch: u64) {
        debug_assert_eq!(chan, self.peers.len() as u64, "channels are numbered in order");
        let lives = (self.replicas[dst].incarnation, self.replicas[src].incarnation);
        self.peers.push(PeerChan { dst, src, lives, open: true, last: [0; 2] });
        if self.replicas[src].up {
            self.replicas[src].on_peer_open(chan, epoch);
        }
    }

    fn peer_reachable(&self, chan: u64) -> bool {
        let c = &self.peers[chan as usize];
        c.open && self.alive(c.dst, c.lives.0) && self.alive(c.src, c.lives.1) && !self.net.peers_cut(c.dst, c.src)
    }

    fn peer_send(&mut self, chan: u64, to_src: bool, msg: PeerMsg) {
        if !self.peers[chan as usize].open {
            return;
        }
        let delay = self.p.delay(&mut self.rng);
        let c = &mut self.peers[chan as usize];
        let dir = to_src as usize;
        let at = (self.now + delay).max(c.last[dir] + 1);
        c.last[dir] = at;
        self.schedule(at, Event::PeerDeliver { chan, to_src, msg });
    }

    fn peer_deliver(&mut self, chan: u64, to_src: bool, msg: PeerMsg) {
        if !self.peers[chan as usize].open {
            return;
        }
        if !self.peer_reachable(chan) {
            return self.peer_abort(chan);
        }
        let c = &self.peers[chan as usize];
        let (dst, src) = (c.dst, c.src);
        if to_src {
            self.with_replica(src, |r, ctx| r.on_peer_request(chan, msg, ctx));
        } else {
            self.with_replica(dst, |r, ctx| r.on_peer_msg(chan, msg, ctx));
        }
    }

    /// A peer channel breaks; the recovering end notices after a while.
    pub(crate) fn peer_abort(&mut self, chan: u64) {
        let c = &mut self.peers[chan as usize];
        if !c.open {
            return;
        }
        c.open = false;
        let detect = self.rng.range(200, 3_000);
        self.schedule(self.now + detect, Event::PeerEnded { chan });
    }

    /// Breaks the open peer channels that `pred` picks.
    pub(crate) fn abort_peers(&mut self, pred: impl Fn(&PeerChan) -> bool) {
        let chans: Vec<u64> = (0..self.peers.len() as u64)
            .filter(|&c| self.peers[c as usize].open && pred(&self.peers[c as usize]))
            .collect();
        for c in chans {
            self.peer_abort(c);
        }
    }

    fn send(&mut self, sid: Sid, to_replica: bool, msg: Msg) {
        if !self.net.flows(sid, to_replica) {
            return;
        }
        let delay = self.p.delay(&mut self.rng);
        let at = self.net.arrival(sid, to_replica, self.now, delay);
        let dup = matches!(msg, Msg::Write(_) | Msg::Durable { .. }) && self.rng.chance(self.p.dup_per_mille);
        if dup {
            self.fault("message duplicated");
            let at2 = self.net.arrival(sid, to_replica, self.now, delay);
            self.schedule(at2, Event::Deliver { sid, to_replica, msg: msg.clone() });
        }
        self.schedule(at, Event::Deliver { sid, to_replica, msg });
    }

    /// An orderly end from one side: what it sent still arrives first.
    fn close(&mut self, sid: Sid, by_replica: bool) {
        let s = &mut self.net.sessions[sid as usize];
        if by_replica {
            s.to_replica = false;
        } else {
            s.to_host = false;
        }
        let at = self.net.end_arrival(sid, !by_replica, self.now);
        self.schedule(at, Event::Ended { sid, to_replica: !by_replica });
    }

    /// The session breaks: frames in flight are lost; each side notices.
    pub(crate) fn abort(&mut self, sid: Sid) {
        let s = &mut self.net.sessions[sid as usize];
        let was_open = s.to_replica || s.to_host;
        s.to_replica = false;
        s.to_host = false;
        if !was_open {
            return;
        }
        let detect = self.rng.range(200, 3_000);
        self.schedule(self.now + 1, Event::Ended { sid, to_replica: true });
        self.schedule(self.now + detect, Event::Ended { sid, to_replica: false });
    }

    fn deliver(&mut self, sid: Sid, to_replica: bool, msg: Msg) {
        if !self.net.flows(sid, to_replica) {
            return;
        }
        let s = &self.net.sessions[sid as usize];
        let (h, r) = (s.host, s.replica);
        let reachable = !self.net.is_cut(h, r) && self.replicas[r].up && self.hosts[h].is_alive();
        if !reachable {
            return self.abort(sid);
        }
        if to_replica {
            self.with_replica(r, |rep, ctx| rep.on_msg(sid, msg, ctx));
        } else {
            self.with_host(h, |host, ctx| host.on_msg(sid, msg, ctx));
        }
    }

    fn ended(&mut self, sid: Sid, to_replica: bool) {
        let s = &mut self.net.sessions[sid as usize];
        let (h, r) = (s.host, s.replica);
        if to_replica {
            s.to_replica = false;
            if self.replicas[r].up {
                self.with_replica(r, |rep, ctx| rep.on_closed(sid, ctx));
            }
        } else {
            s.to_host = false;
            if self.hosts[h].is_alive() {
                self.with_host(h, |host, ctx| host.on_closed(sid, ctx));
            }
        }
    }

    /// The disk takes a while; it may fail the commit (EIO), within the
    /// run's budget of failed disks so a majority stays usable.
    fn start_commit(&mut self, replica: usize) {
        let doomed = self.doomed.iter().filter(|d| **d).count();
        let eio = if self.doomed[replica] {
            self.rng.chance(500)
        } else {
            doomed < self.p.eio_budget && self.chaos_on && self.rng.chance(self.p.eio_per_mille)
        };
        if eio {
            self.doomed[replica] = true;
            self.fault("disk EIO");
        }
        let at = self.now + self.rng.range(self.p.commit_min, self.p.commit_max);
        let life = self.replicas[replica].incarnation;
        self.schedule(at, Event::CommitDone { replica, life, ok: !eio });
    }

    pub(crate) fn fault(&mut self, kind: &'static str) {
        *self.out.faults.entry(kind).or_insert(0) += 1;
    }

    /// A new host (a takeover while others may still run).
    pub(crate) fn spawn_host(&mut self, final_host: bool) {
        let idx = self.hosts.len();
        let rtt = (0..self.p.slots()).map(|_| self.rng.range(1, 1_000)).collect();
        let params = HostParams {
            n: self.p.n,
            slots: self.p.slots(),
            quorum: self.p.quorum,
            blocks: self.p.blocks,
            queue_cap: self.p.queue_cap,
            max_inflight: self.p.max_inflight,
            rtt,
            final_host,
        };
        self.hosts.push(Host::new(idx, params));
        self.with_host(idx, |h, ctx| h.start(ctx));
        if !final_host {
            self.schedule(self.now + 1, Event::WriteTick { host: idx });
            self.schedule(self.now + 1, Event::ReadTick { host: idx });
        }
    }

    pub(crate) fn crash_replica(&mut self, i: usize) {
        if self.replicas[i].crash() {
            self.fault("torn commit");
        }
        self.fault("replica crash");
        let sids: Vec<Sid> =
            self.net.open_sessions().into_iter().filter(|s| self.net.sessions[*s as usize].replica == i).collect();
        for sid in sids {
            self.abort(sid);
        }
        self.abort_peers(|c| c.dst == i || c.src == i);
    }

    fn restart_replica(&mut self, i: usize) {
        if !self.replicas[i].up {
            self.replicas[i].restart();
        }
    }

    /// A host dies (kill -9): what its kernel had sent still arrives.
    pub(crate) fn crash_host(&mut self, i: usize) {
        for sid in self.hosts[i].crash() {
            if self.net.flows(sid, true) || self.net.flows(sid, false) {
                self.close(sid, false);
            }
        }
    }

    /// After the chaos: heal, restart, stop every host, then a final host
    /// fences and levels the replicas it can.
    fn end_chaos(&mut self) {
        self.chaos_on = false;
        for h in 0..self.hosts.len() {
            if self.hosts[h].is_alive() {
                self.crash_host(h);
            }
        }
        self.net.partitions.clear();
        for i in 0..self.replicas.len() {
            self.restart_replica(i);
        }
        self.schedule(self.now + 5_000, Event::FinalHost);
        self.schedule(self.now + 5_000 + FINAL_SETTLE_US, Event::Finish);
    }

    /// Properties 1 and 3 on the replicas up to date under the final host.
    /// A final host whose fence failed (a timeout) is retried, as an
    /// operator would run `up` again.
    fn finish(&mut self) {
        let running = self.hosts.last().is_some_and(|h| h.params.final_host && h.is_running());
        if !running && self.final_tries < FINAL_TRIES {
            self.final_tries += 1;
            self.spawn_host(true);
            return self.schedule(self.now + FINAL_SETTLE_US, Event::Finish);
        }
        self.done = true;
        let Some(h) = self.hosts.last().filter(|h| h.params.final_host && h.is_running()) else { return };
        let up: Vec<usize> = h.up_to_date();
        if self.opts.verbose {
            println!("final host {} epoch {} set {:?} links {:?}", h.idx, h.epoch, h.members, h.link_states());
        }
        self.out.final_replicas = up.len();
        let data: Vec<(usize, &[_])> = up.iter().map(|&r| (r, self.replicas[r].data.as_slice())).collect();
        if let Err(v) = self.checker.final_state(&data) {
            self.violated(v);
        }
    }
}

/// An event for the trace, without the bulky parts.
fn brief(ev: &Event) -> String {
    match ev {
        Event::Deliver { sid, to_replica, msg: Msg::Adopt { history, last } } => {
            format!(
                "Deliver {{ sid: {sid}, to_replica: {to_replica}, Adopt {{ last: {last}, steps: {:?} }} }}",
                history.steps()
            )
        }
        Event::Deliver { sid, to_replica, msg: Msg::Info(i) } => format!(
            "Deliver {{ sid: {sid}, to_replica: {to_replica}, Info {{ epoch: {}, durable: {}, position: {} }} }}",
            i.epoch,
            i.durable,
            i.position()
        ),
        other => format!("{other:?}"),
    }
}
