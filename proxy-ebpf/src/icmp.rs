//! ICMP errors about translated flows, put back to what the client knows.
//!
//! A router on the way to a backend (fragmentation needed), or the backend itself (port
//! unreachable), reports about the packet it saw: the translated one (client or node ->
//! backend). The client's kernel matches an error to a socket by the packet it quotes, so the
//! quote must show what the client sent (client -> frontend), or path-MTU discovery stalls
//! and a UDP client waits for a reply that never comes instead of getting ECONNREFUSED.
//!
//! The quoted tuple, as it stands, is the key of the flow's reverse entry. Rewritten:
//! - the quoted destination -> the frontend; for SNATed flows (and flows whose port was
//!   remapped) the quoted source -> the client,
//!   and the error's destination (the node) -> the client;
//! - the error's source, when it is the backend itself, -> the frontend (as for replies).
//!
//! Checksums: a quoted address changes with the quoted IP checksum, which leaves the ICMP
//! checksum's sum over the quoted header unchanged; a quoted port changes the ICMP checksum.
//! The quoted TCP/UDP checksum is left as it is (no receiver checks it in an error).
//!
//! Like replies, errors of flows without SNAT are translated at egress (after routing, the
//! error's destination is the client), errors of SNATed flows at ingress (their destination
//! is the node, and must change before the kernel can route them).
//!
//! The other direction: an error about a *reply* (a router on the client's side too small
//! for the backend's answers, or a client whose UDP socket has closed) quotes what the client
//! received (frontend -> client) and is addressed to the frontend. That quote, reversed, is the
//! key of the flow's service entry; at ingress the error is put back to what the backend sent
//! (backend -> client, or -> the node's SNAT address and port) and addressed to the backend,
//! which the kernel then routes like any packet to a pod.
use proxy_common::{
    CT_FLAG_PORT_REMAP, CT_FLAG_REDIRECT, CT_FLAG_SNAT, CT_KIND_REVERSE, CTR_DROP_FIB,
    CTR_DROP_REWRITE, CTR_ICMP_ERROR, CTR_PASS_NO_MATCH, CTR_PASS_REPLY_AT_EGRESS, CTR_REDIRECT,
    Ct4Entry, Ct4Key,
};

use aya_ebpf::programs::TcContext;

use crate::{
    conntrack::{lookup, service_key_of},
    fib::{self, Fib},
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPPROTO_ICMP, IcmpError},
    stats::count,
};

pub struct RewriteFailed;

/// Rewrites a quoted address at `off` (its IP checksum at `inner_l3_off + 10`).
#[inline(always)]
fn inner_addr(
    ctx: &TcContext,
    e: &IcmpError,
    off: u32,
    old: u32,
    new: u32,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(
        (e.inner_l3_off + 10) as usize,
        u64::from(old),
        u64::from(new),
        4,
    )
    .map_err(|_| RewriteFailed)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

/// Rewrites a quoted port at `off`, fixing the ICMP checksum.
#[inline(always)]
fn inner_port(
    ctx: &TcContext,
    e: &IcmpError,
    off: u32,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace((e.icmp_off + 2) as usize, u64::from(old), u64::from(new), 2)
        .map_err(|_| RewriteFailed)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

/// Rewrites the error's own address at `off` (ICMP has no pseudo-header: the IP checksum only).
#[inline(always)]
fn outer_addr(ctx: &TcContext, off: u32, old: u32, new: u32) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF as usize, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(off as usize, &new, 0).map_err(|_| RewriteFailed)
}

/// Puts an error about a translated packet back; `own_source` when the flow's source was
/// translated too (SNAT, or a remapped port), so the quoted source and the error's destination
/// go back to the client.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    e: &IcmpError,
    c: &Ct4Entry,
    own_source: bool,
) -> Result<(), RewriteFailed> {
    let q = &e.inner;
    inner_addr(ctx, e, e.inner_l3_off + 16, q.daddr_be, c.nat_addr_be)?;
    inner_port(ctx, e, e.inner_l4_off + 2, q.dport_be, c.nat_port_be)?;
    if own_source {
        inner_addr(ctx, e, e.inner_l3_off + 12, q.saddr_be, c.addr_be)?;
        inner_port(ctx, e, e.inner_l4_off, q.sport_be, c.port_be)?;
        outer_addr(ctx, IP_DADDR_OFF, e.daddr_be, c.addr_be)?;
    }
    if e.saddr_be == q.daddr_be {
        // From the backend itself: it must look as if from the frontend.
        outer_addr(ctx, IP_SADDR_OFF, e.saddr_be, c.nat_addr_be)?;
    }
    Ok(())
}

