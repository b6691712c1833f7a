//! The datapath end to end: real programs attached to real devices in a sandbox node, real
//! servers (python3) in backend pods, real clients in a client pod and outside the cluster.
mod common;

use std::{collections::HashMap, net::SocketAddrV4, time::Duration};

use common::NodeDataplane;
use proxy_common::{
    CTR_FRAGMENT_FOLLOWED, CTR_PASS_MALFORMED, CTR_PASS_NOT_FRONTEND, CTR_PASS_NOT_POD_CLIENT,
};
use sluice::dataplane::{Backend, DataplaneConfig, Frontend, FrontendKind, Protocol};
use testbed::{
    Attempt, Cluster, HttpServer, KeepAlive, SctpEcho, Sniffer, UdpEcho, http_many, plan,
    require_privileged, sctp_available, sctp_request, send_frame, udp_request,
};

const T: Duration = Duration::from_secs(5);
const BACKENDS: [&str; 3] = ["backend-a", "backend-b", "backend-c"];

struct Sandbox {
    // Field order is drop order: the dataplane goes before the namespaces.
    dp: NodeDataplane,
    _servers: Vec<HttpServer>,
    _echo: Vec<UdpEcho>,
    c: Cluster,
}

fn sandbox() -> Sandbox {
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    for b in BACKENDS {
        c.add_pod(0, b).unwrap();
    }
    c.add_outside().unwrap();
    c.route_outside_via(0, plan::EXTERNAL_CIDR, 0).unwrap();
    let servers = BACKENDS
        .iter()
        .map(|b| HttpServer::start(&c.pod(b).ns, b, 8080).unwrap())
        .collect();
    let echo = BACKENDS
        .iter()
        .map(|b| UdpEcho::start(&c.pod(b).ns, b, 5353).unwrap())
        .collect();
    let dp = NodeDataplane::start(
        &c.nodes[0],
        DataplaneConfig {
            hairpin_snat: Some(plan::HAIRPIN_SNAT),
            conntrack_max: 16384,
            ..Default::default()
        },
    );
    Sandbox {
        dp,
        _servers: servers,
        _echo: echo,
        c,
    }
}

impl Sandbox {
    fn backends(&self, names: &[&str], port: u16) -> Vec<Backend> {
        names
            .iter()
            .map(|n| Backend {
                addr: self.c.pod(n).addr,
                port,
                local: true,
            })
            .collect()
    }
    fn upsert(&self, fe: Frontend, backends: Vec<Backend>) {
        self.dp
            .with(move |dp| dp.upsert_service(fe, &backends))
            .unwrap();
    }
}

fn frontend(addr: std::net::Ipv4Addr, port: u16, proto: Protocol, kind: FrontendKind) -> Frontend {
    Frontend {
        addr,
        port,
        proto,
        kind,
    }
}

#[test]
fn three_hundred_connections_to_a_cluster_ip_all_succeed_and_spread_over_three_backends() {
    require_privileged!(
        "three_hundred_connections_to_a_cluster_ip_all_succeed_and_spread_over_three_backends"
    );
    let s = sandbox();
    let vip = plan::cluster_ip(0);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 8080),
    );
    let attempts = http_many(&s.c.pod("client").ns, vip, 80, 300, T).unwrap();
    assert_eq!(attempts.len(), 300);
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for a in &attempts {
        match a {
            Attempt::Ok { peer, body } => {
                assert_eq!(
                    *peer,
                    SocketAddrV4::new(vip, 80),
                    "the client's peer is the Service"
                );
                *per_backend.entry(body.clone()).or_default() += 1;
            }
            Attempt::Err(e) => panic!("a connection failed: {e}"),
        }
    }
    for b in BACKENDS {
        let n = per_backend.get(b).copied().unwrap_or(0);
        assert!(
            n >= 45,
            "{b} answered {n} of 300 (at least 15% expected): {per_backend:?}"
        );
    }
}

#[test]
fn udp_requests_through_a_cluster_ip_are_answered_from_the_service_address() {
    require_privileged!("udp_requests_through_a_cluster_ip_are_answered_from_the_service_address");
    let s = sandbox();
    let vip = plan::cluster_ip(1);
    s.upsert(
        frontend(vip, 53, Protocol::Udp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 5353),
    );
    for i in 0..10 {
        let r = udp_request(&s.c.pod("client").ns, vip, 53, &format!("q{i}"), T).unwrap();
        assert_eq!(
            r.from,
            SocketAddrV4::new(vip, 53),
            "the reply comes from the Service"
        );
        let (who, payload) = r.data.split_once(' ').unwrap();
        assert!(BACKENDS.contains(&who), "answered by a backend: {}", r.data);
        assert_eq!(payload, format!("q{i}"));
    }
}

