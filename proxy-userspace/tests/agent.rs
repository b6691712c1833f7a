//! The agent end to end: the real `sluice agent` binary on a sandbox node, reaching the API
//! test server through an ordinary kubeconfig (or reading a manifests directory), real servers
//! in backend pods, real clients. Each test is one behaviour an operator relies on.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use sluice::dataplane::AttachMode;
use testbed::{
    Attempt, BpfFs, Cluster, HttpServer, KeepAlive,
    agent::{AgentProcess, eventually},
    apiserver::ApiServer,
    curl, http_many, require_privileged,
};

const T: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);
const BACKENDS: [&str; 3] = ["backend-a", "backend-b", "backend-c"];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 20);
/// A second Service's ClusterIP.
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 21);
const NODE_PORT: u16 = 30080;

fn service(name: &str, ip: Ipv4Addr, protocol: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
            "ports": [{"name": "web", "port": 80, "targetPort": "http", "protocol": protocol,
                       "nodePort": NODE_PORT + u16::from(ip.octets()[3])}],
        }
    }))
    .expect("a valid Service")
}

/// The slice the EndpointSlice controller would write for `svc` with these ready endpoints.
fn slice(svc: &str, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    let now = jiff::Timestamp::now().to_string();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{svc}-x1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now},
        },
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|a| json!({
            "addresses": [a.to_string()], "conditions": {"ready": true},
        })).collect::<Vec<_>>(),
    }))
    .expect("a valid EndpointSlice")
}

fn node_object(addr: Ipv4Addr) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node0"},
        "status": {"addresses": [{"type": "InternalIP", "address": addr.to_string()}]},
    }))
    .expect("a valid Node")
}

struct Env {
    // Field order is drop order: the agent first, the namespaces last.
    agent: Option<AgentProcess>,
    api: ApiServer,
    _servers: Vec<HttpServer>,
    bpffs: BpfFs,
    dir: testbed::TempDir,
    c: Cluster,
}

impl Env {
    fn new() -> Self {
        let mut c = Cluster::new(1).unwrap();
        c.add_pod(0, "client").unwrap();
        for b in BACKENDS {
            c.add_pod(0, b).unwrap();
        }
        c.add_outside().unwrap();
        let servers = BACKENDS
            .iter()
            .map(|b| HttpServer::start(&c.pod(b).ns, b, 8080).unwrap())
            .collect();
        let api = ApiServer::start_in(&c.nodes[0].ns).unwrap();
        let dir = testbed::TempDir::new("agent").unwrap();
        api.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
        api.create(&node_object(c.nodes[0].addr)).unwrap();
        Self {
            agent: None,
            api,
            _servers: servers,
            bpffs: BpfFs::new().unwrap(),
            dir,
            c,
        }
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.path().join("sluice")
    }

