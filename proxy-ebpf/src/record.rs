//! Recording a new flow once its backend is chosen: its reverse entry claimed (the client's
//! port remapped, or a port of the node's SNAT range reserved, where it must), then its service
//! entry; or, when another CPU recorded the same flow first, that flow's translation followed.
//! Shared by TC's new-flow programs (`programs::new_flow`) and XDP's (`xdp::new_flow`), so
//! that a flow is recorded alike whichever path its first packet took.
use proxy_common::{
    CT_FLAG_DSR, CT_FLAG_PORT_REMAP, CT_FLAG_REDIRECT, CTR_CT_HIT, CTR_DROP_CT_WRITE,
    CTR_DROP_DSR_TUPLE_TAKEN, CTR_DROP_RACE_REDIRECT, CTR_DROP_SNAT_PORTS, CTR_NEW_FLOW_RACE_LOST,
    CTR_PORT_REMAPPED, Ct4Entry, Ct4Key, Lb4Backend, Lb4Config, Lb4Service,
};

use crate::{
    conntrack::{self, forget, lookup, translated_key},
    maps::CT4_NEW,
    parse::Flow,
    snat,
    stats::count,
};

/// The translation a new flow's packet gets: the backend, and the source it is rewritten to
/// (`nat_addr_be` 0: the client's address kept; `nat_port_be` 0: the client's port kept).
pub struct Recorded {
    pub addr_be: u32,
    pub port_be: u16,
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// Another CPU recorded the flow first, and this packet follows its translation.
    pub raced: bool,
}

/// The reverse entry of a flow from `f`'s client to its frontend, in state `flags`.
#[inline(always)]
pub fn reverse_entry(f: &Flow, flags: u16, rev_nat_id: u32, now: u64) -> Ct4Entry {
    Ct4Entry {
        seen_ns: now,
        addr_be: f.saddr_be,
        port_be: f.sport_be,
        flags,
        nat_addr_be: f.daddr_be,
        nat_port_be: f.dport_be,
        fin_fwd: 0,
        fin_reply: 0,
        rev_nat_id,
        rst: 0,
        seen_reply: 0,
        established: 0,
        _pad: 0,
        packets: 0,
        bytes: 0,
    }
}

/// Records `f`'s new flow (service key `skey`) to the backend `be` of the frontend `fe`, in
/// state `flags`, SNATed to `snat` (0: not), under the datapath's config `cfg` (the SNAT port
/// range).
/// A flow with [`CT_FLAG_REDIRECT`] (SNATed to the node, forwarded by us) takes a port of the
/// node's own; the others keep the client's, unless another live flow has the tuple: then the
/// port is remapped ([`CT_FLAG_PORT_REMAP`]). Else the drop counter of why it could not be.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn record(
    f: &Flow,
    skey: &Ct4Key,
    fe: &Lb4Service,
    be: &Lb4Backend,
    snat: u32,
    mut flags: u16,
    cfg: &Lb4Config,
    now: u64,
    len: u32,
) -> Result<Recorded, u32> {
    let (be_addr_be, be_port_be) = (be.addr_be, be.port_be);
    // The reverse entry first, so that no reply can arrive before it exists.
    let mut rev = reverse_entry(f, flags, fe.rev_nat_id, now);
    // The key of the flow's reverse entry, once it is claimed.
    let mut rkey = translated_key(f, snat, 0, be_addr_be, be_port_be);
    // SNATed to the node: a port of its own. Else the client's, unless another flow has
    // the tuple; a direct-server-return flow cannot move off it (the backend answers the
    // client's port directly).
    let dsr = flags & CT_FLAG_DSR != 0;
    let own_port = (flags & CT_FLAG_REDIRECT != 0 && !dsr)
        || match conntrack::claim(&rkey, &rev, now) {
            Some(claimed) => !claimed,
            None => return Err(CTR_DROP_CT_WRITE),
        };
    let mut snat_port = 0;
    if own_port && dsr {
        return Err(CTR_DROP_DSR_TUPLE_TAKEN);
    }
    if own_port {
        if flags & CT_FLAG_REDIRECT == 0 {
            flags |= CT_FLAG_PORT_REMAP;
            rev.flags = flags;
            count(CTR_PORT_REMAPPED, len);
        }
        match snat::reserve_port(cfg, &mut rkey, &rev, now) {
            Some(p) => snat_port = p,
            None => return Err(CTR_DROP_SNAT_PORTS),
        }
    }
    // The service entry, written over the reverse one (the stack has room for one).
    let svc = &mut rev;
    svc.addr_be = be_addr_be;
    svc.port_be = be_port_be;
    svc.flags = flags;
    svc.nat_addr_be = snat;
    svc.nat_port_be = snat_port;
    svc.packets = 1;
    svc.bytes = u64::from(len);
    // An expired entry there (the LRU keeps them) is removed first, then the insert retried,
    // so that two CPUs meeting it cannot both write theirs.
    let inserted = conntrack::take(skey, svc, now).is_ok()
        || (lookup(skey, now).is_none()
            && CT4_NEW.remove(skey).is_ok()
            && conntrack::take(skey, svc, now).is_ok());
    if inserted {
        return Ok(Recorded {
            addr_be: be_addr_be,
            port_be: be_port_be,
            nat_addr_be: snat,
            nat_port_be: snat_port,
            raced: false,
        });
    }
    let Some(w) = lookup(skey, now) else {
        // Refused, or gone again.
        forget(&rkey);
        return Err(CTR_DROP_CT_WRITE);
    };
    // Another CPU made this flow since we looked: two packets of a new flow at once (a pod's
    // UDP client sending from two threads). Follow its choice, so the flow has one backend,
    // and give back the tuple we took.
    // SAFETY: a live entry from a successful lookup; fields copied out.
    let (a, p, n, np, wf) = unsafe {
        (
            (*w).addr_be,
            (*w).port_be,
            (*w).nat_addr_be,
            (*w).nat_port_be,
            (*w).flags,
        )
    };
    if (a, p, n, np) != (be_addr_be, be_port_be, snat, snat_port) {
        forget(&rkey);
        // One of the two forwarded by us (from outside to another node): the route this
        // packet has is for our choice, not its. Rare (a flow's packets from outside come in
        // on one queue, one CPU), so dropped and counted.
        if (wf | flags) & CT_FLAG_REDIRECT != 0 {
            return Err(CTR_DROP_RACE_REDIRECT);
        }
    }
    count(CTR_NEW_FLOW_RACE_LOST, 0);
    Ok(Recorded {
        addr_be: a,
        port_be: p,
        nat_addr_be: n,
        nat_port_be: np,
        raced: true,
    })
}

/// The TC counter of a recorded flow's packet: `fresh` (`new_flow` or `new_flow_snat`), or a
/// hit when it followed another CPU's record.
#[inline(always)]
pub fn verdict_counter(r: &Recorded, fresh: u32) -> u32 {
    if r.raced { CTR_CT_HIT } else { fresh }
}
