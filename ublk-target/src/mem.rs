//! A small backend for tests and the ramdisk example: a RAM disk (memfd)
//! or a plain file, served by worker threads so that completions arrive
//! from another thread than the ublk queue's, like the real engine's.

use crate::backend::BlockBackend;
use crate::completion::Completion;
use crate::error::{Error, Result};
use crate::request::BlockRequest;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A request without its borrowed payload (WRITE data is read back from
/// the completion on the worker).
#[derive(Debug, Clone, Copy)]
enum Op {
    Read { offset: u64 },
    Write { offset: u64, fua: bool },
    Flush,
    Punch { offset: u64, len: u64 },
}

struct Job {
    op: Op,
    done: Completion,
}

/// RAM- or file-backed test backend. With workers, each request is one
/// channel message (this allocates per I/O; it is a test backend).
pub struct MemBackend {
    store: Arc<Store>,
    tx: Option<Mutex<mpsc::Sender<Job>>>,
}

struct Store {
    file: File,
    size: u64,
    /// fdatasync on FLUSH/FUA: true for real files, pointless for memfd.
    durable: bool,
}

impl MemBackend {
    /// A zero-filled RAM disk of `size` bytes (an anonymous memfd).
    pub fn ram(size: u64, workers: usize) -> Result<MemBackend> {
        let name = c"starblk-mem";
        // SAFETY: valid NUL-terminated name and flags; result checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::with_file(file, size, false, workers)
    }

    /// A disk stored in `path`, created or extended to `size` bytes. Its
    /// data survives a daemon restart, which user-recovery tests need.
    pub fn file(path: &Path, size: u64, workers: usize) -> Result<MemBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Os { context: "open backing file", source })?;
        Self::with_file(file, size, true, workers)
    }

    /// `workers == 0` completes inline in `submit`, on the queue thread.
    fn with_file(file: File, size: u64, durable: bool, workers: usize) -> Result<MemBackend> {
        let len = file.metadata().map_err(|source| Error::Os { context: "stat backing file", source })?;
        if len.len() < size {
            file.set_len(size).map_err(|source| Error::Os { context: "size backing file", source })?;
        }
        let store = Arc::new(Store { file, size, durable });
        let tx = (workers > 0).then(|| Mutex::new(spawn_workers(&store, workers)));
        Ok(MemBackend { store, tx })
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size
    }
}

fn spawn_workers(store: &Arc<Store>, n: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..n {
        let (store, rx) = (Arc::clone(store), Arc::clone(&rx));
        let spawn = std::thread::Builder::new().name(format!("mem-backend-{i}")).spawn(move || worker(&store, &rx));
        if let Err(e) = spawn {
            tracing::error!(error = %e, "cannot start backend worker");
        }
    }
    tx
}

fn worker(store: &Store, rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // A poisoned lock only means another worker panicked; keep going.
        let job = rx.lock().expect(crate::POISONED).recv();
        match job {
            Ok(job) => store.execute(job),
            Err(_) => return, // backend dropped
        }
    }
}

impl Store {
    fn execute(&self, mut job: Job) {
        let res = match job.op {
            Op::Read { offset } => self.read(offset, job.done.read_buf()),
            Op::Write { offset, fua } => self.write(offset, job.done.write_data(), fua),
            Op::Flush => self.sync(),
            Op::Punch { offset, len } => self.punch(offset, len),
        };
        job.done.complete(res);
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(io_err)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(io_err)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if self.durable {
            self.file.sync_data().map_err(io_err)?;
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: punch a hole (reads back zeroes); fall
    /// back to writing zeroes where the file system cannot punch.
    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::OutOfRange { offset, len, size: self.size });
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own open file with checked arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(());
        }
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 64 << 10;
        let zeroes = [0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            let chunk = &zeroes[..n as usize];
            self.file.write_all_at(chunk, offset + done).map_err(io_err)?;
            done += n;
        }
        Ok(())
    }
}

