//! The link's I/O thread: one per link, owning the socket and all protocol
//! state. It waits in `ppoll` on the socket (data, error queue, and
//! writability when the send buffer was full) and on an eventfd the
//! application's calls poke; each turn it runs the timers, transmits what
//! pacing allows, and publishes progress.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::auto_rate::AutoRate;
use crate::config::LinkConfig;
use crate::health::{fec_capacity, Health, HealthConfig, HealthMonitor};
use crate::keys::{self, LinkKey, AUTH_NONCE_BYTES};
use crate::pacer::{Pacer, RateLimit};
use crate::rx::{Rx, RxLimits};
use crate::shared::{lock, LinkEvent, Shared};
use crate::stamps::{Covers, WireTracker};
use crate::stats::{LinkStats, RejectReason, Rejected, TxStats, WireMode};
use crate::sys::{self, Stamp};
use crate::tx::{OutMsg, Pending, Tx};
use crate::wire::{
    self, AckPayload, DatagramError, DatagramKey, Header, HelloPayload, Kind, NackPayload, PeerCounters, FLAG_REPLY,
};

/// Datagrams sent per loop turn before looking at the socket again...
const TX_BATCH: usize = 64;
/// ...unless repairs are still queued behind data (an idle flush of layered
/// XOR with strides up to 16384 can queue that many).
const TX_BATCH_MAX: usize = 32_768;
/// Most datagrams read per loop turn.
const RX_BATCH: usize = 256;
/// Most nack datagrams per nack tick.
const NACKS_PER_TICK: usize = 4;
/// Pause after a send error other than "buffer full".
const SEND_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Longest sleep, so a missed wake costs at most this.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Stats snapshots at most this often while busy.
const PUBLISH_EVERY: Duration = Duration::from_millis(2);
/// Largest datagram read (UDP's maximum, so nothing is ever cut).
const RX_BUFFER_BYTES: usize = 65_536;

/// Why `transmit` stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Nothing to send, or sending cannot go on now (not established,
    /// socket full, send error backoff, stamp re-arm).
    Idle,
    /// The pacer holds the next datagram.
    Paced,
    /// The batch ended with more ready: look at the socket, then go on.
    Batch,
}

/// Which end of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Sends hellos until answered (`Link::connect`).
    Initiator,
    /// Answers a hello the listener received (`Listener::accept`).
    Responder,
}

/// What became of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Ok,
    /// Try again later (buffer full or a transient error).
    Later,
}

/// The socket plus what every send touches: the stamp tracker and counters.
#[derive(Debug)]
struct Net {
    sock: Socket,
    tracker: WireTracker,
    /// The send buffer was full: wait for POLLOUT.
    blocked: bool,
    backoff_until: Option<Instant>,
    last_error_log: Option<Instant>,
    bytes_sent: u64,
    send_errors: u64,
}

impl Net {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one datagram; `covers` asks for a TX timestamp and says what
    /// it stands for.
    fn send(&mut self, bytes: &[u8], covers: Option<Covers>, now: Instant) -> Sent {
        let mut stamp = if covers.is_some() { self.tracker.stamp_request() } else { Stamp::None };
        let mut refused_retried = false;
        loop {
            let realtime_ns = sys::realtime_ns();
            let err = match sys::send(self.fd(), bytes, stamp) {
                Ok(_) => {
                    self.bytes_sent += bytes.len() as u64;
                    if let Some(c) = covers {
                        self.tracker.on_sent(c, stamp, now, realtime_ns);
                    }
                    return Sent::Ok;
                }
                Err(e) => e,
            };
            match (err.raw_os_error(), stamp) {
                (Some(libc::EINVAL), Stamp::Explicit(_)) => {
                    self.tracker.explicit_refused();
                    stamp = self.tracker.stamp_request();
                }
                (Some(libc::EINVAL), Stamp::Counter) => {
                    self.tracker.stamps_refused();
                    stamp = Stamp::None;
                }
                // A pending ICMP error from an earlier datagram is reported
                // once, by this call; the datagram itself was not sent.
                (Some(libc::ECONNREFUSED), _) if !refused_retried => refused_retried = true,
                _ => return self.failed(&err, stamp, now),
            }
        }
    }

    fn failed(&mut self, err: &io::Error, stamp: Stamp, now: Instant) -> Sent {
        self.tracker.on_send_failed(stamp);
        if sys::is_would_block(err) {
            self.blocked = true;
            return Sent::Later;
        }
        self.send_errors += 1;
        self.backoff_until = Some(now + SEND_ERROR_BACKOFF);
        if self.last_error_log.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            tracing::warn!("netsync send failed (retrying): {err}");
            self.last_error_log = Some(now);
        }
        Sent::Later
    }

    fn can_send(&self, now: Instant) -> bool {
        !self.blocked && self.backoff_until.is_none_or(|t| now >= t)
    }
}

/// Round-trip time from ack timestamp echoes.
#[derive(Debug, Default)]
struct Rtt {
    srtt: Duration,
    rttvar: Duration,
    /// The peer's last `ts_us` and when it came.
    peer_ts: Option<(u64, Instant)>,
}

