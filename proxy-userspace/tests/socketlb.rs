//! Socket-level load balancing on a two-node sandbox whose nodes and pods have cgroups of their
//! own (the test makes them under the cgroup v2 mount, as a real node has its tree with its
//! pods below it). Each node's agent attaches its socket programs to its node's cgroup, and
//! only the processes these tests start run there.
//!
//! What each test asserts is what the application sees: who answered, the peer its socket
//! shows (`getpeername`), where a UDP reply came from (`recvmsg`), the error a refused
//! `connect()` gets; and what the node's datapath did (counters, conntrack).
use std::{net::Ipv4Addr, path::Path, time::Duration};

use serde_json::{Value, json};
use testbed::{
    BpfFs, ClientLoop, Cluster, Connect, HttpServer, LoopEvent, UdpEcho,
    agent::{
        AgentProcess, ManifestsDir, cli_json, eventually, node_objects, sandbox_args, services_json,
    },
    curl,
    plan::node_name,
    require_privileged, tcp_connect, udp_request,
};

const T: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 40);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 192, 40);
const NODE_PORT: u16 = 30100;
const UDP_ECHO: u16 = 5353;

struct Env {
    // Field order is drop order: agents first, the cluster (namespaces, cgroups) last.
    agents: Vec<Option<AgentProcess>>,
    _http: Vec<HttpServer>,
    _udp: Vec<UdpEcho>,
    bpffs: Vec<BpfFs>,
    manifests: ManifestsDir,
    c: Cluster,
}

impl Env {
    /// Two nodes with cgroups; pods `web-0` (node0) and `web-1` (node1) serving HTTP on 8080
    /// and a UDP echo, `client` on node0; an agent per node with `--socket-lb mode`.
    fn new(mode: &str) -> Self {
        let mut c = Cluster::new(2).unwrap();
        c.add_cgroups().unwrap();
        c.add_pod(0, "web-0").unwrap();
        c.add_pod(1, "web-1").unwrap();
        c.add_pod(0, "client").unwrap();
        let http = ["web-0", "web-1"]
            .iter()
            .map(|p| HttpServer::start(&c.pod(p).ns, p, 8080).unwrap())
            .collect();
        let udp = ["web-0", "web-1"]
            .iter()
            .map(|p| UdpEcho::start(&c.pod(p).ns, p, UDP_ECHO).unwrap())
            .collect();
        let manifests = ManifestsDir::new().unwrap();
        manifests.write("nodes.yaml", &node_objects(&c)).unwrap();
        let mut env = Self {
            agents: vec![None, None],
            _http: http,
            _udp: udp,
            bpffs: vec![BpfFs::new().unwrap(), BpfFs::new().unwrap()],
            manifests,
            c,
        };
        for k in 0..2 {
            env.start_agent(k, mode, &[]);
        }
        env
    }

    /// (Re)starts node `k`'s agent with `--socket-lb mode` on the node's cgroup.
    fn start_agent(&mut self, k: usize, mode: &str, extra: &[&str]) {
        self.agents[k] = None;
        let pins = self.bpffs[k].path().join("sluice");
        let dir = self.manifests.path().display().to_string();
        let cgroup = self.c.nodes[k]
            .cgroup
            .as_ref()
            .unwrap()
            .path()
            .display()
            .to_string();
        let mut flags = vec![
            "--manifests",
            dir.as_str(),
            "--socket-lb",
            mode,
            "--cgroup-root",
            cgroup.as_str(),
        ];
        flags.extend_from_slice(extra);
        let args = sandbox_args(&node_name(k), &pins, &flags);
        let log = self.bpffs[k].path().with_extension("log");
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        let mut agent = AgentProcess::start(&self.c.nodes[k].ns, bin, &args, &log).unwrap();
        agent.wait_started();
        self.agents[k] = Some(agent);
    }

    fn agent(&self, k: usize) -> &AgentProcess {
        self.agents[k].as_ref().unwrap()
    }

    fn addr(&self, pod: &str) -> Ipv4Addr {
        self.c.pod(pod).addr
    }