/// Handles an ICMP error at `hook`; returns the verdict and its counter.
#[inline(always)]
pub fn error(ctx: &TcContext, e: &IcmpError, now: u64, egress: bool, pass: i32) -> (i32, u32) {
    let q = &e.inner;
    let key = Ct4Key {
        saddr_be: q.saddr_be,
        daddr_be: q.daddr_be,
        sport_be: q.sport_be,
        dport_be: q.dport_be,
        proto: q.proto,
        kind: CT_KIND_REVERSE,
        _pad: [0; 2],
    };
    let Some(p) = lookup(&key, now) else {
        return if egress {
            (pass, CTR_PASS_NO_MATCH)
        } else {
            about_a_reply(ctx, e, now, pass)
        };
    };
    // SAFETY: a live entry from a successful lookup; copied out.
    let c: Ct4Entry = unsafe { *p };
    let snat = c.flags & CT_FLAG_SNAT != 0;
    if !snat && !egress {
        return (pass, CTR_PASS_REPLY_AT_EGRESS);
    }
    if snat && egress {
        return (pass, CTR_PASS_NO_MATCH);
    }
    // A redirected flow's error goes straight back to the client.
    let route = if c.flags & CT_FLAG_REDIRECT != 0 {
        match fib::lookup(ctx, c.nat_addr_be, c.addr_be, IPPROTO_ICMP, 0) {
            Fib::Route(r) => Some(r),
            _ => return (crate::programs::DROP, CTR_DROP_FIB),
        }
    } else {
        None
    };
    // A remapped port is put back like an SNATed source (the address is the client's already).
    let own_source = snat || c.flags & CT_FLAG_PORT_REMAP != 0;
    if rewrite(ctx, e, &c, own_source).is_err() {
        return (crate::programs::DROP, CTR_DROP_REWRITE);
    }
    if let Some(r) = route {
        return match fib::redirect(ctx, &r) {
            Some(v) => {
                count(CTR_REDIRECT, 0);
                (v, CTR_ICMP_ERROR)
            }
            None => (crate::programs::DROP, CTR_DROP_FIB),
        };
    }
    (pass, CTR_ICMP_ERROR)
}

/// An error quoting a reply (frontend -> client), at ingress: to the backend, quoting what the
/// backend sent.
#[inline(always)]
fn about_a_reply(ctx: &TcContext, e: &IcmpError, now: u64, pass: i32) -> (i32, u32) {
    let q = &e.inner;
    let key = service_key_of(q.daddr_be, q.dport_be, q.saddr_be, q.sport_be, q.proto);
    let Some(p) = lookup(&key, now) else {
        return (pass, CTR_PASS_NO_MATCH);
    };
    // SAFETY: a live entry from a successful lookup; copied out.
    let s: Ct4Entry = unsafe { *p };
    // Where the backend sent its reply: the client, or the address and port it was SNATed
    // (or its port remapped) to.
    let to_be = if s.nat_addr_be != 0 {
        s.nat_addr_be
    } else {
        q.daddr_be
    };
    let to_port_be = if s.nat_port_be != 0 {
        s.nat_port_be
    } else {
        q.dport_be
    };
    // Not a closure with `?`: that compiles to a BPF function of its own, whose stack frame
    // Linux 5.10 adds (rounded up to 32 bytes) to the program's, past the 512-byte limit.
    let rewritten = inner_addr(ctx, e, e.inner_l3_off + 12, q.saddr_be, s.addr_be).is_ok()
        && inner_port(ctx, e, e.inner_l4_off, q.sport_be, s.port_be).is_ok()
        && inner_addr(ctx, e, e.inner_l3_off + 16, q.daddr_be, to_be).is_ok()
        && inner_port(ctx, e, e.inner_l4_off + 2, q.dport_be, to_port_be).is_ok()
        && outer_addr(ctx, IP_DADDR_OFF, e.daddr_be, s.addr_be).is_ok();
    if !rewritten {
        return (crate::programs::DROP, CTR_DROP_REWRITE);
    }
    (pass, CTR_ICMP_ERROR)
}
