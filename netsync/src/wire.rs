//! The datagram format. Pure code: no I/O, every length and offset checked
//! before use, fuzzed by `fuzz/fuzz_targets/netsync_datagram.rs`.
//!
//! Every datagram is a 48-byte header followed by `payload_len` bytes. All
//! integers are little-endian. (Version 1 had a 64-byte header with a
//! 16-byte MAC field that was always zero; version 2 dropped it, because
//! header bytes cost goodput on every data and repair datagram. On a keyed
//! link every datagram carries a 16-byte MAC trailer after its payload,
//! announced by flag bit 1: a keyed BLAKE3 hash over the header and payload
//! (crc included) under the sender's direction key, see [`crate::keys`].
//! Version 3 added the trailer, the hello's authentication nonce and the
//! control counter of acks and nacks.)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SBns"` |
//! | 4 | 1 | version `3` |
//! | 5 | 1 | kind: 1 data, 2 repair, 3 ack, 4 nack, 5 hello |
//! | 6 | 1 | flags: bit 0 = reply (hello only); bit 1 = MAC trailer follows the payload (keyed links); others zero |
//! | 7 | 1 | reserved, zero |
//! | 8 | 4 | link id |
//! | 12 | 2 | payload length in bytes; must equal datagram length − 48 (− 16 with a MAC trailer) |
//! | 14 | 2 | reserved, zero |
//! | 16 | 8 | seq: data seq (data), repair counter (repair), on keyed links the control counter (ack, nack; must rise), 0 otherwise |
//! | 24 | 8 | message id (data; 0 otherwise) |
//! | 32 | 4 | fragment index (data; 0 otherwise), `< fragment count` |
//! | 36 | 4 | fragment count (data, `>= 1`; 0 otherwise) |
//! | 40 | 4 | message length in bytes (data; 0 otherwise) |
//! | 44 | 4 | crc32c of the whole datagram with this field zeroed |
//! | 48 | var | payload |
//!
//! Payloads by kind:
//!
//! - **data**: a slice of the message, `frag_index * payload_bytes` into it.
//! - **repair**: one [`starblk_fec::RepairPacket`] in its own wire form. It
//!   codes whole data datagrams (header included), so a rebuilt datagram is
//!   checked by its own crc before use. Repair packets carry no checksum of
//!   their own; this header's crc covers them.
//! - **ack**: [`AckPayload`], [`ACK_PAYLOAD_BYTES`] bytes.
//! - **nack**: [`NackPayload`]: cumulative ack, range count, then ranges.
//! - **hello**: [`HelloPayload`]: the sender's FEC scheme and limits.

use starblk_fec::{FecScheme, SchemeKind, MAX_LAYERS};

/// First four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"SBns";
/// The format version this build speaks.
pub const VERSION: u8 = 3;
/// Header size; the payload starts here.
pub const HEADER_BYTES: usize = 48;
/// Largest UDP payload over IPv4.
pub const MAX_DATAGRAM_BYTES: usize = 65_507;
/// Largest payload a datagram can carry.
pub const MAX_PAYLOAD_BYTES: usize = MAX_DATAGRAM_BYTES - HEADER_BYTES;
/// Hello flag: this hello answers the peer's.
pub const FLAG_REPLY: u8 = 1;
/// Flag: a MAC trailer follows the payload (keyed links). Without a key
/// it is refused as [`DatagramError::BadMac`].
pub const FLAG_MAC: u8 = 2;
/// Bytes of the MAC trailer.
pub const MAC_BYTES: usize = 16;
/// Size of an ack payload.
pub const ACK_PAYLOAD_BYTES: usize = 88;
/// Most ranges one nack carries (keeps a nack under 1300 bytes).
pub const MAX_NACK_RANGES: usize = 100;
/// Bytes before the ranges in a nack payload.
const NACK_FIXED_BYTES: usize = 12;
/// Bytes per nack range: first seq (8) and count (4).
const NACK_RANGE_BYTES: usize = 12;
/// Bytes before the strides in a hello payload.
const HELLO_FIXED_BYTES: usize = 24;

const CRC_AT: usize = 44;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A fragment of a message.
    Data,
    /// An FEC repair packet over earlier data datagrams.
    Repair,
    /// Cumulative acknowledgement plus receiver counters and RTT echo.
    Ack,
    /// Negative acknowledgement: seq ranges FEC could not rebuild.
    Nack,
    /// Link setup: the sender's scheme and limits.
    Hello,
}

