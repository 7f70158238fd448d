//! The UDP relay.
//!
//! Per direction, a receiver thread reads datagrams, asks the [`LinkModel`]
//! for their fate and pushes survivors into a delivery heap ordered by due
//! time (ties broken by arrival sequence, so equal due times stay FIFO); a
//! sender thread sleeps until the earliest due time and sends.
//!
//! ```text
//!  client ──▶ [listen sock] ─rx up──▶ heap ─tx up──▶ [upstream sock] ──▶ upstream
//!  client ◀── [listen sock] ◀─tx down─ heap ◀─rx down─ [upstream sock] ◀── upstream
//! ```

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock;
use crate::error::{Error, Result};
use crate::model::{Fate, LinkModel};
use crate::params::{Direction, LinkParams};
use crate::rx;
use crate::stats::{DirCounters, DirStats, RelayStats};

/// Largest UDP payload; the receive scratch buffer has this size so that no
/// datagram is ever truncated.
const MAX_DATAGRAM: usize = 65_536;
/// How often blocked receivers look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Most datagrams a sender takes from the heap per lock.
const BATCH: usize = 64;
/// Spare buffers kept for reuse, per relay.
const POOL_BUFFERS: usize = 4096;
/// Initial capacity of a fresh buffer; grows to the largest datagram seen.
const BUFFER_CAPACITY: usize = 2048;
/// How long start-up waits for the kernel to stamp arrivals.
const ARRIVAL_STAMP_WAIT: Duration = Duration::from_millis(500);
/// "Not cut" marker for the cut instant.
const NOT_CUT: u64 = u64::MAX;

/// How to start a UDP relay. Build with [`UdpRelayConfig::new`], adjust the
/// public fields, then call [`UdpRelayConfig::start`].
#[derive(Debug, Clone)]
pub struct UdpRelayConfig {
    /// Where clients send to. Port 0 picks a free port; see
    /// [`RelayHandle::local_addr`].
    pub listen: SocketAddr,
    /// Where client datagrams are forwarded to.
    pub upstream: SocketAddr,
    /// Client → upstream link.
    pub up: LinkParams,
    /// Upstream → client link.
    pub down: LinkParams,
    /// RNG seed; `None` draws one from the OS. Logged at start either way.
    pub seed: Option<u64>,
    /// Bound on datagrams accepted and not yet delivered, per direction;
    /// beyond it datagrams are counted in `dropped_queue`. This caps memory
    /// when the rate is unlimited and the delay long.
    pub max_in_flight_packets: u64,
    /// Bound on payload bytes accepted and not yet delivered, per
    /// direction; same purpose and counter as `max_in_flight_packets`.
    pub max_in_flight_bytes: u64,
    /// SO_RCVBUF and SO_SNDBUF to request (the kernel may cap them at
    /// net.core.rmem_max / wmem_max).
    pub socket_buffer_bytes: usize,
}

impl UdpRelayConfig {
    /// A transparent relay (no delay, no loss) from `listen` to `upstream`.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        UdpRelayConfig {
            listen,
            upstream,
            up: LinkParams::default(),
            down: LinkParams::default(),
            seed: None,
            max_in_flight_packets: 65_536,
            max_in_flight_bytes: 256 << 20,
            socket_buffer_bytes: 4 << 20,
        }
    }

    /// Sets the same parameters for both directions.
    pub fn symmetric(mut self, params: LinkParams) -> Self {
        self.up = params.clone();
        self.down = params;
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Binds the sockets and starts the relay threads.
    pub fn start(self) -> Result<RelayHandle> {
        RelayHandle::start(self)
    }
}

/// A datagram waiting in the delivery heap.
struct Pending {
    due: Instant,
    seq: u64,
    buf: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

#[derive(Default)]
struct DeliveryQueue {
    heap: BinaryHeap<Reverse<Pending>>,
    next_seq: u64,
}

/// State of one direction, shared by its two threads and the handle.
struct DirShared {
    dir: Direction,
    model: Mutex<LinkModel>,
    /// CLOCK_REALTIME ns from which arriving datagrams are dropped, or
    /// [`NOT_CUT`].
    cut_at_ns: AtomicU64,
    counters: DirCounters,
    queue: Mutex<DeliveryQueue>,
    wake: Condvar,
}

struct Shared {
    dirs: [DirShared; 2],
    stop: AtomicBool,
    /// Where downstream datagrams go: the last client seen.
    client: Mutex<Option<SocketAddr>>,
    upstream: SocketAddr,
    pool: ArrayQueue<Vec<u8>>,
    max_in_flight_packets: u64,
    max_in_flight_bytes: u64,
}

/// A running UDP relay. Methods take `&self`, so the handle can be shared
/// (for example in an `Arc`) with a thread that cuts the link. Dropping it
/// stops the relay; datagrams still in flight are discarded.
pub struct RelayHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    seed: u64,
    arrival_stamps: bool,
    threads: Vec<JoinHandle<()>>,
}

