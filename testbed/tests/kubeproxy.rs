//! kube-proxy's rule sets load as kube-proxy loads them, each into a namespace of its own:
//! `iptables-restore --noflush --counters` for the iptables mode, `nft -f` for nftables. A
//! change to one Service then leaves the kernel as kube-proxy's partial sync leaves it.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use testbed::{
    Netns,
    kubeproxy::{Protocol, ProxyConfig, ServicePort, iptables, nftables},
    require_privileged,
};

const CFG: ProxyConfig = ProxyConfig {
    cluster_cidr: (Ipv4Addr::new(198, 19, 0, 0), 16),
    service_cidr: (Ipv4Addr::new(198, 18, 128, 0), 18),
    node_ip: Ipv4Addr::new(198, 18, 0, 10),
};

/// kube-proxy's invocation, without its lock-wait flags.
const IPTABLES_RESTORE: [&str; 3] = [
    "iptables-restore",
    iptables::RESTORE_FLAGS[0],
    iptables::RESTORE_FLAGS[1],
];

/// How kube-proxy (through knftables) loads a transaction.
const NFT: [&str; 3] = ["nft", "-f", "-"];

/// `n` Services bench/svc<i>:http on ClusterIPs from 198.18.128.1, three endpoints each.
fn services(n: u8) -> Vec<ServicePort> {
    (0..n)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc{i}"),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 1)) + u32::from(i)),
            port: 80,
            node_port: None,
            endpoints: (0..3)
                .map(|k| SocketAddrV4::new(Ipv4Addr::new(198, 19, i, 10 + k), 8080))
                .collect(),
        })
        .collect()
}

/// `old` with service 7's last endpoint replaced by 198.19.7.20:8080.
fn with_one_endpoint_replaced(old: &[ServicePort]) -> Vec<ServicePort> {
    let mut new = old.to_vec();
    new[7].endpoints[2] = SocketAddrV4::new(Ipv4Addr::new(198, 19, 7, 20), 8080);
    new
}

