//! The NBD wire protocol (the NBD project's `doc/proto.md`): constants and
//! pure codecs for the fixed-newstyle handshake and the transmission phase
//! with simple replies.
//!
//! Nothing here does I/O. The server reads exact byte counts off the socket
//! and hands them to these functions; the fuzz target (`fuzz/fuzz_targets/
//! nbd_decoder.rs`) drives them with arbitrary bytes. Every length and
//! offset that comes off the network is checked here before the server
//! uses it to size a buffer or address the volume.
//!
//! Keep this file free of `crate::` imports: the fuzz target compiles it on
//! its own (with only `thiserror` and `libc`) to keep fuzz builds small.

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information types of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error values of a reply (the protocol's own list, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of the server greeting (magic, IHAVEOPT, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Longest option data the server reads. The longest legitimate option is
/// `NBD_OPT_GO` with a 4096-byte name and a few info requests; anything far
/// beyond that is a client trying to make the server buffer it.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Longest string the protocol allows (export names, messages).
pub const MAX_STRING: usize = 4096;
/// Longest read or write the server serves. The advertised maximum block
/// size is 1 MiB (the engine's largest I/O), but the Linux kernel's NBD
/// client ignores it and sends up to its `max_sectors_kb` (1280 KiB by
/// default, at most 32 MiB), so longer requests are split into engine-sized
/// pieces rather than refused. The spec asks servers not to treat payloads
/// under 32 MiB as an attack: longer reads fail with EINVAL, and a longer
/// write payload closes the connection.
pub const MAX_REQUEST_DATA: u32 = 32 << 20;

/// A handshake that cannot go on: the server closes that connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number was wrong: the peer is not speaking NBD (or lost sync).
    #[error("bad {what} magic {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    /// The client set flags the server did not offer.
    #[error("client flags {0:#x} include bits the server did not offer")]
    UnknownClientFlags(u32),
    /// An option announced more data than the server accepts.
    #[error("option {option} announces {len} bytes of data (at most {MAX_OPTION_DATA})")]
    OptionTooLong { option: u32, len: u32 },
    /// A fixed-size message had the wrong size (a caller bug, or fuzzing).
    #[error("{what}: {got} bytes, expected {need}")]
    Length { what: &'static str, need: usize, got: usize },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn exact(what: &'static str, b: &[u8], need: usize) -> Result<(), ProtoError> {
    if b.len() == need {
        Ok(())
    } else {
        Err(ProtoError::Length { what, need, got: b.len() })
    }
}

/// What the server exports: one volume, its geometry and the transmission
/// flags it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The export's name (the volume name). The empty name (the default
    /// export) selects it too.
    pub name: String,
    /// Size in bytes, a multiple of `min_block`.
    pub size: u64,
    /// Minimum block size: alignment of every offset and length.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest read or write.
    pub max_block: u32,
    /// Transmission flags.
    pub flags: u16,
}

impl Export {
    /// A read-write export of `size` bytes with `block_size` alignment and
    /// reads and writes of at most `max_block` bytes; advertises flush,
    /// FUA, trim, write-zeroes and multi-conn (every connection reaches the
    /// same engine, and a write is durable on Q replicas before its reply,
    /// so a flush on one connection covers writes answered on any).
    pub fn new(name: &str, size: u64, block_size: u32, max_block: u32) -> Export {
        let flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN;
        Export { name: name.to_string(), size, min_block: block_size, preferred_block: block_size, max_block, flags }
    }

    /// Whether a client asking for `name` gets this export.
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// The server's greeting: NBDMAGIC, IHAVEOPT, fixed newstyle + no zeroes.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The client's flags, after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// No 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Decodes the 4-byte client flags; unknown bits end the handshake (the
/// spec says the server MUST drop the connection).
pub fn decode_client_flags(b: &[u8]) -> Result<ClientFlags, ProtoError> {
    exact("client flags", b, 4)?;
    let f = be_u32(b, 0);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(f));
    }
    Ok(ClientFlags { fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: f & FLAG_C_NO_ZEROES != 0 })
}

/// An option header: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of option data that follow; at most [`MAX_OPTION_DATA`].
    pub len: u32,
}

