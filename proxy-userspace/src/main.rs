//! `sluice`: the node agent and its inspection commands.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::programs::TcAttachType;
use clap::{Parser, Subcommand, ValueEnum};
use sluice::dataplane::{AttachMode, Dataplane, FROM_POD};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A kube-proxy replacement: Kubernetes Services translated by eBPF at TC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the pod-side program to a device and print its counters, once a second.
    ///
    /// A smoke test of a node's eBPF support: it loads the embedded object (the verifier
    /// runs), attaches at TC, and shows real packets going through. With no Services in its
    /// (unpinned, empty) maps it changes no packet.
    Count {
        /// The device to attach to (in the current network namespace).
        #[arg(long, env = "SLUICE_INTERFACE")]
        interface: String,
        /// Which TC hook of the device.
        #[arg(long, value_enum, default_value_t = Hook::Ingress)]
        hook: Hook,
        /// How to attach: tcx (kernel >= 6.6), clsact (any kernel), or auto (the best there is).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Hook {
    Ingress,
    Egress,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Tcx,
    Clsact,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Count {
            interface,
            hook,
            mode,
            seconds,
        } => count(&interface, hook, mode, seconds),
    }
}

fn count(interface: &str, hook: Hook, mode: Mode, seconds: Option<u64>) -> anyhow::Result<()> {
    let hook = match hook {
        Hook::Ingress => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    };
    let mode = match mode {
        Mode::Auto => AttachMode::for_running_kernel(),
        Mode::Tcx => AttachMode::Tcx,
        Mode::Clsact => AttachMode::Clsact,
    };
    let mut dp = Dataplane::load().context("loading the dataplane")?;
    dp.attach(FROM_POD, interface, hook, mode)
        .with_context(|| format!("attaching the counter to {interface}"))?;
    tracing::info!(interface, ?hook, %mode, "counter attached");
    // The header line tells scripts (the demo, tests) that the program is attached.
    println!("attached {interface} {mode}");
    let start = Instant::now();
    let stop = seconds.map(Duration::from_secs);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = dp.counters().context("reading the counters")?;
        let line: Vec<String> = proxy_common::COUNTER_NAMES
            .iter()
            .zip(c.iter())
            .enumerate()
            .filter(|(i, (_, c))| *i == proxy_common::CTR_SEEN as usize || c.packets > 0)
            .map(|(_, (name, c))| format!("{name}={}/{}B", c.packets, c.bytes))
            .collect();
        println!("{}", line.join(" "));
        if stop.is_some_and(|s| start.elapsed() >= s) {
            return Ok(());
        }
    }
}
