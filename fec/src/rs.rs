//! Reed-Solomon (r, c) over GF(2^8), via `reed-solomon-erasure` with its
//! SIMD C kernels (see the README for the measurement behind the choice).

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::pool::PacketPool;
use crate::wire::padded_len;
use crate::{FecError, RepairPacket, SchemeKind, MAX_GROUP_DATA};

/// Codecs for k data shards (k = 1..=MAX_GROUP_DATA) and a fixed parity
/// count, built on first use: partial groups use a smaller k.
#[derive(Debug)]
pub(crate) struct CodecCache {
    parity: usize,
    codecs: Vec<Option<ReedSolomon>>,
}

impl CodecCache {
    pub(crate) fn new(parity: usize) -> Self {
        CodecCache { parity, codecs: (0..=MAX_GROUP_DATA).map(|_| None).collect() }
    }

    pub(crate) fn get(&mut self, data: usize) -> Result<&ReedSolomon, FecError> {
        let slot = self
            .codecs
            .get_mut(data)
            .ok_or(FecError::InvalidParams { reason: "data packets per group r must be in 1..=MAX_GROUP_DATA" })?;
        if slot.is_none() {
            let codec = ReedSolomon::new(data, self.parity).map_err(codec_err)?;
            *slot = Some(codec);
        }
        slot.as_ref().ok_or_else(|| FecError::Codec("codec cache slot empty".into()))
    }
}

pub(crate) fn codec_err(e: reed_solomon_erasure::Error) -> FecError {
    FecError::Codec(e.to_string())
}

/// The Reed-Solomon encoder: buffers one group's packets (copied, since RS
/// needs all of them at once) and emits c parity packets when it closes.
#[derive(Debug)]
pub(crate) struct RsEncoder {
    r: usize,
    c: u8,
    seqs: Vec<u64>,
    lens: Vec<u16>,
    /// r data buffers and c parity buffers, reused group after group.
    data: Vec<Vec<u8>>,
    parity: Vec<Vec<u8>>,
    codecs: CodecCache,
}

impl RsEncoder {
    pub(crate) fn new(r: usize, c: u8) -> Self {
        RsEncoder {
            r,
            c,
            seqs: Vec::with_capacity(r),
            lens: Vec::with_capacity(r),
            data: (0..r).map(|_| Vec::new()).collect(),
            parity: (0..c).map(|_| Vec::new()).collect(),
            codecs: CodecCache::new(usize::from(c)),
        }
    }

    pub(crate) fn has_open_groups(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub(crate) fn push(
        &mut self,
        seq: u64,
        payload: &[u8],
        pool: &mut PacketPool,
        out: &mut Vec<RepairPacket>,
    ) -> Result<(), FecError> {
        let slot = &mut self.data[self.seqs.len()];
        slot.clear();
        slot.extend_from_slice(payload);
        self.seqs.push(seq);
        // The caller checked payload.len() <= MAX_PACKET_BYTES.
        self.lens.push(payload.len() as u16);
        if self.seqs.len() == self.r {
            self.flush(pool, out)?;
        }
        Ok(())
    }

    /// Closes the open group (if any) and emits its c parity packets.
    pub(crate) fn flush(&mut self, pool: &mut PacketPool, out: &mut Vec<RepairPacket>) -> Result<(), FecError> {
        let k = self.seqs.len();
        if k == 0 {
            return Ok(());
        }
        let shard_len = padded_len(&self.lens);
        for d in &mut self.data[..k] {
            d.resize(shard_len, 0);
        }
        for p in &mut self.parity {
            p.resize(shard_len, 0);
        }
        let codec = self.codecs.get(k)?;
        codec.encode_sep(&self.data[..k], &mut self.parity).map_err(codec_err)?;
        for (index, parity) in self.parity.iter_mut().enumerate() {
            let mut packet = pool.take(SchemeKind::ReedSolomon, index as u8, self.c);
            packet.seqs.extend_from_slice(&self.seqs);
            packet.lens.extend_from_slice(&self.lens);
            // Hand the parity bytes over; the packet's old buffer becomes
            // next group's parity scratch.
            std::mem::swap(&mut packet.payload, parity);
            packet.debug_check();
            out.push(packet);
        }
        self.seqs.clear();
        self.lens.clear();
        Ok(())
    }
}

/// Rebuilds the missing data shards of one group in place. `shards` holds k
/// data entries then c parity entries, present ones all `shard_len` long.
pub(crate) fn reconstruct(codecs: &mut CodecCache, shards: &mut [Option<Vec<u8>>]) -> Result<(), FecError> {
    let k =
        shards.len().checked_sub(codecs.parity).ok_or_else(|| FecError::Codec("fewer shards than parity".into()))?;
    codecs.get(k)?.reconstruct_data(shards).map_err(codec_err)
}
