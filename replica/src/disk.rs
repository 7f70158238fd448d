//! The store's files, with fault injection for tests (docs/semantics.md §12 and
//! "Testing": disk-full and read-error injection in the replica store).
//!
//! [`DiskFile`] wraps a [`File`] and checks a shared [`FaultPlan`] before
//! each write, fdatasync and read. A plan that is not armed costs one
//! relaxed atomic load per call. Tests arm it at runtime through
//! [`crate::store::Store::faults`]; a real replica process arms it from the
//! `STARBLK_FAULT` environment variable when the store opens (syntax in
//! [`parse_faults`] and `docs/operations.md`, "Fault injection (testing)").

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment variable [`FaultPlan::from_env`] reads.
pub const FAULT_ENV: &str = "STARBLK_FAULT";

/// Positional file I/O: what the log scan, the group commit and the
/// superblock need. Implemented by [`File`] and [`DiskFile`].
pub trait FileIo {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes all of `buf` at `offset` and makes it durable, as
    /// `write_all_at` then `sync_data` do.
    fn write_all_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)?;
        self.sync_data()
    }
    /// Writes `parts` one after the other from `offset`, as one write.
    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        as_one_buffer(parts, |b| self.write_all_at(b, offset))
    }
    /// [`Self::write_parts_at`], then durable as `sync_data` makes it.
    fn write_parts_at_durable(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        as_one_buffer(parts, |b| self.write_all_at_durable(b, offset))
    }
}

impl FileIo for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn write_all_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_all_at_dsync(self, buf, offset)
    }
    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        write_parts(self, parts, offset, false)
    }
    fn write_parts_at_durable(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        write_parts(self, parts, offset, true)
    }
}

/// `pwritev2` with `RWF_DSYNC`: the kernel makes the written range durable
/// before the call returns, as an fdatasync after it would (for an
/// `O_DIRECT` overwrite a FUA write, or the write then a cache flush where
/// the device has no FUA), so a group commit is one system call and one
/// sleep fewer. A kernel that refuses the flag gets a write and an
/// fdatasync. Partial writes continue where they stopped; each part is
/// durable when its call returns.
pub fn write_all_at_dsync(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    write_parts(file, &[buf], offset, true)
}

/// Most slices one `pwritev2` takes (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Writes `parts` one after the other from `offset` with `pwritev2`
/// (`RWF_DSYNC` when `dsync`, see [`write_all_at_dsync`]), going on after
/// partial writes, at most [`IOV_MAX`] slices per call.
fn write_parts(file: &File, parts: &[&[u8]], mut offset: u64, dsync: bool) -> io::Result<()> {
    // Next byte to write: part `i`, byte `skip` of it.
    let (mut i, mut skip) = (0, 0);
    while i < parts.len() {
        if parts[i].len() == skip {
            (i, skip) = (i + 1, 0);
            continue;
        }
        let rest = || std::iter::once(&parts[i][skip..]).chain(parts[i + 1..].iter().copied());
        let iov: Vec<libc::iovec> = rest()
            .take(IOV_MAX)
            .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
            .collect();
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: every iovec describes (part of) a slice of `parts`, which
        // outlive the call and which the kernel only reads; `iov` holds
        // `iov.len()` (at most IOV_MAX) of them; the descriptor is `file`'s,
        // open for the whole call.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, off, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS) if dsync => {
                    write_parts(file, &rest().collect::<Vec<_>>(), offset, false)?;
                    return file.sync_data();
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let left = parts[i].len() - skip;
            if n < left {
                skip += n;
                break;
            }
            n -= left;
            (i, skip) = (i + 1, 0);
        }
    }
    Ok(())
}

/// Calls `write` with `parts` in one buffer: how a file that cannot write
/// vectors (or whose faults count one write per call) writes them. One
/// part is passed as it is: a direct write's buffer must stay aligned.
fn as_one_buffer(parts: &[&[u8]], write: impl FnOnce(&[u8]) -> io::Result<()>) -> io::Result<()> {
    match parts {
        [one] => write(one),
        _ => write(&parts.concat()),
    }
}

/// Which of the store's files a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The circular replica log.
    Log,
    /// The data file.
    Data,
    /// The superblock.
    Superblock,
    /// The change map (`changes`).
    Changes,
}

