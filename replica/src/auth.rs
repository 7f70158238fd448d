//! Authentication and optional encryption of replica traffic
//! (`docs/protocol.md`, "Authentication").
//!
//! A key file holds one or two 32-byte keys (current, then next). A
//! session starts with a challenge-response: the client's `AuthHello`
//! names its key (by id) and carries a fresh nonce; the replica answers
//! `AuthChallenge` with its own fresh nonce and a proof (a keyed BLAKE3
//! hash over both nonces) that it knows the key. Both sides derive two
//! per-session keys (one per direction) from the key and both nonces;
//! every later frame is sealed with its direction's key and its frame
//! sequence number: a BLAKE3 keyed hash, or ChaCha20-Poly1305 when the
//! session encrypts. The client proves that it knows the key with its
//! first sealed frame. No cryptographic primitive is written here: the
//! `blake3` and `chacha20poly1305` crates do the work.

use std::fmt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use subtle::ConstantTimeEq;

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a frame MAC (and of an AEAD tag).
pub const MAC_BYTES: usize = 16;
/// Most keys a key file holds: the current one and the next one.
pub const KEYS_MAX: usize = 2;

const KEY_ID_CONTEXT: &str = "starblk 2025 key id v1";
const SESSION_CONTEXT: &str = "starblk 2025 frame session keys v1";
const PROOF_LABEL: &[u8] = b"starblk replica proof v1";

/// A key's public name: the first 8 bytes of a BLAKE3 derivation from
/// it, so a peer can say which key it uses without revealing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A 32-byte shared key. Debug output shows only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; KEY_BYTES],
    id: KeyId,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id)
    }
}

impl Key {
    /// A key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        let d = blake3::derive_key(KEY_ID_CONTEXT, &bytes);
        let id = KeyId(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")));
        Key { bytes, id }
    }

    /// Its public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw bytes (for deriving link keys).
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Key, &'static str> {
        let s = s.trim();
        if s.len() != 2 * KEY_BYTES {
            return Err("expected 64 hex digits (32 bytes)");
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or("expected 64 hex digits (32 bytes)")?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| "not a hex digit (expected 64 hex digits)")?;
        }
        Ok(Key::from_bytes(bytes))
    }
}

/// Why a key file was refused. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Other users may read or write it.
    #[error(
        "key file {path}: mode {mode:04o} gives other users access; it must be 0600 or stricter (chmod 600 {path})"
    )]
    Mode { path: PathBuf, mode: u32 },
    /// Another user owns it.
    #[error("key file {path}: owned by uid {owner}, but starblk runs as uid {me}; the file must belong to the user that runs starblk")]
    Owner { path: PathBuf, owner: u32, me: u32 },
    /// Not a regular file.
    #[error("key file {path}: not a regular file")]
    NotAFile { path: PathBuf },
    /// A line is not a key.
    #[error("key file {path} line {line}: {reason}")]
    BadLine { path: PathBuf, line: usize, reason: &'static str },
    /// No key in it.
    #[error("key file {path}: holds no key; expected one key per line, 64 hex digits (current key, then optionally the next)")]
    Empty { path: PathBuf },
    /// More keys than current + next.
    #[error("key file {path}: holds {count} keys; at most {KEYS_MAX} (the current key, then the next)")]
    TooMany { path: PathBuf, count: usize },
}

/// The keys of a key file: the current one first, then maybe the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    path: PathBuf,
    keys: Vec<Key>,
}

