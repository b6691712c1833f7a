//! Rewrites of addresses and ports, with incremental checksum updates (RFC 1624). The fields
//! and the IPv4 header checksum are written in place (direct packet access): the header
//! checksum is plain arithmetic. The TCP/UDP checksum goes through `bpf_l4_csum_replace`,
//! once for the addresses (with `BPF_F_PSEUDO_HDR`) and once for the ports, because only the
//! kernel knows the packet's checksum state: a partially checksummed (offloaded) packet must
//! get the address change and not the port change, and a CHECKSUM_COMPLETE one must have its
//! `skb->csum` follow the addresses. For UDP, `BPF_F_MARK_MANGLED_0` leaves a zero ("no
//! checksum") checksum zero. A later fragment has no L4 header: only its addresses change;
//! its first fragment's checksum update covers them.
//!
//! SCTP's checksum is a CRC32c over the SCTP packet alone, with no pseudo-header: an address
//! change leaves it valid, and a port change is folded in afterwards by `sctp`'s program,
//! tail-called once the packet's verdict is known.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{IPPROTO_SCTP, IPPROTO_UDP};

use crate::parse::{Flow, IP_CSUM_OFF, IP_SADDR_OFF};

pub struct RewriteFailed;

/// Ones' complement addition, with the end-around carry.
#[inline(always)]
pub(crate) fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}

/// What the ones' complement sum of a packet gains when a 32-bit word (as it lies in memory)
/// changes from `old` to `new`, as the kernel's `csum_diff` computes it.
#[inline(always)]
pub(crate) fn diff(old: u32, new: u32) -> u32 {
    csum_add(!old, new)
}

/// Folds a 32-bit ones' complement sum to 16 bits.
#[inline(always)]
pub(crate) fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Writes `v` at `off` of the packet, if its linear part holds it.
#[inline(always)]
pub(crate) fn put<T>(ctx: &TcContext, off: u32, v: T) -> Result<(), RewriteFailed> {
    let p = ctx.data() + off as usize;
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(RewriteFailed);
    }
    // SAFETY: in bounds (checked just above); packet data has no alignment.
    unsafe { core::ptr::write_unaligned(p as *mut T, v) };
    Ok(())
}

/// Updates the TCP/UDP checksum by `diff` (a change of the pseudo-header when `pseudo`).
#[inline(always)]
fn l4_csum(ctx: &TcContext, flow: &Flow, diff: u32, pseudo: bool) -> Result<(), RewriteFailed> {
    if diff == 0 {
        return Ok(());
    }
    let mut flags = 0; // size 0: `diff` is a difference, not a new value
    if pseudo {
        flags |= u64::from(BPF_F_PSEUDO_HDR);
    }
    if flow.proto == IPPROTO_UDP {
        flags |= u64::from(BPF_F_MARK_MANGLED_0);
    }
    ctx.l4_csum_replace(flow.l4_csum_off() as usize, 0, u64::from(diff), flags)
        .map_err(|_| RewriteFailed)
}

/// Rewrites the packet to go from `saddr_be:sport_be` to `daddr_be:dport_be` (each as it
/// lies in memory; an unchanged field is written unchanged), with its checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
) -> Result<(), RewriteFailed> {
    let addr_diff = csum_add(diff(flow.saddr_be, saddr_be), diff(flow.daddr_be, daddr_be));
    let old_ports = u32::from(flow.sport_be) | (u32::from(flow.dport_be) << 16);
    let new_ports = u32::from(sport_be) | (u32::from(dport_be) << 16);
    let ports_diff = diff(old_ports, new_ports);
    // The IPv4 header: both addresses, then its checksum (RFC 1624: ~(~HC + ~m + m')).
    let start = ctx.data();
    let hdr_end = start + IP_SADDR_OFF as usize + 8;
    if hdr_end > ctx.data_end() {
        return Err(RewriteFailed);
    }
    // SAFETY: in bounds (checked just above).
    let old_csum: u16 =
        unsafe { core::ptr::read_unaligned((start + IP_CSUM_OFF as usize) as *const u16) };
    let csum = !fold(csum_add(u32::from(!old_csum), addr_diff));
    put(ctx, IP_SADDR_OFF, [saddr_be, daddr_be])?;
    put(ctx, IP_CSUM_OFF, csum)?;
    if !flow.has_l4() {
        return Ok(());
    }
    // The ports, at most 127 bytes in (bounded for the verifier: the IPv4 header is at most
    // 60 bytes).
    put(ctx, flow.l4_off & 0x7f, [sport_be, dport_be])?;
    if flow.proto == IPPROTO_SCTP {
        return Ok(());
    }
    l4_csum(ctx, flow, addr_diff, true)?;
    l4_csum(ctx, flow, ports_diff, false)
}

/// Applies a flow's translation to a packet from its client: the source address to `snat_be`
/// (when not 0; else the client's is kept) and its port to `snat_port_be` (when not 0; else the
/// client's is kept), the destination to the backend.
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    flow: &Flow,
    snat_be: u32,
    snat_port_be: u16,
    backend_addr_be: u32,
    backend_port_be: u16,
) -> Result<(), RewriteFailed> {
    let saddr = if snat_be != 0 { snat_be } else { flow.saddr_be };
    let sport = if snat_port_be != 0 {
        snat_port_be
    } else {
        flow.sport_be
    };
    rewrite(ctx, flow, saddr, sport, backend_addr_be, backend_port_be)
}
