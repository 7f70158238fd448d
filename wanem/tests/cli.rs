//! The `starblk-wanem` binary: usage errors exit 2; a running relay prints
//! its seed and addresses and obeys the control socket.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_starblk-wanem");

fn exit_code(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flags_exit_with_code_2() {
    let cases: &[&[&str]] = &[
        &["udp", "--listen", "127.0.0.1:0"],
        &["udp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--loss", "1.5"],
        &["udp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--ge", "0.1,0.2"],
        &["udp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--delay-ms", "-3"],
        &["udp", "--listen", "nonsense", "--upstream", "127.0.0.1:9"],
        &["tcp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--loss", "0.1"],
        &["udp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--jitter-dist", "cauchy"],
        &["fly"],
        &[],
    ];
    for args in cases {
        let (code, stderr) = exit_code(args);
        assert_eq!(code, 2, "{args:?} gave {code}: {stderr}");
        assert!(stderr.contains("error") || stderr.contains("Usage"), "{args:?}: no clear error: {stderr}");
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn runs_prints_seed_and_obeys_control() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let child = Command::new(BIN)
        .args(["udp", "--listen", "127.0.0.1:0", "--upstream", &echo_addr.to_string()])
        .args(["--delay-ms", "5", "--seed", "77", "--control", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Running(child);
    let mut lines = BufReader::new(proc.0.stdout.take().unwrap()).lines();
    let mut field = |prefix: &str| {
        let line = lines.next().unwrap().unwrap();
        assert!(line.starts_with(prefix), "expected {prefix}, got {line}");
        line[prefix.len()..].split_whitespace().next().unwrap_or("").to_string()
    };
    assert_eq!(field("wanem: seed="), "77");
    let listen = field("wanem: udp listen=");
    let control = field("wanem: control=");
    field("wanem: ready");

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 16];
    client.send_to(b"hello", &listen).unwrap();
    assert_eq!(client.recv(&mut buf).unwrap(), 5);

    let ctl = TcpStream::connect(&control).unwrap();
    let mut ctl_in = BufReader::new(ctl.try_clone().unwrap());
    let mut ask = |cmd: &str| {
        writeln!(&ctl, "{cmd}").unwrap();
        let mut reply = String::new();
        ctl_in.read_line(&mut reply).unwrap();
        reply.trim().to_string()
    };
    assert_eq!(ask("seed"), "ok 77");
    assert_eq!(ask("set loss 0.01"), "ok");
    assert!(ask("set loss 7").starts_with("err "));
    assert!(ask("warp 9").starts_with("err unknown command"));
    assert_eq!(ask("cut"), "ok");
    client.send_to(b"lost", &listen).unwrap();
    assert!(client.recv(&mut buf).is_err(), "cut link passes nothing");
    let stats = ask("stats");
    let json: serde_json::Value = serde_json::from_str(stats.strip_prefix("ok ").unwrap()).unwrap();
    assert_eq!(json["up"]["dropped_cut"], 1);
    assert_eq!(json["up"]["forwarded"], 1);
    assert_eq!(ask("uncut"), "ok");
    assert_eq!(ask("set loss 0"), "ok");
    client.send_to(b"again", &listen).unwrap();
    assert_eq!(client.recv(&mut buf).unwrap(), 5);
    let params = ask("params");
    assert!(params.contains("\"delay_ms\":5.0"), "{params}");
}

/// `both` carries UDP and TCP on one address, like a replica, and `cut`
/// over a Unix control socket cuts both.
#[test]
fn both_mode_relays_udp_and_tcp_on_one_address() {
    use std::io::Read;
    use std::net::TcpListener;

    // UDP and TCP echo on the same port.
    let tcp_echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = tcp_echo.local_addr().unwrap();
    let udp_echo = UdpSocket::bind(echo_addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf) {
            let _ = udp_echo.send_to(&buf[..n], from);
        }
    });
    std::thread::spawn(move || {
        for mut c in tcp_echo.incoming().flatten() {
            let mut buf = [0u8; 2048];
            while let Ok(n @ 1..) = c.read(&mut buf) {
                let _ = c.write_all(&buf[..n]);
            }
        }
    });

    let sock_path = std::env::temp_dir().join(format!("wanem-cli-test-{}.sock", std::process::id()));
    let child = Command::new(BIN)
        .args(["both", "--listen", "127.0.0.1:0", "--upstream", &echo_addr.to_string(), "--delay-ms", "2"])
        .args(["--control", sock_path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Running(child);
    let out = BufReader::new(proc.0.stdout.take().unwrap());
    let lines: Vec<String> = out.lines().map_while(Result::ok).take_while(|l| l != "wanem: ready").collect();
    let addr_of = |kind: &str| {
        let line = lines.iter().find(|l| l.starts_with(&format!("wanem: {kind} listen="))).unwrap();
        line.split_whitespace().nth(2).unwrap().trim_start_matches("listen=").to_string()
    };
    let (udp_addr, tcp_addr) = (addr_of("udp"), addr_of("tcp"));
    assert_eq!(udp_addr, tcp_addr, "one address for both");
    assert!(lines.iter().any(|l| l.starts_with("wanem: seed=")));

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 16];
    client.send_to(b"udp", &udp_addr).unwrap();
    assert_eq!(client.recv(&mut buf).unwrap(), 3);
    let mut tcp = TcpStream::connect(&tcp_addr).unwrap();
    tcp.write_all(b"tcp").unwrap();
    let mut three = [0u8; 3];
    tcp.read_exact(&mut three).unwrap();
    assert_eq!(&three, b"tcp");

    let ctl = std::os::unix::net::UnixStream::connect(&sock_path).unwrap();
    let mut ctl_in = BufReader::new(ctl.try_clone().unwrap());
    let mut ask = |cmd: &str| {
        writeln!(&ctl, "{cmd}").unwrap();
        let mut reply = String::new();
        ctl_in.read_line(&mut reply).unwrap();
        reply.trim().to_string()
    };
    assert_eq!(ask("cut"), "ok");
    client.send_to(b"udp", &udp_addr).unwrap();
    assert!(client.recv(&mut buf).is_err());
    tcp.write_all(b"tcp").unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(tcp.read(&mut three).is_err(), "TCP is silent while cut");
    let stats: serde_json::Value = serde_json::from_str(ask("stats").strip_prefix("ok ").unwrap()).unwrap();
    assert_eq!(stats["udp"]["up"]["dropped_cut"], 1);
    assert_eq!(stats["tcp"]["up"]["bytes_forwarded"], 3);
    assert_eq!(ask("uncut"), "ok");
    tcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    tcp.read_exact(&mut three).unwrap();
    assert_eq!(&three, b"tcp", "held bytes flow after uncut");
}
