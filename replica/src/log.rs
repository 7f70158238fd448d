//! The replica log: a circular file of write records.
//!
//! Records are appended in seq order and made durable by one fdatasync per
//! batch (group commit). A record is valid only if its magic and its check
//! (`crate::sum`) match and its seq is exactly the next one expected, so a scan stops at
//! the first stale or torn record. See `docs/on-disk-format.md`.

use std::io;

use crate::disk::FileIo;
use crate::proto::{WriteOp, MAX_IO_BYTES};

const REC_MAGIC: u32 = u32::from_le_bytes(*b"SLOG");
/// Record header size.
pub const REC_HEADER_BYTES: usize = 40;
/// Smallest log accepted: room for two maximal records, in whole blocks so
/// that it can be written with direct I/O (`LOG_BLOCK_BYTES`).
pub const LOG_MIN_BYTES: u64 =
    (4 * (MAX_IO_BYTES as u64 + REC_HEADER_BYTES as u64)).next_multiple_of(LOG_BLOCK_BYTES as u64);
const KIND_WRAP: u8 = 0xff;
/// Receive buffers a log keeps for reuse (`Log::append_owned`): enough
/// for a batch of large writes at the queue depths the host runs.
const SPARE_PAYLOADS_MAX: usize = 32;

/// One record's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Global seq of the write.
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length of the affected range.
    pub len: u32,
    /// Data, discard or write-zeroes.
    pub op: WriteOp,
    /// Epoch of the HE that issued the write.
    pub epoch: u64,
}

impl RecordHeader {
    /// Bytes of data stored after the header.
    pub fn data_bytes(&self) -> usize {
        if self.op == WriteOp::Data {
            self.len as usize
        } else {
            0
        }
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than a header.
    #[error("truncated record")]
    Truncated,
    /// Wrong magic: end of log or garbage.
    #[error("bad record magic")]
    BadMagic,
    /// Unknown op byte.
    #[error("bad record kind {0}")]
    BadKind(u8),
    /// Length field larger than any valid write.
    #[error("record length {0} out of range")]
    BadLength(u32),
    /// Check mismatch (torn or corrupt record).
    #[error("record check mismatch")]
    BadCheck,
}

/// A decoded header, or the wrap marker that sends the scan to offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A write record.
    Record(RecordHeader, u32),
    /// Wrap marker carrying the seq expected next, and its check.
    Wrap(u64, u32),
}

fn encode_header(kind: u8, len: u32, seq: u64, offset: u64, epoch: u64) -> [u8; REC_HEADER_BYTES] {
    let mut h = [0u8; REC_HEADER_BYTES];
    h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    h[4] = kind;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&offset.to_le_bytes());
    h[32..40].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// A record's check: its header bytes (skipping the check field), then
/// the 64-bit sum of its data (`crate::sum`).
fn record_check(h: &[u8], data_sum: u64) -> u32 {
    crate::sum::check(&[&h[0..12], &h[16..REC_HEADER_BYTES]], data_sum)
}

/// Decodes a record header; the caller then checks the check field with the data.
pub fn decode_header(b: &[u8]) -> Result<Decoded, RecordError> {
    if b.len() < REC_HEADER_BYTES {
        return Err(RecordError::Truncated);
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    if u32_at(0) != REC_MAGIC {
        return Err(RecordError::BadMagic);
    }
    let check = u32_at(12);
    if b[4] == KIND_WRAP {
        return Ok(Decoded::Wrap(u64_at(16), check));
    }
    let op = WriteOp::from_u8(b[4]).ok_or(RecordError::BadKind(b[4]))?;
    let len = u32_at(8);
    if len == 0 || len > MAX_IO_BYTES && op == WriteOp::Data {
        return Err(RecordError::BadLength(len));
    }
    let hdr = RecordHeader { seq: u64_at(16), offset: u64_at(24), len, op, epoch: u64_at(32) };
    Ok(Decoded::Record(hdr, check))
}

/// Checks a record's check field against its header bytes and data.
pub fn verify(header_bytes: &[u8], check: u32, data: &[u8]) -> Result<(), RecordError> {
    if record_check(header_bytes, crate::sum::data_sum(data)) == check {
        Ok(())
    } else {
        Err(RecordError::BadCheck)
    }
}

/// The unit of direct I/O on the log: offsets, lengths and buffers of a
/// direct write are multiples of it (`docs/on-disk-format.md`, "Log I/O").
pub const LOG_BLOCK_BYTES: usize = 4096;

/// How a replica writes its log (`docs/on-disk-format.md`, "Log I/O").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogIo {
    /// With `O_DIRECT`, in whole blocks from the batch's own buffer: no
    /// copy into the page cache.
    Direct,
    /// Through the page cache: where the log is on tmpfs, direct I/O is
    /// refused, the log is not whole blocks, or `STARBLK_LOG_IO=buffered`.
    Buffered,
}

