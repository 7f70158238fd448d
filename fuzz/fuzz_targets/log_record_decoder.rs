//! Fuzzes the replica log's record decoder and its recovery scan.
//!
//! Every input is used three ways:
//!
//! 1. as one record header (plus data) for `log::decode_header` and
//!    `log::verify`; an accepted record with zero padding must re-encode,
//!    through `Log::append`, to exactly the input bytes;
//! 2. as the first bytes of a log file (sparse, `LOG_MIN_BYTES` long),
//!    scanned by `log::scan` from tail 0 with `first_seq` taken from the
//!    first 8 input bytes;
//! 3. as a program that appends records through `Log::append` (so they
//!    carry valid checksums and wrap markers) at a head near the end of the
//!    file, writes them out, spoils a few bytes, and scans them back.
//!
//! Asserts: no panic; every scanned record has a valid length and exactly
//! its data; seqs come out consecutive from `first_seq`; in (3) the scan
//! returns a prefix of what was appended, and all of it, with the same head
//! and used bytes, when nothing was spoiled.

#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use starblk_replica::log::{self, Decoded, Log, RecordHeader, LOG_MIN_BYTES, REC_HEADER_BYTES};
use starblk_replica::proto::{WriteOp, MAX_IO_BYTES};

/// One log file per fuzzing process, emptied before each input.
fn log_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| tempfile::tempfile().expect("temp file for the log"))
}

/// A sparse, all-zero file of the minimum log size.
fn fresh_log() -> &'static File {
    let f = log_file();
    f.set_len(0).expect("truncate");
    f.set_len(LOG_MIN_BYTES).expect("size");
    f
}

#[path = "input.rs"]
mod input;
use input::Input;

/// What a scanned record must look like, whatever the bytes were.
fn check_record(h: &RecordHeader, data: &[u8]) {
    assert!(h.len > 0, "zero-length record accepted");
    match h.op {
        WriteOp::Data => {
            assert!(h.len <= MAX_IO_BYTES, "data record of {} bytes", h.len);
            assert_eq!(data.len(), h.len as usize);
        }
        WriteOp::Discard | WriteOp::WriteZeroes => assert!(data.is_empty()),
    }
}

/// (1) One record header and its data.
fn header(data: &[u8]) {
    let Ok(decoded) = log::decode_header(data) else {
        return;
    };
    let Decoded::Record(h, crc) = decoded else {
        // A wrap marker carries no data; its crc covers only the header.
        if let Decoded::Wrap(_, crc) = decoded {
            let _ = log::verify(&data[..REC_HEADER_BYTES], crc, &[]);
        }
        return;
    };
    let n = h.data_bytes();
    assert!(n <= MAX_IO_BYTES as usize);
    let Some(body) = data.get(REC_HEADER_BYTES..REC_HEADER_BYTES + n) else {
        return;
    };
    if log::verify(&data[..REC_HEADER_BYTES], crc, body).is_err() {
        return;
    }
    check_record(&h, body);
    // Bytes 5..8 are padding (covered by the crc); with them zero the
    // record has exactly one encoding, the one `Log::append` writes.
    if data[5..8] == [0, 0, 0] {
        let mut log = Log::new(LOG_MIN_BYTES, 0, 0);
        log.append(&h, body).expect("an empty log takes any valid record");
        let batch = log.take();
        assert_eq!(batch.segments.len(), 1);
        assert_eq!(batch.segments[0].parts().concat(), &data[..REC_HEADER_BYTES + n]);
    }
}

/// (2) The input as the start of a log file, scanned from offset 0.
fn raw_scan(data: &[u8]) {
    let file = fresh_log();
    file.write_all_at(data, 0).expect("write log");
    let mut first = [0u8; 8];
    let k = data.len().min(8);
    first[..k].copy_from_slice(&data[..k]);
    let first_seq = u64::from_le_bytes(first);
    let mut expect = first_seq;
    let (next, head, _used) = log::scan(file, LOG_MIN_BYTES, 0, first_seq, |h, d| {
        assert_eq!(h.seq, expect, "records must come out in seq order");
        check_record(h, d);
        expect = expect.wrapping_add(1);
        Ok(())
    })
    .expect("scan of a readable file");
    assert_eq!(next, expect);
    assert!(head < LOG_MIN_BYTES);
}

