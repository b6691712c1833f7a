//! Packet tests of what the datapath forwards itself: flows from outside SNATed to the node and
//! sent on by FIB lookup and redirect, ICMP errors of translated flows, externalTrafficPolicy
//! Local. The real programs run through BPF_PROG_TEST_RUN on a thread inside a network
//! namespace the test builds, whose routes and neighbours the FIB lookups see; checksums are
//! verified with etherparse (tests/common).
mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use etherparse::Ipv4HeaderSlice;
use proxy_common::*;
use sluice::dataplane::{
    AttachMode, Backend, Backends, Dataplane, DataplaneConfig, DataplaneError, FROM_POD,
    FROM_UPLINK, Frontend, FrontendKind, Protocol, TO_POD,
};
use testbed::require_privileged;

fn dataplane(snat_ports: (u16, u16)) -> Dataplane {
    Dataplane::load_with(DataplaneConfig {
        hairpin_snat: Some(testbed::plan::HAIRPIN_SNAT),
        snat: Some(NODE.parse().unwrap()),
        snat_ports,
        conntrack_max: 4096,
        ..Default::default()
    })
    .expect("the programs load and pass the verifier")
}

fn frontend(addr: &str, kind: FrontendKind) -> Frontend {
    let a = sa(addr);
    Frontend {
        addr: *a.ip(),
        port: a.port(),
        proto: Protocol::Tcp,
        kind,
    }
}

fn backend(addr: &str, local: bool) -> Backend {
    let a = sa(addr);
    Backend {
        addr: *a.ip(),
        port: a.port(),
        local,
    }
}

fn ttl(pkt: &[u8]) -> u8 {
    pkt[14 + 8]
}

#[test]
fn a_new_flow_from_outside_to_a_remote_backend_is_snated_and_redirected_both_ways() {
    require_privileged!(
        "a_new_flow_from_outside_to_a_remote_backend_is_snated_and_redirected_both_ways"
    );
    in_node(|ns| {
        let mut dp = dataplane(SNAT_PORTS);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let before = dp.counters().unwrap();
        let (verdict, out) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), SYN, b""));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "forwarded by the program, not the stack"
        );
        let seen = check(&out);
        assert_eq!(seen.dst, sa(REMOTE));
        assert_eq!(
            seen.src.ip(),
            &NODE.parse::<Ipv4Addr>().unwrap(),
            "SNATed to the node"
        );
        let port = seen.src.port();
        assert!(
            (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port),
            "port {port} outside the range"
        );
        assert_eq!(ttl(&out), 63, "a router hop");
        assert_eq!(out[0..6], OTHER_MAC, "to the gateway the FIB names");
        assert_eq!(out[6..12], v0_mac(ns), "from the route's device");
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_SNAT), 1);
        assert_eq!(delta(&before, &after, CTR_REDIRECT), 1);

        // The flow's next packet keeps its port; the reply goes back to the client, showing
        // the NodePort.
        let (v, out) = run(
            &dp,
            FROM_UPLINK,
            &tcp(sa(CLIENT), sa(NODE_PORT), ACK, b"GET"),
        );
        assert_eq!((v, check(&out).src.port()), (TC_ACT_REDIRECT, port));
        let snat = SocketAddrV4::new(NODE.parse().unwrap(), port);
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(REMOTE), snat, SYN_ACK, b""));
        assert_eq!(
            v, TC_ACT_REDIRECT,
            "the reply carries the node's address: not for the stack"
        );
        let seen = check(&out);
        assert_eq!((seen.src, seen.dst), (sa(NODE_PORT), sa(CLIENT)));
        assert_eq!(out[0..6], CLIENT_MAC);
    });
}

/// The node's address changes (a new InternalIP): new flows are SNATed to the new one, and
/// a flow SNATed to the old one keeps its replies. The old address is no frontend's (only an
/// externalIP is), so only the ingress filter's care for SNAT addresses of live flows keeps
/// them from passing untranslated.
#[test]
fn a_flow_snated_to_the_old_node_address_keeps_its_replies_after_the_address_changes() {
    require_privileged!(
        "a_flow_snated_to_the_old_node_address_keeps_its_replies_after_the_address_changes"
    );
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let ext = "198.18.192.7:80";
        dp.upsert_service(
            frontend(ext, FrontendKind::ExternalIp),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(ext), SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT);
        let old = check(&out).src;
        assert_eq!(old.ip(), &NODE.parse::<Ipv4Addr>().unwrap());
        dp.set_snat(Some(OTHER_NODE.parse().unwrap())).unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(REMOTE), old, SYN_ACK, b""));
        assert_eq!(v, TC_ACT_REDIRECT, "the reply is translated and forwarded");
        let seen = check(&out);
        assert_eq!((seen.src, seen.dst), (sa(ext), sa(CLIENT)));
    });
}

