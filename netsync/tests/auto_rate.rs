//! `auto_rate` and health over the WAN emulator:
//! - pacing to the measured delivery rate finds a 20 Mbit/s, 20 ms path
//!   without overflowing its 1 MiB queue, and keeps most of its capacity;
//! - loss beyond what the FEC code repairs turns the link `Degraded`
//!   (event, state and counters), and it turns `Healthy` again once the
//!   loss is back within the code's capacity for the hold time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{init_tracing, localhost, transfer};
use starblk_netsync::{Health, Link, LinkConfig, LinkEvent, Listener};
use starblk_wanem::{Direction, LinkParams, RelayHandle, UdpRelayConfig};

fn pair(he: LinkConfig, params: LinkParams) -> (Link, Link, RelayHandle) {
    let mut listener = Listener::bind(localhost(), LinkConfig::default()).unwrap();
    let relay = UdpRelayConfig::new(localhost(), listener.local_addr()).symmetric(params).seed(11).start().unwrap();
    let he = Link::connect(localhost(), relay.local_addr(), he).unwrap();
    let replica = listener.accept_timeout(Duration::from_secs(5)).unwrap().expect("accept");
    he.wait_established(Duration::from_secs(5)).unwrap();
    (he, replica, relay)
}

#[test]
fn auto_rate_paces_to_the_path() {
    init_tracing();
    const RATE: u64 = 20_000_000;
    let params = LinkParams { delay_ms: 20.0, rate_bits_per_s: RATE, ..LinkParams::default() };
    let (he, replica, relay) = pair(LinkConfig { auto_rate: true, ..LinkConfig::default() }, params);
    assert_eq!(he.stats().tx.pacing_rate_bits_per_s, starblk_netsync::auto_rate::INITIAL_RATE_BITS_PER_S);
    // 12 MB: about 6 s at the path's rate with FEC's 3/11.
    let msgs: Vec<Vec<u8>> = (0..192).map(|i| vec![i as u8; 64 << 10]).collect();
    let t0 = Instant::now();
    let got = transfer(&he, Arc::new(replica), &msgs, Duration::from_secs(60));
    let elapsed = t0.elapsed();
    assert_eq!(got.len(), msgs.len());
    let s = he.stats();
    let up = relay.dir_stats(Direction::Up);
    let wire_bits = (s.tx.bytes_sent + 28 * (s.tx.data_packets + s.tx.repair_packets + s.tx.retransmitted_packets)) * 8;
    let use_of_path = wire_bits as f64 / elapsed.as_secs_f64() / RATE as f64;
    eprintln!(
        "auto: {elapsed:?}, {:.2} of the path's rate, pacing {:.1} Mbit/s, delivery {:.1} Mbit/s, min rtt {} us, \
         phase {}, {} back-offs; relay dropped {} at its queue; retransmitted {}",
        use_of_path,
        s.tx.pacing_rate_bits_per_s as f64 / 1e6,
        s.tx.delivery_rate_bits_per_s as f64 / 1e6,
        s.tx.min_rtt_us,
        s.tx.rate_phase,
        s.tx.rate_backoffs,
        up.dropped_queue,
        s.tx.retransmitted_packets
    );
    // It found the path: the estimate and the rate are near 20 Mbit/s...
    // The estimate is a max-filtered sample, and on a loaded machine acks
    // arrive bunched and inflate it: 8 runs beside four CPU hogs gave
    // 0.98-1.17 of the path, and 1 of 6 earlier ones went past 1.2. The
    // bound above is loose for that; the use of the path and the tail
    // drops below hold the controller to what it does with the estimate.
    let est = s.tx.delivery_rate_bits_per_s as f64 / RATE as f64;
    assert!((0.8..=1.35).contains(&est), "delivery rate estimate {est:.2} of the path's");
    assert!(s.tx.auto_rate && s.tx.rate_phase == "cruise", "{:?}", s.tx);
    // ...used most of it (startup from 10 Mbit/s included)...
    assert!(use_of_path >= 0.8, "used {use_of_path:.2} of the path");
    // ...and never overflowed the emulator's 1 MiB queue.
    assert_eq!(up.dropped_queue, 0, "tail drops at the bottleneck");
    assert_eq!(s.health, Health::Healthy);
}

#[test]
fn loss_beyond_the_codes_capacity_degrades_the_link_until_it_recovers() {
    init_tracing();
    let params = LinkParams { delay_ms: 5.0, loss_prob: 0.10, ..LinkParams::default() };
    let cfg = LinkConfig { rate_bits_per_s: 20_000_000, health_hold_ms: 500, ..LinkConfig::default() };
    let (he, replica, relay) = pair(cfg, params);
    let replica = Arc::new(replica);
    let r2 = replica.clone();
    // Drains the replica end (left running: the process ends with the test).
    std::thread::spawn(move || while r2.recv().is_ok() {});
    assert!((he.stats().fec_capacity - 0.0299).abs() < 0.001);
    // 10 % loss against a capacity of 3 %: degraded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut degraded_at = None;
    while degraded_at.is_none() && Instant::now() < deadline {
        he.send(&[7u8; 16 << 10]).unwrap();
        while let Ok(ev) = he.events().try_recv() {
            if ev == LinkEvent::Degraded {
                degraded_at = Some(Instant::now());
            }
        }
    }
    assert!(degraded_at.is_some(), "never degraded: {:?}", he.stats());
    assert_eq!(he.health(), Health::Degraded);
    std::thread::sleep(Duration::from_millis(20));
    let s = he.stats();
    assert_eq!((s.health, s.degradations), (Health::Degraded, 1));
    assert!(s.loss > s.fec_capacity, "{} vs {}", s.loss, s.fec_capacity);
    // 0.5 % loss, well within the code: healthy after window + hold.
    relay.set_loss_both(0.005).unwrap();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    let mut healthy_after = None;
    while healthy_after.is_none() && Instant::now() < deadline {
        he.send(&[7u8; 16 << 10]).unwrap();
        while let Ok(ev) = he.events().try_recv() {
            if ev == LinkEvent::Healthy {
                healthy_after = Some(t0.elapsed());
            }
        }
    }
    let after = healthy_after.expect("never healthy again");
    eprintln!("degraded at 10 % loss; healthy {after:?} after the loss fell to 0.5 %");
    // Not before the hold time has passed.
    assert!(after >= Duration::from_millis(500), "{after:?}");
    assert_eq!(he.health(), Health::Healthy);
}
