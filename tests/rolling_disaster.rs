//! The rolling disaster (SMFS Fig. 6): a local replica plus a far replica
//! behind a WAN emulator (50 ms one way), Q = 1, steady writes. At time T
//! the link's loss goes to p for 0.5 s; then the link is cut and the HE is
//! killed with kill -9 in the same instant. Every acknowledgement is
//! recorded outside the HE (its stdout, streamed to this test). Once the
//! far replica has drained what it received, we count acknowledged writes
//! it does not hold.
//!
//! Network-sync (layered XOR 8,3 and RS 8,3) must lose nothing; local-sync
//! over TCP and local-sync + FEC are printed for contrast. Fixed seed.
//! `scripts/disaster [--json]` prints the table.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use starblk_replica::client;
use starblk_wanem::{LinkParams, TcpRelayConfig, UdpRelayConfig};

const SEED: u64 = 20261122;
const RATE_IOPS: &str = "400";
const DELAY_MS: f64 = 50.0;
/// Link capacity. The writer offers 400 x 4 KiB/s (13 Mbit/s), more than
/// the link carries, so a sender-side backlog builds: what a mode does
/// with acknowledged writes still in that backlog is what the test shows.
const RATE_MBIT: u64 = 8;

#[derive(Clone, Copy, Debug)]
enum Mode {
    NetSync(&'static str),
    LocalTcp,
    LocalFec,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NetSync(_) => "network-sync",
            Mode::LocalTcp => "local-sync",
            Mode::LocalFec => "local-sync+fec",
        }
    }
    fn fec(self) -> &'static str {
        match self {
            Mode::NetSync(s) => s,
            Mode::LocalTcp => "none",
            Mode::LocalFec => "layered-xor",
        }
    }
}

struct Outcome {
    acked: usize,
    lost: usize,
}

fn run(mode: Mode, loss: f64) -> Outcome {
    let root = tempfile::Builder::new().prefix("starblk-disaster").tempdir_in(tmp_base()).unwrap();
    let mut local = Replica::init(root.path(), "local", "256MiB");
    let mut far = Replica::init(root.path(), "far", "256MiB");
    local.start();
    far.start();
    let relay_port = dual_port();
    let listen: SocketAddr = format!("127.0.0.1:{relay_port}").parse().unwrap();
    let upstream: SocketAddr = far.addr.parse().unwrap();
    let rate = RATE_MBIT * 1_000_000;
    let params = LinkParams { delay_ms: DELAY_MS, rate_bits_per_s: rate, ..LinkParams::default() };
    let udp = UdpRelayConfig::new(listen, upstream).symmetric(params).seed(SEED).start().unwrap();
    // A shallow relay queue: bytes the link has not taken stay at the sender.
    let mut tcp = TcpRelayConfig::new(listen, upstream).delay_ms(DELAY_MS);
    tcp.params.rate_bits_per_s = rate;
    tcp.queue_bytes = 64 << 10;
    let tcp = tcp.start().unwrap();
    // The HE paces its network-sync link a little under the link's
    // capacity (the relay also counts UDP/IP headers), so the emulated link
    // never overflows its queue: loss is the injected loss only.
    let pace_mbit = RATE_MBIT as f64 * 0.85;
    let far_cfg = match mode {
        Mode::LocalTcp => String::new(),
        m => format!(
            "network_sync = true\nfec = {{ scheme = \"{}\", r = 8, c = 3 }}\nrate = \"{pace_mbit}Mbit\"\n{}",
            m.fec(),
            if matches!(m, Mode::LocalFec) { "ack = \"local\"\n" } else { "" }
        ),
    };
    let config = root.path().join("vol.toml");
    let toml = format!(
        "[volume]\nname = \"dis\"\nsize = \"256MiB\"\nquorum = 1\nwrite_queue = \"64MiB\"\n\n\
         [[replica]]\nname = \"local\"\naddr = \"{}\"\nrole = \"local\"\n\n\
         [[replica]]\nname = \"far\"\naddr = \"{listen}\"\nrole = \"far\"\n{far_cfg}",
        local.addr
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));

    let mut he = Command::new(BIN);
    he.args(["bench", "--pattern", "write", "--bs", "4k", "--qd", "4", "--seconds", "60", "--span", "200MiB"]);
    he.args(["--rate", RATE_IOPS, "--ack-log", "--config"]).arg(&config);
    let mut he = he.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let acks = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let stdout = he.stdout.take().unwrap();
    let a2 = acks.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut it = line.split_whitespace();
            if it.next() == Some("ack") {
                let off: u64 = it.next().unwrap().parse().unwrap();
                let id: u64 = it.next().unwrap().parse().unwrap();
                a2.lock().unwrap().push((off, id));
            }
        }
    });
    wait_until(Duration::from_secs(30), "acks flowing", || acks.lock().unwrap().len() >= 400);
    std::thread::sleep(Duration::from_millis(1000));
    udp.set_loss_both(loss).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The disaster: the link is cut and the HE dies in the same instant.
    udp.cut_both();
    tcp.cut_both();
    he.kill().unwrap();
    he.wait().unwrap();
    reader.join().unwrap();
    drain(&far.addr);
    far.kill();
    local.kill();
    let acks = acks.lock().unwrap().clone();
    let data = std::fs::File::open(far.dir.join("data")).unwrap();
    let mut blk = vec![0u8; 4096];
    let lost = acks
        .iter()
        .filter(|(off, id)| {
            data.read_exact_at(&mut blk, *off).unwrap();
            !starblk::bench::check_stamp(&blk, *off, *id)
        })
        .count();
    Outcome { acked: acks.len(), lost }
}

/// Waits until the far replica's durable seq has not moved for 1.5 s.
fn drain(addr: &str) {
    let mut last = u64::MAX;
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let d =
            client::stats(addr, Duration::from_secs(2)).map(|v| v["durable_seq"].as_u64().unwrap_or(0)).unwrap_or(0);
        if d != last {
            last = d;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(1500) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rolling_disaster_network_sync_loses_nothing() {
    let modes = [Mode::NetSync("layered-xor"), Mode::NetSync("reed-solomon"), Mode::LocalTcp, Mode::LocalFec];
    let losses = [0.001, 0.005, 0.01];
    println!(
        "rolling disaster: 50 ms one way, {RATE_MBIT} Mbit/s, Q=1, {RATE_IOPS} x 4 KiB writes/s offered, seed {SEED}"
    );
    println!("{:<16} {:<13} {:>6} {:>7} {:>6}", "mode", "fec", "loss", "acked", "lost");
    let mut failures = Vec::new();
    for mode in modes {
        for loss in losses {
            let o = run(mode, loss);
            println!("{:<16} {:<13} {:>5.1}% {:>7} {:>6}", mode.name(), mode.fec(), loss * 100.0, o.acked, o.lost);
            println!(
                "DISASTER_JSON {{\"mode\":\"{}\",\"fec\":\"{}\",\"loss\":{},\"acked\":{},\"lost\":{}}}",
                mode.name(),
                mode.fec(),
                loss,
                o.acked,
                o.lost
            );
            if matches!(mode, Mode::NetSync(_)) && (o.lost > 0 || o.acked == 0) {
                failures.push(format!(
                    "{} {} at {loss}: {} of {} acked writes lost",
                    mode.name(),
                    mode.fec(),
                    o.lost,
                    o.acked
                ));
            }
        }
    }
    assert!(failures.is_empty(), "network-sync lost acknowledged writes: {failures:?}");
}
