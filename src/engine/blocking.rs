//! A blocking front end over the asynchronous engine, for tests and tools.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{Completer, IoError, IoResult, Request, Volume};

/// Completer that parks each caller until its token completes.
#[derive(Default)]
pub struct Waiters {
    done: Mutex<HashMap<u64, Result<Vec<u8>, IoError>>>,
    cond: Condvar,
    next: AtomicU64,
}

impl Completer for Waiters {
    fn complete(&self, token: u64, result: IoResult<'_>) {
        let r = result.map(|d| d.map(|d| d.to_vec()).unwrap_or_default());
        self.done.lock().expect(crate::POISONED).insert(token, r);
        self.cond.notify_all();
    }
}

impl Waiters {
    /// Submits `req` on `vol` and waits for its result (read data or empty).
    pub fn call(&self, vol: &Volume, req: Request<'_>) -> Result<Vec<u8>, IoError> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        vol.submit(token, req);
        let mut g = self.done.lock().expect(crate::POISONED);
        loop {
            if let Some(r) = g.remove(&token) {
                return r;
            }
            g = self.cond.wait(g).expect(crate::POISONED);
        }
    }
}

/// A volume plus its blocking completer.
#[derive(Clone)]
pub struct BlockingVolume {
    /// The engine.
    pub volume: Volume,
    /// Its completer.
    pub waiters: Arc<Waiters>,
}

impl BlockingVolume {
    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.waiters.call(&self.volume, Request::Read { offset, len })
    }
    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.waiters.call(&self.volume, Request::Write { offset, data, fua: false }).map(drop)
    }
    /// Flushes.
    pub fn flush(&self) -> Result<(), IoError> {
        self.waiters.call(&self.volume, Request::Flush).map(drop)
    }
}
