//! Keys of an authenticated link (`LinkConfig::key`): every datagram
//! carries a MAC trailer (`wire`). The initiator's hellos are keyed by a
//! key derived from the shared key alone, the responder's reply by one
//! that also covers the initiator's fresh nonce (so the reply proves the
//! responder holds the key now); every other datagram uses a direction
//! key derived from the shared key, the link id and both ends' fresh
//! nonces, so a datagram of another link instance, or of the other
//! direction, never verifies. The `blake3` crate does the hashing.

use crate::wire::DatagramKey;

/// Bytes of a hello's authentication nonce.
pub const AUTH_NONCE_BYTES: usize = 32;

const HELLO_CONTEXT: &str = "starblk 2025 netsync hello v1";
const REPLY_CONTEXT: &str = "starblk 2025 netsync hello reply v1";
const SESSION_CONTEXT: &str = "starblk 2025 netsync datagram keys v1";

/// A shared 32-byte key. Debug output hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// A key from its raw bytes.
    pub fn new(bytes: [u8; 32]) -> LinkKey {
        LinkKey(bytes)
    }

    /// The key of the initiator's hellos.
    pub(crate) fn hello(&self) -> DatagramKey {
        DatagramKey::new(blake3::derive_key(HELLO_CONTEXT, &self.0))
    }

    /// The key of the responder's hello replies to the initiator whose
    /// nonce is `initiator_nonce`.
    pub(crate) fn reply(&self, initiator_nonce: &[u8; AUTH_NONCE_BYTES]) -> DatagramKey {
        let mut h = blake3::Hasher::new_derive_key(REPLY_CONTEXT);
        h.update(&self.0);
        h.update(initiator_nonce);
        DatagramKey::new(*h.finalize().as_bytes())
    }

    /// The direction keys of one link instance: (initiator → responder,
    /// responder → initiator).
    pub(crate) fn directions(
        &self,
        link_id: u32,
        initiator_nonce: &[u8; AUTH_NONCE_BYTES],
        responder_nonce: &[u8; AUTH_NONCE_BYTES],
    ) -> (DatagramKey, DatagramKey) {
        let mut h = blake3::Hasher::new_derive_key(SESSION_CONTEXT);
        h.update(&self.0);
        h.update(&link_id.to_le_bytes());
        h.update(initiator_nonce);
        h.update(responder_nonce);
        let mut out = [0u8; 64];
        h.finalize_xof().fill(&mut out);
        let (a, b) = out.split_at(32);
        (DatagramKey::new(a.try_into().expect("32")), DatagramKey::new(b.try_into().expect("32")))
    }
}

/// A fresh random nonce.
pub(crate) fn fresh_nonce() -> [u8; AUTH_NONCE_BYTES] {
    let mut n = [0u8; AUTH_NONCE_BYTES];
    getrandom::getrandom(&mut n).expect("the OS random source works");
    n
}
