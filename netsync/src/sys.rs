//! Thin wrappers over the Linux calls socket2 and std don't offer:
//! SO_TIMESTAMPING, sendmsg with control messages, the socket error queue,
//! eventfd and ppoll. All `unsafe` of the crate lives here.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `SO_TIMESTAMPING` (the "old" value, with 64-bit `time_t` on 64-bit
/// kernels; asm-generic/socket.h).
const SO_TIMESTAMPING: libc::c_int = 37;
/// `SCM_TS_OPT_ID` (Linux 6.13+, asm-generic value): sets the timestamp id of
/// one sendmsg explicitly instead of taking the socket's counter.
const SCM_TS_OPT_ID: libc::c_int = 81;
/// `SCM_TSTAMP_SND`: the "handed to the device" timestamp type.
pub(crate) const SCM_TSTAMP_SND: u32 = 0;

/// Reporting flags set on the socket: software stamps, an id per send, and
/// no copy of the packet in the error queue. The record flag
/// (`TX_SOFTWARE`) is requested per send, so acks are not stamped.
const SOCKET_TS_FLAGS: u32 =
    libc::SOF_TIMESTAMPING_SOFTWARE | libc::SOF_TIMESTAMPING_OPT_ID | libc::SOF_TIMESTAMPING_OPT_TSONLY;

/// Turns SO_TIMESTAMPING on (reporting flags only) and resets the kernel's
/// per-socket id counter to 0, by switching OPT_ID off and on.
pub(crate) fn enable_timestamping(fd: RawFd) -> io::Result<()> {
    set_ts_flags(fd, SOCKET_TS_FLAGS & !libc::SOF_TIMESTAMPING_OPT_ID)?;
    set_ts_flags(fd, SOCKET_TS_FLAGS)
}

fn set_ts_flags(fd: RawFd, flags: u32) -> io::Result<()> {
    let val: libc::c_uint = flags;
    // SAFETY: `val` is a live c_uint and we pass its exact size; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_TIMESTAMPING,
            (&val as *const libc::c_uint).cast(),
            mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How a send asks for a TX timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamp {
    /// No timestamp.
    None,
    /// A timestamp with the socket counter's next id.
    Counter,
    /// A timestamp with this id (SCM_TS_OPT_ID).
    Explicit(u32),
}

/// Room for two u32 control messages.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Appends a SOL_SOCKET control message carrying one u32 at `*used`.
fn put_u32_cmsg(buf: &mut CmsgBuf, used: &mut usize, kind: libc::c_int, value: u32) {
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, len) = unsafe { (libc::CMSG_SPACE(4) as usize, libc::CMSG_LEN(4) as usize) };
    debug_assert!(*used + space <= buf.0.len());
    let hdr = libc::cmsghdr { cmsg_len: len as _, cmsg_level: libc::SOL_SOCKET, cmsg_type: kind };
    // SAFETY: the buffer is 8-aligned and `*used` is a multiple of
    // CMSG_SPACE, so `at` is aligned for cmsghdr; the asserted space holds
    // the header and the 4 data bytes that follow it at CMSG_LEN(0).
    unsafe {
        let at = buf.0.as_mut_ptr().add(*used);
        std::ptr::write_unaligned(at.cast::<libc::cmsghdr>(), hdr);
        let data = at.add(libc::CMSG_LEN(0) as usize);
        std::ptr::write_unaligned(data.cast::<u32>(), value);
    }
    *used += space;
}

/// Sends one datagram on a connected socket, without blocking, asking for
/// a TX timestamp as `stamp` says.
pub(crate) fn send(fd: RawFd, buf: &[u8], stamp: Stamp) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut used = 0usize;
    if stamp != Stamp::None {
        put_u32_cmsg(&mut cmsg, &mut used, SO_TIMESTAMPING, libc::SOF_TIMESTAMPING_TX_SOFTWARE);
    }
    if let Stamp::Explicit(id) = stamp {
        put_u32_cmsg(&mut cmsg, &mut used, SCM_TS_OPT_ID, id);
    }
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if used > 0 {
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = used as _;
    }
    // SAFETY: `msg` points at `iov` (which points at `buf`) and at `cmsg`,
    // all alive for the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives one datagram without blocking. Returns its full length, which
/// exceeds `buf.len()` if it was cut (MSG_TRUNC).
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One TX timestamp read from the error queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxStamp {
    /// The OPT_ID id of the send.
    pub id: u32,
    /// SCM_TSTAMP_* type.
    pub kind: u32,
    /// The software timestamp (CLOCK_REALTIME), ns; 0 if absent.
    pub realtime_ns: u64,
}

