//! Direct server return (`--lb-mode dsr`), in Cilium's IPv4-option form, for TCP flows from
//! outside to a backend on another node.
//!
//! - The ingress node DNATs the flow's packets only (the client's address stays) and forwards
//!   them to the backend's node by FIB lookup and redirect. Each of the client's SYNs carries
//!   the frontend in an IPv4 option ([`add_option`]): type [`OPT_TYPE`] (Cilium's: copied on
//!   fragmentation, number 26), length 8, the frontend's port, then its address, in network
//!   order. Only SYNs: the backend's node keeps what the option said for the rest of the flow.
//! - The backend's node notes the option at its uplink's ingress ([`note`]) in a reverse entry
//!   (backend -> client, showing the frontend), then passes the packet to the pod with the
//!   option in it (Linux ignores an option it does not know on a packet it receives). The
//!   pod's replies are routed by the stack as any of its traffic, and get the frontend as
//!   their source at the uplink's egress (`programs::reply`), to leave for the client
//!   directly.
//!
//! UDP keeps SNAT: every datagram would need the option (no handshake to carry it once), and a
//! datagram near the MTU has no room for it.
use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, programs::TcContext};
use proxy_common::{
    CT_FLAG_DSR, CT_FLAG_SYN, CTR_DSR_NOTED, CTR_PASS_NOT_FRONTEND, Ct4Entry, IPPROTO_TCP,
    LB4_CONFIG_FLAG_DSR, Lb4Config, SVC_FLAG_CLUSTER_IP, SVC_FLAG_NODE_PORT,
};

use crate::{
    conntrack::{self, translated_key},
    fib::{self, Fib, Route},
    lb,
    maps::LB4_CONFIG,
    nat::{RewriteFailed, csum_add, diff, fold, put},
    parse::{ETH_LEN, Flow, IP_CSUM_OFF, PACKET_HOST, TCP_ACK, TCP_SYN, pkt_type, read},
    programs::note_pod_client,
};

/// The option's type: copied into fragments (0x80), class 0, number 26 (Cilium's).
pub const OPT_TYPE: u8 = 0x9a;
/// The option's length in bytes (type, length, port, address).
pub const OPT_LEN: u32 = 8;

/// Whether the node sends `f`'s new flow to a backend on another node by direct server return:
/// the mode is on, and it is a TCP flow whose SYN has room for the option (no IP options of
/// its own, which a SYN from outside practically never has; such a flow is SNATed).
#[inline(always)]
pub fn wanted(cfg: &Lb4Config, f: &Flow) -> bool {
    cfg.flags & LB4_CONFIG_FLAG_DSR != 0 && f.proto == IPPROTO_TCP && f.ihl_bytes == 20
}

/// The route for `f`'s new flow by direct server return to the backend `backend_be` on
/// another node, or `None` for a flow to SNAT instead:
/// - its SYN with the option does not fit the route (a TCP Fast Open SYN with a full segment
///   of data), or there is no route (the SNAT path refuses it);
/// - its client is reached by the same next hop as the backend (by address): a pod of the
///   backend's node, or a network behind it, whose packets would reach that node from its
///   uplink with its own pod's address as their source, which strict reverse-path filtering
///   there drops. (Where clients and nodes share a router, every flow is SNATed: telling
///   outside clients from pods there needs the nodes' pod CIDRs, not the FIB.) No route back
///   to the client: the backend's node decides.
#[inline(always)]
pub fn route(ctx: &TcContext, f: &Flow, backend_be: u32) -> Option<Route> {
    route_by(f, backend_be, fib::wire_len(ctx, f), |from, to, len| {
        fib::lookup(ctx, from, to, f.proto, len)
    })
}

/// [`route`] for a packet of `len` bytes (without the option), with `lookup(from, to, len)`
/// the FIB lookup of the hook it runs at: TC's, and XDP's (`xdp::new_flow`), which so decide
/// alike.
#[inline(always)]
pub fn route_by(
    f: &Flow,
    backend_be: u32,
    len: u16,
    lookup: impl Fn(u32, u32, u16) -> Fib,
) -> Option<Route> {
    let Fib::Route(to_backend) = lookup(f.saddr_be, backend_be, len.saturating_add(OPT_LEN as u16))
    else {
        return None;
    };
    match lookup(f.daddr_be, f.saddr_be, 0) {
        Fib::Route(back) if back.same_hop(&to_backend) => None,
        _ => Some(to_backend),
    }
}

