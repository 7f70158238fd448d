//! A ping-pong through a relay with 20 ms one-way delay takes 40–60 ms.

mod common;

use std::time::{Duration, Instant};

use starblk_wanem::LinkParams;

#[test]
fn round_trip_shows_twice_the_one_way_delay() {
    let echo = common::echo_server();
    let relay = common::relay(echo, LinkParams { delay_ms: 20.0, ..Default::default() }, 1);
    let client = common::udp_socket();
    client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    let mut rtts = Vec::new();
    for seq in 0..10u64 {
        let t0 = Instant::now();
        client.send_to(&common::numbered(seq, 32), relay.local_addr()).unwrap();
        let n = client.recv(&mut buf).expect("echo came back");
        rtts.push(t0.elapsed());
        assert_eq!(common::seq_of(&buf[..n]), seq);
    }
    eprintln!("rtts: {rtts:?}");
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(40), "rtt {rtt:?} shorter than 2 x 20 ms");
    }
    // The upper bound tolerates one or two scheduling hiccups of a loaded
    // test host; the median must hold.
    rtts.sort();
    assert!(rtts[rtts.len() / 2] < Duration::from_millis(60), "median rtt too long: {rtts:?}");
    assert!(rtts[rtts.len() - 3] < Duration::from_millis(60), "rtts too long: {rtts:?}");
    // Counters move just after the send returns: let the relay settle.
    assert!(relay.wait_idle(Duration::from_secs(1)));
    let s = relay.stats();
    assert_eq!((s.up.forwarded, s.down.forwarded), (10, 10));
    eprintln!("relay lateness: up mean {} us max {} us", s.up.late_mean_us, s.up.late_max_us);
}
