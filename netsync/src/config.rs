//! Link configuration: every knob, its unit in its name, and its bounds.

use starblk_fec::FecScheme;

use crate::error::LinkError;
use crate::wire::HEADER_BYTES;

/// Smallest data payload per datagram.
pub const MIN_PAYLOAD_BYTES: usize = 64;
/// Largest data payload per datagram. Repair datagrams are
/// `payload_bytes` plus two datagram headers plus the repair header (see
/// [`payload_bytes_for_mtu`]), so this keeps them within the FEC crate's
/// 64 KiB packet limit and UDP's.
pub const MAX_PAYLOAD_BYTES: usize = 16_384;
/// Largest message.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Largest reorder window in seqs (memory: up to one datagram each, and the
/// receiver's byte cap applies as well).
pub const MAX_RECV_WINDOW_SEQS: u64 = 1 << 20;
/// The path MTU assumed when nothing else is known: Ethernet's.
pub const DEFAULT_MTU_BYTES: usize = 1500;
/// IPv4 (20) and UDP (8) header bytes in every datagram.
pub const IP_UDP_HEADER_BYTES: usize = 28;

/// The largest data payload whose data *and* repair datagrams fit in one
/// IP packet of `mtu_bytes`. A repair datagram codes a whole data datagram
/// (its header included) and adds its own repair header and datagram
/// header, so it is the larger one. Clamped to the allowed payload range.
pub fn payload_bytes_for_mtu(mtu_bytes: usize, fec: Option<&FecScheme>) -> usize {
    payload_bytes_for_mtu_keyed(mtu_bytes, fec, false)
}

/// [`payload_bytes_for_mtu`] for a keyed link (`keyed`): every datagram
/// then carries a MAC trailer, and a repair datagram codes data datagrams
/// with theirs.
pub fn payload_bytes_for_mtu_keyed(mtu_bytes: usize, fec: Option<&FecScheme>, keyed: bool) -> usize {
    let mac = if keyed { crate::wire::MAC_BYTES } else { 0 };
    let repair_extra = fec.map_or(0, |f| HEADER_BYTES + f.repair_header_bytes_max() + 2 * mac);
    let budget = mtu_bytes.saturating_sub(IP_UDP_HEADER_BYTES + HEADER_BYTES + mac + repair_extra);
    budget.clamp(MIN_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES)
}

/// What one message costs in the send window beyond its bytes: the
/// bookkeeping of a queued message, so a flood of tiny messages is bounded
/// too.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 128;

/// Everything a link end can be told. Build with [`LinkConfig::default`]
/// and change fields; [`LinkConfig::validate`] runs at connect/bind.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Link id carried in every datagram; 0 picks a random one at connect.
    /// A listener takes the id from the peer's hello.
    pub link_id: u32,
    /// Authenticate every datagram with a key shared with the peer
    /// ([`crate::keys`]); the peer must hold it too. A listener takes the
    /// key whose hello verified (`Listener::set_keys`).
    pub key: Option<crate::keys::LinkKey>,
    /// Message bytes per data datagram. [`payload_bytes_for_mtu`] gives the
    /// largest value whose repair datagrams are not fragmented.
    pub payload_bytes: usize,
    /// FEC for the messages this end sends; `None` sends data only (losses
    /// are then always retransmitted).
    pub fec: Option<FecScheme>,
    /// Send window: bytes of messages accepted by `send` and not yet
    /// acknowledged (each message counts `len + MESSAGE_OVERHEAD_BYTES`).
    /// When full, `send` blocks and `try_send` says `WouldBlock`.
    pub window_bytes: u64,
    /// Data datagrams sent and not yet acknowledged, at most; also capped
    /// by the peer's advertised reorder window.
    pub max_inflight_datagrams: u64,
    /// Largest message this end reassembles, and `send` accepts (no more
    /// than the peer's, learnt from its hello).
    pub max_message_bytes: usize,
    /// Pacing rate for data, repair and retransmitted datagrams (counted
    /// with IP/UDP headers); 0 means unpaced. Ignored with `auto_rate`.
    pub rate_bits_per_s: u64,
    /// Pace to the measured delivery rate of the path instead
    /// ([`crate::auto_rate`]; README, "Automatic pacing").
    pub auto_rate: bool,
    /// Token bucket depth: how much may leave back to back.
    pub burst_bytes: u64,
    /// Receiver: data seqs past the cumulative ack it buffers (reorder
    /// window); farther seqs are dropped and counted.
    pub recv_window_seqs: u64,
    /// Receiver: bytes held for the application (delivered, not yet read)
    /// plus out-of-order datagrams. When full the receiver stops taking
    /// datagrams in order and stops acking, which fills the sender's window.
    pub recv_buffer_bytes: usize,
    /// Receiver: an ack is sent at most this long after new data arrived.
    pub ack_interval_us: u64,
    /// Receiver: an ack is sent at once after this many data datagrams.
    pub ack_every_datagrams: u32,
    /// An ack (with RTT echo) is sent at least this often, data or not.
    pub keepalive_interval_ms: u64,
    /// Receiver: a loss FEC did not rebuild is nacked after
    /// `max(nack_min_delay_us, srtt / 4)` (see README, "NACKs").
    pub nack_min_delay_us: u64,
    /// Sender: nack datagrams accepted per second; beyond it they are
    /// dropped and counted as a flood.
    pub max_nacks_per_s: u32,
    /// Sender: retransmission timeout floor for the tail probe.
    pub rto_min_ms: u64,
    /// Initiator: hello resend interval until the peer answers.
    pub hello_interval_ms: u64,
    /// Ask the kernel for TX software timestamps (SO_TIMESTAMPING). When
    /// false, or when the probe gets none, "on the wire" means "sendmsg
    /// returned" ([`crate::WireMode::SendReturned`]).
    pub timestamping: bool,
    /// Name each stamped send's timestamp id (SCM_TS_OPT_ID, Linux 6.13+)
    /// when the kernel allows. When false, or on older kernels, ids come
    /// from the socket's counter (see README, "On the wire").
    pub explicit_stamp_ids: bool,
    /// How long the first stamped send waits for its timestamp before the
    /// link falls back to `SendReturned`.
    pub probe_timeout_ms: u64,
    /// A sent datagram whose timestamp has not come after this long is
    /// taken as sent and counted in `tx_stamps_missing`.
    pub stamp_timeout_ms: u64,
    /// SO_SNDBUF / SO_RCVBUF to ask for (capped by net.core.*mem_max). The
    /// error queue of timestamps shares the receive buffer.
    pub socket_buffer_bytes: usize,
    /// No datagram from the peer for this long reports `PeerSilent`.
    pub peer_timeout_ms: u64,
    /// Health ([`crate::health`]): loss is measured over this long...
    pub health_window_ms: u64,
    /// ...and at least this many data datagrams...
    pub health_min_datagrams: u64,
    /// ...and `Degraded` ends once it stayed within the FEC code's
    /// capacity this long.
    pub health_hold_ms: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        let fec = FecScheme::layered_xor(8, 3).ok();
        LinkConfig {
            link_id: 0,
            key: None,
            payload_bytes: payload_bytes_for_mtu(DEFAULT_MTU_BYTES, fec.as_ref()),
            fec,
            window_bytes: 16 << 20,
            max_inflight_datagrams: 32_768,
            max_message_bytes: 2 << 20,
            rate_bits_per_s: 0,
            auto_rate: false,
            burst_bytes: 128 << 10,
            recv_window_seqs: 65_536,
            recv_buffer_bytes: 32 << 20,
            ack_interval_us: 1000,
            ack_every_datagrams: 32,
            keepalive_interval_ms: 50,
            nack_min_delay_us: 2000,
            max_nacks_per_s: 4000,
            rto_min_ms: 20,
            hello_interval_ms: 100,
            timestamping: true,
            explicit_stamp_ids: true,
            probe_timeout_ms: 200,
            stamp_timeout_ms: 100,
            socket_buffer_bytes: 4 << 20,
            peer_timeout_ms: 3000,
            health_window_ms: 1000,
            health_min_datagrams: 200,
            health_hold_ms: 2000,
        }
    }
}

