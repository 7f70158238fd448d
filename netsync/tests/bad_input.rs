//! Bad input on the link: truncated datagrams, a wrong link id, seqs far
//! outside the window, repair datagrams with a bad crc, forged repair
//! packets (valid outer crc, garbage inside), random garbage, and a flood
//! of nacks. Each is dropped and counted; the link stays up and the
//! delivered stream stays correct.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_same_stream, init_tracing, relayed_pair, transfer, LossModel, Rng};
use starblk_fec::{Encoder, FecScheme};
use starblk_netsync::wire::{self, Header, Kind, NackPayload, NackRange};
use starblk_netsync::{Link, LinkConfig};

fn data_datagram(link_id: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        kind: Kind::Data,
        flags: 0,
        link_id,
        seq,
        msg_id: 1,
        frag_index: 0,
        frag_count: 1,
        msg_len_bytes: payload.len() as u32,
    };
    let mut b = Vec::new();
    wire::encode_into(&h, payload, &mut b);
    b
}

/// A repair datagram with a valid crc whose repair packet "rebuilds" seq
/// `seq` as garbage (a one-packet group, as an idle flush makes).
fn forged_repair(link_id: u32, seq: u64, scheme: &FecScheme) -> Vec<u8> {
    let mut enc = Encoder::new(scheme.clone());
    let mut repairs = Vec::new();
    enc.push(seq, &[0x5a; 300], &mut repairs).unwrap();
    enc.flush(&mut repairs).unwrap();
    let repair = repairs.iter().find(|r| r.seqs() == [seq]).expect("a one-packet group");
    let mut payload = Vec::new();
    repair.encode_into(&mut payload);
    let mut b = Vec::new();
    wire::encode_into(&Header::control(Kind::Repair, link_id, 9999), &payload, &mut b);
    b
}

fn nack(link_id: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    NackPayload { cum_ack: 1, ranges: vec![NackRange { first: 1, count: 100_000 }] }.encode_into(&mut payload);
    let mut b = Vec::new();
    wire::encode_into(&Header::control(Kind::Nack, link_id, 0), &payload, &mut b);
    b
}

#[derive(Debug, Default)]
struct Injected {
    truncated: u64,
    wrong_link: u64,
    far_seq: u64,
    bad_crc: u64,
    forged: u64,
    garbage: u64,
    nacks: u64,
}

fn inject(relay: &common::Relay, he: &Link, scheme: &FecScheme, rng: &mut Rng, n: &mut Injected) {
    let id = he.link_id();
    let good = data_datagram(id, 5, b"hello");
    // Truncated: inside the header, and inside the payload.
    for cut in [10, wire::HEADER_BYTES + 2] {
        relay.inject_to_replica(&good[..cut]);
        n.truncated += 1;
    }
    relay.inject_to_replica(&data_datagram(id.wrapping_add(1), 5, b"other link"));
    n.wrong_link += 1;
    relay.inject_to_replica(&data_datagram(id, 1 << 40, b"far future"));
    n.far_seq += 1;
    let mut bad = forged_repair(id, 3, scheme);
    let last = bad.len() - 1;
    bad[last] ^= 0xff; // payload byte changed, crc not recomputed
    relay.inject_to_replica(&bad);
    n.bad_crc += 1;
    let ahead = he.stats().tx.data_packets + 20 + rng.below(20);
    relay.inject_to_replica(&forged_repair(id, ahead, scheme));
    n.forged += 1;
    let len = 1 + rng.below(1400) as usize;
    relay.inject_to_replica(&rng.bytes(len));
    n.garbage += 1;
    for _ in 0..500 {
        relay.inject_to_he(&nack(id));
        n.nacks += 1;
    }
}

#[test]
fn bad_input_is_counted_and_the_stream_stays_correct() {
    init_tracing();
    let scheme = FecScheme::layered_xor(8, 3).unwrap();
    let cfg = LinkConfig { fec: Some(scheme.clone()), max_nacks_per_s: 1000, ..LinkConfig::default() };
    let (he, replica, relay) = relayed_pair(cfg, LinkConfig::default(), LossModel::none());
    let he = Arc::new(he);
    let replica = Arc::new(replica);
    let mut rng = Rng::new(0xbad);
    let msgs: Vec<Vec<u8>> = (0..120)
        .map(|_| {
            let n = rng.size(256 << 10);
            rng.bytes(n)
        })
        .collect();
    // The first message, so the relay knows the HE's address.
    he.send(&msgs[0]).unwrap();
    assert_eq!(replica.recv_timeout(Duration::from_secs(5)).unwrap(), msgs[0]);

    let sender = {
        let (he, replica, msgs) = (he.clone(), replica.clone(), msgs.clone());
        std::thread::spawn(move || transfer(&he, replica, &msgs[1..], Duration::from_secs(30)))
    };
    let mut n = Injected::default();
    for _ in 0..10 {
        inject(&relay, &he, &scheme, &mut rng, &mut n);
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = sender.join().unwrap();
    assert_same_stream(&got, &msgs[1..]);
    he.wait_acked(msgs.len() as u64, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(10));

    let r = replica.stats();
    let s = he.stats();
    eprintln!("injected {n:?}\nreplica rejected {:?}\nHE rejected {:?}", r.rejected, s.rejected);
    eprintln!(
        "replica: decoder resets {}, recovered {}; HE: nacks taken {}, retransmitted {}",
        r.rx.decoder_resets, r.rx.recovered_packets, s.tx.nacks_received, s.tx.retransmitted_packets
    );
    assert_eq!(r.rejected.truncated, n.truncated);
    assert_eq!(r.rejected.wrong_link_id, n.wrong_link);
    assert!(r.rejected.seq_out_of_window >= n.far_seq);
    assert_eq!(r.rejected.bad_crc, n.bad_crc);
    assert!(r.rejected.bad_repair >= 1, "a forged repair must be caught by the rebuilt datagram's crc");
    assert!(r.rx.decoder_resets >= 1);
    assert!(r.rejected.bad_header >= n.garbage / 2, "garbage: mostly bad magic");
    assert!(s.rejected.nack_flood >= n.nacks / 2, "nack flood must be rate limited");
    // The link is still up: one more message goes through.
    let last = he.send(b"still up").unwrap();
    assert_eq!(replica.recv_timeout(Duration::from_secs(5)).unwrap(), b"still up");
    he.wait_acked(last, Duration::from_secs(5)).unwrap();
}
