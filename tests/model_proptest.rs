//! Property test: random writes, reads and flushes with replica crashes and
//! restarts, against an in-memory model. Every read must match the model,
//! and after a full restart of every process no acknowledged write is lost.
//!
//! Replicas run in process (real TCP on loopback, real files); a crash cuts
//! every session at once. Reproduce a failure with the seed proptest prints
//! (PROPTEST_CASES sets the number of cases).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use starblk::config::Config;
use starblk::engine::blocking::{BlockingVolume, Waiters};
use starblk::engine::{startup, Volume};
use starblk_replica::server::{self, ServerHandle};

const N: usize = 3;
const Q: usize = 2;
const BLOCKS: u64 = 256;
const BS: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, count: u64 },
    Read { block: u64 },
    Flush,
    Crash(usize),
    Restart(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..4u64).prop_map(|(block, count)| Op::Write { block, count }),
        3 => (0..BLOCKS).prop_map(|block| Op::Read { block }),
        1 => Just(Op::Flush),
        1 => (0..N).prop_map(Op::Crash),
        1 => (0..N).prop_map(Op::Restart),
    ]
}

struct Harness {
    root: tempfile::TempDir,
    cfg: Config,
    servers: Vec<Option<ServerHandle>>,
    addrs: Vec<String>,
}

impl Harness {
    fn new() -> Harness {
        let root = tempfile::Builder::new().prefix("starblk-prop").tempdir_in(common::tmp_base()).unwrap();
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..N {
            let dir = root.path().join(format!("r{i}"));
            starblk_replica::store::init(&dir, BLOCKS * BS, starblk_replica::log::LOG_MIN_BYTES).unwrap();
            let h = server::spawn(&dir, "127.0.0.1:0").unwrap();
            addrs.push(h.addr.to_string());
            servers.push(Some(h));
        }
        let mut toml =
            format!("[volume]\nname = \"prop\"\nsize = {}\nquorum = {Q}\nwrite_queue = \"8MiB\"\n", BLOCKS * BS);
        for (i, a) in addrs.iter().enumerate() {
            toml += &format!("[[replica]]\nname = \"r{i}\"\naddr = \"{a}\"\nrole = \"local\"\n");
        }
        let cfg = Config::parse(&toml, std::path::Path::new("prop.toml")).unwrap();
        startup::create_volume(&cfg).unwrap();
        Harness { root, cfg, servers, addrs }
    }

    fn running(&self) -> usize {
        self.servers.iter().filter(|s| s.is_some()).count()
    }

    fn crash(&mut self, i: usize) {
        if let Some(h) = self.servers[i].take() {
            h.stop();
        }
    }

    fn restart(&mut self, i: usize) {
        if self.servers[i].is_none() {
            let dir = self.root.path().join(format!("r{i}"));
            self.servers[i] = Some(server::spawn(&dir, &self.addrs[i]).unwrap());
        }
    }

    fn engine(&self) -> BlockingVolume {
        let fenced = startup::fence(&self.cfg).unwrap();
        let waiters = Arc::new(Waiters::default());
        let volume = Volume::start_fenced(fenced, waiters.clone());
        assert!(volume.wait_quorum(Duration::from_secs(10)));
        BlockingVolume { volume, waiters }
    }
}

fn check(v: &BlockingVolume, model: &HashMap<u64, u64>, block: u64) -> Result<(), TestCaseError> {
    let got = v.read(block * BS, BS as u32).map_err(|e| TestCaseError::fail(format!("read {block}: {e}")))?;
    match model.get(&block) {
        Some(ver) => {
            prop_assert!(starblk::bench::check_stamp(&got, block * BS, *ver), "block {} != version {}", block, ver)
        }
        None => prop_assert!(got.iter().all(|b| *b == 0), "block {} should be zero", block),
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let v = h.engine();
    let mut model = HashMap::new();
    let mut version = 0u64;
    for op in ops {
        match op {
            Op::Write { block, count } => {
                let count = count.min(BLOCKS - block);
                version += 1;
                let mut data = vec![0u8; (count * BS) as usize];
                starblk::bench::stamp(&mut data, BS as u32, block * BS, version);
                v.write(block * BS, &data).map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                for b in block..block + count {
                    model.insert(b, version);
                }
            }
            Op::Read { block } => check(&v, &model, block)?,
            Op::Flush => v.flush().map_err(|e| TestCaseError::fail(format!("flush: {e}")))?,
            // Keep Q replicas running so writes can complete.
            Op::Crash(i) if h.running() > Q => h.crash(i),
            Op::Crash(_) => {}
            Op::Restart(i) => h.restart(i),
        }
    }
    for i in 0..N {
        h.restart(i);
    }
    prop_assert!(v.volume.shutdown(Duration::from_secs(20)), "replicas did not catch up");
    // Crash everything, restart, and read every acknowledged write back
    // through a new HE (new epoch).
    for i in 0..N {
        h.crash(i);
    }
    for i in 0..N {
        h.restart(i);
    }
    let v2 = h.engine();
    for b in 0..BLOCKS {
        check(&v2, &model, b)?;
    }
    v2.volume.shutdown(Duration::from_secs(10));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_ops_with_crashes_match_model(ops in proptest::collection::vec(op(), 10..80)) {
        run(ops)?;
    }
}
