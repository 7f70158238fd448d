//! State shared between the application's [`crate::Link`] handle and the
//! link's I/O thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crossbeam::channel::Sender;

use crate::config::LinkConfig;
use crate::rx::Inbox;
use crate::stats::LinkStats;
use crate::sys::EventFd;
use crate::tx::OutMsg;

/// A message id: 1 for the first message `send` accepts, then +1 each.
pub type MsgId = u64;

/// What the link tells the application (see [`crate::Link::events`]).
/// `OnWire` and `Acked` are cumulative: `OnWire(n)` means every message up
/// to `n` is on the wire, and `OnWire(n)` always comes before `Acked(n)`.
/// The channel is bounded; when the application falls behind, events are
/// dropped, and a later cumulative event covers a dropped one
/// ([`crate::Link::wire_upto`] and [`crate::Link::acked_upto`] always tell
/// the current state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The handshake completed and the wire mode is decided (the TX
    /// timestamp probe answered or timed out); data flows from now on.
    Established,
    /// Every message up to this id, and every repair datagram covering it,
    /// is on the wire (see [`crate::WireMode`] for what that means).
    OnWire(MsgId),
    /// Every message up to this id was delivered to the peer's inbox.
    Acked(MsgId),
    /// Nothing heard from the peer for `peer_timeout_ms`.
    PeerSilent,
    /// The peer was heard from again after `PeerSilent`.
    PeerBack,
    /// The loss on the path exceeds what the FEC code repairs
    /// ([`crate::Health::Degraded`]): an on-the-wire report no longer
    /// means the peer will get the message if the link is cut now.
    Degraded,
    /// The loss is back within the code's capacity (for the hold time).
    Healthy,
}

/// The send queue and window accounting.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    pub msgs: VecDeque<OutMsg>,
    /// Window bytes in use: queued plus sent and unacknowledged.
    pub used_bytes: u64,
    pub next_id: MsgId,
    pub closed: bool,
}

/// Progress the blocking waits look at.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub established: bool,
    pub wire_upto: MsgId,
    pub acked_upto: MsgId,
    pub health: crate::health::Health,
    pub closed: bool,
    pub error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: LinkConfig,
    pub out: Mutex<OutQueue>,
    pub out_cv: Condvar,
    pub inbox: Mutex<Inbox>,
    pub inbox_cv: Condvar,
    pub progress: Mutex<Progress>,
    pub progress_cv: Condvar,
    pub stats: Mutex<LinkStats>,
    pub wake: EventFd,
    pub events: Sender<LinkEvent>,
    /// Set by `close`/drop: the I/O thread exits at its next wake.
    pub closing: AtomicBool,
    /// Largest message `send` takes: ours, and once the peer's hello is
    /// in, no more than the peer accepts.
    pub max_send_bytes: AtomicUsize,
}

/// Locks a mutex, recovering the data if a thread panicked holding it: the
/// state is plain counters and queues, consistent at every unlock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect(crate::POISONED)
}

impl Shared {
    pub(crate) fn new(cfg: LinkConfig, wake: EventFd, events: Sender<LinkEvent>) -> Shared {
        Shared {
            out: Mutex::new(OutQueue { next_id: 1, ..OutQueue::default() }),
            out_cv: Condvar::new(),
            inbox: Mutex::new(Inbox::default()),
            inbox_cv: Condvar::new(),
            progress: Mutex::new(Progress::default()),
            progress_cv: Condvar::new(),
            stats: Mutex::new(LinkStats::default()),
            wake,
            events,
            max_send_bytes: AtomicUsize::new(cfg.max_message_bytes),
            closing: AtomicBool::new(false),
            cfg,
        }
    }

    /// Sends an event unless the channel is full (see [`LinkEvent`]).
    pub(crate) fn emit(&self, ev: LinkEvent) {
        let _ = self.events.try_send(ev);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Marks the link closed for every waiter, with the error if any.
    pub(crate) fn close(&self, error: Option<String>) {
        self.closing.store(true, Ordering::Release);
        lock(&self.out).closed = true;
        self.out_cv.notify_all();
        lock(&self.inbox).closed = true;
        self.inbox_cv.notify_all();
        let mut p = lock(&self.progress);
        p.closed = true;
        if p.error.is_none() {
            p.error = error;
        }
        drop(p);
        self.progress_cv.notify_all();
        self.wake.wake();
    }
}
