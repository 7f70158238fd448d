//! The ublk frontend adapter: implements `starblk_ublk::BlockBackend` on
//! top of the engine. Each in-flight ublk request parks its `Completion` in
//! a slot indexed by (queue, tag); the engine completes the slot's token.
//! Submission never waits on the network (it may wait for write-queue
//! space, which is the backpressure of docs/semantics.md §7).

use std::sync::{Arc, Mutex};

use starblk_ublk::{BlockBackend, BlockRequest, Completion, Error as UblkError};

use crate::engine::{Completer, IoError, IoResult, Request, Volume};

/// Completion slots, one per (queue, tag).
pub struct Slots {
    slots: Vec<Mutex<Option<Completion>>>,
    depth: usize,
    size_bytes: u64,
}

impl Slots {
    /// Slots for `queues` × `depth` requests on a volume of `size_bytes`.
    pub fn new(queues: usize, depth: usize, size_bytes: u64) -> Arc<Slots> {
        let slots = (0..queues * depth).map(|_| Mutex::new(None)).collect();
        Arc::new(Slots { slots, depth, size_bytes })
    }

    fn token(&self, c: &Completion) -> Option<usize> {
        let t = c.queue_id() as usize * self.depth + c.tag() as usize;
        (t < self.slots.len()).then_some(t)
    }

    fn map_err(&self, e: IoError) -> UblkError {
        match e {
            IoError::OutOfRange { offset, len } => UblkError::OutOfRange { offset, len, size: self.size_bytes },
            IoError::ReadOnly => UblkError::ReadOnly,
            other => UblkError::Io(other.to_string()),
        }
    }
}

impl Completer for Slots {
    fn complete(&self, token: u64, result: IoResult<'_>) {
        let slot = self.slots.get(token as usize).and_then(|s| s.lock().expect(crate::POISONED).take());
        let Some(c) = slot else {
            tracing::error!(token, "completion for an empty ublk slot");
            return;
        };
        match result {
            Ok(Some(data)) => c.complete_read(data),
            Ok(None) => c.complete(Ok(())),
            Err(e) => c.complete(Err(self.map_err(e))),
        }
    }
}

/// The engine as a ublk backend.
pub struct EngineBackend {
    /// The volume.
    pub volume: Volume,
    /// Its completer.
    pub slots: Arc<Slots>,
}

impl BlockBackend for EngineBackend {
    fn submit(&self, req: BlockRequest<'_>, done: Completion) {
        let Some(token) = self.slots.token(&done) else {
            return done.complete(Err(UblkError::Io("ublk tag outside the slot table".into())));
        };
        let req = match req {
            BlockRequest::Read { offset, len } => Request::Read { offset, len },
            BlockRequest::Write { offset, data, fua } => Request::Write { offset, data, fua },
            BlockRequest::Flush => Request::Flush,
            BlockRequest::Discard { offset, len } => match u32::try_from(len) {
                Ok(len) => Request::Discard { offset, len },
                Err(_) => {
                    return done.complete(Err(UblkError::OutOfRange { offset, len, size: self.slots.size_bytes }))
                }
            },
            BlockRequest::WriteZeroes { offset, len, .. } => match u32::try_from(len) {
                Ok(len) => Request::WriteZeroes { offset, len },
                Err(_) => {
                    return done.complete(Err(UblkError::OutOfRange { offset, len, size: self.slots.size_bytes }))
                }
            },
        };
        // The slot must hold the completion before the engine can finish it.
        let prev = self.slots.slots[token].lock().expect(crate::POISONED).replace(done);
        debug_assert!(prev.is_none(), "ublk tag reused while in flight");
        self.volume.submit(token as u64, req);
    }
}
