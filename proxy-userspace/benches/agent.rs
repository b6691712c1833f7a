//! The agent's control plane against the API test server, as an operator would see it: the
//! real `sluice agent` binary on a sandbox node, N Services with three endpoints each (the
//! shape of kube-proxy's scale tests), and:
//! - time to program N Services from an empty start (agent start to healthy, and the first
//!   full sync alone as the agent measures it);
//! - time from one change at the API server to its map write, with N Services present, for
//!   endpoint changes (a slice update) and Service changes (a new Service), p50/p99: measured
//!   from the moment the test server has the change to the moment the entry is in the
//!   pinned map (the bench polls the map directly);
//! - the agent's memory (RSS, peak) and the BPF maps' memory.
//!
//! Run by `cargo xtask bench`; writes target/bench/agent.md.
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{
    IPPROTO_TCP, LB4_BACKENDS_MAP, LB4_SERVICES_MAP, Lb4Backend, Lb4Key, Lb4Service,
};
use serde_json::json;
use testbed::report::{proc_status_kib, quantile_ms};
use testbed::{BpfFs, Cluster, agent::AgentProcess, apiserver::ApiServer};

/// The n-th Service's ClusterIP: 198.18.128.0/18 holds 16,384 addresses.
fn vip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n)
}

/// Backend addresses: 198.19.0.0/16 (pod space), distinct per endpoint.
fn pod(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + n)
}

fn service(n: u32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{n}"), "namespace": "default"},
        "spec": {"clusterIP": vip(n).to_string(), "clusterIPs": [vip(n).to_string()],
                 "ports": [{"name": "web", "port": 80, "protocol": "TCP"}]},
    }))
    .unwrap()
}

fn slice(n: u32, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{n}-x1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{n}")},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": jiff::Timestamp::now().to_string()}},
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

struct Maps {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
}

impl Maps {
    fn open(pins: &Path) -> Self {
        let open =
            |name: &str| Map::from_map_data(MapData::from_pin(pins.join(name)).unwrap()).unwrap();
        Self {
            services: HashMap::try_from(open(LB4_SERVICES_MAP)).unwrap(),
            backends: HashMap::try_from(open(LB4_BACKENDS_MAP)).unwrap(),
        }
    }
    fn key(addr: Ipv4Addr, slot: u16) -> Lb4Key {
        Lb4Key::new(u32::from(addr).to_be(), 80u16.to_be(), slot, IPPROTO_TCP)
    }
    /// Whether frontend `addr`:80 exists.
    fn has_frontend(&self, addr: Ipv4Addr) -> bool {
        self.services.get(&Self::key(addr, 0), 0).is_ok()
    }
    /// Whether frontend `addr`:80 has backend `be` in one of its slots.
    fn has_backend(&self, addr: Ipv4Addr, be: Ipv4Addr) -> bool {
        let Ok(fe) = self.services.get(&Self::key(addr, 0), 0) else {
            return false;
        };
        (1..=fe.count).any(|slot| {
            self.services
                .get(&Self::key(addr, slot), 0)
                .ok()
                .and_then(|s| self.backends.get(&s.backend_id, 0).ok())
                .is_some_and(|b| b.addr_be == u32::from(be).to_be())
        })
    }
}

/// Polls `f` (every 20 us) until true; the time it took. Panics after 30 s.
fn until(start: Instant, f: impl Fn() -> bool) -> Duration {
    while !f() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("change not written within 30 s");
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    start.elapsed()
}

