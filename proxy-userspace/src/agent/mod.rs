//! The node agent (`sluice agent`): watches Services, EndpointSlices and its own Node (or reads
//! them from a manifests directory) and keeps the datapath's maps equal to what kube-proxy
//! would program, changing only what changed.
//!
//! - [`source`]: where objects come from (kube-rs watchers, or YAML files) and the changes
//!   sent to the sync loop;
//! - [`sync`]: the sync loop, which owns the dataplane and writes the maps;
//! - [`devices`]: which devices the programs sit on, followed as they come and go;
//! - [`server`] and [`metrics`]: `/healthz`, `/livez` and `/metrics`.
//!
//! Threads: a tokio runtime runs the sources and the HTTP endpoints; the sync loop runs on
//! its own thread (map writes are short blocking syscalls); a netlink thread wakes it when
//! devices change.
pub mod devices;
pub mod metrics;
pub mod server;
pub mod sockets;
pub mod source;
pub mod sync;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use clap::ValueEnum;

use crate::{
    dataplane::{
        AttachMode, Dataplane, DataplaneConfig, XdpMode, features,
        socket::{SocketLb, SocketLbConfig},
    },
    model::Limits,
};
use proxy_common::{
    CT4_DEFAULT_MAX, CT4_NEW_DEFAULT_MAX, LB4_BACKENDS_DEFAULT_MAX, LB4_REVNAT_DEFAULT_MAX,
    LB4_SERVICES_DEFAULT_MAX, SOCK_REVNAT_DEFAULT_MAX,
};
use source::{Change, ObjectView};
use sync::{NodePortAddresses, SyncConfig, Syncer};

/// How to attach to devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// TCX where the kernel has it (probed; Linux >= 6.6), clsact elsewhere.
    Auto,
    Tcx,
    Clsact,
}

impl From<Mode> for AttachMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => AttachMode::best_available(),
            Mode::Tcx => AttachMode::Tcx,
            Mode::Clsact => AttachMode::Clsact,
        }
    }
}

/// Whether, and how, the XDP program goes on uplinks (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpSetting {
    /// Native where the driver has it, else none (TC alone). Never generic on its own: see
    /// [`XdpSetting::modes`].
    Auto,
    /// Native only: an uplink whose driver lacks it is left to TC, with a warning.
    Native,
    /// Generic only (any device; little gain over TC).
    Generic,
    /// No XDP: TC alone (an earlier agent's XDP program is detached).
    Off,
}

impl XdpSetting {
    /// The modes to try, in order. `auto` does not fall back to generic (a departure from
    /// "native, then generic"): generic XDP runs on an skb the NIC may have marked
    /// CHECKSUM_COMPLETE, whose `skb->csum` no XDP program can update, so every translated
    /// packet would fail the stack's checksum check, be checked again in software and log
    /// "hw csum failure"; and on the skb it saves next to nothing over TC. Asked for by name,
    /// it is used (veths and drivers that report no CHECKSUM_COMPLETE are fine).
    pub fn modes(self) -> &'static [XdpMode] {
        match self {
            Self::Auto => &[XdpMode::Native],
            Self::Native => &[XdpMode::Native],
            Self::Generic => &[XdpMode::Generic],
            Self::Off => &[],
        }
    }
}

/// Whether the XDP program on an uplink may send the packets of flows to backends on other
/// nodes out itself (`--xdp-tx`): a client's packet SNATed to the node, and the backend's reply
/// back to the client; with `--lb-mode dsr`, a client's packet DNATed only. Otherwise TC
/// forwards them, as it does with XDP off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpTx {
    /// In generic mode, and in native mode on any driver but veth: a veth in native mode drops
    /// what XDP sends it unless its peer takes XDP frames (an XDP program on the peer, or GRO
    /// on it from Linux 5.13), which the agent cannot see from the node.
    Auto,
    /// On every uplink with XDP: the operator says a veth uplink's peer takes XDP frames.
    On,
    /// Never: XDP only DNATs to local backends.
    Off,
}

