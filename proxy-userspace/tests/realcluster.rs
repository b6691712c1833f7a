//! The agent against the real Kubernetes control plane (kube-apiserver, etcd,
//! kube-controller-manager, built by `./x setup`), with pods run by the sandbox kubelet: the
//! API server's own defaulting, validation, RBAC and watches, and the EndpointSlice
//! controller's real output. The agents authenticate as the service account of
//! `deploy/rbac.yaml`, applied for real, so its least-privilege RBAC is proven against the
//! real authorizer.
use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, time::Duration};

use testbed::{
    Attempt, Cluster,
    agent::eventually,
    controlplane::ControlPlane,
    curl, http_many,
    realcluster::{RealCluster, example_app, repo_file},
    require_privileged,
};

const T: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(60);
/// The example's Service (deploy/examples/service-test.yaml).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 10);
const NODE_PORT: u16 = 30080;
/// The example's pods' names start so.
const APP: &str = "service-test";

struct Env(RealCluster);

impl std::ops::Deref for Env {
    type Target = RealCluster;
    fn deref(&self) -> &RealCluster {
        &self.0
    }
}

impl std::ops::DerefMut for Env {
    fn deref_mut(&mut self) -> &mut RealCluster {
        &mut self.0
    }
}

impl Env {
    /// Two nodes in two zones, a client pod on node0 and an outside client, on the real
    /// control plane (with `apiserver_flags`), an agent per node.
    fn new(apiserver_flags: &[&str]) -> Self {
        let mut c = Cluster::new(2).unwrap();
        c.add_pod(0, "client").unwrap();
        c.add_outside().unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        Self(RealCluster::start(c, bin, apiserver_flags, &["zone-a", "zone-b"]).unwrap())
    }

    fn apply_example(&self) {
        self.cp
            .kubectl_with_input(&["apply", "-f", "-"], Some(&example_app().unwrap()))
            .unwrap();
    }

    fn client(&self) -> &testbed::Netns {
        &self.c.pod("client").ns
    }

    /// Who answered `n` new connections to `addr:port` from the client pod.
    fn answered(&self, addr: Ipv4Addr, port: u16, n: u32) -> (BTreeSet<String>, usize) {
        let attempts = http_many(self.client(), addr, port, n, T).unwrap();
        let failed = attempts
            .iter()
            .filter(|a| !matches!(a, Attempt::Ok { .. }))
            .count();
        let names = attempts
            .into_iter()
            .filter_map(|a| match a {
                Attempt::Ok { body, .. } => Some(body),
                Attempt::Err(_) => None,
            })
            .collect();
        (names, failed)
    }

    /// The names of the example app's ready pods.
    fn ready(&self) -> BTreeSet<String> {
        self.ready_names(APP)
    }

    /// Waits until the ClusterIP is answered by exactly the example's ready pods, `n` of
    /// them, with no failed connection.
    fn wait_served_by(&self, n: usize) {
        let mut last = (BTreeSet::new(), 0);
        let ok = eventually(WAIT, || {
            let ready = self.ready();
            if ready.len() != n {
                return false;
            }
            last = self.answered(CLUSTER_IP, 80, 20 * n as u32);
            last.1 == 0 && last.0 == ready
        });
        assert!(
            ok,
            "the ClusterIP was not served by {n} pods: last {last:?}, ready {:?}\n{}",
            self.ready(),
            self.diagnose()
        );
    }
}

#[test]
fn the_example_app_applied_with_kubectl_is_served_scaled_and_removed() {
    require_privileged!("the_example_app_applied_with_kubectl_is_served_scaled_and_removed");
    let env = Env::new(&[]);
    env.apply_example();
    env.wait_served_by(2);
    // The pods run on both nodes; from outside, node0's NodePort reaches both (one through
    // SNAT to node1).
    let mut from_outside = BTreeSet::new();
    for _ in 0..20 {
        let r = curl(&env.c.outside[0].ns, env.c.nodes[0].addr, NODE_PORT, T).unwrap();
        from_outside.insert(r.body);
    }
    assert_eq!(from_outside, env.ready(), "{}", env.diagnose());

    env.cp
        .kubectl(&["scale", "deployment", "service-test", "--replicas=3"])
        .unwrap();
    env.wait_served_by(3);

    env.cp
        .kubectl_with_input(&["delete", "-f", "-"], Some(&example_app().unwrap()))
        .unwrap();
    let gone = eventually(WAIT, || {
        env.services(0)
            .iter()
            .all(|f| f["address"] != CLUSTER_IP.to_string())
    });
    assert!(
        gone,
        "the deleted Service is still programmed\n{}",
        env.diagnose()
    );
}

