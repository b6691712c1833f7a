//! Conntrack: lookups that treat expired entries as absent, flow creation, state updates.
//! The layout and lifetimes are documented in `proxy_common::conntrack`.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::LruHashMap,
};
use proxy_common::{
    CT_FLAG_DSR, CT_FLAG_ESTABLISHED, CT_FLAG_FIN_FWD, CT_FLAG_FIN_REPLY, CT_FLAG_RST,
    CT_FLAG_SEEN_REPLY, CT_FLAG_SYN, CT_KIND_REVERSE, CT_KIND_SERVICE, CT_LATE_FLAGS, Ct4Entry,
    Ct4Key, IPPROTO_TCP, ct_closed, ct_steady,
};

use crate::{
    maps::{CT4, CT4_NEW},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// 1 where the kernel has `bpf_ktime_get_coarse_ns` (5.11+): set by the agent at load
/// (`proxy_common::COARSE_CLOCK_GLOBAL`). In `.rodata`, which the loader freezes, so the
/// verifier knows it: on 5.10 the coarse branch is dead code, never checked, and removed.
#[unsafe(no_mangle)]
static SLUICE_COARSE_CLOCK: u8 = 0;

/// The time for conntrack, affinity and everything else the programs keep
/// (`CLOCK_MONOTONIC`, ns): the coarse clock (the last tick's, about 20 ns cheaper a read)
/// where the kernel has it, else the precise one. Every program reads this one, so that
/// times one program writes and another compares come from the same clock.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a plain read of a global; volatile, so that the compiler keeps the load the
    // loader's value reaches. The helpers have no preconditions.
    unsafe {
        if core::ptr::read_volatile(&raw const SLUICE_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// The service-entry key of a packet from a client: its own tuple.
#[inline(always)]
pub fn service_key(f: &Flow) -> Ct4Key {
    service_key_of(f.saddr_be, f.sport_be, f.daddr_be, f.dport_be, f.proto)
}

/// The service-entry key of the flow from `client_be:client_port_be` to
/// `frontend_be:frontend_port_be` (what a reverse entry names as its client and frontend).
#[inline(always)]
pub fn service_key_of(
    client_be: u32,
    client_port_be: u16,
    frontend_be: u32,
    frontend_port_be: u16,
    proto: u8,
) -> Ct4Key {
    Ct4Key {
        saddr_be: client_be,
        daddr_be: frontend_be,
        sport_be: client_port_be,
        dport_be: frontend_port_be,
        proto,
        kind: CT_KIND_SERVICE,
        _pad: [0; 2],
    }
}

/// What the datapath reads of a conntrack entry to translate a packet: its fields without
/// the counters and times (20 bytes of stack where a copy of the entry takes 48).
#[derive(Clone, Copy)]
pub struct Pinned {
    pub addr_be: u32,
    pub nat_addr_be: u32,
    pub rev_nat_id: u32,
    pub port_be: u16,
    pub nat_port_be: u16,
    pub flags: u16,
    /// The TCP state, merged from the flags and the per-flag bytes (`Ct4Entry::state`).
    pub state: u16,
}

/// The translation fields of the entry `e` points to.
#[inline(always)]
pub fn pinned(e: *const Ct4Entry) -> Pinned {
    // SAFETY: `e` comes from a successful map lookup; fields read one by one.
    unsafe {
        Pinned {
            addr_be: (*e).addr_be,
            nat_addr_be: (*e).nat_addr_be,
            rev_nat_id: (*e).rev_nat_id,
            port_be: (*e).port_be,
            nat_port_be: (*e).nat_port_be,
            flags: (*e).flags,
            state: (*e).state(),
        }
    }
}

/// Whether the reverse entry `e` belongs to the flow from `client_be:client_port_be` to
/// `frontend_be:frontend_port_be`. Fields are read one by one: a copy of the whole entry
/// would cost stack the programs do not have.
#[inline(always)]
pub fn owned_by(
    e: *const Ct4Entry,
    client_be: u32,
    client_port_be: u16,
    frontend_be: u32,
    frontend_port_be: u16,
) -> bool {
    // SAFETY: `e` comes from a successful map lookup.
    unsafe {
        (*e).addr_be == client_be
            && (*e).port_be == client_port_be
            && (*e).nat_addr_be == frontend_be
            && (*e).nat_port_be == frontend_port_be
    }
}

/// The reverse-entry key that a reply `f` (backend -> client) belongs to: its tuple reversed.
#[inline(always)]
pub fn reply_key(f: &Flow) -> Ct4Key {
    Ct4Key {
        saddr_be: f.daddr_be,
        daddr_be: f.saddr_be,
        sport_be: f.dport_be,
        dport_be: f.sport_be,
        proto: f.proto,
        kind: CT_KIND_REVERSE,
        _pad: [0; 2],
    }
}

/// The reverse-entry key of a flow after translation: from the client (or, when `snat_be` is
/// not 0, the SNAT address, with `snat_port_be` unless that is 0) to the backend.
#[inline(always)]
pub fn translated_key(
    f: &Flow,
    snat_be: u32,
    snat_port_be: u16,
    backend_addr_be: u32,
    backend_port_be: u16,
) -> Ct4Key {
    Ct4Key {
        saddr_be: if snat_be != 0 { snat_be } else { f.saddr_be },
        daddr_be: backend_addr_be,
        sport_be: if snat_port_be != 0 {
            snat_port_be
        } else {
            f.sport_be
        },
        dport_be: backend_port_be,
        proto: f.proto,
        kind: CT_KIND_REVERSE,
        _pad: [0; 2],
    }
}

/// The live entry for `key` in `map`, or `None` if absent or expired.
#[inline(always)]
fn live(map: &LruHashMap<Ct4Key, Ct4Entry>, key: &Ct4Key, now: u64) -> Option<*mut Ct4Entry> {
    let e = map.get_ptr_mut(key)?;
    // SAFETY: a successful lookup returns a valid pointer into the map's value.
    if unsafe { (*e).expires_ns(key.proto) } < now {
        return None;
    }
    Some(e)
}

/// The live entry for `key` in `CT4` (established flows), or `None`.
#[inline(always)]
pub fn established(key: &Ct4Key, now: u64) -> Option<*mut Ct4Entry> {
    live(&CT4, key, now)
}

/// The live entry for `key` in `CT4_NEW` (flows not yet established), or `None`.
#[inline(always)]
pub fn not_established(key: &Ct4Key, now: u64) -> Option<*mut Ct4Entry> {
    live(&CT4_NEW, key, now)
}

/// The live entry for `key`: in `CT4` (established flows, where nearly every packet's flow
/// is), else in `CT4_NEW`; `None` if absent or expired.
#[inline(always)]
pub fn lookup(key: &Ct4Key, now: u64) -> Option<*mut Ct4Entry> {
    established(key, now).or_else(|| not_established(key, now))
}

/// The entry at `key` in `CT4`, else in `CT4_NEW`, live or not: what [`live_from`] then checks
/// against the clock. Apart, so that a miss in both tables (what most packets leaving a node,
/// or entering a pod that was a TC client, meet) reads no clock. With the entry, whether it is
/// in `CT4_NEW`.
#[inline(always)]
pub fn find(key: &Ct4Key) -> Option<(*mut Ct4Entry, bool)> {
    if let Some(e) = CT4.get_ptr_mut(key) {
        return Some((e, false));
    }
    CT4_NEW.get_ptr_mut(key).map(|e| (e, true))
}

/// [`find`] for a caller that takes only live `CT4` entries (the XDP program): `Some(Some(e))`,
/// `e` live in `CT4`; `Some(None)`, an entry there but expired, or one in `CT4_NEW`; `None`, in
/// neither. Each table is read at most once.
#[inline(always)]
pub fn find_established(key: &Ct4Key, now: u64) -> Option<Option<*mut Ct4Entry>> {
    if let Some(e) = CT4.get_ptr_mut(key) {
        // SAFETY: a successful lookup returns a valid pointer into the map's value.
        let live = unsafe { (*e).expires_ns(key.proto) } >= now;
        return Some(live.then_some(e));
    }
    CT4_NEW.get_ptr_mut(key).map(|_| None)
}

/// The live entry for `key`, given `e` from [`find`]: `e` if it is live at `now`, else the
/// live entry in `CT4_NEW` (an expired `CT4` entry hides no `CT4_NEW` one; an expired
/// `CT4_NEW` entry is found expired again), as [`lookup`] would have found; with whether it
/// is in `CT4_NEW`.
#[inline(always)]
pub fn live_from(
    (e, in_new): (*mut Ct4Entry, bool),
    key: &Ct4Key,
    now: u64,
) -> Option<(*mut Ct4Entry, bool)> {
    // SAFETY: a successful lookup returns a valid pointer into the map's value.
    if unsafe { (*e).expires_ns(key.proto) } >= now {
        return Some((e, in_new));
    }
    not_established(key, now).map(|e| (e, true))
}

/// Removes the entry at `key` from both tables.
#[inline(always)]
pub fn forget(key: &Ct4Key) {
    let _ = CT4.remove(key);
    let _ = CT4_NEW.remove(key);
}

/// Writes a new flow's entry `e` at `key` into `CT4_NEW` unless an entry is there, then checks
/// `CT4` (after the write, so that an entry moved there at this moment is seen: `promote`
/// writes `CT4` before it empties `CT4_NEW`; an expired entry there is no flow).
/// `Err(Some(..))`: a live entry holds the key, with whether it is in `CT4_NEW` (ours was taken
/// back); `Err(None)`: an expired entry is in the way in `CT4_NEW`, or the map refused the
/// write. (`CT4` is not read when the write fails: a live entry in `CT4_NEW` is the key's
/// claim, and `CT4` is checked by whoever made it.) Few branches: it runs in the SNAT port
/// allocator's loop, where the verifier walks each of them 32 times.
#[inline(always)]
pub fn take(key: &Ct4Key, e: &Ct4Entry, now: u64) -> Result<(), Option<(*mut Ct4Entry, bool)>> {
    if CT4_NEW.insert(key, e, u64::from(BPF_NOEXIST)).is_ok() {
        let Some(held) = live(&CT4, key, now) else {
            return Ok(());
        };
        let _ = CT4_NEW.remove(key);
        return Err(Some((held, false)));
    }
    Err(live(&CT4_NEW, key, now).map(|e| (e, true)))
}

/// [`take`] after removing what is at `key` in one table (`CT4_NEW` when `new`): an expired
/// entry, or this flow's closing one. Only the table that entry was read in: the other may
/// hold a live flow's. `Some(true)` when written, `Some(false)` when another flow holds the
/// key, `None` when the map refused the write.
#[inline(always)]
fn retake(key: &Ct4Key, rev: &Ct4Entry, now: u64, new: bool) -> Option<bool> {
    if new {
        let _ = CT4_NEW.remove(key);
    } else {
        let _ = CT4.remove(key);
    }
    match take(key, rev, now) {
        Ok(()) => Some(true),
        Err(Some(_)) => Some(false),
        Err(None) => None,
    }
}

/// Inserts a new flow's reverse entry `rev` at `key` (its tuple after translation) unless a
/// live entry of another flow holds it, in either table. Returns `Some(true)` when written,
/// `Some(false)` when another flow holds the tuple (the new flow must take another source
/// port), `None` when the map refused the write. The entry at `key` is replaced when it has
/// expired, or when it is this very flow's (same client, same frontend) and closing (a
/// connection reopened on the tuple). This flow's open entry is kept as it is (its service
/// entry was evicted, or another CPU has just made the flow): its state is the flow's.
#[inline(always)]
pub fn claim(key: &Ct4Key, rev: &Ct4Entry, now: u64) -> Option<bool> {
    let (e, new) = match take(key, rev, now) {
        Ok(()) => return Some(true),
        Err(Some(held)) => held,
        Err(None) => return retake(key, rev, now, true),
    };
    if !owned_by(
        e,
        rev.addr_be,
        rev.port_be,
        rev.nat_addr_be,
        rev.nat_port_be,
    ) {
        return Some(false);
    }
    // SAFETY: a live entry from a successful lookup.
    if unsafe { (*e).state() } & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY | CT_FLAG_RST) == 0 {
        return Some(true);
    }
    retake(key, rev, now, new)
}

/// Puts back the reverse entry `rev` of a flow whose reverse entry was evicted, at `key`,
/// into the table its service entry is in (`CT4_NEW` when `new`), unless an entry is there
/// (another flow may have just taken the tuple): whether it was written.
#[inline(always)]
pub fn rebuild(key: &Ct4Key, rev: &Ct4Entry, new: bool, now: u64) -> bool {
    if new {
        return take(key, rev, now).is_ok();
    }
    if CT4.insert(key, rev, u64::from(BPF_NOEXIST)).is_err() {
        return false;
    }
    if live(&CT4_NEW, key, now).is_some() {
        // Another flow's new entry: the tuple is its.
        let _ = CT4.remove(key);
        return false;
    }
    true
}

/// Moves a flow that has just become established from `CT4_NEW` to `CT4`: its service entry
/// `s` (at `skey`, in `CT4_NEW`) and its reverse entry `r` at `rkey`, when that is in `CT4_NEW`
/// too (the entry the caller found and checked is this flow's, not whatever is at `rkey` now).
/// Each entry is written to `CT4` first and removed from `CT4_NEW` after, so a lookup on
/// another CPU finds one of the two copies. A mark another CPU makes on the old copy between
/// the two steps is lost; none is expected then: the packet moving the flow is the client's
/// first after the backend's first reply (the handshake's ACK), and the backend sends nothing
/// more until that packet reaches it. If `CT4` refuses a write the flow stays in `CT4_NEW`.
#[inline(always)]
pub fn promote(skey: &Ct4Key, s: *mut Ct4Entry, rkey: &Ct4Key, r: Option<*mut Ct4Entry>) {
    if let Some(r) = r {
        // SAFETY: `r` points at a map value; the kernel copies it into the other map.
        if CT4.insert(rkey, unsafe { &*r }, 0).is_err() {
            return;
        }
        let _ = CT4_NEW.remove(rkey);
    }
    // SAFETY: as above; `s` comes from a successful lookup in `CT4_NEW`.
    if CT4.insert(skey, unsafe { &*s }, 0).is_ok() {
        let _ = CT4_NEW.remove(skey);
    }
}

/// Moves the one entry `e` at `key`, in `CT4_NEW`, from there to `CT4` (written there first,
/// as [`promote`] does).
#[inline(always)]
pub fn promote_one(key: &Ct4Key, e: *mut Ct4Entry) {
    // SAFETY: `e` points at a map value; the kernel copies it into the other map.
    if CT4.insert(key, unsafe { &*e }, 0).is_ok() {
        let _ = CT4_NEW.remove(key);
    }
}

/// Whether `f`, a reply to a flow in TCP state `flags`, is the SYN-ACK of a new connection on
/// the tuple of a closed one: a direct connection (to the backend's own address, or one socket
/// LB translated at `connect()`) that the client made on the port it had used for the Service.
/// The closed flow's reverse entry is stale then, and must not rewrite the new one's replies.
#[inline(always)]
pub fn opens_anew(f: &Flow, flags: u16) -> bool {
    f.proto == IPPROTO_TCP
        && f.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK)
        && ct_closed(flags)
}

/// Whether a TCP packet with `tcp_flags` opens a new connection on a tuple whose flow is
/// closing (port reuse after close): then the old entry is replaced, not continued.
#[inline(always)]
pub fn reopens(f: &Flow, state: u16) -> bool {
    f.proto == IPPROTO_TCP
        && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && state & (CT_FLAG_RST | CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY) != 0
}

// The shifts that move the DSR bit, and the TCP SYN bit, onto state bits.
const DSR_TO_SEEN_REPLY: u32 = CT_FLAG_DSR.trailing_zeros() - CT_FLAG_SEEN_REPLY.trailing_zeros();
const DSR_TO_ESTABLISHED: u32 = CT_FLAG_DSR.trailing_zeros() - CT_FLAG_ESTABLISHED.trailing_zeros();
const DSR_SYN_TO_ESTABLISHED: u32 = CT_FLAG_ESTABLISHED.trailing_zeros() - TCP_SYN.trailing_zeros();
const _: () = assert!(TCP_SYN as u16 == CT_FLAG_SEEN_REPLY);

/// Folds a packet from the client into the flow state; returns the new flags.
#[inline(always)]
pub fn forward_state(f: &Flow, mut flags: u16) -> u16 {
    if f.proto == IPPROTO_TCP {
        if f.tcp_flags & TCP_SYN != 0 {
            flags |= CT_FLAG_SYN;
        }
        if f.tcp_flags & TCP_FIN != 0 {
            flags |= CT_FLAG_FIN_FWD;
        }
        if f.tcp_flags & TCP_RST != 0 {
            flags |= CT_FLAG_RST;
        }
        // Direct server return: no reply passes here; the client's packet after its SYN
        // shows the backend's SYN-ACK reached it. Without a branch (the verifier walks every
        // path one makes, through every later test of the state): the DSR bit moved onto
        // SEEN_REPLY's, kept only if the packet has no SYN.
        flags |= (flags >> DSR_TO_SEEN_REPLY) & u16::from((f.tcp_flags & TCP_SYN) ^ TCP_SYN);
    }
    if flags & CT_FLAG_SEEN_REPLY != 0 {
        flags |= CT_FLAG_ESTABLISHED;
    }
    flags
}

/// Folds a reply into the flow state; returns the new flags.
#[inline(always)]
pub fn reply_state(f: &Flow, mut flags: u16) -> u16 {
    flags |= CT_FLAG_SEEN_REPLY;
    if f.proto == IPPROTO_TCP {
        if f.tcp_flags & TCP_FIN != 0 {
            flags |= CT_FLAG_FIN_REPLY;
        }
        if f.tcp_flags & TCP_RST != 0 {
            flags |= CT_FLAG_RST;
        }
        // Direct server return, on the backend's node: the client's packets do not pass
        // here, and the backend's next packet after its SYN-ACK may be hours away (a pooled
        // connection whose client waits before its first request): the SYN-ACK (a reply with
        // SYN) establishes it (without a branch, as in `forward_state`). It stays in
        // `CT4_NEW`, where a flood of new flows evicts, until the backend's next packet
        // without SYN, FIN or RST (`programs::reply`).
        flags |= (flags >> DSR_TO_ESTABLISHED)
            & (u16::from(f.tcp_flags & TCP_SYN) << DSR_SYN_TO_ESTABLISHED);
    } else {
        flags |= CT_FLAG_ESTABLISHED;
    }
    flags
}

/// Sets the state bits `add` (of `CT_LATE_FLAGS`) of an entry, each in its own byte, which is
/// only ever set to 1: another CPU's bits are never undone (see `proxy_common::conntrack`).
#[inline(always)]
fn mark(e: *mut Ct4Entry, add: u16) {
    // SAFETY: `e` comes from a successful map lookup. Volatile, so that no store is widened
    // over a neighbour or left out.
    unsafe {
        if add & CT_FLAG_FIN_FWD != 0 {
            core::ptr::write_volatile(&raw mut (*e).fin_fwd, 1);
        }
        if add & CT_FLAG_FIN_REPLY != 0 {
            core::ptr::write_volatile(&raw mut (*e).fin_reply, 1);
        }
        if add & CT_FLAG_RST != 0 {
            core::ptr::write_volatile(&raw mut (*e).rst, 1);
        }
        if add & CT_FLAG_SEEN_REPLY != 0 {
            core::ptr::write_volatile(&raw mut (*e).seen_reply, 1);
        }
        if add & CT_FLAG_ESTABLISHED != 0 {
            core::ptr::write_volatile(&raw mut (*e).established, 1);
        }
    }
}

/// Whether the client's packet `f` may be translated from its flow's service entry `s` alone
/// (found in `CT4`, with state `state`), without reading the reverse entry: see
/// `proxy_common::ct_steady`. One hash lookup instead of two for nearly every packet of an
/// established flow.
#[inline(always)]
pub fn steady(f: &Flow, s: *const Ct4Entry, state: u16, now: u64) -> bool {
    // SAFETY: `s` comes from a successful map lookup; fields read one by one.
    let (seen_ns, packets) = unsafe { ((*s).seen_ns, (*s).packets) };
    ct_steady(f.proto, f.tcp_flags, state, seen_ns, packets, now)
}

/// Renews a flow's reverse entry `e` for a packet from its client that took the flow's state
/// from `old` to `new`: the bits it added, and its time. Not counted: an entry counts its own
/// direction's packets, and the reverse entry's are the replies.
#[inline(always)]
pub fn refresh(e: *mut Ct4Entry, old: u16, new: u16, now: u64) {
    mark(e, new & !old & CT_LATE_FLAGS);
    // SAFETY: `e` comes from a successful map lookup.
    unsafe { (*e).seen_ns = now };
}

/// Updates an entry in place for a packet that took its state from `old` to `new`: each bit
/// the packet added is set in its own byte, and no field is read back and rewritten, so
/// another CPU's update of the same entry is never undone.
#[inline(always)]
pub fn touch(e: *mut Ct4Entry, old: u16, new: u16, now: u64, bytes: u32) {
    mark(e, new & !old & CT_LATE_FLAGS);
    // SAFETY: `e` comes from a successful map lookup. Concurrent updates from other CPUs may
    // lose a counter increment, or move `seen_ns` by the nanoseconds between them.
    unsafe {
        (*e).seen_ns = now;
        (*e).packets += 1;
        (*e).bytes += u64::from(bytes);
    }
}

/// A reply `f` that ends its flow (a FIN or an RST from the backend) marks the flow's service
/// entry `s` too, which otherwise only the client's packets touch: a flow the backend ended
/// must not keep its backend pinned for the established lifetime.
#[inline(always)]
pub fn end_from_reply(s: *mut Ct4Entry, f: &Flow, now: u64) {
    let mut add = CT_FLAG_FIN_REPLY;
    if f.tcp_flags & TCP_RST != 0 {
        add = CT_FLAG_RST;
    }
    mark(s, add);
    // SAFETY: as in `mark`.
    unsafe { (*s).seen_ns = now };
}