impl XdpTx {
    /// Whether an uplink with XDP in `mode`, whose driver is `driver` (`None`: unknown), may
    /// send from XDP.
    pub fn allows(self, mode: XdpMode, driver: Option<&str>) -> bool {
        match self {
            Self::Off => false,
            Self::On => true,
            Self::Auto => mode == XdpMode::Generic || driver.is_some_and(|d| d != "veth"),
        }
    }
}

/// How new flows choose their backend (`--lb-algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    /// Uniformly at random (kube-proxy's choice).
    Random,
    /// Maglev consistent hashing, for externalIPs and LoadBalancer IPs: every node picks the
    /// same backend for a flow.
    Maglev,
}

/// How traffic from outside reaches a backend on another node (`--lb-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LbMode {
    /// SNAT to the ingress node, whose address the backend sees; replies come back through it
    /// (kube-proxy's masquerade).
    Snat,
    /// Direct server return for TCP: the backend sees the client's address and replies to it
    /// directly from its own node. UDP is SNATed.
    Dsr,
}

/// `sluice agent`'s flags. Every one can also be set through the environment variable shown,
/// which is how the DaemonSet sets them.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    /// This node's name: its Node object gives the NodePort addresses and the default uplinks.
    /// Default: $NODE_NAME (the DaemonSet sets it from spec.nodeName), else the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// A kubeconfig file for the API server. Default: the in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "SLUICE_KUBECONFIG", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// ADDRESS:PORT of the API server, for a node's first start after boot, when the
    /// configured server (the in-cluster `kubernetes` Service's ClusterIP) cannot be reached
    /// yet: the maps are empty, so socket LB translates nothing. That Service's address is then
    /// programmed to this endpoint until the first full sync writes its real endpoints. Not
    /// used when the maps already hold it (a restart without a reboot), and never needed with
    /// a kubeconfig that names the API server's own address.
    #[arg(long, env = "SLUICE_BOOTSTRAP_API_SERVER")]
    pub bootstrap_api_server: Option<std::net::SocketAddrV4>,

    /// Seconds after which the API server ends each watch (its `timeoutSeconds`); the agent
    /// then resumes it from the last version it saw, without a relist. Lower it where a load
    /// balancer or proxy in front of the API server cuts long-lived connections sooner.
    #[arg(long, env = "SLUICE_WATCH_TIMEOUT", default_value_t = 290,
          value_parser = clap::value_parser!(u32).range(1..=290))]
    pub watch_timeout: u32,

    /// No API server: read Services, EndpointSlices and Nodes from the YAML files in this
    /// directory (what `kubectl apply -f DIR` takes), re-read when they change. A file that does
    /// not parse is reported with file and line, and the last good state stays in force.
    #[arg(long, env = "SLUICE_MANIFESTS")]
    pub manifests: Option<PathBuf>,

    /// Pod-facing devices (the host side of pod veths), as comma-separated globs. Devices that
    /// appear later are attached as they come.
    #[arg(
        long,
        env = "SLUICE_POD_INTERFACES",
        value_delimiter = ',',
        default_value = "veth*,cali*,lxc*"
    )]
    pub pod_interfaces: Vec<String>,

    /// Uplinks (NICs carrying NodePort, externalIPs and LoadBalancer traffic from outside),
    /// comma-separated. Default: the devices holding the node's addresses.
    #[arg(long, env = "SLUICE_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,

    /// Where NodePorts are served: `primary` (the Node's InternalIP and ExternalIP addresses,
    /// kube-proxy's default in nftables mode), or comma-separated CIDRs (every local address
    /// inside them).
    #[arg(
        long,
        env = "SLUICE_NODEPORT_ADDRESSES",
        value_delimiter = ',',
        default_value = "primary"
    )]
    pub nodeport_addresses: Vec<String>,

    /// Where maps and links are pinned (on a bpffs; /sys/fs/bpf is mounted if it is not).
    /// Pinned state outlives the agent: a restarted agent adopts it and traffic keeps flowing.
    #[arg(long, env = "SLUICE_PIN_PATH", default_value = "/sys/fs/bpf/sluice")]
    pub pin_path: PathBuf,

    /// Prometheus metrics (`GET /metrics`). Port 0 picks a free port.
    #[arg(
        long,
        env = "SLUICE_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    pub metrics_bind_address: SocketAddr,

    /// Health checks (`GET /healthz`: synced and keeping up; `GET /livez`: alive).
    #[arg(
        long,
        env = "SLUICE_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: SocketAddr,

    /// How programs are attached: tcx (Linux >= 6.6), clsact (any), or auto.
    #[arg(long, env = "SLUICE_ATTACH_MODE", value_enum, default_value_t = Mode::Auto)]
    pub attach_mode: Mode,

    /// XDP on uplinks, in front of TC: the packets of established flows from outside are
    /// DNATed before the kernel builds an skb (everything else goes on to TC). auto tries
    /// native and otherwise leaves the uplink to TC; generic only when asked for by name.
    #[arg(long, env = "SLUICE_XDP_MODE", value_enum, default_value_t = XdpSetting::Off)]
    pub xdp_mode: XdpSetting,

    /// With XDP on an uplink: whether XDP also forwards flows to backends on other nodes
    /// (SNATed to the node, and their replies; with --lb-mode dsr, DNATed only), sending them
    /// out itself (XDP_TX or XDP_REDIRECT to
    /// another uplink) instead of leaving them to TC. auto: in generic mode, and in native mode
    /// on drivers other than veth (a veth drops what XDP sends it unless its peer has an XDP
    /// program or GRO on); on: every uplink with XDP; off: never.
    #[arg(long, env = "SLUICE_XDP_TX", value_enum, default_value_t = XdpTx::Auto)]
    pub xdp_tx: XdpTx,

    /// How new flows to externalIPs and LoadBalancer IPs choose their backend: random, or
    /// maglev (the same backend for a flow on every node, for an ECMP router in front of
    /// them; at most 4,096 such frontends). A Service's `sluice.io/lb-algorithm` annotation
    /// overrides it. ClusterIPs and NodePorts always choose at random.
    #[arg(long, env = "SLUICE_LB_ALGORITHM", value_enum, default_value_t = LbAlgorithm::Random)]
    pub lb_algorithm: LbAlgorithm,

    /// How TCP from outside to a NodePort, externalIP or LoadBalancer IP reaches a backend on
    /// another node (externalTrafficPolicy Cluster): snat (to this node, as kube-proxy does),
    /// or dsr (direct server return: the backend sees the client's address and its node sends
    /// the replies straight to the client, showing the frontend; that node must be able to
    /// send with the frontend's address as source, and must run a sluice that notes the
    /// option, as every node of this release does in either mode). UDP is SNATed in both.
    #[arg(long, env = "SLUICE_LB_MODE", value_enum, default_value_t = LbMode::Snat)]
    pub lb_mode: LbMode,

    /// The seed of Maglev's tables and flow hashes: the same on every node of the cluster.
    #[arg(long, env = "SLUICE_MAGLEV_SEED", default_value_t = crate::dataplane::DEFAULT_MAGLEV_SEED)]
    pub maglev_seed: u32,

    /// Source address for hairpin flows (a pod reaching itself through a Service): routed to
    /// the node by pods, held by no device. Cilium uses the same default.
    #[arg(
        long,
        env = "SLUICE_HAIRPIN_SNAT_ADDRESS",
        default_value = "169.254.42.1"
    )]
    pub hairpin_snat_address: Ipv4Addr,

    /// The NodePort range of the cluster (the API server's --service-node-port-range), kept out
    /// of the SNAT source ports.
    #[arg(long, env = "SLUICE_NODEPORT_RANGE", default_value = "30000-32767", value_parser = parse_port_range)]
    pub nodeport_range: (u16, u16),

    /// Source ports for SNAT of traffic from outside to endpoints on other nodes
    /// (externalTrafficPolicy Cluster), as MIN-MAX, or `auto`: the largest range above 1023
    /// that overlaps neither the NodePort range nor the node's ephemeral ports
    /// (net.ipv4.ip_local_port_range), so a SNATed flow never takes the tuple of a connection
    /// the node makes itself. A range that overlaps either is refused. The same ports serve
    /// a client whose source port must be remapped: two of its flows, to two frontends of
    /// one backend, would otherwise reach the backend on one tuple.
    #[arg(long, env = "SLUICE_SNAT_PORT_RANGE", default_value = "auto")]
    pub snat_port_range: String,

    /// Size of the services map (frontends plus one slot per backend of each).
    #[arg(long, env = "SLUICE_SERVICES_MAX", default_value_t = LB4_SERVICES_DEFAULT_MAX)]
    pub services_max: u32,

    /// Size of the backends map (distinct backend address, port and protocol).
    #[arg(long, env = "SLUICE_BACKENDS_MAX", default_value_t = LB4_BACKENDS_DEFAULT_MAX)]
    pub backends_max: u32,

    /// Size of the reverse-NAT map (one per frontend).
    #[arg(long, env = "SLUICE_REVNAT_MAX", default_value_t = LB4_REVNAT_DEFAULT_MAX)]
    pub revnat_max: u32,

    /// Size of the conntrack table of established flows (two entries per flow; least
    /// recently used evicted). A new size (this or any other map's) takes effect at the next
    /// start, which copies what the pinned maps hold into maps of the new size.
    #[arg(long, env = "SLUICE_CONNTRACK_MAX", default_value_t = CT4_DEFAULT_MAX)]
    pub conntrack_max: u32,

    /// Size of the conntrack table of flows not yet established (half-open TCP, unanswered
    /// UDP): a flood of new flows evicts only these, never an established flow.
    #[arg(long, env = "SLUICE_CONNTRACK_NEW_MAX", default_value_t = CT4_NEW_DEFAULT_MAX)]
    pub conntrack_new_max: u32,

    /// Socket-level load balancing: translate Service addresses when a socket connects or
    /// sends (cgroup programs), so its packets go straight to the backend. `all`: every
    /// process under --cgroup-root, the node's own (hostNetwork pods, the kubelet) and its
    /// pods'; `host-only`: the node's own only, leaving pods to the TC path (for service meshes
    /// that must see the Service address); `off`: none (the node's own processes then cannot
    /// reach Services).
    #[arg(long, env = "SLUICE_SOCKET_LB", value_enum, default_value_t = SocketLb::All)]
    pub socket_lb: SocketLb,

    /// The cgroup v2 directory socket LB attaches to: every process under it is translated.
    /// Default: the host's cgroup v2 mount (from /proc/self/mountinfo; /sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on hybrid hierarchies). In a container with its own cgroup
    /// namespace, mount the host's cgroup2 hierarchy and name it here (deploy/ does).
    #[arg(long, env = "SLUICE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// For tests: use the socket programs of kernels before 5.18 (no `bpf_set_retval`).
    #[arg(long, hide = true)]
    pub socket_lb_as_before_5_18: bool,

    /// Size of the socket reverse-NAT map (one entry per translated socket and backend;
    /// least recently used evicted).
    #[arg(long, env = "SLUICE_SOCK_REVNAT_MAX", default_value_t = SOCK_REVNAT_DEFAULT_MAX)]
    pub sock_revnat_max: u32,

    /// The cluster's Service CIDRs (the API server's --service-cluster-ip-range), as
    /// comma-separated IPv4 prefixes, besides the ServiceCIDR objects the agent watches
    /// (Kubernetes 1.33+). New traffic from pods and the node to an address inside them that no
    /// Service holds is dropped, as kube-proxy's nftables mode drops traffic to unallocated
    /// ClusterIPs, instead of leaving by the default route. Default: none (only the watched
    /// objects; with --manifests, nothing is dropped).
    #[arg(long, env = "SLUICE_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidr: Vec<crate::service::Cidr4>,

    /// A Service port with more endpoints than this is invalid and skipped.
    #[arg(long, env = "SLUICE_MAX_BACKENDS_PER_SERVICE", default_value_t = Limits::default().max_backends_per_frontend)]
    pub max_backends_per_service: usize,
}