/// Sum of `bytes_memlock` of the pinned maps, from bpftool.
fn maps_memory(pins: &Path) -> u64 {
    std::fs::read_dir(pins)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let pin = e.path().to_string_lossy().into_owned();
            let out = testbed::cmd::output(
                &["bpftool", "-j", "map", "show", "pinned", &pin],
                std::time::Duration::from_secs(10),
            )
            .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED agent bench: needs root (network namespaces, eBPF)");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u32 = if quick { 1_000 } else { 10_000 };
    let changes: u32 = if quick { 50 } else { 200 };

    let c = Cluster::new(1).unwrap();
    let api = ApiServer::start_in(&c.nodes[0].ns).unwrap();
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node0"},
        "status": {"addresses": [{"type": "InternalIP", "address": c.nodes[0].addr.to_string()}]}}))
    .unwrap();
    api.create(&node).unwrap();
    for i in 0..n {
        api.create(&service(i)).unwrap();
        api.create(&slice(i, &[pod(3 * i), pod(3 * i + 1), pod(3 * i + 2)]))
            .unwrap();
    }
    let bpffs = BpfFs::new().unwrap();
    let pins = bpffs.path().join("sluice");
    let dir = std::env::temp_dir().join(testbed::netns::unique_name("agentbench"));
    std::fs::create_dir_all(&dir).unwrap();
    api.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
    let args: Vec<String> = [
        "--kubeconfig",
        &dir.join("kubeconfig").display().to_string(),
        "--node-name",
        "node0",
        "--pin-path",
        &pins.display().to_string(),
        "--hairpin-snat-address",
        "198.18.127.254",
        "--socket-lb",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // Programming N Services from an empty start.
    let start = Instant::now();
    let mut agent = AgentProcess::start(
        &c.nodes[0].ns,
        Path::new(env!("CARGO_BIN_EXE_sluice")),
        &args,
        &dir.join("agent.log"),
    )
    .unwrap();
    agent.wait_healthy(Duration::from_secs(120));
    let to_healthy = start.elapsed();
    let full_sync = agent
        .metric("kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}")
        .unwrap_or(f64::NAN);
    let maps = Maps::open(&pins);
    assert!(
        maps.has_frontend(vip(n - 1)),
        "the last Service is not programmed"
    );
    let rss_synced = proc_status_kib(agent.pid(), "VmRSS:");

    // One endpoint change at a time: a slice's third endpoint is replaced.
    let mut endpoint = Vec::new();
    for k in 0..changes {
        let i = (k * 7919) % n;
        let new = pod(3 * n + k);
        api.update(&slice(i, &[pod(3 * i), pod(3 * i + 1), new]))
            .unwrap();
        let t0 = Instant::now();
        endpoint.push(until(t0, || maps.has_backend(vip(i), new)));
    }
    // One Service creation at a time.
    let mut created = Vec::new();
    for k in 0..changes {
        let i = n + k;
        api.create(&slice(i, &[pod(3 * i)])).unwrap();
        api.create(&service(i)).unwrap();
        let t0 = Instant::now();
        created.push(until(t0, || maps.has_frontend(vip(i))));
    }
    let rss = proc_status_kib(agent.pid(), "VmRSS:");
    let hwm = proc_status_kib(agent.pid(), "VmHWM:");
    let maps_bytes = maps_memory(&pins);
    let agent_latency_count = agent
        .metric("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}")
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let report = format!(
        "# sluice agent: control plane ({mode} mode)\n\n\
         Kernel {kernel}, {cpus} CPUs. {n} Services with 3 endpoints each, through the API test server.\n\n\
         | measure | value |\n|---|---:|\n\
         | agent start to healthy (load, list, program {n} Services) | {healthy:.0} ms |\n\
         | first full sync alone (agent's sync_duration) | {full:.0} ms |\n\
         | endpoint change to map write, p50 / p99 / max ({changes} changes) | {e50:.2} / {e99:.2} / {emax:.2} ms |\n\
         | new Service to map write, p50 / p99 / max ({changes} changes) | {c50:.2} / {c99:.2} / {cmax:.2} ms |\n\
         | agent RSS after first sync / after changes / peak | {rss_synced} / {rss} / {hwm} KiB |\n\
         | BPF maps (bytes_memlock, all pinned maps) | {maps_mib:.1} MiB |\n\
         | programming-latency observations exported | {agent_latency_count} |\n",
        mode = if quick { "quick" } else { "full" },
        kernel = kernel.trim(),
        cpus = std::thread::available_parallelism().map_or(0, |p| p.get()),
        healthy = to_healthy.as_secs_f64() * 1e3,
        full = full_sync * 1e3,
        e50 = quantile_ms(&endpoint, 0.5),
        e99 = quantile_ms(&endpoint, 0.99),
        emax = quantile_ms(&endpoint, 1.0),
        c50 = quantile_ms(&created, 0.5),
        c99 = quantile_ms(&created, 0.99),
        cmax = quantile_ms(&created, 1.0),
        maps_mib = maps_bytes as f64 / (1024.0 * 1024.0),
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("agent.md"), report).unwrap();
}
