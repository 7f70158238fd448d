//! The TCP relay: a byte pipe per direction with one-way delay, an optional
//! shared rate limit and a cut switch.
//!
//! Each accepted connection gets an upstream connection and, per direction,
//! a reader thread and a writer thread joined by a byte-bounded FIFO of
//! chunks. A chunk is whatever one `read` returned; it is written out at
//! `read time + serialisation + delay_ms`.
//!
//! **Cut semantics** (chosen for the rolling-disaster test, where the
//! primary site vanishes): from the cut instant the relay reads nothing more
//! from either side, so no new byte enters the link. Chunks already read
//! are still delivered after their delay. The connections then stay open
//! and silent: a cut fibre sends neither FIN nor RST, so the far side only
//! learns of the cut from its own timeouts. Bytes are never dropped, so on
//! `uncut` the streams resume intact. A chunk whose `read` returned after
//! the cut instant is held back until `uncut`. Connections accepted during a
//! cut are held silent too and connected upstream only after `uncut`.
//!
//! The relay terminates TCP on both sides, so it cannot emulate packet loss
//! on a TCP flow; only delay, rate and cut.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::error::{Error, Result};
use crate::params::{check_ms, mbit_to_bits, Direction};
use crate::udp::{lock, spawn};

/// How often blocked threads look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Largest chunk one `read` takes.
const READ_BYTES: usize = 64 * 1024;
/// Spare chunk buffers kept per pipe.
const SPARE_BUFFERS: usize = 64;

/// Delay and rate of the TCP relay, the same both ways.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpParams {
    /// One-way delay applied to every chunk.
    pub delay_ms: f64,
    /// Rate per direction, shared by all connections; 0 = unlimited.
    pub rate_bits_per_s: u64,
}

/// Setting names accepted by [`TcpParams::set`].
pub const TCP_SETTING_NAMES: &str = "delay_ms, rate_bits_per_s, rate_mbit";

impl TcpParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        check_ms("delay_ms", self.delay_ms)
    }

    /// Changes one setting by name (`delay_ms`, `rate_mbit`,
    /// `rate_bits_per_s`); on error `self` is unchanged.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let (name, value) = (name.replace('-', "_"), value.trim());
        let num = |v: &str| v.parse::<f64>().map_err(|_| Error::invalid(&name, v, "a number"));
        let mut next = self.clone();
        match name.as_str() {
            "delay_ms" | "delay" => next.delay_ms = num(value)?,
            "rate_mbit" => next.rate_bits_per_s = mbit_to_bits(&name, num(value)?)?,
            "rate_bits_per_s" => {
                next.rate_bits_per_s = value.parse().map_err(|_| Error::invalid(&name, value, "bits per second"))?
            }
            _ => return Err(Error::Unknown { what: "TCP setting", name, expected: TCP_SETTING_NAMES }),
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

/// How to start a TCP relay.
#[derive(Debug, Clone)]
pub struct TcpRelayConfig {
    /// Where clients connect. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where each accepted connection is relayed to.
    pub upstream: SocketAddr,
    /// Delay and rate.
    pub params: TcpParams,
    /// Bound on bytes read and not yet written, per connection and
    /// direction. When full the reader stops reading, so TCP flow control
    /// pushes back on the sender. It also caps throughput at
    /// `queue_bytes / delay`, so keep it above the bandwidth-delay product.
    pub queue_bytes: usize,
    /// Most connections relayed at once; further ones are closed at accept.
    pub max_connections: u64,
    /// Timeout for connecting upstream.
    pub connect_timeout: Duration,
}

impl TcpRelayConfig {
    /// A transparent relay from `listen` to `upstream`.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        TcpRelayConfig {
            listen,
            upstream,
            params: TcpParams::default(),
            queue_bytes: 16 << 20,
            max_connections: 256,
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// Sets the one-way delay.
    pub fn delay_ms(mut self, delay_ms: f64) -> Self {
        self.params.delay_ms = delay_ms;
        self
    }

    /// Binds and starts accepting.
    pub fn start(self) -> Result<TcpRelayHandle> {
        TcpRelayHandle::start(self)
    }
}

/// Counters of one direction of the TCP relay (all connections).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TcpDirStats {
    /// Bytes read from the sending side.
    pub bytes_received: u64,
    /// Bytes written to the receiving side.
    pub bytes_forwarded: u64,
    /// Chunks written.
    pub chunks_forwarded: u64,
    /// Bytes read and not yet written.
    pub in_flight_bytes: u64,
    /// Bytes read after a cut and held until `uncut`.
    pub held_by_cut_bytes: u64,
}

