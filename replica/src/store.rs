//! The replica store: superblock, circular log and data file in one directory.
//!
//! Write path (group commit): session threads append records to the log's
//! in-memory batch under a short lock; one commit at a time takes the whole
//! batch, writes it with one fdatasync, publishes the new durable seq and
//! acks it, and only then applies the batch to the data file in seq order
//! (so the higher seq wins on any overlap). A session commits a small batch
//! itself when its input runs dry (queue depth 1: no thread hand-off);
//! anything larger goes to the committer thread, so the session goes on
//! receiving while the log is synced (`docs/performance.md`).
//!
//! Reads go to the data file, which may lag the durable seq by the batch
//! being applied: a read first waits until every record up to the durable
//! seq at its arrival is applied, so it never returns data older than what
//! the replica had acknowledged when it arrived (the host routes a read
//! only to a replica whose ack covers the last write to its range).
//!
//! A checkpointer thread takes checkpoints beside the commits. Between
//! them it starts writeback (`sync_file_range`, no wait) of dense runs of
//! applied data as they fill, so the checkpoint's fdatasync of the data
//! file finds little left to write instead of one burst per checkpoint.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::changes::{self, ChangeMap};
use crate::disk::{DiskFile, FaultPlan, FaultSpecError, FileIo, FileKind};
use crate::history::{self as hist, AppendDecision, Standing};
use crate::log::{self, Batch, Log, LogIo, RecordHeader, LOG_MIN_BYTES, REC_HEADER_BYTES};
use crate::members::{MembersRefusal, Membership};
use crate::proto::{RegionHeader, Uuid, WriteOp, MAX_IO_BYTES};
use crate::readview::ViewWriter;
use crate::superblock::{self, CopyKind, CopySegment, CopyState, Superblock, COPY_SEGMENTS_MAX};

/// Default replica log size.
pub const DEFAULT_LOG_BYTES: u64 = 1 << 30;
/// A checkpoint starts once the log is this fraction full (numerator / 4).
const CHECKPOINT_QUARTERS: u64 = 2;
/// Region locks (see `Store::stripes`).
const STRIPES: usize = 64;
/// Live records remembered during a copy (see `Store::recent`).
const RECENT_MAX: usize = 1 << 16;
/// A session commits its burst on its own thread only while the batch
/// takes at most this many log bytes (one write of up to 64 KiB at queue
/// depth 1, or a few small ones): there the hand-off to the committer
/// would cost a wake-up on each side (measured at QD1: about 4 syscalls
/// and 3 context switches per write more, `docs/performance.md`) and
/// there is nothing else to receive meanwhile. Larger batches go to the
/// committer, so receiving never waits behind a large log write and sync.
const INLINE_COMMIT_MAX_BYTES: u64 = 64 * 1024 + REC_HEADER_BYTES as u64;
/// A batch still growing mid-burst wakes the committer at this size, so a
/// long burst starts its first log write before the burst ends.
const COMMIT_KICK_BYTES: u64 = 1 << 20;
/// A dense run of applied data this large starts its writeback
/// (`Store::writeback`)...
const WRITEBACK_KICK_BYTES: u64 = 16 << 20;
/// ... and so does one at least this large that a write elsewhere ended.
const WRITEBACK_RUN_MIN_BYTES: u64 = 1 << 20;
/// Runs waiting for the checkpointer at most (more are left to the
/// checkpoint).
const WRITEBACK_READY_MAX: usize = 64;
/// Where the log is written with `O_DIRECT`, a data record at least this
/// large, in whole blocks at a block offset, is applied to the data file
/// with `O_DIRECT` too, from a reused aligned buffer: a copy into warm
/// memory instead of into fresh page-cache pages (`docs/performance.md`,
/// "Large writes skip the page cache"). Smaller ones stay buffered, so
/// random small writes keep reaching the disk in the checkpoint's one
/// sync rather than one device write each.
const DIRECT_APPLY_MIN_BYTES: u64 = 64 * 1024;
/// Data of at least this many bytes stays in the buffer it was received
/// into when the log goes through the page cache: the batch is written
/// with one vectored write instead of a copy of every byte
/// (`docs/performance.md`, "Large writes stay in their receive buffers").
/// Smaller data is copied: a copy of a few KiB costs less than the
/// buffer exchange and the extra slices.
const SPLICE_MIN_BYTES: usize = 16 * 1024;
/// Contiguous direct records of one batch go out as one write of at most
/// this many bytes (the aligned buffer's bound).
const DIRECT_APPLY_RUN_MAX_BYTES: u64 = 4 << 20;
/// How long a read waits for the durable records before it to be applied.
const READ_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Store failures. Each carries what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} ({path}): {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    /// The superblock is unreadable.
    #[error("superblock in {dir}: {source}")]
    Superblock { dir: PathBuf, source: superblock::SuperblockError },
    /// `init` found an existing replica.
    #[error("{0} already holds a replica (superblock exists); refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// Bad init parameters.
    #[error("invalid replica geometry: {0}")]
    Geometry(String),
    /// I/O outside the volume or misaligned.
    #[error("range offset {offset} len {len} is outside the volume ({size} bytes) or not {block_size}-aligned")]
    OutOfRange { offset: u64, len: u64, size: u64, block_size: u32 },
    /// A write does not follow the last seq.
    #[error("seq {seq} does not follow last seq {last}")]
    SeqGap { seq: u64, last: u64 },
    /// The disk failed earlier; the store refuses writes until restarted.
    #[error("store failed: {0}")]
    Failed(String),
    /// Log records requested are older than the checkpoint.
    #[error("seq {from} is no longer in the replica log (it starts at {first})")]
    NotInLog { from: u64, first: u64 },
    /// A stamp conflicts with the existing identity.
    #[error("replica already belongs to another volume")]
    WrongVolume,
    /// A frame from a host whose epoch is below the replica's (fenced),
    /// or a request for an epoch that is not above the replica's.
    #[error("epoch {asked} is not accepted: replica is at epoch {mine}")]
    StaleEpoch { asked: u64, mine: u64 },
    /// The record is not the one this replica's history holds at its seq,
    /// or the replica's log holds records past `after` from another history.
    #[error("replica diverged from the host's history after seq {after} (record seq {seq}, epoch {epoch})")]
    Diverged { after: u64, seq: u64, epoch: u64 },
    /// `STARBLK_FAULT` (fault injection, for tests) does not parse.
    /// A replica set change older than (or conflicting with) the stored one.
    #[error("replica set (epoch, version) {asked:?} is not accepted: the replica holds {mine:?}{}", if asked == mine { " with other members" } else { "" })]
    StaleMembers { asked: (u64, u64), mine: (u64, u64) },
    #[error("STARBLK_FAULT: {0}")]
    FaultSpec(FaultSpecError),
    /// A recovery copy request that does not fit the replica's state.
    #[error("copy: {0}")]
    Copy(String),
    /// Another store (another `replica serve`, or a host serving this
    /// replica) has the directory open. Two would corrupt it: each replays
    /// and applies the log on its own.
    #[error("{} is in use: another process (or another open in this one) serves this replica directory; only one may", dir.display())]
    Busy { dir: PathBuf },
    /// Waited too long for a seq to be applied (or the wait was cancelled).
    #[error("seq {seq} not applied within {waited:?} (applied through {applied})")]
    Timeout { seq: u64, applied: u64, waited: Duration },
}

/// Takes the replica directory for this store: an exclusive `flock` on
/// its superblock file, held as long as the store keeps that file open
/// (its lifetime), and released by the kernel if the process dies.
fn lock_dir(sb_file: &File, dir: &Path, path: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads the descriptor number, which `sb_file`
    // keeps open for the duration of the call.
    let rc = unsafe { libc::flock(sb_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(StoreError::Busy { dir: dir.to_path_buf() }),
        e => Err(io_err("lock", path)(e)),
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

/// Files inside a replica directory.
pub struct Paths {
    /// Superblock (two slots).
    pub superblock: PathBuf,
    /// Sparse data file, the volume's size.
    pub data: PathBuf,
    /// Circular replica log.
    pub log: PathBuf,
    /// The change map: last seq written, per region.
    pub changes: PathBuf,
}

/// The data file's name in a replica directory.
pub const DATA_FILE: &str = "data";

impl Paths {
    /// The paths under `dir`.
    pub fn new(dir: &Path) -> Paths {
        Paths {
            superblock: dir.join("superblock"),
            data: dir.join(DATA_FILE),
            log: dir.join("log"),
            changes: dir.join("changes"),
        }
    }
}

/// Creates an empty, unstamped replica in `dir` with 64 KiB regions.
pub fn init(dir: &Path, size_bytes: u64, log_bytes: u64) -> Result<(), StoreError> {
    init_with_regions(dir, size_bytes, log_bytes, changes::REGION_SHIFT_DEFAULT)
}

/// Writes `len` zero bytes to `f` from its start. The log is written out
/// in full once, at init, rather than left sparse: a commit then syncs
/// data into blocks the file system already has, so its fdatasync does not
/// also commit a block allocation (and, on tmpfs, does not clear fresh
/// pages). Measured in `docs/performance.md` ("A preallocated log").
fn write_zeros(mut f: &File, len: u64) -> io::Result<()> {
    const CHUNK_BYTES: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK_BYTES];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK_BYTES as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Creates an empty, unstamped replica in `dir` whose change map tracks
/// regions of `1 << region_shift` bytes (4 KiB ..= 64 KiB).
pub fn init_with_regions(dir: &Path, size_bytes: u64, log_bytes: u64, region_shift: u32) -> Result<(), StoreError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(4096) {
        return Err(StoreError::Geometry(format!("size {size_bytes} must be a positive multiple of 4096")));
    }
    if log_bytes < LOG_MIN_BYTES {
        return Err(StoreError::Geometry(format!("log size {log_bytes} is below the minimum {LOG_MIN_BYTES}")));
    }
    if !(changes::REGION_SHIFT_MIN..=changes::REGION_SHIFT_MAX).contains(&region_shift) {
        return Err(StoreError::Geometry(format!(
            "region size {} must be a power of two from 4 KiB to 64 KiB",
            1u64 << region_shift.min(63)
        )));
    }
    let regions = changes::regions_for(size_bytes, region_shift);
    if regions > changes::REGIONS_MAX {
        return Err(StoreError::Geometry(format!("{regions} regions of {} bytes are too many", 1u64 << region_shift)));
    }
    // Volume data is the users' data: only the replica's owner (and a
    // same-machine HE running as that user or root) may read it.
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("create directory", dir))?;
    let p = Paths::new(dir);
    if p.superblock.exists() {
        return Err(StoreError::AlreadyInitialised(dir.to_path_buf()));
    }
    let header = changes::Header { region_shift, regions, floor: 0 };
    for (path, len) in [(&p.data, size_bytes), (&p.log, log_bytes), (&p.changes, header.file_bytes())] {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("create", path))?;
        if path == &p.log {
            write_zeros(&f, len).map_err(io_err("preallocate", path))?;
        } else {
            f.set_len(len).map_err(io_err("size", path))?;
        }
        f.sync_all().map_err(io_err("sync", path))?;
    }
    let f = OpenOptions::new().read(true).write(true).open(&p.changes).map_err(io_err("open", &p.changes))?;
    ChangeMap::create(f, header).map_err(io_err("write change map", &p.changes))?;
    let mut sb = Superblock {
        generation: 0,
        volume: [0; 16],
        size_bytes,
        block_size: 4096,
        epoch: 0,
        log_bytes,
        checkpoint_seq: 0,
        log_tail_offset: 0,
        durable_seq: 0,
        members: Vec::new(),
        members_version: 0,
        members_epoch: 0,
        members_previous: Vec::new(),
        history: hist::History::new(),
        region_shift,
        copy: None,
    };
    superblock::create(&p.superblock, &mut sb)
        .map_err(|source| StoreError::Superblock { dir: dir.to_path_buf(), source })?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))?;
    Ok(())
}

/// State behind the append lock.
struct Inner {
    log: Log,
    /// Highest seq appended to the log.
    last_seq: u64,
    /// A batch is being committed.
    committing: bool,
    /// Log bytes applied to the data file since the last checkpoint.
    applied_unsynced_bytes: u64,
    /// Log offset just past the last applied batch (the next tail).
    applied_end: u64,
    /// Seq of the last applied record.
    applied_seq: u64,
    /// Appenders waiting for log space.
    append_waiters: u32,
    /// Checkpointed records still intact behind the tail (see [`History`]).
    history: Option<History>,
    /// The history the log follows (a copy of the superblock's, read here
    /// under this lock by every append).
    follows: hist::History,
    /// Threads in [`Store::drained`] waiting for a commit to end.
    drain_waiters: u32,
    /// Drains in progress: appends wait until they end.
    fences: u32,
    /// Data-file runs applied since the last checkpoint started, for the
    /// checkpointer to start their writeback.
    writeback: Writeback,
    /// The committer was woken for the pending batch mid-burst
    /// (`COMMIT_KICK_BYTES`); cleared when a commit takes the batch.
    kicked: bool,
    /// A checkpoint is between its snapshot and its superblock update: a
    /// drain waits for it, so that whoever drains may move the tail and
    /// the checkpoint seq itself (a recovery copy's start and end).
    checkpointing: bool,
    shutdown: bool,
}

/// Records a checkpoint released but the head has not overwritten yet:
/// `bytes` of log ending at the tail, starting at `offset` with seq
/// `first_seq`. They keep serving `read_log` (replay recovery of other
/// replicas), so the replayable window does not collapse at every
/// checkpoint. The head eats the free space in front of it, and the history
/// is the far end of that space, so it stays intact while the free space
/// is at least `bytes`; the first append that breaks that drops it.
#[derive(Debug, Clone, Copy)]
struct History {
    offset: u64,
    first_seq: u64,
    bytes: u64,
}

