//! Cut semantics: from the cut instant nothing more enters the link, but
//! what the link already accepted still arrives after its delay.

mod common;

use std::time::{Duration, Instant};

use starblk_wanem::{Direction, LinkParams};

#[test]
fn cut_drops_new_packets_but_delivers_in_flight_ones() {
    const N: u64 = 100;
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, LinkParams { delay_ms: 50.0, ..Default::default() }, 5);
    let client = common::udp_socket();
    let t0 = Instant::now();
    for seq in 0..N {
        client.send_to(&common::numbered(seq, 200), relay.local_addr()).unwrap();
    }
    // Cut at 10 ms, while all N are still in the fibre.
    std::thread::sleep(Duration::from_millis(10).saturating_sub(t0.elapsed()));
    relay.cut_both();
    let cut_at = t0.elapsed();
    assert!(cut_at < Duration::from_millis(50), "test host too slow: cut at {cut_at:?}");
    assert!(relay.is_cut(Direction::Up) && relay.is_cut(Direction::Down));
    assert_eq!(sink.count(), 0, "nothing arrives before the delay");
    for seq in N..N + 50 {
        client.send_to(&common::numbered(seq, 200), relay.local_addr()).unwrap();
    }

    assert_eq!(sink.wait_for(N as usize, Duration::from_secs(1)), N as usize);
    std::thread::sleep(Duration::from_millis(150)); // anything sent after the cut would be here by now
    let got = sink.received();
    assert_eq!(got.len(), N as usize, "only the packets accepted before the cut arrive");
    assert!(got.iter().all(|&(seq, _)| seq < N));
    assert!(got.iter().all(|&(_, at)| at - t0 >= Duration::from_millis(50)), "in-flight packets keep their delay");
    let s = relay.stats().up;
    assert_eq!((s.forwarded, s.dropped_cut, s.in_flight), (N, 50, 0));
}

#[test]
fn uncut_restores_and_per_direction_cut_is_independent() {
    let echo = common::echo_server();
    let relay = common::relay(echo, LinkParams::default(), 6);
    let client = common::udp_socket();
    client.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 64];
    let mut ping = |seq: u64| {
        client.send_to(&common::numbered(seq, 16), relay.local_addr()).unwrap();
        client.recv(&mut buf).ok().map(|n| common::seq_of(&buf[..n]))
    };
    assert_eq!(ping(1), Some(1));
    relay.cut(Direction::Down); // requests get through, replies do not
    assert!(relay.is_cut(Direction::Down) && !relay.is_cut(Direction::Up));
    assert_eq!(ping(2), None);
    relay.uncut(Direction::Down);
    assert_eq!(ping(3), Some(3));
    assert!(relay.wait_idle(Duration::from_secs(1)));
    let s = relay.stats();
    assert_eq!((s.up.forwarded, s.up.dropped_cut), (3, 0));
    assert_eq!((s.down.forwarded, s.down.dropped_cut), (2, 1));
}

/// A datagram that reached the relay host before the cut is in the fibre,
/// even if the relay thread had not read it yet: the cut compares the
/// kernel's arrival stamp, not the time the relay got round to it.
#[test]
fn datagrams_queued_in_the_relay_socket_at_the_cut_still_arrive() {
    const N: u64 = 2000;
    let sink = common::Sink::start();
    let relay = common::relay(sink.addr, LinkParams { delay_ms: 20.0, ..Default::default() }, 8);
    assert!(relay.arrival_stamps(), "this kernel gives no SO_TIMESTAMPNS arrival stamps");
    let client = common::udp_socket();
    for seq in 0..N {
        // On loopback, send_to returns after the datagram is queued at the relay.
        client.send_to(&common::numbered(seq, 64), relay.local_addr()).unwrap();
    }
    relay.cut_both();
    let read_at_cut = relay.stats().up.received;
    eprintln!("relay had read {read_at_cut} of {N} datagrams at the cut");
    client.send_to(&common::numbered(N, 64), relay.local_addr()).unwrap();
    let arrived = sink.wait_for(N as usize, Duration::from_secs(2));
    assert_eq!(arrived, N as usize, "stats: {:?}", relay.stats().up);
    std::thread::sleep(Duration::from_millis(50));
    let s = relay.stats().up;
    assert_eq!((s.received, s.dropped_rcvbuf), (N + 1, 0));
    assert_eq!((s.forwarded, s.dropped_cut), (N, 1), "exactly the datagram sent after the cut is dropped");
}
