//! Fuzzes `Superblock::decode` with 4096-byte slot images (version 5, the
//! one this build writes, and versions 2 to 4, which it must refuse), and the
//! change map header decoder (`changes::Header::decode`) with the same bytes.
//!
//! The first input byte picks fix-ups so the fuzzer gets past the cheap
//! checks into the range checks and the members JSON; the rest of the input
//! is the slot image (cut or zero-padded to 4096 bytes):
//!
//! - bit 3 makes the geometry plausible (block size a power of two in
//!   range, size a multiple of it, log at least `LOG_MIN_BYTES`, tail inside
//!   the log, checkpoint <= durable, a history of 0..=8 steps in order),
//!   each from the fields' own bytes;
//!   also the region shift (12..=16) and, from byte 100, a
//!   copy state with a known kind, 1..=8 segments in order and the cursor
//!   and live seq in range, or none;
//! - bit 4 replaces the members text with a JSON member list built from the
//!   image bytes, sometimes without the optional `network_sync` field;
//! - bit 0 writes the right magic and version: version 5, or an older one
//!   (2, 3 or 4, from byte 8) if bit 5 is set;
//! - bit 1 sets the members length to the text where the members start
//!   (up to a NUL);
//! - bit 2 recomputes the crc (applied last).
//!
//! Asserts: no panic; versions 2 to 4 are refused (their logs carry crc32c
//! records); an accepted image re-encodes (unless its members
//! grow past the slot when written canonically, see below), and the re-encoding
//! decodes to the same value with the same fixed fields; an accepted image
//! whose members JSON is already in canonical form re-encodes to exactly the
//! same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use starblk_replica::changes;
use starblk_replica::history::{HISTORY_STEPS_MAX, STEP_BYTES};
use starblk_replica::log::LOG_MIN_BYTES;
use starblk_replica::superblock::{Member, Superblock, SuperblockError, MEMBERS_MAX_BYTES, SLOT_BYTES};

/// The version this build writes; the only one it accepts.
const VERSION: u32 = 5;

/// Where the history starts (version 5); the members follow the room
/// kept for the longest history.
const FIXED_BYTES: usize = 368;
const MEMBERS_AT: usize = FIXED_BYTES + HISTORY_STEPS_MAX * STEP_BYTES;

fn version(img: &[u8]) -> u32 {
    u32_at(img, 8)
}

fn u32_at(img: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(img[o..o + 4].try_into().expect("4"))
}

fn u64_at(img: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(img[o..o + 8].try_into().expect("8"))
}

