//! Prometheus metrics of the HE and of a replica (`docs/operations.md`,
//! "Metrics"): a 3-replica Q=2 volume whose far replica is reached over
//! network-sync, some I/O, then a scrape of both endpoints. The values
//! must match the I/O done, and `promtool check metrics` (Debian's
//! `prometheus` package) must find nothing to complain about.
//!
//! Without promtool the promtool step prints `SKIP` (on the real stderr)
//! and the test fails when `CI=true`. Also: the Grafana dashboard under
//! docs/ is well-formed and uses only metric names the endpoints serve.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, wait_listening, wait_until, Cluster, BIN};

const WRITES: u64 = 24;
const READS: u64 = 5;
const FLUSHES: u64 = 3;
const BS: usize = 4096;

/// GET `path` from `addr`; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Samples of an exposition by `name{labels}` as written.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            let v = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            };
            (k.to_string(), v)
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}; have:\n{}", keys(m)))
}

fn keys(m: &BTreeMap<String, f64>) -> String {
    m.keys().cloned().collect::<Vec<_>>().join("\n")
}

/// Whether promtool runs: fails in CI, prints SKIP otherwise.
fn have_promtool(test: &str) -> bool {
    if Command::new("promtool").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    let msg = format!("{test}: `promtool` is not installed (scripts/setup-deps installs Debian's prometheus package)");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}; CI=true, so this fails instead of skipping");
    }
    let _ = writeln!(std::io::stderr(), "SKIP: {msg}");
    false
}

/// `promtool check metrics` on `body`: prints how long it took; panics
/// with its complaints unless it is clean.
fn promtool_check(what: &str, body: &str) {
    let started = Instant::now();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics on the {what} page:\n{said}");
    eprintln!("promtool check metrics ({what}, {} bytes): clean in {:?}", body.len(), started.elapsed());
}

/// Restarts `replica serve` of `r` with `--metrics`; returns that address.
fn restart_with_metrics(r: &mut common::Replica) -> String {
    r.kill();
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(r.dir.with_extension("log")).unwrap();
    let child = Command::new(BIN)
        .args(["replica", "serve", "--dir"])
        .arg(&r.dir)
        .args(["--listen", &r.addr, "--metrics", &metrics])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    r.child = Some(child);
    wait_listening(&r.addr);
    wait_listening(&metrics);
    metrics
}