/// Room for SCM_TIMESTAMPING (3 timespecs) and IP(V6)_RECVERR.
#[repr(C, align(8))]
struct RecvCmsgBuf([u8; 256]);

/// Reads one message off the socket's error queue. `Ok(None)` when it is
/// empty; `Ok(Some(None))` for an entry that is not a TX timestamp (an ICMP
/// error, say), which is consumed and ignored.
pub(crate) fn read_errqueue(fd: RawFd) -> io::Result<Option<Option<TxStamp>>> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut cbuf = RecvCmsgBuf([0; 256]);
    // SAFETY: plain old data, zero is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: `msg` points at buffers that live for the call and have the
    // lengths given; the kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
    }
    Ok(Some(parse_errqueue_cmsgs(&msg)))
}

fn parse_errqueue_cmsgs(msg: &libc::msghdr) -> Option<TxStamp> {
    let mut stamp = TxStamp { id: 0, kind: u32::MAX, realtime_ns: 0 };
    let mut found = false;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only
    // within msg_control..msg_controllen and return null past the end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete cmsghdr inside
        // the control buffer (CMSG_NXTHDR checks that).
        let hdr = unsafe { std::ptr::read_unaligned(c) };
        // SAFETY: CMSG_DATA is the data right after the header in the buffer.
        let data = unsafe { libc::CMSG_DATA(c) };
        let data_len = (hdr.cmsg_len as usize).saturating_sub(
            // SAFETY: pure arithmetic.
            unsafe { libc::CMSG_LEN(0) } as usize,
        );
        let is_recverr = (hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_RECVERR)
            || (hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == libc::IPV6_RECVERR);
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == SO_TIMESTAMPING && data_len >= 16 {
            // SAFETY: at least 16 data bytes: the first struct timespec
            // (software stamp) of struct scm_timestamping.
            let ts = unsafe { std::ptr::read_unaligned(data.cast::<libc::timespec>()) };
            stamp.realtime_ns = (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64);
        } else if is_recverr && data_len >= mem::size_of::<libc::sock_extended_err>() {
            // SAFETY: the data holds a whole sock_extended_err (checked).
            let ee = unsafe { std::ptr::read_unaligned(data.cast::<libc::sock_extended_err>()) };
            if ee.ee_origin == libc::SO_EE_ORIGIN_TIMESTAMPING && ee.ee_errno == libc::ENOMSG as u32 {
                stamp.id = ee.ee_data;
                stamp.kind = ee.ee_info;
                found = true;
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    found.then_some(stamp)
}

/// An eventfd used to wake the I/O thread.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the fd returned is owned by us alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable (wakes a poller).
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A failure can only be a
        // counter at its maximum, which is already "readable": ignore it.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the fd to not readable.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending)
        // is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What [`poll2`] saw on the socket.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ready {
    pub readable: bool,
    pub writable: bool,
    pub error_queue: bool,
    pub woken: bool,
}

/// Waits up to `timeout` for the socket (readable, error queue, and
/// writable if `want_write`) or the eventfd.
pub(crate) fn poll2(sock: RawFd, want_write: bool, wake: RawFd, timeout: Duration) -> io::Result<Ready> {
    let sock_events = libc::POLLIN | if want_write { libc::POLLOUT } else { 0 };
    let mut fds = [
        libc::pollfd { fd: sock, events: sock_events, revents: 0 },
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
    ];
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(3600) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` and `ts` are live for the call, with the count given.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(Ready::default()) } else { Err(e) };
    }
    let r = fds[0].revents;
    Ok(Ready {
        readable: r & libc::POLLIN != 0,
        writable: r & libc::POLLOUT != 0,
        error_queue: r & libc::POLLERR != 0,
        woken: fds[1].revents & libc::POLLIN != 0,
    })
}

/// A random u64 from the kernel (for link ids and nonces).
pub(crate) fn random_u64() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: writes at most 8 bytes into a live u64.
    let n = unsafe { libc::getrandom((&mut v as *mut u64).cast(), 8, 0) };
    if n != 8 {
        // Only an ancient kernel lacks getrandom; the time is good enough
        // for a link id that only has to differ from the previous one.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        v = t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    v
}

/// CLOCK_REALTIME in ns, to compare with kernel TX timestamps.
pub(crate) fn realtime_ns() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_nanos() as u64
}

/// Whether a send error means "no room now, retry later".
pub(crate) fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}
