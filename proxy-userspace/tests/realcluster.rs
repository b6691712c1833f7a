//! The agent against the real Kubernetes control plane (kube-apiserver, etcd,
//! kube-controller-manager, built by `./x setup`), with pods run by the sandbox kubelet: the
//! API server's own defaulting, validation, RBAC and watches, and the EndpointSlice
//! controller's real output. The agents authenticate as the service account of
//! `deploy/rbac.yaml`, applied for real, so its least-privilege RBAC is proven against the
//! real authorizer.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::json;
use testbed::{
    Attempt, Cluster, LoopResult, RequestLoop,
    agent::eventually,
    controlplane::ControlPlane,
    curl, http_many,
    realcluster::{Options, RealCluster, example_app, repo_file},
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
    /// control plane, an agent per node.
    fn new(opts: Options) -> Self {
        let mut c = Cluster::new(2).unwrap();
        c.add_pod(0, "client").unwrap();
        c.add_outside().unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        Self(RealCluster::start(c, bin, opts).unwrap())
    }

    /// Requests to the example's ClusterIP from the client pod, one every 10 ms, for at most
    /// 2 minutes.
    fn load(&self) -> RequestLoop {
        let to = SocketAddr::from((CLUSTER_IP, 80));
        RequestLoop::start(
            self.client(),
            to,
            Duration::from_millis(10),
            20_000,
            Duration::from_secs(120),
        )
        .unwrap()
    }

    /// Asserts that the load lost nothing and was answered.
    fn assert_nothing_lost(&self, what: &str, r: &LoopResult) {
        assert!(
            r.failed == 0 && r.ok() > 0,
            "{what}: {} answered ({:?}), {} failed, first failures {:?}\n{}",
            r.ok(),
            r.answered_by,
            r.failed,
            r.failures,
            self.diagnose()
        );
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
    let env = Env::new(Options::default());
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
        .kubectl(&["scale", "deployment", APP, "--replicas=3"])
        .unwrap();
    env.wait_served_by(3);

    env.cp
        .kubectl_with_input(&["delete", "-f", "-"], Some(&example_app().unwrap()))
        .unwrap();
    // Read while the `kubernetes` Service is there, so that a failed read proves nothing.
    let kubernetes = testbed::controlplane::kubernetes_service_ip().to_string();
    let gone = eventually(WAIT, || {
        let s = env.services(0);
        s.iter().any(|f| f["address"] == kubernetes.as_str())
            && s.iter().all(|f| f["address"] != CLUSTER_IP.to_string())
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
    let env = Env::new(Options::default());
    env.apply_example();
    env.wait_served_by(2);
    env.cp
        .kubectl(&[
            "expose",
            "deployment",
            APP,
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
    let env = Env::new(Options::default());
    env.apply_example();
    // Old pods keep serving for 2 s after they are marked terminating, as a preStop sleep
    // does in production, so endpoints can follow before they stop.
    env.cp
        .kubectl(&[
            "patch",
            "deployment",
            APP,
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/lifecycle","value":{"preStop":{"sleep":{"seconds":2}}}}]"#,
        ])
        .unwrap();
    env.wait_served_by(2);
    let before = env.ready();
    let load = env.load();
    std::thread::sleep(Duration::from_secs(1));
    env.cp
        .kubectl(&["rollout", "restart", "deployment", APP])
        .unwrap();
    // Until the controller says the rollout is complete, and the old pods are gone.
    env.cp
        .kubectl(&["rollout", "status", "deployment", APP, "--timeout=90s"])
        .unwrap_or_else(|e| panic!("{e}\n{}", env.diagnose()));
    let replaced = eventually(WAIT, || {
        let pods: BTreeSet<String> = env
            .kubelet
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with(APP))
            .map(|p| p.name)
            .collect();
        pods.len() == 2 && pods.is_disjoint(&before) && env.ready() == pods
    });
    std::thread::sleep(Duration::from_secs(1));
    let r = load.stop();
    assert!(
        replaced,
        "the rollout did not replace the pods: {before:?} -> {:?}",
        env.kubelet.pods()
    );
    env.assert_nothing_lost("during the rollout", &r);
    // Both generations answered under the load.
    assert!(
        before.iter().any(|p| r.answered_by.contains_key(p)),
        "{:?}",
        r.answered_by
    );
    assert!(
        env.ready().iter().any(|p| r.answered_by.contains_key(p)),
        "{:?}",
        r.answered_by
    );
}

/// How many watches of Services the API server has served (ended), from its own metrics.
fn service_watches(env: &Env) -> f64 {
    let text = env.cp.kubectl(&["get", "--raw", "/metrics"]).unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(r#"verb="WATCH""#)
                && l.contains(r#"resource="services""#)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_agent_follows_changes_across_expiring_watches_and_an_api_server_restart() {
    require_privileged!(
        "the_agent_follows_changes_across_expiring_watches_and_an_api_server_restart"
    );
    // The agents ask the API server to end every watch after 5 s.
    let mut env = Env::new(Options {
        agent_flags: &["--watch-timeout", "5"],
        ..Options::default()
    });
    env.apply_example();
    env.wait_served_by(2);
    let watches = service_watches(&env);
    std::thread::sleep(Duration::from_secs(13));
    // Each agent's Services watch ended (and was resumed) at least twice meanwhile.
    let ended = service_watches(&env) - watches;
    assert!(ended >= 4.0, "only {ended} Services watches ended in 13 s");
    env.cp
        .kubectl(&["scale", "deployment", APP, "--replicas=3"])
        .unwrap();
    env.wait_served_by(3);
    // An outage: the last good state keeps serving; after it, changes are followed again.
    env.cp.stop_apiserver();
    let (names, failed) = env.answered(CLUSTER_IP, 80, 30);
    assert_eq!((names.len(), failed), (3, 0), "during the outage");
    env.cp.restart_apiserver().unwrap();
    env.cp
        .kubectl(&["scale", "deployment", APP, "--replicas=2"])
        .unwrap();
    env.wait_served_by(2);
}

#[test]
fn an_agent_killed_and_restarted_under_load_loses_no_request() {
    require_privileged!("an_agent_killed_and_restarted_under_load_loses_no_request");
    let mut env = Env::new(Options::default());
    env.apply_example();
    env.wait_served_by(2);
    let load = env.load();
    std::thread::sleep(Duration::from_secs(1));
    env.agents[0].as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    env.start_agent(0).unwrap();
    // Some more of the load after the new agent took over.
    std::thread::sleep(Duration::from_secs(2));
    let r = load.stop();
    env.assert_nothing_lost("across the agent's restart", &r);
}

/// The service account's rights, and the one optional resource it reads: the API server's
/// ServiceCIDRs, which make the agents drop a pod's traffic to an unallocated ClusterIP (as
/// kube-proxy's nftables mode does) with no flag saying where the Service CIDR is.
#[test]
fn the_agents_service_account_may_read_what_it_needs_and_nothing_else() {
    require_privileged!("the_agents_service_account_may_read_what_it_needs_and_nothing_else");
    let env = Env::new(Options::default());
    let as_agent = |args: &[&str]| env.cp.kubectl_as(&env.kubeconfig, args).unwrap();
    for allowed in [
        &["get", "services", "-A"][..],
        &["get", "endpointslices", "-A"],
        &["get", "nodes"],
        &["get", "servicecidrs"],
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
    // An address of the Service CIDR (198.18.128.0/18) that no Service holds: dropped at the
    // client pod's node, not sent out of its default route.
    let node0 = env.agents[0].as_ref().expect("node0's agent");
    let unallocated = Ipv4Addr::new(198, 18, 190, 7);
    let dropped = eventually(WAIT, || {
        let got = testbed::tcp_connect(env.client(), unallocated, 80, Duration::from_secs(1));
        assert!(
            matches!(got, Ok(testbed::Connect::Timeout)),
            "nothing can answer {unallocated}: {got:?}"
        );
        node0.packets("drop_unallocated_cluster_ip") > 0.0
    });
    assert!(dropped, "{}", env.diagnose());
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
    for object in [
        "serviceaccount/sluice",
        "clusterrole.rbac.authorization.k8s.io/sluice",
        "clusterrolebinding.rbac.authorization.k8s.io/sluice",
        "daemonset.apps/sluice",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{object} "))),
            "{object} missing from:\n{out}"
        );
    }
}

#[test]
fn with_socket_lb_the_agent_reaches_the_api_server_through_the_kubernetes_service() {
    require_privileged!(
        "with_socket_lb_the_agent_reaches_the_api_server_through_the_kubernetes_service"
    );
    let mut env = Env::new(Options {
        socket_lb: true,
        ..Options::default()
    });
    // As a pod's in-cluster config has it: the `kubernetes` Service's ClusterIP.
    let service = testbed::controlplane::kubernetes_service_ip();
    let via_service = env.kubeconfig.with_file_name("via-service.kubeconfig");
    let token = ControlPlane::token_of(&env.kubeconfig).unwrap();
    env.cp
        .write_kubeconfig_via(&via_service, &token, &format!("https://{service}:443"))
        .unwrap();
    // A node's first start after boot: no pins, so no translation yet, and without a
    // bootstrap address the agent cannot reach the API server.
    env.reboot_node(1).unwrap();
    let args = env.agent_args_with(1, &via_service, &[]);
    let a = env.spawn_agent(1, &args).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(
        a.healthz(),
        Some(200),
        "healthy without reaching the API server?\n{}",
        a.log()
    );
    drop(a);
    // With --bootstrap-api-server it does, and the first sync writes the Service's real
    // endpoint over the seed.
    let boot = format!("{}:6443", testbed::plan::CONTROL_PLANE);
    let args = env.agent_args_with(1, &via_service, &["--bootstrap-api-server", &boot]);
    let mut a = env.spawn_agent(1, &args).unwrap();
    a.wait_healthy(WAIT);
    assert!(a.log().contains("bootstrap endpoint"), "{}", a.log());
    let kubernetes = env
        .services(1)
        .into_iter()
        .find(|f| f["address"] == service.to_string() && f["port"] == 443);
    assert_eq!(
        kubernetes
            .as_ref()
            .map(|f| f["backends"][0]["address"].clone()),
        Some(json!(testbed::plan::CONTROL_PLANE.to_string())),
        "{kubernetes:?}"
    );
    // Restarted (no reboot), without the flag: through the pinned maps and socket LB.
    a.kill9();
    let args = env.agent_args_with(1, &via_service, &[]);
    let mut a = env.spawn_agent(1, &args).unwrap();
    // Healthy: it listed everything through the ClusterIP its kubeconfig names.
    a.wait_healthy(WAIT);
    // And it follows changes through the Service.
    env.agents[1] = Some(a);
    env.apply_example();
    env.wait_served_by(2);
}
