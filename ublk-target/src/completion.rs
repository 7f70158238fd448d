//! Per-tag completion slots: how a backend thread hands a result back to
//! the queue thread without the queue thread ever blocking.
//!
//! Each queue owns one [`QueueShared`]: a preallocated slot per tag (state,
//! result, waker, and the tag's data buffer) plus a doorbell eventfd. A
//! request in flight is represented by exactly one [`Completion`]. Completing
//! it stores the result, wakes the tag's async task and, if that task was
//! parked, rings the doorbell so the queue thread leaves its io_uring wait.
//! Nothing here allocates per I/O: the `Arc` clone in a `Completion` is a
//! reference-count increment.

use crate::error::{Error, Result};
use crate::request::Decoded;
use atomic_waker::AtomicWaker;
use libublk::helpers::IoBuf;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Slot states. A slot only moves IDLE → INFLIGHT (queue thread) →
/// DONE (any thread, once) → IDLE (queue thread).
const IDLE: u8 = 0;
const INFLIGHT: u8 = 1;
const DONE: u8 = 2;

/// One tag's completion slot and data buffer.
struct TagSlot {
    state: AtomicU8,
    result: AtomicI32,
    waker: AtomicWaker,
    /// The ublk I/O buffer of this tag: the kernel copies WRITE data in
    /// before handing us the request and copies READ data out at commit.
    buf: IoBuf<u8>,
}

/// The state a queue shares with the completions of its requests.
pub(crate) struct QueueShared {
    qid: u16,
    slots: Box<[TagSlot]>,
    pub(crate) doorbell: Doorbell,
}

impl QueueShared {
    /// Preallocates `depth` slots with `buf_bytes` of I/O buffer each.
    pub(crate) fn new(qid: u16, depth: u16, buf_bytes: u32) -> Result<Arc<QueueShared>> {
        if depth == 0 || buf_bytes == 0 {
            return Err(Error::InvalidOption("queue depth and max_io_bytes must be > 0".into()));
        }
        let slots = (0..depth)
            .map(|_| TagSlot {
                state: AtomicU8::new(IDLE),
                result: AtomicI32::new(0),
                waker: AtomicWaker::new(),
                buf: IoBuf::new(buf_bytes as usize),
            })
            .collect();
        Ok(Arc::new(QueueShared { qid, slots, doorbell: Doorbell::new()? }))
    }

    fn slot(&self, tag: u16) -> &TagSlot {
        &self.slots[usize::from(tag)]
    }

    /// The tag's I/O buffer, for registering it with libublk.
    pub(crate) fn io_buf(&self, tag: u16) -> &IoBuf<u8> {
        &self.slot(tag).buf
    }

    /// Marks `tag` in flight and returns the one completion for it.
    ///
    /// Only the queue thread calls this, and only after the previous
    /// completion of the tag was awaited, so at most one `Completion` per
    /// tag exists at a time: that is what makes its buffer access sound.
    pub(crate) fn start(self: &Arc<Self>, tag: u16, req: Decoded) -> Completion {
        let prev = self.slot(tag).state.swap(INFLIGHT, Ordering::Relaxed);
        debug_assert_eq!(prev, IDLE, "tag {tag} started twice");
        Completion { queue: Arc::clone(self), tag, req, finished: false }
    }

    /// The future the tag's task awaits; yields the result for the kernel.
    pub(crate) fn wait(&self, tag: u16) -> WaitDone<'_> {
        WaitDone { slot: self.slot(tag) }
    }

    /// The first `len` bytes of the tag buffer, read-only.
    ///
    /// # Safety
    /// The caller must hold the tag's in-flight request (its `Completion`
    /// or the queue task that created it), so no one writes the buffer.
    pub(crate) unsafe fn data(&self, tag: u16, len: usize) -> &[u8] {
        let buf = &self.slot(tag).buf;
        let len = len.min(buf.len());
        // SAFETY: the pointer is the start of a live allocation of
        // buf.len() bytes (kept alive by &self), len is clamped to it, and
        // the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(buf.as_ptr(), len) }
    }

    /// The first `len` bytes of the tag buffer, writable.
    ///
    /// # Safety
    /// As for [`Self::data`], and the caller must be the only one holding
    /// any view of this tag's buffer for the returned lifetime.
    #[allow(clippy::mut_from_ref)]
    unsafe fn data_mut(&self, tag: u16, len: usize) -> &mut [u8] {
        let buf = &self.slot(tag).buf;
        let len = len.min(buf.len());
        // SAFETY: as in `data`; exclusivity is the caller's contract, which
        // Completion upholds by being the single owner of an in-flight tag.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), len) }
    }
}

