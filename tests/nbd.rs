//! The NBD frontend (`starblk up --frontend nbd`) against clients nobody
//! here wrote: `nbdinfo` and `nbdcopy` (libnbd), `qemu-io` and `qemu-img`
//! (qemu), and a raw socket speaking the protocol by hand for the bad
//! requests no well-behaved client sends. Every test runs a 3-replica,
//! Q=2 cluster and ends by checking that the replicas are byte-identical.
//!
//! A missing tool fails the test when `CI=true` and prints `SKIP` (on the
//! real stderr, past the test harness's capture) otherwise.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, BIN};
use rand::{RngCore, SeedableRng};

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// Whether every tool in `tools` runs. A missing one fails the test in CI
/// and prints SKIP otherwise.
fn have(test: &str, tools: &[&str]) -> bool {
    for t in tools {
        if Command::new(t).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
            continue;
        }
        let msg = format!("{test}: `{t}` is not installed (scripts/setup-deps installs qemu-utils and libnbd-bin)");
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg}; CI=true, so this fails instead of skipping");
        }
        let _ = writeln!(std::io::stderr(), "SKIP: {msg}");
        return false;
    }
    true
}

fn cluster() -> Cluster {
    Cluster::new(3, 2, "64M", "")
}

/// `starblk up --frontend nbd` run as a daemon (no `--foreground`); `down`
/// on drop if the test did not bring it down itself.
struct Daemon {
    config: PathBuf,
    uri: String,
    running: bool,
}

impl Daemon {
    fn up(c: &Cluster, extra: &[&str]) -> Daemon {
        let out = Command::new(BIN)
            .args(["up", "--frontend", "nbd", "--config"])
            .arg(&c.config)
            .args(extra)
            .output()
            .unwrap();
        let log = std::fs::read_to_string(c.root.path().join("it.log")).unwrap_or_default();
        assert!(out.status.success(), "up failed: {}\nlog:\n{log}", String::from_utf8_lossy(&out.stderr));
        let uri = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Daemon { config: c.config.clone(), uri, running: true }
    }

    fn down(&mut self) {
        self.running = false;
        let out = Command::new(BIN).args(["down", "--config"]).arg(&self.config).output().unwrap();
        assert!(out.status.success(), "down failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new(BIN).args(["down", "--config"]).arg(&self.config).output();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

fn unix_socket(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("nbd+unix:///?socket=").unwrap_or_else(|| panic!("not a unix NBD URI: {uri}")))
}

#[test]
fn nbdinfo_shows_size_and_block_size_constraints() {
    if !have("nbdinfo_shows_size_and_block_size_constraints", &["nbdinfo"]) {
        return;
    }
    let mut c = cluster();
    let mut d = Daemon::up(&c, &[]);
    let sock = c.root.path().join("it.nbd.sock");
    assert_eq!(d.uri, format!("nbd+unix:///?socket={}", sock.display()), "default socket next to the control socket");
    let out = run(Command::new("nbdinfo").args(["--json", &d.uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE, "{v}");
    assert_eq!(e["block_size_minimum"], 4096, "{v}");
    assert_eq!(e["block_size_preferred"], 4096, "{v}");
    assert_eq!(e["block_size_maximum"], 1 << 20, "{v}");
    for (k, want) in
        [("can_flush", true), ("can_fua", true), ("can_trim", true), ("can_zero", true), ("can_multi_conn", true)]
    {
        assert_eq!(e[k], want, "{k}: {v}");
    }
    assert_eq!(e["is_read_only"], false);
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &d.uri]));
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "it", "NBD_OPT_LIST names the volume: {v}");
    d.down();
    assert!(!sock.exists(), "down removes the NBD socket");
    c.kill_all_and_assert_identical("nbdinfo");
}

/// Distinct 4k-aligned places, with and without FUA, as qemu-io commands.
fn patterns() -> Vec<(u64, u64, u8, bool)> {
    vec![
        (0, MIB, 0xab, false),
        (MIB, 64 << 10, 0xcd, true),
        (7 * MIB + 4096, 12 << 10, 0x5e, false),
        (20 * MIB, MIB, 0x77, true),
        (SIZE - MIB, MIB, 0xe1, false),
    ]
}

