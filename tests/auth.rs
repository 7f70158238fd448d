//! Authenticated (and encrypted) replica traffic with real replica
//! processes: wrong and missing keys, replayed, reordered, foreign and
//! bit-flipped frames are each refused every time and counted, while the
//! engine's verified I/O goes on; rekey under load loses no write, in
//! process and through `starblk rekey` on a running daemon (NBD writes by
//! qemu-io); key files with unsafe modes are refused with exit code 2.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;
use starblk::engine::blocking::BlockingVolume;
use starblk::engine::LinkState;
use starblk_replica::auth::{AuthFailure, Credentials, Key};
use starblk_replica::client;
use starblk_replica::proto::{self, FrameType};

const T: Duration = Duration::from_secs(5);
/// Attempts per kind of bad input: every one must be refused.
const ATTEMPTS: u64 = 10;

fn creds(hex: &str) -> Credentials {
    Credentials { key: Key::from_hex(hex).unwrap(), encrypt: false }
}

/// A replica's authentication failure counter.
fn auth_count(addr: &str, reason: AuthFailure) -> u64 {
    let st = client::stats_with(addr, T, Some(&creds(KEY_A))).unwrap();
    st["auth_failures"][reason.reason()].as_u64().unwrap()
}

/// Writes and reads back (verified) a few blocks; every replica stays up
/// to date on the same sessions it had.
fn verified_io(v: &BlockingVolume, round: u64) {
    let sessions: Vec<u64> = v.volume.status().replicas.iter().map(|r| r.sessions).collect();
    for i in 0..8u64 {
        let off = ((round * 8 + i) % 1024) * 4096;
        v.write(off, &block(off, round + 1, 4096)).unwrap();
        assert!(starblk::bench::check_stamp(&v.read(off, 4096).unwrap(), off, round + 1), "round {round}");
    }
    wait_until(T, "every replica up to date", || {
        v.volume.status().replicas.iter().all(|r| r.state == LinkState::UpToDate)
    });
    for (r, s) in v.volume.status().replicas.iter().zip(sessions) {
        assert_eq!(r.sessions, s, "{}: the engine's session was dropped ({})", r.name, r.reason);
    }
}

/// An authenticated raw session (no Hello) to inject frames on.
fn raw(addr: &str) -> client::Session {
    client::dial_session(addr, T, Some(&creds(KEY_A))).unwrap()
}

/// A Stats frame sealed for `s` (advancing its send seq), as bytes.
fn sealed_stats(s: &mut client::Session) -> Vec<u8> {
    let mut b = Vec::new();
    s.seal.write_frame(&mut b, FrameType::Stats, 0, &[]).unwrap();
    b
}

/// Sends raw bytes and expects the replica to refuse them and close.
fn expect_refused(s: &mut client::Session, bytes: &[u8], what: &str) {
    s.writer.write_all(bytes).unwrap();
    match s.reader.next_frame() {
        Ok((h, p)) if h.kind == FrameType::Error => {
            let e = proto::ErrorFrame::decode(p).unwrap();
            assert!(e.message.contains("authentication"), "{what}: {}", e.message);
            assert!(s.reader.next_frame().is_err(), "{what}: session not closed");
        }
        Ok((h, _)) => panic!("{what}: accepted, got {:?}", h.kind),
        Err(_) => {}
    }
}

