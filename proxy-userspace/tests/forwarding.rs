//! Packet tests of what the datapath forwards itself: flows from outside SNATed to the node and
//! sent on by FIB lookup and redirect, ICMP errors of translated flows, externalTrafficPolicy
//! Local; and the XDP program's share of the SNATed flows. The real programs run through
//! BPF_PROG_TEST_RUN on a thread inside a network namespace the test builds, whose routes and
//! neighbours the FIB lookups see; checksums are verified with etherparse (tests/common).
mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use etherparse::Ipv4HeaderSlice;
use proxy_common::*;
use sluice::dataplane::{
    AttachMode, Backend, Backends, Dataplane, DataplaneConfig, DataplaneError, FROM_POD,
    FROM_UPLINK, Frontend, FrontendKind, Protocol, TO_POD, TO_UPLINK, XDP_FROM_UPLINK, XdpMode,
};
use testbed::require_privileged;

fn config(snat_ports: (u16, u16)) -> DataplaneConfig {
    DataplaneConfig {
        hairpin_snat: Some(testbed::plan::HAIRPIN_SNAT),
        snat: Some(NODE.parse().unwrap()),
        snat_ports,
        conntrack_max: 4096,
        ..Default::default()
    }
}

fn dataplane(snat_ports: (u16, u16)) -> Dataplane {
    Dataplane::load_with(config(snat_ports)).expect("the programs load and pass the verifier")
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

/// A dataplane with SNAT ports `snat_ports` and the NodePort [`NODE_PORT`] whose one endpoint
/// is [`REMOTE`], on another node.
fn remote_node_port(snat_ports: (u16, u16)) -> Dataplane {
    let mut dp = dataplane(snat_ports);
    dp.upsert_service(
        frontend(NODE_PORT, FrontendKind::NodePort),
        &[backend(REMOTE, false)],
    )
    .unwrap();
    dp
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
        let dp = remote_node_port(SNAT_PORTS);
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

/// The XDP counters that matter here: sent out by XDP, left to TC for the route, for the flow,
/// a new flow sent out by XDP, dropped at XDP.
fn xdp_counts(dp: &Dataplane, f: impl FnOnce()) -> [u64; 5] {
    let before = dp.counters().unwrap();
    f();
    let after = dp.counters().unwrap();
    [
        CTR_XDP_TX,
        CTR_XDP_TO_TC_ROUTE,
        CTR_XDP_TO_TC_FLOW,
        CTR_XDP_NEW_FLOW_TX,
        CTR_XDP_DROP,
    ]
    .map(|c| delta(&before, &after, c))
}

/// Runs `pkt` through XDP, expecting it left to TC untouched for its route.
fn xdp_leaves_for_route(dp: &Dataplane, pkt: &[u8], what: &str) {
    let mut got = (0, Vec::new());
    let counts = xdp_counts(dp, || got = run_xdp(dp, XDP_FROM_UPLINK, pkt));
    assert_eq!((got.0, counts), (XDP_PASS, [0, 1, 0, 0, 0]), "{what}");
    assert_eq!(got.1, pkt, "{what}: untouched");
}

/// XDP sends `pkt` out itself, as `want` (XDP_TX or XDP_REDIRECT), with exactly the bytes TC's
/// redirect gives it (TC runs on a copy); returns them.
fn xdp_sends_as_tc(dp: &Dataplane, pkt: &[u8], on: Option<u32>, want: u32, what: &str) -> Vec<u8> {
    let mut got = (0, Vec::new());
    let counts = xdp_counts(dp, || {
        got = match on {
            None => run_xdp(dp, XDP_FROM_UPLINK, pkt),
            Some(i) => run_xdp_on(dp, XDP_FROM_UPLINK, pkt, i).unwrap(),
        }
    });
    assert_eq!(
        (got.0, counts),
        (want, [1, 0, 0, 0, 0]),
        "{what}: sent by XDP"
    );
    let (verdict, by_tc) = run(dp, FROM_UPLINK, pkt);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: by TC");
    assert_eq!(got.1, by_tc, "{what}: XDP and TC make the same packet");
    got.1
}

#[test]
fn xdp_forwards_an_established_flow_snated_to_the_node_both_ways_exactly_as_tc_does() {
    require_privileged!(
        "xdp_forwards_an_established_flow_snated_to_the_node_both_ways_exactly_as_tc_does"
    );
    in_node(|ns| {
        let mut dp = remote_node_port(SNAT_PORTS);
        let (client, node_port, remote) = (sa(CLIENT), sa(NODE_PORT), sa(REMOTE));
        // The handshake is TC's here: the SYN chooses and SNATs (XDP may not send from this
        // uplink yet: left to TC for its route), the ACK establishes.
        let syn = tcp(client, node_port, SYN, b"");
        xdp_leaves_for_route(&dp, &syn, "a SYN on an uplink not let send");
        assert_eq!(dp.conntrack().unwrap(), vec![], "nothing recorded by XDP");
        let port = check(&run(&dp, FROM_UPLINK, &syn).1).src.port();
        let snat = SocketAddrV4::new(NODE.parse().unwrap(), port);
        let reply = tcp(remote, snat, ACK, b"HTTP/1.1 200 OK\r\n\r\n");
        let counts = xdp_counts(&dp, || {
            run_xdp(&dp, XDP_FROM_UPLINK, &reply);
        });
        assert_eq!(
            counts,
            [0, 0, 1, 0, 0],
            "a reply of a flow not yet established is TC's"
        );
        run(&dp, FROM_UPLINK, &tcp(remote, snat, SYN_ACK, b""));
        run(&dp, FROM_UPLINK, &tcp(client, node_port, ACK, b""));
        let data = tcp(client, node_port, ACK, b"GET / HTTP/1.1\r\n\r\n");

        // An uplink the agent has not let send: TC forwards, as before XDP.
        xdp_leaves_for_route(&dp, &data, "an uplink not let send");
        xdp_leaves_for_route(&dp, &reply, "a reply on an uplink not let send");

        // The test run's packets come in on the loopback device and leave by `v0`: both let
        // send (in the same mode), XDP redirects.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
        dp.set_xdp_tx(lo, Some(XdpMode::Native)).unwrap();
        dp.set_xdp_tx(v0, Some(XdpMode::Generic)).unwrap();
        xdp_leaves_for_route(&dp, &data, "to an uplink in another mode");
        dp.set_xdp_tx(v0, Some(XdpMode::Native)).unwrap();
        let out = xdp_sends_as_tc(&dp, &data, None, XDP_REDIRECT, "the client's packet");
        let seen = check(&out);
        assert_eq!(
            (seen.src, seen.dst),
            (snat, remote),
            "SNATed, to the backend"
        );
        assert_eq!(seen.payload, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(ttl(&out), 63, "a router hop");
        assert_eq!(out[0..6], OTHER_MAC, "to the gateway the FIB names");
        assert_eq!(out[6..12], v0_mac(ns), "from the route's device");
        let out = xdp_sends_as_tc(&dp, &reply, None, XDP_REDIRECT, "the backend's reply");
        let seen = check(&out);
        assert_eq!(
            (seen.src, seen.dst),
            (node_port, client),
            "showing the NodePort"
        );
        assert_eq!(out[0..6], CLIENT_MAC);

        // Coming in on `v0`, the way back out is the same device: XDP_TX (a test run on a
        // device needs Linux 5.14; before, the redirect above is what runs).
        match run_xdp_on(&dp, XDP_FROM_UPLINK, &data, v0) {
            Some(_) => {
                let out = xdp_sends_as_tc(&dp, &data, Some(v0), XDP_TX, "in and out of v0");
                assert_eq!(check(&out).dst, remote);
            }
            None => {
                let (major, minor) = kernel_version();
                assert!(
                    (major, minor) < (5, 14),
                    "Linux {major}.{minor} refused an XDP context"
                );
            }
        }

        // A frame of the flow for another host's MAC address (a bridge flooding it) is not
        // sent out a second time, nor counted in the flow: TC passes it. (The uplink's own
        // address here is the loopback device's, all zeros, as the test frames' destination.)
        dp.set_uplink_mac(lo, [0; 6]).unwrap();
        for (pkt, what) in [
            (&data, "the client's packet"),
            (&reply, "the backend's reply"),
        ] {
            let mut flooded = pkt.clone();
            flooded[..6].copy_from_slice(&MAC_OTHER_HOST);
            let ct = dp.conntrack().unwrap();
            let before = dp.counters().unwrap();
            let (action, out) = run_xdp(&dp, XDP_FROM_UPLINK, &flooded);
            let after = dp.counters().unwrap();
            assert_eq!((action, &out), (XDP_PASS, &flooded), "{what}: untouched");
            assert_eq!(
                (
                    delta(&before, &after, CTR_XDP_TO_TC_OTHER_HOST),
                    delta(&before, &after, CTR_XDP_TX)
                ),
                (1, 0),
                "{what}: left to TC as another host's"
            );
            assert_eq!(dp.conntrack().unwrap(), ct, "{what}: the flow untouched");
            xdp_sends_as_tc(&dp, pkt, None, XDP_REDIRECT, what);
        }
        dp.retain_uplink_macs(&Default::default()).unwrap();

        // What the route does not allow goes to TC: a TTL about to run out (TC drops it), a
        // neighbour not yet resolved (TC's redirect resolves it).
        let mut last_hop = data.clone();
        last_hop[14 + 8] = 1;
        set_ip_checksum(&mut last_hop);
        xdp_leaves_for_route(&dp, &last_hop, "a TTL of 1");
        testbed::run(&["ip", "-n", ns, "neigh", "del", OTHER_NODE, "dev", "v0"]).unwrap();
        xdp_leaves_for_route(&dp, &data, "an unresolved neighbour");
        // The flow's end is TC's too: a FIN changes its state.
        dp.set_xdp_tx(lo, None).unwrap();
        let counts = xdp_counts(&dp, || {
            run_xdp(&dp, XDP_FROM_UPLINK, &tcp(remote, snat, FIN_ACK, b""));
        });
        assert_eq!(counts, [0, 0, 1, 0, 0], "a FIN is TC's");
    });
}

/// A new flow from outside to a remote backend, started at XDP: backend chosen, the node's
/// SNAT port reserved and both entries recorded exactly as TC's new-flow program does (TC,
/// started from the same state, records the same and makes the same bytes), and the packet
/// sent out by XDP. The backend's SYN-ACK (a flow not yet established) is TC's. Where the
/// route's neighbour is not resolved, XDP leaves the SYN to TC with nothing recorded; where
/// the SNAT ports are all held, it drops, as TC does.
#[test]
fn xdp_starts_a_flow_to_a_remote_backend_snated_and_sent_out_exactly_as_tc_does() {
    require_privileged!(
        "xdp_starts_a_flow_to_a_remote_backend_snated_and_sent_out_exactly_as_tc_does"
    );
    in_node(|ns| {
        // One SNAT port: the port XDP and TC reserve is then the same.
        let mut dp = remote_node_port((20000, 20000));
        let (client, node_port, remote) = (sa(CLIENT), sa(NODE_PORT), sa(REMOTE));
        let_xdp_send(&mut dp);
        let syn = tcp(client, node_port, SYN, b"");
        let mut got = (0, Vec::new());
        let counts = xdp_counts(&dp, || got = run_xdp(&dp, XDP_FROM_UPLINK, &syn));
        assert_eq!(
            (got.0, counts),
            (XDP_REDIRECT, [0, 0, 0, 1, 0]),
            "a new flow sent out by XDP"
        );
        let by_xdp = recorded(&dp);
        assert_eq!(by_xdp.len(), 2, "the flow's two entries");
        for e in dp.conntrack().unwrap() {
            dp.evict_conntrack_entry(&e).unwrap();
        }
        let before = dp.counters().unwrap();
        let (verdict, by_tc) = run(&dp, FROM_UPLINK, &syn);
        let after = dp.counters().unwrap();
        assert_eq!(
            (verdict, delta(&before, &after, CTR_NEW_FLOW_SNAT)),
            (TC_ACT_REDIRECT, 1),
            "TC's new flow"
        );
        assert_eq!(got.1, by_tc, "XDP and TC make the same packet");
        assert_eq!(recorded(&dp), by_xdp, "XDP and TC record the flow alike");
        let seen = check(&got.1);
        let snat = SocketAddrV4::new(NODE.parse().unwrap(), 20000);
        assert_eq!(
            (seen.src, seen.dst),
            (snat, remote),
            "SNATed, to the backend"
        );
        assert_eq!(ttl(&got.1), 63, "a router hop");
        assert_eq!(got.1[0..6], OTHER_MAC, "to the gateway the FIB names");
        assert_eq!(got.1[6..12], v0_mac(ns), "from the route's device");
        let counts = xdp_counts(&dp, || {
            run_xdp(&dp, XDP_FROM_UPLINK, &tcp(remote, snat, SYN_ACK, b""));
        });
        assert_eq!(
            counts,
            [0, 0, 1, 0, 0],
            "the reply of a flow not established"
        );

        // Every SNAT port held (by the flow above): another client's new flow is dropped at
        // XDP, as at TC, and nothing of it is recorded.
        let other = tcp(sa("198.18.0.100:40001"), node_port, SYN, b"");
        let counts = xdp_counts(&dp, || got = run_xdp(&dp, XDP_FROM_UPLINK, &other));
        assert_eq!((got.0, counts), (XDP_DROP, [0, 0, 0, 0, 1]), "no SNAT port");
        assert_eq!(recorded(&dp), by_xdp, "nothing more recorded");

        // A neighbour not yet resolved: the SYN goes to TC (which resolves it), untouched
        // and with nothing recorded.
        for e in dp.conntrack().unwrap() {
            dp.evict_conntrack_entry(&e).unwrap();
        }
        testbed::run(&["ip", "-n", ns, "neigh", "del", OTHER_NODE, "dev", "v0"]).unwrap();
        xdp_leaves_for_route(&dp, &syn, "an unresolved neighbour");
        assert_eq!(dp.conntrack().unwrap(), vec![], "nothing recorded");
    });
}

/// A client port that clashes at XDP: the same client address and port to two frontends of
/// one local backend (a NodePort, then an externalIP). The second flow's reverse entry would
/// take the first's tuple, so its port is remapped (a port of the node's range), at XDP as at
/// TC: the same entries and the same bytes as TC makes starting it from the same state.
#[test]
fn a_client_port_clash_is_remapped_at_xdp_exactly_as_at_tc() {
    require_privileged!("a_client_port_clash_is_remapped_at_xdp_exactly_as_at_tc");
    in_node(|_| {
        // One port in the range: XDP and TC then remap to the same one.
        let mut dp = dataplane((20000, 20000));
        let local = backend("198.19.0.20:8080", true);
        dp.upsert_service(frontend(NODE_PORT, FrontendKind::NodePort), &[local])
            .unwrap();
        let external = "198.18.0.50:80";
        dp.upsert_service(frontend(external, FrontendKind::ExternalIp), &[local])
            .unwrap();
        let client = sa(CLIENT);
        let (v, out) = run_xdp(&dp, XDP_FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""));
        assert_eq!(
            (v, check(&out).src),
            (XDP_PASS, client),
            "the first keeps its port"
        );
        let (first, first_entries) = (recorded(&dp), dp.conntrack().unwrap());
        let syn = tcp(client, sa(external), SYN, b"");
        let before = dp.counters().unwrap();
        let (v, out) = run_xdp(&dp, XDP_FROM_UPLINK, &syn);
        let after = dp.counters().unwrap();
        assert_eq!(v, XDP_PASS);
        assert_eq!(
            [CTR_XDP_NEW_FLOW, CTR_PORT_REMAPPED].map(|c| delta(&before, &after, c)),
            [1, 1],
            "a new flow at XDP, remapped"
        );
        let seen = check(&out);
        assert_eq!(
            (seen.src, seen.dst),
            (
                SocketAddrV4::new(*client.ip(), 20000),
                sa("198.19.0.20:8080")
            ),
            "the client's port remapped"
        );
        let by_xdp = recorded(&dp);
        for e in dp.conntrack().unwrap() {
            if !first_entries.contains(&e) {
                dp.evict_conntrack_entry(&e).unwrap();
            }
        }
        assert_eq!(recorded(&dp), first, "the second flow forgotten");
        let (v, by_tc) = run(&dp, FROM_UPLINK, &syn);
        assert_eq!(v, TC_ACT_UNSPEC);
        assert_eq!(out, by_tc, "XDP and TC make the same packet");
        assert_eq!(recorded(&dp), by_xdp, "XDP and TC record the flow alike");
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
        let dp = remote_node_port((20000, 20000));
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

/// Held ports in one run do not defeat the allocator: with 600 of 1,000 ports held in a block,
/// 60 new flows all get ports. Tries that follow a random first port (linear probing) fail
/// whenever the first lands within 31 ports of the block's end, more than half the time;
/// independent random tries fail with probability 0.6^32 per flow.
#[test]
fn a_run_of_held_snat_ports_does_not_drop_new_flows_while_ports_are_free() {
    require_privileged!("a_run_of_held_snat_ports_does_not_drop_new_flows_while_ports_are_free");
    in_node(|_| {
        const HELD: u16 = 600;
        let mut dp = remote_node_port((20000, 20000));
        // One port at a time: flow k holds port 20000 + k.
        for k in 0..HELD {
            let port = 20000 + k;
            dp.set_snat_ports((port, port)).unwrap();
            let client = SocketAddrV4::new(*sa(CLIENT).ip(), 30000 + k);
            let (_, out) = run(&dp, FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""));
            assert_eq!(check(&out).src.port(), port);
        }
        dp.set_snat_ports((20000, 20999)).unwrap();
        let before = dp.counters().unwrap();
        for k in 0..60 {
            let client = SocketAddrV4::new(*sa(CLIENT).ip(), 40000 + k);
            let (v, out) = run(&dp, FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""));
            assert_eq!(v, TC_ACT_REDIRECT, "new flow {k} dropped");
            let port = check(&out).src.port();
            assert!((20000 + HELD..=20999).contains(&port), "port {port}");
        }
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_DROP_SNAT_PORTS), 0);
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_SNAT), 60);
    });
}

