//! `./x demo` (`cargo xtask demo`): sluice doing kube-proxy's job on a sandbox cluster.
//!
//! Two nodes (network namespaces), each with one pod of the example app of
//! `deploy/examples/service-test.yaml` (python3 answering with the pod's name on 8080), a
//! client pod on node0, and a client outside the cluster. `sluice agent` runs on each node, as
//! a DaemonSet's pods would, with its maps pinned on a private bpffs and its socket programs on
//! the node's cgroup tree (made for the demo; its pods' cgroups sit below it). The clients
//! call the Service's ClusterIP (from the pod, translated at its socket, and from node0 itself)
//! and node0's NodePort (from the pod and from outside, where TC translates it), and the demo
//! prints which pod answered and which client address it saw, live, until Ctrl-C: from
//! outside, the pod on node0 sees the client itself, the pod on node1 sees node0 (SNAT, so its
//! replies come back through node0). `--once` runs ten rounds, checks that every call was
//! answered, by both pods on every frontend, with those addresses, and that `sluice services`
//! shows what the cluster asks for, and exits with the result.
//!
//! Where the Services come from:
//! - by default, manifests mode: the agents read the example's Service and EndpointSlice and
//!   the Node objects from a directory. Up in seconds.
//! - `--control-plane`: the real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   built by `./x setup`) with the sandbox kubelet; the example's Deployment and Service are
//!   applied with kubectl, the kubelet runs the pods, the EndpointSlice controller writes their
//!   slice, and the agents watch the API server as the service account of `deploy/rbac.yaml`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use testbed::{BpfFs, Cluster, HttpServer, agent::AgentProcess, curl, realcluster::RealCluster};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// The example's Service: its ClusterIP, port and nodePort (deploy/examples/service-test.yaml).
const CLUSTER_IP: &str = "198.18.128.10";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
/// The example's pods in manifests mode: the first on node0, the second on node1.
const PODS: [&str; 2] = ["service-test-7d4f9-a", "service-test-7d4f9-b"];

/// The Node object a kubelet would register for the sandbox node.
fn node_yaml(name: &str, addr: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {addr}}}\n    - {{type: Hostname, address: {name}}}\n"
    )
}

/// Whether the demo builds sluice first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// `cargo build` the binary (`./x demo`).
    Yes,
    /// Use `target/debug/sluice` as it is: `./x test` built it with the tests, and the kernel
    /// matrix's guests run it meanwhile. A `cargo build` of the one package resolves other
    /// features than the workspace's tests and would relink the file under them.
    AsBuilt,
}

pub fn run(once: bool, control_plane: bool, build: Build) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces and loads eBPF programs: run it as root"
    );
    let root = crate::workspace_root();
    let sluice = root.join("target/debug/sluice");
    if build == Build::Yes {
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
    }
    ensure!(sluice.is_file(), "{} is not built", sluice.display());
    testbed::netns::sweep_stale();

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        )
    }
    .context("installing the Ctrl-C handler")?;

    let work = testbed::TempDir::new("demo").context("creating the demo's directory")?;
    let c = Cluster::new(2)?;
    let mut stage = if control_plane {
        Stage::real(c, &sluice)?
    } else {
        Stage::manifests(c, &sluice, &root, work.path())?
    };
    let result = story(&mut stage, once, &sluice);
    if result.is_err() {
        eprintln!(
            "demo: FAILED; what the cluster logged:\n{}",
            stage.diagnose()
        );
    }
    result
}

/// The story's clients: a pod on node0 and one outside the cluster.
fn add_clients(c: &mut Cluster) -> anyhow::Result<()> {
    c.add_pod(0, "client")?;
    c.add_outside()?;
    Ok(())
}

/// What the story runs on: the sandbox cluster with the example's two pods (the first on
/// node0, the second on node1) and an agent per node.
enum Stage {
    Manifests {
        // Field order is drop order: the agents before their bpffs, the cluster last.
        agents: Vec<AgentProcess>,
        pinned: Vec<(BpfFs, PathBuf)>,
        _servers: Vec<HttpServer>,
        c: Cluster,
    },
    Real(Box<RealCluster>, [String; 2]),
}

