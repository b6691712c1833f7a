//! The contract between sluice's kernel programs (`proxy-ebpf`) and its userspace
//! (`proxy-userspace`): map names, key and value layouts, flags, counter indices.
//!
//! Rules (docs/ARCHITECTURE.md, "The ABI"):
//! - every type is `#[repr(C)]` with explicit padding and a compile-time size assert;
//! - no `bool`, `Option` or enum in a map value: plain integers only;
//! - fields in network byte order say so in their name (`_be`);
//! - id 0 means unset;
//! - a layout change renames the map (`_v2`), because pinned maps outlive the agent.
#![no_std]

pub mod conntrack;
pub mod counters;
pub mod lb4;
pub mod sctp;
pub mod sock;

pub use conntrack::*;
pub use counters::*;
pub use lb4::*;
pub use sock::*;

/// Implements `aya::Pod` for plain-old-data ABI types when the `user` feature is on.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), integer fields only, padding explicit: every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}

/// IP protocol numbers the datapath translates.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// TCP header flags, as the datapath and the conntrack rules read them.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