#[test]
fn a_closed_snat_flow_holds_its_port_for_time_wait_and_gives_it_up_only_when_nothing_else_is_free()
{
    require_privileged!(
        "a_closed_snat_flow_holds_its_port_for_time_wait_and_gives_it_up_only_when_nothing_else_is_free"
    );
    in_node(|_| {
        let dp = remote_node_port((20000, 20000));
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
        let dp = remote_node_port(SNAT_PORTS);
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

/// Routes 198.19.0.77, a pod of this node, by `v1` in namespace `ns`.
fn route_pod_by_v1(ns: &str) {
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
}

#[test]
fn a_client_from_outside_that_is_a_pod_of_this_node_is_noted_for_its_replies() {
    require_privileged!(
        "a_client_from_outside_that_is_a_pod_of_this_node_is_noted_for_its_replies"
    );
    in_node(|ns| {
        // Its call came back in by the uplink `v0` (an outside load balancer that keeps the
        // client's address).
        route_pod_by_v1(ns);
        let mut dp = dataplane(SNAT_PORTS);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend("198.19.1.20:8080", true)],
        )
        .unwrap();
        let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
        let pod = sa("198.19.0.77:5000");
        for client in [sa(CLIENT), pod] {
            // As it arrives on `v0`, for `v0`'s MAC address.
            let mut syn = tcp(client, sa(NODE_PORT), SYN, b"");
            syn[..6].copy_from_slice(&v0_mac(ns));
            let (_, out) = run_on(&dp, FROM_UPLINK, &syn, v0);
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

        // The same flows started at XDP, on `v0` (a test run on a device needs Linux 5.14):
        // XDP notes the pod as TC does.
        dp.reset(config(SNAT_PORTS)).unwrap();
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend("198.19.1.20:8080", true)],
        )
        .unwrap();
        for client in [sa(CLIENT), pod] {
            let syn = tcp(client, sa(NODE_PORT), SYN, b"");
            let Some((verdict, out)) = run_xdp_on(&dp, XDP_FROM_UPLINK, &syn, v0) else {
                let (major, minor) = kernel_version();
                assert!(
                    (major, minor) < (5, 14),
                    "Linux {major}.{minor} refused an XDP context"
                );
                return;
            };
            assert_eq!(
                (verdict, check(&out).dst),
                (XDP_PASS, sa("198.19.1.20:8080")),
                "started at XDP"
            );
        }
        let (clients, full) = dp.pod_clients().unwrap();
        assert_eq!((clients, full), (vec![*pod.ip()], false), "noted at XDP");
    });
}