impl Rtt {
    fn sample(&mut self, rtt: Duration) {
        if self.srtt.is_zero() {
            self.srtt = rtt;
            self.rttvar = rtt / 2;
            return;
        }
        let diff = rtt.abs_diff(self.srtt);
        self.rttvar = (self.rttvar * 3 + diff) / 4;
        self.srtt = (self.srtt * 7 + rtt) / 8;
    }
}

/// A keyed link end's authentication state (`crate::keys`).
struct Auth {
    key: LinkKey,
    /// This end's fresh nonce.
    nonce: [u8; AUTH_NONCE_BYTES],
    /// Keys of the hellos this end sends and takes.
    hello_tx: Option<DatagramKey>,
    hello_rx: DatagramKey,
    /// Direction keys, once both nonces are known.
    tx: Option<DatagramKey>,
    rx: Option<DatagramKey>,
    /// Control counter of the last ack or nack sent, and taken.
    ctl_sent: u64,
    ctl_seen: u64,
}

impl Auth {
    fn new(key: LinkKey, role: Role) -> Auth {
        let nonce = keys::fresh_nonce();
        let (hello_tx, hello_rx) = match role {
            Role::Initiator => (Some(key.hello()), key.reply(&nonce)),
            // The reply key needs the initiator's nonce (`establish`).
            Role::Responder => (None, key.hello()),
        };
        Auth { key, nonce, hello_tx, hello_rx, tx: None, rx: None, ctl_sent: 0, ctl_seen: 0 }
    }
}

/// See the module docs.
pub(crate) struct Io {
    shared: Arc<Shared>,
    cfg: LinkConfig,
    role: Role,
    link_id: u32,
    nonce: u64,
    peer_nonce: u64,
    net: Net,
    tx: Tx,
    rx: Rx,
    pacer: Pacer,
    /// `rate = "auto"`: the controller that sets the pacer's rate.
    auto: Option<AutoRate>,
    health: HealthMonitor,
    /// The peer's last (datagrams seen, lost) on our stream, for deltas.
    peer_loss: (u64, u64),
    nack_limit: RateLimit,
    /// Handshake done (the peer's hello is known).
    established: bool,
    /// `Established` reported (handshake done and wire mode decided).
    announced: bool,
    /// The receive window last advertised.
    last_window_end: u64,
    /// A message was delivered since the last ack (acked sooner).
    delivered_since_ack: bool,
    /// `ts_us` of the newest ack taken (older, reordered acks carry stale
    /// flow-control state).
    peer_ack_ts_us: u64,
    rtt: Rtt,
    epoch: Instant,
    last_hello: Option<Instant>,
    last_ack: Instant,
    last_nack_tick: Instant,
    last_rx: Instant,
    peer_silent: bool,
    peer_rx: PeerCounters,
    tx_stats: TxStats,
    rejected: Rejected,
    last_publish: Instant,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// Keyed links: nonces and keys.
    auth: Option<Auth>,
}

/// How a link end starts.
pub(crate) struct Start {
    pub role: Role,
    pub link_id: u32,
    /// Responder: the hello the listener received.
    pub peer_hello: Option<HelloPayload>,
    /// Whether SO_TIMESTAMPING could be enabled on the socket.
    pub timestamps: bool,
}

impl Io {
    pub(crate) fn new(shared: Arc<Shared>, sock: Socket, start: Start) -> Io {
        let now = Instant::now();
        let cfg = shared.cfg.clone();
        let fec_c = cfg.fec.as_ref().map_or(0, |s| s.c());
        let limits = RxLimits {
            window_seqs: cfg.recv_window_seqs,
            buffer_bytes: cfg.recv_buffer_bytes,
            max_message_bytes: cfg.max_message_bytes,
            nack_min_delay: Duration::from_micros(cfg.nack_min_delay_us),
        };
        Io {
            net: Net {
                sock,
                tracker: WireTracker::new(fec_c, start.timestamps, cfg.explicit_stamp_ids),
                blocked: false,
                backoff_until: None,
                last_error_log: None,
                bytes_sent: 0,
                send_errors: 0,
            },
            tx: Tx::new(start.link_id, cfg.payload_bytes, cfg.fec.clone(), now),
            rx: Rx::new(start.link_id, limits, now),
            pacer: Pacer::new(cfg.rate_bits_per_s, cfg.burst_bytes, now),
            auto: cfg.auto_rate.then(|| AutoRate::new(now)),
            health: HealthMonitor::new(HealthConfig {
                capacity: fec_capacity(cfg.fec.as_ref()),
                window: Duration::from_millis(cfg.health_window_ms),
                min_datagrams: cfg.health_min_datagrams,
                hold: Duration::from_millis(cfg.health_hold_ms),
            }),
            peer_loss: (0, 0),
            nack_limit: RateLimit::new(cfg.max_nacks_per_s, now),
            role: start.role,
            link_id: start.link_id,
            nonce: sys::random_u64(),
            peer_nonce: start.peer_hello.as_ref().map_or(0, |h| h.nonce),
            established: false,
            announced: false,
            last_window_end: 0,
            delivered_since_ack: false,
            peer_ack_ts_us: 0,
            rtt: Rtt::default(),
            epoch: now,
            last_hello: None,
            last_ack: now,
            last_nack_tick: now,
            last_rx: now,
            peer_silent: false,
            peer_rx: PeerCounters::default(),
            tx_stats: TxStats::default(),
            rejected: Rejected::default(),
            last_publish: now,
            buf: vec![0; RX_BUFFER_BYTES],
            scratch: Vec::with_capacity(2048),
            auth: cfg.key.clone().map(|k| Auth::new(k, start.role)),
            shared,
            cfg,
        }
        .with_peer(start.peer_hello)
    }

