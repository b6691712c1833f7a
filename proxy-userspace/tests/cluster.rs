//! A cluster, not one node: three sandbox nodes (two routed, one with its pods on a Linux
//! bridge, flannel's `cni0`), pods on each, a client outside, and one real `sluice agent` per
//! node with its own pin path, all reading the same manifests (Services, EndpointSlices with
//! each endpoint's `nodeName`, Nodes), as DaemonSet pods read the same API server.
//!
//! Every test asserts what the client and the backend each see: the answer, the address the
//! client's socket is connected to, and the client address the backend saw (its `X-Client`).
mod common;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use serde_json::{Value, json};
use testbed::{
    BpfFs, Cluster, HttpServer, KeepAlive, PodNetwork, Sniffer, UdpEcho, UdpOutcome,
    agent::{
        AgentProcess, ManifestsDir, cli_json, eventually, node_objects, sandbox_args, services_json,
    },
    curl, http_upload, plan,
    plan::node_name,
    require_privileged, udp_connected,
};

const T: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);
const NODES: usize = 3;
/// The node whose pods hang off a bridge.
const BRIDGE_NODE: usize = 2;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 30);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 192, 30);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 192, 31);
const NODE_PORT: u16 = 30090;
const UDP_NODE_PORT: u16 = 30091;
const HC_NODE_PORT: u16 = 32100;
/// UDP: an echo on 5353; nothing listens on 5354.
const UDP_ECHO: u16 = 5353;
const UDP_CLOSED: u16 = 5354;

