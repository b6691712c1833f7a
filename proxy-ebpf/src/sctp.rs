//! SCTP's checksum after a port rewrite, in a program of its own.
//!
//! SCTP carries a CRC32c over the SCTP packet with no pseudo-header: the address rewrites of
//! `nat` leave it valid, and only a changed port needs it updated. The update
//! (`proxy_common::sctp::shift`, a few hundred instructions) lives in `sluice_sctp_checksum`,
//! which the TC programs tail-call once a translated SCTP packet's verdict is known: inlined
//! at each of their rewrites, it multiplied the paths the verifier walks past its limit of a
//! million instructions. Only a packet whose ports changed is handed off (most SCTP packets that
//! pass sluice, pod to pod, keep theirs). The hand-off goes through `skb->cb` (the slots are
//! `proxy_common::SCTP_CB_*`): the ports the packet arrived with (noted by parsing), the
//! verdict, its counter and the packet's length, which the checksum program counts (so every
//! packet still counts exactly one verdict). A redirect set up before the tail call holds: it
//! lives in the CPU's redirect state until the verdict is acted on. If the tail call fails (an
//! empty slot), the packet is dropped and counted `drop_sctp_checksum`; a `redirect` counted
//! before it stays counted.
//!
//! A checksum field of 0 stays 0: the packet is partially checksummed (the device, or the
//! stack before a device without the offload, computes the CRC after us, over the field as 0),
//! or its endpoints agreed on RFC 9653's zero checksum. (A computed CRC that happens to be 0,
//! once in 2^32 packets, is left wrong: the receiver drops it, and SCTP retransmits it.)
use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, helpers::bpf_csum_update, macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    CTR_DROP_SCTP_CHECKSUM, IPPROTO_SCTP, SCTP_CB_ARRIVED_PORTS, SCTP_CB_COUNTER, SCTP_CB_LEN,
    SCTP_CB_VERDICT, TAIL_SCTP_CHECKSUM,
    sctp::{ShiftTables, shift, shift_tables},
};

use crate::{
    maps::LB4_TAILS,
    nat::{csum_add, diff, put},
    parse::{ETH_LEN, Ip4Hdr, read},
    programs::DROP,
    stats::count,
};

/// The CRC32c shift tables, in the programs' read-only data (128 KiB).
static SCTP_SHIFT: ShiftTables = shift_tables();

/// Notes the ports an SCTP packet arrived with (the word at the start of its header, as it
/// lies in memory), for the checksum program: called by parsing, for every SCTP packet that is
/// a flow's (not a fragment).
#[inline(always)]
pub fn note_arrived_ports(ctx: &TcContext, sport_be: u16, dport_be: u16) {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    // SAFETY: the program's own context; `cb` is scratch space TC programs may write.
    unsafe {
        (*skb).cb[SCTP_CB_ARRIVED_PORTS] = u32::from(sport_be) | (u32::from(dport_be) << 16);
    };
}

/// Whether the packet, as it is now, is a whole SCTP packet (not a fragment: one whose arrival
/// parsing noted, unless it was turned into something else, an ICMP reject) whose ports are no
/// longer those it arrived with: one whose checksum needs the update.
#[inline(always)]
pub fn ports_changed(ctx: &TcContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some((_, l4_off)) = whole_sctp(start, end) else {
        return false;
    };
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the program's own context, read.
    let arrived = unsafe { (*skb).cb[SCTP_CB_ARRIVED_PORTS] };
    read::<u32>(start, end, l4_off).is_some_and(|ports| ports != arrived)
}

/// The IPv4 header of a whole SCTP packet (not a fragment) in the linear part `[start, end)`,
/// and the offset of its SCTP header (bounded for the verifier), if the packet is one.
#[inline(always)]
fn whole_sctp(start: usize, end: usize) -> Option<(Ip4Hdr, u32)> {
    let ip: Ip4Hdr = read(start, end, ETH_LEN)?;
    if ip.proto != IPPROTO_SCTP || u16::from_be(ip.frag_off_be) & 0x3fff != 0 {
        return None;
    }
    Some((ip, (ETH_LEN + u32::from(ip.version_ihl & 0x0f) * 4) & 0x7f))
}

/// Hands a translated SCTP packet to `sluice_sctp_checksum`, which counts `counter` and returns
/// `verdict`. Returns only if the tail call failed: then the packet is dropped, counted.
#[inline(always)]
pub fn hand_off(ctx: &TcContext, verdict: i32, counter: u32, len: u32) -> i32 {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    // SAFETY: the program's own context; `cb` is scratch space TC programs may write.
    unsafe {
        (*skb).cb[SCTP_CB_VERDICT] = verdict as u32;
        (*skb).cb[SCTP_CB_COUNTER] = counter;
        (*skb).cb[SCTP_CB_LEN] = len;
        // SAFETY: a tail call either does not return, or fails and returns here.
        let _ = LB4_TAILS.tail_call(ctx, TAIL_SCTP_CHECKSUM);
    }
    count(CTR_DROP_SCTP_CHECKSUM, len);
    DROP
}

/// Tail-called by the TC programs (`hand_off`): brings a translated SCTP packet's checksum up
/// to date with its ports, counts its verdict's counter, and returns its verdict.
#[classifier]
pub fn sluice_sctp_checksum(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the program's own context, read.
    let (arrived, verdict, counter, len) = unsafe {
        (
            (*skb).cb[SCTP_CB_ARRIVED_PORTS],
            (*skb).cb[SCTP_CB_VERDICT] as i32,
            (*skb).cb[SCTP_CB_COUNTER],
            (*skb).cb[SCTP_CB_LEN],
        )
    };
    if update(&ctx, arrived).is_none() {
        count(CTR_DROP_SCTP_CHECKSUM, len);
        return DROP;
    }
    count(counter, len);
    verdict
}

/// Folds the change from the `arrived` ports into the packet's CRC32c. `None`: the packet
/// could not be read or written where it must be.
#[inline(always)]
fn update(ctx: &TcContext, arrived: u32) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // `hand_off` came only for a whole SCTP packet; anything else has nothing to update.
    let Some((ip, l4_off)) = whole_sctp(start, end) else {
        return Some(());
    };
    let ihl = u32::from(ip.version_ihl & 0x0f) * 4;
    let ports: u32 = read(start, end, l4_off)?;
    let delta = ports ^ arrived;
    if delta == 0 {
        return Some(());
    }
    let crc: u32 = read(start, end, l4_off + 8)?;
    // The SCTP packet's length: the IP datagram's after its header (not the frame's, which may
    // carry Ethernet padding the CRC does not cover). Parsing checked it is at least 12.
    let sctp_len = u32::from(u16::from_be(ip.tot_len_be)).saturating_sub(ihl);
    let new = if crc == 0 {
        0
    } else {
        crc ^ shift(&SCTP_SHIFT, sctp_len, delta)
    };
    if new != crc {
        put(ctx, l4_off + 8, new).ok()?;
    }
    // A CHECKSUM_COMPLETE packet's `skb->csum` follows the bytes that changed (the helper
    // fails harmlessly on any other).
    // SAFETY: the program's own context.
    let _ = unsafe {
        bpf_csum_update(
            ctx.as_ptr() as *mut __sk_buff,
            csum_add(diff(arrived, ports), diff(crc, new)),
        )
    };
    Some(())
}
