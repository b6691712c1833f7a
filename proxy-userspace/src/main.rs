//! `sluice`: the node agent and its inspection commands.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::programs::TcAttachType;
use clap::{Parser, Subcommand, ValueEnum};
use proxy_common::{
    CT_FLAG_DSR, CT_FLAG_ESTABLISHED, CT_FLAG_FIN_FWD, CT_FLAG_FIN_REPLY, CT_FLAG_REDIRECT,
    CT_FLAG_RST, CT_FLAG_SEEN_REPLY,
};
use serde_json::json;
use sluice::{
    agent::{AgentArgs, Mode},
    dataplane::{AttachMode, CtKind, Dataplane, FROM_POD, PinnedMaps},
};

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
    /// Run the node agent: watch the API server (or a manifests directory) and keep the
    /// datapath's maps equal to the Services, EndpointSlices and this Node.
    Agent(Box<AgentArgs>),
    /// Frontends and their backends, read from the maps a running agent pinned.
    Services {
        #[arg(long, env = "SLUICE_PIN_PATH", default_value = "/sys/fs/bpf/sluice")]
        pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Live flows through Services (the conntrack table), read from the pinned maps.
    Conntrack {
        #[arg(long, env = "SLUICE_PIN_PATH", default_value = "/sys/fs/bpf/sluice")]
        pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The kernel facilities sluice uses beyond Linux 5.10, whether this kernel has each (asked
    /// of the kernel where it can be), and what sluice does here as a result: check a node
    /// before rolling out. Needs root (probe programs are loaded).
    ///
    /// It also shows the XDP choice per uplink (mode, whether XDP sends SNATed flows, the
    /// driver) of the agent that pinned under `--pin-path`.
    Features {
        #[arg(long, env = "SLUICE_PIN_PATH", default_value = "/sys/fs/bpf/sluice")]
        pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Agent(args) => sluice::agent::run(*args),
        Command::Services { pin_path, output } => services(&pin_path, output),
        Command::Conntrack { pin_path, output } => conntrack(&pin_path, output),
        Command::Features { pin_path, output } => {
            let report = sluice::dataplane::features::probe_node(&pin_path);
            match output {
                Output::Table => print!("{report}"),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
        Command::Count {
            interface,
            hook,
            mode,
            seconds,
        } => count(&interface, hook, mode, seconds),
    }
}

/// The kind as Kubernetes spells it.
fn kind_name(kind: sluice::service::FrontendKind) -> &'static str {
    use sluice::service::FrontendKind as K;
    match kind {
        K::ClusterIp => "ClusterIP",
        K::NodePort => "NodePort",
        K::ExternalIp => "ExternalIP",
        K::LoadBalancer => "LoadBalancer",
    }
}

fn services(pin_path: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(pin_path)?;
    let services = maps.services()?;
    let json_list = |list: &[sluice::service::Backend]| {
        list.iter()
            .map(|b| json!({"address": b.addr.to_string(), "port": b.port, "local": b.local}))
            .collect::<Vec<_>>()
    };
    if output == Output::Json {
        let v: Vec<_> = services
            .iter()
            .map(|(fe, bes)| {
                let mut o = json!({
                    "address": fe.addr.to_string(),
                    "port": fe.port,
                    "protocol": fe.proto.to_string(),
                    "kind": kind_name(fe.kind),
                    "backends": json_list(&bes.all),
                });
                if let Some(ext) = &bes.external {
                    o["externalTrafficPolicy"] = json!("Local");
                    o["backendsFromOutside"] = json!(json_list(ext));
                }
                if let Some(src) = &bes.sources {
                    let cidrs: Vec<String> = src.cidrs.iter().map(ToString::to_string).collect();
                    o["loadBalancerSourceRanges"] = json!(cidrs);
                    o["allowsNode"] = json!(src.from_node);
                }
                if let Some(t) = bes.affinity_timeout_s {
                    o["sessionAffinityTimeoutSeconds"] = json!(t);
                }
                if bes.no_local_endpoints {
                    o["internalTrafficPolicy"] = json!("Local");
                    o["noLocalEndpoints"] = json!(true);
                }
                o
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let text_list = |list: &[sluice::service::Backend], none: &str| {
        if list.is_empty() {
            return none.to_owned();
        }
        list.iter()
            .map(|b| {
                let local = if b.local { " (local)" } else { "" };
                format!("{}:{}{local}", b.addr, b.port)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("{:<24} {:<13} BACKENDS", "FRONTEND", "KIND");
    for (fe, bes) in &services {
        let none = if bes.no_local_endpoints {
            "(none on this node, internalTrafficPolicy Local: dropped)"
        } else {
            "(none: rejected)"
        };
        let mut line = text_list(&bes.all, none);
        if let Some(ext) = &bes.external {
            line.push_str("; from outside (externalTrafficPolicy Local): ");
            line.push_str(&text_list(ext, "(none on this node: dropped)"));
        }
        if let Some(src) = &bes.sources {
            let cidrs: Vec<String> = src.cidrs.iter().map(ToString::to_string).collect();
            let node = if src.from_node { ", and the node" } else { "" };
            line.push_str(&format!("; only from {}{node}", cidrs.join(", ")));
        }
        if let Some(t) = bes.affinity_timeout_s {
            line.push_str(&format!("; sticky per client for {t} s"));
        }
        println!("{:<24} {:<13} {line}", fe.to_string(), kind_name(fe.kind));
    }
    Ok(())
}

fn tcp_state(flags: u16) -> &'static str {
    if flags & CT_FLAG_RST != 0 {
        "closed(rst)"
    } else if flags & CT_FLAG_FIN_FWD != 0 && flags & CT_FLAG_FIN_REPLY != 0 {
        "closed"
    } else if flags & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY) != 0 {
        "closing"
    } else if flags & CT_FLAG_ESTABLISHED != 0 {
        "established"
    } else if flags & CT_FLAG_SEEN_REPLY != 0 {
        "syn-recv"
    } else {
        "syn-sent"
    }
}

fn conntrack(pin_path: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(pin_path)?;
    let entries = maps.conntrack()?;
    let now = sluice::dataplane::monotonic_ns();
    // A flow is its service entry (client -> frontend, pinned backend); the reverse entry
    // carries the state both directions update.
    // Reverse entries by (protocol, translated source, backend): the translated source is the
    // client (with its port, or one remapped on a clash), or the SNAT address (hairpin, with
    // the client's port; the node, with a port of its own).
    // Live ones only: an expired entry may stay in one table while the tuple's live one is in
    // the other.
    let reverse: std::collections::HashMap<_, _> = entries
        .iter()
        .filter(|r| r.kind == CtKind::Reverse && r.expires_ns() > now)
        .map(|r| ((r.proto, r.src, r.dst), r))
        .collect();
    let mut flows = Vec::new();
    for e in entries.iter().filter(|e| e.kind == CtKind::Service) {
        if e.expires_ns() <= now {
            continue;
        }
        let backend = sluice::dataplane::sock_addr(e.entry.addr_be, e.entry.port_be);
        // The translated source, when it is not the client's own.
        let snat = (e.entry.nat_addr_be != 0 || e.entry.nat_port_be != 0).then(|| {
            let addr = if e.entry.nat_addr_be != 0 {
                std::net::Ipv4Addr::from(u32::from_be(e.entry.nat_addr_be))
            } else {
                *e.src.ip()
            };
            let port = if e.entry.nat_port_be != 0 {
                u16::from_be(e.entry.nat_port_be)
            } else {
                e.src.port()
            };
            std::net::SocketAddrV4::new(addr, port)
        });
        let reverse = reverse
            .get(&(e.proto, snat.unwrap_or(e.src), backend))
            // The entry must be this flow's (a closed flow's tuple may have passed on).
            .filter(|r| sluice::dataplane::sock_addr(r.entry.addr_be, r.entry.port_be) == e.src);
        let flags = reverse.map_or(e.entry.state(), |r| r.entry.state());
        let state = if e.proto == sluice::dataplane::Protocol::Tcp {
            tcp_state(flags)
        } else if flags & CT_FLAG_SEEN_REPLY != 0 {
            "replied"
        } else {
            "unreplied"
        };
        let dsr = (e.entry.flags & CT_FLAG_DSR != 0).then_some("ingress");
        flows.push(Flow {
            proto: e.proto,
            client: e.src,
            frontend: e.dst,
            backend,
            state,
            expires: (e.expires_ns() - now) / 1_000_000_000,
            snat,
            dsr,
            packets: e.entry.packets,
            bytes: e.entry.bytes,
        });
    }
    // Direct server return, on the backend's node: a reverse entry written from the option,
    // with no service entry (the client's packets arrive DNATed); its packets are the replies.
    for r in entries.iter().filter(|r| {
        r.kind == CtKind::Reverse
            && r.expires_ns() > now
            && r.entry.flags & (CT_FLAG_DSR | CT_FLAG_REDIRECT) == CT_FLAG_DSR
    }) {
        let flags = r.entry.state();
        flows.push(Flow {
            proto: r.proto,
            client: r.src,
            frontend: sluice::dataplane::sock_addr(r.entry.nat_addr_be, r.entry.nat_port_be),
            backend: r.dst,
            state: tcp_state(flags),
            expires: (r.expires_ns() - now) / 1_000_000_000,
            snat: None,
            dsr: Some("backend"),
            packets: r.entry.packets,
            bytes: r.entry.bytes,
        });
    }
    if output == Output::Json {
        let v: Vec<_> = flows
            .iter()
            .map(|f| {
                json!({
                    "protocol": f.proto.to_string(),
                    "client": f.client.to_string(),
                    "frontend": f.frontend.to_string(),
                    "backend": f.backend.to_string(),
                    "state": f.state,
                    "expires_in_seconds": f.expires,
                    "snat": f.snat.map(|s| s.to_string()),
                    "direct_server_return": f.dsr,
                    "packets": f.packets,
                    "bytes": f.bytes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:<22} {:<12} {:>8} {:>9}",
        "PROTO", "CLIENT", "FRONTEND", "SNAT", "BACKEND", "STATE", "EXPIRES", "PACKETS"
    );
    for f in &flows {
        // The SNAT column says "dsr" for direct server return (no SNAT; on the backend's node,
        // "dsr-reply": the packets counted are the replies).
        let snat = match (f.snat, f.dsr) {
            (Some(s), _) => s.to_string(),
            (None, Some("backend")) => "dsr-reply".into(),
            (None, Some(_)) => "dsr".into(),
            (None, None) => "-".into(),
        };
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<22} {:<12} {:>7}s {:>9}",
            f.proto.to_string(),
            f.client.to_string(),
            f.frontend.to_string(),
            snat,
            f.backend.to_string(),
            f.state,
            f.expires,
            f.packets
        );
    }
    Ok(())
}

/// One flow of `sluice conntrack`.
struct Flow {
    proto: sluice::dataplane::Protocol,
    client: std::net::SocketAddrV4,
    frontend: std::net::SocketAddrV4,
    backend: std::net::SocketAddrV4,
    state: &'static str,
    expires: u64,
    snat: Option<std::net::SocketAddrV4>,
    /// Direct server return: "ingress" (this node DNATs the client's packets) or "backend"
    /// (this node's pod replies, showing the frontend).
    dsr: Option<&'static str>,
    packets: u64,
    bytes: u64,
}

fn count(interface: &str, hook: Hook, mode: Mode, seconds: Option<u64>) -> anyhow::Result<()> {
    let hook = match hook {
        Hook::Ingress => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    };
    let mode = AttachMode::from(mode);
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
