//! Project tasks: `./x <task>`, which is `cargo xtask <task>` once `./x` has made sure cargo
//! can run. Every task but `setup` runs `setup` first, so that on a fresh machine the README's
//! two commands are all anyone types.
mod build_ebpf;
mod controlplane;
mod demo;
mod setup;
mod test;
mod toolchain;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "sluice's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks, from tools.txt: Debian packages, the eBPF nightly with
    /// rust-src, bpf-linker built against LLVM 22, the control plane, and the kernel matrix's
    /// virtme-ng and Debian kernels. Idempotent: skips what is there.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/sluice-ebpf) for development.
    BuildEbpf,
    /// Run every test tier: unit, packet tests (BPF_PROG_TEST_RUN), sandbox end-to-end, the
    /// real control plane, and the demo in both modes.
    /// Extra arguments go to `cargo test` (for example a test name filter).
    Test {
        /// Also run the kernel-sensitive tiers in virtual machines on these Debian kernels:
        /// 5.10, 6.1, 6.12, a comma-separated list, or `all` (what CI runs). Set-up fetches
        /// virtme-ng and the kernels into the cache first.
        #[arg(long, value_parser = parse_kernels)]
        kernel: Option<&'static [testbed::vm::Kernel]>,
        /// With --kernel: every kernel-sensitive tier, whole, on each kernel (slow), instead of
        /// the quick tier everywhere and a chosen end-to-end set on the oldest.
        #[arg(long, requires = "kernel")]
        full: bool,
        /// With --kernel: the matrix only, not the host's tiers.
        #[arg(long, requires = "kernel")]
        kernels_only: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Benchmarks, side by side in one run: sluice against the direct path and kube-proxy's
    /// iptables and nftables rules at 1, 1,000 and 10,000 Services (connection rates and
    /// latencies, UDP, control plane), ns per packet through BPF_PROG_TEST_RUN, and the
    /// agent's control plane and memory, against the API test server and the real control
    /// plane. Report: target/bench/report.md and latency.svg.
    Bench {
        /// A shorter run (shorter cells, fewer samples; under 3 minutes once built).
        #[arg(long)]
        quick: bool,
    },
    /// The main job on a sandbox cluster in network namespaces, live until Ctrl-C.
    Demo {
        /// Run the checks once and exit with their status instead of running live.
        #[arg(long)]
        once: bool,
        /// Run the same story on the real control plane (etcd, kube-apiserver,
        /// kube-controller-manager, built by setup) through kubectl, with the sandbox kubelet
        /// running the pods, instead of manifests mode.
        #[arg(long)]
        control_plane: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(setup::Scope {
            kernels: &testbed::vm::KERNELS,
            ..setup::Scope::ALL
        }),
        Task::BuildEbpf => {
            setup::run(setup::Scope::RUST)?;
            build_ebpf::run()
        }
        Task::Test {
            kernel,
            full,
            kernels_only,
            cargo_args,
        } => {
            let kernels = kernel.unwrap_or(&[]);
            setup::run(setup::Scope {
                kernels,
                ..setup::Scope::ALL
            })?;
            test::run(&test::Plan {
                cargo_args: &cargo_args,
                kernels,
                full,
                kernels_only,
            })
        }
        Task::Bench { quick } => {
            setup::run(setup::Scope::ALL)?;
            bench(quick)
        }
        Task::Demo {
            once,
            control_plane,
        } => {
            // Manifests mode needs no control plane, so a fresh machine's first demo does not
            // wait for its Go build.
            setup::run(setup::Scope {
                control_plane,
                kernels: &[],
            })?;
            demo::run(once, control_plane, demo::Build::Yes)
        }
    }
}

/// `--kernel`'s value: `all`, or names of the matrix's kernels, comma-separated.
fn parse_kernels(s: &str) -> Result<&'static [testbed::vm::Kernel], String> {
    use testbed::vm::{KERNELS, kernel};
    if s == "all" {
        return Ok(&KERNELS);
    }
    let mut picked = Vec::new();
    for name in s.split(',') {
        let k = kernel(name.trim()).ok_or_else(|| {
            let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            format!(
                "no kernel `{name}` in the matrix: {} or all",
                names.join(", ")
            )
        })?;
        picked.push(k);
    }
    Ok(picked.leak())
}

fn bench(quick: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // The comparison runs last: its report takes in the other two.
    for bench in ["datapath", "agent", "realcluster", "compare"] {
        let mut cmd = testbed::cmd::command(&["cargo"])?;
        cmd.current_dir(workspace_root()).args([
            "bench",
            "--package",
            "proxy-userspace",
            "--bench",
            bench,
            "--",
        ]);
        if quick {
            cmd.arg("--quick");
        }
        let st = cmd.status().context("starting cargo bench")?;
        anyhow::ensure!(st.success(), "the {bench} benchmark failed ({st})");
    }
    println!("report: target/bench/report.md (chart: target/bench/latency.svg)");
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}
