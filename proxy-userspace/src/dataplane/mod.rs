//! The dataplane: the eBPF object embedded in this binary, its programs and its maps.
//!
//! - [`Dataplane::load`] loads the object with the map sizes of a [`DataplaneConfig`], reusing
//!   maps pinned under its pin path (so a restarted agent adopts what the last one wrote), and
//!   runs the verifier on every program.
//! - [`Dataplane::attach`] puts a program on a device's TC hook: TCX on kernels that have it
//!   (6.6+), a `clsact` qdisc and a direct-action netlink filter otherwise.
//! - `services` ([`Dataplane::upsert_service`], [`Dataplane::remove_service`]) writes Services in
//!   the safe order; `inspect` reads counters and conntrack.
mod addrs;
pub mod features;
mod flows;
mod inspect;
pub mod maglev;
mod raw;
mod resize;
mod services;
pub mod socket;
mod xdp;

use std::{
    ffi::CString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapError, ProgramArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttach, TcError, TcHandle, qdisc_add_clsact},
    },
};
use proxy_common::{
    CT4_DEFAULT_MAX, CT4_MAP, CT4_NEW_DEFAULT_MAX, CT4_NEW_MAP, LB4_AFFINITY_MAP,
    LB4_AFFINITY_MATCH_MAP, LB4_BACKENDS_DEFAULT_MAX, LB4_BACKENDS_MAP, LB4_CONFIG_FLAG_DSR,
    LB4_CONFIG_MAP, LB4_DP_STATE_MAP, LB4_FE_ADDRS_MAP, LB4_FLOW_TAILS_MAP, LB4_FRAGS_MAP,
    LB4_MAGLEV_MAP, LB4_POD_CLIENTS_MAP, LB4_REJECT_BUDGET_MAP, LB4_REVNAT_DEFAULT_MAX,
    LB4_REVNAT_MAP, LB4_SERVICES_DEFAULT_MAX, LB4_SERVICES_MAP, LB4_SRC_RANGES_MAP,
    LB4_SVC_CIDRS_MAP, LB4_TAILS_MAP, LB4_UPLINK_MACS_MAP, LB4_XDP_TAILS_MAP, LB4_XDP_TX_MAP,
    Lb4Config, PKT_COUNTERS_MAP, SOCK_CONFIG_MAP, SOCK_REVNAT_DEFAULT_MAX, SOCK_REVNAT_MAP,
    SVC_CIDRS_MAX, SvcCidrs4, TAIL_DSR_NOTE, TAIL_NEW_FLOW_FROM_POD, TAIL_NEW_FLOW_FROM_UPLINK,
    TAIL_SCTP_CHECKSUM, TAIL_XDP_NEW_FLOW,
};

pub use crate::service::{
    Backend, Backends, Cidr4, Frontend, FrontendId, FrontendKind, Protocol, SourceRanges,
};
pub use addrs::monotonic_ns;
pub use inspect::{Counters, CtEntry, CtFill, CtKind, PinnedMaps, sock_addr};
pub use raw::{RawDump, RawEntry};
pub use resize::Copied;
pub use xdp::{
    PinnedUplink, XdpMode, detach_xdp, device_driver, device_mac, pinned_uplinks, uplink_mac_value,
};

/// The eBPF object built by build.rs (aya-build) from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// TC ingress of pod-facing devices: DNAT of new flows to any frontend; replies of SNATed
/// (hairpin) flows.
pub const FROM_POD: &str = "sluice_from_pod";
/// TC egress of pod-facing devices: replies back to the frontend (after routing).
pub const TO_POD: &str = "sluice_to_pod";
/// TC ingress of uplinks: NodePort, externalIPs, LoadBalancer; replies of SNATed flows.
pub const FROM_UPLINK: &str = "sluice_from_uplink";
/// TC egress of uplinks: replies to outside clients back to the frontend.
pub const TO_UPLINK: &str = "sluice_to_uplink";
/// Does nothing; the benchmark's floor.
pub const PASS: &str = "sluice_pass";
/// Tail-called by `sluice_from_pod` for a packet that starts a flow. Never attached.
pub const NEW_FLOW_FROM_POD: &str = "sluice_new_flow_from_pod";
/// Tail-called by `sluice_from_uplink` for a packet that starts a flow. Never attached.
pub const NEW_FLOW_FROM_UPLINK: &str = "sluice_new_flow_from_uplink";
/// Tail-called by `sluice_from_uplink` for another node's direct-server-return SYN: notes it
/// for the endpoint's replies. Never attached.
pub const DSR_NOTE: &str = "sluice_dsr_note";
/// Tail-called by the four attached programs and the two above: folds a translated SCTP
/// packet's port change into its CRC32c. Never attached.
pub const SCTP_CHECKSUM: &str = "sluice_sctp_checksum";