/// The same, where the old address is still a frontend's (a NodePort stays on it): only
/// replies to SNAT addresses are looked up at ingress, so the old one is marked for as long as
/// a live flow is SNATed to it.
#[test]
fn an_earlier_snat_address_that_is_still_a_frontend_keeps_its_flows_replies() {
    require_privileged!("an_earlier_snat_address_that_is_still_a_frontend_keeps_its_flows_replies");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let node: Ipv4Addr = NODE.parse().unwrap();
        let other: Ipv4Addr = OTHER_NODE.parse().unwrap();
        let ext = "198.18.192.7:80";
        for f in [
            frontend(ext, FrontendKind::ExternalIp),
            frontend(NODE_PORT, FrontendKind::NodePort),
        ] {
            dp.upsert_service(f, &[backend(REMOTE, false)]).unwrap();
        }
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(ext), SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT);
        let old = check(&out).src;
        assert_eq!(old.ip(), &node);
        assert!(
            dp.nat_marked_addrs().unwrap().is_empty(),
            "the configured one is not"
        );
        dp.set_snat(Some(other)).unwrap();
        assert_eq!(dp.nat_marked_addrs().unwrap(), vec![node]);
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(REMOTE), old, SYN_ACK, b""));
        assert_eq!(v, TC_ACT_REDIRECT, "the reply is translated and forwarded");
        let seen = check(&out);
        assert_eq!((seen.src, seen.dst), (sa(ext), sa(CLIENT)));
        // A live flow is SNATed to it: the mark stays.
        dp.retire_fe_addrs().unwrap();
        assert_eq!(dp.nat_marked_addrs().unwrap(), vec![node]);
        // Configured again, it needs no mark; the other address, which no flow was SNATed
        // to, loses its mark (and its entry) at the next retirement.
        dp.set_snat(Some(node)).unwrap();
        assert_eq!(dp.nat_marked_addrs().unwrap(), vec![other]);
        dp.retire_fe_addrs().unwrap();
        assert!(dp.nat_marked_addrs().unwrap().is_empty());
        assert!(!dp.fe_addrs().unwrap().iter().any(|(a, _)| *a == other));
    });
}

#[test]
fn a_packet_too_big_for_the_route_to_its_backend_gets_fragmentation_needed() {
    require_privileged!("a_packet_too_big_for_the_route_to_its_backend_gets_fragmentation_needed");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(NARROW, false)],
        )
        .unwrap();
        let (v, _) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT);
        // 1,400 bytes with DF (etherparse sets it) on a path of 1,300.
        let big = tcp(sa(CLIENT), sa(NODE_PORT), ACK, &[7u8; 1360]);
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &big);
        assert_eq!(v, TC_ACT_REDIRECT, "the ICMP goes back out");
        let icmp = check_icmp(&out);
        assert_eq!((icmp.type_, icmp.code), (3, 4), "fragmentation needed");
        assert_eq!(
            {
                let icmp_at = 14 + usize::from(out[14] & 0x0f) * 4;
                u16::from_be_bytes([out[icmp_at + 6], out[icmp_at + 7]])
            },
            // Linux reports the route's MTU from the FIB lookup from 5.12 on; before, the
            // programs say 1280, which every IPv4 path of a cluster carries.
            if aya::util::KernelVersion::current()
                .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 12, 0))
            {
                1300
            } else {
                1280
            },
            "the route's MTU"
        );
        assert_eq!(
            (icmp.src, icmp.dst),
            (*sa(NODE_PORT).ip(), *sa(CLIENT).ip())
        );
        let quoted = Ipv4HeaderSlice::from_slice(&icmp.quoted).unwrap();
        assert_eq!(
            quoted.destination_addr(),
            *sa(NODE_PORT).ip(),
            "quotes what the client sent"
        );
        assert_eq!(icmp.quoted[20..24], big[34..38], "with its ports");
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_REJECT_FRAG_NEEDED), 1);
    });
}