    fn with_peer(mut self, hello: Option<HelloPayload>) -> Io {
        if let Some(h) = hello {
            self.establish(&h);
        }
        self.tx_stats.window_max_bytes = self.cfg.window_bytes;
        self.tx_stats.auto_rate = self.auto.is_some();
        self.update_pacing(Instant::now());
        self
    }

    /// The thread body: runs until the link is closed.
    pub(crate) fn run(mut self) {
        let now = Instant::now();
        self.send_hello(now);
        while !self.shared.is_closing() {
            let now = Instant::now();
            self.timers(now);
            let stop = self.transmit(now);
            self.announce();
            let timeout = self.next_wakeup(now, stop);
            // Fresh stats whenever the thread is about to sleep a while.
            self.publish(now, timeout >= Duration::from_millis(1));
            match sys::poll2(self.net.fd(), self.net.blocked, self.shared.wake.fd(), timeout) {
                Ok(ready) => self.on_ready(ready),
                Err(e) => {
                    tracing::error!("netsync link {:#x}: poll failed: {e}", self.link_id);
                    self.shared.close(Some(format!("poll: {e}")));
                }
            }
        }
        // A last ack, so a peer does not wait on messages this end took
        // just before closing.
        if self.established && self.rx.ack_due {
            self.send_ack(Instant::now());
        }
        self.publish(Instant::now(), true);
    }

    fn on_ready(&mut self, ready: sys::Ready) {
        if ready.woken {
            self.shared.wake.drain();
        }
        if ready.writable {
            self.net.blocked = false;
        }
        if ready.error_queue {
            self.read_stamps();
        }
        let now = Instant::now();
        if ready.readable {
            self.receive(now);
        }
        if ready.woken {
            // `recv` may have made room in the inbox.
            self.deliver(now);
        }
    }

    /// Reports the link established once the handshake is done and the
    /// wire mode decided (data flows from then on).
    fn announce(&mut self) {
        if self.announced || !self.established || !self.net.tracker.decided() {
            return;
        }
        self.announced = true;
        lock(&self.shared.progress).established = true;
        self.shared.progress_cv.notify_all();
        self.shared.emit(LinkEvent::Established);
        tracing::info!(
            "netsync link {:#x} established ({:?}, wire mode {})",
            self.link_id,
            self.role,
            self.net.tracker.mode().as_str()
        );
    }

    fn now_us(&self, now: Instant) -> u64 {
        // A link would have to run for 584,000 years to overflow.
        now.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }
}

// Sending.
impl Io {
    fn send_hello(&mut self, now: Instant) {
        let hello = HelloPayload {
            fec: self.cfg.fec.clone(),
            payload_bytes: self.cfg.payload_bytes as u32,
            max_message_bytes: self.cfg.max_message_bytes as u32,
            recv_window_seqs: self.cfg.recv_window_seqs.min(u64::from(u32::MAX)) as u32,
            nonce: self.nonce,
            auth_nonce: self.auth.as_ref().map(|a| a.nonce),
        };
        let mut header = Header::control(Kind::Hello, self.link_id, 0);
        if self.role == Role::Responder {
            header.flags = FLAG_REPLY;
        }
        let mut payload = Vec::new();
        hello.encode_into(&mut payload);
        self.scratch.clear();
        let key = self.auth.as_ref().and_then(|a| a.hello_tx.as_ref());
        wire::encode_keyed(&header, &payload, &mut self.scratch, key);
        // While the wire mode is undecided, each hello is the stamp probe.
        let covers = (self.net.tracker.mode() == WireMode::Probing).then_some(Covers::Probe);
        let _ = self.net.send(&self.scratch, covers, now);
        self.last_hello = Some(now);
    }

    fn data_may_flow(&self, now: Instant) -> bool {
        self.established && self.net.tracker.decided() && self.net.can_send(now)
    }

    /// Sends what pacing allows; says why it stopped.
    fn transmit(&mut self, now: Instant) -> Stop {
        if !self.data_may_flow(now) {
            return Stop::Idle;
        }
        // A batch does not end between a data datagram and the repairs
        // queued behind it, nor between a message's last datagram and the
        // idle flush that may follow, so those leave back to back (within
        // limits).
        for i in 0..TX_BATCH_MAX {
            let settled = self.tx.mid_message() || !self.tx.has_open_groups() || i >= 4 * TX_BATCH;
            if i >= TX_BATCH && self.tx.pending.is_empty() && settled {
                return Stop::Batch;
            }
            if !self.pacer.ready(now) {
                return Stop::Paced;
            }
            if !self.send_one(now) {
                return Stop::Idle;
            }
        }
        Stop::Batch
    }

