//! Forwarding without the stack: a FIB lookup and a redirect. Used for packets that carry one
//! of the node's own addresses after translation (SNATed to the node, or a reply showing a
//! NodePort): handed to the stack at ingress, the kernel would drop them as martians.
//!
//! The lookup is done before the packet is rewritten, from the addresses it will have, so that
//! a packet too big for the route can still be answered with an ICMP quoting what the client
//! sent. The kernel checks the length against the device's MTU, or the route's when that is
//! locked (`mtu lock N`; an unlocked route MTU the FIB lookup ignores). The redirect then decrements the TTL (this is a router hop), sets the MAC addresses
//! and sends the packet out of the route's device; when the neighbour is not resolved yet,
//! `bpf_redirect_neigh` lets the kernel resolve it.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use proxy_common::{IPPROTO_SCTP, IPPROTO_TCP};

use crate::parse::{Flow, IP_CSUM_OFF, IP_TTL_OFF};

const AF_INET: u8 = 2;

/// Where a packet goes.
pub struct Route {
    pub ifindex: u32,
    /// The next hop's address: the gateway, or the destination itself on a link.
    next_hop_be: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    /// The neighbour (next hop's MAC) is known; otherwise the kernel resolves it.
    pub resolved: bool,
}

impl Route {
    /// Whether `other` leaves by the same device to the same next hop (by its address: a
    /// network that answers every ARP request with one MAC address, or an unresolved
    /// neighbour, would make MAC addresses look alike).
    #[inline(always)]
    pub fn same_hop(&self, other: &Route) -> bool {
        self.ifindex == other.ifindex && self.next_hop_be == other.next_hop_be
    }

    /// The Ethernet header's destination then source MAC address, for the route's next hop.
    #[inline(always)]
    pub fn macs(&self) -> [u8; 12] {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&self.dmac);
        macs[6..].copy_from_slice(&self.smac);
        macs
    }
}

pub enum Fib {
    Route(Route),
    /// The route's MTU is below the packet's length.
    FragNeeded {
        mtu: u16,
    },
    /// No route (unreachable, blackhole, forwarding off, ...).
    NoRoute,
}

/// The ingress device of the packet.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel passed us.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

fn gso_size(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel passed us.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size }
}

/// Whether the packet is a GSO (GRO-aggregated) one.
#[inline(always)]
pub fn is_gso(ctx: &TcContext) -> bool {
    gso_size(ctx) != 0
}

/// The IP length of the packets `f` will leave as: its own, or for a GSO (GRO-aggregated)
/// packet, that of one segment (headers plus the segment size), which is what the route
/// must carry.
#[inline(always)]
pub fn wire_len(ctx: &TcContext, f: &Flow) -> u16 {
    let gso_size = gso_size(ctx);
    if gso_size == 0 {
        return f.tot_len;
    }
    if f.proto == IPPROTO_SCTP {
        // SCTP's GSO packets are cut at their chunks (GSO_BY_FRAGS), each already sized by the
        // sender to the path MTU: there is no one segment size to check.
        return 0;
    }
    let l4_hdr = if f.proto == IPPROTO_TCP {
        // The data offset, in 32-bit words, is the high nibble of byte 12.
        ctx.load::<u8>((f.l4_off + 12) as usize)
            .map_or(20, |b| u32::from(b >> 4) * 4)
    } else {
        8
    };
    (f.ihl_bytes + l4_hdr + gso_size).min(u32::from(u16::MAX)) as u16
}

/// Looks up the route a packet from `saddr_be` to `daddr_be` of `tot_len` bytes (on the wire:
/// [`wire_len`]) would take, checking it against the route's MTU (0: no check).
#[inline(always)]
pub fn lookup(ctx: &TcContext, saddr_be: u32, daddr_be: u32, proto: u8, tot_len: u16) -> Fib {
    lookup_from(
        ctx.as_ptr(),
        ifindex(ctx),
        saddr_be,
        daddr_be,
        proto,
        tot_len,
    )
}

/// Zeroes the `bpf_fib_lookup` at `p` with sixteen 4-byte stores. `mem::zeroed` compiles to a
/// call to `memset`, which in BPF is a byte loop in a function of its own: 64 rounds of five
/// instructions on every FIB lookup (each redirected packet, at TC and at XDP).
///
/// # Safety
/// `p` must point at a writable `bpf_fib_lookup` on the caller's stack.
#[inline(always)]
unsafe fn zero_params(p: *mut FibParams) {
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    const _: () = assert!(core::mem::align_of::<FibParams>() >= 4);
    let w = p.cast::<u32>();
    // Volatile, so that LLVM does not fold the stores back into a `memset`. u32s, not u64s:
    // the struct is 4-byte aligned.
    // SAFETY: the caller's promise; 16 u32s are the struct's 64 bytes.
    unsafe {
        let mut i = 0;
        while i < 16 {
            core::ptr::write_volatile(w.add(i), 0);
            i += 1;
        }
    }
}

