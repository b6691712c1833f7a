//! sluice side by side with the direct path and kube-proxy's iptables and nftables modes, in
//! one sandbox and one run, so the ratios hold on a noisy machine.
//!
//! One node namespace between a client pod and three backend pods, each backend running the
//! same Rust servers (`testbed::load`). For each Service count (1, 1,000, 10,000: one Service
//! carries the traffic, the rest are filler with three endpoints each, as kube-proxy's scale
//! tests have them) and each round, every mode in turn, in a rotated order:
//! - **direct**: nothing installed; the client spreads its requests over the pod addresses.
//! - **sluice**: the datapath loaded and attached to every device of the node, all Services
//!   written to its maps; socket LB off, so the TC path translates.
//! - **sluice-socket**: the same, with socket LB (`all`) attached to the node's cgroup, under
//!   which the client pod's process runs: connect() and sendmsg() pick the backend, and the TC
//!   programs see pod-to-pod packets they pass. (One-node section only: an outside client has
//!   no socket on the node.)
//! - **iptables**: kube-proxy's iptables-mode rules (`testbed::kubeproxy::iptables`), loaded
//!   with `iptables-restore --noflush` as kube-proxy does.
//! - **nftables**: kube-proxy's nftables-mode rules, loaded with `nft -f`.
//!
//! The client is a process of its own started in the client pod's namespace and cgroup (this
//! binary again, with [`load::CHILD_FLAG`]), in every mode alike.
//!
//! Each cell measures new connections (rate, p50, p99), persistent connections (rate, p99),
//! UDP request/response (rate), the time to program every Service from empty (sluice: the map
//! writes; the others: the iptables-restore / nft run), and the time for one endpoint change
//! to take effect (sluice: the map write; the others: the partial sync kube-proxy issues).
//! Then the mode is torn down to nothing, so the next mode starts from the same node.
//!
//! A second section puts the Service's traffic on the path that needs SNAT: an outside client
//! calls a NodePort of node0 whose endpoints are the three backend pods on node1 (kube-proxy:
//! its KUBE-EXT masquerade and conntrack; sluice: SNAT to node0 and forwarding by FIB redirect;
//! direct: the client reaches the pods through node1), at 1 and 10,000 Services.
//!
//! Writes target/bench/compare.json and compare-nodeport.json (every sample),
//! target/bench/report.md (these tables with the datapath and agent benches' reports, when
//! they ran first) and target/bench/latency.svg. Run by `cargo xtask bench` (`--quick`: shorter cells).
//! `--modes direct,sluice-socket` runs only those modes, and `--sections one-node,nodeport`
//! only those sections (a developer's loop; the report then says which modes ran).
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use common::NodeDataplane;
use sluice::dataplane::{
    Backend, DataplaneConfig, FROM_POD, FROM_UPLINK, Frontend, FrontendKind, Protocol, TO_POD,
    TO_UPLINK, XDP_FROM_UPLINK, XdpMode,
    socket::{self, SocketLb, SocketLbConfig},
};
use testbed::{
    BpfFs, Cluster, Netns,
    kubeproxy::{self, ProxyConfig, ServicePort},
    load::{self, BenchServer, LoadResult, LoadSpec},
    pktgen, plan,
    report::{Metric, Mode, Report, Sample},
};

const BACKENDS: [&str; 3] = ["backend-a", "backend-b", "backend-c"];
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// The Service that carries the traffic has this ClusterIP index; fillers use 0..N-1.
const TRAFFIC_IP_INDEX: u16 = 16_000;
/// The traffic Service's nodePort, TCP and UDP alike, in the NodePort section.
const NODE_PORT: u16 = 30080;

/// Where the Service's traffic comes from and where its endpoints are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Layout {
    /// A client pod and the backends on one node, through a ClusterIP.
    OneNode,
    /// A client outside the cluster, node0's NodePort, the backends on node1.
    RemoteNodePort,
    /// A client outside the cluster, node0's NodePort, the backends on node0: the path
    /// sluice's XDP program serves (established flows to local endpoints).
    LocalNodePort,
}

struct Params {
    sizes: Vec<u32>,
    rounds: u32,
    workers: usize,
    warmup: Duration,
    duration: Duration,
    max_ops_per_worker: u64,
}

impl Layout {
    /// Its name for `--sections`.
    fn name(self) -> &'static str {
        match self {
            Layout::OneNode => "one-node",
            Layout::RemoteNodePort => "nodeport",
            Layout::LocalNodePort => "nodeport-local",
        }
    }
}

impl Params {
    fn new(quick: bool) -> Self {
        Self {
            sizes: vec![1, 1_000, 10_000],
            rounds: 5,
            workers: 2,
            warmup: Duration::from_millis(if quick { 50 } else { 300 }),
            duration: Duration::from_millis(if quick { 250 } else { 2_000 }),
            max_ops_per_worker: 200_000,
        }
    }
}

fn proxy_config(node_ip: Ipv4Addr) -> ProxyConfig {
    ProxyConfig {
        cluster_cidr: (Ipv4Addr::new(198, 19, 0, 0), 16),
        service_cidr: plan::SERVICE_CIDR,
        node_ip,
    }
}

/// The `i`th filler endpoint: 198.19.64.0 and up, pod space no pod of the sandbox uses (these
/// addresses only ever appear in rules and maps; no traffic is sent to them).
fn filler_endpoint(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 64, 0)) + i),
        TARGET_PORT,
    )
}

fn filler(i: u32) -> ServicePort {
    ServicePort {
        namespace: "filler".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        protocol: kubeproxy::Protocol::Tcp,
        cluster_ip: plan::cluster_ip(u16::try_from(i).expect("fewer than 16,000 fillers")),
        port: SERVICE_PORT,
        node_port: None,
        endpoints: (0..3).map(|k| filler_endpoint(3 * i + k)).collect(),
    }
}

/// The Service under load: a TCP and a UDP port, both to the three backend pods, with a
/// nodePort in the NodePort section.
fn traffic(backends: &[Ipv4Addr], layout: Layout) -> [ServicePort; 2] {
    let port = |port_name: &str, protocol| ServicePort {
        namespace: "bench".into(),
        name: "echo".into(),
        port_name: port_name.into(),
        protocol,
        cluster_ip: plan::cluster_ip(TRAFFIC_IP_INDEX),
        port: SERVICE_PORT,
        node_port: (layout != Layout::OneNode).then_some(NODE_PORT),
        endpoints: backends
            .iter()
            .map(|a| SocketAddrV4::new(*a, TARGET_PORT))
            .collect(),
    };
    [
        port("tcp", kubeproxy::Protocol::Tcp),
        port("udp", kubeproxy::Protocol::Udp),
    ]
}

