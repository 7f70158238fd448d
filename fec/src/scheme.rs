//! The FEC scheme chosen for a link, shared by its encoder and decoder.

use crate::{FecError, MAX_GROUP_DATA, MAX_LAYERS, MAX_PARITY, MAX_STRIDE};

/// Which family of code a repair packet belongs to (its wire id in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemeKind {
    /// Maelstrom layered interleaving with XOR (1).
    LayeredXor,
    /// Reed-Solomon over GF(2^8) (2).
    ReedSolomon,
}

impl SchemeKind {
    /// The byte that names this scheme on the wire.
    pub fn wire_id(self) -> u8 {
        match self {
            SchemeKind::LayeredXor => 1,
            SchemeKind::ReedSolomon => 2,
        }
    }

    /// The scheme a wire byte names.
    pub fn from_wire_id(id: u8) -> Result<Self, FecError> {
        match id {
            1 => Ok(SchemeKind::LayeredXor),
            2 => Ok(SchemeKind::ReedSolomon),
            other => Err(FecError::UnknownScheme(other)),
        }
    }
}

/// A validated FEC configuration. Both ends of a link must use the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FecScheme {
    /// Maelstrom layered interleaving: layer `k` XORs `r` packets whose seqs
    /// share a residue modulo `strides[k]`, one repair packet per group.
    LayeredXor {
        /// Data packets per repair packet in each layer.
        r: u8,
        /// Interleave stride of each layer; `strides.len()` is c.
        strides: Vec<u64>,
    },
    /// Reed-Solomon: `c` parity shards for every `r` consecutive data packets.
    ReedSolomon {
        /// Data shards per group.
        r: u8,
        /// Parity shards per group.
        c: u8,
    },
}

impl FecScheme {
    /// The most layers [`FecScheme::layered_xor`] takes: its strides 1, 10,
    /// 100, ... must stay within `MAX_STRIDE` (and c within `MAX_LAYERS`).
    pub const LAYERED_XOR_MAX_LAYERS: usize = default_strides_max_layers();

    /// Layered XOR with Maelstrom's default strides 1, 10, 100, ... (10^k).
    pub fn layered_xor(r: usize, c: usize) -> Result<Self, FecError> {
        if c == 0 || c > Self::LAYERED_XOR_MAX_LAYERS {
            return Err(FecError::InvalidParams {
                reason: "layer count c must be in 1..=LAYERED_XOR_MAX_LAYERS (strides 10^k up to MAX_STRIDE)",
            });
        }
        let mut strides = Vec::with_capacity(c);
        let mut stride = 1u64;
        for _ in 0..c {
            strides.push(stride);
            stride = stride.saturating_mul(10);
        }
        Self::layered_xor_with_strides(r, &strides)
    }

    /// Layered XOR with an explicit stride per layer (c = `strides.len()`).
    pub fn layered_xor_with_strides(r: usize, strides: &[u64]) -> Result<Self, FecError> {
        let r = check_r(r)?;
        if strides.is_empty() || strides.len() > MAX_LAYERS {
            return Err(FecError::InvalidParams { reason: "layer count c must be in 1..=MAX_LAYERS" });
        }
        if strides.iter().any(|&s| s == 0 || s > MAX_STRIDE) {
            return Err(FecError::InvalidParams { reason: "every stride must be in 1..=MAX_STRIDE" });
        }
        Ok(FecScheme::LayeredXor { r, strides: strides.to_vec() })
    }

    /// Reed-Solomon with `r` data and `c` parity shards per group.
    pub fn reed_solomon(r: usize, c: usize) -> Result<Self, FecError> {
        let r = check_r(r)?;
        if c == 0 || c > MAX_PARITY {
            return Err(FecError::InvalidParams { reason: "parity count c must be in 1..=MAX_PARITY" });
        }
        // Both bounds are far below u8::MAX, so the cast is exact.
        Ok(FecScheme::ReedSolomon { r, c: c as u8 })
    }

    /// The code family.
    pub fn kind(&self) -> SchemeKind {
        match self {
            FecScheme::LayeredXor { .. } => SchemeKind::LayeredXor,
            FecScheme::ReedSolomon { .. } => SchemeKind::ReedSolomon,
        }
    }

    /// Data packets per group (r).
    pub fn r(&self) -> usize {
        match self {
            FecScheme::LayeredXor { r, .. } | FecScheme::ReedSolomon { r, .. } => usize::from(*r),
        }
    }

    /// Layers (XOR) or parity shards (RS) per group: c.
    pub fn c(&self) -> usize {
        match self {
            FecScheme::LayeredXor { strides, .. } => strides.len(),
            FecScheme::ReedSolomon { c, .. } => usize::from(*c),
        }
    }

    /// The most bytes a repair packet's wire form adds to its coded payload
    /// (fixed header, seq deltas, lengths), for sizing datagrams to an MTU.
    pub fn repair_header_bytes_max(&self) -> usize {
        let r = self.r();
        let delta_bytes = crate::wire::varint_len(self.group_span_seqs());
        crate::wire::FIXED_HEADER_BYTES + (r - 1) * delta_bytes + 2 * r
    }

    /// How many seqs one group can span, first to last covered seq inclusive,
    /// when seqs are consecutive. The decoder window must be at least this.
    pub fn group_span_seqs(&self) -> u64 {
        match self {
            FecScheme::LayeredXor { r, strides } => {
                let top = strides.iter().copied().max().unwrap_or(1);
                (u64::from(*r) - 1) * top + 1
            }
            FecScheme::ReedSolomon { r, .. } => u64::from(*r),
        }
    }
}

const fn default_strides_max_layers() -> usize {
    let (mut c, mut stride) = (0, 1u64);
    while c < MAX_LAYERS && stride <= MAX_STRIDE {
        c += 1;
        stride *= 10;
    }
    c
}

fn check_r(r: usize) -> Result<u8, FecError> {
    if r == 0 || r > MAX_GROUP_DATA {
        return Err(FecError::InvalidParams { reason: "data packets per group r must be in 1..=MAX_GROUP_DATA" });
    }
    // MAX_GROUP_DATA < 256, checked just above.
    Ok(r as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layered_xor_takes_exactly_the_layers_its_strides_allow() {
        // 1, 10, 100, 1000, 10000 <= MAX_STRIDE < 100000.
        assert_eq!(FecScheme::LAYERED_XOR_MAX_LAYERS, 5);
        assert!(FecScheme::layered_xor(8, FecScheme::LAYERED_XOR_MAX_LAYERS).is_ok());
        assert!(FecScheme::layered_xor(8, FecScheme::LAYERED_XOR_MAX_LAYERS + 1).is_err());
    }
}