/// Checks the quoted header's IP checksum independently; returns (source, destination) of the
/// quoted packet, with its ports.
fn quoted_tuple(q: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let h = Ipv4HeaderSlice::from_slice(q).unwrap();
    assert_eq!(
        h.header_checksum(),
        h.to_header().calc_header_checksum(),
        "the quoted IP checksum is wrong"
    );
    let port = |i: usize| u16::from_be_bytes([q[20 + i], q[21 + i]]);
    (
        SocketAddrV4::new(h.source_addr(), port(0)),
        SocketAddrV4::new(h.destination_addr(), port(2)),
    )
}

#[test]
fn an_icmp_error_from_a_backend_shows_the_client_the_service_it_called() {
    require_privileged!("an_icmp_error_from_a_backend_shows_the_client_the_service_it_called");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let vip = "198.18.128.1:53";
        let pod = "198.19.0.10:40000";
        let f = Frontend {
            proto: Protocol::Udp,
            ..frontend(vip, FrontendKind::ClusterIp)
        };
        dp.upsert_service(f, &[backend(REMOTE, false)]).unwrap();
        let (_, sent) = run(&dp, FROM_POD, &udp(sa(pod), sa(vip), b"q"));
        assert_eq!(check(&sent).dst, sa(REMOTE));
        // The backend's port unreachable, on its way into the client's pod.
        let err = icmp_error(*sa(REMOTE).ip(), *sa(pod).ip(), 3, &sent);
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, TO_POD, &err);
        assert_eq!(v, TC_ACT_UNSPEC);
        let icmp = check_icmp(&out);
        assert_eq!(icmp.src, *sa(vip).ip(), "from the Service, as replies are");
        assert_eq!(
            quoted_tuple(&icmp.quoted),
            (sa(pod), sa(vip)),
            "the packet the client sent"
        );
        assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_ICMP_ERROR), 1);
        // At the node's ingress it waits for egress, as replies do.
        let (v, out) = run(&dp, FROM_UPLINK, &err);
        assert_eq!((v, out), (TC_ACT_UNSPEC, err.clone()));
    });
}

#[test]
fn an_icmp_error_about_a_snated_flow_goes_back_to_the_client_by_redirect() {
    require_privileged!("an_icmp_error_about_a_snated_flow_goes_back_to_the_client_by_redirect");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let f = Frontend {
            proto: Protocol::Udp,
            ..frontend(NODE_PORT, FrontendKind::NodePort)
        };
        dp.upsert_service(f, &[backend(REMOTE, false)]).unwrap();
        let (_, sent) = run(&dp, FROM_UPLINK, &udp(sa(CLIENT), sa(NODE_PORT), b"q"));
        let err = icmp_error(*sa(REMOTE).ip(), NODE.parse().unwrap(), 3, &sent);
        let (v, out) = run(&dp, FROM_UPLINK, &err);
        assert_eq!(v, TC_ACT_REDIRECT, "to the client, not to the node's stack");
        let icmp = check_icmp(&out);
        assert_eq!(
            (icmp.src, icmp.dst),
            (*sa(NODE_PORT).ip(), *sa(CLIENT).ip())
        );
        assert_eq!(quoted_tuple(&icmp.quoted), (sa(CLIENT), sa(NODE_PORT)));
        assert_eq!(out[0..6], CLIENT_MAC);
    });
}