    /// Sends or builds one thing, in priority order: a datagram already
    /// built (data with its repairs, in order), a retransmission, a new
    /// data datagram; or, with nothing else to do, closes the open FEC
    /// groups (the idle flush). False when there was nothing to do or the
    /// socket refused.
    fn send_one(&mut self, now: Instant) -> bool {
        let stamped_ok = !self.net.tracker.paused();
        if stamped_ok && !self.tx.pending.is_empty() {
            return self.send_pending(now);
        }
        if let Some(seq) = self.tx.next_retx() {
            return self.send_retx(seq, now);
        }
        if stamped_ok && self.tx.window_open() {
            if self.build_next() {
                return true;
            }
            // Room to send and nothing to send: the application is what
            // limits the rate now (delivery samples say so).
            self.tx.note_idle();
        }
        stamped_ok && self.tx.flush_fec()
    }

    fn send_pending(&mut self, now: Instant) -> bool {
        let (bytes, covers, seq) = match self.tx.pending.front() {
            Some(Pending::Data(seq)) => match self.tx.datagram(*seq) {
                Some(b) => (b, Covers::Data(*seq), Some(*seq)),
                None => {
                    // Acknowledged before it left (a retransmit got there).
                    self.tx.pending.pop_front();
                    return true;
                }
            },
            Some(Pending::Repair(bytes, seqs)) => (bytes.as_slice(), Covers::Repair(seqs.clone()), None),
            None => return false,
        };
        let len = bytes.len();
        if self.net.send(bytes, Some(covers), now) == Sent::Later {
            return false;
        }
        self.pacer.spend(len);
        self.tx.count_wire(len);
        if let Some(seq) = seq {
            self.tx.mark_sent(seq, now);
            self.tx_stats.data_packets += 1;
        } else {
            self.tx_stats.repair_packets += 1;
        }
        if let Some(Pending::Repair(bytes, _)) = self.tx.pending.pop_front() {
            self.tx.recycle(bytes);
        }
        self.wire_progress();
        true
    }

    fn send_retx(&mut self, seq: u64, now: Instant) -> bool {
        let Some(bytes) = self.tx.datagram(seq) else {
            return true;
        };
        let len = bytes.len();
        if self.net.send(bytes, None, now) == Sent::Later {
            self.tx.requeue_retx(seq);
            return false;
        }
        self.pacer.spend(len);
        self.tx.count_wire(len);
        self.tx.mark_sent(seq, now);
        self.tx_stats.retransmitted_packets += 1;
        true
    }

    fn build_next(&mut self) -> bool {
        let shared = &self.shared;
        let Some((seq, msg_id, last)) = self.tx.build_next(|| take_msg(shared)) else {
            return false;
        };
        self.net.tracker.add_seq(seq);
        if last {
            self.net.tracker.add_msg(msg_id, seq);
        }
        true
    }

    fn send_control(&mut self, kind: Kind, encode: impl FnOnce(&mut Vec<u8>), now: Instant) {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        encode(&mut payload);
        let mut bytes = Vec::with_capacity(wire::HEADER_BYTES + payload.len() + wire::MAC_BYTES);
        // Keyed links number acks and nacks, so a replayed one is refused.
        let (counter, key) = match &mut self.auth {
            Some(a) => {
                a.ctl_sent += 1;
                (a.ctl_sent, a.tx.as_ref())
            }
            None => (0, None),
        };
        wire::encode_keyed(&Header::control(kind, self.link_id, counter), &payload, &mut bytes, key);
        self.scratch = payload;
        let _ = self.net.send(&bytes, None, now);
    }

    fn send_ack(&mut self, now: Instant) {
        let (echo_ts_us, echo_delay_us) = match self.rtt.peer_ts {
            Some((ts, at)) => (ts, now.saturating_duration_since(at).as_micros().min(u128::from(u32::MAX)) as u32),
            None => (0, 0),
        };
        self.rx.set_inbox_bytes(lock(&self.shared.inbox).bytes);
        let window_end = self.rx.window_end();
        let ack = AckPayload {
            cum_ack: self.rx.cum_ack(),
            held_upto: self.rx.held_upto(),
            window_end,
            highest_seen: self.rx.highest_seen(),
            ts_us: self.now_us(now),
            echo_ts_us,
            echo_delay_us,
            counters: self.rx.counters(),
        };
        self.send_control(Kind::Ack, |out| ack.encode_into(out), now);
        self.last_window_end = window_end;
        if window_end - ack.cum_ack < self.rx.max_window_seqs() / 4 + 1 {
            // A small window: hear about reads so it can be reopened.
            lock(&self.shared.inbox).wake_on_read = true;
        }
        self.last_ack = now;
        self.delivered_since_ack = false;
        self.rx.ack_due = false;
        self.rx.unacked_consumed = 0;
        self.rx.stats.acks_sent += 1;
    }

    fn send_nacks(&mut self, now: Instant) {
        self.last_nack_tick = now;
        for _ in 0..NACKS_PER_TICK {
            let Some(nack) = self.rx.build_nack(now, self.rtt.srtt) else {
                break;
            };
            self.send_control(Kind::Nack, |out| nack.encode_into(out), now);
            self.rx.stats.nacks_sent += 1;
        }
    }
}

/// Takes the next queued message for the I/O thread.
fn take_msg(shared: &Shared) -> Option<OutMsg> {
    lock(&shared.out).msgs.pop_front()
}