#[test]
fn bad_keys_and_forged_frames_are_refused_counted_and_io_goes_on() {
    let c = Cluster::keyed(3, 2, "16MiB", "", "", &[KEY_A]);
    let v = c.engine();
    assert!(v.volume.wait_connected(T).is_empty());
    // (A session's counter rises just after its admission, which may
    // already have made it up to date.)
    wait_until(T, "every replica up to date on its first session", || {
        v.volume.status().replicas.iter().all(|r| r.state == LinkState::UpToDate && r.sessions == 1)
    });
    let st = v.volume.status();
    let key_a = Key::from_hex(KEY_A).unwrap().id().to_string();
    for r in &st.replicas {
        assert_eq!((r.auth.as_str(), r.auth_key.as_str()), ("mac", key_a.as_str()), "{}", r.name);
    }
    verified_io(&v, 0);
    let addr = c.replicas[0].addr.clone();
    let mut round = 1;

    // A wrong key: the replica does not know it.
    let before = auth_count(&addr, AuthFailure::UnknownKey);
    for _ in 0..ATTEMPTS {
        let e = client::probe_with(&addr, T, Some(&creds(KEY_C))).map(|_| ()).unwrap_err();
        assert_eq!(e.auth_failure(), Some(AuthFailure::Refused), "{e}");
        assert!(e.to_string().contains("not in this replica's key file"), "{e}");
    }
    assert_eq!(auth_count(&addr, AuthFailure::UnknownKey), before + ATTEMPTS);
    verified_io(&v, round);
    round += 1;

    // No key at all.
    let before = auth_count(&addr, AuthFailure::NoAuth);
    for _ in 0..ATTEMPTS {
        let e = client::probe(&addr, T).map(|_| ()).unwrap_err();
        assert_eq!(e.auth_failure(), Some(AuthFailure::Refused), "{e}");
        assert!(e.to_string().contains("requires authentication"), "{e}");
    }
    assert_eq!(auth_count(&addr, AuthFailure::NoAuth), before + ATTEMPTS);
    verified_io(&v, round);
    round += 1;

    // A replayed frame, a reordered one, another session's, and a
    // flipped bit in the MAC (with the crc fixed, so the MAC is what
    // catches it).
    type Forge = fn(&str) -> (client::Session, Vec<u8>);
    let forgeries: [(&str, Forge); 4] = [
        ("replayed", |addr| {
            let mut s = raw(addr);
            let f = sealed_stats(&mut s);
            s.writer.write_all(&f).unwrap();
            assert_eq!(s.reader.next_frame().unwrap().0.kind, FrameType::StatsReply);
            (s, f)
        }),
        ("reordered", |addr| {
            let mut s = raw(addr);
            let _first = sealed_stats(&mut s);
            let second = sealed_stats(&mut s);
            (s, second)
        }),
        ("another session's", |addr| {
            let mut a = raw(addr);
            let f = sealed_stats(&mut a);
            (raw(addr), f)
        }),
        ("MAC bit flipped", |addr| {
            let mut s = raw(addr);
            let mut f = sealed_stats(&mut s);
            let at = 16 + f.len() % 16;
            f[at] ^= 0x10;
            proto::recompute_check(&mut f);
            (s, f)
        }),
    ];
    for (what, forge) in forgeries {
        let before = auth_count(&addr, AuthFailure::BadMac);
        for _ in 0..ATTEMPTS {
            let (mut s, f) = forge(&addr);
            expect_refused(&mut s, &f, what);
        }
        assert_eq!(auth_count(&addr, AuthFailure::BadMac), before + ATTEMPTS, "{what}");
        verified_io(&v, round);
        round += 1;
    }
    let stats = client::stats_with(&addr, T, Some(&creds(KEY_A))).unwrap();
    println!("replica auth_failures: {}", stats["auth_failures"]);
    assert!(v.volume.shutdown(Duration::from_secs(10)));
}

#[test]
fn host_with_a_wrong_or_missing_key_is_refused_and_counts_it() {
    let mut c = Cluster::keyed(3, 2, "16MiB", "", "", &[KEY_A]);
    // The host's own config, with its own key file (or none).
    let text = std::fs::read_to_string(&c.config).unwrap();
    let unkeyed: String = text.lines().filter(|l| !l.starts_with("key_file")).map(|l| format!("{l}\n")).collect();
    let host_key = c.root.path().join("host.hex");
    let host_config = |key: Option<&str>| {
        let path = c.root.path().join("host.toml");
        let mut t = unkeyed.clone();
        if let Some(k) = key {
            write_key_file(&host_key, &[k]);
            t = t.replacen("[volume]\n", &format!("[volume]\nkey_file = \"{}\"\n", host_key.display()), 1);
        }
        std::fs::write(&path, t).unwrap();
        starblk::config::Config::load(&path).unwrap()
    };
    // The host holds another key: every replica refuses it.
    let e = starblk::engine::startup::fence(&host_config(Some(KEY_C))).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("authentication failed") && e.contains("not in this replica's key file"), "{e}");
    // The host has no key file: refused too.
    let e = starblk::engine::startup::fence(&host_config(None)).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("requires authentication"), "{e}");
    // A running host whose replica stops knowing its key (its key file
    // changed, and it restarted) counts the refusals in status.
    let v = c.engine();
    write_key_file(&c.root.path().join("key.hex"), &[KEY_B]);
    c.replicas[2].kill();
    c.replicas[2].start();
    wait_until(Duration::from_secs(10), "refusals counted for r2", || {
        let r = replica_status(&v, "r2");
        r.auth_failures.get("refused").copied().unwrap_or(0) >= 2 && r.state == LinkState::Failed
    });
    let text = v.volume.status().to_string();
    assert!(text.contains("auth_failures: refused"), "{text}");
    println!("{text}");
}

