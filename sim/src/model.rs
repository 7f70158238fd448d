//! Vocabulary shared by the simulated nodes: identities, records, the
//! messages of the protocol, and the effects a node asks the world for.
//!
//! Nodes never touch the network, the disk or the clock themselves: a
//! handler gets a [`Ctx`] and leaves [`Effect`]s in it, which the world
//! applies after the handler returns (sans-IO, like `history.rs`).

use std::fmt;

use starblk_replica::history::{History, Position};
use starblk_replica::members::Membership;
use starblk_replica::superblock::CopyKind;

use crate::rules::Rules;

/// Simulated time in microseconds.
pub type Time = u64;
/// A session (an ordered stream between one host and one replica).
pub type Sid = u64;

/// A write's identity and its value: unique per write. Orders like a
/// history position (epoch first, then seq); the host only breaks the tie
/// two hosts of one epoch would make, which only a defect allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId {
    /// Epoch of the host that issued it (the record's epoch).
    pub epoch: u64,
    /// Its seq in that host's history.
    pub seq: u64,
    /// The issuing host.
    pub host: u32,
}

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w(epoch {} seq {} host {})", self.epoch, self.seq, self.host)
    }
}

/// One log record: a whole-block write whose value is its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The write (and the value stored in the block).
    pub id: WriteId,
    /// Block written.
    pub block: u32,
}

/// What a replica reports in HelloOk: its epoch and where it stands.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    /// Persisted epoch.
    pub epoch: u64,
    /// Durable seq.
    pub durable: u64,
    /// The history its log follows.
    pub history: History,
    /// A copy in progress: its kind and the next live seq its log expects.
    pub copying: Option<(CopyKind, u64)>,
    /// The replica set it stores (version 0: none).
    pub members: Membership,
    /// It belongs to the volume (stamped); a spare replica does not yet.
    pub stamped: bool,
}

impl ReplicaInfo {
    /// Its position (epoch of the last durable record, durable seq).
    pub fn position(&self) -> Position {
        self.history.position(self.durable)
    }
}

/// Why a replica refused a frame (it closes the session after saying so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The session's epoch is below the replica's.
    Stale,
    /// The replica holds records of another history.
    Diverged,
    /// The replica's disk failed.
    Failed,
    /// Not the next seq.
    Gap,
    /// A frame not valid in this session's state.
    BadState,
}

/// The frames of the protocol, both directions.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Host: a probe Hello (no epoch).
    Probe,
    /// Host: raise your epoch to this (the fence).
    SetEpoch(u64),
    /// Host: a session of this epoch.
    Hello(u64),
    /// Host: the history this session writes, and its last seq.
    Adopt { history: History, last: u64 },
    /// Host: one record.
    Write(Record),
    /// Host: read one block.
    Read { req: u64, block: u32 },
    /// Host: liveness and durable seq.
    Heartbeat,
    /// Host: durable records `from..=to` from your log (seeding).
    LogRead { from: u64, to: u64 },
    /// Replica: HelloOk (reply to Probe, SetEpoch and Hello).
    Info(ReplicaInfo),
    /// Replica: cumulative durable seq (ack, heartbeat reply, adopt reply).
    /// `sender_epoch` is ghost state for the checker: the epoch the
    /// replica had persisted when it sent this.
    /// `log_first`: the first seq its log can still serve (u64::MAX
    /// while it copies), as heartbeat replies carry it.
    Durable { seq: u64, sender_epoch: u64, log_first: u64 },
    /// Host: the first frame of a session that recovers by a copy
    /// (instead of Adopt): live writes come from `live_from`; regions
    /// come from replica `src`.
    Copy { live_from: u64, last: u64, kind: CopyKind, history: History, src: usize },
    /// Host: replay seqs `from..=to` from replica `src`'s log.
    Replay { from: u64, to: u64, src: usize },
    /// Host: store this replica set (a session of the host's epoch).
    SetMembers(Membership),
    /// Host, on a probe session: stamp this empty replica with the host's
    /// epoch and this set (`replica add` of an empty replica).
    Stamp { epoch: u64, members: Membership },
    /// Replica: the replay appended everything up to `next - 1`.
    ReplayDone { next: u64 },
    /// Replica: the replay or the copy stopped on an error (its source).
    RecoveryFailed { copy: bool },
    /// Replica: copy progress, bytes.
    CopyProgress { done: u64, total: u64 },
    /// Replica: the copy is complete; it holds every write up to `durable`.
    /// `sender_epoch`: the replica's epoch when it sent it (for the
    /// checker, as on `Durable`; not on the wire).
    CopyDone { durable: u64, sender_epoch: u64 },
    /// Replica: the set is stored / the replica is stamped.
    MembersOk,
    /// Replica: the frame was refused; the session ends.
    Refused(Refusal),
    /// Replica: a block's value.
    ReadReply { req: u64, value: Option<WriteId> },
    /// Replica: log records.
    Log(Vec<Record>),
}

/// Host timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostTimer {
    /// A fence stage ran out of time (the stage's number).
    FenceStage(u8),
    /// Reconnect the link to this replica.
    Reconnect(usize),
    /// Send heartbeats.
    Heartbeat,
    /// A stage of a membership change ran out of time (its number).
    Change(u64),
}