impl Kind {
    fn wire_id(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Repair => 2,
            Kind::Ack => 3,
            Kind::Nack => 4,
            Kind::Hello => 5,
        }
    }

    fn from_wire_id(id: u8) -> Option<Kind> {
        Some(match id {
            1 => Kind::Data,
            2 => Kind::Repair,
            3 => Kind::Ack,
            4 => Kind::Nack,
            5 => Kind::Hello,
            _ => return None,
        })
    }
}

/// The decoded header fields (payload length aside, which is the slice's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the datagram carries.
    pub kind: Kind,
    /// [`FLAG_REPLY`] or 0.
    pub flags: u8,
    /// The link this datagram belongs to.
    pub link_id: u32,
    /// Data seq, repair counter, or 0.
    pub seq: u64,
    /// Data only: the message this fragment belongs to.
    pub msg_id: u64,
    /// Data only: which fragment, `< frag_count`.
    pub frag_index: u32,
    /// Data only: fragments in the message, `>= 1`.
    pub frag_count: u32,
    /// Data only: the whole message's length in bytes.
    pub msg_len_bytes: u32,
}

impl Header {
    /// A non-data header: every data-only field zero.
    pub fn control(kind: Kind, link_id: u32, seq: u64) -> Header {
        Header { kind, flags: 0, link_id, seq, msg_id: 0, frag_index: 0, frag_count: 0, msg_len_bytes: 0 }
    }
}

/// A checked datagram borrowing its payload from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The header.
    pub header: Header,
    /// Exactly the payload bytes.
    pub payload: &'a [u8],
}

/// Why a datagram (or its payload) was refused. Each maps to one
/// rejection counter ([`DatagramError::is_truncated`] and friends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Shorter than the header, or than the payload length it declares.
    #[error("datagram truncated: {have_bytes} bytes, need {need_bytes}")]
    Truncated {
        /// Bytes received.
        have_bytes: usize,
        /// Bytes the header (and its length field) require.
        need_bytes: usize,
    },
    /// Longer than the header's payload length says.
    #[error("datagram has {extra_bytes} bytes after its payload")]
    TrailingBytes {
        /// Bytes past the declared payload.
        extra_bytes: usize,
    },
    /// Not this protocol: the magic is wrong.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// A kind byte that names no kind.
    #[error("unknown datagram kind {0}")]
    BadKind(u8),
    /// The crc32c does not match.
    #[error("crc mismatch: header says {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// The header's crc field.
        stored: u32,
        /// The crc computed over the datagram.
        computed: u32,
    },
    /// The datagram's MAC does not verify, or it carries one while this
    /// end has no key.
    #[error("datagram MAC does not verify (or no key is configured for it)")]
    BadMac,
    /// This end is keyed, but the datagram carries no MAC.
    #[error("datagram carries no MAC, but this link is keyed")]
    MissingMac,
    /// A header or payload field is out of range or inconsistent.
    #[error("field `{field}` has invalid value {value}")]
    BadField {
        /// The field's name as in the layout tables.
        field: &'static str,
        /// What was found.
        value: u64,
    },
    /// A payload whose length does not fit its kind's layout.
    #[error("{kind:?} payload of {len_bytes} bytes does not fit its layout")]
    BadPayloadLen {
        /// The datagram kind.
        kind: Kind,
        /// The payload length.
        len_bytes: usize,
    },
}

impl DatagramError {
    /// Whether this is a length problem (counted as "truncated").
    pub fn is_truncated(&self) -> bool {
        matches!(self, DatagramError::Truncated { .. } | DatagramError::TrailingBytes { .. })
    }