impl OptionHeader {
    /// Decodes 16 bytes; checks the magic and bounds the data length, so
    /// the caller may allocate `len` bytes.
    pub fn decode(b: &[u8]) -> Result<OptionHeader, ProtoError> {
        exact("option header", b, OPTION_HEADER_LEN)?;
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic { what: "option", got: magic });
        }
        let (option, len) = (be_u32(b, 8), be_u32(b, 12));
        if len > MAX_OPTION_DATA {
            return Err(ProtoError::OptionTooLong { option, len });
        }
        Ok(OptionHeader { option, len })
    }

    /// The wire form (clients, tests and the fuzz target).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the
/// information the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// Requested export name (bytes as sent; at most [`MAX_STRING`]).
    pub name: Vec<u8>,
    /// Requested information types.
    pub infos: Vec<u16>,
}

impl ExportRequest {
    /// Decodes option data; every count must match the data length exactly.
    pub fn decode(data: &[u8]) -> Result<ExportRequest, String> {
        if data.len() < 6 {
            return Err(format!("{} bytes of data; at least 6 expected", data.len()));
        }
        let name_len = be_u32(data, 0) as usize;
        if name_len > MAX_STRING || name_len > data.len() - 6 {
            return Err(format!("name length {name_len} does not fit {} bytes of data", data.len()));
        }
        let name = data[4..4 + name_len].to_vec();
        let rest = &data[4 + name_len..];
        let count = be_u16(rest, 0) as usize;
        if rest.len() != 2 + 2 * count {
            return Err(format!("{count} information requests need {} bytes, {} remain", 2 * count, rest.len() - 2));
        }
        let infos = (0..count).map(|i| be_u16(rest, 2 + 2 * i)).collect();
        Ok(ExportRequest { name, infos })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.infos.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }
}

/// Appends one option reply to `out`.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What the server does after answering an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Options,
    /// Enter the transmission phase.
    Transmission,
    /// Close the connection (after sending the reply, if any).
    Close,
}

/// The server's answer to one option: bytes to send, and what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionAnswer {
    /// Bytes to send (may be empty).
    pub reply: Vec<u8>,
    /// What follows.
    pub next: Next,
    /// For `NBD_OPT_GO`: whether the client asked for block size
    /// constraints (and so promised to honour them).
    pub block_size_requested: bool,
}

impl OptionAnswer {
    fn new(reply: Vec<u8>, next: Next) -> OptionAnswer {
        OptionAnswer { reply, next, block_size_requested: false }
    }

    fn error(option: u32, reply: u32, message: &str) -> OptionAnswer {
        let mut out = Vec::new();
        encode_option_reply(option, reply, message.as_bytes(), &mut out);
        OptionAnswer::new(out, Next::Options)
    }
}

/// Answers one option of the handshake. Clients that did not set
/// `NBD_FLAG_C_FIXED_NEWSTYLE` get fixed-newstyle answers too (the spec
/// allows it): an error reply is more useful to them than a closed socket.
pub fn answer_option(option: u32, data: &[u8], export: &Export, client: ClientFlags) -> OptionAnswer {
    match option {
        OPT_EXPORT_NAME => export_name(data, export, client),
        OPT_ABORT => {
            let mut out = Vec::new();
            encode_option_reply(option, REP_ACK, &[], &mut out);
            OptionAnswer::new(out, Next::Close)
        }
        OPT_LIST if !data.is_empty() => OptionAnswer::error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
        OPT_LIST => {
            let mut entry = (export.name.len() as u32).to_be_bytes().to_vec();
            entry.extend_from_slice(export.name.as_bytes());
            let mut out = Vec::new();
            encode_option_reply(option, REP_SERVER, &entry, &mut out);
            encode_option_reply(option, REP_ACK, &[], &mut out);
            OptionAnswer::new(out, Next::Options)
        }
        OPT_INFO | OPT_GO => info_or_go(option, data, export),
        _ => OptionAnswer::error(option, REP_ERR_UNSUP, "option not supported by starblk"),
    }
}