    /// Service `web`: ClusterIP (with an externalIP and a nodePort) TCP 80 -> 8080, UDP 53 ->
    /// 5353, with `endpoints` (pod name, ready, terminating).
    fn web(&self, endpoints: &[(&str, bool, bool)]) {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(p, ready, terminating)| {
                let node = if *p == "web-1" { 1 } else { 0 };
                json!({"addresses": [self.addr(p).to_string()], "nodeName": node_name(node),
                       "conditions": {"ready": ready, "serving": *ready || *terminating, "terminating": terminating}})
            })
            .collect();
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": CLUSTER_IP.to_string(), "clusterIPs": [CLUSTER_IP.to_string()],
                "externalIPs": [EXTERNAL_IP.to_string()],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": NODE_PORT},
                    {"name": "dns", "port": 53, "targetPort": UDP_ECHO, "protocol": "UDP"},
                ],
            },
        });
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": UDP_ECHO, "protocol": "UDP"}],
            "endpoints": eps,
        });
        self.manifests.write("web.yaml", &[svc, slice]).unwrap();
    }

    /// The backends node `k`'s maps hold for `addr:port`/`proto` (none if not programmed).
    fn backends(&self, k: usize, addr: Ipv4Addr, port: u16, proto: &str) -> Option<Vec<String>> {
        let pins = self.bpffs[k].path().join("sluice");
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        services_json(&self.c.nodes[k].ns, bin, &pins)
            .into_iter()
            .find(|f| {
                f["address"] == addr.to_string() && f["port"] == port && f["protocol"] == proto
            })
            .map(|f| {
                f["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b["address"].as_str().map(str::to_owned))
                    .collect()
            })
    }

    /// Waits until both nodes hold exactly `pods` behind the ClusterIP's TCP and UDP ports.
    fn wait_programmed(&self, pods: &[&str]) {
        let mut want: Vec<String> = pods.iter().map(|p| self.addr(p).to_string()).collect();
        want.sort();
        let ok = eventually(WAIT, || {
            (0..2).all(|k| {
                ["TCP", "UDP"].iter().all(|proto| {
                    let port = if *proto == "TCP" { 80 } else { 53 };
                    self.backends(k, CLUSTER_IP, port, proto).map(|mut b| {
                        b.sort();
                        b
                    }) == Some(want.clone())
                })
            })
        });
        assert!(ok, "web was not programmed with {pods:?}\n{}", self.logs());
    }

    fn conntrack(&self, k: usize) -> Vec<Value> {
        let pins = self.bpffs[k].path().join("sluice");
        cli_json(
            &self.c.nodes[k].ns,
            Path::new(env!("CARGO_BIN_EXE_sluice")),
            &pins,
            "conntrack",
        )
    }

    fn counter(&self, k: usize, name: &str) -> f64 {
        self.agent(k).packets(name)
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(k, a)| {
                a.as_ref()
                    .map(|a| format!("--- agent on node{k}:\n{}", a.log()))
            })
            .collect()
    }

    fn node(&self, k: usize) -> &testbed::Netns {
        &self.c.nodes[k].ns
    }

    fn client(&self) -> &testbed::Netns {
        &self.c.pod("client").ns
    }
}

#[test]
fn a_node_process_reaches_cluster_ip_node_port_and_external_ip_over_tcp_and_udp() {
    require_privileged!(
        "a_node_process_reaches_cluster_ip_node_port_and_external_ip_over_tcp_and_udp"
    );
    let env = Env::new("all");
    env.web(&[("web-0", true, false), ("web-1", true, false)]);
    env.wait_programmed(&["web-0", "web-1"]);
    let node_addr = env.c.nodes[0].addr;
    let before = env.counter(0, "sock_connect");
    let mut answered = std::collections::BTreeSet::new();
    for (addr, port) in [(CLUSTER_IP, 80), (node_addr, NODE_PORT), (EXTERNAL_IP, 80)] {
        for _ in 0..10 {
            let r = curl(env.node(0), addr, port, T)
                .unwrap_or_else(|e| panic!("{addr}:{port} from node0: {e}\n{}", env.logs()));
            // The application sees what it dialled, not the backend (getpeername4).
            assert_eq!(
                (*r.peer.ip(), r.peer.port()),
                (addr, port),
                "the peer node0's curl saw"
            );
            answered.insert(r.body);
        }
    }
    assert_eq!(
        answered,
        ["web-0".to_owned(), "web-1".to_owned()].into(),
        "30 calls from node0 should reach both pods"
    );
    assert!(
        env.counter(0, "sock_connect") >= before + 30.0,
        "connects translated: {}",
        env.counter(0, "sock_connect")
    );
    // UDP: the reply comes from the Service address (recvmsg4).
    let u = udp_request(env.node(0), CLUSTER_IP, 53, "hi", T).unwrap();
    assert!(u.data.ends_with(" hi"), "{u:?}");
    assert_eq!(u.from, std::net::SocketAddrV4::new(CLUSTER_IP, 53));
    // Translated at the socket: no flow in node0's conntrack.
    let flows = env.conntrack(0);
    assert!(
        flows.iter().all(|f| f["client"]
            .as_str()
            .is_none_or(|c| !c.starts_with(&format!("{node_addr}:")))),
        "node0's own calls left conntrack entries: {flows:?}"
    );
}

