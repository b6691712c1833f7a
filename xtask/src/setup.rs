//! `./x setup` (`cargo xtask setup`): make a fresh Debian 12 machine able to build, test, demo
//! and benchmark sluice, from one list: `tools.txt`. `./x` has already installed the rows
//! marked `x` (a C linker, curl, rustup and the userspace toolchain), since nothing of ours
//! compiles without them. Setup installs the rest, each step checking first and doing nothing
//! when its piece is there, and says what it installed, why, and how long each step took:
//! 1. the Debian packages of every `apt:` row whose command (or package) is missing;
//! 2. the eBPF nightly with rust-src (proxy-ebpf/rust-toolchain.toml);
//! 3. bpf-linker, built against LLVM 22;
//! 4. the control plane (etcd, kube-apiserver, kube-controller-manager, kubectl), built from
//!    the Go module proxy into a versioned cache outside the repository (`controlplane.rs`),
//!    unless the task needs none ([`Scope`]: the manifests-mode demo, `build-ebpf`);
//! 5. for the kernel matrix only (`./x test --kernel`), virtme-ng in a virtualenv and the
//!    Debian kernels asked for, into the same cache (`vm.rs`);
//! 6. a check that every command in the list, or the part of it the task needs, is now there.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::{
    tools::{self, Provider, Tool},
    vm::Kernel,
};

use crate::toolchain::{BPF_LINKER_VERSION, LLVM_MAJOR, in_ebpf_dir};

/// What a task needs set up.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    /// The control plane's Go build (minutes cold), for the tests, the bench and the demo's
    /// `--control-plane`.
    pub control_plane: bool,
    /// The kernels of the matrix to fetch, with the VM tools (the `vm` rows of tools.txt) when
    /// there is any.
    pub kernels: &'static [Kernel],
}

impl Scope {
    pub const ALL: Self = Self {
        control_plane: true,
        kernels: &[],
    };
    /// What building and running sluice itself needs.
    pub const RUST: Self = Self {
        control_plane: false,
        kernels: &[],
    };

    fn wants(self, t: &Tool) -> bool {
        let control_plane = matches!(t.provider, Provider::GoBuild(_) | Provider::GoProxy);
        let vm_only = t.used_by.iter().all(|u| *u == "vm");
        (self.control_plane || !control_plane) && (!self.kernels.is_empty() || !vm_only)
    }
}

pub fn run(scope: Scope) -> anyhow::Result<()> {
    let start = Instant::now();
    step("Debian packages", || debian_packages(scope))?;
    step("eBPF toolchain", ebpf_toolchain)?;
    step("bpf-linker", bpf_linker)?;
    if scope.control_plane {
        step("control plane", crate::controlplane::ensure_built)?;
    }
    if !scope.kernels.is_empty() {
        step("virtme-ng", crate::vm::ensure_virtme)?;
        for k in scope.kernels {
            step(&format!("kernel {}", k.name), || {
                crate::vm::ensure_kernel(*k)
            })?;
        }
    }
    step("every command in tools.txt", || check_all(scope))?;
    say(&format!("ready ({})", secs(start.elapsed())));
    Ok(())
}

pub(crate) fn say(msg: &str) {
    eprintln!("setup: {msg}");
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Runs one step and reports its outcome and its time, or what went wrong.
fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    let t = Instant::now();
    match f() {
        Ok(outcome) => {
            say(&format!("{name}: {outcome} ({})", secs(t.elapsed())));
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "setup step `{name}` failed after {}",
            secs(t.elapsed())
        ))),
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    testbed::cmd::output(
        &["dpkg-query", "-W", "-f=${Status}", pkg],
        Duration::from_secs(10),
    )
    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Whether a row's piece is on the machine: its command on PATH, or for a row without one,
