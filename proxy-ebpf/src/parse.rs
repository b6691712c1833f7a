//! Parsing: Ethernet, IPv4 (options allowed), TCP, UDP and SCTP ports, and ICMP errors with
//! the packet they quote. The headers are read in place (direct packet access), after
//! they are pulled into the packet's linear part if they are not there yet; every read is
//! bounds-checked against the end of that part, so a short packet is an error here, never an
//! out-of-bounds read. (ICMP errors' quotes are read with `bpf_skb_load_bytes`.) A later fragment
//! of a TCP or UDP datagram carries no ports: it takes those its first fragment left in
//! `LB4_FRAGS` (`note_first_fragment`), or is not a flow. SCTP fragments are not followed: a
//! port rewrite needs the whole SCTP packet's length for its checksum (`sctp`), which a first
//! fragment does not carry. (SCTP sizes its packets to the path MTU; Linux fragments only a
//! chunk built before the path MTU dropped.)
use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use proxy_common::{
    CTR_FRAGMENT_FOLLOWED, CTR_PASS_MALFORMED, CTR_PASS_NOT_IPV4, CTR_PASS_OTHER_PROTO, Frag4Key,
    Frag4Ports, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{maps::LB4_FRAGS, stats::count};

pub const IPPROTO_ICMP: u8 = 1;
/// ICMP destination unreachable (port unreachable, fragmentation needed, ...).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;

pub const ETH_LEN: u32 = 14;
pub const IP_CSUM_OFF: u32 = ETH_LEN + 10;
pub const IP_SADDR_OFF: u32 = ETH_LEN + 12;
pub const IP_DADDR_OFF: u32 = ETH_LEN + 16;
pub const IP_TTL_OFF: u32 = ETH_LEN + 8;
pub const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

pub use proxy_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// The IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

/// A TCP, UDP or SCTP packet's addressing, as read from the packet (network byte order).
#[derive(Clone, Copy)]
pub struct Flow {
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: u32,
    /// Length of the IP header in bytes (20 without options).
    pub ihl_bytes: u32,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The don't-fragment bit.
    pub df: bool,
    /// The IP total length.
    pub tot_len: u16,
    /// The IP id (network byte order): with the addresses and protocol, it names a datagram.
    pub id_be: u16,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    pub frag: u8,
}

/// A whole datagram.
pub const NOT_FRAGMENT: u8 = 0;
/// The first fragment of a datagram: it carries the ports, and its L4 checksum covers the
/// whole datagram (incremental updates stay right).
pub const FIRST_FRAGMENT: u8 = 1;
/// A later fragment: no L4 header; its ports are its first fragment's. Only its addresses
/// are rewritten.
pub const LATER_FRAGMENT: u8 = 2;

/// An ICMP error (destination unreachable, time exceeded) quoting a TCP, UDP or SCTP packet: where
/// its parts are, and the quoted packet's addressing (network byte order).
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// Offset of the ICMP header (its checksum is at +2).
    pub icmp_off: u32,
    /// Offsets of the quoted IPv4 header and of its TCP/UDP header.
    pub inner_l3_off: u32,
    pub inner_l4_off: u32,
    /// The error's own source and destination.
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// The quoted packet's tuple.
    pub inner: Tuple,
}

/// Addresses, ports and protocol of a packet (network byte order).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

/// What a packet is, for the programs.
pub enum Packet {
    Flow(Flow),
    IcmpError(IcmpError),
    /// A later fragment of a TCP or UDP datagram whose first fragment this program has not
    /// looked up (it went elsewhere, or has not arrived: fragments are not reordered), or a
    /// fragment of anything else.
    LoneFragment {
        daddr_be: u32,
    },
    /// IPv4 that is neither TCP, UDP nor SCTP, nor an ICMP error about them (ICMP echo, ...):
    /// its addresses, with ports 0.
    Other(Flow),
}

