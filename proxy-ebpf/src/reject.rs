//! ICMP destination unreachable back to the client, from the Service address:
//! - port unreachable for a new connection to a Service with no backends, as kube-proxy does:
//!   TCP clients see "connection refused" at once, UDP clients get ECONNREFUSED; nothing hangs;
//! - fragmentation needed for a packet with DF set that is too big for the route to its
//!   (remote) backend, so that path-MTU discovery works through a Service.
//!
//! The packet is rebuilt in place: trimmed or grown to Ethernet + IPv4 (20, and 20 bytes of
//! zero options) + ICMP (8) + the original IPv4 header and first 8 bytes of its payload (RFC
//! 792), then redirected out of the device it came in on.
//!
//! The options are for a partially checksummed packet (a pod's, with TX checksum offload on).
//! No helper clears that state, so the device that sends the ICMP still completes the old
//! checksum: it sums the bytes from the old TCP/UDP header's offset (34) to the end and writes
//! the result 16 (TCP) or 6 (UDP) bytes further, where the ICMP's quote would be. With 20
//! bytes of options, both places (50 and 40) fall inside them, the ICMP starts at 54, and the
//! bytes summed are the options (zeros) and the ICMP, whose sum is already right; so the
//! completion writes 0 (as 0xffff, `CSUM_MANGLED_0`, which the IPv4 header checksum reads as
//! the same zero) over zero option bytes, after the end-of-options byte. Nothing the client
//! reads changes. For any other packet the options are only padding.

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};

use proxy_common::{REJECT_BURST, REJECT_PER_SEC};

use crate::{
    maps::LB4_REJECT_BUDGET,
    parse::{ETH_LEN, Flow},
};

const INNER_LEN: usize = 28; // the original IPv4 header (no options) + 8 bytes
const OPTIONS_LEN: u32 = 20; // zero bytes: end of options (see the module's doc)
const IP_HDR_LEN: u32 = 20 + OPTIONS_LEN;
const ICMP_LEN: u32 = 8 + INNER_LEN as u32;
const IP_LEN: u32 = IP_HDR_LEN + ICMP_LEN;

/// Folds a one's-complement sum to the 16-bit checksum, in memory order.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The one's-complement sum of the 16-bit words of `b` (as they lie in memory).
#[inline(always)]
fn sum16(b: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < b.len() {
        s += u64::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

/// Writes `v` at `off` of the packet, if its linear part holds it.
#[inline(always)]
fn put<T>(ctx: &TcContext, off: u32, v: &T) -> Option<()> {
    let p = ctx.data() + off as usize;
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: in bounds (checked just above); packet data has no alignment.
    unsafe { core::ptr::write_unaligned(p as *mut T, core::ptr::read(v)) };
    Some(())
}

/// Whether this CPU may send an ICMP error now (a token bucket of `REJECT_BURST`, refilled at
/// `REJECT_PER_SEC`); takes a token if so.
#[inline(always)]
pub fn allowed(now: u64) -> bool {
    const NS_PER_TOKEN: u64 = 1_000_000_000 / REJECT_PER_SEC;
    let Some(b) = LB4_REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a valid pointer into this CPU's own slot; no other CPU writes it, and a program
    // is not preempted on its CPU.
    let b = unsafe { &mut *b };
    let earned = now.saturating_sub(b.last_ns) / NS_PER_TOKEN;
    if earned > 0 {
        b.tokens = (b.tokens + earned).min(REJECT_BURST);
        b.last_ns = if b.tokens == REJECT_BURST {
            now
        } else {
            b.last_ns + earned * NS_PER_TOKEN
        };
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// ICMP destination-unreachable codes.
pub const PORT_UNREACHABLE: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;

/// Turns `ctx` into an ICMP destination unreachable with `code` (and, for fragmentation
/// needed, the next hop's `mtu`) for `flow`, and redirects it back out of the device it came
/// in on.
#[inline(always)]
pub fn unreachable(ctx: &TcContext, flow: &Flow, code: u8, mtu: u16) -> Option<i32> {
    if flow.ihl_bytes != 20 {
        // IP options would have to be quoted too; such packets are dropped and counted.
        return None;
    }
    let inner: [u8; INNER_LEN] = ctx.load(ETH_LEN as usize).ok()?;
    let mut icmp = [0u8; 8];
    icmp[0] = 3; // destination unreachable
    icmp[1] = code;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    // SAFETY: `inner` is 28 bytes on our stack, a multiple of 4.
    let quoted = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            inner.as_ptr() as *mut u32,
            INNER_LEN as u32,
            0,
        )
    };
    if quoted < 0 {
        return None;
    }
    let c = fold(sum16(&icmp) + quoted as u64).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];

    let mut ip = [0u8; 20];
    ip[0] = 0x40 | (IP_HDR_LEN / 4) as u8;
    ip[2..4].copy_from_slice(&(IP_LEN as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 1; // ICMP
    ip[12..16].copy_from_slice(&flow.daddr_be.to_ne_bytes()); // from the Service address
    ip[16..20].copy_from_slice(&flow.saddr_be.to_ne_bytes()); // to the client
    let c = fold(sum16(&ip)).to_ne_bytes(); // the options are zeros
    ip[10] = c[0];
    ip[11] = c[1];

    ctx.change_tail(ETH_LEN + IP_LEN, 0).ok()?;
    put(ctx, ETH_LEN, &ip)?;
    put(ctx, ETH_LEN + 20, &[0u64; (OPTIONS_LEN / 8) as usize])?;
    put(ctx, ETH_LEN + 20 + OPTIONS_LEN / 8 * 8, &0u32)?;
    put(ctx, ETH_LEN + IP_HDR_LEN, &icmp)?;
    put(ctx, ETH_LEN + IP_HDR_LEN + 8, &inner)?;
    crate::fib::back_out(ctx)
}
