//! The egress filter on pod clients (`LB4_POD_CLIENTS`): a packet into a pod whose address was
//! never the client of a flow translated at TC passes with no conntrack lookup (plain pod
//! traffic, and every connection socket LB translated at connect()), and yet no reply of a
//! translated flow goes untranslated: not after an agent adopts pins without the map, not when
//! the map is full. The real programs, through BPF_PROG_TEST_RUN.
mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use proxy_common::*;
use sluice::dataplane::{
    Backend, Dataplane, DataplaneConfig, FROM_POD, Frontend, FrontendKind, Protocol, TO_POD,
};
use testbed::{BpfFs, require_privileged};

const VIP: &str = "198.18.128.1:80";
const CLIENT: &str = "198.19.0.10:40000";
const BACKEND: &str = "198.19.0.20:8080";

fn config(pin_path: Option<std::path::PathBuf>) -> DataplaneConfig {
    DataplaneConfig {
        pin_path,
        conntrack_max: 4096,
        ..Default::default()
    }
}

fn service(dp: &mut Dataplane) {
    let vip = sa(VIP);
    let be = sa(BACKEND);
    dp.upsert_service(
        Frontend {
            addr: *vip.ip(),
            port: vip.port(),
            proto: Protocol::Tcp,
            kind: FrontendKind::ClusterIp,
        },
        &[Backend {
            addr: *be.ip(),
            port: be.port(),
            local: true,
        }],
    )
    .unwrap();
}

/// The backend's SYN-ACK to the client, as it reaches the client pod's egress.
fn reply() -> Vec<u8> {
    tcp(sa(BACKEND), sa(CLIENT), SYN_ACK, b"")
}

/// Runs the reply through `sluice_to_pod`: where its source went, and which of the two
/// pass-counters (filtered on the address, or looked up and not found) moved.
fn reply_at_egress(dp: &Dataplane) -> (SocketAddrV4, u64, u64) {
    let before = dp.counters().unwrap();
    let (verdict, out) = run(dp, TO_POD, &reply());
    assert_eq!(verdict, TC_ACT_UNSPEC);
    let after = dp.counters().unwrap();
    (
        check(&out).src,
        delta(&before, &after, CTR_PASS_NOT_POD_CLIENT),
        delta(&before, &after, CTR_PASS_NO_MATCH),
    )
}

#[test]
fn a_packet_into_a_pod_is_looked_up_only_once_the_pod_was_a_client_at_tc() {
    require_privileged!("a_packet_into_a_pod_is_looked_up_only_once_the_pod_was_a_client_at_tc");
    let mut dp = Dataplane::load_with(config(None)).unwrap();
    service(&mut dp);
    // The backend's packet to a pod that never called a Service through TC (as a client whose
    // connect() socket LB translated): passed on the address, untouched.
    assert_eq!(reply_at_egress(&dp), (sa(BACKEND), 1, 0));
    assert_eq!(dp.pod_clients().unwrap(), (vec![], false));

    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    assert_eq!(
        dp.pod_clients().unwrap(),
        (vec![*sa(CLIENT).ip()], false),
        "the new flow's client is noted"
    );
    assert_eq!(
        reply_at_egress(&dp).0,
        sa(VIP),
        "its reply is looked up and translated"
    );
    // Another pod's packets into the client (not a reply): looked up, found nothing.
    let before = dp.counters().unwrap();
    let other = tcp(sa("198.19.0.30:5000"), sa(CLIENT), SYN, b"");
    assert_eq!(run(&dp, TO_POD, &other), (TC_ACT_UNSPEC, other));
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_NO_MATCH), 1);
}

#[test]
fn pins_without_the_client_map_turn_the_filter_off() {
    require_privileged!("pins_without_the_client_map_turn_the_filter_off");
    let fs = BpfFs::new().unwrap();
    let pins = fs.path().join("sluice");
    {
        let mut dp = Dataplane::load_with(config(Some(pins.clone()))).unwrap();
        service(&mut dp);
        run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    }
    // An agent of the layout before the map: its pins have neither of the two, and its
    // programs, which note no client, run until the new agent's replace them. So the filter
    // is off from the start: flows those programs make meanwhile are in no map.
    std::fs::remove_file(pins.join(LB4_POD_CLIENTS_MAP)).unwrap();
    std::fs::remove_file(pins.join(LB4_DP_STATE_MAP)).unwrap();
    let dp = Dataplane::load_with(config(Some(pins))).unwrap();
    assert_eq!(dp.pod_clients().unwrap(), (vec![], true));
    assert_eq!(
        reply_at_egress(&dp).0,
        sa(VIP),
        "the live flow's reply is looked up and translated"
    );
}

#[test]
fn a_full_client_map_turns_the_filter_off_and_leaves_no_reply_untranslated() {
    require_privileged!("a_full_client_map_turns_the_filter_off_and_leaves_no_reply_untranslated");
    let fs = BpfFs::new().unwrap();
    let pins = fs.path().join("sluice");
    let mut dp = Dataplane::load_with(config(Some(pins.clone()))).unwrap();
    service(&mut dp);
    // Fill the map to its size with addresses no pod of this test has.
    {
        let data = aya::maps::MapData::from_pin(pins.join(LB4_POD_CLIENTS_MAP)).unwrap();
        let mut map: aya::maps::HashMap<_, u32, u32> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
        let base = u32::from(Ipv4Addr::new(198, 19, 128, 0));
        for i in 0..LB4_POD_CLIENTS_DEFAULT_MAX {
            map.insert(&(base + i).to_be(), &1, 0).unwrap();
        }
    }
    let before = dp.counters().unwrap();
    run(&dp, FROM_POD, &tcp(sa(CLIENT), sa(VIP), SYN, b""));
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_NEW_FLOW), 1, "the flow is made");
    assert_eq!(
        delta(&before, &after, CTR_POD_CLIENTS_FULL),
        1,
        "and the full map counted"
    );
    let (clients, full) = dp.pod_clients().unwrap();
    assert!(full, "the filter is off");
    assert!(!clients.contains(sa(CLIENT).ip()));
    assert_eq!(
        reply_at_egress(&dp),
        (sa(VIP), 0, 0),
        "the reply is looked up and translated all the same"
    );
    // A packet to an address not in the map is looked up too, now.
    let other = tcp(sa(BACKEND), sa("198.19.0.11:40000"), SYN_ACK, b"");
    let before = dp.counters().unwrap();
    run(&dp, TO_POD, &other);
    let after = dp.counters().unwrap();
    assert_eq!(delta(&before, &after, CTR_PASS_NO_MATCH), 1);
    assert_eq!(delta(&before, &after, CTR_PASS_NOT_POD_CLIENT), 0);
    // A restarted agent keeps the filter off (the flag is pinned).
    drop(dp);
    let dp = Dataplane::load_with(config(Some(pins))).unwrap();
    assert!(dp.pod_clients().unwrap().1);
}