// Timers.
impl Io {
    fn rto(&self) -> Duration {
        let min = Duration::from_millis(self.cfg.rto_min_ms);
        (self.rtt.srtt * 2 + self.rtt.rttvar * 4 + Duration::from_micros(self.cfg.ack_interval_us)).max(min)
    }

    fn nack_tick(&self) -> Duration {
        (Duration::from_micros(self.cfg.nack_min_delay_us) / 2).max(Duration::from_micros(500))
    }

    fn timers(&mut self, now: Instant) {
        self.stamp_timers(now);
        if self.role == Role::Initiator && !self.established {
            if self.last_hello.is_none_or(|t| now >= t + Duration::from_millis(self.cfg.hello_interval_ms)) {
                self.send_hello(now);
            }
            return;
        }
        if !self.established {
            return;
        }
        self.maybe_ack(now);
        if self.rx.has_missing() && now >= self.last_nack_tick + self.nack_tick() {
            self.send_nacks(now);
        }
        if self.tx.rto_deadline(self.rto()).is_some_and(|t| now >= t) && self.tx.on_rto(now) {
            self.tx_stats.rto_probes += 1;
        }
        self.check_silence(now);
    }

    fn stamp_timers(&mut self, now: Instant) {
        let probe = Duration::from_millis(self.cfg.probe_timeout_ms);
        let stamp = Duration::from_millis(self.cfg.stamp_timeout_ms);
        self.net.tracker.expire(now, probe, stamp);
        if self.net.tracker.needs_rearm() {
            match sys::enable_timestamping(self.net.fd()) {
                Ok(()) => self.net.tracker.rearmed(),
                Err(e) => {
                    tracing::warn!("re-arming SO_TIMESTAMPING failed: {e}");
                    self.net.tracker.stamps_refused();
                }
            }
        }
        self.wire_progress();
    }

    /// Acks when due: after `ack_every_datagrams` consumed, an eighth of
    /// the ack interval after a delivered message (so `Acked` is not held
    /// back on an idle link, yet a stream of small messages does not get an
    /// ack each), the ack interval after any other news, and at the
    /// keepalive interval regardless.
    fn maybe_ack(&mut self, now: Instant) {
        let since = now.saturating_duration_since(self.last_ack);
        let due =
            self.rx.ack_due && (self.rx.unacked_consumed >= self.cfg.ack_every_datagrams || since >= self.ack_delay());
        if due || since >= Duration::from_millis(self.cfg.keepalive_interval_ms) {
            self.send_ack(now);
        }
    }

    fn check_silence(&mut self, now: Instant) {
        let silent = now.saturating_duration_since(self.last_rx) >= Duration::from_millis(self.cfg.peer_timeout_ms);
        if silent && !self.peer_silent {
            tracing::warn!("netsync link {:#x}: peer silent for {} ms", self.link_id, self.cfg.peer_timeout_ms);
            self.peer_silent = true;
            self.shared.emit(LinkEvent::PeerSilent);
        }
    }

    fn next_wakeup(&self, now: Instant, stop: Stop) -> Duration {
        if stop == Stop::Batch {
            return Duration::ZERO;
        }
        // When only pacing held back work that is ready, wake when it
        // allows. (A full socket buffer wakes us through POLLOUT, a send
        // error through its backoff, a stamp re-arm through the error
        // queue, new messages and acks through their events.)
        let paced = (stop == Stop::Paced).then(|| self.pacer.wait());
        let mut next = now + paced.unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = next.min(t);
            }
        };
        let probe = Duration::from_millis(self.cfg.probe_timeout_ms);
        at(self.net.tracker.deadline(probe, Duration::from_millis(self.cfg.stamp_timeout_ms)));
        at(self.net.backoff_until);
        if self.role == Role::Initiator && !self.established {
            at(self.last_hello.map(|t| t + Duration::from_millis(self.cfg.hello_interval_ms)));
        }
        if self.established {
            at(Some(self.ack_deadline()));
            at(self.rx.has_missing().then(|| self.last_nack_tick + self.nack_tick()));
            at(self.tx.rto_deadline(self.rto()));
            at(Some(self.last_rx + Duration::from_millis(self.cfg.peer_timeout_ms)).filter(|_| !self.peer_silent));
        }
        next.saturating_duration_since(now)
    }

    /// How long after the last ack pending news is acked.
    fn ack_delay(&self) -> Duration {
        let interval = Duration::from_micros(self.cfg.ack_interval_us);
        if self.delivered_since_ack {
            interval / 8
        } else {
            interval
        }
    }

    fn ack_deadline(&self) -> Instant {
        let keepalive = self.last_ack + Duration::from_millis(self.cfg.keepalive_interval_ms);
        if self.rx.ack_due {
            keepalive.min(self.last_ack + self.ack_delay())
        } else {
            keepalive
        }
    }
}