#[test]
fn rekey_under_load_loses_no_write() {
    let c = Cluster::keyed(3, 2, "16MiB", "", "", &[KEY_A, KEY_B]);
    let v = c.engine();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let v2 = v.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while stop_rx.try_recv().is_err() {
            let off = (i % 2048) * 4096;
            v2.write(off, &block(off, i + 1, 4096)).unwrap();
            acked.push((off, i + 1));
            i += 1;
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));
    let report = v.volume.rekey(Duration::from_secs(20)).unwrap();
    println!("{report:?}");
    assert_eq!(report.moved, ["r0", "r1", "r2"], "{report:?}");
    std::thread::sleep(Duration::from_millis(300));
    // The old key is dropped from every file: sessions go on with the new.
    write_key_file(&c.root.path().join("key.hex"), &[KEY_B]);
    std::thread::sleep(Duration::from_millis(300));
    stop_tx.send(()).unwrap();
    let acked = writer.join().unwrap();
    assert!(acked.len() > 100, "only {} writes during the rekey", acked.len());
    let key_b = Key::from_hex(KEY_B).unwrap().id().to_string();
    for r in v.volume.status().replicas {
        assert_eq!(r.auth_key, key_b, "{}", r.name);
        assert_eq!(r.state, LinkState::UpToDate, "{}: {}", r.name, r.reason);
    }
    // Every acknowledged write reads back (the last version per block).
    let mut last = std::collections::HashMap::new();
    for (off, ver) in &acked {
        last.insert(*off, *ver);
    }
    for (off, ver) in &last {
        assert!(starblk::bench::check_stamp(&v.read(*off, 4096).unwrap(), *off, *ver), "block {off} v{ver}");
    }
    // The old key no longer opens a session.
    let e = client::probe_with(&c.replicas[0].addr, T, Some(&creds(KEY_A))).map(|_| ()).unwrap_err();
    assert_eq!(e.auth_failure(), Some(AuthFailure::Refused), "{e}");
    // A second rekey with one key in the file says what to do.
    let e = v.volume.rekey(Duration::from_secs(1)).unwrap_err().to_string();
    assert!(e.contains("holds one key"), "{e}");
    println!("{} writes acknowledged during the rekey, all read back", acked.len());
    assert!(v.volume.shutdown(Duration::from_secs(10)));
}