/// Which operation a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// A positional write (one `write_all_at` call).
    Write,
    /// An fdatasync.
    Sync,
    /// A positional read (one `read_exact_at` call).
    Read,
}

/// When a fault fires. Counts start when the fault is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// On the Nth matching operation on the file (1 = the next one).
    Nth(u64),
    /// Writes: on the first write that takes the bytes written to the file
    /// past this many. Syncs: on the first sync once at least this many
    /// bytes were written.
    AfterBytes(u64),
}

/// What a fired fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Fails with EIO; nothing is written.
    Eio,
    /// Fails with ENOSPC; nothing is written.
    Enospc,
    /// Writes a prefix of the buffer, then fails with EIO. The prefix is
    /// what fits below the `after=` boundary, or half the buffer for `nth=`.
    Torn,
    /// Succeeds after waiting `delay`: a slow disk, not a failing one.
    Slow,
}

/// One fault: where, when and what. Fires once unless `sticky`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// File it hits.
    pub file: FileKind,
    /// Operation it hits.
    pub op: FaultOp,
    /// When it fires.
    pub trigger: Trigger,
    /// What it does.
    pub effect: Effect,
    /// Keeps failing every matching operation once fired (a dead disk).
    pub sticky: bool,
    /// Sleeps this long before failing (failing disks are slow).
    pub delay: Duration,
}

impl Fault {
    /// A one-shot fault without delay.
    pub fn new(file: FileKind, op: FaultOp, trigger: Trigger, effect: Effect) -> Fault {
        Fault { file, op, trigger, effect, sticky: false, delay: Duration::ZERO }
    }

    /// The same fault, failing every matching operation once fired.
    pub fn sticky(self) -> Fault {
        Fault { sticky: true, ..self }
    }

    /// The same fault, sleeping `delay` before it fails.
    pub fn delay(self, delay: Duration) -> Fault {
        Fault { delay, ..self }
    }

    fn check(&self) -> Result<(), String> {
        match (self.op, self.trigger, self.effect) {
            (_, Trigger::Nth(0), _) => Err("nth counts from 1".into()),
            (FaultOp::Read, Trigger::AfterBytes(_), _) => Err("read faults take nth=N, not after=".into()),
            (FaultOp::Read, _, Effect::Enospc) => Err("a read cannot fail with enospc; use eio".into()),
            (FaultOp::Read | FaultOp::Sync, _, Effect::Torn) => Err("only a write can be torn".into()),
            (_, _, Effect::Slow) if self.delay.is_zero() => Err("slow needs delay=MS".into()),
            _ => Ok(()),
        }
    }
}

/// A `STARBLK_FAULT` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault {spec:?}: {what}")]
pub struct FaultSpecError {
    /// The fault as written.
    pub spec: String,
    /// What is wrong with it, and what was expected.
    pub what: String,
}

impl FromStr for Fault {
    type Err = FaultSpecError;

