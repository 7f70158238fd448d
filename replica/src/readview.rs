//! The read view: how a host engine on the same machine reads a replica's
//! data file directly, with a `pread`, instead of asking the replica over
//! TCP (`docs/design.md`, "Local reads").
//!
//! The replica keeps a 64-byte page, `readview` in its directory, mapped
//! shared. It publishes there:
//! - `instance`: a random number drawn at every open, reported in
//!   `HelloOk`, so a host binds the page to the session it admitted;
//! - `gen`: a sequence lock. Odd while the data file may hold anything
//!   other than the in-order application of the log (log replay at open,
//!   a recovery copy or rollback); even otherwise;
//! - `applied`: the seq of the last record applied to the data file.
//!
//! A reader takes `gen` (even), checks `applied` covers every completed
//! write to its range, reads, and takes `gen` again: if it moved, the read
//! raced a replay or copy and is thrown away. Records applied in order
//! after the first check only carry newer writes, which a read concurrent
//! with them may or may not see, as on any disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// File name of the page in a replica's directory.
pub const READVIEW_FILE: &str = "readview";
const MAGIC: u64 = u64::from_le_bytes(*b"SBRVIEW1");
const VERSION: u64 = 1;
/// The page file's length; the mapping covers it whole.
const FILE_BYTES: u64 = 4096;

/// The shared page. Every field is a `u64`, so any bytes are a valid value.
#[repr(C)]
struct Page {
    magic: AtomicU64,
    version: AtomicU64,
    instance: AtomicU64,
    gen: AtomicU64,
    applied: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Page>() as u64 <= FILE_BYTES);

/// Why a read view could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReadViewError {
    /// A file could not be opened or mapped.
    #[error("read view {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The page belongs to something else (an older or newer open of the
    /// replica than the session's, another format).
    #[error("read view {path}: {what} is {found:#x}, expected {expected:#x}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Which field.
        what: &'static str,
        /// What the page holds.
        found: u64,
        /// What the session said.
        expected: u64,
    },
}

/// Why a read through the view was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The replica has not applied every write the read must see.
    Behind,
    /// The replica restarted, or is replaying or copying: the data file
    /// may hold older data than its log.
    Changing,
    /// The data is not in the page cache (the read would wait for the disk).
    WouldBlock,
    /// The read itself failed.
    Failed,
}

impl Miss {
    /// Every reason, for counters.
    pub const ALL: [Miss; 4] = [Miss::Behind, Miss::Changing, Miss::WouldBlock, Miss::Failed];

    /// Short name, for status and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Miss::Behind => "behind",
            Miss::Changing => "changing",
            Miss::WouldBlock => "not_cached",
            Miss::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Miss::Behind => "replica has not applied the range's last write",
            Miss::Changing => "replica restarted, replaying or copying",
            Miss::WouldBlock => "data not in the page cache",
            Miss::Failed => "read failed",
        })
    }
}

/// A shared mapping of the page.
struct Mapping {
    map: memmap2::MmapRaw,
}

impl Mapping {
    fn new(file: &File, path: &Path, writable: bool) -> Result<Mapping, ReadViewError> {
        let mut opts = memmap2::MmapOptions::new();
        opts.len(FILE_BYTES as usize);
        let map = if writable { opts.map_raw(file) } else { opts.map_raw_read_only(file) };
        let map = map.map_err(|source| ReadViewError::Io { path: path.to_path_buf(), source })?;
        Ok(Mapping { map })
    }

    fn page(&self) -> &Page {
        // SAFETY: the mapping (read-only on the host side, which only
        // loads) is page-aligned, FILE_BYTES long (at least a
        // `Page`, checked at compile time) and lives as long as `self`.
        // Every field is an atomic u64, valid for any bytes, and the other
        // process touches the page only through atomics too.
        unsafe { &*(self.map.as_ptr() as *const Page) }
    }
}

/// The replica's side: owns the page and publishes its progress.
pub struct ViewWriter {
    map: Mapping,
}

