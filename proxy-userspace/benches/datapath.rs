//! Per-packet cost of the datapath through BPF_PROG_TEST_RUN, beside an empty program on the
//! same hook, with 1, 1,000, 10,000 and 100,000 Services in the maps. Run by `./x bench`.
//!
//! BPF_PROG_TEST_RUN reuses its input buffer across repeats, so after one DNAT every further
//! repeat would be a miss. Each measurement therefore runs the program once per call (the
//! kernel times that one run) on a fresh copy of the input, over many calls, and the
//! counters must show that every call took the path it is reported under. A conntrack hit is
//! measured on established flows (answered, then the client's next packet), as nearly every
//! hit on a node is; a new flow, on SYNs.
#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use proxy_common::{
    CT_FLAG_SNAT, CTR_AFFINITY_HIT, CTR_CT_HIT, CTR_DSR_NOTED, CTR_NEW_FLOW, CTR_NEW_FLOW_DSR,
    CTR_NEW_FLOW_SNAT, CTR_PASS_NO_MATCH, CTR_PASS_NOT_FRONTEND, CTR_PASS_NOT_FRONTEND_PORT,
    CTR_PASS_NOT_POD_CLIENT, CTR_REDIRECT, CTR_REPLY, CTR_XDP_CT_HIT, CTR_XDP_NEW_FLOW,
    CTR_XDP_NEW_FLOW_TX, CTR_XDP_TO_TC_NOT_SERVICE, CTR_XDP_TX, Counter, fe_port_bit,
};
use sluice::dataplane::{
    Backend, CtEntry, CtKind, Dataplane, DataplaneConfig, FROM_POD, FROM_UPLINK, Frontend,
    FrontendKind, PASS, PROGRAMS, Protocol, TO_POD, TO_UPLINK, XDP_FROM_UPLINK, XDP_PROGRAMS,
    XDP_TX,
};

/// ClusterIP Services per port: 198.18.128.1.. holds 32,000 on port 80; beyond that the same
/// addresses serve ports 81, 82, ..., so that 100,000 Services stay inside 198.18.128.0/17.
const PER_PORT: u32 = 32_000;

/// The `n`th ClusterIP Service's address and port.
fn cluster_ip(n: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 1)) + n % PER_PORT),
        80 + (n / PER_PORT) as u16,
    )
}

fn syn_to(sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    syn_from(Ipv4Addr::new(198, 19, 0, 10), sport, dst, dport)
}

fn syn_from(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    // To the test run's device's address (the loopback device's, all zeros): a frame for this
    // host, as the uplink's programs see the frames they translate.
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0; 6])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).unwrap();
    v
}

/// The answers of the backends of the flows `dp` tracks that `pick` selects (from their reverse
/// entries): `make(backend side, client side)` builds each. Sent, and followed by a packet from
/// each client, they make the flows established, as nearly every flow a conntrack hit finds is.
fn answers(
    dp: &Dataplane,
    pick: impl Fn(&CtEntry) -> bool,
    make: impl Fn(SocketAddrV4, SocketAddrV4) -> Vec<u8>,
) -> Vec<Vec<u8>> {
    dp.conntrack()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == CtKind::Reverse && pick(e))
        .map(|e| make(e.dst, e.src))
        .collect()
}

struct Stats {
    median: f64,
    mean: f64,
    p90: f64,
}

/// Runs `program` once per packet of `pkts`, `rounds` times over; the kernel's own timing of
/// each run, in ns.
fn measure(dp: &Dataplane, program: &'static str, pkts: &[Vec<u8>], rounds: usize) -> Stats {
    let mut out = vec![0u8; 256];
    let mut ns = Vec::with_capacity(pkts.len() * rounds);
    let xdp = XDP_PROGRAMS.contains(&program);
    for _ in 0..rounds {
        for p in pkts {
            let opts = TestRunOptions {
                data_in: Some(p),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            };
            let r = if xdp {
                dp.xdp_program(program).unwrap().test_run(opts)
            } else {
                dp.program(program).unwrap().test_run(opts)
            }
            .unwrap();
            ns.push(r.duration.as_nanos() as f64);
        }
    }
    ns.sort_by(f64::total_cmp);
    Stats {
        median: ns[ns.len() / 2],
        mean: ns.iter().sum::<f64>() / ns.len() as f64,
        p90: ns[ns.len() * 9 / 10],
    }
}

/// Writes `services` Services: ClusterIPs ([`cluster_ip`]), or NodePorts
/// 30000.. on `node_port_addr`, each with 3 backends (local or not).
fn program(dp: &mut Dataplane, services: u32, node_port_addr: Option<Ipv4Addr>, local: bool) {
    // The Service CIDR, as a cluster's agent has it: traffic that misses every frontend
    // address is checked against it (`pod to pod` pays for that).
    dp.set_service_cidrs(&["198.18.128.0/17".parse().unwrap()])
        .unwrap();
    for n in 0..services {
        let fe = match node_port_addr {
            None => Frontend {
                addr: *cluster_ip(n).ip(),
                port: cluster_ip(n).port(),
                proto: Protocol::Tcp,
                kind: FrontendKind::ClusterIp,
            },
            Some(addr) => Frontend {
                addr,
                port: 30000 + (n % 30000) as u16,
                proto: Protocol::Tcp,
                kind: FrontendKind::NodePort,
            },
        };
        // Local backends anywhere in 198.19.0.0/16; remote ones inside 198.19.1.0/24, the
        // other node's pods that the namespace routes to.
        let (base, spread) = if local {
            ([198, 19, 0, 10], 60_000)
        } else {
            ([198, 19, 1, 10], 240)
        };
        let bes: Vec<Backend> = (0..3)
            .map(|b| Backend {
                addr: Ipv4Addr::from(u32::from(Ipv4Addr::from(base)) + (n * 3 + b) % spread),
                port: 8080,
                local,
            })
            .collect();
        dp.upsert_service(fe, &bes).unwrap();
    }
}

