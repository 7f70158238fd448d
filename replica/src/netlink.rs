//! Carrying the replica protocol over a network-sync link (UDP + FEC).
//!
//! Each protocol frame travels as one link message. [`MsgReader`] turns the
//! received messages back into a byte stream for `FrameReader`, and
//! [`NetOut`] sends frames as messages, so sessions and the HE's link loops
//! run unchanged over either transport.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use starblk_netsync::{Link, LinkError, Rejected};

use crate::proto::{FrameType, Seal};
use crate::server::FrameOut;

/// How often a blocked reader checks whether its session was closed.
const POLL: Duration = Duration::from_millis(100);

/// Reads a link's messages as one byte stream.
pub struct MsgReader {
    link: Arc<Link>,
    closed: Arc<AtomicBool>,
    msg: Vec<u8>,
    pos: usize,
    /// Gives up with `TimedOut` after this long without a message.
    timeout: Option<Duration>,
}

impl MsgReader {
    /// A reader over `link` that ends when `closed` is set.
    pub fn new(link: Arc<Link>, closed: Arc<AtomicBool>) -> MsgReader {
        MsgReader { link, closed, msg: Vec::new(), pos: 0, timeout: None }
    }

    /// Sets the silence timeout (like a socket read timeout).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }
}

impl Read for MsgReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut waited = Duration::ZERO;
        while self.pos == self.msg.len() {
            if self.closed.load(Ordering::Acquire) {
                return Ok(0);
            }
            match self.link.recv_timeout(POLL) {
                Ok(m) => {
                    self.msg = m;
                    self.pos = 0;
                }
                Err(LinkError::Timeout) => {
                    waited += POLL;
                    if self.timeout.is_some_and(|t| waited >= t) {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "network-sync link silent"));
                    }
                }
                Err(LinkError::Closed) => return Ok(0),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.msg.len() - self.pos);
        buf[..n].copy_from_slice(&self.msg[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Sends frames as link messages.
pub struct NetOut {
    link: Arc<Link>,
    closed: Arc<AtomicBool>,
    /// The message being built, and the session's seal (one lock, so
    /// frames are sealed in the order they are sent).
    buf: Mutex<(Vec<u8>, Seal)>,
}

impl NetOut {
    /// A frame sender over `link`; `close` sets `closed`.
    pub fn new(link: Arc<Link>, closed: Arc<AtomicBool>) -> NetOut {
        NetOut { link, closed, buf: Mutex::new((Vec::new(), Seal::default())) }
    }

    /// Sends one frame and returns its message id (for on-the-wire tracking).
    pub fn send_msg(&self, kind: FrameType, parts: &[&[u8]]) -> io::Result<u64> {
        let mut g = self.buf.lock().expect(crate::POISONED);
        let (b, seal) = &mut *g;
        b.clear();
        seal.write_frame(b, kind, 0, parts)?;
        self.link.send(b).map_err(|e| io::Error::other(e.to_string()))
    }
}

impl FrameOut for NetOut {
    fn send_frame(&self, kind: FrameType, parts: &[&[u8]]) -> io::Result<()> {
        self.send_msg(kind, parts).map(drop)
    }
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
    fn set_seal(&self, seal: Seal) {
        self.buf.lock().expect(crate::POISONED).1 = seal;
    }
}

/// Resolves HOST:PORT to the UDP address of a network-sync replica.
pub fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing"))
}

/// Network-sync datagrams a replica dropped: its listener's (datagrams of
/// no accepted link: garbage, a hello under an unknown key, data of a
/// session that ended) and its links' (forged or malformed datagrams in an
/// open session). A link's counts are kept when its session ends, so the
/// totals only grow, as counters must.
#[derive(Default)]
pub struct NetRejections(Mutex<NetRejected>);

#[derive(Default)]
struct NetRejected {
    /// The listener's counters as of its last accept poll.
    listener: Rejected,
    /// The sum over links whose session ended.
    ended: Rejected,
    /// Links of open sessions, by a key of this registry.
    open: HashMap<u64, Arc<Link>>,
    next: u64,
}

impl NetRejections {
    fn lock(&self) -> std::sync::MutexGuard<'_, NetRejected> {
        self.0.lock().expect("netsync rejections lock poisoned")
    }

    /// Takes the listener's latest counters (they are cumulative).
    pub fn set_listener(&self, r: Rejected) {
        self.lock().listener = r;
    }

    /// Counts `link`'s drops from now until [`NetRejections::close`].
    pub fn open(&self, link: Arc<Link>) -> u64 {
        let mut g = self.lock();
        g.next += 1;
        let key = g.next;
        g.open.insert(key, link);
        key
    }

    /// The session of `key` ended: its link's final counts are kept.
    pub fn close(&self, key: u64) {
        let mut g = self.lock();
        if let Some(link) = g.open.remove(&key) {
            g.ended.add(&link.stats().rejected);
        }
    }

    /// Everything dropped since the server started, by reason.
    pub fn total(&self) -> Rejected {
        let g = self.lock();
        let mut r = g.listener;
        r.add(&g.ended);
        for link in g.open.values() {
            r.add(&link.stats().rejected);
        }
        r
    }
}
