//! The replica server: accepts TCP sessions and serves them from one store.
//!
//! One thread per session reads frames. Writes are appended to the store's
//! log batch; the group commit acks them once they are in the log (see
//! `crate::store` for which thread commits). Every
//! rejected frame is counted by reason and logged; a framing error closes
//! only that session, and the server goes on serving others.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{self, AuthFailure, Credentials, KeyRing, Side};
use crate::history::{self, HelloDecision};
use crate::log::RecordHeader;
use crate::proto::{
    self, AuthChallenge, AuthHello, ErrorCode, ErrorFrame, FrameError, FrameReader, FrameType, Hello, HelloOk,
    ReadError, ReadReq, Seal, WriteHeader,
};
use crate::store::{AckSink, Store, StoreError};

/// A network-sync session ends after this long without a message. The HE
/// sends a heartbeat every 100 ms on a live session, even while a replay
/// runs, and gives up on a silent replica after 3 to 30 s (RTT-scaled);
/// a link the HE dropped says nothing (there is no close message), so
/// silence is how its session here learns it is over.
pub const NETSYNC_SILENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// A failing accept (out of file descriptors, say) is retried after a
/// pause that grows from the first to the second, and logged at most
/// once per interval.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(100));
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long `ServerHandle::stop` waits for the threads it stopped to let
/// go of the store (and so of the directory lock).
const STOP_RELEASE_MAX: Duration = Duration::from_secs(5);

/// Counters of rejected input, by reason.
#[derive(Default)]
pub struct Rejections {
    by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

impl Rejections {
    /// Counts one rejection and logs it with its peer.
    pub fn count(&self, reason: &'static str, peer: SocketAddr, detail: &dyn std::fmt::Display) {
        *self.by_reason.lock().expect(crate::POISONED).entry(reason).or_insert(0) += 1;
        tracing::warn!(%peer, reason, "rejected frame: {detail}");
    }

    /// A snapshot of all counters.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason.lock().expect(crate::POISONED).clone()
    }
}

/// Shared server state.
pub struct Server {
    store: Arc<Store>,
    /// Rejection counters.
    pub rejections: Rejections,
    /// Network-sync datagrams dropped, by reason.
    netsync_rejections: crate::netlink::NetRejections,
    /// Open sessions by id, so `stop` can end them; each removes itself
    /// when it ends.
    sessions: Mutex<HashMap<u64, SessionCut>>,
    stopping: AtomicBool,
    next_session: AtomicU64,
    /// Replay recovery: at most one at a time, and its rate limit (which
    /// recovery copies share).
    replaying: Arc<crate::replay::ReplayControl>,
    /// How long a network-sync session may go without a message.
    netsync_silence_ms: AtomicU64,
    /// Recovery copies: at most one at a time, and byte counters.
    copying: Arc<crate::copy::CopyControl>,
    /// The key file, when sessions must authenticate (`--key-file`).
    keys: Option<KeySource>,
}

/// Options of [`spawn_with`].
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Require every session to authenticate with a key from this file.
    pub key_file: Option<PathBuf>,
}

/// The replica's key file, re-read at every handshake so that a key
/// written for a rotation is accepted without a restart; a file that
/// turned unreadable or unsafe keeps the last good keys (and says so).
struct KeySource {
    path: PathBuf,
    ring: Mutex<KeyRing>,
}

impl KeySource {
    fn keys(&self) -> KeyRing {
        let mut ring = self.ring.lock().expect(crate::POISONED);
        match KeyRing::load(&self.path) {
            Ok(r) => {
                if r != *ring {
                    tracing::info!(keys = %r.ids(), "key file re-read");
                    *ring = r;
                }
            }
            Err(e) => tracing::warn!("{e}; keeping the keys read before ({})", ring.ids()),
        }
        ring.clone()
    }
}

/// A running server (for in-process tests and the CLI).
pub struct ServerHandle {
    /// The shared state.
    pub server: Arc<Server>,
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    accept_udp: Option<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting, cuts every session and stops the store's committer.
    /// Pending records are committed first (like a clean shutdown).
    pub fn stop(mut self) {
        self.server.stopping.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let open = std::mem::take(&mut *self.server.sessions.lock().expect(crate::POISONED));
        for s in open.values() {
            s.cut();
        }
        self.server.store.shutdown();
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
        if let Some(h) = self.accept_udp.take() {
            let _ = h.join();
        }
        self.wait_released();
    }

