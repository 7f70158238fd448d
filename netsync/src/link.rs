//! The public handles: [`Link`] (one end of a link) and [`Listener`]
//! (accepts links on a UDP address).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{LinkConfig, MESSAGE_OVERHEAD_BYTES};
use crate::error::LinkError;
use crate::io::{Io, Role, Start};
use crate::keys::LinkKey;
use crate::shared::{lock, LinkEvent, MsgId, Progress, Shared};
use crate::stats::{LinkStats, RejectReason, Rejected};
use crate::sys;
use crate::tx::OutMsg;
use crate::wire::{self, HelloPayload, Kind, FLAG_REPLY};

/// How long `send` may block.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Forever,
    Until(Instant),
    Never,
}

/// Events kept for a slow reader before new ones are dropped (they are
/// cumulative, so a later one covers a dropped one).
const EVENT_CAPACITY: usize = 4096;

/// One end of a network-sync link. Both ends send and receive messages;
/// the end's [`LinkConfig::fec`] codes what it sends.
///
/// Threads: each link runs one I/O thread that owns the socket. Every
/// method here takes `&self` and may be called from any thread (`Link` is
/// `Send + Sync`; share it in an `Arc`). `send` and `recv` block the
/// calling thread only. Dropping the link (or [`Link::close`]) stops the
/// I/O thread without waiting for unacknowledged messages; wait with
/// [`Link::wait_acked`] first to drain.
pub struct Link {
    shared: Arc<Shared>,
    events: Receiver<LinkEvent>,
    thread: Option<JoinHandle<()>>,
    link_id: u32,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("link_id", &format_args!("{:#x}", self.link_id))
            .field("local_addr", &self.local_addr)
            .field("peer_addr", &self.peer_addr)
            .finish()
    }
}

fn open_socket(local: SocketAddr, reuse: bool, buffer_bytes: usize) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
    }
    // The kernel caps these at net.core.{r,w}mem_max; smaller still works.
    let _ = sock.set_recv_buffer_size(buffer_bytes);
    let _ = sock.set_send_buffer_size(buffer_bytes);
    sock.bind(&local.into())?;
    Ok(sock)
}

impl Link {
    /// Binds `local` (port 0 picks one), connects to the peer at `remote`
    /// and starts the handshake in the background; use
    /// [`Link::wait_established`] or the `Established` event. Messages
    /// sent before then wait in the send window.
    pub fn connect(local: SocketAddr, remote: SocketAddr, mut cfg: LinkConfig) -> Result<Link, LinkError> {
        cfg.validate()?;
        if cfg.link_id == 0 {
            cfg.link_id = (sys::random_u64() as u32).max(1);
        }
        let sock = open_socket(local, false, cfg.socket_buffer_bytes).map_err(LinkError::io("bind"))?;
        sock.connect(&remote.into()).map_err(LinkError::io("connect"))?;
        Link::start(sock, cfg, Role::Initiator, None)
    }

    fn start(sock: Socket, cfg: LinkConfig, role: Role, peer_hello: Option<HelloPayload>) -> Result<Link, LinkError> {
        sock.set_nonblocking(true).map_err(LinkError::io("set_nonblocking"))?;
        let timestamps = cfg.timestamping && enable_timestamps(&sock);
        let local_addr = sockaddr(sock.local_addr(), "local_addr")?;
        let peer_addr = sockaddr(sock.peer_addr(), "peer_addr")?;
        let (events_tx, events) = channel::bounded(EVENT_CAPACITY);
        let wake = sys::EventFd::new().map_err(LinkError::io("eventfd"))?;
        let link_id = cfg.link_id;
        let shared = Arc::new(Shared::new(cfg, wake, events_tx));
        let io = Io::new(shared.clone(), sock, Start { role, link_id, peer_hello, timestamps });
        let guard = CloseOnExit(shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("netsync-{link_id:08x}"))
            .spawn(move || {
                io.run();
                drop(guard);
            })
            .map_err(LinkError::io("spawn"))?;
        Ok(Link { shared, events, thread: Some(thread), link_id, local_addr, peer_addr })
    }