/// `n` Services: `n - 1` fillers with the traffic Service in the middle of them (iptables
/// walks KUBE-SERVICES in order, so the middle is its average case).
fn services(n: u32, backends: &[Ipv4Addr], layout: Layout) -> Vec<ServicePort> {
    let mut v: Vec<ServicePort> = (0..n - 1).map(filler).collect();
    let at = v.len() / 2;
    for (k, sp) in traffic(backends, layout).into_iter().enumerate() {
        v.insert(at + k, sp);
    }
    v
}

/// The endpoint change every mode makes: the traffic Service's TCP port gains a fourth
/// endpoint. Made after the cell's traffic, so it never disturbs a measurement.
fn changed(sp: &ServicePort) -> ServicePort {
    let mut new = sp.clone();
    new.endpoints.push(filler_endpoint(60_000));
    new
}

/// What sluice writes for `sp`: its ClusterIP frontend and, with a nodePort, the NodePort
/// frontend on `node`; `local`: the endpoints are on this node.
fn sluice_service(sp: &ServicePort, node: Ipv4Addr, local: bool) -> Vec<(Frontend, Vec<Backend>)> {
    let proto = match sp.protocol {
        kubeproxy::Protocol::Tcp => Protocol::Tcp,
        kubeproxy::Protocol::Udp => Protocol::Udp,
    };
    let backends: Vec<Backend> = sp
        .endpoints
        .iter()
        .map(|e| Backend {
            addr: *e.ip(),
            port: e.port(),
            local,
        })
        .collect();
    let mut out = vec![(
        Frontend {
            addr: sp.cluster_ip,
            port: sp.port,
            proto,
            kind: FrontendKind::ClusterIp,
        },
        backends.clone(),
    )];
    if let Some(np) = sp.node_port {
        out.push((
            Frontend {
                addr: node,
                port: np,
                proto,
                kind: FrontendKind::NodePort,
            },
            backends,
        ));
    }
    out
}

/// Pipes `input` to `argv` in `ns`, as kube-proxy pipes its rules; the wall time to exit.
/// The bound is generous: iptables-nft-restore of 10,000 Services has taken 413 s here.
fn run_timed(ns: &Netns, argv: &[&str], input: String) -> Result<Duration, String> {
    let t0 = Instant::now();
    ns.exec_with_input(argv, &input, Duration::from_secs(900))
        .map_err(|e| e.to_string())?;
    Ok(t0.elapsed())
}

/// The restore command of each iptables backend, with kube-proxy's flags.
fn restore_command(mode: Mode) -> [&'static str; 3] {
    let [noflush, counters] = kubeproxy::iptables::RESTORE_FLAGS;
    match mode {
        Mode::IptablesLegacy => ["iptables-legacy-restore", noflush, counters],
        _ => ["iptables-nft-restore", noflush, counters],
    }
}
const NFT: [&str; 3] = ["nft", "-f", "-"];

/// The sandbox: one node between a client pod and three backend pods; or, for the NodePort
/// section, an outside client, node0 (where every mode is installed) and node1 with the three
/// backend pods. Every mode is removed after its cell; where that cannot leave the node bare
/// (iptables-legacy), the next cell gets a new sandbox.
struct Sandbox {
    // Field order is drop order: the dataplane and the servers go before the namespaces (and
    // the socket links' pins before the cgroups they attach to).
    dp: Option<NodeDataplane>,
    /// With sluice-xdp in the NodePort section: the fabric's end of node0's uplink takes XDP
    /// frames (an XDP program there), which native XDP_TX on a veth needs.
    peer_xdp: Option<aya::Ebpf>,
    _servers: Vec<BenchServer>,
    links: BpfFs,
    c: Cluster,
    backends: Vec<Ipv4Addr>,
    layout: Layout,
}

impl Sandbox {
    fn new(layout: Layout) -> Self {
        let (mut c, backend_node) = match layout {
            Layout::OneNode => {
                let mut c = Cluster::new(1).expect("the sandbox node");
                c.add_cgroups().expect("the node's cgroups");
                c.add_pod(0, "client").expect("the client pod");
                load::tune_client(&c.pod("client").ns).expect("client sysctls");
                (c, 0)
            }
            Layout::RemoteNodePort => (Cluster::new(2).expect("the sandbox nodes"), 1),
            Layout::LocalNodePort => (Cluster::new(1).expect("the sandbox node"), 0),
        };
        for b in BACKENDS {
            c.add_pod(backend_node, b).expect("a backend pod");
            if layout != Layout::OneNode {
                // The backends see the node's SNAT ports (sluice's, or MASQUERADE's: kube-proxy
                // masquerades NodePort traffic even to a local endpoint), and each
                // cell starts with fresh NAT state: a port reused across cells would meet the
                // previous cell's connection in the backend's TIME_WAIT and stall its SYN 1 s.
                // Without TIME_WAIT sockets on the backends no cell inherits another's.
                c.pod(b)
                    .ns
                    .sysctl("net.ipv4.tcp_max_tw_buckets", "0")
                    .expect("backend sysctl");
            }
        }
        if layout != Layout::OneNode {
            c.add_outside().expect("the outside client");
            let client = &c.outside[0].ns;
            load::tune_client(client).expect("client sysctls");
            // The direct path: straight to the pods, through their node.
            let via = plan::node_addr(backend_node).to_string();
            client
                .ip(&[
                    "route",
                    "add",
                    &plan::cidr(plan::pod_cidr(backend_node)),
                    "via",
                    &via,
                ])
                .expect("a route to the pods");
        }
        let servers = BACKENDS
            .iter()
            .map(|b| BenchServer::start(&c.pod(b).ns, b, TARGET_PORT).expect("a backend server"))
            .collect();
        let backends = BACKENDS.iter().map(|b| c.pod(b).addr).collect();
        Self {
            dp: None,
            peer_xdp: None,
            _servers: servers,
            links: BpfFs::new().expect("a bpffs for the socket links"),
            c,
            backends,
            layout,
        }
    }

    fn client(&self) -> &Netns {
        match self.layout {
            Layout::OneNode => &self.c.pod("client").ns,
            Layout::RemoteNodePort | Layout::LocalNodePort => &self.c.outside[0].ns,
        }
    }

