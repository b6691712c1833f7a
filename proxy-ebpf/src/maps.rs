//! The maps, declared once. Names come from `proxy_common`, so both sides agree on them.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::{CTR_MAX, Counter};

/// See [`proxy_common::PKT_COUNTERS_MAP`].
#[map(name = "PKT_COUNTERS")]
pub static PKT_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CTR_MAX, 0);

// The map macro takes a literal name; this keeps it equal to the shared constant.
const _: () = assert!(const_str_eq(proxy_common::PKT_COUNTERS_MAP, "PKT_COUNTERS"));

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
