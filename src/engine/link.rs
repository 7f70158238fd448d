//! One replica link: its lifecycle state, and the manager, sender and
//! receiver threads that carry the TCP session.
//!
//! The manager connects (with backoff), decides from the replica's durable
//! seq whether it can catch up from the write queue (quick recovery), then
//! runs the receiver loop while a sender thread streams the write queue.
//! Any session error cuts the socket; both threads exit and the manager
//! reconnects.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam::queue::SegQueue;
use serde::Serialize;
use starblk_netsync::{Link as NetLink, LinkConfig, LinkEvent};
use starblk_recovery::{LagReason, Meter, Plan};
use starblk_replica::auth::{AuthFailure, Credentials};
use starblk_replica::client::{self, ClientError};
use starblk_replica::history::{self, Standing};
use starblk_replica::netlink::{self, MsgReader, NetOut};
use starblk_replica::proto::{
    self, ErrorCode, ErrorFrame, FrameError, FrameReader, FrameType, Hello, HelloOk, ReadReq, Seal, WriteHeader,
};
use starblk_replica::readview::{self, Miss, ReadView};
use starblk_replica::server::FrameOut;
use starblk_replica::superblock::CopyKind;

use super::exposure::FarGate;
use super::{PendingRead, Shared};
use crate::config::{MaxExposure, Role};

/// Heartbeat period on an idle or busy link.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Bounds of the RTT-scaled failure timeout.
const TIMEOUT_MIN: Duration = Duration::from_secs(3);
const TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// Writes sent per lock acquisition.
const SEND_BATCH_MAX: usize = 64;
/// Largest network-sync message the HE builds from a batch of writes
/// (a single larger frame still goes alone); below the link's
/// `max_message_bytes`.
const NET_MSG_BYTES_MAX: usize = 1 << 20;
/// How long one wait for network-sync window space lasts before the sender
/// checks whether its session was cut.
const NET_SEND_STEP: Duration = Duration::from_millis(100);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A replica's state as the HE sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Has every completed write; counts toward Q and serves reads.
    UpToDate,
    /// Connected and catching up from the write queue; counts toward Q
    /// only once it has every completed write.
    Recovering,
    /// Missing writes the write queue no longer holds; needs replay,
    /// incremental or full recovery. Never blocks I/O.
    Lagging,
    /// Not connected (unreachable, crashed, or timed out).
    Failed,
    /// Removed from the replica set.
    Removed,
}

impl LinkState {
    /// Whether a session is open and receiving the write stream.
    pub fn is_connected(self) -> bool {
        matches!(self, LinkState::UpToDate | LinkState::Recovering)
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkState::UpToDate => "up-to-date",
            LinkState::Recovering => "recovering",
            LinkState::Lagging => "lagging",
            LinkState::Failed => "failed",
            LinkState::Removed => "removed",
        })
    }
}

/// What the engine needs to know about a replica.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// Replica name.
    pub name: String,
    /// HOST:PORT.
    pub addr: String,
    /// Failure-domain label.
    pub role: Role,
    /// Durable seq reported at startup (fencing probe).
    pub initial_durable_seq: u64,
    /// Network-sync link settings; `None` for a TCP replica.
    pub netsync: Option<LinkConfig>,
    /// Whether completions wait for this link's on-the-wire reports
    /// (docs/semantics.md §1b). Only the rolling-disaster contrast turns it off.
    pub wire_gate: bool,
    /// A network-sync link's bound on acknowledged writes its far replica
    /// has not confirmed (`exposure.rs`).
    pub max_exposure: MaxExposure,
    /// Encrypt this replica's sessions (needs the volume's keys).
    pub encrypt: bool,
}

/// Link state kept under the engine lock.
pub(crate) struct LinkCore {
    pub state: LinkState,
    pub reason: String,
    /// Why it is lagging (`state == Lagging`; `reason` is its text).
    pub lag: Option<LagReason>,
    pub durable_seq: u64,
    pub next_send_seq: u64,
    pub srtt_us: u64,
    /// Bumped per session so stale threads notice they are stale.
    pub conn_gen: u64,
    pub since: Instant,
    /// A network-sync link: completions wait for its wire seq (§1b).
    pub netsync: bool,
    /// Highest seq whose data and repair packets are on the wire.
    pub wire_seq: u64,
    /// The far replica's confirmations, the exposure bound and the
    /// degraded mode (network-sync links).
    pub far: FarGate,
    /// A replay recovery this session runs: writes wait until it is done.
    pub replay: Option<ReplayPlan>,
    /// Replays that failed from one first seq: which peers (link indexes,
    /// a bitmask) and the last reason. Each peer is tried once per first
    /// seq; when none is left the link turns lagging.
    pub replay_failed: Option<ReplayFailures>,
    /// Durable seq when the current recovery started (for progress).
    pub recovery_from_seq: u64,
    /// The replica holds records past this seq from another history
    /// (lagging until rolled back).
    pub diverged_after: Option<u64>,
    /// A recovery copy this session runs (incremental, full, rollback):
    /// the replica takes live writes meanwhile, but counts toward Q only
    /// once the copy is done and it has caught up.
    pub copy: Option<CopyJob>,
    /// Progress of the replica's copy, kept across sessions (a resumed
    /// copy goes on from where status showed it).
    pub copy_meter: Option<Meter>,
    /// Copies that failed: which peers (a bitmask) and when; they are not
    /// asked again for a while.
    pub copy_failed: Option<(u64, Instant)>,
    /// First seq the replica's log can serve (from its heartbeat replies).
    pub log_first: Option<u64>,
    /// The data file of a same-machine `local` replica, for reads by
    /// `pread` (`docs/design.md`, "Local reads"); this session's only.
    pub local: Option<Arc<ReadView>>,
}

/// A recovery copy (docs/semantics.md §9): the replica copies regions from the peer,
/// replica to replica, while it takes live writes.
#[derive(Debug, Clone)]
pub(crate) struct CopyJob {
    /// Why it copies.
    pub kind: CopyKind,
    /// Peer name, for status.
    pub peer: String,
    /// Peer link index.
    pub peer_idx: usize,
    /// The Copy frame to send (instead of Adopt).
    pub req: proto::CopyReq,
    /// Whether the sender has sent it.
    pub sent: bool,
}

/// How long a peer whose copy failed is passed over.
const COPY_FAILED_FOR: Duration = Duration::from_secs(5);

