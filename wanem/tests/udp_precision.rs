//! Measures how closely delivery follows the configured delay: the relay's
//! own lateness (due time → sendto) and the end-to-end error seen by a
//! receiver. Prints the figures; asserts only loose bounds, since the test
//! host may be busy: never early, and a median within 1 ms in one run of
//! three.

mod common;

use std::time::{Duration, Instant};

use starblk_wanem::LinkParams;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One run of `N` datagrams through a 20 ms relay: the end-to-end errors
/// in µs, sorted. Panics if one arrived early (that is a bug, not load).
fn measure() -> Vec<f64> {
    const N: u64 = 500;
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, LinkParams { delay_ms: 20.0, ..Default::default() }, 12);
    let client = common::udp_socket();
    let mut sent_at = Vec::new();
    for seq in 0..N {
        sent_at.push(Instant::now());
        client.send_to(&common::numbered(seq, 64), relay.local_addr()).unwrap();
        std::thread::sleep(Duration::from_micros(700));
    }
    assert_eq!(sink.wait_for(N as usize, Duration::from_secs(2)), N as usize);
    let mut err_us: Vec<f64> =
        sink.received().iter().map(|&(seq, at)| (at - sent_at[seq as usize]).as_secs_f64() * 1e6 - 20_000.0).collect();
    err_us.sort_by(f64::total_cmp);
    let s = relay.stats().up;
    eprintln!(
        "end-to-end error vs 20 ms (us): min {:.0} p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}; \
         relay lateness mean {} us max {} us",
        err_us[0],
        percentile(&err_us, 0.5),
        percentile(&err_us, 0.9),
        percentile(&err_us, 0.99),
        err_us[err_us.len() - 1],
        s.late_mean_us,
        s.late_max_us
    );
    assert!(err_us[0] >= -50.0, "a datagram arrived early: {} us", err_us[0]);
    err_us
}

/// Early delivery fails at once. Lateness only comes from a busy host (a
/// full CI run beside it pushed one run's median to 1.2 ms), so the median
/// bound needs one run of three to meet it: a relay that is late by design
/// misses it in all three.
#[test]
fn delivery_follows_the_delay_closely() {
    const RUNS: usize = 3;
    let mut medians_us = Vec::new();
    for _ in 0..RUNS {
        let median_us = percentile(&measure(), 0.5);
        if median_us < 1000.0 {
            return;
        }
        medians_us.push(median_us);
    }
    panic!("median error above 1 ms in all {RUNS} runs: {medians_us:?} us");
}
