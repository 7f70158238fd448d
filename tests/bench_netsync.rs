//! Network-sync benchmarks (not tests: `#[ignore]`d, run by
//! `scripts/bench-netsync`). Prints two tables:
//! - latency independence: p50 write latency of network-sync (Q=1, far over
//!   UDP+FEC) and of remote-sync (Q=2, far over TCP) for far one-way delays
//!   of 0, 25, 50 and 100 ms;
//! - goodput under loss: MB/s of network-sync over a rate-limited 50 ms
//!   link at 0, 0.1, 0.5 and 1 % loss, paced to the link's rate
//!   (`rate = "40Mbit"`) and to its measured delivery rate (`rate =
//!   "auto"`), against 0.9 x r/(r+c) x rate;
//! - latency under load at QD16, fixed and automatic pacing.
//!
//! Network-sync links say which `rate` they use; the latency table runs
//! with `rate = "auto"`, the default.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use starblk_wanem::{LinkParams, TcpRelayConfig, UdpRelayConfig};

const SECONDS: &str = "4";
const XOR: &str = "layered-xor";
const RS: &str = "reed-solomon";
/// `rate = "auto"`: pace to the measured delivery rate.
const AUTO: &str = "auto";

struct Setup {
    delay_ms: f64,
    rate_bits_per_s: u64,
    loss: f64,
    netsync: bool,
    quorum: usize,
    /// FEC scheme of the network-sync link.
    fec: &'static str,
}