#[test]
fn udp_datagrams_too_big_for_the_mtu_reach_a_backend_whole_and_come_back_whole() {
    require_privileged!(
        "udp_datagrams_too_big_for_the_mtu_reach_a_backend_whole_and_come_back_whole"
    );
    let s = sandbox();
    let vip = plan::cluster_ip(1);
    s.upsert(
        frontend(vip, 53, Protocol::Udp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 5353),
    );
    // 4,000 bytes over the pods' 1500-byte links: the client's kernel sends three fragments,
    // and the backend's answer comes back in three.
    for i in 0..5 {
        let query = format!("q{i}-{}", "x".repeat(4000));
        let r = udp_request(&s.c.pod("client").ns, vip, 53, &query, T).unwrap();
        assert_eq!(
            r.from,
            SocketAddrV4::new(vip, 53),
            "the answer comes from the Service"
        );
        let (who, payload) = r.data.split_once(' ').unwrap_or_default();
        assert!(BACKENDS.contains(&who), "answered by a backend: {who:?}");
        assert_eq!(payload, query, "the whole datagram went there and back");
    }
    // Two later fragments each way, five times.
    let c = s.dp.with(|dp| dp.counters().unwrap());
    let followed = c[CTR_FRAGMENT_FOLLOWED as usize].packets;
    assert!(
        followed >= 20,
        "later fragments that followed their flow: {followed}"
    );
}

#[test]
fn translated_flows_keep_valid_checksums_when_pods_offload_them() {
    require_privileged!("translated_flows_keep_valid_checksums_when_pods_offload_them");
    let s = sandbox();
    // As on a real node: the pods leave their checksums to the device, so the programs see
    // partially checksummed packets both ways, and the node completes them after translation.
    for p in ["client"].iter().chain(&BACKENDS) {
        s.c.pod(p).offload_checksums().unwrap();
    }
    let vip = plan::cluster_ip(5);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 8080),
    );
    s.upsert(
        frontend(vip, 53, Protocol::Udp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 5353),
    );
    for a in http_many(&s.c.pod("client").ns, vip, 80, 30, T).unwrap() {
        assert!(matches!(a, Attempt::Ok { .. }), "{a:?}");
    }
    for i in 0..5 {
        let r = udp_request(&s.c.pod("client").ns, vip, 53, &format!("q{i}"), T).unwrap();
        assert!(r.data.ends_with(&format!(" q{i}")), "{r:?}");
    }
    // Hairpin: both addresses and both ports of each packet change.
    let one = plan::cluster_ip(6);
    s.upsert(
        frontend(one, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&["backend-a"], 8080),
    );
    for a in http_many(&s.c.pod("backend-a").ns, one, 80, 5, T).unwrap() {
        assert!(matches!(a, Attempt::Ok { .. }), "{a:?}");
    }
    // A refusal (the SYN turned into an ICMP port unreachable) is no partially checksummed
    // packet any more: the ICMP and its quote arrive intact.
    let none = plan::cluster_ip(7);
    s.upsert(
        frontend(none, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        vec![],
    );
    for a in http_many(&s.c.pod("client").ns, none, 80, 3, T).unwrap() {
        assert!(
            matches!(&a, Attempt::Err(e) if e.contains("ConnectionRefused")),
            "refused, not timed out: {a:?}"
        );
    }
}

