//! Fuzzes the network-sync datagram decoder and the receiver behind it.
//!
//! Every input is used twice:
//!
//! 1. **raw**: the bytes as one datagram for `wire::decode`, then its
//!    payload for the decoder of its kind (ack, nack, hello, repair). An
//!    accepted datagram or payload must re-encode to exactly the same bytes
//!    (the format is canonical: reserved and MAC bytes must be zero).
//! 2. **program**: the first bytes pick an FEC scheme and payload size; the
//!    rest drives a real sender (`fuzzing::Sender`, the link's fragmenter
//!    and FEC encoder) and receiver (`fuzzing::Receiver`: FEC decoder,
//!    reorder buffer, reassembly, nack list): queue a message, send the
//!    next datagram (delivered, lost, or with a byte flipped), flush FEC,
//!    retransmit a seq, ack, or deliver raw bytes (as is, or with the crc
//!    fixed so they get past it).
//!
//! Asserts: no panic; the receiver's invariants (`Receiver::feed`); and
//! while no raw datagram with a valid crc and the link's id reached the
//! receiver (without a MAC such a datagram is indistinguishable from the
//! sender's), the delivered messages are exactly the sent ones, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use starblk_fec::{FecScheme, RepairPacket};
use starblk_netsync::fuzzing::{Receiver, Sender};
use starblk_netsync::wire::{self, AckPayload, HelloPayload, Kind, NackPayload};

const LINK_ID: u32 = 0x5eed;

#[path = "input.rs"]
mod input;
use input::Input;

/// (1) One datagram and its payload.
fn raw(data: &[u8]) {
    // A keyed end: only a datagram whose MAC verifies is accepted, and it
    // re-encodes to its bytes.
    let key = wire::DatagramKey::new([7; 32]);
    if let Ok(d) = wire::decode_keyed(data, Some(&key)) {
        let mut again = Vec::new();
        wire::encode_keyed(&d.header, d.payload, &mut again, Some(&key));
        assert_eq!(again, data, "an accepted keyed datagram must re-encode to its bytes");
    }
    let Ok(d) = wire::decode(data) else {
        return;
    };
    let mut again = Vec::new();
    wire::encode_into(&d.header, d.payload, &mut again);
    assert_eq!(again, data, "an accepted datagram must re-encode to its bytes");
    let mut p = Vec::new();
    match d.header.kind {
        Kind::Ack => {
            if let Ok(a) = AckPayload::decode(d.payload) {
                a.encode_into(&mut p);
                assert_eq!(p, d.payload);
            }
        }
        Kind::Nack => {
            if let Ok(n) = NackPayload::decode(d.payload) {
                n.encode_into(&mut p);
                assert_eq!(p, d.payload);
            }
        }
        Kind::Hello => {
            if let Ok(h) = HelloPayload::decode(d.payload) {
                h.encode_into(&mut p);
                assert_eq!(p, d.payload);
            }
        }
        Kind::Repair => {
            if let Ok(r) = RepairPacket::decode(d.payload) {
                r.encode_into(&mut p);
                assert_eq!(p, d.payload);
            }
        }
        Kind::Data => {}
    }
}

fn scheme(input: &mut Input<'_>) -> Option<FecScheme> {
    let pick = input.u8();
    let r = 1 + usize::from(input.u8() % 12);
    let c = 1 + usize::from(input.u8() % 4);
    match pick % 3 {
        0 => None,
        1 => {
            let strides: Vec<u64> = (0..c).map(|k| 1 + u64::from(input.u8() % 32) * k as u64).collect();
            FecScheme::layered_xor_with_strides(r, &strides).ok()
        }
        _ => FecScheme::reed_solomon(r, c).ok(),
    }
}

/// Rewrites a datagram's crc so it passes (after the fuzzer changed it).
fn fix_crc(b: &mut [u8]) {
    if b.len() < wire::HEADER_BYTES {
        return;
    }
    b[44..48].fill(0);
    let crc = crc32c::crc32c(b);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
}

struct Run {
    tx: Sender,
    rx: Receiver,
    sent: Vec<Vec<u8>>,
    delivered: usize,
    clean: bool,
    now_ms: u64,
}

impl Run {
    fn deliver(&mut self, bytes: &[u8]) {
        for m in self.rx.feed(bytes, self.now_ms) {
            if self.clean {
                assert_eq!(Some(&m), self.sent.get(self.delivered), "message {} differs", self.delivered);
            }
            self.delivered += 1;
        }
    }

    fn send_next(&mut self, input: &mut Input<'_>, op: u8) {
        let Some(mut b) = self.tx.next_datagram() else {
            return;
        };
        match op >> 4 {
            0..=9 => self.deliver(&b),
            10..=13 => {} // lost
            _ => {
                let at = usize::from(input.u16()) % b.len();
                b[at] ^= input.u8() | 1;
                self.deliver(&b); // the crc catches it
            }
        }
    }

    fn send_raw(&mut self, input: &mut Input<'_>, op: u8) {
        let len = usize::from(input.u16() % 1600);
        let mut b = input.bytes(len).to_vec();
        if op & 0x10 != 0 && b.len() >= wire::HEADER_BYTES {
            b[0..5].copy_from_slice(&[b'S', b'B', b'n', b's', wire::VERSION]);
            b[8..12].copy_from_slice(&LINK_ID.to_le_bytes());
            let payload_len = (b.len() - wire::HEADER_BYTES) as u16;
            b[12..14].copy_from_slice(&payload_len.to_le_bytes());
            // No MAC trailer: a datagram claiming one is refused anyway.
            b[6] &= !wire::FLAG_MAC;
            fix_crc(&mut b);
        }
        if wire::decode(&b).is_ok_and(|d| matches!(d.header.kind, Kind::Data | Kind::Repair)) {
            self.clean = false;
        }
        self.deliver(&b);
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let op = input.u8();
        match op & 0x0f {
            0..=2 => {
                let len = usize::from(input.u16()) % (48 << 10);
                let fill = input.u8();
                let mut m = input.bytes(len.min(32)).to_vec();
                m.resize(len, fill);
                self.tx.push(m.clone());
                self.sent.push(m);
            }
            3..=8 => self.send_next(input, op),
            9 => self.tx.flush(),
            10 => {
                let seq = 1 + u64::from(input.u16()) % self.tx.sent_seqs().max(1);
                if let Some(b) = self.tx.resend(seq) {
                    self.deliver(&b);
                }
            }
            11 => self.tx.ack(1 + u64::from(input.u16()) % (self.tx.sent_seqs() + 1)),
            12 => self.now_ms += u64::from(input.u8()),
            _ => self.send_raw(input, op),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    raw(data);
    let mut input = Input(data);
    let fec = scheme(&mut input);
    let payload_bytes = 64 + usize::from(input.u16() % 2048);
    let hello = HelloPayload {
        fec: fec.clone(),
        payload_bytes: payload_bytes as u32,
        max_message_bytes: 64 << 10,
        recv_window_seqs: 256,
        nonce: 1,
        auth_nonce: None,
    };
    let mut run = Run {
        tx: Sender::new(LINK_ID, payload_bytes, fec),
        rx: Receiver::new(LINK_ID, &hello),
        sent: Vec::new(),
        delivered: 0,
        clean: true,
        now_ms: 0,
    };
    while !input.is_empty() {
        run.step(&mut input);
    }
    assert!(run.delivered <= run.sent.len() || !run.clean);
});