#[test]
fn outside_traffic_to_a_local_policy_frontend_uses_local_endpoints_or_is_dropped() {
    require_privileged!(
        "outside_traffic_to_a_local_policy_frontend_uses_local_endpoints_or_is_dropped"
    );
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let f = frontend(NODE_PORT, FrontendKind::NodePort);
        let local = backend("198.19.0.20:8080", true);
        dp.upsert_frontend(
            f,
            &Backends {
                all: vec![backend(REMOTE, false), local],
                external: Some(vec![local]),
                sources: None,
                affinity_timeout_s: None,
                no_local_endpoints: false,
                maglev: false,
            },
        )
        .unwrap();
        for port in 0..20 {
            let c = SocketAddrV4::new(*sa(CLIENT).ip(), 41000 + port);
            let (v, out) = run(&dp, FROM_UPLINK, &tcp(c, sa(NODE_PORT), SYN, b""));
            assert_eq!(v, TC_ACT_UNSPEC);
            let seen = check(&out);
            assert_eq!(
                (seen.src, seen.dst),
                (c, sa("198.19.0.20:8080")),
                "local, client kept"
            );
        }
        dp.upsert_frontend(
            f,
            &Backends {
                all: vec![backend(REMOTE, false)],
                external: Some(vec![]),
                sources: None,
                affinity_timeout_s: None,
                no_local_endpoints: false,
                maglev: false,
            },
        )
        .unwrap();
        let before = dp.counters().unwrap();
        let (v, _) = run(
            &dp,
            FROM_UPLINK,
            &tcp(sa("198.18.0.100:42000"), sa(NODE_PORT), SYN, b""),
        );
        assert_eq!(v, TC_ACT_SHOT);
        assert_eq!(
            delta(&before, &dp.counters().unwrap(), CTR_DROP_NO_LOCAL_BACKEND),
            1
        );
        // A pod of the node still reaches it, through every endpoint.
        let (v, out) = run(
            &dp,
            FROM_POD,
            &tcp(sa("198.19.0.10:40000"), sa(NODE_PORT), SYN, b""),
        );
        assert_eq!((v, check(&out).dst), (TC_ACT_UNSPEC, sa(REMOTE)));
    });
}

#[test]
fn with_every_snat_port_held_a_new_flow_is_dropped_and_the_live_one_keeps_its_port() {
    require_privileged!(
        "with_every_snat_port_held_a_new_flow_is_dropped_and_the_live_one_keeps_its_port"
    );
    in_node(|_| {
        let mut dp = dataplane((20000, 20000));
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let (_, out) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), SYN, b""));
        assert_eq!(check(&out).src.port(), 20000);
        let before = dp.counters().unwrap();
        let other = sa("198.18.0.100:40001");
        let (v, _) = run(&dp, FROM_UPLINK, &tcp(other, sa(NODE_PORT), SYN, b""));
        assert_eq!(v, TC_ACT_SHOT);
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_DROP_SNAT_PORTS), 1);
        assert!(delta(&before, &after, CTR_SNAT_PORT_TAKEN) >= 1);
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), ACK, b""));
        assert_eq!((v, check(&out).src.port()), (TC_ACT_REDIRECT, 20000));
    });
}

#[test]
fn a_closed_snat_flow_holds_its_port_for_time_wait_and_gives_it_up_only_when_nothing_else_is_free()
{
    require_privileged!(
        "a_closed_snat_flow_holds_its_port_for_time_wait_and_gives_it_up_only_when_nothing_else_is_free"
    );
    in_node(|_| {
        let mut dp = dataplane((20000, 20000));
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let snat = SocketAddrV4::new(NODE.parse().unwrap(), 20000);
        run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), SYN, b""));
        run(&dp, FROM_UPLINK, &tcp(sa(REMOTE), snat, SYN_ACK, b""));
        run(
            &dp,
            FROM_UPLINK,
            &tcp(sa(CLIENT), sa(NODE_PORT), FIN_ACK, b""),
        );
        run(&dp, FROM_UPLINK, &tcp(sa(REMOTE), snat, FIN_ACK, b""));
        // Closed: the port is held as long as the backend's TIME_WAIT, not 10 s.
        let rev = dp
            .conntrack()
            .unwrap()
            .into_iter()
            .find(|e| e.kind == sluice::dataplane::CtKind::Reverse)
            .unwrap();
        let left = rev.expires_ns().saturating_sub(now_ns()) as f64 / 1e9;
        assert!((55.0..=60.0).contains(&left), "held {left:.1} s");
        // Every other port held: the closed flow's port goes to the new flow, and the closed
        // flow's own entry goes with it.
        let before = dp.counters().unwrap();
        let other = sa("198.18.0.100:40001");
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(other, sa(NODE_PORT), SYN, b""));
        assert_eq!((v, check(&out).src), (TC_ACT_REDIRECT, snat));
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_SNAT_PORT_REUSED), 1);
        let services: Vec<_> = dp
            .conntrack()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == sluice::dataplane::CtKind::Service)
            .map(|e| e.src)
            .collect();
        assert_eq!(services, vec![other], "the closed flow's entry is gone");
        // The new flow is live: a third one finds nothing to take.
        let (v, _) = run(
            &dp,
            FROM_UPLINK,
            &tcp(sa("198.18.0.100:40002"), sa(NODE_PORT), SYN, b""),
        );
        assert_eq!(v, TC_ACT_SHOT);
    });
}

