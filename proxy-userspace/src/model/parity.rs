//! The parity table (issue 14): kube-proxy's own test cases, each row cited by file, test and
//! case name, run through the model. A row gives a Service, its endpoints and one flow (who
//! sends, to which kind of frontend), and what kube-proxy's test asserts for it: the
//! endpoints that may answer, DROP, REJECT, or not handled. What the datapath does with the
//! model's answer is held by the packet and sandbox tests; here the answer itself is checked.
//!
//! Sources (kubernetes/kubernetes): `pkg/proxy/nftables/proxier_test.go` (commit 030880a5),
//! `pkg/proxy/servicechangetracker_test.go` (commit 2c348bf1); `pkg/proxy/topology_test.go`'s
//! rows are in `topology_hints_choose_endpoints_as_kube_proxy_does`.
use serde_json::{Value, json};

use super::*;

/// kube-proxy's fake node: "test-node", 192.168.0.2.
const NODE: &str = "test-node";
const NODE_IP: &str = "192.168.0.2";

/// Who sends the flow.
#[derive(Clone, Copy, Debug)]
enum From {
    /// A pod of this node (kube-proxy's source 10.0.0.2).
    Pod,
    /// The node itself (192.168.0.2).
    Node,
    /// A client outside (203.0.113.2), or the given address.
    External,
    Addr(&'static str),
}

/// What kube-proxy's test asserts for the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    /// These endpoints (addresses), any of them.
    To(Vec<&'static str>),
    Drop,
    Reject,
    /// No rule catches it (no such frontend).
    NotHandled,
}
use Want::*;

struct Row {
    cite: String,
    /// spec of Service ns/svc (its one port: 80/TCP, nodePort 3001 where the type has one).
    spec: Value,
    /// status.loadBalancer.ingress addresses.
    lb: &'static [&'static str],
    /// Endpoints: (address, on this node, ready, serving, terminating).
    eps: Vec<(&'static str, bool, bool, bool, bool)>,
    from: From,
    to: FrontendKind,
    want: Want,
}

fn ready(addr: &'static str, local: bool) -> (&'static str, bool, bool, bool, bool) {
    (addr, local, true, true, false)
}
fn terminating(addr: &'static str, local: bool) -> (&'static str, bool, bool, bool, bool) {
    (addr, local, false, true, true)
}
fn gone(addr: &'static str, local: bool) -> (&'static str, bool, bool, bool, bool) {
    (addr, local, false, false, true)
}

/// What the model's answer means for `row`'s flow, as kube-proxy's tests say it.
fn outcome_of(row: &Row) -> Want {
    let mut spec = row.spec.clone();
    // The ingress entries' ipMode, given in the row's spec for brevity.
    let mode = spec.as_object_mut().unwrap().remove("x-ip-mode");
    spec["ports"] = match spec["type"].as_str() {
        Some("NodePort") | Some("LoadBalancer") => json!([{"port": 80, "nodePort": 3001}]),
        _ => json!([{"port": 80}]),
    };
    let ingress: Vec<Value> = row
        .lb
        .iter()
        .map(|ip| match &mode {
            Some(m) => json!({"ip": ip, "ipMode": m}),
            None => json!({"ip": ip}),
        })
        .collect();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "svc", "namespace": "ns"},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .unwrap();
    let eps: Vec<Value> = row
        .eps
        .iter()
        .map(|(a, local, r, s, t)| {
            json!({"addresses": [a], "nodeName": if *local { NODE } else { "node2" },
                   "conditions": {"ready": r, "serving": s, "terminating": t}})
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "svc-1", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "svc"}},
        "addressType": "IPv4", "ports": [{"port": 80}], "endpoints": eps,
    }))
    .unwrap();
    let node = NodeContext {
        name: NODE.into(),
        nodeport_addresses: vec![NODE_IP.parse().unwrap()],
        zone: None,
        node_ip: Some(NODE_IP.parse().unwrap()),
        maglev_by_default: false,
    };
    let frontends = match service_frontends(&svc, &[&slice], &node, &Limits::default()) {
        Outcome::Proxied { frontends, .. } => frontends,
        Outcome::Ignored { .. } => return NotHandled,
        Outcome::Invalid { reason } => panic!("{}: invalid: {reason}", row.cite),
    };
    let Some((_, b)) = frontends.iter().find(|(f, _)| f.kind == row.to) else {
        return NotHandled;
    };
    let client: Option<Ipv4Addr> = match row.from {
        From::Pod => Some("10.0.0.2".parse().unwrap()),
        From::External => Some("203.0.113.2".parse().unwrap()),
        From::Addr(a) => Some(a.parse().unwrap()),
        From::Node => None,
    };
    // loadBalancerSourceRanges: the node by its flag (it may not know its source yet), a
    // client by its address.
    if let Some(src) = &b.sources {
        let allowed = match client {
            None => src.from_node,
            Some(c) => src.cidrs.iter().any(|r| r.contains(c)),
        };
        if !allowed {
            return Drop;
        }
    }
    let outside = matches!(row.from, From::External | From::Addr(_));
    // As the datapath decides: no backends at all is a REJECT (or the DROP of an
    // internalTrafficPolicy Local without local ones); from outside, an empty Local list is a
    // DROP.
    if b.all.is_empty() {
        return if b.no_local_endpoints { Drop } else { Reject };
    }
    let list = match (&b.external, outside) {
        (Some(local), true) => local,
        _ => &b.all,
    };
    if list.is_empty() {
        return Drop;
    }
    let mut to: Vec<&'static str> = row
        .eps
        .iter()
        .map(|e| e.0)
        .filter(|a| list.iter().any(|b| b.addr.to_string() == *a))
        .collect();
    to.sort();
    To(to)
}

