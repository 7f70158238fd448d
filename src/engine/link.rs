//! One replica link: its lifecycle state, and the manager, sender and
//! receiver threads that carry the TCP session.
//!
//! The manager connects (with backoff), decides from the replica's durable
//! seq whether it can catch up from the write queue (quick recovery), then
//! runs the receiver loop while a sender thread streams the write queue.
//! Any session error cuts the socket; both threads exit and the manager
//! reconnects.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam::queue::SegQueue;
use serde::Serialize;
use starblk_replica::client::{self, ClientError};
use starblk_replica::proto::{self, ErrorFrame, FrameType, Hello, ReadReq, WriteHeader};

use super::{PendingRead, Shared};
use crate::config::Role;

/// Heartbeat period on an idle or busy link.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Bounds of the RTT-scaled failure timeout.
const TIMEOUT_MIN: Duration = Duration::from_secs(3);
const TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// Writes sent per lock acquisition.
const SEND_BATCH_MAX: usize = 64;
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
}

/// Link state kept under the engine lock.
pub(crate) struct LinkCore {
    pub state: LinkState,
    pub reason: String,
    pub durable_seq: u64,
    pub next_send_seq: u64,
    pub srtt_us: u64,
    /// Bumped per session so stale threads notice they are stale.
    pub conn_gen: u64,
    pub since: Instant,
}

impl LinkCore {
    pub fn new(durable_seq: u64) -> LinkCore {
        LinkCore {
            state: LinkState::Failed,
            reason: "not yet connected".into(),
            durable_seq,
            next_send_seq: durable_seq + 1,
            srtt_us: 0,
            conn_gen: 0,
            since: Instant::now(),
        }
    }

    pub fn set_state(&mut self, state: LinkState, reason: String) {
        if self.state != state {
            tracing::info!(from = %self.state, to = %state, %reason, "replica state change");
            self.since = Instant::now();
        }
        self.state = state;
        self.reason = reason;
    }
}

/// Counters per link (lock-free, for status).
#[derive(Default)]
pub(crate) struct LinkCounters {
    pub writes_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub reads_sent: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The shared handle of one replica link.
pub(crate) struct Link {
    pub idx: usize,
    pub spec: ReplicaSpec,
    sender: Mutex<Option<Thread>>,
    socket: Mutex<Option<TcpStream>>,
    read_q: SegQueue<PendingRead>,
    pending_reads: Mutex<HashMap<u64, PendingRead>>,
    next_req_id: AtomicU64,
    pub counters: LinkCounters,
}

impl Link {
    pub fn new(idx: usize, spec: ReplicaSpec) -> Link {
        debug_assert!(idx < 64, "read routing uses a u64 bitmask");
        Link {
            idx,
            spec,
            sender: Mutex::new(None),
            socket: Mutex::new(None),
            read_q: SegQueue::new(),
            pending_reads: Mutex::new(HashMap::new()),
            next_req_id: AtomicU64::new(1),
            counters: LinkCounters::default(),
        }
    }

