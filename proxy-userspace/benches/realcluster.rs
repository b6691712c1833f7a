//! The agent on the real control plane (etcd, kube-apiserver and kube-controller-manager,
//! built by `./x setup`), with the sandbox kubelet running the pods, as an operator of a real
//! cluster would see it:
//! - the control plane's start-up (etcd and the API server ready, the controllers started),
//!   and a whole [`RealCluster`] (that, the kubelet registering two nodes, deploy/rbac.yaml
//!   applied, two agents healthy): what each test of that tier pays;
//! - from `kubectl scale` to the new backend taking traffic, p50/p99 over many scale-ups of
//!   the example app (each followed by a scale-down): from kubectl's start to the first answer
//!   from the new pod through the ClusterIP, split at the moment its address is in node0's
//!   map (before: kubectl, the ReplicaSet controller, the kubelet starting the pod and its
//!   readiness probe, the EndpointSlice controller, the watch and the agent; after: the
//!   client's next connection);
//! - the agent's memory with 10,000 Services created through the API (their ClusterIPs
//!   allocated by the API server, defaulted and validated by it), each with an EndpointSlice
//!   of 3 endpoints: while following the creates, and after a restart's first full sync.
//!
//! Run by `./x bench`; writes target/bench/realcluster.md.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::{Api, PostParams};
use serde_json::json;
use sluice::dataplane::PinnedMaps;
use testbed::report::{proc_status_kib, quantile_ms};
use testbed::{Cluster, controlplane::ControlPlane, realcluster::RealCluster};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 10);
const APP: &str = "service-test";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls `f` every `every` until it returns true; panics with `what` after `limit`.
fn wait(what: &str, limit: Duration, every: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(every);
    }
}

/// The backends `maps` hold for the example's ClusterIP.
fn backends(maps: &PinnedMaps) -> BTreeSet<Ipv4Addr> {
    maps.services()
        .unwrap_or_default()
        .into_iter()
        .filter(|(f, _)| f.addr == CLUSTER_IP && f.port == 80)
        .flat_map(|(_, b)| b.all.into_iter().map(|b| b.addr))
        .collect()
}

/// One GET through the ClusterIP from the calling thread's namespace: who answered.
fn who_answers() -> Option<String> {
    testbed::http_get(
        SocketAddr::from((CLUSTER_IP, 80)),
        "/",
        Duration::from_secs(1),
    )
    .ok()
    .filter(|(code, _)| *code == 200)
    .map(|(_, body)| body)
}

struct ScaleSample {
    /// kubectl scale's start to the new pod's address in node0's map.
    to_map: Duration,
    /// kubectl scale's start to the first answer from the new pod.
    to_traffic: Duration,
}

