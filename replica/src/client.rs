//! The HE side of the TCP protocol: connect, handshake, and one-shot admin
//! requests (probe, set epoch, stamp, stats).

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::auth::{self, AuthFailure, Credentials, Side};
use crate::proto::{
    self, AuthChallenge, AuthHello, Changes, ChangesReply, ErrorCode, ErrorFrame, FrameError, FrameReader, FrameType,
    Hello, HelloOk, ReadError, RegionHeader, RegionRead, Seal, Stamp, Uuid, WriteHeader,
};

/// One log record as read from a replica.
pub type LogEntry = (WriteHeader, Vec<u8>);

/// A client-side failure, naming the replica address.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or talking to the replica failed.
    #[error("replica {addr}: {source}")]
    Io { addr: String, source: io::Error },
    /// The replica refused the request.
    #[error("replica {addr} refused: {code:?}: {message}", code = .frame.code, message = .frame.message)]
    Rejected { addr: String, frame: ErrorFrame },
    /// The replica sent something that is not a valid frame.
    #[error("replica {addr}: protocol error: {source}")]
    Protocol { addr: String, source: FrameError },
    /// The replica answered with an unexpected frame type.
    #[error("replica {addr}: unexpected {kind:?} frame")]
    Unexpected { addr: String, kind: FrameType },
    /// Authentication failed (either side refused).
    #[error("replica {addr}: authentication failed: {failure}: {detail}")]
    Auth { addr: String, failure: AuthFailure, detail: String },
}

impl ClientError {
    /// The authentication failure this error is, if any: a handshake
    /// refusal, or a frame that failed its MAC.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            ClientError::Auth { failure, .. } => Some(*failure),
            ClientError::Protocol { source: FrameError::BadMac { .. }, .. } => Some(AuthFailure::BadMac),
            ClientError::Rejected { frame, .. } if frame.code == ErrorCode::Auth => Some(AuthFailure::Refused),
            _ => None,
        }
    }
}

/// An open session: the read half (buffered) and the write half.
pub struct Session {
    /// Buffered frame reader.
    pub reader: FrameReader<TcpStream>,
    /// Write half (Nagle off).
    pub writer: TcpStream,
    /// Seals frames sent on `writer` once the session authenticated.
    pub seal: Seal,
    /// The replica's answer to Hello.
    pub hello: HelloOk,
    /// The address dialled.
    pub addr: String,
}

/// Opens a TCP connection with Nagle off and a connect timeout.
pub fn dial(addr: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let err = |source| ClientError::Io { addr: addr.to_string(), source };
    let sa = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing")))?;
    let s = TcpStream::connect_timeout(&sa, timeout).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    Ok(s)
}

/// Connects and performs the Hello handshake (no authentication).
pub fn connect(addr: &str, hello: Hello, timeout: Duration) -> Result<Session, ClientError> {
    connect_with(addr, hello, timeout, None)
}

/// Connects, authenticates with `creds` if given (the replica must then
/// hold the key), and performs the Hello handshake.
pub fn connect_with(
    addr: &str,
    hello: Hello,
    timeout: Duration,
    creds: Option<&Credentials>,
) -> Result<Session, ClientError> {
    let mut s = dial_session(addr, timeout, creds)?;
    let err = |source| ClientError::Io { addr: addr.to_string(), source };
    s.send(FrameType::Hello, &[&hello.encode()])?;
    let hello_ok = {
        let p = expect(&mut s.reader, addr, FrameType::HelloOk)?;
        HelloOk::decode(&p).map_err(|source| ClientError::Protocol { addr: addr.to_string(), source })?
    };
    s.reader.get_ref().set_read_timeout(None).map_err(err)?;
    s.hello = hello_ok;
    Ok(s)
}