fn put_u64(img: &mut [u8], o: usize, v: u64) {
    img[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Bends the fixed fields into range, keeping the fuzzer's bits where it can.
fn plausible_geometry(img: &mut [u8; SLOT_BYTES]) {
    let block = 512u32 << (img[12] % 8);
    img[12..16].copy_from_slice(&block.to_le_bytes());
    let size = u64_at(img, 40);
    put_u64(img, 40, (size / u64::from(block)).max(1).saturating_mul(u64::from(block)));
    let log = u64_at(img, 56).max(LOG_MIN_BYTES);
    put_u64(img, 56, log);
    let tail = u64_at(img, 72) % log;
    put_u64(img, 72, tail);
    plausible_history(img);
    let shift = 12 + u32::from(img[96]) % 5;
    img[96..100].copy_from_slice(&shift.to_le_bytes());
    let (cp, durable) = (u64_at(img, 64), u64_at(img, 80));
    if img[100] % 4 == 0 {
        // No copy: the copy bytes are zero.
        img[100..352].fill(0);
        put_u64(img, 64, cp.min(durable));
    } else {
        img[100] %= 4;
        let n = 1 + usize::from(img[101]) % 8;
        img[101] = n as u8;
        let mut end = 0u64;
        for i in 0..n {
            let o = 136 + i * 24;
            end += 1 + u64_at(img, o) % 1000;
            put_u64(img, o, end);
        }
        let cursor = u64_at(img, 112) % (end + 1);
        put_u64(img, 112, cursor);
        // durable < live_from <= checkpoint + 1.
        // Room for live_from below (durable + 1 + up to 999).
        let durable = durable.min(u64::MAX - 1000);
        let live_from = durable + 1 + u64_at(img, 104) % 1000;
        put_u64(img, 104, live_from);
        put_u64(img, 64, cp.max(live_from - 1));
    }
}

/// Bends the history into 0..=8 steps with rising epochs and branch seqs
/// that never fall, from the steps' own bytes (64 steps fit; 8 reach every
/// check).
fn plausible_history(img: &mut [u8; SLOT_BYTES]) {
    let n = usize::from(img[92]) % 9;
    img[92..96].copy_from_slice(&((n * STEP_BYTES) as u32).to_le_bytes());
    let (mut epoch, mut branch) = (0u64, 0u64);
    for i in 0..n {
        let o = FIXED_BYTES + i * STEP_BYTES;
        epoch += 1 + u64_at(img, o) % 1000;
        branch += u64_at(img, o + 8) % 1000;
        put_u64(img, o, epoch);
        put_u64(img, o + 8, branch);
    }
}

/// Writes a JSON member list made from the image's own bytes at byte 96.
fn structured_members(img: &mut [u8; SLOT_BYTES]) {
    let at = MEMBERS_AT;
    let seed: Vec<u8> = img[at..at + 256].to_vec();
    let count = usize::from(seed[0] % 5);
    let text = |at: usize| -> String {
        let len = usize::from(seed[at % 256] % 24);
        String::from_utf8_lossy(&seed[(at + 1) % 200..(at + 1) % 200 + len]).into_owned()
    };
    let members: Vec<Member> = (0..count)
        .map(|i| Member {
            name: text(1 + i * 40),
            addr: text(11 + i * 40),
            role: text(21 + i * 40),
            network_sync: seed[31 + i * 40] & 1 != 0,
            fec: (seed[32 + i * 40] & 1 != 0).then(|| text(33 + i * 40)),
        })
        .collect();
    let mut json = serde_json::to_vec(&members).expect("members serialise");
    if seed[0] & 0x80 != 0 {
        // Older writers may leave out the defaulted field.
        json = String::from_utf8(json).expect("utf8").replace(",\"network_sync\":false", "").into_bytes();
    }
    if json.len() <= MEMBERS_MAX_BYTES {
        img[at..SLOT_BYTES - 4].fill(0);
        img[at..at + json.len()].copy_from_slice(&json);
        img[88..92].copy_from_slice(&(json.len() as u32).to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut img = [0u8; SLOT_BYTES];
    let n = rest.len().min(SLOT_BYTES);
    img[..n].copy_from_slice(&rest[..n]);
    // The change map header decoder sees the same bytes.
    if let Ok(h) = changes::Header::decode(&img) {
        assert_eq!(h.encode()[..], img[..40]);
        assert!((changes::REGION_SHIFT_MIN..=changes::REGION_SHIFT_MAX).contains(&h.region_shift));
        assert!(h.regions >= 1 && h.regions <= changes::REGIONS_MAX);
        assert!(h.file_bytes() > changes::HEADER_BYTES);
    }
    if mode & 1 != 0 {
        img[0..8].copy_from_slice(b"SBLKSUPR");
        let v = if mode & 32 != 0 { 2 + u32::from(img[8]) % 3 } else { VERSION };
        img[8..12].copy_from_slice(&v.to_le_bytes());
    }
    if mode & 8 != 0 {
        plausible_geometry(&mut img);
    }
    if mode & 16 != 0 {
        structured_members(&mut img);
    }
    if mode & 2 != 0 {
        // Up to the first NUL: the fuzzer writes text, the fix-up sizes it.
        let text = &img[MEMBERS_AT..SLOT_BYTES - 4];
        let len = text.iter().position(|b| *b == 0).unwrap_or(text.len()).min(MEMBERS_MAX_BYTES);
        img[88..92].copy_from_slice(&(len as u32).to_le_bytes());
    }
    if mode & 4 != 0 {
        let crc = crc32c::crc32c(&img[..SLOT_BYTES - 4]);
        img[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    // Inputs of the wrong size are rejected, not misread.
    assert!(Superblock::decode(&img[..SLOT_BYTES - 1]).is_err());

    let decoded = Superblock::decode(&img);
    if (2..VERSION).contains(&version(&img)) {
        // Older logs carry crc32c records, which this build's scan would
        // take for torn ones: refused, never opened with an empty log.
        assert!(decoded.is_err(), "a version {} superblock was accepted", version(&img));
        return;
    }
    let Ok(sb) = decoded else {
        return;
    };
    let members_len = u32_at(&img, 88) as usize;
    let again = match sb.encode() {
        Ok(again) => again,
        // The one known way to fail: members text written without the
        // defaulted `network_sync` field (or other slack) grows when written
        // back in canonical form, and may then not fit. This build's writer
        // always writes the field; the store reports the error, no panic.
        Err(SuperblockError::MembersTooLarge(n)) if n > members_len => return,
        Err(e) => panic!("an accepted superblock must be writable again: {e}"),
    };
    assert_eq!(Superblock::decode(&again).as_ref(), Ok(&sb));
    // Magic, version and every fixed field up to the members length.
    assert_eq!(again[..88], img[..88]);
    let canonical = serde_json::to_vec(&sb.members).expect("members serialise");
    // Bytes the decoder does not look at: padding and unused segments.
    let segs = 136 + 24 * usize::from(img[101]).min(8);
    let copy_padding = img[102..104] == [0; 2] && img[segs..352].iter().all(|b| *b == 0);
    let at = MEMBERS_AT;
    let history_len = u32_at(&img, 92) as usize;
    let padding_zero = copy_padding
        && img[FIXED_BYTES + history_len..at].iter().all(|b| *b == 0)
        && img[at + members_len..SLOT_BYTES - 4].iter().all(|b| *b == 0);
    if canonical == img[at..at + members_len] && padding_zero {
        assert_eq!(again, img, "a canonical image must re-encode byte for byte");
    }
});
