//! Fuzzes the NBD codec (`src/nbd/proto.rs`), everything the NBD frontend
//! reads off a client's socket.
//!
//! The first bytes pick an export geometry (block size 512..64 KiB, size,
//! maximum block); the rest is a program of steps, each feeding raw bytes
//! (or a header built from fields, to get past the magic) to one decoder:
//! client flags, option headers, option data through `answer_option` for
//! every option the server knows and some it does not, request headers and
//! `check_request`.
//!
//! Asserts: no panic; accepted wire forms re-encode to the same bytes; an
//! option header never admits more than `MAX_OPTION_DATA`; every option
//! answer is a well-formed sequence of option replies echoing the option
//! (or the export-name reply), and a successful `NBD_OPT_GO` carries the
//! export's size and ends with ACK; a request `check_request` accepts is a
//! nonempty aligned range inside the export, no longer than the maximum
//! for reads and writes.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The codec is pure and free of crate imports, so it is compiled here on
// its own (see fuzz/Cargo.toml); its unit tests stay in the main crate.
#[allow(dead_code)]
#[path = "../../src/nbd/proto.rs"]
mod proto;
use proto::{Command, Export, ExportRequest, Next, OptionHeader, RequestHeader};

#[path = "input.rs"]
mod input;
use input::Input;

fn export(input: &mut Input<'_>) -> Export {
    let bs = 512u32 << (input.u8() % 8);
    let blocks = match input.u8() % 4 {
        0 => 0,
        1 => u64::from(input.u16()),
        2 => input.u64() % (1 << 40),
        _ => u64::MAX / u64::from(bs),
    };
    let max = bs.saturating_mul(1 + u32::from(input.u16() % 4096));
    Export::new("vol0", blocks * u64::from(bs), bs, max)
}

fn client_flags(input: &mut Input<'_>) {
    let b = input.bytes(4);
    if let Ok(f) = proto::decode_client_flags(b) {
        let v = u32::from(f.fixed_newstyle) | u32::from(f.no_zeroes) << 1;
        assert_eq!(v.to_be_bytes(), b, "client flags re-encode");
    }
}

fn option_header(input: &mut Input<'_>) {
    let b = input.bytes(proto::OPTION_HEADER_LEN);
    if let Ok(h) = OptionHeader::decode(b) {
        assert!(h.len <= proto::MAX_OPTION_DATA);
        assert_eq!(h.encode(), b, "option header re-encodes");
    }
}

const OPTIONS: [u32; 8] = [
    proto::OPT_EXPORT_NAME,
    proto::OPT_ABORT,
    proto::OPT_LIST,
    proto::OPT_STARTTLS,
    proto::OPT_INFO,
    proto::OPT_GO,
    proto::OPT_STRUCTURED_REPLY,
    0x8000_0001,
];

/// Splits option replies: (option, type, data) each, asserting the framing.
fn replies(mut b: &[u8]) -> Vec<(u32, u32, &[u8])> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated option reply");
        assert_eq!(b[..8], proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        assert!(b.len() >= 20 + len, "option reply longer than the bytes sent");
        v.push((
            u32::from_be_bytes(b[8..12].try_into().unwrap()),
            u32::from_be_bytes(b[12..16].try_into().unwrap()),
            &b[20..20 + len],
        ));
        b = &b[20 + len..];
    }
    v
}

fn option(input: &mut Input<'_>, e: &Export) {
    let opt = OPTIONS[usize::from(input.u8()) % OPTIONS.len()];
    let no_zeroes = input.u8() & 1 != 0;
    let len = usize::from(input.u16() % 512);
    let data = input.bytes(len);
    if let Ok(r) = ExportRequest::decode(data) {
        assert_eq!(r.encode(), data, "export request re-encodes");
    }
    let client = proto::ClientFlags { fixed_newstyle: true, no_zeroes };
    let a = proto::answer_option(opt, data, e, client);
    if opt == proto::OPT_EXPORT_NAME {
        let want = match (a.next, no_zeroes) {
            (Next::Transmission, true) => 10,
            (Next::Transmission, false) => 134,
            _ => 0,
        };
        assert_eq!(a.reply.len(), want);
        return;
    }
    let r = replies(&a.reply);
    assert!(!r.is_empty() && r.iter().all(|(o, _, _)| *o == opt), "every reply echoes the option");
    if a.next == Next::Transmission {
        assert_eq!(opt, proto::OPT_GO);
        assert_eq!(r.last().map(|x| x.1), Some(proto::REP_ACK));
        let export = r.iter().find(|(_, t, d)| *t == proto::REP_INFO && d.len() == 12 && d[..2] == [0, 0]);
        let size = export.map(|(_, _, d)| u64::from_be_bytes(d[2..10].try_into().unwrap()));
        assert_eq!(size, Some(e.size), "GO sends NBD_INFO_EXPORT with the size");
    }
}

fn request(input: &mut Input<'_>, e: &Export, built: bool) {
    let h = if built {
        // Fields near the export's edges, to reach check_request's branches.
        let bs = u64::from(e.min_block);
        let offset = match input.u8() % 4 {
            0 => input.u64(),
            1 => (input.u64() % (e.size / bs + 2)).wrapping_mul(bs),
            2 => e.size.wrapping_sub(bs * u64::from(input.u8())),
            _ => u64::MAX - u64::from(input.u16()),
        };
        let len = match input.u8() % 4 {
            0 => input.u32(),
            1 => e.min_block.wrapping_mul(u32::from(input.u16())),
            2 => e.max_block.wrapping_add(u32::from(input.u8()).wrapping_sub(128)),
            _ => proto::MAX_REQUEST_DATA
                .wrapping_add(e.min_block.wrapping_mul(u32::from(input.u8())).wrapping_sub(128 * e.min_block)),
        };
        RequestHeader { flags: input.u16() % 64, kind: input.u16() % 10, cookie: input.u64(), offset, len }
    } else {
        let b = input.bytes(proto::REQUEST_HEADER_LEN);
        let Ok(h) = RequestHeader::decode(b) else { return };
        assert_eq!(h.encode(), b, "request header re-encodes");
        h
    };
    assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
    if h.kind == proto::CMD_WRITE {
        assert_eq!(h.payload_len(), h.len);
    } else {
        assert_eq!(h.payload_len(), 0);
    }
    check(&h, e);
}

fn check(h: &RequestHeader, e: &Export) {
    let Ok(cmd) = proto::check_request(h, e) else { return };
    let (offset, len, bounded) = match cmd {
        Command::Read { offset, len } | Command::Write { offset, len, .. } => (offset, len, true),
        Command::Trim { offset, len } | Command::WriteZeroes { offset, len } => (offset, len, false),
        Command::Flush => return assert!(h.offset == 0 && h.len == 0),
        Command::Disc => return,
    };
    assert_eq!((offset, len), (h.offset, h.len));
    let bs = u64::from(e.min_block);
    assert!(
        len > 0 && offset.is_multiple_of(bs) && u64::from(len).is_multiple_of(bs),
        "accepted an empty or unaligned range"
    );
    assert!(offset.checked_add(u64::from(len)).is_some_and(|end| end <= e.size), "accepted a range past the end");
    assert!(!bounded || len <= proto::MAX_REQUEST_DATA, "accepted a read or write above MAX_REQUEST_DATA");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let e = export(&mut input);
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => client_flags(&mut input),
            1 => option_header(&mut input),
            2 => option(&mut input, &e),
            3 => request(&mut input, &e, false),
            4 => request(&mut input, &e, true),
            _ => {
                let _ = proto::nbd_errno(input.u32() as i32);
            }
        }
    }
});
