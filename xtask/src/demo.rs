//! `./x demo` (`cargo xtask demo`): sluice doing kube-proxy's job on a sandbox cluster.
//!
//! Two nodes (network namespaces), each with one pod of the example app of
//! `deploy/examples/service-test.yaml` (python3 answering with the pod's name on 8080), a
//! client pod on node0, and a client outside the cluster. `sluice agent` runs on each node in
//! manifests mode, as a DaemonSet's pods would, reading the example's Service and EndpointSlice
//! and the Node objects, with its maps pinned on a private bpffs. The clients call the
//! Service's ClusterIP (from the pod) and node0's NodePort (from the pod and from outside), and
//! the demo prints which pod answered and which client address it saw, live, until Ctrl-C:
//! from outside, the pod on node0 sees the client itself, the pod on node1 sees node0 (SNAT, so
//! its replies come back through node0). `--once` runs ten rounds, checks that every call was
//! answered, by both pods on every frontend, with those addresses, and that `sluice services`
//! shows what the manifests ask for, and exits with the result.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use testbed::{BpfFs, Cluster, HttpServer, agent::AgentProcess, curl};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// The example's Service: its ClusterIP, port and nodePort (deploy/examples/service-test.yaml).
const CLUSTER_IP: &str = "198.18.128.10";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
/// The example's pods: the first on node0, the second on node1.
const PODS: [&str; 2] = ["service-test-7d4f9-a", "service-test-7d4f9-b"];

/// The Node object a kubelet would register for the sandbox node.
fn node_yaml(name: &str, addr: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {addr}}}\n    - {{type: Hostname, address: {name}}}\n"
    )
}

