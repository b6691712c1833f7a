//! The ingress filter on frontend addresses (`LB4_FE_ADDRS2`): a packet to an address no
//! frontend is on, or to a port of it that no frontend and no live flow has, passes with no
//! conntrack lookup, and yet no flow that was translated loses its translation, even after
//! its frontend is gone. The real programs, through
//! BPF_PROG_TEST_RUN.
mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::*;
use proxy_common::*;
use sluice::dataplane::{
    Backend, CtKind, Dataplane, DataplaneConfig, FROM_POD, Frontend, FrontendKind, Protocol, TO_POD,
};
use testbed::{BpfFs, require_privileged};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);
const CLIENT: &str = "198.19.0.10:40000";
const BACKEND: &str = "198.19.0.20:8080";

fn fe(addr: Ipv4Addr, port: u16, kind: FrontendKind) -> Frontend {
    Frontend {
        addr,
        port,
        proto: Protocol::Tcp,
        kind,
    }
}

fn backend() -> Backend {
    let a = sa(BACKEND);
    Backend {
        addr: *a.ip(),
        port: a.port(),
        local: true,
    }
}

fn config(pin_path: Option<std::path::PathBuf>) -> DataplaneConfig {
    DataplaneConfig {
        pin_path,
        conntrack_max: 4096,
        ..Default::default()
    }
}

/// Establishes a flow from [`CLIENT`] to [`VIP`]:`port`, to [`BACKEND`].
fn establish_to_vip(dp: &Dataplane, port: u16) {
    establish(
        dp,
        sa(CLIENT),
        std::net::SocketAddrV4::new(VIP, port),
        sa(BACKEND),
    );
}

fn to_vip(port: u16, flags: Tcp) -> Vec<u8> {
    tcp(
        sa(CLIENT),
        std::net::SocketAddrV4::new(VIP, port),
        flags,
        b"",
    )
}

#[test]
fn an_address_enters_with_its_first_frontend_and_leaves_after_its_last() {
    require_privileged!("an_address_enters_with_its_first_frontend_and_leaves_after_its_last");
    let mut dp = Dataplane::load_with(config(None)).unwrap();
    assert_eq!(dp.fe_addrs().unwrap(), vec![]);
    let http = fe(VIP, 80, FrontendKind::ClusterIp);
    let https = fe(VIP, 443, FrontendKind::ClusterIp);
    dp.upsert_service(http, &[backend()]).unwrap();
    dp.upsert_service(https, &[backend()]).unwrap();
    // Rewriting a frontend does not count it twice.
    dp.upsert_service(http, &[backend()]).unwrap();
    assert_eq!(dp.fe_addrs().unwrap(), vec![(VIP, 2)]);
    dp.remove_service(http).unwrap();
    assert_eq!(dp.fe_addrs().unwrap(), vec![(VIP, 1)]);
    dp.remove_service(https).unwrap();
    assert_eq!(
        dp.fe_addrs().unwrap(),
        vec![(VIP, 0)],
        "retired, not removed, with its last frontend"
    );
    assert_eq!(dp.retire_fe_addrs().unwrap(), 1, "no flow names it");
    assert_eq!(dp.fe_addrs().unwrap(), vec![]);
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &to_vip(80, SYN));
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, to_vip(80, SYN)));
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_FRONTEND), 1);
}

