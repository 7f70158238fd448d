//! The rate limit bounds throughput, and the bounded queue tail-drops.

mod common;

use std::time::Duration;

use starblk_wanem::LinkParams;

#[test]
fn rate_limit_bounds_throughput() {
    const N: u64 = 400;
    const SIZE: usize = 1000;
    // 8 Mbit/s = 1 MB/s: 400 x 1000 bytes take 0.4 s to serialise.
    let params = LinkParams { rate_bits_per_s: 8_000_000, queue_bytes: 1 << 20, ..Default::default() };
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, params, 3);
    let client = common::udp_socket();
    common::send_paced(&client, relay.local_addr(), &relay, 0..N, SIZE);
    assert_eq!(sink.wait_for(N as usize, Duration::from_secs(3)), N as usize);
    let got = sink.received();
    let span = got.last().unwrap().1 - got.first().unwrap().1;
    // N - 1 serialisation slots between the first and last arrival.
    let bits_per_s = ((N - 1) * SIZE as u64 * 8) as f64 / span.as_secs_f64();
    eprintln!("{N} x {SIZE} B in {span:?}: {:.2} Mbit/s (limit 8)", bits_per_s / 1e6);
    assert!(bits_per_s <= 8_000_000.0 * 1.02, "faster than the limit");
    assert!(bits_per_s >= 8_000_000.0 * 0.85, "much slower than the limit");
    assert_eq!(relay.stats().up.dropped_queue, 0);
}

#[test]
fn full_queue_tail_drops() {
    const N: u64 = 200;
    const SIZE: usize = 1000;
    // 0.8 Mbit/s = 100 kB/s with a 10 kB queue: a burst of 200 kB mostly drops.
    let params = LinkParams { rate_bits_per_s: 800_000, queue_bytes: 10_000, ..Default::default() };
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, params, 4);
    let client = common::udp_socket();
    common::send_paced(&client, relay.local_addr(), &relay, 0..N, SIZE);
    let s = relay.stats().up;
    assert_eq!(s.received, N);
    assert_eq!(s.forwarded + s.in_flight + s.dropped_queue, N);
    eprintln!("burst of {N}: {} queued, {} tail-dropped", N - s.dropped_queue, s.dropped_queue);
    // About 11 fit in the queue, plus whatever drained while the burst was
    // being sent (a few per ms at 100 kB/s).
    assert!(s.dropped_queue >= N / 2, "dropped only {}", s.dropped_queue);
    assert!(N - s.dropped_queue >= 10, "queue held too little");
    assert!(relay.wait_idle(Duration::from_secs(3)));
    assert_eq!(sink.wait_for((N - s.dropped_queue) as usize, Duration::from_secs(1)), (N - s.dropped_queue) as usize);
}