impl Stage {
    /// Manifests mode: the example's manifests and the nodes' Node objects in a directory.
    fn manifests(mut c: Cluster, sluice: &Path, root: &Path, work: &Path) -> anyhow::Result<Self> {
        // Each node's cgroup tree, for socket LB (its pods' below it, as on a real node).
        c.add_cgroups().context("making the nodes' cgroups")?;
        // The pods first: the example's EndpointSlice names their addresses (the first of each
        // node's pod range).
        c.add_pod(0, PODS[0])?;
        c.add_pod(1, PODS[1])?;
        add_clients(&mut c)?;
        let servers: Vec<HttpServer> = PODS
            .iter()
            .map(|p| HttpServer::start(&c.pod(p).ns, p, 8080))
            .collect::<Result<_, _>>()?;
        let manifests = work.join("manifests");
        std::fs::create_dir_all(&manifests).context("creating the manifests directory")?;
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
            let cgroup = n
                .cgroup
                .as_ref()
                .context("the node has no cgroup")?
                .path()
                .display()
                .to_string();
            let args = testbed::agent::sandbox_args(
                &name,
                &pins,
                &[
                    "--manifests",
                    dir,
                    "--socket-lb",
                    "all",
                    "--cgroup-root",
                    &cgroup,
                ],
            );
            println!("agent on {name}: sluice agent {}", args.join(" "));
            let log = work.join(format!("agent-{name}.log"));
            let mut agent = AgentProcess::start(&n.ns, sluice, &args, &log)?;
            agent.wait_healthy(Duration::from_secs(30));
            agents.push(agent);
            pinned.push((bpffs, pins));
        }
        Ok(Self::Manifests {
            agents,
            pinned,
            _servers: servers,
            c,
        })
    }

    /// The real control plane: the example applied with kubectl, its pods run by the sandbox
    /// kubelet, the agents watching the API server.
    fn real(mut c: Cluster, sluice: &Path) -> anyhow::Result<Self> {
        add_clients(&mut c)?;
        let t = Instant::now();
        let rc = RealCluster::start(
            c,
            sluice,
            testbed::realcluster::Options {
                socket_lb: true,
                ..Default::default()
            },
        )?;
        println!(
            "control plane: etcd {}, kube-apiserver and kube-controller-manager {} at {}; the \
             sandbox kubelet registered node0 and node1; deploy/rbac.yaml applied; agents \
             healthy ({:.1} s)",
            testbed::controlplane::versions::ETCD,
            testbed::controlplane::versions::KUBERNETES,
            rc.cp.url(),
            t.elapsed().as_secs_f64()
        );
        for k in 0..rc.c.nodes.len() {
            println!(
                "agent on node{k}: sluice agent {}",
                rc.agent_args(k).join(" ")
            );
        }
        println!(
            "(the agents authenticate with a service account token valid {} h)",
            testbed::realcluster::TOKEN_HOURS
        );
        let kubectl = |args: &[&str], input: Option<&str>| -> anyhow::Result<()> {
            let out = rc.cp.kubectl_with_input(args, input)?;
            println!("$ kubectl {}\n{}", args.join(" "), out.trim_end());
            Ok(())
        };
        kubectl(
            &["apply", "-f", "-"],
            Some(&testbed::realcluster::example_app()?),
        )?;
        let t = Instant::now();
        let mut pods = Vec::new();
        let up = testbed::agent::eventually(Duration::from_secs(60), || {
            pods = rc.ready_pods("service-test");
            pods.len() == 2
        });
        ensure!(
            up,
            "the example's two pods were not ready in 60 s\n{}",
            rc.diagnose()
        );
        pods.sort_by_key(|p| p.node);
        ensure!(
            pods[0].node == 0 && pods[1].node == 1,
            "the kubelet placed the example's pods on nodes {} and {}, not one on each",
            pods[0].node,
            pods[1].node
        );
        println!("pods ready after {:.1} s", t.elapsed().as_secs_f64());
        kubectl(
            &[
                "get",
                "deployments,pods,services,endpointslices",
                "-o",
                "wide",
            ],
            None,
        )?;
        let names = [pods[0].name.clone(), pods[1].name.clone()];
        Ok(Self::Real(Box::new(rc), names))
    }

    fn cluster(&self) -> &Cluster {
        match self {
            Self::Manifests { c, .. } => c,
            Self::Real(rc, _) => &rc.c,
        }
    }

    fn pods(&self) -> [&str; 2] {
        match self {
            Self::Manifests { .. } => PODS,
            Self::Real(_, names) => [&names[0], &names[1]],
        }
    }

    /// Node0's agent's pin path.
    fn pins(&self) -> PathBuf {
        match self {
            Self::Manifests { pinned, .. } => pinned[0].1.clone(),
            Self::Real(rc, _) => rc.pins(0),
        }
    }

    /// What node0's `sluice services` must show beyond the example's frontends: on the real
    /// control plane, the `kubernetes` Service (ClusterIP:443, one endpoint: the API server).
    fn other_services(&self) -> Vec<(String, u64, usize)> {
        match self {
            Self::Manifests { .. } => Vec::new(),
            Self::Real(..) => vec![(
                testbed::controlplane::kubernetes_service_ip().to_string(),
                443,
                1,
            )],
        }
    }

    /// Which agent has exited, with its log.
    fn exited_agent(&mut self) -> Option<String> {
        let agents: Vec<&mut AgentProcess> = match self {
            Self::Manifests { agents, .. } => agents.iter_mut().collect(),
            Self::Real(rc, _) => rc.agents.iter_mut().flatten().collect(),
        };
        agents.into_iter().enumerate().find_map(|(k, a)| {
            (!a.running()).then(|| format!("the agent on node{k} exited; its log:\n{}", a.log()))
        })
    }

    fn diagnose(&self) -> String {
        match self {
            Self::Manifests { agents, .. } => agents
                .iter()
                .enumerate()
                .map(|(k, a)| format!("--- agent on node{k}:\n{}\n", a.log()))
                .collect(),
            Self::Real(rc, _) => rc.diagnose(),
        }
    }
}