#[test]
fn a_flow_outlives_its_frontend_and_its_address_goes_only_when_the_flow_has() {
    require_privileged!("a_flow_outlives_its_frontend_and_its_address_goes_only_when_the_flow_has");
    let mut dp = Dataplane::load_with(config(None)).unwrap();
    let http = fe(VIP, 80, FrontendKind::ClusterIp);
    dp.upsert_service(http, &[backend()]).unwrap();
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, SYN));
    assert_eq!(check(&out).dst, sa(BACKEND));
    establish_to_vip(&dp, 80);
    dp.remove_service(http).unwrap();
    // The established flow keeps its backend, as kube-proxy's conntrack keeps it.
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, ACK));
    assert_eq!(check(&out).dst, sa(BACKEND), "the flow is still translated");
    assert_eq!(dp.retire_fe_addrs().unwrap(), 0, "a live flow names it");
    assert_eq!(dp.fe_addrs().unwrap(), vec![(VIP, 0)]);
    // The client resets it: the flow is closing, over in 10 s.
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, RST));
    assert_eq!(check(&out).dst, sa(BACKEND));
    assert_eq!(dp.retire_fe_addrs().unwrap(), 0, "closing, not yet over");
    std::thread::sleep(
        Duration::from_nanos(CT_LIFETIME_TCP_CLOSING_NS) + Duration::from_millis(1_500),
    );
    assert_eq!(dp.retire_fe_addrs().unwrap(), 1);
    assert_eq!(dp.fe_addrs().unwrap(), vec![]);
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &to_vip(80, SYN));
    assert_eq!(
        (verdict, out),
        (TC_ACT_UNSPEC, to_vip(80, SYN)),
        "nothing translates it now"
    );
    assert_eq!(
        delta(&before, &dp.counters().unwrap(), CTR_PASS_NOT_FRONTEND),
        1
    );
}

/// A dataplane with a NodePort (30080) on a node address (returned) and a ClusterIP
/// ([`VIP`]:80), each with [`BACKEND`].
fn node_and_cluster_ip() -> (Dataplane, Ipv4Addr) {
    let mut dp = Dataplane::load_with(config(None)).unwrap();
    let node = Ipv4Addr::new(198, 18, 0, 10);
    dp.upsert_service(fe(node, 30080, FrontendKind::NodePort), &[backend()])
        .unwrap();
    dp.upsert_service(fe(VIP, 80, FrontendKind::ClusterIp), &[backend()])
        .unwrap();
    (dp, node)
}

#[test]
fn a_reply_to_a_frontend_address_is_left_for_egress() {
    require_privileged!("a_reply_to_a_frontend_address_is_left_for_egress");
    // The node (198.18.0.10, which has a NodePort) calls a ClusterIP whose backend is a pod.
    let (dp, node) = node_and_cluster_ip();
    let client = std::net::SocketAddrV4::new(node, 40000);
    let vip = std::net::SocketAddrV4::new(VIP, 80);
    run(&dp, FROM_POD, &tcp(client, vip, SYN, b""));
    let reply = tcp(sa(BACKEND), client, SYN_ACK, b"");
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &reply);
    assert_eq!(
        (verdict, &out),
        (TC_ACT_UNSPEC, &reply),
        "untouched before routing"
    );
    // Only replies of SNATed flows are looked up at ingress (to the hairpin address, or to
    // the SNAT address on a SNAT port): this one is no flow's packet there, and its port
    // (the node's client port) no frontend's, so the port filter passes it.
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_FRONTEND_PORT), 1);
    let (_, out) = run(&dp, TO_POD, &reply);
    assert_eq!(check(&out).src, vip, "translated at egress");
}

#[test]
fn adopting_maps_without_the_address_map_fills_it_from_frontends_and_live_flows() {
    require_privileged!(
        "adopting_maps_without_the_address_map_fills_it_from_frontends_and_live_flows"
    );
    let fs = BpfFs::new().unwrap();
    let pins = fs.path().join("sluice");
    let other = Ipv4Addr::new(198, 18, 128, 2);
    let gone = fe(VIP, 80, FrontendKind::ClusterIp);
    {
        let mut dp = Dataplane::load_with(config(Some(pins.clone()))).unwrap();
        dp.upsert_service(gone, &[backend()]).unwrap();
        dp.upsert_service(fe(other, 80, FrontendKind::ClusterIp), &[backend()])
            .unwrap();
        establish_to_vip(&dp, 80);
        dp.remove_service(gone).unwrap();
    }
    // An agent of a layout before the map: its pins have none, or the first layout's
    // `LB4_FE_ADDRS` (counts without port filters; a pin renamed stands in for it).
    let first_layout = pins.join("LB4_FE_ADDRS");
    std::fs::rename(pins.join(LB4_FE_ADDRS_MAP), &first_layout).unwrap();
    let dp = Dataplane::load_with(config(Some(pins))).unwrap();
    assert!(!first_layout.exists(), "the first layout's pin is removed");
    assert_eq!(
        dp.fe_addrs().unwrap(),
        vec![(VIP, 0), (other, 1)],
        "the frontend's address, and the retired one a live flow names"
    );
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, ACK));
    assert_eq!(check(&out).dst, sa(BACKEND), "the adopted flow goes on");
}