    /// Whether this is a checksum failure (counted as "bad crc").
    pub fn is_bad_crc(&self) -> bool {
        matches!(self, DatagramError::BadCrc { .. })
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// crc32c of a datagram with its crc field taken as zero.
fn datagram_crc(buf: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&buf[..CRC_AT]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[CRC_AT + 4..])
}

/// Appends one datagram (header, then `payload`) to `out`, crc included.
///
/// Panics only on a caller bug: a payload over [`MAX_PAYLOAD_BYTES`].
pub fn encode_into(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    encode_keyed(header, payload, out, None);
}

/// [`encode_into`], with a MAC trailer under `key` if given.
pub fn encode_keyed(header: &Header, payload: &[u8], out: &mut Vec<u8>, key: Option<&DatagramKey>) {
    assert!(payload.len() <= MAX_PAYLOAD_BYTES, "payload of {} bytes", payload.len());
    let start = out.len();
    out.reserve(HEADER_BYTES + payload.len() + MAC_BYTES);
    let flags = if key.is_some() { header.flags | FLAG_MAC } else { header.flags };
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, header.kind.wire_id(), flags, 0]);
    out.extend_from_slice(&header.link_id.to_le_bytes());
    // Checked above: fits u16.
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&header.msg_id.to_le_bytes());
    out.extend_from_slice(&header.frag_index.to_le_bytes());
    out.extend_from_slice(&header.frag_count.to_le_bytes());
    out.extend_from_slice(&header.msg_len_bytes.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(payload);
    let crc = datagram_crc(&out[start..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    if let Some(k) = key {
        let mac = k.mac(&out[start..]);
        out.extend_from_slice(&mac);
    }
}

/// The kind of a datagram, if its header is long enough and names one
/// (to choose the key that checks it before [`decode_keyed`]).
pub fn peek_kind(buf: &[u8]) -> Option<Kind> {
    buf.get(5).and_then(|id| Kind::from_wire_id(*id))
}

/// A direction's datagram key (derived per link, [`crate::keys`]).
#[derive(Clone)]
pub struct DatagramKey([u8; 32]);

impl std::fmt::Debug for DatagramKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatagramKey(..)")
    }
}

impl DatagramKey {
    /// A key from derived bytes.
    pub fn new(bytes: [u8; 32]) -> DatagramKey {
        DatagramKey(bytes)
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC_BYTES] {
        blake3::keyed_hash(&self.0, bytes).as_bytes()[..MAC_BYTES].try_into().expect("16 bytes")
    }

    fn verify(&self, bytes: &[u8], mac: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.mac(bytes).ct_eq(mac).into()
    }
}

/// Decodes and checks one datagram: lengths, magic, version, kind, crc,
/// MAC, reserved bytes and the header fields' ranges. Kind-specific payload
/// layouts are checked by [`AckPayload::decode`] and friends.
pub fn decode(buf: &[u8]) -> Result<Datagram<'_>, DatagramError> {
    decode_keyed(buf, None)
}

/// [`decode`] for a keyed link end: the datagram must carry a MAC trailer
/// that verifies under `key`. Without a key, a MAC trailer is refused.
pub fn decode_keyed<'a>(buf: &'a [u8], key: Option<&DatagramKey>) -> Result<Datagram<'a>, DatagramError> {
    if buf.len() < HEADER_BYTES {
        return Err(DatagramError::Truncated { have_bytes: buf.len(), need_bytes: HEADER_BYTES });
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(DatagramError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(DatagramError::BadVersion(buf[4]));
    }
    let has_mac = buf[6] & FLAG_MAC != 0;
    let body = HEADER_BYTES + usize::from(u16_at(buf, 12));
    let need = body + if has_mac { MAC_BYTES } else { 0 };
    if buf.len() < need {
        return Err(DatagramError::Truncated { have_bytes: buf.len(), need_bytes: need });
    }
    if buf.len() > need {
        return Err(DatagramError::TrailingBytes { extra_bytes: buf.len() - need });
    }
    let (buf, mac) = buf.split_at(body);
    let stored = u32_at(buf, CRC_AT);
    let computed = datagram_crc(buf);
    if stored != computed {
        return Err(DatagramError::BadCrc { stored, computed });
    }
    match key {
        None if has_mac => return Err(DatagramError::BadMac),
        Some(_) if !has_mac => return Err(DatagramError::MissingMac),
        Some(k) if !k.verify(buf, mac) => return Err(DatagramError::BadMac),
        _ => {}
    }
    let kind = Kind::from_wire_id(buf[5]).ok_or(DatagramError::BadKind(buf[5]))?;
    let header = Header {
        kind,
        flags: buf[6] & !FLAG_MAC,
        link_id: u32_at(buf, 8),
        seq: u64_at(buf, 16),
        msg_id: u64_at(buf, 24),
        frag_index: u32_at(buf, 32),
        frag_count: u32_at(buf, 36),
        msg_len_bytes: u32_at(buf, 40),
    };
    check_reserved(buf)?;
    let payload = &buf[HEADER_BYTES..];
    check_fields(&header, payload.len())?;
    Ok(Datagram { header, payload })
}