impl LinkConfig {
    /// Checks every bound; the error names the field and its range.
    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |reason: &'static str| Err(LinkError::InvalidConfig { reason });
        if !(MIN_PAYLOAD_BYTES..=MAX_PAYLOAD_BYTES).contains(&self.payload_bytes) {
            return bad("payload_bytes must be in 64..=16384");
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES {
            return bad("max_message_bytes must be in 1..=64 MiB");
        }
        if self.window_bytes < self.max_message_bytes as u64 + MESSAGE_OVERHEAD_BYTES {
            return bad("window_bytes must hold at least one largest message (max_message_bytes + 128)");
        }
        if self.max_inflight_datagrams == 0 || self.recv_window_seqs == 0 {
            return bad("max_inflight_datagrams and recv_window_seqs must be at least 1");
        }
        if self.recv_window_seqs > MAX_RECV_WINDOW_SEQS {
            return bad("recv_window_seqs must be at most 2^20");
        }
        if self.recv_buffer_bytes < self.max_message_bytes + self.payload_bytes + HEADER_BYTES {
            return bad("recv_buffer_bytes must hold at least one largest message");
        }
        if (self.rate_bits_per_s != 0 || self.auto_rate) && self.burst_bytes < (self.payload_bytes as u64 + 1024) {
            return bad("burst_bytes must be at least payload_bytes + 1024 when pacing");
        }
        if self.ack_interval_us == 0 || self.ack_every_datagrams == 0 || self.keepalive_interval_ms == 0 {
            return bad("ack_interval_us, ack_every_datagrams and keepalive_interval_ms must be at least 1");
        }
        if self.max_nacks_per_s == 0 || self.hello_interval_ms == 0 || self.rto_min_ms == 0 {
            return bad("max_nacks_per_s, hello_interval_ms and rto_min_ms must be at least 1");
        }
        if self.probe_timeout_ms == 0 || self.stamp_timeout_ms == 0 || self.peer_timeout_ms == 0 {
            return bad("probe_timeout_ms, stamp_timeout_ms and peer_timeout_ms must be at least 1");
        }
        if self.health_window_ms == 0 || self.health_min_datagrams == 0 || self.health_hold_ms == 0 {
            return bad("health_window_ms, health_min_datagrams and health_hold_ms must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_payload_fills_an_ethernet_mtu_with_repair() {
        let fec = FecScheme::layered_xor(8, 3).unwrap();
        let payload = payload_bytes_for_mtu(DEFAULT_MTU_BYTES, Some(&fec));
        let repair_ip_bytes =
            IP_UDP_HEADER_BYTES + HEADER_BYTES + fec.repair_header_bytes_max() + HEADER_BYTES + payload;
        assert_eq!(repair_ip_bytes, DEFAULT_MTU_BYTES);
        assert_eq!(LinkConfig::default().payload_bytes, payload);
        assert_eq!(payload_bytes_for_mtu(DEFAULT_MTU_BYTES, None), DEFAULT_MTU_BYTES - 28 - HEADER_BYTES);
        assert_eq!(payload_bytes_for_mtu(10, Some(&fec)), MIN_PAYLOAD_BYTES);
        assert_eq!(payload_bytes_for_mtu(1 << 20, None), MAX_PAYLOAD_BYTES);
    }
}
