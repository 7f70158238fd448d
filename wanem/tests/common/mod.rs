//! Helpers shared by the integration tests: loopback endpoints that echo or
//! collect numbered datagrams.
#![allow(dead_code)] // each test file uses a different subset

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use starblk_wanem::{LinkParams, RelayHandle, UdpRelayConfig};

/// A UDP socket on a free loopback port with a short read timeout.
pub fn udp_socket() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    // Big buffers: a test endpoint must not drop what the relay delivers.
    s.set_recv_buffer_size(4 << 20).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s
}

/// Starts a relay from a free port to `upstream` with `params` both ways.
pub fn relay(upstream: SocketAddr, params: LinkParams, seed: u64) -> RelayHandle {
    UdpRelayConfig::new("127.0.0.1:0".parse().unwrap(), upstream).symmetric(params).seed(seed).start().unwrap()
}

/// A datagram carrying a sequence number, padded to `size` bytes.
pub fn numbered(seq: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size.max(8)];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v
}

pub fn seq_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

/// Collects numbered datagrams with their arrival time until stopped.
pub struct Sink {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<(u64, Instant)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start() -> Sink {
        let sock = udp_socket();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    g.lock().unwrap().push((seq_of(&buf[..n]), Instant::now()));
                }
            }
        });
        Sink { addr, stop, got, thread: Some(thread) }
    }

    /// What arrived so far, in arrival order.
    pub fn received(&self) -> Vec<(u64, Instant)> {
        self.got.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until at least `n` datagrams arrived or `timeout` passed.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.count()
    }

    /// Arrival counts per sequence number.
    pub fn histogram(&self) -> HashMap<u64, usize> {
        let mut h = HashMap::new();
        for (seq, _) in self.received() {
            *h.entry(seq).or_default() += 1;
        }
        h
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends seqs `range` to `to`, keeping at most `window` datagrams unread by
/// the relay so that no socket buffer overflows (kernel drops would muddle
/// the loss statistics).
pub fn send_paced(sock: &UdpSocket, to: SocketAddr, relay: &RelayHandle, range: std::ops::Range<u64>, size: usize) {
    let window = 256;
    let base = relay.stats().up.received;
    let read_by_relay = || relay.stats().up.received - base;
    let wait_until = |cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !cond() && Instant::now() < deadline {
            std::thread::yield_now();
        }
    };
    for seq in range.clone() {
        sock.send_to(&numbered(seq, size), to).unwrap();
        let sent = seq - range.start + 1;
        wait_until(&|| sent <= read_by_relay() + window);
    }
    // Return only once the relay has read everything (and decided its fate).
    wait_until(&|| read_by_relay() >= range.end - range.start);
}

/// A UDP echo server; returns its address. Runs until the process exits.
pub fn echo_server() -> SocketAddr {
    let sock = udp_socket();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

/// Waits until the relay has read `n` datagrams client → upstream and has
/// nothing in flight.
pub fn wait_relayed(relay: &RelayHandle, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while relay.stats().up.received < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(relay.stats().up.received, n, "relay did not read every datagram in time");
    assert!(relay.wait_idle(deadline.saturating_duration_since(Instant::now())));
}