    /// Wakes the sender thread (new writes or reads).
    pub fn wake(&self) {
        if let Some(t) = lock(&self.sender).as_ref() {
            t.unpark();
        }
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
        self.wake();
    }
}

/// Starts the manager thread of `link`.
pub(crate) fn spawn_manager(shared: Arc<Shared>, link: Arc<Link>) {
    let name = format!("link-{}", link.spec.name);
    thread::Builder::new().name(name).spawn(move || manager(shared, link)).expect("spawn link manager thread");
}

fn manager(shared: Arc<Shared>, link: Arc<Link>) {
    let mut backoff = BACKOFF_MIN;
    while !shared.stopping.load(Ordering::Acquire) {
        let hello = Hello { volume: shared.cfg.volume, epoch: shared.cfg.epoch, flags: 0 };
        let reason = match client::connect(&link.spec.addr, hello, CONNECT_TIMEOUT) {
            Ok(sess) => {
                backoff = BACKOFF_MIN;
                run_session(&shared, &link, sess)
            }
            Err(e) => e.to_string(),
        };
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        mark_failed(&shared, &link, reason);
        thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
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

/// Admits a fresh session (quick recovery from the write queue if it can),
/// then runs it until it breaks. Returns why it ended.
fn run_session(shared: &Arc<Shared>, link: &Arc<Link>, sess: client::Session) -> String {
    let d = sess.hello.durable_seq;
    let gen = {
        let mut g = shared.lock();
        let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
        let last = g.next_seq - 1;
        let l = &mut g.links[link.idx];
        l.durable_seq = d;
        if d + 1 < first {
            let why = format!(
                "missing writes {}..{} are no longer in the write queue; needs replay or incremental recovery",
                d + 1,
                first - 1
            );
            l.set_state(LinkState::Lagging, why.clone());
            shared.advance(&mut g);
            return why;
        }
        if d > last {
            let why = format!(
                "replica durable seq {d} is past this HE's history ({last}); needs rollback to the branch point"
            );
            l.set_state(LinkState::Lagging, why.clone());
            return why;
        }
        l.conn_gen += 1;
        l.next_send_seq = d + 1;
        l.set_state(LinkState::Recovering, format!("quick recovery from seq {}", d + 1));
        let gen = l.conn_gen;
        shared.advance(&mut g);
        gen
    };
    link.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    if let Ok(s) = sess.writer.try_clone() {
        *lock(&link.socket) = Some(s);
    }
    let (reader, writer) = (sess.reader, sess.writer);
    let (s2, l2) = (shared.clone(), link.clone());
    let sender = thread::Builder::new().name(format!("send-{}", link.spec.name)).spawn(move || {
        let why = sender_loop(&s2, &l2, gen, writer);
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
    *lock(&link.socket) = None;
    why
}

fn sender_loop(shared: &Shared, link: &Link, gen: u64, stream: TcpStream) -> String {
    // Small frames coalesce into one send; a frame larger than the buffer
    // goes straight to the socket as one vectored write (no copy).
    let mut w = BufWriter::with_capacity(64 * 1024, stream);
    let mut batch: Vec<(WriteHeader, Arc<Vec<u8>>)> = Vec::with_capacity(SEND_BATCH_MAX);
    let mut last_hb = Instant::now() - HEARTBEAT_INTERVAL;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            let _ = w.flush();
            return "volume stopping".into();
        }
        let mut wrote = match send_reads(link, &mut w) {
            Ok(w) => w,
            Err(why) => return why,
        };
        if let Err(why) = take_batch(shared, link, gen, &mut batch) {
            return why;
        }
        for (h, data) in batch.drain(..) {
            let sub = h.encode();
            if let Err(e) = proto::write_frame(&mut w, FrameType::Write, 0, &[&sub, &data]) {
                return format!("send failed at seq {}: {e}", h.seq);
            }
            link.counters.writes_sent.fetch_add(1, Ordering::Relaxed);
            link.counters.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            wrote = true;
        }
        if last_hb.elapsed() >= HEARTBEAT_INTERVAL {
            last_hb = Instant::now();
            let nonce = shared.started.elapsed().as_micros() as u64;
            if let Err(e) = proto::write_frame(&mut w, FrameType::Heartbeat, 0, &[&proto::encode_u64(nonce)]) {
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
fn send_reads(link: &Link, w: &mut BufWriter<TcpStream>) -> Result<bool, String> {
    let mut wrote = false;
    while let Some(r) = link.read_q.pop() {
        let req_id = link.next_req_id.fetch_add(1, Ordering::Relaxed);
        lock(&link.pending_reads).insert(req_id, r);
        let req = ReadReq { req_id, offset: r.offset, len: r.len };
        proto::write_frame(w, FrameType::Read, 0, &[&req.encode()]).map_err(|e| format!("read send failed: {e}"))?;
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
    batch: &mut Vec<(WriteHeader, Arc<Vec<u8>>)>,
) -> Result<(), String> {
    let mut g = shared.lock();
    let first = g.queue.front().map(|e| e.seq).unwrap_or(g.next_seq);
    let next_seq = g.next_seq;
    let l = &g.links[link.idx];
    if l.conn_gen != gen || !l.state.is_connected() {
        return Err(format!("session superseded ({})", l.reason));
    }
    let from = l.next_send_seq;
    if from < first {
        return Err(format!("seq {from} no longer in the write queue"));
    }
    let to = next_seq.min(from + SEND_BATCH_MAX as u64);
    for e in g.queue.range((from - first) as usize..(to - first) as usize) {
        batch.push((WriteHeader { seq: e.seq, offset: e.offset, len: e.len, op: e.op }, e.data.clone()));
    }
    g.links[link.idx].next_send_seq = to;
    Ok(())
}

fn receiver_loop(
    shared: &Shared,
    link: &Link,
    mut reader: proto::FrameReader<std::io::BufReader<TcpStream>>,
) -> String {
    let mut timeout = TIMEOUT_MIN;
    let _ = reader.get_ref().get_ref().set_read_timeout(Some(timeout));
    loop {
        let (h, p) = match reader.next_frame() {
            Ok(f) => f,
            Err(e) => return client::read_err(&link.spec.addr, e).to_string(),
        };
        let res = match h.kind {
            FrameType::Ack => proto::decode_u64(h.kind, p).map(|seq| shared.on_durable(link.idx, seq)),
            FrameType::HeartbeatReply => proto::decode_u64_pair(h.kind, p).map(|(nonce, durable)| {
                let srtt = on_rtt(shared, link, nonce);
                shared.on_durable(link.idx, durable);
                let want = (Duration::from_micros(srtt) * 16).clamp(TIMEOUT_MIN, TIMEOUT_MAX);
                if want.abs_diff(timeout) > timeout / 4 {
                    timeout = want;
                    let _ = reader.get_ref().get_ref().set_read_timeout(Some(timeout));
                }
            }),
            FrameType::ReadReply => {
                proto::decode_read_reply(p).map(|(id, status, data)| on_read_reply(shared, link, id, status, data))
            }
            FrameType::Error => {
                let why =
                    ErrorFrame::decode(p).map(|f| ClientError::Rejected { addr: link.spec.addr.clone(), frame: f });
                return match why {
                    Ok(e) => e.to_string(),
                    Err(e) => format!("replica {}: malformed error frame: {e}", link.spec.addr),
                };
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
        shared.completer.complete(r.token, Ok(Some(data)));
        return;
    }
    tracing::warn!(replica = %link.spec.name, offset = r.offset, status, got = data.len(), "read failed; retrying elsewhere");
    r.tried |= 1 << link.idx;
    let mut g = shared.lock();
    shared.route_read(&mut g, r);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
