//! crc32c of a concatenation from the crcs of its parts.
//!
//! A write's data is checksummed once (`docs/architecture.md`, the write
//! path); frames and log records that cover it fold that crc in instead
//! of reading the data again. `crc32c::crc32c_combine` builds the
//! "append n zero bytes" operator from scratch on every call, about
//! 15 squarings of a 32 × 32 bit matrix, which costs more than
//! checksumming 4 KiB outright: the guest profile showed it at 13 % of
//! the CPU. Writes come in a few lengths (multiples of 4 KiB up to
//! 1 MiB), so the operator for each such length is built once and kept;
//! applying it is at most 32 XORs.

use std::sync::OnceLock;

use crate::proto::MAX_IO_BYTES;

/// Lengths whose operator is cached: multiples of this, up to `MAX_IO_BYTES`.
const STEP_BYTES: usize = 4096;
const CACHED: usize = MAX_IO_BYTES as usize / STEP_BYTES + 1;

/// One operator per cached length: column `i` is the image of bit `i`.
static OPS: [OnceLock<[u32; 32]>; CACHED] = [const { OnceLock::new() }; CACHED];

/// The crc32c of `a ‖ b`, given `crc_a = crc32c(a)`, `crc_b = crc32c(b)`
/// and `len_b = b.len()`.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if len_b == 0 {
        return crc_a; // as the crate does: an empty b has crc 0
    }
    if !len_b.is_multiple_of(STEP_BYTES) || len_b / STEP_BYTES >= CACHED {
        return crc32c::crc32c_combine(crc_a, crc_b, len_b);
    }
    let op = OPS[len_b / STEP_BYTES].get_or_init(|| operator(len_b));
    apply(op, crc_a) ^ crc_b
}

/// The linear map c ↦ crc32c_combine(c, 0, len), column by column.
fn operator(len: usize) -> [u32; 32] {
    let mut op = [0u32; 32];
    for (i, col) in op.iter_mut().enumerate() {
        *col = crc32c::crc32c_combine(1 << i, 0, len);
    }
    op
}

fn apply(op: &[u32; 32], mut c: u32) -> u32 {
    let mut out = 0;
    let mut i = 0;
    while c != 0 {
        if c & 1 == 1 {
            out ^= op[i];
        }
        c >>= 1;
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_a_whole_pass_and_the_crate() {
        let data: Vec<u8> = (0..(2 * STEP_BYTES + 100)).map(|i| (i * 7 % 251) as u8).collect();
        for split in [0, 1, 100, STEP_BYTES + 100, 2 * STEP_BYTES + 100] {
            let (a, b) = data.split_at(split);
            let got = combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len());
            assert_eq!(got, crc32c::crc32c(&data), "split at {split}");
        }
        for len in [0, STEP_BYTES, 32 * STEP_BYTES, MAX_IO_BYTES as usize, MAX_IO_BYTES as usize + STEP_BYTES] {
            for (a, b) in [(0u32, 0u32), (0xdead_beef, 0x1234_5678), (u32::MAX, 7)] {
                assert_eq!(combine(a, b, len), crc32c::crc32c_combine(a, b, len), "len {len}");
            }
        }
    }
}
