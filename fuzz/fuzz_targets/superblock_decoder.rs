//! Fuzzes `Superblock::decode` with 4096-byte slot images.
//!
//! The first input byte picks fix-ups so the fuzzer gets past the cheap
//! checks into the range checks and the members JSON: bit 0 writes the
//! right magic and version, bit 1 sets the members length to the length of
//! the JSON-looking text at byte 96, bit 2 recomputes the crc. The rest of
//! the input is the slot image (cut or zero-padded to 4096 bytes).
//!
//! Asserts: no panic; an accepted image re-encodes, and the re-encoding
//! decodes to the same value with the same fixed fields; an accepted image
//! whose members JSON is already in canonical form re-encodes to exactly the
//! same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use starblk_replica::superblock::{Superblock, MEMBERS_MAX_BYTES, SLOT_BYTES};

const FIXED_BYTES: usize = 96;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut img = [0u8; SLOT_BYTES];
    let n = rest.len().min(SLOT_BYTES);
    img[..n].copy_from_slice(&rest[..n]);
    if mode & 1 != 0 {
        img[0..8].copy_from_slice(b"SBLKSUPR");
        img[8..12].copy_from_slice(&1u32.to_le_bytes());
    }
    if mode & 2 != 0 {
        // Up to the first NUL: the fuzzer writes text, the fix-up sizes it.
        let text = &img[FIXED_BYTES..SLOT_BYTES - 4];
        let len = text.iter().position(|b| *b == 0).unwrap_or(text.len()).min(MEMBERS_MAX_BYTES);
        img[88..92].copy_from_slice(&(len as u32).to_le_bytes());
    }
    if mode & 4 != 0 {
        let crc = crc32c::crc32c(&img[..SLOT_BYTES - 4]);
        img[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    // Inputs of the wrong size are rejected, not misread.
    assert!(Superblock::decode(&img[..SLOT_BYTES - 1]).is_err());

    let Ok(sb) = Superblock::decode(&img) else {
        return;
    };
    let again = sb.encode().expect("an accepted superblock must be writable again");
    assert_eq!(Superblock::decode(&again).as_ref(), Ok(&sb));
    // Magic, version and every fixed field up to the members length.
    assert_eq!(again[..88], img[..88]);
    let members_len = u32::from_le_bytes(img[88..92].try_into().expect("4")) as usize;
    let canonical = serde_json::to_vec(&sb.members).expect("members serialise");
    let padding_zero = img[92..96] == [0; 4] && img[FIXED_BYTES + members_len..SLOT_BYTES - 4].iter().all(|b| *b == 0);
    if canonical == img[FIXED_BYTES..FIXED_BYTES + members_len] && padding_zero {
        assert_eq!(again, img, "a canonical image must re-encode byte for byte");
    }
});