fn io_err(e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::NoSpace;
    }
    Error::Io(e.to_string())
}

impl BlockBackend for MemBackend {
    fn submit(&self, req: BlockRequest<'_>, done: Completion) {
        let op = match req {
            BlockRequest::Read { offset, .. } => Op::Read { offset },
            BlockRequest::Write { offset, fua, .. } => Op::Write { offset, fua },
            BlockRequest::Flush => Op::Flush,
            BlockRequest::Discard { offset, len } => Op::Punch { offset, len },
            BlockRequest::WriteZeroes { offset, len, .. } => Op::Punch { offset, len },
        };
        let job = Job { op, done };
        let Some(tx) = &self.tx else {
            return self.store.execute(job);
        };
        let sent = tx.lock().expect(crate::POISONED).send(job);
        if let Err(mpsc::SendError(job)) = sent {
            // Every worker is gone; fail rather than hang the request.
            job.done.complete(Err(Error::Io("backend workers stopped".into())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::QueueShared;
    use crate::request::Decoded;

    /// Runs one request through a backend the way a queue task does.
    fn run(b: &MemBackend, q: &Arc<QueueShared>, req: Decoded, payload: &[u8]) -> i32 {
        let done = q.start(0, req);
        b.submit(req.to_request(payload), done);
        smol::block_on(q.wait(0))
    }

    fn write(b: &MemBackend, q: &Arc<QueueShared>, offset: u64, data: &[u8]) -> i32 {
        let len = data.len() as u32;
        // The backend reads WRITE data from the tag buffer via the
        // completion, so put it there as the kernel would.
        let done = q.start(0, Decoded::Write { offset, len, fua: true });
        // SAFETY: tag 0 is in flight and owned by `done`; nothing else
        // touches its buffer until submit.
        let buf = unsafe { std::slice::from_raw_parts_mut(q.io_buf(0).as_mut_ptr(), data.len()) };
        buf.copy_from_slice(data);
        b.submit(BlockRequest::Write { offset, data, fua: true }, done);
        smol::block_on(q.wait(0))
    }

    fn read(b: &MemBackend, q: &Arc<QueueShared>, offset: u64, len: u32) -> Vec<u8> {
        assert_eq!(run(b, q, Decoded::Read { offset, len }, &[]), len as i32);
        // SAFETY: the read was completed and awaited.
        unsafe { q.data(0, len as usize) }.to_vec()
    }

    fn round_trip(b: &MemBackend) {
        let q = QueueShared::new(0, 1, 64 << 10).unwrap();
        assert_eq!(write(b, &q, 8192, &[0x5a; 8192]), 8192);
        assert_eq!(read(b, &q, 8192, 8192), vec![0x5a; 8192]);
        assert_eq!(run(b, &q, Decoded::Flush, &[]), 0);
        let punch = Decoded::Discard { offset: 8192, len: 4096 };
        assert_eq!(run(b, &q, punch, &[]), 0);
        let got = read(b, &q, 8192, 8192);
        assert!(got[..4096].iter().all(|&x| x == 0));
        assert!(got[4096..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn ram_disk_with_workers_round_trips() {
        round_trip(&MemBackend::ram(1 << 20, 2).unwrap());
    }

    #[test]
    fn inline_ram_disk_round_trips() {
        round_trip(&MemBackend::ram(1 << 20, 0).unwrap());
    }

    #[test]
    fn file_backend_keeps_data_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let q = QueueShared::new(0, 1, 4096).unwrap();
        let b = MemBackend::file(&path, 1 << 20, 1).unwrap();
        assert_eq!(write(&b, &q, 0, &[7; 4096]), 4096);
        drop(b);
        let b = MemBackend::file(&path, 1 << 20, 1).unwrap();
        assert_eq!(read(&b, &q, 0, 4096), vec![7; 4096]);
        assert_eq!(b.size(), 1 << 20);
    }
}