/// XDP of uplinks: an established flow's packet from outside, DNATed before the kernel builds
/// an skb (or SNATed and sent back out); everything else passes untouched to [`FROM_UPLINK`]
/// (`proxy-ebpf/src/xdp.rs`).
pub const XDP_FROM_UPLINK: &str = "sluice_xdp_from_uplink";
/// Tail-called by [`XDP_FROM_UPLINK`] for a new flow's first packet from outside: backend,
/// SNAT port and the flow's entries, as TC's new-flow program; what it does not do goes to TC
/// untouched. Never attached.
pub const XDP_NEW_FLOW: &str = "sluice_xdp_new_flow";
/// XDP_TX and nothing else: the benchmark's XDP floor. Never attached by the agent.
pub const XDP_TX: &str = "sluice_xdp_tx";
/// XDP_PASS and nothing else: what makes a veth take XDP frames (native XDP_TX onto a veth
/// needs a program on the receiving end), for the sandbox's veth peers in tests and the bench.
/// Never attached by the agent.
pub const XDP_PASS: &str = "sluice_xdp_pass";
/// Every XDP program in the object, loaded (and verified) with the TC ones.
pub const XDP_PROGRAMS: &[&str] = &[XDP_FROM_UPLINK, XDP_NEW_FLOW, XDP_TX, XDP_PASS];

/// The XDP tail calls' slots, as [`TAILS`].
const XDP_TAILS: [(&str, u32, &str); 1] = [(LB4_XDP_TAILS_MAP, TAIL_XDP_NEW_FLOW, XDP_NEW_FLOW)];

/// The tail calls' slots: program array, slot, program.
const TAILS: [(&str, u32, &str); 4] = [
    (LB4_TAILS_MAP, TAIL_SCTP_CHECKSUM, SCTP_CHECKSUM),
    (
        LB4_FLOW_TAILS_MAP,
        TAIL_NEW_FLOW_FROM_POD,
        NEW_FLOW_FROM_POD,
    ),
    (
        LB4_FLOW_TAILS_MAP,
        TAIL_NEW_FLOW_FROM_UPLINK,
        NEW_FLOW_FROM_UPLINK,
    ),
    (LB4_FLOW_TAILS_MAP, TAIL_DSR_NOTE, DSR_NOTE),
];

/// Every TC program in the object; [`Dataplane::load`] loads them all, so the verifier checks
/// each one at start-up rather than at first attach. (The socket programs are loaded when
/// socket LB is set up: which ones depends on the kernel; see [`socket`].)
pub const PROGRAMS: &[&str] = &[
    FROM_POD,
    TO_POD,
    FROM_UPLINK,
    TO_UPLINK,
    PASS,
    NEW_FLOW_FROM_POD,
    NEW_FLOW_FROM_UPLINK,
    DSR_NOTE,
    SCTP_CHECKSUM,
];

/// Maps of earlier layouts, whose pins an agent removes (the programs no longer use them).
pub const RETIRED_MAPS: &[&str] = &[
    "LB4_CONFIG",
    "PKT_COUNTERS",
    "LB4_FE_ADDRS",
    "PKT_COUNTERS_V2",
];

/// The two conntrack tables (see `proxy_common::conntrack`): flows not yet established, then
/// established ones. A flow's entries are in one of them, and move only from the first to the
/// second (written there before they leave the first), so a scan in this order sees a flow
/// that moves meanwhile at least once, and removals in this order leave it in neither.
pub const CT_TABLES: [&str; 2] = [CT4_NEW_MAP, CT4_MAP];

/// Every map the agent owns (and pins).
pub const MAPS: &[&str] = &[
    LB4_SERVICES_MAP,
    LB4_FE_ADDRS_MAP,
    LB4_POD_CLIENTS_MAP,
    LB4_DP_STATE_MAP,
    LB4_REJECT_BUDGET_MAP,
    LB4_BACKENDS_MAP,
    LB4_REVNAT_MAP,
    LB4_SRC_RANGES_MAP,
    LB4_AFFINITY_MAP,
    LB4_AFFINITY_MATCH_MAP,
    LB4_CONFIG_MAP,
    CT4_MAP,
    CT4_NEW_MAP,
    LB4_FRAGS_MAP,
    LB4_TAILS_MAP,
    LB4_FLOW_TAILS_MAP,
    LB4_SVC_CIDRS_MAP,
    PKT_COUNTERS_MAP,
    SOCK_REVNAT_MAP,
    SOCK_CONFIG_MAP,
    LB4_MAGLEV_MAP,
    LB4_XDP_TX_MAP,
    LB4_UPLINK_MACS_MAP,
    LB4_XDP_TAILS_MAP,
];