/// The client half of the authentication handshake, over any transport:
/// sends AuthHello through `send`, checks the replica's proof, and keys
/// `reader`; returns the key to seal sent frames with. The replica learns
/// that this side holds the key from its first sealed frame.
pub fn authenticate<R: std::io::Read>(
    reader: &mut FrameReader<R>,
    send: impl FnOnce(FrameType, &[&[u8]]) -> std::io::Result<()>,
    creds: &Credentials,
    addr: &str,
) -> Result<auth::FrameKey, ClientError> {
    let io = |source| ClientError::Io { addr: addr.to_string(), source };
    let flags = if creds.encrypt { auth::AUTH_ENCRYPT } else { 0 };
    let hello = AuthHello { key_id: creds.key.id(), flags, nonce: auth::fresh_nonce().map_err(io)? };
    let hello_bytes = hello.encode();
    send(FrameType::AuthHello, &[&hello_bytes]).map_err(io)?;
    let fail = |failure, detail: String| ClientError::Auth { addr: addr.to_string(), failure, detail };
    let p = match expect(reader, addr, FrameType::AuthChallenge) {
        Ok(p) => p,
        Err(ClientError::Rejected { frame, .. }) if frame.code == ErrorCode::Auth => {
            return Err(fail(AuthFailure::Refused, frame.message));
        }
        Err(e) => return Err(e),
    };
    let ch = AuthChallenge::decode(&p).map_err(|source| ClientError::Protocol { addr: addr.to_string(), source })?;
    if !auth::proof_ok(&creds.key, &hello_bytes, &ch.nonce, &ch.proof) {
        let detail = format!("its proof does not verify under key {}", creds.key.id());
        return Err(fail(AuthFailure::BadProof, detail));
    }
    let (tx, rx) = auth::frame_keys(Side::Client, &creds.key, &hello_bytes, &ch.nonce, creds.encrypt);
    reader.set_auth(rx);
    Ok(tx)
}

/// Reads one frame and insists on `kind`; Error frames become `Rejected`.
pub fn expect<R: std::io::Read>(
    reader: &mut FrameReader<R>,
    addr: &str,
    kind: FrameType,
) -> Result<Vec<u8>, ClientError> {
    let (h, p) = reader.next_frame().map_err(|e| read_err(addr, e))?;
    if h.kind == kind {
        return Ok(p.to_vec());
    }
    if h.kind == FrameType::Error {
        let frame = ErrorFrame::decode(p).map_err(|source| ClientError::Protocol { addr: addr.to_string(), source })?;
        return Err(ClientError::Rejected { addr: addr.to_string(), frame });
    }
    Err(ClientError::Unexpected { addr: addr.to_string(), kind: h.kind })
}

/// Maps a frame read failure to a client error.
pub fn read_err(addr: &str, e: ReadError) -> ClientError {
    match e {
        ReadError::Io(source) => ClientError::Io { addr: addr.to_string(), source },
        ReadError::Frame(source) => ClientError::Protocol { addr: addr.to_string(), source },
    }
}

impl Session {
    /// Sends one frame (sealed once the session authenticated).
    pub fn send(&mut self, kind: FrameType, parts: &[&[u8]]) -> Result<(), ClientError> {
        self.seal
            .write_frame(&mut self.writer, kind, 0, parts)
            .map_err(|source| ClientError::Io { addr: self.addr.clone(), source })
    }

    /// Sends a frame and waits for a reply of type `reply`.
    pub fn call(&mut self, kind: FrameType, parts: &[&[u8]], reply: FrameType) -> Result<Vec<u8>, ClientError> {
        self.send(kind, parts)?;
        expect(&mut self.reader, &self.addr, reply)
    }