/// The SNAT path, measured on a thread inside a namespace with a route to the remote
/// backends: new flows from outside to a NodePort with remote endpoints (DNAT, SNAT port
/// reserved, FIB lookup, redirect), their next packets (conntrack hit, redirect), and the
/// backends' replies (reverse translation, redirect), beside the empty program.
/// Then the same flows' packets and replies through the XDP program, let send from the test
/// run's device and the route's (`LB4_XDP_TX`): SNATed and redirected at XDP, beside the XDP
/// floor; then, the tables emptied, the new flows' SYNs again, started at XDP
/// (`sluice_xdp_new_flow`: backend, SNAT port, FIB lookup, sent out). Then, the tables
/// emptied and the dataplane reset to `--lb-mode dsr`, the same SYNs through TC by direct
/// server return (DNAT, the option written, FIB lookup, redirect), again started at XDP from
/// empty tables, their next packets once established (through TC, then XDP), and what the SYNs became arriving at the endpoint's
/// node, the tables emptied again (`dsr::note`: the frontend looked up, the reverse entry
/// written). Returns [empty, new flow, hit, reply, new flow (DSR), hit (DSR), DSR SYN noted]
/// and [XDP floor, XDP hit, XDP reply, XDP new flow, XDP new flow (DSR), XDP hit (DSR)].
fn snat_cell(services: u32, flows: u16, rounds: usize) -> ([Stats; 7], [Stats; 6]) {
    let (tx, rx) = std::sync::mpsc::channel();
    common::in_node(move |_| {
        let node: Ipv4Addr = common::NODE.parse().unwrap();
        let mut dp = Dataplane::load_with(DataplaneConfig {
            conntrack_max: 262_144,
            snat: Some(node),
            ..Default::default()
        })
        .unwrap();
        // NodePorts cycle over 30000..60000; the one under load is the middle Service's.
        program(&mut dp, services.min(30_000), Some(node), false);
        let np = 30000 + (services.min(30_000) / 2) as u16;
        let client = |i: u16| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 10_000 + i);
        let pkts: Vec<Vec<u8>> = (0..flows)
            .map(|i| common::tcp(client(i), SocketAddrV4::new(node, np), common::SYN, b""))
            .collect();
        let empty = measure(&dp, PASS, &pkts, rounds);
        let before = counter(&dp, CTR_NEW_FLOW_SNAT);
        let new_flow = measure(&dp, FROM_UPLINK, &pkts, 1);
        assert_eq!(
            counter(&dp, CTR_NEW_FLOW_SNAT) - before,
            u64::from(flows),
            "every run was a SNATed new flow; the counters: {:?}",
            proxy_common::COUNTER_NAMES
                .iter()
                .zip(dp.counters().unwrap())
                .filter(|(_, c)| c.packets > 0)
                .map(|(n, c)| (n, c.packets))
                .collect::<Vec<_>>()
        );
        // Established, unmeasured: each endpoint answers, each client ACKs.
        let syn_acks = answers(
            &dp,
            |e| e.entry.flags & CT_FLAG_SNAT != 0,
            |b, c| common::tcp(b, c, common::SYN_ACK, b""),
        );
        assert_eq!(syn_acks.len(), usize::from(flows));
        measure(&dp, FROM_UPLINK, &syn_acks, 1);
        let acks: Vec<Vec<u8>> = (0..flows)
            .map(|i| common::tcp(client(i), SocketAddrV4::new(node, np), common::ACK, b""))
            .collect();
        measure(&dp, FROM_UPLINK, &acks, 1);
        let before = (counter(&dp, CTR_CT_HIT), counter(&dp, CTR_REDIRECT));
        let ct_hit = measure(&dp, FROM_UPLINK, &acks, rounds);
        let runs = u64::from(flows) * rounds as u64;
        assert_eq!(
            counter(&dp, CTR_CT_HIT) - before.0,
            runs,
            "every run was a conntrack hit"
        );
        assert_eq!(
            counter(&dp, CTR_REDIRECT) - before.1,
            runs,
            "and redirected"
        );
        // The replies, to the SNAT address and port each flow got.
        let replies = answers(
            &dp,
            |e| e.entry.flags & CT_FLAG_SNAT != 0,
            |b, c| common::tcp(b, c, common::ACK, b""),
        );
        assert_eq!(replies.len(), usize::from(flows));
        let before = counter(&dp, CTR_REPLY);
        let reply = measure(&dp, FROM_UPLINK, &replies, rounds);
        assert_eq!(
            counter(&dp, CTR_REPLY) - before,
            runs,
            "every run was a reply"
        );
        // XDP: the test run's packets come in on the loopback device and leave by `v0`.
        common::let_xdp_send(&mut dp);
        let xdp_floor = measure(&dp, XDP_TX, &acks, rounds);
        let sent = "sent by XDP";
        let xdp_hit = measure_counted(&dp, XDP_FROM_UPLINK, &acks, rounds, CTR_XDP_TX, sent);
        let xdp_reply = measure_counted(&dp, XDP_FROM_UPLINK, &replies, rounds, CTR_XDP_TX, sent);
        // New flows started at XDP: DNAT, SNAT port, FIB lookup, sent out; each SYN once.
        // The very SYNs TC's new flows were measured on, from the same empty tables.
        for e in dp.conntrack().unwrap() {
            dp.evict_conntrack_entry(&e).unwrap();
        }
        let before = counter(&dp, CTR_XDP_NEW_FLOW_TX);
        let xdp_new = measure(&dp, XDP_FROM_UPLINK, &pkts, 1);
        assert_eq!(
            counter(&dp, CTR_XDP_NEW_FLOW_TX) - before,
            u64::from(flows),
            "every run was a new flow sent out by XDP"
        );
        // Direct server return: the same SYNs, from empty tables.
        dp.reset(DataplaneConfig {
            conntrack_max: 262_144,
            snat: Some(node),
            dsr: true,
            ..Default::default()
        })
        .unwrap();
        program(&mut dp, services.min(30_000), Some(node), false);
        let before = counter(&dp, CTR_NEW_FLOW_DSR);
        let dsr_new = measure(&dp, FROM_UPLINK, &pkts, 1);
        assert_eq!(
            counter(&dp, CTR_NEW_FLOW_DSR) - before,
            u64::from(flows),
            "every run was a new flow by direct server return"
        );
        // The same SYNs started at XDP, from empty tables again (DNAT, the option in room made
        // at the front, FIB lookup, sent out).
        for e in dp.conntrack().unwrap() {
            dp.evict_conntrack_entry(&e).unwrap();
        }
        common::let_xdp_send(&mut dp);
        let started = "a new flow sent out by XDP";
        let xdp_dsr_new =
            measure_counted(&dp, XDP_FROM_UPLINK, &pkts, 1, CTR_XDP_NEW_FLOW_TX, started);
        // Established by the clients' ACKs (unmeasured), the flows' next packets: TC's hit
        // (DNAT, FIB lookup from the client's address, redirect), then XDP's (the same, sent
        // out by XDP).
        measure(&dp, FROM_UPLINK, &acks, 1);
        let hit = "a conntrack hit of a flow by direct server return";
        let dsr_hit = measure_counted(&dp, FROM_UPLINK, &acks, rounds, CTR_CT_HIT, hit);
        let xdp_dsr_hit = measure_counted(&dp, XDP_FROM_UPLINK, &acks, rounds, CTR_XDP_TX, sent);
        // The SYNs as the endpoints' node gets them (each sent again: it carries the option
        // again), noted there into empty tables; addressed to the test run's device's MAC (the
        // loopback device's, all zero), as a frame for that node.
        let noted: Vec<Vec<u8>> = pkts
            .iter()
            .map(|p| {
                let mut f = common::run(&dp, FROM_UPLINK, p).1;
                f[..6].copy_from_slice(&[0; 6]);
                f
            })
            .collect();
        for e in dp.conntrack().unwrap() {
            dp.evict_conntrack_entry(&e).unwrap();
        }
        let before = counter(&dp, CTR_DSR_NOTED);
        let dsr_noted = measure(&dp, FROM_UPLINK, &noted, 1);
        assert_eq!(
            counter(&dp, CTR_DSR_NOTED) - before,
            u64::from(flows),
            "every run was a SYN noted"
        );
        tx.send((
            [empty, new_flow, ct_hit, reply, dsr_new, dsr_hit, dsr_noted],
            [
                xdp_floor,
                xdp_hit,
                xdp_reply,
                xdp_new,
                xdp_dsr_new,
                xdp_dsr_hit,
            ],
        ))
        .unwrap();
    });
    rx.recv().unwrap()
}