/// Failed replay attempts from one first seq.
#[derive(Debug, Clone)]
pub(crate) struct ReplayFailures {
    /// The first seq those replays asked for.
    pub from: u64,
    /// Peers that failed, as a bitmask of link indexes.
    pub peers: u64,
    /// Why the last one failed.
    pub why: String,
}

/// A replay recovery (docs/semantics.md §9): the replica copies `from..=to` from the
/// peer's log, replica to replica.
#[derive(Debug, Clone)]
pub(crate) struct ReplayPlan {
    /// Peer name, for status.
    pub peer: String,
    /// Peer link index.
    pub peer_idx: usize,
    /// The Replay frame to send.
    pub req: proto::Replay,
    /// Whether the sender has sent it.
    pub sent: bool,
}

impl LinkCore {
    pub fn new(durable_seq: u64) -> LinkCore {
        LinkCore {
            state: LinkState::Failed,
            reason: "not yet connected".into(),
            lag: None,
            durable_seq,
            next_send_seq: durable_seq + 1,
            srtt_us: 0,
            conn_gen: 0,
            since: Instant::now(),
            netsync: false,
            wire_seq: 0,
            far: FarGate::new(MaxExposure::Bytes(crate::config::DEFAULT_MAX_EXPOSURE_BYTES), 0),
            replay: None,
            replay_failed: None,
            recovery_from_seq: durable_seq,
            diverged_after: None,
            copy: None,
            copy_meter: None,
            copy_failed: None,
            log_first: None,
            local: None,
        }
    }

    pub fn set_state(&mut self, state: LinkState, reason: String) {
        if self.state != state {
            tracing::info!(from = %self.state, to = %state, %reason, "replica state change");
            self.since = Instant::now();
        }
        self.state = state;
        self.reason = reason;
        self.lag = None;
    }

    /// Lagging, for `why` (its Display text becomes the reason).
    pub fn set_lagging(&mut self, why: LagReason) {
        self.set_state(LinkState::Lagging, why.to_string());
        self.lag = Some(why);
    }
}

/// Counters per link (lock-free, for status).
#[derive(Default)]
pub(crate) struct LinkCounters {
    pub writes_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub reads_sent: AtomicU64,
    /// Reads served from the replica's data file on this machine.
    pub reads_local: AtomicU64,
    /// Local reads that went over TCP after all, indexed like [`Miss::ALL`].
    pub reads_local_missed: [AtomicU64; Miss::ALL.len()],
    pub reconnects: AtomicU64,
    /// Error frames the replica sent, by `ErrorCode` (index: wire code).
    pub refusals: [AtomicU64; ErrorCode::ALL.len() + 1],
    /// Authentication failures, indexed like [`AuthFailure::ALL`].
    pub auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    /// Id of the key the current (or last) session authenticated with.
    pub session_key: AtomicU64,
}