/// `MIN-MAX`, inclusive, MIN <= MAX.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range (want MIN-MAX)"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("{v:?} is not a port 1-65535"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("{s:?}: MIN is above MAX"));
    }
    Ok((a, b))
}

/// The SNAT source ports: `wanted` (MIN-MAX, or `auto`) checked or chosen against the
/// NodePort range and the node's ephemeral ports.
pub fn snat_ports(
    wanted: &str,
    nodeport: (u16, u16),
    ephemeral: (u16, u16),
) -> Result<(u16, u16), String> {
    let overlaps = |(a, b): (u16, u16), (c, d): (u16, u16)| a <= d && c <= b;
    if wanted != "auto" {
        let r = parse_port_range(wanted)?;
        if overlaps(r, nodeport) {
            return Err(format!(
                "{}-{} overlaps the NodePort range {}-{}",
                r.0, r.1, nodeport.0, nodeport.1
            ));
        }
        if overlaps(r, ephemeral) {
            return Err(format!(
                "{}-{} overlaps the node's ephemeral ports {}-{} (net.ipv4.ip_local_port_range): \
                 SNATed flows would take the tuples of the node's own connections",
                r.0, r.1, ephemeral.0, ephemeral.1
            ));
        }
        return Ok(r);
    }
    // The gaps of 1024..=65535 around the two reserved ranges; the widest wins.
    let mut taken = [nodeport, ephemeral];
    taken.sort();
    let mut best: Option<(u16, u16)> = None;
    let mut from: u32 = 1024;
    for (a, b) in taken.iter().map(|&(a, b)| (u32::from(a), u32::from(b))) {
        if a > from {
            let gap = (from as u16, (a - 1) as u16);
            if best.is_none_or(|(x, y)| gap.1 - gap.0 > y - x) {
                best = Some(gap);
            }
        }
        from = from.max(b + 1);
    }
    if from <= 65535 {
        let gap = (from as u16, 65535);
        if best.is_none_or(|(x, y)| gap.1 - gap.0 > y - x) {
            best = Some(gap);
        }
    }
    best.ok_or_else(|| "no ports are left for SNAT: set --snat-port-range".into())
}

