//! The benchmark's servers and load generator, on a sandbox node without any load balancer:
//! every request is answered, by the backend it was sent to, within the run's bounds.
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use testbed::{
    Cluster,
    load::{self, BenchServer, LoadSpec},
    require_privileged,
};

fn sandbox() -> (Vec<BenchServer>, Cluster) {
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(0, "backend-a").unwrap();
    c.add_pod(0, "backend-b").unwrap();
    load::tune_client(&c.pod("client").ns).unwrap();
    let servers = ["backend-a", "backend-b"]
        .iter()
        .map(|b| BenchServer::start(&c.pod(b).ns, b, 8080).unwrap())
        .collect();
    (servers, c)
}

fn spec(c: &Cluster, duration: Duration) -> LoadSpec {
    LoadSpec {
        targets: ["backend-a", "backend-b"]
            .iter()
            .map(|b| SocketAddrV4::new(c.pod(b).addr, 8080))
            .collect(),
        workers: 2,
        warmup: Duration::from_millis(50),
        duration,
        max_ops_per_worker: 1_000_000,
    }
}

#[test]
fn every_measure_is_answered_by_both_backends_without_errors() {
    require_privileged!("every_measure_is_answered_by_both_backends_without_errors");
    let (servers, c) = sandbox();
    let client = &c.pod("client").ns;
    let s = spec(&c, Duration::from_millis(300));
    for (what, r) in [
        ("new connections", load::tcp_new_connections(client, &s)),
        ("persistent", load::tcp_persistent(client, &s)),
        ("udp", load::udp_request_response(client, &s)),
    ] {
        let r = r.unwrap();
        assert_eq!(r.errors, 0, "{what}: no request may fail: {r:?}");
        assert!(r.ops > 50, "{what}: only {} requests in 300 ms", r.ops);
        assert_eq!(
            r.latencies_ns.len() as u64,
            r.ops,
            "{what}: one latency per request"
        );
        assert!(
            r.latencies_ns.windows(2).all(|w| w[0] <= w[1]),
            "{what}: latencies are sorted"
        );
        let names: Vec<&str> = r.per_backend.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["backend-a", "backend-b"],
            "{what}: both backends answer"
        );
        let a = r.per_backend["backend-a"];
        let b = r.per_backend["backend-b"];
        assert!(
            a.abs_diff(b) <= r.ops / 4,
            "{what}: targets are used in turn, so the split is even: {a} vs {b}"
        );
        assert!(r.rate() > 0.0 && r.percentile_us(50.0).unwrap() > 0.0);
    }
    drop(servers);
}

#[test]
fn a_load_run_stops_at_its_operation_bound_and_counts_a_dead_target_as_errors() {
    require_privileged!(
        "a_load_run_stops_at_its_operation_bound_and_counts_a_dead_target_as_errors"
    );
    let (servers, c) = sandbox();
    let client = &c.pod("client").ns;
    let mut s = spec(&c, Duration::from_secs(30));
    s.max_ops_per_worker = 100;
    let t0 = Instant::now();
    let r = load::tcp_persistent(client, &s).unwrap();
    assert_eq!(r.ops, 200, "two workers, 100 operations each");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the count bound ended the run, not the 30 s duration"
    );
    // A port nobody listens on: every attempt is refused and counted, none as a success.
    s.targets = vec![SocketAddrV4::new(c.pod("backend-a").addr, 9)];
    s.duration = Duration::from_millis(200);
    let r = load::tcp_new_connections(client, &s).unwrap();
    assert_eq!(r.ops, 0, "nothing answers on port 9: {r:?}");
    assert!(r.errors > 0, "refused connections are counted as errors");
    drop(servers);
}
