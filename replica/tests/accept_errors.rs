//! A persistent accept error (EMFILE once file descriptors run out, or
//! here EINVAL from a listening socket shut down under the server) makes
//! the accept loop pause between attempts, not spin on the error.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

use starblk_replica::server;

/// CPU time (user + system, in clock ticks) of this process's thread
/// named `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if comm.trim() != name {
            continue;
        }
        let mut s = String::new();
        File::open(dir.join("stat")).unwrap().read_to_string(&mut s).unwrap();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
        return rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    }
    panic!("no thread named {name}");
}

/// The fd of this process's listening TCP socket bound to `port`.
fn listening_fd(port: u16) -> i32 {
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = e.unwrap().file_name().to_string_lossy().parse::<i32>() else { continue };
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let (mut val, mut vlen) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
        let listening = unsafe {
            libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) == 0
                && libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, &mut val as *mut _ as *mut _, &mut vlen)
                    == 0
        };
        if listening && val == 1 && u16::from_be(sa.sin_port) == port {
            return fd;
        }
    }
    panic!("no listening socket on port {port}");
}

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    starblk_replica::store::init(dir.path(), 4 << 20, starblk_replica::log::LOG_MIN_BYTES).unwrap();
    let h = server::spawn(dir.path(), "127.0.0.1:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_dir("/proc/self/task")
        .unwrap()
        .any(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).is_ok_and(|c| c.trim() == "accept"))
    {
        assert!(Instant::now() < deadline, "the accept thread never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // From now on every accept fails at once (EINVAL).
    assert_eq!(unsafe { libc::shutdown(listening_fd(h.addr.port()), libc::SHUT_RDWR) }, 0);
    let before = thread_cpu_ticks("accept");
    std::thread::sleep(Duration::from_secs(1));
    let spent = thread_cpu_ticks("accept") - before;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(spent * 10 < tck, "the accept thread used {spent} of {tck} ticks in 1 s of failing accepts (spinning)");
    h.stop();
}