#[test]
fn kube_proxys_own_cases_give_what_its_tests_assert() {
    let rows = rows();
    assert!(rows.len() >= 60, "{} rows", rows.len());
    let mut wrong = Vec::new();
    for row in &rows {
        let got = outcome_of(row);
        let mut want = row.want.clone();
        if let To(v) = &mut want {
            v.sort();
        }
        if got != want {
            wrong.push(format!("{}: got {got:?}, kube-proxy: {want:?}", row.cite));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} rows differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The rows. `P` is `pkg/proxy/nftables/proxier_test.go`.
fn rows() -> Vec<Row> {
    use FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};
    let cip = |extra: Value| {
        let mut s = json!({"clusterIP": "172.30.1.1"});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let lb = |etp: &str| {
        json!({"type": "LoadBalancer", "clusterIP": "172.30.1.1",
               "externalTrafficPolicy": etp, "healthCheckNodePort": 30000})
    };
    let lb_ext = |etp: &str| {
        json!({"type": "LoadBalancer", "clusterIP": "172.30.0.41",
               "externalIPs": ["192.168.99.11"], "externalTrafficPolicy": etp,
               "healthCheckNodePort": 30000})
    };
    let itp_local = cip(json!({"internalTrafficPolicy": "Local"}));
    let mut rows = vec![];
    // TestInternalTrafficPolicy: pod to ClusterIP.
    for (case, spec, eps, want) in [
        (
            "P TestInternalTrafficPolicy \"internalTrafficPolicy is cluster\"",
            cip(json!({})),
            vec![
                ready("10.0.1.1", true),
                ready("10.0.1.2", false),
                ready("10.0.1.3", false),
            ],
            To(vec!["10.0.1.1", "10.0.1.2", "10.0.1.3"]),
        ),
        (
            "P TestInternalTrafficPolicy \"internalTrafficPolicy is local and there is one local endpoint\"",
            itp_local.clone(),
            vec![
                ready("10.0.1.1", true),
                ready("10.0.1.2", false),
                ready("10.0.1.3", false),
            ],
            To(vec!["10.0.1.1"]),
        ),
        (
            "P TestInternalTrafficPolicy \"internalTrafficPolicy is local and there are multiple local endpoints\"",
            itp_local.clone(),
            vec![
                ready("10.0.1.1", true),
                ready("10.0.1.2", true),
                ready("10.0.1.3", false),
            ],
            To(vec!["10.0.1.1", "10.0.1.2"]),
        ),
        (
            "P TestInternalTrafficPolicy \"internalTrafficPolicy is local and there are no local endpoints\"",
            itp_local.clone(),
            vec![
                ready("10.0.1.1", false),
                ready("10.0.1.2", false),
                ready("10.0.1.3", false),
            ],
            Drop,
        ),
        (
            "P TestInternalTrafficPolicy, \"endpoints deleted\"",
            itp_local.clone(),
            vec![],
            Reject,
        ),
    ] {
        rows.push(Row {
            cite: case.into(),
            spec,
            lb: &[],
            eps,
            from: From::Pod,
            to: ClusterIp,
            want,
        });
    }
    // TestTerminatingEndpointsTrafficPolicyLocal and ...Cluster: pod to ClusterIP, external to
    // the LoadBalancer IP 1.2.3.4.
    let local_cases = [
        (
            "\"ready endpoints exist\"",
            vec![
                ready("10.0.1.1", true),
                ready("10.0.1.2", true),
                terminating("10.0.1.3", true),
                gone("10.0.1.4", true),
                ready("10.0.1.5", false),
            ],
            To(vec!["10.0.1.1", "10.0.1.2", "10.0.1.5"]),
            To(vec!["10.0.1.1", "10.0.1.2"]),
        ),
        (
            "\"only terminating endpoints exist\"",
            vec![
                terminating("10.0.1.2", true),
                terminating("10.0.1.3", true),
                gone("10.0.1.4", true),
                ready("10.0.1.5", false),
            ],
            To(vec!["10.0.1.5"]),
            To(vec!["10.0.1.2", "10.0.1.3"]),
        ),
        (
            "\"terminating endpoints on remote node\"",
            vec![terminating("10.0.1.5", false)],
            To(vec!["10.0.1.5"]),
            Drop,
        ),
        (
            "\"no usable endpoints on any node\"",
            vec![
                (("10.0.1.4"), true, false, false, false),
                ("10.0.1.5", false, false, false, false),
            ],
            Reject,
            Reject,
        ),
        ("(after endpoints deleted)", vec![], Reject, Reject),
    ];
    for (case, eps, pod, external) in local_cases {
        let cite = |flow: &str| -> String {
            format!("P TestTerminatingEndpointsTrafficPolicyLocal {case}, {flow}")
        };
        rows.push(Row {
            cite: cite("pod to clusterIP"),
            spec: lb("Local"),
            lb: &["1.2.3.4"],
            eps: eps.clone(),
            from: From::Pod,
            to: ClusterIp,
            want: pod,
        });
        rows.push(Row {
            cite: cite("external to LB"),
            spec: lb("Local"),
            lb: &["1.2.3.4"],
            eps,
            from: From::External,
            to: LoadBalancer,
            want: external,
        });
    }
    let cluster_cases = [
        (
            "\"ready endpoints exist\"",
            vec![
                ready("10.0.1.1", true),
                ready("10.0.1.2", true),
                terminating("10.0.1.3", false),
                gone("10.0.1.4", false),
                ready("10.0.1.5", false),
            ],
            To(vec!["10.0.1.1", "10.0.1.2", "10.0.1.5"]),
        ),
        (
            "\"only terminating endpoints exist\"",
            vec![
                terminating("10.0.1.2", true),
                terminating("10.0.1.3", true),
                gone("10.0.1.4", false),
                terminating("10.0.1.5", false),
            ],
            To(vec!["10.0.1.2", "10.0.1.3", "10.0.1.5"]),
        ),
        (
            "\"terminating endpoints on remote node\"",
            vec![terminating("10.0.1.5", false)],
            To(vec!["10.0.1.5"]),
        ),
        (
            "\"no usable endpoints on any node\"",
            vec![
                ("10.0.1.4", true, false, false, false),
                ("10.0.1.5", false, false, false, false),
            ],
            Reject,
        ),
        ("(after endpoints deleted)", vec![], Reject),
    ];
    for (case, eps, want) in cluster_cases {
        for (flow, from, to) in [
            ("pod to clusterIP", From::Pod, ClusterIp),
            ("external to LB", From::External, LoadBalancer),
        ] {
            let cite = format!("P TestTerminatingEndpointsTrafficPolicyCluster {case}, {flow}");
            rows.push(Row {
                cite,
                spec: lb("Cluster"),
                lb: &["1.2.3.4"],
                eps: eps.clone(),
                from,
                to,
                want: want.clone(),
            });
        }
    }
    // TestExternalTrafficPolicyLocal / ...Cluster: one remote, one local endpoint.
    let two = || vec![ready("10.180.0.1", false), ready("10.180.2.1", true)];
    let both = || To(vec!["10.180.0.1", "10.180.2.1"]);
    for (flow, from, to, local_want) in [
        (
            "pod to cluster IP hits both endpoints",
            From::Pod,
            ClusterIp,
            both(),
        ),
        (
            "pod to external IP hits both endpoints",
            From::Pod,
            ExternalIp,
            both(),
        ),
        (
            "external to external IP hits only local endpoint",
            From::External,
            ExternalIp,
            To(vec!["10.180.2.1"]),
        ),
        (
            "pod to LB IP hits only both endpoints",
            From::Pod,
            LoadBalancer,
            both(),
        ),
        (
            "external to LB IP hits only local endpoint",
            From::External,
            LoadBalancer,
            To(vec!["10.180.2.1"]),
        ),
        (
            "pod to NodePort hits both endpoints",
            From::Pod,
            NodePort,
            both(),
        ),
        (
            "external to NodePort hits only local endpoint",
            From::External,
            NodePort,
            To(vec!["10.180.2.1"]),
        ),
    ] {
        let cite = format!("P TestExternalTrafficPolicyLocal \"{flow}\"");
        rows.push(Row {
            cite,
            spec: lb_ext("Local"),
            lb: &["1.2.3.4"],
            eps: two(),
            from,
            to,
            want: local_want,
        });
        let cite = format!("P TestExternalTrafficPolicyCluster \"{flow}\" (every flow: both)");
        rows.push(Row {
            cite,
            spec: lb_ext("Cluster"),
            lb: &["1.2.3.4"],
            eps: two(),
            from,
            to,
            want: both(),
        });
    }
    // TestNoEndpointsReject.
    for (flow, from, to) in [
        ("pod to cluster IP with no endpoints", From::Pod, ClusterIp),
        (
            "external to external IP with no endpoints",
            From::External,
            ExternalIp,
        ),
        ("pod to NodePort with no endpoints", From::Pod, NodePort),
        (
            "external to NodePort with no endpoints",
            From::External,
            NodePort,
        ),
        (
            "pod to LoadBalancer IP with no endpoints",
            From::Pod,
            LoadBalancer,
        ),
        (
            "external to LoadBalancer IP with no endpoints",
            From::External,
            LoadBalancer,
        ),
    ] {
        let cite = format!("P TestNoEndpointsReject \"{flow}\"");
        rows.push(Row {
            cite,
            spec: lb_ext("Cluster"),
            lb: &["1.2.3.4"],
            eps: vec![],
            from,
            to,
            want: Reject,
        });
    }
    // TestInternalExternalMasquerade "base": svc2 (eTP Local) and svc3 (iTP Local), one local
    // and one remote endpoint each.
    let pair = || vec![ready("10.180.0.2", true), ready("10.180.1.2", false)];
    let pair_both = || To(vec!["10.180.0.2", "10.180.1.2"]);
    let mut svc2 = lb("Local");
    svc2["clusterIP"] = json!("172.30.0.42");
    let mut svc3 = lb("Cluster");
    svc3["clusterIP"] = json!("172.30.0.43");
    svc3["internalTrafficPolicy"] = json!("Local");
    for (flow, spec, from, to, want) in [
        (
            "external to NodePort with eTP:Local",
            &svc2,
            From::External,
            NodePort,
            To(vec!["10.180.0.2"]),
        ),
        (
            "external to LB with eTP:Local",
            &svc2,
            From::External,
            LoadBalancer,
            To(vec!["10.180.0.2"]),
        ),
        (
            "pod to NodePort with eTP:Local",
            &svc2,
            From::Pod,
            NodePort,
            pair_both(),
        ),
        (
            "pod to LB with eTP:Local",
            &svc2,
            From::Pod,
            LoadBalancer,
            pair_both(),
        ),
        (
            "pod to ClusterIP with iTP:Local",
            &svc3,
            From::Pod,
            ClusterIp,
            To(vec!["10.180.0.2"]),
        ),
        (
            "node to ClusterIP with iTP:Local",
            &svc3,
            From::Node,
            ClusterIp,
            To(vec!["10.180.0.2"]),
        ),
        (
            "pod to NodePort with iTP:Local",
            &svc3,
            From::Pod,
            NodePort,
            pair_both(),
        ),
        (
            "node to NodePort with iTP:Local",
            &svc3,
            From::Node,
            NodePort,
            pair_both(),
        ),
        (
            "external to NodePort with iTP:Local",
            &svc3,
            From::External,
            NodePort,
            pair_both(),
        ),
        (
            "external to LB with iTP:Local",
            &svc3,
            From::External,
            LoadBalancer,
            pair_both(),
        ),
    ] {
        let cite = format!("P TestInternalExternalMasquerade \"base\", \"{flow}\"");
        let lb_ip: &'static [&'static str] = if spec == &svc2 {
            &["5.6.7.8"]
        } else {
            &["9.10.11.12"]
        };
        rows.push(Row {
            cite,
            spec: spec.clone(),
            lb: lb_ip,
            eps: pair(),
            from,
            to,
            want,
        });
    }
    // TestNodePorts "ipv4": one remote, one local endpoint.
    let np = json!({"type": "NodePort", "clusterIP": "172.30.0.41"});
    let np_eps = || vec![ready("10.180.0.1", false), ready("10.180.2.1", true)];
    for (flow, from, to) in [
        ("pod to cluster IP", From::Pod, ClusterIp),
        ("external to nodePort", From::External, NodePort),
        ("node to nodePort", From::Node, NodePort),
    ] {
        let cite = format!("P TestNodePorts \"ipv4\", \"{flow}\"");
        rows.push(Row {
            cite,
            spec: np.clone(),
            lb: &[],
            eps: np_eps(),
            from,
            to,
            want: To(vec!["10.180.0.1", "10.180.2.1"]),
        });
    }
    // TestLoadBalancer: ranges 192.168.0.0/24 (the node's) and " 203.0.113.0/25"; LB IPs
    // 1.2.3.4 and 5.6.7.8; one remote endpoint.
    let ranged = json!({"type": "LoadBalancer", "clusterIP": "172.30.0.41",
                        "loadBalancerSourceRanges": ["192.168.0.0/24", " 203.0.113.0/25"]});
    let one = || vec![ready("10.180.0.1", false)];
    let hit = || To(vec!["10.180.0.1"]);
    for (flow, from, to, want) in [
        ("pod to cluster IP", From::Pod, ClusterIp, hit()),
        ("external to nodePort", From::External, NodePort, hit()),
        (
            "nodePort bypasses LoadBalancerSourceRanges",
            From::Addr("203.0.113.130"),
            NodePort,
            hit(),
        ),
        (
            "accepted external to LB1",
            From::External,
            LoadBalancer,
            hit(),
        ),
        (
            "blocked external to LB1",
            From::Addr("203.0.113.130"),
            LoadBalancer,
            Drop,
        ),
        (
            "pod to LB1 (blocked by LoadBalancerSourceRanges)",
            From::Pod,
            LoadBalancer,
            Drop,
        ),
        (
            "node to LB1 (allowed by LoadBalancerSourceRanges)",
            From::Node,
            LoadBalancer,
            hit(),
        ),
        (
            "same node to LB1, SNATted to LB1 (implicitly allowed)",
            From::Addr("1.2.3.4"),
            LoadBalancer,
            hit(),
        ),
    ] {
        let cite = format!("P TestLoadBalancer \"{flow}\"");
        rows.push(Row {
            cite,
            spec: ranged.clone(),
            lb: &["1.2.3.4", "5.6.7.8"],
            eps: one(),
            from,
            to,
            want,
        });
    }
    // TestClusterIPGeneral.
    rows.push(Row {
        cite: "P TestClusterIPGeneral \"clusterIP with multiple endpoints\"".into(),
        spec: json!({"clusterIP": "172.30.0.42"}),
        lb: &[],
        eps: vec![ready("10.180.0.1", true), ready("10.180.2.1", false)],
        from: From::Pod,
        to: ClusterIp,
        want: To(vec!["10.180.0.1", "10.180.2.1"]),
    });
    // TestLoadBalancerIngressRouteTypeProxy (the gate on, as in kube-proxy >= 1.32).
    for (case, mode, want) in [
        (
            "\"LoadBalancerIPMode enabled, ipMode Proxy\"",
            Some("Proxy"),
            NotHandled,
        ),
        (
            "\"LoadBalancerIPMode enabled, ipMode VIP\"",
            Some("VIP"),
            hit(),
        ),
        ("\"LoadBalancerIPMode enabled, ipMode nil\"", None, hit()),
    ] {
        let cite = format!("P TestLoadBalancerIngressRouteTypeProxy {case}");
        let mut spec = json!({"type": "LoadBalancer", "clusterIP": "172.30.0.41"});
        if let Some(m) = mode {
            spec["x-ip-mode"] = json!(m);
        }
        rows.push(Row {
            cite,
            spec,
            lb: &["1.2.3.4"],
            eps: one(),
            from: From::External,
            to: LoadBalancer,
            want,
        });
    }
    // servicechangetracker_test.go TestServiceToServiceMap.
    let s = "pkg/proxy/servicechangetracker_test.go TestServiceToServiceMap";
    for (case, spec, lb_ips, to, want) in [
        (
            "\"headless service\"",
            json!({"clusterIP": "None"}),
            &[][..],
            ClusterIp,
            NotHandled,
        ),
        (
            "\"external name service\"",
            json!({"type": "ExternalName", "clusterIP": "172.30.55.4", "externalName": "foo2.bar.com"}),
            &[][..],
            ClusterIp,
            NotHandled,
        ),
        (
            "\"service with ipv6 clusterIP under ipv4 mode, service should be filtered\"",
            json!({"clusterIP": "2001:db8:85a3:0:0:8a2e:370:7334"}),
            &[][..],
            ClusterIp,
            NotHandled,
        ),
        (
            "\"load balancer service ipMode Proxy feature gate enabled\"",
            json!({"type": "LoadBalancer", "clusterIP": "172.30.55.11", "x-ip-mode": "Proxy"}),
            &["10.1.2.4"][..],
            LoadBalancer,
            NotHandled,
        ),
        (
            "\"load balancer service ipMode VIP feature gate enabled\"",
            json!({"type": "LoadBalancer", "clusterIP": "172.30.55.11", "x-ip-mode": "VIP"}),
            &["10.1.2.4"][..],
            LoadBalancer,
            hit(),
        ),
        (
            "\"service with extra space in LoadBalancerSourceRanges\"",
            json!({"type": "LoadBalancer", "clusterIP": "172.30.55.10",
                "loadBalancerSourceRanges": [" 10.1.2.0/28"]}),
            &["10.1.2.4"][..],
            LoadBalancer,
            Drop,
        ),
    ] {
        let cite = format!("{s} {case}");
        rows.push(Row {
            cite,
            spec,
            lb: lb_ips,
            eps: one(),
            from: From::External,
            to,
            want,
        });
    }
    rows
}