#[test]
fn host_only_leaves_pod_traffic_to_tc_all_translates_it_at_connect_and_off_detaches() {
    require_privileged!(
        "host_only_leaves_pod_traffic_to_tc_all_translates_it_at_connect_and_off_detaches"
    );
    let mut env = Env::new("host-only");
    env.web(&[("web-0", true, false), ("web-1", true, false)]);
    env.wait_programmed(&["web-0", "web-1"]);
    let client = env.addr("client");
    let from_client = |env: &Env| {
        env.conntrack(0)
            .iter()
            .filter(|f| {
                f["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{client}:")))
            })
            .count()
    };
    // host-only: the pod's connection goes through TC (a conntrack entry), node0's through
    // its socket.
    let r = curl(env.client(), CLUSTER_IP, 80, T).unwrap();
    assert_eq!(*r.peer.ip(), CLUSTER_IP);
    assert_eq!(from_client(&env), 1, "{:?}", env.conntrack(0));
    assert!(env.counter(0, "sock_pass_to_tc") >= 1.0);
    assert!(curl(env.node(0), CLUSTER_IP, 80, T).is_ok());
    assert!(env.counter(0, "sock_connect") >= 1.0);
    // all: the pod's connections are translated at connect(); conntrack sees none of them.
    env.start_agent(0, "all", &[]);
    for _ in 0..5 {
        let r = curl(env.client(), CLUSTER_IP, 80, T).unwrap();
        assert_eq!(*r.peer.ip(), CLUSTER_IP, "getpeername in the pod");
        assert_eq!(
            r.client.map(|c| *c.ip()),
            Some(client),
            "the backend sees the pod"
        );
    }
    assert_eq!(
        from_client(&env),
        1,
        "new conntrack entries: {:?}",
        env.conntrack(0)
    );
    assert!(env.counter(0, "sock_connect") >= 5.0);
    // off: the links go; a node process no longer reaches the ClusterIP (no TC program
    // translates the node's own traffic), while pods still do, through TC.
    env.start_agent(0, "off", &[]);
    let c = tcp_connect(env.node(0), CLUSTER_IP, 80, Duration::from_secs(1)).unwrap();
    assert!(!matches!(c, Connect::Connected(_)), "{c:?}");
    assert!(curl(env.client(), CLUSTER_IP, 80, T).is_ok());
    assert_eq!(from_client(&env), 2, "{:?}", env.conntrack(0));
}

/// Waits until `l` has an answer from `pod`; returns the loop's clock then.
fn wait_answer(l: &ClientLoop, pod: &str, env: &Env) -> f64 {
    let mut seen = None;
    let ok = eventually(WAIT, || {
        seen = l.events().iter().find_map(|e| match e {
            LoopEvent::Answered(t, who) if who == pod => Some(*t),
            _ => None,
        });
        seen.is_some()
    });
    assert!(ok, "no answer from {pod}: {:?}\n{}", l.events(), env.logs());
    seen.unwrap()
}

/// Socket LB `mode`, Service `web` with web-1 alone, and a client in the pod `client` that
/// keeps one connected UDP socket (opening another only after an error, as a DNS forwarder
/// does), sending every 50 ms, answered by web-1.
fn udp_client_on_web_1(mode: &str) -> (Env, ClientLoop) {
    let env = Env::new(mode);
    env.web(&[("web-1", true, false)]);
    env.wait_programmed(&["web-1"]);
    let l = ClientLoop::start(
        env.client(),
        true,
        CLUSTER_IP,
        53,
        30.0,
        Duration::from_millis(50),
    )
    .unwrap();
    wait_answer(&l, "web-1", &env);
    (env, l)
}

