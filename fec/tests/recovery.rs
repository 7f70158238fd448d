//! Property tests: every loss pattern within a code's guarantee is
//! recovered exactly, and nothing is ever "recovered" wrongly.
//!
//! The decoder's result is compared with an oracle that works on seq sets
//! only: for RS, a group's missing data comes back iff it misses no more
//! than the parities received; for layered XOR, peeling (repeatedly solve
//! any received repair that misses exactly one packet) to a fixed point.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use starblk_fec::{Decoder, DecoderConfig, Encoder, FecScheme, RepairPacket, SchemeKind};

/// A tiny deterministic PRNG (xorshift64*), so a proptest seed fixes sizes,
/// contents and losses.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// What the sender put on the wire, in order.
#[derive(Debug, Clone)]
enum Event {
    Data(u64),
    Repair(RepairPacket),
}

struct Stream {
    data: BTreeMap<u64, Vec<u8>>,
    events: Vec<Event>,
}

/// How the stream's idle flushes close open groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// `Encoder::flush`: each open group as it stands.
    AsIs,
    /// `Encoder::flush_with` with every packet available: sparse layered
    /// XOR layers are regrouped.
    Regroup,
}

/// Packets of 1..=9000 bytes (a third of them small), seqs from a random
/// base with occasional gaps when `gaps`, idle flushes now and then, and a
/// final flush that closes the last partial groups.
fn make_stream(scheme: &FecScheme, n: usize, gaps: bool, rng: &mut Rng) -> Stream {
    make_stream_flushing(scheme, n, gaps, Flush::AsIs, rng)
}

fn make_stream_flushing(scheme: &FecScheme, n: usize, gaps: bool, how: Flush, rng: &mut Rng) -> Stream {
    let mut enc = Encoder::new(scheme.clone());
    let mut data = BTreeMap::new();
    let mut events = Vec::new();
    let mut repairs = Vec::new();
    let mut seq = rng.below(1 << 40);
    for _ in 0..n {
        seq += if gaps && rng.chance(100) { 1 + rng.below(5) } else { 1 };
        let len = if rng.chance(333) { 1 + rng.below(100) } else { 1 + rng.below(9000) };
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        enc.push(seq, &payload, &mut repairs).expect("push");
        data.insert(seq, payload);
        if rng.chance(30) {
            match how {
                Flush::AsIs => enc.flush(&mut repairs).expect("flush"),
                Flush::Regroup => enc.flush_with(&mut repairs, |s| data.get(&s).map(Vec::as_slice)).expect("flush"),
            }
        }
        events.push(Event::Data(seq));
        events.extend(repairs.drain(..).map(Event::Repair));
    }
    enc.flush(&mut repairs).expect("flush");
    assert!(!enc.has_open_groups());
    events.extend(repairs.drain(..).map(Event::Repair));
    Stream { data, events }
}

/// A decoder whose window holds the whole stream, so the oracle applies.
fn roomy_decoder(scheme: &FecScheme, stream: &Stream) -> Decoder {
    let first = stream.data.keys().next().copied().unwrap_or(0);
    let last = stream.data.keys().last().copied().unwrap_or(0);
    let mut config = DecoderConfig::for_scheme(scheme);
    config.window_seqs = config.window_seqs.max(last - first + 1);
    config.max_pending_groups = 1 << 20;
    Decoder::with_config(scheme, config).expect("config")
}

/// Feeds the events not lost; returns every seq the decoder then holds,
/// after checking each recovered packet byte for byte.
fn deliver(stream: &Stream, lost: &[bool], dec: &mut Decoder) -> BTreeSet<u64> {
    let mut held = BTreeSet::new();
    let mut out = Vec::new();
    for (event, &lost) in stream.events.iter().zip(lost) {
        if lost {
            continue;
        }
        match event {
            Event::Data(seq) => {
                dec.on_data(*seq, &stream.data[seq], &mut out).expect("data");
                held.insert(*seq);
            }
            Event::Repair(r) => dec.on_repair(r.clone(), &mut out).expect("repair"),
        }
        for rec in out.drain(..) {
            let original = stream.data.get(&rec.seq).expect("recovered an unknown seq");
            assert!(rec.payload == *original, "seq {} recovered wrongly", rec.seq);
            assert!(held.insert(rec.seq), "seq {} delivered twice", rec.seq);
        }
    }
    held
}