/// The port filter of `addr`'s entry: whether a flow or a frontend may have `port` there.
fn filter_has(dp: &Dataplane, addr: Ipv4Addr, port: u16) -> bool {
    dp.fe_addr_entries()
        .unwrap()
        .into_iter()
        .find(|(a, _)| *a == addr)
        .is_some_and(|(_, v)| v.may_have_port(port))
}

#[test]
fn a_packet_to_a_frontends_address_on_another_port_is_answered_with_no_conntrack_lookup() {
    require_privileged!(
        "a_packet_to_a_frontends_address_on_another_port_is_answered_with_no_conntrack_lookup"
    );
    // A node address with a NodePort, and a ClusterIP.
    let (dp, node) = node_and_cluster_ip();
    assert!(filter_has(&dp, node, 30080) && filter_has(&dp, VIP, 80));
    assert!(!filter_has(&dp, node, 22) && !filter_has(&dp, VIP, 81));
    // The node's own port (SSH) on its NodePort address: passed untouched, by the filter.
    let ssh = tcp(sa(CLIENT), std::net::SocketAddrV4::new(node, 22), SYN, b"");
    let before = dp.counters().unwrap();
    assert_eq!(run(&dp, FROM_POD, &ssh), (TC_ACT_UNSPEC, ssh.clone()));
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_FRONTEND_PORT), 1);
    assert_eq!(delta(&before, &after, CTR_PASS_NO_MATCH), 0);
    // A ClusterIP's other port, from a pod: still refused (ICMP port unreachable), by the
    // filter's way too.
    let (verdict, _) = run(&dp, FROM_POD, &to_vip(81, SYN));
    assert_ne!(verdict, TC_ACT_UNSPEC, "refused");
    let later = dp.counters().unwrap();
    assert_eq!(delta(&after, &later, CTR_REJECT_NO_SUCH_PORT), 1);
    // The frontends' own ports are translated.
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, SYN));
    assert_eq!(check(&out).dst, sa(BACKEND));
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(
            sa("198.19.0.11:40000"),
            std::net::SocketAddrV4::new(node, 30080),
            SYN,
            b"",
        ),
    );
    assert_eq!(check(&out).dst, sa(BACKEND));
}

#[test]
fn a_gone_frontends_port_stays_in_the_filter_while_its_flows_live() {
    require_privileged!("a_gone_frontends_port_stays_in_the_filter_while_its_flows_live");
    let mut dp = Dataplane::load_with(config(None)).unwrap();
    // An externalIP (its other ports pass untouched, from pods too) with two ports.
    let http = fe(VIP, 80, FrontendKind::ExternalIp);
    let https = fe(VIP, 443, FrontendKind::ExternalIp);
    dp.upsert_service(http, &[backend()]).unwrap();
    dp.upsert_service(https, &[backend()]).unwrap();
    establish_to_vip(&dp, 80);
    dp.remove_service(http).unwrap();
    assert_eq!(dp.fe_addrs().unwrap(), vec![(VIP, 1)]);
    assert!(filter_has(&dp, VIP, 80), "kept for the live flow");
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, ACK));
    assert_eq!(check(&out).dst, sa(BACKEND), "the flow is still translated");
    assert_eq!(dp.retire_fe_addrs().unwrap(), 0);
    assert!(filter_has(&dp, VIP, 80), "a live flow names the port");
    // The flow ends (its entries go, as the LRU or expiry takes them).
    for e in dp.conntrack().unwrap() {
        dp.evict_conntrack_entry(&e).unwrap();
    }
    assert_eq!(
        dp.retire_fe_addrs().unwrap(),
        0,
        "the address has a frontend"
    );
    assert!(!filter_has(&dp, VIP, 80), "no flow names the port now");
    assert!(filter_has(&dp, VIP, 443), "the frontend's own port stays");
    let before = dp.counters().unwrap();
    let syn = to_vip(80, SYN);
    assert_eq!(run(&dp, FROM_POD, &syn), (TC_ACT_UNSPEC, syn.clone()));
    assert_eq!(
        delta(&before, &dp.counters().unwrap(), CTR_PASS_NOT_FRONTEND_PORT),
        1
    );
    // A frontend on the port again: its bit is back before its first packet.
    dp.upsert_service(http, &[backend()]).unwrap();
    let (_, out) = run(&dp, FROM_POD, &to_vip(80, SYN));
    assert_eq!(check(&out).dst, sa(BACKEND));
}

