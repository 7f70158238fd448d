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

/// The exposure bound over a long link (100 ms one way): with
/// `max_exposure = "64KiB"`, writes that are on the wire still wait for the
/// far replica's ack once 64 KiB are unconfirmed; status says so, and the
/// exposure it shows never exceeds the bound.
#[test]
fn exposure_is_bounded_on_a_long_link() {
    use starblk::engine::blocking::{BlockingVolume, Waiters};
    use starblk::engine::{startup, Volume};
    use starblk_wanem::{LinkParams, TcpRelayConfig, UdpRelayConfig};
    use std::sync::Arc;
    use std::time::Instant;

    let root = tempfile::Builder::new().prefix("starblk-exposure").tempdir_in(tmp_base()).unwrap();
    let mut local = Replica::init(root.path(), "local", "64MiB");
    let mut far = Replica::init(root.path(), "far", "64MiB");
    local.start();
    far.start();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", dual_port()).parse().unwrap();
    let params = LinkParams { delay_ms: 100.0, ..LinkParams::default() };
    let upstream = far.addr.parse().unwrap();
    let _udp = UdpRelayConfig::new(listen, upstream).symmetric(params).seed(3).start().unwrap();
    // `volume create` and fencing reach the far replica over TCP.
    let _tcp = TcpRelayConfig::new(listen, upstream).delay_ms(100.0).start().unwrap();
    let config = root.path().join("vol.toml");
    std::fs::write(
        &config,
        format!(
            "[volume]\nname = \"exp\"\nsize = \"64MiB\"\nquorum = 1\nwrite_queue = \"16MiB\"\n\n\
             [[replica]]\nname = \"local\"\naddr = \"{}\"\nrole = \"local\"\n\n\
             [[replica]]\nname = \"far\"\naddr = \"{listen}\"\nrole = \"far\"\nnetwork_sync = true\n\
             max_exposure = \"64KiB\"\n",
            local.addr
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));
    let fenced = startup::fence(&starblk::config::Config::load(&config).unwrap()).unwrap();
    let waiters = Arc::new(Waiters::default());
    let v = BlockingVolume { volume: Volume::start_fenced(fenced, waiters.clone()), waiters };
    assert!(v.volume.wait_quorum(Duration::from_secs(10)));
    assert!(v.volume.wait_connected(Duration::from_secs(10)).is_empty());
    // 100 writes of 4 KiB, one at a time: each is on the wire in well under
    // a millisecond, but every 15 (15 x 4160 B <= 64 KiB) wait a round trip
    // (200 ms) for the far ack.
    let t0 = Instant::now();
    let mut max_seen = 0;
    for i in 0..100u64 {
        v.write(i * 4096, &block(i * 4096, i + 1, 4096)).unwrap();
        let link = replica_status(&v, "far").link.expect("network-sync counters");
        assert_eq!(link.max_exposure_bytes, 64 << 10);
        max_seen = max_seen.max(link.exposure_bytes);
    }
    let elapsed = t0.elapsed();
    let link = replica_status(&v, "far").link.unwrap();
    let text = v.volume.status().to_string();
    println!("100 writes in {elapsed:?}; max exposure seen {max_seen} B; {link:?}\n{text}");
    assert!(max_seen <= 64 << 10, "exposure {max_seen} over the bound");
    assert!(max_seen > 32 << 10, "exposure {max_seen}: the bound was never approached");
    assert!(link.exposure_waits.count >= 5, "{:?}", link.exposure_waits);
    assert!(link.exposure_waits.total_ms >= 500.0, "{:?}", link.exposure_waits);
    assert!(elapsed >= Duration::from_millis(1000), "writes did not wait for the far ack: {elapsed:?}");
    assert!(link.auto_rate && link.health == "healthy", "{link:?}");
    assert!(text.contains("exposure ") && text.contains("of 64.0 KiB") && text.contains("paced auto"), "{text}");
    assert!(v.volume.shutdown(Duration::from_secs(20)));
    local.kill();
    far.kill();
}