// Direct server return (`--lb-mode dsr`).

/// The ingress node's half: a new TCP flow from outside to a backend on another node is DNATed
/// only (the backend sees the client), its SYNs carry the frontend in the option, it is
/// forwarded by FIB redirect, and the client's ACK establishes it (no reply passes here). UDP
/// is SNATed as without DSR. XDP starts such a flow and forwards its established packets
/// exactly as TC does.
#[test]
fn a_new_tcp_flow_by_direct_server_return_is_dnated_only_and_its_syns_name_the_frontend() {
    require_privileged!(
        "a_new_tcp_flow_by_direct_server_return_is_dnated_only_and_its_syns_name_the_frontend"
    );
    in_node(|ns| {
        let mut dp = Dataplane::load_with(DataplaneConfig {
            dsr: true,
            ..config(SNAT_PORTS)
        })
        .unwrap();
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(REMOTE, false)],
        )
        .unwrap();
        let udp_fe = Frontend {
            proto: Protocol::Udp,
            ..frontend(NODE_PORT, FrontendKind::NodePort)
        };
        dp.upsert_service(udp_fe, &[backend(REMOTE, false)])
            .unwrap();
        let before = dp.counters().unwrap();
        let syn = tcp(sa(CLIENT), sa(NODE_PORT), SYN, b"");
        for attempt in ["the SYN", "its retransmission"] {
            let (v, out) = run(&dp, FROM_UPLINK, &syn);
            assert_eq!(v, TC_ACT_REDIRECT, "{attempt}");
            let seen = check(&out);
            assert_eq!((seen.src, seen.dst), (sa(CLIENT), sa(REMOTE)), "{attempt}");
            assert_eq!(out.len(), syn.len() + 8, "{attempt}");
            assert_eq!(out[14], 0x47, "{attempt}: IPv4 header of 28 bytes");
            assert_eq!(
                out[34..42],
                with_dsr_option(&syn, sa(NODE_PORT))[34..42],
                "{attempt}: the option names the frontend"
            );
            assert_eq!(ttl(&out), 63, "{attempt}");
            assert_eq!(
                out[0..6],
                OTHER_MAC,
                "{attempt}: to the gateway the FIB names"
            );
            assert_eq!(out[6..12], v0_mac(ns), "{attempt}");
        }
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_DSR), 1);
        assert_eq!(delta(&before, &after, CTR_CT_HIT), 1);
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_SNAT), 0);
        // The handshake's ACK: no option, the same translation; the flow is established (in
        // `CT4`, for hours) though no reply ever passed.
        let (v, out) = run(
            &dp,
            FROM_UPLINK,
            &tcp(sa(CLIENT), sa(NODE_PORT), ACK, b"GET"),
        );
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(out[14], 0x45, "only SYNs carry the option");
        let seen = check(&out);
        assert_eq!((seen.src, seen.dst), (sa(CLIENT), sa(REMOTE)));
        let service = dp
            .conntrack()
            .unwrap()
            .into_iter()
            .find(|e| e.kind == sluice::dataplane::CtKind::Service)
            .unwrap();
        assert!(!service.new, "moved to the established table");
        assert!(lifetime_left_s(&service) > 3600.0);
        // The client's FIN closes it here (the backend's never passes).
        run(
            &dp,
            FROM_UPLINK,
            &tcp(sa(CLIENT), sa(NODE_PORT), FIN_ACK, b""),
        );
        let service = dp
            .conntrack()
            .unwrap()
            .into_iter()
            .find(|e| e.kind == sluice::dataplane::CtKind::Service)
            .unwrap();
        assert!(lifetime_left_s(&service) <= 60.0);

        // A client port that already reaches the backend through another frontend cannot be
        // remapped (the backend answers the client's own port): the new flow is dropped.
        let external = frontend("198.18.192.30:80", FrontendKind::ExternalIp);
        dp.upsert_service(external, &[backend(REMOTE, false)])
            .unwrap();
        let client = sa("198.18.0.100:40007");
        let (v, _) = run(&dp, FROM_UPLINK, &tcp(client, sa(NODE_PORT), SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT);
        let before = dp.counters().unwrap();
        let (v, _) = run(
            &dp,
            FROM_UPLINK,
            &tcp(client, sa("198.18.192.30:80"), SYN, b""),
        );
        assert_eq!(v, TC_ACT_SHOT, "the same tuple at the backend");
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_DROP_DSR_TUPLE_TAKEN), 1);
        assert_eq!(delta(&before, &after, CTR_PORT_REMAPPED), 0);

        // A client behind the backend's node (a pod there: the same next hop) is SNATed: its
        // packets would reach that node from its uplink with a source of its own pods, which
        // strict reverse-path filtering drops.
        let before = dp.counters().unwrap();
        let behind = sa("198.19.1.77:40000");
        let (v, out) = run(&dp, FROM_UPLINK, &tcp(behind, sa(NODE_PORT), SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(out[14], 0x45, "no option");
        assert_eq!(check(&out).src.ip(), &NODE.parse::<Ipv4Addr>().unwrap());
        let after = dp.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_SNAT), 1);
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_DSR), 0);

        // A SYN that fits its route (MTU 1300 to NARROW's node) only without the option (a
        // TCP Fast Open SYN with a full segment) is SNATed.
        let narrow = frontend("198.18.192.31:80", FrontendKind::ExternalIp);
        dp.upsert_service(narrow, &[backend(NARROW, false)])
            .unwrap();
        let before = dp.counters().unwrap();
        let full = tcp(
            sa("198.18.0.100:40008"),
            sa("198.18.192.31:80"),
            SYN,
            &[7; 1260],
        );
        assert_eq!(full.len(), 14 + 1300);
        let (v, out) = run(&dp, FROM_UPLINK, &full);
        assert_eq!((v, out[14]), (TC_ACT_REDIRECT, 0x45));
        assert_eq!(
            delta(&before, &dp.counters().unwrap(), CTR_NEW_FLOW_SNAT),
            1
        );

        // UDP: SNATed to the node.
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &udp(sa(CLIENT), sa(NODE_PORT), b"q"));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(check(&out).src.ip(), &NODE.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            delta(&before, &dp.counters().unwrap(), CTR_NEW_FLOW_SNAT),
            1
        );

        // XDP, let send from both devices, starts such a flow itself: the SYN DNATed, given
        // the option (room made at the front) and sent out, byte for byte as TC makes it from
        // the same state, and the flow recorded alike.
        let_xdp_send(&mut dp);
        let client = sa("198.18.0.100:40001");
        let syn = tcp(client, sa(NODE_PORT), SYN, b"");
        let before = recorded(&dp);
        let mut got = (0, Vec::new());
        let counts = xdp_counts(&dp, || got = run_xdp(&dp, XDP_FROM_UPLINK, &syn));
        assert_eq!(
            (got.0, counts),
            (XDP_REDIRECT, [0, 0, 0, 1, 0]),
            "a new flow sent out by XDP"
        );
        let by_xdp = recorded(&dp);
        assert_eq!(by_xdp.len(), before.len() + 2, "the flow's two entries");
        for e in dp.conntrack().unwrap() {
            if e.src == client || e.dst == client {
                dp.evict_conntrack_entry(&e).unwrap();
            }
        }
        let counted = dp.counters().unwrap();
        let (verdict, by_tc) = run(&dp, FROM_UPLINK, &syn);
        assert_eq!(
            (
                verdict,
                delta(&counted, &dp.counters().unwrap(), CTR_NEW_FLOW_DSR)
            ),
            (TC_ACT_REDIRECT, 1),
            "TC's new flow by DSR"
        );
        assert_eq!(got.1, by_tc, "XDP and TC make the same packet");
        assert_eq!(recorded(&dp), by_xdp, "XDP and TC record the flow alike");
        let seen = check(&got.1);
        assert_eq!((seen.src, seen.dst), (client, sa(REMOTE)));
        assert_eq!(
            got.1[34..42],
            with_dsr_option(&syn, sa(NODE_PORT))[34..42],
            "the option names the frontend"
        );
        assert_eq!((ttl(&got.1), &got.1[0..6]), (63, &OTHER_MAC[..]));
        // Once the client's ACK (TC's: it moves the flow to `CT4`) has established it, XDP
        // forwards its packets itself, DNATed only and from the client's address, byte for
        // byte as TC does (no option: only SYNs carry it); a FIN is TC's.
        run(&dp, FROM_UPLINK, &tcp(client, sa(NODE_PORT), ACK, b""));
        for (i, payload) in [&b"GET / HTTP/1.1\r\n"[..], b"Host: x\r\n", b"\r\n"]
            .into_iter()
            .enumerate()
        {
            let data = tcp(client, sa(NODE_PORT), ACK, payload);
            let what = format!("an established DSR flow's packet {i}");
            let out = xdp_sends_as_tc(&dp, &data, None, XDP_REDIRECT, &what);
            let seen = check(&out);
            assert_eq!((seen.src, seen.dst), (client, sa(REMOTE)), "{what}");
            assert_eq!((out[14], ttl(&out)), (0x45, 63), "{what}");
            assert_eq!(out[0..6], OTHER_MAC, "{what}: to the gateway the FIB names");
        }
        let counts = xdp_counts(&dp, || {
            run_xdp(
                &dp,
                XDP_FROM_UPLINK,
                &tcp(client, sa(NODE_PORT), FIN_ACK, b""),
            );
        });
        assert_eq!(counts, [0, 0, 1, 0, 0], "a FIN is TC's");
    });
}

