//! The sandbox itself: connectivity, offloads, and above all cleanup.
use std::time::Duration;

use testbed::{Cluster, HttpServer, UdpEcho, curl, netns, plan, require_privileged, udp_request};

const T: Duration = Duration::from_secs(5);

#[test]
fn pods_reach_pods_on_other_nodes_and_outside_reaches_nodes() {
    require_privileged!("pods_reach_pods_on_other_nodes_and_outside_reaches_nodes");
    let mut c = Cluster::new(2).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(1, "server").unwrap();
    c.add_outside().unwrap();
    let server = c.pod("server");
    let _http = HttpServer::start(&server.ns, "server", 8080).unwrap();
    let reply = curl(&c.pod("client").ns, server.addr, 8080, T).unwrap();
    assert_eq!(reply.body, "server", "the server pod answers with its name");
    assert_eq!(
        reply.peer.ip(),
        &server.addr,
        "curl was connected to the pod address"
    );

    let node1 = &c.nodes[1];
    let out = c.outside[0]
        .ns
        .exec(&["ping", "-c1", "-W2", &node1.addr.to_string()]);
    assert!(out.is_ok(), "outside client pings node 1: {out:?}");
}

#[test]
fn udp_echo_answers_with_the_pod_name_from_the_pod_address() {
    require_privileged!("udp_echo_answers_with_the_pod_name_from_the_pod_address");
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "a").unwrap();
    c.add_pod(0, "b").unwrap();
    let b = c.pod("b");
    let _echo = UdpEcho::start(&b.ns, "b", 5353).unwrap();
    let r = udp_request(&c.pod("a").ns, b.addr, 5353, "hello", T).unwrap();
    assert_eq!(r.data, "b hello");
    assert_eq!(r.from.ip(), &b.addr);
    assert_eq!(r.from.port(), 5353);
}

#[test]
fn tx_checksum_offload_is_off_on_every_veth() {
    require_privileged!("tx_checksum_offload_is_off_on_every_veth");
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "p").unwrap();
    c.add_outside().unwrap();
    let p = c.pod("p");
    let devices = [
        (&p.ns, "eth0"),
        (&c.nodes[0].ns, p.host_veth.as_str()),
        (&c.nodes[0].ns, "eth0"),
        (&c.fabric, "n0"),
        (&c.fabric, "o0"),
        (&c.outside[0].ns, "eth0"),
    ];
    for (ns, dev) in devices {
        let k = ns.exec(&["ethtool", "-k", dev]).unwrap();
        let line = k
            .lines()
            .find(|l| l.starts_with("tx-checksumming:"))
            .unwrap_or_else(|| panic!("no tx-checksumming line for {dev}: {k}"));
        assert!(
            line.contains(": off"),
            "{} {dev}: expected tx-checksumming off, got {line:?}",
            ns.name()
        );
    }
}

#[test]
fn every_address_configured_is_inside_the_plan_range() {
    require_privileged!("every_address_configured_is_inside_the_plan_range");
    let mut c = Cluster::new(2).unwrap();
    c.add_pod(0, "a").unwrap();
    c.add_pod(1, "b").unwrap();
    c.add_outside().unwrap();
    for name in c.namespaces() {
        let out = testbed::run(&["ip", "-n", &name, "-4", "-o", "addr", "show"]).unwrap();
        for line in out.lines() {
            let addr = line
                .split_whitespace()
                .nth(3)
                .unwrap()
                .split('/')
                .next()
                .unwrap();
            let addr: std::net::Ipv4Addr = addr.parse().unwrap();
            assert!(
                addr.is_loopback() || plan::in_range(addr),
                "{name} has {addr}, outside 198.18.0.0/15"
            );
        }
        let routes = testbed::run(&["ip", "-n", &name, "-4", "route", "show"]).unwrap();
        for line in routes.lines() {
            if let Some(via) = line.split_whitespace().skip_while(|w| *w != "via").nth(1) {
                let via: std::net::Ipv4Addr = via.parse().unwrap();
                assert!(
                    plan::in_range(via),
                    "{name} routes via {via}, outside the plan"
                );
            }
        }
    }
}