/// Counters of the TCP relay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TcpStats {
    /// Connections accepted from clients.
    pub connections_accepted: u64,
    /// Connections currently relayed.
    pub connections_active: u64,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: u64,
    /// Upstream connects that failed (the client is then closed).
    pub connect_failures: u64,
    /// Client → upstream.
    pub up: TcpDirStats,
    /// Upstream → client.
    pub down: TcpDirStats,
}

#[derive(Default)]
struct DirCounters {
    bytes_received: AtomicU64,
    bytes_forwarded: AtomicU64,
    chunks_forwarded: AtomicU64,
    in_flight_bytes: AtomicU64,
    held_by_cut_bytes: AtomicU64,
}

impl DirCounters {
    fn snapshot(&self) -> TcpDirStats {
        TcpDirStats {
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_forwarded: self.bytes_forwarded.load(Relaxed),
            chunks_forwarded: self.chunks_forwarded.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
            held_by_cut_bytes: self.held_by_cut_bytes.load(Relaxed),
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    params: Mutex<TcpParams>,
    queue_bytes: usize,
    max_connections: u64,
    connect_timeout: Duration,
    cut: [AtomicBool; 2],
    /// Readers paused by a cut wait here; `uncut` and stop notify.
    gate: (Mutex<()>, Condvar),
    /// Per direction, when the shared serialiser is free again.
    serial_free_at: [Mutex<Option<Instant>>; 2],
    stop: AtomicBool,
    counters: [DirCounters; 2],
    accepted: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    connect_failures: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    fn is_cut(&self, dir: Direction) -> bool {
        self.cut[dir.index()].load(SeqCst)
    }

    /// Blocks while `dir` (or, with `None`, either direction) is cut;
    /// returns false if the relay stopped meanwhile.
    fn wait_uncut(&self, dir: Option<Direction>) -> bool {
        let cut = || dir.map_or_else(|| Direction::BOTH.iter().any(|&d| self.is_cut(d)), |d| self.is_cut(d));
        let mut g = lock(&self.gate.0);
        while cut() && !self.stopped() {
            g = self.gate.1.wait_timeout(g, STOP_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
        !self.stopped()
    }

    /// When a chunk of `n` bytes read now is due at the far side.
    fn schedule(&self, dir: Direction, n: usize) -> Instant {
        let params = lock(&self.params).clone();
        let now = Instant::now();
        let mut depart = now;
        if params.rate_bits_per_s > 0 {
            let mut free = lock(&self.serial_free_at[dir.index()]);
            let start = free.map_or(now, |f| f.max(now));
            depart = start + Duration::from_secs_f64(n as f64 * 8.0 / params.rate_bits_per_s as f64);
            *free = Some(depart);
        }
        depart + Duration::from_secs_f64(params.delay_ms / 1e3)
    }

    fn spawn_tracked(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let t = spawn(name, f)?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(t);
        Ok(())
    }
}

/// A running TCP relay. Dropping it stops the relay and closes every
/// connection.
pub struct TcpRelayHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpRelayHandle {
    fn start(cfg: TcpRelayConfig) -> Result<Self> {
        cfg.params.validate()?;
        let listener =
            TcpListener::bind(cfg.listen).map_err(|source| Error::Bind { addr: cfg.listen.to_string(), source })?;
        let local_addr = listener.local_addr().map_err(Error::io("reading the listen address"))?;
        tracing::info!(%local_addr, upstream = %cfg.upstream, "wanem: tcp relay started");
        let shared = Arc::new(Shared {
            upstream: cfg.upstream,
            params: Mutex::new(cfg.params),
            queue_bytes: cfg.queue_bytes.max(1),
            max_connections: cfg.max_connections,
            connect_timeout: cfg.connect_timeout,
            cut: Default::default(),
            gate: (Mutex::new(()), Condvar::new()),
            serial_free_at: Default::default(),
            stop: AtomicBool::new(false),
            counters: Default::default(),
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = spawn("wanem-tcp-accept".into(), move || run_acceptor(&s, &listener))?;
        Ok(TcpRelayHandle { shared, local_addr, acceptor: Some(acceptor) })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current delay and rate.
    pub fn params(&self) -> TcpParams {
        lock(&self.shared.params).clone()
    }

    /// Replaces delay and rate for chunks read from now on.
    pub fn set_params(&self, params: TcpParams) -> Result<()> {
        params.validate()?;
        *lock(&self.shared.params) = params;
        Ok(())
    }

    /// Changes one setting by name; see [`TcpParams::set`].
    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        lock(&self.shared.params).set(name, value)
    }

    /// Cuts one direction now: nothing more is read from its sending side.
    pub fn cut(&self, dir: Direction) {
        self.shared.cut[dir.index()].store(true, SeqCst);
        tracing::info!(%dir, "wanem: tcp link cut");
    }

    /// Cuts both directions.
    pub fn cut_both(&self) {
        Direction::BOTH.into_iter().for_each(|d| self.cut(d));
    }

    /// Restores one direction; held bytes flow again, streams intact.
    pub fn uncut(&self, dir: Direction) {
        self.shared.cut[dir.index()].store(false, SeqCst);
        let _g = lock(&self.shared.gate.0);
        self.shared.gate.1.notify_all();
        tracing::info!(%dir, "wanem: tcp link restored");
    }

    /// Restores both directions.
    pub fn uncut_both(&self) {
        Direction::BOTH.into_iter().for_each(|d| self.uncut(d));
    }

    /// Whether a direction is cut.
    pub fn is_cut(&self, dir: Direction) -> bool {
        self.shared.is_cut(dir)
    }

    /// Counters.
    pub fn stats(&self) -> TcpStats {
        let s = &self.shared;
        TcpStats {
            connections_accepted: s.accepted.load(Relaxed),
            connections_active: s.active.load(Relaxed),
            connections_refused: s.refused.load(Relaxed),
            connect_failures: s.connect_failures.load(Relaxed),
            up: s.counters[0].snapshot(),
            down: s.counters[1].snapshot(),
        }
    }

    /// Stops accepting, closes every connection and waits for the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = lock(&self.shared.gate.0);
            self.shared.gate.1.notify_all();
        }
        // The acceptor blocks in accept(); a connection wakes it up.
        let _ = TcpStream::connect_timeout(&wake_addr(self.local_addr), Duration::from_millis(200));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // Connection threads may spawn siblings while we join: repeat.
        loop {
            let threads = std::mem::take(&mut *lock(&self.shared.threads));
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for TcpRelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connectable form of the listen address (0.0.0.0 → loopback).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

fn run_acceptor(shared: &Arc<Shared>, listener: &TcpListener) {
    for conn in listener.incoming() {
        if shared.stopped() {
            return;
        }
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "wanem: accept failed");
                std::thread::sleep(Duration::from_millis(5)); // e.g. EMFILE: do not spin
                continue;
            }
        };
        shared.accepted.fetch_add(1, Relaxed);
        if shared.active.load(Relaxed) >= shared.max_connections {
            shared.refused.fetch_add(1, Relaxed);
            continue; // dropping `client` closes it
        }
        shared.active.fetch_add(1, Relaxed);
        let s = shared.clone();
        let spawned = shared.spawn_tracked("wanem-tcp-conn".into(), move || run_connection(&s, client));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "wanem: cannot relay a connection");
            shared.active.fetch_sub(1, Relaxed);
        }
    }
}

/// Connects upstream and runs the client → upstream reader; the other
/// three pipe threads are spawned.
fn run_connection(shared: &Arc<Shared>, client: TcpStream) {
    let result = connect_and_relay(shared, client);
    if let Err(e) = result {
        tracing::debug!(error = %e, "wanem: connection ended with an error");
    }
}

fn connect_and_relay(shared: &Arc<Shared>, client: TcpStream) -> io::Result<()> {
    // Counted active (by the acceptor) until both readers are done, or
    // until setup fails and the guard drops on return.
    let guard = Arc::new(ActiveGuard(shared.clone()));
    // A connection opened during a cut stays silent until the link is back.
    if !shared.wait_uncut(None) {
        return Ok(());
    }
    let upstream = TcpStream::connect_timeout(&shared.upstream, shared.connect_timeout).inspect_err(|_| {
        shared.connect_failures.fetch_add(1, Relaxed);
    })?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?; // the delay we add must be the only one
        s.set_read_timeout(Some(STOP_POLL))?;
    }
    let up = Arc::new(Pipe::default());
    let down = Arc::new(Pipe::default());
    start_writer(shared, Direction::Up, upstream.try_clone()?, up.clone())?;
    start_writer(shared, Direction::Down, client.try_clone()?, down.clone())?;
    let (s, d, g) = (shared.clone(), down.clone(), guard.clone());
    shared
        .spawn_tracked("wanem-tcp-rd-down".into(), move || {
            run_reader(&s, Direction::Down, upstream, &d);
            drop(g);
        })
        .map_err(io::Error::other)?;
    run_reader(shared, Direction::Up, client, &up);
    drop(guard);
    Ok(())
}

/// Decrements the active-connection count when the last holder drops it.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

fn start_writer(shared: &Arc<Shared>, dir: Direction, dst: TcpStream, pipe: Arc<Pipe>) -> io::Result<()> {
    let s = shared.clone();
    shared
        .spawn_tracked(format!("wanem-tcp-wr-{dir}"), move || run_writer(&s, dir, dst, &pipe))
        .map_err(io::Error::other)
}

/// One chunk in flight.
struct Chunk {
    due: Instant,
    data: Vec<u8>,
}

#[derive(Default)]
struct PipeState {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// The reader saw EOF or an error: the writer half-closes after draining.
    eof: bool,
    /// The writer failed: the reader should stop.
    broken: bool,
    spare: Vec<Vec<u8>>,
}

/// The bounded FIFO between a reader and a writer.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

impl Pipe {
    fn take_buffer(&self) -> Vec<u8> {
        lock(&self.state).spare.pop().unwrap_or_default()
    }