impl std::fmt::Display for LogIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogIo::Direct => "direct",
            LogIo::Buffered => "buffered",
        })
    }
}

/// One log block, aligned in memory as direct I/O needs.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; LOG_BLOCK_BYTES]);

const ZERO_BLOCK: Block = Block([0; LOG_BLOCK_BYTES]);

/// A byte buffer that starts on a block boundary in memory and keeps its
/// blocks when cleared, so a reused buffer is neither zeroed nor moved.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// Every byte of every block, also those past `len`.
    fn whole(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array whose size equals
        // its alignment, so it has no padding: the vector's initialised
        // elements are `blocks.len() * LOG_BLOCK_BYTES` initialised bytes in
        // one allocation, borrowed here for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.blocks.len() * LOG_BLOCK_BYTES) }
    }

    fn whole_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `whole`; the borrow of `self` is exclusive, and any
        // byte pattern is a valid `Block`.
        unsafe {
            std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.blocks.len() * LOG_BLOCK_BYTES)
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.whole()[..self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.whole_mut()[..len]
    }

    pub(crate) fn extend_from_slice(&mut self, b: &[u8]) {
        let end = self.len + b.len();
        let blocks = end.div_ceil(LOG_BLOCK_BYTES);
        if blocks > self.blocks.len() {
            self.blocks.resize(blocks, ZERO_BLOCK);
        }
        let start = self.len;
        self.whole_mut()[start..end].copy_from_slice(b);
        self.len = end;
    }

    /// The bytes up to the end of the last block in use: what a direct
    /// write puts on disk (`zero_pad` first).
    fn blocks(&self) -> &[u8] {
        &self.whole()[..self.len.next_multiple_of(LOG_BLOCK_BYTES)]
    }

    /// Zeroes the bytes between `len` and the end of its block.
    fn zero_pad(&mut self) {
        let (len, end) = (self.len, self.len.next_multiple_of(LOG_BLOCK_BYTES));
        self.whole_mut()[len..end].fill(0);
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// A contiguous run of records to write at one file offset.
#[derive(Debug)]
pub struct Segment {
    /// File offset of the first record byte.
    pub offset: u64,
    /// Bytes before `offset` in its block, exactly as they are on disk
    /// (none when the log is written through the page cache): a direct
    /// write rewrites the whole block, and rewrites them unchanged.
    lead: usize,
    /// The lead, then the encoded records, except the data of spliced ones.
    buf: AlignedBuf,
    /// Data kept in the buffers it was received into, each to be written
    /// at its place in `buf`, in order (only through the page cache:
    /// `Log::append_owned`).
    spliced: Vec<Spliced>,
}

/// A record's data in a buffer of its own: `buf[start..end]` goes to the
/// file between `buf` bytes `..at` and `at..` of its segment.
#[derive(Debug)]
struct Spliced {
    at: usize,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Spliced {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl Segment {
    /// The encoded records, as they go to the file at `offset`: slices to
    /// write one after the other (one, unless data was spliced in).
    pub fn parts(&self) -> Vec<&[u8]> {
        let b = self.buf.as_slice();
        let mut parts = Vec::with_capacity(1 + 2 * self.spliced.len());
        let mut from = self.lead;
        for s in &self.spliced {
            parts.push(&b[from..s.at]);
            parts.push(s.data());
            from = s.at;
        }
        parts.push(&b[from..]);
        parts.retain(|p| !p.is_empty());
        parts
    }

    /// Bytes of records (what goes to the file at `offset`).
    fn records_bytes(&self) -> usize {
        self.buf.len - self.lead + self.spliced.iter().map(|s| s.end - s.start).sum::<usize>()
    }

    /// File offset just past the last record.
    fn end(&self) -> u64 {
        self.offset + self.records_bytes() as u64
    }
}

/// Where a pending record's data sits inside the taken segments.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The record.
    pub header: RecordHeader,
    /// Index into the batch's segments.
    pub segment: usize,
    /// Where its data is in that segment.
    pub data: DataAt,
}

/// Where a pending record's data sits inside its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAt {
    /// Copied into the segment's buffer, from this byte.
    Copied(usize),
    /// Spliced in (`Log::append_owned`): this index in the segment's
    /// spliced buffers.
    Spliced(usize),
}

/// Records taken from the log for one group commit.
#[derive(Debug, Default)]
pub struct Batch {
    /// What to write, in order.
    pub segments: Vec<Segment>,
    /// Every record in the batch, in seq order.
    pub records: Vec<Pending>,
    /// Log head after the batch: the checkpoint tail once it is applied.
    pub end_offset: u64,
    /// Log bytes (with wrap waste) the batch occupies.
    pub used_bytes: u64,
    /// Written in whole blocks with direct I/O (`Log::direct`).
    direct: bool,
}

impl Batch {
    /// The data of one pending record.
    pub fn data(&self, p: &Pending) -> &[u8] {
        let s = &self.segments[p.segment];
        match p.data {
            DataAt::Copied(pos) => &s.buf.as_slice()[pos..pos + p.header.data_bytes()],
            DataAt::Spliced(i) => s.spliced[i].data(),
        }
    }

    /// Whether the batch goes to disk in whole blocks, for a file opened
    /// with `O_DIRECT` (`Log::direct`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Writes every segment and fdatasyncs once: the group commit. A direct
    /// batch writes whole blocks: each segment's lead, its records, and
    /// zeros up to the next block boundary (`Log::take` zeroed them).
    ///
    /// A batch of one segment (all but the one that wraps) is one
    /// `write_all_at_durable`: the write and its sync in one system call
    /// (`docs/performance.md`, "One system call per group commit").
    pub fn write_durable<F: FileIo + ?Sized>(&self, file: &F) -> io::Result<()> {
        if let [s] = &self.segments[..] {
            let (parts, offset) = self.extent(s);
            return file.write_parts_at_durable(&parts, offset);
        }
        for s in &self.segments {
            let (parts, offset) = self.extent(s);
            file.write_parts_at(&parts, offset)?;
        }
        file.sync_data()
    }

    /// What of a segment goes to disk, and where.
    fn extent<'a>(&self, s: &'a Segment) -> (Vec<&'a [u8]>, u64) {
        if self.direct {
            debug_assert!(s.spliced.is_empty(), "direct batches are written from one aligned buffer");
            (vec![s.buf.blocks()], s.offset - s.lead as u64)
        } else {
            (s.parts(), s.offset)
        }
    }
}

