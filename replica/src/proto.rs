//! The TCP wire protocol between the host element (HE) and a replica.
//!
//! Every frame is a fixed 32-byte header followed by `length` payload bytes.
//! All integers are little-endian. See `docs/protocol.md` for the table.
//!
//! ```text
//!  0 magic   u32  "SBLK"
//!  4 version u8   PROTOCOL_VERSION
//!  5 type    u8   FrameType
//!  6 flags   u16  per type (WriteOp for Write frames)
//!  8 length  u32  payload bytes, <= MAX_PAYLOAD_BYTES
//! 12 check   u32  over bytes 0..12, 16..32 and the payload (`crate::sum`;
//!                  `frame_check`)
//! 16 mac     [u8; 16]  zero, or once a session authenticated, the
//!                      frame's MAC or AEAD tag (`crate::auth`)
//! ```
//!
//! Decoding never trusts a length: the header is validated before any
//! payload is read, and each payload parser checks its own sizes.

use std::io::{self, IoSlice, Read, Write};

use crate::auth::{FrameKey, KeyId, NONCE_BYTES};
use crate::history::{History, Position};
use crate::members::{Member, Membership};
use crate::superblock::CopyKind;

/// "SBLK" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SBLK");
/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 7;
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 32;
/// Largest payload accepted: one max-sized I/O plus its sub-header.
pub const MAX_IO_BYTES: u32 = 1 << 20;
/// Largest payload of any frame.
pub const MAX_PAYLOAD_BYTES: u32 = MAX_IO_BYTES + 64;
/// Size of the sub-header that precedes data in a Write frame.
pub const WRITE_SUBHEADER_BYTES: usize = 32;

/// A volume UUID (16 raw bytes). The nil UUID marks an unstamped replica.
pub type Uuid = [u8; 16];

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// Fewer bytes arrived than the header or payload needs.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    /// The first four bytes are not "SBLK".
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (expected {PROTOCOL_VERSION})")]
    BadVersion(u8),
    /// The type byte names no known frame.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The header's length field exceeds the protocol maximum.
    #[error("frame length {0} exceeds maximum {MAX_PAYLOAD_BYTES}")]
    TooLong(u32),
    /// The frame check does not match the bytes.
    #[error("frame check mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    BadCheck { expected: u32, actual: u32 },
    /// The payload is the wrong size or shape for its type.
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed { kind: FrameType, reason: &'static str },
    /// The frame's MAC (or AEAD tag) does not verify at this place in the
    /// session: forged, corrupted, replayed, reordered or another
    /// session's.
    #[error(
        "{kind:?} frame failed authentication at frame seq {seq} (forged, corrupted, replayed or from another session)"
    )]
    BadMac { kind: FrameType, seq: u64 },
}

impl FrameError {
    /// Short machine-friendly name, used as a rejection counter key.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Closed => "closed",
            FrameError::Truncated { .. } => "truncated",
            FrameError::BadMagic(_) => "bad_magic",
            FrameError::BadVersion(_) => "bad_version",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::TooLong(_) => "too_long",
            FrameError::BadCheck { .. } => "bad_check",
            FrameError::Malformed { .. } => "malformed",
            FrameError::BadMac { .. } => "bad_mac",
        }
    }
}

/// Frame types. The numbers are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// HE → replica: open a session (version, volume, epoch).
    Hello = 1,
    /// Replica → HE: session accepted, with the replica's state.
    HelloOk = 2,
    /// HE → replica: one sequenced write, discard or write-zeroes.
    Write = 3,
    /// Replica → HE: cumulative durable seq.
    Ack = 4,
    /// HE → replica: read a range.
    Read = 5,
    /// Replica → HE: data for a Read, or its failure status.
    ReadReply = 6,
    /// HE → replica: liveness probe carrying a nonce.
    Heartbeat = 7,
    /// Replica → HE: echo of a heartbeat plus durable seq.
    HeartbeatReply = 8,
    /// Either way: a rejection with a reason code.
    Error = 9,
    /// HE → replica: raise the epoch (fencing older HEs).
    SetEpoch = 10,
    /// HE → replica: stamp volume identity on an initialised replica.
    Stamp = 11,
    /// HE → replica: ask for counters; replica answers with StatsReply.
    Stats = 12,
    /// Replica → HE: counters as JSON.
    StatsReply = 13,
    /// HE → replica: send log records `from..=to` (u64, u64).
    LogRead = 14,
    /// Replica → HE: one log record, in the Write payload format.
    LogRecord = 15,
    /// Replica → HE: end of a LogRead; first seq not sent (u64).
    LogEnd = 16,
    /// HE → replica: replay recovery. Fetch log records `from..=to` from
    /// the peer replica at `addr` and apply them ([`Replay`]).
    Replay = 17,
    /// Replica → HE: a Replay finished; first seq not applied (u64).
    ReplayDone = 18,
    /// HE → replica: new recovery rate limit for a running replay, data
    /// bytes per second (u64, 0 = unlimited).
    RecoveryRate = 19,
    /// HE → replica: the host's history and last seq ([`Adopt`]). The
    /// replica checks that its log is a prefix of it, persists it, and
    /// answers with an Ack of its durable seq; a diverged replica answers
    /// with an Error (code `Diverged`).
    Adopt = 20,
    /// Replica → source replica: which regions changed ([`Changes`]).
    Changes = 21,
    /// Source → replica: the answer ([`ChangesReply`]).
    ChangesReply = 22,
    /// Replica → source: one region's contents ([`RegionRead`]).
    RegionRead = 23,
    /// Source → replica: a region, its mark and as-of seq ([`RegionData`]).
    RegionData = 24,
    /// HE → replica: copy regions from a peer (incremental, full or
    /// rollback recovery) while taking live writes ([`CopyReq`]).
    Copy = 25,
    /// Replica → HE: copy progress, bytes done and total (u64, u64).
    CopyProgress = 26,
    /// Replica → HE: the copy is complete; its durable seq (u64).
    CopyDone = 27,
    /// HE → replica: persist a new replica set ([`SetMembers`]).
    SetMembers = 28,
    /// Replica → HE: the replica set version now stored (u64).
    MembersOk = 29,
    /// Client → replica: start an authenticated session ([`AuthHello`]).
    AuthHello = 31,
    /// Replica → client: its nonce and proof ([`AuthChallenge`]).
    AuthChallenge = 32,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match v {
            1 => Hello,
            2 => HelloOk,
            3 => Write,
            4 => Ack,
            5 => Read,
            6 => ReadReply,
            7 => Heartbeat,
            8 => HeartbeatReply,
            9 => Error,
            10 => SetEpoch,
            11 => Stamp,
            12 => Stats,
            13 => StatsReply,
            14 => LogRead,
            15 => LogRecord,
            16 => LogEnd,
            17 => Replay,
            18 => ReplayDone,
            19 => RecoveryRate,
            20 => Adopt,
            21 => Changes,
            22 => ChangesReply,
            23 => RegionRead,
            24 => RegionData,
            25 => Copy,
            26 => CopyProgress,
            27 => CopyDone,
            28 => SetMembers,
            29 => MembersOk,
            31 => AuthHello,
            32 => AuthChallenge,
            _ => return None,
        })
    }
}

/// What a Write frame asks the replica to do with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteOp {
    /// Store the frame's data.
    Data = 0,
    /// Deallocate the range (reads return zeroes afterwards).
    Discard = 1,
    /// Make the range read as zeroes.
    WriteZeroes = 2,
}