    /// The packet rate through `mode` to `targets` (the Service; for the direct path its
    /// backends, the flows spread round them), UDP from the outside client, in the NodePort
    /// sections only: [`PKT_FLOWS`] flows sent as fast as an `AF_PACKET` socket goes for
    /// [`PKT_WARMUP`] (the flows established: each backend echoes), then measured for
    /// [`PKT_WINDOW`], counted where they arrive (the backends' devices), with the CPU time
    /// the whole machine spent meanwhile.
    fn packet_rate(&self, mode: Mode, targets: &[SocketAddrV4]) -> Result<PacketRate, String> {
        let err = |e: std::io::Error| e.to_string();
        let client = &self.c.outside[0];
        // The next hop: node0 for its NodePort; for the direct path, the backends' node.
        let hop = match (mode, self.layout) {
            (Mode::Direct, Layout::RemoteNodePort) => &self.c.nodes[1],
            _ => &self.c.nodes[0],
        };
        let smac = pktgen::mac(&client.ns, "eth0").map_err(err)?;
        let dmac = pktgen::mac(&hop.ns, &hop.uplink).map_err(err)?;
        let blast = |duration: Duration| pktgen::Blast {
            dev: "eth0".into(),
            smac,
            dmac,
            src: SocketAddrV4::new(client.addr, PKT_SPORT),
            dsts: targets.to_vec(),
            flows: PKT_FLOWS,
            payload: load::MSG,
            duration,
            max_packets: PKT_MAX,
        };
        // Each device's counter (a u32 since the device was made), read before and after.
        let arrived = || -> Result<Vec<u64>, String> {
            BACKENDS
                .iter()
                .map(|b| pktgen::rx_packets(&self.c.pod(b).ns, "eth0").map_err(err))
                .collect()
        };
        pktgen::blast(&client.ns, &blast(PKT_WARMUP)).map_err(err)?;
        std::thread::sleep(Duration::from_millis(200));
        let profile = Profile::start(&format!("{}-{}", mode.name(), self.layout.name()))?;
        let (rx0, cpu0, stats0) = (arrived()?, cpu_seconds(), self.program_stats());
        let sent = pktgen::blast(&client.ns, &blast(PKT_WINDOW)).map_err(err)?;
        drop(profile);
        // What is still queued arrives within a few milliseconds.
        std::thread::sleep(Duration::from_millis(50));
        let (rx1, cpu1, stats1) = (arrived()?, cpu_seconds(), self.program_stats());
        let delivered: u64 = rx0
            .iter()
            .zip(&rx1)
            .map(|(a, b)| u64::from((*b as u32).wrapping_sub(*a as u32)))
            .sum();
        // sluice's programs' own share (with run-time statistics on): every run on the path
        // of a packet and of its echo.
        let program_ns_per_pkt = match (stats0, stats1) {
            (Some((t0, c0)), Some((t1, c1))) if c1 > c0 && delivered > 0 => {
                Some((t1 - t0).as_nanos() as f64 / delivered as f64)
            }
            _ => None,
        };
        Ok(PacketRate {
            sent: sent.packets,
            delivered,
            program_ns_per_pkt,
            delivered_per_s: delivered as f64 / sent.elapsed.as_secs_f64(),
            cpu_ms_per_mpkt: (cpu1 - cpu0) * 1e3 / (delivered.max(1) as f64 / 1e6),
        })
    }

    /// What sluice writes for `svcs` on node0.
    fn sluice_services(&self, svcs: &[ServicePort]) -> Vec<(Frontend, Vec<Backend>)> {
        let node = self.c.nodes[0].addr;
        let local = self.layout != Layout::RemoteNodePort;
        svcs.iter()
            .flat_map(|sp| sluice_service(sp, node, local))
            .collect()
    }

    /// The summed run time and run count of sluice's attached programs (the kernel keeps
    /// them while run-time statistics are enabled), or `None` without sluice.
    fn program_stats(&self) -> Option<(Duration, u64)> {
        let dp = self.dp.as_ref()?;
        dp.with(|dp| {
            let mut total = (Duration::ZERO, 0);
            for p in [FROM_POD, TO_POD, FROM_UPLINK, TO_UPLINK, XDP_FROM_UPLINK] {
                let (time, runs) = dp.run_stats(p)?;
                total.0 += time;
                total.1 += runs;
            }
            // The socket programs too, when attached (loaded but detached, they do not run).
            for (_, p) in socket::socket_programs(sluice::dataplane::features::has_set_retval()) {
                if let Some((time, runs)) = dp.run_stats(p) {
                    total.0 += time;
                    total.1 += runs;
                }
            }
            Some(total)
        })
    }

    fn node_ns(&self) -> &Netns {
        &self.c.nodes[0].ns
    }