/// sessionAffinity ClientIP on the middle of `services` ClusterIP Services: new flows from
/// `flows` clients (already noted as pod clients) seen for the first time by the frontend (the
/// affinity entry missed, then written),
/// then a new flow from each of them again (the entry hit: the remembered backend checked and
/// used), beside the empty program and a new flow without affinity.
fn affinity_cell(services: u32, flows: u16) -> [Stats; 4] {
    let mut dp = sized_for_services();
    program(&mut dp, services.max(2), None, true);
    let (sticky, plain) = (cluster_ip(services / 2), cluster_ip(services / 2 + 1));
    let fe = Frontend {
        addr: *sticky.ip(),
        port: sticky.port(),
        proto: Protocol::Tcp,
        kind: FrontendKind::ClusterIp,
    };
    let (_, backends) = dp
        .services()
        .into_iter()
        .find(|(f, _)| f.id() == fe.id())
        .unwrap();
    dp.upsert_frontend(
        fe,
        &sluice::dataplane::Backends {
            affinity_timeout_s: Some(10_800),
            ..backends
        },
    )
    .unwrap();
    // Client addresses in 198.19.128.0/17, none a backend's.
    let client = |i: u16| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + u32::from(i));
    let to = |dst: SocketAddrV4, sport: u16| -> Vec<Vec<u8>> {
        (0..flows)
            .map(|i| syn_from(client(i), sport, *dst.ip(), dst.port()))
            .collect()
    };
    let empty = measure(&dp, PASS, &to(sticky, 1000), 1);
    let path = |pkts: &[Vec<u8>], ctr: u32, want: u64, what: &str| {
        let before = counter(&dp, ctr);
        let stats = measure(&dp, FROM_POD, pkts, 1);
        assert_eq!(counter(&dp, ctr) - before, want, "{what}");
        stats
    };
    let n = u64::from(flows);
    // The clients' first flows, unmeasured: each client is noted once (LB4_POD_CLIENTS), which
    // no cell below should pay for.
    path(&to(plain, 999), CTR_NEW_FLOW, n, "every run a new flow");
    let plain_new = path(&to(plain, 1000), CTR_NEW_FLOW, n, "every run a new flow");
    let hits = counter(&dp, CTR_AFFINITY_HIT);
    let miss = path(&to(sticky, 1000), CTR_NEW_FLOW, n, "every run a new flow");
    assert_eq!(counter(&dp, CTR_AFFINITY_HIT), hits, "and no affinity hit");
    let hit = path(
        &to(sticky, 1001),
        CTR_AFFINITY_HIT,
        n,
        "every run an affinity hit",
    );
    [empty, plain_new, miss, hit]
}

/// The egress miss: a packet that is no reply of a translated flow, where the filters cannot
/// tell without looking: into a pod that is a TC client (`sluice_to_pod`), and out of an uplink
/// (`sluice_to_uplink`), both conntrack tables missed (`CT4`, then `CT4_NEW`); against a packet
/// into a pod that is no TC client, which the pod-client filter passes before any lookup. The
/// tables hold `flows` flows from as many clients, half of them established.
fn egress_cell(services: u32, flows: u16, rounds: usize) -> [Stats; 4] {
    let mut dp = sized_for_services();
    program(&mut dp, services, None, true);
    let vip = cluster_ip(services / 2);
    // Client addresses in 198.19.128.0/17, none a backend's.
    let client = |i: u16| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + u32::from(i));
    let opened: Vec<Vec<u8>> = (0..flows)
        .map(|i| syn_from(client(i), 40_000, *vip.ip(), vip.port()))
        .collect();
    measure(&dp, FROM_POD, &opened, 1);
    let syn_acks = answers(
        &dp,
        |_| true,
        |b, c| common::tcp(b, c, common::SYN_ACK, b""),
    );
    let half: Vec<Vec<u8>> = syn_acks.into_iter().step_by(2).collect();
    measure(&dp, TO_POD, &half, 1);
    let empty = measure(&dp, PASS, &opened, rounds);
    let path = |program, pkts: &[Vec<u8>], ctr: u32, what: &str| {
        let before = dp.counters().unwrap();
        let stats = measure(&dp, program, pkts, rounds);
        let after = dp.counters().unwrap();
        let moved: Vec<(&str, u64)> = proxy_common::COUNTER_NAMES
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a.packets != b.packets)
            .map(|(n, (b, a))| (*n, a.packets - b.packets))
            .collect();
        assert_eq!(
            after[ctr as usize].packets - before[ctr as usize].packets,
            pkts.len() as u64 * rounds as u64,
            "every run of {program} was {what}; the counters moved: {moved:?}"
        );
        stats
    };
    let other_pod = Ipv4Addr::new(198, 19, 0, 21);
    let into_client: Vec<Vec<u8>> = (0..flows)
        .map(|i| syn_from(other_pod, 9090, client(i), 40_001))
        .collect();
    let into_client = path(
        TO_POD,
        &into_client,
        CTR_PASS_NO_MATCH,
        "a miss in both tables",
    );
    let into_other: Vec<Vec<u8>> = (0..flows)
        .map(|i| syn_from(client(i), 40_001, other_pod, 9090))
        .collect();
    let into_other = path(
        TO_POD,
        &into_other,
        CTR_PASS_NOT_POD_CLIENT,
        "passed on the filter",
    );
    let out: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            syn_from(
                Ipv4Addr::new(198, 18, 0, 1),
                20_000 + i,
                Ipv4Addr::new(198, 18, 60, 1),
                443,
            )
        })
        .collect();
    let out_uplink = path(TO_UPLINK, &out, CTR_PASS_NO_MATCH, "a miss in both tables");
    [empty, into_client, into_other, out_uplink]
}

