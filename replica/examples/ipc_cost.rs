//! What the building blocks of a write's path cost on this machine: a
//! null system call, a thread wake-up round trip (park/unpark), a small
//! message's round trip to a thread and to another process, and one
//! 4 KiB or 128 KiB message over loopback TCP against a Unix socket pair,
//! as a round trip (message, then a 64-byte reply) and streamed. Under
//! QEMU/TCG these differ from a real host by far more than the CPU speed
//! does; `docs/performance.md`, "What a hand-off costs in the guest", has
//! both.
//!
//! usage: cargo run --release -p starblk-replica --example ipc_cost [SCALE]
//! (SCALE, default 10, multiplies the iteration counts; 2 is enough in the
//! guest). In the guest: VM_BUILD=0 VM_BINS=target/release/examples/ipc_cost
//! VM_TESTS_DIR=DIR scripts/vm-test, with DIR holding a scenario that runs
//! `ipc_cost 2`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Sends `n` messages of `size` bytes from one end to a thread at the
/// other, each answered by 64 bytes (`stream == false`) or all answered
/// once at the end; returns µs per message.
fn messages<S: Read + Write + Send + 'static>(
    mut client: S,
    mut server: S,
    size: usize,
    n: usize,
    stream: bool,
) -> f64 {
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for _ in 0..n {
            server.read_exact(&mut buf).expect("read message");
            if !stream {
                server.write_all(&buf[..64]).expect("write reply");
            }
        }
        if stream {
            server.write_all(&[1u8; 64]).expect("write reply");
        }
    });
    let msg = vec![7u8; size];
    let mut reply = [0u8; 64];
    let t = Instant::now();
    for _ in 0..n {
        client.write_all(&msg).expect("write message");
        if !stream {
            client.read_exact(&mut reply).expect("read reply");
        }
    }
    if stream {
        client.read_exact(&mut reply).expect("read reply");
    }
    echo.join().expect("echo thread");
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let c = TcpStream::connect(l.local_addr().expect("local addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    c.set_nodelay(true).expect("nodelay");
    s.set_nodelay(true).expect("nodelay");
    (c, s)
}

/// µs per round trip of two threads waking each other with park/unpark.
fn wake_round_trip(n: u64) -> f64 {
    let turn = Arc::new(AtomicU64::new(0));
    let main = std::thread::current();
    let t2 = turn.clone();
    let other = std::thread::spawn(move || {
        for i in 0..n {
            while t2.load(Ordering::Acquire) != 2 * i + 1 {
                std::thread::park();
            }
            t2.store(2 * i + 2, Ordering::Release);
            main.unpark();
        }
    });
    let t = Instant::now();
    for i in 0..n {
        turn.store(2 * i + 1, Ordering::Release);
        other.thread().unpark();
        while turn.load(Ordering::Acquire) != 2 * i + 2 {
            std::thread::park();
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    other.join().expect("wake thread");
    us
}

/// µs per round trip of 64-byte messages over a Unix socket pair, the
/// echo end a thread of this process or (`fork`) another process. Under
/// TCG a switch between processes also switches address spaces, which
/// empties the emulator's TLB; a switch between threads does not.
fn small_round_trip(n: usize, across_processes: bool) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = move |s: &mut UnixStream| {
        let mut m = [0u8; 64];
        for _ in 0..n {
            s.read_exact(&mut m).expect("read");
            s.write_all(&m).expect("write");
        }
    };
    let mut child = None;
    let mut thread = None;
    if across_processes {
        // SAFETY: the child only runs `echo` on its socket and exits with
        // _exit, touching no lock another thread of the parent could hold.
        match unsafe { libc::fork() } {
            0 => {
                drop(a);
                echo(&mut b);
                // SAFETY: ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(0) }
            }
            pid if pid > 0 => child = Some(pid),
            _ => panic!("fork failed: {}", std::io::Error::last_os_error()),
        }
        drop(b);
    } else {
        thread = Some(std::thread::spawn(move || echo(&mut b)));
    }
    let mut m = [0u8; 64];
    let t = Instant::now();
    for _ in 0..n {
        a.write_all(&m).expect("write");
        a.read_exact(&mut m).expect("read");
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    if let Some(pid) = child {
        // SAFETY: waits for the child forked above; a null status pointer is allowed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    if let Some(t) = thread {
        t.join().expect("echo thread");
    }
    us
}

fn main() {
    let scale: usize = match std::env::args().nth(1) {
        None => 10,
        Some(a) => a.parse().unwrap_or_else(|_| {
            eprintln!("ipc_cost: {a} is not a number");
            std::process::exit(2)
        }),
    };
    let n = 2000 * scale;
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: getppid has no preconditions and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    println!("null system call (getppid): {:.2} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    println!("thread wake-up round trip (park/unpark): {:.1} us", wake_round_trip(200 * scale as u64));
    println!(
        "64-byte round trip over a Unix socket: to a thread {:.1} us, to another process {:.1} us",
        small_round_trip(200 * scale, false),
        small_round_trip(200 * scale, true)
    );
    for (size, n, stream) in [
        (4096, 200 * scale, false),
        (4096, 1000 * scale, true),
        (128 << 10, 50 * scale, false),
        (128 << 10, 100 * scale, true),
    ] {
        let (c, s) = tcp_pair();
        let tcp = messages(c, s, size, n, stream);
        let (c, s) = UnixStream::pair().expect("socketpair");
        let unix = messages(c, s, size, n, stream);
        let how = if stream { "streamed" } else { "round trip" };
        println!("{:>3} KiB message, {how}: loopback TCP {tcp:.1} us, Unix socket {unix:.1} us", size >> 10);
    }
}
