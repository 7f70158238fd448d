//! Shared helpers for integration tests: real `starblk replica serve`
//! processes on loopback ports, config files, and an in-process engine.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starblk::config::Config;
use starblk::engine::blocking::{BlockingVolume, Waiters};
use starblk::engine::{startup, Volume};

pub const BIN: &str = env!("CARGO_BIN_EXE_starblk");

/// Ports this test process has handed out. The kernel may give the same
/// ephemeral port to two binds in a row once the first is released, and
/// two replicas of one cluster on one port fail `volume create`.
static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Takes `port` unless this process already handed it out.
fn claim(port: u16) -> bool {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if given.contains(&port) {
        return false;
    }
    given.push(port);
    true
}

/// A free loopback port (bound then released), never the same twice.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if claim(port) {
            return port;
        }
    }
}

/// A loopback port free for both TCP and UDP (a WAN emulator relays both).
pub fn dual_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() && claim(port) {
            return port;
        }
    }
}

/// One replica process and its directory.
pub struct Replica {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub child: Option<Child>,
    /// Extra environment for `replica serve`, e.g. `STARBLK_FAULT` (fault
    /// injection, see docs/operations.md). Used at the next `start`.
    pub env: Vec<(String, String)>,
    /// `--key-file` for `replica serve` (used at the next `start`).
    pub key_file: Option<PathBuf>,
}