    /// Reads log records `from..=to` (as Write headers and data), up to
    /// `max_bytes` of data; returns them and the first seq not returned.
    pub fn read_log(&mut self, from: u64, to: u64, max_bytes: u64) -> Result<(Vec<LogEntry>, u64), ClientError> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let next = self.stream_log(from, to, |wh, data| {
            bytes += data.len() as u64 + 64;
            let fits = bytes <= max_bytes;
            if fits {
                out.push((*wh, data.to_vec()));
            }
            fits
        })?;
        Ok((out, next))
    }

    /// Streams log records `from..=to` into `each` as they arrive, without
    /// holding them; returns the first seq not delivered (the peer's log
    /// end, or where `each` said stop by returning false).
    pub fn stream_log(
        &mut self,
        from: u64,
        to: u64,
        mut each: impl FnMut(&WriteHeader, &[u8]) -> bool,
    ) -> Result<u64, ClientError> {
        self.send(FrameType::LogRead, &[&proto::encode_u64_pair(from, to)])?;
        let mut next = from;
        let mut stopped = false;
        loop {
            let (h, p) = self.reader.next_frame().map_err(|e| read_err(&self.addr, e))?;
            let perr = |source| ClientError::Protocol { addr: self.addr.clone(), source };
            match h.kind {
                FrameType::LogRecord if stopped => {}
                FrameType::LogRecord => {
                    let (wh, data) = WriteHeader::decode(p).map_err(perr)?;
                    if wh.seq != next {
                        let source = proto::FrameError::Malformed { kind: h.kind, reason: "log record out of order" };
                        return Err(ClientError::Protocol { addr: self.addr.clone(), source });
                    }
                    if each(&wh, data) {
                        next += 1;
                    } else {
                        stopped = true;
                    }
                }
                FrameType::LogEnd => {
                    let _ = proto::decode_u64(h.kind, p).map_err(perr)?;
                    return Ok(next);
                }
                FrameType::Error => {
                    let frame = ErrorFrame::decode(p).map_err(perr)?;
                    return Err(ClientError::Rejected { addr: self.addr.clone(), frame });
                }
                kind => return Err(ClientError::Unexpected { addr: self.addr.clone(), kind }),
            }
        }
    }

    /// Asks a source replica which regions changed (`Changes`), and checks
    /// that the answer fits the question.
    pub fn changes(&mut self, req: &Changes) -> Result<ChangesReply, ClientError> {
        let p = self.call(FrameType::Changes, &[&req.encode()], FrameType::ChangesReply)?;
        let perr = |source| ClientError::Protocol { addr: self.addr.clone(), source };
        let r = ChangesReply::decode(&p).map_err(perr)?;
        let bad = |reason| perr(proto::FrameError::Malformed { kind: FrameType::ChangesReply, reason });
        if r.next > req.to || (r.next <= req.from && req.from < req.to) {
            return Err(bad("next region out of range"));
        }
        if r.regions.first().is_some_and(|f| *f < req.from) || r.regions.len() > req.max as usize {
            return Err(bad("regions out of range"));
        }
        if req.count_only && !r.regions.is_empty() {
            return Err(bad("regions in a count"));
        }
        Ok(r)
    }

    /// Sends a `RegionRead` (the answer comes through [`Session::recv_region`]).
    pub fn send_region_read(&mut self, r: RegionRead) -> Result<(), ClientError> {
        self.send(FrameType::RegionRead, &[&r.encode()])
    }

    /// Receives one `RegionData`: the region's header and its bytes (none
    /// when it is all zeroes).
    pub fn recv_region(&mut self) -> Result<(RegionHeader, Vec<u8>), ClientError> {
        let (h, p) = self.reader.next_frame().map_err(|e| read_err(&self.addr, e))?;
        let perr = |source| ClientError::Protocol { addr: self.addr.clone(), source };
        match h.kind {
            FrameType::RegionData => {
                let (rh, data) = RegionHeader::decode(p).map_err(perr)?;
                Ok((rh, data.to_vec()))
            }
            FrameType::Error => {
                let frame = ErrorFrame::decode(p).map_err(perr)?;
                Err(ClientError::Rejected { addr: self.addr.clone(), frame })
            }
            kind => Err(ClientError::Unexpected { addr: self.addr.clone(), kind }),
        }
    }

    /// Raises the replica's epoch to `epoch` (refused unless strictly
    /// greater than the replica's); returns the replica's state after the
    /// fence, with every record it had appended committed.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<HelloOk, ClientError> {
        let p = self.call(FrameType::SetEpoch, &[&proto::encode_u64(epoch)], FrameType::HelloOk)?;
        HelloOk::decode(&p).map_err(|source| ClientError::Protocol { addr: self.addr.clone(), source })
    }
}

