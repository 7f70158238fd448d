//! One NBD connection: the handshake, then the transmission phase.
//!
//! The connection's thread reads requests, checks them
//! ([`proto::check_request`]) and submits them to the engine without
//! waiting for their completion, so many are in flight at once. Refused
//! requests get their error reply through the same queue. A writer thread
//! sends replies in completion order. A malformed handshake or a request
//! stream that lost sync closes this connection only.

use std::io::{self, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::Receiver;

use super::inflight::{Credits, InFlight, Reply, ReplyQueue};
use super::proto::{self, Command, Next, ProtoError, RequestHeader};
use super::{Shared, Stream};
use crate::engine::{Request, DISCARD_MAX_BYTES};
use starblk_replica::proto::MAX_IO_BYTES;

/// A client has this long for each read of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options per handshake before the server gives up on the client.
const MAX_OPTIONS: usize = 64;
/// Requests in flight per connection, in credits: one per request, and a
/// read takes one per engine piece (1 MiB) of the data it will hold in
/// memory, so a connection buffers at most this many MiB of read data.
const MAX_IN_FLIGHT: usize = 32;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("more than {MAX_OPTIONS} options without entering transmission")]
    TooManyOptions,
    #[error("write payload of {0} bytes announced (at most {max} accepted)", max = proto::MAX_REQUEST_DATA)]
    PayloadTooLarge(u32),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ConnError {
    move |source| ConnError::Io { what, source }
}

/// Serves one connection to its end.
pub(super) fn serve(stream: Stream, id: u64, srv: &Shared) {
    let peer = stream.peer();
    match handshake(&stream, &srv.export) {
        Ok(Some(honours_block_size)) => {
            if !honours_block_size {
                tracing::info!(conn = id, %peer, min_block = srv.export.min_block, "NBD client did not ask for block size constraints; requests not aligned to them fail with EINVAL");
            }
            tracing::info!(conn = id, %peer, "NBD client connected");
            transmission(stream, id, srv);
        }
        Ok(None) => tracing::debug!(conn = id, %peer, "NBD client ended the handshake"),
        Err(e) => tracing::info!(conn = id, %peer, "NBD handshake failed: {e}"),
    }
}

/// Runs the option haggling. Returns `Some(asked for block sizes)` when
/// the client enters transmission, `None` when it aborts.
fn handshake(s: &Stream, export: &proto::Export) -> Result<Option<bool>, ConnError> {
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io_err("setting the handshake timeout"))?;
    let mut w = s;
    w.write_all(&proto::greeting()).map_err(io_err("sending the greeting"))?;
    let mut flags = [0u8; 4];
    read_exact(s, &mut flags, "reading client flags")?;
    let client = proto::decode_client_flags(&flags)?;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        read_exact(s, &mut h, "reading an option")?;
        let h = proto::OptionHeader::decode(&h)?;
        let mut data = vec![0u8; h.len as usize];
        read_exact(s, &mut data, "reading option data")?;
        let answer = proto::answer_option(h.option, &data, export, client);
        w.write_all(&answer.reply).map_err(io_err("answering an option"))?;
        match answer.next {
            Next::Options => {}
            Next::Close => return Ok(None),
            Next::Transmission => {
                s.set_read_timeout(None).map_err(io_err("clearing the handshake timeout"))?;
                return Ok(Some(answer.block_size_requested));
            }
        }
    }
    Err(ConnError::TooManyOptions)
}

fn read_exact(s: &Stream, buf: &mut [u8], what: &'static str) -> Result<(), ConnError> {
    let mut r = s;
    r.read_exact(buf).map_err(io_err(what))
}

/// Counters for the log line at the end of a connection.
#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    refused: u64,
}

fn transmission(stream: Stream, id: u64, srv: &Shared) {
    let credits = Arc::new(Credits::new(MAX_IN_FLIGHT));
    let (tx, rx) = crossbeam::channel::unbounded();
    let queue = Arc::new(ReplyQueue::new(tx, credits.clone()));
    let writer_stream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(conn = id, "NBD: cloning the socket for replies: {e}"),
    };
    let c2 = credits.clone();
    let writer = std::thread::Builder::new()
        .name(format!("nbd-reply-{id}"))
        .spawn(move || write_replies(writer_stream, rx, &c2));
    let writer = match writer {
        Ok(w) => w,
        Err(e) => return tracing::warn!(conn = id, "NBD: starting the reply thread: {e}"),
    };
    let mut stats = Stats::default();
    let result = read_requests(&stream, srv, &queue, &mut stats);
    // The spec asks the server to answer what is in flight before closing.
    credits.wait_idle();
    drop(queue);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
    match result {
        Ok(()) => {
            tracing::info!(conn = id, requests = stats.requests, refused = stats.refused, "NBD client disconnected")
        }
        Err(e) => {
            tracing::warn!(conn = id, requests = stats.requests, refused = stats.refused, "NBD connection closed: {e}")
        }
    }
}