fn check_reserved(buf: &[u8]) -> Result<(), DatagramError> {
    if buf[7] != 0 {
        return Err(DatagramError::BadField { field: "reserved@7", value: u64::from(buf[7]) });
    }
    let r = u16_at(buf, 14);
    if r != 0 {
        return Err(DatagramError::BadField { field: "reserved@14", value: u64::from(r) });
    }
    Ok(())
}

/// Per-kind header field rules.
fn check_fields(h: &Header, payload_len: usize) -> Result<(), DatagramError> {
    let allowed_flags = if h.kind == Kind::Hello { FLAG_REPLY } else { 0 };
    if h.flags & !allowed_flags != 0 {
        return Err(DatagramError::BadField { field: "flags", value: u64::from(h.flags) });
    }
    if h.kind != Kind::Data {
        let nonzero = [("msg_id", h.msg_id), ("frag_index", h.frag_index.into()), ("frag_count", h.frag_count.into())];
        for (field, value) in nonzero.into_iter().chain([("msg_len", u64::from(h.msg_len_bytes))]) {
            if value != 0 {
                return Err(DatagramError::BadField { field, value });
            }
        }
        return Ok(());
    }
    if h.frag_count == 0 {
        return Err(DatagramError::BadField { field: "frag_count", value: 0 });
    }
    if h.frag_index >= h.frag_count {
        return Err(DatagramError::BadField { field: "frag_index", value: h.frag_index.into() });
    }
    if h.msg_id == 0 {
        return Err(DatagramError::BadField { field: "msg_id", value: 0 });
    }
    if payload_len > h.msg_len_bytes as usize {
        return Err(DatagramError::BadField { field: "payload_len", value: payload_len as u64 });
    }
    // Only an empty message may have an empty fragment.
    if payload_len == 0 && h.msg_len_bytes != 0 {
        return Err(DatagramError::BadField { field: "payload_len", value: 0 });
    }
    Ok(())
}

/// Counters a receiver reports back in every ack, so the sender's `status`
/// shows what happened at the far end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Distinct data datagrams received before any nack asked for them.
    pub received_packets: u64,
    /// Data datagrams rebuilt by FEC.
    pub recovered_packets: u64,
    /// Data seqs nacked (each time).
    pub nacked_packets: u64,
    /// Messages delivered.
    pub delivered_msgs: u64,
}

/// Ack payload layout ([`ACK_PAYLOAD_BYTES`] bytes): cum_ack, held_upto,
/// window_end, highest_seen, ts_us, echo_ts_us (8 each), echo_delay_us (4),
/// reserved (4, zero), then the four [`PeerCounters`] (8 each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckPayload {
    /// Every data seq below this was delivered (cumulative ack); `>= 1`.
    pub cum_ack: u64,
    /// Every data seq below this is held by the receiver (delivered or
    /// buffered): nothing below needs retransmitting. `>= cum_ack`.
    pub held_upto: u64,
    /// Flow control: the sender may send data seqs below this. `>= cum_ack`.
    pub window_end: u64,
    /// Highest data seq the receiver knows was sent.
    pub highest_seen: u64,
    /// The sender of this ack's clock, µs (for RTT echo), `>= 1`.
    pub ts_us: u64,
    /// The last `ts_us` received from the peer, 0 if none.
    pub echo_ts_us: u64,
    /// How long that `ts_us` was held before this ack, µs.
    pub echo_delay_us: u32,
    /// Receiver counters.
    pub counters: PeerCounters,
}

