//! Frontends and backend choice: O(1) whatever the number of Services.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    Affinity4Key, Affinity4Value, AffinityMatchKey, BACKEND_FLAG_LOCAL, CTR_AFFINITY_HIT,
    CTR_DROP_NO_BACKEND_ENTRY, CTR_DROP_NO_LOCAL_BACKEND, LOCAL_SLOT_BASE, Lb4Backend, Lb4Key,
    Lb4Service, MAGLEV_M, SRC_RANGE_ID_BITS, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_SRC_RANGES, SrcRange4Key, maglev_hash, maglev_position,
};

use crate::{
    maps::{
        LB4_AFFINITY, LB4_AFFINITY_MATCH, LB4_BACKENDS, LB4_MAGLEV, LB4_SERVICES, LB4_SRC_RANGES,
    },
    parse::Flow,
};

/// The frontend entry (slot 0) for `addr:port/proto`, if there is one.
#[inline(always)]
pub fn frontend(addr_be: u32, port_be: u16, proto: u8) -> Option<Lb4Service> {
    let key = Lb4Key::new(addr_be, port_be, 0, proto);
    // SAFETY: the value is copied out at once; the map holds plain integers.
    unsafe { LB4_SERVICES.get(&key).copied() }
}

/// The backend for `f`'s new flow to frontend `fe` (whose entry was just looked up), from
/// outside (`from_outside`: externalTrafficPolicy Local narrows it to the node's own
/// endpoints) or from a pod: by Maglev's table where the frontend has one (every node picks
/// alike), else at random; affinity as [`choose`]. The frontend has endpoints (`fe.count` >
/// 0). Else the drop counter of why there is none: no local endpoint, or a missing entry.
#[inline(always)]
pub fn backend_for(
    f: &Flow,
    fe: &Lb4Service,
    from_outside: bool,
    now: u64,
) -> Result<Lb4Backend, u32> {
    // externalTrafficPolicy Local: traffic from outside uses the node's own endpoints, kept
    // in slots of their own.
    let (first, n) = if from_outside && fe.flags & SVC_FLAG_EXT_LOCAL != 0 {
        (LOCAL_SLOT_BASE + 1, fe.local_count)
    } else {
        (1, fe.count)
    };
    if n == 0 {
        return Err(CTR_DROP_NO_LOCAL_BACKEND);
    }
    // Maglev hashes the flow (every node then picks alike); else uniformly at random.
    let r = if fe.flags & SVC_FLAG_MAGLEV != 0 {
        maglev_hash(f.saddr_be, f.daddr_be, f.sport_be, f.dport_be, f.proto)
    } else {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    choose(
        fe,
        f.daddr_be,
        f.dport_be,
        f.proto,
        first,
        n,
        f.saddr_be,
        first != 1,
        r,
        now,
    )
    .ok_or(CTR_DROP_NO_BACKEND_ENTRY)
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
        return pick(fe, r, addr_be, port_be, proto, first, count).map(|(_, b)| b);
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
    let (backend_id, be) = pick(fe, r, addr_be, port_be, proto, first, count)?;
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
    // Saturating: a time another CPU wrote after `now` was read is no time ago, not a
    // wrapped-around eternity.
    if now.saturating_sub(last_ns) >= timeout_ns {
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

/// The backend for a new flow, with its id: with [`SVC_FLAG_MAGLEV`], from the `count` slots
/// (not the local list) and a table in `LB4_MAGLEV`, the table's at the flow's position
/// (`r` is then the flow's [`maglev_hash`]); else the
/// slot `first + r % count`.
#[inline(always)]
fn pick(
    fe: &Lb4Service,
    r: u32,
    addr_be: u32,
    port_be: u16,
    proto: u8,
    first: u16,
    count: u16,
) -> Option<(u32, Lb4Backend)> {
    let args = PickArgs {
        addr_be,
        rev_nat_id: fe.rev_nat_id,
        r,
        port_be,
        first,
        count,
        flags: fe.flags,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    let id = pick_id(&args);
    if id == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once; the map holds plain integers.
    unsafe { LB4_BACKENDS.get(&id).copied() }.map(|b| (id, b))
}

/// What [`pick_id`] needs, passed on the caller's stack (a BPF function takes at most five
/// arguments).
#[repr(C)]
struct PickArgs {
    addr_be: u32,
    rev_nat_id: u32,
    r: u32,
    port_be: u16,
    first: u16,
    count: u16,
    flags: u16,
    proto: u8,
    // Two fields, not `[u8; 3]`, which LLVM zeroes with a call to a byte-loop `memset`.
    _pad0: u8,
    _pad1: u16,
}

/// The backend id for a new flow (0: none), by Maglev or by slot. A BPF function of its own,
/// not inlined: the two ways to an id leave different things on the stack, and inlined, the
/// verifier walked everything after once per way (`sluice_new_flow_from_uplink` went past its
/// million instructions). In its own frame, what it leaves goes with the frame.
#[inline(never)]
fn pick_id(a: &PickArgs) -> u32 {
    if let Some(id) = maglev_id(a.flags, a.rev_nat_id, a.r, a.first) {
        return id;
    }
    slot_id(a.r, a.addr_be, a.port_be, a.proto, a.first, a.count).unwrap_or(0)
}

/// With [`SVC_FLAG_MAGLEV`] and a table for the frontend, the id at the flow's position (`r` is
/// then the flow's [`maglev_hash`]), for the `count` slots' list only (`first` 1).
#[inline(always)]
fn maglev_id(flags: u16, rev_nat_id: u32, r: u32, first: u16) -> Option<u32> {
    if flags & SVC_FLAG_MAGLEV == 0 || first != 1 {
        return None;
    }
    let t = LB4_MAGLEV.get_ptr(&rev_nat_id)?;
    // SAFETY: a pointer into the map's value from a successful lookup.
    let pos = maglev_position(r, unsafe { (*t).seed });
    // The verifier does not follow a modulo: the check below bounds the index for it, and
    // the volatile read keeps the compiler from dropping it as always true.
    // SAFETY: a read of a local.
    let pos = unsafe { core::ptr::read_volatile(&pos) };
    if pos >= MAGLEV_M {
        return None;
    }
    // SAFETY: as above; the index is within the table.
    Some(unsafe { (*t).ids[pos] })
}

/// The backend id in slot `first + r % count`.
#[inline(always)]
fn slot_id(r: u32, addr_be: u32, port_be: u16, proto: u8, first: u16, count: u16) -> Option<u32> {
    // Non-zero by type: the verifier rejects the panic path a plain `%` would keep.
    let count = core::num::NonZeroU32::new(u32::from(count))?;
    let key = Lb4Key::new(addr_be, port_be, (r % count) as u16 + first, proto);
    // SAFETY: the value is copied out at once; the map holds plain integers.
    unsafe { LB4_SERVICES.get(&key) }.map(|v| v.backend_id)
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
