//! Replay recovery (docs/semantics.md §9): a replica that was down while more writes
//! than the HE's write queue holds went by copies them from an up-to-date
//! peer's log, replica to replica, then catches up from the write queue;
//! when the peers' logs no longer hold them either, it copies the regions
//! written since (incremental recovery). Writes go on throughout, also
//! while a network-sync replica replays.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Three replicas, Q = 2, `extra` in `[volume]`: 200 random writes, then r2
/// is killed. The seed of the writes is printed.
fn with_r2_killed(extra: &str) -> (Cluster, starblk::engine::blocking::BlockingVolume, rand::rngs::StdRng, u64) {
    let mut c = Cluster::new(3, 2, SIZE, extra);
    let v = c.engine();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    write_random(&v, &mut rng, 1, 200);
    c.replicas[2].kill();
    (c, v, rng, seed)
}

#[test]
fn replica_behind_the_write_queue_replays_from_a_peer() {
    let (mut c, v, mut rng, seed) = with_r2_killed("write_queue = \"1MiB\"");
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

/// Writes random stamped blocks, at most 100 a second, until `stop`;
/// counts them in `done`.
fn write_steadily(v: BlockingVolume, seed: u64, first: u64, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in first.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        write_random(&v, &mut rng, i, 1);
        done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn replay_under_steady_writes_with_a_full_write_queue_completes_in_one_session() {
    // The 1 MiB write queue (about 250 writes) is full from the start, so
    // every write evicts its oldest entry, which the replaying replica has
    // not been sent. At 1 MB/s the 8 MiB replay takes 8 s: the writes that
    // go by meanwhile are more than the queue holds, so after it the
    // session replays again, a shorter range each time (writes are slower).
    let (mut c, v, mut rng, seed) = with_r2_killed("write_queue = \"1MiB\"\nrecovery_rate = \"8Mbit\"");
    write_random(&v, &mut rng, 201, 2000);
    wait_until(Duration::from_secs(10), "r2 seen down", || replica_status(&v, "r2").state == LinkState::Failed);
    let sessions = replica_status(&v, "r2").sessions;
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (v, stop, done) = (v.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || write_steadily(v, seed ^ 1, 2201, stop, done))
    };
    c.replicas[2].start();
    wait_until(Duration::from_secs(60), "r2 up to date after replay under steady writes", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    let during = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let r = replica_status(&v, "r2");
    let log = std::fs::read_to_string(c.replicas[2].dir.with_extension("log")).unwrap();
    let rounds = log.matches("replay recovery done").count();
    println!("r2 caught up in {rounds} replay rounds while {during} writes completed");
    assert_eq!(r.sessions, sessions + 1, "the replay was cut and started over (seed {seed}): {}", r.reason);
    assert!(rounds >= 2, "expected the queue to move past the first replay (seed {seed}):\n{log}");
    assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up (seed {seed})");
    c.kill_all_and_assert_identical(&format!("seed {seed}"));
}

#[test]
fn writes_complete_while_a_network_sync_replica_replays() {
    // r2 is the network-sync replica. It is down while 8 MiB of writes
    // go by (far more than the write queue holds), so it comes back with
    // a replay, which at 1 MB/s takes about 8 s. Writes meanwhile must
    // not wait for it: docs/semantics.md §1b gates on links that receive the live
    // write stream. (r2 is down before the HE starts: killing a
    // network-sync replica under a running HE is another matter.) Not in
    // netsync_far.rs, whose other test's wire-seq check is sensitive to a
    // second network-sync cluster running beside it.
    let mut c = Cluster::with_last(
        3,
        2,
        SIZE,
        "write_queue = \"1MiB\"\nrecovery_rate = \"8Mbit\"",
        "network_sync = true\nfec = { scheme = \"layered-xor\", r = 8, c = 3 }\nrate = \"200Mbit\"",
    );
    c.replicas[2].kill();
    let v = c.engine();
    let write = |i: u64| {
        let off = (i * 7 % 4096) * 4096;
        v.write(off, &block(off, i, 4096)).unwrap_or_else(|e| panic!("write {i}: {e}"));
    };
    (1..=2000).for_each(write);
    c.replicas[2].start();
    wait_until(Duration::from_secs(20), "r2 replaying", || {
        let r = replica_status(&v, "r2");
        r.state == LinkState::Recovering && r.reason.contains("replay")
    });
    let started = Instant::now();
    (2001..=2050).for_each(write);
    let took = started.elapsed();
    let r = replica_status(&v, "r2");
    println!("50 writes took {took:?} during the replay; r2: {} ({})", r.state, r.reason);
    assert!(took < Duration::from_secs(4), "50 writes took {took:?} while the network-sync replica replayed");
    assert!(r.reason.contains("replay"), "the replay ended before the writes did: {}", r.reason);
    wait_until(Duration::from_secs(60), "r2 up to date after the replay", || {
        replica_status(&v, "r2").state == LinkState::UpToDate
    });
    (2051..=2100).for_each(write);
    assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up");
    c.kill_all_and_assert_identical("replay over network-sync");
}