/// One endpoint as the EndpointSlice controller writes it.
fn endpoint(addr: Ipv4Addr, node: usize, ready: bool, terminating: bool) -> Value {
    json!({"addresses": [addr.to_string()], "nodeName": node_name(node),
           "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating}})
}

struct Env {
    // Field order is drop order: agents first, namespaces last.
    agents: Vec<AgentProcess>,
    _http: Vec<HttpServer>,
    _udp: Vec<UdpEcho>,
    bpffs: Vec<BpfFs>,
    manifests: ManifestsDir,
    c: Cluster,
}

impl Env {
    /// The cluster with pods `web-K` (HTTP on 8080, UDP echo on 5353) and `client-K` on every
    /// node K, one outside client, the Node objects, and an agent per node (`extra` flags for
    /// each), healthy.
    fn new(extra: &[&str]) -> Self {
        let mut c =
            Cluster::with(&[PodNetwork::Routed, PodNetwork::Routed, PodNetwork::Bridge]).unwrap();
        for k in 0..NODES {
            c.add_pod(k as u8, &format!("web-{k}")).unwrap();
            c.add_pod(k as u8, &format!("client-{k}")).unwrap();
        }
        c.add_outside().unwrap();
        let http = (0..NODES)
            .map(|k| {
                let name = format!("web-{k}");
                HttpServer::start(&c.pod(&name).ns, &name, 8080).unwrap()
            })
            .collect();
        let udp = (0..NODES)
            .map(|k| {
                let name = format!("web-{k}");
                UdpEcho::start(&c.pod(&name).ns, &name, UDP_ECHO).unwrap()
            })
            .collect();
        let manifests = ManifestsDir::new().unwrap();
        manifests.write("nodes.yaml", &node_objects(&c)).unwrap();
        let mut env = Self {
            agents: Vec::new(),
            _http: http,
            _udp: udp,
            bpffs: Vec::new(),
            manifests,
            c,
        };
        for k in 0..NODES {
            env.start_agent(k, extra);
        }
        env
    }

    fn start_agent(&mut self, k: usize, extra: &[&str]) {
        let bpffs = BpfFs::new().unwrap();
        let agent = self.spawn_agent(k, &bpffs, extra, "log");
        self.agents.push(agent);
        self.bpffs.push(bpffs);
    }

    /// Starts node `k`'s agent on the pins of `bpffs`, logging to `<bpffs>.<log>`, healthy.
    fn spawn_agent(&self, k: usize, bpffs: &BpfFs, extra: &[&str], log: &str) -> AgentProcess {
        let pins = bpffs.path().join("sluice");
        let dir = self.manifests.path().display().to_string();
        let mut flags = vec!["--manifests", dir.as_str()];
        flags.extend_from_slice(extra);
        let args = sandbox_args(&node_name(k), &pins, &flags);
        let log = bpffs.path().with_extension(log);
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        let mut agent = AgentProcess::start(&self.c.nodes[k].ns, bin, &args, &log).unwrap();
        agent.wait_started();
        agent
    }

    /// Kills node `k`'s agent (SIGKILL) and starts another on its pins with `extra` flags
    /// (start number `n`, for its log's name).
    fn restart_agent(&mut self, k: usize, extra: &[&str], n: u32) {
        self.agents[k].kill9();
        let agent = self.spawn_agent(k, &self.bpffs[k], extra, &format!("{n}.log"));
        self.agents[k] = agent;
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(k, a)| format!("--- agent on node{k}:\n{}", a.log()))
            .collect()
    }

    fn addr(&self, pod: &str) -> Ipv4Addr {
        self.c.pod(pod).addr
    }

    fn node_addr(&self, k: usize) -> Ipv4Addr {
        self.c.nodes[k].addr
    }

    /// Writes Service `web` (TCP 80 -> 8080 and UDP 53 -> 5353/5354, with nodePorts) of
    /// `kind` and `policy`, with `endpoints` (built by [`endpoint`]).
    fn web(&self, kind: &str, policy: &str, endpoints: Vec<Value>) {
        self.web_with(kind, policy, endpoints, json!({}));
    }

    /// [`Env::web`] with more fields in its spec.
    fn web_with(&self, kind: &str, policy: &str, endpoints: Vec<Value>, more: Value) {
        let mut svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": kind, "externalTrafficPolicy": policy,
                "clusterIP": CLUSTER_IP.to_string(), "clusterIPs": [CLUSTER_IP.to_string()],
                "externalIPs": [EXTERNAL_IP.to_string()],
                "healthCheckNodePort": if kind == "LoadBalancer" && policy == "Local" { json!(HC_NODE_PORT) } else { Value::Null },
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": NODE_PORT},
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": UDP_NODE_PORT},
                    {"name": "closed", "port": 54, "targetPort": 5354, "protocol": "UDP"},
                ],
            },
            "status": if kind == "LoadBalancer" {
                json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}})
            } else { json!({}) },
        });
        for (k, v) in more.as_object().expect("spec fields") {
            svc["spec"][k] = v.clone();
        }
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": UDP_ECHO, "protocol": "UDP"},
                      {"name": "closed", "port": UDP_CLOSED, "protocol": "UDP"}],
            "endpoints": endpoints,
        });
        self.manifests.write("web.yaml", &[svc, slice]).unwrap();
    }

    /// The endpoint of pod `web-K`, ready.
    fn web_ep(&self, k: usize) -> Value {
        endpoint(self.addr(&format!("web-{k}")), k, true, false)
    }

    /// Waits until every agent has frontend `addr:port` with `n` backends for traffic from
    /// its pods (a Service written to the manifests reaches every node).
    fn wait_programmed(&self, addr: Ipv4Addr, port: u16, n: usize) {
        let ok = eventually(WAIT, || {
            (0..NODES).all(|k| {
                self.services(k).iter().any(|f| {
                    f["address"] == addr.to_string()
                        && f["port"] == port
                        && f["backends"].as_array().map(Vec::len) == Some(n)
                })
            })
        });
        assert!(
            ok,
            "{addr}:{port} was not programmed with {n} backends on every node\n{}",
            self.logs()
        );
    }

    fn services(&self, k: usize) -> Vec<Value> {
        let pins = self.bpffs[k].path().join("sluice");
        services_json(
            &self.c.nodes[k].ns,
            Path::new(env!("CARGO_BIN_EXE_sluice")),
            &pins,
        )
    }

    fn counter(&self, k: usize, name: &str) -> f64 {
        self.agents[k].packets(name)
    }

    /// Node `k`'s count of new flows from outside that it dropped, by TC's counter `tc` or
    /// (with XDP on its uplink) at XDP, where what TC drops of new flows is dropped first.
    fn dropped(&self, k: usize, tc: &str) -> f64 {
        self.counter(k, tc) + self.counter(k, "xdp_drop")
    }

    /// Every datapath counter of node `k`'s agent that is not zero, for failure messages.
    fn counters(&self, k: usize) -> String {
        self.agents[k]
            .metrics()
            .lines()
            .filter(|l| l.starts_with("sluice_datapath_packets_total") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn outside(&self) -> &testbed::Netns {
        &self.c.outside[0].ns
    }
}

#[test]
fn a_pod_reaches_a_cluster_ip_backend_on_another_node_over_tcp_and_udp() {
    require_privileged!("a_pod_reaches_a_cluster_ip_backend_on_another_node_over_tcp_and_udp");
    let env = Env::new(&[]);
    env.web("ClusterIP", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    for client in ["client-0", "client-2"] {
        let ns = &env.c.pod(client).ns;
        let r =
            curl(ns, CLUSTER_IP, 80, T).unwrap_or_else(|e| panic!("{client}: {e}\n{}", env.logs()));
        assert_eq!(r.body, "web-1", "{client}");
        assert_eq!(
            r.peer.ip(),
            &CLUSTER_IP,
            "{client}'s socket shows the ClusterIP"
        );
        assert_eq!(
            r.client.map(|c| *c.ip()),
            Some(env.addr(client)),
            "the backend sees the pod's own address across nodes"
        );
        let u = testbed::udp_request(ns, CLUSTER_IP, 53, "hi", T).unwrap();
        assert_eq!(u.data, "web-1 hi");
        assert_eq!(
            u.from,
            std::net::SocketAddrV4::new(CLUSTER_IP, 53),
            "the reply comes from the Service address"
        );
        // A datagram too big for the links crosses in fragments, both ways.
        let big = "z".repeat(4000);
        let u = testbed::udp_request(ns, CLUSTER_IP, 53, &big, T)
            .unwrap_or_else(|e| panic!("{client}, a fragmented datagram: {e}\n{}", env.logs()));
        assert_eq!(u.data, format!("web-1 {big}"), "{client}");
    }
    // The conntrack table's fill is exported: the client's node holds the UDP flow (the
    // table is walked at most every 10 s, so a fresh count may take that long).
    let udp = |k: usize| env.agents[k].metric("sluice_conntrack_flows{state=\"udp\"}");
    assert!(
        eventually(Duration::from_secs(15), || udp(0).is_some_and(|n| n >= 1.0)),
        "node0's UDP flows: {:?}\n{}",
        udp(0),
        env.agents[0].metrics()
    );
    assert_eq!(
        env.agents[0].metric("sluice_conntrack_capacity_entries"),
        Some(f64::from(proxy_common::CT4_DEFAULT_MAX))
    );
    // The table of flows not yet established, apart (a flood fills that one only).
    assert_eq!(
        env.agents[0].metric("sluice_conntrack_new_capacity_entries"),
        Some(f64::from(proxy_common::CT4_NEW_DEFAULT_MAX))
    );
    assert!(
        env.agents[0]
            .metric("sluice_conntrack_new_entries")
            .is_some(),
        "{}",
        env.agents[0].metrics()
    );
    assert!(
        env.agents[0]
            .metric("sluice_conntrack_live_entries{kind=\"reverse\"}")
            .is_some_and(|n| n >= 1.0)
    );
}

#[test]
fn every_path_works_with_strict_reverse_path_filtering() {
    require_privileged!("every_path_works_with_strict_reverse_path_filtering");
    let env = Env::new(&[]);
    // RHEL's default, and what Calico sets on its devices: a packet is dropped unless the
    // route back to its source leaves by the device it came in on (all.rp_filter=1 makes
    // every device strict, as the kernel uses the larger of `all` and the device's value).
    for node in &env.c.nodes {
        node.ns.sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
        node.ns
            .sysctl("net.ipv4.conf.default.rp_filter", "1")
            .unwrap();
    }
    let ok = |ns: &testbed::Netns, addr: Ipv4Addr, port: u16, want: &str, what: &str| {
        let r = curl(ns, addr, port, T)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}\n{}", env.logs(), env.counters(0)));
        assert_eq!(r.body, want, "{what}");
        assert_eq!(
            *r.peer.ip(),
            addr,
            "{what}: the socket shows what it dialled"
        );
    };
    // The endpoint on node1: across nodes from pods (routed and bridged), and a NodePort from
    // outside both to the remote endpoint (SNAT, forwarded by redirect) and to a local one.
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    for client in ["client-0", "client-2"] {
        let ns = &env.c.pod(client).ns;
        ok(ns, CLUSTER_IP, 80, "web-1", client);
        let u = testbed::udp_request(ns, CLUSTER_IP, 53, "hi", T).unwrap();
        assert_eq!(
            (u.data.as_str(), *u.from.ip()),
            ("web-1 hi", CLUSTER_IP),
            "{client} over UDP"
        );
    }
    // An ICMP error about a translated flow (nothing listens on the backend's port).
    assert_eq!(
        udp_connected(&env.c.pod("client-0").ns, CLUSTER_IP, 54, "x", T).unwrap(),
        UdpOutcome::Refused,
        "the port unreachable reaches the client"
    );
    ok(
        env.outside(),
        env.node_addr(0),
        NODE_PORT,
        "web-1",
        "outside to node0, SNATed",
    );
    ok(
        env.outside(),
        env.node_addr(1),
        NODE_PORT,
        "web-1",
        "outside to node1, local",
    );
    let u = testbed::udp_request(env.outside(), env.node_addr(0), UDP_NODE_PORT, "x", T).unwrap();
    assert_eq!(u.data, "web-1 x", "outside to node0 over UDP");
    // The endpoint on node0: a local backend, and the pod reaching itself through the
    // ClusterIP and through its own node's NodePort (hairpin).
    env.web("NodePort", "Cluster", vec![env.web_ep(0)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    eventually(WAIT, || {
        curl(&env.c.pod("client-0").ns, CLUSTER_IP, 80, T).is_ok_and(|r| r.body == "web-0")
    });
    ok(
        &env.c.pod("client-0").ns,
        CLUSTER_IP,
        80,
        "web-0",
        "a local backend",
    );
    let web0 = &env.c.pod("web-0").ns;
    ok(
        web0,
        CLUSTER_IP,
        80,
        "web-0",
        "hairpin through the ClusterIP",
    );
    ok(
        web0,
        env.node_addr(0),
        NODE_PORT,
        "web-0",
        "hairpin through the NodePort",
    );
    assert!(
        env.counter(0, "reply") >= 1.0 && env.counter(0, "hairpin") >= 2.0,
        "{}",
        env.counters(0)
    );
}

/// The agents' flags for a test of traffic from outside run twice, on TC alone and with XDP on
/// the uplinks (generic mode, which lets XDP send): what holds on TC holds on XDP's path too.
fn with_xdp(xdp: bool) -> &'static [&'static str] {
    if xdp { &["--xdp-mode", "generic"] } else { &[] }
}

#[test]
fn node_port_from_outside_to_a_remote_backend_is_snated_to_the_ingress_node() {
    require_privileged!("node_port_from_outside_to_a_remote_backend_is_snated_to_the_ingress_node");
    node_port_from_outside_to_a_remote_backend(false);
}

#[test]
fn node_port_from_outside_to_a_remote_backend_is_snated_to_the_ingress_node_with_xdp() {
    require_privileged!(
        "node_port_from_outside_to_a_remote_backend_is_snated_to_the_ingress_node_with_xdp"
    );
    node_port_from_outside_to_a_remote_backend(true);
}

/// The outside client's call to node `ingress`'s NodePort, answered by web-1 to the address
/// it dialled: who web-1 says called.
fn web_1_through(env: &Env, ingress: usize) -> std::net::SocketAddrV4 {
    let node = env.node_addr(ingress);
    let r = curl(env.outside(), node, NODE_PORT, T)
        .unwrap_or_else(|e| panic!("NodePort of node{ingress}: {e}\n{}", env.logs()));
    assert_eq!(r.body, "web-1");
    assert_eq!(
        r.peer.ip(),
        &node,
        "the client talks to the node it dialled"
    );
    r.client.expect("the backend says who called")
}

fn node_port_from_outside_to_a_remote_backend(xdp: bool) {
    let env = Env::new(with_xdp(xdp));
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    for ingress in [0, BRIDGE_NODE] {
        let node = env.node_addr(ingress);
        for _ in 0..5 {
            let seen = web_1_through(&env, ingress);
            assert_eq!(
                seen.ip(),
                &node,
                "the remote backend sees the ingress node's address (SNAT)"
            );
        }
        // New flows SNATed at TC, or at XDP once the route's neighbour is known; with XDP,
        // at least the later ones are XDP's.
        let (tc, at_xdp) = (
            env.counter(ingress, "new_flow_snat"),
            env.counter(ingress, "xdp_new_flow_tx"),
        );
        assert!(tc + at_xdp >= 5.0, "{}", env.counters(ingress));
        assert!(!xdp || at_xdp >= 1.0, "{}", env.counters(ingress));
        assert!(env.counter(ingress, "redirect") + env.counter(ingress, "xdp_tx") > 0.0);
    }
    // The same for externalIPs, and UDP.
    env.c.route_outside_via(0, (EXTERNAL_IP, 32), 0).unwrap();
    let r = curl(env.outside(), EXTERNAL_IP, 80, T).unwrap();
    assert_eq!(
        (r.body.as_str(), r.client.map(|c| *c.ip())),
        ("web-1", Some(env.node_addr(0)))
    );
    let u = testbed::udp_request(env.outside(), env.node_addr(0), UDP_NODE_PORT, "x", T).unwrap();
    assert_eq!(u.data, "web-1 x");
    assert_eq!(
        u.from,
        std::net::SocketAddrV4::new(env.node_addr(0), UDP_NODE_PORT)
    );
    // A datagram too big for the links: its fragments are SNATed and forwarded with their
    // first, both ways.
    let big = "y".repeat(4000);
    let u = testbed::udp_request(env.outside(), env.node_addr(0), UDP_NODE_PORT, &big, T)
        .unwrap_or_else(|e| panic!("a fragmented datagram: {e}\n{}", env.logs()));
    assert_eq!(u.data, format!("web-1 {big}"));
    assert!(env.counter(0, "fragment_followed") >= 4.0, "{}", env.logs());
}

#[test]
fn direct_server_return_shows_the_client_to_a_remote_backend_whose_node_answers_directly() {
    require_privileged!(
        "direct_server_return_shows_the_client_to_a_remote_backend_whose_node_answers_directly"
    );
    direct_server_return(false);
}

#[test]
fn direct_server_return_shows_the_client_to_a_remote_backend_whose_node_answers_directly_with_xdp()
{
    require_privileged!(
        "direct_server_return_shows_the_client_to_a_remote_backend_whose_node_answers_directly_with_xdp"
    );
    direct_server_return(true);
}

/// `--lb-mode dsr`: TCP from outside to a NodePort or externalIP whose endpoint is on another
/// node reaches it with the client's address, and the replies go from the endpoint's node to
/// the client, showing the frontend, never back through the ingress node. UDP is SNATed.
/// Without XDP, every node filters reverse paths strictly (RHEL's default).
fn direct_server_return(xdp: bool) {
    let mut flags = vec!["--lb-mode", "dsr"];
    flags.extend_from_slice(with_xdp(xdp));
    let env = Env::new(&flags);
    if !xdp {
        for node in &env.c.nodes {
            node.ns.sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
        }
    }
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    let client = env.c.outside[0].addr;
    // `sluice conntrack` shows the flows on both nodes: the ingress node's DNAT, and the
    // backend node's entry for the replies (looked at while the flows' entries live: closed,
    // they go within 10 s on the backend's node). No other node notes them.
    let flows = |k: usize| {
        let pins = env.bpffs[k].path().join("sluice");
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        cli_json(&env.c.nodes[k].ns, bin, &pins, "conntrack")
    };
    let web_1 = format!("{}:8080", env.addr("web-1"));
    let seen_as = |k: usize, role: &str, shown: &str| {
        flows(k).iter().any(|f| {
            f["direct_server_return"] == role
                && f["frontend"] == shown
                && f["backend"] == web_1
                && f["client"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{client}:"))
                && f["snat"].is_null()
        })
    };
    for ingress in [0, BRIDGE_NODE] {
        let node = env.node_addr(ingress);
        // (Only TC's `reply`: XDP's `xdp_tx` counts the clients' packets it forwards too, and
        // a reply XDP sends is a SNATed flow's, which the client address the backend sees
        // rules out.)
        let replies = env.counter(ingress, "reply");
        let xdp_sent = env.counter(ingress, "xdp_tx");
        let noted = env.counter(1, "dsr_noted");
        for _ in 0..5 {
            let seen = web_1_through(&env, ingress);
            assert_eq!(seen.ip(), &client, "the backend sees the client");
        }
        // Started by TC, or (with XDP) at XDP.
        assert!(
            env.counter(ingress, "new_flow_dsr") + env.counter(ingress, "xdp_new_flow_tx") >= 5.0,
            "{}",
            env.counters(ingress)
        );
        if xdp {
            assert!(
                env.counter(ingress, "xdp_new_flow_tx") >= 1.0,
                "{}",
                env.counters(ingress)
            );
        }
        assert!(
            env.counter(1, "dsr_noted") - noted >= 5.0,
            "{}",
            env.counters(1)
        );
        assert_eq!(
            env.counter(ingress, "reply"),
            replies,
            "no reply came back through node{ingress}"
        );
        // With XDP, the ingress node forwards each flow's packets after its SYN at XDP.
        if xdp {
            assert!(
                env.counter(ingress, "xdp_tx") - xdp_sent >= 5.0,
                "{}",
                env.counters(ingress)
            );
        }
        let shown = format!("{node}:{NODE_PORT}");
        assert!(seen_as(ingress, "ingress", &shown), "{:#?}", flows(ingress));
        assert!(seen_as(1, "backend", &shown), "{:#?}", flows(1));
        let other = 2 - ingress;
        assert!(!seen_as(other, "backend", &shown), "{:#?}", flows(other));
    }
    // Pods calling node0's NodePort arrive at its uplink as outside clients do. One on the
    // third node goes by DSR; one on the endpoint's own node is SNATed (by DSR its packets
    // would reach its node from the uplink with its own address as their source, which the
    // strict reverse-path filtering here drops).
    for (pod, seen) in [
        ("client-2", env.addr("client-2")),
        ("client-1", env.node_addr(0)),
    ] {
        let r = curl(&env.c.pod(pod).ns, env.node_addr(0), NODE_PORT, T)
            .unwrap_or_else(|e| panic!("{pod}: {e}\n{}", env.logs()));
        assert_eq!(r.body, "web-1", "{pod}");
        assert_eq!(r.client.map(|c| *c.ip()), Some(seen), "{pod}");
    }
    // An externalIP too; UDP is SNATed to the ingress node.
    env.c.route_outside_via(0, (EXTERNAL_IP, 32), 0).unwrap();
    let r = curl(env.outside(), EXTERNAL_IP, 80, T).unwrap();
    assert_eq!(
        (r.body.as_str(), r.client.map(|c| *c.ip())),
        ("web-1", Some(client))
    );
    let u = testbed::udp_request(env.outside(), env.node_addr(0), UDP_NODE_PORT, "x", T).unwrap();
    assert_eq!(u.data, "web-1 x");
    assert!(env.counter(0, "new_flow_snat") + env.counter(0, "xdp_new_flow_tx") >= 1.0);
}

// Departure from kube-proxy (ARCHITECTURE.md): kube-proxy masquerades all external traffic
// of an externalTrafficPolicy Cluster Service, also to a backend on the ingress node; sluice,
// like Cilium, SNATs only where the replies would otherwise miss the node.
#[test]
fn node_port_from_outside_to_a_local_backend_keeps_the_client_address() {
    require_privileged!("node_port_from_outside_to_a_local_backend_keeps_the_client_address");
    let env = Env::new(&[]);
    env.web("NodePort", "Cluster", vec![env.web_ep(0)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    let r = curl(env.outside(), env.node_addr(0), NODE_PORT, T).unwrap();
    assert_eq!(r.body, "web-0");
    assert_eq!(r.client.map(|c| *c.ip()), Some(env.c.outside[0].addr));
}

#[test]
fn external_traffic_policy_local_serves_outside_traffic_from_local_endpoints_only() {
    require_privileged!(
        "external_traffic_policy_local_serves_outside_traffic_from_local_endpoints_only"
    );
    external_traffic_policy_local(false);
}

#[test]
fn external_traffic_policy_local_serves_outside_traffic_from_local_endpoints_only_with_xdp() {
    require_privileged!(
        "external_traffic_policy_local_serves_outside_traffic_from_local_endpoints_only_with_xdp"
    );
    external_traffic_policy_local(true);
}

fn external_traffic_policy_local(xdp: bool) {
    let env = Env::new(with_xdp(xdp));
    env.web("LoadBalancer", "Local", vec![env.web_ep(0), env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 2);
    // Outside to node0's NodePort: web-0 only, and it sees the client's own address.
    for _ in 0..10 {
        let r = curl(env.outside(), env.node_addr(0), NODE_PORT, T).unwrap();
        assert_eq!(r.body, "web-0");
        assert_eq!(
            r.client.map(|c| *c.ip()),
            Some(env.c.outside[0].addr),
            "no SNAT under Local"
        );
    }
    // node2 has no local endpoint: outside traffic to it is dropped, as kube-proxy drops it.
    let dropped = curl(
        env.outside(),
        env.node_addr(2),
        NODE_PORT,
        Duration::from_secs(2),
    );
    assert!(dropped.is_err(), "node2 answered {dropped:?}");
    assert!(
        env.dropped(2, "drop_no_local_backend") >= 1.0,
        "{}",
        env.logs()
    );
    assert!(
        !xdp || (env.counter(2, "xdp_drop") >= 1.0 && env.counter(0, "xdp_new_flow") >= 1.0),
        "with XDP, node0's flows start at XDP and node2 drops there\n{}\n{}",
        env.counters(0),
        env.counters(2)
    );
    // In-cluster clients are never black-holed: a pod on node2 reaches node2's own NodePort,
    // the LoadBalancer IP and the externalIP, through every endpoint (kube-proxy's
    // short-circuit of pod traffic to external destinations).
    let pod = &env.c.pod("client-2").ns;
    for (addr, port) in [
        (env.node_addr(2), NODE_PORT),
        (LB_IP, 80),
        (EXTERNAL_IP, 80),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..16 {
            seen.insert(
                curl(pod, addr, port, T)
                    .unwrap_or_else(|e| panic!("{addr}:{port}: {e}"))
                    .body,
            );
        }
        assert_eq!(
            seen,
            ["web-0".to_owned(), "web-1".to_owned()].into(),
            "{addr}:{port}"
        );
    }
}

/// loadBalancerSourceRanges on real traffic from outside: a client in no range is dropped at
/// the LoadBalancer address (and counted), the Service's NodePort stays open to it (the ranges
/// cover LoadBalancer addresses only, as kube-proxy's firewall), and once a range holds it,
/// it is served.
#[test]
fn load_balancer_source_ranges_drop_outside_clients_in_no_range() {
    require_privileged!("load_balancer_source_ranges_drop_outside_clients_in_no_range");
    load_balancer_source_ranges(false);
}

#[test]
fn load_balancer_source_ranges_drop_outside_clients_in_no_range_with_xdp() {
    require_privileged!("load_balancer_source_ranges_drop_outside_clients_in_no_range_with_xdp");
    load_balancer_source_ranges(true);
}

fn load_balancer_source_ranges(xdp: bool) {
    let env = Env::new(with_xdp(xdp));
    env.c.route_outside_via(0, (LB_IP, 32), 0).unwrap();
    let outside = env.c.outside[0].addr;
    let elsewhere = format!("{}/32", env.addr("client-1"));
    let ranges = |r: &[&str]| json!({"loadBalancerSourceRanges": r});
    env.web_with(
        "LoadBalancer",
        "Cluster",
        vec![env.web_ep(0), env.web_ep(1)],
        ranges(&[&elsewhere]),
    );
    env.wait_programmed(LB_IP, 80, 2);
    let r = curl(env.outside(), LB_IP, 80, Duration::from_secs(2));
    assert!(r.is_err(), "the outside client is in no range: {r:?}");
    assert!(
        env.dropped(0, "drop_source_range") >= 1.0 && (!xdp || env.counter(0, "xdp_drop") >= 1.0),
        "{}",
        env.counters(0)
    );
    let r = curl(env.outside(), env.node_addr(0), NODE_PORT, T);
    assert!(r.is_ok(), "the NodePort is not filtered: {r:?}");
    // The ranges now hold the outside client (bits past the prefix, as a user may write them).
    let wide = format!("{outside}/24");
    env.web_with(
        "LoadBalancer",
        "Cluster",
        vec![env.web_ep(0), env.web_ep(1)],
        ranges(&[&elsewhere, &wide]),
    );
    let ok = eventually(WAIT, || {
        curl(env.outside(), LB_IP, 80, Duration::from_secs(1)).is_ok()
    });
    assert!(ok, "the outside client is in a range now\n{}", env.logs());
    let r = curl(env.outside(), LB_IP, 80, T).unwrap();
    assert_eq!(*r.peer.ip(), LB_IP);
}

#[test]
fn a_terminating_local_endpoint_serves_outside_traffic_while_no_local_one_is_ready() {
    require_privileged!(
        "a_terminating_local_endpoint_serves_outside_traffic_while_no_local_one_is_ready"
    );
    a_terminating_local_endpoint_serves_outside_traffic(false);
}

#[test]
fn a_terminating_local_endpoint_serves_outside_traffic_while_no_local_one_is_ready_with_xdp() {
    require_privileged!(
        "a_terminating_local_endpoint_serves_outside_traffic_while_no_local_one_is_ready_with_xdp"
    );
    a_terminating_local_endpoint_serves_outside_traffic(true);
}

fn a_terminating_local_endpoint_serves_outside_traffic(xdp: bool) {
    let env = Env::new(with_xdp(xdp));
    let web0 = env.addr("web-0");
    env.web(
        "NodePort",
        "Local",
        vec![endpoint(web0, 0, false, true), env.web_ep(1)],
    );
    env.wait_programmed(CLUSTER_IP, 80, 1);
    let r = curl(env.outside(), env.node_addr(0), NODE_PORT, T).unwrap();
    assert_eq!(
        r.body, "web-0",
        "KEP-1669: the serving, terminating local endpoint"
    );
    // Not serving any more: nothing local is left, and outside traffic is dropped.
    env.web(
        "NodePort",
        "Local",
        vec![endpoint(web0, 0, false, false), env.web_ep(1)],
    );
    let ok = eventually(WAIT, || {
        curl(
            env.outside(),
            env.node_addr(0),
            NODE_PORT,
            Duration::from_secs(1),
        )
        .is_err()
    });
    assert!(ok, "node0 kept answering from outside\n{}", env.logs());
}

#[test]
fn the_health_check_node_port_answers_as_kube_proxy_does() {
    require_privileged!("the_health_check_node_port_answers_as_kube_proxy_does");
    let env = Env::new(&[]);
    env.web("LoadBalancer", "Local", vec![env.web_ep(0), env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 2);
    let get = |k: usize| {
        let url = format!("http://{}:{HC_NODE_PORT}/healthz", env.node_addr(k));
        let out = env
            .outside()
            .exec(&["curl", "-s", "-m", "2", "-i", &url])
            .unwrap_or_default();
        out.replace("\r\n", "\n")
    };
    let mut node0 = String::new();
    assert!(
        eventually(WAIT, || {
            node0 = get(0);
            node0.starts_with("HTTP/1.1 200")
        }),
        "node0 said:\n{node0}\n{}",
        env.logs()
    );
    let body = node0.split_once("\n\n").map(|(_, b)| b).unwrap_or_default();
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let headers = node0.to_lowercase();
    assert!(
        headers.contains("content-type: application/json"),
        "{node0}"
    );
    assert!(
        headers.contains("x-load-balancing-endpoint-weight: 1"),
        "{node0}"
    );
    let node2 = get(2);
    assert!(
        node2.starts_with("HTTP/1.1 503"),
        "node2 has no local endpoint:\n{node2}"
    );
    assert!(node2.contains("\"localEndpoints\": 0"), "{node2}");
    // web-0 terminating: it no longer counts, and node0 tells the load balancer to drain it.
    env.web(
        "LoadBalancer",
        "Local",
        vec![endpoint(env.addr("web-0"), 0, false, true), env.web_ep(1)],
    );
    assert!(
        eventually(WAIT, || get(0).starts_with("HTTP/1.1 503")),
        "{}",
        get(0)
    );
    // Turned into a Cluster Service: the port closes.
    env.web("LoadBalancer", "Cluster", vec![env.web_ep(0)]);
    assert!(
        eventually(WAIT, || get(0).is_empty()),
        "still answering:\n{}",
        get(0)
    );
}

/// trafficDistribution PreferSameNode and PreferSameZone: the EndpointSlice controller hints
/// each endpoint for its node (and zone), and kube-proxy keeps a pod's traffic to a Service on
/// the endpoints hinted for its node, else its zone (pkg/proxy/topology.go). Nodes 0 and 1 are
/// in zone-a, node 2 in zone-b; the zones arrive as a Node change under running agents.
#[test]
fn topology_hints_keep_pod_traffic_on_its_node_or_in_its_zone() {
    require_privileged!("topology_hints_keep_pod_traffic_on_its_node_or_in_its_zone");
    let env = Env::new(&[]);
    let zone = |k: usize| if k < 2 { "zone-a" } else { "zone-b" };
    let mut nodes = node_objects(&env.c);
    for (k, n) in nodes.iter_mut().enumerate() {
        n["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": zone(k)});
    }
    env.manifests.write("nodes.yaml", &nodes).unwrap();
    let hinted = |k: usize, for_node: bool| {
        let mut e = env.web_ep(k);
        e["zone"] = json!(zone(k));
        e["hints"] = json!({"forZones": [{"name": zone(k)}]});
        if for_node {
            e["hints"]["forNodes"] = json!([{"name": node_name(k)}]);
        }
        e
    };
    // Waits until node k's pods reach the ClusterIP's port 80 through `want[k]` only.
    let wait_backends = |want: &[Vec<usize>]| {
        for (k, pods) in want.iter().enumerate() {
            let mut expected: Vec<String> = pods
                .iter()
                .map(|&j| format!("{}:8080", env.addr(&format!("web-{j}"))))
                .collect();
            expected.sort();
            let got = || {
                env.services(k)
                    .iter()
                    .find(|f| f["address"] == CLUSTER_IP.to_string() && f["port"] == 80)
                    .and_then(|f| f["backends"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .map(|b| format!("{}:{}", b["address"].as_str().unwrap_or("?"), b["port"]))
                    .collect::<Vec<_>>()
            };
            assert!(
                eventually(WAIT, || {
                    let mut g = got();
                    g.sort();
                    g == expected
                }),
                "node{k}: backends {:?}, want {expected:?}\n{}",
                got(),
                env.logs()
            );
        }
    };
    let answers = |k: usize| -> Vec<String> {
        let ns = &env.c.pod(&format!("client-{k}")).ns;
        (0..8)
            .map(|_| {
                curl(ns, CLUSTER_IP, 80, T)
                    .unwrap_or_else(|e| panic!("client-{k}: {e}\n{}", env.logs()))
                    .body
            })
            .collect()
    };

    // PreferSameNode: every endpoint hinted for its own node.
    env.web(
        "ClusterIP",
        "Cluster",
        (0..NODES).map(|k| hinted(k, true)).collect(),
    );
    wait_backends(&[vec![0], vec![1], vec![2]]);
    for k in 0..NODES {
        let own = format!("web-{k}");
        assert!(
            answers(k).iter().all(|b| *b == own),
            "client-{k} left its node"
        );
    }
    // PreferSameZone: zone hints only.
    env.web(
        "ClusterIP",
        "Cluster",
        (0..NODES).map(|k| hinted(k, false)).collect(),
    );
    wait_backends(&[vec![0, 1], vec![0, 1], vec![2]]);
    for k in 0..2 {
        let got = answers(k);
        assert!(
            got.iter().all(|b| b == "web-0" || b == "web-1"),
            "client-{k} left zone-a: {got:?}"
        );
    }
    assert!(
        answers(2).iter().all(|b| b == "web-2"),
        "client-2 left zone-b"
    );
    // One endpoint without a hint: the hints are ignored, every node uses every endpoint.
    let mut eps: Vec<Value> = (0..NODES).map(|k| hinted(k, false)).collect();
    eps[2]["hints"] = json!({});
    env.web("ClusterIP", "Cluster", eps);
    wait_backends(&[vec![0, 1, 2], vec![0, 1, 2], vec![0, 1, 2]]);
}

#[test]
fn healthz_fails_once_the_node_is_tainted_for_deletion_and_livez_does_not() {
    require_privileged!("healthz_fails_once_the_node_is_tainted_for_deletion_and_livez_does_not");
    let env = Env::new(&[]);
    assert_eq!(env.agents[0].healthz(), Some(200));
    let mut nodes = node_objects(&env.c);
    nodes[0]["spec"] = json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1764504000", "effect": "NoSchedule"}]});
    env.manifests.write("nodes.yaml", &nodes).unwrap();
    assert!(
        eventually(WAIT, || env.agents[0].healthz() == Some(503)),
        "{}",
        env.logs()
    );
    let (_, body) = env.agents[0].get(testbed::agent::HEALTHZ).unwrap();
    assert!(
        body.contains("\"nodeEligible\":false") && body.contains("\"healthy\":true"),
        "{body}"
    );
    let (live, body) = env.agents[0].get("http://127.0.0.1:10256/livez").unwrap();
    assert_eq!(live, 200, "{body}");
    assert!(!body.contains("nodeEligible"), "{body}");
    assert_eq!(
        env.agents[1].healthz(),
        Some(200),
        "other nodes are not affected"
    );
}

#[test]
fn pods_on_a_bridged_node_reach_services_on_their_node_and_themselves() {
    require_privileged!("pods_on_a_bridged_node_reach_services_on_their_node_and_themselves");
    let env = Env::new(&[]);
    env.web("NodePort", "Cluster", vec![env.web_ep(BRIDGE_NODE)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    // Client and backend on the same bridge: the reply is bridged back, not routed.
    let r = curl(&env.c.pod("client-2").ns, CLUSTER_IP, 80, T)
        .unwrap_or_else(|e| panic!("{e}\n{}", env.logs()));
    assert_eq!(r.body, "web-2");
    assert_eq!(r.client.map(|c| *c.ip()), Some(env.addr("client-2")));
    // Hairpin: the backend calling its own Service, SNATed to the hairpin address.
    let r = curl(&env.c.pod("web-2").ns, CLUSTER_IP, 80, T).unwrap();
    assert_eq!(r.body, "web-2");
    assert_eq!(r.client.map(|c| *c.ip()), Some(plan::HAIRPIN_SNAT));
    // Through its own node's NodePort: the reply shows the node's address, and is sent back
    // across the bridge rather than routed (the kernel would drop it as a martian).
    let node = env.node_addr(BRIDGE_NODE);
    let r = curl(&env.c.pod("web-2").ns, node, NODE_PORT, T)
        .unwrap_or_else(|e| panic!("{e}\n{}", env.logs()));
    assert_eq!(r.body, "web-2");
    assert_eq!(r.client.map(|c| *c.ip()), Some(plan::HAIRPIN_SNAT));
    // And across nodes, from a routed node to the bridged one.
    assert_eq!(
        curl(&env.c.pod("client-0").ns, CLUSTER_IP, 80, T)
            .unwrap()
            .body,
        "web-2"
    );
}

#[test]
fn a_udp_client_connected_to_a_service_gets_econnrefused_from_a_remote_backend() {
    require_privileged!(
        "a_udp_client_connected_to_a_service_gets_econnrefused_from_a_remote_backend"
    );
    let env = Env::new(&[]);
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 54, 1);
    // Nothing listens on the backend's port: its port unreachable must reach the client's
    // socket, which only matches it if the quoted packet shows the Service address.
    let pod = &env.c.pod("client-0").ns;
    assert_eq!(
        udp_connected(pod, CLUSTER_IP, 54, "x", T).unwrap(),
        UdpOutcome::Refused,
        "{}",
        env.logs()
    );
    assert!(env.counter(0, "icmp_error") >= 1.0);
    // A control: an open port answers.
    assert!(matches!(
        udp_connected(pod, CLUSTER_IP, 53, "x", T).unwrap(),
        UdpOutcome::Reply { .. }
    ));
}

#[test]
fn path_mtu_discovery_works_through_a_service_to_a_node_behind_a_narrower_link() {
    require_privileged!(
        "path_mtu_discovery_works_through_a_service_to_a_node_behind_a_narrower_link"
    );
    let env = Env::new(&[]);
    env.c.narrow_link(1, 1300).unwrap();
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    const BYTES: usize = 300_000;
    // From a pod through a ClusterIP: node0's stack answers the oversized packets with ICMP
    // fragmentation needed about the translated packet; the client learns the path MTU only
    // if the quote is put back to the ClusterIP.
    let up = http_upload(
        &env.c.pod("client-0").ns,
        CLUSTER_IP,
        80,
        BYTES,
        Duration::from_secs(10),
    );
    assert_eq!(
        up.as_deref().ok(),
        Some(format!("web-1 {BYTES}").as_str()),
        "{up:?}\n{}",
        env.logs()
    );
    // From outside through node0's NodePort (SNAT, forwarded by redirect): sluice itself
    // answers packets too big for the route.
    let up = http_upload(
        env.outside(),
        env.node_addr(0),
        NODE_PORT,
        BYTES,
        Duration::from_secs(10),
    );
    assert_eq!(
        up.as_deref().ok(),
        Some(format!("web-1 {BYTES}").as_str()),
        "{up:?}\nnode0's counters:\n{}\n{}",
        env.counters(0),
        env.logs()
    );
    assert!(
        env.counter(0, "reject_frag_needed") >= 1.0,
        "{}",
        env.logs()
    );
}

#[test]
fn snat_source_ports_run_out_cleanly_and_are_counted_never_reused_under_a_live_flow() {
    require_privileged!(
        "snat_source_ports_run_out_cleanly_and_are_counted_never_reused_under_a_live_flow"
    );
    // Two SNAT ports for the whole node.
    let env = Env::new(&["--snat-port-range", "20000-20001"]);
    env.web("NodePort", "Cluster", vec![env.web_ep(1)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    let node = env.node_addr(0);
    // Two long-lived connections take both ports (40 requests, 100 ms apart: 4 s each).
    let held: Vec<testbed::KeepAlive> = (0..2)
        .map(|_| {
            let mut ka = testbed::KeepAlive::start(
                env.outside(),
                node,
                NODE_PORT,
                40,
                Duration::from_millis(100),
            )
            .unwrap();
            ka.connected().expect("a long-lived connection is made");
            ka
        })
        .collect();
    let third = curl(env.outside(), node, NODE_PORT, Duration::from_secs(2));
    assert!(third.is_err(), "a third flow got a port: {third:?}");
    assert!(
        env.counter(0, "drop_snat_ports_exhausted") >= 1.0,
        "{}",
        env.logs()
    );
    for k in held {
        let lines = k.finish(Duration::from_secs(15));
        let ok = lines.iter().filter(|l| l.starts_with("OK web-1")).count();
        assert_eq!(ok, 40, "a live flow was disturbed: {lines:?}");
    }
}

/// Panics unless the IPv4 packet `ip` (as the sniffer captured it, from its IP header) carries
/// a right header checksum and a right TCP checksum, computed here by etherparse.
fn assert_checksums(ip: &[u8]) {
    let s = etherparse::SlicedPacket::from_ip(ip).expect("an IPv4 packet");
    let Some(etherparse::NetSlice::Ipv4(v4)) = &s.net else {
        panic!("not IPv4: {ip:02x?}")
    };
    let h = v4.header();
    assert_eq!(
        h.header_checksum(),
        h.to_header().calc_header_checksum(),
        "IPv4 header checksum"
    );
    let Some(etherparse::TransportSlice::Tcp(t)) = &s.transport else {
        panic!("not TCP: {ip:02x?}")
    };
    assert_eq!(
        t.checksum(),
        t.calc_checksum_ipv4(h.source(), h.destination()).unwrap(),
        "TCP checksum of {ip:02x?}"
    );
}

/// XDP on the uplinks (`--xdp-mode`): NodePort from outside to a local backend, the
/// connection started at XDP and its established packets DNATed at XDP, arriving with right
/// checksums (verified here, not by the kernel: a veth marks what it forwards as checked); to
/// a remote backend, SNATed at XDP and sent out by XDP_TX both ways, and a connection started
/// at XDP once the route's neighbour is known, checksums verified at both ends; and a connection that goes on, on its backend, while the agent restarts with XDP off
/// and then on again. In native mode the fabric's ends of the uplinks take XDP frames (an XDP
/// program there), which a veth uplink's peer must for XDP_TX, and the agents are told so
/// (`--xdp-tx on`); in generic mode `auto` sends.
fn xdp_on_the_uplinks(mode: &str) {
    let native = mode == "native";
    let mut args = vec!["--xdp-mode", mode];
    if native {
        args.extend(["--xdp-tx", "on"]);
    }
    let mut env = Env::new(&args);
    let _peers = native.then(|| peers_take_xdp_frames(&env));
    let xdp_mode = |env: &Env, k: usize, m: &str, tx: &str| {
        env.agents[k].metric(&format!(
            "sluice_xdp_uplinks{{device=\"eth0\",mode=\"{m}\",tx=\"{tx}\"}}"
        ))
    };
    for k in 0..NODES {
        assert_eq!(
            xdp_mode(&env, k, mode, "on"),
            Some(1.0),
            "node{k}\n{}",
            env.logs()
        );
    }
    env.web("NodePort", "Cluster", vec![env.web_ep(0)]);
    env.wait_programmed(CLUSTER_IP, 80, 1);
    let (outside, web0) = (env.c.outside[0].addr, env.addr("web-0"));

    // To the local backend: the upload's connection starts at XDP (its SYN: backend chosen
    // and the flow recorded there), and its data packets are DNATed at XDP. The sniffer
    // counts the first 20 of the upload's 70-odd packets: AF_PACKET may miss one under load.
    let n = 20;
    let sniff = Sniffer::start(&env.c.pod("web-0").ns, "eth0", outside, web0, n, T).unwrap();
    let (hits, new_flows) = (env.counter(0, "xdp_ct_hit"), env.counter(0, "xdp_new_flow"));
    let up = http_upload(env.outside(), env.node_addr(0), NODE_PORT, 100_000, T)
        .unwrap_or_else(|e| panic!("upload through XDP: {e}\n{}", env.logs()));
    assert_eq!(up, "web-0 100000");
    let seen = sniff.finish();
    assert_eq!(seen.len(), n as usize, "packets the backend received");
    for p in &seen {
        assert_checksums(p);
    }
    let xdp_hits = env.counter(0, "xdp_ct_hit") - hits;
    assert!(
        xdp_hits >= 30.0,
        "an upload of 100 kB made {xdp_hits} XDP hits\n{}",
        env.counters(0)
    );
    assert_eq!(
        env.counter(0, "xdp_new_flow") - new_flows,
        1.0,
        "the upload's connection started at XDP\n{}",
        env.counters(0)
    );

    // To a remote backend through node1: TC's new flow (backend, SNAT port, redirect), then
    // the upload's packets SNATed and the backend's ACKs reverse-translated at node1's XDP,
    // each sent back out of its uplink (XDP_TX), and never seen by TC.
    let node1 = env.node_addr(1);
    let to_backend = Sniffer::start(&env.c.pod("web-0").ns, "eth0", node1, web0, n, T).unwrap();
    let to_client = Sniffer::start(env.outside(), "eth0", node1, outside, 10, T).unwrap();
    let (sent, tc_hits) = (env.counter(1, "xdp_tx"), env.counter(1, "ct_hit"));
    let up = http_upload(env.outside(), node1, NODE_PORT, 100_000, T)
        .unwrap_or_else(|e| panic!("upload through node1's XDP: {e}\n{}", env.logs()));
    assert_eq!(up, "web-0 100000");
    for p in to_backend.finish().iter().chain(&to_client.finish()) {
        assert_checksums(p);
    }
    let sent = env.counter(1, "xdp_tx") - sent;
    assert!(
        sent >= 30.0,
        "an upload of 100 kB through node1 sent {sent} packets from XDP\n{}",
        env.counters(1)
    );
    assert!(
        env.counter(1, "ct_hit") - tc_hits < 10.0,
        "TC still served the established flow's packets\n{}",
        env.counters(1)
    );
    // The route's neighbour resolved by now (where XDP cannot send yet, TC resolves it for
    // the flow's first packet), the next connection through node1 starts at XDP: backend,
    // SNAT port, entries, sent out.
    let (new_tx, tc_new) = (
        env.counter(1, "xdp_new_flow_tx"),
        env.counter(1, "new_flow_snat"),
    );
    let r = curl(env.outside(), node1, NODE_PORT, T)
        .unwrap_or_else(|e| panic!("NodePort of node1: {e}\n{}", env.logs()));
    assert_eq!(
        (r.body.as_str(), r.client.map(|c| *c.ip())),
        ("web-0", Some(node1)),
        "SNATed to node1"
    );
    assert_eq!(
        (
            env.counter(1, "xdp_new_flow_tx") - new_tx,
            env.counter(1, "new_flow_snat") - tc_new
        ),
        (1.0, 0.0),
        "the connection through node1 started at XDP, not TC\n{}",
        env.counters(1)
    );

    // Partial checksums (offload on at the outside client's device and at the fabric's port to
    // node0, so the frames reach node0's uplink with only the pseudo-header's sum, as from a
    // veth peer with offload): XDP cannot see that, recognises the pattern and leaves those
    // packets to TC, whose helpers update them right. Updated as full ones, they would be
    // dropped at the backend and the upload would stall.
    let offload = |on: &str| {
        env.outside()
            .exec(&["ethtool", "-K", "eth0", "tx", on])
            .unwrap();
        env.c
            .fabric
            .exec(&["ethtool", "-K", "n0", "tx", on])
            .unwrap();
    };
    offload("on");
    let (partial, hits) = (
        env.counter(0, "xdp_to_tc_partial_csum"),
        env.counter(0, "xdp_ct_hit"),
    );
    let up = http_upload(env.outside(), env.node_addr(0), NODE_PORT, 100_000, T);
    offload("off");
    assert_eq!(
        up.unwrap_or_else(|e| panic!("upload with partial checksums: {e}\n{}", env.logs())),
        "web-0 100000"
    );
    // (Generic XDP runs once per GSO packet the fabric's port now forwards whole: fewer runs.)
    let to_tc = env.counter(0, "xdp_to_tc_partial_csum") - partial;
    assert!(
        to_tc >= 5.0 && env.counter(0, "xdp_ct_hit") == hits,
        "{to_tc} partial checksums left to TC, and none translated at XDP\n{}",
        env.counters(0)
    );

    // XDP off and on again under a live connection, which goes on until every step is done
    // (at most 3,000 requests: 2 minutes).
    let mut ka = KeepAlive::until_stopped(
        env.outside(),
        env.node_addr(0),
        NODE_PORT,
        3_000,
        Duration::from_millis(40),
    )
    .unwrap();
    ka.connected().expect("the client connected");
    let hits = env.counter(0, "xdp_ct_hit");
    assert!(
        eventually(WAIT, || env.counter(0, "xdp_ct_hit") > hits),
        "the connection's requests are XDP hits\n{}",
        env.counters(0)
    );
    let xdp_tx = |env: &Env| pinned_hash::<u32>(env, proxy_common::LB4_XDP_TX_MAP);
    let eth0 = env.c.nodes[0]
        .ns
        .run_in(|| nix::net::if_::if_nametoindex("eth0").unwrap())
        .unwrap();
    let sends = |env: &Env| {
        let mut keys: Vec<u32> = xdp_tx(env).keys().map(Result::unwrap).collect();
        keys.sort_unstable();
        keys
    };
    assert_eq!(sends(&env), vec![eth0], "node0's uplink sends from XDP");
    // Every XDP uplink's own MAC address, for XDP to tell frames for other hosts by.
    let uplink_macs = |env: &Env| pinned_hash::<u64>(env, proxy_common::LB4_UPLINK_MACS_MAP);
    let macs = |env: &Env| {
        let mut all: Vec<(u32, u64)> = uplink_macs(env).iter().map(Result::unwrap).collect();
        all.sort_unstable();
        all
    };
    let eth0_mac = env.c.nodes[0]
        .ns
        .run_in(|| sluice::dataplane::device_mac("eth0").unwrap())
        .unwrap();
    let own = vec![(eth0, sluice::dataplane::uplink_mac_value(eth0_mac))];
    assert_eq!(macs(&env), own, "node0's uplink's MAC address, for XDP");
    // `sluice features` on the node shows the choice per uplink, read from the agent's pins.
    let uplinks = |env: &Env| -> serde_json::Value {
        let pins = env.bpffs[0].path().join("sluice");
        let out = env.c.nodes[0]
            .ns
            .exec(&[
                env!("CARGO_BIN_EXE_sluice"),
                "features",
                "--pin-path",
                pins.to_str().unwrap(),
                "-o",
                "json",
            ])
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["xdp_uplinks"].clone()
    };
    let row = |tx: Option<&str>| serde_json::json!([{"device": "eth0", "mode": mode, "tx": tx, "driver": "veth"}]);
    assert_eq!(
        uplinks(&env),
        row(Some(mode)),
        "the features report, XDP on"
    );
    env.restart_agent(0, &["--xdp-mode", "off"], 2);
    assert_eq!(xdp_mode(&env, 0, "off", "off"), Some(1.0), "{}", env.logs());
    assert_eq!(
        uplinks(&env),
        serde_json::json!([]),
        "the features report, XDP off"
    );
    assert_eq!(
        sends(&env),
        Vec::<u32>::new(),
        "no XDP, nothing sent from it"
    );
    assert_eq!(macs(&env), vec![], "no XDP, no uplink address for it");
    let seen = env.counter(0, "xdp_seen");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        env.counter(0, "xdp_seen"),
        seen,
        "with XDP off, the XDP program sees nothing"
    );
    let tc_hits = env.counter(0, "ct_hit");
    assert!(
        eventually(WAIT, || env.counter(0, "ct_hit") > tc_hits),
        "TC serves the connection meanwhile\n{}",
        env.counters(0)
    );
    // Back with `--xdp-tx` left to `auto`: a veth uplink in native mode does not send from
    // XDP (its peer may not take XDP frames); in generic mode it does. Either way the
    // connection's packets are DNATed at XDP. What XDP may send to (`LB4_XDP_TX`, pinned) is
    // pruned to that: a device an earlier agent let send, now gone, is dropped.
    const GONE: u32 = 4242;
    xdp_tx(&env).insert(&GONE, &1, 0).unwrap();
    uplink_macs(&env).insert(&GONE, &1, 0).unwrap();
    env.restart_agent(0, &["--xdp-mode", mode], 3);
    let tx = if native { "off" } else { "on" };
    assert_eq!(xdp_mode(&env, 0, mode, tx), Some(1.0), "{}", env.logs());
    let want = if native { vec![] } else { vec![eth0] };
    assert_eq!(
        sends(&env),
        want,
        "a device gone, and a veth not let send, are pruned"
    );
    assert_eq!(
        uplinks(&env),
        row((!native).then_some(mode)),
        "the features report, XDP back with tx auto"
    );
    assert_eq!(
        macs(&env),
        own,
        "the uplink's address written again whether it sends or not, a device gone pruned"
    );
    let hits = env.counter(0, "xdp_ct_hit");
    assert!(
        eventually(WAIT, || env.counter(0, "xdp_ct_hit") > hits),
        "XDP is back on the connection\n{}",
        env.counters(0)
    );
    let lines = ka.stop(Duration::from_secs(30));
    let oks: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("OK ")).collect();
    assert_eq!(
        oks.len(),
        lines.len() - 2,
        "requests lost while XDP went off and on: {lines:?}\n{}",
        env.logs()
    );
    assert!(
        oks.len() < 3_000,
        "the steps outlasted the connection's requests"
    );
    assert!(oks.iter().all(|b| *b == "web-0"), "{oks:?}");
    assert_eq!(lines.last().map(String::as_str), Some("DONE"));
}

/// Node 0's pinned hash map `name`, keyed by uplink ifindex.
fn pinned_hash<V: aya::Pod>(
    env: &Env,
    name: &str,
) -> aya::maps::HashMap<aya::maps::MapData, u32, V> {
    let pin = env.bpffs[0].path().join("sluice").join(name);
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

/// The fabric's ends of the nodes' uplinks (`n<k>`) made to take XDP frames, as native XDP_TX
/// on a veth needs of its peer, for as long as the returned object lives.
fn peers_take_xdp_frames(env: &Env) -> aya::Ebpf {
    let peers: Vec<String> = (0..NODES).map(|k| format!("n{k}")).collect();
    common::take_xdp_frames(&env.c.fabric, &peers)
}

#[test]
fn xdp_native_on_the_uplinks_starts_and_translates_flows_and_can_go_off_and_on_under_traffic() {
    require_privileged!(
        "xdp_native_on_the_uplinks_starts_and_translates_flows_and_can_go_off_and_on_under_traffic"
    );
    xdp_on_the_uplinks("native");
}

#[test]
fn xdp_generic_on_the_uplinks_starts_and_translates_flows_and_can_go_off_and_on_under_traffic() {
    require_privileged!(
        "xdp_generic_on_the_uplinks_starts_and_translates_flows_and_can_go_off_and_on_under_traffic"
    );
    xdp_on_the_uplinks("generic");
}

/// Asks the UDP echo at `addr:53` from source port `port` of the outside client; its answer
/// names the backend (`web-K x`).
fn udp_from_port(env: &Env, addr: Ipv4Addr, port: u16) -> String {
    const PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(3)
s.sendto(b"x", (sys.argv[1], 53))
print(s.recv(2048).decode())
"#;
    env.outside()
        .exec(&["python3", "-c", PY, &addr.to_string(), &port.to_string()])
        .unwrap_or_else(|e| panic!("UDP from port {port}: {e}\n{}", env.logs()))
        .trim()
        .to_owned()
}

/// `--lb-algorithm maglev`: a router in front of the nodes (ECMP) may send a flow's packets to
/// any of them; each node then picks the same backend for it. The outside client's route to
/// the LoadBalancer IP goes through node0, then node1: every flow (source port) is answered by
/// the same pod through both, and the flows spread over the three.
#[test]
fn maglev_sends_a_flow_from_outside_to_the_same_backend_through_any_node() {
    require_privileged!("maglev_sends_a_flow_from_outside_to_the_same_backend_through_any_node");
    let env = Env::new(&["--lb-algorithm", "maglev"]);
    env.web(
        "LoadBalancer",
        "Cluster",
        vec![env.web_ep(0), env.web_ep(1), env.web_ep(2)],
    );
    env.wait_programmed(CLUSTER_IP, 80, 3);
    let ports: Vec<u16> = (0..12).map(|i| 41_000 + i).collect();
    env.c.route_outside_via(0, (LB_IP, 32), 0).unwrap();
    let via0: Vec<String> = ports
        .iter()
        .map(|&p| udp_from_port(&env, LB_IP, p))
        .collect();
    env.outside()
        .ip(&[
            "route",
            "replace",
            &format!("{LB_IP}/32"),
            "via",
            &env.node_addr(1).to_string(),
        ])
        .unwrap();
    let via1: Vec<String> = ports
        .iter()
        .map(|&p| udp_from_port(&env, LB_IP, p))
        .collect();
    assert_eq!(via0, via1, "each flow's backend through node0, then node1");
    let backends: std::collections::BTreeSet<&String> = via0.iter().collect();
    assert!(backends.len() >= 2, "the flows spread: {via0:?}");
    assert!(
        env.counter(1, "new_flow_snat") + env.counter(1, "new_flow") >= 12.0,
        "node1 chose for itself\n{}",
        env.counters(1)
    );
}
