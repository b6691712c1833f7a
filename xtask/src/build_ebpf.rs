//! `cargo xtask build-ebpf`: the eBPF object alone, for development (inspecting it with
//! bpftool or llvm-objdump, checking the verifier). The same command and flags aya-build uses
//! in proxy-userspace/build.rs, which is what the `sluice` binary embeds.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::toolchain::{EBPF_TARGET, EBPF_TOOLCHAIN};

pub fn run() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let st = Command::new("rustup")
        .current_dir(&root)
        .args([
            "run",
            EBPF_TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            "proxy-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
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
