//! The repair packet wire form: round trips, and rejection of truncated or
//! garbage input without panicking.

use proptest::prelude::*;
use starblk_fec::{Encoder, FecError, FecScheme, RepairPacket, MAX_GROUP_DATA};

/// Repair packets from a short stream of variable-length packets.
fn sample_packets(scheme: FecScheme) -> Vec<RepairPacket> {
    let mut enc = Encoder::new(scheme);
    let mut out = Vec::new();
    for seq in 1..=20u64 {
        let payload: Vec<u8> = (0..(seq * 37 % 300) as usize).map(|i| i as u8).collect();
        enc.push(seq * 3, &payload, &mut out).expect("push");
    }
    enc.flush(&mut out).expect("flush");
    out
}

fn all_samples() -> Vec<RepairPacket> {
    let mut v = sample_packets(FecScheme::layered_xor(4, 3).expect("scheme"));
    v.extend(sample_packets(FecScheme::reed_solomon(5, 2).expect("scheme")));
    v
}

fn wire(p: &RepairPacket) -> Vec<u8> {
    let mut buf = Vec::new();
    p.encode_into(&mut buf);
    buf
}

#[test]
fn round_trip_is_exact() {
    for p in all_samples() {
        let buf = wire(&p);
        assert_eq!(buf.len(), p.encoded_len());
        assert_eq!(RepairPacket::decode(&buf), Ok(p));
    }
}

#[test]
fn encode_into_appends() {
    let p = &all_samples()[0];
    let mut buf = vec![9, 9];
    p.encode_into(&mut buf);
    assert_eq!(&buf[..2], &[9, 9]);
    assert_eq!(RepairPacket::decode(&buf[2..]).as_ref(), Ok(p));
}

#[test]
fn every_truncation_is_rejected() {
    for p in all_samples() {
        let buf = wire(&p);
        for cut in 0..buf.len() {
            assert!(RepairPacket::decode(&buf[..cut]).is_err(), "prefix {cut}");
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut buf = wire(&all_samples()[0]);
    buf.push(0);
    assert_eq!(RepairPacket::decode(&buf), Err(FecError::TrailingBytes { extra_bytes: 1 }));
}

/// A valid packet covering seqs 10, 12 with lengths 1, 2.
fn two_packet_wire() -> Vec<u8> {
    let mut enc = Encoder::new(FecScheme::layered_xor_with_strides(2, &[2]).expect("scheme"));
    let mut out = Vec::new();
    enc.push(10, &[1], &mut out).expect("push");
    enc.push(12, &[2, 3], &mut out).expect("push");
    assert_eq!(out.len(), 1);
    wire(&out[0])
}

#[test]
fn header_fields_are_checked() {
    let good = two_packet_wire();
    assert!(RepairPacket::decode(&good).is_ok());
    let with = |offset: usize, value: u8| {
        let mut b = good.clone();
        b[offset] = value;
        RepairPacket::decode(&b)
    };
    assert_eq!(with(0, 0), Err(FecError::BadMagic(0)));
    assert_eq!(with(1, 2), Err(FecError::UnsupportedVersion(2)));
    assert_eq!(with(2, 7), Err(FecError::UnknownScheme(7)));
    assert!(matches!(with(3, 1), Err(FecError::BadField { field: "index", .. })));
    assert!(matches!(with(4, 0), Err(FecError::BadField { field: "total", .. })));
    assert!(matches!(with(4, 200), Err(FecError::BadField { field: "total", .. })));
    assert!(matches!(with(5, 0), Err(FecError::BadField { field: "count", .. })));
    let too_many = MAX_GROUP_DATA as u8 + 1;
    assert!(matches!(with(5, too_many), Err(FecError::BadField { field: "count", .. })));
    assert!(matches!(with(6, 9), Err(FecError::PayloadLenMismatch { .. })));
    // Claiming more covered packets than the buffer holds fails somewhere.
    assert!(with(5, 40).is_err());
    let mut short = good.clone();
    short.truncate(good.len() - 1);
    assert!(matches!(RepairPacket::decode(&short), Err(FecError::Truncated { .. })));
}

#[test]
fn seq_list_is_checked() {
    let good = two_packet_wire();
    // Byte 16 is the single delta (2).
    let with_delta = |delta: &[u8]| {
        let mut b = good[..16].to_vec();
        b.extend_from_slice(delta);
        b.extend_from_slice(&good[17..]);
        RepairPacket::decode(&b)
    };
    assert!(with_delta(&[2]).is_ok());
    assert_eq!(with_delta(&[0]), Err(FecError::BadSeqList), "zero delta");
    assert_eq!(with_delta(&[0x82, 0x00]), Err(FecError::BadSeqList), "non-canonical");
    let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
    assert_eq!(with_delta(&overflow), Err(FecError::BadSeqList), "> u64");
    let eleven = [0x80u8; 11];
    assert_eq!(with_delta(&eleven), Err(FecError::BadSeqList), "11 bytes");
    // first seq + delta beyond u64::MAX
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(RepairPacket::decode(&b), Err(FecError::BadSeqList));
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        if let Ok(p) = RepairPacket::decode(&bytes) {
            // Anything accepted is canonical: it re-encodes to the same bytes.
            let mut again = Vec::new();
            p.encode_into(&mut again);
            prop_assert_eq!(again, bytes);
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        index in 0usize..40,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let samples = all_samples();
        let mut buf = wire(&samples[index % samples.len()]);
        for (pos, val) in flips {
            let len = buf.len();
            buf[pos % len] = val;
        }
        if let Ok(p) = RepairPacket::decode(&buf) {
            let mut again = Vec::new();
            p.encode_into(&mut again);
            prop_assert_eq!(again, buf);
        }
    }
}

#[test]
fn repair_header_bound_holds_for_consecutive_seqs() {
    let schemes = [
        FecScheme::layered_xor(8, 3).expect("scheme"),
        FecScheme::layered_xor(64, 4).expect("scheme"),
        FecScheme::layered_xor_with_strides(16, &[1, 1000, 16_384]).expect("scheme"),
        FecScheme::reed_solomon(8, 3).expect("scheme"),
        FecScheme::reed_solomon(32, 4).expect("scheme"),
    ];
    for scheme in schemes {
        let bound = scheme.repair_header_bytes_max();
        let mut enc = Encoder::new(scheme.clone());
        let mut out = Vec::new();
        for seq in 1..=100_000u64 {
            enc.push(seq, &[seq as u8; 40], &mut out).expect("push");
            if seq % 7919 == 0 {
                enc.flush(&mut out).expect("flush");
            }
        }
        enc.flush(&mut out).expect("flush");
        assert!(!out.is_empty());
        for p in &out {
            let overhead = p.encoded_len() - p.payload().len();
            assert!(overhead <= bound, "{scheme:?}: {overhead} > {bound}");
        }
    }
}
