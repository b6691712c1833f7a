//! IPv4 load-balancing maps: frontends with backend slots, backends, reverse NAT, config.
//!
//! A Service frontend (address, port, protocol) is a set of entries in [`LB4_SERVICES_MAP`]:
//! slot 0 holds the frontend ([`Lb4Service`] with `count` backends), slots 1..=count hold
//! backend ids. Choosing a backend is then one random number and two lookups, whatever the
//! number of Services. Writers put backends first, then slots, then slot 0; removal goes in
//! the reverse order, so the programs never see a half-built Service.
//!
//! A frontend with [`SVC_FLAG_EXT_LOCAL`] (externalTrafficPolicy: Local) has a second list:
//! slots [`LOCAL_SLOT_BASE`]+1..=[`LOCAL_SLOT_BASE`]+local_count hold the node's own
//! endpoints, which traffic arriving from outside (on an uplink) must use; traffic from the
//! node's pods uses slots 1..=count. Each list has slots of its own, so rewriting one never
//! puts the other's backends where a program could read them.

/// `LB4_SERVICES`: [`Lb4Key`] -> [`Lb4Service`]; hash; written by the agent, read by the
/// programs.
pub const LB4_SERVICES_MAP: &str = "LB4_SERVICES";
/// `LB4_BACKENDS`: backend id (u32, never 0) -> [`Lb4Backend`]; hash; written by the agent,
/// read by the programs.
pub const LB4_BACKENDS_MAP: &str = "LB4_BACKENDS";
/// `LB4_REVNAT`: reverse-NAT id (u32, never 0) -> [`Lb4RevNat`] (the frontend replies must
/// show); hash; written by the agent, read by the CLI (the programs keep a copy in conntrack).
pub const LB4_REVNAT_MAP: &str = "LB4_REVNAT";
/// `LB4_CONFIG_V2`: index 0 -> [`Lb4Config`]; array of 1; written by the agent, read by the
/// programs. (`LB4_CONFIG`, 8 bytes, had no SNAT fields; an agent removes its old pin.)
pub const LB4_CONFIG_MAP: &str = "LB4_CONFIG_V2";
/// `LB4_SVC_CIDRS`: index 0 -> [`SvcCidrs4`]; array of 1; written by the agent, read by
/// `sluice_from_pod` and `sluice_to_uplink`. The Service CIDRs (the cluster's ServiceCIDR
/// objects, or `--service-cidr`): a new packet from a pod or the node to an address inside
/// them that no frontend holds is dropped (`drop_unallocated_cluster_ip`), as kube-proxy's
/// nftables mode drops traffic to unallocated ClusterIPs, instead of leaving by the default
/// route.
pub const LB4_SVC_CIDRS_MAP: &str = "LB4_SVC_CIDRS";
/// How many Service CIDRs [`SvcCidrs4`] holds (Kubernetes allocates ClusterIPs from one per
/// family, and ServiceCIDR objects add more as a cluster grows).
pub const SVC_CIDRS_MAX: usize = 8;

