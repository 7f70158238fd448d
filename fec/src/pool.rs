//! A free list of repair packets so the encoder's steady state allocates
//! nothing: callers hand sent packets back with [`crate::Encoder::recycle`].

use crate::{RepairPacket, SchemeKind};

/// Packets kept for reuse; beyond this, recycled packets are simply dropped
/// so a caller that recycles more than it takes can't grow memory.
const MAX_POOLED: usize = 256;

#[derive(Debug, Default)]
pub(crate) struct PacketPool {
    free: Vec<RepairPacket>,
}

impl PacketPool {
    /// A cleared packet (buffers empty, capacity kept) of the given kind.
    pub(crate) fn take(&mut self, kind: SchemeKind, index: u8, total: u8) -> RepairPacket {
        let mut packet = self.free.pop().unwrap_or_else(|| RepairPacket::empty(kind));
        packet.kind = kind;
        packet.index = index;
        packet.total = total;
        debug_assert!(packet.seqs.is_empty() && packet.lens.is_empty());
        debug_assert!(packet.payload.is_empty());
        packet
    }

    pub(crate) fn give(&mut self, mut packet: RepairPacket) {
        if self.free.len() < MAX_POOLED {
            packet.seqs.clear();
            packet.lens.clear();
            packet.payload.clear();
            self.free.push(packet);
        }
    }
}
