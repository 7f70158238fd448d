//! The NBD frontend: serves the volume over the NBD protocol on a Unix
//! socket or TCP (`starblk up --frontend nbd`).
//!
//! Threads: one accept thread; per connection, one thread that runs the
//! handshake and then reads requests and submits them to the engine, and
//! one writer thread that sends the replies. Completions arrive on engine
//! threads through [`Router`], which only queues the reply on the
//! connection's channel: the engine never waits on a client's socket.
//!
//! The codec is in [`proto`]; `docs/operations.md` says how to attach.

mod conn;
mod inflight;
pub mod proto;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use inflight::Router;

use crate::engine::Volume;
use starblk_replica::proto::MAX_IO_BYTES;

/// Most connections served at once. Each may hold up to
/// `MAX_IN_FLIGHT` replies of up to 1 MiB, so this bounds memory.
const MAX_CONNECTIONS: usize = 16;
/// How often the accept thread looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// Why the NBD server could not start.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// `--nbd-listen` is neither `unix:PATH` nor `HOST:PORT`.
    #[error("--nbd-listen {0:?}: expected unix:PATH or HOST:PORT")]
    BadListen(String),
    /// Another process answers on the Unix socket.
    #[error("{0} is in use: another NBD server listens there")]
    InUse(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("NBD socket {addr}: {what}")]
    Socket { addr: String, what: &'static str, source: io::Error },
}

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT` (port 0 picks a free one).
    Tcp(String),
}

impl ListenAddr {
    /// Parses `unix:PATH` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<ListenAddr, NbdError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(NbdError::BadListen(s.into()));
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(ListenAddr::Tcp(s.into())),
            _ => Err(NbdError::BadListen(s.into())),
        }
    }

    /// The default: `NAME.nbd.sock` next to the control socket (so
    /// `/run/starblk/NAME.nbd.sock` unless `control_socket` moves it).
    pub fn default_for(control_socket: &Path, volume: &str) -> ListenAddr {
        let dir = control_socket.parent().unwrap_or(Path::new(crate::config::SOCKET_DIR));
        ListenAddr::Unix(dir.join(format!("{volume}.nbd.sock")))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => f.write_str(a),
        }
    }
}

/// A connected client, over either kind of socket.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// The peer, for logs.
    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix client".into(),
            Stream::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp client".into()),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match **self {
            Stream::Unix(ref s) => (&*s).read(buf),
            Stream::Tcp(ref s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match **self {
            Stream::Unix(ref s) => (&*s).write(buf),
            Stream::Tcp(ref s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                // Replies are written whole; Nagle would hold back the tail
                // of a large read reply waiting for an ACK (the spec asks
                // both sides to disable it).
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// State shared by the accept thread and the connections.
struct Shared {
    export: proto::Export,
    volume: Volume,
    router: Arc<Router>,
    stopping: AtomicBool,
    /// A clone of each live connection's socket, to shut it down on stop.
    conns: Mutex<HashMap<u64, Stream>>,
    /// Signalled when a connection ends.
    conn_ended: Condvar,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        self.conns.lock().expect(crate::POISONED)
    }
}

/// A running NBD server.
pub struct Server {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    uri: String,
    unix_path: Option<PathBuf>,
}

impl Server {
    /// Binds `listen` and serves `volume` (whose completer must be
    /// `router`) as one export named after the volume; the empty (default)
    /// export name selects it too.
    pub fn start(listen: &ListenAddr, volume: Volume, router: Arc<Router>) -> Result<Server, NbdError> {
        let c = volume.config();
        let export = proto::Export::new(&c.name, c.size_bytes, c.block_size, MAX_IO_BYTES);
        let (listener, uri, unix_path) = bind(listen)?;
        let shared = Arc::new(Shared {
            export,
            volume,
            router,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            conn_ended: Condvar::new(),
        });
        let s2 = shared.clone();
        let accept =
            std::thread::Builder::new().name("nbd-accept".into()).spawn(move || accept_loop(listener, &s2)).map_err(
                |source| NbdError::Socket { addr: listen.to_string(), what: "starting the accept thread", source },
            )?;
        Ok(Server { shared, accept: Some(accept), uri, unix_path })
    }

    /// The address as an NBD URI (`nbd+unix:///?socket=PATH` or
    /// `nbd://HOST:PORT`), which qemu, nbdinfo and nbdcopy take as is.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Stops accepting, ends every connection after the requests it has in
    /// flight are answered, and removes the Unix socket. Returns whether
    /// every connection ended within `timeout`; those that did not (a
    /// client that stopped reading its replies) are cut.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Shutting the read side makes each reader see end-of-stream after
        // the request it is in; it then waits for its replies and closes.
        let all_ended = self.shutdown_conns(Shutdown::Read, timeout);
        if !all_ended {
            // A writer blocked on a full socket gets an error now, drains
            // its queue and lets its reader finish.
            self.shutdown_conns(Shutdown::Both, Duration::from_secs(2));
        }
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
        all_ended
    }

    /// Shuts every live connection's socket (`how`) and waits up to
    /// `timeout` for them to end; returns whether they all did.
    fn shutdown_conns(&self, how: Shutdown, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut conns = self.shared.conns();
        for s in conns.values() {
            let _ = s.shutdown(how);
        }
        while !conns.is_empty() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            conns = self.shared.conn_ended.wait_timeout(conns, left).expect(crate::POISONED).0;
        }
        conns.is_empty()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Binds the listener; returns it with its URI and, for Unix sockets, the