/// `LB4_FE_ADDRS2`: an address (u32, network order) -> [`FeAddr4`]: the number of frontends
/// on it, with [`FE_ADDR_CLUSTER_IP`] in bit 31 and [`FE_ADDR_NAT`] in bit 30, and a filter of
/// the ports flows to it can have; hash; written by the agent, read by the programs. The
/// ingress programs look a packet's destination up here first: an address that is no
/// frontend's, and not the hairpin or SNAT address, can belong to no translated flow, so the
/// packet passes with no conntrack lookup (plain pod-to-pod traffic, and every connection
/// socket LB translated at `connect()`). A packet to a frontend's address on a port whose bit
/// is clear in the filter, and no reply of a SNATed flow, is no flow's either: it is answered
/// as a packet to no frontend, again with no conntrack lookup (the node's own ports on a
/// NodePort address, a ClusterIP's other ports). So is a packet to the configured SNAT or
/// hairpin address, when no frontend is on it, that is no reply of a SNATed flow.
/// An address whose last frontend went stays, with 0, while conntrack holds flows to it
/// (they keep their backend, as the maps promise); the agent removes it once none is live.
/// Likewise a port's bit stays set while a live flow names it, after its frontend went.
/// (The first layout, `LB4_FE_ADDRS`, had the count alone: an agent removes its pin.)
pub const LB4_FE_ADDRS_MAP: &str = "LB4_FE_ADDRS2";
/// In an `LB4_FE_ADDRS2` value's flags: a ClusterIP frontend is on the address (set once its entry is
/// written). A new flow from a pod to a port of it that no frontend serves is rejected, as
/// kube-proxy's nftables mode rejects it, rather than routed out of the default route. The
/// rest of the value ([`FE_ADDR_COUNT`]) is the number of frontends.
pub const FE_ADDR_CLUSTER_IP: u32 = 1 << 31;
/// In an `LB4_FE_ADDRS2` value's flags: live flows may be SNATed to the address, which is no longer
/// the configured SNAT or hairpin address (the node's address changed, or an agent restarted
/// with another). The ingress programs look replies up only where SNATed flows' replies can
/// arrive: the configured addresses, and these. The agent clears it once no live flow is.
pub const FE_ADDR_NAT: u32 = 1 << 30;
pub const FE_ADDR_COUNT: u32 = FE_ADDR_NAT - 1;
/// How many bits [`FeAddr4`]'s port filter has: a port sets the bit [`fe_port_bit`] names.
/// 256 bits: a ClusterIP's few ports hardly ever share one, and on a node address with a
/// hundred NodePorts about two ports in three still find theirs clear. A shared bit costs
/// only time: the packet takes the full way (conntrack, then the frontend).
pub const FE_PORT_BITS: u32 = 256;
pub const FE_PORT_WORDS: usize = (FE_PORT_BITS / 64) as usize;

/// The word and the bit of `port` (host order) in [`FeAddr4::ports`]: its two bytes folded
/// together, so that ports a multiple of 256 apart (NodePorts are drawn from 30000 to 32767)
/// mostly differ.
#[inline(always)]
pub fn fe_port_bit(port: u16) -> (usize, u64) {
    let h = u32::from((port ^ (port >> 8)) & 0xff);
    ((h >> 6) as usize & (FE_PORT_WORDS - 1), 1 << (h & 63))
}

/// Value of [`LB4_FE_ADDRS_MAP`]: what is on an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeAddr4 {
    /// The number of frontends on the address ([`FE_ADDR_COUNT`]), with its marks
    /// ([`FE_ADDR_CLUSTER_IP`], [`FE_ADDR_NAT`]).
    pub flags: u32,
    pub _pad: u32,
    /// The port filter: the bit of every port a frontend on the address has, and of every
    /// port a live flow to it names ([`fe_port_bit`]). A clear bit means no flow and no
    /// frontend; a set one means "maybe".
    pub ports: [u64; FE_PORT_WORDS],
}
const _: () = assert!(core::mem::size_of::<FeAddr4>() == 8 + 8 * FE_PORT_WORDS);

impl FeAddr4 {
    /// Whether a flow or a frontend may have `port` (host order) on the address.
    #[inline(always)]
    pub fn may_have_port(&self, port: u16) -> bool {
        let (word, bit) = fe_port_bit(port);
        self.ports[word] & bit != 0
    }

    /// Sets `port`'s bit (host order).
    pub fn add_port(&mut self, port: u16) {
        let (word, bit) = fe_port_bit(port);
        self.ports[word] |= bit;
    }
}

/// `LB4_POD_CLIENTS`: an address (u32, network order) -> 1 (u32); hash, not preallocated;
/// written and read by the programs. Every address that has been the client of a flow
/// translated at TC and not SNATed whose replies may reach a pod's egress (every such flow of
/// `sluice_from_pod`; of `sluice_from_uplink`, those whose client is not back out of the
/// uplink). Only packets to these addresses can be replies that `sluice_to_pod` must
/// translate, so a packet into a pod whose address is not here passes with no conntrack
/// lookup: plain pod-to-pod traffic, and every connection socket LB translated at
/// `connect()`. Addresses are never removed (a node's pod addresses come from its pod CIDR, a
/// few hundred to a few thousand); if the map fills, [`DP_STATE_POD_CLIENTS_FULL`] turns the
/// filter off and every packet into a pod gets the lookup again.
pub const LB4_POD_CLIENTS_MAP: &str = "LB4_POD_CLIENTS";
pub const LB4_POD_CLIENTS_DEFAULT_MAX: u32 = 65_536;