    /// Installs `mode` with `svcs`; the time to program them, if the mode programs anything.
    fn install(&mut self, mode: Mode, svcs: &[ServicePort]) -> Result<Option<Duration>, String> {
        let cfg = proxy_config(self.c.nodes[0].addr);
        match mode {
            Mode::Direct => Ok(None),
            Mode::Sluice | Mode::SluiceSocket | Mode::SluiceXdp => {
                let dp = NodeDataplane::start(
                    &self.c.nodes[0],
                    DataplaneConfig {
                        conntrack_max: 262_144,
                        snat: Some(self.c.nodes[0].addr),
                        ..Default::default()
                    },
                );
                if mode == Mode::SluiceSocket {
                    let cfg = SocketLbConfig {
                        mode: SocketLb::All,
                        cgroup: self.c.nodes[0]
                            .cgroup
                            .as_ref()
                            .ok_or("the node has no cgroup")?
                            .path()
                            .to_owned(),
                        host_netns_cookie: 0,
                        set_retval: sluice::dataplane::features::has_set_retval(),
                        links_dir: self.links.path().join("cgroup-links"),
                    };
                    dp.with(move |dp| {
                        // The node's own namespace (the dataplane's thread is in it).
                        let cfg = SocketLbConfig {
                            host_netns_cookie: socket::current_netns_cookie(),
                            ..cfg
                        };
                        dp.set_socket_lb(&cfg).map_err(|e| e.to_string())
                    })?;
                }
                if mode == Mode::SluiceXdp {
                    let uplink = self.c.nodes[0].uplink.clone();
                    // To remote endpoints XDP SNATs and sends back out of the uplink itself
                    // (`--xdp-tx on`), which the veth's fabric end must take.
                    let tx = self.layout == Layout::RemoteNodePort;
                    if tx {
                        self.peer_xdp =
                            Some(common::take_xdp_frames(&self.c.fabric, &["n0".to_owned()]));
                    }
                    dp.with(move |dp| {
                        dp.attach_xdp(&uplink, XdpMode::Native)
                            .map_err(|e| e.to_string())?;
                        if tx {
                            let index = nix::net::if_::if_nametoindex(uplink.as_str())
                                .map_err(|e| e.to_string())?;
                            dp.set_xdp_tx(index, Some(XdpMode::Native))
                                .map_err(|e| e.to_string())?;
                        }
                        Ok::<_, String>(())
                    })?;
                }
                let all = self.sluice_services(svcs);
                let took = dp.with(move |dp| {
                    let t0 = Instant::now();
                    for (fe, bes) in &all {
                        dp.upsert_service(*fe, bes).map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(t0.elapsed())
                })?;
                self.dp = Some(dp);
                Ok(Some(took))
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let restore = restore_command(mode);
                run_timed(self.node_ns(), &restore, kubeproxy::iptables::bootstrap())?;
                let rules = kubeproxy::iptables::full_restore(&cfg, svcs);
                run_timed(self.node_ns(), &restore, rules).map(Some)
            }
            Mode::Nftables => {
                let rules = kubeproxy::nftables::full(&cfg, svcs);
                run_timed(self.node_ns(), &NFT, rules).map(Some)
            }
        }
    }

    /// Removes what `mode` installed. Whether the node is bare again: the legacy iptables
    /// tables, once used, stay registered (and keep connection tracking on) until their
    /// namespace goes, so after them the sandbox is rebuilt.
    fn uninstall(&mut self, mode: Mode) -> Result<bool, String> {
        // The socket links are pinned (as the agent's are): off removes the pins, and with
        // them the attachments. Dropping the dataplane detaches every TC program.
        if let (Mode::SluiceSocket, Some(dp)) = (mode, &self.dp) {
            let links_dir = self.links.path().join("cgroup-links");
            dp.with(move |dp| {
                dp.set_socket_lb(&SocketLbConfig {
                    mode: SocketLb::Off,
                    cgroup: std::path::PathBuf::new(),
                    host_netns_cookie: 0,
                    set_retval: false,
                    links_dir,
                })
                .map_err(|e| e.to_string())
            })?;
        }
        self.dp = None;
        self.peer_xdp = None;
        match mode {
            Mode::Direct | Mode::Sluice | Mode::SluiceSocket | Mode::SluiceXdp => Ok(true),
            Mode::IptablesLegacy => Ok(false),
            Mode::IptablesNft | Mode::Nftables => {
                let ns = self.node_ns();
                ns.exec(&["nft", "flush", "ruleset"])
                    .map_err(|e| e.to_string())?;
                let left = ns
                    .exec(&["nft", "list", "ruleset"])
                    .map_err(|e| e.to_string())?;
                if left.trim().is_empty() {
                    Ok(true)
                } else {
                    Err(format!("rules left after flushing: {left}"))
                }
            }
        }
    }

    /// Makes the endpoint change `old` -> `new` the way `mode` would; the time it took.
    fn change(
        &self,
        mode: Mode,
        svcs: &[ServicePort],
        old: &ServicePort,
        new: &ServicePort,
    ) -> Result<Duration, String> {
        let cfg = proxy_config(self.c.nodes[0].addr);
        match mode {
            Mode::Sluice | Mode::SluiceSocket | Mode::SluiceXdp => {
                let frontends = self.sluice_services(std::slice::from_ref(new));
                let dp = self.dp.as_ref().ok_or("sluice is not installed")?;
                dp.with(move |dp| {
                    let t0 = Instant::now();
                    for (fe, bes) in &frontends {
                        dp.upsert_service(*fe, bes).map_err(|e| e.to_string())?;
                    }
                    Ok(t0.elapsed())
                })
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let now: Vec<ServicePort> = svcs
                    .iter()
                    .map(|s| if s == old { new.clone() } else { s.clone() })
                    .collect();
                let text = kubeproxy::iptables::partial_restore(&cfg, &now, old, new);
                run_timed(self.node_ns(), &restore_command(mode), text)
            }
            Mode::Nftables => run_timed(
                self.node_ns(),
                &NFT,
                kubeproxy::nftables::change(&cfg, old, new),
            ),
            Mode::Direct => Err("the direct path makes no changes".into()),
        }
    }
}

struct Bench {
    params: Params,
    quick: bool,
    /// The modes `--modes` chose (all by default).
    modes: Vec<Mode>,
    report: Report,
    /// The NodePort section's samples.
    nodeport: Report,
    /// The local NodePort section's samples.
    nodeport_local: Report,
    /// The section being measured.
    layout: Layout,
    /// The longest program-all time seen per (section, mode, Service count).
    /// (Per section: the NodePort section's load is not the one-node section's.)
    longest_load: HashMap<(Layout, Mode, u32), Duration>,
}

/// A full load longer than this runs in one round only.
const ONE_ROUND_IF_LOAD_OVER: Duration = Duration::from_secs(120);

impl Bench {
    fn spec(&self, targets: Vec<SocketAddrV4>) -> LoadSpec {
        LoadSpec {
            targets,
            workers: self.params.workers,
            warmup: self.params.warmup,
            duration: self.params.duration,
            max_ops_per_worker: self.params.max_ops_per_worker,
        }
    }

    /// The report of the section being measured.
    fn current(&mut self) -> &mut Report {
        match self.layout {
            Layout::OneNode => &mut self.report,
            Layout::RemoteNodePort => &mut self.nodeport,
            Layout::LocalNodePort => &mut self.nodeport_local,
        }
    }

    fn record(&mut self, mode: Mode, services: u32, round: u32, metric: Metric, value: f64) {
        self.current().samples.push(Sample {
            mode,
            services,
            round,
            metric,
            value,
        });
    }

    /// Why cell (`mode`, `n`) does not run this round, if it does not.
    fn skip(&self, mode: Mode, n: u32) -> Option<String> {
        if mode == Mode::SluiceSocket && self.layout != Layout::OneNode {
            return Some(
                "socket LB translates the node's and its pods' own sockets; a client outside \
                 the cluster reaches the NodePort through the TC path (the sluice column)"
                    .into(),
            );
        }
        let slow = matches!(mode, Mode::IptablesNft | Mode::Nftables);
        if self.quick && slow && n >= 10_000 {
            return Some(
                "left out of `--quick`: loading this many Services through it takes over a \
                 minute here (the full mode runs it)"
                    .into(),
            );
        }
        let longest = *self.longest_load.get(&(self.layout, mode, n))?;
        (longest > ONE_ROUND_IF_LOAD_OVER).then(|| {
            format!(
                "one round only: loading all Services took {:.0} s, so {} rounds would take {:.0} minutes",
                longest.as_secs_f64(),
                self.params.rounds,
                longest.as_secs_f64() * f64::from(self.params.rounds) / 60.0
            )
        })
    }

