//! Rewrites of addresses and ports, with incremental checksum updates: the IPv4 header
//! checksum (l3) and the TCP/UDP checksum (l4, whose pseudo-header covers the addresses).
//! `BPF_F_PSEUDO_HDR` keeps partially checksummed (offloaded) packets right; for UDP,
//! `BPF_F_MARK_MANGLED_0` leaves a zero ("no checksum") checksum zero. A later fragment has no
//! L4 header: only its addresses change; its first fragment's checksum update covers them.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::IPPROTO_UDP;

use crate::parse::{Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

pub struct RewriteFailed;

/// Updates the TCP/UDP checksum for a field changing from `old` to `new`; `flags` carries the
/// field size and whether it is in the pseudo-header.
#[inline(always)]
fn l4_csum(
    ctx: &TcContext,
    flow: &Flow,
    old: u64,
    new: u64,
    flags: u64,
) -> Result<(), RewriteFailed> {
    let udp = if flow.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    ctx.l4_csum_replace(flow.l4_csum_off() as usize, old, new, flags | udp)
        .map_err(|_| RewriteFailed)
}

#[inline(always)]
fn addr(ctx: &TcContext, flow: &Flow, off: u32, old: u32, new: u32) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    if flow.has_l4() {
        l4_csum(
            ctx,
            flow,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | 4,
        )?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF as usize, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn port(ctx: &TcContext, flow: &Flow, off: u32, old: u16, new: u16) -> Result<(), RewriteFailed> {
    if old == new || !flow.has_l4() {
        return Ok(());
    }
    l4_csum(ctx, flow, u64::from(old), u64::from(new), 2)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

/// Rewrites the destination to `addr_be:port_be` (DNAT, or the client on a hairpin reply).
#[inline(always)]
pub fn set_dst(
    ctx: &TcContext,
    flow: &Flow,
    addr_be: u32,
    port_be: u16,
) -> Result<(), RewriteFailed> {
    addr(ctx, flow, IP_DADDR_OFF, flow.daddr_be, addr_be)?;
    port(ctx, flow, flow.l4_off + 2, flow.dport_be, port_be)
}

/// Rewrites the source to `addr_be:port_be` (reverse NAT of a reply, or hairpin SNAT).
#[inline(always)]
pub fn set_src(
    ctx: &TcContext,
    flow: &Flow,
    addr_be: u32,
    port_be: u16,
) -> Result<(), RewriteFailed> {
    addr(ctx, flow, IP_SADDR_OFF, flow.saddr_be, addr_be)?;
    port(ctx, flow, flow.l4_off, flow.sport_be, port_be)
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
    if snat_be != 0 || snat_port_be != 0 {
        let addr = if snat_be != 0 { snat_be } else { flow.saddr_be };
        let port = if snat_port_be != 0 {
            snat_port_be
        } else {
            flow.sport_be
        };
        set_src(ctx, flow, addr, port)?;
    }
    set_dst(ctx, flow, backend_addr_be, backend_port_be)
}