impl Flow {
    /// Whether the packet carries the L4 header (ports, checksum): all but later fragments.
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != LATER_FRAGMENT
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> u32 {
        if self.proto == IPPROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// The most header bytes a translated packet has: Ethernet, IPv4 with options, and TCP up to
/// its flags (or an ICMP header and the start of its quote).
const HEADERS_MAX: u32 = ETH_LEN + 60 + 20;

/// Where the packet's linear part starts and ends, after pulling its headers (up to
/// [`HEADERS_MAX`] bytes) into it if they were not all there. Packet pointers do not survive
/// a helper that may change the packet: read them again after one.
#[inline(always)]
pub fn linear(ctx: &TcContext) -> (usize, usize) {
    let want = ctx.len().min(HEADERS_MAX);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // On failure the reads below fail their bounds checks: a malformed packet.
        let _ = ctx.pull_data(want);
    }
    (ctx.data(), ctx.data_end())
}

/// The `T` at `off` in the linear part `[start, end)`, if all of it is there.
#[inline(always)]
pub fn read<T: Copy>(start: usize, end: usize, off: u32) -> Option<T> {
    let p = start + off as usize;
    if p + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: in bounds (checked just above, as the verifier requires); packet data has no
    // alignment, hence the unaligned read.
    Some(unsafe { core::ptr::read_unaligned(p as *const T) })
}

/// `skb->pkt_type`: who the frame was sent to, by its destination MAC address.
#[inline(always)]
pub fn pkt_type(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel passed us.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).pkt_type }
}

/// `skb->pkt_type` of a frame to this host's own MAC address.
pub const PACKET_HOST: u32 = 0;
/// `skb->pkt_type` of a unicast frame to another host's MAC address, which the stack drops.
pub const PACKET_OTHERHOST: u32 = 3;

/// Parses `ctx` as Ethernet + IPv4 + TCP/UDP, or an ICMP error quoting such a packet. `Err`
/// carries the pass counter that says why the packet is not one the datapath translates.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    parse_as(ctx, true)
}

/// [`parse`] again, in a program the packet was handed to after its first parse: the same
/// result, with nothing counted twice.
#[inline(always)]
pub fn reparse(ctx: &TcContext) -> Result<Packet, u32> {
    parse_as(ctx, false)
}

#[inline(always)]
fn parse_as(ctx: &TcContext, first: bool) -> Result<Packet, u32> {
    let (start, end) = linear(ctx);
    let eth_type: u16 = read(start, end, 12).ok_or(CTR_PASS_MALFORMED)?;
    if eth_type != ETH_P_IP_BE {
        return Err(CTR_PASS_NOT_IPV4);
    }
    let ip: Ip4Hdr = read(start, end, ETH_LEN).ok_or(CTR_PASS_MALFORMED)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(CTR_PASS_MALFORMED);
    }
    let ihl_bytes = u32::from(ip.version_ihl & 0x0f) * 4;
    let ip_len = u32::from(u16::from_be(ip.tot_len_be));
    // IPv4 BIG TCP (Linux 6.3): a TCP GSO packet over 64 KiB carries tot_len 0, and its length
    // is the skb's, as the kernel's iph_totlen() reads it. Anything else with 0 is malformed.
    let tot_len = if ip_len == 0 && ip.proto == IPPROTO_TCP && crate::fib::is_gso(ctx) {
        ctx.len().saturating_sub(ETH_LEN)
    } else {
        ip_len
    };
    if ihl_bytes < 20 || tot_len < ihl_bytes || ETH_LEN + tot_len > ctx.len() {
        return Err(CTR_PASS_MALFORMED);
    }
    let frag = u16::from_be(ip.frag_off_be);
    let l4_off = ETH_LEN + ihl_bytes;
    let frag_kind = if frag & IP_OFFSET != 0 {
        LATER_FRAGMENT
    } else if frag & IP_MF != 0 {
        FIRST_FRAGMENT
    } else {
        NOT_FRAGMENT
    };
    if frag_kind != NOT_FRAGMENT && ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Ok(Packet::LoneFragment {
            daddr_be: ip.daddr_be,
        });
    }
    if frag_kind == LATER_FRAGMENT {
        return Ok(
            later_fragment(&ip, l4_off, ihl_bytes, tot_len, first).map_or(
                Packet::LoneFragment {
                    daddr_be: ip.daddr_be,
                },
                Packet::Flow,
            ),
        );
    }
    let l4_len = tot_len - ihl_bytes;
    let mut flow = Flow {
        l4_off,
        ihl_bytes,
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be: 0,
        dport_be: 0,
        proto: ip.proto,
        tcp_flags: 0,
        df: frag & IP_DF != 0,
        // A BIG TCP packet's own length does not fit; only GSO packets can have one, and
        // for them the wire length is a segment's (`fib::wire_len`).
        tot_len: tot_len.min(u32::from(u16::MAX)) as u16,
        id_be: ip.id_be,
        frag: frag_kind,
    };
    let min_l4 = match ip.proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        // The common header: ports, verification tag, checksum.
        IPPROTO_SCTP => 12,
        IPPROTO_ICMP => {
            // Type and code: a one-byte read's bounds check compiles to a form the verifier
            // does not credit with that byte.
            let [kind, _]: [u8; 2] = read(start, end, l4_off).ok_or(CTR_PASS_MALFORMED)?;
            if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
                return Ok(Packet::Other(flow));
            }
            return icmp_error(ctx, &ip, l4_off).map(Packet::IcmpError);
        }
        _ => return Ok(Packet::Other(flow)),
    };
    if l4_len < min_l4 {
        return Err(CTR_PASS_MALFORMED);
    }
    let ports: [u16; 2] = read(start, end, l4_off).ok_or(CTR_PASS_MALFORMED)?;
    if ip.proto == IPPROTO_TCP {
        // The data offset and the flags (see the ICMP type above).
        let [_, flags]: [u8; 2] = read(start, end, l4_off + 12).ok_or(CTR_PASS_MALFORMED)?;
        flow.tcp_flags = flags;
    }
    flow.sport_be = ports[0];
    flow.dport_be = ports[1];
    if ip.proto == IPPROTO_SCTP {
        crate::sctp::note_arrived_ports(ctx, ports[0], ports[1]);
    }
    Ok(Packet::Flow(flow))
}