    fn addr(&self, pod: &str) -> Ipv4Addr {
        self.c.pod(pod).addr
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--node-name",
            "node0",
            "--pod-interfaces",
            "pv*",
            "--hairpin-snat-address",
            "198.18.127.254",
            // The TC path, which these tests are about.
            "--socket-lb",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("--pin-path".into());
        a.push(self.pins().display().to_string());
        if !extra.contains(&"--manifests") {
            a.push("--kubeconfig".into());
            a.push(self.dir.join("kubeconfig").display().to_string());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Starts the agent and waits for its first full sync.
    fn start_agent(&mut self, extra: &[&str]) -> &mut AgentProcess {
        // One log per start: a successor started with no API change in between must not
        // write over its predecessor's log, which that one's drop may remove.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self
            .dir
            .join(format!("agent-{}-{n}.log", self.api.resource_version()));
        let args = self.args(extra);
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
        let mut agent = AgentProcess::start(&self.c.nodes[0].ns, bin, &args, &log).unwrap();
        agent.wait_started();
        self.agent = Some(agent);
        self.agent.as_mut().unwrap()
    }

    /// A client's connection to the Service at VIP:80, sending 150 requests over ~6 s:
    /// connected, and a second in, when this returns.
    fn keep_alive(&self) -> KeepAlive {
        let mut ka = KeepAlive::start(
            &self.c.pod("client").ns,
            VIP,
            80,
            150,
            Duration::from_millis(40),
        )
        .unwrap();
        ka.connected().expect("the client connected");
        std::thread::sleep(Duration::from_secs(1));
        ka
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent started")
    }

    fn client_calls(&self, addr: Ipv4Addr, port: u16, n: u32) -> Vec<Attempt> {
        http_many(&self.c.pod("client").ns, addr, port, n, T).unwrap()
    }

    /// The backends that answered `n` new connections; panics on a failed one.
    fn answered(&self, addr: Ipv4Addr, port: u16, n: u32) -> BTreeSet<String> {
        self.client_calls(addr, port, n)
            .into_iter()
            .map(|a| match a {
                Attempt::Ok { body, .. } => body,
                Attempt::Err(e) => panic!(
                    "a connection to {addr}:{port} failed: {e}\nagent log:\n{}",
                    self.agent().log()
                ),
            })
            .collect()
    }

    /// Waits until `n` new connections to `addr:port` are answered by exactly `want`.
    fn wait_for_backends(&self, addr: Ipv4Addr, port: u16, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut last = Vec::new();
        let ok = eventually(WAIT, || {
            last = self.client_calls(addr, port, 30);
            let got: BTreeSet<String> = last
                .iter()
                .filter_map(|a| match a {
                    Attempt::Ok { body, .. } => Some(body.clone()),
                    Attempt::Err(_) => None,
                })
                .collect();
            got == want && last.iter().all(|a| matches!(a, Attempt::Ok { .. }))
        });
        assert!(
            ok,
            "{addr}:{port} never served exactly {want:?}; last attempts: {last:?}\nagent log:\n{}",
            self.agent().log()
        );
    }

    fn metric(&self, name: &str) -> f64 {
        self.agent().metric(name).unwrap_or(0.0)
    }

    fn services_json(&self) -> Vec<serde_json::Value> {
        testbed::agent::services_json(
            &self.c.nodes[0].ns,
            Path::new(env!("CARGO_BIN_EXE_sluice")),
            &self.pins(),
        )
    }

    fn frontends(&self) -> BTreeSet<String> {
        self.services_json()
            .iter()
            .map(|f| format!("{}:{}", f["address"].as_str().unwrap(), f["port"]))
            .collect()
    }
}

/// Every request of `ka` (from [`Env::keep_alive`]) was answered, all by one backend, across
/// `what`.
fn kept(ka: KeepAlive, what: &str) {
    let lines = ka.finish(Duration::from_secs(20));
    let oks = lines.iter().filter(|l| l.starts_with("OK ")).count();
    assert_eq!(oks, 150, "requests lost across {what}: {lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("DONE"));
    let backends: BTreeSet<&str> = lines.iter().filter_map(|l| l.strip_prefix("OK ")).collect();
    assert_eq!(
        backends.len(),
        1,
        "the connection changed backend across {what}: {backends:?}"
    );
}

fn refused(a: &Attempt) -> bool {
    matches!(a, Attempt::Err(e) if e.contains("refused") || e.contains("Refused"))
}

#[test]
fn a_service_created_through_the_api_server_is_served_scaled_and_removed() {
    require_privileged!("a_service_created_through_the_api_server_is_served_scaled_and_removed");
    let mut env = Env::new();
    env.start_agent(&[]);
    let (a, b, c) = (
        env.addr("backend-a"),
        env.addr("backend-b"),
        env.addr("backend-c"),
    );
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.wait_for_backends(VIP, 80, &["backend-a"]);

    // NodePort from outside the cluster, on the Node object's InternalIP.
    let node = env.c.nodes[0].addr;
    let np = NODE_PORT + 20;
    let r = curl(&env.c.outside[0].ns, node, np, T).expect("NodePort from outside");
    assert_eq!(r.body, "backend-a");

    env.api.update(&slice("web", &[a, b, c])).unwrap();
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b", "backend-c"]);
    // kube-proxy's metrics, under kube-proxy's names and labels.
    let latency =
        env.metric("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}");
    assert!(
        latency >= 2.0,
        "programming latency observed {latency} times, want >= 2"
    );
    let endpoint_changes = env.metric("kubeproxy_sync_proxy_rules_endpoint_changes_total");
    assert!(
        endpoint_changes >= 2.0,
        "{endpoint_changes} EndpointSlice changes counted, want >= 2"
    );
    let service_changes = env.metric("kubeproxy_sync_proxy_rules_service_changes_total");
    assert!(
        service_changes >= 1.0,
        "{service_changes} Service changes counted, want >= 1"
    );
    let synced =
        env.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 600.0..=now + 1.0).contains(&synced),
        "last sync at {synced}, now {now}"
    );
    let passes =
        env.metric("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}");
    let full =
        env.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}");
    let partial =
        env.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}");
    assert!(
        full >= 1.0 && partial >= 1.0,
        "full {full}, partial {partial}"
    );
    assert_eq!(passes, full + partial, "every pass is full or partial");
    // The test's own start-up checks asked /healthz until it said 200.
    assert!(env.metric("kubeproxy_proxy_healthz_total{code=\"200\"}") >= 1.0);
    // externalTrafficPolicy Local with endpoints, none on this node: outside traffic is
    // dropped, and kube-proxy counts the port.
    let no_local = |env: &Env| {
        env.metric(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}",
        )
    };
    assert_eq!(no_local(&env), 0.0);
    let mut local = service("local", VIP2, "TCP");
    local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    env.api.create(&local).unwrap();
    env.api.create(&slice("local", &[a])).unwrap();
    assert!(
        eventually(WAIT, || no_local(&env) == 1.0),
        "no_local_endpoints_total is {}, want 1:\n{}",
        no_local(&env),
        env.agent().metrics()
    );
    env.api.delete::<Service>(Some("default"), "local").unwrap();
    assert!(
        eventually(WAIT, || no_local(&env) == 0.0),
        "the deleted Service is still counted"
    );
    // One name per meaning: sluice's own names for these are gone.
    let text = env.agent().metrics();
    for old in [
        "sluice_sync_duration_seconds",
        "sluice_network_programming_duration_seconds",
        "sluice_syncs_total",
        "sluice_last_sync_timestamp_seconds",
    ] {
        assert!(!text.contains(old), "{old} is still exported");
    }

    // No ready endpoints: connections are refused at once (kube-proxy's REJECT).
    env.api.update(&slice("web", &[])).unwrap();
    let ok = eventually(WAIT, || env.client_calls(VIP, 80, 3).iter().all(refused));
    assert!(
        ok,
        "connections to a Service without endpoints were not refused"
    );

    env.api
        .delete::<EndpointSlice>(Some("default"), "web-x1")
        .unwrap();
    env.api.delete::<Service>(Some("default"), "web").unwrap();
    let ok = eventually(WAIT, || env.frontends().is_empty());
    assert!(
        ok,
        "frontends left after the Service was deleted: {:?}",
        env.frontends()
    );
    let after = env.client_calls(VIP, 80, 2);
    assert!(
        after.iter().all(|a| matches!(a, Attempt::Err(_))),
        "a deleted Service still answered: {after:?}"
    );
}