/// The log's append side: an in-memory batch that the committer takes.
pub struct Log {
    size_bytes: u64,
    /// Offset where the next record goes.
    head: u64,
    /// Bytes between the checkpoint tail and `head` (including wrap waste).
    used_bytes: u64,
    /// Records appended since the last take.
    batch: Batch,
    /// Emptied segment buffers, reused so steady state does not allocate.
    spare: Vec<AlignedBuf>,
    /// Receive buffers of committed spliced data, handed back to sessions
    /// in exchange for the next ones (`append_owned`), so steady state
    /// neither allocates nor zero-fills them.
    spare_payloads: Vec<Vec<u8>>,
    /// With direct I/O: the block that holds `head`, as it is on disk once
    /// every taken batch is written. A segment that starts inside it
    /// copies its first bytes as its lead.
    head_block: Option<Box<Block>>,
}

/// Append refused: the log needs a checkpoint first.
#[derive(Debug)]
pub struct LogFull;

impl Log {
    /// A log positioned at `head` with `used_bytes` since the tail, written
    /// through the page cache.
    pub fn new(size_bytes: u64, head: u64, used_bytes: u64) -> Log {
        debug_assert!(head < size_bytes && used_bytes <= size_bytes);
        Log {
            size_bytes,
            head,
            used_bytes,
            batch: Batch::default(),
            spare: Vec::new(),
            spare_payloads: Vec::new(),
            head_block: None,
        }
    }

