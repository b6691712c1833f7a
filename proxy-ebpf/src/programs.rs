//! The TC programs. Thin: parse, decide, rewrite, count, return the verdict.
//!
//! | program              | attach at                        | does                                   |
//! |----------------------|----------------------------------|----------------------------------------|
//! | `sluice_from_pod`    | TC ingress of pod-facing devices | DNAT to any frontend; SNATed replies   |
//! | `sluice_to_pod`      | TC egress of pod-facing devices  | replies back to showing the frontend   |
//! | `sluice_from_uplink` | TC ingress of uplinks            | DNAT NodePort, externalIPs, LoadBalancer; SNATed replies |
//! | `sluice_to_uplink`   | TC egress of uplinks             | replies back to showing the frontend   |
//! | `sluice_pass`        | anywhere                         | nothing: the benchmark's floor         |
//! | `sluice_new_flow_from_pod` | tail-called by `sluice_from_pod` | a pod's new flow: backend, hairpin, refusals |
//! | `sluice_new_flow_from_uplink` | tail-called by `sluice_from_uplink` | a new flow from outside: backend, SNAT and redirect, refusals |
//! | `sluice_sctp_checksum` | tail-called by the six above   | an SCTP port change into its CRC32c (`sctp`) |
//!
//! The ingress programs serve the packets of known flows themselves and hand a packet that
//! starts a flow (no service entry, or a closed flow's tuple reopened) to their new-flow
//! program through `LB4_FLOW_TAILS`, which parses it again and chooses. Apart, each is
//! verified on its own paths instead of on the product of both: a known flow's hit and the
//! new-flow code are the two biggest parts, and together they took `sluice_from_uplink` to
//! 60% of the verifier's million instructions.
//!
//! Replies are translated after routing, at egress, because the kernel drops a packet whose
//! source is one of its own addresses before routing it (a NodePort reply shows the node's
//! address). Only replies of SNATed flows are translated at ingress: their destination must
//! change before the kernel can route them. Flows SNATed to the node (from outside to a
//! backend on another node) carry the node's address both ways, so their packets never go to
//! the stack: they are forwarded with a FIB lookup and a redirect (`fib`).
//!
//! Traffic from outside means: arriving on an uplink (`sluice_from_uplink`). It may use
//! NodePorts, externalIPs and LoadBalancer IPs, and for externalTrafficPolicy Local only the
//! node's own endpoints. Traffic from the node's pods may use every frontend and every endpoint.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    BACKEND_FLAG_LOCAL, CT_FLAG_DSR, CT_FLAG_ESTABLISHED, CT_FLAG_PORT_REMAP, CT_FLAG_REDIRECT,
    CT_FLAG_SNAT, CTR_CT_HIT, CTR_CT_STALE_REVERSE, CTR_DROP_FIB, CTR_DROP_FRAGMENT,
    CTR_DROP_NEW_FLOW_PROGRAM, CTR_DROP_NO_LOCAL_BACKEND, CTR_DROP_NO_SNAT_ADDR,
    CTR_DROP_NODE_SCTP_TO_SERVICE, CTR_DROP_REJECT_FAILED, CTR_DROP_REJECT_RATE_LIMITED,
    CTR_DROP_REWRITE, CTR_DROP_SOURCE_RANGE, CTR_DROP_UNALLOCATED_CLUSTER_IP, CTR_HAIRPIN,
    CTR_NEW_FLOW, CTR_NEW_FLOW_DSR, CTR_NEW_FLOW_SNAT, CTR_PASS_FRAGMENT, CTR_PASS_NO_MATCH,
    CTR_PASS_NOT_FRONTEND, CTR_PASS_NOT_FRONTEND_PORT, CTR_PASS_NOT_POD_CLIENT,
    CTR_PASS_OTHER_HOST, CTR_PASS_OTHER_PROTO, CTR_PASS_REPLY_AT_EGRESS, CTR_POD_CLIENTS_FULL,
    CTR_REDIRECT, CTR_REJECT_FRAG_NEEDED, CTR_REJECT_NO_BACKEND, CTR_REJECT_NO_SUCH_PORT,
    CTR_REPLY, CTR_SEEN, Ct4Key, DP_STATE_POD_CLIENTS_FULL, FE_ADDR_CLUSTER_IP, FE_ADDR_NAT,
    FLOW_CB_NOW_HI, FLOW_CB_NOW_LO, IPPROTO_SCTP, IPPROTO_TCP, Lb4Config, SVC_FLAG_CLUSTER_IP,
    SVC_FLAG_NO_LOCAL_DROP, TAIL_DSR_NOTE, TAIL_NEW_FLOW_FROM_POD, TAIL_NEW_FLOW_FROM_UPLINK,
};

use crate::{
    conntrack::{
        self, forget, forward_state, lookup, owned_by, reopens, reply_key, reply_state,
        service_key, service_key_of, touch, translated_key,
    },
    dsr,
    fib::{self, Fib, Route},
    icmp, lb,
    maps::{
        LB4_CONFIG, LB4_DP_STATE, LB4_FE_ADDRS, LB4_FLOW_TAILS, LB4_POD_CLIENTS, LB4_SVC_CIDRS,
    },
    nat::{rewrite, translate},
    parse::{
        FIRST_FRAGMENT, Flow, PACKET_OTHERHOST, Packet, TCP_FIN, TCP_RST, TCP_SYN,
        note_first_fragment, parse, pkt_type, reparse,
    },
    record, reject, sctp,
    stats::count,
};

