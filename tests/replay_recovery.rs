//! Replay recovery (DESIGN §9): a replica that was down while more writes
//! than the HE's write queue holds went by copies them from an up-to-date
//! peer's log, replica to replica, then catches up from the write queue;
//! when the peers' logs no longer hold them either, it copies the regions
//! written since (incremental recovery). Writes go on throughout.

mod common;

use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use starblk::engine::blocking::BlockingVolume;
use starblk::engine::LinkState;

const SIZE: &str = "64MiB";
const BLOCKS: u64 = 64 * 256;

/// Writes `n` random 4 KiB blocks, stamped with their write number.
fn write_random(v: &BlockingVolume, rng: &mut impl Rng, first: u64, n: u64) {
    for i in first..first + n {
        let b = rng.gen_range(0..BLOCKS);
        v.write(b * 4096, &block(b * 4096, i, 4096)).unwrap_or_else(|e| panic!("write {i} failed: {e}"));
    }
}

#[test]
fn replica_behind_the_write_queue_replays_from_a_peer() {
    let mut c = Cluster::new(3, 2, SIZE, "write_queue = \"1MiB\"");
    let v = c.engine();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    write_random(&v, &mut rng, 1, 200);
    c.replicas[2].kill();
    // 8 MiB of writes: far more than the 1 MiB write queue, well within
    // the peers' 32 MiB logs.
    write_random(&v, &mut rng, 201, 2000);
    c.replicas[2].start();
    // Writes go on while it replays.
    write_random(&v, &mut rng, 2201, 300);
    wait_until(Duration::from_secs(30), "r2 up to date after replay", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let log = std::fs::read_to_string(c.replicas[2].dir.with_extension("log")).unwrap();
    assert!(log.contains("replay recovery done"), "r2 did not replay (seed {seed}):\n{log}");
    write_random(&v, &mut rng, 2501, 100);
    assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up (seed {seed})");
    c.kill_all_and_assert_identical(&format!("seed {seed}"));
}

#[test]
fn replica_behind_every_log_recovers_by_incremental_copy_and_io_goes_on() {
    let mut c = Cluster::new(3, 2, SIZE, "write_queue = \"1MiB\"");
    let v = c.engine();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    write_random(&v, &mut rng, 1, 100);
    c.replicas[2].kill();
    // 48 MiB of writes: the peers' 32 MiB logs wrap past what r2 misses,
    // so it copies the changed regions instead (tests/incremental_recovery.rs).
    write_random(&v, &mut rng, 101, 12_288);
    c.replicas[2].start();
    // The volume takes writes meanwhile.
    write_random(&v, &mut rng, 12_389, 100);
    wait_until(Duration::from_secs(60), "r2 up to date after an incremental copy", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let log = c.replicas[2].log();
    assert!(log.contains("kind=incremental") && log.contains("recovery copy complete"), "{log}");
    assert!(v.volume.shutdown(Duration::from_secs(20)));
    c.kill_all_and_assert_identical("incremental after the logs wrapped");
}

#[test]
fn recovery_rate_limits_a_replay_and_can_be_raised_online() {
    // 1 MB/s: the 16 MiB replay below would take 16 s.
    let mut c = Cluster::new(3, 2, SIZE, "write_queue = \"1MiB\"\nrecovery_rate = \"8Mbit\"");
    let v = c.engine();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    write_random(&v, &mut rng, 1, 100);
    c.replicas[2].kill();
    write_random(&v, &mut rng, 101, 4000);
    c.replicas[2].start();
    wait_until(Duration::from_secs(10), "r2 replaying", || replica_status(&v, "r2").reason.contains("replay"));
    assert!(v.volume.status().to_string().contains("recovery rate 8.0 Mbit/s"));
    std::thread::sleep(Duration::from_secs(2));
    let r = replica_status(&v, "r2");
    assert_eq!(r.state, LinkState::Recovering, "paced at 1 MB/s, 16 MiB cannot be done in 2 s: {}", r.reason);
    assert_eq!(v.volume.set_recovery_rate(0), 1_000_000);
    // At the old rate 14 s or more would remain; the running replay must
    // take the new one.
    wait_until(Duration::from_secs(6), "r2 up to date once unthrottled", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    assert!(v.volume.status().to_string().contains("recovery rate unlimited"));
}
