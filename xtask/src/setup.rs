//! `cargo xtask setup`: make a fresh Debian 12 machine of this project's kind able to build and
//! test sluice. Each step checks first and does nothing when the piece is already there.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::toolchain::{BPF_LINKER_VERSION, EBPF_TOOLCHAIN, LLVM_MAJOR};

/// Commands the build and the tests use, and the Debian package that provides each.
const COMMANDS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("bpftool", "bpftool"),
];

pub fn run() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = COMMANDS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    let llvm = format!("llvm-{LLVM_MAJOR}-dev");
    if !on_path(&format!("llvm-config-{LLVM_MAJOR}")) {
        missing.push(&llvm);
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        say("Debian packages: all there");
    } else {
        apt_install(&missing)?;
    }
    ebpf_toolchain()?;
    bpf_linker()?;
    Ok(())
}

fn say(msg: &str) {
    eprintln!("setup: {msg}");
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(cmd);
            p.is_file()
                && std::fs::metadata(&p)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                    .unwrap_or(false)
        })
    }) || ["/usr/sbin", "/sbin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(cmd).is_file())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("could not start {what} ({cmd:?})"))?;
    if !st.success() {
        bail!("{what} failed ({st}); command: {cmd:?}");
    }
    Ok(())
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "these Debian packages are missing: {}. Installing them needs root: run \
             `sudo cargo xtask setup`, or install them yourself with apt-get",
            pkgs.join(" ")
        );
    }
    say(&format!("installing Debian packages: {}", pkgs.join(" ")));
    status(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update (is the Debian package registry reachable?)",
    )?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs),
        "apt-get install (is the Debian package registry reachable?)",
    )
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    if !on_path("rustup") {
        bail!(
            "rustup is not on PATH: sluice builds its eBPF programs with a pinned nightly that \
             rustup installs. Install rustup, or add ~/.cargo/bin to PATH"
        );
    }
    let sysroot = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let has_src = sysroot.as_ref().is_some_and(|s| {
        std::path::Path::new(s)
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
    });
    if has_src {
        say(&format!(
            "eBPF toolchain {EBPF_TOOLCHAIN} with rust-src: there"
        ));
        return Ok(());
    }
    say(&format!("installing {EBPF_TOOLCHAIN} with rust-src"));
    status(
        Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]),
        "rustup toolchain install (is the Rust toolchain server reachable?)",
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        say(&format!("bpf-linker {BPF_LINKER_VERSION}: there"));
        return Ok(());
    }
    let llvm_bindir = Command::new(format!("llvm-config-{LLVM_MAJOR}"))
        .arg("--bindir")
        .output()
        .context("llvm-config is missing: the llvm-dev package did not install")?;
    let llvm_bindir = String::from_utf8_lossy(&llvm_bindir.stdout)
        .trim()
        .to_owned();
    let path = format!(
        "{llvm_bindir}:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 70 s)"
    ));
    status(
        Command::new("cargo")
            .env("PATH", path)
            .current_dir(crate::workspace_root())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ]),
        "cargo install bpf-linker (is crates.io reachable?)",
    )
}