#[test]
fn unsafe_key_files_are_refused_with_exit_code_2() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::Builder::new().prefix("starblk-keys").tempdir_in(tmp_base()).unwrap();
    let key = root.path().join("k.hex");
    write_key_file(&key, &[KEY_A]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut r = Replica::init(root.path(), "r0", "16MiB");
    let out = Command::new(BIN)
        .args(["replica", "serve", "--dir"])
        .arg(&r.dir)
        .args(["--listen", &r.addr, "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&key.display().to_string()) && err.contains("0600"), "{err}");
    // The host refuses the same file before contacting any replica.
    let config = root.path().join("vol.toml");
    std::fs::write(
        &config,
        format!(
            "[volume]\nname = \"k\"\nsize = \"16MiB\"\nquorum = 1\nkey_file = \"{}\"\n\n[[replica]]\nname = \"r0\"\n\
             addr = \"{}\"\nrole = \"local\"\n",
            key.display(),
            r.addr
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("key_file") && err.contains("0600"), "{err}");
    // A malformed line is named.
    std::fs::write(&key, format!("{KEY_A}\nnot-a-key\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2"), "{err}");
    // With a good file, it runs.
    write_key_file(&key, &[KEY_A]);
    r.key_file = Some(key.clone());
    r.start();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // encrypt without a key file is a config error naming the key.
    std::fs::write(
        &config,
        format!(
            "[volume]\nname = \"k\"\nsize = \"16MiB\"\nquorum = 1\n\n[[replica]]\nname = \"r0\"\naddr = \"{}\"\n\
             role = \"local\"\nencrypt = true\n",
            r.addr
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("encrypt") && err.contains("key_file"), "{err}");
}

/// Datagrams a relay forwarded: (towards the replica, bytes).
type Captured = std::sync::Arc<std::sync::Mutex<Vec<(bool, Vec<u8>)>>>;

/// A UDP relay between the host and a far replica that records every
/// datagram it forwards (both ways) and can inject datagrams towards the
/// host from the replica's side.
struct Relay {
    /// Every datagram forwarded: (towards the replica, bytes).
    captured: Captured,
    down: std::net::UdpSocket,
    host: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let down = std::net::UdpSocket::bind(listen).unwrap();
        let up = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&down, &up] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let captured = Arc::new(Mutex::new(Vec::new()));
        let host = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |from: std::net::UdpSocket, to: std::net::UdpSocket, towards_replica: bool| {
            let (captured, host, stop) = (captured.clone(), host.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Acquire) {
                    let Ok((n, src)) = from.recv_from(&mut buf) else { continue };
                    captured.lock().unwrap().push((towards_replica, buf[..n].to_vec()));
                    let dst = if towards_replica {
                        *host.lock().unwrap() = Some(src);
                        Some(upstream)
                    } else {
                        *host.lock().unwrap()
                    };
                    if let Some(dst) = dst {
                        let _ = to.send_to(&buf[..n], dst);
                    }
                }
            });
        };
        spawn(down.try_clone().unwrap(), up.try_clone().unwrap(), true);
        spawn(up, down.try_clone().unwrap(), false);
        Relay { captured, down, host, stop }
    }

    /// Whether any forwarded datagram contains `needle`.
    fn saw(&self, needle: &[u8]) -> bool {
        self.captured.lock().unwrap().iter().any(|(_, d)| d.windows(needle.len()).any(|w| w == needle))
    }

    /// The first captured datagram towards the host of this kind (1 data,
    /// 2 repair, 3 ack, 4 nack, 5 hello).
    fn captured_kind(&self, kind: u8) -> Option<Vec<u8>> {
        let c = self.captured.lock().unwrap();
        c.iter().find(|(to_replica, d)| !to_replica && d.len() > 48 && d[5] == kind).map(|(_, d)| d.clone())
    }

    /// Sends `bytes` to the host as if from the far replica.
    fn inject(&self, bytes: &[u8]) {
        let host = self.host.lock().unwrap().expect("the host has sent something");
        self.down.send_to(bytes, host).unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A local TCP replica and a far network-sync one behind a recording
/// relay, all keyed with KEY_A; `far_extra` goes into the far replica's
/// table (e.g. `encrypt = true`). Q = 2: every write reaches the far one.
fn far_cluster(
    far_extra: &str,
) -> (tempfile::TempDir, Vec<Replica>, Relay, starblk_wanem::TcpRelayHandle, BlockingVolume) {
    use starblk::engine::blocking::Waiters;
    use starblk::engine::{startup, Volume};
    let root = tempfile::Builder::new().prefix("starblk-authfar").tempdir_in(tmp_base()).unwrap();
    let key = root.path().join("key.hex");
    write_key_file(&key, &[KEY_A]);
    let mut local = Replica::init(root.path(), "local", "16MiB");
    let mut far = Replica::init(root.path(), "far", "16MiB");
    for r in [&mut local, &mut far] {
        r.key_file = Some(key.clone());
        r.start();
    }
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", dual_port()).parse().unwrap();
    let upstream = far.addr.parse().unwrap();
    let relay = Relay::start(listen, upstream);
    let tcp = starblk_wanem::TcpRelayConfig::new(listen, upstream).start().unwrap();
    let config = root.path().join("vol.toml");
    std::fs::write(
        &config,
        format!(
            "[volume]\nname = \"af\"\nsize = \"16MiB\"\nquorum = 2\nwrite_queue = \"16MiB\"\nkey_file = \"{}\"\n\n\
             [[replica]]\nname = \"local\"\naddr = \"{}\"\nrole = \"local\"\n\n\
             [[replica]]\nname = \"far\"\naddr = \"{listen}\"\nrole = \"far\"\nnetwork_sync = true\n\
             fec = {{ scheme = \"reed-solomon\", r = 8, c = 3 }}\n{far_extra}\n",
            key.display(),
            local.addr
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));
    let fenced = startup::fence(&starblk::config::Config::load(&config).unwrap()).unwrap();
    let waiters = std::sync::Arc::new(Waiters::default());
    let v = BlockingVolume { volume: Volume::start_fenced(fenced, waiters.clone()), waiters };
    assert!(v.volume.wait_quorum(Duration::from_secs(20)), "quorum");
    (root, vec![local, far], relay, tcp, v)
}

/// A 4 KiB block of a recognisable text pattern.
fn pattern_block(i: u64) -> Vec<u8> {
    format!("KNOWN-PLAINTEXT-PATTERN-{i:08}-").into_bytes().into_iter().cycle().take(4096).collect()
}

#[test]
fn encrypted_far_replica_sends_no_plaintext_and_unencrypted_does() {
    for encrypt in [false, true] {
        let extra = if encrypt { "encrypt = true" } else { "" };
        let (_root, _replicas, relay, _tcp, v) = far_cluster(extra);
        let far = replica_status(&v, "far");
        assert_eq!(far.auth, if encrypt { "encrypted" } else { "mac" });
        for i in 0..32u64 {
            v.write(i * 4096, &pattern_block(i)).unwrap();
        }
        for i in 0..32u64 {
            assert_eq!(v.read(i * 4096, 4096).unwrap(), pattern_block(i));
        }
        wait_until(Duration::from_secs(10), "far replica has every write", || {
            let st = v.volume.status();
            st.replicas[1].durable_seq >= st.last_seq
        });
        let needle = b"KNOWN-PLAINTEXT-PATTERN-00000007-";
        let seen = relay.saw(needle);
        let datagrams = relay.captured.lock().unwrap().len();
        println!("encrypt = {encrypt}: {datagrams} datagrams captured, pattern seen: {seen}");
        assert!(datagrams > 32, "the relay forwarded only {datagrams} datagrams");
        assert_eq!(seen, !encrypt, "encrypt = {encrypt}: plaintext on the wire = {seen}");
        assert!(v.volume.shutdown(Duration::from_secs(10)));
    }
}

#[test]
fn forged_and_replayed_network_sync_datagrams_are_refused_and_counted() {
    use starblk_netsync::wire::{self, DatagramKey, Header, Kind};
    let (_root, _replicas, relay, _tcp, v) = far_cluster("");
    wait_until(Duration::from_secs(20), "far up to date", || replica_status(&v, "far").state == LinkState::UpToDate);
    for i in 0..16u64 {
        v.write(i * 4096, &block(i * 4096, 1, 4096)).unwrap();
    }
    let data = relay.captured_kind(1).expect("a data datagram from the far replica");
    let link_id = u32::from_le_bytes(data[8..12].try_into().unwrap());
    let count = |k: &str| replica_status(&v, "far").auth_failures.get(k).copied().unwrap_or(0);
    let sessions = replica_status(&v, "far").sessions;
    // Forged repair packets: with a MAC under a key nobody holds, and
    // without a MAC at all. Each is refused and counted.
    let before = count("bad_datagram_mac");
    for i in 0..ATTEMPTS {
        let mut b = Vec::new();
        let h = Header::control(Kind::Repair, link_id, 1000 + i);
        let key = (i % 2 == 0).then(|| DatagramKey::new([i as u8; 32]));
        wire::encode_keyed(&h, &[0x5a; 200], &mut b, key.as_ref());
        relay.inject(&b);
    }
    wait_until(T, "forged repairs counted", || count("bad_datagram_mac") >= before + ATTEMPTS);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count("bad_datagram_mac"), before + ATTEMPTS);
    // A replayed ack (a genuine one, sent again) is refused by its counter.
    let ack = relay.captured_kind(3).expect("an ack from the far replica");
    let before = count("replayed_datagram");
    for _ in 0..ATTEMPTS {
        relay.inject(&ack);
    }
    wait_until(T, "replayed acks counted", || count("replayed_datagram") >= before + ATTEMPTS);
    // Verified I/O went on, on the same session.
    for i in 0..16u64 {
        v.write(i * 4096, &block(i * 4096, 2, 4096)).unwrap();
        assert!(starblk::bench::check_stamp(&v.read(i * 4096, 4096).unwrap(), i * 4096, 2));
    }
    let far = replica_status(&v, "far");
    assert_eq!((far.state, far.sessions), (LinkState::UpToDate, sessions), "{}", far.reason);
    println!("far auth_failures: {:?}", far.auth_failures);
    assert!(v.volume.shutdown(Duration::from_secs(10)));
}

/// Whether `qemu-io` runs: the test's NBD client. Missing, it fails the
/// test when `CI=true` (scripts/setup-deps installs qemu-utils) and prints
/// SKIP otherwise.
fn have_qemu_io(test: &str) -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !ok {
        let msg = format!("{test}: `qemu-io` is not installed (scripts/setup-deps installs qemu-utils)");
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"), "{msg}; CI=true, so this fails");
        let _ = writeln!(std::io::stderr(), "SKIP: {msg}");
    }
    ok
}

