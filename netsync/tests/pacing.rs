//! Pacing: the sender holds the configured rate (IP/UDP headers counted).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{direct_pair, init_tracing, transfer};
use starblk_netsync::LinkConfig;

#[test]
fn sender_holds_the_configured_rate() {
    init_tracing();
    const RATE_BITS_PER_S: u64 = 40_000_000;
    let cfg = LinkConfig { rate_bits_per_s: RATE_BITS_PER_S, burst_bytes: 64 << 10, ..LinkConfig::default() };
    let (he, replica) = direct_pair(cfg, LinkConfig::default());
    let msgs: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
    let before = he.stats().tx;
    let t0 = Instant::now();
    let got = transfer(&he, Arc::new(replica), &msgs, Duration::from_secs(20));
    he.wait_on_wire(msgs.len() as u64, Duration::from_secs(5)).unwrap();
    let elapsed = t0.elapsed();
    assert_eq!(got.len(), msgs.len());
    std::thread::sleep(Duration::from_millis(5));
    let s = he.stats().tx;
    let datagrams = (s.data_packets + s.repair_packets + s.retransmitted_packets)
        - (before.data_packets + before.repair_packets + before.retransmitted_packets);
    // Acks and nacks are not paced; data, repair and retransmissions are.
    let wire_bits = ((s.bytes_sent - before.bytes_sent) + datagrams * 28) * 8;
    let ideal = Duration::from_secs_f64(wire_bits.saturating_sub(64 << 13) as f64 / RATE_BITS_PER_S as f64);
    let rate = wire_bits as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{} MB of messages, {:.1} Mbit on the wire in {elapsed:?}: {:.1} Mbit/s (configured {} Mbit/s; ideal {ideal:?})",
        (msgs.len() << 16) / 1_000_000,
        wire_bits as f64 / 1e6,
        rate / 1e6,
        RATE_BITS_PER_S / 1_000_000
    );
    assert!(elapsed >= ideal.mul_f64(0.95), "faster than the rate: {elapsed:?} < {ideal:?}");
    assert!(rate <= RATE_BITS_PER_S as f64 * 1.05);
    assert!(rate >= RATE_BITS_PER_S as f64 * 0.85, "well below the rate: {:.1} Mbit/s", rate / 1e6);
}