/// `LB4_DP_STATE`: index 0 -> flags (u32); array of 1; set by the programs (and by an agent
/// that finds pins of a layout without [`LB4_POD_CLIENTS_MAP`]), never cleared.
pub const LB4_DP_STATE_MAP: &str = "LB4_DP_STATE";
/// [`LB4_POD_CLIENTS_MAP`] could not take an address: `sluice_to_pod` looks every packet up.
pub const DP_STATE_POD_CLIENTS_FULL: u32 = 1;

/// `LB4_REJECT_BUDGET`: index 0 -> [`RejectBudget`]; per-CPU array of 1; the programs' own
/// state: how many ICMP errors each CPU may still send, as the kernel rate-limits its own
/// (`net.ipv4.icmp_msgs_per_sec` 1000, `icmp_msgs_burst` 50, which are global; these are per
/// CPU).
pub const LB4_REJECT_BUDGET_MAP: &str = "LB4_REJECT_BUDGET";
/// ICMP errors a CPU may send per second, and at once.
pub const REJECT_PER_SEC: u64 = 1_000;
pub const REJECT_BURST: u64 = 50;

/// A token bucket: `tokens` left, refilled from `last_ns` on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBudget {
    pub tokens: u64,
    pub last_ns: u64,
}

/// `LB4_FRAGS`: [`Frag4Key`] -> [`Frag4Ports`]; LRU hash; the programs' own state. Only a
/// datagram's first fragment carries its ports: each program that looks up a first fragment
/// notes its ports here under the datagram's addresses and IP id, as that program sees them,
/// so that the later fragments find the flow and follow its translation (as Cilium's
/// `cilium_ipv4_frag_datagrams`). Entries age out by LRU; one lives as long as reassembly
/// could use it.
pub const LB4_FRAGS_MAP: &str = "LB4_FRAGS";

/// The programs the TC programs tail-call (a `BPF_MAP_TYPE_PROG_ARRAY`), by the slots below.
/// Pinned, like the other maps: the kernel empties a program array when its last user
/// reference goes, so an unpinned one would leave the programs of a killed agent, still
/// attached until its successor replaces them, without their tail calls.
pub const LB4_TAILS_MAP: &str = "LB4_TAILS";
/// Slot of `sluice_sctp_checksum`: folds a translated SCTP packet's port change into its CRC32c.
pub const TAIL_SCTP_CHECKSUM: u32 = 0;
/// Slots of the program array. Growing it needs a new name: a pinned map of the old size would
/// be reused, and the new slot's write refused.
pub const LB4_TAILS_MAX: u32 = 1;

/// The new-flow programs the TC programs tail-call (a `BPF_MAP_TYPE_PROG_ARRAY`, pinned as
/// [`LB4_TAILS_MAP`] is, for the same reason), by the slots below. A map of its own because a
/// pinned program array cannot grow ([`LB4_TAILS_MAX`]). A packet that starts no flow is
/// served without them: the programs that parse it look up its reply and service entries, and
/// hand off only a packet that must choose a backend (or be refused for having none). Split
/// so, each program is verified on its own paths, not on the product of both.
pub const LB4_FLOW_TAILS_MAP: &str = "LB4_FLOW_TAILS";
/// Slot of `sluice_new_flow_from_pod`: a new flow of a pod (any frontend, hairpin).
pub const TAIL_NEW_FLOW_FROM_POD: u32 = 0;
/// Slot of `sluice_new_flow_from_uplink`: a new flow from outside (NodePort, externalIPs,
/// LoadBalancer; SNAT and redirect to another node's endpoint).
pub const TAIL_NEW_FLOW_FROM_UPLINK: u32 = 1;
/// Slot of `sluice_dsr_note`: at an uplink's ingress, another node's direct-server-return SYN
/// (its IPv4 option) to an endpoint here, noted for the endpoint's replies. Its own program:
/// inline, its lookups made `sluice_from_uplink` three times longer to verify, for packets
/// that carry IP options, which few do.
pub const TAIL_DSR_NOTE: u32 = 2;
/// Slots of [`LB4_FLOW_TAILS_MAP`]: three in use, the rest room for programs to come (the same
/// reason as [`LB4_TAILS_MAX`]).
pub const LB4_FLOW_TAILS_MAX: u32 = 8;

/// The new-flow program the XDP program tail-calls (a program array holds programs of one
/// type, so XDP's is a map of its own), by the slots below; pinned as [`LB4_FLOW_TAILS_MAP`]
/// is. An empty slot leaves new flows to TC, untouched.
pub const LB4_XDP_TAILS_MAP: &str = "LB4_XDP_TAILS";
/// Slot of `sluice_xdp_new_flow`: a new flow from outside, at XDP.
pub const TAIL_XDP_NEW_FLOW: u32 = 0;
/// Slots of [`LB4_XDP_TAILS_MAP`]: one in use, the rest room for programs to come.
pub const LB4_XDP_TAILS_MAX: u32 = 4;