#[test]
fn a_dropped_watch_resumes_without_a_relist() {
    require_privileged!("a_dropped_watch_resumes_without_a_relist");
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);
    let lists = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/endpointslices") && !r.is_watch())
            .count()
    };
    let before = lists(&env.api);

    env.api.drop_watches();
    env.api.update(&slice("web", &[a, b])).unwrap();
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
    assert_eq!(
        lists(&env.api),
        before,
        "the watch relisted instead of resuming"
    );
    let full =
        env.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}");
    assert_eq!(full, 1.0, "a resumed watch must not cause a full sync");
}

#[test]
fn an_expired_resource_version_relists_and_flushes_nothing() {
    require_privileged!("an_expired_resource_version_relists_and_flushes_nothing");
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);
    let mut ka = KeepAlive::start(
        &env.c.pod("client").ns,
        VIP,
        80,
        60,
        Duration::from_millis(50),
    )
    .unwrap();
    ka.connected().expect("the client connected");

    // Changes the agent has not seen, then compaction: the watch cannot resume.
    env.api.update(&slice("web", &[a, b])).unwrap();
    env.api.expire();
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
    let ok = eventually(WAIT, || {
        env.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}")
            >= 2.0
    });
    assert!(ok, "no full sync after the relist:\n{}", env.agent().log());
    let lines = ka.finish(Duration::from_secs(15));
    // It connected around the change, so to either backend; it must keep that one.
    let backends: BTreeSet<&str> = lines.iter().filter_map(|l| l.strip_prefix("OK ")).collect();
    let oks = lines.iter().filter(|l| l.starts_with("OK ")).count();
    assert_eq!(
        oks, 60,
        "the established connection was disturbed: {lines:?}"
    );
    assert_eq!(
        backends.len(),
        1,
        "the connection changed backend: {lines:?}"
    );
}