/// The XDP fast path: established NodePort flows from outside to local backends, their next
/// packets through `sluice_xdp_from_uplink` (the hit: DNAT, XDP_PASS) beside `sluice_xdp_tx`
/// (the XDP floor), and through TC's `sluice_from_uplink` beside `sluice_pass` (TC's floor);
/// new flows' SYNs, started at XDP (`sluice_xdp_new_flow`: backend, entries, DNAT) and at TC;
/// packets to an address no frontend has, which XDP hands to TC.
/// Returns [XDP floor, XDP hit, XDP new flow, XDP not a Service's, TC floor, TC hit, TC new
/// flow].
fn xdp_cell(services: u32, flows: u16, rounds: usize) -> [Stats; 7] {
    let mut dp = sized_for_services();
    let node = Ipv4Addr::new(198, 18, 0, 10);
    program(&mut dp, services, Some(node), true);
    let np = 30000 + (services / 2 % 30000) as u16;
    let client = |i: u16| {
        SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 100, (i % 250) as u8 + 1),
            10_000 + i / 250,
        )
    };
    let syns: Vec<Vec<u8>> = (0..flows)
        .map(|i| syn_from(*client(i).ip(), client(i).port(), node, np))
        .collect();
    measure(&dp, FROM_UPLINK, &syns, 1);
    let syn_acks = answers(
        &dp,
        |_| true,
        |b, c| common::tcp(b, c, common::SYN_ACK, b""),
    );
    assert_eq!(syn_acks.len(), usize::from(flows));
    measure(&dp, TO_UPLINK, &syn_acks, 1);
    let acks: Vec<Vec<u8>> = (0..flows)
        .map(|i| common::tcp(client(i), SocketAddrV4::new(node, np), common::ACK, b""))
        .collect();
    measure(&dp, FROM_UPLINK, &acks, 1);
    let path_of = |program, pkts: &[Vec<u8>], rounds: usize, ctr: u32, what: &str| {
        let before = counter(&dp, ctr);
        let stats = measure(&dp, program, pkts, rounds);
        assert_eq!(
            counter(&dp, ctr) - before,
            pkts.len() as u64 * rounds as u64,
            "every run of {program} was {what}"
        );
        stats
    };
    let path =
        |program, pkts: &[Vec<u8>], ctr: u32, what: &str| path_of(program, pkts, rounds, ctr, what);
    let xdp_floor = measure(&dp, XDP_TX, &acks, rounds);
    let xdp_hit = path(XDP_FROM_UPLINK, &acks, CTR_XDP_CT_HIT, "an XDP hit");
    // New flows, each SYN once (a second run would find its flow): at XDP, and at TC.
    let new_from = |port_offset: u16| -> Vec<Vec<u8>> {
        (0..flows)
            .map(|i| syn_from(*client(i).ip(), client(i).port() + port_offset, node, np))
            .collect()
    };
    let xdp_new = path_of(
        XDP_FROM_UPLINK,
        &new_from(1000),
        1,
        CTR_XDP_NEW_FLOW,
        "a new flow at XDP",
    );
    let tc_new = path_of(
        FROM_UPLINK,
        &new_from(2000),
        1,
        CTR_NEW_FLOW,
        "a new flow at TC",
    );
    let other: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            syn_from(
                *client(i).ip(),
                client(i).port(),
                Ipv4Addr::new(198, 18, 0, 11),
                22,
            )
        })
        .collect();
    let xdp_other = path(
        XDP_FROM_UPLINK,
        &other,
        CTR_XDP_TO_TC_NOT_SERVICE,
        "not a Service's",
    );
    let tc_floor = measure(&dp, PASS, &acks, rounds);
    let tc_hit = path(FROM_UPLINK, &acks, CTR_CT_HIT, "a TC hit");
    [
        xdp_floor, xdp_hit, xdp_new, xdp_other, tc_floor, tc_hit, tc_new,
    ]
}