    /// Parses `FILE:OP:TRIGGER:EFFECT[:sticky][:delay=MS]`.
    fn from_str(spec: &str) -> Result<Fault, FaultSpecError> {
        let bad = |what: String| FaultSpecError { spec: spec.to_string(), what };
        let fields: Vec<&str> = spec.trim().split(':').map(str::trim).collect();
        if fields.len() < 4 {
            return Err(bad(format!(
                "expected FILE:OP:TRIGGER:EFFECT[:sticky][:delay=MS], got {} field(s)",
                fields.len()
            )));
        }
        let file = match fields[0] {
            "log" => FileKind::Log,
            "data" => FileKind::Data,
            "superblock" | "sb" => FileKind::Superblock,
            "changes" => FileKind::Changes,
            other => return Err(bad(format!("unknown file {other:?} (expected log, data, superblock or changes)"))),
        };
        let op = match fields[1] {
            "write" => FaultOp::Write,
            "sync" => FaultOp::Sync,
            "read" => FaultOp::Read,
            other => return Err(bad(format!("unknown operation {other:?} (expected write, sync or read)"))),
        };
        let trigger = match fields[2].split_once('=') {
            Some(("nth", n)) => {
                Trigger::Nth(n.parse().map_err(|_| bad(format!("nth={n:?} is not a count (expected nth=N, N >= 1)")))?)
            }
            Some(("after", n)) => Trigger::AfterBytes(parse_bytes(n).ok_or_else(|| {
                bad(format!("after={n:?} is not a byte count (expected e.g. after=4096, after=64k, after=8MiB)"))
            })?),
            _ => return Err(bad(format!("unknown trigger {:?} (expected nth=N or after=BYTES)", fields[2]))),
        };
        let effect = match fields[3] {
            "eio" => Effect::Eio,
            "enospc" => Effect::Enospc,
            "torn" => Effect::Torn,
            "slow" => Effect::Slow,
            other => return Err(bad(format!("unknown effect {other:?} (expected eio, enospc, torn or slow)"))),
        };
        let mut fault = Fault::new(file, op, trigger, effect);
        for m in &fields[4..] {
            match m.split_once('=') {
                None if *m == "sticky" => fault.sticky = true,
                Some(("delay", ms)) => {
                    let ms: u64 =
                        ms.parse().map_err(|_| bad(format!("delay={ms:?} is not a number of milliseconds")))?;
                    fault.delay = Duration::from_millis(ms);
                }
                _ => return Err(bad(format!("unknown modifier {m:?} (expected sticky or delay=MS)"))),
            }
        }
        fault.check().map_err(bad)?;
        Ok(fault)
    }
}

impl fmt::Display for Fault {
    /// The spec [`Fault::from_str`] parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = match self.file {
            FileKind::Log => "log",
            FileKind::Data => "data",
            FileKind::Superblock => "superblock",
            FileKind::Changes => "changes",
        };
        let op = match self.op {
            FaultOp::Write => "write",
            FaultOp::Sync => "sync",
            FaultOp::Read => "read",
        };
        let effect = match self.effect {
            Effect::Eio => "eio",
            Effect::Enospc => "enospc",
            Effect::Torn => "torn",
            Effect::Slow => "slow",
        };
        match self.trigger {
            Trigger::Nth(n) => write!(f, "{file}:{op}:nth={n}:{effect}")?,
            Trigger::AfterBytes(n) => write!(f, "{file}:{op}:after={n}:{effect}")?,
        }
        if self.sticky {
            f.write_str(":sticky")?;
        }
        if !self.delay.is_zero() {
            write!(f, ":delay={}", self.delay.as_millis())?;
        }
        Ok(())
    }
}

/// Parses a comma-separated list of faults (the `STARBLK_FAULT` syntax):
/// `FILE:OP:TRIGGER:EFFECT[:sticky][:delay=MS]`, where FILE is `log`,
/// `data`, `superblock` or `changes`; OP is `write`, `sync` or `read`; TRIGGER is
/// `nth=N` or `after=BYTES` (`4096`, `64k`, `8MiB`, `1G`; binary units);
/// EFFECT is `eio`, `enospc`, `torn` or `slow` (succeeds after `delay=MS`).
pub fn parse_faults(s: &str) -> Result<Vec<Fault>, FaultSpecError> {
    s.split(',').filter(|f| !f.trim().is_empty()).map(str::parse).collect()
}

/// `4096`, `64k`, `64KiB`, `8M`, `8MiB`, `1G`, `1GiB` (binary units).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// An armed fault and its counters.
#[derive(Debug)]
struct Armed {
    fault: Fault,
    /// Matching operations seen since arming.
    ops: u64,
    /// Bytes written to the file since arming.
    written: u64,
    fired: bool,
}

/// What an operation must do instead of succeeding.
struct Injected {
    fault: Fault,
    /// Torn writes: bytes to write before failing.
    prefix: usize,
}

impl Injected {
    fn error(&self) -> io::Error {
        let code = match self.fault.effect {
            Effect::Enospc => libc::ENOSPC,
            Effect::Eio | Effect::Torn | Effect::Slow => libc::EIO,
        };
        let base = io::Error::from_raw_os_error(code);
        io::Error::new(base.kind(), format!("{base} [injected fault {}]", self.fault))
    }
}

/// The faults armed on one store, shared by its files. Settable at runtime.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Fast path: false while nothing is armed.
    armed: AtomicBool,
    faults: Mutex<Vec<Armed>>,
    hits: AtomicU64,
}