#[test]
fn node_port_and_external_ip_work_from_outside_the_cluster() {
    require_privileged!("node_port_and_external_ip_work_from_outside_the_cluster");
    let s = sandbox();
    let node = s.c.nodes[0].addr;
    let ext = plan::external_ip(0);
    s.upsert(
        frontend(node, 30080, Protocol::Tcp, FrontendKind::NodePort),
        s.backends(&BACKENDS, 8080),
    );
    s.upsert(
        frontend(ext, 80, Protocol::Tcp, FrontendKind::ExternalIp),
        s.backends(&BACKENDS, 8080),
    );
    let outside = &s.c.outside[0].ns;
    for (addr, port) in [(node, 30080), (ext, 80)] {
        let attempts = http_many(outside, addr, port, 30, T).unwrap();
        for a in attempts {
            match a {
                Attempt::Ok { peer, body } => {
                    assert_eq!(peer, SocketAddrV4::new(addr, port));
                    assert!(BACKENDS.contains(&body.as_str()), "answered by {body}");
                }
                Attempt::Err(e) => panic!("{addr}:{port} from outside failed: {e}"),
            }
        }
    }
    // A ClusterIP is not reachable from outside, even routed to the node.
    let vip = plan::cluster_ip(0);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 8080),
    );
    s.c.route_outside_via(0, plan::SERVICE_CIDR, 0).unwrap();
    let attempts = http_many(outside, vip, 80, 1, Duration::from_secs(2)).unwrap();
    assert!(
        matches!(attempts[0], Attempt::Err(_)),
        "ClusterIP from outside: {attempts:?}"
    );
}

#[test]
fn a_long_lived_connection_keeps_its_backend_while_backends_come_and_go() {
    require_privileged!("a_long_lived_connection_keeps_its_backend_while_backends_come_and_go");
    let s = sandbox();
    let vip = plan::cluster_ip(2);
    let fe = frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp);
    s.upsert(fe, s.backends(&BACKENDS[..2], 8080));
    let mut ka = KeepAlive::start(
        &s.c.pod("client").ns,
        vip,
        80,
        30,
        Duration::from_millis(100),
    )
    .unwrap();
    // The backend is chosen when the connection is made: only then may the set change.
    ka.connected().expect("the client connected");
    std::thread::sleep(Duration::from_millis(500));
    s.upsert(fe, s.backends(&BACKENDS, 8080)); // add one
    std::thread::sleep(Duration::from_millis(500));
    s.upsert(fe, s.backends(&BACKENDS[2..], 8080)); // remove the first two
    std::thread::sleep(Duration::from_millis(500));
    s.upsert(fe, s.backends(&BACKENDS[1..], 8080)); // and one comes back
    let out = ka.finish(Duration::from_secs(20));
    assert_eq!(
        out.last().map(String::as_str),
        Some("DONE"),
        "the connection lived: {out:?}"
    );
    assert!(
        out[0].starts_with(&format!("PEER {vip}:80 ")),
        "connected to the Service: {out:?}"
    );
    let bodies: Vec<&str> = out.iter().filter_map(|l| l.strip_prefix("OK ")).collect();
    assert_eq!(bodies.len(), 30, "every request answered: {out:?}");
    assert!(
        BACKENDS[..2].contains(&bodies[0]) && bodies.iter().all(|b| *b == bodies[0]),
        "one backend, one of the first two, for the whole connection: {bodies:?}"
    );
    // New connections use the current set only.
    for a in http_many(&s.c.pod("client").ns, vip, 80, 20, T).unwrap() {
        let Attempt::Ok { body, .. } = a else {
            panic!("{a:?}")
        };
        assert!(
            BACKENDS[1..].contains(&body.as_str()),
            "{body} is not a current backend"
        );
    }
}

#[test]
fn a_service_without_backends_refuses_connections_at_once() {
    require_privileged!("a_service_without_backends_refuses_connections_at_once");
    let s = sandbox();
    let vip = plan::cluster_ip(3);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        vec![],
    );
    let start = std::time::Instant::now();
    let attempts = http_many(&s.c.pod("client").ns, vip, 80, 1, T).unwrap();
    match &attempts[0] {
        Attempt::Err(e) => assert!(
            e.contains("ConnectionRefused"),
            "refused, not timed out: {e}"
        ),
        ok => panic!("expected a refusal, got {ok:?}"),
    }
    assert!(
        start.elapsed() < T,
        "the refusal came before the client's timeout"
    );
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    require_privileged!("a_pod_reaches_itself_through_its_own_service");
    let s = sandbox();
    let vip = plan::cluster_ip(4);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&["backend-a"], 8080),
    );
    let attempts = http_many(&s.c.pod("backend-a").ns, vip, 80, 5, T).unwrap();
    for a in attempts {
        assert_eq!(
            a,
            Attempt::Ok {
                peer: SocketAddrV4::new(vip, 80),
                body: "backend-a".into()
            }
        );
    }
}

