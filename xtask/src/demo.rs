//! `./x demo` (`cargo xtask demo`): sluice doing kube-proxy's job on a sandbox cluster.
//!
//! One node (a network namespace) with two backend pods serving the example app of
//! `deploy/examples/service-test.yaml` (python3 answering with the pod's name on 8080), a
//! client pod, and a client outside the cluster. `sluice agent` runs on the node in manifests
//! mode, reading the example's Service and EndpointSlice and a Node object for the sandbox node,
//! with its maps pinned on a private bpffs. The clients call the Service's ClusterIP (from the
//! pod) and its NodePort (from the pod and from outside) and the demo prints which pod
//! answered, live, until Ctrl-C. `--once` runs ten rounds, checks that every call was answered,
//! by both pods on every frontend, and that `sluice services` shows what the manifests ask
//! for, and exits with the result.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use testbed::{BpfFs, Cluster, HttpServer, agent::AgentProcess, curl, plan};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// The example's Service: its ClusterIP, port and nodePort (deploy/examples/service-test.yaml).
const CLUSTER_IP: &str = "198.18.128.10";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
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

    let mut c = Cluster::new(1)?;
    for p in PODS {
        c.add_pod(0, p)?;
    }
    c.add_pod(0, "client")?;
    c.add_outside()?;
    let _servers: Vec<HttpServer> = PODS
        .iter()
        .map(|p| HttpServer::start(&c.pod(p).ns, p, 8080))
        .collect::<Result<_, _>>()?;
    let node = &c.nodes[0];
    println!(
        "sandbox: node0 {} ({}); pods {} {} and {} {}; client pod {}; outside client {}",
        node.ns.name(),
        node.addr,
        PODS[0],
        c.pod(PODS[0]).addr,
        PODS[1],
        c.pod(PODS[1]).addr,
        c.pod("client").addr,
        c.outside[0].addr,
    );

    // The manifests the agent reads: the example app, and the sandbox node's Node object.
    let work = std::env::temp_dir().join(testbed::netns::unique_name("demo"));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).context("creating the manifests directory")?;
    let _cleanup = RemoveDir(work.clone());
    std::fs::copy(
        root.join("deploy/examples/service-test.yaml"),
        manifests.join("service-test.yaml"),
    )
    .context("copying deploy/examples/service-test.yaml")?;
    std::fs::write(manifests.join("node.yaml"), node_yaml("node0", node.addr))?;
    let bpffs = BpfFs::new()?;
    let pins = bpffs.path().join("sluice");

    let args: Vec<String> = [
        "--manifests",
        manifests.to_str().context("non-UTF-8 temp dir")?,
        "--node-name",
        "node0",
        "--pod-interfaces",
        "pv*",
        "--pin-path",
        pins.to_str().context("non-UTF-8 temp dir")?,
        "--hairpin-snat-address",
        &plan::HAIRPIN_SNAT.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!("agent: sluice agent {}", args.join(" "));
    let mut agent = AgentProcess::start(&node.ns, &sluice, &args, &work.join("agent.log"))?;
    agent.wait_healthy(Duration::from_secs(30));
    println!("agent: healthy (first full sync done)");
    let services = node.ns.exec(&[
        sluice.to_str().context("path")?,
        "services",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    println!("sluice services:\n{services}");

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
    let mut failures = Vec::new();
    for _ in 0..rounds {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        for (i, (what, ns, addr, port)) in calls.iter().enumerate() {
            match curl(ns, *addr, *port, Duration::from_secs(3)) {
                Ok(r) => {
                    println!("{what} {addr}:{port} answered by {}", r.body);
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
    if !agent.running() {
        anyhow::bail!("the agent exited; its log:\n{}", agent.log());
    }
    let conntrack = node.ns.exec(&[
        sluice.to_str().context("path")?,
        "conntrack",
        "--pin-path",
        pins.to_str().context("path")?,
    ])?;
    println!("sluice conntrack (live flows):\n{conntrack}");
    if once {
        if let Err(e) = check(&failures, &answered, &sluice, &node.ns, &pins, node.addr) {
            eprintln!("demo: FAILED; the agent's log:\n{}", agent.log());
            return Err(e);
        }
        println!("demo: ok: every call answered; both pods served every frontend");
    }
    drop(agent);
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