#[test]
fn a_killed_agent_leaves_traffic_flowing_and_its_successor_adopts_and_cleans_up() {
    let name = "a_killed_agent_leaves_traffic_flowing_and_its_successor_adopts_and_cleans_up";
    require_privileged!(name);
    if !testbed::kernel_has(name, "TCX (Linux 6.6)", AttachMode::tcx_supported()) {
        return;
    }
    killed_agent(&["--attach-mode", "tcx"]);
}

/// On a kernel without TCX, `--attach-mode tcx` stops the agent at once with an error that
/// names TCX and the kernel that has it, instead of retrying the attachment for ever.
#[test]
fn an_attach_mode_the_kernel_lacks_stops_the_agent_at_once_saying_why() {
    let name = "an_attach_mode_the_kernel_lacks_stops_the_agent_at_once_saying_why";
    require_privileged!(name);
    if !testbed::kernel_has(
        name,
        "a kernel without TCX (before 6.6)",
        !AttachMode::tcx_supported(),
    ) {
        return;
    }
    let env = Env::new();
    let log = env.dir.join("agent-tcx.log");
    let args = env.args(&["--attach-mode", "tcx"]);
    let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
    let mut agent = AgentProcess::start(&env.c.nodes[0].ns, bin, &args, &log).unwrap();
    let exited = eventually(Duration::from_secs(60), || !agent.running());
    let text = agent.log();
    assert!(exited, "the agent kept running:\n{text}");
    assert!(
        text.contains("TCX") && text.contains("Linux 6.6"),
        "the agent's error names TCX and Linux 6.6:\n{text}"
    );
}

/// The same through clsact filters (kernels before 6.6): the filter outlives the process and
/// the successor replaces the program in it.
#[test]
fn a_killed_agent_on_clsact_leaves_traffic_flowing() {
    require_privileged!("a_killed_agent_on_clsact_leaves_traffic_flowing");
    killed_agent(&["--attach-mode", "clsact"]);
}

