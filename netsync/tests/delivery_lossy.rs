//! In-order, exactly-once delivery through a lossy relay: 1% random loss
//! plus bursts of 8, for layered XOR (8,3) and Reed-Solomon (8,3). Prints
//! how many losses FEC repaired and how many were retransmitted.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same_stream, init_tracing, relayed_pair, transfer, LossModel, Rng};
use starblk_netsync::{FecScheme, LinkConfig};

fn run(name: &str, fec: FecScheme, seed: u64) {
    init_tracing();
    // Paced, so the relay's and receiver's socket buffers (not the loss
    // model) do not drop bursts on a busy machine.
    let he_cfg = LinkConfig { fec: Some(fec), rate_bits_per_s: 100_000_000, ..LinkConfig::default() };
    let loss = LossModel { loss_prob: 0.01, burst_prob: 0.001, burst_len: 8, seed };
    let (he, replica, relay) = relayed_pair(he_cfg, LinkConfig::default(), loss);
    let replica = Arc::new(replica);
    let mut rng = Rng::new(seed);
    let msgs: Vec<Vec<u8>> = (0..120)
        .map(|_| {
            let n = rng.size(1 << 20);
            rng.bytes(n)
        })
        .collect();
    let total: usize = msgs.iter().map(Vec::len).sum();
    let t0 = Instant::now();
    let got = transfer(&he, replica.clone(), &msgs, Duration::from_secs(60));
    let elapsed = t0.elapsed();
    assert_same_stream(&got, &msgs);
    he.wait_acked(msgs.len() as u64, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(60)); // a keepalive carries the final counters
    let s = he.stats();
    let r = replica.stats();
    let dropped = relay.counters.dropped.load(Ordering::Relaxed);
    eprintln!(
        "{name}: {} msgs, {:.1} MB in {elapsed:?}; relay dropped {dropped} of {} datagrams; \
         data {} repair {}; FEC repaired {} (peer says {}); retransmitted {} (nacked {}, rto probes {}); \
         loss seen {:.4}; dup {}; srtt {} us; rx buffer-full drops {}; peer rejected {:?}",
        msgs.len(),
        total as f64 / 1e6,
        dropped + relay.counters.forwarded.load(Ordering::Relaxed),
        s.tx.data_packets,
        s.tx.repair_packets,
        r.rx.recovered_packets,
        s.peer_rx.recovered_packets,
        s.tx.retransmitted_packets,
        r.rx.nacked_seqs,
        s.tx.rto_probes,
        r.rx.loss_rate,
        r.rx.duplicate_packets,
        s.srtt_us,
        r.rx.dropped_buffer_full,
        s.rejected,
    );
    assert!(dropped > 100, "the relay must have dropped something");
    assert!(r.rx.recovered_packets > 0, "FEC must repair some losses");
    assert_eq!(r.rejected.total(), 0, "{:?}", r.rejected);
    assert_eq!(r.rx.decoder_resets, 0);
    // The loss model drops ~1.7% of datagrams; the kernel may add some.
    assert!(r.rx.loss_rate > 0.005 && r.rx.loss_rate < 0.2, "loss rate {}", r.rx.loss_rate);
}

#[test]
fn layered_xor_8_3() {
    run("xor(8,3)", FecScheme::layered_xor(8, 3).unwrap(), 0x1055_0001);
}

#[test]
fn reed_solomon_8_3() {
    run("rs(8,3)", FecScheme::reed_solomon(8, 3).unwrap(), 0x1055_0002);
}