/// Wakes the queue thread out of its io_uring wait. An eventfd the queue
/// keeps a POLL_ADD on; `rung` coalesces many completions into one write.
pub(crate) struct Doorbell {
    fd: OwnedFd,
    rung: AtomicBool,
}

impl Doorbell {
    fn new() -> Result<Doorbell> {
        // SAFETY: plain syscall with constant flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os("eventfd"));
        }
        // SAFETY: fd was just returned by eventfd and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Doorbell { fd, rung: AtomicBool::new(false) })
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Called by a completing thread after it woke a parked task.
    fn ring(&self) {
        // AcqRel: the wake that preceded this is visible to whoever
        // observes `rung` (see `rearm`).
        if self.rung.swap(true, Ordering::AcqRel) {
            return; // a ring is already pending; the queue will run our task
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let n = unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
        if n != 8 {
            tracing::warn!(err = %std::io::Error::last_os_error(), "doorbell write failed");
        }
    }

    /// Called on the queue thread after the POLL_ADD fired. Drains the
    /// counter first and only then clears `rung`: a completion that comes
    /// in between sees `rung` still set, skips the write, and its wake is
    /// already queued in the executor, which the queue runs right after.
    pub(crate) fn rearm(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own
        // non-blocking eventfd; EAGAIN just means it was already drained.
        unsafe { libc::read(self.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        self.rung.swap(false, Ordering::AcqRel);
    }
}

/// The future a tag's task awaits after submitting to the backend.
pub(crate) struct WaitDone<'a> {
    slot: &'a TagSlot,
}

impl WaitDone<'_> {
    fn take_done(&self) -> Option<i32> {
        let s = &self.slot.state;
        s.compare_exchange(DONE, IDLE, Ordering::Acquire, Ordering::Relaxed).ok()?;
        // Drop the registered waker so the next request of this tag does
        // not ring the doorbell for a task that is not parked.
        drop(self.slot.waker.take());
        Some(self.slot.result.load(Ordering::Relaxed))
    }
}

impl Future for WaitDone<'_> {
    type Output = i32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        if let Some(r) = self.take_done() {
            return Poll::Ready(r);
        }
        self.slot.waker.register(cx.waker());
        // Re-check: a completion between the first check and register()
        // found no waker to wake.
        match self.take_done() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// The one handle to an in-flight request. Complete it exactly once, from
/// any thread; dropping it without completing fails the request with EIO.
pub struct Completion {
    queue: Arc<QueueShared>,
    tag: u16,
    req: Decoded,
    finished: bool,
}

impl Completion {
    /// Completes the request. `Ok` means: READ data is in [`Self::read_buf`],
    /// WRITE/FLUSH/DISCARD/WRITE_ZEROES are done as their semantics require.
    pub fn complete(mut self, res: Result<()>) {
        self.finish(res);
    }

    /// Copies `data` into the request's buffer and completes it; fails the
    /// request when `data` is not exactly the requested length.
    pub fn complete_read(mut self, data: &[u8]) {
        let want = self.req.buf_len();
        if !self.req.is_read() || data.len() != want {
            let got = data.len();
            return self.finish(Err(Error::ShortRead { want, got }));
        }
        self.read_buf().copy_from_slice(data);
        self.finish(Ok(()));
    }

    /// Where a READ's data goes: exactly the requested length (empty for
    /// other ops). Fill it, then [`Self::complete`] with `Ok(())`.
    pub fn read_buf(&mut self) -> &mut [u8] {
        let len = if self.req.is_read() { self.req.buf_len() } else { 0 };
        // SAFETY: this Completion is the single owner of the in-flight tag
        // (QueueShared::start), the kernel does not touch the buffer until
        // the result is committed, and &mut self makes the view exclusive.
        unsafe { self.queue.data_mut(self.tag, len) }
    }

    /// A WRITE's payload, valid until this completion is completed (empty
    /// for other ops). Lets a backend defer its copy past `submit`.
    pub fn write_data(&self) -> &[u8] {
        let len = if self.req.is_write() { self.req.buf_len() } else { 0 };
        // SAFETY: the tag is in flight and owned by this Completion; for a
        // WRITE nobody writes the buffer until the request is committed.
        unsafe { self.queue.data(self.tag, len) }
    }

    /// The ublk tag of the request (unique per queue while in flight).
    pub fn tag(&self) -> u16 {
        self.tag
    }

    /// The hardware queue the request came from.
    pub fn queue_id(&self) -> u16 {
        self.queue.qid
    }