impl WriteOp {
    /// Decodes the op byte.
    pub fn from_u8(v: u8) -> Option<WriteOp> {
        match v {
            0 => Some(WriteOp::Data),
            1 => Some(WriteOp::Discard),
            2 => Some(WriteOp::WriteZeroes),
            _ => None,
        }
    }
}

/// Reason codes carried in Error frames. Numbers are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed = 1,
    /// The session's volume UUID does not match the replica's.
    WrongVolume = 2,
    /// The session's epoch is lower than the replica's.
    StaleEpoch = 3,
    /// Offset or length outside the volume, or not block aligned.
    OutOfRange = 4,
    /// A write's seq does not follow the replica's last seq.
    SeqGap = 5,
    /// The replica's disk failed (EIO, ENOSPC, ...).
    DiskError = 6,
    /// The frame is not valid in this session state.
    BadState = 7,
    /// The peer's protocol version is not supported.
    BadVersion = 8,
    /// The replica's log holds records from another history past the
    /// host's; it needs a rollback before it can serve this host.
    Diverged = 9,
    /// Authentication failed or is missing (`crate::auth::AuthFailure`).
    Auth = 10,
}

impl ErrorCode {
    /// Every code, in wire order (metrics list each reason, even at 0).
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::Malformed,
        ErrorCode::WrongVolume,
        ErrorCode::StaleEpoch,
        ErrorCode::OutOfRange,
        ErrorCode::SeqGap,
        ErrorCode::DiskError,
        ErrorCode::BadState,
        ErrorCode::BadVersion,
        ErrorCode::Diverged,
        ErrorCode::Auth,
    ];

    /// Short snake_case name, used as a metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::WrongVolume => "wrong_volume",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::SeqGap => "seq_gap",
            ErrorCode::DiskError => "disk_error",
            ErrorCode::BadState => "bad_state",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::Diverged => "diverged",
            ErrorCode::Auth => "auth",
        }
    }

    /// Decodes a wire code; unknown codes map to `Malformed`.
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            2 => WrongVolume,
            3 => StaleEpoch,
            4 => OutOfRange,
            5 => SeqGap,
            6 => DiskError,
            7 => BadState,
            8 => BadVersion,
            9 => Diverged,
            10 => Auth,
            _ => Malformed,
        }
    }
}

/// Hello flag: the peer only probes state and will not write.
pub const HELLO_PROBE: u32 = 1;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub kind: FrameType,
    /// Type-specific flags.
    pub flags: u16,
    /// Payload length in bytes.
    pub length: u32,
    /// The frame check from the header.
    pub check: u32,
}

/// Header bytes of a frame, with its check and MAC fields still zero.
fn header_bytes(kind: FrameType, flags: u16, length: u32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = PROTOCOL_VERSION;
    h[5] = kind as u8;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&length.to_le_bytes());
    h
}

/// Payload bytes that the frame check hashes with the header: a Write
/// frame's sub-header. The rest of any payload is its data part, which the
/// check covers through its 64-bit sum (`crate::sum`).
fn lead_bytes(h: &[u8; HEADER_BYTES], payload_bytes: usize) -> usize {
    if h[5] == FrameType::Write as u8 {
        WRITE_SUBHEADER_BYTES.min(payload_bytes)
    } else {
        0
    }
}

/// The frame check over the header (skipping its check field) and the
/// payload parts. With `data_sum`, the sum of the payload's data part (a
/// Write's data, hashed once when the host took the write), the data is
/// not read again: a write sent to N replicas costs one pass over it.
fn frame_check(h: &[u8; HEADER_BYTES], parts: &[&[u8]], data_sum: Option<u64>) -> u32 {
    // A bug, not input: every caller builds its frame from at most four.
    assert!(parts.len() <= 4, "a frame of {} payload parts (at most four)", parts.len());
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut lead_left = lead_bytes(h, total);
    let mut lead: [&[u8]; 6] = [&h[0..12], &h[16..32], &[], &[], &[], &[]];
    let mut lead_n = 2;
    let mut data: [&[u8]; 4] = [&[]; 4];
    let mut data_n = 0;
    for p in parts {
        let cut = lead_left.min(p.len());
        if cut > 0 {
            lead[lead_n] = &p[..cut];
            lead_n += 1;
            lead_left -= cut;
        }
        data[data_n] = &p[cut..];
        data_n += 1;
    }
    let sum = crate::sum::data_sum_known(data_sum, &data[..data_n]);
    crate::sum::check(&lead[..lead_n], sum)
}

/// Decodes and validates a header. Does not read the payload.
pub fn decode_header(h: &[u8]) -> Result<Header, FrameError> {
    if h.len() < HEADER_BYTES {
        return Err(FrameError::Truncated { needed: HEADER_BYTES, got: h.len() });
    }
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if h[4] != PROTOCOL_VERSION {
        return Err(FrameError::BadVersion(h[4]));
    }
    let kind = FrameType::from_u8(h[5]).ok_or(FrameError::UnknownType(h[5]))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    let length = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if length > MAX_PAYLOAD_BYTES {
        return Err(FrameError::TooLong(length));
    }
    let check = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    Ok(Header { kind, flags, length, check })
}

/// Checks a frame's check field against its header bytes and payload.
pub fn verify_check(hbytes: &[u8], header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(&hbytes[..HEADER_BYTES]);
    let actual = frame_check(&h, &[payload], None);
    if actual != header.check {
        return Err(FrameError::BadCheck { expected: header.check, actual });
    }
    Ok(())
}

/// Recomputes the check of a whole encoded frame (header and payload) in
/// place, for tools and tests that edit a frame's bytes and want the edit
/// to reach the MAC check rather than fail the frame check.
pub fn recompute_check(frame: &mut [u8]) {
    if frame.len() < HEADER_BYTES {
        return;
    }
    let (hb, payload) = frame.split_at_mut(HEADER_BYTES);
    let h: &mut [u8; HEADER_BYTES] = hb.try_into().expect("header bytes");
    let check = frame_check(h, &[payload], None);
    h[12..16].copy_from_slice(&check.to_le_bytes());
}

/// Writes a frame whose payload is the concatenation of `parts`, with one
/// vectored write where possible (no copy of large data parts).
pub fn write_frame<W: Write>(w: &mut W, kind: FrameType, flags: u16, parts: &[&[u8]]) -> io::Result<()> {
    write_frame_known(w, kind, flags, parts, None)
}

/// [`write_frame`] with the sum of the payload's data part already known
/// (see [`frame_check`]).
pub fn write_frame_known<W: Write>(
    w: &mut W,
    kind: FrameType,
    flags: u16,
    parts: &[&[u8]],
    data_sum: Option<u64>,
) -> io::Result<()> {
    let len32 = payload_len(parts)?;
    let mut h = header_bytes(kind, flags, len32);
    let check = frame_check(&h, parts, data_sum);
    h[12..16].copy_from_slice(&check.to_le_bytes());
    write_header_and_parts(w, &h, parts)
}

/// Checks a payload's total size against the protocol maximum.
fn payload_len(parts: &[&[u8]]) -> io::Result<u32> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"))
}

/// The sending half of a session's frame protection: nothing before (or
/// without) authentication, else the session's send key. Frames must go
/// out in the order they are sealed (callers hold it under the same lock
/// as the writer).
#[derive(Debug, Default)]
pub struct Seal {
    key: Option<FrameKey>,
    /// Encrypting sessions build the payload here.
    scratch: Vec<u8>,
}

impl Seal {
    /// A seal: plain frames with `None`, else frames sealed with `key`.
    pub fn new(key: Option<FrameKey>) -> Seal {
        Seal { key, scratch: Vec::new() }
    }

