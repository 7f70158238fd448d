//! The same seed gives the same loss pattern; another seed does not.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use starblk_wanem::{GilbertElliott, LinkParams};

fn lost_seqs(seed: u64) -> BTreeSet<u64> {
    const N: u64 = 3000;
    let ge = GilbertElliott { p_good_to_bad: 0.02, p_bad_to_good: 0.3, loss_in_good: 0.0, loss_in_bad: 0.8 };
    let params = LinkParams { loss_prob: 0.05, gilbert_elliott: Some(ge), ..Default::default() };
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, params, seed);
    assert_eq!(relay.seed(), seed);
    let client = common::udp_socket();
    common::send_paced(&client, relay.local_addr(), &relay, 0..N, 100);
    assert!(relay.wait_idle(Duration::from_secs(2)));
    let forwarded = relay.stats().up.forwarded as usize;
    assert_eq!(sink.wait_for(forwarded, Duration::from_secs(2)), forwarded);
    let h = sink.histogram();
    (0..N).filter(|s| !h.contains_key(s)).collect()
}

#[test]
fn same_seed_same_loss_pattern() {
    let a = lost_seqs(7);
    let b = lost_seqs(7);
    let c = lost_seqs(8);
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed must reproduce the loss pattern exactly");
    assert_ne!(a, c, "another seed should give another pattern");
}