impl FaultPlan {
    /// An empty plan (nothing armed).
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// A plan armed from `STARBLK_FAULT`, if set and not empty.
    pub fn from_env() -> Result<Arc<FaultPlan>, FaultSpecError> {
        let plan = FaultPlan::new();
        if let Some(v) = std::env::var_os(FAULT_ENV) {
            let v = v.to_str().ok_or_else(|| FaultSpecError {
                spec: v.to_string_lossy().into_owned(),
                what: "not valid UTF-8".into(),
            })?;
            for f in parse_faults(v)? {
                tracing::warn!("{FAULT_ENV}: fault injection armed: {f}");
                plan.arm(f);
            }
        }
        Ok(plan)
    }

    /// Arms `fault`; its counts start now. Faults already armed stay.
    pub fn arm(&self, fault: Fault) {
        if let Err(what) = fault.check() {
            panic!("invalid fault {fault}: {what}");
        }
        let mut g = self.faults.lock().expect(crate::POISONED);
        g.push(Armed { fault, ops: 0, written: 0, fired: false });
        self.armed.store(true, Ordering::Release);
    }

    /// Disarms every fault.
    pub fn disarm(&self) {
        let mut g = self.faults.lock().expect(crate::POISONED);
        g.clear();
        self.armed.store(false, Ordering::Release);
    }

    /// Whether any fault is still armed (a fired one-shot fault is not).
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// How many operations a fault has failed so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Acquire)
    }

    /// Books one operation and says whether it must fail.
    fn check(&self, file: FileKind, op: FaultOp, len: usize) -> Option<Injected> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut g = self.faults.lock().expect(crate::POISONED);
        let mut hit = None;
        for a in g.iter_mut().filter(|a| a.fault.file == file) {
            let written = a.written;
            if op == FaultOp::Write {
                a.written += len as u64;
            }
            if a.fault.op != op || (a.fired && !a.fault.sticky) {
                continue;
            }
            a.ops += 1;
            let (fires, prefix) = match a.fault.trigger {
                Trigger::Nth(n) => (a.fired || a.ops >= n, len / 2),
                Trigger::AfterBytes(n) if op == FaultOp::Write => {
                    (a.fired || written + len as u64 > n, n.saturating_sub(written).min(len as u64) as usize)
                }
                Trigger::AfterBytes(n) => (a.fired || written >= n, 0),
            };
            if fires && hit.is_none() {
                a.fired = true;
                let prefix = if a.fault.effect == Effect::Torn { prefix } else { 0 };
                hit = Some(Injected { fault: a.fault, prefix });
            }
        }
        if hit.is_some() {
            self.hits.fetch_add(1, Ordering::AcqRel);
            if g.iter().all(|a| a.fired && !a.fault.sticky) {
                self.armed.store(false, Ordering::Release);
            }
        }
        hit
    }
}

/// One of the store's files, with the store's fault plan.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    kind: FileKind,
    faults: Arc<FaultPlan>,
    /// Opened with `O_DIRECT`: a torn write tears at a block boundary.
    direct: bool,
}

impl DiskFile {
    /// Wraps `file`, which the store uses as `kind`.
    pub fn new(file: File, kind: FileKind, faults: Arc<FaultPlan>) -> DiskFile {
        DiskFile { file, kind, faults, direct: false }
    }

    /// [`DiskFile::new`] for a file opened with `O_DIRECT`, whose writes
    /// are whole blocks: a torn write keeps whole blocks of its prefix, as
    /// a device tears at its block boundaries (and direct I/O refuses any
    /// other length).
    pub fn new_direct(file: File, kind: FileKind, faults: Arc<FaultPlan>) -> DiskFile {
        DiskFile { file, kind, faults, direct: true }
    }

    /// The file underneath (no fault injection).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Which file this is.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Truncates or extends the file (no fault injection).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// The fault that hits this operation, if any. A `slow` fault is
    /// waited out here and the operation goes ahead (None).
    fn injected(&self, op: FaultOp, len: usize) -> Option<Injected> {
        let inj = self.faults.check(self.kind, op, len)?;
        if inj.fault.effect != Effect::Slow {
            return Some(inj);
        }
        tracing::warn!(file = ?self.kind, "injecting fault {}", inj.fault);
        std::thread::sleep(inj.fault.delay);
        None
    }