pub fn run(once: bool) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces and loads eBPF programs: run it as root"
    );
    let root = crate::workspace_root();
    let st = testbed::cmd::command(&["cargo"])?
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--package",
            "proxy-userspace",
            "--bin",
            "sluice",
        ])
        .status()
        .context("building sluice")?;
    ensure!(st.success(), "building sluice failed");
    let sluice = root.join("target/debug/sluice");
    testbed::netns::sweep_stale();

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        )
    }
    .context("installing the Ctrl-C handler")?;

    let mut c = Cluster::new(2)?;
    c.add_pod(0, PODS[0])?;
    c.add_pod(1, PODS[1])?;
    c.add_pod(0, "client")?;
    c.add_outside()?;
    let _servers: Vec<HttpServer> = PODS
        .iter()
        .map(|p| HttpServer::start(&c.pod(p).ns, p, 8080))
        .collect::<Result<_, _>>()?;
    let node = &c.nodes[0];
    println!(
        "sandbox: node0 {} and node1 {}; pods {} {} (node0) and {} {} (node1); client pod {} (node0); outside client {}",
        node.addr,
        c.nodes[1].addr,
        PODS[0],
        c.pod(PODS[0]).addr,
        PODS[1],
        c.pod(PODS[1]).addr,
        c.pod("client").addr,
        c.outside[0].addr,
    );

    // The manifests the agents read: the example app, and the sandbox nodes' Node objects.
    let work = std::env::temp_dir().join(testbed::netns::unique_name("demo"));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).context("creating the manifests directory")?;
    let _cleanup = RemoveDir(work.clone());
    std::fs::copy(
        root.join("deploy/examples/service-test.yaml"),
        manifests.join("service-test.yaml"),
    )
    .context("copying deploy/examples/service-test.yaml")?;
    let nodes: Vec<String> = c
        .nodes
        .iter()
        .map(|n| node_yaml(&format!("node{}", n.index), n.addr))
        .collect();
    std::fs::write(manifests.join("nodes.yaml"), nodes.join("---\n"))?;
    let dir = manifests.to_str().context("non-UTF-8 temp dir")?;
    // One agent per node, each with its own pins, as a DaemonSet runs them.
    let mut pinned = Vec::new();
    let mut agents = Vec::new();
    for n in &c.nodes {
        let bpffs = BpfFs::new()?;
        let pins = bpffs.path().join("sluice");
        let name = format!("node{}", n.index);
        let args = testbed::agent::sandbox_args(&name, &pins, &["--manifests", dir]);
        println!("agent on {name}: sluice agent {}", args.join(" "));
        let log = work.join(format!("agent-{name}.log"));
        let mut agent = AgentProcess::start(&n.ns, &sluice, &args, &log)?;
        agent.wait_healthy(Duration::from_secs(30));
        agents.push(agent);
        pinned.push((bpffs, pins));
    }
    println!("agents: healthy (first full sync done)");
    let pins = &pinned[0].1;
    let services = node.ns.exec(&[
        sluice.to_str().context("path")?,
        "services",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    println!("sluice services (node0):\n{services}");

    let cluster_ip: std::net::Ipv4Addr = CLUSTER_IP.parse()?;
    let client = &c.pod("client").ns;
    let outside = &c.outside[0].ns;
    let calls: [(&str, &testbed::Netns, std::net::Ipv4Addr, u16); 3] = [
        ("client pod -> ClusterIP", client, cluster_ip, PORT),
        ("client pod -> NodePort ", client, node.addr, NODE_PORT),
        ("outside    -> NodePort ", outside, node.addr, NODE_PORT),
    ];
    let rounds = if once { 10 } else { usize::MAX };
    let mut answered: BTreeMap<(usize, String), u32> = BTreeMap::new();
    // (frontend, pod, the client address the pod saw)
    let mut seen: std::collections::BTreeSet<(usize, String, String)> = Default::default();
    let mut failures = Vec::new();
    for _ in 0..rounds {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        for (i, (what, ns, addr, port)) in calls.iter().enumerate() {
            match curl(ns, *addr, *port, Duration::from_secs(3)) {
                Ok(r) => {
                    let saw = r.client.map_or("?".into(), |c| c.ip().to_string());
                    println!(
                        "{what} {addr}:{port} answered by {} (which saw the call come from {saw})",
                        r.body
                    );
                    seen.insert((i, r.body.clone(), saw));
                    *answered.entry((i, r.body)).or_insert(0) += 1;
                }
                Err(e) => {
                    println!("{what} {addr}:{port} FAILED: {e}");
                    failures.push(format!("{what}: {e}"));
                }
            }
        }
        if !once {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    for (k, agent) in agents.iter_mut().enumerate() {
        if !agent.running() {
            anyhow::bail!("the agent on node{k} exited; its log:\n{}", agent.log());
        }
    }
    let conntrack = node.ns.exec(&[
        sluice.to_str().context("path")?,
        "conntrack",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    println!("sluice conntrack (live flows):\n{conntrack}");
    if once {
        let sources = [(2, PODS[0], c.outside[0].addr), (2, PODS[1], node.addr)];
        let result =
            check(&failures, &answered, &sluice, &node.ns, pins, node.addr).and_then(|()| {
                for (i, pod, want) in sources {
                    ensure!(
                        seen.iter()
                            .all(|(f, p, saw)| *f != i || p != pod || *saw == want.to_string()),
                        "from outside, {pod} should have seen {want}: {seen:?}"
                    );
                }
                Ok(())
            });
        if let Err(e) = result {
            for (k, agent) in agents.iter().enumerate() {
                eprintln!(
                    "demo: FAILED; the log of the agent on node{k}:\n{}",
                    agent.log()
                );
            }
            return Err(e);
        }
        println!(
            "demo: ok: every call answered; both pods served every frontend; from outside, the \
             pod on node0 saw the client and the pod on node1 saw node0 (SNAT)"
        );
    }
    drop(agents);
    Ok(())
}

fn check(
    failures: &[String],
    answered: &BTreeMap<(usize, String), u32>,
    sluice: &Path,
    ns: &testbed::Netns,
    pins: &Path,
    node_addr: std::net::Ipv4Addr,
) -> anyhow::Result<()> {
    ensure!(
        failures.is_empty(),
        "{} of 30 calls failed, the first: {}",
        failures.len(),
        failures[0]
    );
    for i in 0..3 {
        for p in PODS {
            ensure!(
                answered.get(&(i, p.to_owned())).copied().unwrap_or(0) > 0,
                "{p} never answered frontend #{i} in 10 calls (uniform choice: p = 2^-9): {answered:?}"
            );
        }
    }
    let json = ns.exec(&[
        sluice.to_str().context("path")?,
        "services",
        "-o",
        "json",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&json).context("sluice services -o json")?;
    let mut got: Vec<(String, u64, usize)> = v
        .iter()
        .map(|f| {
            (
                f["address"].as_str().unwrap_or("").to_owned(),
                f["port"].as_u64().unwrap_or(0),
                f["backends"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (CLUSTER_IP.to_owned(), u64::from(PORT), 2),
        (node_addr.to_string(), u64::from(NODE_PORT), 2),
    ];
    want.sort();
    ensure!(
        got == want,
        "sluice services shows {got:?}, expected {want:?}"
    );
    Ok(())
}

struct RemoveDir(std::path::PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