    /// Notes a load run that lost requests, or (with `every_backend`: each request may pick
    /// another backend) missed a backend.
    fn check(&mut self, what: &str, every_backend: bool, mode: Mode, n: u32, r: &LoadResult) {
        let total = r.ops + r.errors;
        if r.errors * 100 > total {
            self.current().notes.push(format!(
                "{} at {n} Services, {what}: {} of {total} requests failed",
                mode.name(),
                r.errors
            ));
        }
        if every_backend && r.per_backend.len() < BACKENDS.len() {
            self.current().notes.push(format!(
                "{} at {n} Services: only {:?} answered new connections",
                mode.name(),
                r.per_backend
            ));
        }
    }

    /// Runs one cell in `sb` (a fresh one when `None`), then removes the mode; gives the
    /// sandbox back when it is bare again.
    fn cell(
        &mut self,
        sb: Option<Sandbox>,
        mode: Mode,
        n: u32,
        round: u32,
    ) -> (Result<(), String>, Option<Sandbox>) {
        let layout = self.layout;
        let mut sb = sb.unwrap_or_else(|| Sandbox::new(layout));
        let result = self.measure(&mut sb, mode, n, round);
        match (result, sb.uninstall(mode)) {
            (Ok(()), Ok(true)) => (Ok(()), Some(sb)),
            (Ok(()), Ok(false)) => (Ok(()), None),
            (Err(e), _) | (Ok(()), Err(e)) => (Err(e), None),
        }
    }

    fn measure(&mut self, sb: &mut Sandbox, mode: Mode, n: u32, round: u32) -> Result<(), String> {
        let svcs = services(n, &sb.backends, sb.layout);
        let programmed = sb.install(mode, &svcs)?;
        if let Some(d) = programmed {
            let longest = self.longest_load.entry((sb.layout, mode, n)).or_default();
            *longest = (*longest).max(d);
        }
        let vip = match sb.layout {
            Layout::OneNode => SocketAddrV4::new(plan::cluster_ip(TRAFFIC_IP_INDEX), SERVICE_PORT),
            Layout::RemoteNodePort | Layout::LocalNodePort => {
                SocketAddrV4::new(sb.c.nodes[0].addr, NODE_PORT)
            }
        };
        let targets = match mode {
            Mode::Direct => sb
                .backends
                .iter()
                .map(|a| SocketAddrV4::new(*a, TARGET_PORT))
                .collect(),
            _ => vec![vip],
        };
        let spec = self.spec(targets);
        let client = sb.client();
        let err = |e: std::io::Error| e.to_string();
        // Each mode has its own slice of client ports. A server keeps TIME_WAIT for the
        // connections it closed; a later SYN on the same four-tuple is accepted only if its
        // timestamp is newer, and the client's timestamp offset depends on the address it
        // dialled (the Service or the pod), so a tuple reused across modes would stall for a
        // SYN retransmit (1 s).
        let slice = 64_000 / Mode::ALL.len() as u32;
        let lo = 1_500 + slice * Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0) as u32;
        client
            .sysctl(
                "net.ipv4.ip_local_port_range",
                &format!("{lo} {}", lo + slice - 1),
            )
            .map_err(|e| e.to_string())?;
        let waited = wait_quiet(Duration::from_secs(5));
        if waited >= Duration::from_secs(5) {
            self.current().notes.push(format!(
                "{} at {n} Services, round {round}: the machine was still busy after 5 s; measured anyway",
                mode.name()
            ));
        }
        let exe = std::env::current_exe().map_err(err)?;
        let run = |kind| load::run_in_child(client, &exe, kind, &spec);
        let stats_before = sb.program_stats();
        let profile = Profile::start(&format!("{}-{}-new", mode.name(), sb.layout.name()))?;
        let new = run(load::Kind::TcpNew).map_err(err)?;
        drop(profile);
        if let (Some((t0, c0)), Some((t1, c1))) = (stats_before, sb.program_stats())
            && c1 > c0
        {
            let conns = (new.ops + new.warmup_ops).max(1) as f64;
            let ns = (t1 - t0).as_nanos() as f64;
            self.record(
                mode,
                n,
                round,
                Metric::ProgramNsPerRun,
                ns / (c1 - c0) as f64,
            );
            self.record(
                mode,
                n,
                round,
                Metric::ProgramRunsPerConn,
                (c1 - c0) as f64 / conns,
            );
            self.record(mode, n, round, Metric::ProgramUsPerConn, ns / 1e3 / conns);
        }
        let persistent = run(load::Kind::TcpPersistent).map_err(err)?;
        let udp = run(load::Kind::Udp).map_err(err)?;
        let pps = if sb.layout == Layout::OneNode {
            None
        } else {
            // The direct path's flows go round the backends (a Service's are spread by its
            // load balancer), so that every mode keeps as many echo servers busy: with one
            // server taking every flow, it never slept, while each of three woke up for
            // about every datagram, a cost a fair comparison gives every mode.
            let r = sb.packet_rate(mode, &spec.targets)?;
            self.record(mode, n, round, Metric::PacketRate, r.delivered_per_s);
            self.record(mode, n, round, Metric::CpuPerMpkt, r.cpu_ms_per_mpkt);
            if let Some(ns) = r.program_ns_per_pkt {
                self.record(mode, n, round, Metric::ProgramNsPerPkt, ns);
            }
            if r.delivered * 10 < r.sent * 9 {
                self.current().notes.push(format!(
                    "{} at {n} Services, round {round}, packet rate: {} of {} packets sent arrived",
                    mode.name(),
                    r.delivered,
                    r.sent
                ));
            }
            Some(r.delivered_per_s)
        };
        self.check("new connections", true, mode, n, &new);
        self.check("persistent connections", false, mode, n, &persistent);
        self.check("UDP", false, mode, n, &udp);
        let us = |r: &LoadResult, p| r.percentile_us(p).unwrap_or(f64::NAN);
        self.record(mode, n, round, Metric::NewConnRate, new.rate());
        self.record(mode, n, round, Metric::NewConnP50, us(&new, 50.0));
        self.record(mode, n, round, Metric::NewConnP99, us(&new, 99.0));
        self.record(mode, n, round, Metric::PersistentRate, persistent.rate());
        self.record(mode, n, round, Metric::PersistentP99, us(&persistent, 99.0));
        self.record(mode, n, round, Metric::UdpRate, udp.rate());
        let mut change = None;
        if let Some(p) = programmed {
            self.record(mode, n, round, Metric::ProgramAll, p.as_secs_f64() * 1e3);
            let [old, _] = traffic(&sb.backends, sb.layout);
            let took = sb.change(mode, &svcs, &old, &changed(&old))?;
            self.record(
                mode,
                n,
                round,
                Metric::EndpointChange,
                took.as_secs_f64() * 1e3,
            );
            change = Some(took);
        }
        let ms = |d: Option<Duration>| {
            d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "  {:>15} {n:>6} Services round {round}: new {:>6.0}/s p50 {:>5.0} µs p99 {:>6.0} µs | persistent {:>6.0}/s | udp {:>6.0}/s {:?} | packets {} | program {} | change {} | errors {}",
            mode.name(),
            new.rate(),
            us(&new, 50.0),
            us(&new, 99.0),
            persistent.rate(),
            udp.rate(),
            udp.per_backend.values().collect::<Vec<_>>(),
            pps.map_or("-".into(), |p| format!("{p:.0}/s")),
            ms(programmed),
            ms(change),
            new.errors + persistent.errors + udp.errors,
        );
        Ok(())
    }
}

