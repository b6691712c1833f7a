//! IPv4 conntrack: two LRU maps, two kinds of entry per translated flow.
//!
//! - [`CT4_NEW_MAP`] holds flows that are not yet established: a new flow's two entries are
//!   written there. A SYN flood, or a spray of one-way UDP, fills only this table.
//! - [`CT4_MAP`] holds established flows (a reply, then the client again). The client's
//!   packet that establishes a flow moves both of its entries here (`CT4` written first, then
//!   `CT4_NEW` emptied, so a lookup always finds one of them). Established flows are therefore
//!   evicted only by other flows that got this far, never by a SYN flood (limits: a spoofer's
//!   blind ACK, repeated spoofed UDP; see ARCHITECTURE).
//!
//! An entry lives in one table at a time; lookups read `CT4` first (where nearly every packet's
//! flow is), then `CT4_NEW`. A tuple's claim (`BPF_NOEXIST` into `CT4_NEW`) is checked against
//! `CT4` after the insert, so a flow moved at the same moment is never missed.
//!
//! - A *service* entry, keyed by the tuple the client sent (client -> frontend), pins the flow
//!   to its backend for its whole life, even when the Service's backends change.
//! - A *reverse* entry, keyed by the tuple after translation (client or SNAT address ->
//!   backend), holds what replies must show (the frontend) and where they go (the client),
//!   and the flow's TCP state.
//!
//! One reverse entry, one flow: the backend sees a flow by its translated tuple, so a new
//! flow never overwrites a live reverse entry of another flow. Linux gives a client one source
//! port for connections to different destinations, so two frontends of one backend (a
//! ClusterIP and a NodePort, say) can translate to the same tuple; the second flow's source
//! port is then remapped to a free one of the SNAT port range (`CT_FLAG_PORT_REMAP`), as
//! netfilter does. A closed flow's reverse entry outlives it (10 s, or 60 s with a port of its
//! own); a SYN-ACK that meets it answers a new, direct connection on that tuple (the client now
//! connects to the backend itself), so the entry goes and the SYN-ACK passes untouched.
//!
//! Lifetimes (like Cilium's defaults): TCP established 6 h, TCP opening 60 s, TCP closing
//! (FIN both ways, or RST) 10 s, UDP 60 s. A closed TCP flow SNATed to the node keeps its
//! entries 60 s, as long as the backend may keep the connection in TIME_WAIT: its source port
//! is then not handed to a new flow whose SYN the backend would refuse (a 1 s stall). An
//! expired entry is treated as absent and replaced; the LRU evicts the least recently used
//! when the map is full.
//!
//! Several CPUs update one entry at once (a flow's packets and its replies are often handled
//! on different CPUs), and Linux 5.10 has no compare-and-swap or atomic or for BPF, so no
//! field is read, changed and written back:
//! - the state a packet adds after the entry was written goes into a byte of its own per
//!   flag (`fin_fwd`, `fin_reply`, `rst`, `seen_reply`, `established`), which is only ever
//!   set to 1: two CPUs cannot undo each other's bits;
//! - the entry stores when it last saw a packet (`seen_ns`), not when it expires: the expiry
//!   is computed when the entry is read, from the state then ([`Ct4Entry::expires_ns`]), so
//!   a CPU that had not yet seen a FIN cannot give a closed flow 6 h back;
//! - `flags` is written once, with the entry: how the flow is translated, and its state then.
//!
//! The packet and byte counts are plain increments and may lose one when two CPUs count at
//! once (they are for the CLI only).

/// The programs' global (a `u8` in `.rodata`) that the agent sets to 1 at load where the
/// kernel has `bpf_ktime_get_coarse_ns` (5.11+): every time the programs keep (`seen_ns`,
/// affinity) is then the coarse clock's, up to a tick behind the precise one.
pub const COARSE_CLOCK_GLOBAL: &str = "SLUICE_COARSE_CLOCK";

/// `CT4`: [`Ct4Key`] -> [`Ct4Entry`]; LRU hash, size set by the agent
/// ([`CT4_DEFAULT_MAX`] otherwise); written by the programs, read by the CLI.
pub const CT4_MAP: &str = "CT4";
pub const CT4_DEFAULT_MAX: u32 = 131_072;

