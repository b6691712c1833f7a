//! Frontends and backend choice: O(1) whatever the number of Services.
use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    Affinity4Key, Affinity4Value, AffinityMatchKey, BACKEND_FLAG_LOCAL, CTR_AFFINITY_HIT,
    Lb4Backend, Lb4Key, Lb4Service, SRC_RANGE_ID_BITS, SVC_FLAG_AFFINITY, SVC_FLAG_SRC_RANGES,
    SrcRange4Key,
};

use crate::maps::{LB4_AFFINITY, LB4_AFFINITY_MATCH, LB4_BACKENDS, LB4_SERVICES, LB4_SRC_RANGES};

/// The frontend entry (slot 0) for `addr:port/proto`, if there is one.
#[inline(always)]
pub fn frontend(addr_be: u32, port_be: u16, proto: u8) -> Option<Lb4Service> {
    let key = Lb4Key {
        addr_be,
        port_be,
        slot: 0,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once; the map holds plain integers.
    unsafe { LB4_SERVICES.get(&key).copied() }
}

/// The backend for a new flow from `client_be` to frontend `fe` (at `addr_be:port_be/proto`),
/// among its `count` slots from `first`: uniformly at random by `r`; with
/// [`SVC_FLAG_AFFINITY`], the backend the client's last new flow went to, if that was less than
/// the frontend's timeout ago, the backend is still the frontend's and, where only local
/// backends may serve (`local_only`), local; the choice is then remembered. `None` if a slot or
/// its backend is missing (the agent writes backends and slots before the frontend, so this
/// means a map was changed by hand or a write failed half-way).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose(
    fe: &Lb4Service,
    addr_be: u32,
    port_be: u16,
    proto: u8,
    first: u16,
    count: u16,
    client_be: u32,
    local_only: bool,
    r: u32,
    now: u64,
) -> Option<Lb4Backend> {
    if fe.flags & SVC_FLAG_AFFINITY == 0 {
        return backend_at(r, addr_be, port_be, proto, first, count).map(|(_, b)| b);
    }
    let key = Affinity4Key {
        client_be,
        rev_nat_id: fe.rev_nat_id,
    };
    if let Some(v) = LB4_AFFINITY.get_ptr_mut(&key)
        && let Some(be) = remembered(fe, v, local_only, now)
    {
        // SAFETY: a valid pointer into the map's value; a plain integer, written whole.
        unsafe { (*v).last_ns = now };
        count_affinity_hit();
        return Some(be);
    }
    let (backend_id, be) = backend_at(r, addr_be, port_be, proto, first, count)?;
    let value = Affinity4Value {
        last_ns: now,
        backend_id,
        _pad: 0,
    };
    // An LRU map evicts rather than fails; a failed write only loses the stickiness.
    let _ = LB4_AFFINITY.insert(&key, &value, 0);
    Some(be)
}

/// The backend an affinity entry names, if it may serve the client's new flow: in time, still
/// the frontend's, and local where it must be.
#[inline(always)]
fn remembered(
    fe: &Lb4Service,
    v: *mut Affinity4Value,
    local_only: bool,
    now: u64,
) -> Option<Lb4Backend> {
    // SAFETY: a valid pointer into the map's value; plain integers, copied out.
    let (last_ns, backend_id) = unsafe { ((*v).last_ns, (*v).backend_id) };
    let timeout_ns = u64::from(fe.backend_id) * 1_000_000_000;
    if now.wrapping_sub(last_ns) >= timeout_ns {
        return None;
    }
    let member = AffinityMatchKey {
        backend_id,
        rev_nat_id: fe.rev_nat_id,
    };
    // SAFETY: as above.
    unsafe { LB4_AFFINITY_MATCH.get(&member) }?;
    // SAFETY: as above.
    let be = unsafe { LB4_BACKENDS.get(&backend_id).copied() }?;
    if local_only && be.flags & BACKEND_FLAG_LOCAL == 0 {
        return None;
    }
    Some(be)
}

#[inline(always)]
fn count_affinity_hit() {
    crate::stats::count(CTR_AFFINITY_HIT, 0);
}

/// The backend in slot `first + r % count`, with its id.
#[inline(always)]
pub fn backend_at(
    r: u32,
    addr_be: u32,
    port_be: u16,
    proto: u8,
    first: u16,
    count: u16,
) -> Option<(u32, Lb4Backend)> {
    // Non-zero by type: the verifier rejects the panic path a plain `%` would keep.
    let count = core::num::NonZeroU32::new(u32::from(count))?;
    let slot = (r % count) as u16 + first;
    let key = Lb4Key {
        addr_be,
        port_be,
        slot,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: values are copied out at once; the maps hold plain integers.
    let id = unsafe { LB4_SERVICES.get(&key) }?.backend_id;
    unsafe { LB4_BACKENDS.get(&id).copied() }.map(|b| (id, b))
}

/// Whether a client at `saddr_be` may open a flow to `fe`: always, unless the frontend has
/// loadBalancerSourceRanges and none of them holds the address.
#[inline(always)]
pub fn source_allowed(fe: &Lb4Service, saddr_be: u32) -> bool {
    if fe.flags & SVC_FLAG_SRC_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_ID_BITS + 32,
        SrcRange4Key {
            rev_nat_id_be: fe.rev_nat_id.to_be(),
            addr_be: saddr_be,
        },
    );
    LB4_SRC_RANGES.get(&key).is_some()
}
