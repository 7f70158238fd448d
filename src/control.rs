//! The control socket of a running HE: one JSON request per line, one JSON
//! reply per line: `status`, `down`, `recovery-rate` and membership changes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{FecConfig, Role};
use crate::engine::membership::{AddReplica, MembershipError};
use crate::engine::Volume;

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// Volume and replica status.
    Status,
    /// Flush, stop serving, exit.
    Down,
    /// Add a replica (`docs/design.md`, "Membership").
    ReplicaAdd {
        name: String,
        addr: String,
        /// local | near | far (default near).
        #[serde(default)]
        role: Option<String>,
        #[serde(default)]
        network_sync: bool,
        /// `SCHEME:R:C`.
        #[serde(default)]
        fec: Option<String>,
        /// Add even if Q is then no longer a strict majority of the set.
        #[serde(default)]
        force: bool,
    },
    /// Remove a replica.
    ReplicaRemove { name: String, force: bool },
    /// Set the recovery rate limit (data bytes/s, 0 = unlimited), or with
    /// `auto` let the controller choose it.
    RecoveryRate {
        bytes_per_s: u64,
        #[serde(default)]
        auto: bool,
    },
    /// Move every replica session to the key file's next key.
    Rekey,
}

/// How long `rekey` waits for each re-established session to be up to
/// date again before it moves on to the next replica.
const REKEY_PER_REPLICA: Duration = Duration::from_secs(20);

/// The served block device path, shared with the control socket.
pub type Device = Arc<Mutex<Option<String>>>;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Could not reach the daemon.
    #[error("cannot reach the starblk daemon at {path} (is `starblk up` running for this volume?)")]
    Connect { path: PathBuf, source: std::io::Error },
    /// The conversation failed.
    #[error("control socket {path}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The daemon answered with an error.
    #[error("daemon refused: {0}")]
    Refused(String),
}

/// Serves the control socket until a `down` request arrives; sends on
/// `down_tx` when it does. Replaces a stale socket file.
/// `device` holds the block device path once it is live.
pub fn serve(path: &Path, volume: Volume, device: Device, down_tx: mpsc::Sender<()>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use: another starblk daemon serves this volume", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = handle(conn, &volume, &device, &down_tx);
        }
    })?;
    Ok(())
}

fn handle(conn: UnixStream, volume: &Volume, device: &Device, down_tx: &mpsc::Sender<()>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    std::io::Read::take(BufReader::new(&conn), 64 * 1024).read_line(&mut line)?;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(ControlRequest::Status) => {
            let dev = device.lock().expect(crate::POISONED).clone();
            serde_json::json!({"ok": true, "status": volume.status(), "device": dev})
        }
        Ok(ControlRequest::Down) => {
            // Answer first: once told, the daemon may finish and exit
            // before this thread writes, and the caller would read EOF.
            writeln!(&conn, "{}", serde_json::json!({"ok": true}))?;
            let _ = down_tx.send(());
            return Ok(());
        }
        Ok(ControlRequest::RecoveryRate { bytes_per_s, auto }) => {
            let old = if auto { volume.set_recovery_rate_auto() } else { volume.set_recovery_rate(bytes_per_s) };
            serde_json::json!({"ok": true, "previous_bytes_per_s": old})
        }
        Ok(ControlRequest::Rekey) => match volume.rekey(REKEY_PER_REPLICA) {
            Ok(report) => serde_json::json!({"ok": true, "rekey": report}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        },
        Ok(ControlRequest::ReplicaAdd { name, addr, role, network_sync, fec, force }) => {
            match add_request(name, addr, role, network_sync, fec, force) {
                Ok(req) => membership_reply(volume.add_replica(req)),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            }
        }
        Ok(ControlRequest::ReplicaRemove { name, force }) => membership_reply(volume.remove_replica(&name, force)),
        Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut w = &conn;
    writeln!(w, "{reply}")
}

/// Checks and converts a `replica add` request.
fn add_request(
    name: String,
    addr: String,
    role: Option<String>,
    network_sync: bool,
    fec: Option<String>,
    force: bool,
) -> Result<AddReplica, String> {
    let role: Role = role.as_deref().unwrap_or("near").parse().map_err(|e| format!("--role: {e}"))?;
    let fec: Option<FecConfig> = fec.map(|f| f.parse()).transpose().map_err(|e| format!("--fec: {e}"))?;
    if fec.is_some() && !network_sync {
        return Err("--fec needs --network-sync".into());
    }
    crate::config::check_name(&name).map_err(|e| format!("--name {name:?}: {e}"))?;
    crate::config::check_addr(&addr).map_err(|e| format!("--addr {addr:?}: {e}"))?;
    Ok(AddReplica { name, addr, role, network_sync, fec, force })
}

fn membership_reply(r: Result<u64, MembershipError>) -> serde_json::Value {
    match r {
        Ok(version) => serde_json::json!({"ok": true, "version": version}),
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}

/// Sends one request and returns the reply's JSON (with `ok` checked).
pub fn call(path: &Path, req: &ControlRequest, timeout: Duration) -> Result<serde_json::Value, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    let conn =
        UnixStream::connect(path).map_err(|source| ControlError::Connect { path: path.to_path_buf(), source })?;
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(req).expect("request serialises")).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io)?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| io(e.into()))?;
    if v["ok"].as_bool() != Some(true) {
        return Err(ControlError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()));
    }
    Ok(v)
}
