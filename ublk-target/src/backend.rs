//! The boundary between the ublk frontend and whatever stores the data.

use crate::completion::Completion;
use crate::request::BlockRequest;

/// What the ublk queues call for every request. The starblk engine
/// implements it; [`crate::MemBackend`] is a small one for tests.
///
/// `submit` runs on a ublk queue thread, which also serves every other
/// request of that queue, so it must return quickly:
/// - never block on the network or a disk; hand the work off and return;
/// - copy a WRITE's `data` before returning, or keep the [`Completion`]
///   and read the payload with [`Completion::write_data`] later;
/// - deliver READ data into [`Completion::read_buf`] (or
///   [`Completion::complete_read`]);
/// - complete exactly once, from any thread, possibly inside `submit`.
///
/// Back-pressure (docs/semantics.md §7) is simply not completing: the kernel never
/// has more than `queue_depth` requests per queue in flight.
pub trait BlockBackend: Send + Sync + 'static {
    /// Starts one request. Must not block. `done` is completed exactly once.
    fn submit(&self, req: BlockRequest<'_>, done: Completion);
}

impl<B: BlockBackend + ?Sized> BlockBackend for std::sync::Arc<B> {
    fn submit(&self, req: BlockRequest<'_>, done: Completion) {
        (**self).submit(req, done)
    }
}

impl<B: BlockBackend + ?Sized> BlockBackend for Box<B> {
    fn submit(&self, req: BlockRequest<'_>, done: Completion) {
        (**self).submit(req, done)
    }
}
