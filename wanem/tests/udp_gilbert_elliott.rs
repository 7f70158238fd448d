//! Gilbert-Elliott loss comes in bursts whose mean length matches
//! 1 / p_bad_to_good, at the chain's long-run loss rate.

mod common;

use std::time::Duration;

use starblk_wanem::{GilbertElliott, LinkParams};

#[test]
fn gilbert_elliott_produces_bursts() {
    const N: u64 = 20_000;
    let ge = GilbertElliott { p_good_to_bad: 0.01, p_bad_to_good: 0.25, loss_in_good: 0.0, loss_in_bad: 1.0 };
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, LinkParams { gilbert_elliott: Some(ge), ..Default::default() }, 99);
    let client = common::udp_socket();
    common::send_paced(&client, relay.local_addr(), &relay, 0..N, 64);
    assert!(relay.wait_idle(Duration::from_secs(2)));
    let s = relay.stats().up;
    assert_eq!(sink.wait_for(s.forwarded as usize, Duration::from_secs(2)), s.forwarded as usize);

    let h = sink.histogram();
    let lost: Vec<bool> = (0..N).map(|seq| !h.contains_key(&seq)).collect();
    let n_lost = lost.iter().filter(|&&l| l).count();
    let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(lost[0]);
    let mean_burst = n_lost as f64 / bursts as f64;
    let rate = n_lost as f64 / N as f64;
    eprintln!(
        "lost {n_lost} in {bursts} bursts: mean burst {mean_burst:.2} (expect 4), rate {rate:.4} (expect {:.4})",
        ge.mean_loss()
    );
    assert_eq!(n_lost as u64, s.dropped_loss, "every missing datagram was a counted loss");
    assert!(mean_burst > 1.5, "losses are bursty");
    assert!((2.8..=5.5).contains(&mean_burst), "mean burst {mean_burst} far from 1/p_bg = 4");
    assert!((rate - ge.mean_loss()).abs() < 0.015, "loss rate {rate} far from {}", ge.mean_loss());
}