/// The hand-off to `sluice_sctp_checksum`, in `__sk_buff.cb`: an ABI like the maps', since the
/// programs of one agent may tail-call the checksum program of the next (the slot is refilled
/// at load, before the new programs replace the old ones). Index of the ports the packet
/// arrived with (its first 4 bytes of SCTP header, as a native word), noted by parsing.
pub const SCTP_CB_ARRIVED_PORTS: usize = 0;
/// Index of the verdict the checksum program returns.
pub const SCTP_CB_VERDICT: usize = 1;
/// Index of the verdict's counter, which the checksum program counts.
pub const SCTP_CB_COUNTER: usize = 2;
/// Index of the packet's length as the calling program counted it in `seen`.
pub const SCTP_CB_LEN: usize = 3;

/// The hand-off to the new-flow programs, in `__sk_buff.cb` (an ABI like the SCTP one): the
/// clock as the handing program read it, low and high words, so that a new flow costs one
/// read of the clock, not two. The new-flow program reads them first; they are the SCTP
/// hand-off's verdict and counter, which it writes only later, if at all.
pub const FLOW_CB_NOW_LO: usize = 1;
/// The clock's high word (see [`FLOW_CB_NOW_LO`]).
pub const FLOW_CB_NOW_HI: usize = 2;
const _: () = assert!(
    FLOW_CB_NOW_LO != SCTP_CB_ARRIVED_PORTS
        && FLOW_CB_NOW_HI != SCTP_CB_ARRIVED_PORTS
        && FLOW_CB_NOW_LO != FLOW_CB_NOW_HI
        && FLOW_CB_NOW_HI < 5
);
pub const LB4_FRAGS_DEFAULT_MAX: u32 = 8_192;

/// Key of [`LB4_FRAGS_MAP`]: a datagram, as its fragments name it (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 12);

/// Value of [`LB4_FRAGS_MAP`]: the ports the datagram's first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag4Ports {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<Frag4Ports>() == 4);

/// The slot after which the local list (externalTrafficPolicy Local) starts; the list for
/// every origin ends below it, so each list holds at most `LOCAL_SLOT_BASE - 1` backends.
pub const LOCAL_SLOT_BASE: u16 = 0x8000;

/// Default sizes; the agent may set others at load time.
pub const LB4_SERVICES_DEFAULT_MAX: u32 = 65_536;
pub const LB4_BACKENDS_DEFAULT_MAX: u32 = 65_536;
pub const LB4_REVNAT_DEFAULT_MAX: u32 = 65_536;

/// Key of [`LB4_SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Key {
    /// The frontend address (ClusterIP, externalIP, LoadBalancer IP or node address).
    pub addr_be: u32,
    /// The frontend port (Service port, or nodePort for a node address).
    pub port_be: u16,
    /// 0 for the frontend entry, 1..=count for backend slots.
    pub slot: u16,
    /// [`crate::IPPROTO_TCP`] or [`crate::IPPROTO_UDP`].
    pub proto: u8,
    /// Padding, zero. Two fields, not `[u8; 3]`: LLVM zeroes three bytes in a row with a call
    /// to `memset`, which in BPF is a byte loop in a function of its own, on every lookup.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl Lb4Key {
    /// The key of `addr_be:port_be/proto`'s `slot` (0: the frontend entry).
    #[inline(always)]
    pub const fn new(addr_be: u32, port_be: u16, slot: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            slot,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}
const _: () = assert!(core::mem::size_of::<Lb4Key>() == 12);
const _: () = assert!(core::mem::offset_of!(Lb4Key, _pad1) == 10);