/// The seqs a perfect peeling decoder ends up holding.
fn oracle(stream: &Stream, lost: &[bool], kind: SchemeKind) -> BTreeSet<u64> {
    let mut held = BTreeSet::new();
    // Group key -> (covered seqs, parities received).
    let mut groups: BTreeMap<(u64, u8), (Vec<u64>, usize)> = BTreeMap::new();
    for (event, &lost) in stream.events.iter().zip(lost) {
        match (event, lost) {
            (Event::Data(seq), false) => {
                held.insert(*seq);
            }
            (Event::Repair(r), false) => {
                let layer = if kind == SchemeKind::LayeredXor { r.index() } else { 0 };
                let g = groups.entry((r.seqs()[0], layer)).or_insert((r.seqs().to_vec(), 0));
                g.1 += 1;
            }
            _ => {}
        }
    }
    loop {
        let mut changed = false;
        for (seqs, parities) in groups.values() {
            let missing: Vec<u64> = seqs.iter().copied().filter(|s| !held.contains(s)).collect();
            if !missing.is_empty() && missing.len() <= *parities {
                held.extend(missing);
                changed = true;
            }
        }
        if !changed {
            return held;
        }
    }
}

/// Independent losses at `rate_per_mille`, plus one burst of `burst` events.
fn losses(n: usize, rate_per_mille: u64, burst: usize, rng: &mut Rng) -> Vec<bool> {
    let mut lost: Vec<bool> = (0..n).map(|_| rng.chance(rate_per_mille)).collect();
    if burst > 0 && n > 0 {
        let start = rng.below(n as u64) as usize;
        for l in lost.iter_mut().skip(start).take(burst) {
            *l = true;
        }
    }
    lost
}

fn xor_scheme(r: usize, c: usize, default_strides: bool, rng: &mut Rng) -> FecScheme {
    if default_strides {
        return FecScheme::layered_xor(r, c).expect("scheme");
    }
    let mut strides = vec![1u64];
    while strides.len() < c {
        let prev = *strides.last().expect("non-empty");
        strides.push(prev + 1 + rng.below(2 * prev + 3));
    }
    FecScheme::layered_xor_with_strides(r, &strides).expect("scheme")
}