#[test]
fn a_service_made_with_kubectl_expose_is_served_on_what_kubectl_get_shows() {
    require_privileged!("a_service_made_with_kubectl_expose_is_served_on_what_kubectl_get_shows");
    let env = Env::new(&[]);
    env.apply_example();
    env.wait_served_by(2);
    env.cp
        .kubectl(&[
            "expose",
            "deployment",
            "service-test",
            "--name=exposed",
            "--type=NodePort",
            "--port=8000",
            "--target-port=8080",
        ])
        .unwrap();
    // The API server allocated both from the sandbox's ranges.
    let ip: Ipv4Addr = env
        .cp
        .kubectl(&["get", "svc", "exposed", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap()
        .parse()
        .unwrap();
    let np: u16 = env
        .cp
        .kubectl(&[
            "get",
            "svc",
            "exposed",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])
        .unwrap()
        .parse()
        .unwrap();
    assert!(testbed::plan::in_range(ip), "{ip}");
    assert!((30000..=32767).contains(&np), "{np}");
    let ok = eventually(WAIT, || {
        env.answered(ip, 8000, 20) == (env.ready(), 0)
            && curl(&env.c.outside[0].ns, env.c.nodes[1].addr, np, T).is_ok()
    });
    assert!(
        ok,
        "{ip}:8000 / NodePort {np} not served\n{}",
        env.diagnose()
    );
}

#[test]
fn a_rolling_update_under_load_loses_no_request() {
    require_privileged!("a_rolling_update_under_load_loses_no_request");
    let env = Env::new(&[]);
    env.apply_example();
    // Old pods keep serving for 2 s after they are marked terminating, as a preStop sleep
    // does in production, so endpoints can follow before they stop.
    env.cp
        .kubectl(&[
            "patch",
            "deployment",
            "service-test",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/lifecycle","value":{"preStop":{"sleep":{"seconds":2}}}}]"#,
        ])
        .unwrap();
    env.wait_served_by(2);
    let before = env.ready();
    let client = env.c.pod("client").ns.name().to_owned();
    let load = std::thread::spawn(move || {
        // A namespace handle for the thread: the name of one the test keeps alive.
        testbed::cmd::run_timeout(
            &[
                "ip",
                "netns",
                "exec",
                &client,
                "python3",
                "-c",
                "import socket, sys, time\nok = err = 0\nt0 = time.time()\nwhile time.time() - t0 < 25:\n    try:\n        s = socket.create_connection(('198.18.128.10', 80), timeout=2)\n        s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n        d = b''\n        while True:\n            c = s.recv(4096)\n            if not c: break\n            d += c\n        s.close()\n        ok += d.startswith(b'HTTP/1.0 200') or d.startswith(b'HTTP/1.1 200')\n        err += not (d.startswith(b'HTTP/1.0 200') or d.startswith(b'HTTP/1.1 200'))\n    except Exception as e:\n        err += 1\n        print('ERR', e, flush=True)\n    time.sleep(0.02)\nprint('OK', ok, 'ERR', err)\n",
            ],
            Duration::from_secs(40),
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    env.cp
        .kubectl(&["rollout", "restart", "deployment", "service-test"])
        .unwrap();
    let out = load.join().unwrap().unwrap();
    let after = env.ready();
    assert!(
        after.is_disjoint(&before),
        "the rollout did not replace the pods: {before:?} {after:?}"
    );
    let last = out.lines().last().unwrap_or_default().to_owned();
    let mut it = last.split_whitespace();
    let ok: u32 = it.nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let err: u32 = it.nth(1).and_then(|v| v.parse().ok()).unwrap_or(u32::MAX);
    assert!(
        ok > 100 && err == 0,
        "during the rollout: {out}\n{}",
        env.diagnose()
    );
}

#[test]
fn the_agent_follows_changes_after_an_api_server_restart_and_expiring_watches() {
    require_privileged!(
        "the_agent_follows_changes_after_an_api_server_restart_and_expiring_watches"
    );
    // Watches the API server closes after 5 to 10 s, as it closes every watch after a while.
    let mut env = Env::new(&["--min-request-timeout=5"]);
    env.apply_example();
    env.wait_served_by(2);
    std::thread::sleep(Duration::from_secs(12));
    env.cp
        .kubectl(&["scale", "deployment", "service-test", "--replicas=3"])
        .unwrap();
    env.wait_served_by(3);
    // An outage: the last good state keeps serving; after it, changes are followed again.
    env.cp.stop_apiserver();
    let (names, failed) = env.answered(CLUSTER_IP, 80, 30);
    assert_eq!((names.len(), failed), (3, 0), "during the outage");
    env.cp.restart_apiserver().unwrap();
    env.cp
        .kubectl(&["scale", "deployment", "service-test", "--replicas=2"])
        .unwrap();
    env.wait_served_by(2);
}

#[test]
fn an_agent_killed_and_restarted_under_load_loses_no_request() {
    require_privileged!("an_agent_killed_and_restarted_under_load_loses_no_request");
    let mut env = Env::new(&[]);
    env.apply_example();
    env.wait_served_by(2);
    let client = env.c.pod("client").ns.name().to_owned();
    let load = std::thread::spawn(move || {
        testbed::cmd::run_timeout(
            &[
                "ip",
                "netns",
                "exec",
                &client,
                "python3",
                "-c",
                "import socket, time\nok = err = 0\nt0 = time.time()\nwhile time.time() - t0 < 8:\n    try:\n        s = socket.create_connection(('198.18.128.10', 80), timeout=2)\n        s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n        d = s.recv(4096)\n        s.close()\n        ok += d.startswith(b'HTTP/1.')\n        err += not d.startswith(b'HTTP/1.')\n    except Exception:\n        err += 1\n    time.sleep(0.01)\nprint('OK', ok, 'ERR', err)\n",
            ],
            Duration::from_secs(30),
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    env.agents[0].as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    env.start_agent(0).unwrap();
    let out = load.join().unwrap().unwrap();
    assert!(out.trim().ends_with("ERR 0"), "{out}\n{}", env.diagnose());
}

#[test]
fn the_agents_service_account_may_read_what_it_needs_and_nothing_else() {
    require_privileged!("the_agents_service_account_may_read_what_it_needs_and_nothing_else");
    let env = Env::new(&[]);
    let bin = testbed::controlplane::versions::binary("kubectl");
    let kc = format!("--kubeconfig={}", env.kubeconfig.display());
    let as_agent = |args: &[&str]| {
        let mut argv = vec![bin.to_str().unwrap(), kc.as_str()];
        argv.extend_from_slice(args);
        env.cp
            .ns
            .exec_output(&argv, Duration::from_secs(30))
            .unwrap()
    };
    for allowed in [
        &["get", "services", "-A"][..],
        &["get", "endpointslices", "-A"],
        &["get", "nodes"],
    ] {
        let out = as_agent(allowed);
        assert!(
            out.status.success(),
            "{allowed:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for denied in [
        &["get", "secrets", "-A"][..],
        &["get", "pods", "-A"],
        &["get", "configmaps", "-n", "kube-system"],
        &["delete", "service", "kubernetes"],
        &["get", "endpoints", "-A"],
    ] {
        let out = as_agent(denied);
        assert!(!out.status.success(), "{denied:?} was allowed");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("forbidden"),
            "{denied:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The agents run with exactly these rights, and are healthy.
    for a in env.agents.iter().flatten() {
        assert_eq!(a.healthz(), Some(200));
    }
}

#[test]
fn the_install_manifests_pass_the_api_servers_validation() {
    require_privileged!("the_install_manifests_pass_the_api_servers_validation");
    let c = Cluster::new(1).unwrap();
    let cp = ControlPlane::start(&c, &[]).unwrap();
    let out = cp
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-k",
            &repo_file("deploy").display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.logs()));
    for kind in [
        "serviceaccount/sluice",
        "clusterrole",
        "clusterrolebinding",
        "daemonset",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }
}
