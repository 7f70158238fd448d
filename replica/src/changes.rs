//! The change map: for every region of the volume, the seq of the last
//! write that touched it (`docs/on-disk-format.md`, "changes").
//!
//! It lets a replica answer "which regions were written after seq S"
//! without its log: incremental recovery copies only those regions to a
//! replica that returns at position S, and a rollback re-copies the
//! regions a diverged tail touched.
//!
//! Layout of the `changes` file: a 4 KiB header, then one u64 per *group*
//! of [`GROUP_REGIONS`] regions (the summary: an upper bound of the marks
//! in the group), padded to 4 KiB, then one u64 per region (the marks).
//!
//! Memory stays bounded: the summary is 8 bytes per 512 regions (256 KiB
//! for 1 TiB of 64 KiB regions) and is kept in memory; marks changed since
//! the last flush wait in a map of at most [`DIRTY_MAX`] entries; the
//! marks themselves stay on disk and are read a 4 KiB page at a time when
//! a query reaches a group whose summary says it changed.
//!
//! Durability follows the log: marks are set in memory when a record is
//! applied, and written (and fdatasynced) by every checkpoint before the
//! log tail moves past those records. After a crash the log replay applies
//! the records again and sets their marks again. A mark may reach the file
//! before its checkpoint (an early flush); that is harmless, because only
//! committed records are applied, and replay finds them again.
//!
//! Marks only go up (`max`): a mark that is too high makes a recovery copy
//! a region it did not need; one that is too low would lose a write.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::disk::FileIo;

/// Regions per summary entry: one 4 KiB page of marks.
pub const GROUP_REGIONS: u64 = 512;
/// Bytes of the header.
pub const HEADER_BYTES: u64 = 4096;
/// Marks held in memory before a flush is due (about 10 MiB).
pub const DIRTY_MAX: usize = 256 * 1024;
/// Smallest and largest region (log2): 4 KiB ..= 64 KiB.
pub const REGION_SHIFT_MIN: u32 = 12;
/// See [`REGION_SHIFT_MIN`].
pub const REGION_SHIFT_MAX: u32 = 16;
/// The default region (64 KiB).
pub const REGION_SHIFT_DEFAULT: u32 = 16;

const MAGIC: u64 = u64::from_le_bytes(*b"SBLKCHNG");
const VERSION: u32 = 1;
const PAGE: u64 = 4096;

/// The fixed header of a `changes` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// log2 of the region size.
    pub region_shift: u32,
    /// Regions covered.
    pub regions: u64,
    /// Every region's mark is at least this (a map created for a replica
    /// that already held data: nothing is known, so everything counts as
    /// written at `floor`).
    pub floor: u64,
}

/// Why a header is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than 40 bytes.
    #[error("changes header truncated")]
    Truncated,
    /// Wrong magic.
    #[error("changes header: bad magic")]
    BadMagic,
    /// Checksum mismatch.
    #[error("changes header: bad crc")]
    BadCrc,
    /// Unknown version.
    #[error("changes header: unsupported version {0}")]
    BadVersion(u32),
    /// Region size or count out of range.
    #[error("changes header: region shift {0} or region count {1} out of range")]
    BadGeometry(u32, u64),
}

/// Largest region count a map may have (a 16 TiB volume of 4 KiB regions):
/// keeps the file size computation far from overflow.
pub const REGIONS_MAX: u64 = 1 << 32;

impl Header {
    /// Encodes the 40 meaningful bytes (the rest of the 4 KiB is zero).
    pub fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.region_shift.to_le_bytes());
        b[16..24].copy_from_slice(&self.regions.to_le_bytes());
        b[24..32].copy_from_slice(&self.floor.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks magic, crc, version and geometry.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < 40 {
            return Err(HeaderError::Truncated);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        if u64_at(0) != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if u32_at(32) != crc32c::crc32c(&b[..32]) {
            return Err(HeaderError::BadCrc);
        }
        if u32_at(8) != VERSION {
            return Err(HeaderError::BadVersion(u32_at(8)));
        }
        let h = Header { region_shift: u32_at(12), regions: u64_at(16), floor: u64_at(24) };
        if !(REGION_SHIFT_MIN..=REGION_SHIFT_MAX).contains(&h.region_shift) || h.regions == 0 || h.regions > REGIONS_MAX
        {
            return Err(HeaderError::BadGeometry(h.region_shift, h.regions));
        }
        Ok(h)
    }

    fn groups(&self) -> u64 {
        self.regions.div_ceil(GROUP_REGIONS)
    }

    /// Byte offset of the summary.
    fn summary_offset(&self) -> u64 {
        HEADER_BYTES
    }

    /// Byte offset of the marks.
    fn marks_offset(&self) -> u64 {
        HEADER_BYTES + (self.groups() * 8).div_ceil(PAGE) * PAGE
    }

    /// File length.
    pub fn file_bytes(&self) -> u64 {
        self.marks_offset() + self.groups() * PAGE
    }
}