/// The node's ephemeral port range (net.ipv4.ip_local_port_range of this network namespace).
fn ephemeral_ports() -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => anyhow::bail!("{path}: unexpected {text:?}"),
    }
}

impl AgentArgs {
    fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    fn nodeport_addresses(&self) -> anyhow::Result<NodePortAddresses> {
        if self.nodeport_addresses.iter().any(|a| a == "primary") {
            anyhow::ensure!(
                self.nodeport_addresses.len() == 1,
                "--nodeport-addresses: `primary` cannot be combined with CIDRs"
            );
            return Ok(NodePortAddresses::Primary);
        }
        let cidrs = self
            .nodeport_addresses
            .iter()
            .map(|c| c.parse::<crate::service::Cidr4>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
        Ok(NodePortAddresses::Cidrs(cidrs))
    }

    fn pod_globs(&self) -> anyhow::Result<Vec<glob::Pattern>> {
        self.pod_interfaces
            .iter()
            .filter(|g| !g.is_empty())
            .map(|g| {
                glob::Pattern::new(g).with_context(|| format!("--pod-interfaces: bad glob {g:?}"))
            })
            .collect()
    }
}

/// An error and its sources, one line: what the operator needs in a log.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Makes sure `pin_path` is on a bpffs. If it is under /sys/fs/bpf and that is not mounted
/// (a bare host, or a container without the mount), mounts it; anything else is an error
/// that says what to do.
fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    let mut probe = pin_path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
        nix::mount::mount(
            Some("bpffs"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs at /sys/fs/bpf (needs CAP_SYS_ADMIN; or mount it on the host and pass it in)")?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    anyhow::bail!(
        "--pin-path {} is not on a bpffs: mount one there (`mount -t bpf bpffs DIR`) or use a path under /sys/fs/bpf",
        pin_path.display()
    )
}

/// `--bootstrap-api-server`: programs the configured server's address (the `kubernetes`
/// Service's ClusterIP) to `boot` unless the maps already translate it, so that this agent (and
/// every other process of the node, through socket LB) reaches the API server before the first
/// sync. The first full sync replaces it with the Service's real endpoints, or removes it if
/// no Service has that address.
fn seed_api_server_service(
    dp: &mut Dataplane,
    url: &hyper::Uri,
    boot: std::net::SocketAddrV4,
) -> anyhow::Result<()> {
    use crate::service::{Backend, Backends, Frontend, FrontendKind, Protocol};
    let Some(addr) = url
        .host()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<Ipv4Addr>().ok())
    else {
        tracing::info!(server = %url, "--bootstrap-api-server: the server is not an IPv4 address, nothing to seed");
        return Ok(());
    };
    let port = url.port_u16().unwrap_or(443);
    if dp
        .services()
        .iter()
        .any(|(f, _)| f.addr == addr && f.port == port && f.proto == Protocol::Tcp)
    {
        tracing::info!(server = %url, "the API server's Service is in the pinned maps: reaching it through them");
        return Ok(());
    }
    let frontend = Frontend {
        addr,
        port,
        proto: Protocol::Tcp,
        kind: FrontendKind::ClusterIp,
    };
    let backends = Backends {
        all: vec![Backend {
            addr: *boot.ip(),
            port: boot.port(),
            local: false,
        }],
        external: None,
        sources: None,
        affinity_timeout_s: None,
        no_local_endpoints: false,
        maglev: false,
    };
    dp.upsert_frontend(frontend, &backends)
        .context("--bootstrap-api-server: programming the API server's Service")?;
    tracing::info!(server = %url, bootstrap = %boot, "first start: the API server's Service goes to the bootstrap endpoint until the first sync");
    Ok(())
}