fn killed_agent(mode: &[&str]) {
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    let gone = Ipv4Addr::new(198, 18, 128, 21);
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a, b])).unwrap();
    env.api.create(&service("gone", gone, "TCP")).unwrap();
    env.start_agent(mode);
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
    assert!(env.frontends().contains(&format!("{gone}:80")));

    // Connected before the kill: the connection must outlive the agent.
    let ka = env.keep_alive();
    env.agent.as_mut().unwrap().kill9();
    // With no agent: new connections still work (pinned maps and links), and a Service is
    // deleted that the next agent must clean up.
    let answered = env.answered(VIP, 80, 10);
    assert!(!answered.is_empty());
    env.api.delete::<Service>(Some("default"), "gone").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    env.start_agent(mode);
    assert!(
        env.agent().log().contains("adopted the pinned maps"),
        "the new agent did not adopt the pins:\n{}",
        env.agent().log()
    );
    kept(ka, "kill -9 and restart");
    let ok = eventually(WAIT, || !env.frontends().contains(&format!("{gone}:80")));
    assert!(
        ok,
        "the stale frontend of a deleted Service stayed: {:?}",
        env.frontends()
    );
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
    if mode.contains(&"clsact") {
        // The successor replaced its predecessor's filter rather than adding a second one.
        let client_dev = env.c.pod("client").host_veth.clone();
        let filters = env.c.nodes[0]
            .ns
            .exec(&["tc", "filter", "show", "dev", &client_dev, "ingress"])
            .unwrap();
        let n = filters
            .lines()
            .filter(|l| l.contains("sluice_from_pod"))
            .count();
        assert_eq!(
            n, 1,
            "want one sluice filter after a restart, found:\n{filters}"
        );
    }
}

/// An operator changes the map sizes and the agent restarts. The kernel cannot resize a map,
/// so the new agent makes new ones and fills them from the old: a connection open across the
/// restart keeps its backend and loses nothing, and the old maps' pins go once the new
/// programs are on every device.
#[test]
fn an_agent_restarted_with_other_map_sizes_keeps_its_connections() {
    require_privileged!("an_agent_restarted_with_other_map_sizes_keeps_its_connections");
    resized_restart(&[]);
}

/// The same through clsact filters, which leave no pinned link to tell which devices still
/// run the old programs: the resize ends once every wanted device is attached.
#[test]
fn an_agent_restarted_with_other_map_sizes_on_clsact_keeps_its_connections() {
    require_privileged!("an_agent_restarted_with_other_map_sizes_on_clsact_keeps_its_connections");
    resized_restart(&["--attach-mode", "clsact"]);
}

fn resized_restart(mode: &[&str]) {
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a, b])).unwrap();
    let sized = |ct: &'static str, ct_new: &'static str, services: &'static str| {
        let mut args = vec![
            "--conntrack-max",
            ct,
            "--conntrack-new-max",
            ct_new,
            "--services-max",
            services,
        ];
        args.extend_from_slice(mode);
        args
    };
    env.start_agent(&sized("8192", "4096", "1024"));
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);

    let ka = env.keep_alive();
    env.agent.as_mut().unwrap().kill9();
    let pins = env.pins();
    let new_flows = || {
        let counters = sluice::dataplane::PinnedMaps::open(&pins)
            .and_then(|m| m.counters())
            .unwrap();
        counters[proxy_common::CTR_NEW_FLOW as usize].packets
    };
    let before = new_flows();
    let sizes = [("CT4", 16384), ("CT4_NEW", 2048), ("LB4_SERVICES", 2048)];
    env.start_agent(&sized("16384", "2048", "2048"));
    let finished = eventually(WAIT, || env.agent().log().contains("resized maps"));
    assert!(
        finished,
        "the resize was not finished:\n{}",
        env.agent().log()
    );
    kept(ka, "the resizing restart");
    // A flow whose entries were lost would have been opened anew by its next packet (on any
    // backend: with two, a lost flow would still keep its backend half the time).
    assert_eq!(
        new_flows(),
        before,
        "the kept connection's packets all found their flow after the resize"
    );
    for (map, max) in sizes {
        let got = aya::maps::MapData::from_pin(env.pins().join(map))
            .and_then(|m| m.info())
            .map(|i| i.max_entries());
        assert_eq!(got.ok(), Some(max), "{map} is pinned at its new size");
    }
    let left: Vec<String> = std::fs::read_dir(env.pins())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("_resizing"))
        .collect();
    assert!(left.is_empty(), "the old maps' pins are gone: {left:?}");
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
}