/// The SCTP cost: conntrack hits from a pod to a ClusterIP over TCP (port 80 -> 8080), and
/// over SCTP with a port change (3868 -> 3869: the tail-called checksum update) and without
/// one (3870 -> 3870: the tail call, nothing to update), each against the empty program.
fn sctp_cell(services: u32, flows: u16, rounds: usize) -> [Stats; 4] {
    let mut dp = sized_for_services();
    program(&mut dp, services.max(1), None, true);
    let vip = cluster_ip(services / 2);
    let backends = |port: u16| {
        [20u8, 21, 22].map(|i| Backend {
            addr: Ipv4Addr::new(198, 19, 0, i),
            port,
            local: true,
        })
    };
    for (port, target) in [(3868, 3869), (3870, 3870)] {
        let fe = Frontend {
            addr: *vip.ip(),
            port,
            proto: Protocol::Sctp,
            kind: FrontendKind::ClusterIp,
        };
        dp.upsert_service(fe, &backends(target)).unwrap();
    }
    let client = Ipv4Addr::new(198, 19, 0, 10);
    let data = [0u8, 3, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    let sctp_to = |port: u16| -> Vec<Vec<u8>> {
        (0..flows)
            .map(|i| {
                common::sctp(
                    SocketAddrV4::new(client, 10_000 + i),
                    SocketAddrV4::new(*vip.ip(), port),
                    &data,
                )
            })
            .collect()
    };
    let tcp: Vec<Vec<u8>> = (0..flows)
        .map(|i| syn_to(10_000 + i, *vip.ip(), vip.port()))
        .collect();
    let (changed, same) = (sctp_to(3868), sctp_to(3870));
    let empty = measure(&dp, PASS, &tcp, rounds);
    let hits = |pkts: &[Vec<u8>], proto: Protocol, backend_port: u16, what: &str| {
        // The flows' first packets, each backend's answer and each client's next packet,
        // unmeasured: established flows.
        measure(&dp, FROM_POD, pkts, 1);
        let answers = answers(
            &dp,
            |e| e.proto == proto && e.dst.port() == backend_port,
            |b, c| match proto {
                Protocol::Sctp => common::sctp(b, c, &data),
                _ => common::tcp(b, c, common::SYN_ACK, b""),
            },
        );
        assert_eq!(answers.len(), pkts.len());
        measure(&dp, TO_POD, &answers, 1);
        measure(&dp, FROM_POD, pkts, 1);
        let before = counter(&dp, CTR_CT_HIT);
        let stats = measure(&dp, FROM_POD, pkts, rounds);
        assert_eq!(
            counter(&dp, CTR_CT_HIT) - before,
            pkts.len() as u64 * rounds as u64,
            "every run a conntrack hit ({what})"
        );
        stats
    };
    [
        empty,
        hits(&tcp, Protocol::Tcp, 8080, "TCP"),
        hits(&changed, Protocol::Sctp, 3869, "SCTP, port changed"),
        hits(&same, Protocol::Sctp, 3870, "SCTP, same port"),
    ]
}

/// A dataplane with room for 100,000 Services and their flows.
fn sized_for_services() -> Dataplane {
    Dataplane::load_with(DataplaneConfig {
        conntrack_max: 262_144,
        // Room for every cell's half-open flows: the kernel's LRU evicts before it is full
        // (its free lists are per CPU), and at the default 65,536 the SCTP cell's 40,000
        // entries lost flows before their answers.
        conntrack_new_max: 262_144,
        // A frontend and 3 backend slots per Service.
        services_max: 524_288,
        revnat_max: 131_072,
        ..Default::default()
    })
    .unwrap()
}

/// A table's cell for `s`, then its ratio to `floor`'s median as the next cell.
fn cell_and_ratio(s: &Stats, floor: &Stats) -> String {
    format!("{} | {:.2}x", cell(s), s.median / floor.median)
}

fn cell(s: &Stats) -> String {
    format!("{:.0} ns (mean {:.0}, p90 {:.0})", s.median, s.mean, s.p90)
}

/// A table row: the number of Services, the empty program and each path, then each path's
/// median over the empty program's.
fn over_empty<const N: usize>(services: u32, stats: &[Stats; N]) -> String {
    let [empty, paths @ ..] = stats.as_slice() else {
        unreachable!("a cell has its empty program")
    };
    let cells: Vec<String> = std::iter::once(empty).chain(paths).map(cell).collect();
    let over: Vec<String> = paths
        .iter()
        .map(|p| format!("+{:.0}", p.median - empty.median))
        .collect();
    format!(
        "| {services} | {} | {} ns |\n",
        cells.join(" | "),
        over.join(" / ")
    )
}

fn counter(dp: &Dataplane, i: u32) -> u64 {
    let c: [Counter; _] = dp.counters().unwrap();
    c[i as usize].packets
}

/// [`measure`], asserting that every run counted `ctr`: the cell measured what it says it did.
fn measure_counted(
    dp: &Dataplane,
    program: &'static str,
    pkts: &[Vec<u8>],
    rounds: usize,
    ctr: u32,
    what: &str,
) -> Stats {
    let before = counter(dp, ctr);
    let stats = measure(dp, program, pkts, rounds);
    assert_eq!(
        counter(dp, ctr) - before,
        (pkts.len() * rounds) as u64,
        "every run was {what}"
    );
    stats
}

/// Establishes `n` flows from distinct client ports to `vip` (SYN, the backend's SYN-ACK,
/// one ACK): the ACKs, each flow's next packet, a conntrack hit.
fn established(dp: &Dataplane, n: u16, vip: SocketAddrV4) -> Vec<Vec<u8>> {
    let syns: Vec<Vec<u8>> = (0..n)
        .map(|i| syn_to(10_000 + i, *vip.ip(), vip.port()))
        .collect();
    measure(dp, FROM_POD, &syns, 1);
    answer_and_ack(dp, n, vip)
}

/// Establishes the `n` flows whose SYNs (`syn_to`, ports 10,000 on, to `vip`) went through,
/// unmeasured: each backend answers, each client ACKs. The ACKs, each flow's next packet.
fn answer_and_ack(dp: &Dataplane, n: u16, vip: SocketAddrV4) -> Vec<Vec<u8>> {
    let syn_acks = answers(dp, |_| true, |b, c| common::tcp(b, c, common::SYN_ACK, b""));
    assert_eq!(syn_acks.len(), usize::from(n));
    measure(dp, TO_POD, &syn_acks, 1);
    let acks: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 10_000 + i);
            common::tcp(client, vip, common::ACK, b"")
        })
        .collect();
    measure(dp, FROM_POD, &acks, 1);
    acks
}

/// SYNs of `n` flows never seen before, to `vip`, from client address number `batch`.
fn fresh_syns(batch: u32, n: u16, vip: SocketAddrV4) -> Vec<Vec<u8>> {
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 2, 0)) + batch);
    (0..n)
        .map(|i| syn_from(src, 10_000 + i, *vip.ip(), vip.port()))
        .collect()
}

/// The agent's tidy scan over the conntrack section's full tables: entries read, and the
/// median of five scans in ms.
static TIDY_SCAN: std::sync::Mutex<Option<(usize, f64)>> = std::sync::Mutex::new(None);