/// `NBD_OPT_EXPORT_NAME`: size and flags, then transmission; an unknown
/// name can only be answered by closing (the option has no error reply).
fn export_name(data: &[u8], export: &Export, client: ClientFlags) -> OptionAnswer {
    if !export.matches(data) {
        return OptionAnswer::new(Vec::new(), Next::Close);
    }
    let mut out = export.size.to_be_bytes().to_vec();
    out.extend_from_slice(&export.flags.to_be_bytes());
    if !client.no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    OptionAnswer::new(out, Next::Transmission)
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size, flags and block
/// size constraints (always sent: the server enforces them either way),
/// its name if asked for, then ACK.
fn info_or_go(option: u32, data: &[u8], export: &Export) -> OptionAnswer {
    let req = match ExportRequest::decode(data) {
        Ok(r) => r,
        Err(e) => return OptionAnswer::error(option, REP_ERR_INVALID, &e),
    };
    if !export.matches(&req.name) {
        let msg = format!("no export {:?}; this server exports {:?}", String::from_utf8_lossy(&req.name), export.name);
        return OptionAnswer::error(option, REP_ERR_UNKNOWN, &msg);
    }
    let mut out = Vec::new();
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&export.flags.to_be_bytes());
    encode_option_reply(option, REP_INFO, &info, &mut out);
    let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [export.min_block, export.preferred_block, export.max_block] {
        info.extend_from_slice(&v.to_be_bytes());
    }
    encode_option_reply(option, REP_INFO, &info, &mut out);
    if req.infos.contains(&INFO_NAME) {
        let mut info = INFO_NAME.to_be_bytes().to_vec();
        info.extend_from_slice(export.name.as_bytes());
        encode_option_reply(option, REP_INFO, &info, &mut out);
    }
    encode_option_reply(option, REP_ACK, &[], &mut out);
    let next = if option == OPT_GO { Next::Transmission } else { Next::Options };
    OptionAnswer { reply: out, next, block_size_requested: req.infos.contains(&INFO_BLOCK_SIZE) }
}

/// A transmission request header (the payload of a write follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl RequestHeader {
    /// Decodes 28 bytes; a bad magic means the stream is out of sync and
    /// the connection must close.
    pub fn decode(b: &[u8]) -> Result<RequestHeader, ProtoError> {
        exact("request header", b, REQUEST_HEADER_LEN)?;
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic { what: "request", got: magic.into() });
        }
        Ok(RequestHeader {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        })
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire: the length of
    /// a write, whatever else the header says, so that the stream stays in
    /// sync even when the write itself is refused.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// A request that passed every check against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes (at most [`MAX_REQUEST_DATA`]).
    Read { offset: u64, len: u32 },
    /// Write the payload; `fua` asks for durability before the reply.
    Write { offset: u64, len: u32, fua: bool },
    /// Flush.
    Flush,
    /// Discard a range (any length that fits the export).
    Trim { offset: u64, len: u32 },
    /// Zero a range (any length that fits the export).
    WriteZeroes { offset: u64, len: u32 },
    /// End the session after the requests in flight.
    Disc,
}

/// Checks a request against the export: known command, flags valid for
/// it, range inside the export, aligned to the minimum block size, reads
/// and writes no longer than [`MAX_REQUEST_DATA`]. Returns the NBD error to reply
/// with otherwise (ENOSPC for writes past the end, EINVAL for the rest, as
/// the spec's "Error values" section asks).
pub fn check_request(h: &RequestHeader, e: &Export) -> Result<Command, u32> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let allowed = match h.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let (offset, len) = (h.offset, h.len);
    match h.kind {
        CMD_READ => check_range(e, offset, len, true, EINVAL).map(|()| Command::Read { offset, len }),
        CMD_WRITE => check_range(e, offset, len, true, ENOSPC).map(|()| Command::Write { offset, len, fua }),
        CMD_TRIM => check_range(e, offset, len, false, EINVAL).map(|()| Command::Trim { offset, len }),
        CMD_WRITE_ZEROES => check_range(e, offset, len, false, ENOSPC).map(|()| Command::WriteZeroes { offset, len }),
        CMD_FLUSH if offset == 0 && len == 0 => Ok(Command::Flush),
        CMD_DISC => Ok(Command::Disc),
        _ => Err(EINVAL),
    }
}

/// A nonempty, aligned range inside the export; `bounded` applies
/// [`MAX_REQUEST_DATA`] (reads and writes carry their data, trim and
/// write-zeroes do not and may be longer). The server splits every kind
/// into engine-sized pieces.
fn check_range(e: &Export, offset: u64, len: u32, bounded: bool, past_end: u32) -> Result<(), u32> {
    let bs = u64::from(e.min_block.max(1));
    if len == 0
        || !offset.is_multiple_of(bs)
        || !u64::from(len).is_multiple_of(bs)
        || (bounded && len > MAX_REQUEST_DATA)
    {
        return Err(EINVAL);
    }
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= e.size => Ok(()),
        _ => Err(past_end),
    }
}

