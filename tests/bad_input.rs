//! Bad input to a real replica process: each malformed or refused frame is
//! rejected and counted, and the same server still serves a good client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use starblk_replica::client;
use starblk_replica::history::History;
use starblk_replica::proto::{self, Adopt, FrameType, Hello, ReadReq, WriteHeader, WriteOp};

const T: Duration = Duration::from_secs(5);

fn frame(kind: FrameType, parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    proto::write_frame(&mut v, kind, 0, parts).unwrap();
    v
}

/// Sends raw bytes, then reads until the server closes (bounded).
fn send_raw(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn rejected(addr: &str, reason: &str) -> u64 {
    client::stats(addr, T).unwrap()["rejected"][reason].as_u64().unwrap_or(0)
}

fn hello(volume: [u8; 16], epoch: u64) -> Vec<u8> {
    frame(FrameType::Hello, &[&Hello { volume, epoch, flags: 0 }.encode()])
}

/// Hello, then Adopt of a history that the host of `epoch` started at 0.
fn hello_adopt(volume: [u8; 16], epoch: u64) -> Vec<u8> {
    let adopt = Adopt { last_seq: 0, history: History::new().branch(epoch, 0) };
    let mut b = hello(volume, epoch);
    b.extend(frame(FrameType::Adopt, &[&adopt.encode()]));
    b
}

fn write_frame_bytes(seq: u64, offset: u64, data: &[u8], epoch: u64) -> Vec<u8> {
    let wh = WriteHeader { seq, offset, len: data.len() as u32, op: WriteOp::Data, epoch };
    frame(FrameType::Write, &[&wh.encode(), data])
}

#[test]
fn every_bad_frame_is_rejected_and_counted_and_server_goes_on() {
    let c = Cluster::new(1, 1, "16MiB", "");
    let addr = c.replicas[0].addr.clone();
    let st = client::probe(&addr, T).unwrap().hello;
    let (uuid, epoch) = (st.volume, st.epoch);

    // Truncated: half a header, then EOF.
    send_raw(&addr, &hello(uuid, epoch)[..10]);
    assert_eq!(rejected(&addr, "truncated"), 1);

    // Bad frame check: flip a payload bit.
    let mut f = hello(uuid, epoch);
    f[40] ^= 1;
    send_raw(&addr, &f);
    assert_eq!(rejected(&addr, "bad_check"), 1);

    // Wrong length: the header claims more than the protocol allows.
    let mut f = hello(uuid, epoch);
    f[8..12].copy_from_slice(&(proto::MAX_PAYLOAD_BYTES + 1).to_le_bytes());
    send_raw(&addr, &f);
    assert_eq!(rejected(&addr, "too_long"), 1);

    // Wrong length inside a Write: data shorter than the header says.
    let wh = WriteHeader { seq: 1, offset: 0, len: 4096, op: WriteOp::Data, epoch };
    let mut bytes = hello(uuid, epoch);
    bytes.extend(frame(FrameType::Write, &[&wh.encode(), &[0u8; 100]]));
    send_raw(&addr, &bytes);
    assert_eq!(rejected(&addr, "malformed"), 1);

    // Wrong volume UUID.
    send_raw(&addr, &hello([9; 16], epoch));
    assert_eq!(rejected(&addr, "wrong_volume"), 1);

    // Stale epoch.
    send_raw(&addr, &hello(uuid, epoch - 1));
    assert_eq!(rejected(&addr, "stale_epoch"), 1);

    // Offset past the end, and a zero-length write.
    for (i, (off, data)) in [(16u64 << 20, vec![0u8; 4096]), (0, vec![])].iter().enumerate() {
        let mut bytes = hello_adopt(uuid, epoch);
        bytes.extend(write_frame_bytes(1, *off, data, epoch));
        send_raw(&addr, &bytes);
        assert_eq!(rejected(&addr, "out_of_range"), i as u64 + 1);
    }

    // Garbage that is not a frame at all.
    send_raw(&addr, b"GET / HTTP/1.1\r\n\r\n and then some more bytes to fill a header");
    assert_eq!(rejected(&addr, "bad_magic"), 1);

    // A good client is still served: write, ack, read back.
    let mut s = client::connect(&addr, Hello { volume: uuid, epoch, flags: 0 }, T).unwrap();
    let adopt = Adopt { last_seq: 0, history: History::new().branch(epoch, 0) };
    let ack = s.call(FrameType::Adopt, &[&adopt.encode()], FrameType::Ack).unwrap();
    assert_eq!(proto::decode_u64(FrameType::Ack, &ack).unwrap(), 0);
    let data = block(8192, 1, 4096);
    let wh = WriteHeader { seq: 1, offset: 8192, len: 4096, op: WriteOp::Data, epoch };
    s.send(FrameType::Write, &[&wh.encode(), &data]).unwrap();
    let ack = client::expect(&mut s.reader, &addr, FrameType::Ack).unwrap();
    assert_eq!(proto::decode_u64(FrameType::Ack, &ack).unwrap(), 1);
    let rr = ReadReq { req_id: 5, offset: 8192, len: 4096 };
    let p = s.call(FrameType::Read, &[&rr.encode()], FrameType::ReadReply).unwrap();
    let (id, status, got) = proto::decode_read_reply(&p).unwrap();
    assert_eq!((id, status), (5, 0));
    assert_eq!(got, &data[..]);
    // Out-of-range reads get an error status, not a dropped session.
    let rr = ReadReq { req_id: 6, offset: 1 << 40, len: 4096 };
    let p = s.call(FrameType::Read, &[&rr.encode()], FrameType::ReadReply).unwrap();
    assert_ne!(proto::decode_read_reply(&p).unwrap().1, 0);
    let p = s.call(FrameType::Heartbeat, &[&proto::encode_u64(1)], FrameType::HeartbeatReply).unwrap();
    let r = proto::HeartbeatReply::decode(&p).unwrap();
    assert_eq!((r.nonce, r.durable_seq), (1, 1));
}