impl LinkCounters {
    /// Counts an Error frame from the replica.
    pub fn refused(&self, code: ErrorCode) {
        self.refusals[code as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `e` if it is the replica refusing (an Error frame).
    pub fn note(&self, e: &ClientError) {
        if let ClientError::Rejected { frame, .. } = e {
            self.refused(frame.code);
        }
    }

    /// Local reads that went over the link after all, by reason (zeros
    /// included).
    pub fn local_misses(&self) -> std::collections::BTreeMap<String, u64> {
        Miss::ALL
            .iter()
            .zip(&self.reads_local_missed)
            .map(|(m, n)| (m.name().to_string(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts a local read that went over the link after all.
    pub fn local_missed(&self, m: Miss) {
        let i = Miss::ALL.iter().position(|a| *a == m).expect("every miss is listed");
        self.reads_local_missed[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far, by reason (every reason, zeros included).
    pub fn refusals(&self) -> std::collections::BTreeMap<String, u64> {
        ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), self.refusals[*c as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts one authentication failure.
    pub fn auth_failed(&self, replica: &str, f: AuthFailure, detail: &dyn fmt::Display) {
        let i = AuthFailure::ALL.iter().position(|a| *a == f).expect("every failure is listed");
        self.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%replica, reason = f.reason(), "authentication failed: {detail}");
    }
}

/// The shared handle of one replica link.
pub(crate) struct Link {
    pub idx: usize,
    pub spec: ReplicaSpec,
    sender: Mutex<Option<Thread>>,
    socket: Mutex<Option<TcpStream>>,
    /// The open network-sync session: its link and its close flag.
    net: Mutex<Option<(Arc<NetLink>, Arc<AtomicBool>)>>,
    read_q: SegQueue<PendingRead>,
    pending_reads: Mutex<HashMap<u64, PendingRead>>,
    next_req_id: AtomicU64,
    pub counters: LinkCounters,
    /// The recovery rate changed: tell a replaying replica.
    rate_changed: AtomicBool,
    /// Removed from the replica set: the manager stops and never
    /// reconnects (set before the state turns `Removed`, under the lock).
    pub removed: AtomicBool,
}

impl Link {
    pub fn new(idx: usize, spec: ReplicaSpec) -> Link {
        debug_assert!(idx < 64, "read routing uses a u64 bitmask");
        Link {
            idx,
            spec,
            sender: Mutex::new(None),
            socket: Mutex::new(None),
            net: Mutex::new(None),
            read_q: SegQueue::new(),
            pending_reads: Mutex::new(HashMap::new()),
            next_req_id: AtomicU64::new(1),
            counters: LinkCounters::default(),
            rate_changed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    /// Wakes the sender thread (new writes or reads).
    pub fn wake(&self) {
        if let Some(t) = lock(&self.sender).as_ref() {
            t.unpark();
        }
    }

    /// The recovery rate changed; the sender passes it on if a replay runs.
    pub fn recovery_rate_changed(&self) {
        self.rate_changed.store(true, Ordering::Release);
        self.wake();
    }

    /// Queues a read for the sender thread.
    pub fn send_read(&self, r: PendingRead) {
        self.read_q.push(r);
        self.wake();
    }

    /// Cuts the current session, if any; the manager notices and reconnects.
    pub fn cut(&self, why: &str) {
        if let Some(s) = lock(&self.socket).as_ref() {
            tracing::debug!(replica = %self.spec.name, why, "cutting session");
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some((_, closed)) = lock(&self.net).as_ref() {
            closed.store(true, Ordering::Release);
        }
        self.wake();
    }

    /// The current network-sync link, if any (for status).
    pub fn net_link(&self) -> Option<Arc<NetLink>> {
        lock(&self.net).as_ref().map(|(l, _)| l.clone())
    }
}

/// Starts the manager thread of `link`.
pub(crate) fn spawn_manager(shared: Arc<Shared>, link: Arc<Link>) {
    let name = format!("link-{}", link.spec.name);
    thread::Builder::new().name(name).spawn(move || manager(shared, link)).expect("spawn link manager thread");
}

fn manager(shared: Arc<Shared>, link: Arc<Link>) {
    let mut backoff = BACKOFF_MIN;
    while !shared.stopping.load(Ordering::Acquire) && !link.removed.load(Ordering::Acquire) {
        let hello = Hello { volume: shared.cfg.volume, epoch: shared.cfg.epoch, flags: 0 };
        let creds = shared.cfg.keys.as_ref().map(|k| k.creds(link.spec.encrypt));
        let opened = match &link.spec.netsync {
            None => client::connect_with(&link.spec.addr, hello, CONNECT_TIMEOUT, creds.as_ref())
                .map(|s| (s.hello, Conn::Tcp { reader: s.reader, writer: s.writer, seal: s.seal })),
            Some(cfg) => connect_net(&link.spec.addr, cfg, hello, creds.as_ref()),
        };
        let reason = match opened {
            Ok((hello_ok, conn)) => {
                backoff = BACKOFF_MIN;
                let key = creds.as_ref().map_or(0, |c| c.key.id().0);
                link.counters.session_key.store(key, Ordering::Relaxed);
                run_session(&shared, &link, &hello_ok, conn)
            }
            Err(e) => {
                link.counters.note(&e);
                if let Some(f) = e.auth_failure() {
                    link.counters.auth_failed(&link.spec.name, f, &e);
                }
                e.to_string()
            }
        };
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        mark_failed(&shared, &link, reason);
        thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// An open session's two halves.
enum Conn {
    Tcp { reader: FrameReader<TcpStream>, writer: TcpStream, seal: Seal },
    Net { link: Arc<NetLink>, closed: Arc<AtomicBool>, reader: FrameReader<MsgReader>, seal: Seal },
}

/// Opens a network-sync link to the UDP port of `addr`, authenticates
/// if `creds` are given, and says Hello.
fn connect_net(
    addr: &str,
    cfg: &LinkConfig,
    hello: Hello,
    creds: Option<&Credentials>,
) -> Result<(HelloOk, Conn), ClientError> {
    let err = |e: &dyn std::fmt::Display| ClientError::Io {
        addr: addr.to_string(),
        source: io::Error::other(format!("network-sync: {e}")),
    };
    let remote = netlink::resolve(addr).map_err(|e| err(&e))?;
    let local = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    // The link authenticates every datagram under the same key.
    let cfg = starblk_netsync::LinkConfig {
        key: creds.map(|c| starblk_netsync::LinkKey::new(*c.key.bytes())),
        ..cfg.clone()
    };
    let nl = NetLink::connect(local.parse().expect("literal address"), remote, cfg).map_err(|e| err(&e))?;
    nl.wait_established(CONNECT_TIMEOUT).map_err(|e| err(&e))?;
    let nl = Arc::new(nl);
    let closed = Arc::new(AtomicBool::new(false));
    let out = NetOut::new(nl.clone(), closed.clone());
    let mut input = MsgReader::new(nl.clone(), closed.clone());
    input.set_timeout(Some(CONNECT_TIMEOUT));
    let mut reader = FrameReader::new(input);
    let mut seal = Seal::default();
    if let Some(c) = creds {
        let key = client::authenticate(&mut reader, |kind, parts| out.send_frame(kind, parts), c, addr)?;
        seal = Seal::new(Some(key));
    }
    let mut hello_frame = Vec::new();
    seal.write_frame(&mut hello_frame, FrameType::Hello, 0, &[&hello.encode()]).map_err(|e| err(&e))?;
    nl.send(&hello_frame).map_err(|e| err(&e))?;
    let p = client::expect(&mut reader, addr, FrameType::HelloOk)?;
    let hello_ok = HelloOk::decode(&p).map_err(|e| err(&e))?;
    Ok((hello_ok, Conn::Net { link: nl, closed, reader, seal }))
}

/// Marks the link failed unless it is lagging (which says more), and
/// re-routes its outstanding reads.
fn mark_failed(shared: &Shared, link: &Link, reason: String) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    if l.state.is_connected() || l.state == LinkState::Failed {
        l.set_state(LinkState::Failed, reason);
    }
    shared.advance(&mut g);
    let bit = 1u64 << link.idx;
    let mut reads: Vec<PendingRead> = lock(&link.pending_reads).drain().map(|(_, r)| r).collect();
    while let Some(r) = link.read_q.pop() {
        reads.push(r);
    }
    for mut r in reads {
        r.tried |= bit;
        shared.route_read(&mut g, r);
    }
}

/// Decides how a fresh session starts (`starblk_recovery::plan`): quick
/// recovery from the write queue, replay from an up-to-date peer's log, a
/// copy of changed regions from a peer, or lagging with the reason.
fn admit(shared: &Shared, link: &Link, hello: &HelloOk, view: Option<Arc<ReadView>>) -> Result<u64, String> {
    let d = hello.durable_seq;
    let mut g = shared.lock();
    g.links[link.idx].local = None;
    if link.removed.load(Ordering::Acquire) {
        return Err("removed from the replica set".into());
    }
    let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
    let last = g.next_seq - 1;
    // Only a replica whose log is a prefix of this HE's history may join
    // as it is: records past the branch point from another history were
    // never acknowledged, and must not count toward Q or serve reads.
    let standing = history::standing(&shared.cfg.history, last, &hello.history, d);
    let copying = hello.copying.map(|(kind, _)| kind);
    let returning = starblk_recovery::Returning { durable_seq: d, standing, copying };
    let peers = recovery_peers(shared, &g, link.idx, d);
    let plan = starblk_recovery::plan(&returning, &starblk_recovery::Queue { first, last }, &peers);
    let l = &mut g.links[link.idx];
    // A diverged replica holds this history only up to `after`: its own
    // durable seq past that counts nothing (a rollback copy ends at the
    // live writes it applied, and `on_copy_done` only raises this). Found
    // by the fault simulator (docs/simulator.md, defect 12).
    l.durable_seq = match standing {
        Standing::Diverged { after } => after.min(d),
        Standing::Prefix => d,
    };
    l.diverged_after = match standing {
        Standing::Diverged { after } => Some(after),
        Standing::Prefix => None,
    };
    if let Standing::Diverged { after } = standing {
        tracing::warn!(replica = %link.spec.name, position = %hello.position(), after, "replica diverged from this host's history");
    }
    l.copy = None;
    let plan = match plan {
        Ok(p) => p,
        Err(why) => {
            let text = why.to_string();
            l.set_lagging(why);
            shared.advance(&mut g);
            return Err(text);
        }
    };
    l.conn_gen += 1;
    l.local = view;
    l.next_send_seq = d + 1;
    l.wire_seq = l.wire_seq.max(d);
    l.far.new_session(d, Instant::now());
    l.recovery_from_seq = d;
    match plan {
        Plan::Replay { peer: peer_idx } => {
            let spec = &shared.links[peer_idx].spec;
            let (name, addr) = (spec.name.clone(), spec.addr.clone());
            let rate_bytes_per_s = shared.recovery_rate_bytes_per_s.load(Ordering::Acquire);
            let req = proto::Replay { from: d + 1, to: last, rate_bytes_per_s, addr };
            let why = format!("replay recovery of seqs {}..{last} from {name}", d + 1);
            l.replay = Some(ReplayPlan { peer: name, peer_idx, req, sent: false });
            l.copy_meter = None;
            l.set_state(LinkState::Recovering, why);
        }
        Plan::Incremental { peer: peer_idx, .. }
        | Plan::Full { peer: peer_idx }
        | Plan::Rollback { peer: peer_idx, .. } => {
            let kind = plan.copy_kind().expect("a copy plan");
            let spec = &shared.links[peer_idx].spec;
            let (name, addr) = (spec.name.clone(), spec.addr.clone());
            // Live writes from the replica's next seq if it is resuming and
            // the queue still has it; else from now (it copies the rest).
            let live_from = match hello.copying {
                Some((_, next)) => next.clamp(first, last + 1),
                None => last + 1,
            };
            let rate_bytes_per_s = shared.recovery_rate_bytes_per_s.load(Ordering::Acquire);
            let req = proto::CopyReq {
                live_from,
                rate_bytes_per_s,
                last_seq: last,
                kind,
                addr,
                history: shared.cfg.history.clone(),
            };
            l.replay = None;
            l.next_send_seq = live_from;
            // Writes before live_from reach it through the copy, never on
            // this link: they must not hold completions (§1b).
            l.wire_seq = l.wire_seq.max(live_from - 1);
            if hello.copying.is_none() || l.copy_meter.is_none() {
                l.copy_meter = Some(Meter::new());
            }
            let since = match plan {
                Plan::Incremental { since_seq, .. } | Plan::Rollback { since_seq, .. } => since_seq,
                _ => 0,
            };
            let resumed = if hello.copying.is_some() { "resumed, " } else { "" };
            let why = format!(
                "{kind} recovery from {name} ({resumed}regions written after seq {since}); live writes from seq {live_from}"
            );
            l.copy = Some(CopyJob { kind, peer: name, peer_idx, req, sent: false });
            l.set_state(LinkState::Recovering, why);
        }
        Plan::Quick => {
            l.replay = None;
            l.copy_meter = None;
            l.set_state(LinkState::Recovering, format!("quick recovery from seq {}", d + 1));
        }
    }
    let gen = l.conn_gen;
    shared.advance(&mut g);
    Ok(gen)
}

/// The other replicas as recovery sources for replica `idx`, which misses
/// the writes after `d`. The replica dials its source itself, so a peer
/// configured at a loopback address is only a source for a replica that
/// is on loopback too.
fn recovery_peers(shared: &Shared, g: &super::Core, idx: usize, d: u64) -> Vec<starblk_recovery::Peer> {
    let local_only = is_loopback(&shared.links[idx].spec.addr);
    let replay_failed = match &g.links[idx].replay_failed {
        Some(f) if f.from == d + 1 => f.peers,
        _ => 0,
    };
    let copy_failed = match g.links[idx].copy_failed {
        Some((peers, at)) if at.elapsed() < COPY_FAILED_FOR => peers,
        _ => 0,
    };
    g.links
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(i, l)| starblk_recovery::Peer {
            idx: i,
            up_to_date: l.state == LinkState::UpToDate,
            reachable: local_only || !is_loopback(&shared.links[i].spec.addr),
            rtt_us: l.srtt_us,
            log_first: l.log_first,
            replay_failed: replay_failed & (1 << i) != 0,
            copy_failed: copy_failed & (1 << i) != 0,
        })
        .collect()
}

/// The lowest-RTT up-to-date peer that can serve replica `idx` a replay
/// of the writes after `d`: (index, name, address).
fn replay_peer(shared: &Shared, g: &super::Core, idx: usize, d: u64) -> Option<(usize, String, String)> {
    let best = recovery_peers(shared, g, idx, d)
        .into_iter()
        .filter(|p| p.up_to_date && p.reachable && !p.replay_failed)
        .min_by_key(|p| p.rtt_us)?;
    let spec = &shared.links[best.idx].spec;
    Some((best.idx, spec.name.clone(), spec.addr.clone()))
}

/// Whether `HOST:PORT` names this host only (127.0.0.0/8, ::1, localhost).
fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The Replay frame this session still has to send, if any.
fn take_replay_request(shared: &Shared, link: &Link, gen: u64) -> Option<proto::Replay> {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    match &mut l.replay {
        Some(plan) if l.conn_gen == gen && !plan.sent => {
            plan.sent = true;
            Some(plan.req.clone())
        }
        _ => None,
    }
}

/// The Copy frame this session starts with, if it copies.
fn take_copy_request(shared: &Shared, link: &Link, gen: u64) -> Option<proto::CopyReq> {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    match &mut l.copy {
        Some(job) if l.conn_gen == gen && !job.sent => {
            job.sent = true;
            Some(job.req.clone())
        }
        _ => None,
    }
}

/// Whether this link's replica is running a replay we asked for.
fn replay_running(shared: &Shared, link: &Link) -> bool {
    let g = shared.lock();
    let l = &g.links[link.idx];
    l.replay.as_ref().is_some_and(|p| p.sent) || l.copy.as_ref().is_some_and(|c| c.sent)
}

/// Progress of the replica's copy.
fn on_copy_progress(shared: &Shared, link: &Link, done: u64, total: u64) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    if l.copy.is_some() {
        l.copy_meter.get_or_insert_with(Meter::new).update(done, total, Instant::now());
    }
}

/// The replica's copy is complete at durable seq `durable`: it catches up
/// from the write queue (it took live writes all along) and counts
/// toward Q once it has every completed write.
fn on_copy_done(shared: &Shared, link: &Link, durable: u64) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    let Some(job) = l.copy.take() else { return };
    if let Some(m) = &mut l.copy_meter {
        m.finish();
    }
    l.copy_failed = None;
    // A rollback is complete: its data is the host's history up to durable.
    l.diverged_after = None;
    l.durable_seq = l.durable_seq.max(durable);
    tracing::info!(replica = %link.spec.name, peer = %job.peer, kind = %job.kind, durable, "recovery copy done");
    let why = format!("quick recovery from seq {} (after a {} copy from {})", durable + 1, job.kind, job.peer);
    l.set_state(LinkState::Recovering, why);
    shared.advance(&mut g);
    drop(g);
    link.wake();
}

/// A copy ended in an Error frame: that peer is passed over for a while;
/// the next session resumes the copy from another one.
fn on_copy_failed(shared: &Shared, link: &Link, why: &str) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    let Some(job) = l.copy.take() else { return };
    tracing::warn!(replica = %link.spec.name, peer = %job.peer, "recovery copy failed: {why}");
    let peers = match l.copy_failed {
        Some((p, at)) if at.elapsed() < COPY_FAILED_FOR => p,
        _ => 0,
    };
    l.copy_failed = Some((peers | 1 << job.peer_idx, Instant::now()));
}

/// The replica finished its replay: the write stream continues at `next`
/// from the write queue (quick recovery), or, if the queue has moved past
/// `next` meanwhile (writes went on; eviction spares a replaying link),
/// the session replays again from `next`, from the same peer if it is
/// still up to date. Each round is shorter while replay outpaces writes.
fn on_replay_done(shared: &Shared, link: &Link, next: u64) {
    let mut g = shared.lock();
    let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
    let last = g.next_seq - 1;
    let l = &mut g.links[link.idx];
    let Some(plan) = l.replay.take() else { return };
    tracing::info!(replica = %link.spec.name, peer = %plan.peer, from = plan.req.from, next, "replay recovery done");
    let next = next.max(l.durable_seq + 1);
    if next < first {
        let peer = if g.links[plan.peer_idx].state == LinkState::UpToDate {
            Some((plan.peer_idx, plan.peer, plan.req.addr))
        } else {
            replay_peer(shared, &g, link.idx, next - 1)
        };
        let l = &mut g.links[link.idx];
        match peer {
            Some((peer_idx, name, addr)) => {
                let rate_bytes_per_s = shared.recovery_rate_bytes_per_s.load(Ordering::Acquire);
                let req = proto::Replay { from: next, to: last, rate_bytes_per_s, addr };
                let why = format!("replay recovery of seqs {next}..{last} from {name} (the write queue moved on)");
                l.replay = Some(ReplayPlan { peer: name, peer_idx, req, sent: false });
                l.set_state(LinkState::Recovering, why);
            }
            None => {
                let why = format!(
                    "missing writes {next}..{} are no longer in the write queue and no up-to-date peer can replay \
                     them; needs incremental recovery",
                    first - 1
                );
                l.set_state(LinkState::Lagging, why);
                shared.advance(&mut g);
                drop(g);
                link.cut("replay done, the rest is not in the write queue and no peer can replay it");
                return;
            }
        }
    } else {
        l.next_send_seq = next;
        let why = format!("quick recovery from seq {next} (after replay from {})", plan.peer);
        l.set_state(LinkState::Recovering, why);
    }
    shared.advance(&mut g);
    drop(g);
    link.wake();
}

/// The replica refused this HE's history: it holds another history's
/// records. It stays lagging (never failed, which a reconnect would
/// retry) until it is rolled back.
fn on_diverged(shared: &Shared, link: &Link, after: u64, message: &str) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    l.conn_gen += 1;
    l.diverged_after = Some(after);
    tracing::warn!(replica = %link.spec.name, after, "replica refused this host's history: {message}");
    l.set_lagging(LagReason::Diverged { after });
    shared.advance(&mut g);
}

/// A replay ended in an Error frame: remember the peer, so the next
/// session tries another one (or goes lagging when none is left).
fn on_replay_failed(shared: &Shared, link: &Link, why: &str) {
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    let Some(plan) = l.replay.take() else { return };
    tracing::warn!(replica = %link.spec.name, peer = %plan.peer, from = plan.req.from, "replay recovery failed: {why}");
    let mut f = match l.replay_failed.take() {
        Some(f) if f.from == plan.req.from => f,
        _ => ReplayFailures { from: plan.req.from, peers: 0, why: String::new() },
    };
    f.peers |= 1 << plan.peer_idx;
    f.why = format!("{}: {why}", plan.peer);
    l.replay_failed = Some(f);
}

/// The read view of a same-machine `local` replica, if this session may
/// read its data file directly (`docs/design.md`, "Local reads").
fn local_view(shared: &Shared, link: &Link, hello: &HelloOk) -> Option<Arc<ReadView>> {
    if !shared.cfg.local_reads || link.spec.role != Role::Local {
        return None;
    }
    let id = hello.read_view.as_ref()?;
    if readview::boot_id() != Some(id.boot_id) {
        return None;
    }
    match ReadView::open(&id.dir, id.instance) {
        Ok(v) => {
            tracing::info!(replica = %link.spec.name, dir = %id.dir.display(), "reads served from the replica's data file on this machine");
            Some(Arc::new(v))
        }
        Err(e) => {
            tracing::warn!(replica = %link.spec.name, "reads go over TCP: {e}");
            None
        }
    }
}

/// Admits a fresh session, then runs it until it breaks. Returns why it ended.
fn run_session(shared: &Arc<Shared>, link: &Arc<Link>, hello: &HelloOk, conn: Conn) -> String {
    let view = local_view(shared, link, hello);
    let gen = match admit(shared, link, hello, view) {
        Ok(g) => g,
        Err(why) => return why,
    };
    link.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    let why = match conn {
        Conn::Tcp { reader, writer, seal } => {
            if let Ok(s) = writer.try_clone() {
                *lock(&link.socket) = Some(s);
            }
            let sink = TcpSink { w: BufWriter::with_capacity(64 * 1024, writer), seal };
            drive(shared, link, gen, sink, reader)
        }
        Conn::Net { link: nl, closed, reader, seal } => {
            *lock(&link.net) = Some((nl.clone(), closed.clone()));
            let ids = Arc::new(Mutex::new(VecDeque::new()));
            let sink = NetSink {
                link: nl.clone(),
                ids: ids.clone(),
                idx: link.idx,
                shared: shared.clone(),
                pending: Vec::with_capacity(NET_MSG_BYTES_MAX),
                pending_seq: None,
                closed: closed.clone(),
                seal,
            };
            let watcher = spawn_wire_watcher(shared.clone(), link.idx, nl, ids, closed);
            let why = drive(shared, link, gen, sink, reader);
            let _ = watcher.join();
            why
        }
    };
    *lock(&link.socket) = None;
    *lock(&link.net) = None;
    why
}

/// Runs the sender thread and the receiver loop of one session.
fn drive<S, R>(shared: &Arc<Shared>, link: &Arc<Link>, gen: u64, sink: S, reader: FrameReader<R>) -> String
where
    S: Sink + 'static,
    R: TimeoutRead,
{
    let (s2, l2) = (shared.clone(), link.clone());
    let sender = thread::Builder::new().name(format!("send-{}", link.spec.name)).spawn(move || {
        let why = sender_loop(&s2, &l2, gen, sink);
        l2.cut(&why);
    });
    if let Ok(h) = &sender {
        *lock(&link.sender) = Some(h.thread().clone());
    }
    let why = receiver_loop(shared, link, reader);
    link.cut(&why);
    if let Ok(h) = sender {
        let _ = h.join();
    }
    why
}

/// Where the sender writes frames.
trait Sink: Send {
    /// Sends one frame that is not a write.
    fn frame(&mut self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()>;
    /// Sends one Write frame: its sub-header, its data and the data's sum.
    fn write(&mut self, h: &WriteHeader, data: &[u8], data_sum: u64) -> io::Result<()>;
    /// Pushes out anything buffered.
    fn flush(&mut self) -> io::Result<()>;
    /// The end of one batch of writes taken from the write queue.
    fn end_batch(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Frames to a TCP socket, sealed once the session authenticated.
struct TcpSink {
    w: BufWriter<TcpStream>,
    seal: Seal,
}

impl Sink for TcpSink {
    fn frame(&mut self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        self.seal.write_frame(&mut self.w, kind, 0, parts)
    }
    fn write(&mut self, h: &WriteHeader, data: &[u8], data_sum: u64) -> io::Result<()> {
        self.seal.write_frame_known(&mut self.w, FrameType::Write, 0, &[&h.encode(), data], Some(data_sum))
    }
    fn flush(&mut self) -> io::Result<()> {
        Write::flush(&mut self.w)
    }
}

/// Frames as network-sync messages; remembers which message carries which
/// write so on-the-wire reports map back to seqs. The writes of one batch
/// travel as one message (up to [`NET_MSG_BYTES_MAX`]): the replica reads
/// the link as a byte stream of frames either way, and one message per
/// 4 KiB write would leave a mostly empty last datagram per write (4152
/// bytes are 3.1 datagrams' worth, sent as 4).
struct NetSink {
    link: Arc<NetLink>,
    ids: Arc<Mutex<VecDeque<(u64, u64)>>>,
    idx: usize,
    shared: Arc<Shared>,
    /// Frames not yet handed to the link.
    pending: Vec<u8>,
    /// Highest write seq in `pending`.
    pending_seq: Option<u64>,
    /// Set when the session is cut.
    closed: Arc<AtomicBool>,
    /// Seals frames once the session authenticated.
    seal: Seal,
}

impl NetSink {
    /// Sends the pending frames first if a frame of `parts` would not fit
    /// in the same message.
    fn make_room(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let len = proto::HEADER_BYTES + parts.iter().map(|p| p.len()).sum::<usize>();
        if self.pending.len() + len > NET_MSG_BYTES_MAX {
            self.send_pending()?;
        }
        Ok(())
    }

    /// Hands the pending frames to the link as one message.
    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let id = self.send_until_cut()?;
        self.pending.clear();
        if let Some(seq) = self.pending_seq.take() {
            lock(&self.ids).push_back((id, seq));
            // The reports may have come before the id was recorded.
            if self.link.wire_upto() >= id {
                wire_advance(&self.shared, self.idx, &self.link, &self.ids);
            }
            if self.link.acked_upto() >= id {
                ack_advance(&self.shared, self.idx, &self.link, &self.ids);
            }
        }
        Ok(())
    }
}

impl NetSink {
    /// Sends `pending`, waiting for window space in short steps so that a
    /// cut session (the receiver timed out on a dead replica) ends the
    /// wait: blocking for good here kept the link counted as connected and
    /// the §1b gate stalled every write.
    fn send_until_cut(&self) -> io::Result<starblk_netsync::MsgId> {
        loop {
            if self.closed.load(Ordering::Acquire) || self.shared.stopping.load(Ordering::Acquire) {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "network-sync session cut"));
            }
            match self.link.send_timeout(&self.pending, NET_SEND_STEP) {
                Ok(id) => return Ok(id),
                Err(starblk_netsync::LinkError::Timeout) => continue,
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
}

impl Sink for NetSink {
    fn frame(&mut self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        self.make_room(parts)?;
        self.seal.write_frame(&mut self.pending, kind, 0, parts)?;
        // Reads and heartbeats do not wait for the batch to end.
        self.send_pending()
    }
    fn write(&mut self, h: &WriteHeader, data: &[u8], data_sum: u64) -> io::Result<()> {
        let sub = h.encode();
        let parts: [&[u8]; 2] = [&sub, data];
        self.make_room(&parts)?;
        self.seal.write_frame_known(&mut self.pending, FrameType::Write, 0, &parts, Some(data_sum))?;
        self.pending_seq = Some(h.seq);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
    fn end_batch(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

/// Maps the link's cumulative on-the-wire id to a seq and reports it.
/// (`ids` keeps the messages until they are acked: see [`ack_advance`].)
fn wire_advance(shared: &Shared, idx: usize, nl: &NetLink, ids: &Mutex<VecDeque<(u64, u64)>>) {
    let upto = nl.wire_upto();
    let seq = {
        let q = lock(ids);
        let n = q.partition_point(|(id, _)| *id <= upto);
        n.checked_sub(1).map(|i| q[i].1)
    };
    if let Some(seq) = seq {
        shared.on_wire(idx, seq);
    }
}

/// Maps the link's cumulative acked id (the far replica has the message)
/// to a seq and reports it; forgets the messages it covers.
fn ack_advance(shared: &Shared, idx: usize, nl: &NetLink, ids: &Mutex<VecDeque<(u64, u64)>>) {
    let upto = nl.acked_upto();
    let mut last = None;
    {
        let mut q = lock(ids);
        while q.front().is_some_and(|(id, _)| *id <= upto) {
            last = q.pop_front().map(|(_, seq)| seq);
        }
    }
    if let Some(seq) = last {
        shared.on_far_received(idx, seq);
    }
}

/// How often the watcher looks at the link's health and pacing rate even
/// without events (events are dropped when nobody reads them in time).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Follows one network-sync session's link: on-the-wire and acked
/// reports, health (degraded or not) and its pacing rate (for a time
/// bound on exposure).
fn spawn_wire_watcher(
    shared: Arc<Shared>,
    idx: usize,
    nl: Arc<NetLink>,
    ids: Arc<Mutex<VecDeque<(u64, u64)>>>,
    closed: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut rate = u64::MAX;
        let mut last_look: Option<Instant> = None;
        while !closed.load(Ordering::Acquire) && !shared.stopping.load(Ordering::Acquire) {
            match nl.events().recv_timeout(WATCH_INTERVAL) {
                Ok(LinkEvent::OnWire(_)) => wire_advance(&shared, idx, &nl, &ids),
                Ok(LinkEvent::Acked(_)) => ack_advance(&shared, idx, &nl, &ids),
                Ok(LinkEvent::Degraded | LinkEvent::Healthy) => last_look = None,
                Ok(_) | Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
                Err(_) => return,
            }
            if last_look.is_none_or(|t| t.elapsed() >= WATCH_INTERVAL) {
                last_look = Some(Instant::now());
                // (A no-op unless the engine's view differs.)
                shared.on_far_health(idx, nl.health() == starblk_netsync::Health::Degraded);
                let now_rate = nl.stats().tx.pacing_rate_bits_per_s;
                if now_rate != rate {
                    rate = now_rate;
                    shared.on_far_rate(idx, rate);
                }
                // Reports whose events were dropped.
                wire_advance(&shared, idx, &nl, &ids);
                ack_advance(&shared, idx, &nl, &ids);
            }
        }
    })
}

/// A byte stream whose silence timeout can be set.
trait TimeoutRead: Read {
    fn set_silence_timeout(&mut self, t: Duration);
}

impl TimeoutRead for TcpStream {
    fn set_silence_timeout(&mut self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
}

impl TimeoutRead for MsgReader {
    fn set_silence_timeout(&mut self, t: Duration) {
        self.set_timeout(Some(t));
    }
}

/// Streams the write queue (and queued reads, and heartbeats) into `w`.
/// For TCP, small frames coalesce in a 64 KiB buffer and larger frames go
/// straight to the socket as one vectored write (no copy).
fn sender_loop<S: Sink>(shared: &Shared, link: &Link, gen: u64, mut w: S) -> String {
    let mut batch: Vec<(WriteHeader, Arc<Vec<u8>>, u64)> = Vec::with_capacity(SEND_BATCH_MAX);
    let mut last_hb = Instant::now() - HEARTBEAT_INTERVAL;
    // First the replica checks its log against this HE's history and
    // follows it (it refuses with Diverged otherwise); frames are handled
    // in order, so every write below comes after.
    // A replica that copies regions gets Copy instead, which carries the
    // same history.
    let first = match take_copy_request(shared, link, gen) {
        Some(req) => (FrameType::Copy, req.encode()),
        None => {
            let adopt = proto::Adopt { last_seq: shared.lock().next_seq - 1, history: shared.cfg.history.clone() };
            (FrameType::Adopt, adopt.encode())
        }
    };
    if let Err(e) = w.frame(first.0, &[&first.1]).and_then(|()| w.flush()) {
        return format!("{:?} send failed: {e}", first.0);
    }
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            let _ = w.flush();
            return "volume stopping".into();
        }
        if let Some(req) = take_replay_request(shared, link, gen) {
            if let Err(e) = w.frame(FrameType::Replay, &[&req.encode()]).and_then(|()| w.flush()) {
                return format!("replay request send failed: {e}");
            }
        }
        if link.rate_changed.swap(false, Ordering::AcqRel) && replay_running(shared, link) {
            let rate = shared.recovery_rate_bytes_per_s.load(Ordering::Acquire);
            if let Err(e) = w.frame(FrameType::RecoveryRate, &[&proto::encode_u64(rate)]) {
                return format!("recovery rate send failed: {e}");
            }
        }
        let mut wrote = match send_reads(link, &mut w) {
            Ok(w) => w,
            Err(why) => return why,
        };
        if let Err(why) = take_batch(shared, link, gen, &mut batch) {
            return why;
        }
        for (h, data, data_sum) in batch.drain(..) {
            if let Err(e) = w.write(&h, &data, data_sum) {
                return format!("send failed at seq {}: {e}", h.seq);
            }
            link.counters.writes_sent.fetch_add(1, Ordering::Relaxed);
            link.counters.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            wrote = true;
        }
        if let Err(e) = w.end_batch() {
            return format!("send failed: {e}");
        }
        if last_hb.elapsed() >= HEARTBEAT_INTERVAL {
            last_hb = Instant::now();
            let nonce = shared.started.elapsed().as_micros() as u64;
            if let Err(e) = w.frame(FrameType::Heartbeat, &[&proto::encode_u64(nonce)]) {
                return format!("heartbeat send failed: {e}");
            }
        }
        if !wrote {
            if let Err(e) = w.flush() {
                return format!("send failed: {e}");
            }
            thread::park_timeout(HEARTBEAT_INTERVAL);
        }
    }
}

/// Sends queued reads; returns whether any were written.
fn send_reads<S: Sink>(link: &Link, w: &mut S) -> Result<bool, String> {
    let mut wrote = false;
    while let Some(r) = link.read_q.pop() {
        let req_id = link.next_req_id.fetch_add(1, Ordering::Relaxed);
        lock(&link.pending_reads).insert(req_id, r);
        let req = ReadReq { req_id, offset: r.offset, len: r.len };
        w.frame(FrameType::Read, &[&req.encode()]).map_err(|e| format!("read send failed: {e}"))?;
        link.counters.reads_sent.fetch_add(1, Ordering::Relaxed);
        wrote = true;
    }
    Ok(wrote)
}

/// Takes the next writes this link has not sent, under the engine lock.
fn take_batch(
    shared: &Shared,
    link: &Link,
    gen: u64,
    batch: &mut Vec<(WriteHeader, Arc<Vec<u8>>, u64)>,
) -> Result<(), String> {
    let mut g = shared.lock();
    let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
    let next_seq = g.next_seq;
    let l = &g.links[link.idx];
    if l.conn_gen != gen || !l.state.is_connected() {
        return Err(format!("session superseded ({})", l.reason));
    }
    if l.replay.is_some() {
        // The replica is copying from a peer; writes follow when it is done.
        return Ok(());
    }
    let from = l.next_send_seq;
    if from < first {
        return Err(format!("seq {from} no longer in the write queue"));
    }
    let to = next_seq.min(from + SEND_BATCH_MAX as u64);
    for e in g.queue.range((from - first) as usize..(to - first) as usize) {
        let wh = WriteHeader { seq: e.seq, offset: e.offset, len: e.len, op: e.op, epoch: e.epoch };
        batch.push((wh, e.data.clone(), e.data_sum));
    }
    g.links[link.idx].next_send_seq = to;
    Ok(())
}

fn receiver_loop<R: TimeoutRead>(shared: &Shared, link: &Link, mut reader: FrameReader<R>) -> String {
    let mut timeout = TIMEOUT_MIN;
    reader.get_mut().set_silence_timeout(timeout);
    loop {
        let (h, p) = match reader.next_frame() {
            Ok(f) => f,
            Err(e) => {
                let e = client::read_err(&link.spec.addr, e);
                if let ClientError::Protocol { source: FrameError::BadMac { .. }, .. } = &e {
                    link.counters.auth_failed(&link.spec.name, AuthFailure::BadMac, &e);
                }
                return e.to_string();
            }
        };
        let res = match h.kind {
            FrameType::Ack => proto::decode_u64(h.kind, p).map(|seq| shared.on_durable(link.idx, seq)),
            FrameType::HeartbeatReply => proto::HeartbeatReply::decode(p).map(|r| {
                let srtt = on_rtt(shared, link, r.nonce);
                shared.lock().links[link.idx].log_first = Some(r.log_first);
                shared.on_durable(link.idx, r.durable_seq);
                let want = (Duration::from_micros(srtt) * 16).clamp(TIMEOUT_MIN, TIMEOUT_MAX);
                if want.abs_diff(timeout) > timeout / 4 {
                    timeout = want;
                    reader.get_mut().set_silence_timeout(timeout);
                }
            }),
            FrameType::ReadReply => {
                proto::decode_read_reply(p).map(|(id, status, data)| on_read_reply(shared, link, id, status, data))
            }
            FrameType::ReplayDone => proto::decode_u64(h.kind, p).map(|next| on_replay_done(shared, link, next)),
            FrameType::CopyProgress => {
                proto::decode_u64_pair(h.kind, p).map(|(done, total)| on_copy_progress(shared, link, done, total))
            }
            FrameType::CopyDone => proto::decode_u64(h.kind, p).map(|durable| on_copy_done(shared, link, durable)),
            FrameType::Error => {
                let decoded = ErrorFrame::decode(p);
                if let Ok(frame) = &decoded {
                    link.counters.refused(frame.code);
                }
                let why = match decoded {
                    Ok(frame) if frame.code == ErrorCode::Diverged => {
                        on_diverged(shared, link, frame.seq, &frame.message);
                        ClientError::Rejected { addr: link.spec.addr.clone(), frame }.to_string()
                    }
                    Ok(frame) if frame.code == ErrorCode::Auth => {
                        let e = ClientError::Rejected { addr: link.spec.addr.clone(), frame };
                        link.counters.auth_failed(&link.spec.name, AuthFailure::Refused, &e);
                        e.to_string()
                    }
                    Ok(frame) => {
                        on_replay_failed(shared, link, &frame.message);
                        on_copy_failed(shared, link, &frame.message);
                        ClientError::Rejected { addr: link.spec.addr.clone(), frame }.to_string()
                    }
                    Err(e) => format!("replica {}: malformed error frame: {e}", link.spec.addr),
                };
                return why;
            }
            other => return format!("replica {}: unexpected {other:?} frame", link.spec.addr),
        };
        if let Err(e) = res {
            return format!("replica {}: {e}", link.spec.addr);
        }
    }
}

/// Updates the smoothed RTT (EWMA, 1/8) and returns it in µs.
fn on_rtt(shared: &Shared, link: &Link, nonce_us: u64) -> u64 {
    let now = shared.started.elapsed().as_micros() as u64;
    let rtt = now.saturating_sub(nonce_us).max(1);
    let mut g = shared.lock();
    let l = &mut g.links[link.idx];
    l.srtt_us = if l.srtt_us == 0 { rtt } else { (7 * l.srtt_us + rtt) / 8 };
    l.srtt_us
}

fn on_read_reply(shared: &Shared, link: &Link, req_id: u64, status: u16, data: &[u8]) {
    let Some(mut r) = lock(&link.pending_reads).remove(&req_id) else {
        tracing::warn!(replica = %link.spec.name, req_id, "read reply for unknown request");
        return;
    };
    if status == 0 && data.len() == r.len as usize {
        shared.latency.read.record_since(r.submitted);
        shared.completer.complete(r.token, Ok(Some(data)));
        return;
    }
    tracing::warn!(replica = %link.spec.name, offset = r.offset, status, got = data.len(), "read failed; retrying elsewhere");
    r.tried |= 1 << link.idx;
    let mut g = shared.lock();
    shared.route_read(&mut g, r);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect(crate::POISONED)
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_addresses() {
        for a in ["127.0.0.1:7701", "127.9.9.9:1", "localhost:7701", "LOCALHOST:1", "[::1]:7701"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["192.0.2.10:7701", "[2001:db8::1]:7701", "far.example:7701", "10.0.0.1:1"] {
            assert!(!is_loopback(a), "{a}");
        }
    }
}
