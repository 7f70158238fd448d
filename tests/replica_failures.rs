//! Three real replica processes, Q=2: random writes with verification,
//! kill -9 of one replica mid-run, its return to up-to-date, byte-identical
//! data files after shutdown, and suspension when two are down.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use starblk::engine::LinkState;

const SIZE: &str = "64MiB";
const BLOCKS: u64 = 64 * 256;

fn state_of(v: &starblk::engine::blocking::BlockingVolume, name: &str) -> LinkState {
    replica_status(v, name).state
}

#[test]
fn kill_one_replica_mid_run_then_restart_and_compare() {
    let mut c = Cluster::new(3, 2, SIZE, "");
    let v = c.engine();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model: HashMap<u64, u64> = HashMap::new();
    for i in 0..3000u64 {
        if i == 1000 {
            c.replicas[1].kill();
        }
        if i == 2000 {
            c.replicas[1].start();
        }
        let b = rng.gen_range(0..BLOCKS);
        v.write(b * 4096, &block(b * 4096, i + 1, 4096)).unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        model.insert(b, i + 1);
        if i % 7 == 0 {
            let r = rng.gen_range(0..BLOCKS);
            let got = v.read(r * 4096, 4096).unwrap();
            match model.get(&r) {
                Some(ver) => {
                    assert!(starblk::bench::check_stamp(&got, r * 4096, *ver), "block {r} wrong (seed {seed})")
                }
                None => assert!(got.iter().all(|x| *x == 0)),
            }
        }
    }
    wait_until(Duration::from_secs(20), "restarted replica up-to-date", || state_of(&v, "r1") == LinkState::UpToDate);
    for (b, ver) in &model {
        let got = v.read(b * 4096, 4096).unwrap();
        assert!(starblk::bench::check_stamp(&got, b * 4096, *ver), "block {b} lost (seed {seed})");
    }
    assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up before shutdown");
    c.kill_all_and_assert_identical(&format!("seed {seed}"));
}

#[test]
fn two_down_suspends_writes_until_one_returns() {
    let mut c = Cluster::new(3, 2, SIZE, "");
    let v = c.engine();
    v.write(0, &block(0, 1, 4096)).unwrap();
    c.replicas[1].kill();
    c.replicas[2].kill();
    let (tx, rx) = mpsc::channel();
    let v2 = v.clone();
    let finished = Arc::new(AtomicBool::new(false));
    let f2 = finished.clone();
    std::thread::spawn(move || {
        let r = v2.write(4096, &block(4096, 2, 4096));
        f2.store(true, Ordering::SeqCst);
        tx.send(r).unwrap();
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!finished.load(Ordering::SeqCst), "write completed without a quorum");
    assert!(!v.volume.status().quorum_ok);
    c.replicas[2].start();
    let r = rx.recv_timeout(Duration::from_secs(20)).expect("write did not resume after a replica returned");
    r.unwrap();
    let got = v.read(4096, 4096).unwrap();
    assert!(starblk::bench::check_stamp(&got, 4096, 2));
}

#[test]
fn read_only_mode_fails_writes_but_serves_reads() {
    let mut c = Cluster::new(3, 2, SIZE, "on_quorum_loss = \"read-only\"");
    let v = c.engine();
    v.write(8192, &block(8192, 5, 4096)).unwrap();
    c.replicas[0].kill();
    c.replicas[1].kill();
    wait_until(Duration::from_secs(10), "quorum loss noticed", || !v.volume.status().quorum_ok);
    std::thread::sleep(Duration::from_millis(600));
    let err = v.write(0, &block(0, 1, 4096)).unwrap_err();
    assert_eq!(err.to_errno(), -libc::EROFS);
    let got = v.read(8192, 4096).unwrap();
    assert!(starblk::bench::check_stamp(&got, 8192, 5));
}

#[test]
fn new_he_seeds_replicas_behind_the_branch_point_from_the_leaders_log() {
    let mut c = Cluster::new(3, 2, SIZE, "");
    let v = c.engine();
    for i in 0..50u64 {
        v.write(i * 4096, &block(i * 4096, i + 1, 4096)).unwrap();
    }
    // r2 misses the next writes; then the HE stops (its links close) so
    // that only the next HE can bring r2 forward.
    c.replicas[2].kill();
    for i in 50..120u64 {
        v.write(i * 4096, &block(i * 4096, i + 1, 4096)).unwrap();
    }
    v.volume.shutdown(Duration::from_millis(10));
    c.replicas[2].start();
    let v2 = c.engine();
    let st = v2.volume.status();
    assert!(st.start_seq >= 120, "branch point {} lost acknowledged writes", st.start_seq);
    wait_until(Duration::from_secs(20), "r2 caught up from the seeded queue", || {
        state_of(&v2, "r2") == LinkState::UpToDate
    });
    v2.write(200 * 4096, &block(200 * 4096, 999, 4096)).unwrap();
    for i in 0..120u64 {
        let got = v2.read(i * 4096, 4096).unwrap();
        assert!(starblk::bench::check_stamp(&got, i * 4096, i + 1), "block {i}");
    }
    assert!(v2.volume.shutdown(Duration::from_secs(20)));
    c.kill_all_and_assert_identical("after the new HE's catch-up");
}
