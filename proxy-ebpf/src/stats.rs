//! Per-CPU counters: one increment per verdict, no locking (each CPU owns its slot).
use crate::maps::PKT_COUNTERS;

#[inline(always)]
pub fn count(index: u32, bytes: u32) {
    if let Some(c) = PKT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is
        // valid and only this CPU writes it while this program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