    /// Whether frames are sealed.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// Writes one frame whose payload is the concatenation of `parts`:
    /// with a MAC over the header, payload and frame seq (no copy of the
    /// payload), or encrypted (one copy) with the AEAD tag in the MAC field.
    pub fn write_frame<W: Write>(&mut self, w: &mut W, kind: FrameType, flags: u16, parts: &[&[u8]]) -> io::Result<()> {
        self.write_frame_known(w, kind, flags, parts, None)
    }

    /// [`Self::write_frame`] with the sum of the payload's data part
    /// already known, which saves a pass over it unless the session
    /// encrypts.
    pub fn write_frame_known<W: Write>(
        &mut self,
        w: &mut W,
        kind: FrameType,
        flags: u16,
        parts: &[&[u8]],
        data_sum: Option<u64>,
    ) -> io::Result<()> {
        let Some(key) = &mut self.key else { return write_frame_known(w, kind, flags, parts, data_sum) };
        let len32 = payload_len(parts)?;
        let mut h = header_bytes(kind, flags, len32);
        if key.encrypts() {
            self.scratch.clear();
            for p in parts {
                self.scratch.extend_from_slice(p);
            }
            let tag = key.seal_in_place(&h[0..12], &mut self.scratch);
            h[16..32].copy_from_slice(&tag);
            let check = frame_check(&h, &[&self.scratch], None);
            h[12..16].copy_from_slice(&check.to_le_bytes());
            return write_header_and_parts(w, &h, &[&self.scratch]);
        }
        let mac = key.seal_parts(&h[0..12], parts);
        h[16..32].copy_from_slice(&mac);
        let check = frame_check(&h, parts, data_sum);
        h[12..16].copy_from_slice(&check.to_le_bytes());
        write_header_and_parts(w, &h, parts)
    }
}

/// One vectored write of a header and up to three payload parts.
fn write_header_and_parts<W: Write>(w: &mut W, h: &[u8; HEADER_BYTES], parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: [IoSlice<'_>; 4] = [IoSlice::new(h), IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
    debug_assert!(parts.len() <= 3, "at most three payload parts");
    for (i, p) in parts.iter().take(3).enumerate() {
        slices[i + 1] = IoSlice::new(p);
    }
    write_all_vectored(w, &mut slices[..1 + parts.len().min(3)])
}

/// `Write::write_all_vectored` is unstable; this is the same loop.
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write frame")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads frames from a byte stream, with its own buffer: small frames
/// arrive many to a system call, and a large payload is read straight
/// into place, past the buffer (`docs/performance.md`, "Payloads read
/// into place").
pub struct FrameReader<R> {
    inner: R,
    input: InputBuf,
    header: [u8; HEADER_BYTES],
    payload: Vec<u8>,
    /// The session's receive key once it authenticated: every frame
    /// after that must verify (and is decrypted) at its place in order.
    auth: Option<FrameKey>,
    /// The sum of the last Write frame's data, when it is the plaintext's.
    data_sum: Option<u64>,
}

/// Bytes a [`FrameReader`] buffers: many small frames per system call.
pub const FRAME_READ_BUF_BYTES: usize = 256 << 10;
/// A payload with at least this many bytes still to come is read straight
/// into the payload, not copied through the buffer.
pub const DIRECT_READ_MIN_BYTES: usize = 16 << 10;

impl<R: Read> FrameReader<R> {
    /// Wraps a byte stream (a socket, unbuffered: the reader buffers).
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            input: InputBuf::new(FRAME_READ_BUF_BYTES),
            header: [0; HEADER_BYTES],
            payload: Vec::new(),
            auth: None,
            data_sum: None,
        }
    }

    /// From now on every frame must verify under `key` (the session
    /// authenticated).
    pub fn set_auth(&mut self, key: FrameKey) {
        self.auth = Some(key);
    }

    /// Whether frames are verified.
    pub fn is_authenticated(&self) -> bool {
        self.auth.is_some()
    }

    /// Access to the wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Mutable access to the wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes received but not yet returned as frames: zero when the last
    /// read found nothing more waiting (the end of a burst).
    pub fn buffered_bytes(&self) -> usize {
        self.input.len()
    }

    /// Reads one whole frame. The payload borrow lasts until the next call.
    /// I/O errors other than clean EOF come back as `Err(Ok(io))`.
    pub fn next_frame(&mut self) -> Result<(Header, &[u8]), ReadError> {
        self.next_frame_sum().map(|(h, p, _)| (h, p))
    }

    /// [`Self::next_frame`], plus the sum (`crate::sum`) of a Write
    /// frame's data (its payload after the sub-header) when it is the
    /// plaintext's.
    pub fn next_frame_sum(&mut self) -> Result<(Header, &[u8], Option<u64>), ReadError> {
        self.input.read_exact(&mut self.inner, &mut self.header, true)?;
        let header = decode_header(&self.header).map_err(ReadError::Frame)?;
        let len = header.length as usize;
        // Grown, never shrunk: a large frame after small ones would
        // otherwise zero-fill the difference again each time.
        if self.payload.len() < len {
            self.payload.resize(len, 0);
        }
        let payload = &mut self.payload[..len];
        self.input.read_exact(&mut self.inner, payload, false)?;
        self.input.large = len >= DIRECT_READ_MIN_BYTES;
        // One pass over the data gives both the frame check and, for a
        // Write, the sum its log record reuses (`Log::append_known`).
        let lead = lead_bytes(&self.header, len);
        let sum = crate::sum::data_sum(&payload[lead..]);
        let actual = frame_check(&self.header, &[payload], Some(sum));
        if actual != header.check {
            return Err(ReadError::Frame(FrameError::BadCheck { expected: header.check, actual }));
        }
        let plain = !self.auth.as_ref().is_some_and(|k| k.encrypts());
        self.data_sum = Some(sum).filter(|_| header.kind == FrameType::Write && lead == WRITE_SUBHEADER_BYTES && plain);
        if let Some(key) = &mut self.auth {
            let (head, mac) = (&self.header[0..12], &self.header[16..32]);
            key.open_in_place(head, mac, payload)
                .map_err(|e| ReadError::Frame(FrameError::BadMac { kind: header.kind, seq: e.seq }))?;
        }
        Ok((header, payload, self.data_sum))
    }
}

impl<R> FrameReader<R> {
    /// The buffer the last frame's payload was read into: its first
    /// `length` bytes are that payload (it may be longer). A caller may
    /// take it over (`Store::append_received`) and put another buffer in
    /// its place; the next frame is read into whatever is there.
    pub fn payload_buf(&mut self) -> &mut Vec<u8> {
        &mut self.payload
    }
}

/// A [`FrameReader`]'s receive buffer: bytes `pos..filled` are received
/// and not yet handed out.
struct InputBuf {
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// The last frame's payload was large: refills stop at the next
    /// header, so a queue of large frames is read into place, not
    /// through the buffer. Small frames go back to whole-buffer reads.
    large: bool,
}

impl InputBuf {
    fn new(capacity_bytes: usize) -> InputBuf {
        InputBuf { buf: vec![0; capacity_bytes].into_boxed_slice(), pos: 0, filled: 0, large: false }
    }

    fn len(&self) -> usize {
        self.filled - self.pos
    }