// Each classifier's body is `#[inline(always)]` into the entry point the macro wraps around it:
// as a BPF function of its own it would be a second stack frame, which Linux before 6.x rounds
// up to 32 bytes and adds to the 512-byte limit (with a call to `memset`, a third).

/// Every packet that goes on into the stack, untouched or translated: TC_ACT_UNSPEC (TCX_NEXT),
/// so a program after sluice's on the same hook (a CNI's, a monitoring tool's) still runs, and
/// with none the packet passes as with TC_ACT_OK. Only what sluice consumes (redirected,
/// rejected, dropped) ends the chain.
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT as i32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    FromPod,
    ToPod,
    FromUplink,
    ToUplink,
}

impl Hook {
    fn is_egress(self) -> bool {
        matches!(self, Self::ToPod | Self::ToUplink)
    }
}

/// Packets from pods: packets to any frontend are DNATed to a backend; replies of SNATed
/// (hairpin) flows are translated back.
#[classifier]
#[inline(always)]
pub fn sluice_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::FromPod)
}

/// Packets into pods: replies go back to showing the frontend.
#[classifier]
#[inline(always)]
pub fn sluice_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::ToPod)
}

/// Packets from outside: NodePort, externalIPs and LoadBalancer frontends (not ClusterIPs),
/// and replies of SNATed flows.
#[classifier]
#[inline(always)]
pub fn sluice_from_uplink(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::FromUplink)
}

/// Packets leaving the node: replies to outside clients go back to showing the frontend.
#[classifier]
#[inline(always)]
pub fn sluice_to_uplink(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::ToUplink)
}

/// A pod's packet that starts a flow, handed over by `sluice_from_pod`.
#[classifier]
#[inline(always)]
pub fn sluice_new_flow_from_pod(ctx: TcContext) -> i32 {
    handle_new_flow(&ctx, Hook::FromPod)
}

/// A packet from outside that starts a flow, handed over by `sluice_from_uplink`.
#[classifier]
#[inline(always)]
pub fn sluice_new_flow_from_uplink(ctx: TcContext) -> i32 {
    handle_new_flow(&ctx, Hook::FromUplink)
}

/// Another node's direct-server-return SYN to an endpoint here, handed over by
/// `sluice_from_uplink` (`dsr::is_noted_syn`): noted for the endpoint's replies
/// (`dsr::note`), and passed on as it came.
#[classifier]
#[inline(always)]
pub fn sluice_dsr_note(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let counter = match reparse(&ctx) {
        Ok(Packet::Flow(f)) => dsr::note(&ctx, &f).unwrap_or(CTR_PASS_NOT_FRONTEND),
        // Not reached: the same bytes parse the same.
        Ok(_) => CTR_PASS_NOT_FRONTEND,
        Err(counter) => counter,
    };
    count(counter, len);
    PASS
}

/// Does nothing: the floor the benchmark compares the others with.
#[classifier]
pub fn sluice_pass(_ctx: TcContext) -> i32 {
    PASS
}

