//! One ublk hardware queue: its thread, its io_uring, one async task per tag.
//!
//! libublk 0.4 runs each queue on a small local executor. Each tag's task
//! loops: take the request the kernel fetched, hand it to the backend,
//! await the completion slot, commit the result and fetch the next. The
//! thread only ever waits inside io_uring; a doorbell task keeps a POLL_ADD
//! on the queue's eventfd so completions from other threads end that wait.

use crate::backend::BlockBackend;
use crate::completion::QueueShared;
use crate::error::Error;
use crate::request::{decode, Geometry};
use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use std::rc::Rc;
use std::sync::Arc;

/// Seconds without I/O after which libublk marks the queue idle.
const IDLE_SECS: u64 = 20;

/// Serves queue `qid` until the device stops. Runs on the queue thread
/// that libublk's `run_target` spawned.
pub(crate) fn run_queue<B>(qid: u16, dev: &UblkDev, backend: &B, geo: Geometry)
where
    B: BlockBackend + ?Sized,
{
    let info = dev.dev_info;
    let shared = match QueueShared::new(qid, info.queue_depth, info.max_io_buf_bytes) {
        Ok(s) => s,
        Err(e) => return queue_setup_failed(dev, qid, &e),
    };
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => return queue_setup_failed(dev, qid, &e.into()),
    };
    let exe = smol::LocalExecutor::new();
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let (q, shared) = (Rc::clone(&q), Arc::clone(&shared));
            exe.spawn(async move { tag_task_outcome(qid, tag, io_task(&q, tag, &shared, backend, &geo).await) })
        })
        .collect();
    // The doorbell task never finishes on its own; it is dropped with the
    // executor once every tag task has seen the queue go down.
    let _doorbell = exe.spawn(doorbell_task(Arc::clone(&shared)));
    let run_ops = || while exe.try_tick() {};
    let done = || tasks.iter().all(|t| t.is_finished());
    let events = libublk::wait_and_handle_io_events(&q, Some(IDLE_SECS), run_ops, done);
    if let Err(e) = smol::block_on(exe.run(events)) {
        tracing::error!(qid, error = %e, "queue event loop failed");
    }
    tracing::debug!(qid, "queue stopped");
}

/// A queue that cannot start must still report to `start_dev`, which
/// otherwise waits for its buffer registration forever. libublk's only
/// public way to fail that wait is the mlock-failure flag, so start_dev
/// returns EPERM; the real cause is logged here.
fn queue_setup_failed(dev: &UblkDev, qid: u16, e: &Error) {
    tracing::error!(qid, error = %e, "cannot set up ublk queue");
    dev.notify_buffer_registration_complete(true);
}

fn tag_task_outcome(qid: u16, tag: u16, res: Result<(), UblkError>) {
    match res {
        Ok(()) | Err(UblkError::QueueIsDown) => {}
        Err(e) => tracing::error!(qid, tag, error = %e, "tag task failed"),
    }
}

/// The life of one tag: FETCH once, then serve and COMMIT_AND_FETCH until
/// the kernel aborts the queue (device stopped or deleted).
async fn io_task<B>(
    q: &UblkQueue<'_>,
    tag: u16,
    shared: &Arc<QueueShared>,
    backend: &B,
    geo: &Geometry,
) -> Result<(), UblkError>
where
    B: BlockBackend + ?Sized,
{
    let buf = shared.io_buf(tag);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(buf)).await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = serve_one(shared, tag, &iod, backend, geo).await;
        // A raw address, not a slice: the buffer may have been written by a
        // backend thread, so no Rust reference to it is held across awaits.
        q.submit_io_commit_cmd(tag, BufDesc::RawAddress(buf.as_ptr()), res).await?;
    }
}

/// Runs one request through the backend; returns the kernel's result.
async fn serve_one<B>(
    shared: &Arc<QueueShared>,
    tag: u16,
    iod: &libublk::sys::ublksrv_io_desc,
    backend: &B,
    geo: &Geometry,
) -> i32
where
    B: BlockBackend + ?Sized,
{
    let req = match decode(iod, geo) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(tag, op_flags = iod.op_flags, error = %e, "rejecting request");
            return e.to_errno();
        }
    };
    let done = shared.start(tag, req);
    // SAFETY: the tag is in flight and its only completion is `done`, which
    // gives no mutable access for a WRITE; the kernel filled the buffer
    // before it handed us the request and leaves it alone until we commit.
    let payload = unsafe { shared.data(tag, if req.is_write() { req.buf_len() } else { 0 }) };
    backend.submit(req.to_request(payload), done);
    shared.wait(tag).await
}

/// Keeps a POLL_ADD on the doorbell eventfd and rearms it after each ring,
/// so a completion from another thread ends the queue's io_uring wait.
async fn doorbell_task(shared: Arc<QueueShared>) {
    let fd = shared.doorbell.raw_fd();
    loop {
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        // The Target bit tells libublk this is our own SQE, not a ublk command.
        match ublk_submit_sqe_async(poll, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 => shared.doorbell.rearm(),
            Ok(r) => {
                let e = std::io::Error::from_raw_os_error(-r);
                tracing::error!(error = %e, "doorbell poll failed; cross-thread completions may stall");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "doorbell submit failed");
                return;
            }
        }
    }
}
