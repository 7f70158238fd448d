//! Test helpers: a seeded RNG, link pairs on loopback, and a small lossy
//! UDP relay that can also inject datagrams in either direction.

#![allow(dead_code)] // each test file uses a different part

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use starblk_netsync::{Link, LinkConfig, Listener};

/// xorshift64*: deterministic and dependency-free.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// A size from 1 B to `max`, log-uniform so small and large both occur.
    pub fn size(&mut self, max: usize) -> usize {
        let bits = 64 - (max as u64).leading_zeros() as u64;
        let top = 1u64 << self.below(bits);
        ((top + self.below(top)) as usize).clamp(1, max)
    }
}

/// Logs to stderr when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An HE-side link connected straight to a replica-side link.
pub fn direct_pair(he: LinkConfig, replica: LinkConfig) -> (Link, Link) {
    let mut listener = Listener::bind(localhost(), replica).unwrap();
    let he = Link::connect(localhost(), listener.local_addr(), he).unwrap();
    let replica = listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept");
    he.wait_established(Duration::from_secs(5)).unwrap();
    (he, replica)
}

/// An HE-side link reaching the replica through `relay`.
pub fn relayed_pair(he: LinkConfig, replica: LinkConfig, loss: LossModel) -> (Link, Link, Relay) {
    let mut listener = Listener::bind(localhost(), replica).unwrap();
    let relay = Relay::start(listener.local_addr(), loss);
    let he = Link::connect(localhost(), relay.front_addr(), he).unwrap();
    let replica = listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept");
    he.wait_established(Duration::from_secs(5)).unwrap();
    (he, replica, relay)
}

/// Independent loss plus bursts: with `burst_prob` per datagram a burst
/// starts and the next `burst_len` datagrams are lost. Applies to the
/// HE → replica direction only (acks and nacks pass).
#[derive(Debug, Clone, Copy)]
pub struct LossModel {
    pub loss_prob: f64,
    pub burst_prob: f64,
    pub burst_len: u32,
    pub seed: u64,
}

impl LossModel {
    pub fn none() -> LossModel {
        LossModel { loss_prob: 0.0, burst_prob: 0.0, burst_len: 0, seed: 1 }
    }
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub returned: AtomicU64,
}

/// A UDP relay: the HE sends to `front`, the relay forwards from `back`
/// (connected to the replica) and returns the replica's datagrams.
pub struct Relay {
    front: Arc<UdpSocket>,
    back: Arc<UdpSocket>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    pub counters: Arc<RelayCounters>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    pub fn start(upstream: SocketAddr, loss: LossModel) -> Relay {
        let front = Arc::new(big_buffer_socket());
        let back = Arc::new(big_buffer_socket());
        back.connect(upstream).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let client = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(RelayCounters::default());
        let up = {
            let (front, back, client, stop, counters) =
                (front.clone(), back.clone(), client.clone(), stop.clone(), counters.clone());
            std::thread::spawn(move || forward_up(&front, &back, &client, &stop, &counters, loss))
        };
        let down = {
            let (front, back, client, stop, counters) =
                (front.clone(), back.clone(), client.clone(), stop.clone(), counters.clone());
            std::thread::spawn(move || forward_down(&front, &back, &client, &stop, &counters))
        };
        Relay { front, back, client, stop, counters, threads: vec![up, down] }
    }

    pub fn front_addr(&self) -> SocketAddr {
        self.front.local_addr().unwrap()
    }

    /// Sends raw bytes to the replica as if from the HE.
    pub fn inject_to_replica(&self, bytes: &[u8]) {
        self.back.send(bytes).unwrap();
    }

    /// Sends raw bytes to the HE as if from the replica.
    pub fn inject_to_he(&self, bytes: &[u8]) {
        let client = self.client.lock().unwrap().expect("HE seen");
        self.front.send_to(bytes, client).unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A loopback UDP socket with 4 MiB buffers, so the relay itself does not
/// drop bursts (only the loss model does).
fn big_buffer_socket() -> UdpSocket {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&localhost().into()).unwrap();
    s.into()
}

fn forward_up(
    front: &UdpSocket,
    back: &UdpSocket,
    client: &Mutex<Option<SocketAddr>>,
    stop: &AtomicBool,
    counters: &RelayCounters,
    loss: LossModel,
) {
    let mut rng = Rng::new(loss.seed);
    let mut burst_left = 0u32;
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = front.recv_from(&mut buf) else {
            continue;
        };
        *client.lock().unwrap() = Some(from);
        if burst_left == 0 && loss.burst_prob > 0.0 && rng.chance(loss.burst_prob) {
            burst_left = loss.burst_len;
        }
        let lost = if burst_left > 0 {
            burst_left -= 1;
            true
        } else {
            loss.loss_prob > 0.0 && rng.chance(loss.loss_prob)
        };
        if lost {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if back.send(&buf[..n]).is_ok() {
            counters.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn forward_down(
    front: &UdpSocket,
    back: &UdpSocket,
    client: &Mutex<Option<SocketAddr>>,
    stop: &AtomicBool,
    counters: &RelayCounters,
) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = back.recv(&mut buf) else {
            continue;
        };
        let to = *client.lock().unwrap();
        if let Some(to) = to {
            if front.send_to(&buf[..n], to).is_ok() {
                counters.returned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sends `msgs` from `tx` while a thread receives them on `rx`; returns
/// what arrived, in order.
pub fn transfer(tx: &Link, rx: Arc<Link>, msgs: &[Vec<u8>], timeout: Duration) -> Vec<Vec<u8>> {
    let n = msgs.len();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match rx.recv_timeout(timeout) {
                Ok(m) => got.push(m),
                Err(e) => panic!("receiver stopped after {} of {n} messages: {e}", got.len()),
            }
        }
        got
    });
    for m in msgs {
        tx.send(m).unwrap();
    }
    reader.join().unwrap()
}

/// Asserts two message lists are equal without printing megabytes.
pub fn assert_same_stream(got: &[Vec<u8>], want: &[Vec<u8>]) {
    assert_eq!(got.len(), want.len(), "message count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g == w, "message {i} differs: got {} bytes, want {} bytes", g.len(), w.len());
    }
}