/// A backend's node: the NodePort [`NODE_PORT`] with one endpoint, a pod of this node; with
/// that endpoint, and the NodePort on the ingress node's address, as that node names it in the
/// option.
fn backend_node() -> (Dataplane, SocketAddrV4, SocketAddrV4) {
    let mut dp = dataplane(SNAT_PORTS);
    let pod = sa("198.19.0.20:8080");
    dp.upsert_service(
        frontend(NODE_PORT, FrontendKind::NodePort),
        &[backend("198.19.0.20:8080", true)],
    )
    .unwrap();
    let shown = SocketAddrV4::new(OTHER_NODE.parse().unwrap(), sa(NODE_PORT).port());
    (dp, pod, shown)
}

/// The backend node's half: a SYN carrying the option, to a pod of this node, is passed on
/// unchanged and noted; the pod's replies leave the uplink showing the frontend the option
/// named, and its packet after the SYN-ACK establishes the entry. An option naming no frontend
/// of this node's Services is not noted.
#[test]
fn the_backend_node_notes_a_direct_server_return_syn_and_its_pods_replies_show_the_frontend() {
    require_privileged!(
        "the_backend_node_notes_a_direct_server_return_syn_and_its_pods_replies_show_the_frontend"
    );
    in_node(|_| {
        let (mut dp, pod, shown) = backend_node();
        let syn = with_dsr_option(&tcp(sa(CLIENT), pod, SYN, b""), shown);
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &syn);
        assert_eq!((v, &out), (TC_ACT_UNSPEC, &syn), "passed on unchanged");
        assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_DSR_NOTED), 1);
        let (v, out) = run(&dp, TO_UPLINK, &tcp(pod, sa(CLIENT), SYN_ACK, b""));
        assert_eq!(v, TC_ACT_UNSPEC);
        let seen = check(&out);
        assert_eq!((seen.src, seen.dst), (shown, sa(CLIENT)), "the SYN-ACK");
        let rev = |dp: &Dataplane| {
            dp.conntrack()
                .unwrap()
                .into_iter()
                .find(|e| e.kind == sluice::dataplane::CtKind::Reverse)
                .unwrap()
        };
        // Answered by the pod: the established lifetime at once (its client may wait long
        // before its first request, and the client's packets never pass here), but still in
        // `CT4_NEW`, the table a flood of new flows evicts from.
        let e = rev(&dp);
        assert!(
            e.new && lifetime_left_s(&e) > 3600.0,
            "after the SYN-ACK: {e:?}"
        );
        // A retransmitted SYN-ACK (all a spoofed SYN's source ever gets) moves nothing.
        let (_, out) = run(&dp, TO_UPLINK, &tcp(pod, sa(CLIENT), SYN_ACK, b""));
        assert_eq!(check(&out).src, shown);
        assert!(rev(&dp).new, "a retransmitted SYN-ACK left it in CT4_NEW");
        let (_, out) = run(&dp, TO_UPLINK, &tcp(pod, sa(CLIENT), ACK, b"200 OK"));
        assert_eq!(check(&out).src, shown);
        let e = rev(&dp);
        assert!(!e.new && lifetime_left_s(&e) > 3600.0, "established");
        // The pod's FIN closes it.
        run(&dp, TO_UPLINK, &tcp(pod, sa(CLIENT), FIN_ACK, b""));
        assert!(lifetime_left_s(&rev(&dp)) <= 10.0);
        // A spoofed SYN noted, and the pod's answer to it: the entry, from `client`.
        let answered = |client: SocketAddrV4, answer: Tcp| {
            run(
                &dp,
                FROM_UPLINK,
                &with_dsr_option(&tcp(client, pod, SYN, b""), shown),
            );
            run(&dp, TO_UPLINK, &tcp(pod, client, answer, b""));
            dp.conntrack()
                .unwrap()
                .into_iter()
                .find(|e| e.kind == sluice::dataplane::CtKind::Reverse && e.src == client)
                .unwrap()
        };
        // A SYN to a closed port (spoofed, say) answered with an RST: closed, and not moved to
        // the established table.
        let e = answered(sa("198.18.0.100:40009"), RST);
        assert!(
            e.new && lifetime_left_s(&e) <= 10.0,
            "left in CT4_NEW, closed"
        );
        // A spoofed SYN on the tuple of a connection the pod has open is answered with a bare
        // ACK (a challenge ACK): not the next packet after a SYN-ACK, so not established.
        let e = answered(sa("198.18.0.100:40010"), ACK);
        assert!(
            e.new && lifetime_left_s(&e) <= 60.0,
            "a challenge ACK left it in CT4_NEW, opening"
        );

        // Not noted: an option naming a port no frontend has, or a ClusterIP (not served from
        // outside), another option, none at all; their replies leave as the pod sent them.
        let cluster_ip = sa("198.19.128.30:80");
        dp.upsert_service(
            frontend("198.19.128.30:80", FrontendKind::ClusterIp),
            &[backend("198.19.0.20:8080", true)],
        )
        .unwrap();
        let nowhere = SocketAddrV4::new(OTHER_NODE.parse().unwrap(), 30081);
        // An externalIP on this node's own address: its port on another address is no
        // NodePort, and not believed.
        let external = frontend(&format!("{NODE}:30082"), FrontendKind::ExternalIp);
        dp.upsert_service(external, &[backend("198.19.0.20:8080", true)])
            .unwrap();
        let not_node_port = SocketAddrV4::new(OTHER_NODE.parse().unwrap(), 30082);
        let mut other_kind = with_dsr_option(&tcp(sa("198.18.0.100:40002"), pod, SYN, b""), shown);
        other_kind[34] = 0x9b;
        set_ip_checksum(&mut other_kind);
        // A frame for another host's MAC address (a bridge flooding it) is not noted either.
        let mut flooded = with_dsr_option(&tcp(sa("198.18.0.100:40005"), pod, SYN, b""), shown);
        flooded[..6].copy_from_slice(&MAC_OTHER_HOST);
        let cases = [
            (
                40001,
                with_dsr_option(&tcp(sa("198.18.0.100:40001"), pod, SYN, b""), nowhere),
            ),
            (40002, other_kind),
            (40003, tcp(sa("198.18.0.100:40003"), pod, SYN, b"")),
            (
                40004,
                with_dsr_option(&tcp(sa("198.18.0.100:40004"), pod, SYN, b""), cluster_ip),
            ),
            (40005, flooded),
            (
                40006,
                with_dsr_option(&tcp(sa("198.18.0.100:40006"), pod, SYN, b""), not_node_port),
            ),
        ];
        for (port, syn) in cases {
            let before = dp.counters().unwrap();
            let (v, out) = run(&dp, FROM_UPLINK, &syn);
            assert_eq!((v, &out), (TC_ACT_UNSPEC, &syn));
            let after = dp.counters().unwrap();
            assert_eq!(
                delta(&before, &after, CTR_DSR_NOTED),
                0,
                "client port {port}"
            );
            // The flooded frame passes before anything looks at it.
            let passed_as = if port == 40005 {
                CTR_PASS_OTHER_HOST
            } else {
                CTR_PASS_NOT_FRONTEND
            };
            assert_eq!(delta(&before, &after, passed_as), 1, "client port {port}");
            let client = SocketAddrV4::new(*sa(CLIENT).ip(), port);
            let (_, out) = run(&dp, TO_UPLINK, &tcp(pod, client, SYN_ACK, b""));
            assert_eq!(check(&out).src, pod, "client port {port}");
        }
    });
}