#[test]
fn a_connected_udp_client_is_answered_by_a_live_backend_within_1s_of_its_backends_removal() {
    require_privileged!(
        "a_connected_udp_client_is_answered_by_a_live_backend_within_1s_of_its_backends_removal"
    );
    udp_client_moves_within_1s("all", "sluice_sockets_destroyed_total");
}

/// The same through the TC path (socket LB off): the socket keeps its source port, so
/// conntrack would keep the flow on web-1; the agent forgets the flow instead.
#[test]
fn a_fixed_port_udp_client_through_tc_is_answered_by_a_live_backend_within_1s_of_its_removal() {
    require_privileged!(
        "a_fixed_port_udp_client_through_tc_is_answered_by_a_live_backend_within_1s_of_its_removal"
    );
    udp_client_moves_within_1s("off", "sluice_udp_flows_forgotten_total");
}

/// web-1 leaves the Service for web-0 under a connected UDP client: a live backend answers
/// within 1 s of the change, `metric` counts what the agent did, and web-1 never answers again.
fn udp_client_moves_within_1s(mode: &str, metric: &str) {
    let (env, l) = udp_client_on_web_1(mode);
    env.web(&[("web-0", true, false)]);
    env.wait_programmed(&["web-0"]);
    let changed = l.elapsed();
    let first = wait_answer(&l, "web-0", &env);
    assert!(
        first - changed <= 1.0,
        "first answer from a live backend {:.2} s after the change was applied",
        first - changed
    );
    assert!(
        env.agent(0).metric(metric).is_some_and(|n| n >= 1.0),
        "{}",
        env.agent(0).metrics()
    );
    // And never web-1 again.
    std::thread::sleep(Duration::from_millis(500));
    let late: Vec<_> = l
        .events()
        .into_iter()
        .filter(|e| matches!(e, LoopEvent::Answered(t, who) if *t > first && who == "web-1"))
        .collect();
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn a_terminating_backend_keeps_its_connected_udp_sockets() {
    require_privileged!("a_terminating_backend_keeps_its_connected_udp_sockets");
    terminating_keeps("all", "sluice_sockets_destroyed_total");
}

/// The same through the TC path: a terminating backend keeps its UDP flows.
#[test]
fn a_terminating_backend_keeps_its_udp_flows_through_tc() {
    require_privileged!("a_terminating_backend_keeps_its_udp_flows_through_tc");
    terminating_keeps("off", "sluice_udp_flows_forgotten_total");
}

fn terminating_keeps(mode: &str, metric: &str) {
    let (env, l) = udp_client_on_web_1(mode);
    // web-1 terminating (still serving), web-0 ready: new connections go to web-0, the
    // existing one goes on with web-1 until it ends (kube-proxy's rule).
    env.web(&[("web-0", true, false), ("web-1", false, true)]);
    env.wait_programmed(&["web-0"]);
    let changed = l.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<LoopEvent> = l
        .events()
        .into_iter()
        .filter(|e| match e {
            LoopEvent::Answered(t, _) | LoopEvent::Failed(t, _) => *t > changed,
        })
        .collect();
    assert!(after.len() >= 10, "{after:?}");
    assert!(
        after
            .iter()
            .all(|e| matches!(e, LoopEvent::Answered(_, who) if who == "web-1")),
        "{after:?}"
    );
    assert_eq!(env.agent(0).metric(metric), Some(0.0));
}

#[test]
fn an_agent_killed_under_load_loses_nothing_at_the_socket() {
    require_privileged!("an_agent_killed_under_load_loses_nothing_at_the_socket");
    let mut env = Env::new("all");
    env.web(&[("web-0", true, false), ("web-1", true, false)]);
    env.wait_programmed(&["web-0", "web-1"]);
    let pause = Duration::from_millis(20);
    let mut loops = [
        ClientLoop::start(env.client(), false, CLUSTER_IP, 80, 6.0, pause).unwrap(),
        ClientLoop::start(env.node(0), false, CLUSTER_IP, 80, 6.0, pause).unwrap(),
        ClientLoop::start(env.client(), true, CLUSTER_IP, 53, 6.0, pause).unwrap(),
    ];
    std::thread::sleep(Duration::from_secs(1));
    env.agents[0].as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    env.start_agent(0, "all", &[]);
    for l in &mut loops {
        let events = l.wait(Duration::from_secs(20));
        let failed: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, LoopEvent::Failed(..)))
            .collect();
        assert!(
            failed.is_empty() && events.len() > 50,
            "{} events, failures {failed:?}\n{}",
            events.len(),
            env.logs()
        );
    }
}