/// The conntrack section's row: the empty program, hits on 200, 2,000 and 20,000 flows, and
/// new flows with room and with the tables full.
fn conntrack_section(rounds: usize) -> String {
    let vip = cluster_ip(0);
    let mut hits = Vec::new();
    let mut empty = None;
    for n in [200u16, 2_000, 20_000] {
        let mut dp = sized_for_services();
        program(&mut dp, 1, None, true);
        let acks = established(&dp, n, vip);
        let before = counter(&dp, CTR_CT_HIT);
        // As many runs for every size: more rounds over fewer flows.
        hits.push(measure(
            &dp,
            FROM_POD,
            &acks,
            rounds * 20_000 / usize::from(n),
        ));
        assert_eq!(
            counter(&dp, CTR_CT_HIT) - before,
            (rounds * 20_000 / usize::from(n) * usize::from(n)) as u64,
            "every run was a hit"
        );
        empty.get_or_insert_with(|| measure(&dp, PASS, &acks, rounds));
    }
    // The main table's sizes (262,144 new-flow entries); filled by 250,000 more new flows
    // (2 entries each), unmeasured.
    let mut dp = sized_for_services();
    program(&mut dp, 1, None, true);
    let room = measure(&dp, FROM_POD, &fresh_syns(0, 20_000, vip), 1);
    for batch in 1..=25 {
        measure(&dp, FROM_POD, &fresh_syns(batch, 10_000, vip), 1);
    }
    let before = counter(&dp, CTR_NEW_FLOW);
    let full = measure(&dp, FROM_POD, &fresh_syns(26, 20_000, vip), 1);
    assert_eq!(
        counter(&dp, CTR_NEW_FLOW) - before,
        20_000,
        "every run was a new flow"
    );
    // The agent's tidy scan (`retire_fe_addrs`, from its tick) over these full tables, once
    // the frontend is gone while its flows live: it reads every conntrack entry.
    dp.remove_service(Frontend {
        addr: *vip.ip(),
        port: vip.port(),
        proto: Protocol::Tcp,
        kind: FrontendKind::ClusterIp,
    })
    .unwrap();
    let entries = dp.conntrack().unwrap().len();
    let mut scans: Vec<f64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            assert_eq!(dp.retire_fe_addrs().unwrap(), 0, "the flows live");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    scans.sort_by(f64::total_cmp);
    *TIDY_SCAN.lock().unwrap() = Some((entries, scans[2]));
    let e = empty.unwrap();
    format!(
        "| {} | {} | {} | {} | {:.2}x / {:.2}x / {:.2}x | {} | {} | {:.1}x / {:.1}x |\n",
        cell(&e),
        cell(&hits[0]),
        cell(&hits[1]),
        cell(&hits[2]),
        hits[0].median / e.median,
        hits[1].median / e.median,
        hits[2].median / e.median,
        cell(&room),
        cell(&full),
        room.median / e.median,
        full.median / e.median,
    )
}

