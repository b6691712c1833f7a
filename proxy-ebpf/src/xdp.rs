//! The XDP program on uplinks: the packets of established flows from outside, DNATed before
//! the kernel builds an skb.
//!
//! | program                  | attach at           | does                                        |
//! |--------------------------|---------------------|---------------------------------------------|
//! | `sluice_xdp_from_uplink` | XDP of uplinks      | an established flow's packet: DNAT, XDP_PASS |
//! | `sluice_xdp_tx`          | nowhere             | XDP_TX: the benchmark's floor               |
//!
//! It is a fast path in front of `sluice_from_uplink` (TC ingress), not a second datapath: it
//! reads the same conntrack, and translates only what TC would translate the same way
//! without choosing anything: a TCP or UDP packet from a client, to a frontend's address,
//! whose flow is in `CT4` (established) with a reverse entry of its own, DNAT only (no SNAT,
//! no port remap, not forwarded by the node), and which changes no state (no SYN, FIN or RST).
//! It updates both entries as TC's `forward` does (`conntrack::touch` with
//! `conntrack::forward_state`), rewrites the destination with its checksums, and passes the
//! packet on: the stack routes it to the pod, and TC ingress lets it by (its destination is a
//! backend's, no frontend's). Everything else passes untouched to TC, which chooses backends,
//! SNATs, redirects, answers refusals and follows state, so a flow never changes backend
//! between the two paths and nothing is lost when XDP is off.
//!
//! Its own checksum updates are plain RFC 1624 arithmetic, right for a packet that carries its
//! full checksum, as every frame from a real NIC does. A packet from a veth peer with checksum
//! offload may carry a partial one (the field holds only the pseudo-header's sum, and
//! `skb->ip_summed` says so, which XDP cannot read): such a packet, recognised by that sum, goes
//! to TC, whose checksum helper knows. (A full checksum equal to its pseudo-header's sum, one
//! packet in 65,536, goes to TC too: slower, never wrong.)
//!
//! Its counters (`xdp_*`) are its own account: its packets then go through TC, which counts
//! them again.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use proxy_common::{
    CT_FLAG_PORT_REMAP, CT_FLAG_REDIRECT, CT_FLAG_SNAT, CTR_XDP_CT_HIT, CTR_XDP_SEEN,
    CTR_XDP_TO_TC_FLOW, CTR_XDP_TO_TC_NOT_SERVICE, CTR_XDP_TO_TC_PARTIAL_CSUM, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::{
    conntrack::{self, forward_state, owned_by, reply_key, service_key, touch, translated_key},
    nat::{csum_add, diff, fold},
    parse::{
        ETH_LEN, ETH_P_IP_BE, Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_MF, IP_OFFSET, Ip4Hdr,
        NOT_FRAGMENT, TCP_FIN, TCP_RST, TCP_SYN, read,
    },
    programs::{ingress_dest, may_be_snated_reply},
    stats::count,
};

/// Packets from outside: an established flow's packet is DNATed here; all else goes to TC.
#[xdp]
pub fn sluice_xdp_from_uplink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u32;
    count(CTR_XDP_SEEN, len);
    let counter = match fast_path(start, end, len) {
        Ok(()) => CTR_XDP_CT_HIT,
        Err(counter) => counter,
    };
    count(counter, len);
    xdp_action::XDP_PASS
}

/// Sends every packet back out of the device it came in by: the floor the benchmark compares
/// the XDP program with. Never attached.
#[xdp]
pub fn sluice_xdp_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// A TCP or UDP packet's addressing and where its L4 checksum is, as XDP reads it.
struct Parsed {
    flow: Flow,
    /// The L4 checksum as it lies in the packet.
    l4_csum: u16,
}

