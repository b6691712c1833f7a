//! Parsing: Ethernet, IPv4 (options allowed), TCP and UDP ports. Reads go through
//! `bpf_skb_load_bytes`, which checks bounds at run time, so a short packet is an error here,
//! never an out-of-bounds read.
use aya_ebpf::programs::TcContext;
use proxy_common::{
    CTR_PASS_FRAGMENT, CTR_PASS_MALFORMED, CTR_PASS_NOT_IPV4, CTR_PASS_OTHER_PROTO, IPPROTO_TCP,
    IPPROTO_UDP,
};

pub const ETH_LEN: u32 = 14;
pub const IP_CSUM_OFF: u32 = ETH_LEN + 10;
pub const IP_SADDR_OFF: u32 = ETH_LEN + 12;
pub const IP_DADDR_OFF: u32 = ETH_LEN + 16;
const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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

/// A TCP or UDP packet's addressing, as read from the packet (network byte order).
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
}

impl Flow {
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

/// Parses `ctx` as Ethernet + IPv4 + TCP/UDP. `Err` carries the pass counter that says why the
/// packet is not one the datapath translates.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Flow, u32> {
    let eth_type: u16 = ctx.load(12).map_err(|_| CTR_PASS_MALFORMED)?;
    if eth_type != ETH_P_IP_BE {
        return Err(CTR_PASS_NOT_IPV4);
    }
    let ip: Ip4Hdr = ctx.load(ETH_LEN as usize).map_err(|_| CTR_PASS_MALFORMED)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(CTR_PASS_MALFORMED);
    }
    let ihl_bytes = u32::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = u32::from(u16::from_be(ip.tot_len_be));
    if ihl_bytes < 20 || tot_len < ihl_bytes || ETH_LEN + tot_len > ctx.len() {
        return Err(CTR_PASS_MALFORMED);
    }
    let frag = u16::from_be(ip.frag_off_be);
    if frag & (IP_MF | IP_OFFSET) != 0 {
        // Only the first fragment carries ports; translating it alone would split the
        // datagram. Fragments pass untouched and are counted (ARCHITECTURE.md).
        return Err(CTR_PASS_FRAGMENT);
    }
    let l4_len = tot_len - ihl_bytes;
    let min_l4 = match ip.proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Err(CTR_PASS_OTHER_PROTO),
    };
    if l4_len < min_l4 {
        return Err(CTR_PASS_MALFORMED);
    }
    let l4_off = ETH_LEN + ihl_bytes;
    let ports: [u16; 2] = ctx.load(l4_off as usize).map_err(|_| CTR_PASS_MALFORMED)?;
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        ctx.load::<u8>((l4_off + 13) as usize)
            .map_err(|_| CTR_PASS_MALFORMED)?
    } else {
        0
    };
    Ok(Flow {
        l4_off,
        ihl_bytes,
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be: ports[0],
        dport_be: ports[1],
        proto: ip.proto,
        tcp_flags,
    })
}