/// What can go wrong in the dataplane; each message says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the eBPF object failed (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN, \
         and Linux >= 5.10; a pinned map whose layout changed must be removed from the pin path): \
         {source}"
    )]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "program {program} is not in the eBPF object: the binary and proxy-ebpf are out of step"
    )]
    MissingProgram { program: &'static str },
    #[error("map {map} is not in the eBPF object: the binary and proxy-ebpf are out of step")]
    MissingMap { map: &'static str },
    #[error("program {program} failed to load; the verifier said:\n{source}")]
    Verifier {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("interface name {interface:?} contains a NUL byte")]
    BadInterface { interface: String },
    #[error(
        "{facility} needs Linux {since} or newer, and this kernel ({kernel}) has none; {instead}"
    )]
    Unsupported {
        facility: &'static str,
        since: &'static str,
        kernel: String,
        instead: &'static str,
    },
    #[error(
        "{interface} is not an Ethernet device (link type {link_type}; WireGuard, IPIP and tun \
         devices carry bare IP packets): sluice's programs parse Ethernet frames, so it is left \
         unattached"
    )]
    NotEthernet { interface: String, link_type: u16 },
    #[error("reading the link type of {interface} failed (does it exist?): {source}")]
    LinkType {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "adding the clsact qdisc to {interface} failed (does it exist, and do we have \
         CAP_NET_ADMIN?): {source}"
    )]
    Clsact {
        interface: String,
        #[source]
        source: Box<TcError>,
    },
    #[error("attaching {program} at {hook:?} of {interface} ({mode}) failed: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        hook: TcAttachType,
        mode: AttachMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {XDP_FROM_UPLINK} to {interface} in {mode} mode failed: {source}")]
    AttachXdp {
        interface: String,
        mode: XdpMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "map {map} is full ({max} entries): {what} was not written. {}",
        full_map_remedy(map)
    )]
    MapFull {
        map: &'static str,
        max: u32,
        what: String,
    },
    #[error("no free {what} id: all {max} are in use")]
    IdsExhausted { what: &'static str, max: u32 },
    #[error(
        "map {map} is not pinned at {path} (is the agent running, with this --pin-path?): {source}"
    )]
    Pinned {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "the pinned link {path} could not be used or replaced (remove it to reattach): {source}"
    )]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cgroup {path} (a cgroup v2 directory; --cgroup-root): {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {program} to the cgroup failed: {source}")]
    CgroupAttach {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{op} map {map} failed: {source}")]
    Raw {
        map: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "map {map} holds {held} entries, more than the {max} it is now sized for (it was {was}): \
         nothing was changed, and the maps pinned before still serve. Size it for at least \
         {held} (agent flags), or remove what it holds first"
    )]
    ResizeTooSmall {
        map: &'static str,
        held: usize,
        max: u32,
        was: u32,
    },
    #[error("pin path {path}: {source}")]
    PinPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a program is attached to a TC hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel >= 6.6): no qdisc, ordered with other programs, gone with the link.
    Tcx,
    /// A `clsact` qdisc and a direct-action netlink filter (kernels 5.10 to 6.5).
    Clsact,
}

impl AttachMode {
    /// The best mode this kernel supports: TCX where it has it, clsact elsewhere.
    pub fn best_available() -> Self {
        Self::best_given(Self::tcx_supported())
    }

    /// The best mode for a kernel that has TCX or not (as a probe already found).
    pub fn best_given(tcx: bool) -> Self {
        if tcx { Self::Tcx } else { Self::Clsact }
    }

    /// Whether this kernel has TCX links. Asked of the kernel rather than read off its
    /// version, since distributions backport: a query for the TCX programs on `lo` (present
    /// in every network namespace) is refused with EINVAL by kernels without TCX (before 6.6).
    pub fn tcx_supported() -> bool {
        SchedClassifier::query_tcx(c"lo", TcAttachType::Ingress).is_ok()
    }

    /// Whether this kernel can attach in this mode; if not, an error that names the facility
    /// and the kernel that has it.
    pub fn ensure_supported(self) -> Result<(), DataplaneError> {
        match self {
            Self::Tcx if !Self::tcx_supported() => Err(DataplaneError::Unsupported {
                facility: "attaching TC programs as TCX links (--attach-mode tcx)",
                since: "6.6",
                kernel: kernel_release(),
                instead: "use --attach-mode clsact or auto",
            }),
            _ => Ok(()),
        }
    }
}

/// The running kernel's release (`uname -r`), for messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown: {e}"))
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        })
    }
}

/// Map sizes, pinning and node facts the datapath needs.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Where maps are pinned (on a bpffs) so they outlive the process; `None`: not pinned.
    pub pin_path: Option<PathBuf>,
    pub services_max: u32,
    pub backends_max: u32,
    pub revnat_max: u32,
    pub conntrack_max: u32,
    /// Size of the table of flows not yet established (`CT4_NEW`): what a SYN flood fills.
    pub conntrack_new_max: u32,
    pub sock_revnat_max: u32,
    /// Source address for hairpin flows (a pod reaching itself through a Service): an address
    /// that pods route to the node but that is not the node's own (see `Lb4Config`).
    /// `None`: hairpin does not work.
    pub hairpin_snat: Option<Ipv4Addr>,
    /// The address (the node's InternalIP) traffic from outside to backends on other nodes
    /// is SNATed to; `None`: such flows are dropped (counted as `drop_no_snat_address`). The
    /// agent sets it once the node's address is known ([`Dataplane::set_snat`]).
    pub snat: Option<Ipv4Addr>,
    /// Source ports (inclusive) for flows that need one of their own: SNATed to the node, or
    /// a client's port remapped because its translated tuple was another flow's. Clear of the
    /// NodePort range and of the node's and pods' ephemeral ports.
    pub snat_ports: (u16, u16),
    /// The seed of Maglev's tables and flow hashes: the same on every node of a cluster, or
    /// nodes pick different backends for a flow (`--maglev-seed`).
    pub maglev_seed: u32,
    /// New TCP flows from outside to backends on other nodes by direct server return
    /// (`--lb-mode dsr`, see `proxy_common::LB4_CONFIG_FLAG_DSR`) rather than SNAT.
    pub dsr: bool,
}

