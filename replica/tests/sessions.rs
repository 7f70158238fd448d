//! Session lifecycle of an in-process replica server: an ending session
//! leaves a newer session's ack sink alone, and sessions that end free
//! what they held (no file descriptor per closed session).

use std::net::Shutdown;
use std::time::{Duration, Instant};

use starblk_replica::client::{self, Session};
use starblk_replica::history::History;
use starblk_replica::proto::{self, FrameType, Hello, WriteHeader, WriteOp};
use starblk_replica::server::{self, ServerHandle};

const VOLUME: [u8; 16] = [7; 16];

/// The tests count this process's fds, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh replica (4 MiB) stamped with `VOLUME` at epoch 1, served on a
/// loopback port.
fn serve() -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    starblk_replica::store::init(dir.path(), 4 << 20, starblk_replica::log::LOG_MIN_BYTES).unwrap();
    let h = server::spawn(dir.path(), "127.0.0.1:0").unwrap();
    h.server.store().stamp(VOLUME, 4 << 20, 4096, 1, Default::default()).unwrap();
    (dir, h)
}

/// Hello, then Adopt of the history of the host of epoch 1 (every session
/// of these tests speaks for that host).
fn connect(h: &ServerHandle) -> Session {
    let hello = Hello { volume: VOLUME, epoch: 1, flags: 0 };
    let mut s = client::connect(&h.addr.to_string(), hello, Duration::from_secs(5)).unwrap();
    let adopt = proto::Adopt { last_seq: 1 << 40, history: History::new().branch(1, 0) };
    s.call(FrameType::Adopt, &[&adopt.encode()], FrameType::Ack).unwrap();
    s
}

fn write(s: &mut Session, seq: u64) {
    let wh = WriteHeader { seq, offset: 0, len: 4096, op: WriteOp::Data, epoch: 1 };
    s.send(FrameType::Write, &[&wh.encode(), &[seq as u8; 4096]]).unwrap();
}

/// Reads frames until an Ack for `seq` or later; fails on silence.
fn expect_ack(s: &mut Session, seq: u64, what: &str) {
    s.reader.get_ref().set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    loop {
        let (h, p) = s.reader.next_frame().unwrap_or_else(|e| panic!("{what}: no ack for seq {seq}: {e:?}"));
        assert_eq!(h.kind, FrameType::Ack, "{what}: unexpected frame");
        if proto::decode_u64(h.kind, p).unwrap() >= seq {
            return;
        }
    }
}

#[test]
fn an_ending_session_keeps_a_newer_sessions_ack_sink() {
    let _serial = serial();
    let (_dir, h) = serve();
    let mut a = connect(&h);
    write(&mut a, 1);
    expect_ack(&mut a, 1, "session a");
    // A newer session takes over the write stream (and the ack sink).
    let mut b = connect(&h);
    write(&mut b, 2);
    expect_ack(&mut b, 2, "session b");
    // The old session ends; the server closes its side once it is done
    // with it, so reading EOF means its cleanup has run.
    a.writer.shutdown(Shutdown::Write).unwrap();
    a.reader.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(a.reader.next_frame().is_err(), "session a should be closed");
    // Session b still gets its acks.
    write(&mut b, 3);
    expect_ack(&mut b, 3, "session b after session a ended");
    drop((a, b));
    h.stop();
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Polls until at most `limit` fds are open; returns the last count.
fn wait_fds_at_most(limit: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = open_fds();
        if n <= limit || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closed_tcp_sessions_release_their_file_descriptors() {
    let _serial = serial();
    let (_dir, h) = serve();
    for _ in 0..10 {
        drop(connect(&h));
    }
    let base = wait_fds_at_most(0, Duration::from_millis(200));
    for i in 0..2000 {
        let hello = Hello { volume: VOLUME, epoch: 1, flags: 0 };
        if let Err(e) = client::connect(&h.addr.to_string(), hello, Duration::from_secs(5)) {
            panic!("connect {i} failed ({} fds open, {base} at the start): {e}", open_fds());
        }
    }
    let now = wait_fds_at_most(base + 20, Duration::from_secs(10));
    assert!(now <= base + 20, "2000 closed sessions left {} fds open ({base} before)", now - base);
    h.stop();
}

/// Opens a network-sync link to the replica, says Hello, reads HelloOk,
/// and drops the link (as an HE whose session ends does). The waits are
/// generous: a saturated 2-core machine once took over 5 s for a HelloOk.
fn netsync_hello(h: &ServerHandle) {
    use starblk_netsync::{Link, LinkConfig};
    let link = Link::connect("127.0.0.1:0".parse().unwrap(), h.addr, LinkConfig::default()).unwrap();
    link.wait_established(Duration::from_secs(20)).unwrap();
    let mut msg = Vec::new();
    let hello = Hello { volume: VOLUME, epoch: 1, flags: 0 };
    proto::write_frame(&mut msg, FrameType::Hello, 0, &[&hello.encode()]).unwrap();
    link.send(&msg).unwrap();
    let reply = link.recv_timeout(Duration::from_secs(20)).unwrap();
    let mut reader = proto::FrameReader::new(&reply[..]);
    assert_eq!(reader.next_frame().unwrap().0.kind, FrameType::HelloOk);
}

#[test]
fn network_sync_sessions_of_departed_peers_end() {
    let _serial = serial();
    let (_dir, h) = serve();
    h.server.set_netsync_silence_timeout(Duration::from_millis(500));
    netsync_hello(&h);
    let base = wait_fds_at_most(0, Duration::from_secs(2));
    for _ in 0..100 {
        netsync_hello(&h);
    }
    let now = wait_fds_at_most(base + 10, Duration::from_secs(10));
    assert!(now <= base + 10, "100 departed network-sync peers left {} fds open ({base} before)", now - base);
    h.stop();
}