/// Why direct server return: with Maglev, a flow that an ECMP router moves to another node
/// mid-connection meets the same backend there, still with the client's address, so the
/// backend's node (which noted the flow from its SYN) goes on answering it. Node B, which never
/// saw the SYN, DNATs the flow's next packets to the backend node A chose, without the option,
/// and the client's second packet there establishes it.
#[test]
fn a_direct_server_return_flow_moved_to_another_node_keeps_its_backend_and_client_address() {
    require_privileged!(
        "a_direct_server_return_flow_moved_to_another_node_keeps_its_backend_and_client_address"
    );
    in_node(|_| {
        let lb = "198.18.192.2:80";
        let node = || {
            let mut dp = Dataplane::load_with(DataplaneConfig {
                dsr: true,
                ..config(SNAT_PORTS)
            })
            .unwrap();
            let backends = (10..15)
                .map(|i| backend(&format!("198.19.1.{i}:8080"), false))
                .collect();
            dp.upsert_frontend(
                frontend(lb, FrontendKind::LoadBalancer),
                &Backends {
                    maglev: true,
                    ..Backends::all(backends)
                },
            )
            .unwrap();
            dp
        };
        let (a, b) = (node(), node());
        let before = b.counters().unwrap();
        let mut chosen = std::collections::BTreeSet::new();
        for i in 0..20 {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1 + i), 40000);
            let (v, out) = run(&a, FROM_UPLINK, &tcp(client, sa(lb), SYN, b""));
            assert_eq!((v, out[14]), (TC_ACT_REDIRECT, 0x47), "node A: the SYN");
            let there = check(&out).dst;
            chosen.insert(there);
            for n in ["first", "second"] {
                let (v, out) = run(&b, FROM_UPLINK, &tcp(client, sa(lb), ACK, b"x"));
                assert_eq!(
                    (v, out[14]),
                    (TC_ACT_REDIRECT, 0x45),
                    "node B: the {n} packet"
                );
                let seen = check(&out);
                assert_eq!(
                    (seen.src, seen.dst),
                    (client, there),
                    "node B: the {n} packet"
                );
            }
        }
        assert!(
            chosen.len() > 1,
            "the flows spread over the backends: {chosen:?}"
        );
        let moved = b
            .conntrack()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == sluice::dataplane::CtKind::Service && !e.new)
            .count();
        assert_eq!(moved, 20, "established on node B");
        let after = b.counters().unwrap();
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_DSR), 20);
        assert_eq!(delta(&before, &after, CTR_NEW_FLOW_SNAT), 0);
    });
}