#[inline(always)]
fn handle(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    count(CTR_SEEN, len);
    // A frame for another host's MAC address (a bridge flooding it, or a device in
    // promiscuous mode): the stack drops it, and nothing of it may start or move a flow here.
    if hook == Hook::FromUplink && pkt_type(ctx) == PACKET_OTHERHOST {
        count(CTR_PASS_OTHER_HOST, len);
        return PASS;
    }
    let packet = match parse(ctx) {
        Ok(p) => p,
        Err(counter) => {
            count(counter, len);
            return PASS;
        }
    };
    let (verdict, counter) = match packet {
        Packet::IcmpError(e) => icmp::error(ctx, &e, conntrack::now(), hook.is_egress(), PASS),
        Packet::LoneFragment { daddr_be } => lone_fragment(daddr_be, hook),
        // From a pod, a ClusterIP is only its Services' ports, and no Service serves other
        // protocols: refused, as kube-proxy's nftables mode rejects them.
        Packet::Other(f) if hook == Hook::FromPod && is_cluster_ip(f.daddr_be) => rejected(
            ctx,
            &f,
            reject::PORT_UNREACHABLE,
            0,
            conntrack::now(),
            CTR_REJECT_NO_SUCH_PORT,
        ),
        Packet::Other(f) if unallocated(hook, f.daddr_be) => {
            (DROP, CTR_DROP_UNALLOCATED_CLUSTER_IP)
        }
        Packet::Other(_) => (PASS, CTR_PASS_OTHER_PROTO),
        // At ingress, a destination that is no frontend's address (nor the hairpin or SNAT
        // address, where replies of SNATed flows arrive) belongs to no translated flow: it
        // passes before any conntrack lookup. Only replies of SNATed flows are looked up at
        // ingress; the others are translated at egress.
        // At a pod's egress, a destination that was never the client of a flow translated
        // at TC can receive no reply to translate: it passes before any conntrack lookup.
        Packet::Flow(flow) => {
            // Whether the packet goes on (`Some`), and if so whether it may be a reply to look
            // up: at egress any can be; at ingress only replies of SNATed flows are translated.
            let dest = if hook.is_egress() {
                Some(Dest {
                    maybe_reply: true,
                    maybe_flow: true,
                    cluster_ip: false,
                })
            } else {
                ingress_dest(&flow, hook == Hook::FromPod)
            };
            // Another node's direct-server-return SYN to an endpoint here: a pod, or a
            // hostNetwork one on an address of this node (a frontend address too). Noted by
            // its own program.
            if hook == Hook::FromUplink && flow.ihl_bytes != 20 && dsr::is_noted_syn(ctx, &flow) {
                to_tail(ctx, TAIL_DSR_NOTE, conntrack::now())
            } else if hook == Hook::ToPod && !may_be_reply_to_pod(&flow) {
                (PASS, CTR_PASS_NOT_POD_CLIENT)
            } else if hook == Hook::ToUplink
                && flow.proto == IPPROTO_SCTP
                && lb::frontend(flow.daddr_be, flow.dport_be, IPPROTO_SCTP).is_some()
            {
                // The node's own SCTP to a Service: nothing translated it (socket LB covers TCP
                // and UDP), and sent on it would leave for the default route. Refused, counted.
                (DROP, CTR_DROP_NODE_SCTP_TO_SERVICE)
            } else if hook == Hook::ToUplink && unallocated(hook, flow.daddr_be) {
                (DROP, CTR_DROP_UNALLOCATED_CLUSTER_IP)
            } else if let Some(dest) = dest {
                if flow.frag == FIRST_FRAGMENT {
                    note_first_fragment(&flow);
                }
                let replied = if dest.maybe_reply || may_be_snated_reply(&flow) {
                    reply(ctx, &flow, len, hook)
                } else {
                    None
                };
                match replied {
                    Some(r) => r,
                    None if hook.is_egress() => (PASS, CTR_PASS_NO_MATCH),
                    // No frontend on the address has the port, nor does any live flow to it.
                    None if !dest.maybe_flow => match no_frontend_on(ctx, &flow, dest.cluster_ip) {
                        (PASS, _) => (PASS, CTR_PASS_NOT_FRONTEND_PORT),
                        refused => refused,
                    },
                    None => forward(ctx, &flow, conntrack::now(), len, hook),
                }
            } else if unallocated(hook, flow.daddr_be) {
                (DROP, CTR_DROP_UNALLOCATED_CLUSTER_IP)
            } else {
                (PASS, CTR_PASS_NOT_FRONTEND)
            }
        }
    };
    finish(ctx, verdict, counter, len)
}

/// The packet's verdict, counted (as `counter`, with its `len`).
#[inline(always)]
fn finish(ctx: &TcContext, verdict: i32, counter: u32, len: u32) -> i32 {
    // An SCTP packet that goes on with a port rewritten: its checksum is brought up to date
    // (and its counter counted) by the checksum program. Known from the packet and `skb->cb`,
    // not carried from parsing: a value live through every path would split the verifier's
    // states.
    if verdict != DROP && sctp::ports_changed(ctx) {
        return sctp::hand_off(ctx, verdict, counter, len);
    }
    count(counter, len);
    verdict
}

/// A fragment that follows no flow. From a pod, a ClusterIP is only its Services' flows: such
/// a fragment would be routed to the address itself.
#[inline(always)]
fn lone_fragment(daddr_be: u32, hook: Hook) -> (i32, u32) {
    if hook == Hook::FromPod && is_cluster_ip(daddr_be) {
        (DROP, CTR_DROP_FRAGMENT)
    } else if unallocated(hook, daddr_be) {
        (DROP, CTR_DROP_UNALLOCATED_CLUSTER_IP)
    } else {
        (PASS, CTR_PASS_FRAGMENT)
    }
}

/// Whether a packet from a pod, or from the node out of an uplink, goes to an unallocated
/// ClusterIP: an address inside the Service CIDRs that is no frontend's (nor one that live
/// flows still name). kube-proxy's nftables mode drops such traffic (forward and output
/// hooks); sent on, it would leave by the default route. Traffic from outside is not
/// checked: kube-proxy does not either, and the node is not its router for those addresses.
#[inline(always)]
fn unallocated(hook: Hook, daddr_be: u32) -> bool {
    (hook == Hook::FromPod || hook == Hook::ToUplink)
        && LB4_SVC_CIDRS.get(0).is_some_and(|c| c.contains(daddr_be))
        // SAFETY: the value is a plain integer; only its presence matters.
        && unsafe { LB4_FE_ADDRS.get(&daddr_be) }.is_none()
}

/// A packet of no known flow: to a frontend, handed to its hook's new-flow program
/// (`handle_new_flow`); to no frontend (the node's own ports on a NodePort address, a
/// ClusterIP's other ports), answered here, where it costs no tail call and no second parse.
#[inline(always)]
fn start_flow(ctx: &TcContext, f: &Flow, now: u64, hook: Hook) -> (i32, u32) {
    if lb::frontend(f.daddr_be, f.dport_be, f.proto).is_none() {
        return no_frontend(ctx, f, hook);
    }
    to_new_flow(ctx, hook, now)
}