/// Whether `f`, a packet of a direct-server-return flow, is one that carries the option: a
/// client's SYN, with room for it.
#[inline(always)]
pub fn carries_option(f: &Flow) -> bool {
    f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && f.ihl_bytes == 20
}

/// Inserts the option naming the frontend `fe_addr_be:fe_port_be` after the IPv4 header of
/// `f`'s packet (no options of its own: [`carries_option`]), with the header's length, total
/// length and checksum brought up to date. The TCP checksum does not cover IP options. The
/// packet grows by [`OPT_LEN`]; its pointers must be read again after this.
#[inline(always)]
pub fn add_option(
    ctx: &TcContext,
    f: &Flow,
    fe_addr_be: u32,
    fe_port_be: u16,
) -> Result<(), RewriteFailed> {
    let old_csum: u16 = read(ctx.data(), ctx.data_end(), IP_CSUM_OFF).ok_or(RewriteFailed)?;
    // The header's first word as it lies in memory: version and length, TOS, total length.
    let old_word: u32 = read(ctx.data(), ctx.data_end(), ETH_LEN).ok_or(RewriteFailed)?;
    ctx.adjust_room(OPT_LEN as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| RewriteFailed)?;
    let h = with_option(f, old_word, old_csum, fe_addr_be, fe_port_be);
    put(ctx, ETH_LEN, h.first_word)?;
    put(ctx, IP_CSUM_OFF, h.csum)?;
    put(ctx, ETH_LEN + 20, h.option)
}

/// What an IPv4 header without options becomes with the option in it.
pub struct WithOption {
    /// The header's first word as it lies in memory: version and length 7 words, TOS, total
    /// length.
    pub first_word: u32,
    /// The header checksum.
    pub csum: u16,
    /// The option's two words, to follow the 20-byte header.
    pub option: [u32; 2],
}

/// The option naming `fe_addr_be:fe_port_be` for the packet `f`, whose header's first word is
/// `old_word` (as it lies in memory) and checksum `old_csum`: the words that change, for TC's
/// [`add_option`] and XDP's alike.
#[inline(always)]
pub fn with_option(
    f: &Flow,
    old_word: u32,
    old_csum: u16,
    fe_addr_be: u32,
    fe_port_be: u16,
) -> WithOption {
    let word = old_word.to_ne_bytes();
    let tot_len = f.tot_len.wrapping_add(OPT_LEN as u16).to_be_bytes();
    let first_word = u32::from_ne_bytes([0x47, word[1], tot_len[0], tot_len[1]]);
    let port = fe_port_be.to_ne_bytes();
    let opt_head = u32::from_ne_bytes([OPT_TYPE, OPT_LEN as u8, port[0], port[1]]);
    let sum = csum_add(csum_add(diff(old_word, first_word), opt_head), fe_addr_be);
    WithOption {
        first_word,
        csum: !fold(csum_add(u32::from(!old_csum), sum)),
        option: [opt_head, fe_addr_be],
    }
}

/// At an uplink's ingress, for a packet with IP options: whether `f` is a client's SYN for
/// this host carrying the option (its header only; what it names is [`note`]'s to look up).
/// Reads no map: most packets with IP options leave here.
#[inline(always)]
pub fn is_noted_syn(ctx: &TcContext, f: &Flow) -> bool {
    if f.proto != IPPROTO_TCP || !carries_option_in(f) || !for_this_host(ctx) {
        return false;
    }
    read::<[u8; 2]>(ctx.data(), ctx.data_end(), ETH_LEN + 20)
        .is_some_and(|head| head[0] == OPT_TYPE && u32::from(head[1]) == OPT_LEN)
}

