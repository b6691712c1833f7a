//! The XDP programs on uplinks: the packets of flows from outside, translated before the
//! kernel builds an skb.
//!
//! | program                  | attach at           | does                                        |
//! |--------------------------|---------------------|---------------------------------------------|
//! | `sluice_xdp_from_uplink` | XDP of uplinks      | an established flow's packet: DNAT and XDP_PASS; SNAT, or DNAT by DSR, and XDP_TX |
//! | `sluice_xdp_new_flow`    | tail-called (`LB4_XDP_TAILS`) | a new flow: backend, entries; DNAT and XDP_PASS, or SNAT (or DNAT and the DSR option) and sent out |
//! | `sluice_xdp_tx`          | nowhere             | XDP_TX: the benchmark's floor               |
//! | `sluice_xdp_pass`        | sandbox veth peers  | XDP_PASS: makes a veth take XDP frames      |
//!
//! It is a fast path in front of `sluice_from_uplink` (TC ingress), not a second datapath: it
//! reads and writes the same conntrack, and translates a packet only as TC would.
//!
//! An established flow's packet (its flow in `CT4`, a TCP or UDP packet that changes no state:
//! no SYN, FIN or RST) is translated without choosing anything:
//! - a client's packet to a frontend's address, DNAT only (a local backend): rewritten and
//!   passed on; the stack routes it to the pod, and TC ingress lets it by (its destination is
//!   a backend's, no frontend's);
//! - a client's packet of a flow SNATed to the node (a backend on another node), or that
//!   backend's reply to the node's SNAT address and port: both addresses and ports rewritten,
//!   the TTL decremented, the MAC addresses of the route's next hop (`bpf_fib_lookup`) set, and
//!   sent out by XDP itself, back out of the uplink (XDP_TX) or to another uplink
//!   (XDP_REDIRECT), as TC's `fib::redirect` would; only on an uplink the agent lets send
//!   (`LB4_XDP_TX`), only for a frame sent to the uplink's own MAC address (`for_another_host`),
//!   and only when the route's neighbour is resolved and the packet fits it.
//! - a client's packet of a flow by direct server return (the ingress node): DNAT only, sent
//!   out the same way by the route from the client's address (a retransmitted SYN, which
//!   carries the option again, is TC's; the first is `sluice_xdp_new_flow`'s).
//! Each updates the flow's entries as TC's `forward` and `reply` do (`conntrack::touch` with
//! `conntrack::forward_state` or `reply_state`; a steady packet, `conntrack::steady`, from
//! its service entry alone).
//!
//! A new flow's first packet (a bare SYN, or a UDP datagram, with no entry in either table) is
//! tail-called into `sluice_xdp_new_flow`, which chooses and records the flow with the code
//! TC's new-flow program runs (`lb::backend_for`, `record::record`), and drops what TC drops.
//! What it does not do (an ICMP refusal, hairpin, a route it may not send by) goes to TC
//! untouched, before anything is recorded (but for a DSR SYN XDP could not make room for the
//! option in, which TC goes on with as a retransmission of the recorded flow). The flow's
//! later packets until it is established (its state, and the move to `CT4`) are TC's; so are
//! fragments, ICMP and other protocols.
//! So a flow never changes backend between the two paths, and nothing is lost when XDP is off.
//!
//! Its own checksum updates are plain RFC 1624 arithmetic, right for a packet that carries its
//! full checksum, as every frame from a real NIC does. A packet from a veth peer with checksum
//! offload may carry a partial one (the field holds only the pseudo-header's sum, and
//! `skb->ip_summed` says so, which XDP cannot read): such a packet, recognised by that sum, goes
//! to TC, whose checksum helper knows. (A full checksum equal to its pseudo-header's sum, one
//! packet in 65,536, goes to TC too: slower, never wrong.)
//!
//! Its counters (`xdp_*`) are its own account: a packet it passes on then goes through TC,
//! which counts it again; a packet it sends out (`xdp_tx`, `xdp_new_flow_tx`) or drops
//! (`xdp_drop`) never reaches TC.
use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{
    BACKEND_FLAG_LOCAL, CT_FLAG_DSR, CT_FLAG_PORT_REMAP, CT_FLAG_REDIRECT, CT_FLAG_SNAT,
    CTR_XDP_CT_HIT, CTR_XDP_DROP, CTR_XDP_NEW_FLOW, CTR_XDP_NEW_FLOW_TX, CTR_XDP_SEEN,
    CTR_XDP_TO_TC_FLOW, CTR_XDP_TO_TC_NOT_SERVICE, CTR_XDP_TO_TC_OTHER_HOST,
    CTR_XDP_TO_TC_PARTIAL_CSUM, CTR_XDP_TO_TC_ROUTE, CTR_XDP_TX, Ct4Entry, IPPROTO_TCP,
    IPPROTO_UDP, Lb4Config, SVC_FLAG_CLUSTER_IP, SVC_FLAG_NO_LOCAL_DROP, TAIL_XDP_NEW_FLOW,
};

