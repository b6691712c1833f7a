//! Pinned maps outlive the process that made them: a new `Dataplane` on the same pin path
//! adopts the Services, ids and conntrack entries the last one wrote.
mod common;

use common::*;
use std::net::SocketAddrV4;

use proxy_common::CT4_MAP;
use sluice::dataplane::{
    Backend, Dataplane, DataplaneConfig, FROM_POD, FROM_UPLINK, Frontend, FrontendKind, Protocol,
    TO_POD, XDP_FROM_UPLINK,
};
use testbed::{BpfFs, require_privileged};

#[test]
fn a_reloaded_dataplane_adopts_pinned_services_and_flows() {
    require_privileged!("a_reloaded_dataplane_adopts_pinned_services_and_flows");
    let fs = BpfFs::new().unwrap();
    let config = DataplaneConfig {
        pin_path: Some(fs.path().join("sluice")),
        conntrack_max: 4096,
        ..Default::default()
    };
    let vip = Frontend {
        addr: "198.18.128.1".parse().unwrap(),
        port: 80,
        proto: Protocol::Tcp,
        kind: FrontendKind::ClusterIp,
    };
    let backends = [
        Backend {
            addr: "198.19.0.20".parse().unwrap(),
            port: 8080,
            local: true,
        },
        Backend {
            addr: "198.19.0.21".parse().unwrap(),
            port: 8080,
            local: true,
        },
    ];
    let client = sa("198.19.0.10:40000");
    let first_backend = {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_service(vip, &backends).unwrap();
        let (_, out) = run(&dp, FROM_POD, &tcp(client, sa("198.18.128.1:80"), SYN, b""));
        check(&out).dst
    }; // the first process is gone: its programs are unloaded, its maps stay pinned
    assert!(
        fs.path().join("sluice").join(CT4_MAP).exists(),
        "conntrack is pinned"
    );

    let mut dp = Dataplane::load_with(config).unwrap();
    let services = dp.services();
    assert_eq!(services.len(), 1, "the Service was adopted: {services:?}");
    assert_eq!(services[0].0, vip);
    let mut got = services[0].1.all.clone();
    got.sort();
    assert_eq!(got, backends, "with its backends");
    let (_, out) = run(&dp, FROM_POD, &tcp(client, sa("198.18.128.1:80"), ACK, b""));
    assert_eq!(
        check(&out).dst,
        first_backend,
        "the flow kept its backend across the reload"
    );
    // Writing through the adopted ids works: shrink to one backend, then remove.
    dp.upsert_service(vip, &backends[1..]).unwrap();
    assert_eq!(dp.services()[0].1.all, backends[1..]);
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(sa("198.19.0.10:40001"), sa("198.18.128.1:80"), SYN, b""),
    );
    assert_eq!(check(&out).dst, sa("198.19.0.21:8080"));
    dp.remove_service(vip).unwrap();
    drop(dp);
    let dp = Dataplane::load_with(DataplaneConfig {
        pin_path: Some(fs.path().join("sluice")),
        conntrack_max: 4096,
        ..Default::default()
    })
    .unwrap();
    assert!(dp.services().is_empty(), "the removal was pinned too");
}

#[test]
fn a_reloaded_dataplane_adopts_both_lists_of_a_local_policy_frontend() {
    require_privileged!("a_reloaded_dataplane_adopts_both_lists_of_a_local_policy_frontend");
    let fs = BpfFs::new().unwrap();
    let config = DataplaneConfig {
        pin_path: Some(fs.path().join("sluice")),
        ..Default::default()
    };
    let np = Frontend {
        addr: "198.18.0.10".parse().unwrap(),
        port: 30080,
        proto: Protocol::Tcp,
        kind: FrontendKind::NodePort,
    };
    let be = |a: &str, local| Backend {
        addr: a.parse().unwrap(),
        port: 8080,
        local,
    };
    let want = sluice::dataplane::Backends {
        all: vec![be("198.19.0.20", true), be("198.19.1.20", false)],
        external: Some(vec![be("198.19.0.20", true)]),
        sources: None,
        affinity_timeout_s: None,
        no_local_endpoints: false,
        maglev: true,
    };
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_frontend(np, &want).unwrap();
    }
    // The Maglev tables in the pinned map, by reverse-NAT id.
    let tables = || -> Vec<u32> {
        let pinned = aya::maps::MapData::from_pin(
            fs.path().join("sluice").join(proxy_common::LB4_MAGLEV_MAP),
        )
        .unwrap();
        let map: aya::maps::HashMap<_, u32, proxy_common::MaglevTable> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(pinned).unwrap()).unwrap();
        map.keys().map(Result::unwrap).collect()
    };
    let mut dp = Dataplane::load_with(config).unwrap();
    assert_eq!(
        dp.services(),
        vec![(np, want.clone())],
        "both lists adopted, and Maglev"
    );
    assert_eq!(tables().len(), 1, "the Maglev table is kept");
    // Rewriting through the adopted ids: the list for every origin grows, the local one
    // stays; then the policy goes back to Cluster and the local list goes.
    let grown = sluice::dataplane::Backends {
        all: vec![
            be("198.19.0.20", true),
            be("198.19.1.20", false),
            be("198.19.2.20", false),
        ],
        external: want.external.clone(),
        sources: None,
        affinity_timeout_s: None,
        no_local_endpoints: false,
        maglev: false,
    };
    dp.upsert_frontend(np, &grown).unwrap();
    assert_eq!(dp.services(), vec![(np, grown.clone())]);
    assert!(tables().is_empty(), "Maglev off: its table goes");
    dp.upsert_frontend(np, &sluice::dataplane::Backends::all(grown.all.clone()))
        .unwrap();
    drop(dp);
    let dp = Dataplane::load_with(DataplaneConfig {
        pin_path: Some(fs.path().join("sluice")),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        dp.services(),
        vec![(np, sluice::dataplane::Backends::all(grown.all))]
    );
    // The map itself: the frontend entry and its three slots, no local slot left behind.
    let pinned = aya::maps::MapData::from_pin(
        fs.path()
            .join("sluice")
            .join(proxy_common::LB4_SERVICES_MAP),
    )
    .unwrap();
    let map: aya::maps::HashMap<_, proxy_common::Lb4Key, proxy_common::Lb4Service> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(pinned).unwrap()).unwrap();
    let mut slots: Vec<u16> = map.keys().map(|k| k.unwrap().slot).collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2, 3]);
}

