//! Packet tests: the real programs through BPF_PROG_TEST_RUN, one behaviour each. Packets are
//! built and their checksums verified with etherparse (tests/common), never by the datapath.
mod common;

use std::{
    net::Ipv4Addr,
    ops::{Deref, DerefMut},
    sync::{Mutex, PoisonError},
};

use common::*;
use proxy_common::*;
use sluice::dataplane::{
    Backend, Backends, Cidr4, Counters, CtKind, Dataplane, DataplaneConfig, DataplaneError,
    FROM_POD, FROM_UPLINK, Frontend, FrontendKind, Protocol, RawDump, RawEntry, SourceRanges,
    TO_POD, TO_UPLINK, XDP_FROM_UPLINK,
};
use testbed::require_privileged;

const VIP: &str = "198.18.128.1:80";
const CLIENT: &str = "198.19.0.10:40000";
const HAIRPIN: Ipv4Addr = testbed::plan::HAIRPIN_SNAT;
/// The size of the table of new flows (`CT4_NEW`) in these tests: small, so that a flood
/// fills it quickly.
const NEW_MAX: u32 = 1024;

fn config() -> DataplaneConfig {
    DataplaneConfig {
        hairpin_snat: Some(HAIRPIN),
        conntrack_max: 4096,
        conntrack_new_max: NEW_MAX,
        ..Default::default()
    }
}

fn load() -> Dataplane {
    Dataplane::load_with(config()).expect("the programs load and pass the verifier")
}

/// Loaded dataplanes between tests. A load runs the verifier on every program, which is most
/// of a packet test's time on an old kernel under emulation; so a test takes one left by an
/// earlier test, reset to what a fresh load gives
/// (`a_reset_dataplane_is_a_freshly_loaded_one` holds [`Dataplane::reset`] to that).
static LOADED: Mutex<Vec<Dataplane>> = Mutex::new(Vec::new());

/// A test's dataplane; given back when the test ends, unless it failed.
struct Shared(Option<Dataplane>);

impl Deref for Shared {
    type Target = Dataplane;
    fn deref(&self) -> &Dataplane {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut Dataplane {
        self.0.as_mut().expect("taken only on drop")
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(dp) = self.0.take()
            && !std::thread::panicking()
        {
            LOADED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(dp);
        }
    }
}

fn dataplane() -> Shared {
    let earlier = LOADED.lock().unwrap_or_else(PoisonError::into_inner).pop();
    Shared(Some(match earlier {
        Some(mut dp) => {
            dp.reset(config()).expect("a loaded dataplane resets");
            dp
        }
        None => load(),
    }))
}

fn cluster_ip(dp: &mut Dataplane, backends: &[&str]) -> Frontend {
    let f = fe(VIP, Protocol::Tcp, FrontendKind::ClusterIp);
    let b: Vec<Backend> = backends.iter().map(|s| be(s)).collect();
    dp.upsert_service(f, &b).unwrap();
    f
}

/// The UDP ClusterIP the DNS tests use, and its one backend.
const DNS: &str = "198.18.128.2:53";
const DNS_BACKEND: &str = "198.19.0.20:5353";

/// Writes the [`DNS`] Service, with its backend [`DNS_BACKEND`].
fn dns_service(dp: &mut Dataplane) {
    dp.upsert_service(
        fe(DNS, Protocol::Udp, FrontendKind::ClusterIp),
        &[be(DNS_BACKEND)],
    )
    .unwrap();
}

#[test]
fn packets_to_no_service_leave_untouched() {
    require_privileged!("packets_to_no_service_leave_untouched");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let before = dp.counters().unwrap();
    let every = [FROM_POD, TO_POD, FROM_UPLINK, TO_UPLINK];
    for (pkt, progs) in [
        // The ClusterIP on a port or protocol it does not serve: refused from pods (the next
        // test), passed everywhere else.
        (
            tcp(sa(CLIENT), sa("198.18.128.1:81"), SYN, b""),
            &every[1..],
        ),
        (
            udp(sa(CLIENT), sa(VIP), b"udp is another frontend"),
            &every[1..],
        ),
        // A pod address.
        (
            tcp(sa(CLIENT), sa("198.19.0.20:8080"), SYN, b"x"),
            &every[..],
        ),
    ] {
        for prog in progs {
            let (verdict, out) = run(&dp, prog, &pkt);
            assert_eq!(verdict, TC_ACT_UNSPEC, "{prog} passes it");
            assert_eq!(out, pkt, "{prog} leaves every byte as it was");
        }
    }
    let after = dp.counters().unwrap();
    // The pod address is no frontend's: the two ingress programs pass it on the address alone.
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_FRONTEND), 2);
    // The client has no flow translated at TC: the pod's egress passes all three on the
    // destination alone.
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_POD_CLIENT), 3);
    // From outside, the ClusterIP's port 81 is no frontend's and no flow's: the address's
    // port filter passes it with no conntrack lookup. (UDP to port 80 shares TCP 80's bit:
    // it takes the full way.)
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_FRONTEND_PORT), 1);
    assert_eq!(delta(&before, &after, CTR_PASS_NO_MATCH), 4);
    assert_eq!(delta(&before, &after, CTR_SEEN), 10);
    assert!(dp.conntrack().unwrap().is_empty(), "nothing is tracked");
}

#[test]
fn a_cluster_ip_refuses_from_pods_the_ports_no_service_serves() {
    require_privileged!("a_cluster_ip_refuses_from_pods_the_ports_no_service_serves");
    let mut dp = dataplane();
    let http = cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    // An externalIP and the node's NodePort address: their other ports are someone else's.
    let external = Frontend {
        addr: Ipv4Addr::new(198, 18, 192, 1),
        port: 80,
        proto: Protocol::Tcp,
        kind: FrontendKind::ExternalIp,
    };
    dp.upsert_service(external, &[be("198.19.0.20:8080")])
        .unwrap();
    // Other protocols too: an ICMP echo request, and SCTP.
    let ping = {
        let b = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(sa(CLIENT).ip().octets(), sa(VIP).ip().octets(), 64)
            .icmpv4_echo_request(7, 1);
        let mut v = Vec::new();
        b.write(&mut v, &[0u8; 56]).unwrap();
        v
    };
    let mut sctp = udp(sa(CLIENT), sa(VIP), &[0u8; 32]);
    sctp[14 + 9] = 132;
    set_ip_checksum(&mut sctp);
    let refused = [
        tcp(sa(CLIENT), sa("198.18.128.1:81"), SYN, b""),
        udp(sa(CLIENT), sa(VIP), b"udp is another frontend"),
        ping,
        sctp,
    ];
    for pkt in &refused {
        let before = dp.counters().unwrap();
        let (verdict, out) = run(&dp, FROM_POD, pkt);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
        let icmp = check_icmp(&out);
        assert_eq!((icmp.type_, icmp.code), (3, 3), "port unreachable");
        assert_eq!(icmp.src, *sa(VIP).ip(), "from the ClusterIP");
        assert_eq!(icmp.quoted, pkt[14..14 + 28]);
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_REJECT_NO_SUCH_PORT), 1);
        // From outside a ClusterIP is nobody's: passed, as before.
        assert_eq!(run(&dp, FROM_UPLINK, pkt), (TC_ACT_UNSPEC, pkt.clone()));
    }
    let other = tcp(sa(CLIENT), sa("198.18.192.1:81"), SYN, b"");
    assert_eq!(
        run(&dp, FROM_POD, &other),
        (TC_ACT_UNSPEC, other.clone()),
        "an externalIP's other port passes"
    );
    // Once the ClusterIP is gone, its address (kept for live flows) refuses nothing.
    dp.remove_service(http).unwrap();
    assert_eq!(
        run(&dp, FROM_POD, &refused[0]),
        (TC_ACT_UNSPEC, refused[0].clone())
    );
    assert!(dp.conntrack().unwrap().is_empty(), "nothing is tracked");
}

/// kube-proxy's nftables mode drops new traffic from pods and from the node to addresses of the
/// Service CIDRs that no Service holds ("Drop traffic to unallocated ClusterIPs"); sent on, it
/// would leave by the default route.
#[test]
fn unallocated_addresses_of_the_service_cidrs_are_dropped_from_pods_and_the_node() {
    require_privileged!(
        "unallocated_addresses_of_the_service_cidrs_are_dropped_from_pods_and_the_node"
    );
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let cidrs = [
        "198.18.128.0/24".parse().unwrap(),
        "198.18.130.0/23".parse().unwrap(),
    ];
    dp.set_service_cidrs(&cidrs).unwrap();
    let ping = |dst: &str| {
        let b = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(sa(CLIENT).ip().octets(), sa(dst).ip().octets(), 64)
            .icmpv4_echo_request(7, 1);
        let mut v = Vec::new();
        b.write(&mut v, &[0u8; 56]).unwrap();
        v
    };
    let unallocated = [
        tcp(sa(CLIENT), sa("198.18.128.7:80"), SYN, b""),
        udp(sa(CLIENT), sa("198.18.131.250:53"), b"query"),
        ping("198.18.130.1:0"),
        fragment(
            &udp(sa(CLIENT), sa("198.18.128.7:53"), &[7u8; 3000]),
            1480,
            9,
        )[1]
        .clone(),
    ];
    for pkt in &unallocated {
        for program in [FROM_POD, TO_UPLINK] {
            let before = dp.counters().unwrap();
            assert_eq!(run(&dp, program, pkt).0, TC_ACT_SHOT, "{program}");
            let after = dp.counters().unwrap();
            assert_eq!(
                delta(&before, &after, CTR_DROP_UNALLOCATED_CLUSTER_IP),
                1,
                "{program}"
            );
        }
        // From outside, and into pods, such addresses are not the node's to police.
        for program in [FROM_UPLINK, TO_POD] {
            assert_eq!(
                run(&dp, program, pkt),
                (TC_ACT_UNSPEC, pkt.clone()),
                "{program}"
            );
        }
    }
    // The allocated ClusterIP still serves, and still refuses the ports it does not serve.
    let (verdict, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
    let other_port = tcp(sa(CLIENT), sa("198.18.128.1:81"), SYN, b"");
    assert_eq!(
        run(&dp, FROM_POD, &other_port).0,
        TC_ACT_REDIRECT,
        "rejected"
    );
    // Outside the CIDRs: pod to pod, and the rest of the sandbox range, pass.
    for dst in ["198.19.0.20:8080", "198.18.129.7:80", "198.18.132.1:80"] {
        let pkt = tcp(sa(CLIENT), sa(dst), SYN, b"");
        for program in [FROM_POD, TO_UPLINK] {
            assert_eq!(
                run(&dp, program, &pkt),
                (TC_ACT_UNSPEC, pkt.clone()),
                "{dst}"
            );
        }
    }
    // More CIDRs than the datapath holds: an error, and the last good ones stay.
    let many: Vec<Cidr4> = (0..=SVC_CIDRS_MAX as u8)
        .map(|i| Cidr4 {
            addr: Ipv4Addr::new(198, 19, i, 0),
            prefix: 24,
        })
        .collect();
    let err = dp.set_service_cidrs(&many).unwrap_err();
    assert!(
        matches!(err, DataplaneError::MapFull { map: LB4_SVC_CIDRS_MAP, max, .. } if max as usize == SVC_CIDRS_MAX),
        "{err}"
    );
    assert!(err.to_string().contains("size is fixed"), "{err}");
    assert_eq!(run(&dp, FROM_POD, &unallocated[0]).0, TC_ACT_SHOT);
    // None: nothing is dropped for it.
    dp.set_service_cidrs(&[]).unwrap();
    assert_eq!(
        run(&dp, FROM_POD, &unallocated[0]),
        (TC_ACT_UNSPEC, unallocated[0].clone())
    );
}

#[test]
fn a_new_flow_to_a_cluster_ip_is_dnated_to_the_backend_with_valid_checksums() {
    require_privileged!("a_new_flow_to_a_cluster_ip_is_dnated_to_the_backend_with_valid_checksums");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let (verdict, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let seen = check(&out);
    assert_eq!(seen.src, sa(CLIENT), "the source is left alone");
    assert_eq!(seen.dst, sa("198.19.0.20:8080"), "DNAT to the backend");
    let c = dp.counters().unwrap();
    assert_eq!(c[CTR_NEW_FLOW as usize].packets, 1);
    let ct = dp.conntrack().unwrap();
    assert_eq!(ct.len(), 2, "a service entry and a reverse entry: {ct:?}");
}

/// IPv4 BIG TCP (Linux 6.3): a GSO TCP packet over 64 KiB carries tot_len 0. It is
/// translated like any other, its length taken from the packet, as the kernel's iph_totlen()
/// takes it; tot_len 0 on a packet that is not GSO stays malformed.
#[test]
fn a_big_tcp_packet_with_tot_len_0_is_translated() {
    require_privileged!("a_big_tcp_packet_with_tot_len_0_is_translated");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let mut pkt = tcp(sa(CLIENT), sa(VIP), ACK, &[7u8; 1400]);
    pkt[16..18].copy_from_slice(&[0, 0]); // tot_len
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &pkt);
    assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &pkt), "not GSO: untouched");
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_MALFORMED), 1);
    let (verdict, out) = run_gso(&dp, FROM_POD, &pkt, 1000);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(delta(&after, &dp.counters().unwrap(), CTR_CT_HIT), 1);
    // The destination (IP bytes 16..20, TCP bytes 2..4) is the backend's now, and the rest
    // of the packet is as it was but for the checksums.
    assert_eq!(&out[30..34], &[198, 19, 0, 20]);
    assert_eq!(&out[36..38], &8080u16.to_be_bytes());
    assert_eq!(out.len(), pkt.len());
    assert_eq!(&out[16..18], &[0, 0], "tot_len stays 0");
    assert_eq!(&out[54..], &pkt[54..], "the payload is untouched");
}

#[test]
fn a_reply_is_translated_back_to_the_service_address() {
    require_privileged!("a_reply_is_translated_back_to_the_service_address");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let reply = tcp(sa("198.19.0.20:8080"), sa(CLIENT), SYN_ACK, b"hello");
    // Entering at the backend's pod device, the reply is left for after routing ...
    let (verdict, out) = run(&dp, FROM_POD, &reply);
    assert_eq!(
        (verdict, &out),
        (TC_ACT_UNSPEC, &reply),
        "untouched before routing"
    );
    // ... and translated as it leaves at the client's pod device.
    let (verdict, out) = run(&dp, TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let seen = check(&out);
    assert_eq!(
        seen.src,
        sa(VIP),
        "the client sees the Service address and port"
    );
    assert_eq!(seen.dst, sa(CLIENT));
    assert_eq!(seen.payload, b"hello");
    let c = dp.counters().unwrap();
    // At ingress the client's address is no frontend's: no lookup at all.
    assert_eq!(c[CTR_PASS_NOT_FRONTEND as usize].packets, 1);
    assert_eq!(c[CTR_REPLY as usize].packets, 1);
}

#[test]
fn later_packets_of_a_flow_stay_on_their_backend_when_the_backends_change() {
    require_privileged!("later_packets_of_a_flow_stay_on_their_backend_when_the_backends_change");
    let mut dp = dataplane();
    let f = cluster_ip(
        &mut dp,
        &["198.19.0.20:8080", "198.19.0.21:8080", "198.19.0.22:8080"],
    );
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let first = check(&out).dst;
    // Replace every backend: the flow must keep the one it had.
    dp.upsert_service(f, &[be("198.19.0.30:8080")]).unwrap();
    for _ in 0..5 {
        let (verdict, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), ACK, b"data"));
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(check(&out).dst, first, "the flow stays on its backend");
    }
    // A new flow uses the new backend set.
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(sa("198.19.0.10:40001"), sa(VIP), SYN, b""),
    );
    assert_eq!(check(&out).dst, sa("198.19.0.30:8080"));
    let c = dp.counters().unwrap();
    assert_eq!(c[CTR_CT_HIT as usize].packets, 5);
    assert_eq!(c[CTR_NEW_FLOW as usize].packets, 2);
}