/// path to remove on stop.
fn bind(listen: &ListenAddr) -> Result<(Listener, String, Option<PathBuf>), NbdError> {
    let err = |what| move |source| NbdError::Socket { addr: listen.to_string(), what, source };
    match listen {
        ListenAddr::Unix(path) => {
            let l = bind_unix(path).map_err(|e| match e {
                BindUnixError::InUse => NbdError::InUse(path.clone()),
                BindUnixError::Io(what, source) => err(what)(source),
            })?;
            Ok((
                Listener::Unix(l),
                format!("nbd+unix:///?socket={}", uri_escape(&path.to_string_lossy())),
                Some(path.clone()),
            ))
        }
        ListenAddr::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(err("binding"))?;
            let local = l.local_addr().map_err(err("reading the bound address"))?;
            if !local.ip().is_loopback() {
                tracing::warn!(%local, "NBD has no authentication: anyone who reaches this address can read and write the volume");
            }
            Ok((Listener::Tcp(l), format!("nbd://{local}"), None))
        }
    }
}

enum BindUnixError {
    InUse,
    Io(&'static str, io::Error),
}

/// Binds a Unix socket, replacing a stale socket file that no one answers
/// on (left by a killed daemon). The socket is made 0600: whoever can
/// connect can read and write the whole volume.
fn bind_unix(path: &Path) -> Result<UnixListener, BindUnixError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BindUnixError::Io("creating its directory", e))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(BindUnixError::InUse);
        }
        std::fs::remove_file(path).map_err(|e| BindUnixError::Io("removing the stale socket", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| BindUnixError::Io("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| BindUnixError::Io("setting mode 0600", e))?;
    Ok(l)
}

/// Percent-encodes a socket path for the query part of an NBD URI.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Waits up to `timeout` for `fd` to be readable (a pending connection).
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, owned by this frame, for the whole call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0 && p.revents & libc::POLLIN != 0
}

fn accept_loop(listener: Listener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stopping.load(Ordering::Acquire) {
        if !readable(listener.fd(), ACCEPT_POLL) {
            continue;
        }
        match listener.accept() {
            Ok(stream) => {
                next_id += 1;
                start_connection(shared, stream, next_id);
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of
                // spinning; the client retries.
                tracing::warn!("NBD accept failed: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Registers the connection and runs it on a thread of its own.
fn start_connection(shared: &Arc<Shared>, stream: Stream, id: u64) {
    let mut conns = shared.conns();
    if conns.len() >= MAX_CONNECTIONS {
        tracing::warn!(peer = %stream.peer(), "NBD: {MAX_CONNECTIONS} connections already; refusing another");
        return;
    }
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => return tracing::warn!("NBD: cloning a client socket: {e}"),
    };
    conns.insert(id, clone);
    drop(conns);
    let s2 = shared.clone();
    let spawned = std::thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
        conn::serve(stream, id, &s2);
        s2.conns().remove(&id);
        s2.conn_ended.notify_all();
    });
    if let Err(e) = spawned {
        tracing::warn!("NBD: starting a connection thread: {e}");
        shared.conns().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(ListenAddr::parse("unix:/run/x.sock").unwrap(), ListenAddr::Unix("/run/x.sock".into()));
        assert_eq!(ListenAddr::parse("127.0.0.1:10809").unwrap(), ListenAddr::Tcp("127.0.0.1:10809".into()));
        assert_eq!(ListenAddr::parse("[::1]:0").unwrap(), ListenAddr::Tcp("[::1]:0".into()));
        for bad in ["unix:", "localhost", ":10809", "host:port", "host:70000", ""] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
        let d = ListenAddr::default_for(Path::new("/run/starblk/vol0.sock"), "vol0");
        assert_eq!(d.to_string(), "unix:/run/starblk/vol0.nbd.sock");
    }

    #[test]
    fn socket_paths_are_escaped_in_uris() {
        assert_eq!(uri_escape("/run/starblk/v0.nbd.sock"), "/run/starblk/v0.nbd.sock");
        assert_eq!(uri_escape("/tmp/a b&c"), "/tmp/a%20b%26c");
    }
}
