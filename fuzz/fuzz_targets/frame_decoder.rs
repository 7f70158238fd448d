//! Fuzzes the TCP frame reader and every payload decoder.
//!
//! The first input byte picks a mode:
//!
//! - **raw** (bit 0 clear): the rest of the input is the byte stream a
//!   replica or HE reads off its socket.
//! - **built** (bit 0 set): the rest is a program that builds frames with
//!   correct checks (so the fuzzer gets past the frame check into the payload
//!   decoders), some of them spoiled on purpose: bad magic, version, type,
//!   a lying length, a wrong check or a non-zero MAC field.
//!
//! The stream goes through a reader that hands out a few bytes per `read`
//! and sometimes fails with `Interrupted`, like a socket. `next_frame` runs
//! until it errors. Every payload goes through every payload decoder.
//!
//! Asserts: no panic; a decoded header agrees with `decode_header` and the
//! bytes consumed; a frame with a zero MAC re-encodes byte for byte with
//! `write_frame`; each payload decoder's accepted value re-encodes to the
//! same bytes (where the encoding is not lossy by design); in built mode the
//! reader returns exactly the honest frames before the first spoiled one.

#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use starblk_replica::proto::{
    self, decode_header, decode_read_reply, decode_u64, decode_u64_pair, encode_read_reply_header, encode_u64,
    encode_u64_pair, write_frame, Adopt, Changes, ChangesReply, CopyReq, ErrorFrame, FrameError, FrameReader,
    FrameType, HeartbeatReply, Hello, HelloOk, ReadError, ReadReq, RegionHeader, RegionRead, Replay, Stamp,
    WriteHeader, WriteOp, CHANGES_MAX, HEADER_BYTES, MAGIC, MAX_IO_BYTES, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION,
    REGION_HEADER_BYTES, REPLAY_ADDR_MAX_BYTES, WRITE_SUBHEADER_BYTES,
};
use xxhash_rust::xxh3::xxh3_64;

/// A socket stand-in: at most `chunk` bytes per read, and every
/// `interrupt_every`-th call fails with `Interrupted` (0 = never).
struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
    interrupt_every: usize,
    calls: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.interrupt_every > 0 && self.calls.is_multiple_of(self.interrupt_every) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[path = "input.rs"]
mod input;
use input::Input;

/// A frame the program built, and whether the reader must accept it.
struct Built {
    honest: bool,
    kind: u8,
    flags: u16,
    payload_at: usize,
    payload_len: usize,
}

/// The frame check, written out here from the documented format
/// (`docs/protocol.md`, "Frame check") rather than taken from `proto`:
/// the low 32 bits of XXH3-64 over header bytes 0..12 and 16..32, the
/// payload's lead (a Write frame's sub-header, else nothing) and the
/// little-endian XXH3-64 of the rest of the payload.
fn frame_check(h: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    let lead = if h[5] == FrameType::Write as u8 { WRITE_SUBHEADER_BYTES.min(payload.len()) } else { 0 };
    let mut bytes = h[0..12].to_vec();
    bytes.extend_from_slice(&h[16..32]);
    bytes.extend_from_slice(&payload[..lead]);
    bytes.extend_from_slice(&xxh3_64(&payload[lead..]).to_le_bytes());
    xxh3_64(&bytes) as u32
}

