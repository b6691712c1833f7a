//! sluice's kernel programs. Built for `bpfel-unknown-none` by `proxy-userspace/build.rs`
//! (aya-build, pinned nightly) and embedded in the `sluice` binary.
//!
//! Thin programs (`programs`) over small modules: `parse` (headers, fragments, options, ICMP
//! errors), `lb` (frontends, backend choice), `conntrack` (flows and their state), `record` (a
//! new flow's entries, shared by TC's and XDP's new-flow programs), `nat` (rewrites and
//! checksums), `snat` (source ports for flows SNATed to the node), `fib` (forwarding by FIB
//! lookup and redirect), `icmp` (ICMP errors of translated flows), `reject` (ICMP port
//! unreachable, fragmentation needed), `stats` (per-CPU counters), `maps`; and `sock`, the
//! cgroup socket programs (socket-level load balancing); `xdp`, the XDP programs on uplinks
//! (established flows and new flows from outside).
//!
//! On the host this crate is a stub with an empty `main`, so that `cargo build --workspace`
//! and `cargo clippy --workspace` work without the BPF target.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod dsr;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod record;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sctp;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
