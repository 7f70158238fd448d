//! Repair packets and their wire form.
//!
//! Layout, version 1, all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | magic `0xF3` |
//! | 1 | 1 | version `1` |
//! | 2 | 1 | scheme id (1 layered XOR, 2 Reed-Solomon) |
//! | 3 | 1 | index: layer (XOR) or parity shard index (RS), `< total` |
//! | 4 | 1 | total: layer count (XOR) or parity count (RS) |
//! | 5 | 1 | count k of covered data packets, `1..=MAX_GROUP_DATA` |
//! | 6 | 2 | payload length in bytes |
//! | 8 | 8 | first covered seq |
//! | 16 | var | k-1 LEB128 deltas to the next covered seq, each `>= 1` |
//! | .. | 2k | original length of each covered packet |
//! | .. | payload length | XOR of the zero-padded packets, or the RS parity shard |
//!
//! The payload length must equal [`padded_len`] of the covered lengths, and
//! the payload must end the buffer exactly: one repair packet per datagram.

use crate::{FecError, SchemeKind, MAX_GROUP_DATA, MAX_LAYERS, MAX_PACKET_BYTES, MAX_PARITY};

const MAGIC: u8 = 0xF3;
const VERSION: u8 = 1;
pub(crate) const FIXED_HEADER_BYTES: usize = 16;
/// A u64 needs at most 10 LEB128 bytes.
const MAX_VARINT_BYTES: usize = 10;

/// The length every covered packet is zero-padded to before coding: the
/// longest covered packet, but at least one byte because RS shards can't be
/// empty.
pub fn padded_len(lens: &[u16]) -> usize {
    usize::from(lens.iter().copied().max().unwrap_or(0)).max(1)
}

/// One repair packet: the code over a group of data packets, with enough
/// metadata (which seqs, their exact lengths) to rebuild any of them exactly.
///
/// Invariants, upheld by the encoder and by [`RepairPacket::decode`]: `seqs`
/// is strictly increasing and non-empty, `lens.len() == seqs.len()`,
/// `index < total`, and `payload.len() == padded_len(&lens)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairPacket {
    pub(crate) kind: SchemeKind,
    pub(crate) index: u8,
    pub(crate) total: u8,
    pub(crate) seqs: Vec<u64>,
    pub(crate) lens: Vec<u16>,
    pub(crate) payload: Vec<u8>,
}

impl RepairPacket {
    /// An empty packet whose buffers the encoder fills; used for pooling.
    pub(crate) fn empty(kind: SchemeKind) -> Self {
        RepairPacket { kind, index: 0, total: 1, seqs: Vec::new(), lens: Vec::new(), payload: Vec::new() }
    }

    /// Checks the invariants listed on the type (debug builds only).
    pub(crate) fn debug_check(&self) {
        debug_assert!(!self.seqs.is_empty() && self.seqs.len() <= MAX_GROUP_DATA);
        debug_assert_eq!(self.seqs.len(), self.lens.len());
        debug_assert!(self.seqs.windows(2).all(|w| w[0] < w[1]));
        debug_assert!(self.index < self.total);
        debug_assert_eq!(self.payload.len(), padded_len(&self.lens));
    }

    /// The code family this packet belongs to.
    pub fn kind(&self) -> SchemeKind {
        self.kind
    }

    /// Layer (XOR) or parity shard index (RS).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Layer count (XOR) or parity shard count (RS) of the sender's scheme.
    pub fn total(&self) -> u8 {
        self.total
    }

    /// The covered data seqs, strictly increasing. Fewer than r for a group
    /// closed early by [`crate::Encoder::flush`].
    pub fn seqs(&self) -> &[u64] {
        &self.seqs
    }

    /// Original length in bytes of each covered packet, parallel to `seqs`.
    pub fn lens(&self) -> &[u16] {
        &self.lens
    }

    /// The coded bytes: XOR of the zero-padded packets, or an RS parity shard.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Size of the wire form in bytes (an upper bound is fine for buffers,
    /// this is exact).
    pub fn encoded_len(&self) -> usize {
        let deltas: usize = self.seqs.windows(2).map(|w| varint_len(w[1] - w[0])).sum();
        FIXED_HEADER_BYTES + deltas + 2 * self.lens.len() + self.payload.len()
    }