    /// Appends a chunk, waiting while the pipe is full; false if the writer
    /// is gone or the relay stopped.
    fn push(&self, shared: &Shared, limit: usize, chunk: Chunk) -> bool {
        let mut st = lock(&self.state);
        // An empty pipe always takes one chunk, so a chunk bigger than the
        // limit cannot wedge it.
        while st.bytes > 0 && st.bytes + chunk.data.len() > limit && !st.broken && !shared.stopped() {
            st = self.changed.wait_timeout(st, STOP_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
        if st.broken || shared.stopped() {
            return false;
        }
        st.bytes += chunk.data.len();
        st.chunks.push_back(chunk);
        self.changed.notify_all();
        true
    }

    fn close(&self) {
        lock(&self.state).eof = true;
        self.changed.notify_all();
    }

    /// Next chunk; `None` once the pipe is drained and closed, broken, or
    /// the relay stopped.
    fn pop(&self, shared: &Shared) -> Option<Chunk> {
        let mut st = lock(&self.state);
        loop {
            if shared.stopped() || st.broken {
                return None;
            }
            if let Some(c) = st.chunks.pop_front() {
                st.bytes -= c.data.len();
                self.changed.notify_all();
                return Some(c);
            }
            if st.eof {
                return None;
            }
            st = self.changed.wait_timeout(st, STOP_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut st = lock(&self.state);
        if st.spare.len() < SPARE_BUFFERS {
            st.spare.push(buf);
        }
    }

    /// Marks the pipe broken and discards what it held; returns the
    /// discarded byte count.
    fn break_pipe(&self) -> u64 {
        let mut st = lock(&self.state);
        st.broken = true;
        st.chunks.clear();
        let discarded = std::mem::take(&mut st.bytes) as u64;
        self.changed.notify_all();
        discarded
    }
}

fn run_reader(shared: &Shared, dir: Direction, mut src: TcpStream, pipe: &Pipe) {
    let c = &shared.counters[dir.index()];
    let mut scratch = vec![0u8; READ_BYTES];
    loop {
        if !shared.wait_uncut(Some(dir)) {
            break;
        }
        let n = match src.read(&mut scratch) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        c.bytes_received.fetch_add(n as u64, Relaxed);
        if shared.is_cut(dir) {
            // Read after the cut instant: hold it, never drop stream bytes.
            c.held_by_cut_bytes.fetch_add(n as u64, Relaxed);
            let uncut = shared.wait_uncut(Some(dir));
            c.held_by_cut_bytes.fetch_sub(n as u64, Relaxed);
            if !uncut {
                break;
            }
        }
        let mut data = pipe.take_buffer();
        data.clear();
        data.extend_from_slice(&scratch[..n]);
        let chunk = Chunk { due: shared.schedule(dir, n), data };
        c.in_flight_bytes.fetch_add(n as u64, Relaxed);
        if !pipe.push(shared, shared.queue_bytes, chunk) {
            c.in_flight_bytes.fetch_sub(n as u64, Relaxed);
            break;
        }
    }
    pipe.close();
}

fn run_writer(shared: &Shared, dir: Direction, mut dst: TcpStream, pipe: &Pipe) {
    clock::tighten_timer_slack();
    let c = &shared.counters[dir.index()];
    while let Some(chunk) = pipe.pop(shared) {
        let n = chunk.data.len() as u64;
        if !sleep_until_or_stop(shared, chunk.due) {
            c.in_flight_bytes.fetch_sub(n, Relaxed);
            break;
        }
        let written = dst.write_all(&chunk.data);
        c.in_flight_bytes.fetch_sub(n, Relaxed);
        if written.is_err() {
            let discarded = pipe.break_pipe();
            c.in_flight_bytes.fetch_sub(discarded, Relaxed);
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        c.bytes_forwarded.fetch_add(n, Relaxed);
        c.chunks_forwarded.fetch_add(1, Relaxed);
        pipe.recycle(chunk.data);
    }
    // Drained after EOF (or stopped): pass the half-close on.
    let _ = dst.shutdown(Shutdown::Write);
}

/// Sleeps until `due` in slices so that a stop is noticed; false if stopped.
fn sleep_until_or_stop(shared: &Shared, due: Instant) -> bool {
    loop {
        if shared.stopped() {
            return false;
        }
        let now = Instant::now();
        if due <= now + STOP_POLL {
            clock::sleep_until(due);
            return true;
        }
        std::thread::sleep(STOP_POLL);
    }
}