impl ViewWriter {
    /// Creates or reopens the page in `dir` with a fresh instance, and
    /// marks it changing (the open replays the log next). The instance
    /// ties the page to the sessions of this open, which checked the volume.
    pub fn open(dir: &Path) -> Result<ViewWriter, ReadViewError> {
        let path = dir.join(READVIEW_FILE);
        let io = |source| ReadViewError::Io { path: path.clone(), source };
        // Like the data file: only who may read the data needs the page.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.set_len(FILE_BYTES).map_err(io)?;
        let w = ViewWriter { map: Mapping::new(&file, &path, true)? };
        let p = w.map.page();
        w.changing();
        let mut instance = [0u8; 8];
        getrandom::getrandom(&mut instance).map_err(|e| io(io::Error::other(e.to_string())))?;
        p.version.store(VERSION, Ordering::Relaxed);
        p.magic.store(MAGIC, Ordering::Relaxed);
        // Never 0: 0 means "no view" in HelloOk.
        p.instance.store(u64::from_le_bytes(instance).max(1), Ordering::Release);
        Ok(w)
    }

    /// This open's instance.
    pub fn instance(&self) -> u64 {
        self.map.page().instance.load(Ordering::Relaxed)
    }

    /// Marks the data file as changing out of log order. Must precede
    /// every such change.
    pub fn changing(&self) {
        let g = &self.map.page().gen;
        let now = g.load(Ordering::Relaxed);
        // Odd, and never the value a reader took before: a crashed
        // replica may have left it odd.
        g.store(if now.is_multiple_of(2) { now + 1 } else { now + 2 }, Ordering::Relaxed);
        // The new gen is visible before any data-file write that follows.
        fence(Ordering::SeqCst);
    }

    /// The data file again follows the log in order, through `applied`.
    pub fn settled(&self, applied: u64) {
        let p = self.map.page();
        p.applied.store(applied, Ordering::Release);
        let now = p.gen.load(Ordering::Relaxed);
        if !now.is_multiple_of(2) {
            p.gen.store(now + 1, Ordering::Release);
        }
    }

    /// Records applied in order through `seq`.
    pub fn applied(&self, seq: u64) {
        self.map.page().applied.store(seq, Ordering::Release);
    }
}

/// The host's side: the page and the data file, both read-only.
pub struct ReadView {
    map: Mapping,
    data: File,
    instance: u64,
}

impl ReadView {
    /// Opens the view of the replica in `dir`, which must be the open
    /// `instance` that the session's `HelloOk` named.
    pub fn open(dir: &Path, instance: u64) -> Result<ReadView, ReadViewError> {
        let path = dir.join(READVIEW_FILE);
        let file = File::open(&path).map_err(|source| ReadViewError::Io { path: path.clone(), source })?;
        let map = Mapping::new(&file, &path, false)?;
        let data_path = dir.join(crate::store::DATA_FILE);
        let data = File::open(&data_path).map_err(|source| ReadViewError::Io { path: data_path, source })?;
        let p = map.page();
        let fields = [
            ("magic", p.magic.load(Ordering::Acquire), MAGIC),
            ("version", p.version.load(Ordering::Acquire), VERSION),
            ("instance", p.instance.load(Ordering::Acquire), instance),
        ];
        for (what, found, expected) in fields {
            if found != expected {
                return Err(ReadViewError::Mismatch { path, what, found, expected });
            }
        }
        Ok(ReadView { map, data, instance })
    }

    /// Reads `buf.len()` bytes at `offset` if the replica has applied
    /// every write through `need_seq` and changed nothing out of order
    /// meanwhile. Never waits for a disk: data that is not in the page
    /// cache is a [`Miss::WouldBlock`].
    pub fn read(&self, offset: u64, buf: &mut [u8], need_seq: u64) -> Result<(), Miss> {
        self.read_then(offset, buf, need_seq, || {})
    }

    /// [`ReadView::read`], running `after_read` between the read and the
    /// second look at `gen` (tests interleave a replica's change there).
    fn read_then(&self, offset: u64, buf: &mut [u8], need_seq: u64, after_read: impl FnOnce()) -> Result<(), Miss> {
        let p = self.map.page();
        let before = p.gen.load(Ordering::Acquire);
        if !before.is_multiple_of(2) || p.instance.load(Ordering::Acquire) != self.instance {
            return Err(Miss::Changing);
        }
        if p.applied.load(Ordering::Acquire) < need_seq {
            return Err(Miss::Behind);
        }
        read_nowait(&self.data, offset, buf)?;
        after_read();
        // The data read above happened before the second look at gen.
        fence(Ordering::SeqCst);
        if p.gen.load(Ordering::Acquire) != before || p.instance.load(Ordering::Acquire) != self.instance {
            return Err(Miss::Changing);
        }
        Ok(())
    }
}