    /// Queues a message, blocking while the send window is full. Returns
    /// its id (1, 2, ... in send order).
    pub fn send(&self, msg: &[u8]) -> Result<MsgId, LinkError> {
        self.send_inner(msg, Wait::Forever)
    }

    /// As [`Link::send`], but gives up with `Timeout` after `timeout`.
    pub fn send_timeout(&self, msg: &[u8], timeout: Duration) -> Result<MsgId, LinkError> {
        self.send_inner(msg, Wait::Until(Instant::now() + timeout))
    }

    /// As [`Link::send`], but never blocks: `WouldBlock` when the window is
    /// full.
    pub fn try_send(&self, msg: &[u8]) -> Result<MsgId, LinkError> {
        self.send_inner(msg, Wait::Never)
    }

    fn send_inner(&self, msg: &[u8], wait: Wait) -> Result<MsgId, LinkError> {
        let max = self.shared.max_send_bytes.load(std::sync::atomic::Ordering::Acquire);
        if msg.len() > max {
            return Err(LinkError::MessageTooLarge { len_bytes: msg.len(), max_bytes: max });
        }
        let charge = msg.len() as u64 + MESSAGE_OVERHEAD_BYTES;
        let window = self.shared.cfg.window_bytes;
        let mut out = lock(&self.shared.out);
        loop {
            if out.closed {
                return Err(LinkError::Closed);
            }
            if out.used_bytes + charge <= window {
                break;
            }
            out = match wait {
                Wait::Never => return Err(LinkError::WouldBlock),
                Wait::Forever => self.shared.out_cv.wait(out).expect(crate::POISONED),
                Wait::Until(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(LinkError::Timeout);
                    }
                    self.shared.out_cv.wait_timeout(out, left).expect(crate::POISONED).0
                }
            };
        }
        let id = out.next_id;
        out.next_id += 1;
        out.used_bytes += charge;
        out.msgs.push_back(OutMsg { id, data: msg.to_vec(), charge_bytes: charge });
        drop(out);
        self.shared.wake.wake();
        Ok(id)
    }

    /// The next message from the peer, blocking until one arrives.
    pub fn recv(&self) -> Result<Vec<u8>, LinkError> {
        self.recv_inner(None)?.ok_or(LinkError::Closed)
    }

    /// As [`Link::recv`], but gives up with `Timeout` after `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Vec<u8>, LinkError> {
        self.recv_inner(Some(Instant::now() + timeout))?.ok_or(LinkError::Timeout)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&self) -> Result<Option<Vec<u8>>, LinkError> {
        let mut inbox = lock(&self.shared.inbox);
        match inbox.msgs.pop_front() {
            Some(m) => {
                inbox.bytes -= m.len();
                self.after_take(&mut inbox.wake_on_read);
                Ok(Some(m))
            }
            None if inbox.closed => Err(LinkError::Closed),
            None => Ok(None),
        }
    }

    fn recv_inner(&self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, LinkError> {
        let mut inbox = lock(&self.shared.inbox);
        loop {
            if let Some(m) = inbox.msgs.pop_front() {
                inbox.bytes -= m.len();
                self.after_take(&mut inbox.wake_on_read);
                return Ok(Some(m));
            }
            if inbox.closed {
                return Err(LinkError::Closed);
            }
            inbox = match deadline {
                None => self.shared.inbox_cv.wait(inbox).expect(crate::POISONED),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.shared.inbox_cv.wait_timeout(inbox, left).expect(crate::POISONED).0
                }
            };
        }
    }

    /// The I/O thread asked to hear about reads (room for flow control).
    fn after_take(&self, wake_on_read: &mut bool) {
        if std::mem::take(wake_on_read) {
            self.shared.wake.wake();
        }
    }

    /// Established / OnWire / Acked / PeerSilent / PeerBack / Degraded /
    /// Healthy, in order.
    /// Bounded; see [`LinkEvent`] for what happens when it is not read.
    pub fn events(&self) -> &Receiver<LinkEvent> {
        &self.events
    }

    /// Highest message id on the wire (cumulative); 0 before the first.
    pub fn wire_upto(&self) -> MsgId {
        lock(&self.shared.progress).wire_upto
    }

    /// Highest message id acknowledged by the peer (cumulative).
    pub fn acked_upto(&self) -> MsgId {
        lock(&self.shared.progress).acked_upto
    }

    /// Whether the path's loss is within what the FEC code repairs
    /// (see [`LinkEvent::Degraded`]).
    pub fn health(&self) -> crate::Health {
        lock(&self.shared.progress).health
    }

    /// Blocks until message `id` is on the wire.
    pub fn wait_on_wire(&self, id: MsgId, timeout: Duration) -> Result<(), LinkError> {
        self.wait_progress(timeout, |p| p.wire_upto >= id)
    }

    /// Blocks until message `id` is acknowledged.
    pub fn wait_acked(&self, id: MsgId, timeout: Duration) -> Result<(), LinkError> {
        self.wait_progress(timeout, |p| p.acked_upto >= id)
    }

    /// Blocks until the link is established: handshake done and wire mode
    /// decided (see [`LinkEvent::Established`]).
    pub fn wait_established(&self, timeout: Duration) -> Result<(), LinkError> {
        self.wait_progress(timeout, |p| p.established)
    }

    fn wait_progress(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.shared.progress);
        loop {
            if done(&p) {
                return Ok(());
            }
            if p.closed {
                return Err(LinkError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout);
            }
            p = self.shared.progress_cv.wait_timeout(p, left).expect(crate::POISONED).0;
        }
    }

    /// A snapshot of the counters (refreshed by the I/O thread every 2 ms
    /// while busy and whenever it goes idle).
    pub fn stats(&self) -> LinkStats {
        lock(&self.shared.stats).clone()
    }

    /// The link id.
    pub fn link_id(&self) -> u32 {
        self.link_id
    }

    /// The bound local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Why the link closed itself, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.progress).error.clone()
    }

    /// Stops the I/O thread and waits for it. Unacknowledged messages are
    /// dropped; pending `send`/`recv` calls return `Closed`.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.close(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Closes the link for every waiter when the I/O thread ends, even by a
