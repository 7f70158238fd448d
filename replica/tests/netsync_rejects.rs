//! A replica counts the network-sync datagrams it drops, by reason, in its
//! own stats (`Server::netsync_rejected`, the Stats frame's
//! `netsync_rejected`): those its listener drops (garbage, a hello under a
//! key it does not hold, data of a link it does not hold) and those an
//! accepted link drops (forged or malformed datagrams in an open session).
//! A link's counts outlive its session.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starblk_netsync::wire::{self, Header, Kind};
use starblk_netsync::{Link, LinkConfig, LinkKey, Rejected};
use starblk_replica::client;
use starblk_replica::server::{self, ServeOptions, ServerHandle};

const KEY: [u8; 32] = [0x4b; 32];
const OTHER_KEY: [u8; 32] = [0x4f; 32];
const SESSION: Duration = Duration::from_secs(3);

/// A fresh 4 MiB replica served on loopback, keyed with `KEY` or not.
fn serve(keyed: bool) -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("r");
    starblk_replica::store::init(&data, 4 << 20, starblk_replica::log::LOG_MIN_BYTES).unwrap();
    let mut opts = ServeOptions::default();
    if keyed {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("keys");
        let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        opts.key_file = Some(path);
    }
    let h = server::spawn_with(&data, "127.0.0.1:0", &opts).unwrap();
    // Sessions here send no messages, so each ends this long after it
    // opened: long enough to see an open session's counts, short enough
    // to see them kept after it ended.
    h.server.set_netsync_silence_timeout(SESSION);
    (dir, h)
}

/// A UDP relay between a link and the replica: the replica's link socket is
/// connected to `back`, so datagrams sent on `back` reach the open session
/// as if its peer sent them.
struct Relay {
    front: SocketAddr,
    back: Arc<UdpSocket>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn to(replica: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        back.connect(replica).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let peer = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (f, b, st, p) = (front.clone(), back.clone(), stop.clone(), peer.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = f.recv_from(&mut buf) {
                    *p.lock().unwrap() = Some(from);
                    let _ = b.send(&buf[..n]);
                }
            }
        });
        let (f, b, st) = (front.clone(), back.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = b.recv(&mut buf) {
                    if let Some(to) = *peer.lock().unwrap() {
                        let _ = f.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Relay { front: front.local_addr().unwrap(), back, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An unkeyed data datagram of link `link_id`.
fn data_datagram(link_id: u32) -> Vec<u8> {
    let payload = b"forged";
    let h = Header {
        kind: Kind::Data,
        flags: 0,
        link_id,
        seq: 1,
        msg_id: 1,
        frag_index: 0,
        frag_count: 1,
        msg_len_bytes: payload.len() as u32,
    };
    let mut b = Vec::new();
    wire::encode_into(&h, payload, &mut b);
    b
}

/// A link from loopback to the replica's UDP port through `relay`.
fn link_via(relay: &Relay, key: Option<[u8; 32]>) -> Link {
    let mut cfg = LinkConfig { key: key.map(LinkKey::new), ..LinkConfig::default() };
    cfg.payload_bytes = starblk_netsync::payload_bytes_for_mtu_keyed(
        starblk_netsync::DEFAULT_MTU_BYTES,
        cfg.fec.as_ref(),
        key.is_some(),
    );
    let l = Link::connect("127.0.0.1:0".parse().unwrap(), relay.front, cfg).unwrap();
    l.wait_established(Duration::from_secs(5)).expect("the link to the replica comes up");
    l
}

fn wait_for(h: &ServerHandle, what: &str, f: impl Fn(&Rejected) -> bool) -> Rejected {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = h.server.netsync_rejected();
        if f(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{what}: counted {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails unless the network-sync session is still open: counts seen
/// before this were an open link's, not folded in when the session ended.
fn assert_session_open(h: &ServerHandle) {
    assert_eq!(h.server.sessions_open(), 1, "counted only once the session ended");
}

fn wait_sessions_closed(h: &ServerHandle) {
    let deadline = Instant::now() + SESSION + Duration::from_secs(5);
    while h.server.sessions_open() > 0 {
        assert!(Instant::now() < deadline, "the network-sync session did not end on silence");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_and_other_sessions_datagrams_are_counted_by_reason() {
    let (_dir, h) = serve(false);
    assert_eq!(h.server.netsync_rejected(), Rejected::default());
    let relay = Relay::to(h.addr);
    let he = link_via(&relay, None);
    // In the open session: a datagram cut inside its header, and one of
    // another link (another session's).
    relay.back.send(&[0x5a; 5]).unwrap();
    relay.back.send(&data_datagram(he.link_id().wrapping_add(1))).unwrap();
    // At the listener: garbage, and data of a link it does not hold (a
    // session that ended).
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.send_to(&[1, 2, 3], h.addr).unwrap();
    raw.send_to(&data_datagram(0xdead), h.addr).unwrap();
    let r = wait_for(&h, "2 truncated, 2 of another link", |r| r.truncated == 2 && r.wrong_link_id == 2);
    assert_session_open(&h);
    assert_eq!(r.total(), 4, "nothing else was dropped: {r:?}");
    // The Stats frame carries them by reason.
    let stats = client::stats(&h.addr.to_string(), Duration::from_secs(3)).unwrap();
    assert_eq!(stats["netsync_rejected"]["truncated"], 2, "{stats}");
    assert_eq!(stats["netsync_rejected"]["wrong_link_id"], 2, "{stats}");
    assert_eq!(stats["netsync_rejected"]["bad_mac"], 0, "{stats}");
    // The session ends; what its link counted stays.
    drop(he);
    wait_sessions_closed(&h);
    assert_eq!(h.server.netsync_rejected(), r);
    h.stop();
}

#[test]
fn forged_datagrams_of_a_keyed_replica_are_counted_as_bad_mac() {
    let (_dir, h) = serve(true);
    let relay = Relay::to(h.addr);
    let he = link_via(&relay, Some(KEY));
    // In the open session: datagrams with no MAC, of this link and of another.
    relay.back.send(&data_datagram(he.link_id())).unwrap();
    relay.back.send(&data_datagram(he.link_id().wrapping_add(1))).unwrap();
    let in_session = wait_for(&h, "2 bad MACs in the session", |r| r.bad_mac >= 2);
    assert_session_open(&h);
    assert_eq!(in_session.bad_mac, 2, "{in_session:?}");
    // At the listener: a hello under a key the replica does not hold.
    let other = Relay::to(h.addr);
    let cfg = LinkConfig { key: Some(LinkKey::new(OTHER_KEY)), ..LinkConfig::default() };
    let forger = Link::connect("127.0.0.1:0".parse().unwrap(), other.front, cfg).unwrap();
    let r = wait_for(&h, "the forged hello", |r| r.bad_mac >= 3);
    assert_eq!(r.total(), r.bad_mac, "only MAC failures: {r:?}");
    drop((he, forger));
    wait_sessions_closed(&h);
    assert!(h.server.netsync_rejected().bad_mac >= 3);
    h.stop();
}