    fn fail(&self, inj: &Injected) -> io::Error {
        tracing::warn!(file = ?self.kind, "injecting fault {}", inj.fault);
        if !inj.fault.delay.is_zero() {
            std::thread::sleep(inj.fault.delay);
        }
        inj.error()
    }
}

impl FileIo for DiskFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(inj) = self.injected(FaultOp::Read, buf.len()) {
            return Err(self.fail(&inj));
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(inj) = self.injected(FaultOp::Write, buf.len()) {
            let block = crate::log::LOG_BLOCK_BYTES;
            let prefix = if self.direct { inj.prefix / block * block } else { inj.prefix };
            if prefix > 0 {
                FileExt::write_all_at(&self.file, &buf[..prefix], offset)?;
            }
            return Err(self.fail(&inj));
        }
        FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Some(inj) = self.injected(FaultOp::Sync, 0) {
            return Err(self.fail(&inj));
        }
        File::sync_data(&self.file)
    }

    fn write_all_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.faults.is_armed() {
            // A write fault and a sync fault each hit their own operation.
            self.write_all_at(buf, offset)?;
            return self.sync_data();
        }
        write_all_at_dsync(&self.file, buf, offset)
    }

    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        if self.faults.is_armed() {
            // One fault-counted write, torn at a byte of the whole.
            return as_one_buffer(parts, |b| self.write_all_at(b, offset));
        }
        write_parts(&self.file, parts, offset, false)
    }

    fn write_parts_at_durable(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        if self.faults.is_armed() {
            return as_one_buffer(parts, |b| self.write_all_at_durable(b, offset));
        }
        write_parts(&self.file, parts, offset, true)
    }
}

