//! Pinned maps outlive the process that made them: a new `Dataplane` on the same pin path
//! adopts the Services, ids and conntrack entries the last one wrote.
mod common;

use common::*;
use proxy_common::CT4_MAP;
use sluice::dataplane::{
    Backend, Dataplane, DataplaneConfig, FROM_POD, Frontend, FrontendKind, Protocol,
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