/// Opens a probe session (no volume or epoch checks) to read replica state.
pub fn probe(addr: &str, timeout: Duration) -> Result<Session, ClientError> {
    probe_with(addr, timeout, None)
}

/// [`probe`], authenticated with `creds` if given.
pub fn probe_with(addr: &str, timeout: Duration, creds: Option<&Credentials>) -> Result<Session, ClientError> {
    connect_with(addr, Hello { volume: [0; 16], epoch: 0, flags: proto::HELLO_PROBE }, timeout, creds)
}

/// Stamps volume identity on a replica (`volume create`).
pub fn stamp(addr: &str, st: &Stamp, timeout: Duration) -> Result<u64, ClientError> {
    stamp_with(addr, st, timeout, None)
}

/// [`stamp`], authenticated with `creds` if given.
pub fn stamp_with(addr: &str, st: &Stamp, timeout: Duration, creds: Option<&Credentials>) -> Result<u64, ClientError> {
    let mut s = probe_with(addr, timeout, creds)?;
    let p = s.call(FrameType::Stamp, &[&st.encode()], FrameType::Ack)?;
    proto::decode_u64(FrameType::Ack, &p).map_err(|source| ClientError::Protocol { addr: addr.to_string(), source })
}

/// Stores a new replica set on a replica, over a session of the host at
/// `epoch` (`docs/design.md`, "Membership"); returns the stored version.
pub fn set_members(
    addr: &str,
    volume: Uuid,
    req: &proto::SetMembers,
    timeout: Duration,
    creds: Option<&Credentials>,
) -> Result<u64, ClientError> {
    let mut s = connect_with(addr, Hello { volume, epoch: req.epoch, flags: 0 }, timeout, creds)?;
    let p = s.call(FrameType::SetMembers, &[&req.encode()], FrameType::MembersOk)?;
    proto::decode_u64(FrameType::MembersOk, &p)
        .map_err(|source| ClientError::Protocol { addr: addr.to_string(), source })
}

/// Fetches a replica's counters as JSON.
pub fn stats(addr: &str, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    stats_with(addr, timeout, None)
}

/// [`stats`], authenticated with `creds` if given (a replica with a key
/// file answers nothing else).
pub fn stats_with(
    addr: &str,
    timeout: Duration,
    creds: Option<&Credentials>,
) -> Result<serde_json::Value, ClientError> {
    let mut s = dial_session(addr, timeout, creds)?;
    let p = s.call(FrameType::Stats, &[], FrameType::StatsReply)?;
    serde_json::from_slice(&p).map_err(|e| ClientError::Io { addr: addr.to_string(), source: e.into() })
}

/// Dials, and authenticates if `creds` are given; the session has no
/// Hello yet (its `hello` is empty). Reads time out after `timeout`.
pub fn dial_session(addr: &str, timeout: Duration, creds: Option<&Credentials>) -> Result<Session, ClientError> {
    let stream = dial(addr, timeout)?;
    let err = |source| ClientError::Io { addr: addr.to_string(), source };
    stream.set_read_timeout(Some(timeout)).map_err(err)?;
    let mut writer = stream.try_clone().map_err(err)?;
    let mut reader = FrameReader::new(stream);
    let mut seal = Seal::default();
    if let Some(c) = creds {
        let send = |kind, parts: &[&[u8]]| proto::write_frame(&mut writer, kind, 0, parts);
        seal = Seal::new(Some(authenticate(&mut reader, send, c, addr)?));
    }
    let hello = HelloOk {
        volume: [0; 16],
        epoch: 0,
        size_bytes: 0,
        block_size: 0,
        durable_seq: 0,
        history: crate::history::History::new(),
        copying: None,
        members: Default::default(),
        read_view: None,
    };
    Ok(Session { reader, writer, seal, hello, addr: addr.to_string() })
}

/// Formats a UUID in the usual 8-4-4-4-12 form.
pub fn uuid_string(u: &Uuid) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
