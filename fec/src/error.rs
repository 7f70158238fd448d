//! The one error type of this crate.

use crate::SchemeKind;

/// Everything that can go wrong in this crate.
///
/// Wire-decoding variants (`Truncated` .. `TrailingBytes`) are what a peer
/// sending garbage produces; the rest are caller or configuration mistakes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    /// A scheme parameter (r, c, a stride, a window size) is out of range.
    #[error("invalid FEC parameter: {reason}")]
    InvalidParams {
        /// Which parameter and which range it must lie in.
        reason: &'static str,
    },

    /// A data packet is longer than [`crate::MAX_PACKET_BYTES`].
    #[error("payload of {len_bytes} bytes exceeds the maximum of {max_bytes}")]
    PayloadTooLarge {
        /// The offending payload length.
        len_bytes: usize,
        /// The limit, [`crate::MAX_PACKET_BYTES`].
        max_bytes: usize,
    },

    /// The encoder was given a seq that is not greater than the previous one.
    #[error("seq {seq} is not greater than the previous seq {previous}")]
    SeqNotIncreasing {
        /// The seq pushed.
        seq: u64,
        /// The last seq accepted before it.
        previous: u64,
    },

    /// A repair packet of another scheme (or other parameters) reached a
    /// decoder configured differently: the two ends disagree on the config.
    #[error(
        "repair packet is {got:?} with {got_total} shards/layers, decoder expects {expected:?} with {expected_total}"
    )]
    SchemeMismatch {
        /// The decoder's scheme.
        expected: SchemeKind,
        /// The decoder's parity count (RS) or layer count (XOR).
        expected_total: u8,
        /// The packet's scheme.
        got: SchemeKind,
        /// The packet's parity count (RS) or layer count (XOR).
        got_total: u8,
    },

    /// The wire form ended before a field could be read.
    #[error("repair packet truncated: need {needed_bytes} bytes, have {have_bytes}")]
    Truncated {
        /// Bytes needed to read up to and including the next field.
        needed_bytes: usize,
        /// Bytes available.
        have_bytes: usize,
    },

    /// The first byte is not the repair packet magic.
    #[error("bad repair packet magic {0:#04x}")]
    BadMagic(u8),

    /// The wire version is not one this build understands.
    #[error("unsupported repair packet version {0}")]
    UnsupportedVersion(u8),

    /// The scheme byte names no known scheme.
    #[error("unknown FEC scheme id {0}")]
    UnknownScheme(u8),

    /// A header field is out of its allowed range.
    #[error("repair packet field `{field}` has invalid value {value}")]
    BadField {
        /// The field's name as in the wire layout.
        field: &'static str,
        /// The value found.
        value: u64,
    },

    /// The covered seqs are not strictly increasing or overflow `u64`.
    #[error("repair packet covered seqs are not strictly increasing within u64")]
    BadSeqList,

    /// The declared payload length does not match the covered lengths.
    #[error("repair payload is {declared_bytes} bytes, covered lengths require {expected_bytes}")]
    PayloadLenMismatch {
        /// The payload length field.
        declared_bytes: usize,
        /// The length implied by the covered packets' lengths.
        expected_bytes: usize,
    },

    /// Bytes follow the payload; a datagram holds exactly one repair packet.
    #[error("{extra_bytes} unexpected bytes after the repair payload")]
    TrailingBytes {
        /// How many bytes were left over.
        extra_bytes: usize,
    },

    /// The Reed-Solomon library refused an operation; this indicates a bug
    /// here, because every shard is checked before the call.
    #[error("reed-solomon codec: {0}")]
    Codec(String),
}
