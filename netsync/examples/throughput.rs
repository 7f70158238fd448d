//! Loopback throughput and on-the-wire latency of one link.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/tgt-netsync cargo run --release -p starblk-netsync --example throughput -- \
//!     [msg_bytes=65536] [total_mib=256] [xor|rs|none]
//! ```
//!
//! Prints MB/s for a streaming transfer (send as fast as the window
//! allows), then the send -> OnWire and send -> Acked latency of 200
//! one-at-a-time 4 KiB writes (the idle-flush path).

use std::sync::Arc;
use std::time::{Duration, Instant};

use starblk_netsync::{FecScheme, Link, LinkConfig, Listener};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let msg_bytes: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64 << 10);
    let total_mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let fec = match args.get(3).map(String::as_str) {
        Some("rs") => Some(FecScheme::reed_solomon(8, 3).unwrap()),
        Some("none") => None,
        _ => Some(FecScheme::layered_xor(8, 3).unwrap()),
    };
    let cfg = LinkConfig { fec: fec.clone(), ..LinkConfig::default() };
    let mut listener = Listener::bind("127.0.0.1:0".parse().unwrap(), LinkConfig::default()).unwrap();
    let he = Link::connect("127.0.0.1:0".parse().unwrap(), listener.local_addr(), cfg).unwrap();
    let replica = Arc::new(listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept"));
    he.wait_established(Duration::from_secs(5)).unwrap();
    println!("fec {fec:?}, wire mode {}", he.stats().wire_mode.as_str());

    let n = (total_mib << 20) / msg_bytes;
    let reader = {
        let replica = replica.clone();
        std::thread::spawn(move || {
            for _ in 0..n {
                replica.recv().unwrap();
            }
        })
    };
    let msg = vec![0x42u8; msg_bytes];
    let t0 = Instant::now();
    let mut last = 0;
    for _ in 0..n {
        last = he.send(&msg).unwrap();
    }
    he.wait_acked(last, Duration::from_secs(60)).unwrap();
    let dt = t0.elapsed();
    reader.join().unwrap();
    let s = he.stats();
    let r = replica.stats();
    println!(
        "receiver: loss seen {:.4}, rebuilt {}, nacked {}, duplicates {}, rto probes {}",
        r.rx.loss_rate, r.rx.recovered_packets, r.rx.nacked_seqs, r.rx.duplicate_packets, s.tx.rto_probes
    );
    println!(
        "stream: {n} x {msg_bytes} B in {dt:?}: {:.0} MB/s; data {} repair {} retx {}; wire p50 {} us",
        (n * msg_bytes) as f64 / 1e6 / dt.as_secs_f64(),
        s.tx.data_packets,
        s.tx.repair_packets,
        s.tx.retransmitted_packets,
        s.tx.wire_latency_p50_us
    );

    let small = vec![7u8; 4096];
    let (mut wire, mut ack) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = Instant::now();
        let id = he.send(&small).unwrap();
        he.wait_on_wire(id, Duration::from_secs(5)).unwrap();
        wire.push(t.elapsed());
        he.wait_acked(id, Duration::from_secs(5)).unwrap();
        ack.push(t.elapsed());
        replica.recv().unwrap();
    }
    wire.sort();
    ack.sort();
    println!(
        "4 KiB one at a time: send->OnWire p50 {:?} p99 {:?}; send->Acked p50 {:?} p99 {:?}",
        wire[100], wire[198], ack[100], ack[198]
    );
}