/// DNATs the packet at `[start, end)` if it is an established flow's; else why not (the
/// counter of the reason it goes to TC).
#[inline(always)]
fn fast_path(start: usize, end: usize, len: u32) -> Result<(), u32> {
    let Parsed { flow: f, l4_csum } = parse(start, end, len)?;
    // Only a frontend's address, or the node's SNAT and hairpin addresses, can be a flow's
    // destination (as at TC ingress).
    let maybe_reply = ingress_dest(&f).ok_or(CTR_XDP_TO_TC_NOT_SERVICE)?;
    if f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    // A reply of a flow SNATed to the node arrives at its address: TC translates it (it looks
    // replies up first, and so must anything in front of it).
    if (maybe_reply || may_be_snated_reply(&f)) && conntrack::find(&reply_key(&f)).is_some() {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    if looks_partial(&f, l4_csum) {
        return Err(CTR_XDP_TO_TC_PARTIAL_CSUM);
    }
    let now = conntrack::now();
    let skey = service_key(&f);
    let s = conntrack::established(&skey, now).ok_or(CTR_XDP_TO_TC_FLOW)?;
    let svc = conntrack::pinned(s);
    if svc.nat_addr_be != 0 || svc.nat_port_be != 0 {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let rkey = translated_key(&f, 0, 0, svc.addr_be, svc.port_be);
    let r = conntrack::established(&rkey, now).ok_or(CTR_XDP_TO_TC_FLOW)?;
    if !owned_by(r, f.saddr_be, f.sport_be, f.daddr_be, f.dport_be) {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    // SAFETY: a pointer from a successful lookup.
    let state = unsafe { (*r).state() };
    let flags = forward_state(&f, state);
    if (svc.flags | flags) & (CT_FLAG_SNAT | CT_FLAG_REDIRECT | CT_FLAG_PORT_REMAP) != 0 {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    // Every bound the rewrite needs was checked by `parse`: from here nothing fails.
    touch(r, state, flags, now, 0);
    touch(s, svc.state, flags, now, len);
    dnat(start, end, &f, l4_csum, svc.addr_be, svc.port_be);
    Ok(())
}

/// Ethernet, IPv4 (options allowed, no fragment), TCP or UDP with its header whole.
#[inline(always)]
fn parse(start: usize, end: usize, len: u32) -> Result<Parsed, u32> {
    const NO: u32 = CTR_XDP_TO_TC_NOT_SERVICE;
    let eth_type: u16 = read(start, end, 12).ok_or(NO)?;
    if eth_type != ETH_P_IP_BE {
        return Err(NO);
    }
    let ip: Ip4Hdr = read(start, end, ETH_LEN).ok_or(NO)?;
    let ihl_bytes = u32::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = u32::from(u16::from_be(ip.tot_len_be));
    if ip.version_ihl >> 4 != 4
        || ihl_bytes < 20
        || tot_len < ihl_bytes
        || ETH_LEN + tot_len > len
        || u16::from_be(ip.frag_off_be) & (IP_MF | IP_OFFSET) != 0
    {
        return Err(NO);
    }
    let l4_off = ETH_LEN + ihl_bytes;
    let l4_len = tot_len - ihl_bytes;
    let (min_l4, csum_off) = match ip.proto {
        IPPROTO_TCP => (20, l4_off + 16),
        IPPROTO_UDP => (8, l4_off + 6),
        _ => return Err(NO),
    };
    if l4_len < min_l4 {
        return Err(NO);
    }
    let ports: [u16; 2] = read(start, end, l4_off).ok_or(NO)?;
    let l4_csum: u16 = read(start, end, csum_off).ok_or(NO)?;
    let mut tcp_flags = 0;
    if ip.proto == IPPROTO_TCP {
        // The data offset and the flags (a one-byte read's bounds check compiles to a form
        // the verifier does not credit with that byte).
        let [_, flags]: [u8; 2] = read(start, end, l4_off + 12).ok_or(NO)?;
        tcp_flags = flags;
    }
    Ok(Parsed {
        flow: Flow {
            l4_off,
            ihl_bytes,
            saddr_be: ip.saddr_be,
            daddr_be: ip.daddr_be,
            sport_be: ports[0],
            dport_be: ports[1],
            proto: ip.proto,
            tcp_flags,
            df: false,
            tot_len: tot_len as u16,
            id_be: ip.id_be,
            frag: NOT_FRAGMENT,
        },
        l4_csum,
    })
}

/// Whether the L4 checksum may be a partial one: the folded sum of the pseudo-header, as
/// Linux leaves it for the device (or the veth's peer) to complete. Sums are taken over the
/// words as they lie in memory; ones' complement addition does not mind the byte order.
#[inline(always)]
fn looks_partial(f: &Flow, l4_csum: u16) -> bool {
    let l4_len = f.tot_len.wrapping_sub(f.ihl_bytes as u16);
    let proto_len = (u32::from(f.proto) << 8) | (u32::from(l4_len.to_be()) << 16);
    let pseudo = csum_add(csum_add(f.saddr_be, f.daddr_be), proto_len);
    fold(pseudo) == l4_csum
}

/// Writes `v` at `off` of `[start, end)`, if all of it is there.
#[inline(always)]
fn put<T>(start: usize, end: usize, off: u32, v: T) {
    let p = start + off as usize;
    if p + core::mem::size_of::<T>() <= end {
        // SAFETY: in bounds (checked just above, as the verifier requires); packet data has
        // no alignment.
        unsafe { core::ptr::write_unaligned(p as *mut T, v) };
    }
}

/// The destination to `addr_be:port_be`, with the IPv4 and TCP/UDP checksums brought up to
/// date (RFC 1624: ~(~HC + ~m + m')). A UDP checksum of 0 (none) stays 0, and one that
/// comes to 0 is sent as 0xffff.
#[inline(always)]
fn dnat(start: usize, end: usize, f: &Flow, l4_csum: u16, addr_be: u32, port_be: u16) {
    let addr_diff = diff(f.daddr_be, addr_be);
    let Some(ip_csum) = read::<u16>(start, end, IP_CSUM_OFF) else {
        return;
    };
    put(start, end, IP_DADDR_OFF, addr_be);
    put(
        start,
        end,
        IP_CSUM_OFF,
        !fold(csum_add(u32::from(!ip_csum), addr_diff)),
    );
    // The ports, at most 127 bytes in (bounded for the verifier: the IPv4 header is at most
    // 60 bytes).
    let l4 = f.l4_off & 0x7f;
    put(start, end, l4 + 2, port_be);
    if f.proto == IPPROTO_UDP && l4_csum == 0 {
        return;
    }
    let port_diff = diff(u32::from(f.dport_be), u32::from(port_be));
    let mut csum = !fold(csum_add(
        csum_add(u32::from(!l4_csum), addr_diff),
        port_diff,
    ));
    let csum_off = if f.proto == IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    if f.proto == IPPROTO_UDP && csum == 0 {
        csum = 0xffff;
    }
    put(start, end, csum_off, csum);
}