#[test]
fn a_pod_reaches_itself_through_its_own_nodes_node_port() {
    require_privileged!("a_pod_reaches_itself_through_its_own_nodes_node_port");
    let s = sandbox();
    // The reply shows the node's own address: routed, the kernel would drop it as a martian
    // (a local source arriving from outside), so it goes straight back out of the pod's device.
    let node = s.c.nodes[0].addr;
    s.upsert(
        frontend(node, 30080, Protocol::Tcp, FrontendKind::NodePort),
        s.backends(&["backend-a"], 8080),
    );
    s.upsert(
        frontend(node, 30053, Protocol::Udp, FrontendKind::NodePort),
        s.backends(&["backend-a"], 5353),
    );
    let pod = &s.c.pod("backend-a").ns;
    let attempts = http_many(pod, node, 30080, 5, T).unwrap();
    for a in attempts {
        assert_eq!(
            a,
            Attempt::Ok {
                peer: SocketAddrV4::new(node, 30080),
                body: "backend-a".into()
            }
        );
    }
    let r = udp_request(pod, node, 30053, "hello", T).unwrap();
    assert_eq!(r.from, SocketAddrV4::new(node, 30053));
    // Another pod's calls to the NodePort are routed as before.
    let attempts = http_many(&s.c.pod("client").ns, node, 30080, 2, T).unwrap();
    assert!(
        attempts.iter().all(|a| matches!(a, Attempt::Ok { .. })),
        "{attempts:?}"
    );
}

/// One source port, two frontends (a ClusterIP and the NodePort) of one backend: two TCP
/// connections open at once, and UDP requests in turn. Each must work and be answered from
/// the frontend it went to (the backend would otherwise see one tuple for both).
const ONE_PORT_TWO_FRONTENDS_PY: &str = r#"
import socket, sys
a, b = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))
ua, ub = (sys.argv[5], int(sys.argv[6])), (sys.argv[7], int(sys.argv[8]))
def bound(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 40123))
    s.settimeout(3)
    return s
try:
    conns = []
    for t in (a, b):
        s = bound(socket.SOCK_STREAM)
        s.connect(t)
        conns.append(s)
    for s in conns:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for s in conns:
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print("TCP", "%s:%d" % s.getpeername(), data.split(b"\r\n\r\n", 1)[1].decode().strip())
except Exception as e:
    print("TCP-ERR", type(e).__name__, e)
u = bound(socket.SOCK_DGRAM)
for i, t in enumerate((ua, ub, ua, ub)):
    try:
        u.sendto(b"q%d" % i, t)
        data, peer = u.recvfrom(4096)
        print("UDP", "%s:%d" % t, "%s:%d" % peer)
    except Exception as e:
        print("UDP-ERR", type(e).__name__, e)
"#;

#[test]
fn one_client_port_to_two_frontends_of_one_backend_works_for_both() {
    require_privileged!("one_client_port_to_two_frontends_of_one_backend_works_for_both");
    let s = sandbox();
    let vip = plan::cluster_ip(5);
    let node = s.c.nodes[0].addr;
    for (addr, port, proto, kind, target) in [
        (vip, 80, Protocol::Tcp, FrontendKind::ClusterIp, 8080),
        (node, 30080, Protocol::Tcp, FrontendKind::NodePort, 8080),
        (vip, 53, Protocol::Udp, FrontendKind::ClusterIp, 5353),
        (node, 30053, Protocol::Udp, FrontendKind::NodePort, 5353),
    ] {
        s.upsert(
            frontend(addr, port, proto, kind),
            s.backends(&["backend-a"], target),
        );
    }
    let (vip, node) = (vip.to_string(), node.to_string());
    let out =
        s.c.pod("client")
            .ns
            .exec_timeout(
                &[
                    "python3",
                    "-c",
                    ONE_PORT_TWO_FRONTENDS_PY,
                    &vip,
                    "80",
                    &node,
                    "30080",
                    &vip,
                    "53",
                    &node,
                    "30053",
                ],
                Duration::from_secs(30),
            )
            .unwrap();
    let want = format!(
        "TCP {vip}:80 backend-a\nTCP {node}:30080 backend-a\n\
         UDP {vip}:53 {vip}:53\nUDP {node}:30053 {node}:30053\n\
         UDP {vip}:53 {vip}:53\nUDP {node}:30053 {node}:30053\n"
    );
    assert_eq!(
        out, want,
        "both connections answered by the backend, and every UDP reply from the frontend \
         it was sent to"
    );
}

