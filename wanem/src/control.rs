//! A line-based control protocol, served over TCP loopback or a Unix
//! socket, so that tests and users can change a running relay.
//!
//! One command per line; one reply line each: `ok`, `ok <json>` or
//! `err <message>`.
//!
//! ```text
//! set [up|down|both] NAME VALUE   change a setting now (default both)
//! cut [up|down|both]              cut now (default both, same instant)
//! uncut [up|down|both]            restore
//! stats                           counters as JSON
//! params                          current parameters as JSON
//! seed                            the RNG seed (UDP relay)
//! help                            this list
//! quit                            close the control connection
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::params::{Direction, SETTING_NAMES};
use crate::tcp::{TcpRelayHandle, TCP_SETTING_NAMES};
use crate::udp::{spawn, RelayHandle};

/// Longest command line accepted; longer lines close the connection.
const MAX_LINE_BYTES: u64 = 4096;
/// Most control connections served at once.
const MAX_CLIENTS: usize = 16;
/// Poll interval of the accept loop (it also checks the stop flag).
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// The help text sent for `help`.
pub const HELP: &str = "set [up|down|both] NAME VALUE | cut [up|down|both] | uncut [up|down|both] | \
                        stats | params | seed | help | quit";

/// One parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Change a setting in the given directions.
    Set {
        /// Directions to change.
        dirs: Vec<Direction>,
        /// Setting name, e.g. `loss`.
        name: String,
        /// New value, as text.
        value: String,
    },
    /// Cut the given directions now.
    Cut(Vec<Direction>),
    /// Restore the given directions.
    Uncut(Vec<Direction>),
    /// Report counters.
    Stats,
    /// Report parameters.
    Params,
    /// Report the seed.
    Seed,
    /// Report the command list.
    Help,
    /// Close the control connection.
    Quit,
}

/// An optional leading direction word; returns the directions and whether
/// the word was one.
fn parse_dirs(word: Option<&str>) -> (Vec<Direction>, bool) {
    match word {
        Some("up") => (vec![Direction::Up], true),
        Some("down") => (vec![Direction::Down], true),
        Some("both") => (Direction::BOTH.to_vec(), true),
        _ => (Direction::BOTH.to_vec(), false),
    }
}

impl FromStr for Command {
    type Err = Error;
    fn from_str(line: &str) -> Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&verb, rest)) = words.split_first() else {
            return Err(Error::Unknown { what: "command", name: String::new(), expected: HELP });
        };
        let (dirs, had_dir) = parse_dirs(rest.first().copied());
        let args = if had_dir { &rest[1..] } else { rest };
        let no_args = |cmd: Command| match args {
            [] => Ok(cmd),
            _ => Err(Error::invalid(verb, args.join(" "), "no further arguments")),
        };
        match verb {
            "set" => match args {
                [name, value] => Ok(Command::Set { dirs, name: name.to_string(), value: value.to_string() }),
                _ => Err(Error::invalid("set", rest.join(" "), "set [up|down|both] NAME VALUE")),
            },
            "cut" => no_args(Command::Cut(dirs)),
            "uncut" => no_args(Command::Uncut(dirs)),
            "stats" => no_args(Command::Stats),
            "params" => no_args(Command::Params),
            "seed" => no_args(Command::Seed),
            "help" => no_args(Command::Help),
            "quit" | "exit" => no_args(Command::Quit),
            _ => Err(Error::Unknown { what: "command", name: verb.into(), expected: HELP }),
        }
    }
}

/// Parameters of both directions, for `params` replies.
#[derive(Serialize)]
struct PerDirection<T> {
    up: T,
    down: T,
}

/// JSON in field order; our types always serialise.
fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("\"{e}\""))
}

/// Something the control server can drive.
pub trait Controlled: Send + Sync {
    /// Runs one command; returns the reply payload (empty for plain `ok`).
    fn execute(&self, cmd: &Command) -> Result<String>;
}