/// A restarted agent adopts a LoadBalancer frontend's source ranges and whether the node may
/// connect, from the pinned maps (the `sluice services` reader sees them too), and rewrites
/// them through what it adopted; ranges that no frontend names (an agent stopped half-way
/// through a removal) are removed at load, so no later frontend inherits them.
#[test]
fn a_reloaded_dataplane_adopts_a_load_balancers_source_ranges() {
    require_privileged!("a_reloaded_dataplane_adopts_a_load_balancers_source_ranges");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        ..Default::default()
    };
    let lb = Frontend {
        addr: "198.18.192.2".parse().unwrap(),
        port: 80,
        proto: Protocol::Tcp,
        kind: FrontendKind::LoadBalancer,
    };
    let with = |cidrs: &[&str], from_node| sluice::dataplane::Backends {
        all: vec![Backend {
            addr: "198.19.0.20".parse().unwrap(),
            port: 8080,
            local: true,
        }],
        external: None,
        sources: Some(sluice::dataplane::SourceRanges {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            from_node,
        }),
        affinity_timeout_s: None,
        no_local_endpoints: false,
        maglev: false,
    };
    let want = with(&["198.18.0.0/24", "198.19.0.0/16"], true);
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_frontend(lb, &want).unwrap();
    }
    // A range under a reverse-NAT id no frontend has.
    let ranges = || {
        let data =
            aya::maps::MapData::from_pin(dir.join(proxy_common::LB4_SRC_RANGES_MAP)).unwrap();
        aya::maps::LpmTrie::<_, proxy_common::SrcRange4Key, u8>::try_from(
            aya::maps::Map::from_map_data(data).unwrap(),
        )
        .unwrap()
    };
    let orphan = aya::maps::lpm_trie::Key::new(
        proxy_common::SRC_RANGE_ID_BITS + 8,
        proxy_common::SrcRange4Key {
            rev_nat_id_be: 999u32.to_be(),
            addr_be: u32::from(std::net::Ipv4Addr::new(198, 0, 0, 0)).to_be(),
        },
    );
    ranges().insert(&orphan, &1, 0).unwrap();
    assert_eq!(ranges().keys().count(), 3);
    let mut dp = Dataplane::load_with(config.clone()).unwrap();
    assert_eq!(dp.services(), vec![(lb, want.clone())], "ranges adopted");
    let read = sluice::dataplane::PinnedMaps::open(&dir)
        .unwrap()
        .services()
        .unwrap();
    assert_eq!(read, vec![(lb, want.clone())], "and read from the pins");
    assert_eq!(ranges().keys().count(), 2, "the orphan went");
    let changed = with(&["198.19.0.0/16", "198.18.5.0/24", "198.18.6.0/24"], false);
    dp.upsert_frontend(lb, &changed).unwrap();
    drop(dp);
    let dp = Dataplane::load_with(config).unwrap();
    assert_eq!(dp.services().len(), 1);
    let mut got = dp.services()[0].1.clone();
    got.sources.as_mut().unwrap().cidrs.sort();
    assert_eq!(got, changed.normalized());
    assert_eq!(ranges().keys().count(), 3, "one kept, one lost, two gained");
}

/// sessionAffinity survives a restart: the reloaded dataplane adopts the frontend's timeout
/// and the backends it may stick to, and a client's next new flow goes where its last one
/// went; affinity backends no frontend names are removed at load.
#[test]
fn session_affinity_survives_a_reload() {
    require_privileged!("session_affinity_survives_a_reload");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        ..Default::default()
    };
    let vip = "198.18.128.1:80";
    let f = fe(vip, Protocol::Tcp, FrontendKind::ClusterIp);
    let want = sluice::dataplane::Backends {
        affinity_timeout_s: Some(600),
        ..sluice::dataplane::Backends::all(
            (20..28)
                .map(|i| be(&format!("198.19.0.{i}:8080")))
                .collect(),
        )
    };
    let syn = |port: u16| tcp(sa(&format!("198.19.2.1:{port}")), sa(vip), SYN, b"");
    let first = {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_frontend(f, &want).unwrap();
        check(&run(&dp, FROM_POD, &syn(40000)).1).dst
    };
    // An affinity backend under a reverse-NAT id no frontend has.
    {
        let data =
            aya::maps::MapData::from_pin(dir.join(proxy_common::LB4_AFFINITY_MATCH_MAP)).unwrap();
        let mut m = aya::maps::HashMap::<_, proxy_common::AffinityMatchKey, u8>::try_from(
            aya::maps::Map::from_map_data(data).unwrap(),
        )
        .unwrap();
        let orphan = proxy_common::AffinityMatchKey {
            backend_id: 1,
            rev_nat_id: 999,
        };
        m.insert(&orphan, &1, 0).unwrap();
        assert_eq!(m.keys().count(), 9);
    }
    let dp = Dataplane::load_with(config).unwrap();
    assert_eq!(dp.services(), vec![(f, want)], "the timeout adopted");
    for port in 40001..40011 {
        assert_eq!(
            check(&run(&dp, FROM_POD, &syn(port)).1).dst,
            first,
            "new flow from port {port} after the reload"
        );
    }
    let data =
        aya::maps::MapData::from_pin(dir.join(proxy_common::LB4_AFFINITY_MATCH_MAP)).unwrap();
    let m = aya::maps::HashMap::<_, proxy_common::AffinityMatchKey, u8>::try_from(
        aya::maps::Map::from_map_data(data).unwrap(),
    )
    .unwrap();
    assert_eq!(m.keys().count(), 8, "the orphan went");
}