impl AckPayload {
    /// Appends the payload bytes.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        for v in [self.cum_ack, self.held_upto, self.window_end, self.highest_seen, self.ts_us, self.echo_ts_us] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.echo_delay_us.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        let c = &self.counters;
        for v in [c.received_packets, c.recovered_packets, c.nacked_packets, c.delivered_msgs] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Decodes an ack payload; the length must be exact.
    pub fn decode(p: &[u8]) -> Result<AckPayload, DatagramError> {
        if p.len() != ACK_PAYLOAD_BYTES {
            return Err(DatagramError::BadPayloadLen { kind: Kind::Ack, len_bytes: p.len() });
        }
        if u32_at(p, 52) != 0 {
            return Err(DatagramError::BadField { field: "ack.reserved", value: u32_at(p, 52).into() });
        }
        let ack = AckPayload {
            cum_ack: u64_at(p, 0),
            held_upto: u64_at(p, 8),
            window_end: u64_at(p, 16),
            highest_seen: u64_at(p, 24),
            ts_us: u64_at(p, 32),
            echo_ts_us: u64_at(p, 40),
            echo_delay_us: u32_at(p, 48),
            counters: PeerCounters {
                received_packets: u64_at(p, 56),
                recovered_packets: u64_at(p, 64),
                nacked_packets: u64_at(p, 72),
                delivered_msgs: u64_at(p, 80),
            },
        };
        let bad = |field, value| Err(DatagramError::BadField { field, value });
        if ack.cum_ack == 0 {
            return bad("ack.cum_ack", 0);
        }
        if ack.held_upto < ack.cum_ack {
            return bad("ack.held_upto", ack.held_upto);
        }
        if ack.window_end < ack.cum_ack {
            return bad("ack.window_end", ack.window_end);
        }
        if ack.ts_us == 0 {
            return bad("ack.ts_us", 0);
        }
        Ok(ack)
    }
}

/// One run of missing data seqs: `first..first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackRange {
    /// First missing seq.
    pub first: u64,
    /// How many consecutive seqs, `>= 1`.
    pub count: u32,
}

/// Nack payload layout: cum_ack (8), range count (2, `1..=MAX_NACK_RANGES`),
/// reserved (2, zero), then per range: first seq (8), count (4). Ranges are
/// ascending, non-empty and do not touch or overlap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NackPayload {
    /// The receiver's cumulative ack, as in an ack.
    pub cum_ack: u64,
    /// The missing ranges.
    pub ranges: Vec<NackRange>,
}

impl NackPayload {
    /// Appends the payload bytes. At most [`MAX_NACK_RANGES`] ranges are
    /// written; the caller keeps to that.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let n = self.ranges.len().min(MAX_NACK_RANGES);
        out.extend_from_slice(&self.cum_ack.to_le_bytes());
        // n <= MAX_NACK_RANGES fits u16.
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        for r in &self.ranges[..n] {
            out.extend_from_slice(&r.first.to_le_bytes());
            out.extend_from_slice(&r.count.to_le_bytes());
        }
    }

    /// Decodes a nack payload, checking count, length and range order.
    pub fn decode(p: &[u8]) -> Result<NackPayload, DatagramError> {
        let bad_len = DatagramError::BadPayloadLen { kind: Kind::Nack, len_bytes: p.len() };
        if p.len() < NACK_FIXED_BYTES {
            return Err(bad_len);
        }
        let n = usize::from(u16_at(p, 8));
        if n == 0 || n > MAX_NACK_RANGES {
            return Err(DatagramError::BadField { field: "nack.count", value: n as u64 });
        }
        if u16_at(p, 10) != 0 {
            return Err(DatagramError::BadField { field: "nack.reserved", value: u16_at(p, 10).into() });
        }
        if p.len() != NACK_FIXED_BYTES + n * NACK_RANGE_BYTES {
            return Err(bad_len);
        }
        let mut ranges = Vec::with_capacity(n);
        let mut floor = 0u64;
        for i in 0..n {
            let at = NACK_FIXED_BYTES + i * NACK_RANGE_BYTES;
            let r = NackRange { first: u64_at(p, at), count: u32_at(p, at + 8) };
            if r.count == 0 {
                return Err(DatagramError::BadField { field: "nack.range.count", value: 0 });
            }
            // Ascending and separated: each range starts past the previous end.
            if r.first < floor || (i > 0 && r.first == floor) {
                return Err(DatagramError::BadField { field: "nack.range.first", value: r.first });
            }
            floor = r
                .first
                .checked_add(u64::from(r.count))
                .ok_or(DatagramError::BadField { field: "nack.range.count", value: r.count.into() })?;
            ranges.push(r);
        }
        Ok(NackPayload { cum_ack: u64_at(p, 0), ranges })
    }
}