impl Controlled for RelayHandle {
    fn execute(&self, cmd: &Command) -> Result<String> {
        match cmd {
            Command::Set { dirs, name, value } => {
                dirs.iter().try_for_each(|&d| self.set(d, name, value))?;
            }
            Command::Cut(dirs) if dirs.len() == 2 => self.cut_both(),
            Command::Cut(dirs) => dirs.iter().for_each(|&d| self.cut(d)),
            Command::Uncut(dirs) => dirs.iter().for_each(|&d| self.uncut(d)),
            Command::Stats => return Ok(to_json(&self.stats())),
            Command::Params => {
                let (up, down) = (self.params(Direction::Up), self.params(Direction::Down));
                return Ok(to_json(&PerDirection { up, down }));
            }
            Command::Seed => return Ok(self.seed().to_string()),
            Command::Help => return Ok(format!("commands: {HELP}; settings: {SETTING_NAMES}")),
            Command::Quit => {}
        }
        Ok(String::new())
    }
}

impl Controlled for TcpRelayHandle {
    fn execute(&self, cmd: &Command) -> Result<String> {
        match cmd {
            // TCP delay and rate are the same both ways.
            Command::Set { name, value, .. } => self.set(name, value)?,
            Command::Cut(dirs) => dirs.iter().for_each(|&d| self.cut(d)),
            Command::Uncut(dirs) => dirs.iter().for_each(|&d| self.uncut(d)),
            Command::Stats => return Ok(to_json(&self.stats())),
            Command::Params => return Ok(to_json(&self.params())),
            Command::Seed => return Err(Error::invalid("seed", "", "a UDP relay (the TCP relay uses no RNG)")),
            Command::Help => return Ok(format!("commands: {HELP}; settings: {TCP_SETTING_NAMES}")),
            Command::Quit => {}
        }
        Ok(String::new())
    }
}

/// A UDP and a TCP relay on the same address, as a stand-in for a replica
/// that listens on both (`replica serve --listen ADDR`).
pub struct RelayPair {
    /// The UDP relay.
    pub udp: RelayHandle,
    /// The TCP relay.
    pub tcp: TcpRelayHandle,
}

impl Controlled for RelayPair {
    fn execute(&self, cmd: &Command) -> Result<String> {
        match cmd {
            Command::Set { name, value, .. } => {
                self.udp.execute(cmd)?;
                // Delay and rate apply to the TCP relay as well.
                if TCP_SETTING_NAMES.split(", ").any(|n| n == name.replace('-', "_")) {
                    self.tcp.set(name, value)?;
                }
                Ok(String::new())
            }
            Command::Cut(_) | Command::Uncut(_) => {
                self.udp.execute(cmd)?;
                self.tcp.execute(cmd)
            }
            Command::Stats | Command::Params => {
                let (u, t) = (self.udp.execute(cmd)?, self.tcp.execute(cmd)?);
                Ok(format!("{{\"udp\":{u},\"tcp\":{t}}}"))
            }
            _ => self.udp.execute(cmd),
        }
    }
}