/// Reads requests until the client disconnects (`NBD_CMD_DISC` or end of
/// stream) or the stream is unusable.
fn read_requests(s: &Stream, srv: &Shared, queue: &Arc<ReplyQueue>, stats: &mut Stats) -> Result<(), ConnError> {
    let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
    let mut payload = Vec::new();
    while read_header(s, &mut hdr)? {
        let h = RequestHeader::decode(&hdr)?;
        let checked = proto::check_request(&h, &srv.export);
        read_payload(s, &h, checked.is_ok(), &mut payload)?;
        stats.requests += 1;
        match checked {
            Ok(Command::Disc) => return Ok(()),
            Ok(cmd) => {
                let credits = credits_for(cmd);
                queue.credits().acquire(credits);
                submit(srv, queue, h.cookie, cmd, &payload, credits);
            }
            Err(error) => {
                stats.refused += 1;
                tracing::debug!(?h, error, "NBD request refused");
                queue.credits().acquire(1);
                queue.send(Reply { cookie: h.cookie, error, data: None, credits: 1 });
            }
        }
    }
    Ok(())
}

/// Reads a request header; `false` at a clean end of stream (between
/// requests), an error if the stream ends inside one.
fn read_header(s: &Stream, buf: &mut [u8]) -> Result<bool, ConnError> {
    let mut r = s;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io_err("reading a request")(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading a request")(e)),
        }
    }
    Ok(true)
}

