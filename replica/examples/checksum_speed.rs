//! One checksum pass over 4 KiB and 128 KiB buffers, per algorithm, in
//! MB/s: crc32c (the crate's hardware path), XXH3-64 (what frames and log
//! records use, `starblk_replica::sum`) and XXH64, with a copy of the
//! same bytes for scale. `docs/performance.md`, "One XXH3 pass per
//! write", has what it measured natively and in the TCG guest.
//!
//! usage: cargo run --release -p starblk-replica --example checksum_speed [MIB]
//! In the guest: VM_BUILD=0 VM_BINS=target/release/examples/checksum_speed
//! VM_TESTS_DIR=DIR scripts/vm-test, with DIR holding a scenario that runs
//! `checksum_speed 32`.

use std::hint::black_box;
use std::time::{Duration, Instant};

fn mb_s(mib: usize, d: Duration) -> f64 {
    (mib as f64) * 1.048_576 / d.as_secs_f64()
}

fn timed(n: usize, mut f: impl FnMut() -> u64) -> Duration {
    let t = Instant::now();
    let mut acc = 0u64;
    for _ in 0..n {
        acc = acc.wrapping_add(f());
    }
    black_box(acc);
    t.elapsed()
}

fn main() {
    let mib: usize = match std::env::args().nth(1) {
        None => 256,
        Some(a) => a.parse().unwrap_or_else(|_| {
            eprintln!("checksum_speed: {a} is not a number of MiB");
            std::process::exit(2)
        }),
    };
    for bs in [4096usize, 128 << 10] {
        let data: Vec<u8> = (0..bs).map(|i| (i * 31 % 251) as u8).collect();
        let mut dst = vec![0u8; bs];
        let n = (mib << 20) / bs;
        let crc = timed(n, || u64::from(crc32c::crc32c(black_box(&data))));
        let xxh3 = timed(n, || xxhash_rust::xxh3::xxh3_64(black_box(&data)));
        let xxh64 = timed(n, || xxhash_rust::xxh64::xxh64(black_box(&data), 0));
        let copy = timed(n, || {
            dst.copy_from_slice(black_box(&data));
            u64::from(black_box(&dst)[7])
        });
        println!(
            "{bs:>7} B: crc32c {:>6.0} MB/s, xxh3 {:>6.0} MB/s, xxh64 {:>6.0} MB/s, copy {:>6.0} MB/s",
            mb_s(mib, crc),
            mb_s(mib, xxh3),
            mb_s(mib, xxh64),
            mb_s(mib, copy)
        );
    }
}