#[test]
fn qemu_io_patterns_read_back_and_replicas_match() {
    if !have("qemu_io_patterns_read_back_and_replicas_match", &["qemu-io"]) {
        return;
    }
    let mut c = cluster();
    let mut d = Daemon::up(&c, &[]);
    let fua = |f: bool| if f { "-f " } else { "" };
    let writes: Vec<String> =
        patterns().iter().map(|&(o, l, p, f)| format!("write {}-P {p:#x} {o} {l}", fua(f))).collect();
    qemu_io(&d.uri, &writes);
    // Several requests in flight on one connection, then a flush.
    let mut aio: Vec<String> =
        (0..8).map(|i| format!("aio_write -P {:#x} {} 256k", 0x30 + i, 30 * MIB + i * MIB)).collect();
    aio.push("aio_flush".into());
    aio.push("write -z 40M 2M".into());
    aio.push("discard 44M 4M".into());
    aio.push("flush".into());
    qemu_io(&d.uri, &aio);
    // A fresh connection reads everything back.
    let mut reads: Vec<String> = patterns().iter().map(|&(o, l, p, _)| format!("read -P {p:#x} {o} {l}")).collect();
    reads.extend((0..8).map(|i| format!("read -P {:#x} {} 256k", 0x30 + i, 30 * MIB + i * MIB)));
    reads.push("read -P 0 40M 2M".into());
    reads.push("read -P 0 50M 1M".into());
    qemu_io(&d.uri, &reads);
    d.down();
    c.kill_all_and_assert_identical("qemu-io");
}

#[test]
fn qemu_img_convert_compare_and_nbdcopy_back() {
    if !have("qemu_img_convert_compare_and_nbdcopy_back", &["qemu-img", "nbdcopy"]) {
        return;
    }
    let mut c = cluster();
    let mut d = Daemon::up(&c, &[]);
    let mut image = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut image);
    let src = c.root.path().join("src.img");
    std::fs::write(&src, &image).unwrap();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&d.uri));
    // The volume is larger; compare accepts that when the rest reads as zeroes.
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&d.uri));
    let out = c.root.path().join("out.img");
    // Four connections at once (the export offers multi-conn).
    run(Command::new("nbdcopy").args(["--connections=4", &d.uri]).arg(&out));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len() as u64, SIZE);
    assert!(back[..image.len()] == image[..], "nbdcopy read back different data");
    assert!(back[image.len()..].iter().all(|&b| b == 0), "the rest of the volume is not zero");
    d.down();
    c.kill_all_and_assert_identical("qemu-img convert");
}

/// An NBD client written from the spec, byte by byte, independent of the
/// server's codec: for requests no real client sends.
struct Raw {
    s: UnixStream,
}

const IHAVEOPT: &[u8] = b"IHAVEOPT";
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const WRITE_ZEROES: u16 = 6;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

impl Raw {
    /// Connects and sends client flags (fixed newstyle + no zeroes).
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Raw { s };
        let g = r.read(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(g[17] & 3, 3, "fixed newstyle and no zeroes offered");
        r.send(&3u32.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(&h[..8], &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9], "option reply magic");
        let len = Raw::u32_at(&h, 16) as usize;
        (Raw::u32_at(&h, 8), Raw::u32_at(&h, 12), self.read(len))
    }

    /// NBD_OPT_GO for the default export asking for block sizes; returns
    /// (size, [min, preferred, max]).
    fn go(&mut self) -> (u64, [u32; 3]) {
        self.option(OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3]);
        let (mut size, mut sizes) = (None, None);
        loop {
            let (opt, kind, d) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match (kind, d.get(..2)) {
                (REP_INFO, Some([0, 0])) => size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap())),
                (REP_INFO, Some([0, 3])) => sizes = Some([2, 6, 10].map(|at| Raw::u32_at(&d, at))),
                (REP_INFO, _) => {}
                (REP_ACK, _) => break,
                other => panic!("unexpected reply to GO: {other:?}"),
            }
        }
        (size.expect("NBD_INFO_EXPORT"), sizes.expect("NBD_INFO_BLOCK_SIZE"))
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// One simple reply: (cookie, error); `data_len(cookie)` says how many
    /// data bytes a successful reply to that cookie carries.
    fn reply(&mut self, data_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let h = self.read(16);
        assert_eq!(Raw::u32_at(&h, 0), 0x6744_6698, "simple reply magic");
        let (error, cookie) = (Raw::u32_at(&h, 4), u64::from_be_bytes(h[8..16].try_into().unwrap()));
        let data = if error == 0 { self.read(data_len(cookie)) } else { Vec::new() };
        (cookie, error, data)
    }

    /// Whether the server closed the connection (reads end of stream).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// Every bad request gets its error reply, in a pipeline with good ones,