    /// Moves buffered bytes to the front of `dst`; returns how many.
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = self.len().min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        n
    }

    /// Fills `dst` from the buffer, then from `r`. What is left of a large
    /// payload is read into place, with room for one more header behind
    /// it in the same call (the next frame's, so that a stream of large
    /// frames costs one call each and copies none); anything shorter
    /// through the buffer: the whole buffer after small frames, only up
    /// to the next header after a large one (`large`). EOF before the
    /// first byte at a frame boundary is `Closed`; anywhere else
    /// `Truncated`.
    fn read_exact<R: Read>(&mut self, r: &mut R, dst: &mut [u8], at_boundary: bool) -> Result<(), ReadError> {
        let mut got = self.take(dst);
        while got < dst.len() {
            // The buffer is empty here: `take` stopped short of `dst`.
            debug_assert_eq!(self.len(), 0);
            let rest = dst.len() - got;
            let res = if rest >= DIRECT_READ_MIN_BYTES {
                let mut iov =
                    [io::IoSliceMut::new(&mut dst[got..]), io::IoSliceMut::new(&mut self.buf[..HEADER_BYTES])];
                r.read_vectored(&mut iov).map(|n| {
                    (self.pos, self.filled) = (0, n.saturating_sub(rest));
                    n.min(rest)
                })
            } else {
                let want = if self.large { (rest + HEADER_BYTES).min(self.buf.len()) } else { self.buf.len() };
                r.read(&mut self.buf[..want]).map(|n| {
                    (self.pos, self.filled) = (0, n);
                    self.take(&mut dst[got..])
                })
            };
            match res {
                Ok(0) if got == 0 && at_boundary => return Err(ReadError::Frame(FrameError::Closed)),
                Ok(0) => return Err(ReadError::Frame(FrameError::Truncated { needed: dst.len(), got })),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(())
    }
}

/// Failure to read a frame: either transport or decoding.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The bytes were not a valid frame.
    #[error("{0}")]
    Frame(FrameError),
}

// ---- payloads ----------------------------------------------------------

/// A little-endian cursor that fails instead of panicking.
struct Cur<'a> {
    b: &'a [u8],
    kind: FrameType,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Malformed { kind: self.kind, reason: "payload too short" });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn uuid(&mut self) -> Result<Uuid, FrameError> {
        Ok(self.take(16)?.try_into().expect("16"))
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed { kind: self.kind, reason: "trailing bytes" })
        }
    }
}

fn cur(kind: FrameType, b: &[u8]) -> Cur<'_> {
    Cur { b, kind }
}

/// AuthHello: the client names its key and sends a fresh nonce; flags
/// ask for encryption ([`crate::auth::AUTH_ENCRYPT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthHello {
    /// Which key the client holds.
    pub key_id: KeyId,
    /// `AUTH_*` flags.
    pub flags: u32,
    /// The client's fresh random nonce.
    pub nonce: [u8; NONCE_BYTES],
}

/// Bytes of an AuthHello payload.
pub const AUTH_HELLO_BYTES: usize = 16 + NONCE_BYTES;

impl AuthHello {
    /// Serialises the payload: key id u64, flags u32, pad u32, nonce.
    pub fn encode(&self) -> [u8; AUTH_HELLO_BYTES] {
        let mut b = [0u8; AUTH_HELLO_BYTES];
        b[0..8].copy_from_slice(&self.key_id.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[16..].copy_from_slice(&self.nonce);
        b
    }
    /// Parses the payload: known flags only, zero padding, exact length.
    pub fn decode(p: &[u8]) -> Result<AuthHello, FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::AuthHello, reason };
        let mut c = cur(FrameType::AuthHello, p);
        let (key_id, flags, pad) = (KeyId(c.u64()?), c.u32()?, c.u32()?);
        let nonce = c.take(NONCE_BYTES)?.try_into().expect("nonce bytes");
        c.end()?;
        if flags & !crate::auth::AUTH_ENCRYPT != 0 {
            return Err(bad("unknown flags"));
        }
        if pad != 0 {
            return Err(bad("non-zero padding"));
        }
        Ok(AuthHello { key_id, flags, nonce })
    }
}

/// AuthChallenge: the replica's fresh nonce and its proof that it holds
/// the key the client named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthChallenge {
    /// The replica's fresh random nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// Keyed hash over the AuthHello payload and `nonce`.
    pub proof: [u8; 32],
}

impl AuthChallenge {
    /// Serialises the payload: nonce, proof.
    pub fn encode(&self) -> [u8; NONCE_BYTES + 32] {
        let mut b = [0u8; NONCE_BYTES + 32];
        b[..NONCE_BYTES].copy_from_slice(&self.nonce);
        b[NONCE_BYTES..].copy_from_slice(&self.proof);
        b
    }
    /// Parses the payload (exact length).
    pub fn decode(p: &[u8]) -> Result<AuthChallenge, FrameError> {
        let mut c = cur(FrameType::AuthChallenge, p);
        let nonce = c.take(NONCE_BYTES)?.try_into().expect("nonce bytes");
        let proof = c.take(32)?.try_into().expect("proof bytes");
        c.end()?;
        Ok(AuthChallenge { nonce, proof })
    }
}

/// Hello: open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Volume the HE expects; nil for a probe of an unstamped replica.
    pub volume: Uuid,
    /// The HE's epoch.
    pub epoch: u64,
    /// HELLO_* flags.
    pub flags: u32,
}

impl Hello {
    /// Serialises the payload.
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..16].copy_from_slice(&self.volume);
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<Hello, FrameError> {
        let mut c = cur(FrameType::Hello, p);
        let h = Hello { volume: c.uuid()?, epoch: c.u64()?, flags: c.u32()? };
        c.end()?;
        Ok(h)
    }
}

/// HelloOk: the replica's identity and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    /// The replica's volume UUID (nil if unstamped).
    pub volume: Uuid,
    /// The replica's current epoch.
    pub epoch: u64,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Highest seq with every write <= it on stable storage.
    pub durable_seq: u64,
    /// The history the replica's log follows; with `durable_seq` it gives
    /// the replica's position (`docs/design.md`, "History").
    pub history: History,
    /// A copy the replica has in progress: its kind and the next live
    /// seq its log expects (resume it, sending live writes from there).
    pub copying: Option<(CopyKind, u64)>,
    /// The replica set stored on the replica (authoritative over config
    /// files; `docs/design.md`, "Membership").
    pub members: Membership,
    /// Where a host on the same machine can read the data file directly
    /// (`crate::readview`; `docs/design.md`, "Local reads").
    pub read_view: Option<ViewId>,
}

/// A replica's read view, as `HelloOk` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewId {
    /// The open's instance in the view page (never 0).
    pub instance: u64,
    /// The replica machine's boot id (`/proc/sys/kernel/random/boot_id`,
    /// 16 bytes): a host with another boot id is on another machine.
    pub boot_id: [u8; 16],
    /// The replica's directory, absolute.
    pub dir: std::path::PathBuf,
}

/// Longest directory a `ViewId` carries.
pub const VIEW_DIR_MAX_BYTES: usize = 4096;

impl ViewId {
    fn encode(view: Option<&ViewId>) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let Some(v) = view else {
            return 0u32.to_le_bytes().to_vec();
        };
        let dir = v.dir.as_os_str().as_bytes();
        let mut b = Vec::with_capacity(28 + dir.len());
        b.extend_from_slice(&(24 + dir.len() as u32).to_le_bytes());
        b.extend_from_slice(&v.instance.to_le_bytes());
        b.extend_from_slice(&v.boot_id);
        b.extend_from_slice(dir);
        b
    }

    fn decode(c: &mut Cur<'_>) -> Result<Option<ViewId>, FrameError> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |reason| FrameError::Malformed { kind: FrameType::HelloOk, reason };
        let len = c.u32()? as usize;
        if len == 0 {
            return Ok(None);
        }
        if !(25..=24 + VIEW_DIR_MAX_BYTES).contains(&len) {
            return Err(bad("read view length"));
        }
        let instance = c.u64()?;
        let boot_id: [u8; 16] = c.take(16)?.try_into().expect("16 bytes");
        let dir = c.take(len - 24)?;
        if instance == 0 || dir[0] != b'/' || dir.contains(&0) {
            return Err(bad("read view instance or directory"));
        }
        let dir = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir));
        Ok(Some(ViewId { instance, boot_id, dir }))
    }
}