use crate::{
    conntrack::{
        self, forward_state, owned_by, reply_key, reply_state, service_key, touch, translated_key,
    },
    dsr,
    fib::{self, Fib, Route},
    lb,
    maps::{LB4_CONFIG, LB4_UPLINK_MACS, LB4_XDP_TAILS, LB4_XDP_TX},
    nat::{csum_add, diff, fold},
    parse::{
        ETH_LEN, ETH_P_IP_BE, Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_MF, IP_OFFSET, IP_SADDR_OFF,
        IP_TTL_OFF, Ip4Hdr, NOT_FRAGMENT, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, read,
    },
    programs::{ingress_dest, may_be_snated_reply, note_pod_client},
    record,
    stats::count,
};

/// Packets from outside: an established flow's packet is translated here, a new flow's first
/// packet goes to `sluice_xdp_new_flow`; all else goes to TC.
#[xdp]
pub fn sluice_xdp_from_uplink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u32;
    count(CTR_XDP_SEEN, len);
    let (action, counter) = match fast_path(&ctx, start, end, len) {
        Ok(None) => (xdp_action::XDP_PASS, CTR_XDP_CT_HIT),
        Ok(Some(out)) => (out, CTR_XDP_TX),
        Err(counter) => (xdp_action::XDP_PASS, counter),
    };
    count(counter, len);
    action
}

/// A new flow's first packet from outside, tail-called by `sluice_xdp_from_uplink` when no
/// entry of its flow exists: the backend chosen and the flow recorded as TC's new-flow
/// program does (`lb::backend_for`, `record::record`), then DNATed and passed on (a local
/// backend), or SNATed to the node (or, by direct server return, given the option naming the
/// frontend) and sent out (a remote one). What it leaves to TC goes untouched, with no
/// conntrack entry written (but for a DSR SYN it could not make room for the option in).
#[xdp]
pub fn sluice_xdp_new_flow(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u32;
    let (action, counter) = match new_flow(&ctx, start, end, len) {
        Ok(None) => (xdp_action::XDP_PASS, CTR_XDP_NEW_FLOW),
        Ok(Some(out)) => (out, CTR_XDP_NEW_FLOW_TX),
        Err(CTR_XDP_DROP) => (xdp_action::XDP_DROP, CTR_XDP_DROP),
        Err(counter) => (xdp_action::XDP_PASS, counter),
    };
    count(counter, len);
    action
}

