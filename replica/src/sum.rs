//! The checksums of frames and log records (`docs/protocol.md`, "Frame
//! check"; `docs/on-disk-format.md`, "Record check").
//!
//! A write's data is hashed once, with 64-bit XXH3, when the host takes
//! it. A frame or a log record that carries the data is checked over its
//! own header bytes followed by that 64-bit data sum, not over the data
//! again: N replicas cost the host one pass over the data, and a replica
//! one pass for the frame check that also serves its log record.
//!
//! Why XXH3 and not crc32c: both find any random corruption with about
//! the same odds (the check kept is 32 bits; the data sum under it is
//! 64). On this project's machines XXH3 ran on par with the crc32c
//! crate's hardware path natively, and about 4× as fast in the QEMU/TCG
//! guest of `scripts/bench-vm`, where the `crc32` instruction is emulated
//! (`docs/performance.md`, "One XXH3 pass per write"). crc32c guarantees
//! to find short bursts, which XXH3 does not; TCP's own checksum and the
//! disk's ECC sit under both.

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

/// The 64-bit sum of a data part.
pub fn data_sum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// [`data_sum`] of the concatenation of `parts`.
pub fn data_sum_parts(parts: &[&[u8]]) -> u64 {
    match parts {
        [] => xxh3_64(&[]),
        [one] => xxh3_64(one),
        _ => {
            let mut h = Xxh3Default::new();
            for p in parts {
                h.update(p);
            }
            h.digest()
        }
    }
}

/// `known`, the caller's sum of `parts` (checked in debug builds), or
/// else the sum taken here.
pub fn data_sum_known(known: Option<u64>, parts: &[&[u8]]) -> u64 {
    match known {
        Some(s) => {
            debug_assert_eq!(s, data_sum_parts(parts), "a known sum that does not match its data");
            s
        }
        None => data_sum_parts(parts),
    }
}

/// Most lead bytes [`check`] hashes from the stack: a frame header and a
/// write sub-header, or a log record header.
const LEAD_BYTES_MAX: usize = 120;

/// The 32-bit check of `lead` (header bytes, in order) followed by the
/// little-endian `data_sum` of the data they describe: the low 32 bits
/// of XXH3-64 over those bytes.
pub fn check(lead: &[&[u8]], data_sum: u64) -> u32 {
    let total: usize = lead.iter().map(|p| p.len()).sum();
    if total > LEAD_BYTES_MAX {
        let mut h = Xxh3Default::new();
        for p in lead {
            h.update(p);
        }
        h.update(&data_sum.to_le_bytes());
        return h.digest() as u32;
    }
    let mut buf = [0u8; LEAD_BYTES_MAX + 8];
    let mut at = 0;
    for p in lead {
        buf[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    buf[at..at + 8].copy_from_slice(&data_sum.to_le_bytes());
    xxh3_64(&buf[..at + 8]) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_long_leads_hash_as_their_concatenation() {
        let data: Vec<u8> = (0..10_000).map(|i| (i * 7 % 251) as u8).collect();
        for split in [0, 1, 100, 4096, 9_999, 10_000] {
            let (a, b) = data.split_at(split);
            assert_eq!(data_sum_parts(&[a, b]), data_sum(&data), "split at {split}");
            assert_eq!(data_sum_parts(&[a, &[], b]), data_sum(&data), "split at {split}");
        }
        // The stack path and the streaming path agree at the boundary.
        for len in [0, 1, LEAD_BYTES_MAX - 1, LEAD_BYTES_MAX, LEAD_BYTES_MAX + 1, 4000] {
            let lead = &data[..len];
            let mut whole = lead.to_vec();
            whole.extend_from_slice(&42u64.to_le_bytes());
            assert_eq!(check(&[lead], 42), xxh3_64(&whole) as u32, "lead of {len} bytes");
            let (a, b) = lead.split_at(len / 2);
            assert_eq!(check(&[a, b], 42), check(&[lead], 42), "lead of {len} bytes in two parts");
        }
    }

    #[test]
    fn a_changed_data_sum_or_lead_byte_changes_the_check() {
        let lead = [1u8; 60];
        let base = check(&[&lead], 7);
        assert_ne!(check(&[&lead], 8), base);
        for i in 0..lead.len() {
            let mut l = lead;
            l[i] ^= 0x10;
            assert_ne!(check(&[&l], 7), base, "byte {i}");
        }
    }
}
