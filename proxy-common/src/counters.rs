//! Per-CPU packet counters: one slot per verdict or drop reason, so that every packet the
//! programs see is accounted for in exactly one "verdict" slot.

/// `PKT_COUNTERS`: index (u32, a `CTR_*` constant) -> [`Counter`]; `PerCpuArray` of
/// [`CTR_MAX`] entries; written by every program, read (summed over CPUs) by userspace.
pub const PKT_COUNTERS_MAP: &str = "PKT_COUNTERS";

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $idx:literal, $label:literal;)+) => {
        $( $(#[doc = $doc])* pub const $name: u32 = $idx; )+
        /// Names of the counters, indexed by their `CTR_*` value, for metrics and the CLI.
        pub const COUNTER_NAMES: [&str; CTR_MAX as usize] = [$($label),+];
    };
}

counters! {
    /// Every packet a program saw, whatever became of it (not a verdict).
    CTR_SEEN = 0, "seen";
    /// Passed untouched: not IPv4 (ARP, IPv6 until its datapath lands, ...).
    CTR_PASS_NOT_IPV4 = 1, "pass_not_ipv4";
    /// Passed untouched: IPv4 but neither TCP nor UDP.
    CTR_PASS_OTHER_PROTO = 2, "pass_other_proto";
    /// Passed untouched: a fragment (the datapath does not reassemble; see ARCHITECTURE.md).
    CTR_PASS_FRAGMENT = 3, "pass_fragment";
    /// Passed untouched: too short or inconsistent to parse; the kernel's own checks decide.
    CTR_PASS_MALFORMED = 4, "pass_malformed";
    /// Passed untouched: no frontend and no conntrack entry matched.
    CTR_PASS_NO_MATCH = 5, "pass_no_match";
    /// Translated: a new flow to a frontend, DNATed to a backend chosen at random.
    CTR_NEW_FLOW = 6, "new_flow";
    /// Translated: a packet of a known flow, DNATed to its pinned backend.
    CTR_CT_HIT = 7, "ct_hit";
    /// Translated: a reply, its source put back to the frontend's address and port.
    CTR_REPLY = 8, "reply";
    /// Rejected: a frontend with no backends; an ICMP port unreachable was sent back.
    CTR_REJECT_NO_BACKEND = 9, "reject_no_backend";
    /// Dropped: a frontend with no backends, and the ICMP could not be built.
    CTR_DROP_REJECT_FAILED = 10, "drop_reject_failed";
    /// Dropped: a backend slot pointed at a missing backend (a half-written service).
    CTR_DROP_NO_BACKEND_ENTRY = 11, "drop_no_backend_entry";
    /// Dropped: the conntrack entry could not be written.
    CTR_DROP_CT_WRITE = 12, "drop_ct_write";
    /// Dropped: rewriting the packet (store or checksum helper) failed.
    CTR_DROP_REWRITE = 13, "drop_rewrite";
    /// Not a verdict: of the translated packets, those hairpinned (a pod to itself via SNAT).
    CTR_HAIRPIN = 14, "hairpin";
    /// Passed: a reply seen at ingress, to be translated at egress after routing.
    CTR_PASS_REPLY_AT_EGRESS = 15, "pass_reply_at_egress";
}

/// Number of counter slots; the map's size.
pub const CTR_MAX: u32 = 16;

/// One CPU's share of a counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

crate::impl_pod!(Counter);
