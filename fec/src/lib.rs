//! FEC codecs for the network-sync link. Pure functions, no I/O.
//!
//! Two schemes share one API ([`Encoder`], [`Decoder`], [`RepairPacket`]):
//!
//! - Maelstrom layered interleaving with XOR (SMFS, seeds/001): layer k
//!   groups packets whose seq has the same residue modulo stride `I_k`, r at
//!   a time, and sends the XOR of each group. Growing strides spread a burst
//!   over many groups, each of which can then repair its single loss.
//! - Reed-Solomon (r, c): c parity packets for every r consecutive data
//!   packets; any c losses among the r + c are repaired.
//!
//! Groups are closed when full or when the link goes idle
//! ([`Encoder::flush`]); every repair packet names exactly the seqs it
//! covers and their lengths, so variable-length and partial groups decode
//! exactly.

mod decoder;
mod encoder;
mod error;
mod pool;
mod rs;
mod scheme;
mod window;
mod wire;
mod xor;

pub use decoder::{Decoder, DecoderConfig, DecoderStats, Recovered, MAX_WINDOW_SEQS};
pub use encoder::Encoder;
pub use error::FecError;
pub use scheme::{FecScheme, SchemeKind};
pub use wire::{padded_len, RepairPacket};

/// Largest data packet, in bytes; lengths travel as u16.
pub const MAX_PACKET_BYTES: usize = u16::MAX as usize;
/// Largest r: data packets per group.
pub const MAX_GROUP_DATA: usize = 64;
/// Largest c for layered XOR.
pub const MAX_LAYERS: usize = 8;
/// Largest c for Reed-Solomon; with `MAX_GROUP_DATA` it stays within
/// GF(2^8)'s 256 shards.
pub const MAX_PARITY: usize = 16;
/// Largest interleave stride. The encoder keeps one open group per residue
/// class, so its memory grows with the sum of the strides.
pub const MAX_STRIDE: u64 = 16_384;