/// A packet to no frontend. A ClusterIP is only its Services' ports: another port from a pod
/// is refused, not routed out of the default route. (From outside, ClusterIPs are nobody's.)
#[inline(always)]
fn no_frontend(ctx: &TcContext, f: &Flow, hook: Hook) -> (i32, u32) {
    no_frontend_on(ctx, f, hook == Hook::FromPod && is_cluster_ip(f.daddr_be))
}

/// [`no_frontend`], told whether the packet is from a pod to a ClusterIP.
#[inline(always)]
fn no_frontend_on(ctx: &TcContext, f: &Flow, pod_to_cluster_ip: bool) -> (i32, u32) {
    if pod_to_cluster_ip {
        if !f.has_l4() {
            return (DROP, CTR_DROP_FRAGMENT);
        }
        return rejected(
            ctx,
            f,
            reject::PORT_UNREACHABLE,
            0,
            conntrack::now(),
            CTR_REJECT_NO_SUCH_PORT,
        );
    }
    (PASS, CTR_PASS_NO_MATCH)
}

/// Hands a packet that starts a flow to its hook's new-flow program (`handle_new_flow`).
/// Returns only if the tail call failed (an empty slot): then the packet is dropped, counted.
/// Nothing in the packet has changed yet, so the new-flow program parses what arrived; the
/// clock reading `now` goes with it, in `skb->cb`.
#[inline(always)]
fn to_new_flow(ctx: &TcContext, hook: Hook, now: u64) -> (i32, u32) {
    let slot = if hook == Hook::FromPod {
        TAIL_NEW_FLOW_FROM_POD
    } else {
        TAIL_NEW_FLOW_FROM_UPLINK
    };
    to_tail(ctx, slot, now)
}

/// Tail-calls the program in `LB4_FLOW_TAILS`' `slot`, with the clock reading `now` in
/// `skb->cb`. Returns only if the tail call failed (an empty slot): then the packet is
/// dropped, counted.
#[inline(always)]
fn to_tail(ctx: &TcContext, slot: u32, now: u64) -> (i32, u32) {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    // SAFETY: the program's own context; `cb` is scratch space TC programs may write. A tail
    // call either does not return, or fails and returns here.
    unsafe {
        (*skb).cb[FLOW_CB_NOW_LO] = now as u32;
        (*skb).cb[FLOW_CB_NOW_HI] = (now >> 32) as u32;
        let _ = LB4_FLOW_TAILS.tail_call(ctx, slot);
    }
    (DROP, CTR_DROP_NEW_FLOW_PROGRAM)
}

/// The new-flow programs: the packet that `forward` handed over, parsed again (it is as it
/// arrived; `seen`, and a followed fragment, were counted by the program that handed it over).
#[inline(always)]
fn handle_new_flow(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the program's own context, read.
    let now = unsafe {
        u64::from((*skb).cb[FLOW_CB_NOW_LO]) | (u64::from((*skb).cb[FLOW_CB_NOW_HI]) << 32)
    };
    let (verdict, counter) = match reparse(ctx) {
        Ok(Packet::Flow(f)) => new_flow(ctx, &f, now, len, hook, &service_key(&f)),
        // A later fragment whose datagram was evicted from `LB4_FRAGS` since the first parse.
        Ok(Packet::LoneFragment { daddr_be }) => lone_fragment(daddr_be, hook),
        // Not reached: the same bytes parse the same.
        Ok(_) => (PASS, CTR_PASS_NO_MATCH),
        Err(counter) => (PASS, counter),
    };
    finish(ctx, verdict, counter, len)
}

/// What a packet's destination at ingress can be, from `LB4_FE_ADDRS2`.
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    /// The address is marked [`FE_ADDR_NAT`]: flows SNATed to an earlier address have their
    /// replies arrive there (at egress: any packet may be a reply).
    pub maybe_reply: bool,
    /// A frontend on the address, or a live flow to it, may have the packet's port (the
    /// address's port filter). If not, the packet is no service flow's.
    pub maybe_flow: bool,
    /// From a pod, to an address a ClusterIP frontend is on ([`FE_ADDR_CLUSTER_IP`]).
    pub cluster_ip: bool,
}

/// At ingress: `None` if a packet to `f.daddr_be` can belong to no translated flow (the
/// address is no frontend's, nor the hairpin or SNAT address); else what it may be. The
/// hairpin and SNAT addresses, when no frontend is on them, can only receive replies (every
/// address a live flow's frontend names is in the map).
#[inline(always)]
pub(crate) fn ingress_dest(f: &Flow, from_pod: bool) -> Option<Dest> {
    // SAFETY: a plain value; read once, in place.
    if let Some(v) = unsafe { LB4_FE_ADDRS.get(&f.daddr_be) } {
        return Some(Dest {
            maybe_reply: v.flags & FE_ADDR_NAT != 0,
            maybe_flow: v.may_have_port(u16::from_be(f.dport_be)),
            cluster_ip: from_pod && v.flags & FE_ADDR_CLUSTER_IP != 0,
        });
    }
    LB4_CONFIG
        .get(0)
        .is_some_and(|c| f.daddr_be == c.hairpin_snat_be || f.daddr_be == c.snat_addr_be)
        .then_some(Dest {
            maybe_reply: false,
            maybe_flow: false,
            cluster_ip: false,
        })
}

