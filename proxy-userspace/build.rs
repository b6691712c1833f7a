//! Builds the eBPF crate with the pinned nightly (aya-build) and leaves the object in OUT_DIR,
//! where `src/dataplane/mod.rs` embeds it. `./x build-ebpf` uses this same build.
use anyhow::{Context as _, anyhow};

/// The `channel` of a rust-toolchain.toml.
fn channel(toml: &str) -> Option<&str> {
    toml.lines().find_map(|l| {
        let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
        Some(v.trim().trim_matches('"'))
    })
}

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
    // The eBPF nightly (LLVM 22, like bpf-linker) is pinned in the eBPF crate's own
    // rust-toolchain.toml, the one place it is named.
    let pin = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", pin.display());
    let pin_text =
        std::fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    let toolchain = channel(&pin_text)
        .ok_or_else(|| anyhow!("{} names no channel", pin.display()))?
        .to_owned();
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed: run `./x setup` to install the pinned nightly \
         (proxy-ebpf/rust-toolchain.toml), rust-src and bpf-linker",
    )
}
