//! Project tasks. `cargo xtask <task>`; every task but `setup` runs `setup` first, so that on a
//! fresh machine the README's two commands are all anyone types.
mod build_ebpf;
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
    /// Install what this machine lacks: Debian packages, the eBPF nightly with rust-src,
    /// bpf-linker built against LLVM 22. Idempotent: skips what is there.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/sluice-ebpf) for development.
    BuildEbpf,
    /// Run every test tier: unit, packet tests (BPF_PROG_TEST_RUN), sandbox end-to-end.
    /// Extra arguments go to `cargo test` (for example a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Benchmarks: ns per packet through BPF_PROG_TEST_RUN (conntrack hit, new flow, no
    /// match) against an empty program, at 1 and 10,000 Services. Report in target/bench/.
    Bench {
        /// A shorter run (fewer samples).
        #[arg(long)]
        quick: bool,
    },
    /// The main job on a sandbox cluster in network namespaces, live until Ctrl-C.
    Demo {
        /// Run the checks once and exit with their status instead of running live.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::run()?;
            build_ebpf::run()
        }
        Task::Test { cargo_args } => {
            setup::run()?;
            test::run(&cargo_args)
        }
        Task::Bench { quick } => {
            setup::run()?;
            bench(quick)
        }
        Task::Demo { once } => {
            setup::run()?;
            demo::run(once)
        }
    }
}

fn bench(quick: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for bench in ["datapath", "agent"] {
        let mut cmd = std::process::Command::new("cargo");
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
    println!("reports: target/bench/datapath.md, target/bench/agent.md");
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}