#[test]
fn the_sctp_checksum_tail_call_is_pinned_refilled_on_reload_and_a_missing_one_drops_loudly() {
    require_privileged!(
        "the_sctp_checksum_tail_call_is_pinned_refilled_on_reload_and_a_missing_one_drops_loudly"
    );
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        ..Default::default()
    };
    let (vip, backend) = ("198.18.128.1:3868", "198.19.0.20:3869");
    let (same_port, same_backend) = ("198.18.128.1:3870", "198.19.0.20:3870");
    let init = sctp(sa("198.19.0.10:40000"), sa(vip), &[1, 0, 0, 4]);
    let translated = |dp: &Dataplane| {
        let (verdict, out) = run(dp, FROM_POD, &init);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        check_sctp(&out).dst
    };
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_service(
            fe(vip, Protocol::Sctp, FrontendKind::ClusterIp),
            &[be(backend)],
        )
        .unwrap();
        dp.upsert_service(
            fe(same_port, Protocol::Sctp, FrontendKind::ClusterIp),
            &[be(same_backend)],
        )
        .unwrap();
        assert_eq!(translated(&dp), sa(backend));
    }
    let clear_slot = || {
        clear_tail_slots(
            &dir,
            proxy_common::LB4_TAILS_MAP,
            &[proxy_common::TAIL_SCTP_CHECKSUM],
        )
    };
    clear_slot();
    // A new process fills the slot again, whatever it holds.
    let dp = Dataplane::load_with(config).unwrap();
    assert_eq!(translated(&dp), sa(backend));
    // Emptied under it: the packet, whose checksum cannot be brought up to date, is dropped
    // and counted as that, not as the flow hit it also was.
    clear_slot();
    let before = dp.counters().unwrap();
    let (verdict, _) = run(&dp, FROM_POD, &init);
    assert_eq!(verdict, TC_ACT_SHOT);
    let after = dp.counters().unwrap();
    assert_eq!(
        delta(&before, &after, proxy_common::CTR_DROP_SCTP_CHECKSUM),
        1
    );
    assert_eq!(delta(&before, &after, proxy_common::CTR_CT_HIT), 0);
    assert_eq!(delta(&before, &after, proxy_common::CTR_SEEN), 1);
    // Only a packet whose ports changed needs the checksum program: pod-to-pod SCTP, and a
    // Service whose port is its target port, go on without it.
    let direct = sctp(sa("198.19.0.10:40001"), sa(backend), &[1, 0, 0, 4]);
    assert_eq!(run(&dp, FROM_POD, &direct), (TC_ACT_UNSPEC, direct.clone()));
    let (verdict, out) = run(
        &dp,
        FROM_POD,
        &sctp(sa("198.19.0.10:40002"), sa(same_port), &[1, 0, 0, 4]),
    );
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(check_sctp(&out).dst, sa(same_backend));
    let later = dp.counters().unwrap();
    assert_eq!(
        delta(&after, &later, proxy_common::CTR_DROP_SCTP_CHECKSUM),
        0
    );
    assert_eq!(
        delta(&after, &later, proxy_common::CTR_PASS_NOT_FRONTEND),
        1
    );
    assert_eq!(delta(&after, &later, proxy_common::CTR_NEW_FLOW), 1);
}