/// Sends every packet back out of the device it came in by: the floor the benchmark compares
/// the XDP program with. Never attached by the agent.
#[xdp]
pub fn sluice_xdp_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Passes every packet on: on a veth, what makes it take XDP frames (native XDP_TX onto a
/// veth needs a program on the receiving end). For the sandbox's veth peers in tests and the
/// benchmark; never attached by the agent.
#[xdp]
pub fn sluice_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A TCP or UDP packet's addressing and where its L4 checksum is, as XDP reads it.
struct Parsed {
    flow: Flow,
    /// The L4 checksum as it lies in the packet.
    l4_csum: u16,
    ttl: u8,
}

/// Where a packet goes after its translation.
struct To {
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
}

impl To {
    /// Where a client's packet `f` goes under a flow's translation: to the backend
    /// `addr_be:port_be`, from `nat_addr_be` (0: the client's address kept) and `nat_port_be`
    /// (0: the client's port kept), as TC's `nat::translate`.
    #[inline(always)]
    fn translated(f: &Flow, nat_addr_be: u32, nat_port_be: u16, addr_be: u32, port_be: u16) -> To {
        To {
            saddr_be: if nat_addr_be != 0 {
                nat_addr_be
            } else {
                f.saddr_be
            },
            sport_be: if nat_port_be != 0 {
                nat_port_be
            } else {
                f.sport_be
            },
            daddr_be: addr_be,
            dport_be: port_be,
        }
    }
}

/// The next hop of a packet XDP sends out itself.
struct Hop {
    /// Destination then source MAC address, as they lie in the Ethernet header.
    macs: [u8; 12],
    /// The device to redirect to; `None`: back out of the uplink it came in by (XDP_TX).
    redirect_to: Option<u32>,
}

/// Translates the packet at `[start, end)` if it is an established flow's: `Ok(None)`, DNATed
/// and to be passed to the stack; `Ok(Some(action))`, translated and sent out (XDP_TX or
/// XDP_REDIRECT). A new flow's first packet is tail-called into `sluice_xdp_new_flow` (which
/// does not return here). Else why not: the counter of the reason it goes to TC.
#[inline(always)]
fn fast_path(ctx: &XdpContext, start: usize, end: usize, len: u32) -> Result<Option<u32>, u32> {
    let p = parse(start, end, len)?;
    let f = &p.flow;
    // Only a frontend's address, or the node's SNAT and hairpin addresses, can be a flow's
    // destination (as at TC ingress).
    let dest = ingress_dest(f, false).ok_or(CTR_XDP_TO_TC_NOT_SERVICE)?;
    // A packet that changes its flow's TCP state is TC's, but for one that may start a flow:
    // a bare SYN (or any UDP datagram), which XDP's new-flow program takes when no entry of
    // the flow exists.
    let changes_state = f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    let may_open =
        f.proto == IPPROTO_UDP || f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN;
    if changes_state && !may_open {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let now = conntrack::now();
    // A reply of a flow SNATed to the node arrives at its address: it is looked up first, as
    // TC does (and so must anything in front of it). Its live entry in `CT4` is XDP's to
    // take; one anywhere else (expired, or in `CT4_NEW`) makes the packet TC's.
    if dest.maybe_reply || may_be_snated_reply(f) {
        if let Some(live) = conntrack::find_established(&reply_key(f), now) {
            if changes_state {
                return Err(CTR_XDP_TO_TC_FLOW);
            }
            if looks_partial(f, p.l4_csum) {
                return Err(CTR_XDP_TO_TC_PARTIAL_CSUM);
            }
            let e = live.ok_or(CTR_XDP_TO_TC_FLOW)?;
            return snated_reply(ctx, start, end, &p, e, now, len).map(Some);
        }
    }
    // No frontend on the address has the port, nor does any live flow to it (TC answers it,
    // again with no conntrack lookup).
    if !dest.maybe_flow {
        return Err(CTR_XDP_TO_TC_NOT_SERVICE);
    }
    if looks_partial(f, p.l4_csum) {
        return Err(CTR_XDP_TO_TC_PARTIAL_CSUM);
    }
    let skey = service_key(f);
    let Some(s) = conntrack::established(&skey, now) else {
        // No entry of the flow in either table: a new flow, for XDP's new-flow program.
        if may_open && conntrack::not_established(&skey, now).is_none() {
            // SAFETY: the program's own context. A tail call does not return; if it fails
            // (an empty slot), the packet goes to TC as it is.
            let _ = unsafe { LB4_XDP_TAILS.tail_call(ctx, TAIL_XDP_NEW_FLOW) };
        }
        return Err(CTR_XDP_TO_TC_FLOW);
    };
    if changes_state {
        // A SYN on an established flow's tuple: TC's (a retransmission, or a reopening).
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let svc = conntrack::pinned(s);
    let rkey = translated_key(
        f,
        svc.nat_addr_be,
        svc.nat_port_be,
        svc.addr_be,
        svc.port_be,
    );
    // A steady packet is translated from the service entry alone, as at TC (one lookup); the
    // others read the reverse entry too, which must be live in `CT4` and the flow's own.
    let (r, state) = if conntrack::steady(f, s, svc.state, now) {
        (None, svc.state)
    } else {
        let r = conntrack::established(&rkey, now).ok_or(CTR_XDP_TO_TC_FLOW)?;
        if !owned_by(r, f.saddr_be, f.sport_be, f.daddr_be, f.dport_be) {
            return Err(CTR_XDP_TO_TC_FLOW);
        }
        // SAFETY: a pointer from a successful lookup.
        (Some(r), unsafe { (*r).state() })
    };
    let flags = forward_state(f, state);
    // DNAT only: to a local backend (passed to the stack), or by direct server return to a
    // remote one (forwarded from the client's address); or SNAT to the node and forwarded (a
    // remote backend, with a port of the node's own): nothing else.
    let snat = svc.nat_addr_be != 0;
    let dsr = svc.flags & CT_FLAG_DSR != 0;
    let want = if snat {
        CT_FLAG_SNAT | CT_FLAG_REDIRECT
    } else if dsr {
        CT_FLAG_REDIRECT
    } else {
        0
    };
    if (svc.flags | flags) & (CT_FLAG_SNAT | CT_FLAG_REDIRECT | CT_FLAG_PORT_REMAP) != want
        || (svc.nat_port_be != 0) != snat
    {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let to = To::translated(
        f,
        svc.nat_addr_be,
        svc.nat_port_be,
        svc.addr_be,
        svc.port_be,
    );
    let hop = if snat | dsr {
        if for_another_host(ctx, start, end) {
            return Err(CTR_XDP_TO_TC_OTHER_HOST);
        }
        Some(next_hop(ctx, &p, to.saddr_be, to.daddr_be)?)
    } else {
        None
    };
    // Every bound the rewrite needs was checked by `parse`: from here nothing fails.
    if let Some(r) = r {
        conntrack::refresh(r, state, flags, now);
    }
    touch(s, svc.state, flags, now, len);
    Ok(send(start, end, &p, &to, hop.as_ref()))
}

/// The new flow of the packet at `[start, end)`, which `fast_path` found no entry for: as
/// `fast_path`'s result, or [`CTR_XDP_DROP`] for a packet to drop (what TC drops: a source
/// outside the frontend's ranges, externalTrafficPolicy Local without a local endpoint, a
/// flow that cannot be recorded). Before any conntrack entry is written, what XDP does not do
/// goes to TC untouched: a frontend without endpoints (TC refuses it), a ClusterIP from
/// outside, a client that is its own backend, no SNAT address, a route XDP cannot send by.
/// (The last three come after the backend choice, which for a sessionAffinity frontend has
/// written or refreshed the client's affinity entry: TC then chooses the same backend by it,
/// as it would have written it itself, and counts `affinity_hit` once more.) From there
/// it is TC's `new_flow`, step for step, and the bytes are the ones TC would write.
#[inline(always)]
fn new_flow(ctx: &XdpContext, start: usize, end: usize, len: u32) -> Result<Option<u32>, u32> {
    const TC: u32 = CTR_XDP_TO_TC_FLOW;
    // The bytes `fast_path` parsed, unchanged.
    let p = parse(start, end, len)?;
    if for_another_host(ctx, start, end) {
        return Err(CTR_XDP_TO_TC_OTHER_HOST);
    }
    let f = &p.flow;
    let now = conntrack::now();
    // Looked up here: the agent may have removed it since the address's filter was read.
    let fe = lb::frontend(f.daddr_be, f.dport_be, f.proto).ok_or(TC)?;
    if fe.flags & SVC_FLAG_CLUSTER_IP != 0 {
        return Err(TC);
    }
    // loadBalancerSourceRanges: dropped, as TC drops it, before anything else about the flow.
    if !lb::source_allowed(&fe, f.saddr_be) {
        return Err(CTR_XDP_DROP);
    }
    if fe.count == 0 {
        // Refused with an ICMP by TC, which XDP does not build; dropped where the Service
        // has endpoints elsewhere and none here (externalTrafficPolicy Local), as TC drops it.
        if fe.flags & SVC_FLAG_NO_LOCAL_DROP != 0 {
            return Err(CTR_XDP_DROP);
        }
        return Err(TC);
    }
    // No local endpoint for externalTrafficPolicy Local, or a missing entry: TC drops it too.
    let be = lb::backend_for(f, &fe, true, now).map_err(|_| CTR_XDP_DROP)?;
    if be.addr_be == f.saddr_be {
        return Err(TC);
    }
    // SAFETY: the config is plain integers, copied out.
    let cfg: Lb4Config = LB4_CONFIG.get(0).copied().unwrap_or_default();
    let mut flags = forward_state(f, 0);
    // To another node's backend by direct server return, as TC decides it (`dsr::route_by`):
    // DNAT only, the SYN given the option and sent out by XDP on a route it may send by (else
    // TC's). A flow that TC would SNAT instead (the client behind the backend's next hop, or
    // the SYN too big with the option) is SNATed below.
    let by_dsr = if be.flags & BACKEND_FLAG_LOCAL == 0 && dsr::wanted(&cfg, f) {
        let ingress = ctx.ingress_ifindex() as u32;
        dsr::route_by(f, be.addr_be, f.tot_len, |from, to, len| {
            fib::lookup_from(ctx.as_ptr(), ingress, from, to, f.proto, len)
        })
    } else {
        None
    };
    let (snat, hop) = if let Some(r) = &by_dsr {
        let hop = hop_by(ctx, &p, r)?;
        flags |= CT_FLAG_REDIRECT | CT_FLAG_DSR;
        (0, Some(hop))
    } else if be.flags & BACKEND_FLAG_LOCAL == 0 {
        // To another node's backend: SNAT to this node and sent out by XDP, on a route it may
        // send by (else TC's, which resolves neighbours and answers "fragmentation needed").
        if cfg.snat_addr_be == 0 {
            return Err(TC);
        }
        let hop = next_hop(ctx, &p, cfg.snat_addr_be, be.addr_be)?;
        flags |= CT_FLAG_SNAT | CT_FLAG_REDIRECT;
        (cfg.snat_addr_be, Some(hop))
    } else {
        // Not SNATed: its replies are translated at the egress towards its client, which
        // for a pod's egress must be noted (a pod of this node whose traffic came back in).
        let ingress = ctx.ingress_ifindex() as u32;
        if !fib::back_by(ctx.as_ptr(), ingress, be.addr_be, f.saddr_be, f.proto) {
            note_pod_client(f.saddr_be);
        }
        (0, None)
    };
    let rec = record::record(f, &service_key(f), &fe, &be, snat, flags, &cfg, now, len)
        .map_err(|_| CTR_XDP_DROP)?;
    let to = To::translated(
        f,
        rec.nat_addr_be,
        rec.nat_port_be,
        rec.addr_be,
        rec.port_be,
    );
    // A flow another CPU recorded first with another route was dropped by `record`: `hop`
    // is this flow's. (And one it recorded with the same route, by DSR, gets the option as
    // TC's retransmitted SYN does.)
    if by_dsr.is_some() {
        // The flow is recorded: if XDP cannot make room, TC goes on with it (as with a
        // retransmitted SYN: the option, the route).
        let (start, end) = add_dsr_option(ctx, f)?;
        let grown = Parsed {
            flow: Flow {
                l4_off: f.l4_off + dsr::OPT_LEN,
                ..*f
            },
            ..p
        };
        return send(start, end, &grown, &to, hop.as_ref())
            .ok_or(CTR_XDP_DROP)
            .map(Some);
    }
    Ok(send(start, end, &p, &to, hop.as_ref()))
}

/// Inserts the option naming the frontend `f.daddr_be:f.dport_be` after the IPv4 header (no
/// options of its own: `dsr::wanted`), in room made at the front (`bpf_xdp_adjust_head`) by
/// moving the Ethernet and IPv4 headers up; the header's length, total length and checksum
/// follow (`dsr::with_option`, as TC's). Returns the packet's new bounds; else
/// [`CTR_XDP_TO_TC_FLOW`] if no room could be made (the packet is as it was, for TC), or
/// [`CTR_XDP_DROP`] if the grown packet could not be read (it cannot: it is longer than
/// before; but half-moved, it must not go on).
#[inline(always)]
fn add_dsr_option(ctx: &XdpContext, f: &Flow) -> Result<(usize, usize), u32> {
    const HEADERS: u32 = ETH_LEN + 20;
    const BROKEN: u32 = CTR_XDP_DROP;
    // SAFETY: the program's own context; a negative delta makes room at the front.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(dsr::OPT_LEN as i32)) } != 0 {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let headers: [u8; HEADERS as usize] = read(start, end, dsr::OPT_LEN).ok_or(BROKEN)?;
    put(start, end, 0, headers);
    let old_word: u32 = read(start, end, ETH_LEN).ok_or(BROKEN)?;
    let old_csum: u16 = read(start, end, IP_CSUM_OFF).ok_or(BROKEN)?;
    let h = dsr::with_option(f, old_word, old_csum, f.daddr_be, f.dport_be);
    put(start, end, ETH_LEN, h.first_word);
    put(start, end, IP_CSUM_OFF, h.csum);
    put(start, end, HEADERS, h.option);
    Ok((start, end))
}

/// Whether the frame at `[start, end)` is for another host's MAC address than the uplink's
/// own (`LB4_UPLINK_MACS`): a bridge floods a frame while it has not learnt where its
/// destination is, and the stack drops it (`PACKET_OTHERHOST`), as TC passes it. Broadcast and
/// multicast frames are this host's too; an uplink the agent wrote no address for is not
/// checked. Asked of new flows, and of an established flow's packets XDP would send out
/// itself (SNATed to the node, and their replies; by direct server return): sent, such a frame
/// would reach the backend or the client a second time. An established flow's packet that is only DNATed is not asked
/// (it would cost every local-backend hit a lookup): it is passed, and the stack drops it
/// (`PACKET_OTHERHOST`), after it renewed its flow's time.
#[inline(always)]
fn for_another_host(ctx: &XdpContext, start: usize, end: usize) -> bool {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is a plain integer.
    let Some(own) = (unsafe { LB4_UPLINK_MACS.get(&ingress) }) else {
        return false;
    };
    let (Some(first), Some(last)) = (read::<u32>(start, end, 0), read::<u16>(start, end, 4)) else {
        return false;
    };
    // The six bytes in memory order, as the agent wrote its own (the group bit is the first
    // byte's lowest).
    let dst = u64::from(first) | (u64::from(last) << 32);
    dst & 1 == 0 && dst != *own
}

/// A reply (backend -> node's SNAT address and port) of an established flow SNATed to the
/// node, whose live `CT4` entry is `e`: back to showing the frontend, to the client, sent out
/// by XDP. Anything else of a reply goes to TC.
#[inline(always)]
fn snated_reply(
    ctx: &XdpContext,
    start: usize,
    end: usize,
    p: &Parsed,
    e: *mut Ct4Entry,
    now: u64,
    len: u32,
) -> Result<u32, u32> {
    let c = conntrack::pinned(e);
    if c.flags & (CT_FLAG_SNAT | CT_FLAG_REDIRECT | CT_FLAG_PORT_REMAP)
        != CT_FLAG_SNAT | CT_FLAG_REDIRECT
    {
        return Err(CTR_XDP_TO_TC_FLOW);
    }
    let to = To {
        saddr_be: c.nat_addr_be,
        sport_be: c.nat_port_be,
        daddr_be: c.addr_be,
        dport_be: c.port_be,
    };
    if for_another_host(ctx, start, end) {
        return Err(CTR_XDP_TO_TC_OTHER_HOST);
    }
    let hop = next_hop(ctx, p, to.saddr_be, to.daddr_be)?;
    touch(e, c.state, reply_state(&p.flow, c.state), now, len);
    // `send` returns an action whenever it is given a hop.
    send(start, end, p, &to, Some(&hop)).ok_or(CTR_XDP_TO_TC_ROUTE)
}

/// The next hop of a packet from `saddr_be` to `daddr_be` that XDP may send out itself: the
/// route's neighbour resolved, out of this uplink or another that XDP may send to in the same
/// mode, the packet within the route's MTU, its TTL not running out. Else the packet goes to
/// TC (which resolves neighbours, answers "fragmentation needed", and drops what has no
/// route), counted as [`CTR_XDP_TO_TC_ROUTE`].
#[inline(always)]
fn next_hop(ctx: &XdpContext, p: &Parsed, saddr_be: u32, daddr_be: u32) -> Result<Hop, u32> {
    let r =
        route_from(ctx, &p.flow, saddr_be, daddr_be, p.flow.tot_len).ok_or(CTR_XDP_TO_TC_ROUTE)?;
    hop_by(ctx, p, &r)
}

/// The route of `f`'s packet (of `tot_len` bytes) from `saddr_be` to `daddr_be`, as it comes
/// in on its uplink; `None` if there is none, or it does not fit.
#[inline(always)]
fn route_from(
    ctx: &XdpContext,
    f: &Flow,
    saddr_be: u32,
    daddr_be: u32,
    tot_len: u16,
) -> Option<Route> {
    let ingress = ctx.ingress_ifindex() as u32;
    match fib::lookup_from(ctx.as_ptr(), ingress, saddr_be, daddr_be, f.proto, tot_len) {
        Fib::Route(r) => Some(r),
        _ => None,
    }
}

/// [`next_hop`] for the route `r` already looked up.
#[inline(always)]
fn hop_by(ctx: &XdpContext, p: &Parsed, r: &Route) -> Result<Hop, u32> {
    const NO: u32 = CTR_XDP_TO_TC_ROUTE;
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is a plain integer.
    let mode = *unsafe { LB4_XDP_TX.get(&ingress) }.ok_or(NO)?;
    if p.ttl <= 1 {
        return Err(NO);
    }
    if !r.resolved {
        return Err(NO);
    }
    let redirect_to = if r.ifindex == ingress {
        None
    } else {
        // SAFETY: as above.
        match unsafe { LB4_XDP_TX.get(&r.ifindex) } {
            Some(m) if *m == mode => Some(r.ifindex),
            _ => return Err(NO),
        }
    };
    Ok(Hop {
        macs: r.macs(),
        redirect_to,
    })
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
        ttl: ip.ttl,
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

/// Rewrites the packet to `to`, with the IPv4 and TCP/UDP checksums brought up to date (RFC
/// 1624: ~(~HC + ~m + m')), and with a `hop`, as a router sends it on: TTL decremented, MAC
/// addresses the route's. Returns the action that sends it there (`None` without a hop: the
/// packet goes to the stack). A UDP checksum of 0 (none) stays 0, and one that comes to 0 is
/// sent as 0xffff: the same bytes TC's `translate` and `fib::redirect` make.
#[inline(always)]
fn send(start: usize, end: usize, p: &Parsed, to: &To, hop: Option<&Hop>) -> Option<u32> {
    let f = &p.flow;
    let l4_csum = p.l4_csum;
    let ip_csum = read::<u16>(start, end, IP_CSUM_OFF)?;
    let addr_diff = csum_add(diff(f.saddr_be, to.saddr_be), diff(f.daddr_be, to.daddr_be));
    let mut ip_diff = addr_diff;
    if hop.is_some() {
        // The TTL and the protocol share a 16-bit word of the header.
        let old = u16::from_ne_bytes([p.ttl, f.proto]);
        let new = u16::from_ne_bytes([p.ttl.wrapping_sub(1), f.proto]);
        ip_diff = csum_add(ip_diff, diff(u32::from(old), u32::from(new)));
        put(start, end, IP_TTL_OFF, p.ttl.wrapping_sub(1));
    }
    put(start, end, IP_SADDR_OFF, to.saddr_be);
    put(start, end, IP_DADDR_OFF, to.daddr_be);
    put(
        start,
        end,
        IP_CSUM_OFF,
        !fold(csum_add(u32::from(!ip_csum), ip_diff)),
    );
    // The ports, at most 127 bytes in (bounded for the verifier: the IPv4 header is at most
    // 60 bytes).
    let l4 = f.l4_off & 0x7f;
    put(start, end, l4, [to.sport_be, to.dport_be]);
    if !(f.proto == IPPROTO_UDP && l4_csum == 0) {
        let port_diff = csum_add(
            diff(u32::from(f.sport_be), u32::from(to.sport_be)),
            diff(u32::from(f.dport_be), u32::from(to.dport_be)),
        );
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
    let hop = hop?;
    put(start, end, 0, hop.macs);
    Some(match hop.redirect_to {
        None => xdp_action::XDP_TX,
        // SAFETY: no memory arguments; flags 0. Returns XDP_REDIRECT (or XDP_ABORTED for
        // flags it does not know: none here).
        Some(ifindex) => (unsafe { bpf_redirect(ifindex, 0) }) as u32,
    })
}
