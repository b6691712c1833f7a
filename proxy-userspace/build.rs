//! Builds the eBPF crate with the pinned nightly (aya-build) and leaves the object in OUT_DIR,
//! where `src/dataplane/mod.rs` embeds it. `cargo xtask build-ebpf` uses this same build.
use anyhow::{Context as _, anyhow};

/// The eBPF toolchain: a nightly whose LLVM major equals bpf-linker's (LLVM 22). Keep in step
/// with `EBPF_TOOLCHAIN` in `xtask/src/toolchain.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-25";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("proxy-userspace has no parent directory"))?;
    let ebpf_dir = root.join("proxy-ebpf");
    // The ABI crate is compiled into the eBPF object too: rebuild it when the ABI changes.
    println!(
        "cargo::rerun-if-changed={}",
        root.join("proxy-common").display()
    );
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` to install the pinned \
         nightly, rust-src and bpf-linker",
    )
}