/// A pod of the backend's node that called another node's NodePort: its SYN comes back with
/// the option, and its replies pass the pod's egress, not the uplink's, so the pod is noted as
/// a client there (as for TC's own new flows), and the reply shows the frontend.
#[test]
fn a_direct_server_return_syn_from_a_pod_of_the_backends_node_notes_it_for_its_replies() {
    require_privileged!(
        "a_direct_server_return_syn_from_a_pod_of_the_backends_node_notes_it_for_its_replies"
    );
    in_node(|ns| {
        route_pod_by_v1(ns);
        let (dp, backend_pod, shown) = backend_node();
        let v0 = nix::net::if_::if_nametoindex("v0").unwrap();
        let pod = sa("198.19.0.77:5000");
        let before = dp.counters().unwrap();
        for client in [sa(CLIENT), pod] {
            // As it arrives on `v0`, for `v0`'s MAC address.
            let mut syn = with_dsr_option(&tcp(client, backend_pod, SYN, b""), shown);
            syn[..6].copy_from_slice(&v0_mac(ns));
            let (v, _) = run_on(&dp, FROM_UPLINK, &syn, v0);
            assert_eq!(v, TC_ACT_UNSPEC);
        }
        assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_DSR_NOTED), 2);
        // The outside client's replies leave by the uplink and never meet a pod's egress.
        let (clients, full) = dp.pod_clients().unwrap();
        assert_eq!((clients, full), (vec![*pod.ip()], false));
        let (_, out) = run(&dp, TO_POD, &tcp(backend_pod, pod, SYN_ACK, b""));
        assert_eq!(check(&out).src, shown, "the reply shows the frontend");
    });
}