impl KeyRing {
    /// Reads a key file, refusing one that other users can access or that
    /// another user owns.
    pub fn load(path: &Path) -> Result<KeyRing, KeyFileError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| KeyFileError::Io { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(KeyFileError::NotAFile { path: path.to_path_buf() });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Mode { path: path.to_path_buf(), mode });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(KeyFileError::Owner { path: path.to_path_buf(), owner: meta.uid(), me });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        KeyRing::parse(&text, path)
    }

    /// Parses key file text: one key per line (64 hex digits); blank lines
    /// and lines starting with `#` are skipped.
    pub fn parse(text: &str, path: &Path) -> Result<KeyRing, KeyFileError> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let bad = |reason| KeyFileError::BadLine { path: path.to_path_buf(), line: line_no, reason };
            let key = Key::from_hex(t).map_err(bad)?;
            if keys.iter().any(|k| k.id == key.id) {
                return Err(bad("the same key twice"));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty { path: path.to_path_buf() });
        }
        if keys.len() > KEYS_MAX {
            return Err(KeyFileError::TooMany { path: path.to_path_buf(), count: keys.len() });
        }
        Ok(KeyRing { path: path.to_path_buf(), keys })
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current key (the file's first).
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// The next key, if the file holds two.
    pub fn next(&self) -> Option<&Key> {
        self.keys.get(1)
    }

    /// Every key, current first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key with this id, if the file holds it.
    pub fn find(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The ids of its keys, for messages.
    pub fn ids(&self) -> String {
        self.keys.iter().map(|k| k.id.to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Why authentication failed. Counted per reason on both sides
/// (`auth_failures` in `status` and in a replica's stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    /// The peer did not authenticate, but this side has a key (a missing
    /// key_file on the other side).
    NoAuth,
    /// The peer's key is not in this side's key file (a wrong key).
    UnknownKey,
    /// A frame's MAC (or AEAD tag) did not verify: forged, corrupted,
    /// replayed, reordered, or from another session.
    BadMac,
    /// The replica's handshake proof was wrong: it does not know the key.
    BadProof,
    /// The peer asked to authenticate, but this side has no key file.
    NotConfigured,
    /// The replica refused this side's handshake (its reason is logged).
    Refused,
}

impl AuthFailure {
    /// Every reason, for counters.
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::NoAuth,
        AuthFailure::UnknownKey,
        AuthFailure::BadMac,
        AuthFailure::BadProof,
        AuthFailure::NotConfigured,
        AuthFailure::Refused,
    ];

    /// The counter name.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::NoAuth => "no_auth",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadMac => "bad_mac",
            AuthFailure::BadProof => "bad_proof",
            AuthFailure::NotConfigured => "not_configured",
            AuthFailure::Refused => "refused",
        }
    }

    /// The failure a counter name stands for.
    pub fn from_reason(r: &str) -> Option<AuthFailure> {
        AuthFailure::ALL.into_iter().find(|a| a.reason() == r)
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthFailure::NoAuth => "the peer did not authenticate (no key_file on its side?)",
            AuthFailure::UnknownKey => "the peer's key is not in the key file (wrong key)",
            AuthFailure::BadMac => "a frame failed its MAC (forged, corrupted, replayed or from another session)",
            AuthFailure::BadProof => "the replica's handshake proof is wrong (it does not hold the key)",
            AuthFailure::NotConfigured => "the peer asked to authenticate but this side has no key file",
            AuthFailure::Refused => "the replica refused the handshake",
        })
    }
}

/// What a client authenticates with.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The key it names in its AuthHello.
    pub key: Key,
    /// Whether the session's frame payloads are encrypted.
    pub encrypt: bool,
}

/// AuthHello flag: encrypt the session's frame payloads.
pub const AUTH_ENCRYPT: u32 = 1;

/// A fresh random nonce from the operating system.
pub fn fresh_nonce() -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut n).map_err(|e| std::io::Error::other(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

/// The replica's proof that it holds `key`: a keyed hash over the
/// client's AuthHello payload and the replica's nonce.
pub fn replica_proof(key: &Key, hello_payload: &[u8], nonce_r: &[u8; NONCE_BYTES]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.bytes);
    h.update(PROOF_LABEL);
    h.update(&(hello_payload.len() as u64).to_le_bytes());
    h.update(hello_payload);
    h.update(nonce_r);
    *h.finalize().as_bytes()
}

/// Whether `proof` is the replica's proof, compared in constant time.
pub fn proof_ok(key: &Key, hello_payload: &[u8], nonce_r: &[u8; NONCE_BYTES], proof: &[u8; 32]) -> bool {
    replica_proof(key, hello_payload, nonce_r).ct_eq(proof).into()
}

/// The two per-session frame keys: (client → replica, replica → client).
fn session_keys(key: &Key, hello_payload: &[u8], nonce_r: &[u8; NONCE_BYTES]) -> ([u8; 32], [u8; 32]) {
    let mut h = blake3::Hasher::new_derive_key(SESSION_CONTEXT);
    h.update(&key.bytes);
    h.update(&(hello_payload.len() as u64).to_le_bytes());
    h.update(hello_payload);
    h.update(nonce_r);
    let mut out = [0u8; 64];
    h.finalize_xof().fill(&mut out);
    let (a, b) = out.split_at(32);
    (a.try_into().expect("32"), b.try_into().expect("32"))
}

/// Which end of a session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that sent AuthHello (HE, or a replica dialling a peer).
    Client,
    /// The replica that answered.
    Replica,
}