#[test]
fn a_service_without_endpoints_is_refused_at_connect() {
    require_privileged!("a_service_without_endpoints_is_refused_at_connect");
    let mut env = Env::new("all");
    env.web(&[]);
    env.wait_programmed(&[]);
    let refused = Connect::Failed("ECONNREFUSED".into());
    let connect = |ns: &testbed::Netns| tcp_connect(ns, CLUSTER_IP, 80, T).unwrap();
    // Linux >= 5.18: ECONNREFUSED at connect(), from the node and from a pod, as kube-proxy's
    // ICMP reject gives. (The kernel matrix's older kernels run only what follows.)
    if sluice::dataplane::features::has_set_retval() {
        assert_eq!(connect(env.node(0)), refused, "from the node");
        assert_eq!(connect(env.client()), refused, "from a pod");
        assert!(env.counter(0, "sock_reject_no_backend") >= 2.0);
    }
    // Before 5.18 no program can set the error: a pod's call is left to TC, which rejects it
    // with ICMP (ECONNREFUSED); the node's own, which no TC program sees, gets EPERM. Telling
    // the node from a pod takes the node namespace's cookie, SO_NETNS_COOKIE (5.14); before
    // it the initial namespace is taken for the node's, which a real node's is and a sandbox
    // node's is not: there the node's call is taken for a pod's and left to TC, which sees no
    // node-local traffic, so it goes unanswered (the departure ARCHITECTURE.md describes).
    env.start_agent(0, "all", &["--socket-lb-as-before-5-18"]);
    let node_gets = if sluice::dataplane::socket::current_netns_cookie() != 0 {
        Connect::Failed("EPERM".into())
    } else {
        Connect::Timeout
    };
    assert_eq!(
        connect(env.node(0)),
        node_gets,
        "from the node, as before 5.18"
    );
    assert_eq!(connect(env.client()), refused, "from a pod, as before 5.18");
    assert!(
        env.counter(0, "reject_no_backend") >= 1.0,
        "the TC path's ICMP reject"
    );
}

const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 192, 41);

/// Service `name` with `spec` (its ports TCP, to 8080) and `status`, and a slice with both
/// web pods, ready.
fn web_pods_service(env: &Env, name: &str, spec: Value, status: Value) {
    service_of(env, name, spec, status, &[("web-0", 0), ("web-1", 1)]);
}

/// Service `name` with `spec` (its ports TCP, to 8080) and `status`, and a slice with
/// `pods` (name, node), ready.
fn service_of(env: &Env, name: &str, spec: Value, status: Value, pods: &[(&str, usize)]) {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
        "status": status,
    });
    let eps: Vec<Value> = pods
        .iter()
        .map(|(p, k)| json!({"addresses": [env.addr(p).to_string()], "nodeName": node_name(*k)}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abc12"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    });
    env.manifests
        .write(&format!("{name}.yaml"), &[svc, slice])
        .unwrap();
}

/// Service `lb`: type LoadBalancer at [`LB_IP`] TCP 80 -> both web pods' 8080, with
/// loadBalancerSourceRanges `ranges`.
fn lb_with_source_ranges(env: &Env, ranges: &[String]) {
    web_pods_service(
        env,
        "lb",
        json!({
            "type": "LoadBalancer", "clusterIP": "198.18.128.41",
            "loadBalancerSourceRanges": ranges,
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30101}],
        }),
        json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}),
    );
}