    /// Appends the wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.debug_check();
        out.reserve(self.encoded_len());
        // Counts and lengths fit their fields: see the type's invariants,
        // MAX_GROUP_DATA < 256 and MAX_PACKET_BYTES == u16::MAX.
        out.extend_from_slice(&[MAGIC, VERSION, self.kind.wire_id(), self.index, self.total, self.seqs.len() as u8]);
        out.extend_from_slice(&(self.payload.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.seqs[0].to_le_bytes());
        for w in self.seqs.windows(2) {
            put_varint(out, w[1] - w[0]);
        }
        for len in &self.lens {
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
    }

    /// Parses a wire form, checking every field before it is used.
    /// Never panics, whatever the bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, FecError> {
        let mut rd = Reader { buf, pos: 0 };
        let (kind, index, total, count) = decode_fixed(&mut rd)?;
        let payload_len = usize::from(rd.u16()?);
        let mut seqs = Vec::with_capacity(count);
        seqs.push(rd.u64()?);
        for _ in 1..count {
            let delta = rd.varint()?;
            let prev = seqs.last().copied().unwrap_or(0);
            if delta == 0 {
                return Err(FecError::BadSeqList);
            }
            seqs.push(prev.checked_add(delta).ok_or(FecError::BadSeqList)?);
        }
        let mut lens = Vec::with_capacity(count);
        for _ in 0..count {
            lens.push(rd.u16()?);
        }
        let expected = padded_len(&lens);
        if payload_len != expected {
            return Err(FecError::PayloadLenMismatch { declared_bytes: payload_len, expected_bytes: expected });
        }
        let payload = rd.take(payload_len)?.to_vec();
        if rd.remaining() != 0 {
            return Err(FecError::TrailingBytes { extra_bytes: rd.remaining() });
        }
        let packet = RepairPacket { kind, index, total, seqs, lens, payload };
        packet.debug_check();
        Ok(packet)
    }
}

/// Reads and range-checks magic, version, scheme, index, total and count.
fn decode_fixed(rd: &mut Reader<'_>) -> Result<(SchemeKind, u8, u8, usize), FecError> {
    let magic = rd.u8()?;
    if magic != MAGIC {
        return Err(FecError::BadMagic(magic));
    }
    let version = rd.u8()?;
    if version != VERSION {
        return Err(FecError::UnsupportedVersion(version));
    }
    let kind = SchemeKind::from_wire_id(rd.u8()?)?;
    let index = rd.u8()?;
    let total = rd.u8()?;
    let max_total = match kind {
        SchemeKind::LayeredXor => MAX_LAYERS,
        SchemeKind::ReedSolomon => MAX_PARITY,
    };
    if total == 0 || usize::from(total) > max_total {
        return Err(bad("total", total));
    }
    if index >= total {
        return Err(bad("index", index));
    }
    let count = rd.u8()?;
    if count == 0 || usize::from(count) > MAX_GROUP_DATA {
        return Err(bad("count", count));
    }
    Ok((kind, index, total, usize::from(count)))
}

fn bad(field: &'static str, value: u8) -> FecError {
    FecError::BadField { field, value: u64::from(value) }
}

pub(crate) fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FecError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end =
            end.ok_or(FecError::Truncated { needed_bytes: self.pos.saturating_add(n), have_bytes: self.buf.len() })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FecError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, FecError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// LEB128, rejecting values above u64::MAX and non-canonical encodings
    /// (a trailing zero byte), so every packet has exactly one wire form.
    fn varint(&mut self) -> Result<u64, FecError> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT_BYTES {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == MAX_VARINT_BYTES - 1 && bits > 1 {
                return Err(FecError::BadSeqList);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(FecError::BadSeqList);
                }
                return Ok(value);
            }
        }
        Err(FecError::BadSeqList)
    }
}

// MAX_PACKET_BYTES must fit the u16 length fields.
const _: () = assert!(MAX_PACKET_BYTES == u16::MAX as usize);
const _: () = assert!(MAX_GROUP_DATA <= u8::MAX as usize);