/// Pipes `text` to `argv` inside `ns`, as kube-proxy feeds its restores.
fn load(ns: &Netns, argv: &[&str], text: &str) {
    if let Err(e) = ns.exec_with_input(argv, text, Duration::from_secs(60)) {
        panic!(
            "`{}` did not accept kube-proxy's rules: {e}",
            argv.join(" ")
        );
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn iptables_rules_load_and_a_partial_sync_replaces_the_stale_endpoint_chain() {
    require_privileged!("iptables_rules_load_and_a_partial_sync_replaces_the_stale_endpoint_chain");
    let ns = Netns::new("kp").expect("create the namespace");
    let old = services(100);
    load(
        &ns,
        &["iptables-restore", "--noflush"],
        &iptables::bootstrap(),
    );
    load(&ns, &IPTABLES_RESTORE, &iptables::full_restore(&CFG, &old));

    let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap();
    assert_eq!(
        count(&nat, ":KUBE-SVC-"),
        100,
        "one KUBE-SVC chain per service:\n{nat}"
    );
    assert_eq!(
        count(&nat, ":KUBE-SEP-"),
        300,
        "one KUBE-SEP chain per endpoint"
    );
    for jump in [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ] {
        assert!(
            nat.contains(jump),
            "expected the jump `{jump}` in nat:\n{nat}"
        );
    }
    let filter = ns.exec(&["iptables-save", "-t", "filter"]).unwrap();
    assert!(
        filter.contains(
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
        ),
        "expected FORWARD to jump to KUBE-FORWARD:\n{filter}"
    );

    let new = with_one_endpoint_replaced(&old);
    load(
        &ns,
        &IPTABLES_RESTORE,
        &iptables::partial_restore(&CFG, &new, &old[7], &new[7]),
    );
    let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap();
    let stale = iptables::endpoint_chain(&old[7], old[7].endpoints[2]);
    let fresh = iptables::endpoint_chain(&new[7], new[7].endpoints[2]);
    assert!(
        !nat.contains(&stale),
        "the stale chain {stale} is still there:\n{nat}"
    );
    assert!(
        nat.contains(&format!(":{fresh} - ")) && nat.contains("--to-destination 198.19.7.20:8080"),
        "expected {fresh} to DNAT to 198.19.7.20:8080:\n{nat}"
    );
    let svc7 = iptables::service_chain(&new[7]);
    assert!(
        nat.lines()
            .any(|l| l.starts_with(&format!("-A {svc7} ")) && l.ends_with(&format!("-j {fresh}"))),
        "expected {svc7} to jump to {fresh}:\n{nat}"
    );
    assert_eq!(
        count(&nat, ":KUBE-SEP-"),
        300,
        "the other services' chains stay"
    );
    assert!(
        nat.contains("--to-destination 198.19.3.12:8080"),
        "service 3 was not rewritten and still DNATs:\n{nat}"
    );
}

#[test]
fn nftables_rules_load_and_a_change_flushes_then_deletes_the_stale_endpoint_chain() {
    require_privileged!(
        "nftables_rules_load_and_a_change_flushes_then_deletes_the_stale_endpoint_chain"
    );
    let ns = Netns::new("kp").expect("create the namespace");
    let old = services(100);
    load(&ns, &NFT, &nftables::full(&CFG, &old));

    let ruleset = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    // Service chains carry "/" (ns/name/protocol/port); "service-endpoints-check" does not.
    let service_chains = ruleset
        .lines()
        .filter(|l| l.contains("chain service-") && l.contains('/'))
        .count();
    assert_eq!(service_chains, 100, "one chain per service:\n{ruleset}");
    assert_eq!(
        count(&ruleset, "chain endpoint-"),
        300,
        "one chain per endpoint"
    );
    assert!(
        ruleset.contains("198.18.128.8 . tcp . 80 : goto service-"),
        "expected service 7's element in service-ips:\n{ruleset}"
    );

    let new = with_one_endpoint_replaced(&old);
    load(&ns, &NFT, &nftables::change(&CFG, &old[7], &new[7]));
    let stale = nftables::endpoint_chain(&old[7], old[7].endpoints[2]);
    let fresh = nftables::endpoint_chain(&new[7], new[7].endpoints[2]);
    let chain = |name: &str| ns.exec(&["nft", "list", "chain", "ip", "kube-proxy", name]);
    let stale_rules = chain(&stale).expect("the stale chain stays until the next sync");
    assert!(
        !stale_rules.contains("dnat"),
        "the stale chain {stale} should be flushed:\n{stale_rules}"
    );
    let fresh_rules = chain(&fresh).expect("the new endpoint's chain exists");
    assert!(
        fresh_rules.contains("dnat to 198.19.7.20:8080"),
        "expected {fresh} to DNAT to 198.19.7.20:8080:\n{fresh_rules}"
    );
    let service_rules = chain(&nftables::service_chain(&new[7])).unwrap();
    assert!(
        service_rules.contains(&format!("goto {fresh}")) && !service_rules.contains(&stale),
        "expected the service chain to dispatch to {fresh} and not to {stale}:\n{service_rules}"
    );

    load(&ns, &NFT, &nftables::delete_stale(&old[7], &new[7]));
    let ruleset = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    assert!(
        !ruleset.contains(&stale),
        "{stale} should be deleted:\n{ruleset}"
    );
    assert_eq!(
        count(&ruleset, "chain endpoint-"),
        300,
        "the other endpoint chains stay"
    );

    load(&ns, &NFT, &nftables::teardown());
    let tables = ns.exec(&["nft", "list", "tables"]).unwrap();
    assert!(
        !tables.contains("kube-proxy"),
        "the table should be gone:\n{tables}"
    );
}

/// `services(n)` as NodePort Services (nodePort 30000 + i), plus bench/empty:http, a NodePort
/// Service (nodePort 30999) with no endpoints.
fn nodeport_services(n: u8) -> Vec<ServicePort> {
    let mut v: Vec<ServicePort> = services(n)
        .into_iter()
        .enumerate()
        .map(|(i, sp)| ServicePort {
            node_port: Some(30000 + u16::try_from(i).expect("few services")),
            ..sp
        })
        .collect();
    v.push(ServicePort {
        name: "empty".into(),
        cluster_ip: Ipv4Addr::new(198, 18, 129, 1),
        node_port: Some(30999),
        endpoints: Vec::new(),
        ..v[0].clone()
    });
    v
}

/// The lines of an `iptables-save` text that append to `chain`.
fn rules_of<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    save.lines().filter(|l| l.starts_with(&prefix)).collect()
}

#[test]
fn iptables_nodeport_rules_load_and_a_partial_sync_rewrites_the_external_chain() {
    require_privileged!(
        "iptables_nodeport_rules_load_and_a_partial_sync_rewrites_the_external_chain"
    );
    let ns = Netns::new("kp").expect("create the namespace");
    let old = nodeport_services(10);
    load(
        &ns,
        &["iptables-restore", "--noflush"],
        &iptables::bootstrap(),
    );
    load(&ns, &IPTABLES_RESTORE, &iptables::full_restore(&CFG, &old));

    let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap();
    assert_eq!(
        count(&nat, ":KUBE-EXT-"),
        10,
        "one KUBE-EXT chain per NodePort service with endpoints:\n{nat}"
    );
    let ext7 = iptables::external_chain(&old[7]);
    let svc7 = iptables::service_chain(&old[7]);
    let nodeports = rules_of(&nat, "KUBE-NODEPORTS");
    assert_eq!(nodeports.len(), 10, "one nodePort rule per service:\n{nat}");
    assert!(
        nodeports
            .iter()
            .any(|l| l.contains("--dport 30007") && l.ends_with(&format!("-j {ext7}"))),
        "expected KUBE-NODEPORTS to send nodePort 30007 to {ext7}:\n{nat}"
    );
    let ext_rules = rules_of(&nat, &ext7);
    assert!(
        ext_rules.len() == 2
            && ext_rules[0]
                .contains("\"masquerade traffic for bench/svc7:http external destinations\"")
            && ext_rules[0].ends_with("-j KUBE-MARK-MASQ")
            && ext_rules[1] == format!("-A {ext7} -j {svc7}"),
        "expected {ext7} to mark for masquerade, then jump to {svc7}:\n{nat}"
    );
    let filter = ns.exec(&["iptables-save", "-t", "filter"]).unwrap();
    assert!(
        rules_of(&filter, "KUBE-EXTERNAL-SERVICES").iter().any(|l| {
            l.contains("\"bench/empty:http has no endpoints\"")
                && l.contains("--dst-type LOCAL")
                && l.contains("--dport 30999")
                && l.contains("-j REJECT")
        }),
        "expected the endpoint-less nodePort 30999 rejected:\n{filter}"
    );

    let new = with_one_endpoint_replaced(&old);
    load(
        &ns,
        &IPTABLES_RESTORE,
        &iptables::partial_restore(&CFG, &new, &old[7], &new[7]),
    );
    let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap();
    assert_eq!(
        rules_of(&nat, &ext7).len(),
        2,
        "the rewritten {ext7} has its two rules once:\n{nat}"
    );
    assert_eq!(
        count(&nat, ":KUBE-EXT-"),
        10,
        "the other services' external chains stay"
    );
    assert_eq!(
        rules_of(&nat, "KUBE-NODEPORTS").len(),
        10,
        "every sync rewrites KUBE-NODEPORTS whole:\n{nat}"
    );
    let fresh = iptables::endpoint_chain(&new[7], new[7].endpoints[2]);
    assert!(
        rules_of(&nat, &svc7)
            .iter()
            .any(|l| l.ends_with(&format!("-j {fresh}"))),
        "expected {svc7} to jump to {fresh}:\n{nat}"
    );
}

#[test]
fn nftables_nodeport_rules_load_and_a_change_refills_the_external_chain() {
    require_privileged!("nftables_nodeport_rules_load_and_a_change_refills_the_external_chain");
    let ns = Netns::new("kp").expect("create the namespace");
    let old = nodeport_services(10);
    load(&ns, &NFT, &nftables::full(&CFG, &old));

    let ruleset = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    assert_eq!(
        count(&ruleset, "chain external-"),
        10,
        "one external chain per NodePort service with endpoints:\n{ruleset}"
    );
    let ext7 = nftables::external_chain(&old[7]);
    let svc7 = nftables::service_chain(&old[7]);
    assert!(
        ruleset.contains(&format!("tcp . 30007 : goto {ext7}")),
        "expected service 7's element in service-nodeports:\n{ruleset}"
    );
    assert!(
        ruleset.contains("tcp . 30999 comment \"bench/empty:http\" : goto reject-chain"),
        "expected the endpoint-less nodePort in no-endpoint-nodeports:\n{ruleset}"
    );
    let chain = |name: &str| ns.exec(&["nft", "list", "chain", "ip", "kube-proxy", name]);
    let ext_rules = chain(&ext7).expect("the external chain exists");
    let want = format!("jump mark-for-masquerade\n\t\tgoto {svc7}\n");
    assert!(
        ext_rules.contains(&want),
        "expected {ext7} to mark for masquerade, then go to {svc7}:\n{ext_rules}"
    );

    let new = with_one_endpoint_replaced(&old);
    load(&ns, &NFT, &nftables::change(&CFG, &old[7], &new[7]));
    let ext_rules = chain(&ext7).expect("the external chain stays");
    assert!(
        ext_rules.contains(&want) && ext_rules.matches("mark-for-masquerade").count() == 1,
        "expected {ext7} refilled, not appended to:\n{ext_rules}"
    );
    let ruleset = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    assert!(
        ruleset.contains(&format!("tcp . 30007 : goto {ext7}")),
        "the service-nodeports element stays:\n{ruleset}"
    );
}