/// Runs one command line and formats the reply line (without newline).
pub fn reply(target: &dyn Controlled, line: &str) -> String {
    match line.parse::<Command>().and_then(|cmd| target.execute(&cmd)) {
        Ok(payload) if payload.is_empty() => "ok".into(),
        Ok(payload) => format!("ok {payload}"),
        Err(e) => format!("err {e}"),
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A running control server. Dropping it stops accepting (connections in
/// progress end when their client closes) and removes a Unix socket file.
pub struct ControlServer {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl ControlServer {
    /// Serves `target` on `addr`: a socket address (`127.0.0.1:9000`) means
    /// TCP, anything else is a Unix socket path.
    pub fn start(addr: &str, target: Arc<dyn Controlled>) -> Result<ControlServer> {
        let bind_err = |source| Error::Bind { addr: addr.to_string(), source };
        let listener = match addr.parse::<SocketAddr>() {
            Ok(sa) => Listener::Tcp(TcpListener::bind(sa).map_err(bind_err)?),
            Err(_) => {
                let path = PathBuf::from(addr);
                remove_stale_socket(&path);
                Listener::Unix(UnixListener::bind(&path).map_err(bind_err)?, path)
            }
        };
        let (bound, unix_path) = match &listener {
            Listener::Tcp(l) => (l.local_addr().map_err(Error::io("reading the control address"))?.to_string(), None),
            Listener::Unix(_, p) => (p.display().to_string(), Some(p.clone())),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = spawn("wanem-control".into(), move || accept_loop(listener, target, &s))?;
        tracing::info!(addr = %bound, "wanem: control listening");
        Ok(ControlServer { addr: bound, stop, thread: Some(thread), unix_path })
    }

    /// The bound address (with the real port if 0 was asked for) or path.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes a leftover socket file from an earlier run, but nothing else.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn accept_loop(listener: Listener, target: Arc<dyn Controlled>, stop: &AtomicBool) {
    let _ = match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l, _) => l.set_nonblocking(true),
    };
    let clients = Arc::new(AtomicUsize::new(0));
    while !stop.load(Relaxed) {
        let conn: Option<Box<dyn ReadWrite>> = match &listener {
            Listener::Tcp(l) => l.accept().ok().and_then(|(c, _)| c.set_nonblocking(false).ok().map(|_| boxed(c))),
            Listener::Unix(l, _) => l.accept().ok().and_then(|(c, _)| c.set_nonblocking(false).ok().map(|_| boxed(c))),
        };
        let Some(conn) = conn else {
            std::thread::sleep(ACCEPT_POLL);
            continue;
        };
        if clients.load(Relaxed) >= MAX_CLIENTS {
            continue; // dropping closes it
        }
        clients.fetch_add(1, Relaxed);
        let (t, c) = (target.clone(), clients.clone());
        let spawned = spawn("wanem-control-conn".into(), move || {
            serve_connection(conn, t.as_ref());
            c.fetch_sub(1, Relaxed);
        });
        if spawned.is_err() {
            clients.fetch_sub(1, Relaxed);
        }
    }
}

/// A control connection of either kind.
trait ReadWrite: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ReadWrite>>;
}

impl ReadWrite for std::net::TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ReadWrite>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl ReadWrite for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ReadWrite>> {
        Ok(Box::new(self.try_clone()?))
    }
}

fn boxed<T: ReadWrite + 'static>(c: T) -> Box<dyn ReadWrite> {
    Box::new(c)
}

fn serve_connection(conn: Box<dyn ReadWrite>, target: &dyn Controlled) {
    let Ok(mut out) = conn.try_clone_box() else { return };
    let mut input = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        // Bounded read: a client cannot make us buffer an endless line.
        match input.by_ref().take(MAX_LINE_BYTES).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE_BYTES => {
                let _ = writeln!(out, "err line longer than {MAX_LINE_BYTES} bytes");
                return;
            }
            Ok(_) => {}
        }
        let cmd = line.trim();
        if cmd.is_empty() {
            continue;
        }
        let quit = matches!(cmd.parse::<Command>(), Ok(Command::Quit));
        if writeln!(out, "{}", reply(target, cmd)).is_err() || quit {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            "set loss 0.01".parse::<Command>().unwrap(),
            Command::Set { dirs: Direction::BOTH.to_vec(), name: "loss".into(), value: "0.01".into() }
        );
        assert_eq!(
            "set up delay_ms 5".parse::<Command>().unwrap(),
            Command::Set { dirs: vec![Direction::Up], name: "delay_ms".into(), value: "5".into() }
        );
        assert_eq!("cut".parse::<Command>().unwrap(), Command::Cut(Direction::BOTH.to_vec()));
        assert_eq!("uncut down".parse::<Command>().unwrap(), Command::Uncut(vec![Direction::Down]));
        assert!("cut sideways".parse::<Command>().is_err());
        assert!("set loss".parse::<Command>().is_err());
        assert!("frobnicate".parse::<Command>().is_err());
        assert!("".parse::<Command>().is_err());
    }
}
