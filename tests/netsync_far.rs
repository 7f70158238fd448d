//! A far replica over the network-sync link (UDP + FEC) beside two TCP
//! replicas: writes complete, reads verify, status reports the link, and
//! the replicas end byte-identical.

mod common;

use std::time::Duration;

use common::*;
use starblk::engine::LinkState;

#[test]
fn far_replica_over_network_sync_link() {
    for fec in ["layered-xor", "reed-solomon"] {
        let extra = format!(
            "network_sync = true\nfec = {{ scheme = \"{fec}\", r = 8, c = 3 }}\nrate = \"200Mbit\"\nwindow = \"8MiB\""
        );
        let mut c = Cluster::with_last(3, 2, "64MiB", "", &extra);
        let v = c.engine();
        wait_until(Duration::from_secs(20), "far link up to date", || {
            v.volume.status().replicas[2].state == LinkState::UpToDate
        });
        for i in 0..500u64 {
            let off = (i * 7 % 4096) * 4096;
            v.write(off, &block(off, i + 1, 4096)).unwrap();
        }
        let far = v.volume.status().replicas[2].clone();
        println!("{fec}: far link {} {:?}", far.network_sync, far.link);
        assert_ne!(far.network_sync, "off");
        let link = far.link.clone().expect("network-sync counters");
        // The config's rate and window reach the link and status.
        assert_eq!(link.pacing_rate_bits_per_s, 200_000_000, "{link:?}");
        assert_eq!(link.window_max_bytes, 8 << 20, "{link:?}");
        let text = v.volume.status().to_string();
        assert!(text.contains("paced 200.0 Mbit/s") && text.contains("/8388608 B"), "{text}");
        assert!(link.data_packets >= 500, "{link:?}");
        assert!(link.repair_packets > 0, "no repair packets were sent: {link:?}");
        // The last writes may complete on the far replica's durable ack
        // before its on-the-wire report arrives (the gate takes either).
        wait_until(Duration::from_secs(5), "wire seq reaches 500", || {
            v.volume.status().replicas[2].link.as_ref().is_some_and(|l| l.wire_seq >= 500)
        });
        for i in 0..500u64 {
            let off = (i * 7 % 4096) * 4096;
            let got = v.read(off, 4096).unwrap();
            assert!(starblk::bench::check_stamp(&got, off, i + 1));
        }
        assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up");
        c.kill_all_and_assert_identical(fec);
    }
}

/// A far replica killed while the HE runs: its link must fail (and leave
/// the §1b gate) instead of the sender blocking forever on a full window
/// with the link still counted as connected, which stalled every write.
#[test]
fn writes_go_on_when_the_far_network_sync_replica_dies() {
    let extra = "network_sync = true\nfec = { scheme = \"layered-xor\", r = 8, c = 3 }\nwindow = \"4MiB\"";
    let mut c = Cluster::with_last(3, 2, "64MiB", "", extra);
    let v = c.engine();
    wait_until(Duration::from_secs(20), "far link up to date", || {
        v.volume.status().replicas[2].state == LinkState::UpToDate
    });
    c.replicas[2].kill();
    // 24 MiB: several times the far link's window.
    let (tx, rx) = std::sync::mpsc::channel();
    let v2 = v.clone();
    std::thread::spawn(move || {
        let data = vec![7u8; 64 << 10];
        for i in 0..384u64 {
            v2.write((i % 512) * (64 << 10), &data).unwrap();
        }
        let _ = tx.send(());
    });
    let done = rx.recv_timeout(Duration::from_secs(60));
    let far = v.volume.status().replicas[2].clone();
    assert!(done.is_ok(), "writes stalled after the far replica died: far is {} ({})", far.state, far.reason);
    assert!(!far.state.is_connected(), "far replica still counted as connected: {} ({})", far.state, far.reason);
}