impl RelayHandle {
    fn start(cfg: UdpRelayConfig) -> Result<Self> {
        cfg.up.validate()?;
        cfg.down.validate()?;
        let seed = cfg.seed.unwrap_or_else(rand::random);
        let client_sock = Arc::new(bind_udp(cfg.listen, cfg.socket_buffer_bytes)?);
        let upstream_sock = Arc::new(bind_udp(unspecified_like(cfg.upstream), cfg.socket_buffer_bytes)?);
        let local_addr = client_sock.local_addr().map_err(Error::io("reading the listen address"))?;
        let arrival_stamps = rx::wait_for_arrival_stamps(ARRIVAL_STAMP_WAIT);
        if !arrival_stamps {
            tracing::warn!("wanem: no kernel arrival stamps; a cut applies from the time datagrams are read");
        }
        tracing::info!(seed, %local_addr, upstream = %cfg.upstream, arrival_stamps, "wanem: udp relay started");
        let dir_shared = |dir: Direction, params| DirShared {
            dir,
            model: Mutex::new(LinkModel::new(params, seed, dir.index() as u64)),
            cut_at_ns: AtomicU64::new(NOT_CUT),
            counters: DirCounters::default(),
            queue: Mutex::new(DeliveryQueue::default()),
            wake: Condvar::new(),
        };
        let shared = Arc::new(Shared {
            dirs: [dir_shared(Direction::Up, cfg.up), dir_shared(Direction::Down, cfg.down)],
            stop: AtomicBool::new(false),
            client: Mutex::new(None),
            upstream: cfg.upstream,
            pool: ArrayQueue::new(POOL_BUFFERS),
            max_in_flight_packets: cfg.max_in_flight_packets,
            max_in_flight_bytes: cfg.max_in_flight_bytes,
        });
        let mut handle = RelayHandle { shared, local_addr, seed, arrival_stamps, threads: Vec::new() };
        handle.spawn_direction(Direction::Up, client_sock.clone(), upstream_sock.clone())?;
        handle.spawn_direction(Direction::Down, upstream_sock, client_sock)?;
        Ok(handle)
    }

    fn spawn_direction(&mut self, dir: Direction, input: Arc<UdpSocket>, output: Arc<UdpSocket>) -> Result<()> {
        let shared = self.shared.clone();
        self.threads.push(spawn(format!("wanem-rx-{dir}"), move || run_receiver(&shared, dir, &input))?);
        let shared = self.shared.clone();
        self.threads.push(spawn(format!("wanem-tx-{dir}"), move || run_sender(&shared, dir, &output))?);
        Ok(())
    }

    fn dir(&self, dir: Direction) -> &DirShared {
        &self.shared.dirs[dir.index()]
    }