/// The calls, live or ten rounds and the checks.
fn story(stage: &mut Stage, once: bool, sluice: &Path) -> anyhow::Result<()> {
    let c = stage.cluster();
    let pods = stage.pods();
    let node = &c.nodes[0];
    let pins = stage.pins();
    println!(
        "sandbox: node0 {} and node1 {}; pods {} {} (node0) and {} {} (node1); client pod {} (node0); outside client {}",
        node.addr,
        c.nodes[1].addr,
        pods[0],
        pod_addr(stage, 0),
        pods[1],
        pod_addr(stage, 1),
        c.pod("client").addr,
        c.outside[0].addr,
    );
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
    let calls: [(&str, &testbed::Netns, std::net::Ipv4Addr, u16); 4] = [
        ("client pod -> ClusterIP", client, cluster_ip, PORT),
        ("client pod -> NodePort ", client, node.addr, NODE_PORT),
        ("outside    -> NodePort ", outside, node.addr, NODE_PORT),
        ("node0 host -> ClusterIP", &node.ns, cluster_ip, PORT),
    ];
    // Once: ten rounds, and then (up to 40) while some pod has not yet answered some
    // frontend, so a uniform choice fails the check by chance with p = 2^-39, not 2^-9.
    let rounds = if once { 40 } else { usize::MAX };
    let mut done = 0;
    let mut answered: BTreeMap<(usize, String), u32> = BTreeMap::new();
    // (frontend, pod, the client address the pod saw)
    let mut seen: std::collections::BTreeSet<(usize, String, String)> = Default::default();
    let mut failures = Vec::new();
    for round in 0..rounds {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        let all_answered = (0..calls.len()).all(|i| {
            pods.iter()
                .all(|p| answered.contains_key(&(i, p.to_string())))
        });
        if once && round >= 10 && all_answered {
            break;
        }
        done = round + 1;
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
    let conntrack = node.ns.exec(&[
        sluice.to_str().context("path")?,
        "conntrack",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    println!("sluice conntrack (live flows):\n{conntrack}");
    let (node_addr, outside_addr) = (node.addr, c.outside[0].addr);
    let pods = pods.map(str::to_owned);
    let other = stage.other_services();
    if let Some(exited) = stage.exited_agent() {
        anyhow::bail!(exited);
    }
    if once {
        let node_ns = &stage.cluster().nodes[0].ns;
        check(
            &failures, &answered, done, &pods, sluice, node_ns, &pins, node_addr, &other,
        )?;
        let sources = [(2, &pods[0], outside_addr), (2, &pods[1], node_addr)];
        for (i, pod, want) in sources {
            ensure!(
                seen.iter()
                    .all(|(f, p, saw)| *f != i || p != pod || *saw == want.to_string()),
                "from outside, {pod} should have seen {want}: {seen:?}"
            );
        }
        println!(
            "demo: ok: every call answered; both pods served every frontend; from outside, the \
             pod on node0 saw the client and the pod on node1 saw node0 (SNAT)"
        );
    }
    Ok(())
}

/// The address of the example's pod `i`.
fn pod_addr(stage: &Stage, i: usize) -> std::net::Ipv4Addr {
    match stage {
        Stage::Manifests { c, .. } => c.pod(PODS[i]).addr,
        Stage::Real(rc, names) => rc
            .kubelet
            .pods()
            .into_iter()
            .find(|p| p.name == names[i])
            .map_or(std::net::Ipv4Addr::UNSPECIFIED, |p| p.addr),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    failures: &[String],
    answered: &BTreeMap<(usize, String), u32>,
    rounds: usize,
    pods: &[String; 2],
    sluice: &Path,
    ns: &testbed::Netns,
    pins: &Path,
    node_addr: std::net::Ipv4Addr,
    other: &[(String, u64, usize)],
) -> anyhow::Result<()> {
    ensure!(
        failures.is_empty(),
        "{} of {} calls failed, the first: {}",
        failures.len(),
        rounds * 4,
        failures[0]
    );
    for i in 0..4 {
        for p in pods {
            ensure!(
                answered.get(&(i, p.clone())).copied().unwrap_or(0) > 0,
                "{p} never answered frontend #{i} in {rounds} calls (uniform choice: p = 2^-{}): {answered:?}",
                rounds - 1
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
    want.extend_from_slice(other);
    want.sort();
    ensure!(
        got == want,
        "sluice services shows {got:?}, expected {want:?}"
    );
    Ok(())
}
