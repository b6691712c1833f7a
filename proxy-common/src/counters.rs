//! Per-CPU packet counters: one slot per verdict or drop reason, so that every packet the
//! programs see is accounted for in exactly one "verdict" slot.

/// `PKT_COUNTERS_V3`: index (u32, a `CTR_*` constant) -> [`Counter`]; `PerCpuArray` of
/// [`CTR_SLOTS`] entries, of which the first [`CTR_MAX`] are used; written by every program,
/// read (summed over CPUs) by userspace. The spare slots let counters be added without
/// changing the map (the first version, `PKT_COUNTERS`, had exactly 16; the second,
/// `PKT_COUNTERS_V2`, 64, all used).
pub const PKT_COUNTERS_MAP: &str = "PKT_COUNTERS_V3";

/// The counter map's size: room for counters yet to come.
pub const CTR_SLOTS: u32 = 128;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $idx:literal, $label:literal;)+) => {
        $( $(#[doc = $doc])* pub const $name: u32 = $idx; )+
        /// Names of the counters, indexed by their `CTR_*` value, for metrics and the CLI.
        pub const COUNTER_NAMES: [&str; CTR_MAX as usize] = [$($label),+];
    };
}

counters! {
    /// Every packet a program saw, whatever became of it (not a verdict).
    CTR_SEEN = 0, "seen";
    /// Passed untouched: not IPv4 (ARP, IPv6 until its datapath lands, ...).
    CTR_PASS_NOT_IPV4 = 1, "pass_not_ipv4";
    /// Passed untouched: IPv4 but neither TCP nor UDP nor an ICMP error about them (from a
    /// pod to a ClusterIP, such packets are rejected instead).
    CTR_PASS_OTHER_PROTO = 2, "pass_other_proto";
    /// Passed untouched: a fragment that is not translated: a later fragment whose datagram's
    /// first fragment this program did not look up (not to a frontend, or out of order), or
    /// a fragment of anything but TCP and UDP (see ARCHITECTURE.md).
    CTR_PASS_FRAGMENT = 3, "pass_fragment";
    /// Passed untouched: too short or inconsistent to parse; the kernel's own checks decide.
    CTR_PASS_MALFORMED = 4, "pass_malformed";
    /// Passed untouched: no frontend and no conntrack entry matched.
    CTR_PASS_NO_MATCH = 5, "pass_no_match";
    /// Translated: a new flow to a frontend, DNATed to a backend chosen at random.
    CTR_NEW_FLOW = 6, "new_flow";
    /// Translated: a packet of a known flow, DNATed to its pinned backend.
    CTR_CT_HIT = 7, "ct_hit";
    /// Translated: a reply, its source put back to the frontend's address and port.
    CTR_REPLY = 8, "reply";
    /// Rejected: a frontend with no backends; an ICMP port unreachable was sent back.
    CTR_REJECT_NO_BACKEND = 9, "reject_no_backend";
    /// Dropped: a frontend with no backends, and the ICMP could not be built.
    CTR_DROP_REJECT_FAILED = 10, "drop_reject_failed";
    /// Dropped: a backend slot pointed at a missing backend (a half-written service).
    CTR_DROP_NO_BACKEND_ENTRY = 11, "drop_no_backend_entry";
    /// Dropped: the conntrack entry could not be written.
    CTR_DROP_CT_WRITE = 12, "drop_ct_write";
    /// Dropped: rewriting the packet (store or checksum helper) failed.
    CTR_DROP_REWRITE = 13, "drop_rewrite";
    /// Not a verdict: of the translated packets, those hairpinned (a pod to itself via SNAT).
    CTR_HAIRPIN = 14, "hairpin";
    /// Passed: a reply seen at ingress, to be translated at egress after routing.
    CTR_PASS_REPLY_AT_EGRESS = 15, "pass_reply_at_egress";
    /// Translated: a new flow from outside to a backend on another node, DNATed and SNATed
    /// to the node, and forwarded (externalTrafficPolicy Cluster).
    CTR_NEW_FLOW_SNAT = 16, "new_flow_snat";
    /// Dropped: no free SNAT source port for a new flow to a remote backend (every port tried
    /// was taken by a live flow to the same backend); see ARCHITECTURE.md.
    CTR_DROP_SNAT_PORTS = 17, "drop_snat_ports_exhausted";
    /// Dropped: traffic from outside to an externalTrafficPolicy Local frontend on a node
    /// without a local endpoint, or from a pod to a ClusterIP with internalTrafficPolicy Local
    /// and none, as kube-proxy drops it.
    CTR_DROP_NO_LOCAL_BACKEND = 18, "drop_no_local_backend";
    /// Dropped: a packet to forward with a redirect had no route (FIB lookup failed), or was
    /// too big for the route without the DF bit, or its TTL ran out.
    CTR_DROP_FIB = 19, "drop_fib";
    /// Translated: an ICMP error about a translated flow, its quoted packet and addresses put
    /// back to what the client sent.
    CTR_ICMP_ERROR = 20, "icmp_error";
    /// Rejected: a packet too big for the route to its remote backend, with DF set: an ICMP
    /// fragmentation needed went back to the client (path-MTU discovery).
    CTR_REJECT_FRAG_NEEDED = 21, "reject_frag_needed";
    /// Dropped: a flow needs SNAT to a remote backend but the agent set no SNAT address.
    CTR_DROP_NO_SNAT_ADDR = 22, "drop_no_snat_address";
    /// Not a verdict: SNAT source ports tried that a live flow already held.
    CTR_SNAT_PORT_TAKEN = 23, "snat_port_taken";
    /// Not a verdict: of the translated packets, those forwarded with a FIB redirect.
    CTR_REDIRECT = 24, "redirect";
    /// Not a verdict: new SNATed flows given the port of a closed flow still in its TIME_WAIT
    /// hold, because every port tried was held (the range is running out for that backend).
    CTR_SNAT_PORT_REUSED = 25, "snat_port_reused";
    /// Socket LB, not a packet: a `connect()` to a frontend, translated to a backend.
    CTR_SOCK_CONNECT = 26, "sock_connect";
    /// Socket LB, not a packet: a `sendmsg()` to a frontend (unconnected UDP), translated.
    CTR_SOCK_SENDMSG = 27, "sock_sendmsg";
    /// Socket LB, not a packet: a `recvmsg()` or `getpeername()` shown the frontend's address.
    CTR_SOCK_REVERSE = 28, "sock_reverse";
    /// Socket LB, not a packet: a `connect()` or `sendmsg()` to a frontend with no backends,
    /// refused (ECONNREFUSED; EPERM before Linux 5.18 from the node's own namespace).
    CTR_SOCK_REJECT_NO_BACKEND = 29, "sock_reject_no_backend";
    /// Socket LB, not a packet: a call from a pod's namespace left to the TC path
    /// (`--socket-lb host-only`, or a frontend with no backends before Linux 5.18).
    CTR_SOCK_PASS_TO_TC = 30, "sock_pass_to_tc";
    /// Socket LB, not a packet: a translation whose reverse entry could not be written (the
    /// socket still goes to the backend; recvmsg and getpeername show the backend).
    CTR_SOCK_REVNAT_WRITE = 31, "sock_revnat_write_failed";
    /// Passed untouched at ingress, with no conntrack lookup: the destination is no
    /// frontend's address (nor the hairpin or SNAT address), so the packet belongs to no
    /// translated flow. Plain pod traffic, and connections socket LB translated at connect().
    CTR_PASS_NOT_FRONTEND = 32, "pass_not_a_frontend_address";
    /// Passed untouched at a pod's egress, with no conntrack lookup: the destination has
    /// never been the client of a flow translated at TC, so the packet is no reply to
    /// translate. Plain pod traffic, and connections socket LB translated at connect().
    CTR_PASS_NOT_POD_CLIENT = 33, "pass_not_a_pod_client";
    /// Not a verdict: a new flow's client address could not be added to `LB4_POD_CLIENTS`
    /// (full); the egress filter is off from then on (see `DP_STATE_POD_CLIENTS_FULL`).
    CTR_POD_CLIENTS_FULL = 34, "pod_clients_map_full";
    /// Dropped: an ICMP destination unreachable (no backends, or fragmentation needed) was
    /// due, but this CPU had sent its share for now (`REJECT_PER_SEC`, `REJECT_BURST`).
    CTR_DROP_REJECT_RATE_LIMITED = 35, "drop_reject_rate_limited";
    /// Rejected: a new flow from a pod to a ClusterIP on a port (and protocol) that no
    /// Service serves, or in another protocol than TCP and UDP (ICMP echo, SCTP); an ICMP port
    /// unreachable went back, as kube-proxy's nftables mode does.
    CTR_REJECT_NO_SUCH_PORT = 36, "reject_cluster_ip_port_not_served";
    /// Not a verdict: new flows whose translated tuple was a live flow's (the client used one
    /// source port for two frontends of one backend); the client's port was remapped, as
    /// netfilter does, so that the backend sees two connections.
    CTR_PORT_REMAPPED = 37, "new_flow_port_remapped";
    /// Not a verdict: a SYN-ACK on the tuple of a closed translated flow, the answer to a
    /// direct connection (or one socket LB translated) the client made on the same port: the
    /// closed flow's reverse entry was removed and the SYN-ACK passed untouched.
    CTR_CT_STALE_REVERSE = 38, "ct_stale_reverse_removed";
    /// Not a verdict: a new flow's first packet that met the flow another CPU had just made
    /// from another packet of it (two at once); it followed that flow's backend (counted as a
    /// conntrack hit) and gave back what it had taken.
    CTR_NEW_FLOW_RACE_LOST = 39, "new_flow_race_lost";
    /// Dropped: a new flow's first packet that met the flow another CPU had just made from
    /// another packet of it, with another backend, where one of the two is forwarded by
    /// sluice (from outside to another node): its route was for the wrong backend.
    CTR_DROP_RACE_REDIRECT = 40, "drop_new_flow_race_forwarded";
    /// Not a verdict: later fragments (no ports of their own) that found their datagram's
    /// first fragment in `LB4_FRAGS` and followed its flow (counted under its verdict).
    CTR_FRAGMENT_FOLLOWED = 41, "fragment_followed";
    /// Dropped: a later fragment whose first fragment made no flow here (it was dropped, or
    /// its flow is gone), to a frontend; or, from a pod, one to a ClusterIP whose first
    /// fragment was never seen. Passed, it would go to the Service address itself.
    CTR_DROP_FRAGMENT = 42, "drop_fragment_without_flow";
    /// Dropped: a new flow to a LoadBalancer frontend with loadBalancerSourceRanges from a
    /// client in none of them (kube-proxy's firewall chain drops it before DNAT).
    CTR_DROP_SOURCE_RANGE = 43, "drop_source_range";
    /// Of the socket programs: a connect or send from the node to a LoadBalancer frontend
    /// whose loadBalancerSourceRanges do not hold the node's address, refused with EPERM.
    CTR_SOCK_DENY_SOURCE_RANGE = 44, "sock_deny_source_range";
    /// Of the new flows (TC or socket): sent to the backend the client's last new flow to the
    /// frontend went to (sessionAffinity ClientIP).
    CTR_AFFINITY_HIT = 45, "affinity_hit";
    /// Of the socket programs: a connect or send from the node to a ClusterIP with
    /// internalTrafficPolicy Local and no endpoint on this node, refused with EPERM.
    CTR_SOCK_DENY_NO_LOCAL_BACKEND = 46, "sock_deny_no_local_backend";
    /// Dropped: an SCTP packet whose ports were rewritten and whose checksum could not be
    /// brought up to date (the checksum program missing from `LB4_TAILS`, or the packet not
    /// writable); sent on, its receiver would drop it for its checksum.
    CTR_DROP_SCTP_CHECKSUM = 47, "drop_sctp_checksum";
    /// Dropped: the node's own SCTP to an SCTP frontend, leaving by an uplink untranslated
    /// (socket LB translates TCP and UDP only), which would otherwise go to the default route
    /// with a Service address as its destination.
    CTR_DROP_NODE_SCTP_TO_SERVICE = 48, "drop_node_sctp_to_service";
    /// Dropped: a packet that starts a flow (or is refused for its frontend), whose new-flow
    /// program is missing from `LB4_FLOW_TAILS`, or another node's direct-server-return SYN
    /// whose program (`sluice_dsr_note`) is. Packets of known flows are served without them.
    CTR_DROP_NEW_FLOW_PROGRAM = 49, "drop_new_flow_program";
    /// Dropped: from a pod (or, at an uplink's egress, from the node) to an address inside the
    /// Service CIDRs that no frontend holds, as kube-proxy's nftables mode drops traffic to
    /// unallocated ClusterIPs; sent on, it would leave by the default route.
    CTR_DROP_UNALLOCATED_CLUSTER_IP = 50, "drop_unallocated_cluster_ip";
    /// Of the XDP program on uplinks (`sluice_xdp_from_uplink`), which keeps its own account
    /// (its packets go on to TC, which counts them again): every packet it saw. Each also
    /// counts exactly one of the nine `xdp_*` below.
    CTR_XDP_SEEN = 51, "xdp_seen";
    /// XDP: a packet of an established flow to a backend, DNATed at XDP and passed to the
    /// stack; TC ingress then lets it by as addressed to no frontend.
    CTR_XDP_CT_HIT = 52, "xdp_ct_hit";
    /// XDP: passed untouched to TC as no Service's: not IPv4 TCP or UDP to a frontend's
    /// address (or to a port of it that no frontend and no live flow has), a fragment, or
    /// malformed.
    CTR_XDP_TO_TC_NOT_SERVICE = 53, "xdp_to_tc_not_service";
    /// XDP: passed untouched to TC, which owns what XDP does not do: a packet that changes an
    /// existing flow's state (SYN, FIN, RST), a flow not established yet, a flow whose client
    /// port was remapped, the reply of a flow not SNATed to the node; and the new flows XDP
    /// leaves to TC (refusals, hairpin, a ClusterIP from outside, no SNAT address, the XDP
    /// new-flow program missing).
    CTR_XDP_TO_TC_FLOW = 54, "xdp_to_tc_flow";
    /// XDP: passed untouched to TC because its TCP/UDP checksum may be partial (the field holds
    /// the pseudo-header's sum, as a veth peer with checksum offload sends): XDP cannot see
    /// `ip_summed`, so only TC can update such a checksum right.
    CTR_XDP_TO_TC_PARTIAL_CSUM = 55, "xdp_to_tc_partial_csum";
    /// XDP: a packet of an established flow SNATed to the node (from outside to a backend on
    /// another node), or its backend's reply, translated and sent out by XDP itself (XDP_TX
    /// back out of the uplink, or XDP_REDIRECT to another uplink): it never reaches TC.
    CTR_XDP_TX = 56, "xdp_tx";
    /// XDP: a packet it would have translated and sent out, passed untouched to TC because of
    /// its route: the uplink may not send from XDP (`--xdp-tx`), the neighbour is not resolved
    /// yet, the route leaves by a device XDP may not send to, the packet is too big for it,
    /// there is none, or the TTL runs out. TC forwards it (or answers) as always.
    CTR_XDP_TO_TC_ROUTE = 57, "xdp_to_tc_route";
    /// Answered at ingress with no conntrack lookup, as a packet to no frontend: its
    /// destination is a frontend's address, but no frontend on it and no live flow to it has
    /// the port (`FeAddr4`'s filter), or it is the configured SNAT or hairpin address with no
    /// frontend on it; and it is no reply of a SNATed flow. Passed untouched
    /// (the node's own ports on a NodePort address), or, from a pod to a ClusterIP, refused
    /// and counted as `reject_no_such_port` instead.
    CTR_PASS_NOT_FRONTEND_PORT = 58, "pass_not_a_frontend_port";
    /// XDP: a new flow's first packet from outside to a local backend: backend chosen and the
    /// flow recorded at XDP (`sluice_xdp_new_flow`), DNATed and passed to the stack.
    CTR_XDP_NEW_FLOW = 59, "xdp_new_flow";
    /// XDP: a new flow's first packet from outside to a backend on another node: backend
    /// chosen, SNAT port reserved and the flow recorded at XDP, translated and sent out by XDP
    /// itself; it never reaches TC.
    CTR_XDP_NEW_FLOW_TX = 60, "xdp_new_flow_tx";
    /// XDP: dropped there, as TC would drop it: a new flow from a source outside the
    /// frontend's `loadBalancerSourceRanges`, from outside to an externalTrafficPolicy Local
    /// frontend without a local endpoint, or one that could not be recorded (conntrack
    /// refused the write, the SNAT ports are exhausted, another CPU's copy of the flow took
    /// another route).
    CTR_XDP_DROP = 61, "xdp_drop";
    /// A new TCP flow from outside to a backend on another node, by direct server return
    /// (`--lb-mode dsr`): DNATed only, the frontend written into an IPv4 option of the SYN,
    /// forwarded by FIB lookup and redirect. Its replies go from the backend's node to the
    /// client directly.
    CTR_NEW_FLOW_DSR = 62, "new_flow_dsr";
    /// Passed at an uplink's ingress after noting a direct-server-return SYN (an IPv4 option
    /// naming a frontend this node has) to a local pod: the reverse entry written, so that
    /// the pod's replies leave showing the frontend. A SYN whose option names no frontend of
    /// this node passes as `pass_not_a_frontend`, noted nowhere.
    CTR_DSR_NOTED = 63, "dsr_noted";
    /// Dropped: a new direct-server-return flow whose tuple after DNAT (client address and
    /// port to the backend) is another live flow's. Its port cannot be remapped, as the
    /// backend answers the client's own port, and the tuple cannot be shared.
    CTR_DROP_DSR_TUPLE_TAKEN = 64, "drop_dsr_tuple_taken";
    /// Passed untouched at an uplink's ingress: a frame for another host's MAC address
    /// (`skb->pkt_type` PACKET_OTHERHOST), as a bridge floods a frame while it has not learnt
    /// where its destination is. The stack drops it; no flow starts or moves on this node.
    CTR_PASS_OTHER_HOST = 65, "pass_other_host";
    /// XDP: a new flow's first packet in a frame for another host's MAC address (not the
    /// uplink's own, in `LB4_UPLINK_MACS`, nor broadcast or multicast): to TC untouched, which
    /// passes it as `pass_other_host`.
    CTR_XDP_TO_TC_OTHER_HOST = 66, "xdp_to_tc_other_host";
}

/// The counters that are no TC verdict (`seen`, the socket programs', the XDP program's, and
/// the "of the translated packets, ..." kind): every packet a TC program sees counts `seen`
/// once and exactly one counter not in this list.
pub const NOT_VERDICTS: [u32; 30] = {
    const OTHERS: [u32; 19] = [
        CTR_SEEN,
        CTR_HAIRPIN,
        CTR_SNAT_PORT_TAKEN,
        CTR_REDIRECT,
        CTR_SNAT_PORT_REUSED,
        CTR_SOCK_CONNECT,
        CTR_SOCK_SENDMSG,
        CTR_SOCK_REVERSE,
        CTR_SOCK_REJECT_NO_BACKEND,
        CTR_SOCK_PASS_TO_TC,
        CTR_SOCK_REVNAT_WRITE,
        CTR_POD_CLIENTS_FULL,
        CTR_PORT_REMAPPED,
        CTR_CT_STALE_REVERSE,
        CTR_NEW_FLOW_RACE_LOST,
        CTR_FRAGMENT_FOLLOWED,
        CTR_SOCK_DENY_SOURCE_RANGE,
        CTR_AFFINITY_HIT,
        CTR_SOCK_DENY_NO_LOCAL_BACKEND,
    ];
    let mut all = [CTR_XDP_SEEN; 30];
    let mut i = 0;
    while i < OTHERS.len() {
        all[i] = OTHERS[i];
        i += 1;
    }
    // `all[19]` is `xdp_seen`; XDP's outcomes follow.
    let mut j = 0;
    while j < XDP_OUTCOMES.len() {
        all[20 + j] = XDP_OUTCOMES[j];
        j += 1;
    }
    all
};

/// The XDP program's own account: every packet it sees counts [`CTR_XDP_SEEN`] and exactly
/// one of these.
pub const XDP_OUTCOMES: [u32; 10] = [
    CTR_XDP_CT_HIT,
    CTR_XDP_TO_TC_NOT_SERVICE,
    CTR_XDP_TO_TC_FLOW,
    CTR_XDP_TO_TC_PARTIAL_CSUM,
    CTR_XDP_TX,
    CTR_XDP_TO_TC_ROUTE,
    CTR_XDP_NEW_FLOW,
    CTR_XDP_NEW_FLOW_TX,
    CTR_XDP_DROP,
    CTR_XDP_TO_TC_OTHER_HOST,
];

/// Number of counters in use (at most [`CTR_SLOTS`]).
pub const CTR_MAX: u32 = 67;
const _: () = assert!(CTR_MAX <= CTR_SLOTS);

/// One CPU's share of a counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

crate::impl_pod!(Counter);
