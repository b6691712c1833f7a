//! The real control plane in the sandbox: it starts, serves the sandbox's ranges and address,
//! authorizes with RBAC, and runs its controllers.
use testbed::{Cluster, controlplane::ControlPlane, plan, require_privileged};

#[test]
fn the_api_server_advertises_a_sandbox_address_and_authorizes_with_rbac() {
    require_privileged!("the_api_server_advertises_a_sandbox_address_and_authorizes_with_rbac");
    let c = Cluster::new(1).unwrap();
    let cp = ControlPlane::start(&c, &[]).unwrap();
    // The `kubernetes` Service: the first address of the sandbox's Service range, its endpoint
    // the control plane's sandbox address, never anything outside 198.18.0.0/15.
    let ip = cp
        .kubectl(&[
            "get",
            "svc",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap();
    assert_eq!(
        ip,
        testbed::controlplane::kubernetes_service_ip().to_string()
    );
    let ep = cp
        .kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=kubernetes",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ])
        .unwrap();
    assert_eq!(ep, plan::CONTROL_PLANE.to_string(), "{}", cp.logs());
    // A service account gets a token from the TokenRequest API, and RBAC denies it what no
    // role grants.
    cp.kubectl(&["create", "serviceaccount", "probe"]).unwrap();
    let dir = testbed::TempDir::new("probe").unwrap();
    let kc = dir.join("probe.kubeconfig");
    cp.service_account_kubeconfig("default", "probe", 1, &kc)
        .unwrap();
    let out = cp.kubectl_as(&kc, &["get", "secrets"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_sandbox_kubelet_runs_pods_and_the_endpointslice_controller_follows_their_conditions() {
    require_privileged!(
        "the_sandbox_kubelet_runs_pods_and_the_endpointslice_controller_follows_their_conditions"
    );
    let c = std::sync::Arc::new(Cluster::new(2).unwrap());
    let cp = ControlPlane::start(&c, &[]).unwrap();
    let kubelet = testbed::kubelet::Kubelet::start(
        c.clone(),
        &cp.ns,
        &cp.admin_kubeconfig(),
        &["zone-a", "zone-b"],
    )
    .unwrap();
    cp.kubectl_with_input(
        &["apply", "-f", "-"],
        Some(&testbed::realcluster::example_app().unwrap()),
    )
    .unwrap();
    let endpoints = |cond: &str| {
        cp.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=service-test",
            "-o",
            &format!("jsonpath={{range .items[*].endpoints[*]}}{{.addresses[0]}}={{.conditions.{cond}}} {{end}}"),
        ])
        .unwrap_or_default()
    };
    let ok = testbed::agent::eventually(std::time::Duration::from_secs(60), || {
        endpoints("ready").matches("=true").count() == 2
    });
    assert!(
        ok,
        "ready endpoints: {:?}; kubelet: {:?} {:?}\n{}",
        endpoints("ready"),
        kubelet.pods(),
        kubelet.errors(),
        cp.logs()
    );
    let pods = kubelet.pods();
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().all(|p| p.ready), "{pods:?}");
    // The pods really run: each answers with its name from its own address.
    for p in &pods {
        let r = testbed::curl(
            &c.nodes[p.node].ns,
            p.addr,
            8080,
            std::time::Duration::from_secs(3),
        )
        .unwrap();
        assert_eq!(r.body, p.name);
    }
    // A pod deleted with a grace period stays, terminating and still serving, while its
    // preStop runs; then it is gone.
    cp.kubectl(&["patch", "deployment", "service-test", "--type=json", "-p",
        r#"[{"op":"add","path":"/spec/template/spec/containers/0/lifecycle","value":{"preStop":{"sleep":{"seconds":3}}}}]"#])
        .unwrap();
    // Both conditions of every endpoint, from one read.
    let mut seen = String::new();
    let ok = testbed::agent::eventually(std::time::Duration::from_secs(60), || {
        seen = cp
            .kubectl(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=service-test",
                "-o",
                "jsonpath={range .items[*].endpoints[*]}{.conditions.terminating}/{.conditions.serving} {end}",
            ])
            .unwrap_or_default();
        seen.contains("true/true")
    });
    assert!(
        ok,
        "no endpoint was ever terminating and still serving: {seen}"
    );
    let ok = testbed::agent::eventually(std::time::Duration::from_secs(60), || {
        let t = endpoints("terminating");
        !t.contains("=true") && endpoints("ready").matches("=true").count() == 2
    });
    assert!(ok, "the rollout did not finish: {}", endpoints("ready"));
    // Its nodes: registered with their sandbox address, zone and Ready, and kept so: a Node
    // deleted comes back at the next heartbeat.
    let node1 = || {
        cp.kubectl(&[
            "get",
            "node",
            "node1",
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address} {.metadata.labels.topology\.kubernetes\.io/zone} {.status.conditions[?(@.type=="Ready")].status}"#,
        ])
    };
    let want = format!("{} zone-b True", c.nodes[1].addr);
    assert_eq!(node1().unwrap(), want);
    cp.kubectl(&["delete", "node", "node1"]).unwrap();
    let back = testbed::agent::eventually(3 * testbed::kubelet::HEARTBEAT, || {
        node1().is_ok_and(|n| n == want)
    });
    assert!(back, "node1 was not registered again: {:?}", node1());
    drop(kubelet);
}