#[test]
fn the_new_flow_tail_calls_are_pinned_refilled_on_reload_and_a_missing_one_drops_loudly() {
    require_privileged!(
        "the_new_flow_tail_calls_are_pinned_refilled_on_reload_and_a_missing_one_drops_loudly"
    );
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        ..Default::default()
    };
    let (vip, external, backend) = ("198.18.128.1:80", "198.18.0.9:80", "198.19.0.20:8080");
    let pod = |port: u16| sa(&format!("198.19.0.10:{port}"));
    let outside = |port: u16| sa(&format!("198.18.1.1:{port}"));
    let new_flow = |dp: &Dataplane, program, client| {
        let dst = if program == FROM_POD { vip } else { external };
        run(dp, program, &tcp(client, sa(dst), SYN, b""))
    };
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_service(
            fe(vip, Protocol::Tcp, FrontendKind::ClusterIp),
            &[be(backend)],
        )
        .unwrap();
        dp.upsert_service(
            fe(external, Protocol::Tcp, FrontendKind::ExternalIp),
            &[be(backend)],
        )
        .unwrap();
        for (program, client) in [(FROM_POD, pod(40000)), (FROM_UPLINK, outside(40000))] {
            let (verdict, out) = new_flow(&dp, program, client);
            assert_eq!(verdict, TC_ACT_UNSPEC, "{program}");
            assert_eq!(check(&out).dst, sa(backend), "{program}");
        }
    }
    let clear_xdp_slot = || {
        clear_tail_slots(
            &dir,
            proxy_common::LB4_XDP_TAILS_MAP,
            &[proxy_common::TAIL_XDP_NEW_FLOW],
        )
    };
    let clear_slots = || {
        clear_tail_slots(
            &dir,
            proxy_common::LB4_FLOW_TAILS_MAP,
            &[
                proxy_common::TAIL_NEW_FLOW_FROM_POD,
                proxy_common::TAIL_NEW_FLOW_FROM_UPLINK,
                proxy_common::TAIL_DSR_NOTE,
            ],
        )
    };
    clear_slots();
    clear_xdp_slot();
    // A new process fills the slots again, whatever they hold.
    let dp = Dataplane::load_with(config).unwrap();
    for (program, client) in [(FROM_POD, pod(40001)), (FROM_UPLINK, outside(40001))] {
        let (verdict, out) = new_flow(&dp, program, client);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{program} after the reload");
        assert_eq!(check(&out).dst, sa(backend), "{program} after the reload");
    }
    // Another node's direct-server-return SYN to the backend here, naming the externalIP:
    // noted by its own program.
    let dsr_syn = |client| with_dsr_option(&tcp(client, sa(backend), SYN, b""), sa(external));
    let before = dp.counters().unwrap();
    let syn = dsr_syn(outside(40020));
    assert_eq!(run(&dp, FROM_UPLINK, &syn), (TC_ACT_UNSPEC, syn.clone()));
    assert_eq!(
        delta(
            &before,
            &dp.counters().unwrap(),
            proxy_common::CTR_DSR_NOTED
        ),
        1,
        "a DSR SYN noted after the reload"
    );
    // XDP's too: a new flow from outside starts at XDP; with its slot emptied, it goes to TC
    // untouched, which starts it.
    let xdp_new_flow = |client| {
        let before = dp.counters().unwrap();
        let pkt = tcp(client, sa(external), SYN, b"");
        let (verdict, out) = run_xdp(&dp, XDP_FROM_UPLINK, &pkt);
        let after = dp.counters().unwrap();
        let counted = [
            proxy_common::CTR_XDP_NEW_FLOW,
            proxy_common::CTR_XDP_TO_TC_FLOW,
        ]
        .map(|c| delta(&before, &after, c));
        (verdict, out == pkt, counted)
    };
    let (verdict, untouched, counted) = xdp_new_flow(outside(40010));
    assert_eq!(
        (verdict, untouched, counted),
        (XDP_PASS, false, [1, 0]),
        "at XDP"
    );
    clear_xdp_slot();
    let (verdict, untouched, counted) = xdp_new_flow(outside(40011));
    assert_eq!(
        (verdict, untouched, counted),
        (XDP_PASS, true, [0, 1]),
        "XDP's slot empty: to TC"
    );
    let (verdict, out) = new_flow(&dp, FROM_UPLINK, outside(40011));
    assert_eq!(
        (verdict, check(&out).dst),
        (TC_ACT_UNSPEC, sa(backend)),
        "TC starts it"
    );
    // Emptied under it: a packet that starts a flow is dropped and counted as that; the
    // packets of known flows, and those to no frontend, are served without the new-flow
    // programs.
    clear_slots();
    for (program, client) in [(FROM_POD, pod(40002)), (FROM_UPLINK, outside(40002))] {
        let before = dp.counters().unwrap();
        let (verdict, _) = new_flow(&dp, program, client);
        assert_eq!(verdict, TC_ACT_SHOT, "{program}");
        let after = dp.counters().unwrap();
        assert_eq!(
            delta(&before, &after, proxy_common::CTR_DROP_NEW_FLOW_PROGRAM),
            1,
            "{program}"
        );
        assert_eq!(delta(&before, &after, proxy_common::CTR_NEW_FLOW), 0);
        assert_eq!(delta(&before, &after, proxy_common::CTR_SEEN), 1);
    }
    let before = dp.counters().unwrap();
    assert_eq!(
        run(&dp, FROM_UPLINK, &dsr_syn(outside(40021))).0,
        TC_ACT_SHOT
    );
    let after = dp.counters().unwrap();
    assert_eq!(
        [
            proxy_common::CTR_DROP_NEW_FLOW_PROGRAM,
            proxy_common::CTR_DSR_NOTED
        ]
        .map(|c| delta(&before, &after, c)),
        [1, 0],
        "a DSR SYN without its program"
    );
    let before = dp.counters().unwrap();
    let (verdict, out) = run(&dp, FROM_POD, &tcp(pod(40001), sa(vip), ACK, b""));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(check(&out).dst, sa(backend), "a known flow goes on");
    let other_port = tcp(outside(40003), sa("198.18.0.9:22"), SYN, b"");
    assert_eq!(
        run(&dp, FROM_UPLINK, &other_port),
        (TC_ACT_UNSPEC, other_port.clone()),
        "another port of a frontend's address passes untouched"
    );
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, proxy_common::CTR_CT_HIT), 1);
    // Passed by the address's port filter, before any lookup.
    assert_eq!(
        delta(&before, &after, proxy_common::CTR_PASS_NOT_FRONTEND_PORT),
        1
    );
    assert_eq!(
        delta(&before, &after, proxy_common::CTR_DROP_NEW_FLOW_PROGRAM),
        0
    );
}

