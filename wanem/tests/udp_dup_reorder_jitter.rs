//! Duplication, reordering and jitter.

mod common;

use std::time::{Duration, Instant};

use starblk_wanem::{JitterDist, LinkParams};

fn run(params: LinkParams, n: u64, gap: Duration) -> (common::Sink, starblk_wanem::RelayStats, Vec<Instant>) {
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, params, 11);
    let client = common::udp_socket();
    let mut sent_at = Vec::new();
    for seq in 0..n {
        sent_at.push(Instant::now());
        client.send_to(&common::numbered(seq, 64), relay.local_addr()).unwrap();
        std::thread::sleep(gap);
    }
    common::wait_relayed(&relay, n, Duration::from_secs(2));
    let stats = relay.stats();
    let expect = stats.up.forwarded as usize;
    assert_eq!(sink.wait_for(expect, Duration::from_secs(1)), expect);
    (sink, stats, sent_at)
}

#[test]
fn duplication_delivers_extra_copies() {
    let (sink, s, _) = run(LinkParams { dup_prob: 0.2, ..Default::default() }, 1000, Duration::ZERO);
    let twice = sink.histogram().values().filter(|&&c| c == 2).count() as u64;
    eprintln!("duplicated {} of 1000", s.up.duplicated);
    assert_eq!(twice, s.up.duplicated);
    assert_eq!(s.up.forwarded, 1000 + s.up.duplicated);
    assert!((120..=280).contains(&s.up.duplicated), "{} duplicates", s.up.duplicated);
}

#[test]
fn reordering_lets_later_packets_overtake() {
    let params = LinkParams { reorder_prob: 0.1, reorder_delay_ms: 3.0, ..Default::default() };
    let (sink, s, _) = run(params, 300, Duration::from_micros(200));
    let order: Vec<u64> = sink.received().iter().map(|&(seq, _)| seq).collect();
    let overtaken = order.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!("picked {} for reordering; {overtaken} inversions seen", s.up.reordered);
    assert!(s.up.reordered > 10);
    assert!(overtaken > 10, "reordered packets should arrive after later ones");
    assert_eq!(order.len(), 300, "reordering loses nothing");
}

/// One-way delays of 200 packets through a link with `params`, in order
/// of sending; checks that none was reordered.
fn delays_ms(params: LinkParams, what: &str) -> Vec<f64> {
    let (sink, _, sent_at) = run(params, 200, Duration::from_millis(1));
    let got = sink.received();
    let order: Vec<u64> = got.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(order, (0..200).collect::<Vec<_>>(), "{what}: FIFO without reordering");
    let mut d: Vec<f64> = got.iter().map(|&(seq, at)| (at - sent_at[seq as usize]).as_secs_f64() * 1e3).collect();
    d.sort_by(f64::total_cmp);
    d
}

#[test]
fn jitter_spreads_delay_but_keeps_fifo() {
    // The same link without jitter bounds the median from above: comparing
    // with a run on the same machine cancels its scheduling latency, which
    // alone moved the median by 2 ms on a loaded CI machine.
    let control = delays_ms(LinkParams { delay_ms: 10.0, ..Default::default() }, "no jitter");
    let control_median = control[control.len() / 2];
    for dist in [JitterDist::Uniform, JitterDist::Normal] {
        let params = LinkParams { delay_ms: 10.0, jitter_ms: 2.0, jitter_dist: dist, ..Default::default() };
        let sorted = delays_ms(params, &format!("{dist:?}"));
        let (min, median, max) = (sorted[0], sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
        eprintln!("{dist:?}: one-way delay min {min:.2} median {median:.2} max {max:.2} ms (no jitter: median {control_median:.2})");
        // Uniform never goes below delay - jitter; normal is truncated at 4 sigma.
        let floor = if dist == JitterDist::Uniform { 10.0 - 2.0 } else { 10.0 - 4.0 * 2.0 };
        assert!(min >= floor - 0.1, "{dist:?}: delay {min} below {floor} ms");
        assert!(median >= 9.0, "{dist:?}: median {median} ms below the delay less half the jitter");
        // FIFO holds a packet back behind an earlier, slower one, which
        // lifts the median by up to the jitter; 1 ms on top for the noise
        // between the two runs.
        assert!(
            median <= control_median + 2.0 + 1.0,
            "{dist:?}: median {median} ms, {control_median} ms without jitter: more than the jitter above it"
        );
        assert!(max - min > 1.5, "{dist:?}: no visible jitter");
    }
}