// Receiving.
impl Io {
    fn receive(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.buf);
        for _ in 0..RX_BATCH {
            match sys::recv(self.net.fd(), &mut buf) {
                Ok(n) if n > buf.len() => self.reject(RejectReason::Truncated),
                Ok(n) => self.on_datagram(&buf[..n], now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The peer's port was closed (ICMP); nothing to read.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => {
                    tracing::warn!("netsync recv failed: {e}");
                    break;
                }
            }
        }
        self.buf = buf;
        self.deliver(now);
    }

    fn on_datagram(&mut self, bytes: &[u8], now: Instant) {
        let key = match &self.auth {
            None => None,
            Some(a) if wire::peek_kind(bytes) == Some(Kind::Hello) => Some(&a.hello_rx),
            Some(a) => match &a.rx {
                Some(k) => Some(k),
                // Keyed, and the peer's nonce is not known yet.
                None => return self.reject(RejectReason::Protocol),
            },
        };
        let d = match wire::decode_keyed(bytes, key) {
            Ok(d) => d,
            Err(e) => return self.reject(reason_of(&e)),
        };
        if d.header.link_id != self.link_id {
            return self.reject(RejectReason::WrongLinkId);
        }
        if let (Some(a), Kind::Ack | Kind::Nack) = (&mut self.auth, d.header.kind) {
            if d.header.seq <= a.ctl_seen {
                return self.reject(RejectReason::Replayed);
            }
            a.ctl_seen = d.header.seq;
        }
        self.heard_from_peer(now);
        let result = match d.header.kind {
            Kind::Hello => self.on_hello(&d.header, d.payload, now),
            Kind::Data => self.rx.on_data(d.header, bytes, now),
            Kind::Repair => self.rx.on_repair(d.payload, now),
            Kind::Ack => self.on_ack(d.payload, now),
            Kind::Nack => self.on_nack(d.payload, now),
        };
        if let Err(reason) = result {
            self.reject(reason);
        }
    }

    fn reject(&mut self, reason: RejectReason) {
        tracing::debug!("netsync link {:#x}: dropped a datagram: {reason:?}", self.link_id);
        self.rejected.count(reason);
    }

    fn heard_from_peer(&mut self, now: Instant) {
        self.last_rx = now;
        if self.peer_silent {
            self.peer_silent = false;
            tracing::info!("netsync link {:#x}: peer back", self.link_id);
            self.shared.emit(LinkEvent::PeerBack);
        }
    }

    fn on_hello(&mut self, header: &Header, payload: &[u8], now: Instant) -> Result<(), RejectReason> {
        let hello = HelloPayload::decode(payload).map_err(|_| RejectReason::BadHeader)?;
        let reply = header.flags & FLAG_REPLY != 0;
        match self.role {
            Role::Initiator if !reply => Err(RejectReason::Protocol),
            Role::Initiator if self.established => Ok(()),
            Role::Initiator => {
                self.establish(&hello);
                Ok(())
            }
            Role::Responder if reply => Err(RejectReason::Protocol),
            Role::Responder if hello.nonce != self.peer_nonce => {
                // Another instance of the initiator on the same address
                // and link id: this link is over. Closing frees the
                // address, so its next hello reaches the listener.
                tracing::warn!("netsync link {:#x}: the peer restarted; closing this link", self.link_id);
                self.shared.close(Some("peer restarted (new hello nonce)".into()));
                Err(RejectReason::Protocol)
            }
            Role::Responder => {
                // Our reply was lost: answer again, at most every half
                // hello interval (a hello flood gets no echo flood).
                let gap = Duration::from_millis(self.cfg.hello_interval_ms) / 2;
                if self.last_hello.is_none_or(|t| now.saturating_duration_since(t) >= gap) {
                    self.send_hello(now);
                }
                Ok(())
            }
        }
    }

    /// Keyed links: takes the peer's nonce from its hello and derives the
    /// direction keys. Returns false if the hello carries none.
    fn key_link(&mut self, hello: &HelloPayload) -> bool {
        let Some(a) = &mut self.auth else { return true };
        let Some(peer) = hello.auth_nonce else { return false };
        let (i2r, r2i) = match self.role {
            Role::Initiator => a.key.directions(self.link_id, &a.nonce, &peer),
            Role::Responder => {
                a.hello_tx = Some(a.key.reply(&peer));
                a.key.directions(self.link_id, &peer, &a.nonce)
            }
        };
        let (tx, rx) = if self.role == Role::Initiator { (i2r, r2i) } else { (r2i, i2r) };
        self.tx.set_key(tx.clone());
        self.rx.set_key(rx.clone());
        a.tx = Some(tx);
        a.rx = Some(rx);
        true
    }

    fn establish(&mut self, hello: &HelloPayload) {
        if !self.key_link(hello) {
            tracing::warn!("netsync link {:#x}: the peer's hello has no authentication nonce", self.link_id);
            self.rejected.count(RejectReason::BadMac);
            return;
        }
        // Both ends take their own max_message_bytes as the limit of what
        // they accept: send no more than the peer does.
        let peer_max = hello.max_message_bytes as usize;
        if peer_max < self.cfg.max_message_bytes {
            tracing::warn!(
                "netsync link {:#x}: the peer accepts messages up to {peer_max} bytes, below our \
                 max_message_bytes {}; send() refuses larger ones",
                self.link_id,
                self.cfg.max_message_bytes
            );
            self.shared.max_send_bytes.fetch_min(peer_max, std::sync::atomic::Ordering::AcqRel);
        }
        self.rx.set_peer(hello);
        self.tx.set_inflight_limit(self.cfg.max_inflight_datagrams.min(u64::from(hello.recv_window_seqs)));
        self.established = true;
    }

    fn on_ack(&mut self, payload: &[u8], now: Instant) -> Result<(), RejectReason> {
        let ack = AckPayload::decode(payload).map_err(|_| RejectReason::BadHeader)?;
        if ack.echo_ts_us != 0 {
            let sample = self.now_us(now).saturating_sub(ack.echo_ts_us).saturating_sub(ack.echo_delay_us.into());
            if sample < 60_000_000 {
                let rtt = Duration::from_micros(sample);
                self.rtt.sample(rtt);
                if let Some(auto) = &mut self.auto {
                    auto.on_rtt(now, rtt);
                }
            }
        }
        self.rtt.peer_ts = Some((ack.ts_us, now));
        let newest = ack.ts_us >= self.peer_ack_ts_us;
        if ack.cum_ack <= self.tx.next_seq() {
            // Before apply_cum_ack frees the datagrams the sample reads.
            let held = if newest { ack.held_upto.max(ack.cum_ack) } else { ack.cum_ack };
            let min_rtt = self.auto.as_ref().and_then(AutoRate::min_rtt).unwrap_or_default();
            if let Some(sample) = self.tx.on_delivered(held, now, min_rtt) {
                if let Some(auto) = &mut self.auto {
                    auto.on_rate_sample(now, sample);
                }
            }
        }
        self.apply_cum_ack(ack.cum_ack, now)?;
        if newest {
            self.peer_ack_ts_us = ack.ts_us;
            self.peer_rx = ack.counters;
            self.tx.set_peer_window(ack.held_upto, ack.window_end);
            self.on_peer_loss(now, ack.highest_seen, ack.counters.received_packets);
        }
        self.update_pacing(now);
        Ok(())
    }

    /// The peer's view of our stream: `seen` data seqs it knows were sent,
    /// `received` of them on their first transmission. The rest were lost
    /// on the path (then rebuilt by FEC, or nacked and retransmitted).
    fn on_peer_loss(&mut self, now: Instant, seen: u64, received: u64) {
        let lost = seen.saturating_sub(received);
        let (last_seen, last_lost) = self.peer_loss;
        if let Some(auto) = &mut self.auto {
            auto.on_loss(seen.saturating_sub(last_seen), lost.saturating_sub(last_lost));
        }
        self.peer_loss = (seen, lost);
        let Some(t) = self.health.on_sample(now, seen, lost) else { return };
        let capacity = self.health.capacity();
        match t.to {
            Health::Degraded => {
                tracing::warn!(
                    "netsync link {:#x}: degraded: loss {:.2}% exceeds what the FEC code repairs ({:.2}%); \
                     on-the-wire no longer means delivered",
                    self.link_id,
                    t.loss * 100.0,
                    capacity * 100.0
                );
                self.shared.emit(LinkEvent::Degraded);
            }
            Health::Healthy => {
                tracing::info!(
                    "netsync link {:#x}: healthy again: loss {:.2}% within the FEC code's {:.2}% for {} ms",
                    self.link_id,
                    t.loss * 100.0,
                    capacity * 100.0,
                    self.cfg.health_hold_ms
                );
                self.shared.emit(LinkEvent::Healthy);
            }
        }
        lock(&self.shared.progress).health = t.to;
        self.shared.progress_cv.notify_all();
    }

    /// `rate = "auto"`: hands the controller's rate to the pacer.
    fn update_pacing(&mut self, now: Instant) {
        let rate = self.auto.as_ref().map_or(self.cfg.rate_bits_per_s, AutoRate::pacing_rate);
        self.pacer.set_rate(rate, now);
    }

    fn on_nack(&mut self, payload: &[u8], now: Instant) -> Result<(), RejectReason> {
        if !self.nack_limit.allow(now) {
            return Err(RejectReason::NackFlood);
        }
        let nack = NackPayload::decode(payload).map_err(|_| RejectReason::BadHeader)?;
        self.apply_cum_ack(nack.cum_ack, now)?;
        let min_gap = (self.rtt.srtt / 2).max(Duration::from_millis(1));
        let (queued, outside) = self.tx.on_nack(&nack.ranges, now, min_gap);
        self.tx_stats.nacks_received += 1;
        self.tx_stats.nacked_seqs_received += queued;
        if outside > 0 {
            return Err(RejectReason::SeqOutOfWindow);
        }
        Ok(())
    }

    fn apply_cum_ack(&mut self, cum_ack: u64, now: Instant) -> Result<(), RejectReason> {
        let released = self.tx.on_ack(cum_ack, now).map_err(|()| RejectReason::SeqOutOfWindow)?;
        if !released.advanced {
            return Ok(());
        }
        // On-the-wire is reported before acked, always.
        if let Some(w) = self.net.tracker.on_acked(cum_ack) {
            self.set_wire(w);
        }
        if let Some(id) = released.acked_msg {
            let mut out = lock(&self.shared.out);
            out.used_bytes = out.used_bytes.saturating_sub(released.bytes);
            drop(out);
            self.shared.out_cv.notify_all();
            lock(&self.shared.progress).acked_upto = id;
            self.shared.progress_cv.notify_all();
            self.shared.emit(LinkEvent::Acked(id));
        }
        Ok(())
    }

    /// Moves in-order data into the inbox, then acks if due.
    fn deliver(&mut self, now: Instant) {
        if !self.rx.has_peer() {
            return;
        }
        let mut inbox = lock(&self.shared.inbox);
        let mut delivered = 0;
        loop {
            match self.rx.consume(&mut inbox) {
                Ok(n) => {
                    delivered += n;
                    break;
                }
                Err(reason) => self.rejected.count(reason),
            }
        }
        drop(inbox);
        if delivered > 0 {
            self.shared.inbox_cv.notify_all();
        }
        if self.established {
            self.delivered_since_ack |= delivered > 0;
            // A reopened window is advertised at once.
            if self.window_reopened() {
                self.rx.ack_due = true;
                self.rx.unacked_consumed = u32::MAX;
            }
            self.maybe_ack(now);
        }
    }

    /// Whether the receive window grew by a quarter of its size since it
    /// was last advertised: tell the peer now rather than at the next
    /// keepalive.
    fn window_reopened(&mut self) -> bool {
        self.rx.set_inbox_bytes(lock(&self.shared.inbox).bytes);
        let grown = self.rx.window_end().saturating_sub(self.last_window_end);
        grown > 0 && grown >= self.rx.max_window_seqs() / 4
    }

    fn read_stamps(&mut self) {
        loop {
            match sys::read_errqueue(self.net.fd()) {
                Ok(Some(Some(stamp))) => self.net.tracker.on_stamp(stamp),
                Ok(Some(None)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("netsync error queue read failed: {e}");
                    break;
                }
            }
        }
        self.wire_progress();
    }

    fn wire_progress(&mut self) {
        if let Some(w) = self.net.tracker.advance() {
            self.set_wire(w);
        }
    }

    fn set_wire(&mut self, upto: u64) {
        lock(&self.shared.progress).wire_upto = upto;
        self.shared.progress_cv.notify_all();
        self.shared.emit(LinkEvent::OnWire(upto));
    }
}