fn check_against_oracle(scheme: &FecScheme, stream: &Stream, lost: &[bool]) -> BTreeSet<u64> {
    let mut dec = roomy_decoder(scheme, stream);
    let held = deliver(stream, lost, &mut dec);
    let expected = oracle(stream, lost, scheme.kind());
    assert_eq!(held, expected, "decoder and oracle disagree");
    for seq in stream.data.keys() {
        assert_eq!(dec.contains(*seq), held.contains(seq));
    }
    assert_eq!(dec.stats().groups_expired + dec.stats().groups_evicted, 0);
    held
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 96, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// RS: a group that lost at most c of its r + c packets comes back
    /// whole; any other comes back not at all. Checked per group too.
    #[test]
    fn rs_recovers_exactly_its_guarantee(
        r in 2usize..=16, c in 1usize..=4, n in 1usize..=300, seed in any::<u64>(),
        rate in prop::sample::select(vec![0u64, 20, 100, 300]), burst in 0usize..12,
    ) {
        let scheme = FecScheme::reed_solomon(r, c).expect("scheme");
        let mut rng = Rng::new(seed);
        let stream = make_stream(&scheme, n, true, &mut rng);
        let lost = losses(stream.events.len(), rate, burst, &mut rng);
        let held = check_against_oracle(&scheme, &stream, &lost);
        for (i, event) in stream.events.iter().enumerate() {
            let Event::Repair(rep) = event else { continue };
            if rep.index() != 0 {
                continue;
            }
            // This group's c parities follow its first one directly.
            let group_lost = rep.seqs().iter().filter(|s| {
                let at = stream.events.iter().position(|e| matches!(e, Event::Data(d) if d == *s));
                at.is_some_and(|p| lost[p])
            }).count() + lost[i..i + c].iter().filter(|l| **l).count();
            if group_lost <= c {
                prop_assert!(rep.seqs().iter().all(|s| held.contains(s)));
            }
        }
    }

    /// Layered XOR under random and bursty loss of data and repairs.
    #[test]
    fn xor_matches_peeling_oracle(
        r in 2usize..=16, c in 1usize..=4, n in 1usize..=300, seed in any::<u64>(),
        default_strides in any::<bool>(),
        rate in prop::sample::select(vec![0u64, 20, 100, 300]), burst in 0usize..40,
    ) {
        let mut rng = Rng::new(seed);
        let scheme = xor_scheme(r, c, default_strides, &mut rng);
        for how in [Flush::AsIs, Flush::Regroup] {
            let stream = make_stream_flushing(&scheme, n, true, how, &mut rng);
            let lost = losses(stream.events.len(), rate, burst, &mut rng);
            check_against_oracle(&scheme, &stream, &lost);
        }
    }

    /// Regrouped idle flushes keep the layered XOR contract: every data
    /// packet is covered exactly once per layer, a layer never costs more
    /// than one repair per r packets plus one per flush, and with every
    /// repair received, any single data loss comes back.
    #[test]
    fn xor_regrouped_flush_covers_each_packet_once_per_layer(
        r in 2usize..=16, c in 2usize..=4, n in 1usize..=400, seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let scheme = FecScheme::layered_xor(r, c).expect("scheme");
        let stream = make_stream_flushing(&scheme, n, false, Flush::Regroup, &mut rng);
        let mut per_layer: BTreeMap<(u64, u8), usize> = BTreeMap::new();
        let mut repairs_per_layer = vec![0usize; c];
        for e in &stream.events {
            if let Event::Repair(rep) = e {
                repairs_per_layer[usize::from(rep.index())] += 1;
                for s in rep.seqs() {
                    *per_layer.entry((*s, rep.index())).or_default() += 1;
                }
            }
        }
        for seq in stream.data.keys() {
            for layer in 0..c as u8 {
                prop_assert_eq!(per_layer.get(&(*seq, layer)).copied(), Some(1), "seq {} layer {}", seq, layer);
            }
        }
        // Flushes happen with 3% chance per packet, plus the final one.
        let flushes = 1 + stream.events.len();
        for (layer, count) in repairs_per_layer.iter().enumerate() {
            let bound = n.div_ceil(r) + flushes.min(n);
            prop_assert!(*count <= bound, "layer {} sent {} repairs for {} packets", layer, count, n);
        }
        let victim = *stream.data.keys().nth(rng.below(n as u64) as usize).expect("n >= 1");
        let lost: Vec<bool> = stream.events.iter().map(|e| matches!(e, Event::Data(s) if *s == victim)).collect();
        let held = check_against_oracle(&scheme, &stream, &lost);
        prop_assert!(held.contains(&victim));
    }

    /// Layered XOR guarantee: a burst of data losses no longer than the top
    /// stride, all repairs received, is recovered completely; so is any
    /// pattern where each lost packet is its group's only loss in some layer.
    #[test]
    fn xor_recovers_bursts_up_to_top_stride(
        r in 2usize..=16, c in 1usize..=4, n in 1usize..=300, seed in any::<u64>(),
        default_strides in any::<bool>(), extra_rate in prop::sample::select(vec![0u64, 10, 50]),
    ) {
        let mut rng = Rng::new(seed);
        let scheme = xor_scheme(r, c, default_strides, &mut rng);
        let FecScheme::LayeredXor { strides, .. } = &scheme else { unreachable!() };
        let top = *strides.iter().max().expect("layers") as usize;
        // Consecutive seqs: a burst of B <= top then hits B residue classes.
        let stream = make_stream(&scheme, n, false, &mut rng);
        let burst = 1 + rng.below(top.min(n) as u64) as usize;
        let start = rng.below((n - burst + 1) as u64) as usize;
        let burst_seqs: BTreeSet<u64> = stream.data.keys().copied().skip(start).take(burst).collect();
        let mut lost: Vec<bool> = stream.events.iter().map(|e| match e {
            Event::Data(s) => burst_seqs.contains(s),
            Event::Repair(_) => false,
        }).collect();
        let held = check_against_oracle(&scheme, &stream, &lost);
        prop_assert_eq!(held.len(), stream.data.len(), "burst of {} not recovered", burst);

        // Scattered extra data losses, repairs still all received.
        for (e, l) in stream.events.iter().zip(lost.iter_mut()) {
            if matches!(e, Event::Data(_)) && rng.chance(extra_rate) {
                *l = true;
            }
        }
        let held = check_against_oracle(&scheme, &stream, &lost);
        let lost_seqs: BTreeSet<u64> = stream.events.iter().zip(&lost).filter_map(|(e, l)| match e {
            Event::Data(s) if *l => Some(*s),
            _ => None,
        }).collect();
        for rep in stream.events.iter().filter_map(|e| match e { Event::Repair(r) => Some(r), _ => None }) {
            let missing: Vec<&u64> = rep.seqs().iter().filter(|s| lost_seqs.contains(s)).collect();
            if missing.len() == 1 {
                prop_assert!(held.contains(missing[0]), "sole loss {} not recovered", missing[0]);
            }
        }
    }

    /// With a small window, a small pending cap and reordering, recovery is
    /// partial but never wrong, never duplicated, and never panics.
    #[test]
    fn small_window_and_reordering_stay_sound(
        xor in any::<bool>(), r in 2usize..=16, c in 1usize..=4, n in 1usize..=300,
        seed in any::<u64>(), window in 1u64..200, pending in 1usize..20,
        rate in prop::sample::select(vec![0u64, 50, 200]),
    ) {
        let mut rng = Rng::new(seed);
        let scheme = if xor { xor_scheme(r, c, false, &mut rng) } else {
            FecScheme::reed_solomon(r, c).expect("scheme")
        };
        let mut stream = make_stream(&scheme, n, true, &mut rng);
        for i in 1..stream.events.len() {
            if rng.chance(200) {
                let j = i - rng.below(i.min(8) as u64) as usize;
                stream.events.swap(i, j);
            }
        }
        let lost = losses(stream.events.len(), rate, 0, &mut rng);
        let config = DecoderConfig { window_seqs: window, max_pending_groups: pending, max_advance_seqs: 1 << 32 };
        let mut dec = Decoder::with_config(&scheme, config).expect("config");
        let held = deliver(&stream, &lost, &mut dec);
        let expected = oracle(&stream, &lost, scheme.kind());
        prop_assert!(held.is_subset(&expected));
    }
}