/// Data-file ranges applied since a checkpoint, gathered for writeback
/// (`Store::writeback`): dense runs only. Sequential writes make runs that
/// writeback handles well; random small writes make none (each breaks the
/// run), and stay for the checkpoint's fdatasync, where the elevator sees
/// them all at once (measured: starting their writeback early cost random
/// 4 KiB writes a third of their IOPS, `docs/performance.md`).
#[derive(Debug, Default)]
struct Writeback {
    /// The run being gathered: `start..end` with `bytes` applied in it.
    start: u64,
    end: u64,
    bytes: u64,
    /// Runs ready for writeback: (offset, length).
    ready: Vec<(u64, u64)>,
}

impl Writeback {
    /// Adds the data records of an applied batch.
    fn add(&mut self, batch: &Batch) {
        for p in batch.records.iter().filter(|p| p.header.op == WriteOp::Data) {
            let (a, len) = (p.header.offset, u64::from(p.header.len));
            let (start, end) = (self.start.min(a), self.end.max(a + len));
            // Half of the run's span at least must have been written.
            if self.bytes > 0 && (self.bytes + len) * 2 >= end - start {
                (self.start, self.end, self.bytes) = (start, end, self.bytes + len);
            } else {
                self.close();
                (self.start, self.end, self.bytes) = (a, a + len, len);
            }
            if self.bytes >= WRITEBACK_KICK_BYTES {
                self.close();
            }
        }
    }

    /// Ends the current run; a large one becomes ready.
    fn close(&mut self) {
        if self.bytes >= WRITEBACK_RUN_MIN_BYTES && self.ready.len() < WRITEBACK_READY_MAX {
            self.ready.push((self.start, self.end - self.start));
        }
        self.bytes = 0;
    }

    fn due(&self) -> bool {
        !self.ready.is_empty()
    }
}

/// The append lock, held after a drain; appends resume when it drops.
struct Drained<'a> {
    store: &'a Store,
    g: Option<MutexGuard<'a, Inner>>,
}

impl std::ops::Deref for Drained<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.g.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Drained<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.g.as_mut().expect("held until drop")
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if let Some(mut g) = self.g.take() {
            g.fences -= 1;
            drop(g);
            self.store.wake_all();
        }
    }
}

/// Where the committer reports durability (the current writer session).
pub trait AckSink: Send + Sync {
    /// Called after each group commit with the cumulative durable seq.
    fn durable(&self, seq: u64);
    /// The epoch of the host behind the sink: acks go to it only while
    /// the replica has not persisted a higher one.
    fn epoch(&self) -> u64;
}

/// An open replica store, shared by all sessions.
pub struct Store {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Wakes appenders (space freed, a fence lifted) and drains (a commit
    /// or checkpoint ended).
    cond: Condvar,
    /// Wakes the committer: records pending. Its own, so that a commit
    /// wakes neither the checkpointer nor appenders that have nothing to
    /// do (`docs/performance.md`, "One wake-up per waiter").
    commit_cond: Condvar,
    /// Wakes the checkpointer: a checkpoint or writeback due.
    checkpoint_cond: Condvar,
    sb: Mutex<(DiskFile, Superblock)>,
    data: DiskFile,
    log_file: DiskFile,
    /// The log opened again with `O_DIRECT`, for group commits, where the
    /// filesystem allows it (`open_log`).
    log_direct: Option<DiskFile>,
    /// The data file opened again with `O_DIRECT` where the log is direct,
    /// for large records (`DIRECT_APPLY_MIN_BYTES`), and the aligned buffer
    /// their data is gathered in (used by one commit at a time).
    data_direct: Option<(DiskFile, Mutex<log::AlignedBuf>)>,
    /// Last seq written per region (`crate::changes`).
    changes: ChangeMap<DiskFile>,
    /// Region locks (by region index modulo their count): applying a
    /// record holds those of its regions, and so does reading a region for
    /// a recovery copy, which therefore sees every record up to
    /// `applied_through` and none after it.
    stripes: Vec<Mutex<()>>,
    /// Seq of the last record applied to the data file.
    applied_through: AtomicU64,
    /// Threads in [`Store::wait_applied`]: the applier takes `applied_lock`
    /// and notifies only when there are some.
    applied_waiters: AtomicU64,
    applied_lock: Mutex<()>,
    /// The page a same-host engine reads the data file through
    /// (`crate::readview`); `None` if it could not be created.
    view: Option<ViewWriter>,
    applied_cond: Condvar,
    /// A recovery copy runs (`docs/design.md`, "Recovery"): the durable
    /// seq stays at what the replica held before, and nothing is acked
    /// until the copy ends.
    copying: AtomicBool,
    /// During a copy, the last live records applied (seq, offset, len),
    /// oldest first: a copied region as of seq A must leave alone the
    /// bytes that live records after A wrote.
    recent: Mutex<VecDeque<(u64, u64, u64)>>,
    /// Fault injection (tests): shared by the files above.
    faults: Arc<FaultPlan>,
    durable_seq: AtomicU64,
    epoch: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<String>,
    ack_sink: Mutex<Option<Arc<dyn AckSink>>>,
    /// Group commits done (for stats).
    pub commits: AtomicU64,
    /// Writes committed (for stats).
    pub writes: AtomicU64,
    /// Data bytes of the writes committed (for stats).
    pub write_bytes: AtomicU64,
    /// Time group commits spent writing and syncing the log, µs (for stats).
    pub commit_us: AtomicU64,
    /// Data bytes applied to the data file with `O_DIRECT` (for stats).
    pub apply_direct_bytes: AtomicU64,
}

impl Store {
    /// Opens the replica in `dir`, replays its log into the data file, takes
    /// a checkpoint and starts the committer thread. Faults named in
    /// `STARBLK_FAULT` are armed from the start (tests; see [`crate::disk`]).
    pub fn open(dir: &Path) -> Result<(Arc<Store>, JoinHandle<()>), StoreError> {
        Store::open_with_faults(dir, FaultPlan::from_env().map_err(StoreError::FaultSpec)?)
    }