/// Reads a write's payload into `buf`, or past it when the request was
/// refused (so the stream stays in sync without buffering it). Payloads
/// beyond [`proto::MAX_REQUEST_DATA`] close the connection.
fn read_payload(s: &Stream, h: &RequestHeader, keep: bool, buf: &mut Vec<u8>) -> Result<(), ConnError> {
    let n = h.payload_len();
    if n > proto::MAX_REQUEST_DATA {
        return Err(ConnError::PayloadTooLarge(n));
    }
    if keep {
        buf.resize(n as usize, 0);
        return read_exact(s, buf, "reading write data");
    }
    let skipped = io::copy(&mut s.take(u64::from(n)), &mut io::sink()).map_err(io_err("skipping write data"))?;
    if skipped < u64::from(n) {
        return Err(io_err("skipping write data")(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// The credits a request holds until its reply is written: a read one per
/// engine piece of its reply data (at most all of them), anything else one.
fn credits_for(cmd: Command) -> usize {
    match cmd {
        Command::Read { len, .. } => (len.div_ceil(MAX_IO_BYTES) as usize).clamp(1, MAX_IN_FLIGHT),
        _ => 1,
    }
}

/// Submits a checked request to the engine; its reply is queued when the
/// engine completes it.
fn submit(srv: &Shared, queue: &Arc<ReplyQueue>, cookie: u64, cmd: Command, payload: &[u8], credits: usize) {
    let (parts, read_len) = engine_requests(cmd, payload);
    let req = Arc::new(InFlight::new(cookie, read_len, parts.len(), queue.clone(), credits));
    let first = srv.router.register(&req, parts.len());
    for (token, r) in (first..).zip(parts) {
        srv.volume.submit(token, r);
    }
}

/// The engine requests for a command, and the length a read must return.
/// Reads and writes longer than the engine's largest I/O (the kernel's
/// client sends them, see [`proto::MAX_REQUEST_DATA`]) are cut into
/// [`MAX_IO_BYTES`] pieces, in order, so read piece `i` lands at
/// `i * MAX_IO_BYTES` in the reply; so are long trims and write-zeroes.
fn engine_requests(cmd: Command, payload: &[u8]) -> (Vec<Request<'_>>, Option<u32>) {
    let io = u64::from(MAX_IO_BYTES);
    match cmd {
        Command::Read { offset, len } => {
            (split(offset, len, io, |offset, len| Request::Read { offset, len }), Some(len))
        }
        Command::Write { offset, fua, .. } => {
            let parts = payload.chunks(MAX_IO_BYTES as usize).zip((offset..).step_by(MAX_IO_BYTES as usize));
            (parts.map(|(data, offset)| Request::Write { offset, data, fua }).collect(), None)
        }
        // The reader ends the connection at Disc and never gets here with
        // it; a flush would be a harmless answer.
        Command::Flush | Command::Disc => (vec![Request::Flush], None),
        Command::Trim { offset, len } => {
            (split(offset, len, DISCARD_MAX_BYTES, |offset, len| Request::Discard { offset, len }), None)
        }
        Command::WriteZeroes { offset, len } => {
            (split(offset, len, DISCARD_MAX_BYTES, |offset, len| Request::WriteZeroes { offset, len }), None)
        }
    }
}

/// Cuts `[offset, offset + len)` into ranges of at most `piece` bytes (a
/// multiple of every block size, so each piece stays aligned).
fn split<'a>(offset: u64, len: u32, piece: u64, make: impl Fn(u64, u32) -> Request<'a>) -> Vec<Request<'a>> {
    let len = u64::from(len);
    (0..len).step_by(piece as usize).map(|at| make(offset + at, (len - at).min(piece) as u32)).collect()
}

/// The writer thread: sends replies as they are queued, flushing when the
/// queue runs dry. After a write error it keeps draining (returning the
/// credits) and shuts the socket so the reader stops too.
fn write_replies(s: Stream, rx: Receiver<Reply>, credits: &Credits) {
    let mut w = BufWriter::with_capacity(64 << 10, &s);
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        let mut n = 0;
        let mut result = Ok(());
        for r in std::iter::once(first).chain(rx.try_iter()) {
            n += r.credits;
            if !broken && result.is_ok() {
                result = write_reply(&mut w, &r);
            }
        }
        if !broken {
            if let Err(e) = result.and_then(|()| w.flush()) {
                tracing::info!("NBD: sending replies failed: {e}");
                broken = true;
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        credits.release(n);
    }
}

fn write_reply(w: &mut impl Write, r: &Reply) -> io::Result<()> {
    w.write_all(&proto::encode_simple_reply(r.error, r.cookie))?;
    match &r.data {
        Some(d) => w.write_all(d),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_trims_split_into_aligned_engine_ranges() {
        let len: u32 = !4095;
        let (parts, read_len) = engine_requests(Command::Trim { offset: 8192, len }, &[]);
        assert_eq!(read_len, None);
        assert_eq!(parts.len(), 4);
        let mut at = 8192;
        for p in &parts {
            let Request::Discard { offset, len } = *p else { panic!("{p:?}") };
            assert_eq!(offset, at);
            assert!(u64::from(len) <= DISCARD_MAX_BYTES && len % 4096 == 0);
            at += u64::from(len);
        }
        assert_eq!(at, 8192 + u64::from(len));
        let (one, _) = engine_requests(Command::WriteZeroes { offset: 0, len: 4096 }, &[]);
        assert!(matches!(one[..], [Request::WriteZeroes { offset: 0, len: 4096 }]));
    }

    /// The kernel's client sends reads and writes above the 1 MiB the
    /// engine takes: they become in-order pieces covering the range.
    #[test]
    fn long_reads_and_writes_split_into_engine_pieces() {
        let io = MAX_IO_BYTES;
        let len = 2 * io + 8192;
        let (parts, read_len) = engine_requests(Command::Read { offset: 4096, len }, &[]);
        assert_eq!(read_len, Some(len));
        let got: Vec<(u64, u32)> = parts
            .iter()
            .map(|p| match *p {
                Request::Read { offset, len } => (offset, len),
                ref other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [(4096, io), (4096 + u64::from(io), io), (4096 + 2 * u64::from(io), 8192)]);
        let payload: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
        let (parts, _) = engine_requests(Command::Write { offset: 8192, len, fua: true }, &payload);
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            let Request::Write { offset, data, fua } = *p else { panic!("{p:?}") };
            let at = i * io as usize;
            assert_eq!(offset, 8192 + at as u64);
            assert!(fua, "every piece keeps FUA");
            assert!(data == &payload[at..(at + io as usize).min(payload.len())]);
        }
        assert_eq!(credits_for(Command::Read { offset: 0, len }), 3);
        assert_eq!(credits_for(Command::Read { offset: 0, len: 4096 }), 1);
        assert_eq!(credits_for(Command::Read { offset: 0, len: proto::MAX_REQUEST_DATA }), MAX_IN_FLIGHT);
        assert_eq!(credits_for(Command::Write { offset: 0, len, fua: false }), 1);
    }
}