    /// [`Log::new`] for a log file opened with `O_DIRECT`: batches are
    /// written in whole blocks. `file` is read once, for the block that
    /// holds `head` (which also shows that direct I/O works on it). The
    /// size must be a whole number of blocks.
    pub fn direct<F: FileIo + ?Sized>(size_bytes: u64, head: u64, used_bytes: u64, file: &F) -> io::Result<Log> {
        debug_assert!(size_bytes.is_multiple_of(LOG_BLOCK_BYTES as u64));
        let mut block = Box::new(ZERO_BLOCK);
        file.read_exact_at(&mut block.0, head - head % LOG_BLOCK_BYTES as u64)?;
        Ok(Log { head_block: Some(block), ..Log::new(size_bytes, head, used_bytes) })
    }

    /// The same log emptied at `head` (a copy restarts it there), keeping
    /// how it is written and what it knows of the block at `head`.
    pub fn restart(&mut self, head: u64) {
        debug_assert_eq!(head, self.head);
        let block = self.head_block.take();
        *self = Log { head_block: block, ..Log::new(self.size_bytes, head, 0) };
    }

    /// Whether batches are written with direct I/O.
    pub fn is_direct(&self) -> bool {
        self.head_block.is_some()
    }

    /// Bytes in use since the last checkpoint, including the pending batch.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Offset where the next record goes.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Total size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// True if nothing is pending.
    pub fn is_idle(&self) -> bool {
        self.batch.records.is_empty()
    }

    /// Bytes of records pending in the current batch.
    pub fn pending_bytes(&self) -> usize {
        self.batch.segments.iter().map(|s| s.records_bytes()).sum()
    }

    /// Log bytes (records and wrap waste) the pending batch occupies.
    pub fn pending_used_bytes(&self) -> u64 {
        self.batch.used_bytes
    }

    /// Free bytes an append must leave. Through the page cache, one header,
    /// so that head never lands exactly on the tail. With direct I/O, one
    /// block: a batch's last block is padded with zeros past its end, and
    /// the padding must not reach a live record at the tail.
    pub fn slack_bytes(&self) -> u64 {
        if self.is_direct() {
            LOG_BLOCK_BYTES as u64
        } else {
            REC_HEADER_BYTES as u64
        }
    }

    /// Appends one record to the pending batch. Fails if, with wrap waste,
    /// it would overrun the checkpoint tail.
    pub fn append(&mut self, h: &RecordHeader, data: &[u8]) -> Result<(), LogFull> {
        self.append_known(h, data, None)
    }

    /// [`Self::append`] with the data's sum already known (the session
    /// computed it while checking the frame), so the record's check costs
    /// no second pass over the data.
    pub fn append_known(&mut self, h: &RecordHeader, data: &[u8], data_sum: Option<u64>) -> Result<(), LogFull> {
        debug_assert_eq!(data.len(), h.data_bytes());
        let segment = self.append_header(h, crate::sum::data_sum_known(data_sum, &[data]))?;
        let seg = &mut self.batch.segments[segment];
        let at = DataAt::Copied(seg.buf.len);
        seg.buf.extend_from_slice(data);
        self.batch.records.push(Pending { header: *h, segment, data: at });
        Ok(())
    }

    /// [`Self::append_known`] for data that stays in the buffer it was
    /// received into, `buf[start..]`, instead of being copied into the
    /// batch: the batch takes `*buf` and leaves a spare receive buffer (or
    /// an empty one) in its place. Only through the page cache, where the
    /// batch is written with one vectored write (`Batch::write_durable`);
    /// a direct batch must be one aligned buffer.
    pub fn append_owned(
        &mut self,
        h: &RecordHeader,
        buf: &mut Vec<u8>,
        start: usize,
        data_sum: Option<u64>,
    ) -> Result<(), LogFull> {
        assert!(!self.is_direct(), "spliced data in a direct log (seq {})", h.seq);
        let end = start + h.data_bytes();
        let segment = self.append_header(h, crate::sum::data_sum_known(data_sum, &[&buf[start..end]]))?;
        let owned = std::mem::replace(buf, self.spare_payloads.pop().unwrap_or_default());
        let seg = &mut self.batch.segments[segment];
        seg.spliced.push(Spliced { at: seg.buf.len, buf: owned, start, end });
        let at = DataAt::Spliced(seg.spliced.len() - 1);
        self.batch.records.push(Pending { header: *h, segment, data: at });
        Ok(())
    }

