//! The contract between sluice's kernel programs (`proxy-ebpf`) and its userspace
//! (`proxy-userspace`): map names, key and value layouts, counter indices.
//!
//! Rules (docs/ARCHITECTURE.md, "The ABI"):
//! - every type is `#[repr(C)]` with explicit padding and a compile-time size assert;
//! - no `bool`, `Option` or enum in a map value: plain integers only;
//! - fields in network byte order say so in their name (`_be`);
//! - id 0 means unset;
//! - a layout change renames the map (`_v2`), because pinned maps outlive the agent.
#![no_std]

pub mod counters;

pub use counters::*;