/// The session's frame keys for one end: (send, receive).
pub fn frame_keys(
    side: Side,
    key: &Key,
    hello_payload: &[u8],
    nonce_r: &[u8; NONCE_BYTES],
    encrypt: bool,
) -> (FrameKey, FrameKey) {
    let (c2r, r2c) = session_keys(key, hello_payload, nonce_r);
    match side {
        Side::Client => (FrameKey::new(c2r, encrypt), FrameKey::new(r2c, encrypt)),
        Side::Replica => (FrameKey::new(r2c, encrypt), FrameKey::new(c2r, encrypt)),
    }
}

/// One direction of a session: its key and the sequence number of the
/// next frame. Sealing and opening advance the sequence number, so a
/// frame verifies only at its own place in its own session.
pub struct FrameKey {
    key: [u8; 32],
    seq: u64,
    aead: Option<ChaCha20Poly1305>,
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameKey(seq {}, encrypt {})", self.seq, self.aead.is_some())
    }
}

/// A frame failed to open: the frame sequence number it was expected at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFailed {
    /// The frame sequence number the MAC was checked against.
    pub seq: u64,
}

impl FrameKey {
    fn new(key: [u8; 32], encrypt: bool) -> FrameKey {
        let aead = encrypt.then(|| ChaCha20Poly1305::new(&key.into()));
        FrameKey { key, seq: 0, aead }
    }

    /// Whether payloads are encrypted.
    pub fn encrypts(&self) -> bool {
        self.aead.is_some()
    }