/// At ingress, where only replies of SNATed flows are translated (before routing), whether a
/// packet may be one: to the hairpin address, or to the SNAT address on a port of the SNAT
/// range (or, `ingress_dest` says, to an address marked [`FE_ADDR_NAT`]). To any other address
/// it can only be a client's, so the reply lookup, a miss on every client packet, is skipped.
#[inline(always)]
pub(crate) fn may_be_snated_reply(f: &Flow) -> bool {
    LB4_CONFIG.get(0).is_some_and(|c| {
        let port = u16::from_be(f.dport_be);
        (f.daddr_be == c.hairpin_snat_be && c.hairpin_snat_be != 0)
            || (f.daddr_be == c.snat_addr_be
                && c.snat_addr_be != 0
                && port >= c.snat_port_min
                && port <= c.snat_port_max)
    })
}

/// Whether a packet into a pod, to `f.daddr_be`, can be the reply of a flow translated at TC:
/// its destination has been such a flow's client, or the client map filled up (then any
/// packet can be).
#[inline(always)]
fn may_be_reply_to_pod(f: &Flow) -> bool {
    // SAFETY: the value is a plain integer; only its presence matters.
    if unsafe { LB4_POD_CLIENTS.get(&f.daddr_be) }.is_some() {
        return true;
    }
    LB4_DP_STATE
        .get(0)
        .is_some_and(|s| s & DP_STATE_POD_CLIENTS_FULL != 0)
}

/// Records `addr_be` as the client of a flow translated at TC, before the flow's first packet
/// goes on, so that `sluice_to_pod` looks its replies up. If the map is full, the filter is
/// turned off instead: a reply is never left untranslated.
#[inline(always)]
pub(crate) fn note_pod_client(addr_be: u32) {
    // SAFETY: as above.
    if unsafe { LB4_POD_CLIENTS.get(&addr_be) }.is_some() {
        return;
    }
    if LB4_POD_CLIENTS.insert(&addr_be, &1, 0).is_err() {
        count(CTR_POD_CLIENTS_FULL, 0);
        if let Some(s) = LB4_DP_STATE.get_ptr_mut(0) {
            // SAFETY: a valid pointer into the array's only entry; a plain integer.
            unsafe { *s |= DP_STATE_POD_CLIENTS_FULL };
        }
    }
}

/// Whether a ClusterIP frontend is on `addr_be`.
#[inline(always)]
fn is_cluster_ip(addr_be: u32) -> bool {
    // SAFETY: the value is a plain integer.
    unsafe { LB4_FE_ADDRS.get(&addr_be) }.is_some_and(|v| v.flags & FE_ADDR_CLUSTER_IP != 0)
}

/// Sends a translated packet along `route`; `counter` is its verdict's counter.
#[inline(always)]
fn redirected(ctx: &TcContext, route: &Route, counter: u32) -> (i32, u32) {
    match fib::redirect(ctx, route) {
        Some(v) => {
            count(CTR_REDIRECT, 0);
            (v, counter)
        }
        None => (DROP, CTR_DROP_FIB),
    }
}

/// A packet of a flow that is forwarded by redirect, too big for its route: with DF, an ICMP
/// fragmentation needed back to the sender (quoting the packet as it was sent); without,
/// dropped and counted.
#[inline(always)]
fn too_big(ctx: &TcContext, f: &Flow, mtu: u16, len: u16) -> (i32, u32) {
    // A GRO-aggregated packet is checksum-partial for its TCP header: trimmed into an ICMP,
    // the checksum offload would write into the quote. Dropped; its segments, resent one by
    // one, get the ICMP.
    if !f.df || fib::is_gso(ctx) {
        return (DROP, CTR_DROP_FIB);
    }
    // Linux < 5.12 does not report the route's MTU (the field still holds our length): fall
    // back to a size every IPv4 path of a cluster carries.
    let mtu = if mtu == 0 || mtu >= len { 1280 } else { mtu };
    rejected(
        ctx,
        f,
        reject::FRAG_NEEDED,
        mtu,
        conntrack::now(),
        CTR_REJECT_FRAG_NEEDED,
    )
}

/// Answers `f` with an ICMP destination unreachable `code` (counted as `counter`) if this CPU's
/// budget allows; otherwise, or if the ICMP cannot be built, drops it and says why.
#[inline(always)]
fn rejected(ctx: &TcContext, f: &Flow, code: u8, mtu: u16, now: u64, counter: u32) -> (i32, u32) {
    if !reject::allowed(now) {
        return (DROP, CTR_DROP_REJECT_RATE_LIMITED);
    }
    match reject::unreachable(ctx, f, code, mtu) {
        Some(v) => (v, counter),
        None => (DROP, CTR_DROP_REJECT_FAILED),
    }
}