/// The DSR SYN `f` (as [`is_noted_syn`] found it, in its own program `sluice_dsr_note`):
/// `None` if it is none after all; else its counter, the packet to be passed on as it is:
/// `dsr_noted` when the flow's reverse entry (endpoint -> client, showing the frontend the
/// option names) was written, so that the endpoint's replies are translated at the egress;
/// `pass_not_a_frontend` when the option names no frontend this node serves from outside (an
/// externalIP or load balancer address with that port, or a NodePort: on the other node's
/// address, so looked up on this node's own, `Lb4Config::snat_addr_be`), or another live flow
/// holds the tuple.
#[inline(always)]
pub fn note(ctx: &TcContext, f: &Flow) -> Option<u32> {
    if !is_noted_syn(ctx, f) {
        return None;
    }
    // Its type and length checked: the port, then the address.
    let opt = read::<[u32; 2]>(ctx.data(), ctx.data_end(), ETH_LEN + 20)?;
    let head = opt[0].to_ne_bytes();
    // A DSR SYN: from here it is passed on whatever happens (its destination is an endpoint,
    // not a frontend).
    Some(
        if noted(ctx, f, opt[1], u16::from_ne_bytes([head[2], head[3]])) {
            CTR_DSR_NOTED
        } else {
            CTR_PASS_NOT_FRONTEND
        },
    )
}

/// [`note`]'s reverse entry for the DSR SYN `f` whose option names `fe_addr_be:fe_port_be`,
/// if that is a frontend this node serves from outside: whether it was written (or is this
/// flow's already).
#[inline(always)]
fn noted(ctx: &TcContext, f: &Flow, fe_addr_be: u32, fe_port_be: u16) -> bool {
    // SAFETY: the config is plain integers, copied out.
    let cfg: Lb4Config = LB4_CONFIG.get(0).copied().unwrap_or_default();
    // The frontend itself (an externalIP or load balancer address, or a NodePort on this
    // node's address), else a NodePort of that port on this node's own address (the option
    // names the other node's). Never a ClusterIP, not served from outside.
    let fe = match lb::frontend(fe_addr_be, fe_port_be, f.proto) {
        Some(fe) => fe,
        None => match lb::frontend(cfg.snat_addr_be, fe_port_be, f.proto) {
            Some(fe) if fe.flags & SVC_FLAG_NODE_PORT != 0 => fe,
            _ => return false,
        },
    };
    if fe.flags & SVC_FLAG_CLUSTER_IP != 0 {
        return false;
    }
    let now = conntrack::now();
    let rev = Ct4Entry {
        seen_ns: now,
        addr_be: f.saddr_be,
        port_be: f.sport_be,
        flags: CT_FLAG_DSR | CT_FLAG_SYN,
        nat_addr_be: fe_addr_be,
        nat_port_be: fe_port_be,
        rev_nat_id: fe.rev_nat_id,
        ..Default::default()
    };
    let key = translated_key(f, 0, 0, f.daddr_be, f.dport_be);
    // Not over another live flow's entry; this flow's own (a retransmitted SYN) is kept.
    if conntrack::claim(&key, &rev, now) != Some(true) {
        return false;
    }
    // A client whose route does not leave by this uplink (a pod of this node that called
    // another node's NodePort) gets the replies through its pod's egress, which looks up only
    // the clients noted, as for TC's own new flows.
    if !fib::back_by_ingress(ctx, f.daddr_be, f.saddr_be, f.proto) {
        note_pod_client(f.saddr_be);
    }
    true
}

/// Whether the frame was sent to this host's MAC address. TC ingress also sees frames for
/// other hosts (a bridge floods a frame while it has not learnt where the destination MAC is,
/// and TC runs before IP drops such a frame): another node's DSR SYN must not be noted here.
#[inline(always)]
fn for_this_host(ctx: &TcContext) -> bool {
    pkt_type(ctx) == PACKET_HOST
}

/// A client's SYN with exactly one 8-byte option's room of IP header.
#[inline(always)]
fn carries_option_in(f: &Flow) -> bool {
    f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && f.ihl_bytes == 20 + OPT_LEN
}