#[test]
fn flush_protects_a_single_packet() {
    for scheme in [FecScheme::layered_xor(8, 3).expect("scheme"), FecScheme::reed_solomon(8, 3).expect("scheme")] {
        let mut enc = Encoder::new(scheme.clone());
        let mut repairs = Vec::new();
        enc.push(1, b"only write", &mut repairs).expect("push");
        assert!(repairs.is_empty() && enc.has_open_groups());
        enc.flush(&mut repairs).expect("flush");
        assert_eq!(repairs.len(), 3);
        assert!(repairs.iter().all(|r| r.seqs() == [1] && r.lens() == [10]));
        let mut dec = Decoder::new(&scheme);
        let mut out = Vec::new();
        dec.on_repair(repairs.remove(0), &mut out).expect("repair");
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].seq, out[0].payload.as_slice()), (1, &b"only write"[..]));
    }
}

#[test]
fn out_of_window_and_mismatched_input_is_counted_not_stored() {
    let scheme = FecScheme::reed_solomon(4, 2).expect("scheme");
    let config = DecoderConfig { window_seqs: 16, max_pending_groups: 4, max_advance_seqs: 100 };
    let mut dec = Decoder::with_config(&scheme, config).expect("config");
    let mut out = Vec::new();
    dec.on_data(1000, b"a", &mut out).expect("data");
    dec.on_data(1000, b"a", &mut out).expect("data");
    dec.on_data(10, b"old", &mut out).expect("data");
    dec.on_data(5000, b"far", &mut out).expect("data");
    let s = dec.stats();
    assert_eq!((s.data_accepted, s.duplicate_data, s.too_old, s.far_future), (1, 1, 1, 1));
    assert!(!dec.contains(5000) && !dec.contains(10) && dec.contains(1000));
    assert_eq!(dec.high_seq(), Some(1000));
    assert_eq!(dec.low_seq(), 1000 - 15);

    let mut xor_enc = Encoder::new(FecScheme::layered_xor(4, 2).expect("scheme"));
    let mut repairs = Vec::new();
    xor_enc.push(1001, b"x", &mut repairs).expect("push");
    xor_enc.flush(&mut repairs).expect("flush");
    assert!(dec.on_repair(repairs.remove(0), &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn encoder_rejects_bad_input() {
    let mut enc = Encoder::new(FecScheme::layered_xor(4, 2).expect("scheme"));
    let mut out = Vec::new();
    enc.push(5, b"a", &mut out).expect("push");
    assert!(enc.push(5, b"b", &mut out).is_err());
    assert!(enc.push(4, b"b", &mut out).is_err());
    let big = vec![0u8; starblk_fec::MAX_PACKET_BYTES + 1];
    assert!(enc.push(6, &big, &mut out).is_err());
    assert!(FecScheme::layered_xor(0, 2).is_err());
    assert!(FecScheme::layered_xor(4, 0).is_err());
    assert!(FecScheme::layered_xor_with_strides(4, &[1, 0]).is_err());
    assert!(FecScheme::reed_solomon(4, 0).is_err());
    assert!(FecScheme::reed_solomon(65, 2).is_err());
}

#[test]
fn recycled_packets_are_reused() {
    for scheme in [FecScheme::layered_xor(2, 2).expect("scheme"), FecScheme::reed_solomon(2, 2).expect("scheme")] {
        let mut enc = Encoder::new(scheme.clone());
        let mut dec = Decoder::new(&scheme);
        let (mut repairs, mut out) = (Vec::new(), Vec::new());
        for round in 0..10u64 {
            let a = vec![round as u8; 100 + round as usize];
            let b = vec![!(round as u8); 50];
            enc.push(2 * round + 1, &a, &mut repairs).expect("push");
            enc.push(2 * round + 2, &b, &mut repairs).expect("push");
            enc.flush(&mut repairs).expect("flush");
            dec.on_data(2 * round + 2, &b, &mut out).expect("data");
            for rep in repairs.drain(..) {
                dec.on_repair(rep.clone(), &mut out).expect("repair");
                // Stale contents in a recycled packet must never leak out.
                enc.recycle(rep);
            }
            assert_eq!(out.len(), 1, "round {round}");
            assert_eq!(out.pop().map(|r| (r.seq, r.payload)), Some((2 * round + 1, a)));
        }
    }
}

/// The case regrouping exists for: a link that goes idle every 64 packets.
/// Closing the open groups as they stand sends 8 + 10 + 64 repairs for
/// (8,3) with strides 1, 10, 100; regrouped, each layer sends 64 / 8.
#[test]
fn idle_flush_of_64_packets_costs_c_over_r() {
    let scheme = FecScheme::layered_xor(8, 3).expect("scheme");
    let packets: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
    let count = |regroup: bool| {
        let mut enc = Encoder::new(scheme.clone());
        let mut out = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            enc.push(i as u64 + 1, p, &mut out).expect("push");
        }
        if regroup {
            enc.flush_with(&mut out, |s| packets.get(s as usize - 1).map(Vec::as_slice)).expect("flush");
        } else {
            enc.flush(&mut out).expect("flush");
        }
        assert!(!enc.has_open_groups());
        // Two sparse layers regrouped over the same packets still differ.
        let distinct: BTreeSet<&[u64]> = out.iter().map(RepairPacket::seqs).collect();
        assert_eq!(distinct.len(), out.len(), "two repairs cover the same packets");
        (0..3u8).map(|layer| out.iter().filter(|r| r.index() == layer).count()).collect::<Vec<_>>()
    };
    assert_eq!(count(false), vec![8, 10, 64]);
    assert_eq!(count(true), vec![8, 8, 8]);
}