impl HelloOk {
    /// Serialises the payload: fixed fields, the replica set, then the
    /// history steps.
    pub fn encode(&self) -> Vec<u8> {
        let members = crate::members::encode_blob(&self.members.members, &self.members.previous);
        let mut b = vec![0u8; 80];
        b[0..16].copy_from_slice(&self.volume);
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.size_bytes.to_le_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_le_bytes());
        b[36..44].copy_from_slice(&self.durable_seq.to_le_bytes());
        if let Some((kind, next)) = self.copying {
            b[44] = kind as u8;
            b[52..60].copy_from_slice(&next.to_le_bytes());
        }
        b[60..68].copy_from_slice(&self.members.epoch.to_le_bytes());
        b[68..76].copy_from_slice(&self.members.version.to_le_bytes());
        b[76..80].copy_from_slice(&(members.len() as u32).to_le_bytes());
        b.extend_from_slice(&members);
        b.extend_from_slice(&ViewId::encode(self.read_view.as_ref()));
        b.extend_from_slice(&self.history.encode());
        b
    }

    /// The replica's position: (epoch of its last durable record, seq).
    pub fn position(&self) -> Position {
        self.history.position(self.durable_seq)
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<HelloOk, FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::HelloOk, reason };
        let mut c = cur(FrameType::HelloOk, p);
        let (volume, epoch, size_bytes, block_size, durable_seq) = (c.uuid()?, c.u64()?, c.u64()?, c.u32()?, c.u64()?);
        let kind = c.u8()?;
        if c.take(7)? != [0; 7] {
            return Err(bad("non-zero padding"));
        }
        let next = c.u64()?;
        let copying = match (kind, next) {
            (0, 0) => None,
            (k, n) if n > durable_seq => Some((CopyKind::from_u8(k).ok_or(bad("unknown copy kind"))?, n)),
            _ => return Err(bad("copy state")),
        };
        let (members_epoch, version) = (c.u64()?, c.u64()?);
        let members_len = c.u32()? as usize;
        if members_len > crate::superblock::MEMBERS_MAX_BYTES {
            return Err(bad("replica set longer than a superblock holds"));
        }
        let (members, previous) = decode_members(FrameType::HelloOk, c.take(members_len)?)?;
        let read_view = ViewId::decode(&mut c)?;
        let history = History::decode(c.b).map_err(|_| bad("history steps invalid"))?;
        let members = Membership { epoch: members_epoch, version, members, previous };
        Ok(HelloOk { volume, epoch, size_bytes, block_size, durable_seq, history, copying, members, read_view })
    }
}

/// The fixed part of a Write frame; the data follows it for `WriteOp::Data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHeader {
    /// Global sequence number.
    pub seq: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes of the affected range.
    pub len: u32,
    /// What to do with the range.
    pub op: WriteOp,
    /// Epoch of the host that issued the write (kept when a record is
    /// re-sent from a log, so every copy of a record is the same record).
    pub epoch: u64,
}

impl WriteHeader {
    /// Serialises the sub-header.
    pub fn encode(&self) -> [u8; WRITE_SUBHEADER_BYTES] {
        let mut b = [0u8; WRITE_SUBHEADER_BYTES];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20] = self.op as u8;
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }
    /// Parses a Write payload into its header and data, checking that the
    /// data length agrees with the op and `len`.
    pub fn decode(p: &[u8]) -> Result<(WriteHeader, &[u8]), FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::Write, reason };
        let mut c = cur(FrameType::Write, p);
        let seq = c.u64()?;
        let offset = c.u64()?;
        let len = c.u32()?;
        let op = WriteOp::from_u8(c.u8()?).ok_or(bad("unknown write op"))?;
        // Padding must be zero: one frame, one encoding.
        if c.take(3)? != [0, 0, 0] {
            return Err(bad("non-zero padding"));
        }
        let epoch = c.u64()?;
        let data = c.b;
        let expect_data = if op == WriteOp::Data { len as usize } else { 0 };
        if data.len() != expect_data {
            return Err(bad("data length does not match header"));
        }
        if len > MAX_IO_BYTES && op == WriteOp::Data {
            return Err(bad("write larger than MAX_IO_BYTES"));
        }
        Ok((WriteHeader { seq, offset, len, op, epoch }, data))
    }
}

/// Read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReq {
    /// Echoed in the reply.
    pub req_id: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (<= MAX_IO_BYTES).
    pub len: u32,
}

impl ReadReq {
    /// Serialises the payload.
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<ReadReq, FrameError> {
        let mut c = cur(FrameType::Read, p);
        let r = ReadReq { req_id: c.u64()?, offset: c.u64()?, len: c.u32()? };
        c.end()?;
        if r.len > MAX_IO_BYTES {
            return Err(FrameError::Malformed { kind: FrameType::Read, reason: "read larger than MAX_IO_BYTES" });
        }
        Ok(r)
    }
}

/// Read reply sub-header: request id and status (0 = ok, else ErrorCode).
pub fn encode_read_reply_header(req_id: u64, status: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&req_id.to_le_bytes());
    b[8..10].copy_from_slice(&status.to_le_bytes());
    b
}

/// Parses a ReadReply into (req_id, status, data).
pub fn decode_read_reply(p: &[u8]) -> Result<(u64, u16, &[u8]), FrameError> {
    let mut c = cur(FrameType::ReadReply, p);
    let req_id = c.u64()?;
    let status = c.u16()?;
    if c.take(2)? != [0, 0] {
        return Err(FrameError::Malformed { kind: FrameType::ReadReply, reason: "non-zero padding" });
    }
    Ok((req_id, status, c.b))
}

/// Encodes a single u64 payload (Ack, Heartbeat, SetEpoch).
pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// Decodes a single u64 payload.
pub fn decode_u64(kind: FrameType, p: &[u8]) -> Result<u64, FrameError> {
    let mut c = cur(kind, p);
    let v = c.u64()?;
    c.end()?;
    Ok(v)
}

/// Encodes two u64s (HeartbeatReply: nonce, durable seq).
pub fn encode_u64_pair(a: u64, b: u64) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[0..8].copy_from_slice(&a.to_le_bytes());
    o[8..16].copy_from_slice(&b.to_le_bytes());
    o
}

/// Decodes two u64s.
pub fn decode_u64_pair(kind: FrameType, p: &[u8]) -> Result<(u64, u64), FrameError> {
    let mut c = cur(kind, p);
    let v = (c.u64()?, c.u64()?);
    c.end()?;
    Ok(v)
}