impl AsRawFd for DiskFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More slices than one `pwritev2` takes, empty ones among them, with
    /// and without `RWF_DSYNC`: the file holds their concatenation.
    #[test]
    fn parts_are_written_one_after_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dir.path().join("f")).unwrap();
        let bytes: Vec<Vec<u8>> = (0..2500u32).map(|i| vec![(i % 251) as u8; (i % 7) as usize]).collect();
        let parts: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let want = parts.concat();
        for (dsync, offset) in [(false, 0u64), (true, 5000)] {
            write_parts(&f, &parts, offset, dsync).unwrap();
            let mut got = vec![0; want.len()];
            FileIo::read_exact_at(&f, &mut got, offset).unwrap();
            assert!(got == want, "dsync {dsync}");
        }
    }

    #[test]
    fn specs_parse_and_print_back() {
        for (spec, want) in [
            ("log:write:after=40MiB:eio", "log:write:after=41943040:eio"),
            ("data:write:nth=3:enospc:sticky", "data:write:nth=3:enospc:sticky"),
            ("data:write:nth=1:slow:sticky:delay=1500", "data:write:nth=1:slow:sticky:delay=1500"),
            ("superblock:sync:nth=1:eio:delay=250", "superblock:sync:nth=1:eio:delay=250"),
            ("log:write:after=64k:torn", "log:write:after=65536:torn"),
            ("data:read:nth=2:eio", "data:read:nth=2:eio"),
            ("log:sync:after=4096:eio", "log:sync:after=4096:eio"),
        ] {
            let f: Fault = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(f.to_string(), want);
            assert_eq!(want.parse::<Fault>().unwrap(), f);
        }
        let list = parse_faults("log:write:nth=1:eio, data:sync:nth=2:eio").unwrap();
        assert_eq!(list.len(), 2);
        assert!(parse_faults("").unwrap().is_empty());
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        for (spec, needle) in [
            ("log:write:nth=1", "got 3 field(s)"),
            ("lgo:write:nth=1:eio", "unknown file \"lgo\""),
            ("log:fsync:nth=1:eio", "unknown operation \"fsync\""),
            ("log:write:every=1:eio", "unknown trigger \"every=1\""),
            ("log:write:nth=x:eio", "nth=\"x\" is not a count"),
            ("log:write:nth=0:eio", "nth counts from 1"),
            ("data:write:nth=1:slow", "slow needs delay=MS"),
            ("log:write:after=40QiB:eio", "after=\"40QiB\" is not a byte count"),
            ("log:write:nth=1:boom", "unknown effect \"boom\""),
            ("log:sync:nth=1:torn", "only a write can be torn"),
            ("data:read:nth=1:enospc", "a read cannot fail with enospc"),
            ("data:read:after=1:eio", "read faults take nth=N"),
            ("log:write:nth=1:eio:forever", "unknown modifier \"forever\""),
            ("log:write:nth=1:eio:delay=soon", "delay=\"soon\""),
        ] {
            let e = parse_faults(spec).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle) && msg.contains(spec), "{spec}: {msg}");
        }
    }

    fn file(dir: &tempfile::TempDir, kind: FileKind, plan: &Arc<FaultPlan>) -> DiskFile {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join(format!("{kind:?}")))
            .unwrap();
        DiskFile::new(f, kind, plan.clone())
    }

    #[test]
    fn nth_write_fails_once_on_its_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let (log, data) = (file(&dir, FileKind::Log, &plan), file(&dir, FileKind::Data, &plan));
        plan.arm(Fault::new(FileKind::Log, FaultOp::Write, Trigger::Nth(2), Effect::Enospc));
        log.write_all_at(&[1; 10], 0).unwrap();
        data.write_all_at(&[1; 10], 0).unwrap();
        let e = log.write_all_at(&[2; 10], 10).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("injected fault log:write:nth=2:enospc"), "{e}");
        assert_eq!(e.kind(), io::Error::from_raw_os_error(libc::ENOSPC).kind());
        assert_eq!(plan.hits(), 1);
        assert!(!plan.is_armed(), "a one-shot fault disarms once fired");
        log.write_all_at(&[3; 10], 10).unwrap();
        log.sync_data().unwrap();
    }

    #[test]
    fn torn_write_after_bytes_writes_up_to_the_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let log = file(&dir, FileKind::Log, &plan);
        plan.arm(Fault::new(FileKind::Log, FaultOp::Write, Trigger::AfterBytes(150), Effect::Torn));
        log.write_all_at(&[1; 100], 0).unwrap();
        log.write_all_at(&[2; 100], 100).unwrap_err();
        assert_eq!(std::fs::metadata(dir.path().join("Log")).unwrap().len(), 150, "the write stops at the boundary");
        let mut buf = vec![0u8; 150];
        log.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|b| *b == 1) && buf[100..].iter().all(|b| *b == 2));
    }

    #[test]
    fn sticky_sync_keeps_failing_until_disarmed() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let sb = file(&dir, FileKind::Superblock, &plan);
        plan.arm("superblock:sync:after=8:eio:sticky".parse().unwrap());
        sb.sync_data().unwrap();
        sb.write_all_at(&[0; 8], 0).unwrap();
        for _ in 0..3 {
            assert!(sb.sync_data().is_err());
        }
        assert_eq!(plan.hits(), 3);
        plan.disarm();
        sb.sync_data().unwrap();
    }

    #[test]
    fn a_durable_write_lands_whole_where_it_was_asked() {
        let dir = tempfile::tempdir().unwrap();
        let log = file(&dir, FileKind::Log, &FaultPlan::new());
        log.write_all_at(&[7; 64], 0).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        log.write_all_at_durable(&data, 40).unwrap();
        let mut back = vec![0u8; 40 + data.len()];
        log.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..40].iter().all(|b| *b == 7), "bytes before the offset are untouched");
        assert_eq!(&back[40..], &data[..]);
    }

    #[test]
    fn a_durable_write_still_meets_write_and_sync_faults() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let log = file(&dir, FileKind::Log, &plan);
        plan.arm("log:sync:nth=1:eio".parse().unwrap());
        let err = log.write_all_at_durable(&[3; 512], 0).unwrap_err();
        assert!(err.to_string().contains("injected fault"), "{err}");
        assert_eq!(plan.hits(), 1, "the sync fault fired on the durable write");
        plan.arm("log:write:nth=1:torn".parse().unwrap());
        let err = log.write_all_at_durable(&[4; 512], 0).unwrap_err();
        assert!(err.to_string().contains("injected fault"), "{err}");
        assert_eq!(plan.hits(), 2, "the write fault fired on the durable write");
    }
}