/// [`DataplaneConfig::maglev_seed`] by default, so that nodes agree with no configuration.
pub const DEFAULT_MAGLEV_SEED: u32 = 0x51ce_5eed;

/// [`DataplaneConfig::snat_ports`] by default: the agent's `--snat-port-range auto` with
/// Kubernetes' default NodePort range and Linux's default ephemeral ports.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 29999);

impl DataplaneConfig {
    /// Every map whose size the config sets, with that size.
    pub fn map_sizes(&self) -> [(&'static str, u32); 8] {
        [
            (LB4_SERVICES_MAP, self.services_max),
            (LB4_AFFINITY_MATCH_MAP, self.services_max),
            (LB4_FE_ADDRS_MAP, self.services_max),
            (LB4_BACKENDS_MAP, self.backends_max),
            (LB4_REVNAT_MAP, self.revnat_max),
            (CT4_MAP, self.conntrack_max),
            (CT4_NEW_MAP, self.conntrack_new_max),
            (SOCK_REVNAT_MAP, self.sock_revnat_max),
        ]
    }
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            pin_path: None,
            services_max: LB4_SERVICES_DEFAULT_MAX,
            backends_max: LB4_BACKENDS_DEFAULT_MAX,
            revnat_max: LB4_REVNAT_DEFAULT_MAX,
            conntrack_max: CT4_DEFAULT_MAX,
            conntrack_new_max: CT4_NEW_DEFAULT_MAX,
            sock_revnat_max: SOCK_REVNAT_DEFAULT_MAX,
            hairpin_snat: None,
            snat: None,
            snat_ports: DEFAULT_SNAT_PORTS,
            maglev_seed: DEFAULT_MAGLEV_SEED,
            dsr: false,
        }
    }
}

/// The loaded eBPF object. Dropping it detaches its programs; pinned maps stay.
pub struct Dataplane {
    ebpf: Ebpf,
    config: DataplaneConfig,
    ids: services::Ids,
    /// Earlier SNAT or hairpin addresses that live flows may still be SNATed to: marked
    /// `FE_ADDR_NAT` in `LB4_FE_ADDRS2` until no live flow is (see `addrs`).
    nat_addrs: std::collections::BTreeSet<Ipv4Addr>,
    /// Port filter bits that addresses in `LB4_FE_ADDRS2` keep for live flows beyond their
    /// frontends' own (a frontend went, its flows did not): trimmed as the flows end (see
    /// `addrs`).
    flow_ports: std::collections::BTreeMap<Ipv4Addr, [u64; proxy_common::FE_PORT_WORDS]>,
    /// Pinned maps of another size the load replaced, until [`Dataplane::finish_resize`].
    resize: resize::Resize,
}

