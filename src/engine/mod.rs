//! The host element (HE) engine: sequencer, write queue, quorum tracking,
//! read routing and replica links.
//!
//! Frontends (ublk, `bench`, tests) call [`Volume::submit`] with a token and
//! are told the outcome through their [`Completer`]. Submission never waits
//! on the network; it waits only when the write queue is full
//! (backpressure, docs/semantics.md §7).
//!
//! Every write gets the next global seq and is appended to the bounded
//! write queue. One sender thread per replica streams the queue in seq
//! order; one receiver thread per replica reads cumulative durable acks.
//! A write completes once Q up-to-date replicas report it durable (§1a).

mod autorate;
pub mod blocking;
mod exposure;
pub mod keys;
pub mod latency;
mod link;
mod links;
pub mod membership;
pub mod startup;
pub mod status;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use starblk_replica::proto::{Uuid, WriteOp, MAX_IO_BYTES};
use starblk_replica::readview::ReadView;

use crate::config::OnQuorumLoss;
pub use exposure::Waits;
pub use link::{LinkState, ReplicaSpec};

/// Region granularity of the read-freshness table.
const REGION_SHIFT: u32 = 20;
/// Most replicas a volume may have (read routing uses a u64 bitmask).
pub const MAX_REPLICAS: usize = 64;
/// Largest discard or write-zeroes range in one request.
pub const DISCARD_MAX_BYTES: u64 = 1 << 30;
/// Spare write buffers kept for reuse.
const POOL_MAX: usize = 1024;

/// I/O failures reported to the frontend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// Offset or length outside the volume, misaligned, or too large.
    #[error("range offset {offset} len {len} is outside the volume or not block aligned")]
    OutOfRange { offset: u64, len: u64 },
    /// Quorum lost and `on_quorum_loss = "read-only"`: writes are refused.
    #[error("quorum lost: volume is read-only")]
    ReadOnly,
    /// Every eligible replica failed the read.
    #[error("read at offset {offset} failed on every replica ({tried} tried)")]
    ReadFailed { offset: u64, tried: u32 },
    /// The volume is shutting down.
    #[error("volume is shutting down")]
    ShuttingDown,
}

impl IoError {
    /// The negative errno the kernel should see.
    pub fn to_errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { .. } => -libc::EINVAL,
            IoError::ReadOnly => -libc::EROFS,
            IoError::ReadFailed { .. } => -libc::EIO,
            IoError::ShuttingDown => -libc::ESHUTDOWN,
        }
    }
}

/// Outcome of one request: reads carry their data, borrowed for the call.
pub type IoResult<'a> = Result<Option<&'a [u8]>, IoError>;

/// Receives completions. Called from engine threads, possibly under the
/// engine lock: implementations must be quick and must not call back into
/// the volume.
pub trait Completer: Send + Sync + 'static {
    /// Request `token` finished.
    fn complete(&self, token: u64, result: IoResult<'_>);
}

/// One block request.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Write `data` at `offset`; `fua` asks for durability before completion.
    Write { offset: u64, data: &'a [u8], fua: bool },
    /// Complete once every earlier write is durable on Q replicas.
    Flush,
    /// Deallocate a range.
    Discard { offset: u64, len: u32 },
    /// Zero a range.
    WriteZeroes { offset: u64, len: u32 },
}

/// Engine settings derived from the config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Volume name (for logs).
    pub name: String,
    /// Volume UUID learnt from the replicas.
    pub volume: Uuid,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Durable acks required.
    pub quorum: usize,
    /// Write-queue capacity.
    pub write_queue_bytes: u64,
    /// Behaviour with fewer than Q up-to-date replicas.
    pub on_quorum_loss: OnQuorumLoss,
    /// Epoch this HE writes with.
    pub epoch: u64,
    /// First seq this HE assigns minus one (the branch point).
    pub start_seq: u64,
    /// The history this HE writes: the leader's up to `start_seq`, then
    /// records of `epoch` (`docs/design.md`, "History").
    pub history: starblk_replica::history::History,
    /// Replay recovery rate limit per replica, bytes/s (0 = unlimited).
    pub recovery_rate_bytes_per_s: u64,
    /// The replica set at startup, as stored on the replicas
    /// (`docs/design.md`, "Membership").
    pub members: starblk_replica::members::Membership,
    /// The volume's `encrypt`: the default for replicas added online.
    pub encrypt: bool,
    /// The key replica sessions authenticate with (`key_file`); None runs
    /// unauthenticated.
    pub keys: Option<Arc<keys::VolumeKeys>>,
    /// `recovery_rate = "auto"`: a controller sets the limit (`autorate.rs`).
    pub recovery_rate_auto: bool,
    /// `local_reads`: read a same-machine `local` replica's data file
    /// directly (`docs/design.md`, "Local reads").
    pub local_reads: bool,
}

