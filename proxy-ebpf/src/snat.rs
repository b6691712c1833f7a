//! SNAT source ports: the allocator for flows SNATed to the node and for clients' ports
//! remapped on a tuple clash, after netfilter's and Cilium's: the reverse entry of the translated tuple is
//! taken (`conntrack::take`: inserted into `CT4_NEW` with BPF_NOEXIST, then checked against
//! `CT4`), so a port held by a live flow, new or established, is never overwritten; a clash
//! moves on to another port. Every try is a random port of the agent's range, drawn afresh, at
//! most [`TRIES`] in all (as Cilium's `snat_v4_new_mapping` retries). Trying the ports after a
//! random first one instead, as this allocator did, is linear probing: held ports form runs,
//! and a first try that lands in a run of 32 fails however much of the range is free (one
//! SYN in 20,000 dropped with half of a backend's range free, in the bench). With independent
//! tries a flow is dropped only with probability f^32 at a fill f: one in 10^7 at 60%.
//!
//! A closed flow keeps its port for the backend's TIME_WAIT (60 s, see
//! `proxy_common::conntrack`), so a new SYN does not meet the old connection there. Only when
//! every try found its port held is the first closed flow met given up: its port goes to the
//! new flow (`snat_port_reused`) and its service entry is removed, so that its stray packets
//! cannot ride on the new flow. With no closed flow either, the new flow is dropped and
//! counted (`drop_snat_ports_exhausted`), never given a port a live flow holds.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    CTR_SNAT_PORT_REUSED, CTR_SNAT_PORT_TAKEN, Ct4Entry, Ct4Key, Lb4Config, ct_closed,
};

use crate::{
    conntrack::{forget, lookup, service_key_of, take},
    maps::CT4_NEW,
    stats::count,
};

/// Ports tried per new flow. A clash needs a live flow from the same node address to the same
/// backend address and port on that very port; with 32 tries and a range of thousands, a
/// failure means the range is nearly full for that backend.
const TRIES: u32 = 32;

/// Reserves a source port for the flow whose reverse-entry key is `key` (its source address,
/// destination and protocol; the source port is what is chosen) by inserting its reverse
/// entry `rev` there; returns the port (network order, also left in `key`), or `None` if every
/// try clashed. (The caller's key is reused: the programs have no stack to spare.)
#[inline(always)]
pub fn reserve_port(cfg: &Lb4Config, key: &mut Ct4Key, rev: &Ct4Entry, now: u64) -> Option<u16> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if min == 0 || max < min {
        return None;
    }
    // Non-zero by type: the verifier rejects the panic path a plain `%` would keep.
    let range = core::num::NonZeroU32::new(max - min + 1)?;
    // The first port held by a closed flow, and that flow's client (for its service entry).
    let mut closed: Option<(u16, u32, u16, u32, u16)> = None;
    for _ in 0..TRIES {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let port = (min + unsafe { bpf_get_prandom_u32() } % range) as u16;
        key.sport_be = port.to_be();
        match take(key, rev, now) {
            Ok(()) => return Some(key.sport_be),
            // An expired entry in the way (the LRU keeps dead ones until it needs the room):
            // no live flow; removed, so that the port is free for the next flow, and this one
            // tries another port. Taking it here (a second `take` in each try), or taking
            // the first freed port after the loop, walks the verifier over 660,000 to
            // 1,000,000 instructions of `sluice_new_flow_from_uplink` on 6.18; so a flow whose
            // 32 tries all meet entries, some of them expired, is dropped, and the next flow
            // finds those ports free.
            Err(None) => {
                let _ = CT4_NEW.remove(key);
            }
            Err(Some((e, _))) => {
                // SAFETY: a live entry from a successful lookup; fields copied out.
                let old = unsafe { *e };
                if closed.is_none() && ct_closed(old.state()) {
                    closed = Some((
                        key.sport_be,
                        old.addr_be,
                        old.port_be,
                        old.nat_addr_be,
                        old.nat_port_be,
                    ));
                }
            }
        }
        count(CTR_SNAT_PORT_TAKEN, 0);
    }
    let (port_be, client_be, client_port_be, frontend_be, frontend_port_be) = closed?;
    key.sport_be = port_be;
    // Still the closed flow's (another CPU may have taken the port since)? A small window is
    // left between this look and the write; BPF has no compare-and-swap on map values here.
    let still = lookup(key, now).is_some_and(|e| {
        // SAFETY: a live entry from a successful lookup; fields copied out.
        let old = unsafe { *e };
        ct_closed(old.state()) && old.addr_be == client_be && old.port_be == client_port_be
    });
    if !still {
        return None;
    }
    forget(key);
    if take(key, rev, now).is_err() {
        return None;
    }
    // The closed flow's own entry would still map its client onto this port, unless the
    // client has since opened a new flow on that tuple (with a port of its own).
    let skey = service_key_of(
        client_be,
        client_port_be,
        frontend_be,
        frontend_port_be,
        key.proto,
    );
    if let Some(e) = lookup(&skey, now) {
        // SAFETY: a pointer from a successful lookup; fields copied out.
        let (a, p) = unsafe { ((*e).nat_addr_be, (*e).nat_port_be) };
        // (A remapped flow's service entry keeps the client's address: 0.)
        if (a == 0 || a == key.saddr_be) && p == port_be {
            forget(&skey);
        }
    }
    count(CTR_SNAT_PORT_REUSED, 0);
    Some(port_be)
}
