//! The listener: several initiators on one replica address each get their
//! own link and stream; a peer's message size limit is honoured; a link to
//! a dead address times out cleanly.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{init_tracing, localhost, Rng};
use starblk_netsync::{Link, LinkConfig, LinkError, Listener};

#[test]
fn two_initiators_one_listener() {
    init_tracing();
    let mut listener = Listener::bind(localhost(), LinkConfig::default()).unwrap();
    let a = Link::connect(localhost(), listener.local_addr(), LinkConfig::default()).unwrap();
    let ra = listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept a");
    let b = Link::connect(localhost(), listener.local_addr(), LinkConfig::default()).unwrap();
    let rb = listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept b");
    assert_ne!(a.link_id(), b.link_id());
    assert_eq!((ra.link_id(), rb.link_id()), (a.link_id(), b.link_id()));
    let (ra, rb) = (Arc::new(ra), Arc::new(rb));
    let mut rng = Rng::new(0x2);
    let msgs: Vec<Vec<u8>> = (0..50)
        .map(|_| {
            let n = rng.size(100_000);
            rng.bytes(n)
        })
        .collect();
    for m in &msgs {
        a.send(m).unwrap();
        b.send(&m.iter().map(|x| !x).collect::<Vec<u8>>()).unwrap();
    }
    for m in &msgs {
        assert!(&ra.recv_timeout(Duration::from_secs(10)).unwrap() == m);
        let inverted: Vec<u8> = m.iter().map(|x| !x).collect();
        assert!(rb.recv_timeout(Duration::from_secs(10)).unwrap() == inverted);
    }
    // Replies go back to the right initiator.
    ra.send(b"to a").unwrap();
    rb.send(b"to b").unwrap();
    assert_eq!(a.recv_timeout(Duration::from_secs(5)).unwrap(), b"to a");
    assert_eq!(b.recv_timeout(Duration::from_secs(5)).unwrap(), b"to b");
    assert_eq!(listener.rejected().total(), 0);
}

#[test]
fn send_keeps_to_the_peers_message_limit() {
    init_tracing();
    let small = LinkConfig {
        max_message_bytes: 64 << 10,
        recv_buffer_bytes: 1 << 20,
        window_bytes: 1 << 20,
        ..LinkConfig::default()
    };
    let (he, replica) = common::direct_pair(LinkConfig::default(), small);
    let err = he.send(&vec![0u8; 100 << 10]).unwrap_err();
    assert!(matches!(err, LinkError::MessageTooLarge { max_bytes, .. } if max_bytes == 64 << 10), "{err}");
    he.send(&vec![1u8; 64 << 10]).unwrap();
    assert_eq!(replica.recv_timeout(Duration::from_secs(5)).unwrap().len(), 64 << 10);
}

#[test]
fn dead_peer_times_out_and_closes_quickly() {
    init_tracing();
    // A bound socket nobody reads: hellos vanish.
    let sink = std::net::UdpSocket::bind(localhost()).unwrap();
    let he = Link::connect(localhost(), sink.local_addr().unwrap(), LinkConfig::default()).unwrap();
    assert!(matches!(he.wait_established(Duration::from_millis(300)), Err(LinkError::Timeout)));
    let id = he.try_send(b"queued").unwrap();
    assert!(matches!(he.wait_on_wire(id, Duration::from_millis(100)), Err(LinkError::Timeout)));
    assert!(!he.stats().connected);
    let t0 = Instant::now();
    he.close();
    assert!(t0.elapsed() < Duration::from_millis(500));
    // A closed port (ICMP unreachable) is survived as well.
    drop(sink);
    let port = std::net::UdpSocket::bind(localhost()).unwrap().local_addr().unwrap();
    let he = Link::connect(localhost(), port, LinkConfig::default()).unwrap();
    assert!(he.wait_established(Duration::from_millis(300)).is_err());
    assert!(he.last_error().is_none(), "{:?}", he.last_error());
}