/// Value of [`LB4_SERVICES_MAP`]. In slot 0: `count`, `rev_nat_id`, `flags` (and, with
/// [`SVC_FLAG_AFFINITY`], the affinity timeout in `backend_id`). In slots 1..=count:
/// `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Service {
    /// The backend id this slot points at (slots >= 1). In slot 0: with
    /// [`SVC_FLAG_AFFINITY`], the sessionAffinity timeout in seconds, else 0.
    pub backend_id: u32,
    /// Number of backend slots (slot 0 only). 0 means: reject new connections.
    pub count: u16,
    /// `SVC_FLAG_*` (slot 0 only).
    pub flags: u16,
    /// The reverse-NAT id of this frontend (slot 0 only).
    pub rev_nat_id: u32,
    /// With [`SVC_FLAG_EXT_LOCAL`] (slot 0 only): the number of slots after
    /// [`LOCAL_SLOT_BASE`] that hold the node's own endpoints, for traffic from outside. 0:
    /// such traffic is dropped.
    pub local_count: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Lb4Service>() == 16);

/// The frontend is a ClusterIP: reachable from pods (and the node), not from the uplink.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// The frontend is a node address with a nodePort.
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
/// The frontend is an externalIP.
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
/// The frontend is a LoadBalancer status ingress IP.
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// externalTrafficPolicy: Local. Traffic from outside (arriving on an uplink) goes only to
/// the `local_count` slots after [`LOCAL_SLOT_BASE`], keeping the client's address; the
/// node's pods still use slots 1..=count (kube-proxy sends in-cluster traffic to every
/// endpoint).
pub const SVC_FLAG_EXT_LOCAL: u16 = 1 << 4;

/// loadBalancerSourceRanges: a new flow to this frontend is made only for a client whose
/// address is in one of the ranges [`LB4_SRC_RANGES_MAP`] holds under the frontend's
/// `rev_nat_id`; any other is dropped (kube-proxy's firewall chain). Set on LoadBalancer
/// frontends only, once their ranges are written.
pub const SVC_FLAG_SRC_RANGES: u16 = 1 << 5;
/// With [`SVC_FLAG_SRC_RANGES`]: one of the ranges holds the node's address, so the node's
/// own connections may use the frontend (kube-proxy's `allowFromNode`). Socket LB, which
/// cannot know a socket's source address at `connect()`, decides by this alone.
pub const SVC_FLAG_SRC_RANGES_NODE: u16 = 1 << 6;

/// sessionAffinity ClientIP: a new flow from a client goes to the backend its last new flow to
/// this frontend went to, if that was less than the timeout (slot 0's `backend_id`, seconds)
/// ago and the backend is still the frontend's ([`LB4_AFFINITY_MATCH_MAP`]); else one is
/// chosen as usual and remembered in [`LB4_AFFINITY_MAP`].
pub const SVC_FLAG_AFFINITY: u16 = 1 << 7;

/// internalTrafficPolicy Local with no endpoint on this node (the Service has some elsewhere):
/// `count` is 0 and a new flow is dropped, as kube-proxy drops it ("has no local endpoints"),
/// not refused as for a Service without endpoints.
pub const SVC_FLAG_NO_LOCAL_DROP: u16 = 1 << 8;

/// Maglev: new flows to this frontend from its `count` slots (not the local list of
/// [`SVC_FLAG_EXT_LOCAL`]) take the backend that [`LB4_MAGLEV_MAP`]'s table for its
/// `rev_nat_id` gives their tuple's hash, so every node picks the same backend for a flow.
/// Without a table there (none is written for an empty list), the hash picks a slot: the same
/// backend for a flow on this node, not across nodes.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 9;

/// `LB4_MAGLEV`: the frontend's `rev_nat_id` (u32) -> [`MaglevTable`]. A hash map without
/// preallocation: only Maglev frontends take room (64 KiB each). Written whole, so a
/// program reads an old or a new table, never a mix.
pub const LB4_MAGLEV_MAP: &str = "LB4_MAGLEV";
/// At most this many Maglev frontends. Linux before 5.11 charges a map's whole possible size
/// to the memory lock limit at creation, preallocated or not, and refuses one over 4 GiB
/// (E2BIG): 65,536 tables of 64 KiB did not load on 5.10; 4,096 charge 256 MiB.
pub const LB4_MAGLEV_MAX: u32 = 4_096;
/// `LB4_XDP_TX`: an uplink's ifindex (u32) -> how the XDP program is attached there
/// ([`XDP_TX_NATIVE`] or [`XDP_TX_GENERIC`]), for the uplinks whose XDP program may send a
/// translated packet out itself: back out of the same uplink (XDP_TX), or to another uplink of
/// this map in the same mode (XDP_REDIRECT). Written by the agent (`--xdp-tx`): a veth in
/// native mode drops what it is sent from XDP unless its peer takes XDP frames, which only
/// the operator knows. An uplink not in the map leaves such packets to TC.
pub const LB4_XDP_TX_MAP: &str = "LB4_XDP_TX";
/// At most this many uplinks in [`LB4_XDP_TX_MAP`].
pub const LB4_XDP_TX_MAX: u32 = 64;
/// `LB4_UPLINK_MACS`: an uplink's ifindex (u32) -> its MAC address (u64: the address's six
/// bytes first in memory, then two zero bytes), for every uplink with sluice's XDP program.
/// XDP has no `skb->pkt_type`: it compares a new flow's destination MAC with this, so that a
/// frame for another host (a bridge flooding it) starts no flow here and goes to TC, which
/// passes it as the stack drops it. Written by the agent at every sync; an uplink not in the
/// map is not checked at XDP (TC still checks it).
pub const LB4_UPLINK_MACS_MAP: &str = "LB4_UPLINK_MACS";
/// [`LB4_XDP_TX_MAP`]: the uplink's XDP program runs in the driver.
pub const XDP_TX_NATIVE: u32 = 1;
/// [`LB4_XDP_TX_MAP`]: the uplink's XDP program runs on the skb (generic XDP).
pub const XDP_TX_GENERIC: u32 = 2;

