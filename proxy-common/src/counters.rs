//! Per-CPU packet counters: one slot per verdict or drop reason.

/// `PKT_COUNTERS`: index (u32, one of the `CTR_*` constants) -> [`Counter`];
/// `PerCpuArray` of [`CTR_MAX`] entries; the programs write, userspace sums the CPUs and reads.
pub const PKT_COUNTERS_MAP: &str = "PKT_COUNTERS";

/// Packets the TC programs saw (every packet, whatever became of it).
pub const CTR_SEEN: u32 = 0;
/// Packets that were IPv4.
pub const CTR_IPV4: u32 = 1;
/// Packets that were neither IPv4 nor carried enough bytes to tell.
pub const CTR_OTHER: u32 = 2;
/// Number of counter slots; the map's size.
pub const CTR_MAX: u32 = 3;

/// Names of the counters, indexed by their `CTR_*` value, for metrics and the CLI.
pub const COUNTER_NAMES: [&str; CTR_MAX as usize] = ["seen", "ipv4", "other"];

/// One CPU's share of a counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for Counter {}
