//! FEC codecs for the network-sync link. Pure functions, no I/O.
//!
//! Two schemes share one API ([`Encoder`], [`Decoder`], [`RepairPacket`]):
//!
//! - Maelstrom layered interleaving with XOR (SMFS; docs/semantics.md "Sources"): layer k
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
//!
//! ```
//! use starblk_fec::{Decoder, Encoder, FecScheme, RepairPacket};
//!
//! let scheme = FecScheme::layered_xor(8, 3)?; // strides 1, 10, 100
//! let mut enc = Encoder::new(scheme.clone());
//! let mut dec = Decoder::new(&scheme);
//! let (mut repairs, mut recovered, mut wire) = (Vec::new(), Vec::new(), Vec::new());
//! for seq in 1..=5u64 {
//!     let payload = vec![seq as u8; 100 + seq as usize];
//!     enc.push(seq, &payload, &mut repairs)?;
//!     if seq != 3 {
//!         dec.on_data(seq, &payload, &mut recovered)?; // seq 3 is lost
//!     }
//! }
//! enc.flush(&mut repairs)?; // the link went idle
//! for repair in repairs.drain(..) {
//!     wire.clear();
//!     repair.encode_into(&mut wire);
//!     dec.on_repair(RepairPacket::decode(&wire)?, &mut recovered)?;
//!     enc.recycle(repair);
//! }
//! assert_eq!(recovered[0].seq, 3);
//! assert_eq!(recovered[0].payload, vec![3u8; 103]);
//! # Ok::<(), starblk_fec::FecError>(())
//! ```

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