/// The key under which a datagram's first fragment leaves its ports.
#[inline(always)]
fn frag_key(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> Frag4Key {
    Frag4Key {
        saddr_be,
        daddr_be,
        id_be,
        proto,
        _pad: 0,
    }
}

/// A later fragment of a TCP or UDP datagram, as a flow with its first fragment's ports, if
/// this program has looked its first fragment up; counted as followed on its `first` parse.
#[inline(always)]
fn later_fragment(
    ip: &Ip4Hdr,
    l4_off: u32,
    ihl_bytes: u32,
    tot_len: u32,
    first: bool,
) -> Option<Flow> {
    let key = frag_key(ip.saddr_be, ip.daddr_be, ip.id_be, ip.proto);
    // SAFETY: the value is two plain integers, copied out.
    let ports: Frag4Ports = *unsafe { LB4_FRAGS.get(&key) }?;
    if first {
        count(CTR_FRAGMENT_FOLLOWED, 0);
    }
    Some(Flow {
        l4_off,
        ihl_bytes,
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be: ports.sport_be,
        dport_be: ports.dport_be,
        proto: ip.proto,
        tcp_flags: 0,
        df: false,
        tot_len: tot_len.min(u32::from(u16::MAX)) as u16,
        id_be: ip.id_be,
        frag: LATER_FRAGMENT,
    })
}

/// Leaves a first fragment's ports for the datagram's later fragments (`later_fragment`).
/// Called by a program that looks the fragment up, before it rewrites anything, so the key
/// and ports are those the later fragments will arrive with at the same program.
#[inline(always)]
pub fn note_first_fragment(f: &Flow) {
    let key = frag_key(f.saddr_be, f.daddr_be, f.id_be, f.proto);
    let ports = Frag4Ports {
        sport_be: f.sport_be,
        dport_be: f.dport_be,
    };
    // An LRU map makes room for it; a refusal leaves the later fragments untranslated,
    // counted as `pass_fragment`.
    let _ = LB4_FRAGS.insert(&key, &ports, 0);
}

/// An ICMP error (destination unreachable or time exceeded) quoting a TCP, UDP or SCTP packet (its
/// IPv4 header and at least the 8 bytes with the ports, as RFC 792 requires). An error about
/// anything else passes untouched.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ip4Hdr, icmp_off: u32) -> Result<IcmpError, u32> {
    let inner_l3_off = icmp_off + 8;
    let inner: Ip4Hdr = ctx
        .load(inner_l3_off as usize)
        .map_err(|_| CTR_PASS_MALFORMED)?;
    if inner.version_ihl >> 4 != 4 {
        return Err(CTR_PASS_MALFORMED);
    }
    let inner_ihl = u32::from(inner.version_ihl & 0x0f) * 4;
    if inner_ihl < 20
        || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP && inner.proto != IPPROTO_SCTP)
    {
        return Err(CTR_PASS_OTHER_PROTO);
    }
    let inner_l4_off = inner_l3_off + inner_ihl;
    let ports: [u16; 2] = ctx
        .load(inner_l4_off as usize)
        .map_err(|_| CTR_PASS_MALFORMED)?;
    Ok(IcmpError {
        icmp_off,
        inner_l3_off,
        inner_l4_off,
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        inner: Tuple {
            saddr_be: inner.saddr_be,
            daddr_be: inner.daddr_be,
            sport_be: ports[0],
            dport_be: ports[1],
            proto: inner.proto,
        },
    })
}