/// A simple reply header (the data of a successful read follows it).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Maps a negative host errno (what the engine's `IoError::to_errno`
/// gives) to the protocol's error values, which are a fixed short list.
pub fn nbd_errno(neg_errno: i32) -> u32 {
    match neg_errno.checked_neg().unwrap_or(0) {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::ENOMEM => ENOMEM,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export::new("vol0", 64 << 20, 4096, 1 << 20)
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, len }
    }

    /// Splits a stream of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(b, 0), OPTION_REPLY_MAGIC);
            let len = be_u32(b, 16) as usize;
            v.push((be_u32(b, 8), be_u32(b, 12), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g, 16), 3);
    }

    #[test]
    fn client_flags_with_unknown_bits_are_refused() {
        assert_eq!(decode_client_flags(&[0, 0, 0, 3]), Ok(ClientFlags { fixed_newstyle: true, no_zeroes: true }));
        assert_eq!(decode_client_flags(&[0, 0, 0, 4]), Err(ProtoError::UnknownClientFlags(4)));
        assert!(decode_client_flags(&[0, 0, 3]).is_err());
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let h = OptionHeader { option: OPT_GO, len: 10 };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(OptionHeader::decode(&bad), Err(ProtoError::BadMagic { .. })));
        let long = OptionHeader { option: OPT_GO, len: MAX_OPTION_DATA + 1 }.encode();
        assert!(matches!(OptionHeader::decode(&long), Err(ProtoError::OptionTooLong { .. })));
    }

    #[test]
    fn go_answers_export_and_block_size_then_ack() {
        let data = ExportRequest { name: b"".to_vec(), infos: vec![INFO_BLOCK_SIZE] }.encode();
        let a = answer_option(OPT_GO, &data, &export(), ClientFlags::default());
        assert_eq!(a.next, Next::Transmission);
        assert!(a.block_size_requested);
        let r = replies(&a.reply);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, be_u16(&r[0].2, 0), be_u64(&r[0].2, 2)), (REP_INFO, INFO_EXPORT, 64 << 20));
        let flags = be_u16(&r[0].2, 10);
        assert_eq!(flags & FLAG_CAN_MULTI_CONN, FLAG_CAN_MULTI_CONN);
        assert_eq!(flags & FLAG_READ_ONLY, 0);
        let b = &r[1].2;
        assert_eq!((be_u16(b, 0), be_u32(b, 2), be_u32(b, 6), be_u32(b, 10)), (INFO_BLOCK_SIZE, 4096, 4096, 1 << 20));
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn info_for_an_unknown_export_is_an_error_and_negotiation_goes_on() {
        let data = ExportRequest { name: b"other".to_vec(), infos: vec![] }.encode();
        let a = answer_option(OPT_INFO, &data, &export(), ClientFlags::default());
        assert_eq!(a.next, Next::Options);
        assert_eq!(replies(&a.reply)[0].1, REP_ERR_UNKNOWN);
        let named = ExportRequest { name: b"vol0".to_vec(), infos: vec![INFO_NAME] }.encode();
        let a = answer_option(OPT_INFO, &named, &export(), ClientFlags::default());
        assert_eq!(a.next, Next::Options);
        assert!(replies(&a.reply).iter().any(|(_, t, d)| *t == REP_INFO && d[..2] == [0, 1] && &d[2..] == b"vol0"));
    }

    #[test]
    fn malformed_info_data_is_invalid() {
        for data in [&[0u8; 3][..], &[0, 0, 0, 9, 0, 0], &[0, 0, 0, 0, 0, 2, 0, 3]] {
            let a = answer_option(OPT_GO, data, &export(), ClientFlags::default());
            assert_eq!((a.next, replies(&a.reply)[0].1), (Next::Options, REP_ERR_INVALID), "{data:?}");
        }
    }

    #[test]
    fn list_abort_unknown_and_export_name() {
        let r = replies(&answer_option(OPT_LIST, &[], &export(), ClientFlags::default()).reply);
        assert_eq!((r[0].1, &r[0].2[4..]), (REP_SERVER, &b"vol0"[..]));
        assert_eq!(r[1].1, REP_ACK);
        let a = answer_option(OPT_ABORT, &[], &export(), ClientFlags::default());
        assert_eq!((a.next, replies(&a.reply)[0].1), (Next::Close, REP_ACK));
        for opt in [OPT_STARTTLS, OPT_STRUCTURED_REPLY, 99] {
            let a = answer_option(opt, &[1, 2], &export(), ClientFlags::default());
            assert_eq!((a.next, replies(&a.reply)[0].1), (Next::Options, REP_ERR_UNSUP));
        }
        let a =
            answer_option(OPT_EXPORT_NAME, b"vol0", &export(), ClientFlags { no_zeroes: true, ..Default::default() });
        assert_eq!((a.next, a.reply.len()), (Next::Transmission, 10));
        assert_eq!(answer_option(OPT_EXPORT_NAME, b"", &export(), ClientFlags::default()).reply.len(), 134);
        assert_eq!(answer_option(OPT_EXPORT_NAME, b"x", &export(), ClientFlags::default()).next, Next::Close);
    }

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 8192);
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        assert_eq!(h.payload_len(), 8192);
        assert_eq!(req(CMD_READ, 0, 0, 8192).payload_len(), 0);
        let mut bad = h.encode();
        bad[3] ^= 1;
        assert!(RequestHeader::decode(&bad).is_err());
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let e = export();
        assert_eq!(check_request(&req(CMD_READ, 0, 4096, 4096), &e), Ok(Command::Read { offset: 4096, len: 4096 }));
        assert_eq!(
            check_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 1 << 20), &e),
            Ok(Command::Write { offset: 0, len: 1 << 20, fua: true })
        );
        assert_eq!(check_request(&req(CMD_READ, 0, 512, 4096), &e), Err(EINVAL), "unaligned offset");
        assert_eq!(check_request(&req(CMD_READ, 0, 0, 512), &e), Err(EINVAL), "unaligned length");
        let above = check_request(&req(CMD_READ, 0, 0, 2 << 20), &e);
        assert_eq!(above, Ok(Command::Read { offset: 0, len: 2 << 20 }), "above max_block: served (split)");
        let big = (32 << 20) + 4096;
        assert_eq!(check_request(&req(CMD_READ, 0, 0, big), &e), Err(EINVAL), "above MAX_REQUEST_DATA");
        assert_eq!(check_request(&req(CMD_WRITE, 0, 0, big), &e), Err(EINVAL), "above MAX_REQUEST_DATA");
        assert_eq!(check_request(&req(CMD_READ, 0, 64 << 20, 4096), &e), Err(EINVAL), "read past the end");
        assert_eq!(check_request(&req(CMD_WRITE, 0, 64 << 20, 4096), &e), Err(ENOSPC), "write past the end");
        assert_eq!(check_request(&req(CMD_WRITE, 0, u64::MAX - 4094, 4096), &e), Err(EINVAL), "unaligned wrap");
        assert_eq!(check_request(&req(CMD_WRITE, 0, !4095, 4096), &e), Err(ENOSPC), "wraps");
        assert_eq!(check_request(&req(CMD_READ, 0, 0, 0), &e), Err(EINVAL), "empty");
        assert_eq!(check_request(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096), &e), Err(EINVAL), "flag");
        assert_eq!(check_request(&req(5, 0, 0, 4096), &e), Err(EINVAL), "cache is not offered");
        assert_eq!(check_request(&req(CMD_FLUSH, 0, 0, 0), &e), Ok(Command::Flush));
        assert_eq!(check_request(&req(CMD_FLUSH, 0, 0, 4096), &e), Err(EINVAL));
        assert_eq!(check_request(&req(CMD_DISC, 0, 0, 0), &e), Ok(Command::Disc));
        let big = check_request(&req(CMD_TRIM, CMD_FLAG_FUA, 0, 32 << 20), &e);
        assert_eq!(big, Ok(Command::Trim { offset: 0, len: 32 << 20 }), "trim may exceed max_block");
        let z = check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 64 << 20), &e);
        assert_eq!(z, Ok(Command::WriteZeroes { offset: 0, len: 64 << 20 }));
        assert_eq!(check_request(&req(CMD_WRITE_ZEROES, 1 << 4, 0, 4096), &e), Err(EINVAL), "fast zero");
        assert_eq!(check_request(&req(CMD_TRIM, 0, 60 << 20, 8 << 20), &e), Err(EINVAL));
    }

    #[test]
    fn host_errnos_map_to_protocol_errors() {
        assert_eq!(nbd_errno(-libc::EROFS), EPERM);
        assert_eq!(nbd_errno(-libc::EINVAL), EINVAL);
        assert_eq!(nbd_errno(-libc::ESHUTDOWN), ESHUTDOWN);
        assert_eq!(nbd_errno(-libc::ENODEV), EIO);
        assert_eq!(nbd_errno(i32::MIN), EIO);
    }
}
