//! The pinned toolchain pieces (see ../shared/toolchain.md for why each one).

/// The eBPF nightly: its LLVM major (22) must equal bpf-linker's. Keep in step with
/// `EBPF_TOOLCHAIN` in proxy-userspace/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-06-25";
/// bpf-linker, built against Debian's LLVM 22 (its default feature wants LLVM 23).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_MAJOR: &str = "22";
/// The eBPF target.
pub const EBPF_TARGET: &str = "bpfel-unknown-none";
