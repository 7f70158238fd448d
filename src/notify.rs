//! systemd readiness (`Type=notify`): `READY=1` to `$NOTIFY_SOCKET`.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket
//! named in `NOTIFY_SOCKET`: a path, or an abstract name written with a
//! leading `@`. Without the variable (not run by systemd) nothing is sent.
//! See `packaging/systemd/` and `docs/operations.md`, "Install with systemd".

use std::io;
use std::os::unix::net::UnixDatagram;

/// Environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the service is ready; `Ok(false)` when not run under a
/// notify socket.
pub fn ready(status: &str) -> io::Result<bool> {
    send(&format!("READY=1\nSTATUS={}\n", status.replace('\n', " ")))
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to
/// `$NOTIFY_SOCKET`; `Ok(false)` when it is unset.
pub fn send(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(target) => send_to(&target, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notify socket `target` (a path or `@name`).
pub fn send_to(target: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target);
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else if bytes.starts_with(b"/") {
        sock.send_to(state.as_bytes(), target)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET}={target:?}: expected an absolute socket path or @abstract-name"),
        ));
    }
    Ok(())
}

/// [`ready`], logging rather than failing: a service manager that cannot
/// be told is no reason to stop serving (systemd then times the start out).
pub fn ready_or_warn(status: &str) {
    match ready(status) {
        Ok(true) => tracing::debug!("told the service manager we are ready"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot notify the service manager ({NOTIFY_SOCKET}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    // `send`, which reads the environment, is tested through the binary
    // (tests/systemd.rs): changing the environment here would race other
    // tests' threads.
    #[test]
    fn sends_to_a_path_and_an_abstract_socket_and_rejects_relative() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        send_to(path.as_os_str(), "READY=1\nSTATUS=serving\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("starblk-notify-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        abs.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let err = send_to(OsStr::new("relative.sock"), "READY=1\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(send_to(dir.path().join("absent.sock").as_os_str(), "READY=1\n").is_err());
    }
}
