//! `starblk bench --rate`: the latency of a paced request is from its
//! submission to its completion, not until the bench loop, sleeping to
//! pace the next request, gets around to it. Paced runs measure the
//! foreground latency in `scripts/bench-recovery`.

mod common;

use std::process::Command;

use common::*;

#[test]
fn paced_latency_excludes_the_pacing_sleep() {
    let c = Cluster::new(1, 1, "64MiB", "");
    // 50 requests/s at QD 16: were the pacing sleep counted, every request
    // would seem to take about 16 / 50 s = 320 ms (Little's law).
    let out = Command::new(BIN)
        .args(["bench", "--pattern", "randwrite", "--bs", "4k", "--qd", "16", "--rate", "50", "--seconds", "3"])
        .args(["--span", "16MiB", "--json", "--config"])
        .arg(&c.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p50 = r["latency"]["p50_us"].as_f64().unwrap();
    println!("paced 50/s at QD 16: p50 {p50} us, {} ops", r["ops"]);
    assert!(p50 < 160_000.0, "p50 {p50} us: the pacing sleep was counted as latency");
}