/// CLOCK_MONOTONIC, which bpf_ktime_get_ns reads, in ns.
fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[test]
fn an_icmp_error_about_a_reply_goes_to_the_backend_quoting_what_it_sent() {
    require_privileged!("an_icmp_error_about_a_reply_goes_to_the_backend_quoting_what_it_sent");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let (_, sent) = run(&dp, FROM_UPLINK, &tcp(sa(CLIENT), sa(NODE_PORT), SYN, b""));
        let snat = check(&sent).src;
        // The reply as the client got it (NodePort -> client), too big for a router on the
        // client's side, which tells the NodePort's address.
        let reply = tcp(sa(NODE_PORT), sa(CLIENT), SYN_ACK, &[0u8; 1400]);
        let router: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let err = icmp_error(router, *sa(NODE_PORT).ip(), 4, &reply);
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &err);
        assert_eq!(v, TC_ACT_UNSPEC, "routed by the stack, to a pod address");
        let icmp = check_icmp(&out);
        assert_eq!(
            (icmp.src, icmp.dst),
            (router, *sa(REMOTE).ip()),
            "to the backend"
        );
        assert_eq!((icmp.type_, icmp.code), (3, 4));
        assert_eq!(
            quoted_tuple(&icmp.quoted),
            (sa(REMOTE), snat),
            "what the backend sent"
        );
        assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_ICMP_ERROR), 1);
    });
}

#[test]
fn a_device_without_ethernet_headers_is_refused_rather_than_misparsed() {
    require_privileged!("a_device_without_ethernet_headers_is_refused_rather_than_misparsed");
    in_node(|ns| {
        // A tun device carries bare IP packets, as WireGuard and IPIP devices do.
        testbed::run(&[
            "ip", "-n", ns, "tuntap", "add", "dev", "tun0", "mode", "tun",
        ])
        .unwrap();
        testbed::run(&["ip", "-n", ns, "link", "set", "tun0", "up"]).unwrap();
        let mut dp = Dataplane::load().unwrap();
        let mode = AttachMode::best_available();
        let links = testbed::BpfFs::new().unwrap();
        for result in [
            dp.attach_pod_device("tun0", mode),
            dp.attach_uplink_persistent("tun0", mode, &links.path().join("links")),
        ] {
            match result {
                Err(DataplaneError::NotEthernet {
                    interface,
                    link_type,
                }) => {
                    assert_eq!((interface.as_str(), link_type), ("tun0", 65534));
                }
                other => panic!("tun0 must be refused as not Ethernet: {other:?}"),
            }
        }
        // An Ethernet device (the node's veth) is taken.
        dp.attach_uplink("v0", mode).unwrap();
    });
}

#[test]
fn a_client_from_outside_that_is_a_pod_of_this_node_is_noted_for_its_replies() {
    require_privileged!(
        "a_client_from_outside_that_is_a_pod_of_this_node_is_noted_for_its_replies"
    );
    in_node(|ns| {
        // A pod of this node, reached by `v1`: its call came back in by the uplink `v0` (an
        // outside load balancer that keeps the client's address).
        testbed::run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "198.19.0.77/32",
            "dev",
            "v1",
        ])
        .unwrap();
        let mut dp = dataplane(SNAT_PORTS);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend("198.19.1.20:8080", true)],
        )
        .unwrap();
        let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
        let pod = sa("198.19.0.77:5000");
        for client in [sa(CLIENT), pod] {
            let (_, out) = run_on(&dp, FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""), v0);
            assert_eq!(check(&out).dst, sa("198.19.1.20:8080"));
        }
        // The pod's egress must look its replies up; an outside client's replies leave by the
        // uplink and never meet it.
        let (clients, full) = dp.pod_clients().unwrap();
        assert_eq!((clients, full), (vec![*pod.ip()], false));
        let (_, out) = run(&dp, TO_POD, &tcp(sa("198.19.1.20:8080"), pod, SYN_ACK, b""));
        assert_eq!(
            check(&out).src,
            sa(NODE_PORT),
            "the reply shows the NodePort"
        );
    });
}