/// loadBalancerSourceRanges at the socket: a pod's connect is left to TC, which lets a pod in
/// a range through and drops one in none; the node's own is translated at connect() when a
/// range holds the node's address, and refused with EPERM when none does (kube-proxy's
/// firewall drops it: the call would hang instead).
#[test]
fn load_balancer_source_ranges_let_in_only_their_clients_and_the_node_if_they_hold_it() {
    require_privileged!(
        "load_balancer_source_ranges_let_in_only_their_clients_and_the_node_if_they_hold_it"
    );
    let env = Env::new("all");
    let client = format!("{}/32", env.addr("client"));
    lb_with_source_ranges(&env, std::slice::from_ref(&client));
    let programmed = |n: usize| {
        eventually(WAIT, || {
            env.backends(0, LB_IP, 80, "TCP")
                .is_some_and(|b| b.len() == n)
        })
    };
    assert!(programmed(2), "lb was not programmed\n{}", env.logs());
    let pins = env.bpffs[0].path().join("sluice");
    let shown = services_json(env.node(0), Path::new(env!("CARGO_BIN_EXE_sluice")), &pins);
    let lb = shown
        .iter()
        .find(|f| f["address"] == LB_IP.to_string())
        .unwrap();
    assert_eq!(
        lb["loadBalancerSourceRanges"],
        json!([client]),
        "sluice services: {lb}"
    );
    assert_eq!(lb["allowsNode"], json!(false));
    // A pod in the range: through TC, translated.
    let r = curl(env.client(), LB_IP, 80, T)
        .unwrap_or_else(|e| panic!("the client pod is in the range: {e}\n{}", env.logs()));
    assert_eq!(*r.peer.ip(), LB_IP);
    assert!(env.counter(0, "sock_pass_to_tc") >= 1.0);
    // A pod in no range (web-0's namespace): dropped at TC, so its connect hangs.
    let dropped = env.counter(0, "drop_source_range");
    let web0 = &env.c.pod("web-0").ns;
    let c = tcp_connect(web0, LB_IP, 80, Duration::from_secs(1)).unwrap();
    assert_eq!(c, Connect::Timeout, "web-0 is in no range");
    assert!(env.counter(0, "drop_source_range") > dropped);
    // The node, whose address is in no range: refused at connect() with EPERM. (Before 5.14
    // the sandbox's node namespace cannot be told from a pod's: see
    // a_service_without_endpoints_is_refused_at_connect.)
    let node_ns_known = sluice::dataplane::socket::current_netns_cookie() != 0;
    if node_ns_known {
        let c = tcp_connect(env.node(0), LB_IP, 80, T).unwrap();
        assert_eq!(
            c,
            Connect::Failed("EPERM".into()),
            "the node is in no range"
        );
        assert!(env.counter(0, "sock_deny_source_range") >= 1.0);
    }
    // A range holding node0's address: the node connects, translated at its socket.
    let node_range = format!("{}/24", env.c.nodes[0].addr);
    lb_with_source_ranges(&env, &[client, node_range]);
    let ok = eventually(WAIT, || {
        !node_ns_known || curl(env.node(0), LB_IP, 80, Duration::from_secs(1)).is_ok()
    });
    assert!(ok, "node0 is in a range now\n{}", env.logs());
    if node_ns_known {
        let r = curl(env.node(0), LB_IP, 80, T).unwrap();
        assert_eq!(
            *r.peer.ip(),
            LB_IP,
            "getpeername shows the load balancer address"
        );
    }
}

const STICKY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 42);

/// Service `sticky`: ClusterIP [`STICKY_IP`] TCP 80 -> both web pods' 8080, sessionAffinity
/// ClientIP with `timeout` seconds.
fn sticky_service(env: &Env, timeout: u32) {
    web_pods_service(
        env,
        "sticky",
        json!({
            "clusterIP": STICKY_IP.to_string(),
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        }),
        json!({}),
    );
}