/// [`lookup`] for any program's context `ctx` (TC's or XDP's), as if the packet came in on
/// device `ifindex`.
#[inline(always)]
pub fn lookup_from(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    saddr_be: u32,
    daddr_be: u32,
    proto: u8,
    tot_len: u16,
) -> Fib {
    let mut slot = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: our own stack; every byte is zeroed, and all-zero is a valid (empty) query.
    let p = unsafe {
        zero_params(slot.as_mut_ptr());
        &mut *slot.as_mut_ptr()
    };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = saddr_be;
    p.__bindgen_anon_4.ipv4_dst = daddr_be;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size we pass; `ctx` is the
    // program's own context.
    let rc = unsafe { bpf_fib_lookup(ctx, p, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc < 0 {
        return Fib::NoRoute;
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: after a successful lookup the union holds the MAC addresses.
            let macs = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            Fib::Route(Route {
                ifindex: p.ifindex,
                // SAFETY: after a successful lookup the kernel leaves the gateway here, if
                // the route has one.
                next_hop_be: unsafe { p.__bindgen_anon_4.ipv4_dst },
                smac: macs.smac,
                dmac: macs.dmac,
                resolved: rc as u32 == BPF_FIB_LKUP_RET_SUCCESS,
            })
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Fib::FragNeeded {
            // SAFETY: on FRAG_NEEDED the kernel (>= 5.12) writes the MTU into the union.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        _ => Fib::NoRoute,
    }
}

/// Whether the route from `saddr_be` back to `daddr_be` leaves by the device the packet came
/// in on (a reply to a client from outside goes back out of the uplink it arrived on).
#[inline(always)]
pub fn back_by_ingress(ctx: &TcContext, saddr_be: u32, daddr_be: u32, proto: u8) -> bool {
    back_by(ctx.as_ptr(), ifindex(ctx), saddr_be, daddr_be, proto)
}

/// [`back_by_ingress`] for any program's context `ctx` (TC's or XDP's), the packet having come
/// in on device `ingress`.
#[inline(always)]
pub fn back_by(
    ctx: *mut core::ffi::c_void,
    ingress: u32,
    saddr_be: u32,
    daddr_be: u32,
    proto: u8,
) -> bool {
    match lookup_from(ctx, ingress, saddr_be, daddr_be, proto, 0) {
        Fib::Route(r) => r.ifindex == ingress,
        _ => false,
    }
}

/// Sends the (already rewritten) packet back out of the device it came in on, to the host it
/// came from: the MAC addresses swapped, no routing (so no TTL change, and no martian check of
/// a source that is one of the node's own addresses). `None`: a rewrite failed; the caller
/// drops and counts.
#[inline(always)]
pub fn back_out(ctx: &TcContext) -> Option<i32> {
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;
    // SAFETY: no memory arguments; flags 0: the device's egress.
    let verdict = unsafe { bpf_redirect(ifindex(ctx), 0) } as i32;
    if verdict == TC_ACT_SHOT as i32 {
        return None;
    }
    Some(verdict)
}

/// Sends the (already rewritten) packet along `route`: TTL decremented, MACs set, out of the
/// route's device. `None`: the TTL ran out or a rewrite failed; the caller drops and counts.
#[inline(always)]
pub fn redirect(ctx: &TcContext, route: &Route) -> Option<i32> {
    let ttl: u8 = ctx.load(IP_TTL_OFF as usize).ok()?;
    if ttl <= 1 {
        return None;
    }
    let proto: u8 = ctx.load(IP_TTL_OFF as usize + 1).ok()?;
    // The checksum helper takes the 16-bit word (TTL, protocol) as it lies in memory.
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.l3_csum_replace(IP_CSUM_OFF as usize, u64::from(old), u64::from(new), 2)
        .ok()?;
    ctx.store(IP_TTL_OFF as usize, &(ttl - 1), 0).ok()?;
    let verdict = if route.resolved {
        ctx.store(0, &route.macs(), 0).ok()?;
        // SAFETY: no memory arguments; flags 0: the device's egress.
        unsafe { bpf_redirect(route.ifindex, 0) }
    } else {
        // SAFETY: a null next hop with length 0 asks the kernel to resolve the neighbour of
        // the packet's destination (or of the route's gateway) itself.
        unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    let verdict = verdict as i32;
    if verdict == TC_ACT_SHOT as i32 {
        return None;
    }
    Some(verdict)
}
