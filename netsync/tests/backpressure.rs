//! Backpressure: with a small send window and a receiver that does not
//! read, `try_send` reports `WouldBlock`, `send_timeout` times out, and
//! what both ends hold stays within their bounds; once the receiver reads,
//! everything arrives in order and sending resumes.

mod common;

use std::time::{Duration, Instant};

use common::{direct_pair, init_tracing, Rng};
use starblk_netsync::{LinkConfig, LinkError, MESSAGE_OVERHEAD_BYTES};

const MSG_BYTES: usize = 8 << 10;
const WINDOW_BYTES: u64 = 256 << 10;
const RECV_BUFFER_BYTES: usize = 128 << 10;

#[test]
fn full_window_blocks_and_memory_stays_bounded() {
    init_tracing();
    let he_cfg = LinkConfig { window_bytes: WINDOW_BYTES, max_message_bytes: 64 << 10, ..LinkConfig::default() };
    let replica_cfg =
        LinkConfig { recv_buffer_bytes: RECV_BUFFER_BYTES, max_message_bytes: 64 << 10, ..LinkConfig::default() };
    let (he, replica) = direct_pair(he_cfg, replica_cfg);
    let mut rng = Rng::new(0xbac4);
    let mut sent = Vec::new();

    // Fill: the receiver takes what fits its buffer and stops acking; the
    // sender's window then fills.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut would_block = 0u32;
    while Instant::now() < deadline && would_block < 200 {
        let msg = rng.bytes(MSG_BYTES);
        match he.try_send(&msg) {
            Ok(_) => sent.push(msg),
            Err(LinkError::WouldBlock) => {
                would_block += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(would_block, 200, "the window must stay full while the receiver does not read");
    let blocked = he.send_timeout(&[0u8; MSG_BYTES], Duration::from_millis(50));
    assert!(matches!(blocked, Err(LinkError::Timeout)), "{blocked:?}");

    std::thread::sleep(Duration::from_millis(20));
    let s = he.stats();
    let r = replica.stats();
    let charge = MSG_BYTES as u64 + MESSAGE_OVERHEAD_BYTES;
    eprintln!(
        "accepted {} messages ({} KiB) before WouldBlock; sender window {} / {} bytes, {} datagrams in flight; \
         receiver inbox {} B, reorder {} B, buffer-full drops {}",
        sent.len(),
        sent.len() * MSG_BYTES / 1024,
        s.tx.window_used_bytes,
        s.tx.window_max_bytes,
        s.tx.inflight_datagrams,
        r.rx.inbox_bytes,
        r.rx.reorder_bytes,
        r.rx.dropped_buffer_full
    );
    assert!(s.tx.window_used_bytes <= WINDOW_BYTES);
    assert!(s.tx.window_used_bytes + charge > WINDOW_BYTES, "window should be full");
    assert!(sent.len() as u64 * charge <= WINDOW_BYTES + r.rx.inbox_bytes + charge * 16);
    assert!(r.rx.inbox_bytes + r.rx.reorder_bytes <= (RECV_BUFFER_BYTES + MSG_BYTES) as u64 * 2);

    // Now read: everything arrives, in order, and the window opens again.
    for (i, want) in sent.iter().enumerate() {
        let got = replica.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert!(&got == want, "message {i} differs");
    }
    let last = he.send_timeout(b"after", Duration::from_secs(5)).unwrap();
    assert_eq!(replica.recv_timeout(Duration::from_secs(5)).unwrap(), b"after");
    he.wait_acked(last, Duration::from_secs(5)).unwrap();
}
