//! Online membership changes with real replica processes
//! (`docs/design.md`, "Membership"): `replica add` under load ends with
//! byte-identical members, `replica remove` refuses below Q or without a
//! reachable majority unless forced, and the set stored on the replicas
//! wins over a stale config file.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use starblk::config::Role;
use starblk::engine::blocking::BlockingVolume;
use starblk::engine::membership::{AddReplica, MembershipError};
use starblk::engine::startup;
use starblk::engine::LinkState;
use starblk_replica::client;

const BS: usize = 4096;

fn add_req(r: &Replica) -> AddReplica {
    AddReplica {
        name: r.name.clone(),
        addr: r.addr.clone(),
        role: Role::Near,
        network_sync: false,
        fec: None,
        force: false,
    }
}

/// Writes 4 KiB blocks over the first `blocks` of the volume until stopped.
fn writer(v: &BlockingVolume, blocks: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let v = v.clone();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let b = (n * 7919) % blocks;
            v.write(b * BS as u64, &block(b * BS as u64, n, BS)).expect("write under a membership change");
            n += 1;
        }
        n
    })
}

/// The set a replica stores: (version, member names).
fn stored(addr: &str) -> (u64, Vec<String>) {
    let h = client::probe(addr, Duration::from_secs(3)).unwrap().hello;
    (h.members.version, h.members.members.into_iter().map(|m| m.name).collect())
}

