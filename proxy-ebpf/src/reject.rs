//! ICMP destination unreachable back to the client, from the Service address:
//! - port unreachable for a new connection to a Service with no backends, as kube-proxy does:
//!   TCP clients see "connection refused" at once, UDP clients get ECONNREFUSED; nothing hangs;
//! - fragmentation needed for a packet with DF set that is too big for the route to its
//!   (remote) backend, so that path-MTU discovery works through a Service.
//!
//! The packet is rebuilt in place: trimmed or grown to Ethernet + IPv4 (20) + ICMP (8) + the
//! original IPv4 header and first 8 bytes of its payload (RFC 792), then redirected out of the
//! device it came in on.
use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};

use proxy_common::{REJECT_BURST, REJECT_PER_SEC};

use crate::{
    maps::LB4_REJECT_BUDGET,
    parse::{ETH_LEN, Flow},
};

const INNER_LEN: usize = 28; // the original IPv4 header (no options) + 8 bytes
const ICMP_LEN: usize = 8 + INNER_LEN;
const IP_LEN: usize = 20 + ICMP_LEN;

#[repr(C)]
struct Reply {
    ip: [u8; 20],
    icmp: [u8; ICMP_LEN],
}

/// Folds a 32-bit one's-complement sum to the 16-bit checksum, in memory order.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn csum(buf: *mut u8, len: u32) -> Option<u16> {
    // SAFETY: `buf` points to `len` bytes on our stack; len is a multiple of 4 and <= 512.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), len, 0) };
    if s < 0 { None } else { Some(fold(s as u64)) }
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
    let mut r = Reply {
        ip: [0; 20],
        icmp: [0; ICMP_LEN],
    };
    let inner: [u8; INNER_LEN] = ctx.load(ETH_LEN as usize).ok()?;
    r.icmp[8..].copy_from_slice(&inner);
    r.icmp[0] = 3; // destination unreachable
    r.icmp[1] = code;
    r.icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    let c = csum(r.icmp.as_mut_ptr(), ICMP_LEN as u32)?.to_ne_bytes();
    r.icmp[2] = c[0];
    r.icmp[3] = c[1];

    r.ip[0] = 0x45;
    r.ip[2..4].copy_from_slice(&(IP_LEN as u16).to_be_bytes());
    r.ip[8] = 64; // TTL
    r.ip[9] = 1; // ICMP
    r.ip[12..16].copy_from_slice(&flow.daddr_be.to_ne_bytes()); // from the Service address
    r.ip[16..20].copy_from_slice(&flow.saddr_be.to_ne_bytes()); // to the client
    let c = csum(r.ip.as_mut_ptr(), 20)?.to_ne_bytes();
    r.ip[10] = c[0];
    r.ip[11] = c[1];

    ctx.change_tail(ETH_LEN + IP_LEN as u32, 0).ok()?;
    ctx.store(ETH_LEN as usize, &r, 0).ok()?;
    crate::fib::back_out(ctx)
}