/// its package installed.
fn present(t: &Tool) -> bool {
    use testbed::controlplane::versions::{GO, bin_dir, cache_dir};
    match (t.command, t.provider) {
        (Some(cmd), Provider::GoBuild(_)) => bin_dir().join(cmd).is_file(),
        (Some(cmd), Provider::Pip(_)) => testbed::vm::venv_bin(cmd).is_some_and(|b| b.is_file()),
        (Some(cmd), Provider::GoProxy) => {
            testbed::cmd::on_path(cmd) || cache_dir().join(format!("go{GO}/bin/go")).is_file()
        }
        (Some(cmd), _) => testbed::cmd::on_path(cmd),
        (None, Provider::Apt(pkg)) => dpkg_installed(pkg),
        (None, _) => true,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn debian_packages(scope: Scope) -> anyhow::Result<String> {
    // Package -> the rows that need it, in list order.
    let mut missing: BTreeMap<&str, Vec<&Tool>> = BTreeMap::new();
    let mut total = 0;
    for t in tools::all().iter().filter(|t| scope.wants(t)) {
        if let Provider::Apt(pkg) = t.provider {
            total += 1;
            if !present(t) {
                missing.entry(pkg).or_default().push(t);
            }
        }
    }
    if missing.is_empty() {
        return Ok(format!("all {total} listed are there"));
    }
    let pkgs: Vec<&str> = missing.keys().copied().collect();
    let install = format!(
        "apt-get install -y --no-install-recommends {}",
        pkgs.join(" ")
    );
    if !is_root() {
        bail!(
            "these Debian packages are missing: {}. Installing them needs root: run `sudo ./x \
             setup`, or `sudo {install}` yourself",
            pkgs.join(" ")
        );
    }
    say("installing from Debian:");
    for (pkg, rows) in &missing {
        let what: Vec<String> = rows
            .iter()
            .map(|t| match t.command {
                Some(c) => format!("{c} ({})", t.why),
                None => t.why.to_owned(),
            })
            .collect();
        say(&format!("  {pkg}: {}", what.join("; ")));
    }
    let t = Instant::now();
    let update = testbed::cmd::command(&["apt-get", "update", "-q"])?
        .status()
        .context("starting apt-get update")?;
    if !update.success() {
        bail!(
            "apt-get update failed ({update}): Debian's package registry did not answer. Check \
             the network and /etc/apt/sources.list, then run `./x setup` again, or install the \
             packages yourself: {install}"
        );
    }
    say(&format!("  apt-get update ({})", secs(t.elapsed())));
    let st = testbed::cmd::command(&["apt-get", "install", "-y", "-q", "--no-install-recommends"])?
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("starting apt-get install")?;
    if !st.success() {
        bail!(
            "`{install}` failed ({st}): a package may be missing from the configured suites \
             (llvm-{LLVM_MAJOR}-dev comes from bookworm-security), or the registry stopped \
             answering. Fix the apt sources and run `./x setup` again"
        );
    }
    Ok(format!("installed {}", pkgs.join(" ")))
}

/// The eBPF nightly and its rust-src, from proxy-ebpf/rust-toolchain.toml.
fn ebpf_toolchain() -> anyhow::Result<String> {
    let sysroot = in_ebpf_dir(&["rustc", "--print", "sysroot"])?
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
        return Ok(format!(
            "there, with rust-src ({})",
            sysroot.unwrap_or_default()
        ));
    }
    say("installing the eBPF nightly of proxy-ebpf/rust-toolchain.toml, with rust-src");
    let st = in_ebpf_dir(&["rustup", "toolchain", "install"])?
        .status()
        .context("starting rustup")?;
    if !st.success() {
        bail!(
            "`rustup toolchain install` in proxy-ebpf/ failed ({st}): rustup's server \
             (static.rust-lang.org) may be unreachable. Run `./x setup` again once it answers"
        );
    }
    Ok("installed".into())
}

fn bpf_linker() -> anyhow::Result<String> {
    let version = testbed::cmd::output(&["bpf-linker", "--version"], Duration::from_secs(10))
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(format!("{BPF_LINKER_VERSION} there"));
    }
    let llvm_config = format!("llvm-config-{LLVM_MAJOR}");
    let llvm_bindir = testbed::cmd::run(&[&llvm_config, "--bindir"]).with_context(|| {
        format!("{llvm_config} did not answer: the llvm-{LLVM_MAJOR}-dev package did not install")
    })?;
    let path = format!(
        "{}:{}",
        llvm_bindir.trim(),
        std::env::var("PATH").unwrap_or_default()
    );
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 70 s on 2 cores)"
    ));
    let features = format!("llvm-{LLVM_MAJOR}");
    let st = testbed::cmd::command(&[
        "cargo",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        &features,
    ])?
    .env("PATH", path)
    .current_dir(crate::workspace_root())
    .status()
    .context("starting cargo install")?;
    if !st.success() {
        bail!(
            "`cargo install bpf-linker` failed ({st}): crates.io may be unreachable, or LLVM \
             {LLVM_MAJOR} is not where {llvm_config} says. Run `./x setup` again once fixed"
        );
    }
    Ok(format!("{BPF_LINKER_VERSION} installed"))
}

/// Every command the list names is there now; if not, which and where it comes from.
fn check_all(scope: Scope) -> anyhow::Result<String> {
    let wanted: Vec<&Tool> = tools::all().iter().filter(|t| scope.wants(t)).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|t| !present(t))
        .map(|t| {
            let from = match t.provider {
                Provider::Apt(p) => format!("Debian package {p}"),
                Provider::Cargo(c) => format!("cargo install {c}"),
                Provider::Rustup => "the rustup toolchain".into(),
                Provider::RustupInit => "rustup (./x installs it)".into(),
                Provider::GoProxy => "Go, or the Go module proxy".into(),
                Provider::GoBuild(m) => format!("a build of {m} by setup"),
                Provider::Pip(p) => format!("{p} from PyPI, into a virtualenv by setup"),
            };
            format!("{} (from {from})", t.command.unwrap_or("-"))
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "still missing after setup: {}. Is ~/.cargo/bin on PATH?",
            missing.join(", ")
        );
    }
    Ok(format!(
        "all {} rows{} there",
        wanted.len(),
        if scope.control_plane {
            ""
        } else {
            " but the control plane's"
        }
    ))
}