#[test]
fn traffic_to_addresses_that_are_not_services_is_unchanged_byte_for_byte() {
    require_privileged!("traffic_to_addresses_that_are_not_services_is_unchanged_byte_for_byte");
    let s = sandbox();
    let vip = plan::cluster_ip(0);
    s.upsert(
        frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 8080),
    );
    let client = s.c.pod("client");
    let server = s.c.pod("backend-a");
    let before = s.dp.with(|dp| dp.counters().unwrap());
    let n = 5;
    let sent = Sniffer::start(&client.ns, "eth0", client.addr, server.addr, n, T).unwrap();
    let received = Sniffer::start(&server.ns, "eth0", client.addr, server.addr, n, T).unwrap();
    for i in 0..n {
        let r = udp_request(
            &client.ns,
            server.addr,
            5353,
            &format!("payload-{i}-{}", "x".repeat(i as usize * 100)),
            T,
        )
        .unwrap();
        assert_eq!(r.from, SocketAddrV4::new(server.addr, 5353));
    }
    let (sent, received) = (sent.finish(), received.finish());
    assert_eq!(sent.len(), n as usize, "captured every datagram sent");
    assert_eq!(
        received.len(),
        n as usize,
        "captured every datagram received"
    );
    for (a, b) in sent.iter().zip(&received) {
        assert_eq!(a.len(), b.len());
        assert_eq!(
            b[8],
            a[8] - 1,
            "routing through the node lowers the TTL by one, nothing else"
        );
        let mask = |p: &[u8]| {
            let mut p = p.to_vec();
            p[8] = 0; // TTL
            p[10] = 0; // header checksum (follows the TTL)
            p[11] = 0;
            p
        };
        assert_eq!(
            mask(a),
            mask(b),
            "the packet is otherwise byte-for-byte what was sent"
        );
    }
    // A frame that claims IPv4 but stops 10 bytes in goes through a real device untouched
    // (the kernel drops it later) and is counted; the node goes on serving.
    let mut frame = vec![0xff; 6];
    frame.extend([2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6]);
    send_frame(&client.ns, "eth0", &frame).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let after = s.dp.with(|dp| dp.counters().unwrap());
    let d = |i: u32| after[i as usize].packets - before[i as usize].packets;
    assert!(
        d(CTR_PASS_NOT_FRONTEND) >= 2 * u64::from(n),
        "requests and replies passed untouched at ingress, on the address"
    );
    assert!(
        d(CTR_PASS_NOT_POD_CLIENT) >= 2 * u64::from(n),
        "and at egress, on the address"
    );
    assert_eq!(
        d(CTR_PASS_MALFORMED),
        1,
        "the truncated frame was counted as malformed"
    );
    let attempts = http_many(&client.ns, vip, 80, 3, T).unwrap();
    assert!(
        attempts.iter().all(|a| matches!(a, Attempt::Ok { .. })),
        "{attempts:?}"
    );
}

#[test]
fn the_clsact_attachment_of_older_kernels_translates_too_and_detaches_cleanly() {
    require_privileged!(
        "the_clsact_attachment_of_older_kernels_translates_too_and_detaches_cleanly"
    );
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(0, "backend-a").unwrap();
    let _http = HttpServer::start(&c.pod("backend-a").ns, "backend-a", 8080).unwrap();
    let dp = NodeDataplane::start_mode(
        &c.nodes[0],
        DataplaneConfig::default(),
        sluice::dataplane::AttachMode::Clsact,
    );
    let vip = plan::cluster_ip(0);
    let be = Backend {
        addr: c.pod("backend-a").addr,
        port: 8080,
        local: true,
    };
    dp.with(move |dp| {
        dp.upsert_service(
            frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp),
            &[be],
        )
    })
    .unwrap();
    let dev = c.pod("client").host_veth.clone();
    let filters = c.nodes[0]
        .ns
        .exec(&["tc", "filter", "show", "dev", &dev, "ingress"])
        .unwrap();
    assert!(
        filters.contains("sluice_from_pod"),
        "a clsact filter, not a TCX link: {filters}"
    );
    for a in http_many(&c.pod("client").ns, vip, 80, 20, T).unwrap() {
        assert_eq!(
            a,
            Attempt::Ok {
                peer: SocketAddrV4::new(vip, 80),
                body: "backend-a".into()
            }
        );
    }
    drop(dp);
    let filters = c.nodes[0]
        .ns
        .exec(&["tc", "filter", "show", "dev", &dev, "ingress"])
        .unwrap();
    assert!(
        !filters.contains("sluice"),
        "detached when the dataplane is dropped: {filters}"
    );
    let direct = http_many(&c.pod("client").ns, c.pod("backend-a").addr, 8080, 1, T).unwrap();
    assert!(
        matches!(direct[0], Attempt::Ok { .. }),
        "pod traffic flows after detach: {direct:?}"
    );
}