/// What a link end tells its peer at setup: how it codes and sizes what it
/// sends, and how much it accepts.
///
/// Layout: fec scheme id (1: 0 none, 1 layered XOR, 2 Reed-Solomon), r (1),
/// c (1), reserved (1, zero), payload_bytes (4), max_message_bytes (4),
/// recv_window_seqs (4), session nonce (8), then for layered XOR c strides
/// (8 each), then on keyed links the authentication nonce (32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloPayload {
    /// The scheme this end codes its data with, if any.
    pub fec: Option<FecScheme>,
    /// Data bytes per datagram this end sends.
    pub payload_bytes: u32,
    /// Largest message this end sends.
    pub max_message_bytes: u32,
    /// Seqs past its cumulative ack this end buffers.
    pub recv_window_seqs: u32,
    /// Random per link instance; a hello with another nonce is another
    /// instance of the link.
    pub nonce: u64,
    /// Keyed links: this end's fresh nonce for the direction keys.
    pub auth_nonce: Option<[u8; crate::keys::AUTH_NONCE_BYTES]>,
}

impl HelloPayload {
    /// Appends the payload bytes.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (id, r, c) = match &self.fec {
            None => (0u8, 0u8, 0u8),
            // r <= 64 and c <= 16 (starblk-fec limits) fit a byte.
            Some(s) => (s.kind().wire_id(), s.r() as u8, s.c() as u8),
        };
        out.extend_from_slice(&[id, r, c, 0]);
        for v in [self.payload_bytes, self.max_message_bytes, self.recv_window_seqs] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.nonce.to_le_bytes());
        if let Some(FecScheme::LayeredXor { strides, .. }) = &self.fec {
            for s in strides {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        if let Some(n) = &self.auth_nonce {
            out.extend_from_slice(n);
        }
    }

    /// Decodes a hello payload; the scheme is validated by `starblk-fec`.
    pub fn decode(p: &[u8]) -> Result<HelloPayload, DatagramError> {
        let bad_len = DatagramError::BadPayloadLen { kind: Kind::Hello, len_bytes: p.len() };
        if p.len() < HELLO_FIXED_BYTES {
            return Err(bad_len);
        }
        let (id, r, c) = (p[0], usize::from(p[1]), usize::from(p[2]));
        if p[3] != 0 {
            return Err(DatagramError::BadField { field: "hello.reserved", value: p[3].into() });
        }
        let strides_len = if id == 1 { c.min(MAX_LAYERS + 1) * 8 } else { 0 };
        let base = HELLO_FIXED_BYTES + strides_len;
        let auth_nonce = match p.len() - base.min(p.len()) {
            _ if p.len() < base => return Err(bad_len),
            0 => None,
            crate::keys::AUTH_NONCE_BYTES => Some(p[base..].try_into().expect("nonce bytes")),
            _ => return Err(bad_len),
        };
        let fec = hello_scheme(id, r, c, &p[HELLO_FIXED_BYTES..base])?;
        let hello = HelloPayload {
            fec,
            payload_bytes: u32_at(p, 4),
            max_message_bytes: u32_at(p, 8),
            recv_window_seqs: u32_at(p, 12),
            nonce: u64_at(p, 16),
            auth_nonce,
        };
        if hello.payload_bytes == 0 || hello.payload_bytes as usize > MAX_PAYLOAD_BYTES {
            return Err(DatagramError::BadField { field: "hello.payload_bytes", value: hello.payload_bytes.into() });
        }
        if hello.recv_window_seqs == 0 {
            return Err(DatagramError::BadField { field: "hello.recv_window_seqs", value: 0 });
        }
        Ok(hello)
    }
}

