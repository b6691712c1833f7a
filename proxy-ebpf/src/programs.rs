//! The TC programs. Thin: parse, decide, rewrite, count, return the verdict.
//!
//! | program              | attach at                        | does                                   |
//! |----------------------|----------------------------------|----------------------------------------|
//! | `sluice_from_pod`    | TC ingress of pod-facing devices | DNAT to any frontend; SNATed replies   |
//! | `sluice_to_pod`      | TC egress of pod-facing devices  | replies back to showing the frontend   |
//! | `sluice_from_uplink` | TC ingress of uplinks            | DNAT NodePort, externalIPs, LoadBalancer; SNATed replies |
//! | `sluice_to_uplink`   | TC egress of uplinks             | replies back to showing the frontend   |
//! | `sluice_pass`        | anywhere                         | nothing: the benchmark's floor         |
//!
//! Replies are translated after routing, at egress, because the kernel drops a packet whose
//! source is one of its own addresses before routing it (a NodePort reply shows the node's
//! address). Only replies of SNATed flows (hairpin) are translated at ingress: their
//! destination must change before the kernel can route them.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    CT_FLAG_SNAT, CTR_CT_HIT, CTR_DROP_CT_WRITE, CTR_DROP_NO_BACKEND_ENTRY, CTR_DROP_REJECT_FAILED,
    CTR_DROP_REWRITE, CTR_HAIRPIN, CTR_NEW_FLOW, CTR_PASS_NO_MATCH, CTR_PASS_REPLY_AT_EGRESS,
    CTR_REJECT_NO_BACKEND, CTR_REPLY, CTR_SEEN, Ct4Entry, Ct4Key, SVC_FLAG_CLUSTER_IP,
    ct_lifetime_ns,
};

use crate::{
    conntrack::{
        self, forward_state, lookup, reopens, reply_key, reply_state, service_key, touch,
        translated_key,
    },
    lb,
    maps::{CT4, LB4_CONFIG},
    nat::{set_dst, set_src, translate},
    parse::{Flow, parse},
    reject,
    stats::count,
};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

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
pub fn sluice_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::FromPod)
}

/// Packets into pods: replies go back to showing the frontend.
#[classifier]
pub fn sluice_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::ToPod)
}

/// Packets from outside: NodePort, externalIPs and LoadBalancer frontends (not ClusterIPs),
/// and replies of SNATed flows.
#[classifier]
pub fn sluice_from_uplink(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::FromUplink)
}

/// Packets leaving the node: replies to outside clients go back to showing the frontend.
#[classifier]
pub fn sluice_to_uplink(ctx: TcContext) -> i32 {
    handle(&ctx, Hook::ToUplink)
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
    let flow = match parse(ctx) {
        Ok(f) => f,
        Err(counter) => {
            count(counter, len);
            return PASS;
        }
    };
    let now = conntrack::now();
    let (verdict, counter) = match reply(ctx, &flow, now, len, hook) {
        Some(r) => r,
        None if hook.is_egress() => (PASS, CTR_PASS_NO_MATCH),
        None => forward(ctx, &flow, now, len, hook),
    };
    count(counter, len);
    verdict
}

/// A reply of a translated flow: source back to the frontend (and, for SNATed flows,
/// destination back to the client). At ingress only SNATed flows are translated; the others
/// pass, to be translated at egress after routing.
#[inline(always)]
fn reply(ctx: &TcContext, f: &Flow, now: u64, len: u32, hook: Hook) -> Option<(i32, u32)> {
    let e = lookup(&reply_key(f), now)?;
    // SAFETY: `e` is a live entry from a successful lookup; copy what we need.
    let c: Ct4Entry = unsafe { *e };
    let snat = c.flags & CT_FLAG_SNAT != 0;
    if !hook.is_egress() && !snat {
        return Some((PASS, CTR_PASS_REPLY_AT_EGRESS));
    }
    touch(e, f.proto, reply_state(f, c.flags), now, len);
    if set_src(ctx, f, c.nat_addr_be, c.nat_port_be).is_err() {
        return Some((DROP, CTR_DROP_REWRITE));
    }
    if snat && set_dst(ctx, f, c.addr_be, c.port_be).is_err() {
        return Some((DROP, CTR_DROP_REWRITE));
    }
    Some((PASS, CTR_REPLY))
}