/// Runs one `starblk bench` through a far replica behind the emulator,
/// the network-sync link paced with `rate = "{pace}"`; returns its JSON
/// report.
fn run(s: &Setup, bench_args: &[&str], pace: &str) -> serde_json::Value {
    let pace = format!("rate = \"{pace}\"\n");
    let root = tempfile::Builder::new().prefix("starblk-nsbench").tempdir_in(tmp_base()).unwrap();
    let mut local = Replica::init(root.path(), "local", "512MiB");
    let mut far = Replica::init(root.path(), "far", "512MiB");
    local.start();
    far.start();
    let listen: SocketAddr = format!("127.0.0.1:{}", dual_port()).parse().unwrap();
    let upstream: SocketAddr = far.addr.parse().unwrap();
    let params = LinkParams {
        delay_ms: s.delay_ms,
        rate_bits_per_s: s.rate_bits_per_s,
        loss_prob: s.loss,
        ..LinkParams::default()
    };
    let _udp = UdpRelayConfig::new(listen, upstream).symmetric(params).seed(7).start().unwrap();
    let mut tcp = TcpRelayConfig::new(listen, upstream).delay_ms(s.delay_ms);
    tcp.params.rate_bits_per_s = s.rate_bits_per_s;
    let _tcp = tcp.start().unwrap();
    let far_cfg = if s.netsync {
        format!("network_sync = true\nfec = {{ scheme = \"{}\", r = 8, c = 3 }}\n{pace}", s.fec)
    } else {
        String::new()
    };
    let config = root.path().join("vol.toml");
    let toml = format!(
        "[volume]\nname = \"nsb\"\nsize = \"512MiB\"\nquorum = {}\nwrite_queue = \"128MiB\"\n\n\
         [[replica]]\nname = \"local\"\naddr = \"{}\"\nrole = \"local\"\n\n\
         [[replica]]\nname = \"far\"\naddr = \"{listen}\"\nrole = \"far\"\n{far_cfg}",
        s.quorum, local.addr
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = Command::new(BIN);
    cmd.args(["bench", "--config"]).arg(&config).args(bench_args).args(["--seconds", SECONDS, "--json"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "bench: {}", String::from_utf8_lossy(&out.stderr));
    local.kill();
    far.kill();
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

#[test]
#[ignore = "benchmark: run by scripts/bench-netsync"]
fn latency_independence() {
    println!("latency: 4 KiB random writes, QD1, far one-way delay d (RTT 2d), network-sync rate = \"auto\"");
    println!("{:>8} {:>20} {:>20}", "delay", "network-sync p50 us", "remote-sync p50 us");
    let mut base = 0.0;
    for d in [0.0, 25.0, 50.0, 100.0] {
        let args = ["--pattern", "randwrite", "--bs", "4k", "--qd", "1"];
        let ns =
            run(&Setup { delay_ms: d, rate_bits_per_s: 0, loss: 0.0, netsync: true, quorum: 1, fec: XOR }, &args, AUTO);
        let rs = run(
            &Setup { delay_ms: d, rate_bits_per_s: 0, loss: 0.0, netsync: false, quorum: 2, fec: XOR },
            &args,
            AUTO,
        );
        let (n, r) = (ns["latency"]["p50_us"].as_f64().unwrap(), rs["latency"]["p50_us"].as_f64().unwrap());
        if d == 0.0 {
            base = n;
        }
        println!("{:>6} ms {:>20.0} {:>20.0}   network-sync / 0 ms = {:.2}", d, n, r, n / base);
        println!(
            "NETSYNC_JSON {{\"table\":\"latency\",\"delay_ms\":{d},\"netsync_p50_us\":{n},\"remote_sync_p50_us\":{r}}}"
        );
    }
}

#[test]
#[ignore = "benchmark: run by scripts/bench-netsync"]
fn goodput_under_loss() {
    let rate_mbit = 40.0;
    let fixed = format!("{rate_mbit}Mbit");
    let bound = 0.9 * 8.0 / 11.0 * rate_mbit / 8.0;
    println!("goodput: 64 KiB sequential writes, QD16, {rate_mbit} Mbit/s link, 50 ms one way, layered XOR (8,3)");
    println!("target: >= 0.9 x r/(r+c) x rate = {bound:.2} MB/s");
    println!("{:>6} {:>20} {:>20} {:>10}", "loss", "rate = \"40Mbit\" MB/s", "rate = \"auto\" MB/s", "auto met");
    for loss in [0.0, 0.001, 0.005, 0.01] {
        let s = Setup {
            delay_ms: 50.0,
            rate_bits_per_s: (rate_mbit * 1e6) as u64,
            loss,
            netsync: true,
            quorum: 1,
            fec: XOR,
        };
        let args = ["--pattern", "write", "--bs", "64k", "--qd", "16"];
        let f = run(&s, &args, &fixed)["mb_s"].as_f64().unwrap();
        let a = run(&s, &args, AUTO)["mb_s"].as_f64().unwrap();
        println!("{:>5.1}% {:>20.2} {:>20.2} {:>10}", loss * 100.0, f, a, if a >= bound { "yes" } else { "NO" });
        println!(
            "NETSYNC_JSON {{\"table\":\"goodput\",\"loss\":{loss},\"fixed_mb_s\":{f},\"auto_mb_s\":{a},\"target_mb_s\":{bound}}}"
        );
    }
    let s = Setup {
        delay_ms: 50.0,
        rate_bits_per_s: (rate_mbit * 1e6) as u64,
        loss: 0.0,
        netsync: false,
        quorum: 2,
        fec: XOR,
    };
    let v = run(&s, &["--pattern", "write", "--bs", "64k", "--qd", "16"], AUTO);
    println!("TCP remote-sync through the same emulator at 0% loss: {:.2} MB/s (this relay cannot drop TCP segments: TCP under loss is the VM part of scripts/bench-netsync)", v["mb_s"].as_f64().unwrap());
}

#[test]
#[ignore = "benchmark: run by scripts/bench-netsync"]
fn latency_under_load() {
    let rate_mbit = 40.0;
    let fixed = format!("{rate_mbit}Mbit");
    println!("latency under load: 4 KiB random writes, QD16, {rate_mbit} Mbit/s link, 50 ms one way, (8,3)");
    println!("{:>14} {:>8} {:>10} {:>10} {:>10}", "fec", "rate", "IOPS", "p50 us", "p99 us");
    for (fec, pace) in [(XOR, fixed.as_str()), (RS, fixed.as_str()), (XOR, AUTO)] {
        let s = Setup {
            delay_ms: 50.0,
            rate_bits_per_s: (rate_mbit * 1e6) as u64,
            loss: 0.0,
            netsync: true,
            quorum: 1,
            fec,
        };
        let v = run(&s, &["--pattern", "randwrite", "--bs", "4k", "--qd", "16"], pace);
        let (iops, p50, p99) = (
            v["iops"].as_f64().unwrap(),
            v["latency"]["p50_us"].as_f64().unwrap(),
            v["latency"]["p99_us"].as_f64().unwrap(),
        );
        println!("{fec:>14} {pace:>8} {iops:>10.0} {p50:>10.0} {p99:>10.0}");
        println!(
            "NETSYNC_JSON {{\"table\":\"load\",\"fec\":\"{fec}\",\"rate\":\"{pace}\",\"iops\":{iops},\"p50_us\":{p50},\"p99_us\":{p99}}}"
        );
    }
}