/// Regions of `1 << shift` bytes that cover `size_bytes`.
pub fn regions_for(size_bytes: u64, shift: u32) -> u64 {
    size_bytes.div_ceil(1 << shift)
}

/// The region indexes a byte range touches (inclusive), or None if empty.
pub fn region_span(offset: u64, len: u64, shift: u32) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    Some((offset >> shift, (offset + len - 1) >> shift))
}

struct Inner {
    /// Upper bound of the marks of each group (dirty ones included).
    summary: Vec<u64>,
    /// Marks set since the last flush.
    dirty: HashMap<u64, u64>,
}

/// An open change map. All methods take `&self`.
pub struct ChangeMap<F: FileIo> {
    file: F,
    header: Header,
    inner: Mutex<Inner>,
    /// Queries read pages under the read side; a flush, which writes pages
    /// and then forgets their dirty marks, holds the write side, so a query
    /// never sees a page before its marks and the dirty map after.
    flushing: RwLock<()>,
}

impl<F: FileIo> ChangeMap<F> {
    /// Writes a fresh map into `file` (zeroed, and already
    /// [`Header::file_bytes`] long: the caller sizes it) and opens it. The
    /// floor is applied when marks are read, not written into the file.
    pub fn create(file: F, header: Header) -> io::Result<ChangeMap<F>> {
        let mut hb = vec![0u8; HEADER_BYTES as usize];
        hb[..40].copy_from_slice(&header.encode());
        file.write_all_at(&hb, 0)?;
        file.sync_data()?;
        ChangeMap::open(file)
    }

    /// Opens a map: reads the header and the summary (not the marks).
    pub fn open(file: F) -> io::Result<ChangeMap<F>> {
        let mut hb = [0u8; 40];
        file.read_exact_at(&mut hb, 0)?;
        let header = Header::decode(&hb).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let groups = header.groups() as usize;
        let mut raw = vec![0u8; groups * 8];
        file.read_exact_at(&mut raw, header.summary_offset())?;
        let summary = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        Ok(ChangeMap {
            file,
            header,
            inner: Mutex::new(Inner { summary, dirty: HashMap::new() }),
            flushing: RwLock::new(()),
        })
    }

    /// The header (geometry and floor).
    pub fn header(&self) -> Header {
        self.header
    }