fn reason_of(e: &DatagramError) -> RejectReason {
    if e.is_truncated() {
        RejectReason::Truncated
    } else if e.is_bad_crc() {
        RejectReason::BadCrc
    } else if matches!(e, DatagramError::BadMac | DatagramError::MissingMac) {
        RejectReason::BadMac
    } else {
        RejectReason::BadHeader
    }
}

// Stats.
impl Io {
    fn publish(&mut self, now: Instant, force: bool) {
        if !force && now.saturating_duration_since(self.last_publish) < PUBLISH_EVERY {
            return;
        }
        self.last_publish = now;
        let snapshot = self.snapshot(now);
        *lock(&self.shared.stats) = snapshot;
    }

    fn snapshot(&self, now: Instant) -> LinkStats {
        let mut tx = self.tx_stats;
        let progress = lock(&self.shared.progress);
        (tx.msgs_on_wire, tx.msgs_acked) = (progress.wire_upto, progress.acked_upto);
        drop(progress);
        let out = lock(&self.shared.out);
        (tx.msgs_sent, tx.window_used_bytes) = (out.next_id - 1, out.used_bytes);
        drop(out);
        tx.bytes_sent = self.net.bytes_sent;
        tx.send_errors = self.net.send_errors;
        tx.inflight_datagrams = self.tx.inflight();
        tx.pacing_rate_bits_per_s = self.pacer.rate_bits_per_s();
        if let Some(auto) = &self.auto {
            tx.rate_phase = auto.phase().as_str();
            tx.delivery_rate_bits_per_s = auto.delivery_rate();
            tx.min_rtt_us = auto.min_rtt().map_or(0, |d| d.as_micros() as u64);
            tx.rate_backoffs = auto.backoffs();
        }
        let tracker = &self.net.tracker;
        (tx.wire_latency_p50_us, tx.wire_latency_avg_us) = (tracker.latency().p50_us(), tracker.latency().avg_us());
        (tx.tx_stamps_missing, tx.wire_implied_by_ack) = (tracker.stamps_missing, tracker.implied_by_ack);
        let mut rx = self.rx.stats;
        rx.inbox_bytes = lock(&self.shared.inbox).bytes as u64;
        rx.reorder_bytes = self.rx.store_bytes() as u64;
        if rx.highest_seq > 0 {
            rx.loss_rate = 1.0 - (rx.first_arrivals.min(rx.highest_seq) as f64 / rx.highest_seq as f64);
        }
        let silent = now.saturating_duration_since(self.last_rx) >= Duration::from_millis(self.cfg.peer_timeout_ms);
        LinkStats {
            link_id: self.link_id,
            connected: self.established && !silent,
            wire_mode: tracker.mode(),
            explicit_stamp_ids: tracker.explicit_ids() && tracker.mode() == WireMode::TxTimestamp,
            srtt_us: self.rtt.srtt.as_micros() as u64,
            tx,
            rx,
            peer_rx: self.peer_rx,
            rejected: self.rejected,
            health: self.health.state(),
            loss: self.health.loss(),
            fec_capacity: self.health.capacity(),
            degradations: self.health.degradations(),
        }
    }
}