/// Turns the program into a byte stream of frames.
fn build(input: &mut Input<'_>, stream: &mut Vec<u8>, frames: &mut Vec<Built>) {
    while !input.is_empty() {
        let ctl = input.u8();
        let type_byte = input.u8();
        // Mostly small type numbers (known ones and a few past the last);
        // a byte >= 0xf0 is used as is.
        let kind = if type_byte >= 0xf0 { type_byte } else { 1 + type_byte % 32 };
        let flags = input.u16();
        let payload_len = usize::from(input.u16());
        let payload = input.bytes(payload_len).to_vec();
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = PROTOCOL_VERSION;
        h[5] = kind;
        h[6..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        // Which numbers are frame types is the header decoder's to say; the
        // reader must then deliver every honest frame of those types.
        let mut honest = !matches!(decode_header(&h), Err(FrameError::UnknownType(_)));
        match ctl & 0x0f {
            1 => {
                h[0] ^= input.u8() | 1;
                honest = false;
            }
            2 => {
                h[4] = h[4].wrapping_add(input.u8() | 1);
                honest = false;
            }
            3 => {
                // A lying length: the check covers it, so the frame must fail.
                let lie = (payload.len() as u32).wrapping_add(u32::from(input.u16()) | 1);
                h[8..12].copy_from_slice(&lie.to_le_bytes());
                honest = false;
            }
            4 => {
                // A MAC field that is not zero is still covered by the check.
                let mac = input.bytes(16);
                h[16..16 + mac.len()].copy_from_slice(mac);
            }
            _ => {}
        }
        let mut check = frame_check(&h, &payload);
        if ctl & 0x10 != 0 {
            check ^= u32::from(input.u8()) | 1;
            honest = false;
        }
        h[12..16].copy_from_slice(&check.to_le_bytes());
        frames.push(Built { honest, kind, flags, payload_at: stream.len() + HEADER_BYTES, payload_len: payload.len() });
        stream.extend_from_slice(&h);
        stream.extend_from_slice(&payload);
    }
}

/// Runs every payload decoder on `p` and checks what each accepts.
fn check_payload(p: &[u8]) {
    if let Ok(h) = Hello::decode(p) {
        assert_eq!(&h.encode()[..], p);
    }
    if let Ok(h) = HelloOk::decode(p) {
        // The replica set is JSON: whitespace and key order are not kept,
        // so the round trip is checked on the decoded value.
        assert_eq!(HelloOk::decode(&h.encode()).expect("re-encoded HelloOk decodes"), h);
        if let Some((_, next)) = h.copying {
            assert!(next > h.durable_seq);
        }
    }
    if let Ok(r) = HeartbeatReply::decode(p) {
        assert_eq!(&r.encode()[..], p);
    }
    if let Ok(c) = Changes::decode(p) {
        assert_eq!(&c.encode()[..], p);
        assert!(c.from <= c.to && c.max >= 1 && c.max <= CHANGES_MAX);
    }
    if let Ok(r) = ChangesReply::decode(p) {
        assert_eq!(r.encode(), p);
        assert!(r.regions.len() <= CHANGES_MAX as usize);
        assert!(r.regions.windows(2).all(|w| w[0] < w[1]) && r.regions.iter().all(|x| *x < r.next));
    }
    if let Ok(r) = RegionRead::decode(p) {
        assert_eq!(&r.encode()[..], p);
    }
    if let Ok((h, data)) = RegionHeader::decode(p) {
        assert_eq!(h.encode()[..], p[..REGION_HEADER_BYTES]);
        assert_eq!(data, &p[REGION_HEADER_BYTES..]);
        assert!(h.len >= 1 && h.len <= MAX_IO_BYTES && h.mark <= h.as_of);
        assert_eq!(data.len(), if h.zero { 0 } else { h.len as usize });
    }
    if let Ok(c) = CopyReq::decode(p) {
        assert_eq!(c.encode(), p);
        assert!(c.live_from >= 1 && c.live_from <= c.last_seq + 1);
        assert!(!c.addr.is_empty() && c.addr.len() <= REPLAY_ADDR_MAX_BYTES);
    }
    if let Ok((wh, data)) = WriteHeader::decode(p) {
        // Bytes 21..24 of the sub-header are padding that the decoder
        // ignores, so only the fields are compared.
        assert_eq!(wh.encode()[..21], p[..21]);
        assert_eq!(wh.encode()[24..], p[24..WRITE_SUBHEADER_BYTES]);
        assert_eq!(data, &p[WRITE_SUBHEADER_BYTES..]);
        let expect = if wh.op == WriteOp::Data { wh.len as usize } else { 0 };
        assert_eq!(data.len(), expect);
        assert!(wh.op != WriteOp::Data || wh.len <= MAX_IO_BYTES);
    }
    if let Ok(a) = Adopt::decode(p) {
        assert_eq!(&a.encode()[..], p);
    }
    if let Ok(r) = ReadReq::decode(p) {
        assert_eq!(&r.encode()[..], p);
        assert!(r.len <= MAX_IO_BYTES);
    }
    if let Ok((req_id, status, data)) = decode_read_reply(p) {
        // Bytes 10..12 are padding, ignored like the Write sub-header's.
        assert_eq!(encode_read_reply_header(req_id, status)[..10], p[..10]);
        assert_eq!(data, &p[12..]);
    }
    if let Ok(e) = ErrorFrame::decode(p) {
        // Lossy by design: unknown codes read as Malformed, invalid UTF-8 is
        // replaced and messages are cut to 1 KiB. Otherwise exact.
        let code = u16::from_le_bytes([p[0], p[1]]);
        let msg = &p[18..];
        if e.code as u16 == code && msg.len() <= 1024 && std::str::from_utf8(msg).is_ok() {
            assert_eq!(e.encode(), p);
        }
        let _ = format!("{e:?}");
    }
    if let Ok(h) = proto::AuthHello::decode(p) {
        assert_eq!(&h.encode()[..], p);
    }
    if let Ok(c) = proto::AuthChallenge::decode(p) {
        assert_eq!(&c.encode()[..], p);
    }
    if let Ok(s) = Stamp::decode(p) {
        // JSON members: compared decoded (whitespace is not kept).
        assert_eq!(Stamp::decode(&s.encode()).expect("re-encoded Stamp decodes"), s);
    }
    if let Ok(m) = proto::SetMembers::decode(p) {
        assert_eq!(proto::SetMembers::decode(&m.encode()).expect("re-encoded SetMembers decodes"), m);
    }
    if let Ok(r) = Replay::decode(p) {
        assert_eq!(r.encode(), p);
        assert!(r.from >= 1 && r.from <= r.to && !r.addr.is_empty() && r.addr.len() <= REPLAY_ADDR_MAX_BYTES);
    }
    for kind in [FrameType::Ack, FrameType::Heartbeat, FrameType::SetEpoch, FrameType::ReplayDone, FrameType::CopyDone]
    {
        if let Ok(v) = decode_u64(kind, p) {
            assert_eq!(&encode_u64(v)[..], p);
        }
    }
    if let Ok((a, b)) = decode_u64_pair(FrameType::CopyProgress, p) {
        assert_eq!(&encode_u64_pair(a, b)[..], p);
    }
    // The client reads StatsReply as JSON, and a Stamp's members blob is
    // parsed as the superblock's member list.
    let _ = serde_json::from_slice::<serde_json::Value>(p);
    let _ = serde_json::from_slice::<Vec<starblk_replica::superblock::Member>>(p);
}

fn frame_error_is_clean(e: &FrameError) -> bool {
    // Formatting must not panic either (it ends up in logs and counters).
    let _ = (e.to_string(), e.reason());
    matches!(e, FrameError::Closed) && !matches!(e, FrameError::BadMac { .. })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let chunk_byte = input.u8();
    let chunk = if chunk_byte == 0 { usize::MAX } else { usize::from(chunk_byte % 64) + 1 };
    // 0: never interrupted; else every 2nd..8th read (so reads progress).
    let interrupt_every = match input.u8() % 8 {
        0 => 0,
        n => usize::from(n) + 1,
    };

    let mut frames = Vec::new();
    let stream: Vec<u8> = if mode & 1 == 0 {
        input.0.to_vec()
    } else {
        let mut s = Vec::new();
        build(&mut input, &mut s, &mut frames);
        s
    };

    let mut reader = FrameReader::new(Trickle { data: &stream, pos: 0, chunk, interrupt_every, calls: 0 });
    // Raw bytes into an authenticated session (MAC-only or encrypting):
    // every frame must fail its MAC cleanly, never panic.
    let authed = mode & 1 == 0 && mode & 6 != 0;
    if authed {
        let key = starblk_replica::auth::Key::from_bytes([7; 32]);
        let side = starblk_replica::auth::Side::Replica;
        let (_, rx) = starblk_replica::auth::frame_keys(side, &key, b"fuzz", &[3; 32], mode & 4 != 0);
        reader.set_auth(rx);
    }
    let mut decoded = 0usize;
    let mut reencoded = Vec::new();
    let end = loop {
        // The reader buffers ahead: what it has handed out ends where the
        // stream is, less what it holds.
        let start = reader.get_ref().pos - reader.buffered_bytes();
        let (header, payload, data_sum) = match reader.next_frame_sum() {
            // Copied out: the borrow of the reader's buffer would block
            // looking at how far the reader got.
            Ok((h, p, c)) => (h, p.to_vec(), c),
            Err(e) => break e,
        };
        let payload = &payload[..];
        // A Write frame's data sum (which the replica's log record reuses)
        // is the plaintext data's, and only Write frames carry one; an
        // encrypting session has none (its check covered the ciphertext).
        let encrypting = authed && mode & 4 != 0;
        let expect_sum = header.kind == FrameType::Write && payload.len() >= WRITE_SUBHEADER_BYTES && !encrypting;
        assert_eq!(data_sum.is_some(), expect_sum, "{:?} frame", header.kind);
        if let Some(c) = data_sum {
            assert_eq!(c, xxh3_64(&payload[WRITE_SUBHEADER_BYTES..]));
        }
        let consumed = &stream[start..reader.get_ref().pos - reader.buffered_bytes()];
        assert_eq!(consumed.len(), HEADER_BYTES + payload.len());
        assert_eq!(header.length as usize, payload.len());
        assert!(header.length <= MAX_PAYLOAD_BYTES);
        assert_eq!(decode_header(consumed), Ok(header));
        assert!(proto::verify_check(consumed, &header, payload).is_ok());
        if !authed && consumed[16..HEADER_BYTES].iter().all(|b| *b == 0) {
            reencoded.clear();
            write_frame(&mut reencoded, header.kind, header.flags, &[payload]).expect("write to a Vec");
            assert_eq!(reencoded, consumed, "a frame with a zero MAC must re-encode to its bytes");
        }
        if let Some(b) = frames.get(decoded) {
            assert!(b.honest, "frame {decoded} was spoiled but accepted");
            assert_eq!(header.kind as u8, b.kind);
            assert_eq!(header.flags, b.flags);
            assert_eq!(payload, &stream[b.payload_at..b.payload_at + b.payload_len]);
        }
        check_payload(payload);
        decoded += 1;
    };
    let clean_end = match &end {
        ReadError::Frame(e) => frame_error_is_clean(e),
        ReadError::Io(e) => panic!("the reader never fails, got {e}"),
    };
    if mode & 1 == 1 {
        // Exactly the honest frames before the first spoiled one come out.
        let honest = frames.iter().take_while(|b| b.honest).count();
        assert_eq!(decoded, honest);
        assert_eq!(clean_end, honest == frames.len(), "end of stream: {end}");
    }
});
