//! How many datagrams per second the UDP relay forwards on this host.
//!
//! `cargo run --release -p starblk-wanem --example throughput [SIZE] [COUNT]`
//!
//! A sender keeps a bounded window of datagrams unread by the relay (so no
//! socket buffer overflows) and a sink counts arrivals; the link has a 10 ms
//! delay and no rate limit, so the relay's own forwarding speed is measured.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starblk_wanem::{LinkParams, UdpRelayConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(Ok(1400), |s| s.parse())?;
    let count: u64 = args.next().map_or(Ok(200_000), |s| s.parse())?;
    let sink = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    sink.set_recv_buffer_size(4 << 20)?; // the sink must not be the bottleneck
    sink.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    let sink: UdpSocket = sink.into();
    sink.set_read_timeout(Some(Duration::from_millis(500)))?;
    let relay = Arc::new(
        UdpRelayConfig::new("127.0.0.1:0".parse()?, sink.local_addr()?)
            .symmetric(LinkParams { delay_ms: 10.0, ..Default::default() })
            .seed(1)
            .start()?,
    );
    let (to, r) = (relay.local_addr(), relay.clone());
    let sender = std::thread::spawn(move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        let payload = vec![0u8; size];
        for sent in 1..=count {
            s.send_to(&payload, to)?;
            // At most 512 datagrams unread by the relay.
            while sent > r.stats().up.received + 512 {
                std::thread::yield_now();
            }
        }
        Ok(s)
    });
    let mut buf = vec![0u8; 65536];
    let (mut got, mut first, mut last) = (0u64, None, Instant::now());
    while got < count {
        match sink.recv(&mut buf) {
            Ok(_) => {
                got += 1;
                last = Instant::now();
                first.get_or_insert(last);
            }
            Err(_) => break, // nothing for 500 ms: the rest was dropped
        }
    }
    let _ = sender.join();
    let secs = (last - first.unwrap_or(last)).as_secs_f64().max(1e-9);
    let s = relay.stats().up;
    println!(
        "{got}/{count} datagrams of {size} B: {:.0} pkt/s, {:.0} Mbit/s; relay dropped_rcvbuf {} late_mean {} us",
        got as f64 / secs,
        got as f64 * size as f64 * 8.0 / secs / 1e6,
        s.dropped_rcvbuf,
        s.late_mean_us
    );
    Ok(())
}