/// What `rekey` did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RekeyReport {
    /// The key sessions used before.
    pub old_key: String,
    /// The key they use now.
    pub new_key: String,
    /// Replicas whose session was re-established with the new key.
    pub moved: Vec<String>,
    /// Replicas that were not connected (their next session uses it).
    pub not_connected: Vec<String>,
    /// Replicas cut for the rekey that were not up to date again in time
    /// (they reconnect with the new key by themselves).
    pub not_back: Vec<String>,
    /// `recovery_rate = "auto"`: a controller sets the limit (`autorate.rs`).
    pub recovery_rate_auto: bool,
}

/// A write held in the write queue.
struct Entry {
    seq: u64,
    offset: u64,
    len: u32,
    op: WriteOp,
    /// Epoch the record was written under: this HE's, or an earlier one
    /// for history seeded from the leader's log.
    epoch: u64,
    data: Arc<Vec<u8>>,
    /// The 64-bit sum of `data` (`starblk_replica::sum`), taken once when
    /// the write is queued: every link's frame reuses it (one pass over
    /// the data however many replicas there are).
    data_sum: u64,
    /// Frontend token until the write completes.
    token: Option<u64>,
    /// [`Entry::bytes`] of every write up to this one since the HE started
    /// (for the exposure bound).
    cum_bytes: u64,
    /// When the frontend submitted it (latency histogram).
    submitted: Instant,
}

impl Entry {
    fn bytes(&self) -> u64 {
        self.data.len() as u64 + 64
    }
}

/// A read waiting for, or sent to, a replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingRead {
    token: u64,
    offset: u64,
    len: u32,
    /// Bitmask of replicas already tried.
    tried: u64,
    /// Seq the serving replica must have durable.
    need_seq: u64,
    /// When the frontend submitted it (latency histogram).
    submitted: Instant,
}

/// State behind the engine lock.
struct Core {
    next_seq: u64,
    queue: VecDeque<Entry>,
    queue_bytes: u64,
    /// [`Entry::bytes`] of every write queued since the HE started.
    cum_bytes: u64,
    /// Every write <= this is durable on Q replicas and completed.
    completed_seq: u64,
    region_seq: Vec<u64>,
    /// (target seq, token, submitted) of each waiting flush.
    flush_waiters: VecDeque<(u64, u64, Instant)>,
    deferred_reads: Vec<PendingRead>,
    links: Vec<link::LinkCore>,
    accepting: bool,
    quorum_lost_since: Option<Instant>,
    /// Threads waiting on `Shared::space`: `advance` wakes only if one
    /// does (std's condvar makes a futex call per notify otherwise, on
    /// every ack).
    space_waiters: u32,
}

/// State shared by the frontend, link threads and the control socket.
pub(crate) struct Shared {
    cfg: EngineConfig,
    core: Mutex<Core>,
    /// Signalled when queue space frees or the quorum changes.
    space: Condvar,
    completer: Arc<dyn Completer>,
    links: links::LinkTable,
    started: Instant,
    stopping: AtomicBool,
    /// Replay recovery rate limit, data bytes/s (0 = unlimited); starts at
    /// the config's and can be changed online.
    recovery_rate_bytes_per_s: AtomicU64,
    /// Submit-to-completion latency per request kind.
    latency: latency::Latency,
    /// Spare write buffers: lock-free, so a write's payload is copied
    /// before the engine lock is taken.
    pool: crossbeam::queue::ArrayQueue<Arc<Vec<u8>>>,
    /// The replica set in effect, and the one-change-at-a-time lock.
    members: membership::Members,
    /// The `recovery_rate = "auto"` controller, when on.
    autorate: autorate::AutoRate,
}