#[test]
fn new_flows_are_spread_across_every_backend() {
    require_privileged!("new_flows_are_spread_across_every_backend");
    let mut dp = dataplane();
    let backends = ["198.19.0.20:8080", "198.19.0.21:8080", "198.19.0.22:8080"];
    cluster_ip(&mut dp, &backends);
    let mut hits = std::collections::HashMap::new();
    for port in 0..600u16 {
        let client = std::net::SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 20000 + port);
        let (_, out) = run(&dp, FROM_POD, &tcp(client, sa(VIP), SYN, b""));
        *hits.entry(check(&out).dst).or_insert(0u32) += 1;
    }
    for b in backends {
        let n = hits.get(&sa(b)).copied().unwrap_or(0);
        // Uniform: 200 expected; 20% (120) is over 8 standard deviations away.
        assert!(n >= 120, "{b} got {n} of 600 new flows: {hits:?}");
    }
}

#[test]
fn icmp_rejects_are_rate_limited_and_the_rest_dropped_and_counted() {
    require_privileged!("icmp_rejects_are_rate_limited_and_the_rest_dropped_and_counted");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &[]);
    // A burst far beyond what a CPU may send (REJECT_BURST at once, REJECT_PER_SEC after).
    let n = 2_000u64;
    let before = dp.counters().unwrap();
    let t0 = std::time::Instant::now();
    let mut redirected = 0;
    for i in 0..n {
        let syn = tcp(
            sa(CLIENT),
            sa(VIP),
            SYN,
            &i.to_be_bytes(), // each a packet of its own
        );
        let (verdict, _) = run(&dp, FROM_POD, &syn);
        assert!(verdict == TC_ACT_REDIRECT || verdict == TC_ACT_SHOT);
        redirected += u64::from(verdict == TC_ACT_REDIRECT);
    }
    let ms = t0.elapsed().as_millis() as u64;
    let after = dp.counters().unwrap();
    let rejected = delta(&before, &after, CTR_REJECT_NO_BACKEND);
    let limited = delta(&before, &after, CTR_DROP_REJECT_RATE_LIMITED);
    assert_eq!(rejected, redirected, "each reject is an ICMP sent back");
    assert_eq!(
        rejected + limited,
        n,
        "every SYN was rejected or dropped, and counted"
    );
    // The test may move between CPUs, each with its own budget.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let most = cpus * (REJECT_BURST + (ms + 1) * REJECT_PER_SEC / 1000);
    assert!(
        rejected >= REJECT_BURST && rejected <= most,
        "{rejected} rejects in {ms} ms on {cpus} CPUs (at most {most})"
    );
    // The budget comes back with time.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (verdict, _) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "rejected again after a pause");
}

#[test]
fn a_service_without_backends_rejects_tcp_with_icmp_port_unreachable() {
    require_privileged!("a_service_without_backends_rejects_tcp_with_icmp_port_unreachable");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &[]);
    let syn = tcp(sa(CLIENT), sa(VIP), SYN, b"");
    let (verdict, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the device it came from"
    );
    let icmp = check_icmp(&out);
    assert_eq!(
        (icmp.type_, icmp.code),
        (3, 3),
        "destination unreachable, port unreachable"
    );
    assert_eq!(icmp.src, *sa(VIP).ip(), "from the Service address");
    assert_eq!(icmp.dst, *sa(CLIENT).ip(), "to the client");
    assert_eq!(
        icmp.quoted,
        syn[14..14 + 28],
        "quotes the IPv4 header and 8 bytes"
    );
    assert_eq!((icmp.eth_src, icmp.eth_dst), (MAC_B, MAC_A), "MACs swapped");
    // Had the SYN been partially checksummed (a pod with TX checksum offload), the device
    // would still complete its TCP checksum on the ICMP: nothing the client reads changes.
    let mut completed = out.clone();
    complete_checksum(&mut completed, 34, 16);
    assert_eq!(check_icmp(&completed).quoted, icmp.quoted);
    let c = dp.counters().unwrap();
    assert_eq!(c[CTR_REJECT_NO_BACKEND as usize].packets, 1);
    assert!(
        dp.conntrack().unwrap().is_empty(),
        "a rejected flow is not tracked"
    );
}

#[test]
fn a_service_without_backends_rejects_udp_with_icmp_port_unreachable() {
    require_privileged!("a_service_without_backends_rejects_udp_with_icmp_port_unreachable");
    let mut dp = dataplane();
    dp.upsert_service(
        fe("198.18.128.2:53", Protocol::Udp, FrontendKind::ClusterIp),
        &[],
    )
    .unwrap();
    // A large datagram: the ICMP quotes only its first 28 bytes.
    let pkt = udp(sa(CLIENT), sa("198.18.128.2:53"), &[7u8; 1000]);
    let (verdict, out) = run(&dp, FROM_POD, &pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // IPv4 with 20 bytes of padding options (see `reject.rs`), ICMP, the quote.
    assert_eq!(out.len(), 14 + 40 + 8 + 28);
    let icmp = check_icmp(&out);
    assert_eq!((icmp.type_, icmp.code), (3, 3));
    assert_eq!(icmp.quoted, pkt[14..14 + 28]);
    let mut completed = out.clone();
    complete_checksum(&mut completed, 34, 6);
    assert_eq!(check_icmp(&completed).quoted, icmp.quoted);
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_snated_and_gets_its_answer() {
    require_privileged!("a_pod_reaching_itself_through_its_service_is_snated_and_gets_its_answer");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.10:8080"]); // the client is the only backend
    // Both ways, the packets go straight back out of the pod's device, never routed (strict
    // reverse-path filtering and the martian check would drop them), MAC addresses swapped.
    let syn = tcp(sa(CLIENT), sa(VIP), SYN, b"");
    let (verdict, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out of the device");
    assert_eq!((&out[0..6], &out[6..12]), (&syn[6..12], &syn[0..6]));
    let fwd = check(&out);
    assert_eq!(fwd.dst, sa("198.19.0.10:8080"));
    assert_eq!(
        fwd.src,
        std::net::SocketAddrV4::new(HAIRPIN, 40000),
        "SNAT to the hairpin address"
    );
    // The pod answers the hairpin address; the reply comes back in at the same device.
    let reply = tcp(sa("198.19.0.10:8080"), fwd.src, SYN_ACK, b"");
    let (verdict, out) = run(&dp, FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out of the device");
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&reply[6..12], &reply[0..6]),
        "to the pod, from the node's side"
    );
    let back = check(&out);
    assert_eq!(back.src, sa(VIP), "the reply shows the Service");
    assert_eq!(
        back.dst,
        sa(CLIENT),
        "and goes to the client's own address and port"
    );
    assert_eq!(dp.counters().unwrap()[CTR_HAIRPIN as usize].packets, 1);
    // A later packet of the flow (a conntrack hit) too.
    let (verdict, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), ACK, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(check(&out).dst, sa("198.19.0.10:8080"));
    assert_eq!(dp.counters().unwrap()[CTR_CT_HIT as usize].packets, 1);
}

fn reverse_entry(dp: &Dataplane) -> sluice::dataplane::CtEntry {
    let ct = dp.conntrack().unwrap();
    ct.into_iter()
        .find(|e| e.kind == sluice::dataplane::CtKind::Reverse)
        .expect("a reverse entry")
}

#[test]
fn tcp_conntrack_moves_from_opening_to_established_to_closing() {
    require_privileged!("tcp_conntrack_moves_from_opening_to_established_to_closing");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let backend = sa("198.19.0.20:8080");
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let e = reverse_entry(&dp);
    assert_eq!(e.entry.state() & CT_FLAG_ESTABLISHED, 0);
    let left = lifetime_left_s(&e);
    assert!(
        (50.0..=60.0).contains(&left),
        "opening flows live 60 s, {left} left"
    );

    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), SYN_ACK, b""));
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), ACK, b""));
    let e = reverse_entry(&dp);
    assert_ne!(
        e.entry.state() & CT_FLAG_ESTABLISHED,
        0,
        "established after SYN, SYN-ACK, ACK"
    );
    let left = lifetime_left_s(&e);
    assert!(
        left > 6.0 * 3600.0 - 60.0,
        "established flows live 6 h, {left} left"
    );

    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), FIN_ACK, b""));
    let left = lifetime_left_s(&reverse_entry(&dp));
    assert!(
        left > 3600.0,
        "half-closed is still established, {left} left"
    );
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), FIN_ACK, b""));
    let left = lifetime_left_s(&reverse_entry(&dp));
    assert!(
        left <= 10.0,
        "FIN both ways: closing flows live 10 s, {left} left"
    );

    // The client reuses the port for a new connection: a new flow, not a continuation.
    let before = dp.counters().unwrap();
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let after = dp.counters().unwrap();
    assert_eq!(
        delta(&before, &after, CTR_NEW_FLOW),
        1,
        "SYN on a closing tuple starts afresh"
    );
}

#[test]
fn a_reset_closes_the_flow() {
    require_privileged!("a_reset_closes_the_flow");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let backend = sa("198.19.0.20:8080");
    establish(&dp, sa(CLIENT), sa(VIP), backend);
    // The backend resets the established connection; the client sends nothing more.
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), RST, b""));
    // Both entries close: the service entry too, which only the client's packets touched
    // before (it kept the backend pinned for 6 h).
    for e in dp.conntrack().unwrap() {
        assert_ne!(e.entry.state() & CT_FLAG_RST, 0, "{:?} is reset", e.kind);
        let left = lifetime_left_s(&e);
        assert!(left <= 10.0, "{:?} lives {left} s more", e.kind);
    }
}

#[test]
fn udp_is_translated_both_ways_with_its_own_timeout() {
    require_privileged!("udp_is_translated_both_ways_with_its_own_timeout");
    let mut dp = dataplane();
    let dns = DNS;
    dns_service(&mut dp);
    let (verdict, out) = run(&dp, FROM_POD, &udp(sa(CLIENT), sa(dns), b"query"));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let q = check(&out);
    assert_eq!(q.dst, sa("198.19.0.20:5353"));
    assert_eq!(q.payload, b"query");
    let left = lifetime_left_s(&reverse_entry(&dp));
    assert!(
        (50.0..=60.0).contains(&left),
        "UDP flows live 60 s, {left} left"
    );
    let (_, out) = run(
        &dp,
        TO_POD,
        &udp(sa("198.19.0.20:5353"), sa(CLIENT), b"answer"),
    );
    let a = check(&out);
    assert_eq!(a.src, sa(dns));
    assert_eq!(a.payload, b"answer");
}

#[test]
fn a_udp_datagram_without_checksum_keeps_none() {
    require_privileged!("a_udp_datagram_without_checksum_keeps_none");
    let mut dp = dataplane();
    let dns = DNS;
    dns_service(&mut dp);
    let mut pkt = udp(sa(CLIENT), sa(dns), b"query");
    pkt[14 + 20 + 6] = 0; // UDP checksum 0: "none" (RFC 768)
    pkt[14 + 20 + 7] = 0;
    let (_, out) = run(&dp, FROM_POD, &pkt);
    let q = check(&out);
    assert_eq!(q.dst, sa("198.19.0.20:5353"));
    assert_eq!(q.udp_checksum, Some(0), "a zero UDP checksum stays zero");
}

#[test]
fn ip_options_are_skipped_over_and_translated_with_valid_checksums() {
    require_privileged!("ip_options_are_skipped_over_and_translated_with_valid_checksums");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let mut b = etherparse::Ipv4Header::new(
        20,
        64,
        etherparse::IpNumber::TCP,
        sa(CLIENT).ip().octets(),
        sa(VIP).ip().octets(),
    )
    .unwrap();
    b.options = [1u8, 1, 1, 0][..].try_into().unwrap(); // NOP NOP NOP EOL
    let pkt = {
        let builder = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ip(etherparse::IpHeaders::Ipv4(b, Default::default()))
            .tcp(40000, 80, 1, 1000)
            .syn();
        let mut v = Vec::new();
        builder.write(&mut v, b"").unwrap();
        v
    };
    assert_eq!(
        pkt[14] & 0x0f,
        6,
        "the test packet has a 24-byte IPv4 header"
    );
    let (verdict, out) = run(&dp, FROM_POD, &pkt);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
}

#[test]
fn other_protocols_and_non_ipv4_pass_untouched_and_are_counted() {
    require_privileged!("other_protocols_and_non_ipv4_pass_untouched_and_are_counted");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let syn = tcp(sa(CLIENT), sa(VIP), SYN, b"");
    // Protocol ICMP, to a pod's address (checksums no longer matter: it must pass untouched;
    // to a ClusterIP it would be refused).
    let mut icmp = tcp(sa(CLIENT), sa("198.19.0.20:8080"), SYN, b"");
    icmp[14 + 9] = 1;
    // Fragments of anything but TCP and UDP.
    let mut icmp_first_fragment = icmp.clone();
    icmp_first_fragment[14 + 6] |= 0x20; // MF
    let mut icmp_later_fragment = icmp.clone();
    icmp_later_fragment[14 + 7] = 0x10; // offset 16 * 8 bytes
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut ipv6 = syn.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    // An 802.1Q tag left in the frame (a real device's driver normally strips it into the
    // packet's metadata, and then the frame is translated as any other): passed on purpose.
    let mut tagged = syn.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
    let cases = [
        (icmp_first_fragment, CTR_PASS_FRAGMENT),
        (icmp_later_fragment, CTR_PASS_FRAGMENT),
        (icmp, CTR_PASS_OTHER_PROTO),
        (arp, CTR_PASS_NOT_IPV4),
        (ipv6, CTR_PASS_NOT_IPV4),
        (tagged, CTR_PASS_NOT_IPV4),
    ];
    for (pkt, counter) in cases {
        let before = dp.counters().unwrap();
        let (verdict, out) = run(&dp, FROM_POD, &pkt);
        let after = dp.counters().unwrap();
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(out, pkt, "left untouched");
        assert_eq!(
            delta(&before, &after, counter),
            1,
            "counted as {}",
            COUNTER_NAMES[counter as usize]
        );
    }
    assert!(dp.conntrack().unwrap().is_empty());
}