    /// Reserves room for a record (wrapping first if it does not fit before
    /// the end of the file), appends its header to the current segment and
    /// moves the head past the record; the caller appends its data next.
    /// Returns the segment's index.
    fn append_header(&mut self, h: &RecordHeader, data_sum: u64) -> Result<usize, LogFull> {
        let need = (REC_HEADER_BYTES + h.data_bytes()) as u64;
        let waste = if self.head + need > self.size_bytes { self.size_bytes - self.head } else { 0 };
        if self.used_bytes + waste + need + self.slack_bytes() > self.size_bytes {
            return Err(LogFull);
        }
        if waste > 0 {
            self.wrap(h.seq, waste);
        }
        let mut hb = encode_header(h.op as u8, h.len, h.seq, h.offset, h.epoch);
        let check = record_check(&hb, data_sum);
        hb[12..16].copy_from_slice(&check.to_le_bytes());
        self.current_segment().buf.extend_from_slice(&hb);
        self.head += need;
        // A record that ends exactly at the end of the file wraps for free.
        if self.head == self.size_bytes {
            self.head = 0;
        }
        debug_assert!(self.head < self.size_bytes);
        self.used_bytes += need;
        self.batch.used_bytes += need;
        Ok(self.batch.segments.len() - 1)
    }

    /// The segment that continues at `head`, opening one if needed.
    fn current_segment(&mut self) -> &mut Segment {
        let head = self.head;
        let fresh = match self.batch.segments.last() {
            Some(s) => s.end() != head,
            None => true,
        };
        if fresh {
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            let lead = match &self.head_block {
                Some(b) => {
                    let lead = (head % LOG_BLOCK_BYTES as u64) as usize;
                    buf.extend_from_slice(&b.0[..lead]);
                    lead
                }
                None => 0,
            };
            self.batch.segments.push(Segment { offset: head, lead, buf, spliced: Vec::new() });
        }
        self.batch.segments.last_mut().expect("segment just ensured")
    }

    /// Writes a wrap marker (if it fits) and moves the head to 0.
    fn wrap(&mut self, next_seq: u64, waste: u64) {
        if waste >= REC_HEADER_BYTES as u64 {
            let mut hb = encode_header(KIND_WRAP, 0, next_seq, 0, 0);
            let check = record_check(&hb, crate::sum::data_sum(&[]));
            hb[12..16].copy_from_slice(&check.to_le_bytes());
            self.current_segment().buf.extend_from_slice(&hb);
        }
        self.used_bytes += waste;
        self.batch.used_bytes += waste;
        self.head = 0;
    }

    /// Takes the pending batch for the committer. With direct I/O, its last
    /// block is zeroed past the last record and becomes the block at the
    /// head: the next batch starts inside it.
    pub fn take(&mut self) -> Batch {
        let mut b = std::mem::take(&mut self.batch);
        b.end_offset = self.head;
        b.direct = self.is_direct();
        let Some(block) = &mut self.head_block else { return b };
        for s in &mut b.segments {
            s.buf.zero_pad();
        }
        if let Some(last) = b.segments.last().filter(|s| !s.end().is_multiple_of(LOG_BLOCK_BYTES as u64)) {
            let bytes = last.buf.blocks();
            block.0.copy_from_slice(&bytes[bytes.len() - LOG_BLOCK_BYTES..]);
        }
        b
    }

    /// Returns a committed batch's buffers for reuse.
    pub fn recycle(&mut self, mut b: Batch) {
        for s in b.segments.drain(..) {
            if self.spare.len() < 4 {
                self.spare.push(s.buf);
            }
            for p in s.spliced {
                if self.spare_payloads.len() < SPARE_PAYLOADS_MAX {
                    self.spare_payloads.push(p.buf);
                }
            }
        }
        b.records.clear();
        if self.batch.records.is_empty() && self.batch.records.capacity() < b.records.capacity() {
            self.batch.records = b.records;
        }
    }

    /// A checkpoint reclaimed `bytes` (the batches applied to the data file).
    pub fn release(&mut self, bytes: u64) {
        debug_assert!(bytes <= self.used_bytes);
        self.used_bytes -= bytes;
    }
}

