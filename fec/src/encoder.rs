//! The encoder: one API over both schemes.

use crate::pool::PacketPool;
use crate::rs::RsEncoder;
use crate::xor::XorEncoder;
use crate::{FecError, FecScheme, RepairPacket, MAX_PACKET_BYTES};

#[derive(Debug)]
enum Inner {
    Xor(XorEncoder),
    Rs(RsEncoder),
}

/// Turns a stream of data packets into repair packets.
///
/// Seqs must strictly increase (gaps are allowed). Repair packets are
/// appended to a caller-provided vector; hand them back with
/// [`Encoder::recycle`] once sent and the steady state allocates nothing.
#[derive(Debug)]
pub struct Encoder {
    scheme: FecScheme,
    inner: Inner,
    last_seq: Option<u64>,
    pool: PacketPool,
}

impl Encoder {
    /// An encoder for `scheme`, with no open group.
    pub fn new(scheme: FecScheme) -> Self {
        let inner = match &scheme {
            FecScheme::LayeredXor { r, strides } => Inner::Xor(XorEncoder::new(usize::from(*r), strides)),
            FecScheme::ReedSolomon { r, c } => Inner::Rs(RsEncoder::new(usize::from(*r), *c)),
        };
        Encoder { scheme, inner, last_seq: None, pool: PacketPool::default() }
    }

    /// The scheme this encoder was built with.
    pub fn scheme(&self) -> &FecScheme {
        &self.scheme
    }

    /// Adds data packet `seq` and appends to `out` the repair packets of
    /// every group it completes. The packet itself is not copied into
    /// `out`: the caller sends it as it is.
    pub fn push(&mut self, seq: u64, payload: &[u8], out: &mut Vec<RepairPacket>) -> Result<(), FecError> {
        if payload.len() > MAX_PACKET_BYTES {
            return Err(FecError::PayloadTooLarge { len_bytes: payload.len(), max_bytes: MAX_PACKET_BYTES });
        }
        if let Some(previous) = self.last_seq {
            if seq <= previous {
                return Err(FecError::SeqNotIncreasing { seq, previous });
            }
        }
        self.last_seq = Some(seq);
        match &mut self.inner {
            Inner::Xor(x) => {
                x.push(seq, payload, &mut self.pool, out);
                Ok(())
            }
            Inner::Rs(rs) => rs.push(seq, payload, &mut self.pool, out),
        }
    }

    /// Closes every partially filled group now and appends its repair
    /// packets to `out`. A link calls this when it goes idle, so that the
    /// last packets before a pause are protected without waiting for more
    /// traffic. Does nothing when no group is open.
    pub fn flush(&mut self, out: &mut Vec<RepairPacket>) -> Result<(), FecError> {
        match &mut self.inner {
            Inner::Xor(x) => {
                x.flush(&mut self.pool, out);
                Ok(())
            }
            Inner::Rs(rs) => rs.flush(&mut self.pool, out),
        }
    }

    /// Like [`Encoder::flush`], but `packet(seq)` may hand back the bytes
    /// of a packet still in an open group (as pushed). Layered XOR then
    /// re-cuts a sparsely filled layer into fewer, fuller groups, so an
    /// idle flush costs about c/r repair packets per data packet rather
    /// than up to one per open group (a stride-100 layer has 100). Each
    /// data packet is still covered once per layer. A layer whose packets
    /// are not all available is closed as [`Encoder::flush`] does.
    pub fn flush_with<'p>(
        &mut self,
        out: &mut Vec<RepairPacket>,
        packet: impl Fn(u64) -> Option<&'p [u8]>,
    ) -> Result<(), FecError> {
        match &mut self.inner {
            Inner::Xor(x) => {
                x.flush_with(&mut self.pool, out, packet);
                Ok(())
            }
            Inner::Rs(rs) => rs.flush(&mut self.pool, out),
        }
    }

    /// Whether some data packet is still waiting for its group to close
    /// (so a [`Encoder::flush`] would emit something).
    pub fn has_open_groups(&self) -> bool {
        match &self.inner {
            Inner::Xor(x) => x.has_open_groups(),
            Inner::Rs(rs) => rs.has_open_groups(),
        }
    }

    /// Returns a sent repair packet's buffers for reuse.
    pub fn recycle(&mut self, packet: RepairPacket) {
        self.pool.give(packet);
    }
}