/// panic, so no `send`/`recv`/`wait_*` blocks forever.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let error = std::thread::panicking().then(|| "the link's I/O thread panicked".to_string());
        self.0.close(error);
    }
}

fn enable_timestamps(sock: &Socket) -> bool {
    match sys::enable_timestamping(sock.as_raw_fd()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("SO_TIMESTAMPING unavailable ({e}); on-the-wire means sendmsg returned");
            false
        }
    }
}

fn sockaddr(addr: io::Result<socket2::SockAddr>, what: &'static str) -> Result<SocketAddr, LinkError> {
    let addr = addr.map_err(LinkError::io(what))?;
    addr.as_socket().ok_or(LinkError::Io { context: what, source: io::Error::other("not an IP address") })
}

/// Accepts links on a UDP address.
///
/// Each accepted link gets its own socket bound to the same address
/// (SO_REUSEPORT) and connected to the peer, so the kernel hands that
/// peer's datagrams to the link and only hellos from new peers reach the
/// listener. An initiator must therefore use a fresh local port (or link
/// id) per link instance; `Link::connect` with port 0 does.
#[derive(Debug)]
pub struct Listener {
    sock: UdpSocket,
    cfg: LinkConfig,
    local_addr: SocketAddr,
    /// (link id, nonce) of recent accepts: a hello that raced in before the
    /// link's own socket existed is not accepted twice.
    recent: VecDeque<(u32, u64)>,
    rejected: Rejected,
    /// Keyed listeners: the keys a hello may verify under (asked at every
    /// hello, so a key file re-read takes effect for new links).
    keys: Option<KeysFn>,
}

/// Where a keyed listener gets its keys.
pub struct KeysFn(pub Box<dyn Fn() -> Vec<LinkKey> + Send>);

impl std::fmt::Debug for KeysFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeysFn(..)")
    }
}

/// Accepts remembered to ignore duplicate hellos.
const RECENT_ACCEPTS: usize = 256;

impl Listener {
    /// Accepts only links whose hellos verify under one of the keys
    /// `keys` returns; each accepted link is keyed with the one that did.
    pub fn set_keys(&mut self, keys: KeysFn) {
        self.keys = Some(keys);
    }

