//! The TC programs. Thin: parse, decide, count, return the verdict.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use network_types::eth::{EthHdr, EtherType};
use proxy_common::{CTR_IPV4, CTR_OTHER, CTR_SEEN};

use crate::counters::count;

/// Counts every packet on the device it is attached to, and passes it on unchanged.
#[classifier]
pub fn sluice_count(ctx: TcContext) -> i32 {
    let len = ctx.len();
    count(CTR_SEEN, len);
    match ctx.load::<EthHdr>(0) {
        Ok(eth) if eth.ether_type == EtherType::Ipv4 as u16 => count(CTR_IPV4, len),
        _ => count(CTR_OTHER, len),
    }
    TC_ACT_OK
}
