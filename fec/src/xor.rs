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
            add_to_group(&mut group.seqs, &mut group.lens, &mut group.acc, seq, payload);
            if group.seqs.len() == self.r {
                out.push(close(group, pool, index as u8, total));
                layer.open_count -= 1;
            }
        }
    }

    /// Closes every open group in every layer now.
    pub(crate) fn flush(&mut self, pool: &mut PacketPool, out: &mut Vec<RepairPacket>) {
        self.flush_with(pool, out, |_| None);
    }

    /// Closes every open group; where the caller can still supply the
    /// packets, regroups a sparse layer first (see [`crate::Encoder::flush_with`]).
    pub(crate) fn flush_with<'p>(
        &mut self,
        pool: &mut PacketPool,
        out: &mut Vec<RepairPacket>,
        packet: impl Fn(u64) -> Option<&'p [u8]>,
    ) {
        let total = self.layers.len() as u8;
        let mut regrouped = 0;
        for (index, layer) in self.layers.iter_mut().enumerate() {
            if regroup(layer, self.r, regrouped, &packet, pool, (index as u8, total), out) {
                regrouped += 1;
                continue;
            }
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

/// Closing a layer's open groups as they stand costs one repair packet per
/// group: on a link that goes idle every few dozen packets, a stride-100
/// layer would send nearly one repair per data packet. Instead, the `n`
/// open members are re-cut into `g = ceil(n / r)` groups of at most r,
/// interleaved by g, so the layer still costs 1/r and still survives a
/// burst of g. The `shift`-th regrouped layer of a flush takes diagonals
/// rather than columns of the same grid, so two sparse layers never send
/// the same groups. Every member still gets exactly one repair in the
/// layer. Returns false (nothing done) when regrouping would not save
/// packets or a member's bytes are not available.
fn regroup<'p>(
    layer: &mut Layer,
    r: usize,
    shift: usize,
    packet: &impl Fn(u64) -> Option<&'p [u8]>,
    pool: &mut PacketPool,
    (index, total): (u8, u8),
    out: &mut Vec<RepairPacket>,
) -> bool {
    let n: usize = layer.listed.iter().map(|&c| layer.groups[c].seqs.len()).sum();
    let g = n.div_ceil(r);
    if n == 0 || g as u64 >= layer.stride.min(layer.open_count as u64) {
        return false;
    }
    let mut seqs: Vec<u64> = layer.listed.iter().flat_map(|&c| layer.groups[c].seqs.iter().copied()).collect();
    seqs.sort_unstable();
    let Some(members) = seqs.iter().map(|&seq| Some((seq, packet(seq)?))).collect::<Option<Vec<_>>>() else {
        return false;
    };
    let first = out.len();
    out.extend((0..g).map(|_| pool.take(SchemeKind::LayeredXor, index, total)));
    for (e, &(seq, bytes)) in members.iter().enumerate() {
        let (row, col) = (e / g, e % g);
        let j = (col + g - (shift % g) * (row % g) % g) % g;
        let p = &mut out[first + j];
        add_to_group(&mut p.seqs, &mut p.lens, &mut p.payload, seq, bytes);
    }
    for p in &mut out[first..] {
        debug_assert!(!p.seqs.is_empty() && p.seqs.len() <= r);
        let len = padded_len(&p.lens);
        p.payload.resize(len, 0);
        p.debug_check();
    }
    for class in layer.listed.drain(..) {
        let group = &mut layer.groups[class];
        group.listed = false;
        group.seqs.clear();
        group.lens.clear();
        group.acc.clear();
    }
    layer.open_count = 0;
    true
}

/// Adds one packet to a group's seq list, length list and XOR accumulator
/// (as long as its longest packet).
fn add_to_group(seqs: &mut Vec<u64>, lens: &mut Vec<u16>, acc: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    seqs.push(seq);
    // Encoder::push checked payload.len() <= MAX_PACKET_BYTES.
    lens.push(payload.len() as u16);
    if payload.len() > acc.len() {
        acc.resize(payload.len(), 0);
    }
    xor_into(acc, payload);
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
