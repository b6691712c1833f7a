//! Rewrites of addresses and ports, with incremental checksum updates: the IPv4 header
//! checksum (l3) and the TCP/UDP checksum (l4, whose pseudo-header covers the addresses).
//! `BPF_F_PSEUDO_HDR` keeps partially checksummed (offloaded) packets right; for UDP,
//! `BPF_F_MARK_MANGLED_0` leaves a zero ("no checksum") checksum zero.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::IPPROTO_UDP;

use crate::parse::{Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

pub struct RewriteFailed;

#[inline(always)]
fn l4_flags(flow: &Flow) -> u64 {
    if flow.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

#[inline(always)]
fn addr(ctx: &TcContext, flow: &Flow, off: u32, old: u32, new: u32) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    let l4 = l4_flags(flow) | u64::from(BPF_F_PSEUDO_HDR) | 4;
    ctx.l4_csum_replace(
        flow.l4_csum_off() as usize,
        u64::from(old),
        u64::from(new),
        l4,
    )
    .map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(IP_CSUM_OFF as usize, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn port(ctx: &TcContext, flow: &Flow, off: u32, old: u16, new: u16) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    let l4 = l4_flags(flow) | 2;
    ctx.l4_csum_replace(
        flow.l4_csum_off() as usize,
        u64::from(old),
        u64::from(new),
        l4,
    )
    .map_err(|_| RewriteFailed)?;
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