#[test]
fn a_fragmented_datagram_follows_its_flow_both_ways() {
    require_privileged!("a_fragmented_datagram_follows_its_flow_both_ways");
    let mut dp = dataplane();
    let vip = "198.18.128.1:53";
    let backend = "198.19.0.20:5353";
    dp.upsert_service(
        fe(vip, Protocol::Udp, FrontendKind::ClusterIp),
        &[be(backend)],
    )
    .unwrap();
    // Every fragment goes on, and is seen as it left.
    let through = |program, frags: &[Vec<u8>]| -> Vec<Vec<u8>> {
        frags
            .iter()
            .map(|f| {
                let (verdict, out) = run(&dp, program, f);
                assert_eq!(verdict, TC_ACT_UNSPEC);
                out
            })
            .collect()
    };
    let query: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    // Three fragments, as a pod's kernel sends a 3 kB datagram over a 1500-byte MTU; then a
    // second datagram of the same flow.
    for (n, id) in [0x1234u16, 0x1235].into_iter().enumerate() {
        let frags = fragment(&udp(sa(CLIENT), sa(vip), &query), 1480, id);
        assert_eq!(frags.len(), 3);
        let seen = check(&reassemble(&through(FROM_POD, &frags)));
        assert_eq!(
            seen.dst,
            sa(backend),
            "datagram {n}: the whole datagram is DNATed"
        );
        assert_eq!(seen.src, sa(CLIENT));
        assert_eq!(seen.payload, query);
    }
    let c = dp.counters().unwrap();
    assert_eq!(c[CTR_NEW_FLOW as usize].packets, 1);
    assert_eq!(c[CTR_CT_HIT as usize].packets, 5);
    assert_eq!(c[CTR_FRAGMENT_FOLLOWED as usize].packets, 4);
    // The backend's answer, fragmented too, shows the Service on its way into the pod.
    let answer: Vec<u8> = (0..4000u32).map(|i| (i * 13) as u8).collect();
    let frags = fragment(&udp(sa(backend), sa(CLIENT), &answer), 1480, 0x4321);
    let seen = check(&reassemble(&through(TO_POD, &frags)));
    assert_eq!(seen.src, sa(vip), "the whole answer comes from the Service");
    assert_eq!(seen.dst, sa(CLIENT));
    assert_eq!(seen.payload, answer);
    let c = dp.counters().unwrap();
    assert_eq!(c[CTR_REPLY as usize].packets, 3);
}

#[test]
fn a_fragment_with_no_flow_to_follow_never_reaches_the_service_address() {
    require_privileged!("a_fragment_with_no_flow_to_follow_never_reaches_the_service_address");
    let mut dp = dataplane();
    let vip = "198.18.128.1:53";
    let empty = "198.18.128.2:53";
    dp.upsert_service(
        fe(vip, Protocol::Udp, FrontendKind::ClusterIp),
        &[be("198.19.0.20:5353")],
    )
    .unwrap();
    dp.upsert_service(fe(empty, Protocol::Udp, FrontendKind::ClusterIp), &[])
        .unwrap();
    let body = [9u8; 2000];
    let count = |dp: &Dataplane, program, pkt: &[u8], want: u32, counter: u32| {
        let before = dp.counters().unwrap();
        let (verdict, out) = run(dp, program, pkt);
        let after = dp.counters().unwrap();
        assert_eq!(
            (verdict, delta(&before, &after, counter)),
            (want, 1),
            "counted as {}",
            COUNTER_NAMES[counter as usize]
        );
        out
    };
    // A later fragment whose first never came (or came after it), from a pod to a ClusterIP:
    // dropped, not routed to the ClusterIP itself.
    let lone = fragment(&udp(sa(CLIENT), sa(vip), &body), 1480, 7).remove(1);
    count(&dp, FROM_POD, &lone, TC_ACT_SHOT, CTR_DROP_FRAGMENT);
    // To an address that is no Service's, untouched.
    let elsewhere = fragment(&udp(sa(CLIENT), sa("198.19.5.5:53"), &body), 1480, 7).remove(1);
    let out = count(&dp, FROM_POD, &elsewhere, TC_ACT_UNSPEC, CTR_PASS_FRAGMENT);
    assert_eq!(out, elsewhere);
    // A Service without endpoints refuses the first fragment; the rest are dropped, never
    // passed on to the Service address.
    let frags = fragment(&udp(sa(CLIENT), sa(empty), &body), 1480, 8);
    let first = count(
        &dp,
        FROM_POD,
        &frags[0],
        TC_ACT_REDIRECT,
        CTR_REJECT_NO_BACKEND,
    );
    assert_eq!(check_icmp(&first).code, 3, "port unreachable");
    count(&dp, FROM_POD, &frags[1], TC_ACT_SHOT, CTR_DROP_FRAGMENT);
    assert!(dp.conntrack().unwrap().is_empty());
}

#[test]
fn truncated_and_malformed_packets_pass_untouched_and_are_counted() {
    require_privileged!("truncated_and_malformed_packets_pass_untouched_and_are_counted");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let syn = tcp(sa(CLIENT), sa(VIP), SYN, b"");
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44; // IHL 4: shorter than the fixed header
    let mut bad_version = syn.clone();
    bad_version[14] = 0x65;
    let mut too_long = syn.clone();
    too_long[16..18].copy_from_slice(&2000u16.to_be_bytes()); // total length past the end
    let mut no_room_for_tcp = syn.clone();
    no_room_for_tcp[16..18].copy_from_slice(&30u16.to_be_bytes()); // 10 bytes of TCP
    let cases: Vec<Vec<u8>> = vec![
        // (An IPv4 header cut short cannot go through BPF_PROG_TEST_RUN: the kernel refuses
        // such input with EINVAL. The sandbox test sends one through a real device instead.)
        syn[..14 + 20 + 10].to_vec(), // TCP header cut short
        bad_ihl,
        bad_version,
        too_long,
        no_room_for_tcp,
    ];
    for pkt in cases {
        let before = dp.counters().unwrap();
        let (verdict, out) = run(&dp, FROM_POD, &pkt);
        let after = dp.counters().unwrap();
        assert_eq!(
            verdict, TC_ACT_UNSPEC,
            "malformed packets are left to the kernel's checks"
        );
        assert_eq!(out, pkt, "left untouched");
        assert_eq!(
            delta(&before, &after, CTR_PASS_MALFORMED),
            1,
            "counted as malformed: {pkt:02x?}"
        );
    }
    // And the Service still works for good packets.
    let (_, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
}

#[test]
fn the_uplink_translates_node_ports_and_external_ips_but_not_cluster_ips() {
    require_privileged!("the_uplink_translates_node_ports_and_external_ips_but_not_cluster_ips");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let node_port = "198.18.0.10:30080";
    let external = "198.18.192.1:80";
    let lb = "198.18.192.2:80";
    dp.upsert_service(
        fe(node_port, Protocol::Tcp, FrontendKind::NodePort),
        &[be("198.19.0.20:8080")],
    )
    .unwrap();
    dp.upsert_service(
        fe(external, Protocol::Tcp, FrontendKind::ExternalIp),
        &[be("198.19.0.20:8080")],
    )
    .unwrap();
    dp.upsert_service(
        fe(lb, Protocol::Tcp, FrontendKind::LoadBalancer),
        &[be("198.19.0.20:8080")],
    )
    .unwrap();
    let outside = "198.18.0.100:50000";
    let pkt = tcp(sa(outside), sa(VIP), SYN, b"");
    let (verdict, out) = run(&dp, FROM_UPLINK, &pkt);
    assert_eq!(
        (verdict, &out),
        (TC_ACT_UNSPEC, &pkt),
        "a ClusterIP is not reachable from outside"
    );
    for frontend in [node_port, external, lb] {
        let (verdict, out) = run(&dp, FROM_UPLINK, &tcp(sa(outside), sa(frontend), SYN, b""));
        assert_eq!(verdict, TC_ACT_UNSPEC);
        let sent = check(&out);
        assert_eq!(sent.dst, sa("198.19.0.20:8080"), "{frontend} from outside");
        // The local backend's reply, leaving by the uplink, shows the frontend it was sent to.
        // (The client uses one port for all three: the backend sees it remapped on the second
        // and third, and the reply gets it back.)
        let (_, out) = run(
            &dp,
            TO_UPLINK,
            &tcp(sa("198.19.0.20:8080"), sent.src, SYN_ACK, b""),
        );
        let back = check(&out);
        assert_eq!((back.src, back.dst), (sa(frontend), sa(outside)));
        // Pods may use these frontends too.
        let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(frontend), SYN, b""));
        assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
    }
}

/// The entries of map `name` in a raw dump.
fn raw_entries(dp: &Dataplane, name: &str) -> Vec<RawEntry> {
    dp.raw_dump()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("{name} is a map of the object"))
}

/// loadBalancerSourceRanges: a new flow to the LoadBalancer address from a client in none of
/// the ranges is dropped before DNAT, from outside and from pods alike, even when the Service
/// has no endpoints (kube-proxy's firewall comes before its reject); flows already made keep
/// going when the ranges change (kube-proxy filters in the nat table, which sees only a
/// connection's first packet); and the ranges leave the map with the frontend.
#[test]
fn load_balancer_source_ranges_drop_other_clients_before_dnat() {
    require_privileged!("load_balancer_source_ranges_drop_other_clients_before_dnat");
    let mut dp = dataplane();
    let lb = fe("198.18.192.2:80", Protocol::Tcp, FrontendKind::LoadBalancer);
    let backend = "198.19.0.20:8080";
    let ranges = |cidrs: &[&str]| Backends {
        all: vec![be(backend)],
        external: None,
        sources: Some(SourceRanges {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            from_node: false,
        }),
        affinity_timeout_s: None,
        no_local_endpoints: false,
        maglev: false,
    };
    dp.upsert_frontend(lb, &ranges(&["198.18.0.96/28", "198.19.0.0/24"]))
        .unwrap();
    let to_lb = |client: &str, flags| tcp(sa(client), sa("198.18.192.2:80"), flags, b"");
    let allowed = "198.18.0.100:50000";
    let denied = "198.18.0.200:50000";
    let pod_denied = "198.19.1.7:40000";

    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_UPLINK, &to_lb(allowed, SYN));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(
        check(&out).dst,
        sa(backend),
        "a client in a range is translated"
    );
    let (verdict, out) = run(&dp, FROM_POD, &to_lb(CLIENT, SYN));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(check(&out).dst, sa(backend), "so is a pod in a range");
    for (prog, client) in [(FROM_UPLINK, denied), (FROM_POD, pod_denied)] {
        let (verdict, _) = run(&dp, prog, &to_lb(client, SYN));
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "{client} through {prog} is in no range"
        );
    }
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_NEW_FLOW), 2);
    assert_eq!(delta(&before, &after, CTR_DROP_SOURCE_RANGE), 2);
    assert_eq!(
        dp.conntrack().unwrap().len(),
        4,
        "two flows, none for the dropped"
    );

    // The allowed client's flow goes on after the ranges no longer hold it; its new flows do
    // not, and the newly allowed client's do.
    dp.upsert_frontend(lb, &ranges(&["198.18.0.192/28"]))
        .unwrap();
    // The same range written with bits past its prefix is the same range: it stays.
    dp.upsert_frontend(lb, &ranges(&["198.18.0.200/28"]))
        .unwrap();
    let (_, out) = run(&dp, FROM_UPLINK, &to_lb(allowed, ACK));
    assert_eq!(
        check(&out).dst,
        sa(backend),
        "the established flow keeps going"
    );
    let (verdict, _) = run(&dp, FROM_UPLINK, &to_lb("198.18.0.100:50001", SYN));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a new flow of the client no longer in a range"
    );
    let (_, out) = run(&dp, FROM_UPLINK, &to_lb(denied, SYN));
    assert_eq!(check(&out).dst, sa(backend), "the client now in a range");
    assert_eq!(
        raw_entries(&dp, LB4_SRC_RANGES_MAP).len(),
        1,
        "the lost range went"
    );

    // Without endpoints, a client in no range is dropped, not rejected; one in a range is.
    dp.upsert_frontend(
        lb,
        &Backends {
            all: vec![],
            ..ranges(&["198.18.0.192/28"])
        },
    )
    .unwrap();
    let before = dp.counters().unwrap();
    let (verdict, _) = run(&dp, FROM_UPLINK, &to_lb("198.18.0.100:50002", SYN));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (_, out) = run(&dp, FROM_UPLINK, &to_lb("198.18.0.200:50002", SYN));
    assert_eq!(check_icmp(&out).type_, 3, "rejected with ICMP unreachable");
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_DROP_SOURCE_RANGE), 1);
    assert_eq!(delta(&before, &after, CTR_REJECT_NO_BACKEND), 1);

    // Without ranges every client may connect; the ranges left the map.
    dp.upsert_frontend(lb, &Backends::all(vec![be(backend)]))
        .unwrap();
    let (_, out) = run(&dp, FROM_UPLINK, &to_lb("198.18.0.100:50003", SYN));
    assert_eq!(check(&out).dst, sa(backend));
    assert!(raw_entries(&dp, LB4_SRC_RANGES_MAP).is_empty());
    // And a frontend removed takes its ranges along.
    dp.upsert_frontend(lb, &ranges(&["198.18.0.0/15"])).unwrap();
    assert_eq!(raw_entries(&dp, LB4_SRC_RANGES_MAP).len(), 1);
    assert!(dp.services().iter().any(|(_, b)| b.sources.is_some()));
    dp.remove_service(lb).unwrap();
    assert!(raw_entries(&dp, LB4_SRC_RANGES_MAP).is_empty());
}

/// internalTrafficPolicy Local with the Service's endpoints all on other nodes: the frontend
/// has no backends and drops new flows (counted), where one without endpoints refuses them
/// with ICMP.
#[test]
fn a_cluster_ip_with_no_local_endpoints_drops_rather_than_refuses() {
    require_privileged!("a_cluster_ip_with_no_local_endpoints_drops_rather_than_refuses");
    let mut dp = dataplane();
    let f = fe(VIP, Protocol::Tcp, FrontendKind::ClusterIp);
    let none_local = Backends {
        no_local_endpoints: true,
        ..Backends::default()
    };
    dp.upsert_frontend(f, &none_local).unwrap();
    assert_eq!(dp.services(), vec![(f, none_local)]);
    let syn = tcp(sa(CLIENT), sa(VIP), SYN, b"");
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(out, syn, "no ICMP written");
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_DROP_NO_LOCAL_BACKEND), 1);
    assert_eq!(delta(&before, &after, CTR_REJECT_NO_BACKEND), 0);
    // No endpoints anywhere: refused.
    dp.upsert_frontend(f, &Backends::default()).unwrap();
    let (_, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(check_icmp(&out).type_, 3, "ICMP destination unreachable");
    // A local endpoint back: translated.
    dp.upsert_frontend(f, &Backends::all(vec![be("198.19.0.20:8080")]))
        .unwrap();
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(sa("198.19.0.10:40001"), sa(VIP), SYN, b""),
    );
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
}

/// The backend a pod client's SYN from `client` to [`VIP`] is sent to.
fn sent_to(dp: &Dataplane, client: &str) -> std::net::SocketAddrV4 {
    let (verdict, out) = run(dp, FROM_POD, &tcp(sa(client), sa(VIP), SYN, b""));
    assert_eq!(verdict, TC_ACT_UNSPEC, "{client}");
    check(&out).dst
}