#[test]
fn sctp_reaches_backends_through_a_cluster_ip_and_a_node_port_with_valid_checksums() {
    let name = "sctp_reaches_backends_through_a_cluster_ip_and_a_node_port_with_valid_checksums";
    require_privileged!(name);
    if !testbed::kernel_has(name, "SCTP (the sctp module)", sctp_available()) {
        return;
    }
    let s = sandbox();
    let _sctp: Vec<SctpEcho> = BACKENDS
        .iter()
        .map(|b| SctpEcho::start(&s.c.pod(b).ns, b, 3869).unwrap())
        .collect();
    // Every Service port differs from its target port, so every packet has a port rewritten and
    // its CRC32c updated, both ways.
    let vip = plan::cluster_ip(8);
    s.upsert(
        frontend(vip, 3868, Protocol::Sctp, FrontendKind::ClusterIp),
        s.backends(&BACKENDS, 3869),
    );
    let node = s.c.nodes[0].addr;
    s.upsert(
        frontend(node, 30868, Protocol::Sctp, FrontendKind::NodePort),
        s.backends(&BACKENDS, 3869),
    );
    // One backend, whose arriving packets are captured and their checksums checked here.
    let one = plan::cluster_ip(9);
    s.upsert(
        frontend(one, 3868, Protocol::Sctp, FrontendKind::ClusterIp),
        s.backends(&["backend-a"], 3869),
    );
    let client = s.c.pod("client");
    let a = s.c.pod("backend-a");
    let mut servers = std::collections::BTreeSet::new();
    // Checksums computed by the client's kernel (offload off: the datapath updates them), then
    // left to its device (the field 0: the datapath leaves it for the node to compute).
    for offload in [false, true] {
        if offload {
            client.offload_checksums().unwrap();
        }
        for i in 0..6 {
            let r = sctp_request(&client.ns, vip, 3868, &format!("m{i}"), T).unwrap();
            assert_eq!(
                r.peer,
                SocketAddrV4::new(vip, 3868),
                "the association is with the Service"
            );
            assert!(BACKENDS.contains(&r.server.as_str()), "{r:?}");
            assert_eq!(
                *r.client.ip(),
                client.addr,
                "the backend sees the pod: {r:?}"
            );
            assert_eq!(r.payload, format!("m{i}"));
            servers.insert(r.server);
        }
        let sniff = Sniffer::start(&a.ns, "eth0", client.addr, a.addr, 3, T).unwrap();
        let r = sctp_request(&client.ns, one, 3868, "sniffed", T).unwrap();
        assert_eq!(r.server, "backend-a");
        let packets = sniff.finish();
        assert!(
            packets.len() >= 3,
            "INIT, COOKIE ECHO, DATA at least: {packets:02x?}"
        );
        for p in &packets {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let l4 = &p[ihl..usize::from(u16::from_be_bytes([p[2], p[3]]))];
            assert_eq!((p[9], u16::from_be_bytes([l4[2], l4[3]])), (132, 3869));
            let mut zeroed = l4.to_vec();
            zeroed[8..12].fill(0);
            assert_eq!(
                u32::from_le_bytes(l4[8..12].try_into().unwrap()),
                common::crc32c(&zeroed),
                "the backend receives a valid CRC32c (offload {offload})"
            );
        }
    }
    assert!(servers.len() > 1, "spread over the backends: {servers:?}");
    // From outside, to the NodePort.
    let outside = &s.c.outside[0];
    for i in 0..4 {
        let r = sctp_request(&outside.ns, node, 30868, &format!("o{i}"), T).unwrap();
        assert_eq!(r.peer, SocketAddrV4::new(node, 30868));
        assert_eq!(*r.client.ip(), outside.addr, "{r:?}");
        assert_eq!(r.payload, format!("o{i}"));
    }
}