/// and neither the connection nor the server stops; a bad handshake or a
/// request stream out of sync closes that connection only.
#[test]
fn bad_requests_get_error_replies_and_the_server_goes_on() {
    let mut c = cluster();
    let mut d = Daemon::up(&c, &[]);
    let sock = unix_socket(&d.uri);
    let mut a = Raw::connect(&sock);
    a.option(42, b"xyz");
    assert_eq!(a.option_reply().1, REP_ERR_UNSUP, "unknown option");
    a.option(OPT_INFO, &[0, 0, 0, 100, 0, 0]);
    assert_eq!(a.option_reply().1, REP_ERR_INVALID, "name longer than the option");
    assert_eq!(a.go(), (SIZE, [4096, 4096, 1 << 20]));

    let pattern = vec![0x5au8; 8192];
    // (kind, flags, offset, len, payload, expected error)
    let cases: Vec<(u16, u16, u64, u32, Vec<u8>, u32)> = vec![
        (READ, 0, SIZE, 4096, vec![], EINVAL),
        (READ, 0, SIZE - 4096, 8192, vec![], EINVAL),
        (READ, 0, 512, 4096, vec![], EINVAL),
        (READ, 0, 0, 1000, vec![], EINVAL),
        (READ, 0, 0, (32 << 20) + 4096, vec![], EINVAL),
        (READ, 0, u64::MAX - 4095, 8192, vec![], EINVAL),
        (READ, 1 << 7, 0, 4096, vec![], EINVAL),
        (WRITE, 0, SIZE, 4096, vec![1; 4096], ENOSPC),
        (WRITE, 0, 4096, 1000, vec![2; 1000], EINVAL),
        (WRITE, 0, 0, 1000 + (2 << 20), vec![3; 1000 + (2 << 20)], EINVAL),
        (WRITE, 1, 8192, 8192, pattern.clone(), 0),
        (TRIM, 0, SIZE - 4096, 8192, vec![], EINVAL),
        (WRITE_ZEROES, 0, SIZE, 4096, vec![], ENOSPC),
        (WRITE_ZEROES, 1 << 4, 0, 4096, vec![], EINVAL),
        (FLUSH, 0, 0, 4096, vec![], EINVAL),
        (9, 0, 0, 4096, vec![], EINVAL),
        (5, 0, 0, 4096, vec![], EINVAL),
        (FLUSH, 0, 0, 0, vec![], 0),
    ];
    // All in flight at once; replies may come in any order.
    for (i, (kind, flags, offset, len, payload, _)) in cases.iter().enumerate() {
        a.request(*kind, *flags, 100 + i as u64, *offset, *len, payload);
    }
    let mut seen = vec![false; cases.len()];
    for _ in 0..cases.len() {
        let (cookie, error, _) = a.reply(|_| 0);
        let i = (cookie - 100) as usize;
        assert!(!seen[i], "two replies for cookie {cookie}");
        seen[i] = true;
        let (kind, flags, offset, len, _, want) = &cases[i];
        assert_eq!(error, *want, "case {i}: kind {kind} flags {flags:#x} offset {offset} len {len}");
    }
    // The same connection goes on: the good write reads back.
    a.request(READ, 0, 7, 8192, 8192, &[]);
    let (cookie, error, data) = a.reply(|_| 8192);
    assert_eq!((cookie, error), (7, 0));
    assert!(data == pattern, "read back what the pipelined write wrote");

    // A second connection sees it too (multi-conn), while the first is open.
    let mut b = Raw::connect(&sock);
    b.go();
    b.request(READ, 0, 1, 8192, 4096, &[]);
    assert_eq!(b.reply(|_| 4096).2, pattern[..4096]);

    // A request stream out of sync closes that connection only.
    a.send(&[0xde, 0xad, 0xbe, 0xef]);
    a.send(&[0u8; 24]);
    assert!(a.closed(), "bad request magic closes the connection");
    b.request(DISC, 0, 2, 0, 0, &[]);
    assert!(b.closed(), "NBD_CMD_DISC closes the connection");

    // Bad handshakes close their connection only.
    let mut e = Raw::connect(&sock);
    e.option(1, b"no-such-export");
    assert!(e.closed(), "unknown NBD_OPT_EXPORT_NAME closes");
    let mut f = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    f.read_exact(&mut g).unwrap();
    f.write_all(&[0xff; 4]).unwrap();
    assert!(Raw { s: f }.closed(), "unknown client flags close");
    let mut h = Raw::connect(&sock);
    h.send(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff");
    assert!(h.closed(), "an option announcing 4 GiB of data closes");

    // And the server still serves.
    let mut z = Raw::connect(&sock);
    z.go();
    z.request(READ, 0, 3, 8192, 8192, &[]);
    assert!(z.reply(|_| 8192).2 == pattern);
    drop(z);
    d.down();
    c.kill_all_and_assert_identical("bad requests");
}

/// Reads and writes above the advertised 1 MiB maximum, as the Linux
/// kernel's NBD client sends them (it ignores the maximum and sends up to
/// `max_sectors_kb`, 1280 KiB by default): served whole, several in
/// flight, and they read back; beyond 32 MiB they are refused.
#[test]
fn requests_above_the_advertised_maximum_are_served() {
    let mut c = cluster();
    let mut d = Daemon::up(&c, &[]);
    let mut a = Raw::connect(&unix_socket(&d.uri));
    assert_eq!(a.go(), (SIZE, [4096, 4096, 1 << 20]));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // (offset, len): 1280 KiB (the kernel's default), 2.5 MiB (an uneven
    // last piece) and 32 MiB (the most served), the last with FUA.
    let writes = [(4096u64, 1280u32 << 10), (8 * MIB, 5 << 19), (SIZE - (32 << 20), 32 << 20)];
    let data: Vec<Vec<u8>> = writes
        .iter()
        .map(|&(_, len)| {
            let mut b = vec![0u8; len as usize];
            rng.fill_bytes(&mut b);
            b
        })
        .collect();
    for (i, (&(offset, len), d)) in writes.iter().zip(&data).enumerate() {
        a.request(WRITE, u16::from(i == 2), 10 + i as u64, offset, len, d);
    }
    let mut done = [false; 3];
    for _ in 0..3 {
        let (cookie, error, _) = a.reply(|_| 0);
        assert_eq!(error, 0, "write cookie {cookie}");
        done[(cookie - 10) as usize] = true;
    }
    assert_eq!(done, [true; 3]);
    for (i, &(offset, len)) in writes.iter().enumerate() {
        a.request(READ, 0, 20 + i as u64, offset, len, &[]);
    }
    for _ in 0..3 {
        let (cookie, error, got) = a.reply(|c| writes[(c - 20) as usize].1 as usize);
        let i = (cookie - 20) as usize;
        assert_eq!(error, 0, "read {i}");
        assert!(got == data[i], "read {i} ({} bytes at {}) returned other data", writes[i].1, writes[i].0);
    }
    a.request(READ, 0, 30, 0, (32 << 20) + 4096, &[]);
    assert_eq!(a.reply(|_| 0).1, EINVAL, "a read above 32 MiB");
    drop(a);
    d.down();
    c.kill_all_and_assert_identical("requests above the maximum");
}

/// Kills the foreground daemon if the test fails before `down`.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the child's first stdout line, waiting up to 60 s.
fn first_line(child: &mut Child) -> String {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("up --foreground printed nothing within 60 s")
}

#[test]
fn foreground_up_over_tcp_prints_the_uri_and_down_stops_it() {
    if !have("foreground_up_over_tcp_prints_the_uri_and_down_stops_it", &["qemu-io"]) {
        return;
    }
    let mut c = cluster();
    let log = std::fs::File::create(c.root.path().join("fg.log")).unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["up", "--foreground", "--frontend", "nbd", "--nbd-listen", "127.0.0.1:0", "--config"])
            .arg(&c.config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let uri = first_line(child).trim().to_string();
    let addr = uri.strip_prefix("nbd://").unwrap_or_else(|| panic!("not a TCP NBD URI: {uri:?}")).to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    qemu_io(&uri, &["write -f -P 0x42 4M 1M".into(), "read -P 0x42 4M 1M".into()]);
    let out = Command::new(BIN).args(["down", "--config"]).arg(&c.config).output().unwrap();
    assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "up --foreground still running 60 s after down");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "up exited with {status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "NBD port still open after down");
    c.kill_all_and_assert_identical("foreground tcp");
}