#[test]
fn dropping_a_cluster_removes_its_namespaces_and_kills_its_servers() {
    require_privileged!("dropping_a_cluster_removes_its_namespaces_and_kills_its_servers");
    let mut c = Cluster::new(2).unwrap();
    c.add_pod(0, "a").unwrap();
    c.add_outside().unwrap();
    let names = c.namespaces();
    let server = HttpServer::start(&c.pod("a").ns, "a", 8080).unwrap();
    let pid = server.0.pid();
    // A process the sandbox did not start itself, left running inside a pod.
    let mut stray =
        testbed::cmd::command(&["ip", "netns", "exec", c.pod("a").ns.name(), "sleep", "30"])
            .unwrap()
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::mem::forget(server); // leave it to the namespace cleanup
    drop(c);
    let left = testbed::run(&["ip", "netns", "list"]).unwrap();
    for n in &names {
        assert!(
            !left.contains(n.as_str()),
            "namespace {n} survived the drop: {left}"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
        "server {pid} survived"
    );
    // Killed by the cleanup, the stray exits by a signal at once (not after its 30 s).
    let st = stray.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "the stray process was not killed by the cleanup: {st}"
    );
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn a_panicking_test_leaves_no_namespace_behind() {
    require_privileged!("a_panicking_test_leaves_no_namespace_behind");
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut c = Cluster::new(1).unwrap();
        c.add_pod(0, "doomed").unwrap();
        tx.send(c.namespaces()).unwrap();
        panic!("a test failing half-way");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let names = rx.recv().unwrap();
    assert_eq!(names.len(), 3, "fabric, node and pod were created");
    let left = testbed::run(&["ip", "netns", "list"]).unwrap();
    for n in &names {
        assert!(
            !left.contains(n.as_str()),
            "namespace {n} survived the panic: {left}"
        );
    }
}

#[test]
fn sweep_removes_namespaces_of_dead_test_processes_only() {
    require_privileged!("sweep_removes_namespaces_of_dead_test_processes_only");
    // A namespace named as if a process that has exited had made it (pid of a finished child).
    let mut child = testbed::cmd::command(&["true"]).unwrap().spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("{}{dead}x0-stale", netns::PREFIX);
    testbed::run(&["ip", "netns", "add", &stale]).unwrap();
    let live = netns::Netns::new("live").unwrap();
    // And a private bpffs such a process left mounted.
    let stale_fs = std::env::temp_dir().join(format!("{}{dead}x1-bpffs", netns::PREFIX));
    std::fs::create_dir_all(&stale_fs).unwrap();
    let fs = stale_fs.to_string_lossy().into_owned();
    testbed::run(&["mount", "-t", "bpf", "bpf", &fs]).unwrap();
    let live_fs = testbed::BpfFs::new().unwrap();
    let removed = netns::sweep_stale();
    let left = testbed::run(&["ip", "netns", "list"]).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // Clean up before asserting, so a failure leaves nothing behind either.
    let _ = testbed::run(&["ip", "netns", "delete", &stale]);
    let _ = testbed::run(&["umount", &fs]);
    let _ = std::fs::remove_dir(&stale_fs);
    assert!(
        removed.contains(&stale),
        "sweep removed {removed:?}, expected {stale}"
    );
    assert!(
        removed.contains(&fs),
        "sweep removed {removed:?}, expected {fs}"
    );
    assert!(!mounts.contains(&fs), "stale bpffs still mounted");
    assert!(
        mounts.contains(live_fs.path().to_str().unwrap()),
        "sweep must not touch a live process's bpffs"
    );
    assert!(!left.contains(&stale), "stale namespace still listed");
    assert!(
        left.contains(live.name()),
        "sweep must not touch a live process's namespace"
    );
}