/// Runs one cell's packets through `sluice_from_pod` for 10 s (`--profile`): `hit`, the
/// established flows' next packets (`acks`); `new`, SYNs of flows never seen before, to `vip`,
/// from client addresses in turn (the conntrack tables evict the oldest, as on a busy node).
fn profile_cell(dp: &Dataplane, cell: &str, acks: &[Vec<u8>], vip: SocketAddrV4) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut runs = 0usize;
    let mut batch = 0u32;
    let mut medians = Vec::new();
    while std::time::Instant::now() < end {
        match cell {
            "hit" => {
                medians.push(measure(dp, FROM_POD, acks, 1).median);
                runs += acks.len();
            }
            "new" => {
                batch += 1;
                let syns = fresh_syns(batch, 10_000, vip);
                medians.push(measure(dp, FROM_POD, &syns, 1).median);
                runs += syns.len();
            }
            other => panic!("--profile takes hit or new, not {other:?}"),
        }
    }
    // The medians of the first rounds, then of every 25th: for new flows, before and as the
    // conntrack tables fill.
    eprintln!(
        "profiled {cell}: {runs} runs; median ns of the first rounds {:?}, then of every 25th {:?}",
        &medians[..medians.len().min(3)],
        medians.iter().step_by(25).collect::<Vec<_>>()
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if !nix_is_root() {
        eprintln!("the datapath benchmark loads eBPF programs: run it as root");
        std::process::exit(1);
    }
    // `--profile hit|new`: only that cell, over and over for 10 s, for `perf record` to
    // see where its time goes (no report).
    let args: Vec<String> = std::env::args().collect();
    let profile = args
        .iter()
        .position(|a| a == "--profile")
        .map(|i| args.get(i + 1).cloned().unwrap_or_default());
    let flows: u16 = if quick { 2_000 } else { 20_000 };
    let rounds = if quick { 2 } else { 5 };
    let mut rows = Vec::new();
    for services in [1u32, 1_000, 10_000, 100_000] {
        let mut dp = sized_for_services();
        let start = std::time::Instant::now();
        program(&mut dp, services, None, true);
        let program_time = start.elapsed();
        // An externalIP, for the no-match cell (a ClusterIP's other ports are refused).
        let ext = Ipv4Addr::new(198, 18, 64, 1);
        dp.upsert_service(
            Frontend {
                addr: ext,
                port: 80,
                proto: Protocol::Tcp,
                kind: FrontendKind::ExternalIp,
            },
            &[Backend {
                addr: Ipv4Addr::new(198, 19, 0, 20),
                port: 8080,
                local: true,
            }],
        )
        .unwrap();
        // The Service under load is in the middle of the table.
        let vip = cluster_ip(services / 2);
        let pkts: Vec<Vec<u8>> = (0..flows)
            .map(|i| syn_to(10_000 + i, *vip.ip(), vip.port()))
            .collect();

        let empty = measure(&dp, PASS, &pkts, rounds);
        // Each path's runs must all have taken it: the counter says so.
        let on_path_of = |program, pkts: &[Vec<u8>], rounds: usize, ctr: u32, what: &str| {
            let before = counter(&dp, ctr);
            let stats = measure(&dp, program, pkts, rounds);
            let runs = counter(&dp, ctr) - before;
            assert_eq!(
                runs,
                pkts.len() as u64 * rounds as u64,
                "every run was {what}"
            );
            stats
        };
        let on_path = |pkts: &[Vec<u8>], rounds: usize, ctr: u32, what: &str| {
            on_path_of(FROM_POD, pkts, rounds, ctr, what)
        };
        let new_flow = on_path(&pkts, 1, CTR_NEW_FLOW, "a new flow");
        let acks = answer_and_ack(&dp, flows, vip);
        if let Some(cell) = &profile {
            profile_cell(&dp, cell, &acks, vip);
            return;
        }
        let ct_hit = on_path(&acks, rounds, CTR_CT_HIT, "a conntrack hit");
        // A frontend's address, a port it does not serve: the address's port filter passes
        // it, with no conntrack lookup.
        let miss: Vec<Vec<u8>> = (0..flows).map(|i| syn_to(10_000 + i, ext, 81)).collect();
        let no_match = on_path(
            &miss,
            rounds,
            CTR_PASS_NOT_FRONTEND_PORT,
            "passed on the port filter",
        );
        // A port that shares port 80's filter bit: the full way, the conntrack lookup, then
        // the frontend lookup, both miss.
        let shared = (1..=u16::MAX)
            .find(|&p| p != 80 && fe_port_bit(p) == fe_port_bit(80))
            .unwrap();
        let miss_shared: Vec<Vec<u8>> = (0..flows)
            .map(|i| syn_to(10_000 + i, ext, shared))
            .collect();
        let no_match_shared = on_path(&miss_shared, rounds, CTR_PASS_NO_MATCH, "a full miss");
        // Pod to pod (what a connection socket LB translated looks like): no frontend at
        // that address, so no lookup beyond the address.
        let pod: Vec<Vec<u8>> = (0..flows)
            .map(|i| syn_to(10_000 + i, Ipv4Addr::new(198, 19, 0, 20), 8080))
            .collect();
        let pod_to_pod = on_path(&pod, rounds, CTR_PASS_NOT_FRONTEND, "passed on the address");
        // The same packets at the destination pod's egress: that pod was never the client of
        // a flow translated at TC, so no conntrack lookup either.
        let into_pod = on_path_of(
            TO_POD,
            &pod,
            rounds,
            CTR_PASS_NOT_POD_CLIENT,
            "passed on the pod client filter",
        );
        rows.push((
            services,
            program_time,
            empty,
            ct_hit,
            new_flow,
            no_match,
            no_match_shared,
            pod_to_pod,
            into_pod,
        ));
    }
    let mut md = String::new();
    md.push_str("| Services | empty program | conntrack hit | new flow | no match (an externalIP, another port: the port filter) | no match, a port sharing the frontend's filter bit (the full way) | pod to pod (no frontend's address) | into a pod (`sluice_to_pod`, no TC client there) | conntrack hit / new flow / no match / pod to pod over empty | time to program all |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let f = cell;
    for (n, t, e, h, nf, nm, nms, pp, ip) in &rows {
        md.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {:.2}x / {:.2}x / {:.2}x / {:.2}x | {:.1} ms |\n",
            f(e),
            f(h),
            f(nf),
            f(nm),
            f(nms),
            f(pp),
            f(ip),
            h.median / e.median,
            nf.median / e.median,
            nm.median / e.median,
            pp.median / e.median,
            t.as_secs_f64() * 1e3
        ));
    }
    md.push_str("\n## Conntrack: where a hit's time goes, and new flows once the tables are full\n\nTC ingress of a pod device, 1 Service. A conntrack hit on 200, 2,000 and 20,000 established flows, visited in turn: with few flows their entries stay in the CPU's caches; with many, each hit waits on memory for its bucket and entry (`perf record` of `--profile hit` puts about half of a hit's time in the kernel's hash bucket walk, `lookup_nulls_elem_raw`). Then new flows with room in the tables (as in the main table's cell), and new flows once `CT4_NEW` (262,144 entries here) is full, after 250,000 more new flows, as on a busy node: each insert then evicts (`--profile new` puts about half of a new flow's time in `bpf_lru_pop_free`, and a third in `htab_lru_map_update_elem`), and each lookup that misses walks a fuller bucket.\n\n| empty program | hit, 200 flows | hit, 2,000 flows | hit, 20,000 flows | over empty: 200 / 2,000 / 20,000 | new flow, room in the tables | new flow, tables full | over empty: room / full |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    md.push_str(&conntrack_section(rounds));
    if let Some((entries, ms)) = *TIDY_SCAN.lock().unwrap() {
        md.push_str(&format!("\nThe agent's tidy scan (`Dataplane::retire_fe_addrs`, run from its tick while a gone frontend's flows live) over those full tables: {entries} conntrack entries read in {ms:.0} ms (median of 5).\n"));
    }
    md.push_str("\n## The SNAT path: from outside to a NodePort whose endpoints are on other nodes\n\nTC ingress of the uplink (`sluice_from_uplink`) on a thread inside a namespace with a route and a resolved neighbour for the remote endpoints: a new flow (DNAT, SNAT port reserved, FIB lookup, TTL and MACs, redirect), the flow's next packet (conntrack hit, FIB lookup, redirect) and the endpoint's reply (reverse translation, FIB lookup, redirect), against the empty program. Then with `--lb-mode dsr`, from empty tables: the same SYNs by direct server return (DNAT, the option written, FIB lookup, redirect), the flows' next packets once the clients' ACKs established them (conntrack hit, FIB lookup from the client's address, redirect), and those SYNs as they reach the endpoints' node, noted there (`dsr::note`: the option read, the frontend looked up, the reverse entry written).\n\n");
    md.push_str("| Services | empty program | new flow (SNAT) | conntrack hit (SNAT) | reply (SNAT) | new flow (DSR) | conntrack hit (DSR) | DSR SYN noted | over empty: new / hit / reply / DSR new / DSR hit / noted |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut snat_xdp = Vec::new();
    for services in [1u32, 10_000] {
        let (tc, xdp) = snat_cell(services, flows, rounds);
        md.push_str(&over_empty(services, &tc));
        snat_xdp.push((services, tc, xdp));
    }
    md.push_str("\n## sessionAffinity ClientIP: the new-flow cost\n\nTC ingress of a pod device: new flows to a ClusterIP without affinity, and to one with it from clients it has not seen (the affinity entry missed, then written) and from the same clients again (the entry hit: the remembered backend checked against the frontend's and used). The conntrack hit path is the same with or without affinity.\n\n| Services | empty program | new flow, no affinity | new flow, affinity miss | new flow, affinity hit | over empty: none / miss / hit |\n|---:|---:|---:|---:|---:|---:|\n");
    for services in [1u32, 10_000] {
        md.push_str(&over_empty(services, &affinity_cell(services, flows)));
    }
    md.push_str("\n## Egress: packets that are no reply, where the filters must look\n\nTC egress: a packet into a pod that was a TC client (`sluice_to_pod`) and one out of an uplink (`sluice_to_uplink`), neither a reply of any flow: both conntrack tables are looked up (`CT4`, then `CT4_NEW`) and missed; beside a packet into a pod that was never a TC client, which the pod-client filter passes with no conntrack lookup. The tables hold as many flows as the main table's cells, half established.\n\n| Services | empty program | into a TC client, no flow | into a pod no TC client | out of an uplink, no flow | over empty: client / not / uplink |\n|---:|---:|---:|---:|---:|---:|\n");
    for services in [1u32, 10_000] {
        md.push_str(&over_empty(services, &egress_cell(services, flows, rounds)));
    }
    md.push_str("\n## XDP on uplinks: new flows and the established flow's hit before the skb\n\nNodePort flows from outside to local backends, established through TC (SYN, SYN-ACK, ACK), then their next packets: through `sluice_xdp_from_uplink` (the XDP hit: conntrack, DNAT, XDP_PASS) beside `sluice_xdp_tx` (an XDP program that only returns XDP_TX, the floor), and through TC's `sluice_from_uplink` beside `sluice_pass`. New flows' SYNs, each once: started at XDP (the lookups that miss, the tail call to `sluice_xdp_new_flow`, backend choice, both entries recorded, DNAT, XDP_PASS) and at TC (the same through `sluice_from_uplink` and its new-flow program). Also what XDP hands to TC untouched: a packet to an address no frontend has. BPF_PROG_TEST_RUN times the program alone: the skb XDP saves building is not in these figures.\n\n| Services | XDP floor (XDP_TX) | XDP hit | XDP hit / floor | XDP new flow | TC new flow | XDP / TC: new flow | XDP: not a Service's | TC floor | TC hit | TC hit / floor |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for services in [1u32, 10_000] {
        let [xf, xh, xn, xo, tf, th, tn] = xdp_cell(services, flows, rounds);
        md.push_str(&format!(
            "| {services} | {} | {} | {:.2}x | {} | {} | {:.2} | {} | {} | {} | {:.2}x |\n",
            cell(&xf),
            cell(&xh),
            xh.median / xf.median,
            cell(&xn),
            cell(&tn),
            xn.median / tn.median,
            cell(&xo),
            cell(&tf),
            cell(&th),
            th.median / tf.median
        ));
    }
    md.push_str("\n### XDP: flows SNATed to the node (remote endpoints), both ways\n\nThe SNAT section's established flows (same run, same namespace): the client's next packet and the endpoint's reply through `sluice_xdp_from_uplink`, each translated (both addresses and ports), given the route's TTL and MACs (`bpf_fib_lookup`) and sent out by XDP (here XDP_REDIRECT, as the test run's packets come in on the loopback device; on an uplink, XDP_TX), beside the XDP floor and TC's own hit and reply above. Then, the tables emptied, the new flows' SYNs again, each once, started at XDP (backend, SNAT port reserved, both entries, FIB lookup, sent out), beside TC's new flow above on the same SYNs from the same empty tables.\n\n| Services | XDP floor (XDP_TX) | XDP hit (SNAT) | hit / floor | XDP reply (SNAT) | reply / floor | XDP new flow (SNAT) | TC hit (SNAT) | TC reply (SNAT) | TC new flow (SNAT) | XDP / TC: hit, reply, new flow |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    // The direct-server-return rows, rendered in the same pass, go in a table of their own.
    let mut dsr_rows = String::new();
    for (
        services,
        [_, tc_new, tc_hit, tc_reply, tc_dsr_new, tc_dsr_hit, _],
        [floor, hit, reply, new, dsr_new, dsr_hit],
    ) in &snat_xdp
    {
        md.push_str(&format!(
            "| {services} | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} / {:.2} |\n",
            cell(floor),
            cell_and_ratio(hit, floor),
            cell_and_ratio(reply, floor),
            cell(new),
            cell(tc_hit),
            cell(tc_reply),
            cell(tc_new),
            hit.median / tc_hit.median,
            reply.median / tc_reply.median,
            new.median / tc_new.median
        ));
        dsr_rows.push_str(&format!(
            "| {services} | {} | {} | {} | {:.2} | {} | {} | {:.2} |\n",
            cell(floor),
            cell_and_ratio(dsr_hit, floor),
            cell(tc_dsr_hit),
            dsr_hit.median / tc_dsr_hit.median,
            cell(dsr_new),
            cell(tc_dsr_new),
            dsr_new.median / tc_dsr_new.median
        ));
    }
    md.push_str("\n### XDP: flows by direct server return (the ingress node)\n\nThe SNAT section's flows by direct server return (same run, same namespace): their SYNs, each once from empty tables, started at XDP (backend, both entries, the option inserted in room made at the front, FIB lookup, sent out) beside TC's new flow by DSR above; then, established, the client's next packet through `sluice_xdp_from_uplink`, DNATed only and sent out by XDP by the route from the client's address, beside the XDP floor and TC's hit of the same flows above.\n\n| Services | XDP floor (XDP_TX) | XDP hit (DSR) | hit / floor | TC hit (DSR) | XDP / TC: hit | XDP new flow (DSR) | TC new flow (DSR) | XDP / TC: new flow |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    md.push_str(&dsr_rows);
    md.push_str("\n## SCTP: the conntrack hit, with its checksum update\n\nTC ingress of a pod device: conntrack hits to a ClusterIP over TCP (port 80 to 8080), and over SCTP with a port change (3868 to 3869: the CRC32c update, in `sluice_sctp_checksum`, tail-called) and without one (3870 to 3870: the tail call, nothing to update).\n\n| Services | empty program | TCP hit | SCTP hit, port changed | SCTP hit, same port | over empty: TCP / SCTP changed / same |\n|---:|---:|---:|---:|---:|---:|\n");
    for services in [1u32, 10_000] {
        md.push_str(&over_empty(services, &sctp_cell(services, flows, rounds)));
    }
    // How much of the verifier's budget (1,000,000 instructions processed per program) each
    // program takes on this kernel: the room left for new datapath features.
    md.push_str("\n## Verifier: instructions processed per program (limit 1,000,000)\n\n| program | instructions |\n|---|---:|\n");
    let dp = Dataplane::load().unwrap();
    for p in PROGRAMS.iter().chain(XDP_PROGRAMS) {
        let info = if XDP_PROGRAMS.contains(p) {
            dp.xdp_program(p).ok().and_then(|prog| prog.info().ok())
        } else {
            dp.program(p).ok().and_then(|prog| prog.info().ok())
        };
        let n = info.and_then(|i| i.verified_instruction_count());
        md.push_str(&format!(
            "| `{p}` | {} |\n",
            n.map_or("unknown (Linux < 5.16)".to_owned(), |n| n.to_string())
        ));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let header = format!(
        "# sluice datapath: ns per packet through BPF_PROG_TEST_RUN\n\nKernel {}, {} CPUs, {} mode: {flows} flows, medians of single kernel-timed runs ({} samples per cell; new flow: {flows}).\nTC ingress of a pod device (`sluice_from_pod`) against the empty program on the same hook (`sluice_pass`).\n\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { "quick" } else { "full" },
        usize::from(flows) * rounds,
    );
    let report = format!("{header}{md}");
    println!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("datapath.md"), report).unwrap();
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