/// An Error frame: code, the seq and offset it concerns, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Reason code.
    pub code: ErrorCode,
    /// Seq the error concerns (0 if none).
    pub seq: u64,
    /// Offset the error concerns (0 if none).
    pub offset: u64,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorFrame {
    /// Serialises the payload (message truncated to 1 KiB).
    pub fn encode(&self) -> Vec<u8> {
        let msg = &self.message.as_bytes()[..self.message.len().min(1024)];
        let mut b = Vec::with_capacity(18 + msg.len());
        b.extend_from_slice(&(self.code as u16).to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(msg);
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<ErrorFrame, FrameError> {
        let mut c = cur(FrameType::Error, p);
        let code = ErrorCode::from_u16(c.u16()?);
        let seq = c.u64()?;
        let offset = c.u64()?;
        let message = String::from_utf8_lossy(c.b).into_owned();
        Ok(ErrorFrame { code, seq, offset, message })
    }
}

/// Replay: the seq range a lagging replica should copy from a peer's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// First seq to fetch (the replica's durable seq + 1).
    pub from: u64,
    /// Last seq wanted; the peer sends what its log holds up to here.
    pub to: u64,
    /// Recovery rate limit in bytes of data per second; 0 = unlimited.
    pub rate_bytes_per_s: u64,
    /// The peer's `HOST:PORT` (TCP), 1..=255 bytes of UTF-8.
    pub addr: String,
}

/// Longest peer address a Replay frame carries.
pub const REPLAY_ADDR_MAX_BYTES: usize = 255;

impl Replay {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.addr.len());
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.to.to_le_bytes());
        b.extend_from_slice(&self.rate_bytes_per_s.to_le_bytes());
        b.extend_from_slice(self.addr.as_bytes());
        b
    }
    /// Parses the payload: `from <= to`, `from >= 1`, an address of
    /// 1..=255 UTF-8 bytes.
    pub fn decode(p: &[u8]) -> Result<Replay, FrameError> {
        let mut c = cur(FrameType::Replay, p);
        let (from, to, rate_bytes_per_s) = (c.u64()?, c.u64()?, c.u64()?);
        let bad = |reason: &'static str| FrameError::Malformed { kind: FrameType::Replay, reason };
        if from == 0 || from > to {
            return Err(bad("seq range"));
        }
        if c.b.is_empty() || c.b.len() > REPLAY_ADDR_MAX_BYTES {
            return Err(bad("peer address length"));
        }
        let addr = std::str::from_utf8(c.b).map_err(|_| bad("peer address"))?.to_string();
        Ok(Replay { from, to, rate_bytes_per_s, addr })
    }
}

/// HeartbeatReply: the nonce echoed, the durable seq, and the first seq
/// the replica's log can still serve to a replay (u64::MAX: none, e.g.
/// during a copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// The Heartbeat's nonce.
    pub nonce: u64,
    /// Durable seq.
    pub durable_seq: u64,
    /// First seq in the log.
    pub log_first: u64,
}

impl HeartbeatReply {
    /// Serialises the payload.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.nonce.to_le_bytes());
        b[8..16].copy_from_slice(&self.durable_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_first.to_le_bytes());
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<HeartbeatReply, FrameError> {
        let mut c = cur(FrameType::HeartbeatReply, p);
        let r = HeartbeatReply { nonce: c.u64()?, durable_seq: c.u64()?, log_first: c.u64()? };
        c.end()?;
        Ok(r)
    }
}

/// Most regions one ChangesReply lists.
pub const CHANGES_MAX: u32 = 1 << 16;

/// Changes: the regions in `from..to` whose mark is above `since`, at most
/// `max`; the source first waits until it has applied `min_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// First region.
    pub from: u64,
    /// Region past the last.
    pub to: u64,
    /// Regions written after this seq.
    pub since: u64,
    /// The source must have applied this seq first.
    pub min_seq: u64,
    /// Most regions to list (1..=CHANGES_MAX).
    pub max: u32,
    /// Only count them (over the whole range), list none.
    pub count_only: bool,
}

impl Changes {
    /// Serialises the payload.
    pub fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&self.from.to_le_bytes());
        b[8..16].copy_from_slice(&self.to.to_le_bytes());
        b[16..24].copy_from_slice(&self.since.to_le_bytes());
        b[24..32].copy_from_slice(&self.min_seq.to_le_bytes());
        b[32..36].copy_from_slice(&self.max.to_le_bytes());
        b[36..40].copy_from_slice(&u32::from(self.count_only).to_le_bytes());
        b
    }
    /// Parses the payload: `from <= to`, `1 <= max <= CHANGES_MAX`, flags 0 or 1.
    pub fn decode(p: &[u8]) -> Result<Changes, FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::Changes, reason };
        let mut c = cur(FrameType::Changes, p);
        let (from, to, since, min_seq, max, flags) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?, c.u32()?, c.u32()?);
        c.end()?;
        if from > to {
            return Err(bad("region range"));
        }
        if max == 0 || max > CHANGES_MAX {
            return Err(bad("region count"));
        }
        if flags > 1 {
            return Err(bad("flags"));
        }
        Ok(Changes { from, to, since, min_seq, max, count_only: flags == 1 })
    }
}

/// ChangesReply: the regions found (ascending), how many match, and where
/// to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangesReply {
    /// Region to continue from (the request's `to` when done).
    pub next: u64,
    /// Regions that match: the list's length, or for a count-only
    /// request the count over the whole range.
    pub count: u64,
    /// The regions, strictly ascending.
    pub regions: Vec<u64>,
}

impl ChangesReply {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + 8 * self.regions.len());
        b.extend_from_slice(&self.next.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b
    }
    /// Parses the payload: at most CHANGES_MAX regions, strictly
    /// ascending, all below `next`.
    pub fn decode(p: &[u8]) -> Result<ChangesReply, FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::ChangesReply, reason };
        let mut c = cur(FrameType::ChangesReply, p);
        let (next, count) = (c.u64()?, c.u64()?);
        if !c.b.len().is_multiple_of(8) || c.b.len() / 8 > CHANGES_MAX as usize {
            return Err(bad("region list length"));
        }
        let regions: Vec<u64> = c.b.chunks_exact(8).map(|x| u64::from_le_bytes(x.try_into().expect("8"))).collect();
        if regions.windows(2).any(|w| w[1] <= w[0]) || regions.last().is_some_and(|r| *r >= next) {
            return Err(bad("region list order"));
        }
        if !regions.is_empty() && count != regions.len() as u64 {
            return Err(bad("region count"));
        }
        Ok(ChangesReply { next, count, regions })
    }
}

/// RegionRead: one region's contents, once the source applied `min_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionRead {
    /// Region index.
    pub region: u64,
    /// The source must have applied this seq first.
    pub min_seq: u64,
}

impl RegionRead {
    /// Serialises the payload.
    pub fn encode(&self) -> [u8; 16] {
        encode_u64_pair(self.region, self.min_seq)
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<RegionRead, FrameError> {
        let (region, min_seq) = decode_u64_pair(FrameType::RegionRead, p)?;
        Ok(RegionRead { region, min_seq })
    }
}

/// The sub-header of a RegionData frame; the region's bytes follow unless
/// it is all zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHeader {
    /// Region index.
    pub region: u64,
    /// The region's mark at the source (seq of its last write).
    pub mark: u64,
    /// The source had applied exactly the writes up to this seq to the
    /// region when it read it.
    pub as_of: u64,
    /// Bytes of the region (the last region of a volume may be short).
    pub len: u32,
    /// All zeroes: no data follows.
    pub zero: bool,
}

/// Bytes of a [`RegionHeader`].
pub const REGION_HEADER_BYTES: usize = 32;

