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
use starblk_replica::proto::MAX_IO_BYTES;

/// One reply for the writer thread.
pub(super) struct Reply {
    /// The client's handle.
    pub cookie: u64,
    /// NBD error value (0 = success).
    pub error: u32,
    /// Read data, on success of a read.
    pub data: Option<Vec<u8>>,
    /// Credits to return once the reply is written.
    pub credits: usize,
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
        self.used.lock().expect(crate::POISONED)
    }

    /// Waits until `n` slots are free and takes them (`n` at most `max`).
    pub fn acquire(&self, n: usize) {
        let n = n.min(self.max);
        let mut used = self.lock();
        while *used + n > self.max {
            used = self.changed.wait(used).expect(crate::POISONED);
        }
        *used += n;
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
            used = self.changed.wait(used).expect(crate::POISONED);
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
        if let Err(e) = self.tx.send(r) {
            // The writer is gone; nothing will return these credits.
            self.credits.release(e.0.credits);
        }
    }
}

/// One NBD request, submitted to the engine as one or more parts (a read
/// or write longer than the engine's largest I/O, or a long trim or
/// write-zeroes, is split into engine-sized ranges). The reply goes out
/// when the last part completes, with the first error seen.
pub(super) struct InFlight {
    cookie: u64,
    /// For reads: the length the reply must carry.
    read_len: Option<u32>,
    /// Credits the request holds, returned once its reply is written.
    credits: usize,
    parts: usize,
    parts_left: AtomicUsize,
    error: AtomicU32,
    /// A read's data as its parts complete (part `i` at `i * MAX_IO_BYTES`).
    data: Mutex<Vec<u8>>,
    queue: Arc<ReplyQueue>,
}

impl InFlight {
    pub fn new(cookie: u64, read_len: Option<u32>, parts: usize, queue: Arc<ReplyQueue>, credits: usize) -> InFlight {
        InFlight {
            cookie,
            read_len,
            credits,
            parts,
            parts_left: AtomicUsize::new(parts),
            error: AtomicU32::new(0),
            data: Mutex::new(Vec::new()),
            queue,
        }
    }

    fn fail(&self, error: u32) {
        let _ = self.error.compare_exchange(0, error, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Keeps read part `part`'s data. A single part is the whole reply; a
    /// part of a split read is copied to its place, and one of the wrong
    /// length fails the request (its reply would be misplaced).
    fn store(&self, part: usize, d: &[u8]) {
        let Some(total) = self.read_len.map(|n| n as usize) else {
            return;
        };
        let mut buf = self.data.lock().expect(crate::POISONED);
        if self.parts == 1 {
            *buf = d.to_vec();
            return;
        }
        let at = part * MAX_IO_BYTES as usize;
        let want = total.saturating_sub(at).min(MAX_IO_BYTES as usize);
        if d.len() != want {
            tracing::error!(
                cookie = self.cookie,
                part,
                expected = want,
                got = d.len(),
                "engine read piece has the wrong length"
            );
            return self.fail(proto::EIO);
        }
        if buf.is_empty() {
            buf.resize(total, 0);
        }
        buf[at..at + want].copy_from_slice(d);
    }

    fn part_done(&self, part: usize, result: IoResult<'_>) {
        match result {
            Ok(Some(d)) => self.store(part, d),
            Ok(None) => {}
            Err(e) => self.fail(proto::nbd_errno(e.to_errno())),
        }
        if self.parts_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut error = self.error.load(Ordering::Acquire);
        let data = self.read_len.map(|_| std::mem::take(&mut *self.data.lock().expect(crate::POISONED)));
        let got = data.as_ref().map(Vec::len);
        if error == 0 && self.read_len.is_some_and(|n| got != Some(n as usize)) {
            // A simple reply's payload length is implied by the request;
            // sending any other length would desynchronise the client.
            tracing::error!(cookie = self.cookie, expected = ?self.read_len, ?got, "engine read returned the wrong length");
            error = proto::EIO;
        }
        let data = if error == 0 { data } else { None };
        self.queue.send(Reply { cookie: self.cookie, error, data, credits: self.credits });
    }
}

/// The engine's completer for the NBD frontend: maps engine tokens to the
/// requests in flight on every connection.
#[derive(Default)]
pub struct Router {
    /// Engine token to the request and the index of its part.
    pending: Mutex<HashMap<u64, (Arc<InFlight>, usize)>>,
    next_token: AtomicU64,
}

impl Router {
    /// A router with nothing in flight.
    pub fn new() -> Arc<Router> {
        Arc::new(Router::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Arc<InFlight>, usize)>> {
        self.pending.lock().expect(crate::POISONED)
    }

    /// Registers `parts` tokens for `req`, before any is submitted (a
    /// completion may arrive before `submit` returns); returns the first.
    pub(super) fn register(&self, req: &Arc<InFlight>, parts: usize) -> u64 {
        let first = self.next_token.fetch_add(parts as u64, Ordering::Relaxed);
        let mut g = self.lock();
        for (part, t) in (first..first + parts as u64).enumerate() {
            g.insert(t, (req.clone(), part));
        }
        first
    }
}

impl Completer for Router {
    fn complete(&self, token: u64, result: IoResult<'_>) {
        let req = self.lock().remove(&token);
        match req {
            Some((r, part)) => r.part_done(part, result),
            None => tracing::error!(token, "NBD: completion for an unknown token"),
        }
    }
}