/// The route of a redirected flow's packet from `saddr_be` to `daddr_be`, or the verdict to
/// return instead.
#[inline(always)]
fn route_for(ctx: &TcContext, f: &Flow, saddr_be: u32, daddr_be: u32) -> Result<Route, (i32, u32)> {
    let len = fib::wire_len(ctx, f);
    match fib::lookup(ctx, saddr_be, daddr_be, f.proto, len) {
        Fib::Route(r) => Ok(r),
        Fib::FragNeeded { mtu } => Err(too_big(ctx, f, mtu, len)),
        Fib::NoRoute => Err((DROP, CTR_DROP_FIB)),
    }
}

/// A reply of a translated flow: source back to the frontend (and, for SNATed flows,
/// destination back to the client). At ingress only SNATed flows are translated; the others
/// pass, to be translated at egress after routing.
#[inline(always)]
fn reply(ctx: &TcContext, f: &Flow, len: u32, hook: Hook) -> Option<(i32, u32)> {
    // The clock is read only if the flow is found: a miss (every egress packet that is no
    // reply) costs two lookups and nothing else.
    let key = reply_key(f);
    let found = conntrack::find(&key)?;
    let now = conntrack::now();
    let (e, in_new) = conntrack::live_from(found, &key, now)?;
    let c = conntrack::pinned(e);
    let state = c.state;
    if conntrack::opens_anew(f, state) {
        forget(&reply_key(f));
        count(CTR_CT_STALE_REVERSE, 0);
        return Some((PASS, CTR_PASS_NO_MATCH));
    }
    let snat = c.flags & CT_FLAG_SNAT != 0;
    if !hook.is_egress() && !snat {
        return Some((PASS, CTR_PASS_REPLY_AT_EGRESS));
    }
    let route = if c.flags & CT_FLAG_REDIRECT != 0 {
        match route_for(ctx, f, c.nat_addr_be, c.addr_be) {
            Ok(r) => Some(r),
            Err(verdict) => return Some(verdict),
        }
    } else {
        None
    };
    let new_state = reply_state(f, state);
    touch(e, state, new_state, now, len);
    if in_new
        && c.flags & CT_FLAG_DSR != 0
        && state & CT_FLAG_ESTABLISHED != 0
        && f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
    {
        // A direct-server-return flow's entry on the backend's node, established by its
        // SYN-ACK (`reply_state`), and now the backend's next packet, which it sends once the
        // handshake is done (or to a segment outside its window): out of the table a flood
        // of new flows fills. Not by a retransmitted SYN-ACK (all a spoofed SYN's source
        // gets), an RST or a FIN (a spoofed SYN to a closed port is answered with an RST).
        // As on the ingress node, a blind spoofer who follows its SYN with one more packet
        // gets there too. (Other flows move on their client's packet, both entries at once:
        // `forward`.)
        conntrack::promote_one(&key, e);
    }
    if f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        // The flow's service entry (client -> frontend), if it is still this flow's.
        let skey = service_key_of(c.addr_be, c.port_be, c.nat_addr_be, c.nat_port_be, f.proto);
        if let Some(s) = lookup(&skey, now) {
            // SAFETY: a pointer from a successful lookup; fields read one by one.
            let (addr, port) = unsafe { ((*s).addr_be, (*s).port_be) };
            if addr == f.saddr_be && port == f.sport_be {
                conntrack::end_from_reply(s, f, now);
            }
        }
    }
    // The source goes back to the frontend; the destination back to the client when the
    // flow's source was translated: SNAT, or (at egress, the address already the client's) a
    // remapped port.
    let own_source = snat || c.flags & CT_FLAG_PORT_REMAP != 0;
    let (daddr, dport) = if own_source {
        (c.addr_be, c.port_be)
    } else {
        (f.daddr_be, f.dport_be)
    };
    if rewrite(ctx, f, c.nat_addr_be, c.nat_port_be, daddr, dport).is_err() {
        return Some((DROP, CTR_DROP_REWRITE));
    }
    if let Some(r) = route {
        return Some(redirected(ctx, &r, CTR_REPLY));
    }
    if snat && hook == Hook::FromPod {
        // A hairpin reply: the pod answered itself.
        return Some(hairpin_out(ctx, CTR_REPLY));
    }
    Some((PASS, CTR_REPLY))
}

/// A packet of a hairpin flow (a pod reaching itself through a Service, SNATed to the hairpin
/// address), translated: it goes straight back into the pod it came from, out of the same
/// device, never through routing. Routed, strict reverse-path filtering would drop it (the
/// route back to the hairpin address, or to the frontend a reply shows, is not via the pod's
/// device), and a reply showing one of the node's own addresses (a NodePort, a local
/// externalIP) would be dropped as a martian.
#[inline(always)]
fn hairpin_out(ctx: &TcContext, counter: u32) -> (i32, u32) {
    match fib::back_out(ctx) {
        Some(v) => {
            count(CTR_REDIRECT, 0);
            (v, counter)
        }
        None => (DROP, CTR_DROP_REWRITE),
    }
}