impl RegionHeader {
    /// Serialises the sub-header.
    pub fn encode(&self) -> [u8; REGION_HEADER_BYTES] {
        let mut b = [0u8; REGION_HEADER_BYTES];
        b[0..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..16].copy_from_slice(&self.mark.to_le_bytes());
        b[16..24].copy_from_slice(&self.as_of.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&u32::from(self.zero).to_le_bytes());
        b
    }
    /// Parses a RegionData payload into its header and data, checking the
    /// data length against `len` and the zero flag, and `mark <= as_of`.
    pub fn decode(p: &[u8]) -> Result<(RegionHeader, &[u8]), FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::RegionData, reason };
        let mut c = cur(FrameType::RegionData, p);
        let (region, mark, as_of, len, flags) = (c.u64()?, c.u64()?, c.u64()?, c.u32()?, c.u32()?);
        if flags > 1 {
            return Err(bad("flags"));
        }
        let zero = flags == 1;
        if len == 0 || len > MAX_IO_BYTES {
            return Err(bad("region length"));
        }
        if c.b.len() != if zero { 0 } else { len as usize } {
            return Err(bad("data length does not match header"));
        }
        if mark > as_of {
            return Err(bad("mark past as-of seq"));
        }
        Ok((RegionHeader { region, mark, as_of, len, zero }, c.b))
    }
}

/// Copy: the HE asks a replica to copy regions from a peer (incremental,
/// full or rollback recovery), taking live writes from `live_from` on.
/// Sent instead of Adopt, as the first frame of the session: the replica
/// follows `history` once the copy is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReq {
    /// The first live write the HE sends on this session.
    pub live_from: u64,
    /// Rate limit, data bytes/s (0 = unlimited).
    pub rate_bytes_per_s: u64,
    /// The host's last assigned seq.
    pub last_seq: u64,
    /// What the HE planned (the replica checks it against its own log).
    pub kind: CopyKind,
    /// The source peer's `HOST:PORT`, 1..=255 bytes of UTF-8.
    pub addr: String,
    /// The host's history.
    pub history: History,
}

impl CopyReq {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.addr.len() + 16 * self.history.steps().len());
        b.extend_from_slice(&self.live_from.to_le_bytes());
        b.extend_from_slice(&self.rate_bytes_per_s.to_le_bytes());
        b.extend_from_slice(&self.last_seq.to_le_bytes());
        b.push(self.kind as u8);
        b.push(self.addr.len() as u8);
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(self.addr.as_bytes());
        b.extend_from_slice(&self.history.encode());
        b
    }
    /// Parses the payload: `1 <= live_from <= last_seq + 1`, a known kind,
    /// an address of 1..=255 UTF-8 bytes, a valid history.
    pub fn decode(p: &[u8]) -> Result<CopyReq, FrameError> {
        let bad = |reason| FrameError::Malformed { kind: FrameType::Copy, reason };
        let mut c = cur(FrameType::Copy, p);
        let (live_from, rate_bytes_per_s, last_seq) = (c.u64()?, c.u64()?, c.u64()?);
        let kind = CopyKind::from_u8(c.u8()?).ok_or(bad("unknown copy kind"))?;
        let addr_len = c.u8()? as usize;
        if c.take(6)? != [0; 6] {
            return Err(bad("non-zero padding"));
        }
        if live_from == 0 || last_seq == u64::MAX || live_from > last_seq + 1 {
            return Err(bad("live seq"));
        }
        if addr_len == 0 {
            return Err(bad("peer address length"));
        }
        let addr = std::str::from_utf8(c.take(addr_len)?).map_err(|_| bad("peer address"))?.to_string();
        let history = History::decode(c.b).map_err(|_| bad("history steps invalid"))?;
        Ok(CopyReq { live_from, rate_bytes_per_s, last_seq, kind, addr, history })
    }
}

/// Stamp: the identity `volume create` writes on every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// New volume UUID.
    pub volume: Uuid,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Initial epoch (1 for `volume create`; the host's for `replica add`).
    pub epoch: u64,
    /// The replica set and its version (stored as made at `epoch`).
    pub members: Membership,
}

impl Stamp {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(&self.volume);
        b.extend_from_slice(&self.size_bytes.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.members.version.to_le_bytes());
        b.extend_from_slice(&crate::members::encode_blob(&self.members.members, &self.members.previous));
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<Stamp, FrameError> {
        let mut c = cur(FrameType::Stamp, p);
        let (volume, size_bytes, block_size, epoch, version) = (c.uuid()?, c.u64()?, c.u32()?, c.u64()?, c.u64()?);
        let (members, previous) = decode_members(FrameType::Stamp, c.b)?;
        Ok(Stamp { volume, size_bytes, block_size, epoch, members: Membership { epoch, version, members, previous } })
    }
}

/// A member list (and the previous set's) in JSON, bounded by what a
/// superblock holds (`members::decode_blob`).
fn decode_members(kind: FrameType, b: &[u8]) -> Result<(Vec<Member>, Vec<Member>), FrameError> {
    let bad = |reason| FrameError::Malformed { kind, reason };
    if b.len() > crate::superblock::MEMBERS_MAX_BYTES {
        return Err(bad("replica set longer than a superblock holds"));
    }
    crate::members::decode_blob(b).map_err(|_| bad("replica set not valid JSON"))
}

/// SetMembers: the host at `epoch` asks the replica to store a new
/// replica set (`docs/design.md`, "Membership").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetMembers {
    /// The host's epoch; must be the replica's.
    pub epoch: u64,
    /// The new set; its version is one above the one it replaces.
    pub members: Membership,
}

impl SetMembers {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.members.version.to_le_bytes());
        b.extend_from_slice(&crate::members::encode_blob(&self.members.members, &self.members.previous));
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<SetMembers, FrameError> {
        let mut c = cur(FrameType::SetMembers, p);
        let (epoch, version) = (c.u64()?, c.u64()?);
        let (members, previous) = decode_members(FrameType::SetMembers, c.b)?;
        Ok(SetMembers { epoch, members: Membership { epoch, version, members, previous } })
    }
}

/// Adopt: the host's history and its last assigned seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopt {
    /// Last seq the host has assigned (its history's end).
    pub last_seq: u64,
    /// The host's history.
    pub history: History,
}