fn hello_scheme(id: u8, r: usize, c: usize, strides: &[u8]) -> Result<Option<FecScheme>, DatagramError> {
    let bad = |field, value: usize| DatagramError::BadField { field, value: value as u64 };
    let scheme = match id {
        0 if r == 0 && c == 0 => return Ok(None),
        0 => return Err(bad("hello.r", r)),
        1 => {
            let strides: Vec<u64> = strides.chunks_exact(8).map(|s| u64_at(s, 0)).collect();
            FecScheme::layered_xor_with_strides(r, &strides)
        }
        2 => FecScheme::reed_solomon(r, c),
        other => return Err(bad("hello.fec", usize::from(other))),
    };
    let scheme = scheme.map_err(|_| bad("hello.fec_params", r << 8 | c))?;
    debug_assert!(matches!(scheme.kind(), SchemeKind::LayeredXor | SchemeKind::ReedSolomon));
    Ok(Some(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_header() -> Header {
        Header {
            kind: Kind::Data,
            flags: 0,
            link_id: 7,
            seq: 42,
            msg_id: 3,
            frag_index: 1,
            frag_count: 2,
            msg_len_bytes: 10,
        }
    }

    #[test]
    fn data_round_trip() {
        let mut buf = Vec::new();
        encode_into(&data_header(), b"hello", &mut buf);
        let d = decode(&buf).unwrap();
        assert_eq!(d.header, data_header());
        assert_eq!(d.payload, b"hello");
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let mut buf = Vec::new();
        encode_into(&data_header(), b"hello", &mut buf);
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "prefix {n}");
        }
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode(&b).is_err(), "bit {i}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(decode(&longer).unwrap_err().is_truncated());
    }

    #[test]
    fn mac_flag_is_refused_without_a_key() {
        let key = DatagramKey::new([9; 32]);
        let mut buf = Vec::new();
        encode_keyed(&data_header(), b"hello", &mut buf, Some(&key));
        assert_eq!(decode(&buf), Err(DatagramError::BadMac));
        assert_eq!(HEADER_BYTES + 5 + MAC_BYTES, buf.len());
    }

    #[test]
    fn keyed_datagrams_verify_only_under_their_key() {
        let key = DatagramKey::new([9; 32]);
        let mut buf = Vec::new();
        encode_keyed(&data_header(), b"hello", &mut buf, Some(&key));
        let d = decode_keyed(&buf, Some(&key)).unwrap();
        assert_eq!((d.header, d.payload), (data_header(), &b"hello"[..]));
        assert_eq!(decode_keyed(&buf, Some(&DatagramKey::new([8; 32]))), Err(DatagramError::BadMac));
        // Every bit flip is refused, in the MAC too.
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_keyed(&b, Some(&key)).is_err(), "bit {i}");
        }
        // An unkeyed datagram is refused by a keyed end.
        let mut plain = Vec::new();
        encode_into(&data_header(), b"hello", &mut plain);
        assert_eq!(decode_keyed(&plain, Some(&key)), Err(DatagramError::MissingMac));
    }

    #[test]
    fn control_fields_must_be_zero() {
        let mut h = Header::control(Kind::Ack, 1, 0);
        h.msg_id = 5;
        let mut buf = Vec::new();
        encode_into(&h, &[0; ACK_PAYLOAD_BYTES], &mut buf);
        assert!(matches!(decode(&buf), Err(DatagramError::BadField { field: "msg_id", .. })));
    }

    #[test]
    fn payloads_round_trip() {
        let ack = AckPayload {
            cum_ack: 9,
            held_upto: 10,
            window_end: 100,
            highest_seen: 12,
            ts_us: 1,
            echo_ts_us: 2,
            echo_delay_us: 3,
            counters: PeerCounters { received_packets: 4, recovered_packets: 5, nacked_packets: 6, delivered_msgs: 7 },
        };
        let mut b = Vec::new();
        ack.encode_into(&mut b);
        assert_eq!(AckPayload::decode(&b), Ok(ack));

        let nack = NackPayload {
            cum_ack: 5,
            ranges: vec![NackRange { first: 5, count: 2 }, NackRange { first: 9, count: 1 }],
        };
        b.clear();
        nack.encode_into(&mut b);
        assert_eq!(NackPayload::decode(&b), Ok(nack));

        for fec in [None, Some(FecScheme::layered_xor(8, 3).unwrap()), Some(FecScheme::reed_solomon(8, 3).unwrap())] {
            let auth_nonce = fec.is_some().then_some([5; 32]);
            let hello = HelloPayload {
                fec,
                payload_bytes: 1200,
                max_message_bytes: 1 << 21,
                recv_window_seqs: 4096,
                nonce: 77,
                auth_nonce,
            };
            b.clear();
            hello.encode_into(&mut b);
            assert_eq!(HelloPayload::decode(&b), Ok(hello));
        }
    }

    #[test]
    fn nack_ranges_must_ascend_apart() {
        let nack = NackPayload {
            cum_ack: 5,
            ranges: vec![NackRange { first: 5, count: 2 }, NackRange { first: 7, count: 1 }],
        };
        let mut b = Vec::new();
        nack.encode_into(&mut b);
        assert!(NackPayload::decode(&b).is_err());
    }
}