/// A packet from a client: a known flow keeps its backend; a new one to a frontend gets one.
#[inline(always)]
fn forward(ctx: &TcContext, f: &Flow, now: u64, len: u32, hook: Hook) -> (i32, u32) {
    let skey = service_key(f);
    let found = match conntrack::established(&skey, now) {
        Some(s) => Some((s, false)),
        None => {
            // Only a frontend's flows are in `CT4_NEW`: a packet to no frontend (the node's own
            // ports on a NodePort address) is answered without a second table's lookup.
            if lb::frontend(f.daddr_be, f.dport_be, f.proto).is_none() {
                return no_frontend(ctx, f, hook);
            }
            conntrack::not_established(&skey, now).map(|s| (s, true))
        }
    };
    let Some((s, s_new)) = found else {
        // A new flow to a frontend (just looked up).
        return to_new_flow(ctx, hook, now);
    };
    let svc = conntrack::pinned(s);
    let rkey = translated_key(
        f,
        svc.nat_addr_be,
        svc.nat_port_be,
        svc.addr_be,
        svc.port_be,
    );
    // A steady packet of an established flow (no state to change, the flow's previous packet
    // recent, not a check's turn) is translated from the service entry alone: one lookup.
    let steady = !s_new && conntrack::steady(f, s, svc.state, now);
    // The reverse entry, with whether it is in `CT4_NEW`, and the flow's state.
    let (rev, rev_new, state) = if steady {
        (None, false, svc.state)
    } else {
        let (rev, rev_new) = match conntrack::established(&rkey, now) {
            Some(r) => (Some(r), false),
            None => (conntrack::not_established(&rkey, now), true),
        };
        // The reverse entry must be this flow's own: for a flow SNATed with a port of its own
        // the key does not name the client, once this flow closed its port may have gone to
        // another flow, and once its reverse entry was gone the tuple may have gone to a flow
        // of the same client to another frontend. Then this flow is over: its packet starts
        // afresh.
        if let Some(r) = rev
            && !owned_by(r, f.saddr_be, f.sport_be, f.daddr_be, f.dport_be)
        {
            forget(&skey);
            return start_flow(ctx, f, now, hook);
        }
        let state = match rev {
            // SAFETY: as above.
            Some(r) => unsafe { (*r).state() },
            None => svc.state,
        };
        (rev, rev_new, state)
    };
    if !reopens(f, state) {
        let flags = forward_state(f, state);
        let route = if flags & CT_FLAG_REDIRECT != 0 {
            // SNATed to the node, or (direct server return) the client's own address.
            let from = if svc.nat_addr_be != 0 {
                svc.nat_addr_be
            } else {
                f.saddr_be
            };
            match route_for(ctx, f, from, svc.addr_be) {
                Ok(r) => Some(r),
                Err(verdict) => return verdict,
            }
        } else {
            None
        };
        match rev {
            Some(r) => conntrack::refresh(r, state, flags, now),
            None if steady => {}
            None => {
                // The reverse entry was evicted: rebuild it from what we know, unless
                // another flow has just taken its tuple; then this one starts afresh.
                let rev = record::reverse_entry(f, flags, svc.rev_nat_id, now);
                if !conntrack::rebuild(&rkey, &rev, s_new, now) {
                    forget(&skey);
                    return start_flow(ctx, f, now, hook);
                }
            }
        }
        touch(s, svc.state, flags, now, len);
        if s_new && promotes(f, flags) {
            // Established now: out of the table a flood of new flows fills.
            // The reverse entry found (this flow's, checked above), or the one just rebuilt.
            let r = if rev_new {
                rev.or_else(|| conntrack::not_established(&rkey, now))
            } else {
                None
            };
            conntrack::promote(&skey, s, &rkey, r);
        }
        if translate(
            ctx,
            f,
            svc.nat_addr_be,
            svc.nat_port_be,
            svc.addr_be,
            svc.port_be,
        )
        .is_err()
        {
            return (DROP, CTR_DROP_REWRITE);
        }
        // A SYN again (a retransmission): the backend's node may not have the first.
        if flags & CT_FLAG_DSR != 0
            && dsr::carries_option(f)
            && dsr::add_option(ctx, f, f.daddr_be, f.dport_be).is_err()
        {
            return (DROP, CTR_DROP_REWRITE);
        }
        if let Some(r) = route {
            return redirected(ctx, &r, CTR_CT_HIT);
        }
        if hook == Hook::FromPod && svc.nat_addr_be != 0 && svc.addr_be == f.saddr_be {
            return hairpin_out(ctx, CTR_CT_HIT);
        }
        return (PASS, CTR_CT_HIT);
    }
    // A new connection on the tuple of a closed one: choose afresh below, the old entry
    // gone first (a live service entry met by `new_flow` is another CPU's new flow).
    forget(&skey);
    start_flow(ctx, f, now, hook)
}