/// Where and how socket LB attaches, from the flags and the running kernel.
fn socket_lb_config(args: &AgentArgs, kernel: &features::Report) -> anyhow::Result<SocketLbConfig> {
    use crate::dataplane::socket;
    let cgroup = match (&args.cgroup_root, args.socket_lb) {
        (Some(dir), _) => dir.clone(),
        (None, SocketLb::Off) => PathBuf::new(),
        (None, _) => socket::cgroup2_mount().context(
            "--socket-lb: no cgroup v2 mount in /proc/self/mountinfo; mount the host's cgroup2 \
             hierarchy and pass --cgroup-root, or --socket-lb off",
        )?,
    };
    Ok(SocketLbConfig {
        mode: args.socket_lb,
        cgroup,
        host_netns_cookie: socket::current_netns_cookie(),
        set_retval: kernel.has(features::SET_RETVAL) && !args.socket_lb_as_before_5_18,
        links_dir: args.pin_path.join("cgroup-links"),
    })
}

/// Runs the agent until SIGINT or SIGTERM. The maps and attachments stay pinned after exit,
/// so Service traffic keeps flowing while the agent restarts.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let node_name = args.node_name();
    let nodeport_addresses = args.nodeport_addresses()?;
    let pod_globs = args.pod_globs()?;
    let snat_ports = snat_ports(
        &args.snat_port_range,
        args.nodeport_range,
        ephemeral_ports()?,
    )
    .map_err(|e| anyhow::anyhow!("--snat-port-range: {e}"))?;
    tracing::info!(
        min = snat_ports.0,
        max = snat_ports.1,
        "SNAT source ports (clear of the NodePort range and the node's ephemeral ports)"
    );
    ensure_bpffs(&args.pin_path)?;
    // What this kernel has, and what sluice does about it, for the operator.
    let report = features::probe();
    for f in &report.facilities {
        tracing::info!(
            kernel = %report.kernel,
            facility = f.name,
            since = f.since,
            present = f.present,
            "{}",
            f.sluice
        );
    }
    // Auto follows the probe just made; a mode asked for that this kernel lacks is an error at
    // once, not an attach retried for ever.
    let mode = match args.attach_mode {
        Mode::Auto => AttachMode::best_given(report.has(features::TCX)),
        asked => {
            let mode = AttachMode::from(asked);
            mode.ensure_supported()?;
            mode
        }
    };
    tracing::info!(%mode, auto = args.attach_mode == Mode::Auto, "TC attachment mode");
    let mut dp = Dataplane::load_with(DataplaneConfig {
        pin_path: Some(args.pin_path.clone()),
        services_max: args.services_max,
        backends_max: args.backends_max,
        revnat_max: args.revnat_max,
        conntrack_max: args.conntrack_max,
        conntrack_new_max: args.conntrack_new_max,
        sock_revnat_max: args.sock_revnat_max,
        hairpin_snat: Some(args.hairpin_snat_address),
        // Set by the sync loop once the Node's address is known.
        snat: None,
        snat_ports,
        maglev_seed: args.maglev_seed,
        dsr: args.lb_mode == LbMode::Dsr,
    })?;
    tracing::info!(lb_mode = ?args.lb_mode, "outside traffic to other nodes' backends");
    let socket_lb = socket_lb_config(&args, &report)?;
    dp.set_socket_lb(&socket_lb)?;
    match socket_lb.mode {
        SocketLb::Off => tracing::info!("socket LB off"),
        mode => tracing::info!(
            %mode,
            cgroup = %socket_lb.cgroup.display(),
            netns_cookie = socket_lb.host_netns_cookie,
            refuse_with = if socket_lb.set_retval { "ECONNREFUSED" } else { "EPERM (Linux < 5.18)" },
            "socket LB attached"
        ),
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let health = Arc::new(server::Health::default());
    let (tx, rx) = std::sync::mpsc::channel::<Change>();
    let (health_checks, _) = tokio::sync::watch::channel(sync::HealthCheckState::default());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("sluice-rt")
        .build()
        .context("starting the tokio runtime")?;

    let view: Arc<dyn ObjectView> = rt.block_on(async {
        let m = server::start_metrics(args.metrics_bind_address, metrics.clone(), args.pin_path.clone())
            .await
            .with_context(|| format!("--metrics-bind-address {}", args.metrics_bind_address))?;
        let h = server::start_health(args.healthz_bind_address, health.clone(), metrics.clone())
            .await
            .with_context(|| format!("--healthz-bind-address {}", args.healthz_bind_address))?;
        tracing::info!(metrics = %m, healthz = %h, "listening");
        server::start_service_health(&health_checks, health.clone());
        let view: Arc<dyn ObjectView> = match &args.manifests {
            Some(dir) => {
                tracing::info!(dir = %dir.display(), node = %node_name, "source: manifests");
                source::manifests::start(dir.clone(), &node_name, tx.clone(), metrics.clone())
            }
            None => {
                let config = match &args.kubeconfig {
                    Some(path) => {
                        let kc = kube::config::Kubeconfig::read_from(path)
                            .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
                        kube::Config::from_custom_kubeconfig(kc, &Default::default())
                            .await
                            .with_context(|| format!("--kubeconfig {}", path.display()))?
                    }
                    None => kube::Config::infer()
                        .await
                        .context("no in-cluster config and no kubeconfig (pass --kubeconfig or --manifests)")?,
                };
                tracing::info!(server = %config.cluster_url, node = %node_name, "source: API server");
                if let Some(boot) = args.bootstrap_api_server {
                    seed_api_server_service(&mut dp, &config.cluster_url, boot)?;
                }
                let client = kube::Client::try_from(config).context("building the API client")?;
                source::kube::start(
                    client,
                    &node_name,
                    args.watch_timeout,
                    tx.clone(),
                    metrics.clone(),
                )
            }
        };
        anyhow::Ok(view)
    })?;

    if let Err(error) = devices::watch_links(tx.clone()) {
        tracing::warn!(%error, "no netlink link events; devices are re-checked every few seconds");
    }
    let devices = devices::Devices::new(
        pod_globs,
        args.uplinks.clone(),
        mode,
        args.xdp_mode,
        args.xdp_tx,
        args.pin_path.join("links"),
        metrics.clone(),
    );
    let syncer = Syncer::new(
        dp,
        view,
        metrics,
        health,
        SyncConfig {
            node_name: node_name.clone(),
            nodeport_addresses,
            limits: Limits {
                max_backends_per_frontend: args.max_backends_per_service,
            },
            socket_lb_cgroup: (socket_lb.mode != SocketLb::Off).then(|| socket_lb.cgroup.clone()),
            service_cidrs: args.service_cidr.clone(),
            maglev_by_default: args.lb_algorithm == LbAlgorithm::Maglev,
        },
        devices,
        health_checks,
    );
    let sync_thread = std::thread::Builder::new()
        .name("sluice-sync".into())
        .spawn(move || syncer.run(rx))
        .context("starting the sync thread")?;

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        anyhow::Ok(())
    })?;
    tracing::info!("stopping; maps and attachments stay pinned");
    let _ = tx.send(Change::Shutdown);
    let _ = sync_thread.join();
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_snat_ports_avoid_the_nodeport_range_and_the_ephemeral_ports() {
        // Linux's and Kubernetes' defaults: 1024-29999 (28,976 ports) beats 61000-65535.
        assert_eq!(
            snat_ports("auto", (30000, 32767), (32768, 60999)),
            Ok((1024, 29999))
        );
        // A node that widened its ephemeral range leaves the gap below the NodePorts.
        assert_eq!(
            snat_ports("auto", (30000, 32767), (1024, 29999)),
            Ok((32768, 65535))
        );
        // Overlapping reserved ranges.
        assert_eq!(
            snat_ports("auto", (30000, 32767), (20000, 31000)),
            Ok((32768, 65535))
        );
        assert!(snat_ports("auto", (1024, 40000), (40001, 65535)).is_err());
    }

    /// `--xdp-mode auto` departs from "native, then generic" (see [`XdpSetting::modes`]).
    #[test]
    fn xdp_tx_auto_sends_from_generic_xdp_and_from_native_xdp_on_any_driver_but_veth() {
        use XdpMode::{Generic, Native};
        assert!(XdpTx::Auto.allows(Generic, Some("veth")));
        assert!(XdpTx::Auto.allows(Native, Some("mlx5_core")));
        assert!(!XdpTx::Auto.allows(Native, Some("veth")));
        assert!(
            !XdpTx::Auto.allows(Native, None),
            "an unknown driver may be a veth"
        );
        assert!(XdpTx::On.allows(Native, Some("veth")));
        assert!(!XdpTx::Off.allows(Generic, Some("mlx5_core")));
    }

    #[test]
    fn xdp_auto_tries_native_only_and_off_tries_nothing() {
        assert_eq!(XdpSetting::Auto.modes(), &[XdpMode::Native]);
        assert_eq!(XdpSetting::Generic.modes(), &[XdpMode::Generic]);
        assert!(XdpSetting::Off.modes().is_empty());
    }

    /// Every `SLUICE_*` variable the DaemonSet sets names a flag, and the agent's parser takes
    /// its value (the same as passing the flag).
    #[test]
    fn the_daemonsets_environment_is_what_the_agent_parses() {
        // clap's Command, named apart from std's (which the spawn scan of tests/tools.rs finds).
        use clap::{Args as _, Command as ClapCommand, FromArgMatches as _};
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
        let ds: k8s_openapi::api::apps::v1::DaemonSet =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let c = &ds.spec.unwrap().template.spec.unwrap().containers[0];
        let cmd = AgentArgs::augment_args(ClapCommand::new("agent"));
        let mut argv = vec!["agent".to_owned()];
        let mut seen = Vec::new();
        for e in c
            .env
            .iter()
            .flatten()
            .filter(|e| e.name.starts_with("SLUICE_"))
        {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|v| v == e.name.as_str()))
                .unwrap_or_else(|| panic!("{} names no flag of the agent", e.name));
            argv.push(format!("--{}", arg.get_long().unwrap()));
            argv.push(e.value.clone().unwrap_or_default());
            seen.push(e.name.clone());
        }
        let m = cmd
            .try_get_matches_from(&argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let args = AgentArgs::from_arg_matches(&m).unwrap();
        assert_eq!(args.socket_lb, SocketLb::All);
        assert_eq!(
            args.cgroup_root.as_deref(),
            Some(Path::new("/run/sluice/cgroupv2"))
        );
        assert!(seen.len() >= 15, "{seen:?}");
    }

    #[test]
    fn an_explicit_snat_range_that_overlaps_is_refused_with_the_reason() {
        assert_eq!(
            snat_ports("61000-65535", (30000, 32767), (32768, 60999)),
            Ok((61000, 65535))
        );
        let e = snat_ports("40000-50000", (30000, 32767), (32768, 60999)).unwrap_err();
        assert!(e.contains("ephemeral"), "{e}");
        let e = snat_ports("29000-30000", (30000, 32767), (32768, 60999)).unwrap_err();
        assert!(e.contains("NodePort"), "{e}");
        assert!(snat_ports("9-8", (30000, 32767), (32768, 60999)).is_err());
        assert!(snat_ports("0-8", (30000, 32767), (32768, 60999)).is_err());
    }
}