/// sessionAffinity ClientIP on real connections: 100 from a pod (left to TC by the socket
/// program, which cannot know a pod's address) and 20 from the node (at its socket) each
/// stay on one backend; a connection after the timeout (2 s here) chooses afresh.
#[test]
fn session_affinity_holds_a_clients_connections_on_one_backend_until_its_timeout() {
    require_privileged!(
        "session_affinity_holds_a_clients_connections_on_one_backend_until_its_timeout"
    );
    let env = Env::new("all");
    sticky_service(&env, 2);
    let ok = eventually(WAIT, || {
        env.backends(0, STICKY_IP, 80, "TCP")
            .is_some_and(|b| b.len() == 2)
    });
    assert!(ok, "sticky was not programmed\n{}", env.logs());
    let hits = || env.counter(0, "affinity_hit");
    for (who, ns, n) in [
        ("the client pod", env.client(), 100),
        ("node0", env.node(0), 20),
    ] {
        let before = hits();
        let answered: std::collections::BTreeSet<String> = (0..n)
            .map(|_| {
                curl(ns, STICKY_IP, 80, T)
                    .unwrap_or_else(|e| panic!("{who}: {e}\n{}", env.logs()))
                    .body
            })
            .collect();
        assert_eq!(
            answered.len(),
            1,
            "{who}'s {n} connections went to {answered:?}"
        );
        assert!(
            hits() >= before + f64::from(n - 1),
            "{who}: {} affinity hits",
            hits() - before
        );
    }
    // Past the timeout the next connection makes a fresh choice (no hit), the one after it
    // sticks to that.
    std::thread::sleep(Duration::from_millis(2300));
    let before = hits();
    curl(env.client(), STICKY_IP, 80, T).unwrap();
    assert_eq!(hits(), before, "the first connection after the timeout");
    curl(env.client(), STICKY_IP, 80, T).unwrap();
    assert_eq!(hits(), before + 1.0);
}

const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 43);

/// Service `local`: ClusterIP [`LOCAL_IP`] TCP 80 -> 8080 with internalTrafficPolicy Local, its
/// endpoints `pods` (ready).
fn internal_local_service(env: &Env, pods: &[(&str, usize)]) {
    service_of(
        env,
        "local",
        json!({
            "clusterIP": LOCAL_IP.to_string(), "internalTrafficPolicy": "Local",
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        }),
        json!({}),
        pods,
    );
}

/// internalTrafficPolicy Local on node0: with endpoints on both nodes, the node's pods and
/// the node itself reach only node0's; with the only endpoint on node1, a pod's connection is
/// dropped (it hangs, as under kube-proxy) and the node's refused with EPERM; the metric
/// counts the port.
#[test]
fn internal_traffic_policy_local_keeps_a_nodes_traffic_on_its_own_endpoints() {
    require_privileged!("internal_traffic_policy_local_keeps_a_nodes_traffic_on_its_own_endpoints");
    let env = Env::new("all");
    internal_local_service(&env, &[("web-0", 0), ("web-1", 1)]);
    let programmed = |n: usize| {
        eventually(WAIT, || {
            env.backends(0, LOCAL_IP, 80, "TCP")
                .is_some_and(|b| b.len() == n)
        })
    };
    assert!(
        programmed(1),
        "node0 should hold web-0 alone\n{}",
        env.logs()
    );
    for (who, ns) in [("the client pod", env.client()), ("node0", env.node(0))] {
        for _ in 0..10 {
            let r =
                curl(ns, LOCAL_IP, 80, T).unwrap_or_else(|e| panic!("{who}: {e}\n{}", env.logs()));
            assert_eq!(r.body, "web-0", "{who} reached another node's endpoint");
        }
    }
    internal_local_service(&env, &[("web-1", 1)]);
    assert!(programmed(0), "node0 should hold none\n{}", env.logs());
    let dropped = env.counter(0, "drop_no_local_backend");
    let c = tcp_connect(env.client(), LOCAL_IP, 80, Duration::from_secs(1)).unwrap();
    assert_eq!(c, Connect::Timeout, "dropped, not refused");
    assert!(env.counter(0, "drop_no_local_backend") > dropped);
    if sluice::dataplane::socket::current_netns_cookie() != 0 {
        let c = tcp_connect(env.node(0), LOCAL_IP, 80, T).unwrap();
        assert_eq!(c, Connect::Failed("EPERM".into()), "the node's call");
        assert!(env.counter(0, "sock_deny_no_local_backend") >= 1.0);
    }
    let metric = "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}";
    let ok = eventually(WAIT, || {
        env.agent(0)
            .metrics()
            .lines()
            .any(|l| l == format!("{metric} 1"))
    });
    assert!(ok, "{metric} is not 1:\n{}", env.agent(0).metrics());
}