    /// The address clients send to (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream address.
    pub fn upstream_addr(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The seed in use; pass it back in [`UdpRelayConfig::seed`] to
    /// reproduce a run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether the kernel stamps datagrams on arrival. If not, a cut
    /// applies from the moment the relay reads a datagram, so datagrams
    /// still queued in its socket at the cut are dropped too.
    pub fn arrival_stamps(&self) -> bool {
        self.arrival_stamps
    }

    /// The parameters of one direction.
    pub fn params(&self, dir: Direction) -> LinkParams {
        lock(&self.dir(dir).model).params().clone()
    }

    /// Replaces one direction's parameters, effective for datagrams read
    /// from now on; datagrams already accepted keep their fate.
    pub fn set_params(&self, dir: Direction, params: LinkParams) -> Result<()> {
        params.validate()?;
        tracing::info!(%dir, ?params, "wanem: params changed");
        lock(&self.dir(dir).model).set_params(params);
        Ok(())
    }

    /// Changes one setting by name (`"loss"`, `"delay_ms"`, ...; see
    /// [`LinkParams::set`]) in one direction.
    pub fn set(&self, dir: Direction, name: &str, value: &str) -> Result<()> {
        let mut model = lock(&self.dir(dir).model);
        let mut params = model.params().clone();
        params.set(name, value)?;
        tracing::info!(%dir, name, value, "wanem: setting changed");
        model.set_params(params);
        Ok(())
    }

    /// Sets the independent loss probability of both directions now.
    pub fn set_loss_both(&self, loss_prob: f64) -> Result<()> {
        for dir in Direction::BOTH {
            self.set(dir, "loss", &loss_prob.to_string())?;
        }
        Ok(())
    }

    /// Cuts one direction now: datagrams that reach the relay host from
    /// this instant on are dropped (`dropped_cut`); datagrams already
    /// accepted are still delivered after their delay. Cutting an already
    /// cut direction keeps the original cut instant.
    pub fn cut(&self, dir: Direction) {
        let now = clock::realtime_ns();
        if self.dir(dir).cut_at_ns.compare_exchange(NOT_CUT, now, SeqCst, SeqCst).is_ok() {
            tracing::info!(%dir, cut_at_ns = now, "wanem: link cut");
        }
    }

    /// Cuts both directions at the same instant.
    pub fn cut_both(&self) {
        let now = clock::realtime_ns();
        for dir in Direction::BOTH {
            let _ = self.dir(dir).cut_at_ns.compare_exchange(NOT_CUT, now, SeqCst, SeqCst);
        }
        tracing::info!(cut_at_ns = now, "wanem: link cut (both directions)");
    }

    /// Restores one direction. Datagrams that arrived during the cut stay
    /// dropped, except those still unread in the socket buffer, which are
    /// admitted (the cut only remembers its start).
    pub fn uncut(&self, dir: Direction) {
        self.dir(dir).cut_at_ns.store(NOT_CUT, SeqCst);
        tracing::info!(%dir, "wanem: link restored");
    }

    /// Restores both directions.
    pub fn uncut_both(&self) {
        Direction::BOTH.into_iter().for_each(|d| self.uncut(d));
    }

    /// Whether a direction is cut.
    pub fn is_cut(&self, dir: Direction) -> bool {
        self.dir(dir).cut_at_ns.load(SeqCst) != NOT_CUT
    }

    /// Counters of one direction.
    pub fn dir_stats(&self, dir: Direction) -> DirStats {
        self.dir(dir).counters.snapshot()
    }

    /// Counters of both directions.
    pub fn stats(&self) -> RelayStats {
        RelayStats { up: self.dir_stats(Direction::Up), down: self.dir_stats(Direction::Down) }
    }

    /// Waits until nothing is in flight in either direction; returns false
    /// on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = Direction::BOTH.iter().any(|&d| self.dir(d).counters.in_flight.load(Relaxed) > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the relay and waits for its threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for d in &self.shared.dirs {
            // Taking the lock orders the notify after any waiter's stop check.
            let _q = lock(&d.queue);
            d.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking relay thread must not take the control path down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.clone()).spawn(f).map_err(|source| Error::Spawn { name, source })
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(Error::io("creating a UDP socket"))?;
    // Large buffers so that bursts queue in the link model, where they are
    // counted, rather than being dropped by the kernel.
    let _ = sock.set_recv_buffer_size(buffer_bytes);
    let _ = sock.set_send_buffer_size(buffer_bytes);
    sock.bind(&addr.into()).map_err(|source| Error::Bind { addr: addr.to_string(), source })?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(STOP_POLL)).map_err(Error::io("setting SO_RCVTIMEO"))?;
    rx::enable_stamps(&sock);
    Ok(sock)
}

fn run_receiver(shared: &Shared, dir: Direction, sock: &UdpSocket) {
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Relaxed) {
        match rx::recv(sock, &mut scratch) {
            Ok(meta) => on_datagram(shared, dir, &meta, &scratch[..meta.len]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(%dir, error = %e, "wanem: receive error");
                std::thread::sleep(Duration::from_millis(1)); // no hot loop on a persistent error
            }
        }
    }
}

fn on_datagram(shared: &Shared, dir: Direction, meta: &rx::RxMeta, data: &[u8]) {
    let d = &shared.dirs[dir.index()];
    if let Some(drops) = meta.kernel_drops {
        d.counters.dropped_rcvbuf.fetch_max(u64::from(drops), Relaxed);
    }
    match dir {
        // Only the upstream may talk to us on the upstream socket. IP and
        // port only: IPv6 flow labels may differ from the configured address.
        Direction::Down if (meta.from.ip(), meta.from.port()) != (shared.upstream.ip(), shared.upstream.port()) => {
            return
        }
        Direction::Down => {}
        Direction::Up => *lock(&shared.client) = Some(meta.from),
    }
    admit(shared, d, meta, data);
    // Counted after the fate is recorded, so that a reader who sees
    // `received` = N also sees the drops and `in_flight` of all N.
    d.counters.bytes_received.fetch_add(data.len() as u64, Relaxed);
    d.counters.received.fetch_add(1, Release);
}

