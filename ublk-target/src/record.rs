//! The run-directory record: what a restarted daemon needs to find and
//! reattach to its device after a crash (docs/semantics.md §11).
//!
//! One small JSON file per volume, `RUN_DIR/<volume>.ublk.json`, written
//! atomically (temp file + rename) so a crash never leaves half a record.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What is persisted about a served device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Volume name the device serves.
    pub volume: String,
    /// N of /dev/ublkbN.
    pub dev_id: u32,
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// Pid of the daemon that served it last.
    pub pid: i32,
}

/// Volume names become file names, so they are restricted to a safe set.
pub(crate) fn check_volume_name(volume: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let valid = !volume.is_empty() && volume.len() <= 64 && !volume.starts_with('.') && volume.chars().all(ok_char);
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "volume name {volume:?}: expected 1-64 characters from [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// Path of the record for `volume` under `run_dir`.
pub fn record_path(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(format!("{volume}.ublk.json"))
}

/// Reads the record for `volume`; `Ok(None)` when there is none.
pub fn read_record(run_dir: &Path, volume: &str) -> Result<Option<DeviceRecord>> {
    check_volume_name(volume)?;
    let path = record_path(run_dir, volume);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Record { path, source }),
    };
    let rec: DeviceRecord = serde_json::from_str(&text).map_err(|e| Error::Record {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    if rec.volume != volume {
        let msg = format!("record names volume {:?}", rec.volume);
        let source = std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
        return Err(Error::Record { path, source });
    }
    Ok(Some(rec))
}

/// Writes (or replaces) the record atomically, creating `run_dir`.
pub fn write_record(run_dir: &Path, rec: &DeviceRecord) -> Result<()> {
    check_volume_name(&rec.volume)?;
    let path = record_path(run_dir, &rec.volume);
    let rec_err = |source| Error::Record { path: path.clone(), source };
    std::fs::create_dir_all(run_dir).map_err(rec_err)?;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(rec_err)
}

/// Removes the record; a missing record is not an error.
pub fn remove_record(run_dir: &Path, volume: &str) -> Result<()> {
    check_volume_name(volume)?;
    let path = record_path(run_dir, volume);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Record { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DeviceRecord {
        DeviceRecord { volume: "vol0".into(), dev_id: 3, size: 1 << 30, logical_block_size: 4096, pid: 42 }
    }

    #[test]
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert_eq!(read_record(&run, "vol0").unwrap(), None);
        write_record(&run, &rec()).unwrap();
        assert_eq!(read_record(&run, "vol0").unwrap(), Some(rec()));
        let mut newer = rec();
        newer.pid = 43;
        write_record(&run, &newer).unwrap();
        assert_eq!(read_record(&run, "vol0").unwrap().unwrap().pid, 43);
        remove_record(&run, "vol0").unwrap();
        remove_record(&run, "vol0").unwrap();
        assert_eq!(read_record(&run, "vol0").unwrap(), None);
    }

    #[test]
    fn rejects_unsafe_volume_names() {
        for bad in ["", "../etc", ".hidden", "a/b", "vol 0", &"x".repeat(65)] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
        for good in ["vol0", "a.b-c_d", "V"] {
            check_volume_name(good).unwrap();
        }
    }

    #[test]
    fn corrupt_or_foreign_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(record_path(dir.path(), "vol0"), b"{not json").unwrap();
        assert!(matches!(read_record(dir.path(), "vol0"), Err(Error::Record { .. })));
        let mut other = rec();
        other.volume = "vol1".into();
        let text = serde_json::to_string(&other).unwrap();
        std::fs::write(record_path(dir.path(), "vol0"), text).unwrap();
        assert!(read_record(dir.path(), "vol0").is_err());
    }
}