/// Empties `slots` of the program array pinned as `map` under `dir`, as a crashed or older
/// agent could leave them.
fn clear_tail_slots(dir: &std::path::Path, map: &str, slots: &[u32]) {
    let data = aya::maps::MapData::from_pin(dir.join(map)).unwrap();
    let mut tails =
        aya::maps::ProgramArray::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    for slot in slots {
        tails.clear_index(slot).unwrap();
    }
}

/// A ClusterIP frontend, 198.18.128.1:80/TCP.
fn web() -> Frontend {
    Frontend {
        addr: "198.18.128.1".parse().unwrap(),
        port: 80,
        proto: Protocol::Tcp,
        kind: FrontendKind::ClusterIp,
    }
}

/// `n` local backends, 198.19.0.20:8080 and up.
fn pods(n: u8) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            addr: std::net::Ipv4Addr::new(198, 19, 0, 20 + i),
            port: 8080,
            local: true,
        })
        .collect()
}

/// Opens a TCP flow from each client to `frontend` through a pod's programs (SYN, the
/// backend's SYN-ACK, ACK: established); returns each flow's backend.
fn open_flows(
    dp: &Dataplane,
    clients: &[SocketAddrV4],
    frontend: SocketAddrV4,
) -> Vec<SocketAddrV4> {
    clients
        .iter()
        .map(|&c| {
            let (_, out) = run(dp, FROM_POD, &tcp(c, frontend, SYN, b""));
            let backend = check(&out).dst;
            run(dp, TO_POD, &tcp(backend, c, SYN_ACK, b""));
            run(dp, FROM_POD, &tcp(c, frontend, ACK, b""));
            backend
        })
        .collect()
}

/// Each flow's next packet goes to the backend it had, and its reply comes from `frontend`.
fn flows_go_on(
    dp: &Dataplane,
    clients: &[SocketAddrV4],
    frontend: SocketAddrV4,
    backends: &[SocketAddrV4],
) {
    for (&c, &backend) in clients.iter().zip(backends) {
        let (_, out) = run(dp, FROM_POD, &tcp(c, frontend, ACK, b"more"));
        assert_eq!(check(&out).dst, backend, "flow from {c} kept its backend");
        let (_, out) = run(dp, TO_POD, &tcp(backend, c, ACK, b"reply"));
        assert_eq!(
            check(&out).src,
            frontend,
            "and its replies from {backend} come from the Service"
        );
    }
}

/// The size of the map pinned at `dir/map`.
fn pinned_size(dir: &std::path::Path, map: &str) -> u32 {
    aya::maps::MapData::from_pin(dir.join(map))
        .unwrap_or_else(|e| panic!("{map} is pinned: {e}"))
        .info()
        .unwrap()
        .max_entries()
}

/// Pins a resize set aside and has not removed yet.
fn set_aside_pins(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("_resizing"))
        .collect();
    names.sort();
    names
}

/// An operator raises `--conntrack-max` (and the other sizes) and restarts the agent: the
/// kernel cannot resize a map and the loader refuses a pin of another size, so the new
/// maps are made at the new size and filled from the old ones. Services, ids and flows go on.
#[test]
fn changing_map_sizes_keeps_the_pinned_services_and_flows() {
    require_privileged!("changing_map_sizes_keeps_the_pinned_services_and_flows");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let small = DataplaneConfig {
        pin_path: Some(dir.clone()),
        services_max: 64,
        backends_max: 64,
        revnat_max: 64,
        conntrack_max: 1024,
        conntrack_new_max: 512,
        sock_revnat_max: 256,
        ..Default::default()
    };
    let vip = web();
    let backends = pods(4);
    let frontend = sa("198.18.128.1:80");
    let clients: Vec<_> = (0..16u16)
        .map(|i| sa(&format!("198.19.0.10:{}", 40000 + i)))
        .collect();
    // Each flow's backend, and one flow left half-open (in CT4_NEW).
    let (chosen, half_open) = {
        let mut dp = Dataplane::load_with(small.clone()).unwrap();
        dp.upsert_service(vip, &backends).unwrap();
        let chosen = open_flows(&dp, &clients, frontend);
        let c = sa("198.19.0.11:40000");
        let (_, out) = run(&dp, FROM_POD, &tcp(c, frontend, SYN, b""));
        let ct = dp.conntrack().unwrap();
        assert_eq!(
            ct.iter().filter(|e| !e.new).count(),
            2 * clients.len(),
            "established: {ct:?}"
        );
        assert_eq!(ct.iter().filter(|e| e.new).count(), 2, "half-open: {ct:?}");
        (chosen, (c, check(&out).dst))
    };

    let big = DataplaneConfig {
        services_max: 128,
        backends_max: 256,
        revnat_max: 128,
        conntrack_max: 4096,
        conntrack_new_max: 2048,
        sock_revnat_max: 512,
        ..small.clone()
    };
    let mut dp = Dataplane::load_with(big.clone())
        .unwrap_or_else(|e| panic!("a restart with bigger maps loads: {e}"));
    for (map, max) in big.map_sizes() {
        assert_eq!(
            pinned_size(&dir, map),
            max,
            "{map} is pinned at its new size"
        );
    }
    let services = dp.services();
    assert_eq!(
        services.len(),
        1,
        "the Service was carried over: {services:?}"
    );
    assert_eq!(services[0].1.all, backends, "with its backends");
    let ct = dp.conntrack().unwrap();
    assert_eq!(
        ct.len(),
        2 * clients.len() + 2,
        "every conntrack entry was carried over: {ct:?}"
    );
    flows_go_on(&dp, &clients, frontend, &chosen);
    let (c, backend) = half_open;
    let (_, out) = run(&dp, TO_POD, &tcp(backend, c, SYN_ACK, b""));
    assert_eq!(
        check(&out).src,
        frontend,
        "the half-open flow's SYN-ACK is translated"
    );
    // New writes use the adopted ids: a second Service gets its own.
    let vip2 = Frontend {
        addr: "198.18.128.2".parse().unwrap(),
        ..vip
    };
    dp.upsert_service(vip2, &backends[..1]).unwrap();
    let (_, out) = run(
        &dp,
        FROM_POD,
        &tcp(clients[0], sa("198.18.128.2:80"), SYN, b""),
    );
    assert_eq!(check(&out).dst, sa("198.19.0.20:8080"));
    assert_eq!(dp.services().len(), 2);

    assert!(
        !set_aside_pins(&dir).is_empty(),
        "the old maps wait for finish_resize"
    );
    let copied = dp.finish_resize().unwrap();
    assert_eq!(copied.lost, 0, "{copied:?}");
    assert_eq!(
        set_aside_pins(&dir),
        Vec::<String>::new(),
        "finish_resize removed the old pins"
    );
    assert!(!dp.resizing());
    drop(dp);
    // And the next start with the same sizes finds nothing to resize.
    let dp = Dataplane::load_with(big).unwrap();
    assert!(!dp.resizing(), "same sizes: nothing to resize");
    assert_eq!(dp.services().len(), 2);
}