/// Scans the log from `tail`, calling `f` for each valid record in seq
/// order starting at `first_seq`. Returns (next seq, head offset, used bytes).
pub fn scan<R, F>(file: &R, size_bytes: u64, tail: u64, first_seq: u64, mut f: F) -> io::Result<(u64, u64, u64)>
where
    R: FileIo + ?Sized,
    F: FnMut(&RecordHeader, &[u8]) -> io::Result<()>,
{
    let mut pos = tail;
    let mut expect = first_seq;
    let mut last_epoch = 0u64;
    let mut used = 0u64;
    let mut hb = [0u8; REC_HEADER_BYTES];
    let mut data = Vec::new();
    while used < size_bytes {
        if size_bytes - pos < REC_HEADER_BYTES as u64 {
            used += size_bytes - pos;
            pos = 0;
            continue;
        }
        // A failing read is an error, not the end of the log: stopping
        // there would restart the replica below its durable seq (§3).
        if !read_or_eof(file, &mut hb, pos)? {
            break;
        }
        match decode_header(&hb) {
            Ok(Decoded::Wrap(seq, check)) if seq == expect && pos != 0 && verify(&hb, check, &[]).is_ok() => {
                used += size_bytes - pos;
                pos = 0;
            }
            // Seq u64::MAX is never valid: the seq after it would not fit
            // (found by fuzz/log_record_decoder; first_seq comes off disk).
            // Epochs never go down along the log: a record from an older
            // epoch after a newer one is a leftover of a torn batch that a
            // new HE's shorter history happened to line up with.
            Ok(Decoded::Record(h, check)) if h.seq == expect && expect < u64::MAX && h.epoch >= last_epoch => {
                last_epoch = h.epoch;
                let end = pos + (REC_HEADER_BYTES + h.data_bytes()) as u64;
                if end > size_bytes {
                    break;
                }
                data.resize(h.data_bytes(), 0);
                if !read_or_eof(file, &mut data, pos + REC_HEADER_BYTES as u64)? || verify(&hb, check, &data).is_err() {
                    break;
                }
                f(&h, &data)?;
                used += end - pos;
                pos = end;
                expect += 1;
            }
            _ => break,
        }
    }
    Ok((expect, pos % size_bytes, used))
}