    /// [`Store::open`] with the fault plan `faults` instead of the
    /// environment's; what `faults` holds armed hits the open too.
    pub fn open_with_faults(dir: &Path, faults: Arc<FaultPlan>) -> Result<(Arc<Store>, JoinHandle<()>), StoreError> {
        let p = Paths::new(dir);
        let open = |path: &Path, kind: FileKind| {
            let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open", path))?;
            Ok::<_, StoreError>(DiskFile::new(f, kind, faults.clone()))
        };
        let sb_file = open(&p.superblock, FileKind::Superblock)?;
        lock_dir(sb_file.file(), dir, &p.superblock)?;
        let sb =
            Superblock::read(&sb_file).map_err(|source| StoreError::Superblock { dir: dir.to_path_buf(), source })?;
        let data = open(&p.data, FileKind::Data)?;
        let log_file = open(&p.log, FileKind::Log)?;
        let map = open_changes(&sb, &p, &faults)?;
        // Before the replay rewrites anything: a reader of the previous
        // open must see the data file change under it.
        let view = open_view(dir);
        let (next, head, used) = replay(&sb, &data, &log_file, map.as_ref(), &p)?;
        let (log, log_direct) = open_log(&sb, head, used, &p, &faults);
        let data_direct = log_direct.as_ref().and_then(|_| open_data_direct(&p, &faults));
        let changes = match map {
            Some(m) => m,
            // No map yet (a replica of the previous format) or a lost one:
            // nothing is known about which regions were written, so all
            // count as written at the last seq this replica holds.
            None => create_changes(&sb, &p, &faults, next - 1)?,
        };
        // During a copy the durable seq stays what it was before the copy;
        // the log holds live writes from `live_from` on.
        let copying = sb.copy.is_some();
        let durable = if copying { sb.durable_seq } else { next - 1 };
        let store = Arc::new(Store {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                log,
                last_seq: next - 1,
                committing: false,
                // Replayed records are in the (synced) data file already.
                applied_unsynced_bytes: used,
                applied_end: head,
                applied_seq: next - 1,
                append_waiters: 0,
                history: None,
                follows: sb.history.clone(),
                drain_waiters: 0,
                fences: 0,
                kicked: false,
                writeback: Writeback::default(),
                checkpointing: false,
                shutdown: false,
            }),
            cond: Condvar::new(),
            commit_cond: Condvar::new(),
            checkpoint_cond: Condvar::new(),
            durable_seq: AtomicU64::new(durable),
            epoch: AtomicU64::new(sb.epoch),
            sb: Mutex::new((sb_file, sb)),
            data,
            log_file,
            log_direct,
            data_direct,
            changes,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            applied_through: AtomicU64::new(next - 1),
            applied_waiters: AtomicU64::new(0),
            applied_lock: Mutex::new(()),
            applied_cond: Condvar::new(),
            view,
            copying: AtomicBool::new(copying),
            recent: Mutex::new(VecDeque::new()),
            faults,
            failed: AtomicBool::new(false),
            failure: Mutex::new(String::new()),
            ack_sink: Mutex::new(None),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            commit_us: AtomicU64::new(0),
            apply_direct_bytes: AtomicU64::new(0),
        });
        // The tail stays where it was: the replayed records remain readable
        // for peers and a new HE (`read_log`) until a checkpoint needs room.
        // The durable seq found is recorded (it is a lower bound after this).
        if !copying {
            store.record_durable(next - 1)?;
            if let Some(v) = &store.view {
                v.settled(next - 1);
            }
        }
        let s2 = store.clone();
        let cp = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || s2.checkpointer())
            .map_err(io_err("spawn checkpointer", dir))?;
        let s3 = store.clone();
        // The handle returned covers both threads: the committer waits for
        // the checkpointer before it ends.
        let h = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                s3.committer();
                let _ = cp.join();
            })
            .map_err(|e| {
                store.shutdown();
                io_err("spawn committer", dir)(e)
            })?;
        Ok((store, h))
    }

    /// The instance of this open's read view, 0 if it has none
    /// (`crate::readview`).
    pub fn read_view_instance(&self) -> u64 {
        self.view.as_ref().map_or(0, ViewWriter::instance)
    }

    /// Directory of this replica.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the current superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.sb).1.clone()
    }

    /// Highest seq with every write <= it on stable storage.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// Current fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The fault plan of this store's files, to arm faults at runtime (tests).
    pub fn faults(&self) -> &Arc<FaultPlan> {
        &self.faults
    }

    /// Whether a disk error stopped the store.
    pub fn failure(&self) -> Option<String> {
        self.failed.load(Ordering::Acquire).then(|| lock(&self.failure).clone())
    }

    /// The change map (last seq written per region).
    pub fn changes(&self) -> &ChangeMap<DiskFile> {
        &self.changes
    }

    /// Log bytes in use (records not yet released by a checkpoint) and
    /// the log's size.
    pub fn log_usage(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.log.used_bytes(), g.log.size_bytes())
    }

    /// Seq of the last record applied to the data file.
    pub fn applied_through(&self) -> u64 {
        self.applied_through.load(Ordering::Acquire)
    }

    /// Routes durable-seq notifications to `sink` (replacing any earlier one).
    pub fn set_ack_sink(&self, sink: Option<Arc<dyn AckSink>>) {
        *lock(&self.ack_sink) = sink;
    }

    /// Stops routing notifications to `sink` if it is still the current
    /// one; a sink a newer session installed meanwhile stays.
    pub fn clear_ack_sink_if(&self, sink: &Arc<dyn AckSink>) {
        let mut g = lock(&self.ack_sink);
        // Data pointers only: vtable pointers of one type may differ.
        if g.as_ref().is_some_and(|cur| std::ptr::addr_eq(Arc::as_ptr(cur), Arc::as_ptr(sink))) {
            *g = None;
        }
    }

    /// Checks that a range lies inside the volume and is block aligned.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let sb = lock(&self.sb);
        let (size, bs) = (sb.1.size_bytes, sb.1.block_size);
        let ok = len > 0
            && offset.is_multiple_of(bs as u64)
            && len.is_multiple_of(bs as u64)
            && offset.checked_add(len).is_some_and(|end| end <= size);
        if ok {
            Ok(())
        } else {
            Err(StoreError::OutOfRange { offset, len, size, block_size: bs })
        }
    }

    /// Appends one write, sent by a host of `session_epoch`, to the
    /// pending batch. A record this replica already holds is ignored (a
    /// retransmission); one its history holds differently is refused.
    /// Blocks only while the log is full and a checkpoint frees space.
    pub fn append(&self, session_epoch: u64, h: &RecordHeader, data: &[u8]) -> Result<(), StoreError> {
        self.append_inner(session_epoch, h, Data::Slice(data), None, true)
    }

    /// Like [`Store::append`], but leaves the commit to the caller, who
    /// promises to call [`Store::commit_pending`] when its burst ends.
    /// `data_sum` is the data's sum (`crate::sum`) when the caller already
    /// has it.
    pub fn append_deferred(
        &self,
        session_epoch: u64,
        h: &RecordHeader,
        data: &[u8],
        data_sum: Option<u64>,
    ) -> Result<(), StoreError> {
        self.append_inner(session_epoch, h, Data::Slice(data), data_sum, false)
    }

    /// [`Store::append_deferred`] for data a session received into `buf`,
    /// at `buf[start..]`: the store may keep the buffer for the log batch
    /// instead of copying the data out of it (`Log::append_owned`), and
    /// then puts a spare receive buffer, or an empty one, in its place.
    pub fn append_received(
        &self,
        session_epoch: u64,
        h: &RecordHeader,
        buf: &mut Vec<u8>,
        start: usize,
        data_sum: Option<u64>,
    ) -> Result<(), StoreError> {
        assert!(start + h.data_bytes() <= buf.len(), "seq {}: data past the receive buffer", h.seq);
        self.append_inner(session_epoch, h, Data::Received(buf, start), data_sum, false)
    }

    fn append_inner(
        &self,
        session_epoch: u64,
        h: &RecordHeader,
        mut data: Data<'_>,
        data_sum: Option<u64>,
        wake: bool,
    ) -> Result<(), StoreError> {
        self.check_range(h.offset, h.len as u64)?;
        let mut g = lock(&self.inner);
        loop {
            if let Some(f) = self.failure() {
                return Err(StoreError::Failed(f));
            }
            if g.fences > 0 {
                g.append_waiters += 1;
                g = self.cond.wait(g).expect(crate::POISONED);
                g.append_waiters -= 1;
                continue;
            }
            // The epoch is read under the append lock, which a fence holds
            // while it persists a new one (see `drained`).
            let mine = self.epoch();
            match hist::append_decision(&g.follows, mine, g.last_seq, session_epoch, (h.epoch, h.seq)) {
                AppendDecision::Append => {}
                AppendDecision::Duplicate => return Ok(()),
                AppendDecision::Stale => return Err(StoreError::StaleEpoch { asked: session_epoch, mine }),
                AppendDecision::Gap => return Err(StoreError::SeqGap { seq: h.seq, last: g.last_seq }),
                AppendDecision::Diverged => {
                    let after = g.last_seq.min(h.seq - 1);
                    return Err(StoreError::Diverged { after, seq: h.seq, epoch: h.epoch });
                }
            }
            match data.append_to(&mut g.log, h, data_sum) {
                Ok(()) => {
                    g.last_seq = h.seq;
                    let free = g.log.size_bytes() - g.log.used_bytes();
                    // A direct commit also zeroes the rest of its last
                    // block past the head (`Log::slack_bytes`).
                    if g.history.is_some_and(|hist| free < hist.bytes + g.log.slack_bytes()) {
                        g.history = None;
                    }
                    // A running commit picks the batch up when it ends
                    // (`commit_locked`): no wake-up per record meanwhile.
                    let kick = !g.committing && !g.kicked && g.log.pending_used_bytes() >= COMMIT_KICK_BYTES;
                    if wake || kick {
                        g.kicked |= kick;
                        self.commit_cond.notify_one();
                    }
                    return Ok(());
                }
                // The committer commits what is pending and checkpoints.
                Err(log::LogFull) => {
                    self.wake_all();
                    g.append_waiters += 1;
                    g = self.cond.wait(g).expect(crate::POISONED);
                    g.append_waiters -= 1;
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` from the data file, once every
    /// record up to the durable seq at the call is applied: a batch is
    /// acknowledged before it is applied, and a read must not return data
    /// older than an acknowledgement sent before it arrived.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        self.wait_applied(self.durable_seq(), READ_APPLY_WAIT, None)?;
        self.data.read_exact_at(buf, offset).map_err(io_err("read data", &self.dir))
    }

    /// Calls `f` for every durable log record with seq in `from..=to`, in
    /// order, stopping early when `f` returns false. Fails if `from` is at
    /// or below the checkpoint (those records are no longer in the log).
    /// Returns the first seq not delivered.
    pub fn read_log<F>(&self, from: u64, to: u64, mut f: F) -> Result<u64, StoreError>
    where
        F: FnMut(&RecordHeader, &[u8]) -> bool,
    {
        // One snapshot of both: a checkpoint moves the tail and extends
        // the history under the append lock.
        let (history, mut tail, mut first, log_bytes) = {
            let g = lock(&self.inner);
            let sb = lock(&self.sb);
            (g.history, sb.1.log_tail_offset, sb.1.checkpoint_seq + 1, sb.1.log_bytes)
        };
        if from < first {
            // Older records may still be intact behind the tail. If the
            // head overwrites them during the scan, the scan stops at the
            // first record whose check or seq does not follow.
            match history {
                Some(h) if from >= h.first_seq && h.first_seq < first => (tail, first) = (h.offset, h.first_seq),
                Some(h) if h.first_seq < first => return Err(StoreError::NotInLog { from, first: h.first_seq }),
                _ => return Err(StoreError::NotInLog { from, first }),
            }
        }
        let to = to.min(self.durable_seq());
        let mut next = from;
        let stop = io::Error::other("stop");
        let res = log::scan(&self.log_file, log_bytes, tail, first, |h, d| {
            if h.seq > to {
                return Err(io::Error::other("stop"));
            }
            if h.seq >= from {
                if !f(h, d) {
                    return Err(io::Error::other("stop"));
                }
                next = h.seq + 1;
            }
            Ok(())
        });
        match res {
            Ok(_) => Ok(next),
            Err(e) if e.kind() == stop.kind() && e.to_string() == "stop" => Ok(next),
            Err(e) => Err(StoreError::Io { what: "log read", path: self.dir.clone(), source: e }),
        }
    }

    /// Raises the epoch to `epoch`, which must be strictly greater than
    /// the replica's (an epoch is granted once), and persists it. Records
    /// already appended are committed first, and their acks sent, while
    /// appends wait: from the moment the new epoch is on disk nothing is
    /// acknowledged to an older host (`docs/design.md`, "Fencing").
    pub fn set_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let g = self.drained()?;
        let mut sb = lock(&self.sb);
        let mine = sb.1.epoch;
        if !hist::may_raise_epoch(mine, epoch) {
            return Err(StoreError::StaleEpoch { asked: epoch, mine });
        }
        // The ack sink's lock is held while the epoch changes: an ack is
        // checked and sent under it (`commit`), so none can slip out to an
        // older host after the new epoch is on disk.
        let sink = lock(&self.ack_sink);
        let (f, s) = &mut *sb;
        s.update(f, |s| s.epoch = epoch).map_err(|source| StoreError::Superblock { dir: self.dir.clone(), source })?;
        self.epoch.store(epoch, Ordering::Release);
        drop((sink, sb, g));
        Ok(())
    }

    /// Runs `send` (a frame that reports a durable seq, such as CopyDone)
    /// only while the host at `session_epoch` is still the replica's: under
    /// the ack sink's lock, which `set_epoch` holds while the epoch changes,
    /// so nothing reaches a fenced host after the new epoch is on disk.
    /// Returns whether it ran.
    pub fn send_if_current(&self, session_epoch: u64, send: impl FnOnce()) -> bool {
        let _sink = lock(&self.ack_sink);
        if !hist::may_ack(self.epoch(), session_epoch) {
            return false;
        }
        send();
        true
    }

    /// Checks that this replica's log is a prefix of the history of the
    /// host at `session_epoch` (whose last seq is `host_last`), then
    /// follows that history from now on. Returns the durable seq.
    pub fn adopt(&self, session_epoch: u64, host: &hist::History, host_last: u64) -> Result<u64, StoreError> {
        let mut g = self.drained()?;
        let mine = self.epoch();
        if session_epoch < mine {
            return Err(StoreError::StaleEpoch { asked: session_epoch, mine });
        }
        if self.copying() {
            return Err(StoreError::Copy("a copy is half done: the host must resume it (Copy), not Adopt".into()));
        }
        let last = g.last_seq;
        if let Standing::Diverged { after } = hist::standing(host, host_last, &g.follows, last) {
            let epoch = g.follows.epoch_at(last).unwrap_or(0);
            return Err(StoreError::Diverged { after, seq: last, epoch });
        }
        if g.follows != *host {
            self.persist(|sb| sb.history = host.clone())?;
            g.follows = host.clone();
        }
        Ok(self.durable_seq())
    }

    /// Commits everything appended and waits for a running commit, and
    /// returns holding the append lock: nothing is appended or committed
    /// until the guard drops.
    /// New appends wait meanwhile, so the drain ends under any load.
    fn drained(&self) -> Result<Drained<'_>, StoreError> {
        let mut g = lock(&self.inner);
        g.fences += 1;
        loop {
            if let Some(f) = self.failure() {
                g.fences -= 1;
                self.wake_all();
                return Err(StoreError::Failed(f));
            }
            if g.committing || g.checkpointing {
                g.drain_waiters += 1;
                g = self.cond.wait(g).expect(crate::POISONED);
                g.drain_waiters -= 1;
            } else if !g.log.is_idle() {
                self.commit_locked(g);
                g = lock(&self.inner);
            } else {
                return Ok(Drained { store: self, g: Some(g) });
            }
        }
    }

    /// The history the log follows.
    pub fn follows(&self) -> hist::History {
        lock(&self.inner).follows.clone()
    }

    /// Persists a change to the superblock (the cached copy follows only
    /// once it is on disk).
    fn persist(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), StoreError> {
        let mut g = lock(&self.sb);
        let (f, sb) = &mut *g;
        sb.update(f, change).map_err(|source| StoreError::Superblock { dir: self.dir.clone(), source })
    }

    /// Stamps volume identity and replica set. Idempotent for the same
    /// volume; refuses a different one.
    pub fn stamp(
        &self,
        volume: Uuid,
        size_bytes: u64,
        block_size: u32,
        epoch: u64,
        members: Membership,
    ) -> Result<(), StoreError> {
        let mut g = lock(&self.sb);
        let (f, sb) = &mut *g;
        if sb.volume != [0; 16] && sb.volume != volume {
            return Err(StoreError::WrongVolume);
        }
        if size_bytes > sb.size_bytes
            || !size_bytes.is_multiple_of(block_size as u64)
            || !block_size.is_power_of_two()
            || !(512..=65536).contains(&block_size)
        {
            return Err(StoreError::Geometry(format!(
                "volume size {size_bytes} / block size {block_size} does not fit this replica ({} bytes)",
                sb.size_bytes
            )));
        }
        sb.update(f, |sb| {
            sb.volume = volume;
            sb.size_bytes = size_bytes;
            sb.block_size = block_size;
            sb.epoch = sb.epoch.max(epoch);
            sb.members = members.members;
            sb.members_previous = members.previous;
            sb.members_version = members.version;
            sb.members_epoch = members.epoch;
        })
        .map_err(|source| StoreError::Superblock { dir: self.dir.clone(), source })?;
        self.epoch.store(sb.epoch, Ordering::Release);
        Ok(())
    }

    /// Replaces the stored replica set (a membership change of the host at
    /// `epoch`). Refused from a host that is not the replica's current
    /// one, and for a version not above the stored one; the same version
    /// with the same members again is accepted (a retried change).
    pub fn set_members(&self, epoch: u64, next: Membership) -> Result<(), StoreError> {
        let mut g = lock(&self.sb);
        let (f, sb) = &mut *g;
        let stored = Membership {
            epoch: sb.members_epoch,
            version: sb.members_version,
            members: sb.members.clone(),
            previous: Vec::new(),
        };
        match crate::members::accept_members(&stored, sb.epoch, epoch, &next) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(MembersRefusal::StaleEpoch { asked, mine }) => return Err(StoreError::StaleEpoch { asked, mine }),
            Err(MembersRefusal::StaleMembers { asked, mine }) => return Err(StoreError::StaleMembers { asked, mine }),
        }
        sb.update(f, |sb| {
            sb.members = next.members;
            sb.members_previous = next.previous;
            sb.members_version = next.version;
            sb.members_epoch = next.epoch;
        })
        .map_err(|source| StoreError::Superblock { dir: self.dir.clone(), source })
    }

    /// The stored replica set.
    pub fn membership(&self) -> Membership {
        let sb = self.superblock();
        Membership {
            epoch: sb.members_epoch,
            version: sb.members_version,
            members: sb.members,
            previous: sb.members_previous,
        }
    }

    /// Stops the committer after it drains pending records.
    pub fn shutdown(&self) {
        lock(&self.inner).shutdown = true;
        self.wake_all();
    }

    /// Session threads call this when their input runs dry. A small batch
    /// is committed on the calling thread (`INLINE_COMMIT_MAX_BYTES`); a
    /// larger one goes to the committer thread, so the session goes on
    /// receiving while it is written and synced. A running commit leaves
    /// what is pending to the committer (`commit_locked` wakes it).
    pub fn commit_pending(&self) {
        let mut g = lock(&self.inner);
        if g.log.is_idle() || g.committing {
            return;
        }
        if g.log.pending_used_bytes() <= INLINE_COMMIT_MAX_BYTES {
            self.commit_locked(g);
        } else if !g.kicked {
            g.kicked = true;
            self.commit_cond.notify_one();
        }
    }

    /// Takes the batch, commits it without the lock, then books it.
    ///
    /// Nothing commits once the store failed: the failed batch is a hole in
    /// the log and the data file, and a later batch would publish a durable
    /// seq past it (docs/semantics.md §3). Commits are serialised by `committing`, and
    /// a failing commit sets the failure before it clears `committing`, so
    /// this check under the lock sees every earlier failure.
    fn commit_locked(&self, mut g: MutexGuard<'_, Inner>) {
        debug_assert!(!g.committing);
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        g.committing = true;
        g.kicked = false;
        let batch = g.log.take();
        drop(g);
        let res = self.commit(&batch);
        if let Err(e) = &res {
            self.fail(format!("group commit: {e}"));
        }
        let mut g = lock(&self.inner);
        g.committing = false;
        // A failed batch is not applied: no checkpoint may release it.
        if let (Ok(()), Some(last)) = (&res, batch.records.last()) {
            g.applied_seq = last.header.seq;
            g.applied_end = batch.end_offset;
            g.applied_unsynced_bytes += batch.used_bytes;
            g.writeback.add(&batch);
        }
        g.log.recycle(batch);
        // Wake each thread only when there is work for it: the committer
        // for records appended meanwhile, the checkpointer for a checkpoint
        // or writeback due, appenders and drains when some wait. An inline
        // commit at queue depth 1 otherwise costs a futex wake and a
        // committer round trip per write for nothing.
        if g.shutdown {
            self.wake_all();
            return;
        }
        if g.append_waiters + g.drain_waiters > 0 {
            self.cond.notify_all();
        }
        if !g.log.is_idle() {
            self.commit_cond.notify_one();
        }
        if self.needs_checkpoint(&g) || g.writeback.due() {
            self.checkpoint_cond.notify_one();
        }
    }

    /// The committer thread: commits batches nobody committed inline, one
    /// after the other, each taking everything appended meanwhile.
    fn committer(self: Arc<Self>) {
        loop {
            let mut g = lock(&self.inner);
            loop {
                if self.failed.load(Ordering::Acquire) {
                    return;
                }
                if !g.committing && !g.log.is_idle() {
                    break;
                }
                if g.shutdown && g.log.is_idle() && !g.committing {
                    return;
                }
                #[cfg(test)]
                tests::committer_wait_pause(&self.dir);
                g = self.commit_cond.wait(g).expect(crate::POISONED);
            }
            self.commit_locked(g);
        }
    }

    /// The checkpointer thread: takes checkpoints beside the commits, so
    /// that neither waits for the other's sync, and starts writeback of
    /// the data file in between.
    fn checkpointer(self: Arc<Self>) {
        loop {
            let mut g = lock(&self.inner);
            loop {
                if self.failed.load(Ordering::Acquire) {
                    return;
                }
                if self.needs_checkpoint(&g) || g.writeback.due() {
                    break;
                }
                if g.shutdown && g.log.is_idle() && !g.committing {
                    return;
                }
                g = self.checkpoint_cond.wait(g).expect(crate::POISONED);
            }
            if self.needs_checkpoint(&g) {
                if let Err(e) = self.checkpoint(g) {
                    self.fail(format!("checkpoint: {e}"));
                }
            } else {
                let ready = std::mem::take(&mut g.writeback.ready);
                drop(g);
                for (offset, len) in ready {
                    self.writeback(offset, len);
                }
            }
        }
    }

    fn needs_checkpoint(&self, g: &Inner) -> bool {
        // Also when the free space might refuse the largest record plus the
        // wrap waste it can cause: in a log near LOG_MIN_BYTES that happens
        // below half full, and an append waiting for space would wait for a
        // checkpoint that never starts (replica/tests/store_edge_cases.rs).
        let worst = 2 * (MAX_IO_BYTES as u64 + REC_HEADER_BYTES as u64) + g.log.slack_bytes();
        let free = g.log.size_bytes().saturating_sub(g.log.used_bytes());
        g.applied_unsynced_bytes > 0
            && (g.log.used_bytes() * 4 >= g.log.size_bytes() * CHECKPOINT_QUARTERS || free < worst)
    }

    /// Writes and syncs the batch to the log, publishes and acks it, then
    /// applies it to the data file. Reads wait for the apply (`read`).
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        batch.write_durable(self.log_writer(batch)).map_err(io_err("log write", &self.dir))?;
        self.commit_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.publish(batch);
        #[cfg(test)]
        tests::apply_pause();
        let applied = self.apply_batch(batch);
        // A failed apply wakes them too, in `fail` (`commit_locked`).
        self.notify_applied();
        applied
    }

    /// The file a batch is written to: the direct handle for a batch built
    /// in whole blocks (`Log::direct`), the buffered one otherwise.
    fn log_writer(&self, batch: &Batch) -> &DiskFile {
        debug_assert_eq!(batch.is_direct(), self.log_direct.is_some());
        match &self.log_direct {
            Some(f) if batch.is_direct() => f,
            _ => &self.log_file,
        }
    }

    /// How group commits write the log.
    pub fn log_io(&self) -> LogIo {
        if self.log_direct.is_some() {
            LogIo::Direct
        } else {
            LogIo::Buffered
        }
    }

    /// Applies a durable batch to the data file in seq order: runs of large
    /// contiguous records with one direct write each, the rest one by one.
    fn apply_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut rest = &batch.records[..];
        while let Some(p) = rest.first() {
            let direct = self.direct_run(rest);
            let (run, res, what) = if direct > 0 {
                (&rest[..direct], self.apply_direct(batch, &rest[..direct]), "direct apply to data file")
            } else {
                (&rest[..1], self.apply_record(&p.header, batch.data(p)), "apply to data file")
            };
            res.map_err(|e| with_records(e, run)).map_err(io_err(what, &self.dir))?;
            rest = &rest[run.len()..];
        }
        if self.changes.dirty_len() > changes::DIRTY_MAX {
            // Early, without fdatasync: the checkpoint syncs (see `changes`).
            self.changes.flush().map_err(io_err("change map write", &self.dir))?;
        }
        Ok(())
    }

    /// Publishes the durable seq of a batch just synced to the log and
    /// acks it (not during a copy).
    fn publish(&self, batch: &Batch) {
        let last = batch.records.last().map(|p| p.header.seq).unwrap_or(0);
        if self.copying.load(Ordering::Acquire) {
            // Durable in the log (and applied next), but claimed only when
            // the copy ends (`finish_copy`).
            self.count_commit(batch);
            return;
        }
        // A batch that finished after another one failed must not publish
        // past the hole that one left (`docs/design.md`, "Failures").
        let failed_before = self.failed.load(Ordering::Acquire);
        let Some(last) = hist::publish_durable(self.durable_seq(), last, true, failed_before) else {
            return;
        };
        self.durable_seq.store(last, Ordering::Release);
        self.count_commit(batch);
        // Checked and sent under the sink's lock, which `set_epoch` holds
        // while it changes the epoch.
        if let Some(sink) = lock(&self.ack_sink).as_ref() {
            if hist::may_ack(self.epoch(), sink.epoch()) {
                sink.durable(last);
            }
        }
    }

    /// Wakes the threads in [`Store::wait_applied`], if any.
    fn notify_applied(&self) {
        // Pairs with the fence in `wait_applied`: either this sees the
        // waiter, or the waiter sees the new `applied_through`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.applied_waiters.load(Ordering::Relaxed) > 0 {
            let _g = lock(&self.applied_lock);
            self.applied_cond.notify_all();
        }
    }

    /// Starts writeback (no wait) of a data-file range applied since the
    /// last start (`Writeback::due`), on the checkpointer thread: the call
    /// blocks while the device queue is full, which must not hold up a
    /// commit. The checkpoint's fdatasync, still the durability point, then
    /// finds the data file mostly clean. Only `SYNC_FILE_RANGE_WRITE`:
    /// without a wait flag the call neither reports nor consumes a
    /// writeback error, which the next fdatasync reports as before.
    fn writeback(&self, start: u64, len: u64) {
        // SAFETY: sync_file_range reads only its integer arguments; the fd
        // is owned by `self.data` and open for the store's lifetime.
        let rc = unsafe {
            libc::sync_file_range(
                self.data.as_raw_fd(),
                start as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            // A hint only: the checkpoint's fdatasync writes and checks.
            let e = io::Error::last_os_error();
            tracing::debug!(dir = %self.dir.display(), start, len, "sync_file_range: {e}");
        }
    }

    fn count_commit(&self, batch: &Batch) {
        let bytes: u64 = batch.records.iter().map(|p| batch.data(p).len() as u64).sum();
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Applies one committed record to the data file and marks its regions,
    /// holding the locks of those regions.
    fn apply_record(&self, h: &RecordHeader, data: &[u8]) -> io::Result<()> {
        let _held = self.lock_regions(h.offset, h.len as u64);
        apply(&self.data, h, data)?;
        self.note_applied(h);
        self.set_applied(h.seq);
        Ok(())
    }

    /// How many records at the start of `recs` make one direct write: each
    /// large and block-aligned (`DIRECT_APPLY_MIN_BYTES`), each starting
    /// where the one before ended (so none overlaps another and their
    /// order on disk cannot matter), at most `DIRECT_APPLY_RUN_MAX_BYTES`
    /// in all. 0 when the first is not such a record, or nothing is direct.
    fn direct_run(&self, recs: &[log::Pending]) -> usize {
        if self.data_direct.is_none() {
            return 0;
        }
        let block = log::LOG_BLOCK_BYTES as u64;
        let (mut n, mut end, mut bytes) = (0, None, 0);
        for p in recs {
            let h = &p.header;
            let len = h.len as u64;
            let fits = h.op == WriteOp::Data
                && len >= DIRECT_APPLY_MIN_BYTES
                && h.offset.is_multiple_of(block)
                && len.is_multiple_of(block);
            if !fits || end.is_some_and(|e| e != h.offset) || bytes + len > DIRECT_APPLY_RUN_MAX_BYTES {
                break;
            }
            (n, end, bytes) = (n + 1, Some(h.offset + len), bytes + len);
        }
        n
    }

    /// Applies a run from `direct_run`: its data gathered in the aligned
    /// buffer, then one `O_DIRECT` write. The kernel drops any page-cache
    /// copy of the range (writing back dirty pages first), so buffered
    /// reads of the data file see the new bytes.
    fn apply_direct(&self, batch: &Batch, run: &[log::Pending]) -> io::Result<()> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else { return Ok(()) };
        let (file, buf) = self.data_direct.as_ref().expect("direct_run found a direct data file");
        let start = first.header.offset;
        let len = last.header.offset + last.header.len as u64 - start;
        let _held = self.lock_regions(start, len);
        let mut buf = lock(buf);
        buf.clear();
        for p in run {
            buf.extend_from_slice(batch.data(p));
        }
        debug_assert_eq!(buf.as_slice().len() as u64, len);
        file.write_all_at(buf.as_slice(), start)?;
        self.apply_direct_bytes.fetch_add(len, Ordering::Relaxed);
        for p in run {
            self.note_applied(&p.header);
        }
        self.set_applied(last.header.seq);
        Ok(())
    }

    /// Books a record just written to the data file (region locks held).
    fn note_applied(&self, h: &RecordHeader) {
        self.changes.mark_range(h.offset, h.len as u64, h.seq);
        if self.copying.load(Ordering::Acquire) {
            let mut r = lock(&self.recent);
            r.push_back((h.seq, h.offset, h.len as u64));
            if r.len() > RECENT_MAX {
                r.pop_front();
            }
        }
    }

    /// Records applied through `seq`, here and in the read view's page.
    fn set_applied(&self, seq: u64) {
        self.applied_through.store(seq, Ordering::Release);
        if let Some(v) = &self.view {
            v.applied(seq);
        }
    }

    /// The region locks of a byte range, taken in index order.
    fn lock_regions(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let shift = self.changes.header().region_shift;
        let Some((first, last)) = changes::region_span(offset, len, shift) else { return Vec::new() };
        let n = STRIPES as u64;
        if last - first + 1 >= n {
            return self.stripes.iter().map(lock).collect();
        }
        let (a, b) = ((first % n) as usize, (last % n) as usize);
        if a <= b {
            self.stripes[a..=b].iter().map(lock).collect()
        } else {
            self.stripes[..=b].iter().chain(&self.stripes[a..]).map(lock).collect()
        }
    }

    /// fsyncs the data file and moves the log tail past every batch applied
    /// so far. What it releases is fixed before the sync, so a commit that
    /// applies meanwhile keeps its records.
    fn checkpoint(&self, mut g: MutexGuard<'_, Inner>) -> Result<(), StoreError> {
        let (tail, seq, bytes) = (g.applied_end, g.applied_seq, g.applied_unsynced_bytes);
        g.applied_unsynced_bytes = 0;
        // The sync below writes back everything applied so far.
        g.writeback = Writeback::default();
        g.checkpointing = true;
        drop(g);
        #[cfg(test)]
        tests::checkpoint_pause();
        let t0 = Instant::now();
        let synced = self
            .data
            .sync_data()
            .map_err(io_err("data sync", &self.dir))
            .inspect(|()| tracing::debug!(seq, bytes, data_sync_us = t0.elapsed().as_micros() as u64, "checkpoint"))
            // The marks of the released records must be on disk before the
            // log stops replaying them.
            .and_then(|()| self.changes.flush().map_err(io_err("change map write", &self.dir)))
            .and_then(|()| self.changes.sync().map_err(io_err("change map sync", &self.dir)));
        let (old_tail, old_first) = {
            let sb = lock(&self.sb);
            (sb.1.log_tail_offset, sb.1.checkpoint_seq + 1)
        };
        // Under the append lock, so that `read_log` never sees the new tail
        // without the history that keeps the records behind it readable.
        let mut g = lock(&self.inner);
        g.checkpointing = false;
        self.cond.notify_all();
        synced?;
        self.checkpoint_meta(seq, tail)?;
        g.log.release(bytes);
        // The released records join the history behind the new tail.
        g.history = Some(match g.history {
            Some(h) => History { bytes: h.bytes + bytes, ..h },
            None => History { offset: old_tail, first_seq: old_first, bytes },
        });
        self.cond.notify_all();
        Ok(())
    }

    fn record_durable(&self, seq: u64) -> Result<(), StoreError> {
        self.persist(|sb| sb.durable_seq = seq)
    }

    fn checkpoint_meta(&self, seq: u64, tail: u64) -> Result<(), StoreError> {
        self.persist(|sb| {
            sb.checkpoint_seq = seq;
            // During a copy the durable seq stays what it was (see `copying`).
            if sb.copy.is_none() {
                sb.durable_seq = seq;
            }
            sb.log_tail_offset = tail;
        })
    }

    fn fail(&self, why: String) {
        tracing::error!(dir = %self.dir.display(), "replica store failed: {why}");
        *lock(&self.failure) = why;
        self.failed.store(true, Ordering::Release);
        // Every waiter checks `failed` under the append lock and keeps the
        // lock until it sleeps: once we hold it, whoever saw the flag clear
        // is asleep, and the wake-up below reaches it. Never called with
        // the append lock held (both callers dropped it).
        drop(lock(&self.inner));
        self.wake_all();
        self.notify_applied();
    }

    /// Wakes every thread that waits on the append lock: for the rare
    /// events that concern them all (failure, shutdown, a lifted fence,
    /// a full log).
    fn wake_all(&self) {
        self.cond.notify_all();
        self.commit_cond.notify_all();
        self.checkpoint_cond.notify_all();
    }
}

/// What [`Store::apply_copy_region`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyApplied {
    /// The region is copied.
    Done,
    /// Live writes since the copy's as-of seq are no longer remembered:
    /// read the region again, as of at least `min_seq`.
    Retry {
        /// The seq the new read must be as of.
        min_seq: u64,
    },
}

/// Recovery copies (`docs/design.md`, "Recovery"): the replica side, and
/// the source side ([`Store::read_region`]).
impl Store {
    /// Whether a recovery copy runs.
    pub fn copying(&self) -> bool {
        self.copying.load(Ordering::Acquire)
    }

    /// The copy in progress, if any (as last persisted).
    pub fn copy_state(&self) -> Option<CopyState> {
        lock(&self.sb).1.copy.clone()
    }

    /// The copy in progress and the next live seq its log expects.
    pub fn copy_next(&self) -> Option<(CopyKind, u64)> {
        let next = lock(&self.inner).last_seq + 1;
        self.copy_state().map(|c| (c.kind, next))
    }

    /// The first seq `read_log` can still serve (u64::MAX during a copy:
    /// its log does not follow from its durable seq).
    pub fn log_first(&self) -> u64 {
        if self.copying() {
            return u64::MAX;
        }
        let g = lock(&self.inner);
        let first = lock(&self.sb).1.checkpoint_seq + 1;
        match g.history {
            Some(h) if h.first_seq < first => h.first_seq,
            _ => first,
        }
    }

    /// Regions of the volume (the change map may cover more).
    pub fn regions(&self) -> u64 {
        changes::regions_for(lock(&self.sb).1.size_bytes, self.changes.header().region_shift)
    }

    /// Bytes of `region` inside the volume, or None past its end.
    pub fn region_len(&self, region: u64) -> Option<u64> {
        let size = lock(&self.sb).1.size_bytes;
        let rb = self.changes.region_bytes();
        let off = region.checked_mul(rb).filter(|o| *o < size)?;
        Some(rb.min(size - off))
    }

    /// Waits until the records up to `seq` are applied; fails after
    /// `timeout`, when `cancel` is set (checked every few milliseconds), or
    /// when the store fails.
    pub fn wait_applied(&self, seq: u64, timeout: Duration, cancel: Option<&AtomicBool>) -> Result<(), StoreError> {
        if self.applied_through() >= seq {
            return Ok(());
        }
        let t0 = Instant::now();
        self.applied_waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `notify_applied`.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut g = lock(&self.applied_lock);
        let res = loop {
            let applied = self.applied_through();
            if applied >= seq {
                break Ok(());
            }
            if let Some(f) = self.failure() {
                break Err(StoreError::Failed(f));
            }
            let waited = t0.elapsed();
            if waited >= timeout || cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
                break Err(StoreError::Timeout { seq, applied, waited });
            }
            let slice = (timeout - waited).min(Duration::from_millis(20));
            g = self.applied_cond.wait_timeout(g, slice).expect(crate::POISONED).0;
        };
        drop(g);
        self.applied_waiters.fetch_sub(1, Ordering::SeqCst);
        res
    }

    /// Starts (or resumes) a recovery copy for the host at `session_epoch`
    /// whose history is `host` up to `host_last`; the host sends live
    /// writes from `live_from` on. Decides what to copy from this
    /// replica's own log against the host's history (a rollback if it
    /// holds records past their common prefix), persists the plan with the
    /// host's history and a durable seq that claims only that prefix, and
    /// empties the log to take live writes from `live_from`. Returns the
    /// plan.
    pub fn begin_copy(
        &self,
        session_epoch: u64,
        host: &hist::History,
        host_last: u64,
        live_from: u64,
        kind: CopyKind,
    ) -> Result<CopyState, StoreError> {
        let mut g = self.drained()?;
        let mine = self.epoch();
        if session_epoch < mine {
            return Err(StoreError::StaleEpoch { asked: session_epoch, mine });
        }
        if live_from == 0 || live_from > host_last.saturating_add(1) {
            return Err(StoreError::Copy(format!("live writes from {live_from} past the host's last seq {host_last}")));
        }
        // Same-host readers stop before the copy changes the data file.
        if let Some(v) = &self.view {
            v.changing();
        }
        let last = g.last_seq;
        let prev = lock(&self.sb).1.copy.clone();
        let setup = copy_setup(prev.as_ref(), host, host_last, &g.follows, last, live_from, kind, self.regions());
        let (st, keep) = match setup {
            CopySetup::Resume(st) => {
                if g.follows != *host {
                    self.persist(|sb| sb.history = host.clone())?;
                    g.follows = host.clone();
                }
                tracing::info!(dir = %self.dir.display(), kind = %st.kind, cursor = st.cursor, next = last + 1, "recovery copy resumed");
                return Ok(st);
            }
            CopySetup::Begin { state, keep } => (state, keep),
        };
        let base = self.durable_seq().min(keep);
        // The records about to leave the log: their marks must be on disk
        // (a rollback copies the regions they touched).
        self.data.sync_data().map_err(io_err("data sync", &self.dir))?;
        self.changes.flush().map_err(io_err("change map write", &self.dir))?;
        self.changes.sync().map_err(io_err("change map sync", &self.dir))?;
        // A stale record at the new tail must not pass for seq live_from.
        let head = g.log.head();
        let size = g.log.size_bytes();
        let z = (REC_HEADER_BYTES as u64).min(size - head) as usize;
        self.log_file.write_all_at(&[0u8; REC_HEADER_BYTES][..z], head).map_err(io_err("log write", &self.dir))?;
        self.log_file.sync_data().map_err(io_err("log sync", &self.dir))?;
        self.persist(|sb| {
            sb.history = host.clone();
            sb.durable_seq = base;
            sb.checkpoint_seq = live_from - 1;
            sb.log_tail_offset = head;
            sb.copy = Some(st.clone());
        })?;
        g.follows = host.clone();
        g.last_seq = live_from - 1;
        g.applied_seq = live_from - 1;
        g.applied_end = head;
        g.applied_unsynced_bytes = 0;
        g.log.restart(head);
        g.history = None;
        lock(&self.recent).clear();
        self.durable_seq.store(base, Ordering::Release);
        self.set_applied(live_from - 1);
        self.notify_applied();
        self.copying.store(true, Ordering::Release);
        tracing::info!(dir = %self.dir.display(), kind = %st.kind, base, live_from, cursor = st.cursor, segments = st.segments.len(), "recovery copy set up");
        Ok(st)
    }

    /// Raises the marks of regions about to be copied and makes them
    /// durable, before their data is written: a region this replica holds
    /// data of must never have a lower mark on disk (a later rollback
    /// finds the regions to copy again by those marks).
    pub fn premark_copy(&self, marks: &[(u64, u64)]) -> Result<(), StoreError> {
        for &(region, mark) in marks {
            self.changes.mark_region(region, mark);
        }
        self.changes.flush().map_err(io_err("change map write", &self.dir))?;
        self.changes.sync().map_err(io_err("change map sync", &self.dir))
    }

    /// Applies one copied region, read at the source as of `h.as_of`.
    /// Waits until this replica has applied its own live writes up to
    /// that seq, so copied data is never ahead of its log; then, holding
    /// the region's lock, writes the region except the bytes live records
    /// after `as_of` wrote (those are newer than the copy).
    pub fn apply_copy_region(
        &self,
        h: &RegionHeader,
        data: &[u8],
        cancel: &AtomicBool,
    ) -> Result<CopyApplied, StoreError> {
        let off = h.region * self.changes.region_bytes();
        let len = u64::from(h.len);
        if !self.copying() {
            return Err(StoreError::Copy("no copy in progress".into()));
        }
        if self.region_len(h.region) != Some(len) || (!h.zero && data.len() as u64 != len) {
            return Err(StoreError::Copy(format!("region {} of {len} bytes does not fit this volume", h.region)));
        }
        self.wait_applied(h.as_of, Duration::from_secs(60), Some(cancel))?;
        let _held = self.lock_regions(off, len);
        let applied = self.applied_through();
        let mut keep: Vec<(u64, u64)> = Vec::new();
        if applied > h.as_of {
            let recent = lock(&self.recent);
            if recent.front().is_none_or(|&(seq, _, _)| seq > h.as_of + 1) {
                return Ok(CopyApplied::Retry { min_seq: applied });
            }
            for &(seq, o, l) in recent.iter().rev() {
                if seq <= h.as_of {
                    break;
                }
                let (a, b) = (o.max(off), (o + l).min(off + len));
                if a < b {
                    keep.push((a, b));
                }
            }
        }
        keep.sort_unstable();
        let mut at = off;
        let mut runs = Vec::new();
        for (a, b) in keep {
            if a > at {
                runs.push((at, a));
            }
            at = at.max(b);
        }
        if at < off + len {
            runs.push((at, off + len));
        }
        for (a, b) in runs {
            let res = if h.zero {
                punch_hole(&self.data, a, b - a)
            } else {
                self.data.write_all_at(&data[(a - off) as usize..(b - off) as usize], a)
            };
            res.map_err(io_err("copy to data file", &self.dir))?;
        }
        self.changes.mark_region(h.region, h.mark);
        Ok(CopyApplied::Done)
    }

    /// Persists copy progress: every region below `cursor` is done. Syncs
    /// the data file and the change map first.
    pub fn persist_copy(&self, cursor: u64, done_bytes: u64, total_bytes: u64) -> Result<(), StoreError> {
        self.data.sync_data().map_err(io_err("data sync", &self.dir))?;
        self.changes.flush().map_err(io_err("change map write", &self.dir))?;
        self.changes.sync().map_err(io_err("change map sync", &self.dir))?;
        self.persist(|sb| {
            if let Some(c) = &mut sb.copy {
                c.cursor = cursor;
                c.done_bytes = done_bytes;
                c.total_bytes = total_bytes;
            }
        })
    }

    /// Ends a copy whose regions are all done: the replica now holds every
    /// write up to the last live write it applied, which becomes its
    /// durable seq (a checkpoint there) and is acknowledged. Returns it.
    pub fn finish_copy(&self) -> Result<u64, StoreError> {
        let mut g = self.drained()?;
        if !self.copying() {
            return Err(StoreError::Copy("no copy in progress".into()));
        }
        let last = g.last_seq;
        let tail = g.applied_end;
        self.data.sync_data().map_err(io_err("data sync", &self.dir))?;
        self.changes.flush().map_err(io_err("change map write", &self.dir))?;
        self.changes.sync().map_err(io_err("change map sync", &self.dir))?;
        self.persist(|sb| {
            sb.copy = None;
            sb.durable_seq = last;
            sb.checkpoint_seq = last;
            sb.log_tail_offset = tail;
        })?;
        let bytes = g.applied_unsynced_bytes;
        g.log.release(bytes);
        g.applied_unsynced_bytes = 0;
        g.history = None;
        lock(&self.recent).clear();
        self.copying.store(false, Ordering::Release);
        if let Some(v) = &self.view {
            v.settled(self.applied_through());
        }
        self.durable_seq.store(last, Ordering::Release);
        if let Some(sink) = lock(&self.ack_sink).as_ref() {
            if hist::may_ack(self.epoch(), sink.epoch()) {
                sink.durable(last);
            }
        }
        drop(g);
        tracing::info!(dir = %self.dir.display(), durable = last, "recovery copy complete");
        Ok(last)
    }

    /// Source side: reads `region` once the records up to `min_seq` are
    /// applied (waiting up to `timeout`), holding its lock, so that it
    /// holds exactly the records up to the returned `as_of`. All-zero
    /// regions come back without data.
    pub fn read_region(
        &self,
        region: u64,
        min_seq: u64,
        timeout: Duration,
    ) -> Result<(RegionHeader, Vec<u8>), StoreError> {
        if self.copying() {
            return Err(StoreError::Copy("this replica is recovering itself; it is no source".into()));
        }
        let Some(len) = self.region_len(region) else {
            let (size, block_size) = {
                let sb = lock(&self.sb);
                (sb.1.size_bytes, sb.1.block_size)
            };
            let rb = self.changes.region_bytes();
            return Err(StoreError::OutOfRange { offset: region.saturating_mul(rb), len: rb, size, block_size });
        };
        self.wait_applied(min_seq, timeout, None)?;
        let off = region * self.changes.region_bytes();
        let mut buf = vec![0u8; len as usize];
        let (as_of, mark) = {
            let _held = self.lock_regions(off, len);
            let as_of = self.applied_through();
            let mark = self.changes.get(region).map_err(io_err("read change map", &self.dir))?;
            self.data.read_exact_at(&mut buf, off).map_err(io_err("read data", &self.dir))?;
            (as_of, mark)
        };
        debug_assert!(mark <= as_of, "region {region} marked {mark} past what is applied ({as_of})");
        let zero = buf.iter().all(|b| *b == 0);
        if zero {
            buf.clear();
        }
        Ok((RegionHeader { region, mark: mark.min(as_of), as_of, len: len as u32, zero }, buf))
    }

    /// Source side: how many regions in `from..to` were written after
    /// `since`, once the records up to `min_seq` are applied.
    pub fn count_changed(
        &self,
        from: u64,
        to: u64,
        since: u64,
        min_seq: u64,
        timeout: Duration,
    ) -> Result<u64, StoreError> {
        if self.copying() {
            return Err(StoreError::Copy("this replica is recovering itself; it is no source".into()));
        }
        self.wait_applied(min_seq, timeout, None)?;
        self.changes.count(from, to.min(self.regions()), since).map_err(io_err("read change map", &self.dir))
    }

    /// Source side: the regions in `from..to` written after `since`
    /// (at most `max`) once the records up to `min_seq` are applied.
    pub fn changed_regions(
        &self,
        from: u64,
        to: u64,
        since: u64,
        max: usize,
        min_seq: u64,
        timeout: Duration,
    ) -> Result<(Vec<u64>, u64), StoreError> {
        if self.copying() {
            return Err(StoreError::Copy("this replica is recovering itself; it is no source".into()));
        }
        self.wait_applied(min_seq, timeout, None)?;
        self.changes.changed(from, to.min(self.regions()), since, max).map_err(io_err("read change map", &self.dir))
    }
}

/// What [`Store::begin_copy`] does with a copy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySetup {
    /// The copy in progress goes on as it was.
    Resume(CopyState),
    /// A copy (new, or rewound) from cursor 0 of `state`'s plan; the
    /// replica then claims no more than `keep` (the last seq its data
    /// shares with the host's history, below the first live write).
    Begin {
        /// The plan to persist.
        state: CopyState,
        /// The durable seq cap.
        keep: u64,
    },
}

/// Decides how a copy starts (pure, so the fault simulator runs the same
/// decision): `prev` is the copy in progress, `follows`/`last` this
/// replica's history and last seq, `host`/`host_last` the host's, and the
/// host sends live writes from `live_from`. The caller checked
/// `1 <= live_from <= host_last + 1`.
#[allow(clippy::too_many_arguments)]
pub fn copy_setup(
    prev: Option<&CopyState>,
    host: &hist::History,
    host_last: u64,
    follows: &hist::History,
    last: u64,
    live_from: u64,
    kind: CopyKind,
    regions: u64,
) -> CopySetup {
    // The last seq this replica's data shares with the host's history.
    let common = hist::History::common_prefix(host, host_last, follows, last);
    let diverged = common < last;
    let keep = common.min(last).min(live_from - 1);
    if let Some(st) = prev.filter(|_| !diverged && live_from <= last + 1) {
        // Same history, and the host goes on at or before where the log
        // ends (what it resends is dropped as retransmissions): the copy
        // goes on as it was.
        return CopySetup::Resume(st.clone());
    }
    let mut st = match prev {
        // Regions below the cursor are as of `last`; those the host
        // wrote since `keep`, or this replica did (a diverged tail),
        // are copied again.
        Some(st) => CopyState { segments: rewind(st, keep), cursor: 0, ..st.clone() },
        None => CopyState {
            kind: if diverged { CopyKind::Rollback } else { kind },
            live_from,
            cursor: 0,
            done_bytes: 0,
            total_bytes: 0,
            segments: vec![CopySegment { end: regions, since_peer: keep, since_local: keep }],
        },
    };
    if diverged {
        st.kind = CopyKind::Rollback;
    }
    st.live_from = live_from;
    CopySetup::Begin { state: st, keep }
}

/// The plan after the replica's state moved under a copy: the host resumes
/// from another seq than the one its log expects, or the host's history no
/// longer holds its last records. Regions below the old cursor hold every
/// write up to the replica's last live one; of those, the ones written
/// after `keep` (by the host's history, or by this replica's own records
/// that history does not hold) are copied again. The rest of the plan
/// stays, and also takes the regions this replica wrote after `keep`.
fn rewind(st: &CopyState, keep: u64) -> Vec<CopySegment> {
    let mut out = Vec::new();
    if st.cursor > 0 {
        out.push(CopySegment { end: st.cursor, since_peer: keep, since_local: keep });
    }
    for s in st.segments.iter().filter(|s| s.end > st.cursor) {
        out.push(CopySegment { end: s.end, since_peer: s.since_peer.min(keep), since_local: s.since_local.min(keep) });
    }
    while out.len() > COPY_SEGMENTS_MAX {
        // Merging two segments copies a superset of both.
        let b = out.remove(1);
        let a = &mut out[0];
        *a = CopySegment {
            end: b.end,
            since_peer: a.since_peer.min(b.since_peer),
            since_local: a.since_local.min(b.since_local),
        };
    }
    out
}

/// Replays the log after the checkpoint into the data file and syncs it.
/// Returns (next seq, log head, log bytes in use since the tail).
fn replay(
    sb: &Superblock,
    data: &DiskFile,
    log_file: &DiskFile,
    map: Option<&ChangeMap<DiskFile>>,
    p: &Paths,
) -> Result<(u64, u64, u64), StoreError> {
    let size = sb.size_bytes;
    let mut bad = None;
    let (next, head, used) = log::scan(log_file, sb.log_bytes, sb.log_tail_offset, sb.checkpoint_seq + 1, |h, d| {
        if h.offset.checked_add(h.len as u64).is_none_or(|e| e > size) {
            bad = Some(h.seq);
            return Err(io::Error::new(io::ErrorKind::InvalidData, "log record outside volume"));
        }
        apply(data, h, d)?;
        if let Some(m) = map {
            m.mark_range(h.offset, h.len as u64, h.seq);
        }
        Ok(())
    })
    .map_err(io_err("log replay", &p.log))?;
    if let Some(seq) = bad {
        return Err(StoreError::Geometry(format!("log record seq {seq} lies outside the volume")));
    }
    data.sync_data().map_err(io_err("data sync", &p.data))?;
    if next - 1 > sb.checkpoint_seq {
        tracing::info!(from = sb.checkpoint_seq + 1, to = next - 1, "replayed replica log");
    }
    Ok((next, head, used))
}

/// The append side of the log at `head`, and the `O_DIRECT` handle its
/// batches are written through, if any (`docs/on-disk-format.md`, "Log
/// I/O"). A group commit through the page cache copies every record into
/// it first, and that copy was the largest cost of a large write.
/// Buffered where the filesystem refuses direct I/O (open, or the first
/// read), where the log is not a whole number of blocks, and where
/// `STARBLK_LOG_IO=buffered` says so.
fn open_log(sb: &Superblock, head: u64, used: u64, p: &Paths, faults: &Arc<FaultPlan>) -> (Log, Option<DiskFile>) {
    let buffered = || Log::new(sb.log_bytes, head, used);
    if std::env::var_os(LOG_IO_ENV).is_some_and(|v| v == "buffered") {
        return (buffered(), None);
    }
    let direct = direct_log_file(sb, p).and_then(|f| match Log::direct(sb.log_bytes, head, used, &f) {
        Ok(log) => Ok((log, f)),
        Err(e) => Err(format!("a direct read failed: {e}")),
    });
    match direct {
        Ok((log, f)) => (log, Some(DiskFile::new_direct(f, FileKind::Log, faults.clone()))),
        Err(why) => {
            tracing::info!(log = %p.log.display(), "log written through the page cache: {why}");
            (buffered(), None)
        }
    }
}

/// The log opened with `O_DIRECT`, or why it is not.
fn direct_log_file(sb: &Superblock, p: &Paths) -> Result<File, String> {
    if !sb.log_bytes.is_multiple_of(log::LOG_BLOCK_BYTES as u64) {
        return Err("its size is not a whole number of 4 KiB blocks".into());
    }
    if on_tmpfs(&p.log) {
        // No device under it: direct I/O there is the same copy into the
        // same memory, and a direct batch writes whole blocks (measured in
        // the VM bench: SQLite 46.3 and 42.8 tx/s direct against 49.8 and
        // 52.2 buffered, in one boot).
        return Err("it is on tmpfs".into());
    }
    open_direct(&p.log).map_err(|e| format!("O_DIRECT refused: {e}"))
}

/// A store file opened for reading and writing with `O_DIRECT`.
fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path)
}

/// The data file opened again with `O_DIRECT`, for large records, or None
/// (logged) where that is refused, at open or by a first aligned read (a
/// filesystem that takes the flag but not the I/O would otherwise fail
/// the store at its first large write); only called where the log is
/// direct.
fn open_data_direct(p: &Paths, faults: &Arc<FaultPlan>) -> Option<(DiskFile, Mutex<log::AlignedBuf>)> {
    let probe = |f: &File| {
        let mut buf = log::AlignedBuf::default();
        buf.extend_from_slice(&[0; log::LOG_BLOCK_BYTES]);
        FileIo::read_exact_at(f, buf.as_mut_slice(), 0).map(|()| buf)
    };
    match open_direct(&p.data).and_then(|f| probe(&f).map(|buf| (f, buf))) {
        Ok((f, buf)) => Some((DiskFile::new_direct(f, FileKind::Data, faults.clone()), Mutex::new(buf))),
        Err(e) => {
            tracing::info!(data = %p.data.display(), "large writes applied through the page cache: O_DIRECT refused: {e}");
            None
        }
    }
}

/// Whether `path` is on tmpfs (false if that cannot be told).
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and
    // `st` is a writable statfs-sized buffer; statfs writes only into it.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statfs filled `st` when it returned 0.
    rc == 0 && unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// Set to `buffered`, replicas write their log through the page cache even
/// where direct I/O works (to compare the two, or on a filesystem whose
/// direct I/O misbehaves).
pub const LOG_IO_ENV: &str = "STARBLK_LOG_IO";

/// Opens the change map, checking it against the superblock; None if the
/// replica has none (made by an earlier version, or lost).
fn open_changes(
    sb: &Superblock,
    p: &Paths,
    faults: &Arc<FaultPlan>,
) -> Result<Option<ChangeMap<DiskFile>>, StoreError> {
    let f = match OpenOptions::new().read(true).write(true).open(&p.changes) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", &p.changes)(e)),
    };
    let map = ChangeMap::open(DiskFile::new(f, FileKind::Changes, faults.clone()))
        .map_err(io_err("read change map", &p.changes))?;
    let h = map.header();
    let need = changes::regions_for(sb.size_bytes, sb.region_shift);
    if h.region_shift != sb.region_shift || h.regions < need {
        return Err(StoreError::Geometry(format!(
            "change map covers {} regions of {} bytes; the superblock needs {need} of {}",
            h.regions,
            1u64 << h.region_shift,
            1u64 << sb.region_shift
        )));
    }
    Ok(Some(map))
}

/// Creates a change map for a replica that has none, with every region
/// counted as written at `floor`.
fn create_changes(
    sb: &Superblock,
    p: &Paths,
    faults: &Arc<FaultPlan>,
    floor: u64,
) -> Result<ChangeMap<DiskFile>, StoreError> {
    let header = changes::Header {
        region_shift: sb.region_shift,
        regions: changes::regions_for(sb.size_bytes, sb.region_shift),
        floor,
    };
    tracing::warn!(dir = %p.changes.display(), floor, "no change map: creating one that counts every region as written");
    let tmp = p.changes.with_extension("new");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.set_len(header.file_bytes()).map_err(io_err("size", &tmp))?;
    ChangeMap::create(f, header).map_err(io_err("write change map", &tmp))?;
    std::fs::rename(&tmp, &p.changes).map_err(io_err("rename", &p.changes))?;
    if let Some(dir) = p.changes.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", dir))?;
    }
    let f = OpenOptions::new().read(true).write(true).open(&p.changes).map_err(io_err("open", &p.changes))?;
    ChangeMap::open(DiskFile::new(f, FileKind::Changes, faults.clone())).map_err(io_err("read change map", &p.changes))
}

/// The read view of the replica in `dir`, marked changing; `None`, with a
/// warning, if it cannot be created (same-host reads then go over TCP).
fn open_view(dir: &Path) -> Option<ViewWriter> {
    match ViewWriter::open(dir) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "no same-host read view: {e}");
            None
        }
    }
}

/// A write's data on its way into the log.
enum Data<'a> {
    /// Copied into the batch.
    Slice(&'a [u8]),
    /// In a session's receive buffer, from the byte given: large data
    /// stays there when the log goes through the page cache
    /// (`SPLICE_MIN_BYTES`), anything else is copied.
    Received(&'a mut Vec<u8>, usize),
}

impl Data<'_> {
    fn append_to(&mut self, log: &mut log::Log, h: &RecordHeader, data_sum: Option<u64>) -> Result<(), log::LogFull> {
        let len = h.data_bytes();
        match self {
            Data::Slice(d) => log.append_known(h, d, data_sum),
            Data::Received(buf, start) if log.is_direct() || len < SPLICE_MIN_BYTES => {
                log.append_known(h, &buf[*start..*start + len], data_sum)
            }
            Data::Received(buf, start) => log.append_owned(h, buf, *start, data_sum),
        }
    }
}

/// `e`, naming the records whose apply failed: seqs, offset and length.
fn with_records(e: io::Error, recs: &[log::Pending]) -> io::Error {
    let (Some(first), Some(last)) = (recs.first(), recs.last()) else { return e };
    let (a, b) = (&first.header, &last.header);
    let end = b.offset + b.len as u64;
    io::Error::new(e.kind(), format!("seq {}..={} (epoch {}), bytes {}..{end}: {e}", a.seq, b.seq, b.epoch, a.offset))
}

/// Applies one record to the data file.
fn apply(data: &DiskFile, h: &RecordHeader, bytes: &[u8]) -> io::Result<()> {
    match h.op {
        WriteOp::Data => data.write_all_at(bytes, h.offset),
        WriteOp::Discard | WriteOp::WriteZeroes => punch_hole(data, h.offset, h.len as u64),
    }
}

/// Deallocates a range so it reads as zeroes; falls back to writing zeroes
/// where the filesystem cannot punch holes.
fn punch_hole(f: &DiskFile, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `f`.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let zeros = [0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect(crate::POISONED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Volume data is readable by the replica's owner only.
    #[test]
    fn init_keeps_the_data_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("r");
        init(&dir, 4 << 20, LOG_MIN_BYTES).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let p = Paths::new(&dir);
        for f in [&p.data, &p.log, &p.changes, &p.superblock] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        let (_s, _h) = open(&dir);
        assert_eq!(mode(&dir.join(crate::readview::READVIEW_FILE)), 0o600);
    }

    /// A replica directory is served by one store at a time: a second open
    /// would replay the log over data the first has applied since (older
    /// records over newer data). It is refused, by name, and the first
    /// store goes on; once the first is closed the directory opens again.
    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("r");
        init(&dir, 4 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(&dir);
        s.append(1, &rec(1, 0, 4096), &[7u8; 4096]).unwrap();
        wait_durable(&s, 1);
        match Store::open(&dir) {
            Err(e @ StoreError::Busy { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&dir.display().to_string()), "{msg}");
            }
            Err(e) => panic!("second open failed for another reason: {e}"),
            Ok(_) => panic!("a second open of {} was allowed while the first serves", dir.display()),
        }
        // The first store is untouched by the refused open.
        s.append(1, &rec(2, 4096, 4096), &[8u8; 4096]).unwrap();
        wait_durable(&s, 2);
        close(s, h);
        let (s, h) = open(&dir);
        assert_eq!(s.durable_seq(), 2);
        close(s, h);
    }

    /// The log is written out at init, not sparse (see `write_zeros`).
    #[test]
    fn init_writes_the_whole_log() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("r");
        let log_bytes = LOG_MIN_BYTES + 12345;
        init(&dir, 4 << 20, log_bytes).unwrap();
        let m = std::fs::metadata(Paths::new(&dir).log).unwrap();
        assert_eq!(m.len(), log_bytes);
        assert!(m.blocks() * 512 >= log_bytes, "{} of {log_bytes} bytes allocated", m.blocks() * 512);
        // The data file stays sparse: it can be terabytes.
        assert!(std::fs::metadata(Paths::new(&dir).data).unwrap().blocks() < 8);
    }

    /// When set, the next checkpoint reports through the first channel
    /// that it has taken its snapshot and waits for the second.
    static PAUSE: Mutex<Option<Pause>> = Mutex::new(None);

    /// An armed pause: "paused" goes out on the sender, "go" comes in on
    /// the receiver.
    type Pause = (mpsc::Sender<()>, mpsc::Receiver<()>);

    pub(super) fn checkpoint_pause() {
        let taken = lock(&PAUSE).take();
        rendezvous(taken);
    }

    /// Says "paused" through the first channel of an armed pause and
    /// waits for "go" on the second.
    fn rendezvous(armed: Option<Pause>) {
        if let Some((paused, go)) = armed {
            let _ = paused.send(());
            let _ = go.recv();
        }
    }

    /// When set for a store's directory, that store's committer reports
    /// through the first channel when it has found nothing to do and is
    /// about to sleep (holding the append lock), and waits for the second.
    static COMMITTER_WAIT_PAUSE: Mutex<Option<(PathBuf, Pause)>> = Mutex::new(None);

    pub(super) fn committer_wait_pause(dir: &Path) {
        let taken = {
            let mut g = lock(&COMMITTER_WAIT_PAUSE);
            if g.as_ref().is_some_and(|(d, _)| d == dir) {
                g.take()
            } else {
                None
            }
        };
        rendezvous(taken.map(|(_, pause)| pause));
    }

    /// A store that fails while its committer is between its last look at
    /// the failure flag and its sleep still stops the committer and the
    /// checkpointer: the failure's wake-up waits until they sleep, instead
    /// of going out before and reaching nobody.
    #[test]
    fn a_failure_wakes_a_committer_that_was_about_to_sleep() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        let (paused_tx, paused_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *lock(&COMMITTER_WAIT_PAUSE) = Some((s.dir.clone(), (paused_tx, go_rx)));
        // The committer sleeps already: wake it so it looks again.
        s.commit_cond.notify_all();
        paused_rx.recv_timeout(Duration::from_secs(10)).expect("the committer never came back to its wait");
        let s2 = s.clone();
        let failer = std::thread::spawn(move || s2.fail("injected by the test".into()));
        while !s.failed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Give a wake-up that does not wait for the lock time to go out.
        std::thread::sleep(Duration::from_millis(50));
        go_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(h.is_finished(), "the committer and checkpointer still run 5 s after the store failed");
        failer.join().unwrap();
        h.join().unwrap();
    }

    /// CopyDone claims a durable seq: once a newer host's epoch is on disk,
    /// the older host's session hears nothing (the simulator found a
    /// CopyDone that reached a fenced host, seed 1585).
    #[test]
    fn reports_reach_only_the_current_host() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 4 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        s.set_epoch(1).ok();
        let epoch = s.epoch();
        assert!(s.send_if_current(epoch, || {}));
        s.set_epoch(epoch + 1).unwrap();
        let mut sent = false;
        assert!(!s.send_if_current(epoch, || sent = true));
        assert!(!sent, "a fenced host got a report");
        assert!(s.send_if_current(epoch + 1, || sent = true) && sent);
    }

    /// When set, the next commit reports through the first channel that
    /// its batch is durable (and acked) and waits for the second before it
    /// applies the batch.
    static APPLY_PAUSE: Mutex<Option<Pause>> = Mutex::new(None);

    pub(super) fn apply_pause() {
        let taken = lock(&APPLY_PAUSE).take();
        rendezvous(taken);
    }

    /// A batch is acked once it is in the log, before it is applied: a
    /// read that arrives after the ack must wait for the apply, not return
    /// the older data of the data file.
    #[test]
    fn a_read_after_the_ack_waits_for_the_apply() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        let acks = Arc::new(Recorder(1, Mutex::new(Vec::new())));
        s.set_ack_sink(Some(acks.clone()));
        s.append(1, &rec(1, 0, 4096), &[1; 4096]).unwrap();
        wait_durable(&s, 1);
        let (paused_tx, paused_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *lock(&APPLY_PAUSE) = Some((paused_tx, go_rx));
        s.append(1, &rec(2, 0, 4096), &[2; 4096]).unwrap();
        paused_rx.recv_timeout(Duration::from_secs(10)).expect("the commit of seq 2 never reached its apply");
        assert_eq!(acks.1.lock().unwrap().last(), Some(&2), "seq 2 not acked before its apply");
        assert_eq!(s.applied_through(), 1);
        let (done_tx, done_rx) = mpsc::channel();
        let s2 = s.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let res = s2.read(0, &mut buf);
            let _ = done_tx.send(res.map(|()| buf[0]));
        });
        if let Ok(res) = done_rx.recv_timeout(Duration::from_millis(300)) {
            panic!("the read returned {res:?} while seq 2 (acked) was not applied yet");
        }
        go_tx.send(()).unwrap();
        let got = done_rx.recv_timeout(Duration::from_secs(10)).expect("the read never returned");
        assert_eq!(got.unwrap(), 2, "the read returned data older than the ack");
        reader.join().unwrap();
    }

    #[test]
    fn a_copy_ends_after_a_running_checkpoint_not_under_it() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 4 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        s.append(1, &rec(1, 0, 4096), &[1; 4096]).unwrap();
        wait_durable(&s, 1);
        let host = hist::History::new().branch(1, 0);
        s.begin_copy(1, &host, 1, 2, CopyKind::Incremental).unwrap();
        // Live writes until a checkpoint starts, and holds it after its
        // snapshot (before its syncs).
        let (paused_tx, paused_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *lock(&PAUSE) = Some((paused_tx, go_rx));
        let big = vec![5u8; 1 << 20];
        let mut seq = 1;
        loop {
            seq += 1;
            s.append(1, &rec(seq, (seq % 4) << 20, 1 << 20), &big).unwrap();
            s.commit_pending();
            if paused_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                break;
            }
            assert!(seq < 20, "no checkpoint started");
        }
        // More live writes commit behind the checkpoint's snapshot, and
        // the copy ends meanwhile (every region done).
        for _ in 0..4 {
            seq += 1;
            s.append(1, &rec(seq, 0, 4096), &[6; 4096]).unwrap();
            s.commit_pending();
        }
        let s2 = s.clone();
        let finish = std::thread::spawn(move || s2.finish_copy());
        std::thread::sleep(Duration::from_millis(200));
        go_tx.send(()).unwrap();
        let durable = finish.join().unwrap().unwrap();
        // Until the paused checkpoint has had its say.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(durable, seq, "the copy ends at the last live write");
        // The checkpoint that was running must not have put the
        // superblock back to its older snapshot.
        let sb = s.superblock();
        assert!(sb.copy.is_none());
        assert_eq!((sb.durable_seq, s.durable_seq()), (seq, seq), "durable seq went back");
        for more in seq + 1..seq + 8 {
            s.append(1, &rec(more, 0, 1 << 20), &big).unwrap();
        }
        wait_durable(&s, seq + 7);
    }

    fn batch_of(writes: &[(u64, u32)]) -> Batch {
        let records = writes
            .iter()
            .enumerate()
            .map(|(i, &(offset, len))| log::Pending {
                header: rec(i as u64 + 1, offset, len),
                segment: 0,
                data: log::DataAt::Copied(0),
            })
            .collect();
        let mut b = Batch::default();
        b.records = records;
        b
    }

    #[test]
    fn writeback_starts_for_dense_runs_and_leaves_random_writes_to_the_checkpoint() {
        // Sequential 128 KiB writes: a run every 16 MiB, and the one a wrap
        // to the start of the span ends.
        let mut wb = Writeback::default();
        let seq: Vec<(u64, u32)> = (0..200u64).map(|i| (i * 128 * 1024, 128 * 1024)).collect();
        wb.add(&batch_of(&seq));
        assert_eq!(wb.ready, vec![(0, 16 << 20)]);
        wb.add(&batch_of(&[(0, 128 * 1024)]));
        assert_eq!(wb.ready, vec![(0, 16 << 20), (16 << 20, 200 * 128 * 1024 - (16 << 20))]);
        // Random 4 KiB writes over 1 GiB make no run.
        let mut wb = Writeback::default();
        let mut x = 12345u64;
        let random: Vec<(u64, u32)> = (0..20_000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 34) / 4096 * 4096, 4096)
            })
            .collect();
        wb.add(&batch_of(&random));
        assert!(wb.ready.is_empty(), "{:?}", &wb.ready[..wb.ready.len().min(4)]);
    }

    fn rec(seq: u64, offset: u64, len: u32) -> RecordHeader {
        RecordHeader { seq, offset, len, op: WriteOp::Data, epoch: 1 }
    }

    /// Opens the store and follows the history of a host of epoch 1 that
    /// started at seq 0 (what the records of these tests carry).
    fn open(dir: &Path) -> (Arc<Store>, JoinHandle<()>) {
        let (s, h) = Store::open(dir).unwrap();
        s.adopt(1, &hist::History::new().branch(1, 0), u64::MAX).unwrap();
        (s, h)
    }

    /// Stops the committer and drops the store, as a clean shutdown does.
    fn close(s: Arc<Store>, h: JoinHandle<()>) {
        s.shutdown();
        h.join().unwrap();
        drop(s);
    }

    fn wait_durable(s: &Store, seq: u64) {
        for _ in 0..2000 {
            if s.durable_seq() >= seq {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("seq {seq} never became durable");
    }

    #[test]
    fn writes_survive_reopen_and_overlaps_take_higher_seq() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        s.append(1, &rec(1, 0, 8192), &[1u8; 8192]).unwrap();
        s.append(1, &rec(2, 4096, 4096), &[2u8; 4096]).unwrap();
        assert!(matches!(s.append(1, &rec(4, 0, 4096), &[4u8; 4096]), Err(StoreError::SeqGap { .. })));
        wait_durable(&s, 2);
        close(s, h);
        let (s, _h) = open(dir.path());
        assert_eq!(s.durable_seq(), 2);
        let mut buf = [0u8; 8192];
        s.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 1) && buf[4096..].iter().all(|b| *b == 2));
    }

    /// Records whose data sum came from the session's frame check (one
    /// pass over the data, `Log::append_known`) must scan back at the next
    /// open like any other: a wrong check would end the log early there,
    /// and for a peer replaying this log.
    #[test]
    fn records_with_a_known_sum_replay_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        for seq in 1..=6u64 {
            let d = vec![seq as u8; 4096 * (seq as usize % 3 + 1)];
            let r = rec(seq, (seq % 4) * 16384, d.len() as u32);
            s.append_deferred(1, &r, &d, Some(crate::sum::data_sum(&d))).unwrap();
        }
        s.commit_pending();
        wait_durable(&s, 6);
        close(s, h);
        let (s, _h) = open(dir.path());
        assert_eq!(s.durable_seq(), 6);
        let mut entries = Vec::new();
        let next = s
            .read_log(1, 6, |h: &RecordHeader, d: &[u8]| {
                entries.push((h.seq, d[0], d.len()));
                true
            })
            .unwrap();
        assert_eq!(next, 7);
        let want: Vec<_> = (1..=6u64).map(|q| (q, q as u8, 4096 * (q as usize % 3 + 1))).collect();
        assert_eq!(entries, want);
    }

    #[test]
    fn log_wraps_many_times_through_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        let data = vec![7u8; 256 * 1024];
        for seq in 1..=100u64 {
            s.append(1, &rec(seq, (seq % 4) * 256 * 1024, 256 * 1024), &data).unwrap();
        }
        wait_durable(&s, 100);
        assert!(s.superblock().checkpoint_seq > 0, "no checkpoint taken");
    }

    /// An ack sink of one session epoch that records what it was told.
    struct Recorder(u64, Mutex<Vec<u64>>);

    impl AckSink for Recorder {
        fn durable(&self, seq: u64) {
            self.1.lock().unwrap().push(seq);
        }
        fn epoch(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn fence_commits_what_was_appended_then_acks_nothing_to_the_old_epoch() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        let old = Arc::new(Recorder(1, Mutex::new(Vec::new())));
        s.set_ack_sink(Some(old.clone()));
        // Deferred appends: nobody commits them until the fence does.
        for seq in 1..=20 {
            s.append_deferred(1, &rec(seq, (seq % 8) * 4096, 4096), &[seq as u8; 4096], None).unwrap();
        }
        s.set_epoch(2).unwrap();
        // The fence committed all twenty first: the new host's branch point
        // sees them, and their ack went out before the epoch changed.
        assert_eq!(s.durable_seq(), 20);
        let acked = old.1.lock().unwrap().clone();
        assert_eq!(acked.last(), Some(&20));
        // From now on the old host's records are refused, and nothing more
        // is acknowledged to it.
        let err = s.append(1, &rec(21, 0, 4096), &[0; 4096]).unwrap_err();
        assert!(matches!(err, StoreError::StaleEpoch { asked: 1, mine: 2 }), "{err}");
        // An epoch is granted once.
        assert!(matches!(s.set_epoch(2), Err(StoreError::StaleEpoch { asked: 2, mine: 2 })));
        // The new host (epoch 2, branching at 20) writes on; the old sink
        // still installed gets nothing.
        s.adopt(2, &s.follows().branch(2, 20), 20).unwrap();
        let r = RecordHeader { seq: 21, offset: 0, len: 4096, op: WriteOp::Data, epoch: 2 };
        s.append(2, &r, &[9; 4096]).unwrap();
        wait_durable(&s, 21);
        assert_eq!(old.1.lock().unwrap().last(), Some(&20), "acked to a fenced host");
    }

    #[test]
    fn a_record_from_another_history_is_refused_not_dropped_as_a_retransmission() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        for seq in 1..=5 {
            s.append(1, &rec(seq, 0, 4096), &[seq as u8; 4096]).unwrap();
        }
        wait_durable(&s, 5);
        // Host 2 branched at 3: its seq 4 is not this replica's seq 4.
        let host = hist::History::new().branch(1, 0).branch(2, 3);
        assert!(matches!(s.adopt(2, &host, 10), Err(StoreError::Diverged { after: 3, .. })));
        let r = RecordHeader { seq: 4, offset: 0, len: 4096, op: WriteOp::Data, epoch: 2 };
        assert!(matches!(s.append(2, &r, &[4; 4096]), Err(StoreError::Diverged { .. })));
    }

    #[test]
    fn marks_outlive_the_log_and_a_missing_map_counts_everything_as_written() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 4 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        // Region 1 once, then region 3 until the log has wrapped twice.
        s.append(1, &rec(1, 65536, 4096), &[1; 4096]).unwrap();
        let big = vec![3u8; 1 << 20];
        let laps = 2 * LOG_MIN_BYTES / (1 << 20);
        for seq in 2..2 + laps {
            s.append(1, &rec(seq, 3 * 65536, 1 << 20), &big).unwrap();
        }
        wait_durable(&s, 1 + laps);
        assert!(matches!(s.read_log(1, 1, |_, _| true), Err(StoreError::NotInLog { .. })));
        let changed = |s: &Store, since| s.changes().changed(0, 64, since, 64).unwrap().0;
        // A 1 MiB write at 192 KiB touches regions 3..=18.
        assert_eq!(changed(&s, 0), [vec![1], (3..=18).collect::<Vec<u64>>()].concat());
        assert_eq!(changed(&s, 1), (3..=18).collect::<Vec<u64>>());
        close(s, h);
        let (s, h) = open(dir.path());
        assert_eq!(changed(&s, 1), (3..=18).collect::<Vec<u64>>(), "after a restart");
        close(s, h);
        // A replica of the earlier format has no map: every region counts
        // as written at the seq it holds.
        std::fs::remove_file(dir.path().join("changes")).unwrap();
        let (s, _h) = open(dir.path());
        assert_eq!(s.changes().header().floor, 1 + laps);
        assert_eq!(s.changes().count(0, 64, laps).unwrap(), 64);
    }

    #[test]
    fn out_of_range_rejected() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        for (off, len) in [(1 << 20, 4096u32), (u64::MAX - 4095, 4096), (100, 4096), (0, 0)] {
            assert!(matches!(
                s.append(1, &rec(1, off, len), &vec![0; len as usize]),
                Err(StoreError::OutOfRange { .. })
            ));
        }
    }

    /// Reads seqs `from..` from the log; (first seq delivered, count, all
    /// payloads matched their seq).
    fn read_back(s: &Store, from: u64) -> Result<(u64, u64, bool), StoreError> {
        let (mut first, mut n, mut ok) = (0, 0, true);
        s.read_log(from, u64::MAX, |h, d| {
            first = if n == 0 { h.seq } else { first };
            n += 1;
            ok &= d.iter().all(|b| *b == h.seq as u8);
            true
        })?;
        Ok((first, n, ok))
    }

    /// On tmpfs the log goes through the page cache: direct I/O there is
    /// the same copy, with whole blocks to write.
    #[test]
    fn a_log_on_tmpfs_is_written_through_the_page_cache() {
        let shm = Path::new("/dev/shm");
        if !on_tmpfs(shm) {
            eprintln!("SKIP: /dev/shm is not tmpfs here");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        assert_eq!(s.log_io(), LogIo::Buffered);
        close(s, h);
    }

    /// Large block-aligned records go to the data file with direct I/O,
    /// contiguous ones in one write, smaller ones through the page cache,
    /// all in one batch's seq order: whatever mix of them hits the same
    /// bytes, a read (and a reopen's replay) returns the last.
    #[test]
    fn large_writes_applied_directly_keep_seq_order_with_small_ones() {
        let dir = tempfile::tempdir().unwrap();
        let space: u64 = 4 << 20;
        init(dir.path(), space, LOG_MIN_BYTES).unwrap();
        let (s, h) = open(dir.path());
        if s.log_io() != LogIo::Direct || s.data_direct.is_none() {
            eprintln!(
                "SKIP: {} refuses direct I/O, so every write is applied through the page cache",
                dir.path().display()
            );
            return;
        }
        let mut model = vec![0u8; space as usize];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut seq = 0;
        for round in 0..150 {
            // A burst without waiting, so records share batches: a run of
            // contiguous large writes, and small writes and lone large ones
            // over it, in any order.
            let base = next() % (space / 2) / 4096 * 4096;
            let mut ops: Vec<(u64, u32)> = Vec::new();
            let mut at = base;
            for _ in 0..1 + next() % 4 {
                let len = (16 + next() % 48) as u32 * 4096;
                ops.push((at, len));
                at += len as u64;
            }
            for _ in 0..next() % 4 {
                let off = base + next() % (at - base) / 4096 * 4096;
                let len = match next() % 3 {
                    0 => 4096,
                    1 => 32 * 1024,
                    _ => 96 * 1024,
                };
                ops.insert((next() % (ops.len() as u64 + 1)) as usize, (off.min(space - len as u64), len));
            }
            for (off, len) in ops {
                seq += 1;
                let data: Vec<u8> = (0..len).map(|i| (seq as u32 * 7 + i / 512) as u8).collect();
                s.append(1, &rec(seq, off, len), &data).unwrap();
                model[off as usize..off as usize + len as usize].copy_from_slice(&data);
            }
            wait_durable(&s, seq);
            if round % 10 == 9 {
                let mut got = vec![0u8; space as usize];
                s.read(0, &mut got).unwrap();
                assert!(got == model, "after seq {seq}: the data file differs from the writes in seq order");
            }
        }
        let direct = s.apply_direct_bytes.load(Ordering::Relaxed);
        assert!(direct > 0, "no record was applied with direct I/O");
        close(s, h);
        let (s, h) = open(dir.path());
        let mut got = vec![0u8; space as usize];
        s.read(0, &mut got).unwrap();
        assert!(got == model, "after a reopen: the data file differs from the writes in seq order");
        eprintln!("{direct} bytes applied directly");
        close(s, h);
    }

    /// A failed apply names the records it was applying, direct or not.
    #[test]
    fn a_failed_apply_names_its_records() {
        for (len, what) in [(4096u32, "apply to data file"), (128 * 1024, "direct apply to data file")] {
            let dir = tempfile::tempdir().unwrap();
            init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
            let (s, _h) = open(dir.path());
            if len > 4096 && s.data_direct.is_none() {
                eprintln!("SKIP (direct case): {} refuses direct I/O", dir.path().display());
                continue;
            }
            s.faults().arm("data:write:nth=1:eio".parse().unwrap());
            s.append(1, &rec(1, 256 * 1024, len), &vec![1; len as usize]).unwrap();
            let mut failure = None;
            for _ in 0..2000 {
                failure = s.failure();
                if failure.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let failure = failure.expect("the apply never failed");
            let end = 256 * 1024 + len as u64;
            for want in [what, "seq 1..=1 (epoch 1)", &format!("bytes 262144..{end}")] {
                assert!(failure.contains(want), "{failure:?} does not say {want:?}");
            }
        }
    }

    /// A direct commit zeroes its last block past the head: the records
    /// behind the tail that `read_log` still serves must never be in that
    /// padding. Small records one commit at a time bring the head up to
    /// them in steps shorter than a block.
    #[test]
    fn records_behind_the_tail_stay_readable_past_the_padding_of_direct_commits() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        if s.log_io() != LogIo::Direct {
            eprintln!(
                "SKIP: {} refuses direct I/O, so the log is written through the page cache",
                dir.path().display()
            );
            return;
        }
        let mut seq = 0;
        // A data record of `len` bytes, or a discard: a bare header.
        let mut append = |len: Option<u32>| {
            seq += 1;
            let h = match len {
                Some(len) => rec(seq, (seq % 4) * 128 * 1024, len),
                None => RecordHeader { op: WriteOp::Discard, ..rec(seq, 0, 4096) },
            };
            s.append(1, &h, &vec![seq as u8; h.data_bytes()]).unwrap();
            wait_durable(&s, seq);
            seq
        };
        // Large steps while the head is far from the records behind the
        // tail, then steps of one header until it reaches them. The first
        // such history starts at offset 0, a block boundary, which no
        // padding crosses: sweep up to two histories that start inside a
        // block.
        let (mut swept, mut checked) = (0, 0);
        for _ in 0..20_000 {
            let hist = {
                let g = lock(&s.inner);
                let free = g.log.size_bytes() - g.log.used_bytes();
                g.history.map(|h| (h, free.saturating_sub(h.bytes)))
            };
            let last = append(match hist {
                Some((_, room)) if room <= 16 * 1024 => None,
                Some((_, room)) if room <= 512 * 1024 => Some(4096),
                _ => Some(128 * 1024),
            });
            let Some((h, _)) = hist.filter(|(h, _)| h.offset % log::LOG_BLOCK_BYTES as u64 != 0) else { continue };
            match read_back(&s, h.first_seq) {
                Ok((first, n, ok)) => {
                    let want = first == h.first_seq && n > 0 && ok;
                    assert!(want, "after seq {last}: {h:?} is said to be in the log, read gave {n} records from {first}, intact {ok}");
                    checked += 1;
                }
                Err(StoreError::NotInLog { .. }) => swept += 1,
                Err(e) => panic!("after seq {last}: {e}"),
            }
            if swept == 2 {
                break;
            }
        }
        eprintln!("{swept} histories swept, read back {checked} times");
        assert!(swept == 2 && checked > 0, "{swept} histories swept, read back {checked} times");
    }

    #[test]
    fn checkpointed_records_stay_readable_until_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1 << 20, LOG_MIN_BYTES).unwrap();
        let (s, _h) = open(dir.path());
        let record = |seq: u64| (rec(seq, (seq % 4) * 128 * 1024, 128 * 1024), vec![seq as u8; 128 * 1024]);
        // Until the first checkpoint, then a little more.
        let mut seq = 0;
        while s.superblock().checkpoint_seq == 0 {
            seq += 1;
            let (h, d) = record(seq);
            s.append(1, &h, &d).unwrap();
            wait_durable(&s, seq);
        }
        let cp = s.superblock().checkpoint_seq;
        // Behind the tail, yet still readable, contents intact.
        assert_eq!(read_back(&s, 1).unwrap(), (1, seq, true), "checkpoint at {cp}");
        // Enough appends to wrap the log over them: then refused, not garbage.
        for _ in 0..2 * LOG_MIN_BYTES / (128 * 1024) {
            seq += 1;
            let (h, d) = record(seq);
            s.append(1, &h, &d).unwrap();
        }
        wait_durable(&s, seq);
        match read_back(&s, 1) {
            Err(StoreError::NotInLog { from: 1, first }) => {
                let (got_first, n, ok) = read_back(&s, first).unwrap();
                assert!(got_first == first && n == seq - first + 1 && ok, "{first}: {got_first} {n} {ok}");
            }
            other => panic!("seq 1 should be overwritten by now: {other:?}"),
        }
    }
}