/// The agent reads conntrack in batches (`BPF_MAP_LOOKUP_BATCH`, several thousand entries a
/// call): for the filter's tidy scan, whose flows keep a gone frontend's address, and for
/// `conntrack()`. Over a table of more than three batches, every entry is read, once: the same
/// entries as reading key by key.
#[test]
fn conntrack_larger_than_a_batch_is_read_whole() {
    require_privileged!("conntrack_larger_than_a_batch_is_read_whole");
    let mut dp = Dataplane::load_with(DataplaneConfig {
        conntrack_max: 32_768,
        conntrack_new_max: 32_768,
        ..config(None)
    })
    .unwrap();
    let vip = fe(VIP, 80, FrontendKind::ClusterIp);
    dp.upsert_service(vip, &[backend()]).unwrap();
    // 7,000 new flows from pods (two entries each), on 28 client addresses.
    for i in 0..7_000u32 {
        let client = std::net::SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 2, 0)) + i / 250),
            10_000 + (i % 250) as u16,
        );
        let (_, out) = run(&dp, FROM_POD, &tcp(client, sa("198.18.128.1:80"), SYN, b""));
        assert_eq!(check(&out).dst, sa(BACKEND));
    }
    let flows = dp.conntrack().unwrap();
    assert_eq!(flows.len(), 14_000, "every entry, once");
    let distinct: std::collections::BTreeSet<_> = flows
        .iter()
        .map(|e| (e.kind == CtKind::Service, e.src, e.dst))
        .collect();
    assert_eq!(distinct.len(), 14_000, "no entry twice");
    let by_key: usize = dp
        .raw_dump()
        .unwrap()
        .iter()
        .filter(|(name, _)| name == CT4_NEW_MAP || name == CT4_MAP)
        .map(|(_, entries)| entries.len())
        .sum();
    assert_eq!(by_key, 14_000, "read key by key, the same count");
    // A second frontend, on its own address, with one flow beside the 7,000: gone, its flow
    // live, the tidy scan (also in batches) finds that flow and keeps the address; once the
    // flow's entries are gone, the address goes.
    let other = fe(Ipv4Addr::new(198, 18, 128, 2), 80, FrontendKind::ClusterIp);
    dp.upsert_service(other, &[backend()]).unwrap();
    run(
        &dp,
        FROM_POD,
        &tcp(sa(CLIENT), sa("198.18.128.2:80"), SYN, b""),
    );
    dp.remove_service(other).unwrap();
    assert_eq!(dp.retire_fe_addrs().unwrap(), 0, "the address is kept");
    for e in dp.conntrack().unwrap() {
        if e.dst == sa("198.18.128.2:80") || e.src == sa(BACKEND) && e.dst == sa(CLIENT) {
            dp.evict_conntrack_entry(&e).unwrap();
        }
    }
    assert_eq!(dp.retire_fe_addrs().unwrap(), 1, "the address goes");
}
