//! A replica whose disk fails (docs/semantics.md §3, §6, §12), with real processes:
//! three replicas, Q=2, one started with `STARBLK_FAULT` so that the log
//! write crossing 8 MiB fails with EIO after a stall (a failing disk is
//! slow, and the HE keeps streaming writes to it meanwhile).
//!
//! The volume must go on with the other two; the HE must show the replica
//! `failed`, with the replica's own reason; and the failed replica must
//! never claim a durable seq past the hole its failed commit left, neither
//! while it runs nor after it restarts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use starblk::engine::LinkState;
use starblk_replica::client;

const SIZE: &str = "64MiB";
/// Bytes per write; write i (0-based) goes to its own offset i * W.
const W: usize = 64 * 1024;
const WRITES: u64 = 400;
const FAULT: &str = "log:write:after=8MiB:eio:delay=300";

#[test]
fn replica_whose_log_write_fails_stops_at_the_hole_and_the_volume_goes_on() {
    let mut c = Cluster::new(3, 2, SIZE, "");
    c.replicas[2].kill();
    c.replicas[2].start_with_fault(FAULT);
    assert!(c.replicas[2].log().contains("fault injection armed"), "r2 log:\n{}", c.replicas[2].log());
    let v = c.engine();
    let first_seq = v.volume.status().last_seq + 1;

    // The volume goes on with r0 and r1 while r2's disk fails under it.
    for i in 0..WRITES {
        let off = i * W as u64;
        v.write(off, &block(off, i + 1, W)).unwrap_or_else(|e| panic!("write {i} failed: {e}"));
    }
    let st = v.volume.status();
    assert_eq!(st.last_seq, first_seq + WRITES - 1, "the test maps write i to seq {first_seq} + i");
    assert!(st.quorum_ok);

    // The HE shows r2 failed, for the reason r2 gives, and keeps it so:
    // a replica with a failed store takes no new session.
    let addr = c.replicas[2].addr.clone();
    let failed_for_disk = |r: &starblk::engine::status::ReplicaStatus| {
        r.state == LinkState::Failed && r.reason.contains("DiskError") && r.reason.contains("store failed")
    };
    wait_until(Duration::from_secs(20), "r2 failed for its disk", || failed_for_disk(&replica_status(&v, "r2")));
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let r = replica_status(&v, "r2");
        assert!(failed_for_disk(&r), "r2 left `failed` (disk) after its store failed: {} ({})", r.state, r.reason);
        std::thread::sleep(Duration::from_millis(50));
    }
    let r2 = replica_status(&v, "r2");
    assert!(r2.reason.contains("injected fault"), "reason lacks the replica's message: {}", r2.reason);

    // What r2 itself reports.
    let stats = client::stats(&addr, Duration::from_secs(5)).unwrap();
    let failure = stats["failure"].as_str().unwrap_or_else(|| panic!("r2 reports no failure: {stats}")).to_string();
    assert!(failure.contains("log write"), "{failure}");
    let durable = stats["durable_seq"].as_u64().unwrap();
    assert!(durable < first_seq + WRITES - 1, "the fault never stopped r2 (durable seq {durable})");
    assert!(r2.durable_seq <= durable, "the HE saw durable seq {} from r2, which holds {durable}", r2.durable_seq);

    // Every write up to r2's durable seq is in its data file: no hole.
    c.replicas[2].kill();
    let data = c.replicas[2].data();
    let holes = |data: &[u8], upto: u64| -> Vec<u64> {
        (first_seq..=upto)
            .filter(|seq| {
                let i = seq - first_seq;
                let off = (i * W as u64) as usize;
                let mut blocks = data[off..off + W].chunks(4096).enumerate();
                !blocks.all(|(k, b)| starblk::bench::check_stamp(b, (off + k * 4096) as u64, i + 1))
            })
            .collect()
    };
    let h = holes(&data, durable);
    assert!(h.is_empty(), "r2 reported durable seq {durable} but misses seqs {h:?}");

    // Restarted on a good disk, r2 comes back no lower than it reported
    // and catches up to the others, byte for byte.
    c.replicas[2].env.clear();
    c.replicas[2].start();
    let hello = client::probe(&addr, Duration::from_secs(5)).unwrap().hello;
    assert!(hello.durable_seq >= durable, "r2 restarted at {} below the {durable} it reported", hello.durable_seq);
    wait_until(Duration::from_secs(30), "r2 up-to-date after its restart", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up before shutdown");
    c.kill_all_and_assert_identical("after r2's disk failure and restart");
}

/// A `STARBLK_FAULT` that does not parse stops `replica serve` with exit
/// code 2 and names what is wrong.
#[test]
fn bad_fault_spec_is_a_usage_error_naming_the_field() {
    let root = tempfile::Builder::new().prefix("starblk-it").tempdir_in(tmp_base()).unwrap();
    let r = Replica::init(root.path(), "r0", "4MiB");
    for (spec, needle) in [
        ("log:write:nth=1:eoi", "unknown effect \"eoi\" (expected eio, enospc, torn or slow)"),
        ("data:write:after=8XB:eio", "after=\"8XB\" is not a byte count"),
        ("log:write", "expected FILE:OP:TRIGGER:EFFECT"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["replica", "serve", "--dir"])
            .arg(&r.dir)
            .args(["--listen", &r.addr])
            .env("STARBLK_FAULT", spec)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains("STARBLK_FAULT") && err.contains(spec) && err.contains(needle), "{spec}: {err}");
    }
}