/// Reads `buf` at `pos`; false if the file ends first (a log file shorter
/// than its superblock says ends the log there), an error if the read fails.
fn read_or_eof<R: FileIo + ?Sized>(file: &R, buf: &mut [u8], pos: u64) -> io::Result<bool> {
    match file.read_exact_at(buf, pos) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::fs::File;

    fn rec(seq: u64, len: u32) -> RecordHeader {
        RecordHeader { seq, offset: seq * 4096, len, op: WriteOp::Data, epoch: 1 }
    }

    /// A small deterministic random stream for the tests.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    fn log_file(dir: &tempfile::TempDir, size: u64) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("log"))
            .unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn a_record_with_a_known_data_sum_is_the_same_record() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let mut batches = Vec::new();
        for known in [None, Some(crate::sum::data_sum(&data))] {
            let mut log = Log::new(LOG_MIN_BYTES, 0, 0);
            log.append_known(&rec(1, 8192), &data, known).unwrap();
            let b = log.take();
            batches.push(b.segments.iter().map(|s| s.parts().concat()).collect::<Vec<_>>());
        }
        assert_eq!(batches[0], batches[1]);
    }

    /// A file that checks what direct I/O demands of every write: block
    /// aligned offset, length and buffer address.
    struct Aligned(File);

    impl FileIo for Aligned {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            FileIo::read_exact_at(&self.0, buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let b = LOG_BLOCK_BYTES;
            assert!(
                offset.is_multiple_of(b as u64) && buf.len().is_multiple_of(b),
                "unaligned write of {} at {offset}",
                buf.len()
            );
            assert!((buf.as_ptr() as usize).is_multiple_of(b), "unaligned buffer");
            FileIo::write_all_at(&self.0, buf, offset)
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Every record a scan of `file` finds from `tail`, and where it ends.
    fn records<F: FileIo>(file: &F, size: u64, tail: u64, first: u64) -> (Vec<(u64, u8)>, u64, u64) {
        let mut seen = Vec::new();
        let (next, head, _) = scan(file, size, tail, first, |h, d| {
            seen.push((h.seq, d[0]));
            Ok(())
        })
        .unwrap();
        (seen, next, head)
    }

    /// Batches of random records, with checkpoints that keep the log close
    /// to full, go to one file through the page cache and to another in
    /// whole blocks. After every batch a scan of either file must find
    /// every live record: the padding never reaches a live record, and
    /// every lead is rewritten unchanged. A reopen in the middle reads the
    /// head block back from the direct file.
    #[test]
    fn a_direct_log_holds_the_same_records_as_a_buffered_one() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * LOG_BLOCK_BYTES as u64;
        let fa = log_file(&dir, size);
        let fb = Aligned(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join("direct"))
                .unwrap(),
        );
        fb.0.set_len(size).unwrap();
        let (mut a, mut b) = (Log::new(size, 0, 0), Log::direct(size, 0, 0, &fb).unwrap());
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        // Batches not yet checkpointed: (log bytes, end offset, last seq).
        let mut fulls = 0;
        let (mut held, mut tail, mut first, mut seq) = (VecDeque::new(), 0u64, 1u64, 1u64);
        for round in 0..2000 {
            let mut full = false;
            for _ in 0..1 + next() % 6 {
                let len = 512 * (1 + next() % 24) as u32;
                let data = vec![(seq % 251) as u8; len as usize];
                let h = rec(seq, len);
                // The direct log keeps a block of slack, not a header: what
                // it takes, the buffered one takes too.
                if b.append(&h, &data).is_err() {
                    full = true;
                    break;
                }
                a.append(&h, &data).unwrap();
                seq += 1;
            }
            let (ba, bb) = (a.take(), b.take());
            assert_eq!(ba.end_offset, bb.end_offset);
            ba.write_durable(&fa).unwrap();
            bb.write_durable(&fb).unwrap();
            held.push_back((ba.used_bytes, ba.end_offset, seq - 1));
            let want: Vec<(u64, u8)> = (first..seq).map(|s| (s, (s % 251) as u8)).collect();
            // A head closer to the end than a header is where the next
            // record wraps without a marker: the scan reports it as 0.
            let head = if size - ba.end_offset < REC_HEADER_BYTES as u64 { 0 } else { ba.end_offset };
            for (name, got) in
                [("buffered", records(&fa, size, tail, first)), ("direct", records(&fb, size, tail, first))]
            {
                assert_eq!((&got.0, got.1, got.2), (&want, seq, head), "round {round}: the {name} log lost records");
            }
            a.recycle(ba);
            b.recycle(bb);
            // Checkpoint the oldest batch only once the log is full, so
            // that the head keeps coming close to the tail.
            if full && held.len() > 1 {
                let (bytes, end, last) = held.pop_front().unwrap();
                a.release(bytes);
                b.release(bytes);
                (tail, first) = (end, last + 1);
                fulls += 1;
            }
            if round == 1000 {
                let (used, head) = (b.used_bytes(), b.head());
                b = Log::direct(size, head, used, &fb).unwrap();
            }
        }
        assert!(seq > 1000 && fulls > 100, "{seq} records, {fulls} times full: the test did not wrap the log often");
    }

    /// The same records, once copied into the batch and once spliced in
    /// from their receive buffers (large ones, every other one small and
    /// copied), batch after batch across wraps and checkpoints: both
    /// files must hold the same bytes, every record's data must read back
    /// from its batch, and a scan must find every record. The receive
    /// buffers the batches take come back as spares once recycled.
    #[test]
    fn spliced_data_writes_the_same_log_as_copied_data() {
        let dir = tempfile::tempdir().unwrap();
        let size = LOG_MIN_BYTES;
        let (fa, fb) = (log_file(&dir, size), {
            let f = std::fs::File::create_new(dir.path().join("spliced")).unwrap();
            f.set_len(size).unwrap();
            f
        });
        let (mut copied, mut spliced) = (Log::new(size, 0, 0), Log::new(size, 0, 0));
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let (mut seq, mut tail, mut recv) = (1u64, 0u64, Vec::new());
        for round in 0..40 {
            let first = seq;
            for i in 0..1 + next() % 6 {
                let len = if i % 2 == 0 { 4096 * (1 + next() % 64) as u32 } else { 4096 };
                let h = rec(seq, len);
                let data: Vec<u8> = (0..len).map(|j| (seq as u32 * 31 + j) as u8).collect();
                if copied.append(&h, &data).is_err() {
                    break;
                }
                // The data behind a 32-byte lead, in a buffer longer than
                // the frame (receive buffers only grow).
                recv.clear();
                recv.extend_from_slice(&[0xee; 32]);
                recv.extend_from_slice(&data);
                recv.extend_from_slice(&[0xdd; 100]);
                if len >= 16384 {
                    spliced.append_owned(&h, &mut recv, 32, None).unwrap();
                } else {
                    spliced.append_known(&h, &recv[32..32 + len as usize], None).unwrap();
                }
                seq += 1;
            }
            let (a, b) = (copied.take(), spliced.take());
            assert_eq!(a.records.len(), b.records.len());
            for (pa, pb) in a.records.iter().zip(&b.records) {
                assert_eq!(a.data(pa), b.data(pb), "seq {}", pa.header.seq);
            }
            a.write_durable(&fa).unwrap();
            b.write_durable(&fb).unwrap();
            let (ra, rb) = (records(&fa, size, tail, first), records(&fb, size, tail, first));
            assert_eq!(ra, rb, "round {round}");
            assert_eq!(ra.0.len() as u64, seq - first);
            // Checkpoint: everything applied, the tail moves to the head.
            tail = a.end_offset;
            for (log, batch) in [(&mut copied, a), (&mut spliced, b)] {
                log.release(batch.used_bytes);
                log.recycle(batch);
            }
        }
        let (mut da, mut db) = (vec![0; size as usize], vec![0; size as usize]);
        FileIo::read_exact_at(&fa, &mut da, 0).unwrap();
        FileIo::read_exact_at(&fb, &mut db, 0).unwrap();
        assert!(da == db, "the two logs differ");
        assert!(!spliced.spare_payloads.is_empty(), "committed receive buffers are kept as spares");
    }

    #[test]
    fn append_commit_scan_with_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let size = LOG_MIN_BYTES;
        let file = log_file(&dir, size);
        let mut log = Log::new(size, 0, 0);
        let data = vec![0xabu8; MAX_IO_BYTES as usize];
        let mut seq = 1;
        // Fill until full, checkpoint, then write across the wrap point.
        while log.append(&rec(seq, MAX_IO_BYTES), &data).is_ok() {
            seq += 1;
        }
        let b = log.take();
        b.write_durable(&file).unwrap();
        let tail = b.end_offset;
        log.release(b.used_bytes);
        log.recycle(b);
        let first = seq;
        for _ in 0..3 {
            log.append(&rec(seq, MAX_IO_BYTES), &data).unwrap();
            seq += 1;
        }
        let b = log.take();
        assert_eq!(b.segments.len(), 2, "batch must span the wrap");
        b.write_durable(&file).unwrap();
        for p in &b.records {
            assert!(b.data(p).iter().all(|x| *x == 0xab));
        }
        let mut seen = Vec::new();
        let (next, head, used) = scan(&file, size, tail, first, |h, d| {
            assert!(d.iter().all(|b| *b == 0xab));
            seen.push(h.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (first..seq).collect::<Vec<_>>());
        assert_eq!(next, seq);
        assert_eq!(head, b.end_offset);
        assert_eq!(used, b.used_bytes);
    }

    #[test]
    fn record_from_an_older_epoch_ends_scan() {
        let dir = tempfile::tempdir().unwrap();
        let size = LOG_MIN_BYTES;
        let file = log_file(&dir, size);
        let mut log = Log::new(size, 0, 0);
        log.append(&RecordHeader { epoch: 2, ..rec(1, 4096) }, &[1; 4096]).unwrap();
        log.append(&RecordHeader { epoch: 1, ..rec(2, 4096) }, &[2; 4096]).unwrap();
        log.take().write_durable(&file).unwrap();
        let (next, _, _) = scan(&file, size, 0, 1, |_, _| Ok(())).unwrap();
        assert_eq!(next, 2, "the epoch-1 record after an epoch-2 one must not be replayed");
    }

    #[test]
    fn torn_record_ends_scan() {
        let dir = tempfile::tempdir().unwrap();
        let size = LOG_MIN_BYTES;
        let file = log_file(&dir, size);
        let mut log = Log::new(size, 0, 0);
        for s in 1..=3 {
            log.append(&rec(s, 4096), &[s as u8; 4096]).unwrap();
        }
        log.take().write_durable(&file).unwrap();
        // Corrupt record 2's data: the scan must stop after record 1.
        file.write_all_at(&[0u8; 10], (REC_HEADER_BYTES + 4096 + REC_HEADER_BYTES + 5) as u64).unwrap();
        let (next, _, _) = scan(&file, size, 0, 1, |_, _| Ok(())).unwrap();
        assert_eq!(next, 2);
    }
}
