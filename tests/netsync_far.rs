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
        assert!(link.wire_seq >= 500, "wire seq {} behind", link.wire_seq);
        for i in 0..500u64 {
            let off = (i * 7 % 4096) * 4096;
            let got = v.read(off, 4096).unwrap();
            assert!(starblk::bench::check_stamp(&got, off, i + 1));
        }
        assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up");
        c.kill_all_and_assert_identical(fec);
    }
}
