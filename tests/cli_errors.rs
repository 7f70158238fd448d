//! Config and usage errors: a message naming the file, line and key, and
//! exit code 2. `plan` reproduces StarFish's figures through the CLI.

mod common;

use std::process::Command;

use common::BIN;

const REPLICAS: &str = r#"
[[replica]]
name = "a"
addr = "127.0.0.1:7001"
role = "local"

[[replica]]
name = "b"
addr = "127.0.0.1:7002"
role = "near"
"#;

fn status_with(volume: &str, replicas: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, format!("[volume]\n{volume}\n{replicas}")).unwrap();
    let out =
        Command::new(BIN).args(["up", "--frontend", "none", "--foreground", "--config"]).arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_rejected(volume: &str, replicas: &str, line: usize, key: &str) {
    let (code, err) = status_with(volume, replicas);
    assert_eq!(code, 2, "expected exit 2, got {code}: {err}");
    assert!(err.contains(&format!("bad.toml:{line}")), "no file:line {line} in: {err}");
    assert!(err.contains(key), "key {key} not named in: {err}");
}

const BASE: &str = "name = \"v\"\nsize = \"64MiB\"";

#[test]
fn quorum_above_n() {
    assert_rejected(&format!("{BASE}\nquorum = 3"), REPLICAS, 4, "quorum");
}

#[test]
fn quorum_zero() {
    assert_rejected(&format!("{BASE}\nquorum = 0"), REPLICAS, 4, "quorum");
}

#[test]
fn duplicate_names() {
    let dup = REPLICAS.replace("name = \"b\"", "name = \"a\"");
    assert_rejected(&format!("{BASE}\nquorum = 1"), &dup, 12, "name");
}

#[test]
fn duplicate_addresses() {
    let dup = REPLICAS.replace("7002", "7001");
    assert_rejected(&format!("{BASE}\nquorum = 1"), &dup, 13, "addr");
}

#[test]
fn size_not_multiple_of_block_size() {
    assert_rejected("name = \"v\"\nsize = 1000000\nquorum = 1", REPLICAS, 3, "size");
}

#[test]
fn unknown_key() {
    assert_rejected(&format!("{BASE}\nquorum = 1\nquorom = 2"), REPLICAS, 5, "quorom");
}

#[test]
fn missing_key_file_is_a_usage_error() {
    for cmd in [
        &["up", "--frontend", "none", "--foreground"][..],
        &["volume", "create"],
        &["bench", "--pattern", "write", "--bs", "4k", "--qd", "1", "--seconds", "1"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.toml");
        std::fs::write(&path, format!("[volume]\n{BASE}\nquorum = 1\nkey_file = \"vol.key\"\n{REPLICAS}")).unwrap();
        let out = Command::new(BIN).args(cmd).arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
        assert!(err.contains("key_file") && err.contains("vol.key"), "{cmd:?}: {err}");
    }
}

#[test]
fn nbd_listen_errors_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.toml");
    std::fs::write(&path, format!("[volume]\n{BASE}\nquorum = 1\n{REPLICAS}")).unwrap();
    for (flags, want) in [
        (&["--frontend", "none", "--nbd-listen", "unix:/tmp/x.sock"][..], "--nbd-listen is for --frontend nbd"),
        (&["--frontend", "nbd", "--nbd-listen", "localhost"], "expected unix:PATH or HOST:PORT"),
        (&["--frontend", "nbd", "--nbd-listen", "unix:"], "expected unix:PATH or HOST:PORT"),
    ] {
        let out =
            Command::new(BIN).args(["up", "--foreground"]).args(flags).arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn bad_size_flag_is_usage_error() {
    let out = Command::new(BIN).args(["replica", "init", "--dir", "/nonexistent/x", "--size", "8X"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("8X"));
}

fn plan(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).arg("plan").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn plan_reproduces_table1_and_eq2_headline() {
    // Table 1 cells (see shared/notes/starfish-tables.md).
    for (n, q, a, nines) in [("3", "1", "0.99", 6), ("3", "2", "0.99", 3), ("5", "3", "0.999", 8), ("3", "3", "0.9", 0)]
    {
        let v = plan(&["--replicas", n, "--quorum", q, "--availability", a]);
        assert_eq!(v["nines"], nines, "N={n} Q={q} a={a}");
    }
    let v = plan(&["--replicas", "3", "--quorum", "2", "--availability", "99%", "--read-only"]);
    assert_eq!(v["nines"], 6);
    let out = Command::new(BIN)
        .args(["plan", "--replicas", "2", "--quorum", "3", "--availability", "0.99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A second `replica serve` on a directory another one serves is refused
/// with a message naming the directory, and the first goes on serving.
#[test]
fn second_serve_of_one_directory_is_refused() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let init = Command::new(BIN)
        .args(["replica", "init", "--size", "16MiB", "--log-size", "16MiB", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let serve = || {
        let mut c = Command::new(BIN);
        c.args(["replica", "serve", "--listen", "127.0.0.1:0", "--dir"]).arg(&dir);
        c
    };
    let mut first = serve().stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(first.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening"), "first serve printed {line:?}");
    // Without the lock the second one would serve too (and never exit).
    let mut second = serve().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            second.kill().unwrap();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    second.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let still_serving = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    let status = status.unwrap_or_else(|| panic!("the second serve of {} was still running after 20 s", dir.display()));
    assert!(!status.success(), "the second serve exited with success: {err}");
    assert!(err.contains(&dir.display().to_string()) && err.contains("in use"), "{err}");
    assert!(still_serving, "the first serve exited when the second was refused");
}