/// A packet from a client: a known flow keeps its backend; a new one to a frontend gets one.
#[inline(always)]
fn forward(ctx: &TcContext, f: &Flow, now: u64, len: u32, hook: Hook) -> (i32, u32) {
    let skey = service_key(f);
    if let Some(s) = lookup(&skey, now) {
        // SAFETY: `s` is a live entry from a successful lookup.
        let svc: Ct4Entry = unsafe { *s };
        let rkey = translated_key(f, svc.nat_addr_be, svc.addr_be, svc.port_be);
        let rev = lookup(&rkey, now);
        let state = match rev {
            // SAFETY: as above.
            Some(r) => unsafe { (*r).flags },
            None => 0,
        };
        if !reopens(f, state) {
            let flags = forward_state(f, state);
            match rev {
                Some(r) => touch(r, f.proto, flags, now, 0),
                None => {
                    // The reverse entry was evicted: rebuild it from what we know.
                    let rev = reverse_entry(f, svc.nat_addr_be != 0, svc.rev_nat_id, flags, now);
                    if CT4.insert(&rkey, &rev, 0).is_err() {
                        return (DROP, CTR_DROP_CT_WRITE);
                    }
                }
            }
            touch(s, f.proto, flags, now, len);
            if translate(ctx, f, svc.nat_addr_be, svc.addr_be, svc.port_be).is_err() {
                return (DROP, CTR_DROP_REWRITE);
            }
            return (PASS, CTR_CT_HIT);
        }
        // A new connection on the tuple of a closed one: choose afresh below.
    }
    new_flow(ctx, f, now, len, hook, &skey)
}

#[inline(always)]
fn reverse_entry(f: &Flow, snat: bool, rev_nat_id: u32, flags: u16, now: u64) -> Ct4Entry {
    Ct4Entry {
        expires_ns: now + ct_lifetime_ns(f.proto, flags),
        addr_be: f.saddr_be,
        port_be: f.sport_be,
        flags: if snat { flags | CT_FLAG_SNAT } else { flags },
        nat_addr_be: f.daddr_be,
        nat_port_be: f.dport_be,
        _pad: 0,
        rev_nat_id,
        _pad2: 0,
        packets: 0,
        bytes: 0,
    }
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
    let Some(fe) = lb::frontend(f.daddr_be, f.dport_be, f.proto) else {
        return (PASS, CTR_PASS_NO_MATCH);
    };
    if hook == Hook::FromUplink && fe.flags & SVC_FLAG_CLUSTER_IP != 0 {
        // ClusterIPs are for pods and the node, not for the outside world.
        return (PASS, CTR_PASS_NO_MATCH);
    }
    if fe.count == 0 {
        return match reject::port_unreachable(ctx, f) {
            Some(verdict) => (verdict, CTR_REJECT_NO_BACKEND),
            None => (DROP, CTR_DROP_REJECT_FAILED),
        };
    }
    let Some(be) = lb::pick_backend(f.daddr_be, f.dport_be, f.proto, fe.count) else {
        return (DROP, CTR_DROP_NO_BACKEND_ENTRY);
    };
    // A pod reaching itself through a Service: the kernel would drop a packet whose source is
    // its own address, so the flow is SNATed to the hairpin address.
    let mut snat = 0;
    if be.addr_be == f.saddr_be {
        snat = LB4_CONFIG.get(0).map_or(0, |c| c.hairpin_snat_be);
        if snat != 0 {
            count(CTR_HAIRPIN, len);
        }
    }
    let flags = forward_state(f, 0);
    let rkey = translated_key(f, snat, be.addr_be, be.port_be);
    // The reverse entry first, so that no reply can arrive before it exists.
    let rev = reverse_entry(f, snat != 0, fe.rev_nat_id, flags, now);
    if CT4.insert(&rkey, &rev, 0).is_err() {
        return (DROP, CTR_DROP_CT_WRITE);
    }
    let svc = Ct4Entry {
        expires_ns: now + ct_lifetime_ns(f.proto, flags),
        addr_be: be.addr_be,
        port_be: be.port_be,
        flags,
        nat_addr_be: snat,
        nat_port_be: 0,
        _pad: 0,
        rev_nat_id: fe.rev_nat_id,
        _pad2: 0,
        packets: 1,
        bytes: u64::from(len),
    };
    if CT4.insert(skey, &svc, 0).is_err() {
        return (DROP, CTR_DROP_CT_WRITE);
    }
    if translate(ctx, f, snat, be.addr_be, be.port_be).is_err() {
        return (DROP, CTR_DROP_REWRITE);
    }
    (PASS, CTR_NEW_FLOW)
}