/// A whole-machine `perf record -a -g` over the new-connection load and over the packet
/// rate's measured window, when `SLUICE_BENCH_PERF` names a folder:
/// `<folder>/<mode>-<section>-new.data` and `<folder>/<mode>-<section>.data`, for `perf report`
/// to say where the CPU time per packet goes, inside sluice's programs and outside them. It
/// stops (SIGINT, so perf writes its file) when dropped.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(name: &str) -> Result<Self, String> {
        let Some(dir) = std::env::var_os("SLUICE_BENCH_PERF") else {
            return Ok(Self(None));
        };
        let out = std::path::Path::new(&dir).join(format!("{name}.data"));
        let out = out.to_string_lossy();
        let child =
            testbed::cmd::command(&["perf", "record", "-a", "-g", "-F", "2999", "-q", "-o", &out])
                .map_err(|e| format!("SLUICE_BENCH_PERF: {e}"))?
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("SLUICE_BENCH_PERF: cannot start perf: {e}"))?;
        // perf needs a moment to open its events on every CPU before the window starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(Some(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// Source port of the packet rate's first flow (the client's port range is elsewhere).
const PKT_SPORT: u16 = 61_000;
/// Flows of the packet rate: several, so that a Service spreads them over its backends.
const PKT_FLOWS: u16 = 16;
const PKT_WARMUP: Duration = Duration::from_millis(300);
const PKT_WINDOW: Duration = Duration::from_secs(2);
/// At most this many packets per blast, whatever the rate.
const PKT_MAX: u64 = 20_000_000;

/// A packet-rate measurement.
struct PacketRate {
    sent: u64,
    delivered: u64,
    delivered_per_s: f64,
    /// CPU time of the whole machine (sender included) per million packets delivered, in ms.
    cpu_ms_per_mpkt: f64,
    /// Time sluice's programs ran per packet delivered (its echo's runs included), in ns.
    program_ns_per_pkt: Option<f64>,
}

/// The all-CPU line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal, guest,
/// guest_nice, in clock ticks.
fn cpu_ticks() -> Vec<u64> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// Busy CPU time of all CPUs so far (everything but idle, iowait and steal), in seconds.
fn cpu_seconds() -> f64 {
    let busy: u64 = cpu_ticks()
        .iter()
        .enumerate()
        // user, nice, system, irq, softirq (not idle, iowait, or steal: time the hypervisor
        // took; guest time is inside user's already).
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 7)
        .map(|(_, x)| x)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    busy as f64 / hz as f64
}

/// Busy share of all CPUs over the next `window`, from /proc/stat.
fn busy_share(window: Duration) -> f64 {
    let sample = || -> (u64, u64) {
        let v = cpu_ticks();
        let total: u64 = v.iter().sum();
        // idle and iowait
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (total, idle)
    };
    let (t0, i0) = sample();
    std::thread::sleep(window);
    let (t1, i1) = sample();
    let dt = t1.saturating_sub(t0).max(1);
    1.0 - i1.saturating_sub(i0) as f64 / dt as f64
}

/// Waits until the machine is quiet (under 15% busy over 100 ms), at most `max`: a deleted
/// sandbox is torn down by the kernel in the background, and that work must not land in a
/// measurement. How long it waited.
fn wait_quiet(max: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < max && busy_share(Duration::from_millis(100)) > 0.15 {}
    t0.elapsed()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} CPUs, {mem_gib:.0} GiB, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

fn tool_version(argv: &[&str]) -> String {
    testbed::cmd::output(argv, Duration::from_secs(10))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("{} not found: {e}", argv[0]))
}

/// Another bench's report, its title demoted one level, or a line saying it did not run.
fn section(dir: &Path, file: &str, title: &str) -> String {
    match std::fs::read_to_string(dir.join(file)) {
        Ok(md) => md
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) => format!("## {rest}"),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(_) => {
            format!("## {title}\n\nNot run in this invocation (`./x bench` runs it first).\n")
        }
    }
}

/// A NodePort section's tables, then its notes.
fn section_tables(report: &Report) -> String {
    let mut md = testbed::report::render_tables(report);
    if !report.notes.is_empty() {
        md.push_str("### Notes from this section\n\n");
        for n in &report.notes {
            md.push_str(&format!("- {n}\n"));
        }
        md.push('\n');
    }
    md
}

/// Runs every cell of the current section: each Service count, every round, every mode in an
/// order rotated each round.
fn run_section(bench: &mut Bench, sizes: &[u32]) {
    let mut sandbox: Option<Sandbox> = None;
    for &n in sizes {
        for round in 0..bench.params.rounds {
            // Rotate the order every round, so no mode always runs first or last.
            let mut order = bench.modes.clone();
            let len = order.len();
            order.rotate_left(round as usize % len);
            for mode in order {
                if bench.current().unavailable.iter().any(|(m, _)| *m == mode) {
                    continue;
                }
                // XDP is on uplinks: the one-node section's traffic never crosses one, so it
                // has no sluice-xdp column (the report says so).
                if mode == Mode::SluiceXdp && bench.layout == Layout::OneNode {
                    continue;
                }
                if let Some(why) = bench.skip(mode, n) {
                    if !bench
                        .current()
                        .skipped
                        .iter()
                        .any(|(m, k, _)| *m == mode && *k == n)
                    {
                        println!("  {:>15} {n:>6} Services: {why}", mode.name());
                        bench.current().skipped.push((mode, n, why));
                    }
                    continue;
                }
                let (result, bare) = bench.cell(sandbox.take(), mode, n, round);
                sandbox = bare;
                if let Err(why) = result {
                    eprintln!("{} cannot run: {why}", mode.name());
                    bench.current().unavailable.push((mode, why));
                }
            }
        }
    }
}