    /// Waits (at most [`STOP_RELEASE_MAX`]) until no thread but this
    /// handle holds the server or its store: the sessions just cut, and a
    /// replay or copy that noticed the store stop. The store's directory
    /// lock goes with its last reference, so a server started again on the
    /// same directory in this process finds it free.
    fn wait_released(&self) {
        let deadline = Instant::now() + STOP_RELEASE_MAX;
        let held = || Arc::strong_count(&self.server) > 1 || Arc::strong_count(&self.server.store) > 1;
        while held() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    dir = %self.server.store.dir().display(),
                    "threads still hold the replica store after stop; its directory stays locked until they end"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Blocks until the accept loop ends (never, unless stopped).
    pub fn wait(mut self) {
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Opens the store in `dir` and serves it on `listen`.
pub fn spawn(dir: &Path, listen: &str) -> Result<ServerHandle, ServeError> {
    spawn_with(dir, listen, &ServeOptions::default())
}

/// [`spawn`] with options (a key file).
pub fn spawn_with(dir: &Path, listen: &str, opts: &ServeOptions) -> Result<ServerHandle, ServeError> {
    let keys = match &opts.key_file {
        Some(path) => {
            let ring = KeyRing::load(path)?;
            tracing::info!(keys = %ring.ids(), file = %path.display(), "sessions must authenticate");
            Some(KeySource { path: path.clone(), ring: Mutex::new(ring) })
        }
        None => None,
    };
    let (store, committer) = Store::open(dir)?;
    let listener = TcpListener::bind(listen).map_err(|e| ServeError::Bind(listen.to_string(), e))?;
    let addr = listener.local_addr().map_err(|e| ServeError::Bind(listen.to_string(), e))?;
    let server = Arc::new(Server {
        store,
        rejections: Rejections::default(),
        netsync_rejections: Default::default(),
        sessions: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        next_session: AtomicU64::new(1),
        replaying: Arc::new(crate::replay::ReplayControl::default()),
        netsync_silence_ms: AtomicU64::new(NETSYNC_SILENCE_TIMEOUT.as_millis() as u64),
        copying: Arc::new(crate::copy::CopyControl::default()),
        keys,
    });
    let s2 = server.clone();
    let accept = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || s2.accept_loop(listener))
        .map_err(|e| ServeError::Bind(listen.to_string(), e))?;
    // Network-sync replicas are reached at the UDP port of the same address.
    let mut link_cfg = starblk_netsync::LinkConfig::default();
    let keyed = server.keys.is_some();
    link_cfg.payload_bytes =
        starblk_netsync::payload_bytes_for_mtu_keyed(starblk_netsync::DEFAULT_MTU_BYTES, link_cfg.fec.as_ref(), keyed);
    let mut udp = starblk_netsync::Listener::bind(addr, link_cfg)
        .map_err(|e| ServeError::Bind(format!("{addr} (udp)"), io::Error::other(e.to_string())))?;
    if keyed {
        // Links authenticate every datagram under a key of the key file.
        let s4 = server.clone();
        udp.set_keys(starblk_netsync::KeysFn(Box::new(move || {
            let ring = s4.keys.as_ref().map(KeySource::keys);
            ring.iter().flat_map(|r| r.keys()).map(|k| starblk_netsync::LinkKey::new(*k.bytes())).collect()
        })));
    }
    let s3 = server.clone();
    let accept_udp = std::thread::Builder::new()
        .name("accept-udp".into())
        .spawn(move || s3.accept_netsync(udp))
        .map_err(|e| ServeError::Bind(listen.to_string(), e))?;
    tracing::info!(%addr, dir = %dir.display(), durable_seq = server.store.durable_seq(), "replica serving");
    Ok(ServerHandle { server, addr, accept: Some(accept), accept_udp: Some(accept_udp), committer: Some(committer) })
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(String, io::Error),
    /// The key file was refused.
    #[error(transparent)]
    KeyFile(#[from] auth::KeyFileError),
}

/// Where a session's replies go: a TCP stream, or a network-sync link.
pub trait FrameOut: Send + Sync {
    /// Sends one whole frame.
    fn send_frame(&self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()>;
    /// Ends the session's transport (unblocks its reader).
    fn close(&self);
    /// Seals every later frame (the session authenticated).
    fn set_seal(&self, seal: Seal);
}

/// How `stop` ends an open session: shut its socket down, or set its
/// network-sync reader's closed flag.
enum SessionCut {
    Tcp(TcpStream),
    Net(Arc<AtomicBool>),
}

impl SessionCut {
    fn cut(&self) {
        match self {
            SessionCut::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            SessionCut::Net(closed) => closed.store(true, Ordering::Release),
        }
    }
}

/// A failing accept loop: pauses (growing) and rate-limited warnings, so
/// a persistent error such as EMFILE neither spins nor floods the log.
struct AcceptErrors {
    what: &'static str,
    pause: Duration,
    logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn new(what: &'static str) -> AcceptErrors {
        AcceptErrors { what, pause: ACCEPT_BACKOFF.0, logged: None, unlogged: 0 }
    }

    fn failed(&mut self, e: &dyn std::fmt::Display) {
        if self.logged.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
            let also = self.unlogged;
            tracing::warn!(also_failed_since_last_warning = also, "{} failed: {e}; retrying", self.what);
            (self.logged, self.unlogged) = (Some(Instant::now()), 0);
        } else {
            self.unlogged += 1;
        }
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF.1);
    }

    fn ok(&mut self) {
        self.pause = ACCEPT_BACKOFF.0;
    }
}

/// Replies over TCP; the mutex keeps frames from interleaving (and
/// their seal order the send order).
struct TcpOut(Mutex<(TcpStream, Seal)>);

impl FrameOut for TcpOut {
    fn send_frame(&self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        let mut g = self.0.lock().expect(crate::POISONED);
        let (s, seal) = &mut *g;
        seal.write_frame(s, kind, 0, parts)
    }
    fn close(&self) {
        let _ = self.0.lock().expect(crate::POISONED).0.shutdown(Shutdown::Both);
    }
    fn set_seal(&self, seal: Seal) {
        self.0.lock().expect(crate::POISONED).1 = seal;
    }
}

/// The session's writer half, shared with the store's committer for acks.
struct SessionWriter {
    out: Box<dyn FrameOut>,
    /// The session's epoch (0 until Hello): acks go out only while the
    /// replica has not persisted a higher one.
    epoch: AtomicU64,
}

impl SessionWriter {
    fn send(&self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        self.out.send_frame(kind, parts)
    }

    fn send_error(&self, code: ErrorCode, seq: u64, offset: u64, message: String) {
        let f = ErrorFrame { code, seq, offset, message };
        let _ = self.send(FrameType::Error, &[&f.encode()]);
    }
}

impl crate::copy::CopyReport for SessionWriter {
    fn progress(&self, done: u64, total: u64) {
        let _ = self.send(FrameType::CopyProgress, &[&proto::encode_u64_pair(done, total)]);
    }
}

impl AckSink for SessionWriter {
    fn durable(&self, seq: u64) {
        let _ = self.send(FrameType::Ack, &[&proto::encode_u64(seq)]);
    }
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// What a session has established.
struct Session {
    peer: SocketAddr,
    writer: Arc<SessionWriter>,
    /// Epoch the session speaks for; None until Hello.
    epoch: Option<u64>,
    probe: bool,
    is_ack_sink: bool,
    read_buf: Vec<u8>,
    /// Set when the session ends: stops a copy it started (which saves
    /// its progress for the next session to resume).
    copy_cancel: Option<Arc<AtomicBool>>,
    /// What this replica authenticates to peers with when this session
    /// has it dial one (replay, copy): the session's key and encryption.
    creds: Option<Credentials>,
    /// The sum of the current Write frame's data, from the frame check.
    data_sum: Option<u64>,
}

/// A rejection: which counter, which error code, and whether to close.
struct Reject {
    reason: &'static str,
    code: ErrorCode,
    seq: u64,
    offset: u64,
    message: String,
    close: bool,
}

impl Server {
    /// Sets how long a network-sync session may go without a message
    /// before it ends (default [`NETSYNC_SILENCE_TIMEOUT`]); applies to
    /// sessions accepted from now on.
    pub fn set_netsync_silence_timeout(&self, t: Duration) {
        self.netsync_silence_ms.store(t.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut errors = AcceptErrors::new("accept");
        for conn in listener.incoming() {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let (stream, cut) = match conn.and_then(|s| s.try_clone().map(|c| (s, c))) {
                Ok(s) => s,
                Err(e) => {
                    errors.failed(&e);
                    continue;
                }
            };
            errors.ok();
            self.spawn_session("session", SessionCut::Tcp(cut), move |s| s.session(stream));
        }
    }

    fn accept_netsync(self: Arc<Self>, mut listener: starblk_netsync::Listener) {
        let mut errors = AcceptErrors::new("network-sync accept");
        while !self.stopping.load(Ordering::Acquire) {
            let accepted = listener.accept_timeout(Duration::from_millis(200));
            self.netsync_rejections.set_listener(listener.rejected());
            let link = match accepted {
                Ok(Some(l)) => Arc::new(l),
                Ok(None) => continue,
                Err(e) => {
                    errors.failed(&e);
                    continue;
                }
            };
            errors.ok();
            let peer = link.peer_addr();
            let closed = Arc::new(AtomicBool::new(false));
            let mut input = crate::netlink::MsgReader::new(link.clone(), closed.clone());
            // The link has no close message: a session whose HE went away
            // (its link dropped, or the host gone) ends on silence.
            input.set_timeout(Some(Duration::from_millis(self.netsync_silence_ms.load(Ordering::Relaxed))));
            let counted = link.clone();
            let out = Box::new(crate::netlink::NetOut::new(link, closed.clone()));
            self.spawn_session("netsync", SessionCut::Net(closed), move |s| {
                let key = s.netsync_rejections.open(counted);
                s.run_session(input, out, peer);
                s.netsync_rejections.close(key);
            });
        }
    }

    /// Registers a session under a fresh id and runs `body` on its own
    /// thread; the session leaves the registry when `body` returns.
    fn spawn_session(self: &Arc<Self>, kind: &str, cut: SessionCut, body: impl FnOnce(&Server) + Send + 'static) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        {
            let mut open = self.sessions.lock().expect(crate::POISONED);
            // `stop` sets `stopping` before it takes the registry: a
            // session registered after that would never be cut.
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            open.insert(id, cut);
        }
        let s2 = self.clone();
        let spawned = std::thread::Builder::new().name(format!("{kind}-{id}")).spawn(move || {
            body(&s2);
            s2.sessions.lock().expect(crate::POISONED).remove(&id);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a session thread: {e}");
            self.sessions.lock().expect(crate::POISONED).remove(&id);
        }
    }

    fn session(&self, stream: TcpStream) {
        let Ok(peer) = stream.peer_addr() else { return };
        let _ = stream.set_nodelay(true);
        let Ok(wstream) = stream.try_clone() else { return };
        let out = Box::new(TcpOut(Mutex::new((wstream, Seal::default()))));
        self.run_session(stream, out, peer);
    }

    /// Serves one session until its transport ends or a frame is refused.
    /// `input` yields the peer's frames as a byte stream.
    pub fn run_session<R: Read>(&self, input: R, out: Box<dyn FrameOut>, peer: SocketAddr) {
        let writer = Arc::new(SessionWriter { out, epoch: AtomicU64::new(0) });
        let mut sess = Session {
            peer,
            writer,
            epoch: None,
            probe: false,
            is_ack_sink: false,
            read_buf: Vec::new(),
            copy_cancel: None,
            creds: None,
            data_sum: None,
        };
        let mut reader = FrameReader::new(input);
        if let Some(keys) = &self.keys {
            match self.authenticate(keys, &mut reader, &sess.writer) {
                Ok(creds) => sess.creds = Some(creds),
                Err(r) => {
                    self.rejections.count(r.reason, peer, &r.message);
                    sess.writer.send_error(r.code, r.seq, r.offset, r.message);
                    sess.writer.out.close();
                    return;
                }
            }
        }
        loop {
            let res = match reader.next_frame_sum() {
                Ok((h, payload, data_sum)) => {
                    sess.data_sum = data_sum;
                    let len = payload.len();
                    let r = self.handle(&mut sess, h.kind, reader.payload_buf(), len);
                    // End of a burst: a single small write is committed
                    // here (one hand-off less at QD1), anything larger by
                    // the committer while this thread goes on receiving.
                    if reader.buffered_bytes() == 0 {
                        self.store.commit_pending();
                    }
                    r
                }
                Err(ReadError::Frame(FrameError::Closed)) => break,
                Err(ReadError::Io(_)) => break,
                Err(ReadError::Frame(e)) => Err(Reject {
                    reason: e.reason(),
                    code: ErrorCode::Malformed,
                    seq: 0,
                    offset: 0,
                    message: e.to_string(),
                    close: true,
                }),
            };
            if let Err(r) = res {
                self.rejections.count(r.reason, peer, &r.message);
                sess.writer.send_error(r.code, r.seq, r.offset, r.message);
                if r.close {
                    break;
                }
            }
        }
        if let Some(c) = &sess.copy_cancel {
            c.store(true, Ordering::Release);
        }
        // Writes appended before the session ended still get committed.
        self.store.commit_pending();
        if sess.is_ack_sink {
            let sink: Arc<dyn AckSink> = sess.writer.clone();
            self.store.clear_ack_sink_if(&sink);
        }
        sess.writer.out.close();
    }

    /// Handles one frame whose payload is `buf[..len]`. A Write may keep
    /// `buf` (`Store::append_received`).
    fn handle(&self, s: &mut Session, kind: FrameType, buf: &mut Vec<u8>, len: usize) -> Result<(), Reject> {
        let p = &buf[..len];
        let malformed = |e: FrameError| reject("malformed", ErrorCode::Malformed, e.to_string(), true);
        if kind == FrameType::Stats {
            let json = self.stats_json();
            return s.writer.send(FrameType::StatsReply, &[json.as_bytes()]).map_err(io_reject);
        }
        // A failed store takes no new sessions and no frame that needs it
        // working; sessions end here, so the HE learns why (docs/semantics.md §12).
        if matches!(
            kind,
            FrameType::Hello
                | FrameType::Write
                | FrameType::Replay
                | FrameType::SetEpoch
                | FrameType::Stamp
                | FrameType::SetMembers
                | FrameType::Heartbeat
                | FrameType::Copy
                | FrameType::Changes
                | FrameType::RegionRead
        ) {
            if let Some(f) = self.store.failure() {
                return Err(reject("disk_failed", ErrorCode::DiskError, StoreError::Failed(f).to_string(), true));
            }
        }
        if kind == FrameType::Hello {
            return self.hello(s, Hello::decode(p).map_err(malformed)?);
        }
        if kind == FrameType::AuthHello {
            // (A replica with a key file authenticates before this loop.)
            let msg = "this replica has no key file (`replica serve --key-file`): it cannot authenticate".into();
            return Err(reject(AuthFailure::NotConfigured.reason(), ErrorCode::Auth, msg, true));
        }
        let Some(epoch) = s.epoch else {
            return Err(reject("no_hello", ErrorCode::BadState, format!("{kind:?} before Hello"), true));
        };
        if epoch < self.store.epoch() {
            let msg = format!("session epoch {epoch} is older than replica epoch {}", self.store.epoch());
            return Err(reject("stale_epoch", ErrorCode::StaleEpoch, msg, true));
        }
        match kind {
            FrameType::Write => self.write(s, epoch, buf, len),
            FrameType::Read => self.read(s, ReadReq::decode(p).map_err(malformed)?),
            FrameType::Heartbeat => {
                let nonce = proto::decode_u64(kind, p).map_err(malformed)?;
                let reply = proto::HeartbeatReply {
                    nonce,
                    durable_seq: self.store.durable_seq(),
                    log_first: self.store.log_first(),
                };
                s.writer.send(FrameType::HeartbeatReply, &[&reply.encode()]).map_err(io_reject)
            }
            FrameType::SetEpoch => self.set_epoch(s, proto::decode_u64(kind, p).map_err(malformed)?),
            FrameType::Adopt => self.adopt(s, epoch, proto::Adopt::decode(p).map_err(malformed)?),
            FrameType::Stamp => self.stamp(s, p),
            FrameType::SetMembers => self.set_members(s, epoch, proto::SetMembers::decode(p).map_err(malformed)?),
            FrameType::LogRead => self.log_read(s, proto::decode_u64_pair(kind, p).map_err(malformed)?),
            FrameType::Replay => self.replay(s, epoch, proto::Replay::decode(p).map_err(malformed)?),
            FrameType::Copy => self.copy(s, epoch, proto::CopyReq::decode(p).map_err(malformed)?),
            FrameType::Changes => self.changes(s, proto::Changes::decode(p).map_err(malformed)?),
            FrameType::RegionRead => self.region_read(s, proto::RegionRead::decode(p).map_err(malformed)?),
            FrameType::RecoveryRate => {
                let rate = proto::decode_u64(kind, p).map_err(malformed)?;
                self.replaying.rate_bytes_per_s.store(rate, Ordering::Relaxed);
                Ok(())
            }
            other => {
                Err(reject("unexpected_type", ErrorCode::BadState, format!("{other:?} not valid from a client"), true))
            }
        }
    }

    fn hello(&self, s: &mut Session, h: Hello) -> Result<(), Reject> {
        let sb = self.store.superblock();
        s.probe = h.flags & proto::HELLO_PROBE != 0;
        if !s.probe {
            if h.volume != sb.volume {
                return Err(reject(
                    "wrong_volume",
                    ErrorCode::WrongVolume,
                    "volume UUID does not match this replica".into(),
                    true,
                ));
            }
            match history::hello_decision(sb.epoch, h.epoch) {
                HelloDecision::Join => {}
                // A host that holds a newer epoch on a majority reached a
                // replica its fence missed: adopt the epoch, which fences
                // every older session here too.
                HelloDecision::Raise => match self.store.set_epoch(h.epoch) {
                    Ok(()) => tracing::info!(peer = %s.peer, epoch = h.epoch, "epoch raised by a newer host's hello"),
                    Err(StoreError::StaleEpoch { mine, .. }) if mine == h.epoch => {}
                    Err(e) => {
                        let (reason, code) = store_reason(&e);
                        return Err(reject(reason, code, e.to_string(), true));
                    }
                },
                HelloDecision::Stale => {
                    let msg = format!("hello epoch {} is older than replica epoch {}", h.epoch, sb.epoch);
                    return Err(reject("stale_epoch", ErrorCode::StaleEpoch, msg, true));
                }
            }
        }
        let epoch = if s.probe { self.store.epoch() } else { h.epoch };
        s.epoch = Some(epoch);
        s.writer.epoch.store(epoch, Ordering::Release);
        s.writer.send(FrameType::HelloOk, &[&self.hello_ok().encode()]).map_err(io_reject)
    }

    /// The replica's identity and position.
    fn hello_ok(&self) -> HelloOk {
        let sb = self.store.superblock();
        HelloOk {
            volume: sb.volume,
            epoch: self.store.epoch(),
            size_bytes: sb.size_bytes,
            block_size: sb.block_size,
            durable_seq: self.store.durable_seq(),
            history: self.store.follows(),
            copying: self.store.copy_next(),
            members: self.store.membership(),
            read_view: self.view_id(),
        }
    }

    /// The store's read view for a host on this machine, if it has one.
    fn view_id(&self) -> Option<proto::ViewId> {
        let instance = self.store.read_view_instance();
        let boot_id = crate::readview::boot_id()?;
        let dir = std::fs::canonicalize(self.store.dir()).ok()?;
        (instance != 0).then_some(proto::ViewId { instance, boot_id, dir })
    }

    /// Adopt: the host's history must extend this replica's log.
    fn adopt(&self, s: &mut Session, epoch: u64, a: proto::Adopt) -> Result<(), Reject> {
        if s.probe || a.history.last_epoch() != epoch {
            let msg =
                format!("adopt of a history ending at epoch {} on a session of epoch {epoch}", a.history.last_epoch());
            return Err(reject("bad_adopt", ErrorCode::BadState, msg, true));
        }
        match self.store.adopt(epoch, &a.history, a.last_seq) {
            Ok(durable) => s.writer.send(FrameType::Ack, &[&proto::encode_u64(durable)]).map_err(io_reject),
            Err(e) => {
                let (reason, code) = store_reason(&e);
                // A Diverged error carries the common prefix in its seq.
                let seq = if let StoreError::Diverged { after, .. } = e { after } else { 0 };
                Err(Reject { reason, code, seq, offset: 0, message: e.to_string(), close: true })
            }
        }
    }

    fn write(&self, s: &mut Session, epoch: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), Reject> {
        let (wh, data) = WriteHeader::decode(&buf[..len])
            .map_err(|e| reject("malformed", ErrorCode::Malformed, e.to_string(), true))?;
        let start = len - data.len();
        if s.probe {
            return Err(reject("probe_write", ErrorCode::BadState, "write on a probe session".into(), true));
        }
        if wh.epoch > epoch {
            let msg = format!("record seq {} claims epoch {} above its session's {epoch}", wh.seq, wh.epoch);
            return Err(Reject {
                reason: "bad_epoch",
                code: ErrorCode::Malformed,
                seq: wh.seq,
                offset: wh.offset,
                message: msg,
                close: true,
            });
        }
        if !s.is_ack_sink {
            self.store.set_ack_sink(Some(s.writer.clone()));
            s.is_ack_sink = true;
        }
        let rec = RecordHeader { seq: wh.seq, offset: wh.offset, len: wh.len, op: wh.op, epoch: wh.epoch };
        self.store.append_received(epoch, &rec, buf, start, s.data_sum.take()).map_err(|e| {
            let (reason, code) = store_reason(&e);
            Reject { reason, code, seq: wh.seq, offset: wh.offset, message: e.to_string(), close: true }
        })
    }

    fn read(&self, s: &mut Session, r: ReadReq) -> Result<(), Reject> {
        s.read_buf.resize(r.len as usize, 0);
        match self.store.read(r.offset, &mut s.read_buf) {
            Ok(()) => {
                let h = proto::encode_read_reply_header(r.req_id, 0);
                s.writer.send(FrameType::ReadReply, &[&h, &s.read_buf]).map_err(io_reject)
            }
            Err(e) => {
                let (reason, code) = store_reason(&e);
                self.rejections.count(reason, s.peer, &e);
                let h = proto::encode_read_reply_header(r.req_id, code as u16);
                s.writer.send(FrameType::ReadReply, &[&h]).map_err(io_reject)
            }
        }
    }

    /// SetEpoch: granted only for an epoch above the replica's. The reply
    /// is the replica's state after the fence (its position).
    fn set_epoch(&self, s: &mut Session, epoch: u64) -> Result<(), Reject> {
        self.store.set_epoch(epoch).map_err(|e| {
            let (reason, code) = store_reason(&e);
            reject(reason, code, e.to_string(), true)
        })?;
        s.epoch = Some(epoch);
        s.writer.epoch.store(epoch, Ordering::Release);
        s.probe = false;
        s.writer.send(FrameType::HelloOk, &[&self.hello_ok().encode()]).map_err(io_reject)
    }

    fn stamp(&self, s: &mut Session, p: &[u8]) -> Result<(), Reject> {
        let st = proto::Stamp::decode(p).map_err(|e| reject("malformed", ErrorCode::Malformed, e.to_string(), true))?;
        self.store.stamp(st.volume, st.size_bytes, st.block_size, st.epoch, st.members).map_err(|e| {
            let (reason, code) = store_reason(&e);
            reject(reason, code, e.to_string(), true)
        })?;
        s.epoch = Some(self.store.epoch());
        s.writer.send(FrameType::Ack, &[&proto::encode_u64(self.store.epoch())]).map_err(io_reject)
    }

    /// SetMembers: store a new replica set for the host at the session's
    /// epoch (`Store::set_members` checks epoch and version).
    fn set_members(&self, s: &mut Session, epoch: u64, req: proto::SetMembers) -> Result<(), Reject> {
        if s.probe || req.epoch != epoch {
            let msg = format!("replica set change for epoch {} on a session of epoch {epoch}", req.epoch);
            return Err(reject("bad_members", ErrorCode::BadState, msg, true));
        }
        let version = req.members.version;
        self.store.set_members(epoch, req.members).map_err(|e| {
            let (reason, code) = store_reason(&e);
            reject(reason, code, e.to_string(), true)
        })?;
        tracing::info!(peer = %s.peer, epoch, version, "replica set stored");
        s.writer.send(FrameType::MembersOk, &[&proto::encode_u64(version)]).map_err(io_reject)
    }

    /// Starts a replay recovery on its own thread, so this session keeps
    /// answering heartbeats; its acks and its ReplayDone (or Error) go to
    /// this session. See [`crate::replay`].
    fn replay(&self, s: &mut Session, epoch: u64, req: proto::Replay) -> Result<(), Reject> {
        if s.probe {
            return Err(reject("probe_write", ErrorCode::BadState, "replay on a probe session".into(), true));
        }
        if !s.is_ack_sink {
            self.store.set_ack_sink(Some(s.writer.clone()));
            s.is_ack_sink = true;
        }
        let (store, writer, ctl) = (self.store.clone(), s.writer.clone(), self.replaying.clone());
        let creds = s.creds.clone();
        let volume = self.store.superblock().volume;
        tracing::info!(peer = %req.addr, from = req.from, to = req.to, "replay recovery starting");
        let spawned = std::thread::Builder::new().name("replay".into()).spawn(move || {
            match crate::replay::run(&store, volume, epoch, &req, &ctl, creds.as_ref()) {
                Ok(next) => {
                    tracing::info!(peer = %req.addr, next, "replay recovery done");
                    let _ = writer.send(FrameType::ReplayDone, &[&proto::encode_u64(next)]);
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    writer.send_error(e.code(), req.from, 0, e.to_string());
                }
            }
        });
        spawned.map(drop).map_err(io_reject)
    }

    /// Copy: sets up (or resumes) a recovery copy from the peer the HE
    /// names, then runs it on its own thread while this session takes the
    /// live writes. Acks (only the last one, when the copy ends), progress
    /// and CopyDone (or an Error) go to this session. See [`crate::copy`].
    fn copy(&self, s: &mut Session, epoch: u64, req: proto::CopyReq) -> Result<(), Reject> {
        if s.probe || req.history.last_epoch() != epoch {
            let msg = format!(
                "copy with a history ending at epoch {} on a session of epoch {epoch}",
                req.history.last_epoch()
            );
            return Err(reject("bad_adopt", ErrorCode::BadState, msg, true));
        }
        // A copy of an earlier session may still be saving its progress.
        if !self.copying.acquire(Duration::from_secs(10)) {
            return Err(reject("busy", ErrorCode::BadState, "a copy is still running on this replica".into(), true));
        }
        if let Err(e) = self.store.begin_copy(epoch, &req.history, req.last_seq, req.live_from, req.kind) {
            self.copying.release();
            let (reason, code) = store_reason(&e);
            return Err(reject(reason, code, e.to_string(), true));
        }
        if !s.is_ack_sink {
            self.store.set_ack_sink(Some(s.writer.clone()));
            s.is_ack_sink = true;
        }
        self.replaying.rate_bytes_per_s.store(req.rate_bytes_per_s, Ordering::Relaxed);
        s.writer.send(FrameType::Ack, &[&proto::encode_u64(self.store.durable_seq())]).map_err(io_reject)?;
        let cancel = Arc::new(AtomicBool::new(false));
        s.copy_cancel = Some(cancel.clone());
        let (store, writer, ctl, rates) =
            (self.store.clone(), s.writer.clone(), self.copying.clone(), self.replaying.clone());
        let volume = self.store.superblock().volume;
        let creds = s.creds.clone();
        let spawned = std::thread::Builder::new().name("copy".into()).spawn(move || {
            let rate = &rates.rate_bytes_per_s;
            let res = crate::copy::run(&store, volume, epoch, &req.addr, rate, &ctl, &cancel, &*writer, creds.as_ref());
            ctl.release();
            match res {
                Ok(durable) => {
                    // A durable seq, like an ack: never to a fenced host.
                    let sent = store.send_if_current(epoch, || {
                        let _ = writer.send(FrameType::CopyDone, &[&proto::encode_u64(durable)]);
                    });
                    if !sent {
                        tracing::info!(epoch, durable, "copy done, but a newer host fenced this session: not reported");
                    }
                }
                Err(crate::copy::CopyError::Cancelled) => tracing::info!("copy stopped: its session ended"),
                Err(e) => {
                    tracing::warn!("{e}");
                    writer.send_error(e.code(), 0, 0, e.to_string());
                }
            }
        });
        if let Err(e) = spawned {
            self.copying.release();
            return Err(io_reject(e));
        }
        Ok(())
    }

    /// Changes: which regions this replica wrote after a seq.
    fn changes(&self, s: &mut Session, req: proto::Changes) -> Result<(), Reject> {
        let res = if req.count_only {
            self.store
                .count_changed(req.from, req.to, req.since, req.min_seq, SOURCE_WAIT)
                .map(|count| proto::ChangesReply { next: req.to, count, regions: Vec::new() })
        } else {
            self.store
                .changed_regions(req.from, req.to, req.since, req.max as usize, req.min_seq, SOURCE_WAIT)
                .map(|(regions, next)| proto::ChangesReply { next, count: regions.len() as u64, regions })
        };
        match res {
            Ok(r) => s.writer.send(FrameType::ChangesReply, &[&r.encode()]).map_err(io_reject),
            Err(e) => {
                let (reason, code) = store_reason(&e);
                Err(reject(reason, code, e.to_string(), true))
            }
        }
    }

    /// RegionRead: one region, with its mark and the seq it is as of.
    fn region_read(&self, s: &mut Session, req: proto::RegionRead) -> Result<(), Reject> {
        match self.store.read_region(req.region, req.min_seq, SOURCE_WAIT) {
            Ok((h, data)) => {
                self.copying.served_bytes.fetch_add(u64::from(h.len), Ordering::Relaxed);
                s.writer.send(FrameType::RegionData, &[&h.encode(), &data]).map_err(io_reject)
            }
            Err(e) => {
                let (reason, code) = store_reason(&e);
                Err(reject(reason, code, e.to_string(), true))
            }
        }
    }

    /// Streams log records `from..=to` as LogRecord frames, then LogEnd.
    fn log_read(&self, s: &mut Session, (from, to): (u64, u64)) -> Result<(), Reject> {
        let mut send_err = None;
        let res = self.store.read_log(from, to, |h, data| {
            let wh = WriteHeader { seq: h.seq, offset: h.offset, len: h.len, op: h.op, epoch: h.epoch };
            match s.writer.send(FrameType::LogRecord, &[&wh.encode(), data]) {
                Ok(()) => true,
                Err(e) => {
                    send_err = Some(e);
                    false
                }
            }
        });
        if let Some(e) = send_err {
            return Err(io_reject(e));
        }
        match res {
            Ok(next) => s.writer.send(FrameType::LogEnd, &[&proto::encode_u64(next)]).map_err(io_reject),
            Err(e) => Err(Reject {
                // Not in the log any more, or the log cannot be read.
                reason: store_reason(&e).0,
                code: store_reason(&e).1,
                seq: from,
                offset: 0,
                message: e.to_string(),
                close: false,
            }),
        }
    }

    /// Counters as JSON, for the Stats frame.
    pub fn stats_json(&self) -> String {
        let sb = self.store.superblock();
        serde_json::json!({
            "durable_seq": self.store.durable_seq(),
            "epoch": sb.epoch,
            "checkpoint_seq": sb.checkpoint_seq,
            "commits": self.store.commits.load(Ordering::Relaxed),
            "writes": self.store.writes.load(Ordering::Relaxed),
            "log_io": self.store.log_io().to_string(),
            "apply_direct_bytes": self.store.apply_direct_bytes.load(Ordering::Relaxed),
            "failure": self.store.failure(),
            "rejected": self.rejections.snapshot(),
            "auth_failures": self.auth_failures(),
            "netsync_rejected": self.netsync_rejected().by_reason().into_iter().collect::<BTreeMap<_, _>>(),
            "log_first": self.store.log_first(),
            "copy": sb.copy.as_ref().map(|c| serde_json::json!({
                "kind": c.kind.to_string(),
                "cursor": c.cursor,
                "done_bytes": c.done_bytes,
                "total_bytes": c.total_bytes,
                "live_from": c.live_from,
            })),
            "copy_served_bytes": self.copying.served_bytes.load(Ordering::Relaxed),
            "copy_received_bytes": self.copying.received_bytes.load(Ordering::Relaxed),
        })
        .to_string()
    }

    /// Sessions open now.
    pub fn sessions_open(&self) -> usize {
        self.sessions.lock().expect(crate::POISONED).len()
    }

    /// Sessions accepted since start (TCP and network-sync).
    pub fn sessions_total(&self) -> u64 {
        self.next_session.load(Ordering::Relaxed) - 1
    }

    /// Whether a replay recovery runs on this replica now.
    pub fn replaying(&self) -> bool {
        self.replaying.running()
    }

    /// Recovery-copy region bytes this replica sent to peers and received
    /// in its own copies, since start.
    pub fn copy_bytes(&self) -> (u64, u64) {
        (self.copying.served_bytes.load(Ordering::Relaxed), self.copying.received_bytes.load(Ordering::Relaxed))
    }

    /// Authentication failures by reason (a view of the rejections), and,
    /// as the HE's `status` shows them, network-sync datagrams whose MAC
    /// failed (`bad_datagram_mac`) or whose control counter did not rise
    /// (`replayed_datagram`).
    pub fn auth_failures(&self) -> BTreeMap<&'static str, u64> {
        let all = self.rejections.snapshot();
        let mut m: BTreeMap<&'static str, u64> =
            AuthFailure::ALL.iter().map(|a| (a.reason(), all.get(a.reason()).copied().unwrap_or(0))).collect();
        let net = self.netsync_rejected();
        m.insert("bad_datagram_mac", net.bad_mac);
        m.insert("replayed_datagram", net.replayed);
        m
    }

    /// Network-sync datagrams dropped since start, by reason: by the
    /// listener and by every link, open or ended.
    pub fn netsync_rejected(&self) -> starblk_netsync::Rejected {
        self.netsync_rejections.total()
    }

    /// The replica half of the authentication handshake: the first frame
    /// must be an AuthHello naming a key in the key file; answers with a
    /// fresh nonce and the proof, then keys both directions. The client's
    /// first sealed frame proves it holds the key (or fails as bad_mac).
    fn authenticate<R: Read>(
        &self,
        keys: &KeySource,
        reader: &mut FrameReader<R>,
        writer: &SessionWriter,
    ) -> Result<Credentials, Reject> {
        let fail = |a: AuthFailure, message: String| reject(a.reason(), ErrorCode::Auth, message, true);
        let (h, p) = match reader.next_frame() {
            Ok(f) => f,
            Err(ReadError::Frame(e)) => return Err(reject(e.reason(), ErrorCode::Malformed, e.to_string(), true)),
            Err(ReadError::Io(e)) => return Err(reject("closed", ErrorCode::BadState, e.to_string(), true)),
        };
        if h.kind != FrameType::AuthHello {
            let msg = format!("this replica requires authentication (key file); the peer sent {:?} first", h.kind);
            return Err(fail(AuthFailure::NoAuth, msg));
        }
        let hello = AuthHello::decode(p).map_err(|e| reject("malformed", ErrorCode::Malformed, e.to_string(), true))?;
        let hello_bytes = hello.encode();
        let ring = keys.keys();
        let Some(key) = ring.find(hello.key_id) else {
            let msg = format!(
                "key {} is not in this replica's key file {} (it holds {})",
                hello.key_id,
                ring.path().display(),
                ring.ids()
            );
            return Err(fail(AuthFailure::UnknownKey, msg));
        };
        let nonce = auth::fresh_nonce().map_err(io_reject)?;
        let proof = auth::replica_proof(key, &hello_bytes, &nonce);
        writer.send(FrameType::AuthChallenge, &[&AuthChallenge { nonce, proof }.encode()]).map_err(io_reject)?;
        let encrypt = hello.flags & auth::AUTH_ENCRYPT != 0;
        let (tx, rx) = auth::frame_keys(Side::Replica, key, &hello_bytes, &nonce, encrypt);
        writer.out.set_seal(Seal::new(Some(tx)));
        reader.set_auth(rx);
        Ok(Credentials { key: key.clone(), encrypt })
    }

    /// The store behind this server.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// How long a source waits to have applied what a recovering peer asks
/// it to be as of.
const SOURCE_WAIT: Duration = Duration::from_secs(30);

fn reject(reason: &'static str, code: ErrorCode, message: String, close: bool) -> Reject {
    Reject { reason, code, seq: 0, offset: 0, message, close }
}

fn io_reject(e: io::Error) -> Reject {
    reject("send_failed", ErrorCode::BadState, e.to_string(), true)
}

fn store_reason(e: &StoreError) -> (&'static str, ErrorCode) {
    match e {
        StoreError::OutOfRange { .. } => ("out_of_range", ErrorCode::OutOfRange),
        StoreError::SeqGap { .. } => ("seq_gap", ErrorCode::SeqGap),
        StoreError::WrongVolume => ("wrong_volume", ErrorCode::WrongVolume),
        StoreError::Geometry(_) => ("bad_geometry", ErrorCode::OutOfRange),
        StoreError::StaleEpoch { .. } => ("stale_epoch", ErrorCode::StaleEpoch),
        StoreError::Diverged { .. } => ("diverged", ErrorCode::Diverged),
        StoreError::NotInLog { .. } => ("not_in_log", ErrorCode::OutOfRange),
        StoreError::Copy(_) => ("bad_copy", ErrorCode::BadState),
        StoreError::Timeout { .. } => ("timeout", ErrorCode::BadState),
        StoreError::StaleMembers { .. } => ("stale_members", ErrorCode::BadState),
        _ => ("disk_error", ErrorCode::DiskError),
    }
}
