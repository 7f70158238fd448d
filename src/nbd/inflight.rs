//! Requests in flight: the engine's completer for the NBD frontend, and
//! the per-connection reply queue with its in-flight limit.
//!
//! Completions run on engine threads, possibly under the engine lock, so
//! they only copy read data and push the reply onto the connection's
//! channel; the connection's writer thread does the socket I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crossbeam::channel::Sender;

use super::proto;
use crate::engine::{Completer, IoResult};

/// One reply for the writer thread.
pub(super) struct Reply {
    /// The client's handle.
    pub cookie: u64,
    /// NBD error value (0 = success).
    pub error: u32,
    /// Read data, on success of a read.
    pub data: Option<Vec<u8>>,
}

/// Bounds the requests a connection has in flight: the reader takes a
/// credit per request, the writer returns it once the reply is written.
/// This bounds the replies (and read data) queued per connection.
pub(super) struct Credits {
    used: Mutex<usize>,
    changed: Condvar,
    max: usize,
}

impl Credits {
    pub fn new(max: usize) -> Credits {
        Credits { used: Mutex::new(0), changed: Condvar::new(), max }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free slot and takes it.
    pub fn acquire(&self) {
        let mut used = self.lock();
        while *used >= self.max {
            used = self.changed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
    }

    /// Returns `n` slots.
    pub fn release(&self, n: usize) {
        let mut used = self.lock();
        *used = used.saturating_sub(n);
        self.changed.notify_all();
    }

    /// Waits until every request taken has been answered.
    pub fn wait_idle(&self) {
        let mut used = self.lock();
        while *used > 0 {
            used = self.changed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The reply side of one connection.
pub(super) struct ReplyQueue {
    tx: Sender<Reply>,
    credits: Arc<Credits>,
}

impl ReplyQueue {
    pub fn new(tx: Sender<Reply>, credits: Arc<Credits>) -> ReplyQueue {
        ReplyQueue { tx, credits }
    }

    /// The connection's in-flight limit.
    pub fn credits(&self) -> &Credits {
        &self.credits
    }

    /// Queues a reply for the writer. The channel is unbounded (the credits
    /// bound it), so this never blocks an engine thread.
    pub fn send(&self, r: Reply) {
        if self.tx.send(r).is_err() {
            // The writer is gone; nothing will return this credit.
            self.credits.release(1);
        }
    }
}

/// One NBD request, submitted to the engine as one or more parts (a long
/// trim or write-zeroes is split into engine-sized ranges). The reply goes
/// out when the last part completes, with the first error seen.
pub(super) struct InFlight {
    cookie: u64,
    /// For reads: the length the reply must carry.
    read_len: Option<u32>,
    parts_left: AtomicUsize,
    error: AtomicU32,
    queue: Arc<ReplyQueue>,
}

impl InFlight {
    pub fn new(cookie: u64, read_len: Option<u32>, parts: usize, queue: Arc<ReplyQueue>) -> InFlight {
        InFlight { cookie, read_len, parts_left: AtomicUsize::new(parts), error: AtomicU32::new(0), queue }
    }

    fn part_done(&self, result: IoResult<'_>) {
        let data = match result {
            Ok(d) => d.map(<[u8]>::to_vec),
            Err(e) => {
                let _ =
                    self.error.compare_exchange(0, proto::nbd_errno(e.to_errno()), Ordering::AcqRel, Ordering::Acquire);
                None
            }
        };
        if self.parts_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut error = self.error.load(Ordering::Acquire);
        let got = data.as_ref().map(Vec::len);
        if error == 0 && self.read_len.is_some_and(|n| got != Some(n as usize)) {
            // A simple reply's payload length is implied by the request;
            // sending any other length would desynchronise the client.
            tracing::error!(cookie = self.cookie, expected = ?self.read_len, ?got, "engine read returned the wrong length");
            error = proto::EIO;
        }
        let data = if error == 0 { data } else { None };
        self.queue.send(Reply { cookie: self.cookie, error, data });
    }
}

/// The engine's completer for the NBD frontend: maps engine tokens to the
/// requests in flight on every connection.
#[derive(Default)]
pub struct Router {
    pending: Mutex<HashMap<u64, Arc<InFlight>>>,
    next_token: AtomicU64,
}

impl Router {
    /// A router with nothing in flight.
    pub fn new() -> Arc<Router> {
        Arc::new(Router::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<InFlight>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `parts` tokens for `req`, before any is submitted (a
    /// completion may arrive before `submit` returns); returns the first.
    pub(super) fn register(&self, req: &Arc<InFlight>, parts: usize) -> u64 {
        let first = self.next_token.fetch_add(parts as u64, Ordering::Relaxed);
        let mut g = self.lock();
        for t in first..first + parts as u64 {
            g.insert(t, req.clone());
        }
        first
    }
}

impl Completer for Router {
    fn complete(&self, token: u64, result: IoResult<'_>) {
        let req = self.lock().remove(&token);
        match req {
            Some(r) => r.part_done(result),
            None => tracing::error!(token, "NBD: completion for an unknown token"),
        }
    }
}