    /// Binds `addr` (port 0 picks one). `cfg` applies to every accepted
    /// link (its `link_id` is ignored: the peer's is used).
    pub fn bind(addr: SocketAddr, cfg: LinkConfig) -> Result<Listener, LinkError> {
        cfg.validate()?;
        let sock = open_socket(addr, true, cfg.socket_buffer_bytes).map_err(LinkError::io("bind"))?;
        let sock: UdpSocket = sock.into();
        let local_addr = sock.local_addr().map_err(LinkError::io("local_addr"))?;
        Ok(Listener { sock, cfg, local_addr, recent: VecDeque::new(), rejected: Rejected::default(), keys: None })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Datagrams the listener dropped, by reason.
    pub fn rejected(&self) -> Rejected {
        self.rejected
    }

    /// Waits for the next new peer's hello and returns its link.
    pub fn accept(&mut self) -> Result<Link, LinkError> {
        loop {
            if let Some(link) = self.accept_timeout(Duration::from_secs(3600))? {
                return Ok(link);
            }
        }
    }

    /// As [`Listener::accept`], but `Ok(None)` after `timeout`.
    pub fn accept_timeout(&mut self, timeout: Duration) -> Result<Option<Link>, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left)).map_err(LinkError::io("set_read_timeout"))?;
            let (n, peer) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LinkError::Io { context: "recv_from", source: e }),
            };
            if let Some((link_id, hello, key)) = self.check_hello(&buf[..n]) {
                let link = self.accept_from(peer, link_id, hello, key)?;
                return Ok(Some(link));
            }
        }
    }

    /// A new peer's hello, or None (counted) for anything else.
    fn check_hello(&mut self, bytes: &[u8]) -> Option<(u32, HelloPayload, Option<LinkKey>)> {
        let (d, key) = match self.verify_hello(bytes) {
            Ok(d) => d,
            Err(e) => {
                self.rejected.count(if e.is_truncated() {
                    RejectReason::Truncated
                } else if e.is_bad_crc() {
                    RejectReason::BadCrc
                } else if matches!(e, wire::DatagramError::BadMac | wire::DatagramError::MissingMac) {
                    RejectReason::BadMac
                } else {
                    RejectReason::BadHeader
                });
                return None;
            }
        };
        if d.header.kind != Kind::Hello || d.header.flags & FLAG_REPLY != 0 {
            // Data for a link this listener does not (or no longer) hold.
            self.rejected.count(RejectReason::WrongLinkId);
            return None;
        }
        let Ok(hello) = HelloPayload::decode(d.payload) else {
            self.rejected.count(RejectReason::BadHeader);
            return None;
        };
        if key.is_some() && hello.auth_nonce.is_none() {
            self.rejected.count(RejectReason::BadMac);
            return None;
        }
        if self.recent.contains(&(d.header.link_id, hello.nonce)) {
            return None;
        }
        Some((d.header.link_id, hello, key))
    }

    /// Decodes a datagram, keyed: under the first key its MAC verifies
    /// with (a key file holds at most two).
    fn verify_hello<'a>(&self, bytes: &'a [u8]) -> Result<(wire::Datagram<'a>, Option<LinkKey>), wire::DatagramError> {
        let Some(keys) = &self.keys else { return wire::decode(bytes).map(|d| (d, None)) };
        let mut err = wire::DatagramError::BadMac;
        for k in (keys.0)() {
            match wire::decode_keyed(bytes, Some(&k.hello())) {
                Ok(d) => return Ok((d, Some(k))),
                Err(e) => err = e,
            }
        }
        Err(err)
    }

    fn accept_from(
        &mut self,
        peer: SocketAddr,
        link_id: u32,
        hello: HelloPayload,
        key: Option<LinkKey>,
    ) -> Result<Link, LinkError> {
        let sock = open_socket(self.local_addr, true, self.cfg.socket_buffer_bytes).map_err(LinkError::io("bind"))?;
        sock.connect(&peer.into()).map_err(LinkError::io("connect"))?;
        if self.recent.len() == RECENT_ACCEPTS {
            self.recent.pop_front();
        }
        self.recent.push_back((link_id, hello.nonce));
        let cfg = LinkConfig { link_id, key, ..self.cfg.clone() };
        tracing::info!("netsync: accepted link {link_id:#x} from {peer}");
        Link::start(sock, cfg, Role::Responder, Some(hello))
    }
}