/// The comma-separated values after `flag`, if it was given.
fn list_arg(flag: &str) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    let list = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))?;
    Some(list.split(',').map(str::to_owned).collect())
}

/// A positive number given to `flag`; exits on anything else.
fn number_arg(flag: &str, v: &str) -> u32 {
    match v.parse::<u32>() {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("{flag}: {v:?} is not a positive number");
            std::process::exit(2)
        }
    }
}

/// The modes of `--modes a,b` (every mode without it); exits on a name that is no mode.
fn modes_arg() -> Vec<Mode> {
    let Some(list) = list_arg("--modes") else {
        return Mode::ALL.to_vec();
    };
    list.iter()
        .map(|name| {
            Mode::ALL
                .into_iter()
                .find(|m| m.name() == *name)
                .unwrap_or_else(|| {
                    let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                    eprintln!("--modes: no mode {name:?} (modes: {})", names.join(", "));
                    std::process::exit(2)
                })
        })
        .collect()
}

fn main() {
    // The load process of every cell: this binary again, in the client's namespace.
    load::child_main();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the comparison bench builds network namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let started = Instant::now();
    // The kernel keeps per-program run time and run counts while this descriptor is open
    // (BPF_ENABLE_STATS: scoped to this process, no sysctl changed). Timing every run costs
    // the programs two clock reads each, which the direct path does not pay: `--no-stats`
    // leaves it off, for close comparisons (the program-time table is then empty).
    let _stats = if std::env::args().any(|a| a == "--no-stats") {
        None
    } else {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| {
                eprintln!("no BPF run-time statistics ({e}): the program-time table stays empty")
            })
            .ok()
    };
    let mut params = Params::new(quick);
    if let Some(r) = list_arg("--rounds") {
        params.rounds = number_arg("--rounds", &r[0]);
    }
    // The NodePort section runs the smallest and the largest count, or those of `--sizes`.
    let mut nodeport_sizes = vec![1, 10_000];
    if let Some(sizes) = list_arg("--sizes") {
        params.sizes = sizes.iter().map(|s| number_arg("--sizes", s)).collect();
        nodeport_sizes = params.sizes.clone();
    }
    let mut bench = Bench {
        params,
        quick,
        modes: modes_arg(),
        report: Report::default(),
        nodeport: Report::default(),
        nodeport_local: Report::default(),
        layout: Layout::OneNode,
        longest_load: HashMap::new(),
    };
    let all_sections = [
        (Layout::OneNode, bench.params.sizes.clone()),
        (Layout::RemoteNodePort, nodeport_sizes.clone()),
        (Layout::LocalNodePort, nodeport_sizes),
    ];
    let chosen = list_arg("--sections");
    for (layout, sizes) in all_sections {
        if chosen
            .as_ref()
            .is_some_and(|c| !c.iter().any(|n| n == layout.name()))
        {
            continue;
        }
        println!("section: {layout:?}");
        bench.layout = layout;
        run_section(&mut bench, &sizes);
    }
    let took = started.elapsed();

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&bench.report).unwrap(),
    )
    .unwrap();
    std::fs::write(
        out.join("compare-nodeport.json"),
        serde_json::to_string_pretty(&bench.nodeport).unwrap(),
    )
    .unwrap();
    std::fs::write(
        out.join("compare-nodeport-local.json"),
        serde_json::to_string_pretty(&bench.nodeport_local).unwrap(),
    )
    .unwrap();
    let subtitle = format!(
        "{}; median of {} rounds, bars min–max",
        machine(),
        bench.params.rounds
    );
    std::fs::write(
        out.join("latency.svg"),
        testbed::report::chart_svg(&bench.report, Metric::NewConnP50, &subtitle),
    )
    .unwrap();
    let p = &bench.params;
    let mut md = format!(
        "# sluice side by side: direct path, sluice, kube-proxy iptables (legacy and nft backends), kube-proxy nftables\n\n\
         **Machine:** {machine}. **Mode:** {mode} ({rounds} rounds, {dur} ms per measure after {warm} ms warm-up, {workers} closed-loop clients; the comparison took {took:.0} s).\n\
         **Tools:** {iptl}; {iptn}; {nft}.\n\n\
         ![new-connection latency against the number of Services](latency.svg)\n\n\
         ## How it is measured\n\n\
         One node namespace routes between a client pod and three backend pods; every backend runs the same Rust TCP and UDP servers (64-byte request, 64-byte reply naming the pod). \
         For each Service count the modes run in turn, {rounds} rounds, the order rotated every round. Each mode is removed after its cell (programs detached; `nft flush ruleset`, checked empty), so the next starts on a bare node; the legacy iptables tables cannot be removed from a namespace (they keep connection tracking on), so after iptables-legacy the whole sandbox is built anew. \
         One Service (a TCP and a UDP port, three endpoints: the backend pods) carries the traffic and sits in the middle of the filler Services (three endpoints each, addresses no pod holds).\n\n\
         - **direct**: the client connects to the pod addresses in turn; nothing is installed (the floor).\n\
         - **sluice**: sluice's TC programs on every device of the node, Services in its BPF maps. Program-all is the map writes of every Service; the endpoint change is one Service's map write.\n\
         - **sluice-xdp** (the NodePort sections only: XDP is on uplinks): sluice with its XDP program on node0's uplink in native mode as well.\n\
         - **iptables-legacy** and **iptables-nft**: kube-proxy's iptables-mode rule set (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-* with statistic probabilities, masquerade marks), piped to `iptables-legacy-restore` / `iptables-nft-restore --noflush --counters` as kube-proxy does (its image picks the backend the host uses); the change is kube-proxy's partial sync (KUBE-SERVICES rewritten whole, the changed chains, stale chains deleted). The `iptables-save` kube-proxy runs before each sync is not counted.\n\
         - **nftables**: kube-proxy's nftables-mode rule set (table `ip kube-proxy`, the service-ips verdict map, per-service and per-endpoint chains) piped to `nft -f -`; the change is the transaction kube-proxy issues for it.\n\n\
         Control-plane times are wall times of the map writes (in process) and of the iptables-restore / nft processes (exec included, as kube-proxy pays it; rule generation excluded on every side). \
         Before each cell's traffic the bench waits for the machine to be quiet (under 15% busy over 100 ms, at most 5 s), so the kernel's background teardown of an earlier sandbox does not land in a measurement. sluice's own program time comes from the kernel's run-time statistics (BPF_ENABLE_STATS, held for the run). New connection: connect, 64-byte request, reply, server closes; the latency runs from connect to close. Persistent: 64-byte request/response on {workers} long-lived connections. UDP: the same on {workers} connected sockets; a balancer may put both workers' flows on one backend (a third of the runs, at random), which then serves both, and UDP falls to about a third; and any mode, direct included, now and then runs its UDP at about a tenth with its flows on two backends (a scheduling state of a 2-CPU machine, not a path's cost). The log's line for each cell shows the requests each backend answered, so both can be told apart.\n\
         The iptables and nftables modes turn on netfilter connection tracking in the node; direct and sluice do not need it (sluice keeps its own conntrack in a BPF map), and on this bare node nothing else turns it on. On a real node a CNI or host firewall often does.\n\n\
         ## Side by side\n\n",
        machine = machine(),
        mode = match (quick, bench.modes.len() == Mode::ALL.len()) {
            (true, true) => "quick".to_owned(),
            (false, true) => "full".to_owned(),
            (q, false) => format!(
                "{}, only {}",
                if q { "quick" } else { "full" },
                bench
                    .modes
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        rounds = p.rounds,
        dur = p.duration.as_millis(),
        warm = p.warmup.as_millis(),
        workers = p.workers,
        took = took.as_secs_f64(),
        iptl = tool_version(&["iptables-legacy-restore", "--version"]),
        iptn = tool_version(&["iptables-nft-restore", "--version"]),
        nft = tool_version(&["nft", "--version"]),
    );
    md.push_str(&testbed::report::render_tables(&bench.report));
    if !bench.report.notes.is_empty() {
        md.push_str("## Notes from this run\n\n");
        for n in &bench.report.notes {
            md.push_str(&format!("- {n}\n"));
        }
        md.push('\n');
    }
    md.push_str(
        "## NodePort from outside to endpoints on another node\n\n\
         The path that needs SNAT: a client outside the cluster calls node0's NodePort (TCP and UDP), whose three endpoints are pods on node1. \
         **sluice** DNATs and SNATs to node0 with a reserved source port and forwards by FIB lookup and redirect, and translates the replies back the same way (`Backend.local` false); \
         **iptables** and **nftables** are kube-proxy's NodePort rules for externalTrafficPolicy Cluster (KUBE-NODEPORTS / `service-nodeports` to the external chain, marked for masquerade, then DNAT; MASQUERADE in POSTROUTING; netfilter conntrack un-NATs the replies); \
         **direct** is the client reaching the pods through node1, no load balancer. The other Services are ClusterIP fillers, as above; kube-proxy's iptables mode walks all of them before its NodePort rule, the last in KUBE-SERVICES. \
         The backends keep no TIME_WAIT sockets (`tcp_max_tw_buckets` 0): every cell starts with fresh NAT state, and a SNAT port reused from an earlier cell would otherwise meet that cell's connection in TIME_WAIT and stall 1 s, whichever mode it came from. \
         **sluice-xdp** here also SNATs the established flows' packets at XDP and sends them back out of node0's uplink with XDP_TX, and reverse-translates the endpoints' replies the same way (`--xdp-tx on`); a veth's XDP_TX needs its peer to take XDP frames, so in this cell the fabric's end of node0's uplink has `sluice_xdp_pass` (an XDP program that passes everything; it also moves that veth to its NAPI receive path, a cost this cell alone pays).\n\n\
         **The packet rate** (both NodePort sections): after the request loads, the outside client writes UDP frames to the NodePort (16 flows, 64-byte payloads, real checksums) through an `AF_PACKET` socket as fast as it goes, for 2 s after a 0.3 s warm-up in which the flows are established (each backend echoes every datagram; the echoes are part of the load). **direct** sends the same flows round the three backends themselves, so that every mode keeps as many echo servers busy (one server taking every flow never sleeps, while three are woken up for about every datagram, which costs the machine a third more CPU per packet). Delivered packets are counted at the backends' devices; the CPU time is the whole machine's from /proc/stat over the window; with run-time statistics on, sluice's programs' own time per delivered packet (the runs for its echo included) says how much of that is theirs. On veths a frame sent is received on the sending CPU in the softirq that follows the send, so the rate is the whole chain's on one CPU, the sender's own cost included: the same for every mode, so the modes compare, but it caps what any of them can show. This kernel has no pktgen module; AF_XDP would send faster but meets the same cap.\n\n",
    );
    md.push_str(&section_tables(&bench.nodeport));
    md.push_str(
        "## NodePort from outside to endpoints on the same node, with and without XDP\n\n\
         A client outside the cluster calls node0's NodePort (TCP and UDP), whose three endpoints are pods on node0: the client's address is kept (no SNAT). \
         **sluice-xdp** is **sluice** with its XDP program on node0's uplink in native mode: a packet of an established flow is DNATed there, before the kernel builds an skb for it (the handshake, the FIN and new UDP flows go on to TC). \
         On a veth the sender has already built the skb that native XDP runs on (veth converts it), so the saving real NICs show (no skb for what XDP translates) is capped here; this section measures what it is under that cap. \
         **iptables** and **nftables** are kube-proxy's NodePort rules (externalTrafficPolicy Cluster: masqueraded, as kube-proxy does even to a local endpoint); **direct** is the client reaching the pods through node0.\n\n",
    );
    md.push_str(&section_tables(&bench.nodeport_local));
    md.push_str(&section(&out, "datapath.md", "Per packet"));
    md.push_str("\n\n");
    md.push_str(&section(&out, "agent.md", "Agent control plane and memory"));
    md.push_str("\n\n");
    md.push_str(&section(
        &out,
        "realcluster.md",
        "The agent on the real control plane",
    ));
    md.push('\n');
    std::fs::write(out.join("report.md"), &md).unwrap();
    println!("{md}");
    println!("report: target/bench/report.md, chart: target/bench/latency.svg");
}