/// Between the new agent's load and its programs replacing the old ones on every device, the
/// old programs go on changing the old maps: opening flows, moving flows to the established
/// table. `finish_resize` applies those changes too, but never undoes the new agent's own: a
/// flow it forgot stays forgotten.
#[test]
fn what_the_old_programs_change_during_a_resize_is_carried_over_and_nothing_comes_back() {
    require_privileged!(
        "what_the_old_programs_change_during_a_resize_is_carried_over_and_nothing_comes_back"
    );
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let old_config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        conntrack_max: 1024,
        conntrack_new_max: 1024,
        ..Default::default()
    };
    let vip = web();
    let backends = pods(4);
    let frontend = sa("198.18.128.1:80");
    let dns = Frontend {
        addr: "198.18.128.2".parse().unwrap(),
        port: 53,
        proto: Protocol::Udp,
        kind: FrontendKind::ClusterIp,
    };
    let dns_backend = sa("198.19.0.30:5353");
    let mut old = Dataplane::load_with(old_config.clone()).unwrap();
    old.upsert_service(vip, &backends).unwrap();
    old.upsert_service(
        dns,
        &[Backend {
            addr: *dns_backend.ip(),
            port: 5353,
            local: true,
        }],
    )
    .unwrap();
    let stats = Frontend {
        addr: "198.18.128.3".parse().unwrap(),
        ..dns
    };
    old.upsert_service(
        stats,
        &[Backend {
            addr: "198.19.0.31".parse().unwrap(),
            port: 5353,
            local: true,
        }],
    )
    .unwrap();
    // Before the new load: a half-open TCP flow, a UDP flow, and a one-way UDP flow.
    let sender = sa("198.19.0.11:42002");
    let metric = udp(sender, sa("198.18.128.3:53"), b"m");
    run(&old, FROM_POD, &metric);
    let half = sa("198.19.0.11:42000");
    let (_, out) = run(&old, FROM_POD, &tcp(half, frontend, SYN, b""));
    let half_backend = check(&out).dst;
    let udp_client = sa("198.19.0.11:42001");
    run(
        &old,
        FROM_POD,
        &udp(udp_client, sa("198.18.128.2:53"), b"q"),
    );

    let mut new = Dataplane::load_with(DataplaneConfig {
        conntrack_max: 2048,
        conntrack_new_max: 2048,
        ..old_config
    })
    .unwrap();
    assert_eq!(
        new.conntrack().unwrap().len(),
        6,
        "the load copied the three flows"
    );
    // The new agent forgets the UDP flow (its backend went).
    let target = sluice::dataplane::socket::SocketTarget {
        frontend: sluice::dataplane::FrontendId {
            addr: dns.addr,
            port: 53,
            proto: Protocol::Udp,
        },
        backend: (*dns_backend.ip(), dns_backend.port()),
    };
    assert_eq!(
        new.forget_udp_flows(&[target].into_iter().collect())
            .unwrap(),
        1,
        "one flow forgotten"
    );
    // The old programs, still attached, open flows in the old tables and establish the
    // half-open one (moving it from the old CT4_NEW to the old CT4).
    let clients: Vec<_> = (0..8u16)
        .map(|i| sa(&format!("198.19.0.10:{}", 41000 + i)))
        .collect();
    let chosen = open_flows(&old, &clients, frontend);
    run(&old, TO_POD, &tcp(half_backend, half, SYN_ACK, b""));
    run(&old, FROM_POD, &tcp(half, frontend, ACK, b""));
    // The one-way flow's next datagram: its entry changes (packets, bytes, time).
    run(&old, FROM_POD, &metric);
    assert_eq!(
        new.conntrack().unwrap().len(),
        4,
        "not in the new tables yet"
    );

    let copied = new.finish_resize().unwrap();
    // Load: the 6 entries of the three flows. Since: 16 entries of the new flows, the
    // half-open flow's 2 moved to CT4 (written) and deleted from CT4_NEW, and the one-way
    // flow's 2 changed entries (its datagram counted, its reverse entry kept alive: written);
    // the UDP flow's 2 entries the old maps still hold are left forgotten.
    assert_eq!(
        (copied.written, copied.deleted, copied.lost),
        (6 + 2 * clients.len() + 2 + 2, 2, 0),
        "{copied:?}"
    );
    drop(old);
    let ct = new.conntrack().unwrap();
    assert!(
        !ct.iter()
            .any(|e| e.src == udp_client || e.dst == udp_client),
        "the flow the new agent forgot stays forgotten: {ct:?}"
    );
    let half_entries: Vec<bool> = ct.iter().filter(|e| e.src == half).map(|e| e.new).collect();
    assert_eq!(
        half_entries,
        [false, false],
        "the flow the old programs established is in CT4 only: {ct:?}"
    );
    let one_way = ct
        .iter()
        .find(|e| e.src == sender && e.dst == sa("198.18.128.3:53"))
        .expect("the one-way flow's service entry");
    assert_eq!(
        one_way.entry.packets, 2,
        "the change the old programs made is in the new table: {one_way:?}"
    );
    flows_go_on(&new, &clients, frontend, &chosen);
    flows_go_on(&new, &[half], frontend, &[half_backend]);
}