/// This machine's boot id, from `/proc/sys/kernel/random/boot_id`; `None`
/// where it cannot be read (same-host reads are then off).
pub fn boot_id() -> Option<[u8; 16]> {
    static ID: std::sync::OnceLock<Option<[u8; 16]>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        parse_boot_id(&text)
    })
}

fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

/// `preadv2` with `RWF_NOWAIT` until `buf` is full; a short read or
/// `EAGAIN` means part of it is not cached. Filesystems without
/// `RWF_NOWAIT` (`EOPNOTSUPP`) fall back to a plain `pread`.
fn read_nowait(f: &File, offset: u64, buf: &mut [u8]) -> Result<(), Miss> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        // SAFETY: `iov` points at `rest`, which is valid for writes of its
        // length for the duration of the call; the fd is owned by `f`.
        let n =
            unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, (offset + done as u64) as libc::off_t, libc::RWF_NOWAIT) };
        match n {
            0 => return Err(Miss::Failed),
            n if n > 0 => done += n as usize,
            _ => match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return Err(Miss::WouldBlock),
                Some(libc::EOPNOTSUPP) => {
                    return f.read_exact_at(&mut buf[done..], offset + done as u64).map_err(|_| Miss::Failed)
                }
                Some(libc::EINTR) => {}
                _ => return Err(Miss::Failed),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, ViewWriter) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::store::DATA_FILE), vec![5u8; 8192]).unwrap();
        let w = ViewWriter::open(dir.path()).unwrap();
        (dir, w)
    }

    #[test]
    fn serves_only_settled_and_applied_data() {
        let (dir, w) = setup();
        let v = ReadView::open(dir.path(), w.instance()).unwrap();
        let mut buf = [0u8; 4096];
        assert_eq!(v.read(0, &mut buf, 0), Err(Miss::Changing), "served during the open's replay");
        w.settled(3);
        v.read(4096, &mut buf, 3).unwrap();
        assert_eq!(buf, [5u8; 4096]);
        assert_eq!(v.read(0, &mut buf, 4), Err(Miss::Behind));
        w.applied(4);
        v.read(0, &mut buf, 4).unwrap();
        w.changing();
        assert_eq!(v.read(0, &mut buf, 4), Err(Miss::Changing), "served during a copy");
        w.settled(9);
        v.read(0, &mut buf, 9).unwrap();
    }

    #[test]
    fn a_reopened_replica_is_another_instance() {
        let (dir, w) = setup();
        w.settled(1);
        let v = ReadView::open(dir.path(), w.instance()).unwrap();
        drop(w);
        let w2 = ViewWriter::open(dir.path()).unwrap();
        w2.settled(1);
        let mut buf = [0u8; 512];
        assert_eq!(v.read(0, &mut buf, 1), Err(Miss::Changing), "read through a stale session's view");
        assert!(matches!(
            ReadView::open(dir.path(), w2.instance() ^ 1),
            Err(ReadViewError::Mismatch { what: "instance", .. })
        ));
    }

    #[test]
    fn a_change_during_the_read_discards_it() {
        let (dir, w) = setup();
        w.settled(1);
        let v = ReadView::open(dir.path(), w.instance()).unwrap();
        let mut buf = [0u8; 512];
        // A replay or copy that starts and ends while the read runs.
        let raced = v.read_then(0, &mut buf, 1, || {
            w.changing();
            w.settled(1);
        });
        assert_eq!(raced, Err(Miss::Changing), "kept data read across a replay or copy");
        v.read_then(0, &mut buf, 1, || w.applied(2)).unwrap();
    }

    #[test]
    fn boot_ids_parse() {
        let id = parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(id[0], 0x0f);
        assert_eq!(id[15], 0xf0);
        assert_eq!(parse_boot_id("0f1e2d3c"), None);
        assert_eq!(parse_boot_id("zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None);
    }

    #[test]
    fn a_short_data_file_is_a_miss_not_zeroes() {
        let (dir, w) = setup();
        w.settled(1);
        let v = ReadView::open(dir.path(), w.instance()).unwrap();
        let mut buf = [0u8; 4096];
        assert_eq!(v.read(8192, &mut buf, 1), Err(Miss::Failed));
    }
}