/// Whether the client's packet `f`, which takes its flow to state `flags`, moves the flow to
/// `CT4`: it establishes it (a reply came, and now the client again), and for TCP it neither
/// resets nor ends it (a spoofed source's real host answers the SYN-ACK with an RST, which
/// must not take a table of established flows' room).
#[inline(always)]
fn promotes(f: &Flow, flags: u16) -> bool {
    flags & CT_FLAG_ESTABLISHED != 0
        && (f.proto != IPPROTO_TCP || f.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    f: &Flow,
    now: u64,
    len: u32,
    hook: Hook,
    skey: &Ct4Key,
) -> (i32, u32) {
    // Looked up again: `start_flow` found it, but the agent may have removed it since.
    let Some(fe) = lb::frontend(f.daddr_be, f.dport_be, f.proto) else {
        return no_frontend(ctx, f, hook);
    };
    let from_outside = hook == Hook::FromUplink;
    if from_outside && fe.flags & SVC_FLAG_CLUSTER_IP != 0 {
        // ClusterIPs are for pods and the node, not for the outside world.
        return (PASS, CTR_PASS_NO_MATCH);
    }
    // loadBalancerSourceRanges, before anything else about the flow: kube-proxy's firewall
    // drops other clients (pods included) before DNAT, and before the reject of a Service
    // without endpoints.
    if !lb::source_allowed(&fe, f.saddr_be) {
        return (DROP, CTR_DROP_SOURCE_RANGE);
    }
    // A later fragment never starts a flow: its first fragment made none (dropped, or its
    // flow has gone), so it cannot be delivered, and it must not reach the frontend itself.
    if !f.has_l4() {
        return (DROP, CTR_DROP_FRAGMENT);
    }
    if fe.count == 0 {
        if fe.flags & SVC_FLAG_NO_LOCAL_DROP != 0 {
            return (DROP, CTR_DROP_NO_LOCAL_BACKEND);
        }
        return rejected(
            ctx,
            f,
            reject::PORT_UNREACHABLE,
            0,
            now,
            CTR_REJECT_NO_BACKEND,
        );
    }
    let be = match lb::backend_for(f, &fe, from_outside, now) {
        Ok(be) => be,
        Err(drop) => return (DROP, drop),
    };
    // SAFETY: the config is plain integers, copied out.
    let cfg: Lb4Config = LB4_CONFIG.get(0).copied().unwrap_or_default();
    let mut snat = 0;
    let mut flags = forward_state(f, 0);
    let mut counter = CTR_NEW_FLOW;
    let mut route = None;
    // Direct server return, when it is on and the client is apart from the backend's node:
    // the route to that node.
    let dsr_route = if from_outside && be.flags & BACKEND_FLAG_LOCAL == 0 && dsr::wanted(&cfg, f) {
        dsr::route(ctx, f, be.addr_be)
    } else {
        None
    };
    if be.addr_be == f.saddr_be {
        // A pod reaching itself through a Service: the kernel would drop a packet whose source
        // is its own address, so the flow is SNATed to the hairpin address.
        snat = cfg.hairpin_snat_be;
        if snat != 0 {
            flags |= CT_FLAG_SNAT;
            count(CTR_HAIRPIN, len);
        }
    } else if let Some(r) = dsr_route {
        // From outside to another node's backend by direct server return: DNAT only, the
        // frontend in an option of the SYN; the backend's node sends the replies.
        route = Some(r);
        flags |= CT_FLAG_REDIRECT | CT_FLAG_DSR;
        counter = CTR_NEW_FLOW_DSR;
    } else if from_outside && be.flags & BACKEND_FLAG_LOCAL == 0 {
        // From outside to another node's backend: SNAT to this node, so that the replies come
        // back here to be translated, and forward it ourselves (it now carries our address).
        snat = cfg.snat_addr_be;
        if snat == 0 {
            return (DROP, CTR_DROP_NO_SNAT_ADDR);
        }
        route = match route_for(ctx, f, snat, be.addr_be) {
            Ok(r) => Some(r),
            Err(verdict) => return verdict,
        };
        flags |= CT_FLAG_SNAT | CT_FLAG_REDIRECT;
        counter = CTR_NEW_FLOW_SNAT;
    }
    // A flow that is not SNATed has its replies translated at the egress of the device that
    // leads to its client; a pod's egress looks up only the clients noted here. So: every
    // pod's flow, and a flow from outside whose client is not back out of the uplink (a pod of
    // this node whose traffic came back in, say through an outside load balancer that keeps
    // the client's address).
    if snat == 0
        && flags & CT_FLAG_DSR == 0
        && (hook == Hook::FromPod
            || (hook == Hook::FromUplink
                && !fib::back_by_ingress(ctx, be.addr_be, f.saddr_be, f.proto)))
    {
        note_pod_client(f.saddr_be);
    }
    // The reverse entry first, so that no reply can arrive before it exists (`record`).
    let rec = match record::record(f, skey, &fe, &be, snat, flags, &cfg, now, len) {
        Ok(r) => r,
        Err(drop) => return (DROP, drop),
    };
    let counter = record::verdict_counter(&rec, counter);
    let (s_addr, s_nat) = (rec.addr_be, rec.nat_addr_be);
    if translate(ctx, f, s_nat, rec.nat_port_be, s_addr, rec.port_be).is_err() {
        return (DROP, CTR_DROP_REWRITE);
    }
    if flags & CT_FLAG_DSR != 0
        && dsr::carries_option(f)
        && dsr::add_option(ctx, f, f.daddr_be, f.dport_be).is_err()
    {
        return (DROP, CTR_DROP_REWRITE);
    }
    if let Some(r) = route {
        return redirected(ctx, &r, counter);
    }
    if hook == Hook::FromPod && s_nat != 0 && s_addr == f.saddr_be {
        return hairpin_out(ctx, counter);
    }
    (PASS, counter)
}