/// (3) Records appended through `Log`, spoiled, scanned back.
fn built_scan(data: &[u8]) {
    let mut input = Input(data);
    let first_seq = input.u64();
    // Start near the end of the file so that records wrap, or near 0.
    let back = u64::from(input.u16());
    let tail = if back & 1 == 0 { LOG_MIN_BYTES - 1 - back } else { back };
    let mut log = Log::new(LOG_MIN_BYTES, tail, 0);
    let mut appended: Vec<(RecordHeader, Vec<u8>)> = Vec::new();
    let mut spoils: Vec<(u64, u8)> = Vec::new();
    while !input.is_empty() {
        let ctl = input.u8();
        if ctl & 0x80 != 0 {
            // Spoil one byte at some distance after the tail.
            let at = (tail + u64::from(input.u16()) + u64::from(ctl & 0x7f) * 65536) % LOG_MIN_BYTES;
            spoils.push((at, input.u8() | 1));
            continue;
        }
        let op = match ctl % 3 {
            0 => WriteOp::Data,
            1 => WriteOp::Discard,
            _ => WriteOp::WriteZeroes,
        };
        let len = if op == WriteOp::Data {
            // Mostly small records; sometimes a large one (up to 1 MiB).
            let l = u32::from(input.u16());
            if ctl & 0x40 != 0 {
                (l << 4).clamp(1, MAX_IO_BYTES)
            } else {
                l.max(1)
            }
        } else {
            input.u32().max(1)
        };
        // The scan refuses seq u64::MAX (the seq after it would not fit),
        // so a log never holds it; stop there.
        let Some(seq) = first_seq.checked_add(appended.len() as u64).filter(|s| *s < u64::MAX) else {
            break;
        };
        // Epochs never decrease along a real log (the scan stops at a
        // decrease, which ends a ghost record after a takeover).
        let epoch = input.u64().max(appended.last().map_or(0, |(p, _)| p.epoch));
        let h = RecordHeader { seq, offset: input.u64(), len, op, epoch };
        let fill = input.u8();
        let mut body = input.bytes(h.data_bytes().min(16)).to_vec();
        body.resize(h.data_bytes(), fill);
        if log.append(&h, &body).is_err() {
            break;
        }
        appended.push((h, body));
    }
    let batch = log.take();
    let file = fresh_log();
    for s in &batch.segments {
        file.write_all_at(&s.parts().concat(), s.offset).expect("write segment");
    }
    for &(at, x) in &spoils {
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).expect("read byte");
        b[0] ^= x;
        file.write_all_at(&b, at).expect("write byte");
    }
    let mut got = 0usize;
    let (next, head, used) = log::scan(file, LOG_MIN_BYTES, tail, first_seq, |h, d| {
        check_record(h, d);
        // Past what was appended only forged crcs could pass.
        if let Some((want, body)) = appended.get(got) {
            assert_eq!(h, want, "record {got} differs from the one appended");
            assert_eq!(d, &body[..], "record {got}'s data differs");
        }
        got += 1;
        Ok(())
    })
    .expect("scan of a readable file");
    assert_eq!(next, first_seq.wrapping_add(got as u64));
    assert!(head < LOG_MIN_BYTES);
    if spoils.is_empty() {
        assert_eq!(got, appended.len(), "an unspoiled log must scan back whole");
        // A head in the last header's worth of the file is the same place
        // as offset 0: neither a record nor a wrap marker fits there, so the
        // scan steps over those bytes and counts them as used.
        let gap = LOG_MIN_BYTES - batch.end_offset;
        let (want_head, want_used) = if gap < REC_HEADER_BYTES as u64 {
            (0, batch.used_bytes + gap)
        } else {
            (batch.end_offset, batch.used_bytes)
        };
        assert_eq!((head, used), (want_head, want_used));
    }
}

fuzz_target!(|data: &[u8]| {
    header(data);
    raw_scan(data);
    built_scan(data);
});