/// A running volume.
#[derive(Clone)]
pub struct Volume {
    shared: Arc<Shared>,
}

impl Volume {
    /// Starts links to every replica and returns at once; links connect in
    /// the background. Use [`Volume::wait_quorum`] and
    /// [`Volume::wait_connected`] to wait for them.
    pub fn start(cfg: EngineConfig, replicas: Vec<ReplicaSpec>, completer: Arc<dyn Completer>) -> Volume {
        assert!(replicas.len() <= MAX_REPLICAS, "at most {MAX_REPLICAS} replicas");
        debug_assert!(cfg.quorum >= 1 && cfg.quorum <= replicas.len());
        let regions = (cfg.size_bytes >> REGION_SHIFT) as usize + 1;
        let core = Core {
            next_seq: cfg.start_seq + 1,
            queue: VecDeque::new(),
            queue_bytes: 0,
            cum_bytes: 0,
            completed_seq: cfg.start_seq,
            region_seq: vec![0; regions],
            flush_waiters: VecDeque::new(),
            deferred_reads: Vec::new(),
            links: replicas
                .iter()
                .map(|r| {
                    let mut l = link::LinkCore::new(r.initial_durable_seq);
                    l.netsync = r.netsync.is_some() && r.wire_gate;
                    l.far = exposure::FarGate::for_spec(r);
                    l
                })
                .collect(),
            accepting: true,
            quorum_lost_since: Some(Instant::now()),
            space_waiters: 0,
        };
        let links = links::LinkTable::new(
            replicas.into_iter().enumerate().map(|(i, spec)| Arc::new(link::Link::new(i, spec))).collect(),
        );
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            space: Condvar::new(),
            completer,
            links,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            recovery_rate_bytes_per_s: AtomicU64::new(cfg.recovery_rate_bytes_per_s),
            latency: latency::Latency::default(),
            pool: crossbeam::queue::ArrayQueue::new(POOL_MAX),
            members: membership::Members::new(cfg.members.clone()),
            autorate: autorate::AutoRate::default(),
            cfg,
        });
        if shared.cfg.recovery_rate_auto {
            autorate::enable(&shared);
        }
        for l in &shared.links {
            link::spawn_manager(shared.clone(), l.clone());
        }
        Volume { shared }
    }

    /// Starts from the outcome of fencing: the write queue is seeded with
    /// the writes up to the branch point that some replicas miss.
    pub fn start_fenced(f: startup::Fenced, completer: Arc<dyn Completer>) -> Volume {
        let v = Volume::start(f.engine, f.replicas, completer);
        v.shared.seed(f.seed);
        v
    }

    /// Waits until Q replicas are up to date, or `timeout` passes.
    pub fn wait_quorum(&self, timeout: Duration) -> bool {
        let q = self.shared.cfg.quorum;
        self.wait_for(timeout, |g| g.up_to_date() >= q)
    }

    /// Waits until every replica's link is connected, or `timeout` passes;
    /// returns the names of those still not connected. `up` and `bench`
    /// call this after the quorum so that a network-sync link still
    /// saying hello does not let the first writes complete without it
    /// (§1(b) gates only connected links).
    pub fn wait_connected(&self, timeout: Duration) -> Vec<String> {
        let waiting = |l: &link::LinkCore| !l.state.is_connected() && l.state != LinkState::Removed;
        self.wait_for(timeout, |g| !g.links.iter().any(waiting));
        let g = self.shared.lock();
        let names = self.shared.links.iter().map(|l| &l.spec.name);
        g.links.iter().zip(names).filter(|(l, _)| waiting(l)).map(|(_, n)| n.clone()).collect()
    }

    /// Waits on the state condition variable until `done` or `timeout`.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&Core) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if done(&g) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.shared.wait_space(g, deadline - now);
        }
    }

    /// Moves every replica session to the key file's next key
    /// (docs/operations.md, "Keys and rotation"): new sessions use it at
    /// once; each connected session is then cut and re-established, one
    /// replica at a time, waiting up to `per_replica` for it to be up to
    /// date again before the next, so at most one replica is away at any
    /// moment. Writes go on meanwhile (a cut session catches up from the
    /// write queue); no write is dropped.
    pub fn rekey(&self, per_replica: Duration) -> Result<RekeyReport, keys::RekeyError> {
        let keys = self.shared.cfg.keys.as_ref().ok_or(keys::RekeyError::NoKeyFile)?;
        let (old, new) = keys.rekey()?;
        tracing::info!(old_key = %old, new_key = %new, "rekey: new sessions use the next key");
        let mut report = RekeyReport { old_key: old.to_string(), new_key: new.to_string(), ..Default::default() };
        for link in &self.shared.links {
            let (connected, gen) = {
                let g = self.shared.lock();
                (g.links[link.idx].state.is_connected(), g.links[link.idx].conn_gen)
            };
            if !connected {
                // Its next session authenticates with the new key.
                report.not_connected.push(link.spec.name.clone());
                continue;
            }
            link.cut("rekey: re-authenticating with the next key");
            let deadline = Instant::now() + per_replica;
            let back = loop {
                {
                    let g = self.shared.lock();
                    let l = &g.links[link.idx];
                    if l.conn_gen > gen && l.state == LinkState::UpToDate {
                        break true;
                    }
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if back {
                report.moved.push(link.spec.name.clone());
            } else {
                report.not_back.push(link.spec.name.clone());
            }
        }
        Ok(report)
    }

    /// Volume settings.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Starts one request. Completion arrives through the completer, maybe
    /// before this returns. Blocks only for write-queue backpressure.
    pub fn submit(&self, token: u64, req: Request<'_>) {
        let s = &self.shared;
        if let Err(e) = s.validate(&req) {
            s.completer.complete(token, Err(e));
            return;
        }
        match req {
            Request::Read { offset, len } => s.read(token, offset, len),
            Request::Write { offset, data, .. } => s.write(token, offset, data.len() as u32, WriteOp::Data, data),
            Request::Discard { offset, len } => s.write(token, offset, len, WriteOp::Discard, &[]),
            Request::WriteZeroes { offset, len } => s.write(token, offset, len, WriteOp::WriteZeroes, &[]),
            Request::Flush => s.flush(token),
        }
    }

    /// Waits (up to `timeout`) until every write submitted so far has
    /// completed; returns whether it did.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        let last = g.next_seq - 1;
        while g.completed_seq < last {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.shared.wait_space(g, deadline - now);
        }
        true
    }

    /// Latency histograms so far (metrics, the recovery rate controller).
    pub fn latency(&self) -> latency::LatencySnapshot {
        self.shared.latency.snapshot()
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> status::VolumeStatus {
        status::snapshot(&self.shared)
    }

    /// Stops taking writes, waits (up to `timeout`) until every connected
    /// replica has every write durable, then closes the links. Returns
    /// whether every connected replica caught up.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        let mut g = s.lock();
        g.accepting = false;
        let last = g.next_seq - 1;
        let caught_up = loop {
            let done = g.links.iter().all(|l| !l.state.is_connected() || l.durable_seq >= last);
            if done && g.completed_seq >= last {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            g = s.wait_space(g, (deadline - now).min(Duration::from_millis(50)));
        };
        drop(g);
        s.stopping.store(true, Ordering::Release);
        for l in &s.links {
            l.cut("volume shutting down");
        }
        caught_up
    }
}

impl Shared {
    /// The engine lock. A thread that panicked holding it may have left
    /// the queue or a link half updated: fail fast rather than go on.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("engine lock poisoned: a thread panicked holding it")
    }

    /// Waits on `space` for at most `timeout`, counted in `space_waiters`.
    fn wait_space<'a>(&self, mut g: MutexGuard<'a, Core>, timeout: Duration) -> MutexGuard<'a, Core> {
        g.space_waiters += 1;
        let (mut g, _) =
            self.space.wait_timeout(g, timeout).expect("engine lock poisoned: a thread panicked holding it");
        g.space_waiters -= 1;
        g
    }

    /// Puts already-completed history (seqs ending at the branch point) at
    /// the front of an empty write queue, for quick recovery.
    fn seed(&self, entries: Vec<starblk_replica::client::LogEntry>) {
        let mut g = self.lock();
        debug_assert!(g.queue.is_empty());
        debug_assert!(entries.last().is_none_or(|e| e.0.seq == g.completed_seq));
        for (h, data) in entries {
            let mut e = Entry {
                seq: h.seq,
                offset: h.offset,
                len: h.len,
                op: h.op,
                epoch: h.epoch,
                data_sum: starblk_replica::sum::data_sum(&data),
                data: Arc::new(data),
                token: None,
                cum_bytes: 0,
                submitted: Instant::now(),
            };
            g.queue_bytes += e.bytes();
            g.cum_bytes += e.bytes();
            e.cum_bytes = g.cum_bytes;
            g.queue.push_back(e);
        }
        drop(g);
        for l in &self.links {
            l.wake();
        }
    }

    fn validate(&self, req: &Request<'_>) -> Result<(), IoError> {
        // Data moves in frames of at most MAX_IO_BYTES; discard and
        // write-zeroes carry no data and may cover up to DISCARD_MAX_BYTES.
        let (offset, len, max) = match *req {
            Request::Read { offset, len } => (offset, len as u64, MAX_IO_BYTES as u64),
            Request::Write { offset, data, .. } => (offset, data.len() as u64, MAX_IO_BYTES as u64),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len } => {
                (offset, len as u64, DISCARD_MAX_BYTES)
            }
            Request::Flush => return Ok(()),
        };
        let bs = self.cfg.block_size as u64;
        let ok = len > 0
            && len <= max
            && offset % bs == 0
            && len % bs == 0
            && offset.checked_add(len).is_some_and(|e| e <= self.cfg.size_bytes);
        if ok {
            Ok(())
        } else {
            Err(IoError::OutOfRange { offset, len })
        }
    }

    /// Sequences a write into the queue, waiting for space if it is full.
    fn write(&self, token: u64, offset: u64, len: u32, op: WriteOp, data: &[u8]) {
        let need = data.len() as u64 + 64;
        // The copy happens before the lock: other submits and every ack
        // need it, and a 1 MiB copy takes a while.
        let mut buf = self.pool.pop().unwrap_or_default();
        let b = Arc::get_mut(&mut buf).expect("pooled buffers are unique");
        b.clear();
        b.extend_from_slice(data);
        let data_sum = starblk_replica::sum::data_sum(b);
        let mut g = self.lock();
        loop {
            if !g.accepting {
                drop(g);
                return self.completer.complete(token, Err(IoError::ShuttingDown));
            }
            if g.quorum_lost_since.is_some() && self.cfg.on_quorum_loss == OnQuorumLoss::ReadOnly && self.past_grace(&g)
            {
                drop(g);
                return self.completer.complete(token, Err(IoError::ReadOnly));
            }
            self.evict(&mut g, need);
            if g.queue_bytes + need <= self.cfg.write_queue_bytes || g.queue.is_empty() {
                break;
            }
            g = self.wait_space(g, Duration::from_millis(100));
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        g.queue_bytes += need;
        g.cum_bytes += need;
        let (epoch, cum_bytes) = (self.cfg.epoch, g.cum_bytes);
        let submitted = Instant::now();
        g.queue.push_back(Entry {
            seq,
            offset,
            len,
            op,
            epoch,
            data: buf,
            data_sum,
            token: Some(token),
            cum_bytes,
            submitted,
        });
        let (first, last) = ((offset >> REGION_SHIFT) as usize, ((offset + len as u64 - 1) >> REGION_SHIFT) as usize);
        for r in &mut g.region_seq[first..=last] {
            *r = seq;
        }
        drop(g);
        for l in &self.links {
            l.wake();
        }
    }

    /// A read-only volume refuses writes only after a short grace period, so
    /// a replica restart that is quickly repaired does not fail writes.
    fn past_grace(&self, g: &Core) -> bool {
        g.quorum_lost_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(500))
    }

    /// Drops completed entries from the front until `need` more bytes fit.
    /// A link that still needs an evicted entry falls out of the window.
    fn evict(&self, g: &mut Core, need: u64) {
        while g.queue_bytes + need > self.cfg.write_queue_bytes {
            let Some(front) = g.queue.front() else { break };
            if front.seq > g.completed_seq {
                break;
            }
            let seq = front.seq;
            let e = g.queue.pop_front().expect("front exists");
            g.queue_bytes -= e.bytes();
            let mut data = e.data;
            if Arc::get_mut(&mut data).is_some() {
                // A full pool drops the buffer.
                let _ = self.pool.push(data);
            }
            for (i, l) in g.links.iter_mut().enumerate() {
                // A replaying link takes nothing from the queue until its
                // replay ends; then it goes on from the queue or replays
                // again (on_replay_done), so eviction does not cut it.
                if l.state.is_connected() && l.replay.is_none() && l.next_send_seq <= seq {
                    l.set_lagging(starblk_recovery::LagReason::FellOutOfQueue { seq });
                    self.links[i].cut("fell out of the write-queue window");
                }
            }
        }
    }

    fn flush(&self, token: u64) {
        let mut g = self.lock();
        let target = g.next_seq - 1;
        if g.completed_seq >= target {
            drop(g);
            // Counted too: the histogram's count is the flushes served.
            self.latency.flush.record_us(0);
            return self.completer.complete(token, Ok(None));
        }
        g.flush_waiters.push_back((target, token, Instant::now()));
    }

    fn read(&self, token: u64, offset: u64, len: u32) {
        let mut g = self.lock();
        let (first, last) = ((offset >> REGION_SHIFT) as usize, ((offset + len as u64 - 1) >> REGION_SHIFT) as usize);
        // Writes of earlier hosts are known only as a whole, up to the
        // branch point: a replica that acked them may not have applied
        // them yet (tests/local_reads.rs, a new host's first reads).
        let need_seq = g.region_seq[first..=last].iter().copied().max().unwrap_or(0).max(self.cfg.start_seq);
        let r = PendingRead { token, offset, len, tried: 0, need_seq, submitted: Instant::now() };
        if let Some((idx, view)) = g.local_view(need_seq) {
            drop(g);
            if self.read_local(idx, &view, &r) {
                return;
            }
            g = self.lock();
        }
        self.route_read(&mut g, r);
    }

    /// Serves `r` from a same-machine replica's data file (`docs/design.md`,
    /// "Local reads"), outside the engine lock. False if the view could not
    /// serve it: the read then goes over TCP as any other.
    fn read_local(&self, idx: usize, view: &ReadView, r: &PendingRead) -> bool {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let counters = &self.links[idx].counters;
        BUF.with_borrow_mut(|buf| {
            buf.resize(buf.len().max(r.len as usize), 0);
            let data = &mut buf[..r.len as usize];
            match view.read(r.offset, data, r.need_seq) {
                Ok(()) => {
                    counters.reads_local.fetch_add(1, Ordering::Relaxed);
                    self.latency.read.record_since(r.submitted);
                    self.completer.complete(r.token, Ok(Some(data)));
                    true
                }
                Err(miss) => {
                    counters.local_missed(miss);
                    false
                }
            }
        })
    }

    /// Sends a read to the lowest-RTT up-to-date replica that has every
    /// write to its range; defers it if none has yet; fails it if every
    /// eligible replica was tried.
    fn route_read(&self, g: &mut Core, r: PendingRead) {
        let mut best: Option<(usize, u64)> = None;
        let mut any_candidate = false;
        for (i, l) in g.links.iter().enumerate() {
            if l.state != LinkState::UpToDate || r.tried & (1 << i) != 0 {
                continue;
            }
            any_candidate = true;
            if l.durable_seq >= r.need_seq && best.is_none_or(|(_, rtt)| l.srtt_us < rtt) {
                best = Some((i, l.srtt_us));
            }
        }
        match best {
            Some((i, _)) => self.links[i].send_read(r),
            None if any_candidate || (r.tried == 0 && self.cfg.on_quorum_loss == OnQuorumLoss::Suspend) => {
                g.deferred_reads.push(r)
            }
            None => {
                let tried = r.tried.count_ones();
                self.completer.complete(r.token, Err(IoError::ReadFailed { offset: r.offset, tried }));
            }
        }
    }

    /// Called when a network-sync link has every write <= `seq`, with its
    /// repair packets, on the wire.
    fn on_wire(&self, idx: usize, seq: u64) {
        let mut g = self.lock();
        let l = &mut g.links[idx];
        if seq <= l.wire_seq {
            return;
        }
        l.wire_seq = seq;
        self.advance(&mut g);
    }

    /// Called by receivers with a replica's cumulative durable seq.
    fn on_durable(&self, idx: usize, seq: u64) {
        let mut g = self.lock();
        let l = &mut g.links[idx];
        if seq <= l.durable_seq && l.state != LinkState::Recovering {
            return;
        }
        l.durable_seq = l.durable_seq.max(seq);
        self.advance(&mut g);
    }

    /// Re-evaluates link states, the quorum seq, completions, flushes and
    /// deferred reads. Called after any ack or state change.
    fn advance(&self, g: &mut Core) {
        let completed = g.completed_seq;
        for l in g.links.iter_mut() {
            if l.state == LinkState::Recovering && l.durable_seq >= completed && l.copy.is_none() {
                l.set_state(LinkState::UpToDate, String::new());
            }
        }
        self.update_quorum_flag(g);
        // A stack array, not a Vec: this runs on every ack.
        let mut durable = [0u64; MAX_REPLICAS];
        let mut n = 0;
        for l in g.links.iter().filter(|l| l.state == LinkState::UpToDate) {
            durable[n] = l.durable_seq;
            n += 1;
        }
        let q = self.cfg.quorum;
        if n >= q {
            durable[..n].sort_unstable_by(|a, b| b.cmp(a));
            let mut quorum_seq = durable[q - 1].min(g.next_seq - 1);
            // §1(b): every connected network-sync link that receives the
            // live stream (catching up or not) must also have the write
            // and its repair packets on the wire, within its exposure
            // bound, and acked while degraded (see `netsync_gate`).
            quorum_seq = self.netsync_gate(g, quorum_seq);
            if quorum_seq > g.completed_seq {
                self.complete_through(g, quorum_seq);
            }
        }
        self.retry_deferred(g);
        if g.space_waiters > 0 {
            self.space.notify_all();
        }
    }

    fn update_quorum_flag(&self, g: &mut Core) {
        let up = g.up_to_date();
        match (up >= self.cfg.quorum, g.quorum_lost_since) {
            (true, Some(_)) => {
                g.quorum_lost_since = None;
                tracing::info!(volume = %self.cfg.name, up, "quorum available");
            }
            (false, None) => {
                g.quorum_lost_since = Some(Instant::now());
                tracing::warn!(volume = %self.cfg.name, up, quorum = self.cfg.quorum, mode = %self.cfg.on_quorum_loss, "quorum lost");
            }
            _ => {}
        }
    }

    fn complete_through(&self, g: &mut Core, seq: u64) {
        let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
        debug_assert!(g.completed_seq + 1 >= first, "completed entries were evicted early");
        let start = (g.completed_seq + 1).saturating_sub(first) as usize;
        let end = (seq + 1 - first) as usize;
        for e in g.queue.range_mut(start..end.min(g.queue.len())) {
            if let Some(t) = e.token.take() {
                self.latency.write.record_since(e.submitted);
                self.completer.complete(t, Ok(None));
            }
        }
        g.completed_seq = seq;
        while g.flush_waiters.front().is_some_and(|(s, _, _)| *s <= seq) {
            let (_, t, submitted) = g.flush_waiters.pop_front().expect("front exists");
            self.latency.flush.record_since(submitted);
            self.completer.complete(t, Ok(None));
        }
    }

    fn retry_deferred(&self, g: &mut Core) {
        if g.deferred_reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut g.deferred_reads);
        for r in reads {
            self.route_read(g, r);
        }
    }
}

impl Core {
    fn up_to_date(&self) -> usize {
        self.links.iter().filter(|l| l.state == LinkState::UpToDate).count()
    }

    /// The read view of an up-to-date replica that has every write a read
    /// needs (docs/semantics.md §5: the rule a read over TCP follows), if one is on this
    /// machine.
    fn local_view(&self, need_seq: u64) -> Option<(usize, Arc<ReadView>)> {
        self.links.iter().enumerate().find_map(|(i, l)| match &l.local {
            Some(v) if l.state == LinkState::UpToDate && l.durable_seq >= need_seq => Some((i, v.clone())),
            _ => None,
        })
    }
}