/// A hostNetwork endpoint, on the node's own address (where NodePorts are too): its DSR SYN is
/// noted all the same, and its replies show the frontend.
#[test]
fn a_direct_server_return_syn_to_a_host_network_endpoint_is_noted() {
    require_privileged!("a_direct_server_return_syn_to_a_host_network_endpoint_is_noted");
    in_node(|_| {
        let mut dp = dataplane(SNAT_PORTS);
        let host = SocketAddrV4::new(NODE.parse().unwrap(), 8080);
        dp.upsert_service(
            frontend(NODE_PORT, FrontendKind::NodePort),
            &[backend(&host.to_string(), true)],
        )
        .unwrap();
        let shown = SocketAddrV4::new(OTHER_NODE.parse().unwrap(), sa(NODE_PORT).port());
        let syn = with_dsr_option(&tcp(sa(CLIENT), host, SYN, b""), shown);
        let before = dp.counters().unwrap();
        let (v, out) = run(&dp, FROM_UPLINK, &syn);
        assert_eq!((v, &out), (TC_ACT_UNSPEC, &syn), "passed on unchanged");
        assert_eq!(delta(&before, &dp.counters().unwrap(), CTR_DSR_NOTED), 1);
        let (_, out) = run(&dp, TO_UPLINK, &tcp(host, sa(CLIENT), SYN_ACK, b""));
        assert_eq!(check(&out).src, shown);
    });
}