/// The reason to raise `--conntrack-max`: the old table is full, and evicts its least recently
/// used flows to make room for new ones, also while the new agent is taking over. A flow the
/// old table evicted after the load's copy is not gone: it stays in the new, bigger table.
#[test]
fn flows_the_old_table_evicts_during_a_resize_stay_in_the_new_one() {
    require_privileged!("flows_the_old_table_evicts_during_a_resize_stay_in_the_new_one");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let old_config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        conntrack_new_max: 512,
        ..Default::default()
    };
    let frontend = sa("198.18.128.1:80");
    let backend = sa("198.19.0.20:8080");
    let client = |port: u16| sa(&format!("198.19.0.10:{port}"));
    let syn = |port: u16| tcp(client(port), frontend, SYN, b"");
    let syn_ack = |port: u16| tcp(backend, client(port), SYN_ACK, b"");
    let mut old = Dataplane::load_with(old_config.clone()).unwrap();
    old.upsert_service(web(), &pods(1)).unwrap();
    // 100 half-open flows (200 entries) in a table of 512.
    for port in 30_000..30_100 {
        run(&old, FROM_POD, &syn(port));
    }
    let mut new = Dataplane::load_with(DataplaneConfig {
        conntrack_new_max: 8192,
        ..old_config
    })
    .unwrap();
    // The old programs go on: 1,000 more half-open flows evict the first ones from the old
    // table.
    for port in 31_000..32_000 {
        run(&old, FROM_POD, &syn(port));
    }
    let ct = old.conntrack().unwrap();
    let still_old = (30_000..30_100u16)
        .filter(|&p| ct.iter().any(|e| e.src == client(p)))
        .count();
    assert!(
        still_old < 100,
        "the old table evicted some of the first flows: {still_old} of 100 left"
    );
    let copied = new.finish_resize().unwrap();
    drop(old);
    for port in 30_000..30_100u16 {
        let (_, out) = run(&new, TO_POD, &syn_ack(port));
        assert_eq!(
            check(&out).src,
            frontend,
            "flow {}, evicted from the old table, is still in the new one ({copied:?})",
            client(port)
        );
    }
}