    fn finish(&mut self, res: Result<()>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let value = match res {
            Ok(()) => self.req.success_result(),
            Err(e) => {
                tracing::debug!(tag = self.tag, req = ?self.req, error = %e, "request failed");
                e.to_errno()
            }
        };
        let slot = self.queue.slot(self.tag);
        slot.result.store(value, Ordering::Relaxed);
        slot.state.store(DONE, Ordering::Release);
        // No waker means the task has not parked on this request yet: it is
        // still between submit and its first poll and will see DONE.
        if let Some(w) = slot.waker.take() {
            w.wake();
            self.queue.doorbell.ring();
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!(tag = self.tag, "backend dropped a completion; failing the request");
            self.finish(Err(Error::Dropped));
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("queue", &self.queue.qid)
            .field("tag", &self.tag)
            .field("req", &self.req)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn read_req(len: u32) -> Decoded {
        Decoded::Read { offset: 0, len }
    }

    fn doorbell_pending(q: &QueueShared) -> bool {
        let mut v: u64 = 0;
        // SAFETY: test reads 8 bytes from the non-blocking eventfd.
        let n = unsafe { libc::read(q.doorbell.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8
    }

    #[test]
    fn inline_completion_needs_no_doorbell() {
        let q = QueueShared::new(0, 4, 4096).unwrap();
        let done = q.start(1, Decoded::Flush);
        done.complete(Ok(()));
        assert_eq!(smol::block_on(q.wait(1)), 0);
        assert!(!doorbell_pending(&q));
    }

    #[test]
    fn cross_thread_completion_wakes_and_rings() {
        let q = QueueShared::new(0, 4, 8192).unwrap();
        let mut done = q.start(2, read_req(8192));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            done.read_buf().fill(0xab);
            done.complete(Ok(()));
        });
        assert_eq!(smol::block_on(q.wait(2)), 8192);
        t.join().unwrap();
        assert!(doorbell_pending(&q), "a parked task must get a doorbell ring");
        // SAFETY: the request is completed and awaited; nobody else holds it.
        assert!(unsafe { q.data(2, 8192) }.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn doorbell_coalesces_until_rearmed() {
        let q = QueueShared::new(0, 1, 4096).unwrap();
        q.doorbell.ring();
        q.doorbell.ring();
        let mut v: u64 = 0;
        // SAFETY: test reads 8 bytes from the non-blocking eventfd.
        unsafe { libc::read(q.doorbell.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(v, 1, "second ring must not write again");
        q.doorbell.rearm();
        q.doorbell.ring();
        assert!(doorbell_pending(&q));
    }

    #[test]
    fn errors_and_drops_become_negative_errno() {
        let q = QueueShared::new(0, 2, 4096).unwrap();
        q.start(0, read_req(4096)).complete(Err(Error::NoSpace));
        assert_eq!(smol::block_on(q.wait(0)), -libc::ENOSPC);
        drop(q.start(0, read_req(4096)));
        assert_eq!(smol::block_on(q.wait(0)), -libc::EIO);
    }

    #[test]
    fn complete_read_checks_length_and_copies() {
        let q = QueueShared::new(0, 1, 8192).unwrap();
        q.start(0, read_req(4096)).complete_read(&[1u8; 100]);
        assert_eq!(smol::block_on(q.wait(0)), -libc::EIO);
        q.start(0, read_req(4096)).complete_read(&[5u8; 4096]);
        assert_eq!(smol::block_on(q.wait(0)), 4096);
        // SAFETY: completed and awaited above.
        assert!(unsafe { q.data(0, 4096) }.iter().all(|&b| b == 5));
    }

    #[test]
    fn write_payload_is_visible_through_the_completion() {
        let q = QueueShared::new(0, 1, 4096).unwrap();
        // SAFETY: the tag is idle; this test is the only user of the buffer.
        unsafe { q.data_mut(0, 4096) }.fill(9);
        let w = Decoded::Write { offset: 0, len: 512, fua: false };
        let done = q.start(0, w);
        assert_eq!(done.write_data().len(), 512);
        assert!(done.write_data().iter().all(|&b| b == 9));
        done.complete(Ok(()));
        assert_eq!(smol::block_on(q.wait(0)), 512);
    }

    #[test]
    fn slots_are_reused_without_state_leaks() {
        let q = QueueShared::new(0, 1, 4096).unwrap();
        for i in 0..1000u32 {
            let done = q.start(0, Decoded::Flush);
            let t = std::thread::spawn(move || done.complete(Ok(())));
            assert_eq!(smol::block_on(q.wait(0)), 0, "round {i}");
            t.join().unwrap();
            q.doorbell.rearm();
        }
    }
}