/// `CT4_NEW`: like [`CT4_MAP`], for flows not yet established (half-open TCP, UDP that has had
/// no reply and then a packet from the client); size set by the agent ([`CT4_NEW_DEFAULT_MAX`]
/// otherwise).
pub const CT4_NEW_MAP: &str = "CT4_NEW";
pub const CT4_NEW_DEFAULT_MAX: u32 = 65_536;

/// [`Ct4Key::kind`] of a service entry (client -> frontend).
pub const CT_KIND_SERVICE: u8 = 1;
/// [`Ct4Key::kind`] of a reverse entry (after translation: client/SNAT -> backend).
pub const CT_KIND_REVERSE: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CT_KIND_SERVICE`] or [`CT_KIND_REVERSE`].
    pub kind: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Entry {
    /// `bpf_ktime_get_ns()` of the entry's latest packet (of its creation, at first). The
    /// entry is dead after [`Ct4Entry::expires_ns`].
    pub seen_ns: u64,
    /// Service entry: the backend. Reverse entry: the original client.
    pub addr_be: u32,
    pub port_be: u16,
    /// `CT_FLAG_*` as the entry was written, never changed after: how the flow is
    /// translated, and its state then. The whole state is [`Ct4Entry::state`].
    pub flags: u16,
    /// Service entry: the source address after SNAT (hairpin, or the node for a remote
    /// backend), 0 if none. Reverse entry: the frontend address replies must come from.
    pub nat_addr_be: u32,
    /// Reverse entry: the frontend port replies must come from. Service entry: the source
    /// port after SNAT or a remap (`CT_FLAG_PORT_REMAP`), 0 to keep the client's.
    pub nat_port_be: u16,
    /// 1 once a FIN was seen from the client after the entry was written (never reset).
    pub fin_fwd: u8,
    /// 1 once a FIN was seen from the backend after the entry was written (never reset).
    pub fin_reply: u8,
    /// The frontend's reverse-NAT id (for the CLI and metrics).
    pub rev_nat_id: u32,
    /// 1 once an RST was seen either way after the entry was written (never reset).
    pub rst: u8,
    /// 1 once a reply was seen after the entry was written (never reset).
    pub seen_reply: u8,
    /// 1 once the flow became established after the entry was written (never reset).
    pub established: u8,
    pub _pad: u8,
    /// Packets and bytes seen by this entry (its direction only).
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Entry>() == 48);

impl Ct4Entry {
    /// The flow's state: `flags` with the bits set since. (Without branches: each byte is 0
    /// or 1, and the kernel's verifier walks every path a branch would make.)
    pub const fn state(&self) -> u16 {
        self.flags
            | ((self.fin_fwd as u16 & 1) << CT_FLAG_FIN_FWD.trailing_zeros())
            | ((self.fin_reply as u16 & 1) << CT_FLAG_FIN_REPLY.trailing_zeros())
            | ((self.rst as u16 & 1) << CT_FLAG_RST.trailing_zeros())
            | ((self.seen_reply as u16 & 1) << CT_FLAG_SEEN_REPLY.trailing_zeros())
            | ((self.established as u16 & 1) << CT_FLAG_ESTABLISHED.trailing_zeros())
    }

    /// When the entry dies: its latest packet plus the lifetime of its state now. `proto` is
    /// its key's.
    pub const fn expires_ns(&self, proto: u8) -> u64 {
        self.seen_ns + ct_lifetime_ns(proto, self.state())
    }
}

/// The state bits a packet may add to an entry after it was written, each kept in a byte of
/// its own ([`Ct4Entry::state`]). `CT_FLAG_SYN` is not among them: it is only ever a flow's
/// first packet's.
pub const CT_LATE_FLAGS: u16 =
    CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY | CT_FLAG_RST | CT_FLAG_SEEN_REPLY | CT_FLAG_ESTABLISHED;

/// A TCP SYN was seen from the client.
pub const CT_FLAG_SYN: u16 = 1 << 0;
/// A packet was seen in the reply direction.
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 1;
/// FIN seen from the client.
pub const CT_FLAG_FIN_FWD: u16 = 1 << 2;
/// FIN seen from the backend.
pub const CT_FLAG_FIN_REPLY: u16 = 1 << 3;
/// RST seen either way.
pub const CT_FLAG_RST: u16 = 1 << 4;
/// The flow was SNATed (hairpin): replies' destination must be put back too.
pub const CT_FLAG_SNAT: u16 = 1 << 5;
/// Reached the established state (a reply, then another packet from the client; for a
/// direct-server-return entry on the backend's node, which sees no client packet, the reply).
pub const CT_FLAG_ESTABLISHED: u16 = 1 << 6;
/// The flow's translated packets are forwarded with a FIB lookup and a redirect, not handed
/// to the stack: they carry the node's own address (SNAT to the node, or a reply showing a
/// NodePort), which the stack would drop as martian at ingress.
pub const CT_FLAG_REDIRECT: u16 = 1 << 7;
/// The client's source port was remapped (its tuple after translation was another live
/// flow's): replies' destination port must be put back, and a closed flow holds the port
/// like an SNATed one.
pub const CT_FLAG_PORT_REMAP: u16 = 1 << 8;
/// Direct server return. On the ingress node (with [`CT_FLAG_REDIRECT`]): the flow is DNATed
/// only and forwarded to the backend's node, its SYNs carrying the frontend in an IPv4 option;
/// its replies never come back here, so the client's first packet after its SYN (the
/// handshake's ACK) establishes it. On the backend's node (a reverse entry written from the
/// option): the backend's replies get the frontend as their source at the uplink's egress and
/// leave for the client directly; the backend's SYN-ACK establishes it (in `CT4_NEW`), and
/// the backend's next packet moves it to `CT4`.
pub const CT_FLAG_DSR: u16 = 1 << 9;

pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_LIFETIME_TCP_OPENING_NS: u64 = 60 * 1_000_000_000;
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_UDP_NS: u64 = 60 * 1_000_000_000;
/// Closed TCP flows with a source port of their own (SNATed to the node, or remapped): Linux's
/// TIME_WAIT (2 MSL).
pub const CT_LIFETIME_TCP_SNAT_CLOSED_NS: u64 = 60 * 1_000_000_000;

/// A steady packet (see [`ct_steady`]) is served from its flow's service entry alone, with
/// one lookup; every this-many-th packet of the flow (by the service entry's count) takes the
/// full way, which reads the reverse entry, checks it is still the flow's, rebuilds it if it
/// was evicted and renews its time.
pub const CT_STEADY_CHECK_EVERY: u64 = 32;
/// A packet is steady only if its flow's previous one came less than this long before.
pub const CT_STEADY_GAP_NS: u64 = 1_000_000_000;
// So a steady flow's reverse entry is renewed (or rebuilt) at least every
// `CT_STEADY_CHECK_EVERY * CT_STEADY_GAP_NS` (32 s), well within the shortest lifetime a steady
// flow can have (UDP, 60 s): client packets alone keep it alive, as they did when each renewed it.
const _: () = assert!(CT_STEADY_CHECK_EVERY * CT_STEADY_GAP_NS * 3 / 2 <= CT_LIFETIME_UDP_NS);

/// Whether a client's packet of protocol `proto` with TCP flags `tcp_flags` (0 for UDP), on a
/// flow whose service entry, in `CT4`, has state `state`, last saw a packet at `seen_ns` and
/// has counted `packets`, may be translated from that entry alone at `now`: the flow is
/// established and open (TCP or UDP), the packet changes no state (no SYN, FIN or RST), the
/// flow's previous packet is less than [`CT_STEADY_GAP_NS`] old and this is not a
/// [`CT_STEADY_CHECK_EVERY`]-th packet. Such a packet would change nothing in the reverse entry
/// but its time: a reply's FIN or RST marks the service entry too, so `state` shows it.
pub const fn ct_steady(
    proto: u8,
    tcp_flags: u8,
    state: u16,
    seen_ns: u64,
    packets: u64,
    now: u64,
) -> bool {
    const SYN_FIN_RST: u8 = crate::TCP_SYN | crate::TCP_FIN | crate::TCP_RST;
    let open_established = state
        & (CT_FLAG_ESTABLISHED | CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY | CT_FLAG_RST)
        == CT_FLAG_ESTABLISHED;
    let quiet = match proto {
        crate::IPPROTO_TCP => tcp_flags & SYN_FIN_RST == 0,
        crate::IPPROTO_UDP => true,
        _ => false,
    };
    // A `seen_ns` after `now` (another CPU's, a moment later) wraps to a long gap: full way.
    open_established
        && quiet
        && !packets.is_multiple_of(CT_STEADY_CHECK_EVERY)
        && now.wrapping_sub(seen_ns) < CT_STEADY_GAP_NS
}

/// Whether TCP state `flags` is closed (FIN both ways, or RST).
pub const fn ct_closed(flags: u16) -> bool {
    flags & CT_FLAG_RST != 0
        || (flags & CT_FLAG_FIN_FWD != 0 && flags & CT_FLAG_FIN_REPLY != 0)
        // A direct-server-return entry sees one direction only: its FIN closes it.
        || (flags & CT_FLAG_DSR != 0 && flags & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY) != 0)
}

/// The lifetime a flow gets from its state, the same on both sides of the kernel line.
pub const fn ct_lifetime_ns(proto: u8, flags: u16) -> u64 {
    if proto != crate::IPPROTO_TCP {
        return CT_LIFETIME_UDP_NS;
    }
    if ct_closed(flags) {
        if flags & (CT_FLAG_REDIRECT | CT_FLAG_PORT_REMAP) != 0 {
            CT_LIFETIME_TCP_SNAT_CLOSED_NS
        } else {
            CT_LIFETIME_TCP_CLOSING_NS
        }
    } else if flags & CT_FLAG_ESTABLISHED != 0 {
        CT_LIFETIME_TCP_ESTABLISHED_NS
    } else {
        CT_LIFETIME_TCP_OPENING_NS
    }
}

crate::impl_pod!(Ct4Key, Ct4Entry);

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: u16 = CT_FLAG_SEEN_REPLY | CT_FLAG_ESTABLISHED;
    use crate::{TCP_ACK as ACK, TCP_FIN, TCP_RST, TCP_SYN};

    #[test]
    fn only_a_recent_quiet_packet_of_an_open_established_flow_is_steady() {
        let now = 100 * CT_STEADY_GAP_NS;
        let seen = now - 1_000;
        assert!(ct_steady(crate::IPPROTO_TCP, ACK, OPEN, seen, 5, now));
        assert!(ct_steady(crate::IPPROTO_UDP, 0, OPEN, seen, 5, now));
        // Not established, or closing.
        assert!(!ct_steady(
            crate::IPPROTO_TCP,
            ACK,
            CT_FLAG_SEEN_REPLY,
            seen,
            5,
            now
        ));
        for closing in [CT_FLAG_FIN_FWD, CT_FLAG_FIN_REPLY, CT_FLAG_RST] {
            assert!(!ct_steady(
                crate::IPPROTO_TCP,
                ACK,
                OPEN | closing,
                seen,
                5,
                now
            ));
        }
        // A packet that changes the state.
        for flags in [
            TCP_FIN,
            TCP_SYN,
            TCP_RST,
            TCP_FIN | ACK,
            TCP_SYN | ACK,
            TCP_RST | ACK,
        ] {
            assert!(
                !ct_steady(crate::IPPROTO_TCP, flags, OPEN, seen, 5, now),
                "{flags:#x}"
            );
        }
        // SCTP keeps the full way.
        assert!(!ct_steady(crate::IPPROTO_SCTP, 0, OPEN, seen, 5, now));
        // The check's turn.
        assert!(!ct_steady(crate::IPPROTO_TCP, ACK, OPEN, seen, 0, now));
        assert!(!ct_steady(
            crate::IPPROTO_TCP,
            ACK,
            OPEN,
            seen,
            2 * CT_STEADY_CHECK_EVERY,
            now
        ));
        // After a pause, and when another CPU's packet was seen after `now` was read.
        assert!(!ct_steady(
            crate::IPPROTO_TCP,
            ACK,
            OPEN,
            now - CT_STEADY_GAP_NS,
            5,
            now
        ));
        assert!(!ct_steady(crate::IPPROTO_TCP, ACK, OPEN, now + 1, 5, now));
    }
}
