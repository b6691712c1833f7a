//! `./x build-ebpf` (`cargo xtask build-ebpf`): the eBPF object alone, for development (inspecting it with
//! bpftool or llvm-objdump, checking the verifier). The same command and flags aya-build uses
//! in proxy-userspace/build.rs, which is what the `sluice` binary embeds.
use anyhow::{Context as _, bail};

use crate::toolchain::{EBPF_TARGET, in_ebpf_dir};

pub fn run() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    // In proxy-ebpf/, rustup runs the nightly pinned there.
    let st = in_ebpf_dir(&[
        "cargo",
        "build",
        "--package",
        "proxy-ebpf",
        "--bins",
        "--release",
        "--target",
        EBPF_TARGET,
        "-Z",
        "build-std=core",
    ])?
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    )
    .status()
    .context("starting the eBPF build")?;
    if !st.success() {
        bail!("the eBPF build failed ({st})");
    }
    let obj = root
        .join("target")
        .join(EBPF_TARGET)
        .join("release")
        .join("sluice-ebpf");
    let size = std::fs::metadata(&obj)
        .with_context(|| format!("the build left no object at {}", obj.display()))?
        .len();
    println!("{} ({size} bytes)", obj.display());
    Ok(())
}