/// Scales the example app from 1 to 2 replicas and back, `n` times; per scale-up, the times
/// to the map and to traffic.
fn scale_ups(rc: &RealCluster, n: usize) -> Vec<ScaleSample> {
    let maps = PinnedMaps::open(&rc.pins(0)).unwrap();
    let mut samples = Vec::new();
    for k in 0..n {
        let before: BTreeSet<String> = rc.kubelet.pods().into_iter().map(|p| p.name).collect();
        let t0 = Instant::now();
        rc.cp
            .kubectl(&["scale", "deployment", APP, "--replicas=2"])
            .unwrap();
        // The new pod, once the kubelet has made it (and knows its address).
        let mut new = None;
        wait(
            "the new pod",
            Duration::from_secs(60),
            Duration::from_millis(5),
            || {
                new = rc
                    .kubelet
                    .pods()
                    .into_iter()
                    .find(|p| p.name.starts_with(APP) && !before.contains(&p.name));
                new.is_some()
            },
        );
        let new = new.unwrap();
        wait(
            "the new pod in the map",
            Duration::from_secs(60),
            Duration::from_millis(1),
            || backends(&maps).contains(&new.addr),
        );
        let to_map = t0.elapsed();
        let name = new.name.clone();
        let to_traffic =
            rc.c.pod("client")
                .ns
                .run_in(move || {
                    // One request per millisecond at most, for at most 30 s.
                    let start = Instant::now();
                    for _ in 0..30_000 {
                        if who_answers().as_deref() == Some(name.as_str()) {
                            return Some(t0.elapsed());
                        }
                        if start.elapsed() > Duration::from_secs(30) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    None
                })
                .unwrap()
                .unwrap_or_else(|| panic!("no answer from {} within 30 s", new.name));
        samples.push(ScaleSample { to_map, to_traffic });
        rc.cp
            .kubectl(&["scale", "deployment", APP, "--replicas=1"])
            .unwrap();
        wait(
            "the scale-down",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || {
                let pods: Vec<_> = rc
                    .kubelet
                    .pods()
                    .into_iter()
                    .filter(|p| p.name.starts_with(APP))
                    .collect();
                pods.len() == 1 && backends(&maps).len() == 1
            },
        );
        if k % 10 == 9 {
            eprintln!("scale-ups: {} done", k + 1);
        }
    }
    samples
}

/// Creates `n` Services through the API (ClusterIP allocated by the API server) and an
/// EndpointSlice of 3 endpoints for each, 32 requests in flight, from inside namespace `ns`.
fn create_services(ns: &testbed::Netns, kubeconfig: PathBuf, n: u32) -> Duration {
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(config).unwrap();
            let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
            let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
            let start = Instant::now();
            futures::stream::iter(0..n)
                .map(|i| {
                    let (svcs, slices) = (svcs.clone(), slices.clone());
                    async move {
                        let name = format!("bench-{i}");
                        let svc: Service = serde_json::from_value(json!({
                            "apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": name},
                            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
                        }))
                        .unwrap();
                        svcs.create(&PostParams::default(), &svc).await.unwrap();
                        // Backend addresses from 198.19.128.0 up: never sent to.
                        let base = u32::from(Ipv4Addr::new(198, 19, 128, 0)) + 3 * i;
                        let slice: EndpointSlice = serde_json::from_value(json!({
                            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                            "metadata": {"name": name,
                                         "labels": {"kubernetes.io/service-name": name}},
                            "addressType": "IPv4",
                            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                            "endpoints": (0..3).map(|k| json!({
                                "addresses": [Ipv4Addr::from(base + k).to_string()],
                                "conditions": {"ready": true},
                            })).collect::<Vec<_>>(),
                        }))
                        .unwrap();
                        slices.create(&PostParams::default(), &slice).await.unwrap();
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await;
            start.elapsed()
        })
    })
    .unwrap()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED realcluster bench: needs root (network namespaces, eBPF)");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let starts = if quick { 1 } else { 3 };
    let changes = if quick { 10 } else { 50 };
    let n: u32 = if quick { 1_000 } else { 10_000 };
    let sluice = Path::new(env!("CARGO_BIN_EXE_sluice"));

    // Start-up.
    let mut cp_starts = Vec::new();
    for _ in 0..starts {
        let c = Cluster::new(1).unwrap();
        let t = Instant::now();
        let cp = ControlPlane::start(&c, &[]).unwrap();
        cp_starts.push(t.elapsed());
        drop(cp);
    }
    let mut c = Cluster::new(2).unwrap();
    c.add_pod(0, "client").unwrap();
    let t = Instant::now();
    let mut rc = RealCluster::start(c, sluice, Default::default()).unwrap();
    let rc_start = t.elapsed();

    // kubectl scale to traffic.
    let app = testbed::realcluster::example_app()
        .unwrap()
        .replace("replicas: 2", "replicas: 1");
    rc.cp
        .kubectl_with_input(&["apply", "-f", "-"], Some(&app))
        .unwrap();
    wait(
        "the example app",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || rc.ready_pods(APP).len() == 1,
    );
    let samples = scale_ups(&rc, changes);
    let to_map: Vec<Duration> = samples.iter().map(|s| s.to_map).collect();
    let to_traffic: Vec<Duration> = samples.iter().map(|s| s.to_traffic).collect();
    let after_map: Vec<Duration> = samples.iter().map(|s| s.to_traffic - s.to_map).collect();

    // 10,000 Services through the API.
    let pid = rc.agents[0].as_ref().unwrap().pid();
    let rss_before = proc_status_kib(pid, "VmRSS:");
    let maps = PinnedMaps::open(&rc.pins(0)).unwrap();
    let want = maps.services().unwrap().len() + n as usize;
    let created = create_services(&rc.c.nodes[0].ns, rc.cp.admin_kubeconfig(), n);
    let t = Instant::now();
    wait(
        "every Service programmed",
        Duration::from_secs(600),
        Duration::from_millis(200),
        || maps.services().map_or(0, |s| s.len()) >= want,
    );
    let programmed_after_last_create = t.elapsed();
    let rss_following = proc_status_kib(pid, "VmRSS:");
    let hwm_following = proc_status_kib(pid, "VmHWM:");
    let t = Instant::now();
    rc.start_agent(0).unwrap();
    let restart_healthy = t.elapsed();
    let pid = rc.agents[0].as_ref().unwrap().pid();
    let rss_restarted = proc_status_kib(pid, "VmRSS:");
    let hwm_restarted = proc_status_kib(pid, "VmHWM:");
    let full_sync = rc.agents[0]
        .as_ref()
        .unwrap()
        .metric("kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}")
        .unwrap_or(f64::NAN);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cp_ms: Vec<String> = cp_starts.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    let report = format!(
        "# sluice agent on the real control plane ({mode} mode)\n\n\
         Kernel {kernel}, {cpus} CPUs. Kubernetes {k8s} (kube-apiserver, kube-controller-manager) and etcd {etcd}, built by `./x setup`; the sandbox kubelet runs the pods. Measured by `cargo bench -p proxy-userspace --bench realcluster`.\n\n\
         | measure | value |\n|---|---:|\n\
         | control plane start-up (etcd, API server ready), {starts} run(s) | {cp_ms} ms |\n\
         | whole sandbox cluster (control plane, kubelet, RBAC, 2 agents healthy) | {rc_ms:.0} ms |\n\
         | `kubectl scale` to the new backend taking traffic, p50 / p99 / max ({changes} scale-ups) | {t50:.0} / {t99:.0} / {tmax:.0} ms |\n\
         | of which to its address in node0's map, p50 / p99 | {m50:.0} / {m99:.0} ms |\n\
         | of which from the map to its first answer, p50 / p99 | {a50:.1} / {a99:.1} ms |\n\
         | {n} Services + EndpointSlices created through the API (32 in flight) | {created:.1} s |\n\
         | last create to every Service programmed on node0 | {prog:.0} ms |\n\
         | agent RSS before / after following the creates / peak | {rss_before} / {rss_following} / {hwm_following} KiB |\n\
         | agent restarted with {n} Services: to healthy / its first full sync (the pinned maps adopted, only differences written) | {restart:.0} / {full:.0} ms |\n\
         | restarted agent RSS / peak | {rss_restarted} / {hwm_restarted} KiB |\n\n\
         The time to the map is mostly not sluice's: kubectl's own start, the ReplicaSet controller, the sandbox kubelet (it polls every 100 ms, starts the pod and probes it every second, as the example's readinessProbe asks), the EndpointSlice controller, then the watch and the agent's write.\n",
        mode = if quick { "quick" } else { "full" },
        kernel = kernel.trim(),
        cpus = std::thread::available_parallelism().map_or(0, |p| p.get()),
        k8s = testbed::controlplane::versions::KUBERNETES,
        etcd = testbed::controlplane::versions::ETCD,
        cp_ms = cp_ms.join(", "),
        rc_ms = ms(rc_start),
        t50 = quantile_ms(&to_traffic, 0.5),
        t99 = quantile_ms(&to_traffic, 0.99),
        tmax = quantile_ms(&to_traffic, 1.0),
        m50 = quantile_ms(&to_map, 0.5),
        m99 = quantile_ms(&to_map, 0.99),
        a50 = quantile_ms(&after_map, 0.5),
        a99 = quantile_ms(&after_map, 0.99),
        created = created.as_secs_f64(),
        prog = ms(programmed_after_last_create),
        restart = ms(restart_healthy),
        full = full_sync * 1e3,
    );
    drop(rc);
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("realcluster.md"), report).unwrap();
}
