//! Throughput of the FEC codecs, side by side with memcpy of the same bytes
//! and with both Reed-Solomon crates, in one run.
//!
//! `cargo run --release -p starblk-fec --example fec_bench`
//!
//! Stream rows push packets through `Encoder` (repairs recycled, as a link
//! does) and feed data + repairs to a `Decoder` with every 8th data packet
//! lost and rebuilt. Raw RS rows code one 8+3 group; decode rebuilds 3 lost
//! data shards. MB/s counts data bytes (10^6 bytes per second).

use std::hint::black_box;
use std::time::{Duration, Instant};

use reed_solomon_erasure::galois_8::ReedSolomon;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use starblk_fec::{Decoder, Encoder, FecScheme, RepairPacket};

const SIZES_BYTES: [usize; 3] = [1024, 4096, 8192];
const STREAM_PACKETS: usize = 2048;
const MIN_TIME: Duration = Duration::from_millis(300);

/// Runs `f` (which processes `bytes_per_call` bytes) until MIN_TIME passed.
fn mbps(bytes_per_call: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm caches and lazy tables
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < MIN_TIME {
        f();
        calls += 1;
    }
    (bytes_per_call as f64 * calls as f64) / start.elapsed().as_secs_f64() / 1e6
}

fn packets(count: usize, size: usize) -> Vec<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect()
}

fn memcpy_mbps(data: &[Vec<u8>]) -> f64 {
    let mut dst = vec![0u8; data[0].len()];
    let bytes = data.len() * data[0].len();
    mbps(bytes, || {
        for p in data {
            dst.copy_from_slice(black_box(p));
            black_box(&mut dst);
        }
    })
}

fn encode_mbps(scheme: &FecScheme, data: &[Vec<u8>]) -> f64 {
    let mut enc = Encoder::new(scheme.clone());
    let mut out = Vec::new();
    let mut seq = 0u64;
    mbps(data.len() * data[0].len(), || {
        for p in data {
            seq += 1;
            enc.push(seq, p, &mut out).expect("push");
            for r in out.drain(..) {
                enc.recycle(black_box(r));
            }
        }
    })
}

/// One stream round's events: data seqs kept (indexes into `data`) and
/// repair packets, with every 8th data packet lost.
fn lossy_round(enc: &mut Encoder, base: u64, data: &[Vec<u8>]) -> Vec<(u64, Option<RepairPacket>)> {
    let mut events = Vec::new();
    let mut out = Vec::new();
    for (i, p) in data.iter().enumerate() {
        let seq = base + i as u64;
        enc.push(seq, p, &mut out).expect("push");
        if i % 8 != 3 {
            events.push((seq, None));
        }
        events.extend(out.drain(..).map(|r| (seq, Some(r))));
    }
    events
}

fn decode_mbps(scheme: &FecScheme, data: &[Vec<u8>]) -> f64 {
    let mut enc = Encoder::new(scheme.clone());
    let mut dec = Decoder::new(scheme);
    let mut out = Vec::new();
    let mut base = 1u64;
    let mut timed = Duration::ZERO;
    let mut rounds = 0u64;
    // Round 0 warms up; building a round (encoding) is not timed.
    while rounds == 0 || timed < MIN_TIME {
        let events = lossy_round(&mut enc, base, data);
        base += data.len() as u64;
        let start = Instant::now();
        for (seq, event) in events {
            match event {
                None => dec.on_data(seq, &data[(seq - 1) as usize % data.len()], &mut out),
                Some(r) => dec.on_repair(r, &mut out),
            }
            .expect("decode");
        }
        if rounds > 0 {
            timed += start.elapsed();
        }
        assert_eq!(out.len(), data.len() / 8, "every loss rebuilt");
        out.clear();
        rounds += 1;
    }
    ((rounds - 1) as f64 * (data.len() * data[0].len()) as f64) / timed.as_secs_f64() / 1e6
}

/// reed-solomon-erasure (SIMD C kernels): encode, and rebuild 3 of 8.
fn erasure_mbps(group: &[Vec<u8>]) -> (f64, f64) {
    let rs = ReedSolomon::new(8, 3).expect("codec");
    let mut parity = vec![vec![0u8; group[0].len()]; 3];
    let bytes = 8 * group[0].len();
    let enc = mbps(bytes, || rs.encode_sep(group, &mut parity).expect("encode"));
    let mut shards: Vec<Vec<u8>> = group.iter().chain(&parity).cloned().collect();
    let dec = mbps(bytes, || {
        let mut v: Vec<(&mut [u8], bool)> =
            shards.iter_mut().enumerate().map(|(i, s)| (&mut s[..], !matches!(i, 0 | 3 | 5))).collect();
        rs.reconstruct_data(&mut v).expect("decode");
    });
    assert_eq!(shards[3], group[3]);
    (enc, dec)
}

/// reed-solomon-simd: encode, and rebuild 3 of 8 (coder objects reused).
fn simd_mbps(group: &[Vec<u8>]) -> (f64, f64) {
    let size = group[0].len();
    let bytes = 8 * size;
    let mut parity = vec![vec![0u8; size]; 3];
    let mut encoder = ReedSolomonEncoder::new(8, 3, size).expect("codec");
    let enc = mbps(bytes, || {
        for d in group {
            encoder.add_original_shard(d).expect("add");
        }
        let result = encoder.encode().expect("encode");
        for (p, r) in parity.iter_mut().zip(result.recovery_iter()) {
            p.copy_from_slice(r);
        }
    });
    let mut decoder = ReedSolomonDecoder::new(8, 3, size).expect("codec");
    let mut restored = vec![vec![0u8; size]; 3];
    let dec = mbps(bytes, || {
        for i in [1, 2, 4, 6, 7] {
            decoder.add_original_shard(i, &group[i]).expect("add");
        }
        for (i, p) in parity.iter().enumerate() {
            decoder.add_recovery_shard(i, p).expect("add");
        }
        let result = decoder.decode().expect("decode");
        for (r, (_, s)) in restored.iter_mut().zip(result.restored_original_iter()) {
            r.copy_from_slice(s);
        }
    });
    assert_eq!(restored[1], group[3]);
    (enc, dec)
}

fn main() {
    let xor = FecScheme::layered_xor(8, 3).expect("scheme");
    let rs = FecScheme::reed_solomon(8, 3).expect("scheme");
    println!("MB/s of data bytes; stream decode loses and rebuilds 1 packet in 8");
    println!(
        "{:>6} | {:>8} | {:>9} {:>9} | {:>9} {:>9} | {:>10} {:>10} | {:>10} {:>10}",
        "size",
        "memcpy",
        "xor8,3 en",
        "xor8,3 de",
        "rs8,3 en",
        "rs8,3 de",
        "erasure en",
        "erasure de",
        "rs-simd en",
        "rs-simd de"
    );
    for size in SIZES_BYTES {
        let data = packets(STREAM_PACKETS, size);
        let (ee, ed) = erasure_mbps(&data[..8]);
        let (se, sd) = simd_mbps(&data[..8]);
        println!(
            "{:>6} | {:>8.0} | {:>9.0} {:>9.0} | {:>9.0} {:>9.0} | {:>10.0} {:>10.0} | {:>10.0} {:>10.0}",
            size,
            memcpy_mbps(&data),
            encode_mbps(&xor, &data),
            decode_mbps(&xor, &data),
            encode_mbps(&rs, &data),
            decode_mbps(&rs, &data),
            ee,
            ed,
            se,
            sd,
        );
    }
}