impl Adopt {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.last_seq.to_le_bytes().to_vec();
        b.extend_from_slice(&self.history.encode());
        b
    }
    /// Parses the payload.
    pub fn decode(p: &[u8]) -> Result<Adopt, FrameError> {
        let mut c = cur(FrameType::Adopt, p);
        let last_seq = c.u64()?;
        let history = History::decode(c.b)
            .map_err(|_| FrameError::Malformed { kind: FrameType::Adopt, reason: "history steps invalid" })?;
        Ok(Adopt { last_seq, history })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameType, parts: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, 0, parts).unwrap();
        v
    }

    /// A byte stream that hands out at most `chunk` bytes per call, and
    /// counts the bytes that went straight into a payload (the first of
    /// two buffers: `InputBuf::read_exact`'s direct read).
    struct Stream<'a> {
        data: &'a [u8],
        chunk: usize,
        direct_bytes: usize,
    }

    impl Read for Stream<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }

        fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            let two = bufs.len() == 2;
            let mut total = 0;
            for (i, b) in bufs.iter_mut().enumerate() {
                let room = (self.chunk - total).min(b.len());
                let n = self.read(&mut b[..room])?;
                if i == 0 && two {
                    self.direct_bytes += n;
                }
                total += n;
                if n < b.len() || total == self.chunk {
                    break;
                }
            }
            Ok(total)
        }
    }

    /// Large payloads are read into place once the stream is going: a run
    /// of 128 KiB writes behind small frames copies at most the first
    /// ones through the buffer. Every frame decodes the same however the
    /// stream is cut.
    #[test]
    fn large_payloads_are_read_into_place_and_every_cut_decodes_the_same() {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        let mut push = |kind: FrameType, parts: &[&[u8]]| {
            write_frame(&mut bytes, kind, 0, parts).unwrap();
            want.push((kind, parts.concat()));
        };
        push(FrameType::Heartbeat, &[&encode_u64(1)]);
        for i in 0..12u64 {
            let len = if i % 6 == 5 { 4096 } else { 128 << 10 };
            let wh = WriteHeader { seq: i + 1, offset: i << 17, len, op: WriteOp::Data, epoch: 1 };
            let data: Vec<u8> = (0..len as usize).map(|j| (j as u64 * 7 + i) as u8).collect();
            push(FrameType::Write, &[&wh.encode(), &data]);
        }
        push(FrameType::Heartbeat, &[&encode_u64(2)]);
        for chunk in [1, 7, 4096, 70_000, usize::MAX] {
            let mut r = FrameReader::new(Stream { data: &bytes, chunk, direct_bytes: 0 });
            for (i, (kind, payload)) in want.iter().enumerate() {
                let (h, p) = r.next_frame().unwrap_or_else(|e| panic!("chunk {chunk}, frame {i}: {e}"));
                assert_eq!((h.kind, p), (*kind, &payload[..]), "chunk {chunk}, frame {i}");
            }
            assert!(matches!(r.next_frame(), Err(ReadError::Frame(FrameError::Closed))), "chunk {chunk}");
            if chunk >= 70_000 {
                // Ten 128 KiB writes; the first two may go through the buffer.
                let direct = r.get_ref().direct_bytes;
                assert!(direct >= 8 * (128 << 10), "chunk {chunk}: only {direct} bytes read into place");
            }
        }
    }

    /// The one-checksum path: a Write frame whose data sum was taken at
    /// submit is byte-identical to one checked whole or cut anywhere, the
    /// reader hands back the data's sum, and a flipped bit in the header,
    /// the sub-header or the data still fails the frame.
    #[test]
    fn a_known_data_sum_gives_the_same_frame_and_is_handed_back() {
        let sub = [7u8; WRITE_SUBHEADER_BYTES];
        for len in [0usize, 1, 4096, 131072 + 3] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let plain = frame(FrameType::Write, &[&sub, &data]);
            let mut known = Vec::new();
            let sum = crate::sum::data_sum(&data);
            write_frame_known(&mut known, FrameType::Write, 0, &[&sub, &data], Some(sum)).unwrap();
            assert_eq!(plain, known, "len {len}");
            let whole = [&sub[..], &data[..]].concat();
            for cut in [0, 5, WRITE_SUBHEADER_BYTES + len / 2] {
                let (a, b) = whole.split_at(cut);
                assert_eq!(frame(FrameType::Write, &[a, b]), plain, "len {len}, payload cut at {cut}");
            }
            let mut r = FrameReader::new(&known[..]);
            let (h, p, got) = r.next_frame_sum().unwrap();
            assert_eq!((h.kind, p.len(), got), (FrameType::Write, WRITE_SUBHEADER_BYTES + len, Some(sum)));
            let mut flips = vec![6, HEADER_BYTES + 3];
            if len > 0 {
                flips.push(HEADER_BYTES + WRITE_SUBHEADER_BYTES + len / 2);
            }
            for at in flips {
                let mut bad = known.clone();
                bad[at] ^= 0x10;
                let e = FrameReader::new(&bad[..]).next_frame().unwrap_err();
                assert!(
                    matches!(e, ReadError::Frame(FrameError::BadCheck { .. })),
                    "len {len}, byte {at} flipped: {e}"
                );
            }
        }
        // Other frames carry no data sum, and are checked whole.
        let hb = frame(FrameType::Heartbeat, &[&encode_u64(5)]);
        assert_eq!(FrameReader::new(&hb[..]).next_frame_sum().unwrap().2, None);
        let mut bad = hb.clone();
        bad[HEADER_BYTES + 2] ^= 1;
        let e = FrameReader::new(&bad[..]).next_frame().unwrap_err();
        assert!(matches!(e, ReadError::Frame(FrameError::BadCheck { .. })), "{e}");
    }

    #[test]
    fn error_code_list_is_complete_and_names_are_distinct() {
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as u16, i as u16 + 1, "ALL is in wire order");
            assert_eq!(ErrorCode::from_u16(*c as u16), *c);
            assert!(names.insert(c.as_str()), "duplicate name {}", c.as_str());
        }
        // The first unused code decodes as Malformed, so ALL has them all.
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16 + 1), ErrorCode::Malformed);
    }

    #[test]
    fn hello_ok_carries_the_read_view() {
        let view = ViewId { instance: 9, boot_id: [3; 16], dir: "/var/lib/starblk/local".into() };
        let mut h = HelloOk {
            volume: [1; 16],
            epoch: 2,
            size_bytes: 1 << 20,
            block_size: 4096,
            durable_seq: 5,
            history: History::new(),
            copying: None,
            members: Membership::default(),
            read_view: Some(view),
        };
        assert_eq!(HelloOk::decode(&h.encode()).unwrap(), h);
        h.read_view = None;
        assert_eq!(HelloOk::decode(&h.encode()).unwrap(), h);
        // A relative directory, instance 0 and a length past the bound are
        // refused, not trusted.
        for (instance, dir) in [(9, "relative/dir"), (0, "/abs")] {
            h.read_view = Some(ViewId { instance, boot_id: [3; 16], dir: dir.into() });
            assert!(HelloOk::decode(&h.encode()).is_err(), "accepted {instance} {dir}");
        }
        h.read_view = Some(ViewId { instance: 1, boot_id: [3; 16], dir: format!("/{}", "a".repeat(5000)).into() });
        assert!(HelloOk::decode(&h.encode()).is_err(), "accepted a 5000-byte directory");
    }

    #[test]
    fn roundtrip_write_frame() {
        let wh = WriteHeader { seq: 7, offset: 4096, len: 5, op: WriteOp::Data, epoch: 3 };
        let bytes = frame(FrameType::Write, &[&wh.encode(), b"hello"]);
        let mut r = FrameReader::new(&bytes[..]);
        let (h, p) = r.next_frame().unwrap();
        assert_eq!(h.kind, FrameType::Write);
        let (got, data) = WriteHeader::decode(p).unwrap();
        assert_eq!(got, wh);
        assert_eq!(data, b"hello");
        assert!(matches!(r.next_frame(), Err(ReadError::Frame(FrameError::Closed))));
    }

    #[test]
    fn every_corruption_is_rejected() {
        let bytes = frame(FrameType::Heartbeat, &[&encode_u64(9)]);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let mut r = FrameReader::new(&b[..]);
            assert!(r.next_frame().is_err(), "flip at byte {i} accepted");
        }
        for cut in 1..bytes.len() {
            let mut r = FrameReader::new(&bytes[..cut]);
            assert!(matches!(r.next_frame(), Err(ReadError::Frame(FrameError::Truncated { .. }))));
        }
    }

    #[test]
    fn write_length_mismatch_rejected() {
        let wh = WriteHeader { seq: 1, offset: 0, len: 4096, op: WriteOp::Data, epoch: 1 };
        let mut p = wh.encode().to_vec();
        p.extend_from_slice(&[0u8; 100]);
        assert!(WriteHeader::decode(&p).is_err());
        let wh = WriteHeader { seq: 1, offset: 0, len: 4096, op: WriteOp::Discard, epoch: 1 };
        assert!(WriteHeader::decode(&wh.encode()).is_ok());
    }

    #[test]
    fn oversized_length_rejected_before_reading() {
        let mut h = header_bytes(FrameType::Write, 0, MAX_PAYLOAD_BYTES + 1).to_vec();
        h.resize(HEADER_BYTES, 0);
        assert_eq!(decode_header(&h), Err(FrameError::TooLong(MAX_PAYLOAD_BYTES + 1)));
    }
}