impl Replica {
    pub fn init(root: &Path, name: &str, size: &str) -> Replica {
        let dir = root.join(name);
        let out = Command::new(BIN)
            .args(["replica", "init", "--dir"])
            .arg(&dir)
            .args(["--size", size, "--log-size", "32M"])
            .output()
            .unwrap();
        assert!(out.status.success(), "replica init failed: {}", String::from_utf8_lossy(&out.stderr));
        let addr = format!("127.0.0.1:{}", free_port());
        Replica { name: name.into(), dir, addr, child: None, env: Vec::new(), key_file: None }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let child = Command::new(BIN)
            .args(["replica", "serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr])
            .args(self.key_file.iter().flat_map(|k| [std::ffi::OsStr::new("--key-file"), k.as_os_str()]))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_listening(&self.addr);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts `replica serve` with `STARBLK_FAULT=fault` (fault injection).
    pub fn start_with_fault(&mut self, fault: &str) {
        self.env.retain(|(k, _)| k != "STARBLK_FAULT");
        self.env.push(("STARBLK_FAULT".into(), fault.into()));
        self.start();
    }

    /// What `replica serve` logged (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    pub fn data(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("data")).unwrap()
    }

    /// The data file as a restart leaves it, with the log replayed into
    /// it: a replica acks a batch once it is in its log and applies it
    /// after, so a killed replica's data file may lag what it acked.
    pub fn data_after_replay(&self) -> Vec<u8> {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let (store, committer) = starblk_replica::store::Store::open(&self.dir).unwrap();
        store.shutdown();
        committer.join().unwrap();
        drop(store);
        self.data()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("replica at {addr} never started listening");
}

/// A cluster of real replica processes with a config file.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub config: PathBuf,
}

impl Cluster {
    pub fn new(n: usize, quorum: usize, size: &str, extra_volume: &str) -> Cluster {
        Cluster::with_last(n, quorum, size, extra_volume, "")
    }

    /// As `new`, with `last_extra` appended to the last replica's table
    /// (e.g. `network_sync = true`).
    pub fn with_last(n: usize, quorum: usize, size: &str, extra_volume: &str, last_extra: &str) -> Cluster {
        Cluster::build(n, quorum, size, extra_volume, last_extra, None)
    }

    /// As `with_last`, with every replica and the volume using the key
    /// file `key.hex` (mode 0600) in the cluster's directory holding `keys`
    /// (one per line, 64 hex digits).
    pub fn keyed(n: usize, quorum: usize, size: &str, extra_volume: &str, last_extra: &str, keys: &[&str]) -> Cluster {
        Cluster::build(n, quorum, size, extra_volume, last_extra, Some(keys))
    }

    fn build(
        n: usize,
        quorum: usize,
        size: &str,
        extra_volume: &str,
        last_extra: &str,
        keys: Option<&[&str]>,
    ) -> Cluster {
        let root = tempfile::Builder::new().prefix("starblk-it").tempdir_in(tmp_base()).unwrap();
        let roles = ["local", "near", "far"];
        let mut replicas: Vec<Replica> = (0..n).map(|i| Replica::init(root.path(), &format!("r{i}"), size)).collect();
        let mut extra_volume = extra_volume.to_string();
        if let Some(keys) = keys {
            let key_file = root.path().join("key.hex");
            write_key_file(&key_file, keys);
            extra_volume += &format!("\nkey_file = \"{}\"\n", key_file.display());
            for r in &mut replicas {
                r.key_file = Some(key_file.clone());
            }
        }
        let extra_volume = extra_volume.as_str();
        let mut toml = format!(
            "[volume]\nname = \"it\"\nsize = \"{size}\"\nquorum = {quorum}\n{}control_socket = \"{}\"\n{extra_volume}\n",
            if extra_volume.contains("write_queue") { "" } else { "write_queue = \"16MiB\"\n" },
            root.path().join("it.sock").display()
        );
        for (i, r) in replicas.iter().enumerate() {
            toml +=
                &format!("\n[[replica]]\nname = \"{}\"\naddr = \"{}\"\nrole = \"{}\"\n", r.name, r.addr, roles[i % 3]);
            if i + 1 == n {
                toml += last_extra;
                toml += "\n";
            }
        }
        let config = root.path().join("vol.toml");
        std::fs::write(&config, toml).unwrap();
        for r in &mut replicas {
            r.start();
        }
        let out = Command::new(BIN).args(["volume", "create", "--config"]).arg(&config).output().unwrap();
        assert!(out.status.success(), "volume create failed: {}", String::from_utf8_lossy(&out.stderr));
        Cluster { root, replicas, config }
    }

    /// Kills every replica (kill -9) and asserts that all their data files,
    /// as a restart leaves them, equal the first one's; `context` (a seed,
    /// a scheme) goes into the failure message.
    pub fn kill_all_and_assert_identical(&mut self, context: &str) {
        for r in &mut self.replicas {
            r.kill();
        }
        let d0 = self.replicas[0].data_after_replay();
        for r in &self.replicas[1..] {
            assert!(d0 == r.data_after_replay(), "{} and {} differ ({context})", self.replicas[0].name, r.name);
        }
    }

    pub fn load(&self) -> Config {
        Config::load(&self.config).unwrap()
    }

    /// Fences and starts an in-process engine; waits for quorum.
    pub fn engine(&self) -> BlockingVolume {
        let fenced = startup::fence(&self.load()).expect("fence");
        let waiters = Arc::new(Waiters::default());
        let volume = Volume::start_fenced(fenced, waiters.clone());
        assert!(volume.wait_quorum(Duration::from_secs(10)), "quorum not reached");
        BlockingVolume { volume, waiters }
    }
}

/// Writes a key file with mode 0600 holding `keys`, one per line.
pub fn write_key_file(path: &Path, keys: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Test keys (64 hex digits each).
pub const KEY_A: &str = "6b6579206f6e65206b6579206f6e65206b6579206f6e65206b6579206f6e6521";
pub const KEY_B: &str = "6b65792074776f206b65792074776f206b65792074776f206b65792074776f21";
pub const KEY_C: &str = "6b6579207468726565206b6579207468726565206b6579207468726565212121";

/// One replica's status line, by name.
pub fn replica_status(v: &BlockingVolume, name: &str) -> starblk::engine::status::ReplicaStatus {
    v.volume.status().replicas.into_iter().find(|r| r.name == name).unwrap()
}

/// Where test data lives: /var/tmp unless TMPDIR says otherwise.
pub fn tmp_base() -> PathBuf {
    std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A block whose contents identify (offset, version).
pub fn block(offset: u64, version: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    starblk::bench::stamp(&mut v, 4096, offset, version);
    v
}