    /// The sequence number of the next frame.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn nonce(seq: u64) -> chacha20poly1305::Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&seq.to_le_bytes());
        n.into()
    }

    /// The MAC of a frame (MAC-only sessions): keyed BLAKE3 over the frame
    /// sequence number, the authenticated header bytes and the payload.
    fn mac(&self, head: &[u8], parts: &[&[u8]]) -> [u8; MAC_BYTES] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.seq.to_le_bytes());
        h.update(head);
        for p in parts {
            h.update(p);
        }
        h.finalize().as_bytes()[..MAC_BYTES].try_into().expect("16 bytes")
    }

    /// Seals a MAC-only frame whose payload is `parts`; returns the MAC.
    /// Panics if the session encrypts (use [`FrameKey::seal_in_place`]).
    pub fn seal_parts(&mut self, head: &[u8], parts: &[&[u8]]) -> [u8; MAC_BYTES] {
        assert!(self.aead.is_none(), "an encrypting session seals in place");
        let mac = self.mac(head, parts);
        self.seq += 1;
        mac
    }

    /// Seals a frame: encrypts `payload` in place when the session
    /// encrypts; returns the MAC or AEAD tag.
    pub fn seal_in_place(&mut self, head: &[u8], payload: &mut [u8]) -> [u8; MAC_BYTES] {
        let tag = match &self.aead {
            None => self.mac(head, &[payload]),
            Some(a) => {
                let tag = a
                    .encrypt_in_place_detached(&Self::nonce(self.seq), head, payload)
                    .expect("ChaCha20-Poly1305 encrypts any frame-sized payload");
                tag.into()
            }
        };
        self.seq += 1;
        tag
    }

    /// Verifies (and decrypts in place) one received frame.
    pub fn open_in_place(&mut self, head: &[u8], mac: &[u8], payload: &mut [u8]) -> Result<(), OpenFailed> {
        let ok = match &self.aead {
            None => bool::from(self.mac(head, &[payload]).ct_eq(mac)),
            Some(a) => {
                let tag = chacha20poly1305::Tag::from_slice(mac);
                a.decrypt_in_place_detached(&Self::nonce(self.seq), head, payload, tag).is_ok()
            }
        };
        if !ok {
            return Err(OpenFailed { seq: self.seq });
        }
        self.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f";

    #[test]
    fn key_file_lines() {
        let p = Path::new("/k");
        let r = KeyRing::parse(&format!("# comment\n{K1}\n\n{K2}  \n"), p).unwrap();
        assert_eq!(r.current().bytes()[1], 1);
        assert_eq!(r.next().unwrap().bytes()[0], 0xf0);
        assert!(r.find(r.next().unwrap().id()).is_some());
        let e = KeyRing::parse(&format!("{K1}\nzz{}\n", &K2[2..]), p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("hex"), "{e}");
        let e = KeyRing::parse(&format!("{K1}\n{}\n", &K2[..60]), p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("64 hex digits"), "{e}");
        assert!(matches!(KeyRing::parse("\n# x\n", p), Err(KeyFileError::Empty { .. })));
        assert!(matches!(
            KeyRing::parse(&format!("{K1}\n{K2}\n{K1}\n"), p),
            Err(KeyFileError::BadLine { line: 3, .. })
        ));
        let three = format!("{K1}\n{K2}\n{}\n", "11".repeat(32));
        assert!(matches!(KeyRing::parse(&three, p), Err(KeyFileError::TooMany { count: 3, .. })));
    }

    #[test]
    fn key_file_mode_and_owner_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k");
        std::fs::write(&f, format!("{K1}\n")).unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false), (0o660, false)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = KeyRing::load(&f);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if !ok {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("0600") && e.contains(&f.display().to_string()), "{e}");
            }
        }
        assert!(matches!(KeyRing::load(&d.path().join("absent")), Err(KeyFileError::Io { .. })));
    }

    fn pair(encrypt: bool) -> (FrameKey, FrameKey) {
        let key = Key::from_hex(K1).unwrap();
        let hello = b"hello payload";
        let nr = [7u8; NONCE_BYTES];
        let (c_tx, _) = frame_keys(Side::Client, &key, hello, &nr, encrypt);
        let (_, r_rx) = frame_keys(Side::Replica, &key, hello, &nr, encrypt);
        (c_tx, r_rx)
    }

    #[test]
    fn frames_open_only_in_order_and_untouched() {
        for encrypt in [false, true] {
            let (mut tx, mut rx) = pair(encrypt);
            let head = [1u8; 12];
            let mut frames = Vec::new();
            for i in 0..3u8 {
                let mut p = vec![i; 100];
                let mac = tx.seal_in_place(&head, &mut p);
                assert_eq!(p != vec![i; 100], encrypt, "encrypted iff asked");
                frames.push((p, mac));
            }
            // Out of order (frame 1 at seq 0) fails; so does a flipped bit.
            let (mut p, mac) = frames[1].clone();
            assert_eq!(rx.open_in_place(&head, &mac, &mut p), Err(OpenFailed { seq: 0 }));
            let (mut p, mut mac) = frames[0].clone();
            mac[3] ^= 1;
            assert!(rx.open_in_place(&head, &mac, &mut p).is_err());
            let (mut p, mac) = frames[0].clone();
            assert!(rx.open_in_place(&[2u8; 12], &mac, &mut p).is_err(), "header is authenticated");
            let (mut p, mac) = frames[0].clone();
            rx.open_in_place(&head, &mac, &mut p).unwrap();
            assert_eq!(p, vec![0u8; 100]);
            // Replaying frame 0 at seq 1 fails.
            let (mut p, mac) = frames[0].clone();
            assert!(rx.open_in_place(&head, &mac, &mut p).is_err());
        }
    }

    #[test]
    fn other_sessions_keys_do_not_open() {
        let key = Key::from_hex(K1).unwrap();
        let (mut tx, _) = frame_keys(Side::Client, &key, b"h", &[1; NONCE_BYTES], false);
        let (_, mut rx) = frame_keys(Side::Replica, &key, b"h", &[2; NONCE_BYTES], false);
        let mut p = vec![5u8; 10];
        let mac = tx.seal_in_place(&[0; 12], &mut p);
        assert!(rx.open_in_place(&[0; 12], &mac, &mut p).is_err());
        // The MAC-only path over parts equals the in-place one.
        let (mut a, _) = frame_keys(Side::Client, &key, b"h", &[1; NONCE_BYTES], false);
        let (mut b, _) = frame_keys(Side::Client, &key, b"h", &[1; NONCE_BYTES], false);
        assert_eq!(a.seal_parts(&[0; 12], &[b"ab", b"cd"]), b.seal_in_place(&[0; 12], &mut b"abcd".to_vec()));
    }

    #[test]
    fn proof_binds_key_and_nonces() {
        let k1 = Key::from_hex(K1).unwrap();
        let k2 = Key::from_hex(K2).unwrap();
        let p = replica_proof(&k1, b"hello", &[3; NONCE_BYTES]);
        assert!(proof_ok(&k1, b"hello", &[3; NONCE_BYTES], &p));
        assert!(!proof_ok(&k2, b"hello", &[3; NONCE_BYTES], &p));
        assert!(!proof_ok(&k1, b"hellO", &[3; NONCE_BYTES], &p));
        assert!(!proof_ok(&k1, b"hello", &[4; NONCE_BYTES], &p));
        assert_ne!(k1.id(), k2.id());
    }
}