/// Decides one datagram's fate and records it.
fn admit(shared: &Shared, d: &DirShared, meta: &rx::RxMeta, data: &[u8]) {
    let (now, now_ns) = (Instant::now(), clock::realtime_ns());
    let arrived_ns = meta.stamp_ns.unwrap_or(now_ns);
    if arrived_ns >= d.cut_at_ns.load(SeqCst) {
        return DirCounters::inc(&d.counters.dropped_cut);
    }
    let c = &d.counters;
    let bytes_full = c.in_flight_bytes.load(Relaxed) + data.len() as u64 > shared.max_in_flight_bytes;
    if c.in_flight.load(Relaxed) >= shared.max_in_flight_packets || bytes_full {
        return DirCounters::inc(&d.counters.dropped_queue);
    }
    let entry = clock::instant_of(arrived_ns, now, now_ns);
    let fate = lock(&d.model).admit(entry, data.len());
    match fate {
        Fate::Lost => DirCounters::inc(&d.counters.dropped_loss),
        Fate::QueueFull => DirCounters::inc(&d.counters.dropped_queue),
        Fate::Deliver { due, duplicate, reordered } => {
            if reordered {
                DirCounters::inc(&d.counters.reordered);
            }
            enqueue(shared, d, due, data);
            if duplicate {
                DirCounters::inc(&d.counters.duplicated);
                enqueue(shared, d, due, data);
            }
        }
    }
}

fn enqueue(shared: &Shared, d: &DirShared, due: Instant, data: &[u8]) {
    let mut buf = shared.pool.pop().unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY));
    buf.clear();
    buf.extend_from_slice(data);
    d.counters.in_flight.fetch_add(1, Relaxed);
    d.counters.in_flight_bytes.fetch_add(data.len() as u64, Relaxed);
    let mut q = lock(&d.queue);
    let seq = q.next_seq;
    q.next_seq += 1;
    q.heap.push(Reverse(Pending { due, seq, buf }));
    // Only a new earliest entry changes how long the sender must sleep.
    if q.heap.peek().is_some_and(|Reverse(p)| p.seq == seq) {
        d.wake.notify_one();
    }
}

fn run_sender(shared: &Shared, dir: Direction, sock: &UdpSocket) {
    clock::tighten_timer_slack();
    let d = &shared.dirs[dir.index()];
    let mut batch = Vec::with_capacity(BATCH);
    while next_batch(shared, d, &mut batch) {
        for p in batch.drain(..) {
            deliver(shared, d, sock, p);
        }
    }
}

/// Fills `batch` with every datagram due now (up to [`BATCH`]); returns
/// false when the relay stops.
fn next_batch(shared: &Shared, d: &DirShared, batch: &mut Vec<Pending>) -> bool {
    let mut q = lock(&d.queue);
    loop {
        if shared.stop.load(Relaxed) {
            return false;
        }
        let Some(Reverse(top)) = q.heap.peek() else {
            q = d.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let (due, now) = (top.due, Instant::now());
        if due <= now {
            while batch.len() < BATCH && q.heap.peek().is_some_and(|Reverse(p)| p.due <= now) {
                batch.extend(q.heap.pop().map(|Reverse(p)| p));
            }
            return true;
        }
        if due - now > clock::SPIN_MARGIN {
            q = d.wake.wait_timeout(q, due - now - clock::SPIN_MARGIN).unwrap_or_else(|e| e.into_inner()).0;
        } else {
            // Close enough to spin; release the lock so receivers can push.
            drop(q);
            clock::spin_until(due);
            q = lock(&d.queue);
        }
    }
}

fn deliver(shared: &Shared, d: &DirShared, sock: &UdpSocket, p: Pending) {
    d.counters.record_late(Instant::now().saturating_duration_since(p.due));
    let dst = match d.dir {
        Direction::Up => Some(shared.upstream),
        Direction::Down => *lock(&shared.client),
    };
    let sent = dst.map(|a| sock.send_to(&p.buf, a));
    match sent {
        Some(Ok(n)) => {
            DirCounters::inc(&d.counters.forwarded);
            d.counters.bytes_forwarded.fetch_add(n as u64, Relaxed);
        }
        Some(Err(e)) => {
            tracing::debug!(dir = %d.dir, error = %e, "wanem: send failed");
            DirCounters::inc(&d.counters.send_errors);
        }
        None => DirCounters::inc(&d.counters.send_errors),
    }
    d.counters.in_flight.fetch_sub(1, Relaxed);
    d.counters.in_flight_bytes.fetch_sub(p.buf.len() as u64, Relaxed);
    let _ = shared.pool.push(p.buf); // a full pool just frees the buffer
}