#[test]
fn an_empty_replica_added_under_load_catches_up_and_ends_byte_identical() {
    let mut c = Cluster::new(3, 2, "64MiB", "");
    let v = c.engine();
    for b in 0..2048u64 {
        v.write(b * BS as u64, &block(b * BS as u64, 1, BS)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = writer(&v, 4096, stop.clone());
    let mut r3 = Replica::init(c.root.path(), "r3", "64MiB");
    r3.start();
    // N = 4 with Q = 2: Q is no longer a strict majority, so only forced.
    let e = v.volume.add_replica(add_req(&r3)).unwrap_err();
    assert!(matches!(e, MembershipError::QuorumNotMajority { quorum: 2, members: 4, .. }), "{e}");
    assert_eq!(v.volume.members().version, 1, "a refused add changes nothing");
    let version = v.volume.add_replica(AddReplica { force: true, ..add_req(&r3) }).expect("add r3");
    assert_eq!(version, 2);
    assert_eq!(v.volume.members().members.len(), 4);
    wait_until(Duration::from_secs(60), "r3 up to date", || replica_status(&v, "r3").state == LinkState::UpToDate);
    stop.store(true, Ordering::Relaxed);
    let writes = load.join().unwrap();
    println!("{writes} writes went on while r3 joined");
    assert!(writes > 0);
    for r in c.replicas.iter().chain([&r3]) {
        assert_eq!(stored(&r.addr), (2, vec!["r0".into(), "r1".into(), "r2".into(), "r3".into()]), "{}", r.name);
    }
    // A second add of the same name or address is refused.
    let again = v.volume.add_replica(add_req(&r3)).unwrap_err();
    assert!(matches!(again, MembershipError::Duplicate { what: "name", .. }), "{again}");
    assert!(v.volume.shutdown(Duration::from_secs(30)), "members did not catch up");
    c.replicas.push(r3);
    c.kill_all_and_assert_identical("after replica add");
}

#[test]
fn add_refuses_a_replica_of_another_volume_or_size() {
    // N = 2, Q = 2: a third member keeps Q a strict majority.
    let c = Cluster::new(2, 2, "64MiB", "");
    let other = Cluster::new(1, 1, "64MiB", "");
    let v = c.engine();
    let mut foreign = add_req(&other.replicas[0]);
    foreign.name = "foreign".into();
    let e = v.volume.add_replica(foreign).unwrap_err();
    assert!(matches!(e, MembershipError::OtherVolume { .. }), "{e}");
    assert!(e.to_string().contains("belongs to volume"), "{e}");
    let mut small = Replica::init(c.root.path(), "small", "32MiB");
    small.start();
    let e = v.volume.add_replica(add_req(&small)).unwrap_err();
    assert!(matches!(e, MembershipError::Geometry { .. }), "{e}");
    assert_eq!(v.volume.members().version, 1, "a refused add changes nothing");
    assert_eq!(stored(&c.replicas[0].addr).0, 1);
}

#[test]
fn remove_refuses_below_quorum_and_never_below_q_members() {
    let mut c = Cluster::new(3, 2, "64MiB", "");
    let v = c.engine();
    v.write(0, &block(0, 1, BS)).unwrap();
    c.replicas[2].kill();
    wait_until(Duration::from_secs(10), "r2 failed", || replica_status(&v, "r2").state == LinkState::Failed);
    // r0 up, r2 down: removing r1 leaves one up-to-date replica.
    let e = v.volume.remove_replica("r1", false).unwrap_err();
    assert!(matches!(e, MembershipError::BelowQuorum { left: 1, quorum: 2, .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    let e = v.volume.remove_replica("nope", false).unwrap_err();
    assert!(matches!(e, MembershipError::Unknown { .. }), "{e}");
    // Removing the dead one is safe: two up-to-date members remain.
    assert_eq!(v.volume.remove_replica("r2", false).expect("remove r2"), 2);
    assert_eq!(replica_status(&v, "r2").state, LinkState::Removed);
    for r in &c.replicas[..2] {
        assert_eq!(stored(&r.addr), (2, vec!["r0".into(), "r1".into()]), "{}", r.name);
    }
    // Now N = Q = 2: no removal may go below Q members, not even forced.
    let e = v.volume.remove_replica("r1", true).unwrap_err();
    assert!(matches!(e, MembershipError::SmallerThanQuorum { left: 1, quorum: 2, .. }), "{e}");
    v.write(BS as u64, &block(BS as u64, 2, BS)).expect("writes go on after the removal");
    assert!(v.volume.shutdown(Duration::from_secs(20)));
}

#[test]
fn force_removes_when_no_majority_of_the_new_set_is_reachable() {
    let mut c = Cluster::new(3, 1, "64MiB", "");
    let v = c.engine();
    v.write(0, &block(0, 1, BS)).unwrap();
    c.replicas[1].kill();
    wait_until(Duration::from_secs(10), "r1 failed", || replica_status(&v, "r1").state == LinkState::Failed);
    // Without r0 the set is {r1, r2} with only r2 reachable.
    let e = v.volume.remove_replica("r0", false).unwrap_err();
    assert!(matches!(e, MembershipError::NoMajority { reachable: 1, members: 2, need: 2, .. }), "{e}");
    assert_eq!(v.volume.members().version, 1);
    assert_eq!(v.volume.remove_replica("r0", true).expect("forced remove"), 2);
    assert_eq!(replica_status(&v, "r0").state, LinkState::Removed);
    assert_eq!(stored(&c.replicas[2].addr), (2, vec!["r1".into(), "r2".into()]));
    v.write(BS as u64, &block(BS as u64, 2, BS)).expect("r2 alone completes writes at Q = 1");
    let got = v.read(BS as u64, BS as u32).unwrap();
    assert_eq!(got, block(BS as u64, 2, BS));
}

#[test]
fn the_stored_set_wins_over_a_stale_config_file() {
    let mut c = Cluster::new(3, 2, "64MiB", "");
    let mut r3 = Replica::init(c.root.path(), "r3", "64MiB");
    r3.start();
    {
        let v = c.engine();
        v.write(0, &block(0, 1, BS)).unwrap();
        v.volume.add_replica(AddReplica { force: true, ..add_req(&r3) }).expect("add r3");
        wait_until(Duration::from_secs(30), "r3 up to date", || replica_status(&v, "r3").state == LinkState::UpToDate);
        v.volume.remove_replica("r0", false).expect("remove r0");
        assert!(v.volume.shutdown(Duration::from_secs(20)));
    }
    // The config file still names r0, r1, r2: fencing follows the stored
    // set {r1, r2, r3}, version 3.
    let fenced = startup::fence(&c.load()).expect("fence with a stale config");
    let names: Vec<&str> = fenced.replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["r1", "r2", "r3"]);
    assert_eq!(fenced.engine.members.version, 3);
    // The daemon says so, naming each difference.
    let out = Command::new(BIN)
        .args(["up", "--frontend", "none", "--foreground", "--config"])
        .arg(&c.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = c.root.path().join("it.sock");
    wait_until(Duration::from_secs(20), "daemon up", || sock.exists());
    let status = Command::new(BIN).args(["status", "--json", "--socket"]).arg(&sock).output().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let live: Vec<&str> = st["replicas"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(live, ["r1", "r2", "r3"]);
    // The CLI: remove r3, then add it back (it belongs to this volume, so
    // it is taken as it is and recovers); a duplicate add is refused.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN).args(args).arg("--socket").arg(&sock).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out_text, err_text) = cli(&["replica", "remove", "--volume", "it", "--name", "r3"]);
    assert_eq!(code, Some(0), "{out_text}{err_text}");
    assert!(out_text.contains("replica r3 removed from volume it (replica set version 4)"), "{out_text}");
    let add = ["replica", "add", "--volume", "it", "--name", "r3", "--addr", r3.addr.as_str(), "--role", "far"];
    let (code, out_text, err_text) = cli(&add);
    assert_eq!(code, Some(0), "{out_text}{err_text}");
    assert!(out_text.contains("(replica set version 5)"), "{out_text}");
    let (code, _, err_text) = cli(&add);
    assert_ne!(code, Some(0));
    assert!(err_text.contains("name r3 is already used by member r3"), "{err_text}");
    let (code, _, err_text) =
        cli(&["replica", "add", "--volume", "it", "--name", "x", "--addr", "127.0.0.1:1", "--role", "middle"]);
    assert_ne!(code, Some(0));
    assert!(err_text.contains("--role"), "{err_text}");
    // {r1, r2, r3} with Q = 2: a fourth member needs --force.
    let (code, _, err_text) = cli(&["replica", "add", "--volume", "it", "--name", "r4", "--addr", "127.0.0.1:1"]);
    assert_ne!(code, Some(0));
    assert!(err_text.contains("volume it would make N = 4 replicas with Q = 2"), "{err_text}");
    let down = Command::new(BIN).args(["down", "--socket"]).arg(&sock).output().unwrap();
    assert!(
        down.status.success(),
        "down: {} {}",
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&down.stderr)
    );
    let out = out.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("r0 (") && err.contains("is in the config file, but is not a member"), "{err}");
    assert!(err.contains("r3 (") && err.contains("is a member, but the config file lacks it"), "{err}");
    c.replicas.push(r3);
}