/// sessionAffinity ClientIP: a client's new flows go to the backend its last new flow went to
/// while that was less than the timeout ago and the backend is still the frontend's; once the
/// backend leaves, or the timeout passes, the next new flow chooses afresh, and the client
/// sticks to that choice.
#[test]
fn session_affinity_keeps_a_clients_new_flows_on_one_backend_until_it_leaves_or_times_out() {
    require_privileged!(
        "session_affinity_keeps_a_clients_new_flows_on_one_backend_until_it_leaves_or_times_out"
    );
    let mut dp = dataplane();
    let f = fe(VIP, Protocol::Tcp, FrontendKind::ClusterIp);
    let backends = |addrs: &[&str], timeout| Backends {
        affinity_timeout_s: Some(timeout),
        ..Backends::all(addrs.iter().map(|a| be(a)).collect())
    };
    let three = ["198.19.0.20:8080", "198.19.0.21:8080", "198.19.0.22:8080"];
    dp.upsert_frontend(f, &backends(&three, 60)).unwrap();
    let before = dp.counters().unwrap();
    let first = sent_to(&dp, "198.19.0.10:40000");
    for port in 40001..40030 {
        let to = sent_to(&dp, &format!("198.19.0.10:{port}"));
        assert_eq!(to, first, "new flow from port {port}");
    }
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_AFFINITY_HIT), 29);
    assert_eq!(delta(&before, &after, CTR_NEW_FLOW), 30);
    // Other clients are not bound by this one's choice: among 30, some land elsewhere.
    let others: std::collections::BTreeSet<_> = (11..41)
        .map(|c| sent_to(&dp, &format!("198.19.2.{c}:40000")))
        .collect();
    assert!(others.len() > 1, "30 clients all on {others:?}");

    // The backend leaves (while another frontend keeps it in the maps): the next new flow
    // goes to one still there, and sticks there.
    dp.upsert_service(
        fe("198.18.128.1:81", Protocol::Tcp, FrontendKind::ClusterIp),
        &three.iter().map(|a| be(a)).collect::<Vec<_>>(),
    )
    .unwrap();
    let rest: Vec<&str> = three.iter().copied().filter(|b| sa(b) != first).collect();
    dp.upsert_frontend(f, &backends(&rest, 60)).unwrap();
    let before = dp.counters().unwrap();
    let next = sent_to(&dp, "198.19.0.10:41000");
    assert_ne!(next, first, "the backend left");
    for port in 41001..41010 {
        assert_eq!(sent_to(&dp, &format!("198.19.0.10:{port}")), next);
    }
    assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_AFFINITY_HIT), 9);

    // The timeout (1 s here): a new flow after it chooses afresh (no hit), then sticks.
    dp.upsert_frontend(f, &backends(&rest, 1)).unwrap();
    sent_to(&dp, "198.19.0.10:42000");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let before = dp.counters().unwrap();
    let fresh = sent_to(&dp, "198.19.0.10:42001");
    assert_eq!(sent_to(&dp, "198.19.0.10:42002"), fresh);
    assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_AFFINITY_HIT), 1);

    // Without affinity, the client's new flows spread again.
    dp.upsert_frontend(f, &Backends::all(three.iter().map(|a| be(a)).collect()))
        .unwrap();
    let spread: std::collections::BTreeSet<_> = (43000..43030)
        .map(|p| sent_to(&dp, &format!("198.19.0.10:{p}")))
        .collect();
    assert!(spread.len() > 1, "30 new flows all on {spread:?}");
    assert!(raw_entries(&dp, LB4_AFFINITY_MATCH_MAP).is_empty());
}

/// With externalTrafficPolicy Local, traffic from outside may use only local backends: a
/// remembered backend on another node is not used for it.
#[test]
fn session_affinity_from_outside_never_leaves_the_local_backends_of_a_local_policy() {
    require_privileged!(
        "session_affinity_from_outside_never_leaves_the_local_backends_of_a_local_policy"
    );
    let mut dp = dataplane();
    let np = fe("198.18.0.10:30080", Protocol::Tcp, FrontendKind::NodePort);
    let remote = Backend {
        local: false,
        ..be("198.19.1.20:8080")
    };
    let local = be("198.19.0.20:8080");
    dp.upsert_frontend(
        np,
        &Backends {
            all: vec![remote],
            external: Some(vec![local]),
            affinity_timeout_s: Some(60),
            ..Default::default()
        },
    )
    .unwrap();
    let client = "198.19.0.10";
    // From the node's pod: the one backend for every origin, remembered.
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(
            sa(&format!("{client}:40000")),
            sa("198.18.0.10:30080"),
            SYN,
            b"",
        ),
    );
    assert_eq!(check(&out).dst, sa("198.19.1.20:8080"));
    // The same address from outside: the local backend, never the remembered remote one.
    let (_, out) = run(
        &dp,
        FROM_UPLINK,
        &tcp(
            sa(&format!("{client}:40001")),
            sa("198.18.0.10:30080"),
            SYN,
            b"",
        ),
    );
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
}

/// Linux gives a client one source port for connections to different destinations. Two
/// frontends of one backend would then translate to one tuple, and the backend would see one
/// connection where there are two; the second flow's port is remapped, as netfilter does.
const NODE_PORT: &str = "198.18.0.10:30080";

/// A Service with one backend on two frontends: [`VIP`] (ClusterIP) and [`NODE_PORT`].
fn two_frontends_of_one_backend() -> (Shared, std::net::SocketAddrV4) {
    let mut dp = dataplane();
    let backend = "198.19.0.20:8080";
    cluster_ip(&mut dp, &[backend]);
    dp.upsert_service(
        fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort),
        &[be(backend)],
    )
    .unwrap();
    (dp, sa(backend))
}

#[test]
fn one_client_port_to_two_frontends_of_one_backend_is_two_flows_at_the_backend() {
    require_privileged!(
        "one_client_port_to_two_frontends_of_one_backend_is_two_flows_at_the_backend"
    );
    let (dp, backend) = two_frontends_of_one_backend();
    let node_port = NODE_PORT;
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let first = check(&out);
    assert_eq!(
        (first.src, first.dst),
        (sa(CLIENT), backend),
        "the first flow keeps the client's port"
    );
    let before = dp.counters().unwrap();
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(node_port), SYN, b""));
    let second = check(&out);
    assert_eq!(second.dst, backend);
    assert_eq!(
        second.src.ip(),
        sa(CLIENT).ip(),
        "the client's address is kept"
    );
    assert_ne!(
        second.src, first.src,
        "the backend must see two connections, not one tuple twice"
    );
    assert!(
        (1024..=29999).contains(&second.src.port()),
        "the new port comes from the SNAT range, clear of the pods' ephemeral ports: {}",
        second.src
    );
    assert_eq!(
        delta(&before, &dp.counters().unwrap(), CTR_PORT_REMAPPED),
        1
    );
    // Each flow's replies show the frontend it called, to the port the client used.
    for (to, frontend) in [(first.src, VIP), (second.src, node_port)] {
        let (_, out) = run(&dp, TO_POD, &tcp(backend, to, SYN_ACK, b"hi"));
        let back = check(&out);
        assert_eq!(
            (back.src, back.dst),
            (sa(frontend), sa(CLIENT)),
            "the reply to {to}"
        );
    }
    // Later packets of each flow keep their tuple.
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(node_port), ACK, b"x"));
    assert_eq!(check(&out).src, second.src);
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), ACK, b"x"));
    assert_eq!(check(&out).src, first.src);
    // An ICMP error from the backend about the second flow quotes what the client sent.
    let err = icmp_error(*backend.ip(), *sa(CLIENT).ip(), 3, &out_of(&dp, node_port));
    let (_, out) = run(&dp, TO_POD, &err);
    let icmp = check_icmp(&out);
    assert_eq!(
        &icmp.quoted[20..22],
        &40000u16.to_be_bytes(),
        "the client's own port"
    );
    assert_eq!(
        &icmp.quoted[22..24],
        &30080u16.to_be_bytes(),
        "the NodePort"
    );
}

/// A packet of the flow from `CLIENT` to `frontend`, as the backend gets it.
fn out_of(dp: &Dataplane, frontend: &str) -> Vec<u8> {
    run(dp, FROM_POD, &tcp(sa(CLIENT), sa(frontend), ACK, b"")).1
}

/// A closed flow's reverse entry outlives it by 10 s (60 s with a port of its own). A direct
/// connection on the same tuple in that time (to the backend's own address, or one socket LB
/// translated at connect()) must not have its replies rewritten to show the Service.
#[test]
fn a_direct_connection_on_the_tuple_of_a_closed_flow_is_left_alone() {
    require_privileged!("a_direct_connection_on_the_tuple_of_a_closed_flow_is_left_alone");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let backend = sa("198.19.0.20:8080");
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), SYN_ACK, b""));
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), FIN_ACK, b""));
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), FIN_ACK, b""));
    let syn = tcp(sa(CLIENT), backend, SYN, b"");
    let (v, out) = run(&dp, FROM_POD, &syn);
    assert_eq!(
        (v, out),
        (TC_ACT_UNSPEC, syn),
        "a direct SYN passes untouched"
    );
    // The answer, as it leaves the backend's pod and enters the client's.
    let before = dp.counters().unwrap();
    for (program, data) in [(FROM_POD, &b""[..]), (TO_POD, b"")] {
        let reply = tcp(backend, sa(CLIENT), SYN_ACK, data);
        let (v, out) = run(&dp, program, &reply);
        assert_eq!(
            (v, &out),
            (TC_ACT_UNSPEC, &reply),
            "the direct connection's SYN-ACK comes from the backend, untouched"
        );
    }
    assert_eq!(
        delta(&before, &dp.counters().unwrap(), CTR_CT_STALE_REVERSE),
        1,
        "the closed flow's reverse entry went at the first sight of the SYN-ACK"
    );
    let data = tcp(backend, sa(CLIENT), ACK, b"data");
    assert_eq!(run(&dp, TO_POD, &data), (TC_ACT_UNSPEC, data.clone()));
}

#[test]
fn removing_a_service_stops_new_flows_but_not_established_ones() {
    require_privileged!("removing_a_service_stops_new_flows_but_not_established_ones");
    let mut dp = dataplane();
    let f = cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    establish(&dp, sa(CLIENT), sa(VIP), sa("198.19.0.20:8080"));
    // A flow not yet established ends with its Service (its next packet meets no frontend),
    // as a UDP flow does under kube-proxy, which flushes a removed Service's UDP conntrack.
    let half_open = sa("198.19.0.10:40002");
    run(&dp, FROM_POD, &tcp(half_open, sa(VIP), SYN, b""));
    dp.remove_service(f).unwrap();
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), ACK, b""));
    assert_eq!(
        check(&out).dst,
        sa("198.19.0.20:8080"),
        "the established flow goes on"
    );
    let before = dp.counters().unwrap();
    let ack = tcp(half_open, sa(VIP), ACK, b"");
    assert_eq!(
        run(&dp, FROM_POD, &ack),
        (TC_ACT_UNSPEC, ack),
        "the half-open flow is over: its packet goes on untranslated"
    );
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_CT_HIT), 0);
    assert_eq!(delta(&before, &after, CTR_PASS_NO_MATCH), 1);
    let pkt = tcp(sa("198.19.0.10:40001"), sa(VIP), SYN, b"");
    let (_, out) = run(&dp, FROM_POD, &pkt);
    assert_eq!(
        out, pkt,
        "a new flow to a removed Service is not translated"
    );
    assert!(dp.services().is_empty());
}

#[test]
fn the_conntrack_fill_counts_live_entries_by_kind_and_flows_by_state() {
    require_privileged!("the_conntrack_fill_counts_live_entries_by_kind_and_flows_by_state");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    dp.upsert_service(
        fe("198.18.128.1:53", Protocol::Udp, FrontendKind::ClusterIp),
        &[be("198.19.0.20:5353")],
    )
    .unwrap();
    let backend = sa("198.19.0.20:8080");
    let client = |port| std::net::SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), port);
    // Half-open: a SYN, and a SYN answered (not yet established: the client has not ACKed).
    run(&dp, FROM_POD, &tcp(client(1001), sa(VIP), SYN, b""));
    run(&dp, FROM_POD, &tcp(client(1006), sa(VIP), SYN, b""));
    run(&dp, TO_POD, &tcp(backend, client(1006), SYN_ACK, b""));
    // Established.
    establish(&dp, client(1002), sa(VIP), backend);
    // Closing, twice.
    for port in [1003, 1004] {
        run(&dp, FROM_POD, &tcp(client(port), sa(VIP), SYN, b""));
        run(&dp, TO_POD, &tcp(backend, client(port), RST, b""));
    }
    // UDP.
    run(
        &dp,
        FROM_POD,
        &udp(client(1005), sa("198.18.128.1:53"), b"q"),
    );
    let f = dp.conntrack_fill().unwrap();
    assert_eq!(
        f,
        sluice::dataplane::CtFill {
            capacity: 4096,
            // The established flow's two entries; the others are not established.
            held: 2,
            new_capacity: NEW_MAX,
            new_held: 10,
            live_service: 6,
            live_reverse: 6,
            tcp_opening: 2,
            tcp_established: 1,
            tcp_closing: 2,
            udp: 1,
            sctp: 0,
        }
    );
}

#[test]
fn a_flow_whose_tuple_went_to_another_frontend_does_not_ride_on_it() {
    require_privileged!("a_flow_whose_tuple_went_to_another_frontend_does_not_ride_on_it");
    let (dp, backend) = two_frontends_of_one_backend();
    let node_port = NODE_PORT;
    // A connection to the ClusterIP, reset by the backend: both its entries close (10 s).
    // (Before the reply path closed the service entry too, the service entry stayed and the
    // client's next SYN to the ClusterIP rode on the NodePort flow's tuple; now only an
    // evicted reverse entry leaves a service entry behind, and `forward` then checks the
    // reverse entry's frontend as well as its client.)
    establish(&dp, sa(CLIENT), sa(VIP), backend);
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), RST, b""));
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    // The same client port to the NodePort takes the tuple, the old entry gone.
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(node_port), SYN, b""));
    assert_eq!(
        (check(&out).src, check(&out).dst),
        (sa(CLIENT), backend),
        "the tuple is free: no remap"
    );
    run(&dp, TO_POD, &tcp(backend, sa(CLIENT), SYN_ACK, b""));
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(node_port), ACK, b""));
    // The client dials the ClusterIP again from that port: a new flow, not the NodePort's.
    let (_, out) = run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let again = check(&out);
    assert_eq!(again.dst, backend);
    assert_ne!(
        again.src,
        sa(CLIENT),
        "the NodePort flow holds the client's port at the backend: this one is remapped"
    );
    // The NodePort flow's replies still show the NodePort.
    let (_, out) = run(&dp, TO_POD, &tcp(backend, sa(CLIENT), ACK, b"hi"));
    assert_eq!(check(&out).src, sa(node_port));
}

/// The maps that differ between two dumps, each with its entries in both (array indexes that
/// are all zeros left out), for a failure message that can be read.
fn differences(a: &RawDump, b: &RawDump) -> Vec<String> {
    let shown = |entries: &[RawEntry]| -> Vec<String> {
        entries
            .iter()
            .filter(|(_, v)| v.iter().any(|&b| b != 0))
            .map(|(k, v)| format!("{k:?}={v:?}"))
            .collect()
    };
    let names = |d: &RawDump| d.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if names(a) != names(b) {
        return vec![format!("other maps: {:?} and {:?}", names(a), names(b))];
    }
    a.iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|((name, x), (_, y))| format!("{name}: {:?} and {:?}", shown(x), shown(y)))
        .collect()
}

/// What the verifier walks of each program stays within three quarters of its limit (a
/// million instructions), and of all of them together within 1.5 million. A small change can
/// double a program's walk, and the walk differs by kernel (`sluice_new_flow_from_uplink`:
/// 372,851 on 6.18, 693,849 on 6.1): this catches a jump in the kernel matrix before a
/// kernel's verifier refuses the program, and before the matrix slows down (under software
/// emulation, loading the programs is most of each test's time there). The counts are printed
/// (`--nocapture`). Linux reports them from 5.16 (`bpf_prog_info.verified_insns`): on older
/// kernels the test is skipped.
#[test]
fn every_program_stays_well_within_the_verifiers_limit() {
    const NAME: &str = "every_program_stays_well_within_the_verifiers_limit";
    require_privileged!(NAME);
    let dp = dataplane();
    let tc = sluice::dataplane::PROGRAMS.iter().map(|p| {
        let info = dp.program(p).unwrap().info().unwrap();
        (*p, info.verified_instruction_count())
    });
    let xdp = sluice::dataplane::XDP_PROGRAMS.iter().map(|p| {
        let info = dp.xdp_program(p).unwrap().info().unwrap();
        (*p, info.verified_instruction_count())
    });
    let counts: Vec<(&str, Option<u32>)> = tc.chain(xdp).collect();
    if !testbed::kernel_has(
        NAME,
        "the count of instructions verified (Linux 5.16)",
        counts.iter().all(|(_, c)| c.is_some()),
    ) {
        return;
    }
    let counts: Vec<(&str, u32)> = counts.into_iter().map(|(p, c)| (p, c.unwrap())).collect();
    let total: u32 = counts.iter().map(|(_, c)| c).sum();
    eprintln!("instructions verified: {total} in all; {counts:?}");
    let over: Vec<_> = counts.iter().filter(|(_, c)| *c > 750_000).collect();
    assert!(
        over.is_empty() && total <= 1_500_000,
        "over 750,000 each or 1,500,000 in all ({total}): {over:?}; every program: {counts:?}"
    );
}

