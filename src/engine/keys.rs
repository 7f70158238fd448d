//! The HE's keys: which key new replica sessions authenticate with, and
//! the switch to the next key (`starblk rekey`, docs/operations.md "Keys
//! and rotation").

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use starblk_replica::auth::{Credentials, Key, KeyFileError, KeyId, KeyRing};

/// The volume's key file and the key sessions use now.
#[derive(Debug)]
pub struct VolumeKeys {
    path: PathBuf,
    active: RwLock<Key>,
}

/// Why `rekey` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// The volume runs without a key file.
    #[error("volume has no key_file: there is no key to rotate")]
    NoKeyFile,
    /// The key file could not be read.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The key file holds one key only.
    #[error("key file {path} holds one key ({id}); write the current key and then the next key (two lines) to every key file first")]
    NoNextKey { path: PathBuf, id: KeyId },
    /// Sessions already use the file's next key.
    #[error("sessions already use key {id}, the next key in {path}; drop the old key (the first line) from every key file to finish the rotation")]
    AlreadyNext { path: PathBuf, id: KeyId },
}

impl VolumeKeys {
    /// Reads the key file; sessions start with its current (first) key.
    pub fn load(path: &Path) -> Result<VolumeKeys, KeyFileError> {
        let ring = KeyRing::load(path)?;
        Ok(VolumeKeys { path: path.to_path_buf(), active: RwLock::new(ring.current().clone()) })
    }

    /// What the next session to a replica authenticates with.
    pub fn creds(&self, encrypt: bool) -> Credentials {
        Credentials { key: self.active.read().expect("keys lock poisoned").clone(), encrypt }
    }

    /// The id of the key sessions use now.
    pub fn active_id(&self) -> KeyId {
        self.active.read().expect("keys lock poisoned").id()
    }

    /// Re-reads the key file and makes its next (second) key the one new
    /// sessions use; returns the old and new key ids. Open sessions keep
    /// their keys until they are re-established (the caller does that).
    pub fn rekey(&self) -> Result<(KeyId, KeyId), RekeyError> {
        let ring = KeyRing::load(&self.path)?;
        let Some(next) = ring.next() else {
            return Err(RekeyError::NoNextKey { path: self.path.clone(), id: ring.current().id() });
        };
        let mut active = self.active.write().expect("keys lock poisoned");
        if active.id() == next.id() {
            return Err(RekeyError::AlreadyNext { path: self.path.clone(), id: next.id() });
        }
        let old = active.id();
        *active = next.clone();
        Ok((old, next.id()))
    }
}
