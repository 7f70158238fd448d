//! Maelstrom layered interleaving with XOR: the encoder side.

use crate::pool::PacketPool;
use crate::wire::padded_len;
use crate::{RepairPacket, SchemeKind};

/// `dst ^= src` over `src.len()` bytes. Written as a plain zip so LLVM
/// vectorises it; `dst` must be at least as long as `src`.
pub(crate) fn xor_into(dst: &mut [u8], src: &[u8]) {
    debug_assert!(dst.len() >= src.len());
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// One residue class's group that has not reached r packets yet.
#[derive(Debug, Default)]
struct OpenGroup {
    seqs: Vec<u64>,
    lens: Vec<u16>,
    /// XOR of the zero-padded packets so far; as long as the longest one.
    acc: Vec<u8>,
    /// Whether this class is in its layer's `listed` vector.
    listed: bool,
}

/// One layer: `stride` interleaved residue classes, each grouped r at a time.
#[derive(Debug)]
struct Layer {
    stride: u64,
    /// Indexed by `seq % stride`; buffers keep their capacity across groups.
    groups: Vec<OpenGroup>,
    /// Residue classes that may hold an open group, so flush needn't scan
    /// all `stride` of them. May list classes that have since closed.
    listed: Vec<usize>,
    /// How many groups of this layer are non-empty right now.
    open_count: usize,
}

/// The layered XOR encoder state: memory is at most
/// `sum(strides) * (r * 10 + MAX_PACKET_BYTES)` bytes, reached only when
/// every residue class holds a maximal packet.
#[derive(Debug)]
pub(crate) struct XorEncoder {
    r: usize,
    layers: Vec<Layer>,
}

impl XorEncoder {
    pub(crate) fn new(r: usize, strides: &[u64]) -> Self {
        let layers = strides
            .iter()
            .map(|&stride| Layer {
                stride,
                // Strides are capped by MAX_STRIDE, so this fits memory.
                groups: (0..stride).map(|_| OpenGroup::default()).collect(),
                listed: Vec::new(),
                open_count: 0,
            })
            .collect();
        XorEncoder { r, layers }
    }

    pub(crate) fn has_open_groups(&self) -> bool {
        self.layers.iter().any(|l| l.open_count > 0)
    }

    /// Adds one packet to its group in every layer, emitting full groups.
    pub(crate) fn push(&mut self, seq: u64, payload: &[u8], pool: &mut PacketPool, out: &mut Vec<RepairPacket>) {
        let total = self.layers.len() as u8;
        for (index, layer) in self.layers.iter_mut().enumerate() {
            // stride <= MAX_STRIDE, so the residue fits usize.
            let class = (seq % layer.stride) as usize;
            let group = &mut layer.groups[class];
            if group.seqs.is_empty() {
                layer.open_count += 1;
                if !group.listed {
                    group.listed = true;
                    layer.listed.push(class);
                }
            }
            group.seqs.push(seq);
            // The caller checked payload.len() <= MAX_PACKET_BYTES.
            group.lens.push(payload.len() as u16);
            if payload.len() > group.acc.len() {
                group.acc.resize(payload.len(), 0);
            }
            xor_into(&mut group.acc, payload);
            if group.seqs.len() == self.r {
                out.push(close(group, pool, index as u8, total));
                layer.open_count -= 1;
            }
        }
    }

    /// Closes every open group in every layer now.
    pub(crate) fn flush(&mut self, pool: &mut PacketPool, out: &mut Vec<RepairPacket>) {
        let total = self.layers.len() as u8;
        for (index, layer) in self.layers.iter_mut().enumerate() {
            for class in layer.listed.drain(..) {
                let group = &mut layer.groups[class];
                group.listed = false;
                if !group.seqs.is_empty() {
                    out.push(close(group, pool, index as u8, total));
                }
            }
            layer.open_count = 0;
        }
    }
}

/// Moves a group's contents into a pooled packet, leaving the group empty
/// with the pooled packet's (cleared, capacity-keeping) buffers.
fn close(group: &mut OpenGroup, pool: &mut PacketPool, index: u8, total: u8) -> RepairPacket {
    debug_assert!(!group.seqs.is_empty());
    let mut packet = pool.take(SchemeKind::LayeredXor, index, total);
    // A group of only empty packets still carries a one-byte payload.
    let len = padded_len(&group.lens);
    group.acc.resize(len, 0);
    std::mem::swap(&mut packet.seqs, &mut group.seqs);
    std::mem::swap(&mut packet.lens, &mut group.lens);
    std::mem::swap(&mut packet.payload, &mut group.acc);
    packet.debug_check();
    packet
}