#[test]
fn he_and_replica_metrics_match_the_io_and_pass_promtool() {
    let far = "network_sync = true\nfec = { scheme = \"layered-xor\", r = 8, c = 3 }";
    let mut c = Cluster::with_last(3, 2, "64M", "", far);
    let replica_metrics = restart_with_metrics(&mut c.replicas[0]);
    let v = c.engine();
    let listener = starblk::metrics::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let vol = v.volume.clone();
    let render = move || starblk::metrics::volume::render(&vol.status(), &vol.latency());
    let he_metrics = starblk::metrics::http::serve(listener, Arc::new(render)).unwrap().to_string();

    for i in 0..WRITES {
        v.write(i * BS as u64, &common::block(i * BS as u64, 1, BS)).unwrap();
    }
    for _ in 0..FLUSHES {
        v.flush().unwrap();
    }
    for i in 0..READS {
        assert_eq!(v.read(i * BS as u64, BS as u32).unwrap(), common::block(i * BS as u64, 1, BS));
    }
    wait_until(Duration::from_secs(20), "every replica durable at the last write with an RTT", || {
        v.volume.status().replicas.iter().all(|r| r.durable_seq == WRITES && r.rtt_us > 0 && r.lag_writes == 0)
    });

    let (status, he) = http_get(&he_metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let m = samples(&he);
    let op = |name: &str, op: &str| get(&m, &format!("starblk_io_latency_seconds_{name}{{volume=\"it\",op=\"{op}\"}}"));
    assert_eq!(op("count", "write"), WRITES as f64, "one write sample per write");
    assert_eq!(op("count", "read"), READS as f64);
    assert_eq!(op("count", "flush"), FLUSHES as f64, "one flush sample per flush, pending writes or not");
    assert!(op("sum", "write") > 0.0 && op("sum", "write") < WRITES as f64 * 10.0, "write latency sum in seconds");
    let inf = get(&m, "starblk_io_latency_seconds_bucket{volume=\"it\",op=\"write\",le=\"+Inf\"}");
    assert_eq!(inf, WRITES as f64);
    assert_eq!(get(&m, "starblk_volume_completed_seq{volume=\"it\"}"), WRITES as f64);
    assert_eq!(get(&m, "starblk_volume_quorum_ok{volume=\"it\"}"), 1.0);
    for r in ["r0", "r1", "r2"] {
        let l = format!("volume=\"it\",replica=\"{r}\"");
        assert_eq!(get(&m, &format!("starblk_replica_state{{{l},state=\"up-to-date\"}}")), 1.0, "{r}");
        assert_eq!(get(&m, &format!("starblk_replica_state{{{l},state=\"failed\"}}")), 0.0, "{r}");
        assert_eq!(get(&m, &format!("starblk_replica_durable_seq{{{l}}}")), WRITES as f64, "{r}");
        assert_eq!(get(&m, &format!("starblk_replica_lag_writes{{{l}}}")), 0.0, "{r}");
        assert_eq!(get(&m, &format!("starblk_replica_lag_bytes{{{l}}}")), 0.0, "{r}");
        let rtt = get(&m, &format!("starblk_replica_rtt_seconds{{{l}}}"));
        assert!(rtt > 0.0 && rtt < 1.0, "{r}: rtt {rtt} s");
        assert_eq!(get(&m, &format!("starblk_replica_refusals_total{{{l},reason=\"stale_epoch\"}}")), 0.0);
    }
    // The far replica's network-sync link carried every write.
    let far = "volume=\"it\",replica=\"r2\"";
    assert!(get(&m, &format!("starblk_netsync_data_packets_total{{{far}}}")) >= WRITES as f64);
    assert!(get(&m, &format!("starblk_netsync_repair_packets_total{{{far}}}")) > 0.0);
    assert_eq!(get(&m, &format!("starblk_netsync_rejected_datagrams_total{{{far},reason=\"bad_crc\"}}")), 0.0);
    assert_eq!(get(&m, &format!("starblk_netsync_degraded{{{far}}}")), 0.0);
    assert!(!m.keys().any(|k| k.starts_with("starblk_netsync_") && k.contains("replica=\"r0\"")), "r0 is TCP");

    let (status, rep) = http_get(&replica_metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let r = samples(&rep);
    assert_eq!(get(&r, "starblk_store_durable_seq"), WRITES as f64);
    assert_eq!(get(&r, "starblk_store_epoch"), v.volume.status().epoch as f64);
    assert_eq!(get(&r, "starblk_store_writes_total"), WRITES as f64, "the replica restarted before the writes");
    assert_eq!(get(&r, "starblk_store_written_bytes_total"), (WRITES * BS as u64) as f64);
    let commits = get(&r, "starblk_store_commits_total");
    assert!((1.0..=WRITES as f64).contains(&commits), "{commits} group commits for {WRITES} writes");
    assert!(get(&r, "starblk_store_commit_seconds_total") > 0.0);
    let (used, size) = (get(&r, "starblk_store_log_used_bytes"), get(&r, "starblk_store_log_size_bytes"));
    assert!(used >= (WRITES * BS as u64) as f64 && used < size, "log {used} of {size} bytes");
    assert_eq!(size, (32u64 << 20) as f64, "replica init --log-size 32M");
    assert!(get(&r, "starblk_server_sessions_open") >= 1.0);
    // Garbage on the replica's network-sync (UDP) port is dropped and counted.
    let dropped = |page: &BTreeMap<String, f64>| {
        get(page, "starblk_server_netsync_rejected_datagrams_total{reason=\"truncated\"}")
    };
    assert_eq!(dropped(&r), 0.0);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(&[1, 2, 3], &c.replicas[0].addr).unwrap();
    wait_until(Duration::from_secs(5), "the replica counting a garbage datagram", || {
        dropped(&samples(&http_get(&replica_metrics, "/metrics").1)) == 1.0
    });
    assert_eq!(get(&r, "starblk_store_failed"), 0.0);
    assert_eq!(get(&r, "starblk_store_copying"), 0.0);

    if have_promtool("he_and_replica_metrics_match_the_io_and_pass_promtool") {
        promtool_check("HE", &he);
        promtool_check("replica", &rep);
    }
    eprintln!("scrape sizes: HE {} bytes, replica {} bytes", he.len(), rep.len());

    // A second host fences this one: its replicas refuse it from then on,
    // and both ends count the refusals by reason.
    let v2 = c.engine();
    let stale = "starblk_replica_refusals_total{volume=\"it\",replica=\"r0\",reason=\"stale_epoch\"}";
    let failed = "starblk_replica_state{volume=\"it\",replica=\"r0\",state=\"failed\"}";
    wait_until(Duration::from_secs(20), "r0 refusing the fenced host, counted, and failed", || {
        let m = samples(&http_get(&he_metrics, "/metrics").1);
        get(&m, stale) >= 1.0 && get(&m, failed) == 1.0
    });
    let m = samples(&http_get(&he_metrics, "/metrics").1);
    assert_eq!(get(&m, "starblk_replica_refusals_total{volume=\"it\",replica=\"r0\",reason=\"disk_error\"}"), 0.0);
    let r = samples(&http_get(&replica_metrics, "/metrics").1);
    assert!(get(&r, "starblk_server_refusals_total{reason=\"stale_epoch\"}") >= 1.0, "{}", keys(&r));
    assert_eq!(get(&r, "starblk_store_epoch"), v2.volume.status().epoch as f64);
    drop((v, v2));
    c.kill_all_and_assert_identical("metrics");
}

/// Metric names the dashboard queries: identifiers starting `starblk_`.
fn dashboard_metric_names(json: &serde_json::Value, out: &mut Vec<String>) {
    match json {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(expr)) = o.get("expr") {
                let mut rest = expr.as_str();
                while let Some(i) = rest.find("starblk_") {
                    let name: String =
                        rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    rest = &rest[i + name.len()..];
                    out.push(name);
                }
            }
            o.values().for_each(|v| dashboard_metric_names(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_metric_names(v, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_is_json_and_uses_served_metric_names() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-starblk.json");
    let text = std::fs::read_to_string(path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(json["title"].is_string() && json["panels"].as_array().is_some_and(|p| !p.is_empty()), "{path}");
    let mut names = Vec::new();
    dashboard_metric_names(&json, &mut names);
    assert!(!names.is_empty(), "the dashboard queries no starblk_ metric");
    let families = served_families();
    assert!(
        families.contains("starblk_netsync_repaired_packets_total") && families.contains("starblk_store_durable_seq")
    );
    for n in &names {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
        assert!(families.contains(n) || families.contains(base), "dashboard queries {n}, which no endpoint serves");
    }
}

/// The families the HE and replica pages declare (their TYPE lines; a
/// family is declared even while it has no samples).
fn served_families() -> std::collections::BTreeSet<String> {
    let status = serde_json::json!({
        "name": "v", "uuid": "u", "epoch": 1, "start_seq": 0, "size_bytes": 1, "block_size": 4096, "quorum": 1,
        "last_seq": 0, "completed_seq": 0, "write_queue_bytes": 0, "write_queue_max_bytes": 1, "quorum_ok": true,
        "on_quorum_loss": "suspend", "replicas": []
    });
    let status: starblk::engine::status::VolumeStatus = serde_json::from_value(status).unwrap();
    let lat = starblk::engine::latency::Latency::default().snapshot();
    let he = starblk::metrics::volume::render(&status, &lat);
    let root = tempfile::tempdir_in(common::tmp_base()).unwrap();
    let dir = root.path().join("r");
    starblk_replica::store::init(&dir, 8 << 20, 8 << 20).unwrap();
    let h = starblk_replica::server::spawn(&dir, "127.0.0.1:0").unwrap();
    let rep = starblk::metrics::replica::render(&h.server);
    h.stop();
    (he + &rep)
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}