/// What the packet tests' sharing of loaded dataplanes rests on: a dataplane that carried
/// traffic and then was reset holds, in every map of the object, what a fresh load holds, and
/// goes on from there as a fresh one would.
#[test]
fn a_reset_dataplane_is_a_freshly_loaded_one() {
    require_privileged!("a_reset_dataplane_is_a_freshly_loaded_one");
    let mut fresh = load();
    let mut used = load();
    let clean = fresh.raw_dump().unwrap();
    let names: Vec<&str> = clean.iter().map(|(name, _)| name.as_str()).collect();
    for map in sluice::dataplane::MAPS {
        assert!(names.contains(map), "{map} is among the maps: {names:?}");
    }
    assert_eq!(
        differences(&clean, &used.raw_dump().unwrap()),
        Vec::<String>::new(),
        "two loads are alike"
    );

    // Traffic and configuration that leave something in most maps.
    cluster_ip(&mut used, &["198.19.0.20:8080", "198.19.0.10:8080"]);
    let dns = fe("198.18.128.2:53", Protocol::Udp, FrontendKind::ClusterIp);
    used.upsert_service(dns, &[be("198.19.0.20:5353")]).unwrap();
    let empty = fe("198.18.128.3:80", Protocol::Tcp, FrontendKind::ClusterIp);
    used.upsert_service(empty, &[]).unwrap();
    // The first SNAT address is retired, kept for the flows that might use it.
    used.set_snat(Some(NODE.parse().unwrap())).unwrap();
    used.set_snat(Some(OTHER_NODE.parse().unwrap())).unwrap();
    for port in 40000..40010 {
        let client = std::net::SocketAddrV4::new(*sa(CLIENT).ip(), port);
        run(&used, FROM_POD, &tcp(client, sa(VIP), SYN, b""));
    }
    run(
        &used,
        FROM_POD,
        &tcp(sa(CLIENT), sa("198.18.128.3:80"), SYN, b""),
    );
    let big: Vec<u8> = vec![7; 3000];
    for frag in fragment(&udp(sa(CLIENT), sa("198.18.128.2:53"), &big), 1480, 9) {
        run(&used, FROM_POD, &frag);
    }
    // A UDP flow answered and used again: established, in CT4 (the flows above are in
    // CT4_NEW).
    let dns_client = sa("198.19.0.10:41000");
    run(
        &used,
        FROM_POD,
        &udp(dns_client, sa("198.18.128.2:53"), b"q"),
    );
    run(
        &used,
        TO_POD,
        &udp(sa("198.19.0.20:5353"), dns_client, b"a"),
    );
    run(
        &used,
        FROM_POD,
        &udp(dns_client, sa("198.18.128.2:53"), b"q"),
    );
    let dirty = used.raw_dump().unwrap();
    let changed: Vec<&str> = clean
        .iter()
        .zip(&dirty)
        .filter(|(a, b)| a != b)
        .map(|((name, _), _)| name.as_str())
        .collect();
    for map in [
        CT4_MAP,
        CT4_NEW_MAP,
        PKT_COUNTERS_MAP,
        LB4_SERVICES_MAP,
        LB4_BACKENDS_MAP,
        LB4_REVNAT_MAP,
        LB4_FE_ADDRS_MAP,
        LB4_POD_CLIENTS_MAP,
        LB4_CONFIG_MAP,
        LB4_REJECT_BUDGET_MAP,
        LB4_FRAGS_MAP,
    ] {
        assert!(
            changed.contains(&map),
            "the traffic changed {map}: {changed:?}"
        );
    }

    used.reset(config()).unwrap();
    assert_eq!(
        differences(&clean, &used.raw_dump().unwrap()),
        Vec::<String>::new(),
        "after a reset, every map holds what it holds after a load"
    );

    // The allocator and the retired addresses start over too: the same steps write the same,
    // a NodePort on the address retired before the reset included.
    for dp in [&mut fresh, &mut used] {
        dp.set_snat(Some(OTHER_NODE.parse().unwrap())).unwrap();
        cluster_ip(dp, &["198.19.0.30:8080", "198.19.0.31:8080"]);
        dp.upsert_service(dns, &[be("198.19.0.32:5353")]).unwrap();
        let node_port = fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort);
        dp.upsert_service(node_port, &[be("198.19.0.30:8080")])
            .unwrap();
    }
    assert_eq!(
        differences(&fresh.raw_dump().unwrap(), &used.raw_dump().unwrap()),
        Vec::<String>::new(),
        "after the same steps, a reset dataplane holds what a fresh one does"
    );
    // Map sizes are fixed at load: a reset to others is refused.
    let bigger = DataplaneConfig {
        conntrack_max: 8192,
        ..config()
    };
    assert!(used.reset(bigger).is_err());
}

/// An SCTP INIT chunk (type 1, 20 bytes).
const SCTP_INIT: [u8; 20] = [
    1, 0, 0, 20, 0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1,
];

#[test]
fn sctp_is_translated_both_ways_with_its_crc32c_updated() {
    require_privileged!("sctp_is_translated_both_ways_with_its_crc32c_updated");
    let mut dp = dataplane();
    let (vip, node_port, backend) = ("198.18.128.1:3868", "198.18.0.10:30868", "198.19.0.20:3869");
    dp.upsert_service(
        fe(vip, Protocol::Sctp, FrontendKind::ClusterIp),
        &[be(backend)],
    )
    .unwrap();
    dp.upsert_service(
        fe(node_port, Protocol::Sctp, FrontendKind::NodePort),
        &[be(backend)],
    )
    .unwrap();
    let before = dp.counters().unwrap();
    // A pod's INIT to the ClusterIP: DNAT, port 3868 -> 3869, and a CRC32c that is right for
    // the new header (the packet's chunks unchanged).
    let (verdict, out) = run(&dp, FROM_POD, &sctp(sa(CLIENT), sa(vip), &SCTP_INIT));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let sent = check_sctp(&out);
    assert_eq!((sent.src, sent.dst), (sa(CLIENT), sa(backend)));
    assert_ne!(sent.checksum, 0, "a computed checksum stays computed");
    assert_eq!(sent.l4[12..], SCTP_INIT);
    // The backend's INIT ACK, into the pod: from the Service again, checksum right.
    let (verdict, out) = run(&dp, TO_POD, &sctp(sa(backend), sa(CLIENT), &[2, 0, 0, 4]));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let back = check_sctp(&out);
    assert_eq!((back.src, back.dst), (sa(vip), sa(CLIENT)));
    // Later packets of the flow, of sizes up to what a test run takes (a page), and one short enough
    // that its frame carries Ethernet padding the CRC does not cover.
    for n in [4usize, 16, 1001, 1400, 3000] {
        let mut data = vec![0u8; n];
        data[0] = 0; // DATA
        data[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        for (i, b) in data.iter_mut().enumerate().skip(4) {
            *b = (i * 7) as u8;
        }
        let mut pkt = sctp(sa(CLIENT), sa(vip), &data);
        if pkt.len() < 60 {
            pkt.resize(60, 0xee);
        }
        let (_, out) = run(&dp, FROM_POD, &pkt);
        let s = check_sctp(&out);
        assert_eq!(
            (s.dst, &s.l4[12..]),
            (sa(backend), &data[..]),
            "{n} bytes of chunks"
        );
    }
    // A checksum left to the device (CHECKSUM_PARTIAL, the field 0) stays 0, for the device
    // to compute over the translated packet.
    let mut offloaded = sctp(sa(CLIENT), sa(vip), &[0, 0, 0, 4]);
    offloaded[14 + 20 + 8..14 + 20 + 12].fill(0);
    let (_, out) = run(&dp, FROM_POD, &offloaded);
    let s = check_sctp(&out);
    assert_eq!((s.dst, s.checksum), (sa(backend), 0));
    // From outside, the same client port to the NodePort of the same backend: a tuple the
    // ClusterIP flow has, so its source port is remapped, and the CRC covers that too.
    let (verdict, out) = run(
        &dp,
        FROM_UPLINK,
        &sctp(sa(CLIENT), sa(node_port), &SCTP_INIT),
    );
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let sent = check_sctp(&out);
    assert_eq!(sent.dst, sa(backend));
    assert_ne!(sent.src.port(), sa(CLIENT).port(), "remapped");
    let (_, out) = run(&dp, TO_UPLINK, &sctp(sa(backend), sent.src, &[2, 0, 0, 4]));
    let back = check_sctp(&out);
    assert_eq!((back.src, back.dst), (sa(node_port), sa(CLIENT)));
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_NEW_FLOW), 2);
    assert_eq!(delta(&before, &after, CTR_PORT_REMAPPED), 1);
    assert_eq!(delta(&before, &after, CTR_CT_HIT), 6);
    assert_eq!(delta(&before, &after, CTR_REPLY), 2);
    let flows = dp.conntrack().unwrap();
    assert!(
        !flows.is_empty() && flows.iter().all(|e| e.proto == Protocol::Sctp),
        "{flows:?}"
    );
}

/// A dataplane with an SCTP ClusterIP whose one backend listens on another port: the
/// dataplane, the frontend and the backend.
fn sctp_cluster_ip() -> (Shared, &'static str, &'static str) {
    let mut dp = dataplane();
    let (vip, backend) = ("198.18.128.1:3868", "198.19.0.20:3869");
    dp.upsert_service(
        fe(vip, Protocol::Sctp, FrontendKind::ClusterIp),
        &[be(backend)],
    )
    .unwrap();
    (dp, vip, backend)
}

#[test]
fn the_nodes_own_sctp_to_a_service_is_refused_at_the_uplink_and_counted() {
    require_privileged!("the_nodes_own_sctp_to_a_service_is_refused_at_the_uplink_and_counted");
    let (mut dp, vip, backend) = sctp_cluster_ip();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let node = "198.18.0.10:40000";
    let before = dp.counters().unwrap();
    // Socket LB translates no SCTP: a node process's INIT to the Service leaves by the uplink
    // untranslated, bound for the default route. Dropped there, counted.
    let init = sctp(sa(node), sa(vip), &SCTP_INIT);
    assert_eq!(run(&dp, TO_UPLINK, &init).0, TC_ACT_SHOT);
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_DROP_NODE_SCTP_TO_SERVICE), 1);
    // Only SCTP to an SCTP frontend: the same address on another port or protocol, and SCTP
    // replies of translated flows, go on as before.
    for pkt in [
        sctp(sa(node), sa("198.18.128.1:3999"), &SCTP_INIT),
        tcp(sa(node), sa(VIP), SYN, b""),
        sctp(sa(backend), sa("198.18.0.100:50000"), &[2, 0, 0, 4]),
    ] {
        assert_eq!(run(&dp, TO_UPLINK, &pkt), (TC_ACT_UNSPEC, pkt.clone()));
    }
    let later = dp.counters().unwrap();
    assert_eq!(delta(&after, &later, CTR_DROP_NODE_SCTP_TO_SERVICE), 0);
}

#[test]
fn icmp_errors_about_translated_sctp_are_put_back() {
    require_privileged!("icmp_errors_about_translated_sctp_are_put_back");
    let (dp, vip, _) = sctp_cluster_ip();
    let (_, sent) = run(&dp, FROM_POD, &sctp(sa(CLIENT), sa(vip), &SCTP_INIT));
    // The backend's node says "fragmentation needed" about the translated packet: the client
    // must see it about what it sent, to the Service.
    let router = Ipv4Addr::new(198, 19, 0, 1);
    let err = icmp_error(router, *sa(CLIENT).ip(), 4, &sent);
    let (verdict, out) = run(&dp, TO_POD, &err);
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let icmp = check_icmp(&out);
    let q = &icmp.quoted;
    assert_eq!(q[9], 132);
    assert_eq!(
        Ipv4Addr::from(<[u8; 4]>::try_from(&q[16..20]).unwrap()),
        *sa(vip).ip()
    );
    assert_eq!(u16::from_be_bytes([q[22], q[23]]), sa(vip).port());
}

/// Whether each conntrack entry is in `CT4_NEW` (flows not yet established), in map order.
fn in_new_table(dp: &Dataplane) -> Vec<bool> {
    dp.conntrack().unwrap().iter().map(|e| e.new).collect()
}

/// A UDP flow's two entries move to `CT4` together, on the client's packet after the first
/// reply, never one of them on the reply alone (only a direct-server-return entry on the
/// backend's node, which has no other, moves on a reply).
#[test]
fn a_udp_flows_entries_move_to_ct4_together_on_the_clients_packet_after_a_reply() {
    require_privileged!(
        "a_udp_flows_entries_move_to_ct4_together_on_the_clients_packet_after_a_reply"
    );
    let mut dp = dataplane();
    dp.upsert_service(
        fe(NODE_PORT, Protocol::Udp, FrontendKind::NodePort),
        &[be("198.19.0.20:8080")],
    )
    .unwrap();
    let client = sa("198.18.32.1:40000");
    run(&dp, FROM_UPLINK, &udp(client, sa(NODE_PORT), b"q"));
    assert_eq!(in_new_table(&dp), [true, true]);
    run(&dp, TO_UPLINK, &udp(sa("198.19.0.20:8080"), client, b"a"));
    assert_eq!(
        in_new_table(&dp),
        [true, true],
        "a reply alone moves nothing"
    );
    run(&dp, FROM_UPLINK, &udp(client, sa(NODE_PORT), b"q"));
    assert_eq!(
        in_new_table(&dp),
        [false, false],
        "both move on the client's packet"
    );
}