    /// Region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        1 << self.header.region_shift
    }

    /// The underlying file.
    pub fn file(&self) -> &F {
        &self.file
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect(crate::POISONED)
    }

    /// Records that the byte range was written at `seq`. Ranges past the
    /// map's end are ignored (the store checks ranges before applying).
    pub fn mark_range(&self, offset: u64, len: u64, seq: u64) {
        let Some((first, last)) = region_span(offset, len, self.header.region_shift) else { return };
        let last = last.min(self.header.regions.saturating_sub(1));
        let mut g = self.lock();
        for r in first..=last {
            raise(&mut g, r, seq);
        }
    }

    /// Raises one region's mark to at least `seq`.
    pub fn mark_region(&self, region: u64, seq: u64) {
        if region < self.header.regions {
            raise(&mut self.lock(), region, seq);
        }
    }

    /// Marks waiting for a flush.
    pub fn dirty_len(&self) -> usize {
        self.lock().dirty.len()
    }

    /// One region's mark (at least the floor).
    pub fn get(&self, region: u64) -> io::Result<u64> {
        if region >= self.header.regions {
            return Ok(0);
        }
        let _q = self.flushing.read().expect(crate::POISONED);
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, self.header.marks_offset() + region * 8)?;
        let disk = u64::from_le_bytes(b);
        let dirty = self.lock().dirty.get(&region).copied().unwrap_or(0);
        Ok(disk.max(dirty).max(self.header.floor))
    }

    /// The regions in `from..to` whose mark is above `since`, in order, at
    /// most `max` of them. Returns them and the region to continue from
    /// (`to` when the range is done).
    pub fn changed(&self, from: u64, to: u64, since: u64, max: usize) -> io::Result<(Vec<u64>, u64)> {
        self.scan(from, to, since, max, |_, _| {})
    }

    /// Like [`ChangeMap::changed`], with each region's mark.
    pub fn changed_marks(&self, from: u64, to: u64, since: u64, max: usize) -> io::Result<(Vec<(u64, u64)>, u64)> {
        let mut marks = Vec::new();
        let (_, next) = self.scan(from, to, since, max, |r, m| marks.push((r, m)))?;
        Ok((marks, next))
    }

    /// How many regions in `from..to` have a mark above `since`.
    pub fn count(&self, from: u64, to: u64, since: u64) -> io::Result<u64> {
        let mut n = 0u64;
        let mut at = from;
        while at < to.min(self.header.regions) {
            let (got, next) = self.scan(at, to, since, 1 << 16, |_, _| {})?;
            n += got.len() as u64;
            at = next;
        }
        Ok(n)
    }

    fn scan(
        &self,
        from: u64,
        to: u64,
        since: u64,
        max: usize,
        mut each: impl FnMut(u64, u64),
    ) -> io::Result<(Vec<u64>, u64)> {
        let to = to.min(self.header.regions);
        let mut out = Vec::new();
        let mut r = from;
        let _q = self.flushing.read().expect(crate::POISONED);
        let mut page = vec![0u8; PAGE as usize];
        while r < to {
            if out.len() >= max {
                return Ok((out, r));
            }
            let group = r / GROUP_REGIONS;
            let group_end = ((group + 1) * GROUP_REGIONS).min(to);
            let bound = self.lock().summary[group as usize].max(self.header.floor);
            if bound <= since {
                r = group_end;
                continue;
            }
            self.file.read_exact_at(&mut page, self.header.marks_offset() + group * PAGE)?;
            let g = self.lock();
            while r < group_end && out.len() < max {
                let i = ((r % GROUP_REGIONS) * 8) as usize;
                let disk = u64::from_le_bytes(page[i..i + 8].try_into().expect("8"));
                let m = disk.max(g.dirty.get(&r).copied().unwrap_or(0)).max(self.header.floor);
                if m > since {
                    out.push(r);
                    each(r, m);
                }
                r += 1;
            }
        }
        Ok((out, to))
    }

    /// Writes every dirty mark and the summary entries of their groups to
    /// the file (no fdatasync: see [`ChangeMap::sync`]).
    pub fn flush(&self) -> io::Result<()> {
        let _w = self.flushing.write().expect(crate::POISONED);
        let (dirty, summary) = {
            let mut g = self.lock();
            if g.dirty.is_empty() {
                return Ok(());
            }
            let dirty = std::mem::take(&mut g.dirty);
            (dirty, g.summary.clone())
        };
        let res = self.write_dirty(&dirty, &summary);
        if res.is_err() {
            // Keep them for the next attempt (the store fails anyway).
            let mut g = self.lock();
            for (r, m) in dirty {
                let e = g.dirty.entry(r).or_insert(0);
                *e = (*e).max(m);
            }
        }
        res
    }

    fn write_dirty(&self, dirty: &HashMap<u64, u64>, summary: &[u64]) -> io::Result<()> {
        let mut by_group: Vec<(u64, u64)> = dirty.iter().map(|(r, m)| (*r, *m)).collect();
        by_group.sort_unstable();
        // The summary first (in the same flush: a crash in between is
        // repaired by the log replay, which marks these regions again).
        let mut groups: Vec<u64> = by_group.iter().map(|(r, _)| r / GROUP_REGIONS).collect();
        groups.dedup();
        let mut sp: Vec<u64> = groups.iter().map(|g| g * 8 / PAGE).collect();
        sp.dedup();
        let mut buf = vec![0u8; PAGE as usize];
        for p in sp {
            let first = p * PAGE / 8;
            let n = (summary.len() as u64 - first).min(PAGE / 8) as usize;
            for (i, v) in summary[first as usize..first as usize + n].iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            self.file.write_all_at(&buf[..n * 8], self.header.summary_offset() + p * PAGE)?;
        }
        let mut i = 0;
        while i < by_group.len() {
            let group = by_group[i].0 / GROUP_REGIONS;
            let at = self.header.marks_offset() + group * PAGE;
            self.file.read_exact_at(&mut buf, at)?;
            while i < by_group.len() && by_group[i].0 / GROUP_REGIONS == group {
                let (r, m) = by_group[i];
                let o = ((r % GROUP_REGIONS) * 8) as usize;
                let disk = u64::from_le_bytes(buf[o..o + 8].try_into().expect("8"));
                buf[o..o + 8].copy_from_slice(&disk.max(m).to_le_bytes());
                i += 1;
            }
            self.file.write_all_at(&buf, at)?;
        }
        Ok(())
    }

    /// fdatasync of the file.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn raise(g: &mut Inner, region: u64, seq: u64) {
    let e = g.dirty.entry(region).or_insert(0);
    *e = (*e).max(seq);
    let s = &mut g.summary[(region / GROUP_REGIONS) as usize];
    *s = (*s).max(seq);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::File;

    fn new_map(regions: u64, floor: u64) -> (tempfile::TempDir, ChangeMap<File>) {
        let dir = tempfile::tempdir().unwrap();
        let h = Header { region_shift: 16, regions, floor };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("c"))
            .unwrap();
        f.set_len(h.file_bytes()).unwrap();
        (dir, ChangeMap::create(f, h).unwrap())
    }

    fn reopen(dir: &tempfile::TempDir) -> ChangeMap<File> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join("c")).unwrap();
        ChangeMap::open(f).unwrap()
    }

    #[test]
    fn marks_survive_flush_and_reopen_and_queries_skip_clean_groups() {
        let (dir, m) = new_map(5000, 0);
        m.mark_range(0, 4096, 3);
        m.mark_range(65536 * 1000 - 4096, 8192, 7); // regions 999 and 1000
        m.mark_region(4999, 9);
        assert_eq!(m.changed(0, 5000, 0, 100).unwrap().0, vec![0, 999, 1000, 4999]);
        assert_eq!(m.changed(0, 5000, 3, 100).unwrap().0, vec![999, 1000, 4999]);
        m.flush().unwrap();
        m.sync().unwrap();
        drop(m);
        let m = reopen(&dir);
        assert_eq!(m.changed(0, 5000, 6, 100).unwrap().0, vec![999, 1000, 4999]);
        assert_eq!(m.changed(0, 5000, 0, 2).unwrap(), (vec![0, 999], 1000));
        assert_eq!(m.count(0, 5000, 0).unwrap(), 4);
        assert_eq!(m.get(1000).unwrap(), 7);
        // Marks only go up.
        m.mark_region(1000, 5);
        assert_eq!(m.get(1000).unwrap(), 7);
    }

    #[test]
    fn a_floor_counts_every_region_as_written() {
        let (_dir, m) = new_map(1000, 50);
        assert_eq!(m.count(0, 1000, 49).unwrap(), 1000);
        assert_eq!(m.count(0, 1000, 50).unwrap(), 0);
        m.mark_region(7, 60);
        assert_eq!(m.changed(0, 1000, 50, 10).unwrap().0, vec![7]);
    }

    #[test]
    fn header_rejects_bad_input() {
        let h = Header { region_shift: 16, regions: 10, floor: 0 };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[3] ^= 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::BadMagic));
        let mut b = h.encode();
        b[20] ^= 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::BadCrc));
        let bad = Header { region_shift: 17, ..h }.encode();
        assert!(matches!(Header::decode(&bad), Err(HeaderError::BadGeometry(17, 10))));
        assert_eq!(Header::decode(&b[..10]), Err(HeaderError::Truncated));
    }

    proptest! {
        /// Against a plain vector of marks: any sequence of marks, flushes
        /// and reopens (a reopen forgets what was not flushed, as a crash
        /// does) answers every query like the model of what was flushed
        /// plus what was marked since.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u8..4, 0u64..2100, 1u64..1000), 1..200), since in 0u64..1000) {
            let regions = 2100;
            let (dir, mut m) = new_map(regions, 0);
            let mut flushed = vec![0u64; regions as usize];
            let mut live = flushed.clone();
            for (op, r, seq) in ops {
                match op {
                    0 | 1 => { m.mark_region(r, seq); live[r as usize] = live[r as usize].max(seq); }
                    2 => { m.flush().unwrap(); flushed.clone_from(&live); }
                    _ => { drop(m); m = reopen(&dir); live.clone_from(&flushed); }
                }
            }
            let expect: Vec<u64> = (0..regions).filter(|r| live[*r as usize] > since).collect();
            let mut got = Vec::new();
            let mut at = 0;
            while at < regions {
                let (v, next) = m.changed(at, regions, since, 7).unwrap();
                prop_assert!(next > at || v.is_empty());
                got.extend(v);
                if next == at { break; }
                at = next;
            }
            prop_assert_eq!(&got, &expect);
            prop_assert_eq!(m.count(0, regions, since).unwrap(), expect.len() as u64);
        }
    }
}
