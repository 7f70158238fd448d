//! In-order, exactly-once delivery of random messages (1 B .. 1 MiB) over
//! a loss-free loopback link, in both directions at once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same_stream, direct_pair, init_tracing, transfer, Rng};
use starblk_netsync::LinkConfig;

#[test]
fn random_messages_arrive_in_order_exactly_once() {
    init_tracing();
    let (he, replica) = direct_pair(LinkConfig::default(), LinkConfig::default());
    let replica = Arc::new(replica);
    let mut rng = Rng::new(0x5eed_0001);
    let mut msgs: Vec<Vec<u8>> = (0..300)
        .map(|_| {
            let n = rng.size(1 << 20);
            rng.bytes(n)
        })
        .collect();
    msgs.push(vec![0u8; 1 << 20]);
    msgs.push(vec![7u8; 1]);
    let total: usize = msgs.iter().map(Vec::len).sum();

    // Small acks flow the other way meanwhile.
    let acks: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_le_bytes().to_vec()).collect();
    let back = {
        let (replica, acks) = (replica.clone(), acks.clone());
        std::thread::spawn(move || {
            for a in &acks {
                replica.send(a).unwrap();
            }
        })
    };

    let t0 = Instant::now();
    let got = transfer(&he, replica.clone(), &msgs, Duration::from_secs(30));
    let elapsed = t0.elapsed();
    assert_same_stream(&got, &msgs);
    back.join().unwrap();
    let got_acks: Vec<Vec<u8>> = (0..acks.len()).map(|_| he.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert_same_stream(&got_acks, &acks);

    let last = msgs.len() as u64;
    he.wait_acked(last, Duration::from_secs(10)).unwrap();
    assert!(he.wire_upto() >= last);
    std::thread::sleep(Duration::from_millis(10));
    let s = he.stats();
    let r = replica.stats();
    eprintln!(
        "{} messages, {} MB in {:?} ({:.0} MB/s); data {} repair {} retx {}; rx dup {} recovered {}; rejected {:?}",
        msgs.len(),
        total / 1_000_000,
        elapsed,
        total as f64 / 1e6 / elapsed.as_secs_f64(),
        s.tx.data_packets,
        s.tx.repair_packets,
        s.tx.retransmitted_packets,
        r.rx.duplicate_packets,
        r.rx.recovered_packets,
        r.rejected
    );
    assert_eq!(r.rx.delivered_msgs, msgs.len() as u64);
    assert_eq!(r.rejected.total(), 0);
    assert_eq!(s.rejected.total(), 0);
    assert!(s.tx.repair_packets > 0);
}