#[test]
fn a_syn_flood_fills_the_table_of_new_flows_and_never_evicts_an_established_one() {
    require_privileged!(
        "a_syn_flood_fills_the_table_of_new_flows_and_never_evicts_an_established_one"
    );
    let mut dp = dataplane();
    // Two backends: a flow that lost its entries would be counted as a new one, and could go
    // to the other backend.
    dp.upsert_service(
        fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort),
        &[be("198.19.0.20:8080"), be("198.19.0.21:8080")],
    )
    .unwrap();
    // Outside clients: established flows from 198.18.32.0/20, the flood from 198.18.64.0/18.
    let source = |base: u8, i: u32| {
        std::net::SocketAddrV4::new(
            Ipv4Addr::new(198, 18, base + (i / 250) as u8, 1 + (i % 250) as u8),
            40000,
        )
    };
    let client = |i| source(32, i);
    let (_, out) = run(&dp, FROM_UPLINK, &tcp(client(0), sa(NODE_PORT), SYN, b""));
    let first = check(&out).dst;
    assert_eq!(
        in_new_table(&dp),
        [true, true],
        "a new flow's two entries start in CT4_NEW"
    );
    run(&dp, TO_UPLINK, &tcp(first, client(0), SYN_ACK, b""));
    assert_eq!(
        in_new_table(&dp),
        [true, true],
        "the backend's SYN-ACK does not establish the flow"
    );
    run(&dp, FROM_UPLINK, &tcp(client(0), sa(NODE_PORT), ACK, b""));
    assert_eq!(
        in_new_table(&dp),
        [false, false],
        "the client's ACK establishes the flow and moves both entries to CT4"
    );
    // More established flows, idle through the flood: together they take more room than
    // CT4_NEW's half, as established flows take most of a busy node's table. (In one LRU table
    // the kernel moves idle entries to its inactive list once that list is the shorter one, and
    // evicts from there: a flood then evicts idle established flows.)
    let established = NEW_MAX * 3 / 8;
    let mut backends = vec![first];
    for i in 1..established {
        let (_, out) = run(&dp, FROM_UPLINK, &tcp(client(i), sa(NODE_PORT), SYN, b""));
        let backend = check(&out).dst;
        run(&dp, TO_UPLINK, &tcp(backend, client(i), SYN_ACK, b""));
        run(&dp, FROM_UPLINK, &tcp(client(i), sa(NODE_PORT), ACK, b""));
        backends.push(backend);
    }

    // The flood: SYNs from four times as many sources as CT4_NEW has room for flows (two
    // entries each), none ever answered.
    let flood = 2 * NEW_MAX;
    for i in 0..flood {
        run(
            &dp,
            FROM_UPLINK,
            &tcp(source(64, i), sa(NODE_PORT), SYN, b""),
        );
    }
    let fill = dp.conntrack_fill().unwrap();
    assert_eq!(
        fill.held,
        2 * u64::from(established),
        "the flood wrote nothing into CT4: {fill:?}"
    );
    assert!(
        fill.new_held <= u64::from(NEW_MAX),
        "CT4_NEW never holds more than its size: {fill:?}"
    );
    // The flood overflowed CT4_NEW: of its flows (two entries each), at most the table's
    // half is left. (Not "its first flow is gone": the LRU takes a new entry from a per-CPU
    // list, and entries still on the list of a CPU the test's thread has left are not
    // evicted until that CPU allocates again; a 6.12 guest kept the first flow so.)
    let ct = dp.conntrack().unwrap();
    let flood_left = ct
        .iter()
        .filter(|e| e.kind == CtKind::Service && e.src.ip().octets()[2] >= 64)
        .count() as u32;
    assert!(
        flood_left <= NEW_MAX / 2,
        "the flood's flows were evicted (the table was full): {flood_left} of {flood} left"
    );

    // Every established flow keeps its backend and its replies' translation.
    let before = dp.counters().unwrap();
    for (i, backend) in (0..established).zip(&backends) {
        let (_, out) = run(
            &dp,
            FROM_UPLINK,
            &tcp(client(i), sa(NODE_PORT), ACK, b"more"),
        );
        assert_eq!(check(&out).dst, *backend, "flow {i}");
        let (_, out) = run(&dp, TO_UPLINK, &tcp(*backend, client(i), ACK, b"reply"));
        let back = check(&out);
        assert_eq!((back.src, back.dst), (sa(NODE_PORT), client(i)), "flow {i}");
    }
    let after = dp.counters().unwrap();
    assert_eq!(
        delta(&before, &after, CTR_CT_HIT),
        u64::from(established),
        "each a hit, not a new flow"
    );
}

#[test]
fn a_udp_flow_is_established_by_an_answer_and_then_a_packet_from_its_client() {
    require_privileged!("a_udp_flow_is_established_by_an_answer_and_then_a_packet_from_its_client");
    let mut dp = dataplane();
    let dns = DNS;
    dns_service(&mut dp);
    let client = sa("198.19.0.10:41000");
    // One-way (statsd): it stays with the new flows, and is served from there.
    run(&dp, FROM_POD, &udp(client, sa(dns), b"q"));
    let before = dp.counters().unwrap();
    for _ in 0..2 {
        let (_, out) = run(&dp, FROM_POD, &udp(client, sa(dns), b"q"));
        assert_eq!(check(&out).dst, sa(DNS_BACKEND));
    }
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_CT_HIT), 2, "hits in CT4_NEW");
    assert_eq!(in_new_table(&dp), [true, true]);
    run(&dp, TO_POD, &udp(sa("198.19.0.20:5353"), client, b"a"));
    assert_eq!(in_new_table(&dp), [true, true], "an answer alone");
    let (_, out) = run(&dp, FROM_POD, &udp(client, sa(dns), b"q"));
    assert_eq!(check(&out).dst, sa("198.19.0.20:5353"));
    assert_eq!(
        in_new_table(&dp),
        [false, false],
        "answered, then used again"
    );
    // It goes on from CT4.
    let (_, out) = run(&dp, TO_POD, &udp(sa("198.19.0.20:5353"), client, b"a"));
    assert_eq!(check(&out).src, sa(dns));
}

#[test]
fn udp_flows_to_a_gone_backend_are_forgotten_from_both_tables() {
    require_privileged!("udp_flows_to_a_gone_backend_are_forgotten_from_both_tables");
    let mut dp = dataplane();
    let dns = "198.18.128.2:53";
    let backend = sa("198.19.0.20:5353");
    dp.upsert_service(
        fe(dns, Protocol::Udp, FrontendKind::ClusterIp),
        &[be("198.19.0.20:5353")],
    )
    .unwrap();
    // One flow one-way (in CT4_NEW), one answered and used again (in CT4).
    let (one_way, answered) = (sa("198.19.0.10:41000"), sa("198.19.0.10:41001"));
    run(&dp, FROM_POD, &udp(one_way, sa(dns), b"q"));
    run(&dp, FROM_POD, &udp(answered, sa(dns), b"q"));
    run(&dp, TO_POD, &udp(backend, answered, b"a"));
    run(&dp, FROM_POD, &udp(answered, sa(dns), b"q"));
    let mut tables = in_new_table(&dp);
    tables.sort();
    assert_eq!(tables, [false, false, true, true]);
    let target = sluice::dataplane::socket::SocketTarget {
        frontend: sluice::dataplane::FrontendId {
            addr: *sa(dns).ip(),
            port: 53,
            proto: Protocol::Udp,
        },
        backend: (*backend.ip(), backend.port()),
    };
    let forgotten = dp
        .forget_udp_flows(&[target].into_iter().collect())
        .unwrap();
    assert_eq!(forgotten, 2);
    assert!(dp.conntrack().unwrap().is_empty());
}

#[test]
fn a_reset_or_a_fin_from_the_client_does_not_move_a_flow_to_the_established_table() {
    require_privileged!(
        "a_reset_or_a_fin_from_the_client_does_not_move_a_flow_to_the_established_table"
    );
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let backend = sa("198.19.0.20:8080");
    // A spoofed SYN's real source answers the SYN-ACK with an RST; a FIN right after the
    // handshake is no flow worth keeping either. Neither takes CT4's room.
    for (port, flags) in [(41000, RST), (41001, FIN_ACK)] {
        let client = std::net::SocketAddrV4::new(*sa(CLIENT).ip(), port);
        run(&dp, FROM_POD, &tcp(client, sa(VIP), SYN, b""));
        run(&dp, TO_POD, &tcp(backend, client, SYN_ACK, b""));
        let (_, out) = run(&dp, FROM_POD, &tcp(client, sa(VIP), flags, b""));
        assert_eq!(check(&out).dst, backend, "still translated");
    }
    assert!(
        in_new_table(&dp).iter().all(|new| *new),
        "{:?}",
        dp.conntrack().unwrap()
    );
}

// ---- XDP on uplinks (`sluice_xdp_from_uplink`): a fast path for established flows ----

/// A client outside the cluster, and the NodePort [`NODE_PORT`]'s local backend.
const OUTSIDE: &str = "198.18.0.100:50000";
const LOCAL_BACKEND: &str = "198.19.0.20:8080";

/// The XDP counters, in the order [`xdp_delta`] gives their changes: seen, then its outcomes
/// (`proxy_common::XDP_OUTCOMES`: hit, three ways to TC, sent out by XDP, to TC for the route,
/// a new flow passed on, a new flow sent out, dropped, to TC as another host's frame).
const XDP_COUNTERS: [u32; 11] = {
    let mut all = [CTR_XDP_SEEN; 11];
    let mut i = 0;
    while i < XDP_OUTCOMES.len() {
        all[i + 1] = XDP_OUTCOMES[i];
        i += 1;
    }
    all
};

/// The XDP counters' changes between two readings ([`XDP_COUNTERS`]).
fn xdp_delta(before: &Counters, after: &Counters) -> [u64; 11] {
    XDP_COUNTERS.map(|i| delta(before, after, i))
}

/// What [`xdp_delta`] is for one packet counted as `reason`.
fn xdp_one(reason: u32) -> [u64; 11] {
    let mut want = [0; 11];
    want[0] = 1;
    want[XDP_COUNTERS.iter().position(|&c| c == reason).unwrap()] = 1;
    want
}

/// Runs `pkt` through XDP and asserts it was passed on, counted (of XDP's counters) only as
/// `reason`; returns the packet as XDP left it.
fn xdp_passes(dp: &Dataplane, pkt: &[u8], reason: u32, what: &str) -> Vec<u8> {
    let before = dp.counters().unwrap();
    let (verdict, out) = run_xdp(dp, XDP_FROM_UPLINK, pkt);
    let after = dp.counters().unwrap();
    assert_eq!(verdict, XDP_PASS, "{what}");
    assert_eq!(
        xdp_delta(&before, &after),
        xdp_one(reason),
        "{what}: counted as"
    );
    out
}

/// Runs `pkt` through XDP and asserts it went to TC untouched, counted as `reason`.
fn xdp_hands_to_tc(dp: &Dataplane, pkt: &[u8], reason: u32, what: &str) {
    let out = xdp_passes(dp, pkt, reason, what);
    assert_eq!(out, pkt, "{what}: XDP changed a packet it leaves to TC");
}

/// What XDP DNATed and passed on goes through TC ingress next, which must let it by untouched;
/// returns it as seen, checksums verified.
fn tc_lets_by(dp: &Dataplane, out: &[u8], what: &str) -> Seen {
    let (verdict, again) = run(dp, FROM_UPLINK, out);
    assert_eq!(
        (verdict, again.as_slice()),
        (TC_ACT_UNSPEC, out),
        "{what}: TC after XDP"
    );
    check(out)
}

/// Runs `pkt`, a new flow's first packet to a local backend, through XDP and asserts that XDP
/// started the flow exactly as TC would have: then forgets what XDP recorded and lets TC start
/// it from the same state, which must record the same entries (times aside) and make the
/// same bytes. Checksums verified independently. The flow is left as TC made it.
fn xdp_starts_as_tc(dp: &mut Dataplane, pkt: &[u8], what: &str) -> Seen {
    let ct_before = dp.conntrack().unwrap();
    let out = xdp_passes(dp, pkt, CTR_XDP_NEW_FLOW, what);
    assert_ne!(out, pkt, "{what}: translated");
    let by_xdp = recorded(dp);
    assert_eq!(
        by_xdp.len(),
        ct_before.len() + 2,
        "{what}: XDP recorded the flow's two entries"
    );
    for e in dp.conntrack().unwrap() {
        if !ct_before.contains(&e) {
            dp.evict_conntrack_entry(&e).unwrap();
        }
    }
    let tc_before = dp.counters().unwrap();
    let (verdict, by_tc) = run(dp, FROM_UPLINK, pkt);
    let tc_after = dp.counters().unwrap();
    assert_eq!(
        (verdict, delta(&tc_before, &tc_after, CTR_NEW_FLOW)),
        (TC_ACT_UNSPEC, 1),
        "{what}: a new flow at TC"
    );
    assert_eq!(out, by_tc, "{what}: XDP and TC translate alike");
    assert_eq!(recorded(dp), by_xdp, "{what}: XDP and TC record alike");
    tc_lets_by(dp, &out, what)
}

/// Runs `pkt` through XDP and asserts it was DNATed exactly as TC would have: the same bytes
/// TC ingress makes of it (on a copy), with checksums verified independently.
fn xdp_translates_as_tc(dp: &Dataplane, pkt: &[u8], what: &str) -> Seen {
    let out = xdp_passes(dp, pkt, CTR_XDP_CT_HIT, what);
    let (_, by_tc) = run(dp, FROM_UPLINK, pkt);
    assert_eq!(out, by_tc, "{what}: XDP and TC translate alike");
    tc_lets_by(dp, &out, what)
}

/// A NodePort and a UDP NodePort with one local backend each, and a TCP flow from
/// [`OUTSIDE`] established through TC (SYN, the backend's SYN-ACK, the client's ACK).
fn node_port_flow() -> Shared {
    let mut dp = dataplane();
    dp.upsert_service(
        fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort),
        &[be(LOCAL_BACKEND)],
    )
    .unwrap();
    dp.upsert_service(
        fe("198.18.0.10:30053", Protocol::Udp, FrontendKind::NodePort),
        &[be(DNS_BACKEND)],
    )
    .unwrap();
    let (client, node_port, backend) = (sa(OUTSIDE), sa(NODE_PORT), sa(LOCAL_BACKEND));
    // The SYN starts the flow at XDP, as TC would; its retransmission, and the ACK that moves
    // the flow to the table of established flows, are TC's.
    let syn = tcp(client, node_port, SYN, b"");
    assert_eq!(xdp_starts_as_tc(&mut dp, &syn, "a SYN").dst, backend);
    xdp_hands_to_tc(&dp, &syn, CTR_XDP_TO_TC_FLOW, "a SYN again");
    run(&dp, TO_UPLINK, &tcp(backend, client, SYN_ACK, b""));
    let ack = tcp(client, node_port, ACK, b"");
    xdp_hands_to_tc(
        &dp,
        &ack,
        CTR_XDP_TO_TC_FLOW,
        "the ACK of a flow not yet established",
    );
    run(&dp, FROM_UPLINK, &ack);
    dp
}

#[test]
fn xdp_dnats_an_established_flows_packets_exactly_as_tc_does() {
    require_privileged!("xdp_dnats_an_established_flows_packets_exactly_as_tc_does");
    let dp = node_port_flow();
    let (client, node_port) = (sa(OUTSIDE), sa(NODE_PORT));
    let service_packets = || {
        let flows = dp.conntrack().unwrap();
        let e = flows
            .iter()
            .find(|e| e.kind == CtKind::Service && e.dst == node_port)
            .expect("the service entry");
        assert!(!e.new, "the flow is established");
        e.entry.packets
    };
    let before = service_packets();
    let data = tcp(client, node_port, ACK, b"GET / HTTP/1.1\r\n\r\n");
    let seen = xdp_translates_as_tc(&dp, &data, "a data packet");
    assert_eq!((seen.src, seen.dst), (client, sa(LOCAL_BACKEND)));
    assert_eq!(seen.payload, b"GET / HTTP/1.1\r\n\r\n");
    // The entries were brought up to date, as TC's own hit does: the packet counted on the
    // service entry once by XDP and once by TC's run on its copy.
    assert_eq!(service_packets(), before + 2);
    // A FIN changes the flow's state: TC's.
    xdp_hands_to_tc(
        &dp,
        &tcp(client, node_port, FIN_ACK, b""),
        CTR_XDP_TO_TC_FLOW,
        "a FIN",
    );
    xdp_hands_to_tc(
        &dp,
        &tcp(client, node_port, RST, b""),
        CTR_XDP_TO_TC_FLOW,
        "an RST",
    );
}

