//! Fuzzes `RepairPacket::decode` and the `Decoder`.
//!
//! The input is a small program. Its first bytes pick a scheme and decoder
//! bounds; the rest is a sequence of events:
//!
//! - send a data packet through an `Encoder` (delivered or lost),
//! - deliver or lose the oldest repair the encoder produced, possibly with
//!   a byte of its wire form changed,
//! - flush the encoder,
//! - deliver raw bytes as a repair packet.
//!
//! It must never panic, and while every repair delivered is one the encoder
//! produced unchanged, every recovered packet must equal the one sent.

#![no_main]

use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::fuzz_target;
use starblk_fec::{Decoder, DecoderConfig, Encoder, FecScheme, RepairPacket};

#[path = "input.rs"]
mod input;
use input::Input;

fn scheme(input: &mut Input<'_>) -> FecScheme {
    let pick = input.u8();
    let r = 1 + usize::from(input.u8() % 16);
    let c = 1 + usize::from(input.u8() % 4);
    let built = if pick & 1 == 0 {
        let strides: Vec<u64> = (0..c).map(|k| 1 + u64::from(input.u8()) * k as u64).collect();
        FecScheme::layered_xor_with_strides(r, &strides)
    } else {
        FecScheme::reed_solomon(r, c)
    };
    built.unwrap_or_else(|_| FecScheme::layered_xor(8, 3).expect("default scheme"))
}

/// State shared by the events.
struct Run {
    enc: Encoder,
    dec: Decoder,
    sent: HashMap<u64, Vec<u8>>,
    queue: VecDeque<RepairPacket>,
    next_seq: u64,
    /// False once a changed or raw repair reached the decoder: after that a
    /// wrong recovery is the sender's fault, not the decoder's.
    clean: bool,
    wire: Vec<u8>,
}

impl Run {
    fn send_data(&mut self, input: &mut Input<'_>, lose: bool) {
        self.next_seq += 1 + u64::from(input.u8() % 4);
        let len = usize::from(input.u16() % 1500);
        let fill = input.u8();
        let mut payload = input.bytes(len.min(16)).to_vec();
        payload.resize(len, fill);
        let mut repairs = Vec::new();
        if self.enc.push(self.next_seq, &payload, &mut repairs).is_err() {
            return;
        }
        self.queue.extend(repairs);
        if !lose {
            let mut out = Vec::new();
            let _ = self.dec.on_data(self.next_seq, &payload, &mut out);
            self.check(out);
        }
        self.sent.insert(self.next_seq, payload);
    }

    fn send_repair(&mut self, input: &mut Input<'_>, op: u8) {
        let Some(repair) = self.queue.pop_front() else {
            return;
        };
        if op & 0x10 != 0 {
            return; // lost
        }
        let repair = if op & 0x20 != 0 {
            self.wire.clear();
            repair.encode_into(&mut self.wire);
            let at = usize::from(input.u16()) % self.wire.len();
            self.wire[at] ^= input.u8() | 1;
            match RepairPacket::decode(&self.wire) {
                Ok(changed) => {
                    self.clean = false;
                    changed
                }
                Err(_) => return,
            }
        } else {
            repair
        };
        let mut out = Vec::new();
        let _ = self.dec.on_repair(repair, &mut out);
        self.check(out);
    }

    fn send_raw(&mut self, input: &mut Input<'_>) {
        let len = usize::from(input.u16() % 2048);
        if let Ok(repair) = RepairPacket::decode(input.bytes(len)) {
            self.clean = false;
            let mut out = Vec::new();
            let _ = self.dec.on_repair(repair, &mut out);
            self.check(out);
        }
    }

    fn check(&self, out: Vec<starblk_fec::Recovered>) {
        for rec in out {
            assert!(self.dec.contains(rec.seq) || rec.seq < self.dec.low_seq());
            if self.clean {
                assert_eq!(self.sent.get(&rec.seq), Some(&rec.payload), "seq {}", rec.seq);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Every input is also tried as one raw repair packet.
    if let Ok(p) = RepairPacket::decode(data) {
        let mut again = Vec::new();
        p.encode_into(&mut again);
        assert_eq!(again, data, "accepted input must be canonical");
    }
    let mut input = Input(data);
    let scheme = scheme(&mut input);
    let config = DecoderConfig {
        window_seqs: 1 + u64::from(input.u16() % 4096),
        max_pending_groups: 1 + usize::from(input.u8()),
        max_advance_seqs: 1 + u64::from(input.u16()),
    };
    let Ok(dec) = Decoder::with_config(&scheme, config) else {
        return;
    };
    let mut run = Run {
        enc: Encoder::new(scheme),
        dec,
        sent: HashMap::new(),
        queue: VecDeque::new(),
        next_seq: u64::from(input.u16()),
        clean: true,
        wire: Vec::new(),
    };
    while !input.is_empty() {
        let op = input.u8();
        match op & 0x0f {
            0..=5 => run.send_data(&mut input, op & 0x10 != 0),
            6..=11 => run.send_repair(&mut input, op),
            12 | 13 => {
                let mut repairs = Vec::new();
                let _ = run.enc.flush(&mut repairs);
                run.queue.extend(repairs);
            }
            _ => run.send_raw(&mut input),
        }
    }
});