/// Frames between two replicas (a recovery pulling from its source).
#[derive(Debug, Clone)]
pub enum PeerMsg {
    /// Count the regions in `from..to` marked after `since`.
    Count {
        from: u64,
        to: u64,
        since: u64,
        min_seq: u64,
    },
    /// List them.
    Changes {
        from: u64,
        to: u64,
        since: u64,
        min_seq: u64,
    },
    /// Read one region once `min_seq` is applied.
    Read {
        region: u64,
        min_seq: u64,
    },
    /// Durable log records `from..=to`.
    LogRead {
        from: u64,
        to: u64,
    },
    /// Replies.
    Counted(u64),
    Listed(Vec<u64>),
    Region {
        region: u64,
        value: Option<WriteId>,
        mark: u64,
        as_of: u64,
    },
    Log(Vec<Record>),
    /// The source cannot serve it (it copies itself, or its log moved on).
    Refused,
}

/// What a node asks the world to do.
#[derive(Debug)]
pub enum Effect {
    /// A host opened session `sid` to `replica`.
    Open { sid: Sid, host: usize, replica: usize },
    /// Send a frame on a session.
    Send { sid: Sid, to_replica: bool, msg: Msg },
    /// End a session in order: frames already sent still arrive, then the
    /// other side sees the end.
    Close { sid: Sid, by_replica: bool },
    /// A replica started a group commit; the world picks its duration and
    /// whether the disk fails it.
    StartCommit { replica: usize },
    /// A replica has records to commit soon (group commit gathers a batch).
    KickCommit { replica: usize },
    /// Arm a host timer.
    Timer { host: usize, at: Time, timer: HostTimer },
    /// A host issued a write.
    Issued { record: Record },
    /// A host completed its write `id` (acknowledged to its client).
    /// `clean_support` counts up-to-date links whose durable seq covers it
    /// through reports sent before the replica persisted a higher epoch.
    /// `counted`: the replicas whose durable seqs made the quorum.
    Completed { host: usize, id: WriteId, clean_support: usize, counted: Vec<usize> },
    /// A host's read returned; `floor` is ghost state: the newest write to
    /// the block completed when the read was issued.
    ReadDone { host: usize, block: u32, value: Option<WriteId>, floor: Option<WriteId> },
    /// A host finished fencing at `epoch` and runs with `set`;
    /// `started`: when it began probing.
    Fenced { host: usize, epoch: u64, set: Membership, started: Time },
    /// A replica joined a (non-probe) session of `epoch`.
    Joined { replica: usize, epoch: u64 },
    /// A replica accepted a frame of a session of `epoch`.
    Accepted { replica: usize, epoch: u64 },
    /// Something worth counting that is not a fault nor a violation (a
    /// liveness finding, say).
    Note(&'static str),
    /// A replica opened peer channel `chan` to replica `src`, speaking
    /// for a host session of `epoch`.
    PeerOpen { chan: u64, dst: usize, src: usize, epoch: u64 },
    /// The recovering replica ends a peer channel.
    PeerClose { chan: u64 },
    /// A frame on a peer channel.
    PeerSend { chan: u64, to_src: bool, msg: PeerMsg },
    /// A replica wants its timer `token` to fire at `at`.
    ReplicaTimer { replica: usize, at: Time, token: u64 },
    /// Ghost: a copy ended on `replica`, which now claims `durable` of
    /// `history` and holds `data`.
    CopyFinished { replica: usize, durable: u64, history: History, data: Vec<Option<WriteId>> },
    /// Ghost: a host's copy progress meter for `replica` (`meter` numbers
    /// the meters, which restart at 0 for a new copy).
    Progress { host: usize, replica: usize, meter: u64, fraction: f64, done: u64, total: u64, finished: bool },
    /// Ghost: a host put `set` in effect; `committed`: by a change that
    /// a majority of the old and the new set stored.
    MembersInEffect { host: usize, set: Membership, committed: bool },
    /// A line for `--verbose`.
    Trace(String),
}

/// What a node handler gets: the time, the rules, and where effects go.
pub struct Ctx<'a> {
    /// Now.
    pub now: Time,
    /// The decision rules.
    pub rules: &'a Rules,
    /// Whether trace lines are wanted (formatting them costs).
    pub verbose: bool,
    /// The effects, in order.
    pub effects: Vec<Effect>,
    next_sid: Sid,
    next_chan: u64,
}

impl<'a> Ctx<'a> {
    /// A context at `now` whose new sessions are numbered from `next_sid`.
    pub fn new(now: Time, rules: &'a Rules, verbose: bool, next_sid: Sid, next_chan: u64) -> Ctx<'a> {
        Ctx { now, rules, verbose, effects: Vec::new(), next_sid, next_chan }
    }

    /// Opens a peer channel from replica `dst` to its source `src`.
    pub fn open_peer(&mut self, dst: usize, src: usize, epoch: u64) -> u64 {
        let chan = self.next_chan;
        self.next_chan += 1;
        self.effects.push(Effect::PeerOpen { chan, dst, src, epoch });
        chan
    }

    /// The next session number (for the world to carry on from).
    pub fn next_sid(&self) -> Sid {
        self.next_sid
    }

    /// Opens a session from `host` to `replica`.
    pub fn open(&mut self, host: usize, replica: usize) -> Sid {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.effects.push(Effect::Open { sid, host, replica });
        sid
    }

    /// Sends a frame.
    pub fn send(&mut self, sid: Sid, to_replica: bool, msg: Msg) {
        self.effects.push(Effect::Send { sid, to_replica, msg });
    }

    /// Records a trace line, formatted only when tracing.
    pub fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.verbose {
            self.effects.push(Effect::Trace(line()));
        }
    }
}
