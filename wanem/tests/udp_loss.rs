//! Independent loss at p = 0.1 over 20k datagrams lands in a sane band.

mod common;

use std::time::Duration;

use starblk_wanem::LinkParams;

#[test]
fn independent_loss_rate_is_statistically_sane() {
    const N: u64 = 20_000;
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, LinkParams { loss_prob: 0.1, ..Default::default() }, 2024);
    let client = common::udp_socket();
    common::send_paced(&client, relay.local_addr(), &relay, 0..N, 64);
    assert!(relay.wait_idle(Duration::from_secs(2)));
    let s = relay.stats().up;
    assert_eq!(s.received, N);
    assert_eq!(s.dropped_rcvbuf, 0);
    assert_eq!(s.dropped_loss + s.forwarded, N);
    // Binomial(20000, 0.1): mean 2000, sigma 42.4; allow 5 sigma.
    assert!((1788..=2212).contains(&s.dropped_loss), "lost {}", s.dropped_loss);
    assert_eq!(sink.wait_for(s.forwarded as usize, Duration::from_secs(2)), s.forwarded as usize);
    let h = sink.histogram();
    assert!(h.values().all(|&c| c == 1), "no duplicates without dup_prob");
    eprintln!("lost {} of {N} ({:.2}%)", s.dropped_loss, 100.0 * s.dropped_loss as f64 / N as f64);
}
