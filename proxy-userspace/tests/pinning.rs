//! Pinned maps outlive the process that made them: a new `Dataplane` on the same pin path
//! adopts the Services, ids and conntrack entries the last one wrote.
mod common;

use common::*;
use proxy_common::CT4_MAP;
use sluice::dataplane::{
    Backend, Dataplane, DataplaneConfig, FROM_POD, FROM_UPLINK, Frontend, FrontendKind, Protocol,
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
    };
    {
        let mut dp = Dataplane::load_with(config.clone()).unwrap();
        dp.upsert_frontend(np, &want).unwrap();
    }
    let mut dp = Dataplane::load_with(config).unwrap();
    assert_eq!(
        dp.services(),
        vec![(np, want.clone())],
        "both lists adopted"
    );
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
    };
    dp.upsert_frontend(np, &grown).unwrap();
    assert_eq!(dp.services(), vec![(np, grown.clone())]);
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
    let clear_slots = || {
        clear_tail_slots(
            &dir,
            proxy_common::LB4_FLOW_TAILS_MAP,
            &[
                proxy_common::TAIL_NEW_FLOW_FROM_POD,
                proxy_common::TAIL_NEW_FLOW_FROM_UPLINK,
            ],
        )
    };
    clear_slots();
    // A new process fills the slots again, whatever they hold.
    let dp = Dataplane::load_with(config).unwrap();
    for (program, client) in [(FROM_POD, pod(40001)), (FROM_UPLINK, outside(40001))] {
        let (verdict, out) = new_flow(&dp, program, client);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{program} after the reload");
        assert_eq!(check(&out).dst, sa(backend), "{program} after the reload");
    }
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
    assert_eq!(delta(&before, &after, proxy_common::CTR_PASS_NO_MATCH), 1);
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