#[test]
fn an_unreachable_api_server_leaves_the_last_good_state_serving() {
    require_privileged!("an_unreachable_api_server_leaves_the_last_good_state_serving");
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);

    env.api.set_available(false);
    let ok = eventually(WAIT, || {
        env.metric("sluice_source_errors_total{resource=\"EndpointSlices\"}") > 0.0
    });
    assert!(ok, "the outage was not counted:\n{}", env.agent().log());
    assert_eq!(
        env.answered(VIP, 80, 10),
        BTreeSet::from(["backend-a".to_owned()])
    );
    assert_eq!(
        env.agent().healthz(),
        Some(200),
        "an outage alone must not fail /healthz"
    );

    env.api.update(&slice("web", &[a, b])).unwrap();
    env.api.set_available(true);
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
}

#[test]
fn an_agent_started_while_the_api_server_is_down_serves_the_pinned_state() {
    require_privileged!("an_agent_started_while_the_api_server_is_down_serves_the_pinned_state");
    let mut env = Env::new();
    let a = env.addr("backend-a");
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);
    env.agent.as_mut().unwrap().kill9();
    env.api.set_available(false);

    let log = env.dir.join("agent-down.log");
    let args = env.args(&[]);
    let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
    env.agent = Some(AgentProcess::start(&env.c.nodes[0].ns, bin, &args, &log).unwrap());
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(env.agent().healthz(), Some(200), "healthy before any list");
    assert_eq!(
        env.answered(VIP, 80, 10),
        BTreeSet::from(["backend-a".to_owned()])
    );
    // The uplink (found by the Node's address, which this agent has not listed) keeps its
    // programs: NodePort from outside still works.
    let node = env.c.nodes[0].addr;
    let r = curl(&env.c.outside[0].ns, node, NODE_PORT + 20, T);
    assert!(
        matches!(&r, Ok(r) if r.body == "backend-a"),
        "NodePort from outside failed while the new agent waited for the API server: {r:?}\n{}",
        env.agent().log()
    );
    env.api.set_available(true);
    env.agent
        .as_mut()
        .unwrap()
        .wait_healthy(Duration::from_secs(40));
}