#[test]
fn xdp_translates_udp_ip_options_and_a_missing_udp_checksum_right() {
    require_privileged!("xdp_translates_udp_ip_options_and_a_missing_udp_checksum_right");
    let dp = node_port_flow();
    let (client, udp_port) = (sa(OUTSIDE), sa("198.18.0.10:30053"));
    let q = udp(client, udp_port, b"query");
    let mut dp = dp;
    let seen = xdp_starts_as_tc(&mut dp, &q, "a UDP flow's first datagram");
    assert_eq!(seen.dst, sa(DNS_BACKEND));
    run(&dp, TO_UPLINK, &udp(sa(DNS_BACKEND), client, b"answer"));
    // The client's next datagram establishes the flow: TC moves it to `CT4`.
    let again = udp(client, udp_port, b"again");
    xdp_hands_to_tc(
        &dp,
        &again,
        CTR_XDP_TO_TC_FLOW,
        "the datagram that establishes",
    );
    run(&dp, FROM_UPLINK, &again);
    let seen = xdp_translates_as_tc(&dp, &udp(client, udp_port, b"more"), "a UDP datagram");
    assert_eq!(seen.dst, sa(DNS_BACKEND));
    let mut none = udp(client, udp_port, b"no checksum");
    none[14 + 20 + 6] = 0;
    none[14 + 20 + 7] = 0;
    let seen = xdp_translates_as_tc(&dp, &none, "a UDP datagram without checksum");
    assert_eq!(seen.udp_checksum, Some(0), "a zero UDP checksum stays zero");
    // IPv4 options are skipped over.
    let mut h = etherparse::Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::TCP,
        client.ip().octets(),
        sa(NODE_PORT).ip().octets(),
    )
    .unwrap();
    h.options = [1u8, 1, 1, 0][..].try_into().unwrap();
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        .tcp(client.port(), sa(NODE_PORT).port(), 1000, 64240)
        .ack(1)
        .write(&mut pkt, b"with options")
        .unwrap();
    assert_eq!(pkt[14] & 0x0f, 6, "a 24-byte IPv4 header");
    let seen = xdp_translates_as_tc(&dp, &pkt, "a packet with IPv4 options");
    assert_eq!(seen.dst, sa(LOCAL_BACKEND));
}

#[test]
fn xdp_leaves_to_tc_what_it_cannot_translate_alike_untouched_and_counted() {
    require_privileged!("xdp_leaves_to_tc_what_it_cannot_translate_alike_untouched_and_counted");
    let dp = node_port_flow();
    let (client, node_port) = (sa(OUTSIDE), sa(NODE_PORT));
    // A checksum that may be partial (the pseudo-header's sum, as a veth peer with offload
    // leaves it): only TC knows how to update it.
    let mut partial = tcp(client, node_port, ACK, b"offloaded");
    let l4_len = (partial.len() - 34) as u32;
    let ip = &partial[26..34];
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>()
        + 6
        + l4_len;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    partial[34 + 16..34 + 18].copy_from_slice(&(sum as u16).to_be_bytes());
    xdp_hands_to_tc(
        &dp,
        &partial,
        CTR_XDP_TO_TC_PARTIAL_CSUM,
        "a partial checksum",
    );
    // A ClusterIP from outside: an address the filter knows, a flow no table has; TC then
    // lets it by (ClusterIPs are not reachable from outside).
    let mut dp = dp;
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    xdp_hands_to_tc(
        &dp,
        &tcp(client, sa(VIP), ACK, b"x"),
        CTR_XDP_TO_TC_FLOW,
        "a ClusterIP from outside",
    );
    // Not a Service's: another address, other protocols, not IPv4, fragments, malformed.
    let not_service = [
        (
            "to an address no frontend has",
            tcp(client, sa("198.18.0.99:80"), ACK, b"x"),
        ),
        (
            "to a frontend's address on a port no frontend or flow has",
            tcp(
                client,
                std::net::SocketAddrV4::new(*node_port.ip(), 22),
                ACK,
                b"x",
            ),
        ),
        ("ICMP", {
            let mut v = Vec::new();
            etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(client.ip().octets(), node_port.ip().octets(), 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut v, b"ping")
                .unwrap();
            v
        }),
        ("an ARP frame", {
            let mut v = tcp(client, node_port, ACK, b"x");
            v[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            v
        }),
        ("a first fragment", {
            let mut v = tcp(client, node_port, ACK, b"x");
            v[20] |= 0x20; // more fragments
            set_ip_checksum(&mut v);
            v
        }),
        ("a TCP header cut short", {
            let mut v = tcp(client, node_port, ACK, b"");
            v.truncate(14 + 20 + 12);
            v[16..18].copy_from_slice(&32u16.to_be_bytes());
            set_ip_checksum(&mut v);
            v
        }),
    ];
    for (what, pkt) in not_service {
        xdp_hands_to_tc(&dp, &pkt, CTR_XDP_TO_TC_NOT_SERVICE, what);
    }
    // A flow XDP does not know as established: never seen, or to a frontend from another
    // client port.
    xdp_hands_to_tc(
        &dp,
        &tcp(sa("198.18.0.100:50001"), node_port, ACK, b"x"),
        CTR_XDP_TO_TC_FLOW,
        "a packet of no flow",
    );
}

/// New flows XDP does not finish go to TC untouched with nothing recorded: a frontend without
/// endpoints (TC refuses it with an ICMP), a ClusterIP from outside, a client that is its own
/// backend. What TC drops XDP drops, recording nothing: a client outside the frontend's
/// loadBalancerSourceRanges, externalTrafficPolicy Local without a local endpoint.
#[test]
fn xdp_leaves_new_flows_it_does_not_finish_to_tc_and_drops_what_tc_drops() {
    require_privileged!("xdp_leaves_new_flows_it_does_not_finish_to_tc_and_drops_what_tc_drops");
    let mut dp = dataplane();
    let no_endpoints = fe("198.18.0.10:30081", Protocol::Tcp, FrontendKind::NodePort);
    dp.upsert_service(no_endpoints, &[]).unwrap();
    let local_policy = fe("198.18.0.10:30082", Protocol::Tcp, FrontendKind::NodePort);
    dp.upsert_frontend(
        local_policy,
        &Backends {
            all: vec![be("198.19.5.5:8080")],
            external: Some(vec![]),
            sources: None,
            affinity_timeout_s: None,
            no_local_endpoints: true,
            maglev: false,
        },
    )
    .unwrap();
    let itself = fe("198.18.0.10:30083", Protocol::Tcp, FrontendKind::NodePort);
    dp.upsert_service(itself, &[be("198.18.0.100:8080")])
        .unwrap();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let lb = fe("198.18.192.2:80", Protocol::Tcp, FrontendKind::LoadBalancer);
    dp.upsert_frontend(
        lb,
        &Backends {
            all: vec![be("198.19.0.20:8080")],
            external: None,
            sources: Some(SourceRanges {
                cidrs: vec!["198.18.0.96/28".parse().unwrap()],
                from_node: false,
            }),
            affinity_timeout_s: None,
            no_local_endpoints: false,
            maglev: false,
        },
    )
    .unwrap();
    let client = sa(OUTSIDE);
    for (what, to) in [
        ("no endpoints", "198.18.0.10:30081"),
        ("the client is the backend", "198.18.0.10:30083"),
        ("a ClusterIP from outside", VIP),
    ] {
        xdp_hands_to_tc(
            &dp,
            &tcp(client, sa(to), SYN, b""),
            CTR_XDP_TO_TC_FLOW,
            what,
        );
        assert_eq!(dp.conntrack().unwrap(), vec![], "{what}: nothing recorded");
    }
    // TC then answers the one without endpoints as always: refused with an ICMP.
    let (verdict, out) = run(
        &dp,
        FROM_UPLINK,
        &tcp(client, sa("198.18.0.10:30081"), SYN, b""),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "refused by TC");
    assert_eq!(out[14 + 9], 1, "an ICMP");

    for (what, pkt) in [
        (
            "a source in no range",
            tcp(sa("198.18.0.200:50000"), sa("198.18.192.2:80"), SYN, b""),
        ),
        (
            "no local endpoint",
            tcp(client, sa("198.18.0.10:30082"), SYN, b""),
        ),
    ] {
        let before = dp.counters().unwrap();
        let (verdict, _) = run_xdp(&dp, XDP_FROM_UPLINK, &pkt);
        let after = dp.counters().unwrap();
        assert_eq!(verdict, XDP_DROP, "{what}");
        assert_eq!(xdp_delta(&before, &after), xdp_one(CTR_XDP_DROP), "{what}");
        assert_eq!(dp.conntrack().unwrap(), vec![], "{what}: nothing recorded");
        assert_eq!(
            run(&dp, FROM_UPLINK, &pkt).0,
            TC_ACT_SHOT,
            "{what}: TC drops it too"
        );
    }
    let allowed = tcp(sa("198.18.0.100:50000"), sa("198.18.192.2:80"), SYN, b"");
    let seen = xdp_starts_as_tc(&mut dp, &allowed, "a source in a range");
    assert_eq!(seen.dst, sa("198.19.0.20:8080"));
}

/// sessionAffinity ClientIP from outside, with new flows started at XDP: a client's new flows
/// all go to the backend its first went to, as at TC (the choice is the shared code's).
#[test]
fn session_affinity_holds_for_new_flows_started_at_xdp() {
    require_privileged!("session_affinity_holds_for_new_flows_started_at_xdp");
    let mut dp = dataplane();
    let three = ["198.19.0.20:8080", "198.19.0.21:8080", "198.19.0.22:8080"];
    dp.upsert_frontend(
        fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort),
        &Backends {
            affinity_timeout_s: Some(60),
            ..Backends::all(three.iter().map(|a| be(a)).collect())
        },
    )
    .unwrap();
    let before = dp.counters().unwrap();
    let to: Vec<_> = (0..10u16)
        .map(|i| {
            let client = std::net::SocketAddrV4::new(*sa(OUTSIDE).ip(), 51_000 + i);
            let (verdict, out) =
                run_xdp(&dp, XDP_FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""));
            assert_eq!(verdict, XDP_PASS);
            check(&out).dst
        })
        .collect();
    let after = dp.counters().unwrap();
    assert_eq!(
        delta(&before, &after, CTR_XDP_NEW_FLOW),
        10,
        "every one started at XDP"
    );
    assert!(
        to.iter().all(|d| *d == to[0]),
        "one backend for the client: {to:?}"
    );
    assert_eq!(delta(&before, &after, CTR_AFFINITY_HIT), 9);
}

/// A frame for another host's MAC address (a bridge floods one while it has not learnt where
/// its destination is) starts no flow and is not translated: TC passes it untouched by its
/// `pkt_type`, and XDP, which has none, by the uplink's own address in `LB4_UPLINK_MACS`, as
/// the stack drops it. A frame to the node's own address, or a broadcast one, starts its flow
/// as ever; an uplink the agent wrote no address for is not checked at XDP.
#[test]
fn a_frame_for_another_hosts_mac_address_starts_no_flow_at_tc_or_xdp() {
    require_privileged!("a_frame_for_another_hosts_mac_address_starts_no_flow_at_tc_or_xdp");
    let mut dp = dataplane();
    dp.upsert_frontend(
        fe(NODE_PORT, Protocol::Tcp, FrontendKind::NodePort),
        &Backends::all(vec![be(LOCAL_BACKEND)]),
    )
    .unwrap();
    let syn = |port: u16, dst_mac: [u8; 6]| {
        let client = std::net::SocketAddrV4::new(*sa(OUTSIDE).ip(), port);
        let mut f = tcp(client, sa(NODE_PORT), SYN, b"");
        f[..6].copy_from_slice(&dst_mac);
        f
    };
    const BROADCAST: [u8; 6] = [0xff; 6];
    // TC: the test run's device is the loopback device, whose address is all zeros (MAC_B).
    let flooded = syn(52_000, MAC_OTHER_HOST);
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_UPLINK, &flooded);
    let after = dp.counters().unwrap();
    assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &flooded), "TC: untouched");
    assert_eq!(delta(&before, &after, CTR_PASS_OTHER_HOST), 1);
    assert_eq!(delta(&before, &after, CTR_NEW_FLOW), 0);
    assert_eq!(dp.conntrack().unwrap(), vec![], "TC: nothing recorded");
    for (port, mac, what) in [
        (52_001, MAC_B, "TC: to the node's own address"),
        (52_002, BROADCAST, "TC: broadcast"),
    ] {
        let (verdict, out) = run(&dp, FROM_UPLINK, &syn(port, mac));
        assert_eq!(verdict, TC_ACT_UNSPEC, "{what}");
        assert_eq!(check(&out).dst, sa(LOCAL_BACKEND), "{what}: DNATed");
    }
    // XDP: the loopback device (index 1 in any namespace) given an address of its own.
    const OWN: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    dp.set_uplink_mac(1, OWN).unwrap();
    let ct = dp.conntrack().unwrap();
    let flooded = syn(52_003, MAC_OTHER_HOST);
    xdp_hands_to_tc(
        &dp,
        &flooded,
        CTR_XDP_TO_TC_OTHER_HOST,
        "XDP: another host's",
    );
    assert_eq!(dp.conntrack().unwrap(), ct, "XDP: nothing recorded");
    for (port, mac, what) in [
        (52_004, OWN, "XDP: to the uplink's own address"),
        (52_005, BROADCAST, "XDP: broadcast"),
    ] {
        let out = xdp_passes(&dp, &syn(port, mac), CTR_XDP_NEW_FLOW, what);
        assert_eq!(check(&out).dst, sa(LOCAL_BACKEND), "{what}: DNATed");
    }
    // Without the uplink's address, XDP does not check (TC still does).
    dp.retain_uplink_macs(&Default::default()).unwrap();
    xdp_passes(
        &dp,
        &syn(52_006, MAC_OTHER_HOST),
        CTR_XDP_NEW_FLOW,
        "XDP: unchecked",
    );
}

// ---- Maglev (`--lb-algorithm maglev`, `sluice.io/lb-algorithm`) ----

const LB: &str = "198.18.192.2:80";

/// `n` local backends 198.19.0.(30+i):8080.
fn lb_backends(n: u8) -> Vec<Backend> {
    (0..n)
        .map(|i| be(&format!("198.19.0.{}:8080", 30 + i)))
        .collect()
}

/// Writes the LoadBalancer frontend [`LB`] with `backends`, choosing by Maglev or not.
fn lb_service(dp: &mut Dataplane, backends: Vec<Backend>, maglev: bool) {
    dp.upsert_frontend(
        fe(LB, Protocol::Tcp, FrontendKind::LoadBalancer),
        &Backends {
            maglev,
            ..Backends::all(backends)
        },
    )
    .unwrap();
}

/// The backend each of `n` new flows from outside to [`LB`] was sent to (client ports from
/// `first_port`), started at TC.
fn chosen(dp: &Dataplane, n: u16, first_port: u16) -> Vec<std::net::SocketAddrV4> {
    chosen_by(dp, n, first_port, false)
}

/// [`chosen`], the flows started at TC or (`xdp`) at XDP.
fn chosen_by(dp: &Dataplane, n: u16, first_port: u16, xdp: bool) -> Vec<std::net::SocketAddrV4> {
    (0..n)
        .map(|i| {
            let client = std::net::SocketAddrV4::new(
                Ipv4Addr::new(198, 18, 100, (i % 200) as u8 + 1),
                first_port + i / 200,
            );
            let syn = tcp(client, sa(LB), SYN, b"");
            let (verdict, out) = if xdp {
                run_xdp(dp, XDP_FROM_UPLINK, &syn)
            } else {
                run(dp, FROM_UPLINK, &syn)
            };
            let passed = if xdp { XDP_PASS } else { TC_ACT_UNSPEC };
            assert_eq!(verdict, passed);
            check(&out).dst
        })
        .collect()
}