/// An agent that dies between its load and `finish_resize` leaves the old maps' pins. The next
/// start (here with yet another size) takes them as well as its predecessor's maps, newest
/// first: where both have an entry, the newer one wins, and every old pin goes at the end.
#[test]
fn a_resize_left_unfinished_is_finished_by_the_next_start_newest_first() {
    require_privileged!("a_resize_left_unfinished_is_finished_by_the_next_start_newest_first");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let sized = |ct: u32| DataplaneConfig {
        pin_path: Some(dir.clone()),
        conntrack_max: ct,
        conntrack_new_max: ct,
        ..Default::default()
    };
    let dns = Frontend {
        addr: "198.18.128.2".parse().unwrap(),
        port: 53,
        proto: Protocol::Udp,
        kind: FrontendKind::ClusterIp,
    };
    let (x, y) = (sa("198.19.0.30:5353"), sa("198.19.0.31:5353"));
    let pod = |a: SocketAddrV4| Backend {
        addr: *a.ip(),
        port: a.port(),
        local: true,
    };
    let client = sa("198.19.0.11:42001");
    let query = udp(client, sa("198.18.128.2:53"), b"q");
    {
        let mut gen0 = Dataplane::load_with(sized(1024)).unwrap();
        gen0.upsert_service(dns, &[pod(x)]).unwrap();
        let (_, out) = run(&gen0, FROM_POD, &query);
        assert_eq!(check(&out).dst, x);
    }
    {
        // Resizes, then moves the Service to y: the client's flow is forgotten and opened
        // again, to y. Then it dies before finish_resize.
        let mut gen1 = Dataplane::load_with(sized(2048)).unwrap();
        assert!(gen1.resizing());
        gen1.upsert_service(dns, &[pod(y)]).unwrap();
        let target = sluice::dataplane::socket::SocketTarget {
            frontend: sluice::dataplane::FrontendId {
                addr: dns.addr,
                port: 53,
                proto: Protocol::Udp,
            },
            backend: (*x.ip(), x.port()),
        };
        gen1.forget_udp_flows(&[target].into_iter().collect())
            .unwrap();
        let (_, out) = run(&gen1, FROM_POD, &query);
        assert_eq!(check(&out).dst, y);
    }
    assert!(
        set_aside_pins(&dir).len() >= 2,
        "gen0's maps are still set aside: {:?}",
        set_aside_pins(&dir)
    );
    let mut gen2 = Dataplane::load_with(sized(4096)).unwrap();
    let (_, out) = run(&gen2, FROM_POD, &query);
    assert_eq!(
        check(&out).dst,
        y,
        "the newer entry (gen1's) won over the older one (gen0's)"
    );
    gen2.finish_resize().unwrap();
    assert_eq!(
        set_aside_pins(&dir),
        Vec::<String>::new(),
        "every old pin is gone"
    );
    assert_eq!(pinned_size(&dir, CT4_MAP), 4096);
    let (_, out) = run(&gen2, FROM_POD, &query);
    assert_eq!(check(&out).dst, y);
}

/// Shrinking a map below what it holds would drop Services or ids: the load refuses, says
/// what to do, and changes nothing, so the maps pinned before go on serving.
#[test]
fn shrinking_a_map_below_what_it_holds_is_refused_and_changes_nothing() {
    require_privileged!("shrinking_a_map_below_what_it_holds_is_refused_and_changes_nothing");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        services_max: 64,
        conntrack_max: 1024,
        ..Default::default()
    };
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        for i in 1..=3 {
            let vip = Frontend {
                addr: std::net::Ipv4Addr::new(198, 18, 128, i),
                port: 80,
                proto: Protocol::Tcp,
                kind: FrontendKind::ClusterIp,
            };
            dp.upsert_service(
                vip,
                &[Backend {
                    addr: "198.19.0.20".parse().unwrap(),
                    port: 8080,
                    local: true,
                }],
            )
            .unwrap();
        }
    }
    let err = Dataplane::load_with(DataplaneConfig {
        services_max: 2,
        // A change that alone would be carried over: it must not be begun either.
        conntrack_max: 2048,
        ..config.clone()
    })
    .err()
    .expect("a Service map too small for its Services is refused");
    let msg = err.to_string();
    assert!(
        // Each Service is two entries: its frontend and its one backend's slot.
        matches!(
            err,
            sluice::dataplane::DataplaneError::ResizeTooSmall {
                held: 6,
                max: 2,
                was: 64,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("nothing was changed") && msg.contains("at least 6"),
        "{msg}"
    );
    assert_eq!(
        pinned_size(&dir, "LB4_SERVICES"),
        64,
        "the pinned map is untouched"
    );
    assert_eq!(pinned_size(&dir, CT4_MAP), 1024, "and so is every other");
    assert_eq!(
        set_aside_pins(&dir),
        Vec::<String>::new(),
        "nothing was set aside"
    );
    let dp = Dataplane::load_with(config).unwrap();
    assert_eq!(dp.services().len(), 3, "the Services are all there");
}

/// An LRU table (conntrack) shrunk below what it holds keeps what fits, as under load, and
/// reports how many entries it lost: an operator can shrink it without stopping the agent.
#[test]
fn shrinking_conntrack_below_its_flows_keeps_what_fits_and_counts_the_rest() {
    require_privileged!("shrinking_conntrack_below_its_flows_keeps_what_fits_and_counts_the_rest");
    let fs = BpfFs::new().unwrap();
    let dir = fs.path().join("sluice");
    let config = DataplaneConfig {
        pin_path: Some(dir.clone()),
        conntrack_new_max: 4096,
        ..Default::default()
    };
    let vip = web();
    let backend = Backend {
        addr: "198.19.0.20".parse().unwrap(),
        port: 8080,
        local: true,
    };
    let flows = 1024u16;
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_service(vip, &[backend]).unwrap();
        for i in 0..flows {
            run(
                &dp,
                FROM_POD,
                &tcp(
                    sa(&format!("198.19.0.10:{}", 30000 + i)),
                    sa("198.18.128.1:80"),
                    SYN,
                    b"",
                ),
            );
        }
        assert_eq!(dp.conntrack().unwrap().len(), 2 * usize::from(flows));
    }
    let mut dp = Dataplane::load_with(DataplaneConfig {
        conntrack_new_max: 1024,
        ..config
    })
    .unwrap_or_else(|e| panic!("shrinking conntrack is not refused: {e}"));
    let copied = dp.finish_resize().unwrap();
    let held = dp.conntrack().unwrap().len();
    assert!(
        held <= 1024 && held > 0,
        "the shrunk table holds what fits: {held} of {} entries",
        2 * flows
    );
    assert_eq!(
        copied.lost + held,
        2 * usize::from(flows),
        "what did not fit is counted: {copied:?}"
    );
    assert_eq!(pinned_size(&dir, "CT4_NEW"), 1024);
}