/// The Maglev table's size: a prime, Cilium's default.
pub const MAGLEV_M: usize = 16_381;

/// A Maglev lookup table: position -> backend id (ids are this node's own; the backend at
/// each position is the same on every node, since the table is computed from the backends'
/// addresses and ports and a seed the cluster shares).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    /// Mixed into each flow's hash (the agent's `--maglev-seed`, the same on every node).
    pub seed: u32,
    pub ids: [u32; MAGLEV_M],
}
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 + 4 * MAGLEV_M);
crate::impl_pod!(MaglevTable);

/// A flow's hash for Maglev: its tuple as the packet carries it (network order), the same on
/// every node. Shared by the programs and the agent's tests.
pub fn maglev_hash(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9;
    for w in [
        saddr_be,
        daddr_be,
        u32::from(sport_be) | (u32::from(dport_be) << 16),
        u32::from(proto),
    ] {
        h = mix32(h ^ w);
    }
    h
}

/// The position in a Maglev table of a flow of hash `hash` ([`maglev_hash`]) under `seed`.
pub fn maglev_position(hash: u32, seed: u32) -> usize {
    (mix32(hash ^ seed) % MAGLEV_M as u32) as usize
}

/// The murmur3 finalizer: every input bit moves about half the output bits.
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `LB4_AFFINITY`: [`Affinity4Key`] -> [`Affinity4Value`]; LRU hash; the programs' own state
/// (the agent only reads it). Which backend a client's last new flow to a frontend went to,
/// and when.
pub const LB4_AFFINITY_MAP: &str = "LB4_AFFINITY";
pub const LB4_AFFINITY_DEFAULT_MAX: u32 = 65_536;

/// Key of [`LB4_AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    /// The client's address (network order); 0 for the node's own sockets (socket LB, which
    /// cannot know a socket's source address at `connect()`).
    pub client_be: u32,
    /// The frontend's reverse-NAT id.
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<Affinity4Key>() == 8);

/// Value of [`LB4_AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity4Value {
    /// When the client's last new flow was made (`bpf_ktime_get_ns`).
    pub last_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Affinity4Value>() == 16);

/// `LB4_AFFINITY_MATCH`: [`AffinityMatchKey`] -> 1 (u8); hash, the size of
/// [`LB4_SERVICES_MAP`] (whose slots bound the pairs); written by the agent, read by the
/// programs. The backends of each frontend with [`SVC_FLAG_AFFINITY`]: a remembered
/// backend not here has left the frontend, and the client's stickiness ends with it.
pub const LB4_AFFINITY_MATCH_MAP: &str = "LB4_AFFINITY_MATCH";

/// Key of [`LB4_AFFINITY_MATCH_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);

/// `LB4_SRC_RANGES`: [`SrcRange4Key`] -> 1 (u8); LPM trie, not preallocated; written by the
/// agent, read by the programs. A frontend's loadBalancerSourceRanges: its `rev_nat_id` (all
/// 32 bits always matched) then the range, so a key's prefix length is 32 + the range's.
pub const LB4_SRC_RANGES_MAP: &str = "LB4_SRC_RANGES";
pub const LB4_SRC_RANGES_DEFAULT_MAX: u32 = 16_384;

