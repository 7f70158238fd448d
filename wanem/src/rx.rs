//! Receiving datagrams with the kernel's arrival stamp.
//!
//! The cut must separate packets by when they reached the relay host, not
//! by when the relay thread got round to reading them: a datagram that sat
//! in the socket buffer at the cut instant had already left the sender
//! (and may have been reported "on the wire" to it), so it is in the fibre.
//! SO_TIMESTAMPNS gives that arrival time. SO_RXQ_OVFL reports datagrams
//! the kernel dropped because our receive buffer was full, so that no loss
//! goes uncounted.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// One received datagram's metadata.
pub(crate) struct RxMeta {
    pub len: usize,
    pub from: SocketAddr,
    /// Kernel arrival time, CLOCK_REALTIME ns, if the kernel gave one.
    pub stamp_ns: Option<u64>,
    /// Cumulative count of datagrams the kernel dropped on this socket.
    pub kernel_drops: Option<u32>,
}

/// Turns on arrival stamps and drop counts. Failure is not fatal: the relay
/// then falls back to the time it read the datagram.
pub(crate) fn enable_stamps(sock: &UdpSocket) {
    for (opt, name) in [(libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"), (libc::SO_RXQ_OVFL, "SO_RXQ_OVFL")] {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the
        // advertised length.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::warn!("{name} unavailable ({}); cut timing falls back to read time", io::Error::last_os_error());
        }
    }
}

/// Waits until the kernel stamps datagrams when they arrive, not when they
/// are read; returns false if it does not within `timeout`.
///
/// Linux turns arrival stamping on for the whole host through a static key
/// that it flips from a work queue some time after the first socket asks for
/// stamps. Until then `recvmsg` stamps with the read time, which would put
/// datagrams queued at a cut on the wrong side of it. A probe socket sends
/// itself a datagram, reads it 2 ms later and checks the stamp is older.
pub(crate) fn wait_for_arrival_stamps(timeout: std::time::Duration) -> bool {
    use std::time::{Duration, Instant};
    let Ok(probe) = UdpSocket::bind("127.0.0.1:0") else { return false };
    enable_stamps(&probe);
    let (Ok(addr), Ok(())) = (probe.local_addr(), probe.set_read_timeout(Some(Duration::from_millis(50)))) else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 8];
    while Instant::now() < deadline {
        if probe.send_to(&[0], addr).is_err() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
        let read_ns = crate::clock::realtime_ns();
        match recv(&probe, &mut buf) {
            Ok(RxMeta { stamp_ns: Some(stamp), .. }) if read_ns.saturating_sub(stamp) >= 1_000_000 => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Control buffer, aligned for `cmsghdr`; 128 bytes hold both messages.
#[repr(C, align(8))]
struct Cmsg([u8; 128]);

/// Receives one datagram into `buf` (blocking, honouring the socket's read
/// timeout).
pub(crate) fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<RxMeta> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let mut ctrl = Cmsg([0; 128]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.0.as_mut_ptr().cast();
    msg.msg_controllen = ctrl.0.len() as _;
    // SAFETY: every pointer in `msg` refers to a live local of the stated
    // length, and `buf` outlives the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let from = sockaddr_to_std(&addr)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address"))?;
    let (stamp_ns, kernel_drops) = parse_cmsgs(&msg);
    Ok(RxMeta { len: n as usize, from, stamp_ns, kernel_drops })
}

fn parse_cmsgs(msg: &libc::msghdr) -> (Option<u64>, Option<u32>) {
    let (mut stamp, mut drops) = (None, None);
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; we read each payload only for the types
    // whose payload layout the kernel defines (timespec, u32).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                    let ts: libc::timespec = std::ptr::read_unaligned(data.cast());
                    stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    (stamp, drops)
}

fn sockaddr_to_std(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            let ip = u32::from_be(a.sin_addr.s_addr);
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            let ip = a.sin6_addr.s6_addr.into();
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}