impl Dataplane {
    /// Loads the embedded object with default sizes, unpinned.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(DataplaneConfig::default())
    }

    /// Loads the embedded object and every program in it (the verifier runs here). Maps
    /// already pinned under `config.pin_path` are reused with their contents.
    pub fn load_with(config: DataplaneConfig) -> Result<Self, DataplaneError> {
        raise_memlock_rlimit();
        let mut loader = EbpfLoader::new();
        // The programs' clock: the coarse one where the kernel has it.
        let coarse_clock = u8::from(features::coarse_clock());
        loader.override_global(proxy_common::COARSE_CLOCK_GLOBAL, &coarse_clock, true);
        for (map, max) in config.map_sizes() {
            loader.map_max_entries(map, max);
        }
        // Pins of an agent whose programs did not note pod clients: those programs run until
        // ours replace them, and the flows they make in the meantime are in no client map.
        let clients_unknown = config.pin_path.as_ref().is_some_and(|dir| {
            resize::pinned(dir, CT4_MAP) && !dir.join(LB4_POD_CLIENTS_MAP).exists()
        });
        let pins: Vec<(&str, PathBuf)> = match &config.pin_path {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinPath {
                    path: dir.clone(),
                    source,
                })?;
                for old in RETIRED_MAPS {
                    let path = dir.join(old);
                    if path.exists() {
                        std::fs::remove_file(&path).map_err(|source| DataplaneError::PinPath {
                            path: path.clone(),
                            source,
                        })?;
                        tracing::info!(map = old, "removed the pin of a map of an earlier layout");
                    }
                }
                MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        // Pinned maps of another size: set aside now, copied into the new ones after the load.
        let resize = match &config.pin_path {
            Some(dir) => resize::set_aside(dir, &config.map_sizes())?,
            None => Default::default(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load {
                source: Box::new(source),
            })?;
        load_programs(&mut ebpf)?;
        // The tail calls' slots, filled before any program is attached (a pinned map's entries,
        // an earlier agent's programs, are replaced).
        let tc_tails = TAILS
            .iter()
            .map(|&(map, slot, program)| (map, slot, program, false));
        let xdp_tails = XDP_TAILS
            .iter()
            .map(|&(map, slot, program)| (map, slot, program, true));
        for (map, slot, program, xdp) in tc_tails.chain(xdp_tails) {
            let fd = if xdp {
                xdp_mut(&mut ebpf, program)?.fd()
            } else {
                classifier_mut(&mut ebpf, program)?.fd()
            };
            let fd = fd
                .map_err(|source| DataplaneError::Verifier {
                    program,
                    source: Box::new(source),
                })?
                .try_clone()
                .map_err(|source| DataplaneError::Raw {
                    map: map.into(),
                    op: "duplicate the program's descriptor for",
                    source,
                })?;
            let mut tails: ProgramArray<_> = ebpf
                .map_mut(map)
                .ok_or(DataplaneError::MissingMap { map })?
                .try_into()
                .map_err(map_error(map, "open"))?;
            tails.set(slot, &fd, 0).map_err(map_error(map, "write"))?;
        }
        let mut dp = Self {
            ebpf,
            config,
            ids: services::Ids::default(),
            nat_addrs: Default::default(),
            flow_ports: Default::default(),
            resize: Default::default(),
        };
        // Before anything reads the new maps: the ids adopted below are in the old ones.
        let mut resize = resize;
        resize.copy(&dp)?;
        dp.resize = resize;
        // A restarted agent that does not know the node's address yet (the API server is
        // down) keeps the SNAT its predecessor set, so traffic to remote endpoints goes on.
        if dp.config.snat.is_none() {
            dp.config.snat = dp.pinned_snat()?;
        }
        // The addresses live flows use go in before the config can name other SNAT or hairpin
        // addresses, so their replies are never filtered out.
        dp.ids = dp.recover_ids()?;
        dp.adopt_fe_addrs()?;
        if clients_unknown {
            tracing::warn!(
                "the pinned maps are from an agent without the pod-client map: the egress \
                 filter stays off (every packet into a pod is looked up) until the pins go"
            );
            dp.set_pod_clients_full()?;
        }
        dp.write_config()?;
        Ok(dp)
    }

    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// Whether the load began resizes that [`Dataplane::finish_resize`] has not ended.
    pub fn resizing(&self) -> bool {
        !self.resize.is_empty()
    }

    /// Ends the resizes the load began (pinned maps whose size the config changed; see
    /// `resize`): applies what the earlier agent's programs changed in the old maps since the
    /// load (added and changed entries, flows moved to `CT4`) wherever this agent has not
    /// changed the entry itself, and removes their pins. Call it once this dataplane's programs have
    /// replaced the earlier ones on every device. Returns what the resize did in all (the
    /// load's copy included); nothing to do returns all zeros. On an error the resize stays
    /// under way, to be finished by a later call.
    pub fn finish_resize(&mut self) -> Result<Copied, DataplaneError> {
        let mut resize = std::mem::take(&mut self.resize);
        if resize.is_empty() {
            return Ok(Default::default());
        }
        let result = resize.finish(self);
        if result.is_err() {
            // Kept, to try again: the merge is not repeated once done.
            self.resize = resize;
        }
        result
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let map = LB4_CONFIG_MAP;
        let hairpin_snat = self.config.hairpin_snat;
        let snat = self.config.snat;
        let ports = self.config.snat_ports;
        let flags = if self.config.dsr {
            LB4_CONFIG_FLAG_DSR
        } else {
            0
        };
        let mut cfg: Array<_, Lb4Config> = self.open_mut(map)?;
        let value = Lb4Config {
            hairpin_snat_be: hairpin_snat.map_or(0, |a| u32::from(a).to_be()),
            snat_addr_be: snat.map_or(0, |a| u32::from(a).to_be()),
            snat_port_min: ports.0,
            snat_port_max: ports.1,
            flags,
        };
        cfg.set(0, &value, 0).map_err(map_error(map, "write"))
    }

    /// The SNAT the config map holds (pinned by an earlier process), if any.
    fn pinned_snat(&self) -> Result<Option<Ipv4Addr>, DataplaneError> {
        let map = LB4_CONFIG_MAP;
        let cfg: Array<_, Lb4Config> = self.open(map)?;
        let c = cfg.get(&0, 0).map_err(map_error(map, "read"))?;
        Ok((c.snat_addr_be != 0).then(|| Ipv4Addr::from(u32::from_be(c.snat_addr_be))))
    }

    /// Sets the Service CIDRs (`LB4_SVC_CIDRS`): traffic from pods and the node to an address
    /// inside them that no frontend holds is dropped. Empty: nothing is dropped for it. More
    /// than the datapath holds is an error, and the CIDRs written before stay.
    pub fn set_service_cidrs(&mut self, cidrs: &[Cidr4]) -> Result<(), DataplaneError> {
        let mut value = SvcCidrs4::default();
        if cidrs.len() > SVC_CIDRS_MAX {
            return Err(DataplaneError::MapFull {
                map: LB4_SVC_CIDRS_MAP,
                max: SVC_CIDRS_MAX as u32,
                what: format!(
                    "a set of {} Service CIDRs (the CIDRs written before stay in force)",
                    cidrs.len()
                ),
            });
        }
        for (i, c) in cidrs.iter().enumerate() {
            let c = c.network();
            value.net_be[i] = u32::from(c.addr).to_be();
            value.mask_be[i] = c.mask().to_be();
        }
        value.count = cidrs.len() as u32;
        let map = LB4_SVC_CIDRS_MAP;
        let mut m: Array<_, SvcCidrs4> = self.open_mut(map)?;
        m.set(0, &value, 0).map_err(map_error(map, "write"))
    }

    /// Sets (or clears) the SNAT of traffic from outside to other nodes' backends. Flows
    /// already SNATed keep their address and port.
    pub fn set_snat(&mut self, snat: Option<Ipv4Addr>) -> Result<(), DataplaneError> {
        if self.config.snat != snat {
            // Replies of flows SNATed to the old address still arrive there: it stays in the
            // ingress filter (retired, until no live flow uses it).
            if let Some(old) = self.config.snat {
                self.nat_addrs.insert(old);
                let n = self.ids.frontends_on(old);
                self.write_fe_addr(old, n, None)?;
            }
            self.config.snat = snat;
            self.write_config()?;
            // Configured again: its replies are looked up by the config, not the mark.
            if let Some(new) = snat
                && self.nat_addrs.remove(&new)
            {
                self.refresh_fe_addr(new)?;
            }
        }
        Ok(())
    }

    /// Sets the source ports (inclusive) new flows draw from ([`DataplaneConfig::snat_ports`]).
    /// Flows that hold a port keep it, in the new range or not. The agent sets the range once,
    /// at load; tests narrow it to choose which ports flows hold.
    pub fn set_snat_ports(&mut self, ports: (u16, u16)) -> Result<(), DataplaneError> {
        self.config.snat_ports = ports;
        self.write_config()
    }

    /// Opens map `map` as a `T` (HashMap, Array, ...) for reading.
    fn open<'a, T>(&'a self, map: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let m = self
            .ebpf
            .map(map)
            .ok_or(DataplaneError::MissingMap { map })?;
        T::try_from(m).map_err(map_error(map, "open"))
    }

    /// Opens map `map` as a `T` for writing.
    fn open_mut<'a, T>(&'a mut self, map: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let m = self
            .ebpf
            .map_mut(map)
            .ok_or(DataplaneError::MissingMap { map })?;
        T::try_from(m).map_err(map_error(map, "open"))
    }

    /// The loaded program `name`, for attaching it or running it through BPF_PROG_TEST_RUN.
    pub fn program(&self, program: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .program(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { program })
    }

    /// The loaded XDP program `name`, for running it through BPF_PROG_TEST_RUN.
    pub fn xdp_program(&self, program: &'static str) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { program })
    }

    /// `program`'s summed run time and run count (any kind of program), which the kernel keeps
    /// while run-time statistics are enabled; `None` if it is not loaded.
    pub fn run_stats(&self, program: &str) -> Option<(std::time::Duration, u64)> {
        let info = self.ebpf.program(program)?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// Attaches `program` at `hook` of `interface`, in the calling thread's network namespace.
    /// The attachment lives as long as this `Dataplane`.
    pub fn attach(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: TcAttachType,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        mode.ensure_supported()?;
        let name = c_name(interface)?;
        ensure_ethernet(&name, interface)?;
        if mode == AttachMode::Clsact {
            ensure_clsact(&name, interface)?;
        }
        let attach = match mode {
            AttachMode::Tcx => TcAttach::Tcx {
                attach_type: hook,
                order: Default::default(),
            },
            AttachMode::Clsact => TcAttach::Netlink {
                parent: hook.into(),
                options: Default::default(),
            },
        };
        classifier_mut(&mut self.ebpf, program)?
            .attach(&name, attach)
            .map_err(|source| DataplaneError::Attach {
                program,
                interface: interface.to_owned(),
                hook,
                mode,
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// Attaches the pod-side pair to a pod-facing device: [`FROM_POD`] at ingress, [`TO_POD`]
    /// at egress.
    pub fn attach_pod_device(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        self.attach(FROM_POD, interface, TcAttachType::Ingress, mode)?;
        self.attach(TO_POD, interface, TcAttachType::Egress, mode)
    }

    /// Attaches the uplink pair: [`FROM_UPLINK`] at ingress, [`TO_UPLINK`] at egress.
    pub fn attach_uplink(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        self.attach(FROM_UPLINK, interface, TcAttachType::Ingress, mode)?;
        self.attach(TO_UPLINK, interface, TcAttachType::Egress, mode)
    }
}

/// The netlink filter priority and handle of sluice's persistent clsact attachments: fixed, so
/// a restarted agent finds its filter and replaces the program in it.
const CLSACT_PRIORITY: u16 = 1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 1);

impl Dataplane {
    /// Attaches `program` at `hook` of `interface` so that it stays attached after this process
    /// exits (even by `kill -9`), and replaces, atomically, what an earlier process attached
    /// there. TCX: the link is pinned at `links_dir/<hook>_<interface>` and a later call
    /// updates it in place (`BPF_LINK_UPDATE`). clsact: a netlink filter at a fixed priority and
    /// handle, replaced in place. Traffic is translated without a gap across agent restarts.
    pub fn attach_persistent(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: TcAttachType,
        mode: AttachMode,
        links_dir: &Path,
    ) -> Result<(), DataplaneError> {
        let attach_error = |source: ProgramError| DataplaneError::Attach {
            program,
            interface: interface.to_owned(),
            hook,
            mode,
            source: Box::new(source),
        };
        mode.ensure_supported()?;
        ensure_ethernet(&c_name(interface)?, interface)?;
        match mode {
            AttachMode::Tcx => {
                std::fs::create_dir_all(links_dir).map_err(|source| DataplaneError::PinPath {
                    path: links_dir.to_owned(),
                    source,
                })?;
                let path = link_pin(links_dir, interface, hook);
                let prog = classifier_mut(&mut self.ebpf, program)?;
                let replaced = replace_pinned(&path, interface, attach_error, |fd| {
                    let link = SchedClassifierLink::try_from(fd).ok()?;
                    Some(
                        prog.attach_to_link(link)
                            .and_then(|id| prog.take_link(id).map(drop)),
                    )
                })?;
                if replaced {
                    return Ok(());
                }
                let name = c_name(interface)?;
                let id = prog
                    .attach(
                        &name,
                        TcAttach::Tcx {
                            attach_type: hook,
                            order: Default::default(),
                        },
                    )
                    .map_err(attach_error)?;
                let link = FdLink::try_from(prog.take_link(id).map_err(attach_error)?)
                    .map_err(|e| attach_error(e.into()))?;
                link.pin(&path)
                    .map_err(|source| DataplaneError::PinnedLink {
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
                Ok(())
            }
            AttachMode::Clsact => {
                let name = c_name(interface)?;
                ensure_clsact(&name, interface)?;
                let prog = classifier_mut(&mut self.ebpf, program)?;
                let existing = SchedClassifierLink::attached(
                    name.as_c_str(),
                    hook.into(),
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .ok();
                // Replace our filter if it is there; otherwise create it.
                let id = match existing.map(|link| prog.attach_to_link(link)) {
                    Some(Ok(id)) => id,
                    _ => prog
                        .attach(
                            &name,
                            TcAttach::Netlink {
                                parent: hook.into(),
                                options: NlOptions {
                                    priority: CLSACT_PRIORITY,
                                    handle: CLSACT_HANDLE,
                                    ..Default::default()
                                },
                            },
                        )
                        .map_err(attach_error)?,
                };
                // Forgetting the link leaves the filter in place when this process exits.
                std::mem::forget(prog.take_link(id).map_err(attach_error)?);
                Ok(())
            }
        }
    }

    /// [`Self::attach_persistent`] of the pod-side pair ([`FROM_POD`], [`TO_POD`]).
    pub fn attach_pod_device_persistent(
        &mut self,
        interface: &str,
        mode: AttachMode,
        links_dir: &Path,
    ) -> Result<(), DataplaneError> {
        self.attach_persistent(FROM_POD, interface, TcAttachType::Ingress, mode, links_dir)?;
        self.attach_persistent(TO_POD, interface, TcAttachType::Egress, mode, links_dir)
    }

    /// [`Self::attach_persistent`] of the uplink pair ([`FROM_UPLINK`], [`TO_UPLINK`]).
    pub fn attach_uplink_persistent(
        &mut self,
        interface: &str,
        mode: AttachMode,
        links_dir: &Path,
    ) -> Result<(), DataplaneError> {
        self.attach_persistent(
            FROM_UPLINK,
            interface,
            TcAttachType::Ingress,
            mode,
            links_dir,
        )?;
        self.attach_persistent(TO_UPLINK, interface, TcAttachType::Egress, mode, links_dir)
    }
}

/// Replaces the program in the link pinned at `path`, if there is one, through `update`: it
/// converts the link to its program's link type (`None` if it is not one) and updates it in
/// place (`BPF_LINK_UPDATE`), dropping our descriptor (the pin holds the link). `Ok(true)`:
/// replaced. `Ok(false)`: nothing usable is pinned there (no pin; a defunct link, whose device
/// is gone and whose name is reused; or a pin of another kind: removed), so attach afresh.
/// Any other failure keeps the working link and is reported through `error`.
fn replace_pinned(
    path: &Path,
    interface: &str,
    error: impl FnOnce(ProgramError) -> DataplaneError,
    update: impl FnOnce(FdLink) -> Option<Result<(), ProgramError>>,
) -> Result<bool, DataplaneError> {
    let Ok(old) = PinnedLink::from_pin(path) else {
        return Ok(false);
    };
    match update(FdLink::from(old)) {
        Some(Ok(())) => Ok(true),
        Some(Err(ProgramError::SyscallError(e)))
            if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
        {
            tracing::debug!(%interface, path = %path.display(), "pinned link is defunct; reattaching");
            remove_pin(path)?;
            Ok(false)
        }
        Some(Err(e)) => Err(error(e)),
        None => {
            tracing::warn!(%interface, path = %path.display(), "replacing a pin that is not a link of this program's kind");
            remove_pin(path)?;
            Ok(false)
        }
    }
}

/// Refuses a device whose packets do not start with an Ethernet header (the programs would
/// read an IP header as one, and mis-parse everything).
fn ensure_ethernet(name: &CString, interface: &str) -> Result<(), DataplaneError> {
    match link_type(name) {
        Ok(t) if t == libc::ARPHRD_ETHER => Ok(()),
        Ok(link_type) => Err(DataplaneError::NotEthernet {
            interface: interface.to_owned(),
            link_type,
        }),
        Err(source) => Err(DataplaneError::LinkType {
            interface: interface.to_owned(),
            source,
        }),
    }
}

/// The device's link type (`ARPHRD_*`), in the calling thread's network namespace.
fn link_type(name: &CString) -> std::io::Result<u16> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: a plain socket call; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked below) and stays NUL-ended.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware address into `ifr`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family })
}

fn c_name(interface: &str) -> Result<CString, DataplaneError> {
    CString::new(interface).map_err(|_| DataplaneError::BadInterface {
        interface: interface.to_owned(),
    })
}

/// Adds the clsact qdisc to `interface` unless it is there already.
fn ensure_clsact(name: &CString, interface: &str) -> Result<(), DataplaneError> {
    match qdisc_add_clsact(name) {
        // Another program (or an earlier run) already added it: that is fine.
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DataplaneError::Clsact {
            interface: interface.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// Removes the link pins of a device: for a device that is gone, its links went with it; for
/// one that is still there, the last reference goes and the programs are detached.
pub fn forget_device_links(links_dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    // XDP first: it translates flows whose replies TC's egress program translates back.
    detach_xdp(links_dir, interface)?;
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        remove_pin(&link_pin(links_dir, interface, hook))?;
    }
    Ok(())
}

/// Removes sluice's persistent clsact filters (fixed priority and handle) from a device.
pub fn detach_clsact(interface: &str) -> Result<(), DataplaneError> {
    let name = c_name(interface)?;
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        let Ok(link) = SchedClassifierLink::attached(
            name.as_c_str(),
            hook.into(),
            CLSACT_PRIORITY,
            CLSACT_HANDLE,
            None,
        ) else {
            continue; // the device is gone
        };
        match aya::programs::links::Link::detach(link) {
            Ok(()) => {}
            // Not there (already removed): fine.
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(DataplaneError::Attach {
                    program: "(detach)",
                    interface: interface.to_owned(),
                    hook,
                    mode: AttachMode::Clsact,
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(())
}

/// The interfaces that have pinned links under `links_dir`.
pub fn pinned_link_devices(links_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(links_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (_, iface) = name.split_once('_')?;
            Some(decode_pin_name(iface))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// bpffs refuses names with a dot (EPERM), and device names may have one (`eth0.100`, a
/// VLAN): dots and percent signs are percent-encoded.
fn encode_pin_name(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2E")
}

pub(crate) fn decode_pin_name(name: &str) -> String {
    name.replace("%2E", ".").replace("%25", "%")
}

/// `links_dir/<hook>_<interface>`.
fn link_pin(links_dir: &Path, interface: &str, hook: TcAttachType) -> PathBuf {
    let hook = match hook {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
    };
    links_dir.join(format!("{hook}_{}", encode_pin_name(interface)))
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::PinPath {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The error for a failed `op` on map `map`.
/// What an operator can do about a full map: most maps take their size from an agent flag;
/// the Service CIDR map has a fixed size.
fn full_map_remedy(map: &str) -> &'static str {
    if map == LB4_SVC_CIDRS_MAP {
        "Its size is fixed: list fewer Service CIDRs"
    } else {
        "Raise the map's size (agent flags) or reduce what it must hold"
    }
}

fn map_error(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        map,
        op,
        source: Box::new(source),
    }
}

/// The XDP program `program` of the object, to load or attach.
fn xdp_mut<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or(DataplaneError::MissingProgram { program })
}

/// Loads every program of [`PROGRAMS`] and [`XDP_PROGRAMS`], each on a thread of its own: the
/// kernel verifies privileged loads concurrently (no lock), and most of a load's time is the
/// verifier's walk of the two biggest programs. The first error in the lists' order is
/// returned.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let names: Vec<&'static str> = PROGRAMS.iter().chain(XDP_PROGRAMS).copied().collect();
    for &program in PROGRAMS {
        classifier_mut(ebpf, program)?;
    }
    for &program in XDP_PROGRAMS {
        xdp_mut(ebpf, program)?;
    }
    let mut results: Vec<(usize, Result<(), DataplaneError>)> = std::thread::scope(|s| {
        let threads: Vec<_> = ebpf
            .programs_mut()
            .filter_map(|(name, program)| {
                let i = names.iter().position(|n| *n == name)?;
                Some((i, program))
            })
            .map(|(i, program)| {
                let name = names[i];
                s.spawn(move || {
                    let loaded = match program {
                        aya::programs::Program::SchedClassifier(p) => p.load(),
                        aya::programs::Program::Xdp(p) => p.load(),
                        _ => return (i, Err(DataplaneError::MissingProgram { program: name })),
                    };
                    let loaded = loaded.map_err(|source| DataplaneError::Verifier {
                        program: name,
                        source: Box::new(source),
                    });
                    (i, loaded)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a program's loading thread panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().try_for_each(|(_, r)| r)
}

/// The TC program `program` of the object, to load or attach.
fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or(DataplaneError::MissingProgram { program })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones charge the cgroup and
/// may refuse the call (EPERM in some containers), which is then harmless.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; kernels >= 5.11 do not need it"
        );
    }
}