#[test]
fn an_invalid_service_is_counted_and_skipped_and_others_are_served() {
    require_privileged!("an_invalid_service_is_counted_and_skipped_and_others_are_served");
    let mut env = Env::new();
    let a = env.addr("backend-a");
    let bad = Ipv4Addr::new(198, 18, 128, 22);
    env.api.create(&service("bad", bad, "QUIC")).unwrap();
    env.api.create(&slice("bad", &[a])).unwrap();
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    // A Service with an SCTP port beside its TCP one, and an IPv6 externalIP: both ports are
    // served, the IPv6 address left out, said once and counted.
    let sig = Ipv4Addr::new(198, 18, 128, 23);
    let mut with_sctp = service("sig", sig, "TCP");
    let spec = with_sctp.spec.as_mut().unwrap();
    spec.ports.as_mut().unwrap().push(
        serde_json::from_value(json!({"name": "diameter", "port": 3868, "protocol": "SCTP"}))
            .unwrap(),
    );
    spec.external_ips = Some(vec!["2001:db8::7".into()]);
    env.api.create(&with_sctp).unwrap();
    env.api.create(&slice("sig", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);
    env.wait_for_backends(sig, 80, &["backend-a"]);
    assert_eq!(env.metric("sluice_invalid_services"), 1.0);
    assert_eq!(
        env.metric("sluice_invalid_services_by_kind{kind=\"unknown_protocol\"}"),
        1.0
    );
    assert!(env.metric("sluice_invalid_service_events_total") >= 1.0);
    assert!(
        env.services_json()
            .iter()
            .any(|f| f["address"] == sig.to_string()
                && f["port"] == 3868
                && f["protocol"] == "SCTP"),
        "the SCTP port is a frontend: {:?}",
        env.services_json()
    );
    assert_eq!(
        env.metric("sluice_skipped_service_parts{kind=\"ipv6\"}"),
        1.0
    );
    // The slice changes (the Service is synced again): the same part is not said again.
    let b = env.addr("backend-b");
    env.api.update(&slice("sig", &[a, b])).unwrap();
    env.wait_for_backends(sig, 80, &["backend-a", "backend-b"]);
    let said = env
        .agent()
        .log()
        .lines()
        .filter(|l| l.contains("part of a Service left out") && l.contains("2001:db8::7"))
        .count();
    assert_eq!(said, 1, "{}", env.agent().log());
    // The limit of SCTP frontends (the node's own processes cannot use them) is said once.
    let limit = env
        .agent()
        .log()
        .lines()
        .filter(|l| l.contains("SCTP frontends serve pods and outside clients"))
        .count();
    assert_eq!(limit, 1, "{}", env.agent().log());
    assert!(
        !env.frontends()
            .iter()
            .any(|f| f.starts_with(&bad.to_string()))
    );
    assert!(
        env.agent().log().contains("default/bad"),
        "the invalid Service was not logged by name"
    );
}

#[test]
fn a_full_map_is_reported_and_nothing_is_half_written() {
    require_privileged!("a_full_map_is_reported_and_nothing_is_half_written");
    let mut env = Env::new();
    let (a, b, c) = (
        env.addr("backend-a"),
        env.addr("backend-b"),
        env.addr("backend-c"),
    );
    // 6 entries: one Service needs 2 frontends (ClusterIP, NodePort) x (1 + 2 slots), so the
    // second does not fit.
    for (i, name) in ["one", "two"].iter().enumerate() {
        let ip = Ipv4Addr::new(198, 18, 128, 30 + i as u8);
        env.api.create(&service(name, ip, "TCP")).unwrap();
        env.api.create(&slice(name, &[b, c])).unwrap();
    }
    env.start_agent(&[
        "--services-max",
        "6",
        "--conntrack-max",
        "8192",
        "--conntrack-new-max",
        "2048",
    ]);
    // Both conntrack tables take their sizes from the flags (the fill is read every 10 s).
    let sized = eventually(WAIT, || {
        env.metric("sluice_conntrack_capacity_entries") == 8192.0
            && env.metric("sluice_conntrack_new_capacity_entries") == 2048.0
    });
    assert!(sized, "conntrack sizes:\n{}", env.metrics_text());
    let full = || env.metric("sluice_map_full_errors_total{map=\"LB4_SERVICES\"}");
    let before = full();
    assert!(
        before >= 1.0,
        "no map-full error counted:\n{}",
        env.metrics_text()
    );
    assert!(
        env.agent().log().contains("is full"),
        "the full map was not logged"
    );
    // What is in the maps is whole: every frontend has both its backends.
    let services = env.services_json();
    assert_eq!(
        services.len(),
        2,
        "want the two frontends of one Service: {services:?}"
    );
    for f in &services {
        assert_eq!(
            f["backends"].as_array().unwrap().len(),
            2,
            "half-written frontend: {f}"
        );
    }
    let ip: Ipv4Addr = services[0]["address"].as_str().unwrap().parse().unwrap();
    let port = services[0]["port"].as_u64().unwrap() as u16;
    env.wait_for_backends(ip, port, &["backend-b", "backend-c"]);

    // Scaling up a Service that does not fit any more: refused, and the old backends keep
    // serving (the new set [a, b, c] would move b and c to other slots).
    let owner = if ip == Ipv4Addr::new(198, 18, 128, 30) || port == NODE_PORT + 30 {
        "one"
    } else {
        "two"
    };
    env.api.update(&slice(owner, &[a, b, c])).unwrap();
    let ok = eventually(WAIT, || full() > before);
    assert!(ok, "the refused scale-up was not counted");
    env.wait_for_backends(ip, port, &["backend-b", "backend-c"]);
}

impl Env {
    fn metrics_text(&self) -> String {
        self.agent().metrics()
    }
}

/// `--service-cidr`, for API servers without ServiceCIDR objects (this stand-in has none):
/// a pod's new connection to an address of the Service CIDR that no Service holds is dropped
/// and counted, as kube-proxy's nftables mode drops it; the allocated ClusterIP serves.
#[test]
fn the_service_cidr_flag_drops_a_pods_traffic_to_unallocated_cluster_ips() {
    require_privileged!("the_service_cidr_flag_drops_a_pods_traffic_to_unallocated_cluster_ips");
    let mut env = Env::new();
    let ip = Ipv4Addr::new(198, 18, 128, 30);
    env.api.create(&service("one", ip, "TCP")).unwrap();
    env.api
        .create(&slice("one", &[env.addr("backend-b")]))
        .unwrap();
    env.start_agent(&["--service-cidr", "198.18.128.0/24"]);
    env.wait_for_backends(ip, 80, &["backend-b"]);
    let dropped =
        || env.metric("sluice_datapath_packets_total{verdict=\"drop_unallocated_cluster_ip\"}");
    assert_eq!(dropped(), 0.0);
    let client = &env.c.pod("client").ns;
    let got = testbed::tcp_connect(client, Ipv4Addr::new(198, 18, 128, 99), 80, T).unwrap();
    assert!(matches!(got, testbed::Connect::Timeout), "{got:?}");
    assert!(
        dropped() >= 1.0,
        "the SYN to an unallocated ClusterIP was not dropped:\n{}",
        env.agent().log()
    );
    assert!(env.agent().log().contains("198.18.128.0/24"));
}

#[test]
fn a_pod_device_that_appears_later_is_attached() {
    require_privileged!("a_pod_device_that_appears_later_is_attached");
    let mut env = Env::new();
    let a = env.addr("backend-a");
    env.api.create(&service("web", VIP, "TCP")).unwrap();
    env.api.create(&slice("web", &[a])).unwrap();
    env.start_agent(&[]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);
    let late = env.c.add_pod(0, "late").unwrap();
    let ns = late.ns.name().to_owned();
    let late_ns = &env.c.pod("late").ns;
    let mut last = None;
    let ok = eventually(WAIT, || {
        last = Some(curl(late_ns, VIP, 80, Duration::from_secs(1)));
        matches!(&last, Some(Ok(r)) if r.body == "backend-a")
    });
    assert!(
        ok,
        "a pod added after the agent started ({ns}) cannot reach the Service: {last:?}"
    );
}

#[test]
fn manifests_mode_keeps_the_last_good_state_when_a_file_breaks() {
    require_privileged!("manifests_mode_keeps_the_last_good_state_when_a_file_breaks");
    let mut env = Env::new();
    let (a, b) = (env.addr("backend-a"), env.addr("backend-b"));
    let dir = env.dir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, objs: &[serde_json::Value]| {
        // JSON is YAML: one document per object.
        let text: Vec<String> = objs.iter().map(|o| o.to_string()).collect();
        std::fs::write(dir.join(name), text.join("\n---\n")).unwrap();
    };
    let node = serde_json::to_value(node_object(env.c.nodes[0].addr)).unwrap();
    let svc = serde_json::to_value(service("web", VIP, "TCP")).unwrap();
    write("node.yaml", &[node]);
    write(
        "web.yaml",
        &[
            svc.clone(),
            serde_json::to_value(slice("web", &[a])).unwrap(),
        ],
    );
    let d = dir.display().to_string();
    env.start_agent(&["--manifests", &d]);
    env.wait_for_backends(VIP, 80, &["backend-a"]);

    std::fs::write(
        dir.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n spec: [\n",
    )
    .unwrap();
    let ok = eventually(WAIT, || env.metric("sluice_manifest_errors_total") >= 1.0);
    assert!(ok, "the broken file was not counted");
    assert!(
        env.agent().log().contains("web.yaml:"),
        "the error does not name the file and line:\n{}",
        env.agent().log()
    );
    assert_eq!(
        env.answered(VIP, 80, 10),
        BTreeSet::from(["backend-a".to_owned()])
    );

    write(
        "web.yaml",
        &[svc, serde_json::to_value(slice("web", &[a, b])).unwrap()],
    );
    env.wait_for_backends(VIP, 80, &["backend-a", "backend-b"]);
}
