//! Frontends and backend choice: O(1) whatever the number of Services.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Lb4Backend, Lb4Key, Lb4Service};

use crate::maps::{LB4_BACKENDS, LB4_SERVICES};

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

/// A backend chosen uniformly at random among the frontend's `count` slots from `first` on.
/// `None` if a slot or its backend is missing (the agent writes backends and slots before the
/// frontend, so this means a map was changed by hand or a write failed half-way).
#[inline(always)]
pub fn pick_backend(
    addr_be: u32,
    port_be: u16,
    proto: u8,
    first: u16,
    count: u16,
) -> Option<Lb4Backend> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    backend_at(r, addr_be, port_be, proto, first, count)
}

/// The backend in slot `first + r % count`: [`pick_backend`] with the choice made by `r`.
#[inline(always)]
pub fn backend_at(
    r: u32,
    addr_be: u32,
    port_be: u16,
    proto: u8,
    first: u16,
    count: u16,
) -> Option<Lb4Backend> {
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
    unsafe { LB4_BACKENDS.get(&id).copied() }
}
