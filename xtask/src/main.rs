//! Project tasks: `./x <task>`, which is `cargo xtask <task>` once `./x` has made sure cargo
//! can run. Every task but `setup` runs `setup` first, so that on a fresh machine the README's
//! two commands are all anyone types.
mod build_ebpf;
mod controlplane;
mod demo;
mod setup;
mod test;
mod toolchain;

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
    /// rust-src, bpf-linker built against LLVM 22. Idempotent: skips what is there.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/sluice-ebpf) for development.
    BuildEbpf,
    /// Run every test tier: unit, packet tests (BPF_PROG_TEST_RUN), sandbox end-to-end, the
    /// real control plane, and the demo in both modes.
    /// Extra arguments go to `cargo test` (for example a test name filter).
    Test {
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
        Task::Setup => setup::run(setup::Scope::ALL),
        Task::BuildEbpf => {
            setup::run(setup::Scope::RUST)?;
            build_ebpf::run()
        }
        Task::Test { cargo_args } => {
            setup::run(setup::Scope::ALL)?;
            test::run(&cargo_args)
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
            setup::run(setup::Scope { control_plane })?;
            demo::run(once, control_plane)
        }
    }
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