#[test]
fn maglev_sends_a_flow_to_the_same_backend_on_every_node() {
    require_privileged!("maglev_sends_a_flow_to_the_same_backend_on_every_node");
    let backends = lb_backends(5);
    // Node A writes the backends in one order; node B in the other, after another Service
    // took the first backend ids: ids and slots differ, the backends at each position do not.
    let mut a = dataplane();
    lb_service(&mut a, backends.clone(), true);
    let mut b = dataplane();
    cluster_ip(&mut b, &["198.19.0.90:8080", "198.19.0.91:8080"]);
    let mut reversed = backends.clone();
    reversed.reverse();
    lb_service(&mut b, reversed, true);
    let (on_a, on_b) = (chosen(&a, 400, 20_000), chosen(&b, 400, 20_000));
    let differ: Vec<usize> = (0..on_a.len()).filter(|&i| on_a[i] != on_b[i]).collect();
    assert!(
        differ.is_empty(),
        "{} of 400 flows went to different backends on the two nodes, as flow {:?}: {} and {}",
        differ.len(),
        differ.first(),
        on_a[differ[0]],
        on_b[differ[0]]
    );
    let spread: std::collections::BTreeSet<_> = on_a.iter().collect();
    assert_eq!(spread.len(), 5, "the flows use every backend");
    // Started at XDP on one node and at TC on the other: the same backends still.
    let (tc_a, xdp_b) = (chosen(&a, 400, 25_000), chosen_by(&b, 400, 25_000, true));
    assert_eq!(tc_a, xdp_b, "XDP's Maglev choice is TC's");
    // Each is the backend the agent's table puts at the flow's position, which the programs
    // compute with the shared hash.
    let addrs: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (b.addr, b.port)).collect();
    let seed = sluice::dataplane::DEFAULT_MAGLEV_SEED;
    let table = sluice::dataplane::maglev::table(&addrs, seed, MAGLEV_M);
    for (i, got) in on_a.iter().enumerate().take(50) {
        let client = std::net::SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 100, (i % 200) as u8 + 1),
            20_000 + (i / 200) as u16,
        );
        let h = maglev_hash(
            u32::from(*client.ip()).to_be(),
            u32::from(*sa(LB).ip()).to_be(),
            client.port().to_be(),
            sa(LB).port().to_be(),
            IPPROTO_TCP,
        );
        let (addr, port) = addrs[table[maglev_position(h, seed)]];
        assert_eq!(*got, std::net::SocketAddrV4::new(addr, port), "flow {i}");
    }
    // Without Maglev, the same flows spread at random: the nodes disagree.
    let (mut a, mut b) = (a, b);
    lb_service(&mut a, backends.clone(), false);
    lb_service(&mut b, backends, false);
    let (on_a, on_b) = (chosen(&a, 400, 30_000), chosen(&b, 400, 30_000));
    assert!(
        (0..on_a.len()).any(|i| on_a[i] != on_b[i]),
        "chosen at random, 400 flows cannot all agree"
    );
    assert!(
        a.services().iter().all(|(_, bes)| !bes.maglev),
        "Maglev is off again"
    );
}

#[test]
fn removing_one_of_ten_maglev_backends_moves_its_flows_and_few_others() {
    require_privileged!("removing_one_of_ten_maglev_backends_moves_its_flows_and_few_others");
    let all = lb_backends(10);
    let gone = all[4];
    let rest: Vec<Backend> = all.iter().copied().filter(|b| *b != gone).collect();
    let mut before = dataplane();
    lb_service(&mut before, all, true);
    let mut after = dataplane();
    lb_service(&mut after, rest, true);
    let n = 2_000;
    let (was, now) = (chosen(&before, n, 40_000), chosen(&after, n, 40_000));
    let gone = std::net::SocketAddrV4::new(gone.addr, gone.port);
    let others: Vec<usize> = (0..usize::from(n)).filter(|&i| was[i] != gone).collect();
    let moved = others.iter().filter(|&&i| was[i] != now[i]).count();
    let fraction = moved as f64 / others.len() as f64;
    println!(
        "Maglev, 10 backends, one removed: {} of {n} flows were on it (all moved); {moved} of \
         the other {} moved ({:.2}%)",
        usize::from(n) - others.len(),
        others.len(),
        fraction * 100.0
    );
    assert!(
        now.iter().all(|b| *b != gone),
        "no flow goes to the removed backend"
    );
    assert!(
        fraction < 0.05,
        "{:.2}% of the flows of other backends moved",
        fraction * 100.0
    );
}

/// A flow's two conntrack entries, by its client, frontend and backend (no SNAT): the service
/// entry, and the reverse entry unless it is gone.
fn flow_entries(
    dp: &Dataplane,
    client: std::net::SocketAddrV4,
    frontend: std::net::SocketAddrV4,
    backend: std::net::SocketAddrV4,
) -> (
    sluice::dataplane::CtEntry,
    Option<sluice::dataplane::CtEntry>,
) {
    let ct = dp.conntrack().unwrap();
    let s = ct
        .iter()
        .find(|e| e.kind == CtKind::Service && e.src == client && e.dst == frontend)
        .cloned()
        .expect("the service entry");
    let r = ct
        .into_iter()
        .find(|e| e.kind == CtKind::Reverse && e.src == client && e.dst == backend);
    (s, r)
}

/// What `one_lookup_per_steady_packet` sends a packet through: TC alone, or XDP and then TC
/// when XDP hands the packet on untouched. The packet as it leaves.
type Send = dyn Fn(&Dataplane, &[u8]) -> Vec<u8>;

/// The steady path of an established, open TCP flow from `client` to `frontend` on `backend`
/// (`conntrack::steady`): its packets are translated from the service entry alone, the reverse
/// entry neither read nor renewed, except every `CT_STEADY_CHECK_EVERY`-th packet, a packet
/// after a pause of `CT_STEADY_GAP_NS` and a packet that changes the state (a FIN), which
/// renew it, or rebuild it after an eviction. `reply` sends the backend's packet back.
fn one_lookup_per_steady_packet(
    dp: &mut Dataplane,
    (client, frontend, backend): (
        std::net::SocketAddrV4,
        std::net::SocketAddrV4,
        std::net::SocketAddrV4,
    ),
    send: &Send,
    reply: &Send,
) {
    let data = tcp(client, frontend, ACK, b"data");
    let every = CT_STEADY_CHECK_EVERY;
    let sent = |dp: &Dataplane| {
        let out = send(dp, &data);
        assert_eq!(
            (check(&out).src, check(&out).dst),
            (client, backend),
            "translated"
        );
    };
    // Renewed (or rebuilt) exactly on the packets that find the service entry's count at a
    // multiple of `every`; never counted. (A pause between packets, well within the steady
    // gap, so that the programs' clock, a tick coarse where the kernel has that, moves.)
    // A packet after a pause of `CT_STEADY_GAP_NS` takes the full way too: on a slow
    // emulated kernel the test's own steps can take that long, so each packet's rule is
    // checked against the gap the program saw (the service entry's times before and after).
    let full_way = |before: &sluice::dataplane::CtEntry, after: &sluice::dataplane::CtEntry| {
        let paused = after.entry.seen_ns.wrapping_sub(before.entry.seen_ns) >= CT_STEADY_GAP_NS;
        (before.entry.packets.is_multiple_of(every), paused)
    };
    let (mut checks, mut steady) = (0, 0);
    for _ in 0..2 * every {
        let (s, r) = flow_entries(dp, client, frontend, backend);
        let r = r.expect("the reverse entry");
        std::thread::sleep(std::time::Duration::from_millis(15));
        sent(dp);
        let (s_after, after) = flow_entries(dp, client, frontend, backend);
        let after = after.expect("the reverse entry");
        assert_eq!(
            after.entry.packets, r.entry.packets,
            "a reverse entry counts replies only"
        );
        let renewed = after.entry.seen_ns != r.entry.seen_ns;
        let (check, paused) = full_way(&s, &s_after);
        assert_eq!(
            renewed,
            check || paused,
            "the packet at count {}: a check {check}, after a pause {paused}",
            s.entry.packets
        );
        checks += usize::from(check && !paused);
        steady += usize::from(!check && !paused);
    }
    assert!(
        checks >= 1 && steady >= every as usize,
        "both rules met without a pause: {checks} checks, {steady} steady packets"
    );

    // Evicted: the steady packets go on without it; the check's packet (or one after a
    // pause) rebuilds it.
    let evict = |dp: &mut Dataplane| {
        let (s, r) = flow_entries(dp, client, frontend, backend);
        dp.evict_conntrack_entry(&r.expect("the reverse entry"))
            .unwrap();
        let (_, r) = flow_entries(dp, client, frontend, backend);
        assert!(r.is_none(), "evicted");
        s.entry.packets
    };
    let count = loop {
        let (s, _) = flow_entries(dp, client, frontend, backend);
        if s.entry.packets % every != 0 {
            break evict(dp);
        }
        sent(dp);
    };
    let due = every - count % every + 1;
    for i in 1..=due {
        let (s, _) = flow_entries(dp, client, frontend, backend);
        sent(dp);
        let (s_after, r) = flow_entries(dp, client, frontend, backend);
        let (check, paused) = full_way(&s, &s_after);
        assert_eq!(
            check,
            i == due,
            "packet {i} after the eviction (count {count})"
        );
        assert_eq!(
            r.is_some(),
            check || paused,
            "packet {i} after the eviction (count {count}): the check is packet {due}, after a pause {paused}"
        );
        if r.is_some() {
            break;
        }
    }
    assert!(
        flow_entries(dp, client, frontend, backend).1.is_some(),
        "rebuilt by the check"
    );
    let out = reply(dp, &tcp(backend, client, ACK, b"ok"));
    assert_eq!(
        check(&out).src,
        frontend,
        "the rebuilt entry translates replies"
    );

    // After a pause, the flow's next packet takes the full way.
    let steady_next = |dp: &Dataplane| {
        let (s, _) = flow_entries(dp, client, frontend, backend);
        s.entry.packets % every != 0
    };
    while !steady_next(dp) {
        sent(dp);
    }
    evict(dp);
    std::thread::sleep(std::time::Duration::from_nanos(
        CT_STEADY_GAP_NS + 100_000_000,
    ));
    sent(dp);
    assert!(
        flow_entries(dp, client, frontend, backend).1.is_some(),
        "rebuilt by the first packet after a pause"
    );

    // A FIN takes the full way, and its state is the reverse entry's.
    while !steady_next(dp) {
        sent(dp);
    }
    evict(dp);
    let out = send(dp, &tcp(client, frontend, FIN_ACK, b""));
    assert_eq!(check(&out).dst, backend);
    let (_, r) = flow_entries(dp, client, frontend, backend);
    let r = r.expect("rebuilt by the FIN");
    assert_ne!(r.entry.state() & CT_FLAG_FIN_FWD, 0, "{r:?}");
}

#[test]
fn an_established_flows_steady_packets_are_translated_with_one_lookup() {
    require_privileged!("an_established_flows_steady_packets_are_translated_with_one_lookup");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let flow = (sa(CLIENT), sa(VIP), sa("198.19.0.20:8080"));
    establish(&dp, flow.0, flow.1, flow.2);
    one_lookup_per_steady_packet(
        &mut dp,
        flow,
        &|dp, pkt| run(dp, FROM_POD, pkt).1,
        &|dp, pkt| run(dp, TO_POD, pkt).1,
    );

    // UDP too, once answered and established: a datagram after the eviction is translated
    // and leaves the reverse entry to the check.
    dns_service(&mut dp);
    let (client, dns, backend) = (sa("198.19.0.10:41000"), sa(DNS), sa(DNS_BACKEND));
    run(&dp, FROM_POD, &udp(client, dns, b"q"));
    run(&dp, TO_POD, &udp(backend, client, b"a"));
    run(&dp, FROM_POD, &udp(client, dns, b"q"));
    let (s, r) = flow_entries(&dp, client, dns, backend);
    assert!(
        !s.new && s.entry.packets % CT_STEADY_CHECK_EVERY != 0,
        "{s:?}"
    );
    dp.evict_conntrack_entry(&r.expect("the reverse entry"))
        .unwrap();
    let (_, out) = run(&dp, FROM_POD, &udp(client, dns, b"q"));
    assert_eq!(check(&out).dst, backend);
    assert!(flow_entries(&dp, client, dns, backend).1.is_none());
}

#[test]
fn xdp_serves_an_established_flows_steady_packets_with_one_lookup() {
    require_privileged!("xdp_serves_an_established_flows_steady_packets_with_one_lookup");
    let mut dp = node_port_flow();
    // XDP, and TC after it for what XDP hands on (a check whose reverse entry is gone, a FIN),
    // as on an uplink.
    let send = |dp: &Dataplane, pkt: &[u8]| {
        let (verdict, out) = run_xdp(dp, XDP_FROM_UPLINK, pkt);
        assert_eq!(verdict, XDP_PASS);
        if out == pkt {
            return run(dp, FROM_UPLINK, pkt).1;
        }
        out
    };
    let before = dp.counters().unwrap();
    one_lookup_per_steady_packet(
        &mut dp,
        (sa(OUTSIDE), sa(NODE_PORT), sa(LOCAL_BACKEND)),
        &send,
        &|dp, pkt| run(dp, TO_UPLINK, pkt).1,
    );
    let after = dp.counters().unwrap();
    assert!(
        delta(&before, &after, CTR_XDP_CT_HIT) > 2 * CT_STEADY_CHECK_EVERY,
        "XDP translated the steady packets"
    );
}

/// The programs read the coarse clock where the kernel has it (5.11+), and the precise one
/// on 5.10, where the coarse helper does not exist and its branch must be dead code to the
/// verifier (the load itself shows that). Told apart by where a packet's time falls: the
/// coarse clock is the last tick's, so never after the coarse clock read just after the
/// packet; the precise one is never before the precise clock read just before it (and is
/// after that coarse reading unless a tick fell between the packet and the reading: five
/// packets in a row make that chance about 1% to the fifth).
#[test]
fn the_programs_clock_is_the_coarse_one_where_the_kernel_has_it() {
    require_privileged!("the_programs_clock_is_the_coarse_one_where_the_kernel_has_it");
    let mut dp = dataplane();
    cluster_ip(&mut dp, &["198.19.0.20:8080"]);
    let coarse = sluice::dataplane::features::coarse_clock();
    let mut times = Vec::new();
    for port in 0..5u16 {
        let client = std::net::SocketAddrV4::new(*sa(CLIENT).ip(), 41_000 + port);
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        run(&dp, FROM_POD, &tcp(client, sa(VIP), SYN, b""));
        let after_coarse = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let (s, _) = flow_entries(&dp, client, sa(VIP), sa("198.19.0.20:8080"));
        times.push((before, s.entry.seen_ns, after_coarse));
    }
    if coarse {
        assert!(
            times.iter().all(|&(_, seen, after)| seen <= after),
            "coarse: (before, seen, coarse after) {times:?}"
        );
    } else {
        assert!(
            times.iter().all(|&(before, seen, _)| seen >= before),
            "precise: (before, seen, coarse after) {times:?}"
        );
        assert!(
            times.iter().any(|&(_, seen, after)| seen > after),
            "precise: (before, seen, coarse after) {times:?}"
        );
    }
}