/// Runs `qemu-io` on the NBD `uri` with `cmds`; `-P` reads check the
/// pattern, so a read of other data fails the command.
fn qemu_io(uri: &str, cmds: &[String]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().unwrap()
}

/// The CLI, checked for success; returns stdout.
fn cli(args: &[&str], at: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(BIN).args(args).args(at).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "starblk {args:?} failed: {stdout}{stderr}");
    stdout.into_owned()
}

/// `down` when dropped, should the test fail with the daemon up.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Command::new(BIN).args(["down", "--config"]).arg(&self.0).output();
    }
}

/// The key id each replica's session uses, from `status --json`.
fn session_keys(sock: &std::path::Path) -> Vec<String> {
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["status", "--json", "--socket"], &[sock.as_os_str()])).expect("status --json");
    st["replicas"].as_array().unwrap().iter().map(|r| r["auth_key"].as_str().unwrap().to_string()).collect()
}

#[test]
fn rekey_cli_moves_a_running_daemon_to_the_next_key_while_writes_go_on() {
    if !have_qemu_io("rekey_cli_moves_a_running_daemon_to_the_next_key_while_writes_go_on") {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::keyed(3, 2, "16MiB", "", "", &[KEY_A]);
    let key_file = c.root.path().join("key.hex");
    let sock = c.root.path().join("it.sock");
    let out = Command::new(BIN).args(["up", "--frontend", "nbd", "--config"]).arg(&c.config).output().unwrap();
    assert!(out.status.success(), "up failed: {}", String::from_utf8_lossy(&out.stderr));
    let _down = DownOnDrop(c.config.clone());
    let uri = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let id = |hex: &str| Key::from_hex(hex).unwrap().id().to_string();
    assert_eq!(session_keys(&sock), [id(KEY_A), id(KEY_A), id(KEY_A)]);

    // A writer: 64 KiB blocks over the first 2 MiB, one qemu-io each,
    // until stopped; records each acknowledged (offset, pattern).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (stop, done, acked, uri) = (stop.clone(), done.clone(), acked.clone(), uri.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (off, pattern) = ((i % 32) << 16, i % 255 + 1);
                let out = qemu_io(&uri, &[format!("write -P {pattern} {off} 64k")]);
                assert!(out.status.success(), "write {i}: {}", String::from_utf8_lossy(&out.stderr));
                acked.lock().unwrap().push((off, pattern));
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let wait_writes = |n: usize, what: &str| {
        let from = done.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(30), what, || done.load(Ordering::Relaxed) >= from + n);
    };
    wait_writes(3, "writes before the rekey");

    // Step 1 of the rotation: the next key appended; step 2: the CLI.
    write_key_file(&key_file, &[KEY_A, KEY_B]);
    let said = cli(&["rekey", "--volume", "it", "--socket"], &[sock.as_os_str()]);
    assert!(said.contains(&format!("rekeyed from key {} to key {}", id(KEY_A), id(KEY_B))), "{said}");
    assert!(said.contains("re-established: r0, r1, r2"), "{said}");
    assert_eq!(session_keys(&sock), [id(KEY_B), id(KEY_B), id(KEY_B)]);
    wait_writes(3, "writes after the rekey");
    // Step 3: the old key dropped; the sessions on the new key go on.
    write_key_file(&key_file, &[KEY_B]);
    wait_writes(3, "writes once the old key is gone");
    // A second rotation through the config file's control socket.
    write_key_file(&key_file, &[KEY_B, KEY_C]);
    let said = cli(&["rekey", "--config"], &[c.config.as_os_str()]);
    assert!(said.contains(&format!("to key {}", id(KEY_C))), "{said}");
    wait_writes(3, "writes after the second rekey");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    // Every acknowledged write reads back (the last pattern per block).
    let acked = acked.lock().unwrap().clone();
    let mut last = std::collections::BTreeMap::new();
    for (off, pattern) in &acked {
        last.insert(*off, *pattern);
    }
    let reads: Vec<String> = last.iter().map(|(off, p)| format!("read -P {p} {off} 64k")).collect();
    let out = qemu_io(&uri, &reads);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !said.contains("Pattern verification failed"), "{said}");
    assert_eq!(said.matches("read 65536/65536 bytes").count(), reads.len(), "{said}");
    println!(
        "{} writes acknowledged across two rekeys, the last of each of {} blocks read back",
        acked.len(),
        last.len()
    );
    cli(&["down", "--config"], &[c.config.as_os_str()]);
    c.kill_all_and_assert_identical("rekey over the CLI");
}