/// The data of an [`LB4_SRC_RANGES_MAP`] key (the prefix length precedes it in the key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRange4Key {
    /// The frontend's reverse-NAT id, in network byte order (the trie matches bytes in order).
    pub rev_nat_id_be: u32,
    /// The range's address (a client's, in a lookup), network byte order.
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4Key>() == 8);
/// The bits of an [`SrcRange4Key`] that name the frontend.
pub const SRC_RANGE_ID_BITS: u32 = 32;

/// Value of [`LB4_BACKENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `BACKEND_FLAG_*`.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Lb4Backend>() == 8);

/// The backend runs on this node: its replies come back through the node by themselves. Traffic
/// from outside to a backend without it is SNATed to the node (externalTrafficPolicy Cluster).
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// Value of [`LB4_REVNAT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4RevNat {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Lb4RevNat>() == 8);

/// Value of [`LB4_CONFIG_MAP`] index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Config {
    /// The source address for hairpin traffic (a pod reaching itself through a Service):
    /// the kernel drops a packet whose source is the receiver's own address, so such flows are
    /// SNATed to this address. It must not be an address of the node (the node would drop
    /// the packet as a martian before routing it) and pods must send it to the node (their
    /// default route does), like Cilium's 169.254.42.1. 0: hairpin flows will not work.
    pub hairpin_snat_be: u32,
    /// The node's own address that traffic from outside to a backend on another node is
    /// SNATed to, so that the backend's replies come back through this node. 0: no SNAT (such
    /// flows are dropped and counted).
    pub snat_addr_be: u32,
    /// The source ports SNAT chooses from (host order, inclusive). The agent keeps the range
    /// clear of the NodePort range and of the node's ephemeral ports, so that a SNATed flow
    /// never takes the tuple of a connection the node makes itself.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `LB4_CONFIG_FLAG_*`.
    pub flags: u32,
}

/// [`Lb4Config::flags`]: new TCP flows from outside to a backend on another node go by direct
/// server return (`--lb-mode dsr`): DNAT only, the frontend carried to the backend's node in an
/// IPv4 option of the SYN, and the replies sent from that node straight to the client. UDP
/// flows are SNATed as without it.
pub const LB4_CONFIG_FLAG_DSR: u32 = 1 << 0;
const _: () = assert!(core::mem::size_of::<Lb4Config>() == 16);

/// Value of [`LB4_SVC_CIDRS_MAP`] index 0: the first `count` of the prefixes, as network and
/// mask (network order; the network has no bits past the mask).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCidrs4 {
    pub count: u32,
    pub net_be: [u32; SVC_CIDRS_MAX],
    pub mask_be: [u32; SVC_CIDRS_MAX],
}
const _: () = assert!(core::mem::size_of::<SvcCidrs4>() == 4 + 8 * SVC_CIDRS_MAX);

impl SvcCidrs4 {
    /// Whether `addr_be` is inside one of the prefixes.
    #[inline(always)]
    pub fn contains(&self, addr_be: u32) -> bool {
        let mut i = 0;
        while i < SVC_CIDRS_MAX {
            if (i as u32) < self.count && addr_be & self.mask_be[i] == self.net_be[i] {
                return true;
            }
            i += 1;
        }
        false
    }
}

crate::impl_pod!(
    Lb4Key,
    Lb4Service,
    Lb4Backend,
    Lb4RevNat,
    Lb4Config,
    SvcCidrs4,
    FeAddr4,
    RejectBudget,
    Frag4Key,
    Frag4Ports,
    SrcRange4Key,
    Affinity4Key,
    Affinity4Value,
    AffinityMatchKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_filter_finds_the_ports_it_was_given_and_tells_near_nodeports_apart() {
        let mut a = FeAddr4::default();
        for p in [80, 443, 30000] {
            a.add_port(p);
        }
        for p in [80, 443, 30000] {
            assert!(a.may_have_port(p), "port {p}");
        }
        // NodePorts 256 apart (the plain low byte would give them one bit), and the node's
        // own ports (SSH, the kubelet).
        for p in [30256, 30512, 22, 10250, 8080] {
            assert!(!a.may_have_port(p), "port {p}");
        }
        // Every bit is reachable: the whole NodePort range covers the filter.
        let mut all = FeAddr4::default();
        for p in 30000..=32767 {
            all.add_port(p);
        }
        assert_eq!(all.ports, [u64::MAX; FE_PORT_WORDS]);
    }
}
