//! A sandbox kubelet (ours): it makes the real control plane's Pods real on the sandbox's
//! nodes, so that the real controllers produce real EndpointSlices.
//!
//! - Registers a Node object per sandbox node (InternalIP, hostname and zone labels, Ready),
//!   and keeps it: every [`HEARTBEAT`] it re-creates a Node that was deleted and writes the
//!   Ready condition again with a fresh `lastHeartbeatTime`.
//! - Schedules: a Pod without a node is bound to one (round robin, or the node its
//!   `kubernetes.io/hostname` node selector names) through the binding subresource.
//! - Runs: for each Pod bound to a sandbox node it makes the pod's network namespace and veth
//!   on that node (`Node::make_pod`, indexes 100 and up, each given back when its pod goes),
//!   runs the first container's command and args as a real process with the pod's environment
//!   only (PATH, `HOSTNAME` and literal `env`; no images: the program must be python3, since
//!   it runs as root on the machine's filesystem), and writes the Pod's status: phase, podIP,
//!   hostIP, the container's state, and the Ready condition.
//! - Probes: an HTTP GET readiness probe with its period, timeout, thresholds and initial
//!   delay as the API server defaulted them. A probe of another kind, or one naming a port the
//!   container lacks, fails the Pod.
//! - A Pod it cannot run (another program, no address left on the node, a probe it cannot
//!   run) is marked Failed with the reason, once, and not tried again.
//! - Deletes: on a deletion timestamp it runs a `preStop.sleep` if given, sends SIGTERM,
//!   keeps the Pod as it is (terminating, still serving while ready, as the EndpointSlice
//!   controller then reports it) until the process exits or the grace period (the deletion's,
//!   else the spec's) runs out (SIGKILL), then deletes the Pod (grace 0, on its uid) and only
//!   then forgets it and removes its namespace. A terminating Pod with nothing running here is
//!   deleted at once.
//!
//! Not done: images and volumes, init and sidecar containers, restarts (a process that exits
//! leaves its Pod not ready, phase Failed or Succeeded), liveness and startup probes (ignored),
//! resources, node leases (no node lifecycle controller runs to read them). It polls the API
//! every 100 ms rather than watching.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node as NodeObject, Pod as PodObject};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use crate::{cluster::Cluster, cmd, netns::Netns};

/// How often the kubelet looks at the API.
pub const POLL: Duration = Duration::from_millis(100);
/// How often the kubelet writes its nodes' status.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The first pod index the kubelet uses on a node (those below are the tests' own).
const FIRST_INDEX: u8 = 100;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the sandbox kubelet's thread: {0}")]
    Thread(std::io::Error),
    #[error("the sandbox kubelet did not register its nodes: {0}")]
    Register(String),
}

/// A pod the kubelet runs.
struct Running {
    uid: String,
    node: usize,
    /// Its index on the node (its address), given back when it goes.
    index: u8,
    pod: crate::cluster::Pod,
    container: String,
    started: k8s_openapi::jiff::Timestamp,
    started_at: Instant,
    child: Option<Child>,
    probe: Option<Probe>,
    ready: bool,
    exited: Option<i32>,
    /// When deletion began, and when SIGTERM is due (after preStop).
    deleting: Option<(Instant, Instant, Duration)>,
    sigterm_sent: bool,
    /// The status last written, to write only changes.
    written: Option<serde_json::Value>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The namespace goes with `pod` (and every process in it); reap ours.
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP GET readiness probe with the settings the API server defaulted (period 10 s,
/// timeout 1 s, success threshold 1, failure threshold 3, no initial delay).
#[derive(Clone, Debug)]
struct Probe {
    port: u16,
    path: String,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    last: Option<Instant>,
    /// Consecutive results of the same kind.
    successes: u32,
    failures: u32,
}

impl Probe {
    /// The container's readiness probe, if it has an HTTP GET one; an error if it names a
    /// port the container does not declare, or is of a kind this kubelet does not run.
    fn of(c: &k8s_openapi::api::core::v1::Container) -> Result<Option<Self>, String> {
        let Some(p) = &c.readiness_probe else {
            return Ok(None);
        };
        let Some(h) = &p.http_get else {
            return Err("only HTTP GET readiness probes are run here".into());
        };
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let port = match &h.port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(named) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(named))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
        .ok_or_else(|| {
            format!(
                "readiness probe port {:?} is no port of the container",
                h.port
            )
        })?;
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Ok(Some(Self {
            port,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
            last: None,
            successes: 0,
            failures: 0,
        }))
    }

    /// Probes when due (`since` is the container's start); the new readiness given the old.
    fn tend(&mut self, ns: &Netns, since: Instant, ready: bool) -> bool {
        if since.elapsed() < self.initial_delay
            || self.last.is_some_and(|t| t.elapsed() < self.period)
        {
            return ready;
        }
        self.last = Some(Instant::now());
        let ok = http_ok(ns, self.port, &self.path, self.timeout);
        self.record(ok, ready)
    }

    /// Counts one result; the new readiness given the old, as the kubelet's thresholds say.
    fn record(&mut self, ok: bool, ready: bool) -> bool {
        if ok {
            self.successes += 1;
            self.failures = 0;
            ready || self.successes >= self.success_threshold
        } else {
            self.failures += 1;
            self.successes = 0;
            ready && self.failures < self.failure_threshold
        }
    }
}

/// What tests can see of the kubelet's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub addr: Ipv4Addr,
    pub ready: bool,
}

/// The sandbox kubelet; see the module docs. Stopped (its pods removed) on drop.
pub struct Kubelet {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pods: Arc<Mutex<Vec<PodInfo>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Kubelet {
    /// Starts the kubelet for every node of `cluster`, talking to the API server with
    /// `kubeconfig` from inside namespace `api_ns` (one that reaches the API server). Node k
    /// is `node<k>` in zone `zones[k % zones.len()]`. Returns once the nodes are registered.
    pub fn start(
        cluster: Arc<Cluster>,
        api_ns: &Netns,
        kubeconfig: &Path,
        zones: &[&str],
    ) -> Result<Self, KubeletError> {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|source| {
            KubeletError::Kubeconfig {
                path: kubeconfig.to_owned(),
                source,
            }
        })?;
        let zones: Vec<String> = zones.iter().map(|z| (*z).to_owned()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let pods = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let file = std::fs::File::open(format!("/run/netns/{}", api_ns.name()))
            .map_err(KubeletError::Thread)?;
        let (stop2, pods2, errors2) = (stop.clone(), pods.clone(), errors.clone());
        let thread = std::thread::Builder::new()
            .name("sandbox-kubelet".into())
            .spawn(move || {
                // Every socket of this thread's runtime is in the API server's reach.
                if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(format!("setns: {e}")));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(run(cluster, kc, zones, stop2, pods2, errors2, ready_tx));
            })
            .map_err(KubeletError::Thread)?;
        // Built first, so that a failure below stops and joins the thread (Drop).
        let kubelet = Self {
            stop,
            thread: Some(thread),
            pods,
            errors,
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(kubelet),
            Ok(Err(e)) => Err(KubeletError::Register(e)),
            Err(_) => Err(KubeletError::Register("no answer within 30 s".into())),
        }
    }

    /// The pods it runs now.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What went wrong so far (API errors, pods it could not run), for failure messages.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    cluster: Arc<Cluster>,
    kc: kube::config::Kubeconfig,
    zones: Vec<String>,
    stop: Arc<AtomicBool>,
    shown: Arc<Mutex<Vec<PodInfo>>>,
    errors: Arc<Mutex<Vec<String>>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let note = |e: String| {
        let mut v = errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 100 && !v.contains(&e) {
            v.push(e);
        }
    };
    let client = match kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| e.to_string())
        .and_then(|mut c| {
            // Bounded, so that stopping never waits on a hung API server for long.
            c.connect_timeout = Some(Duration::from_secs(5));
            c.read_timeout = Some(Duration::from_secs(20));
            c.write_timeout = Some(Duration::from_secs(20));
            kube::Client::try_from(c).map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = register_nodes(&client, &cluster, &zones).await {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    let pods_api: Api<PodObject> = Api::all(client.clone());
    let mut running: HashMap<(String, String), Running> = HashMap::new();
    // Per node, the pod indexes not in use.
    let mut free: Vec<std::collections::BTreeSet<u8>> = (0..cluster.nodes.len())
        .map(|_| (FIRST_INDEX..crate::plan::MAX_PODS_PER_NODE).collect())
        .collect();
    // Pods that could not run (by uid), so that they are not tried again.
    let mut failed: std::collections::HashSet<String> = Default::default();
    let mut round_robin = 0usize;
    let mut heartbeat = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if heartbeat.elapsed() >= HEARTBEAT {
            heartbeat = Instant::now();
            if let Err(e) = register_nodes(&client, &cluster, &zones).await {
                note(format!("node heartbeat: {e}"));
            }
        }
        match pods_api.list(&ListParams::default()).await {
            Ok(list) => {
                let items = list.items;
                for pod in &items {
                    let (Some(ns), Some(name)) =
                        (pod.metadata.namespace.clone(), pod.metadata.name.clone())
                    else {
                        continue;
                    };
                    let spec = pod.spec.as_ref();
                    let bound = spec.and_then(|s| s.node_name.clone());
                    let deleting = pod.metadata.deletion_timestamp.is_some();
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    let Some(node) = bound else {
                        if !deleting {
                            let k = chosen_node(pod, cluster.nodes.len(), &mut round_robin);
                            if let Err(e) =
                                bind(&client, &ns, &name, &crate::plan::node_name(k)).await
                            {
                                note(format!("binding {ns}/{name}: {e}"));
                            }
                        }
                        continue;
                    };
                    let Some(k) =
                        (0..cluster.nodes.len()).find(|k| crate::plan::node_name(*k) == node)
                    else {
                        continue;
                    };
                    let key = (ns.clone(), name.clone());
                    if running.get(&key).is_some_and(|r| r.uid != uid) {
                        // A new Pod of the same name: the old one is gone.
                        release(&mut free, running.remove(&key));
                    }
                    if !running.contains_key(&key) {
                        if deleting {
                            // Nothing of it runs here (it never started, or it failed): it
                            // can go at once.
                            match remove_pod(&client, &ns, &name, &uid).await {
                                Ok(()) => {
                                    failed.remove(&uid);
                                }
                                Err(e) => note(format!("removing {ns}/{name}: {e}")),
                            }
                            continue;
                        }
                        if failed.contains(&uid) {
                            continue;
                        }
                        match start_pod(&cluster, k, &mut free[k], pod) {
                            Ok(r) => {
                                running.insert(key.clone(), r);
                            }
                            Err(e) => {
                                note(format!("running {ns}/{name}: {e}"));
                                failed.insert(uid.clone());
                                if let Err(e) = write_failed(&client, &ns, &name, &e).await {
                                    note(format!("status of {ns}/{name}: {e}"));
                                }
                                continue;
                            }
                        }
                    }
                    let Some(r) = running.get_mut(&key) else {
                        continue;
                    };
                    tend(r, pod);
                    if let Err(e) = write_status(&client, &ns, &name, r, &cluster).await {
                        note(format!("status of {ns}/{name}: {e}"));
                    }
                    if finished(r) {
                        // Removed from our books only once the API has let it go.
                        match remove_pod(&client, &ns, &name, &uid).await {
                            Ok(()) => release(&mut free, running.remove(&key)),
                            Err(e) => note(format!("removing {ns}/{name}: {e}")),
                        }
                    }
                }
                // Pods gone from the API (deleted with grace 0 by someone else).
                let gone: Vec<(String, String)> = running
                    .keys()
                    .filter(|(ns, name)| {
                        !items.iter().any(|p| {
                            p.metadata.namespace.as_deref() == Some(ns)
                                && p.metadata.name.as_deref() == Some(name)
                        })
                    })
                    .cloned()
                    .collect();
                for key in gone {
                    release(&mut free, running.remove(&key));
                }
                failed.retain(|uid| items.iter().any(|p| p.metadata.uid.as_deref() == Some(uid)));
            }
            Err(e) => note(format!("listing pods: {e}")),
        }
        *shown.lock().unwrap_or_else(|p| p.into_inner()) = running
            .iter()
            .map(|((ns, name), r)| PodInfo {
                namespace: ns.clone(),
                name: name.clone(),
                node: r.node,
                addr: r.pod.addr,
                ready: r.ready,
            })
            .collect();
        tokio::time::sleep(POLL).await;
    }
    // Stopping: every process and namespace goes with `running`.
}

/// Gives a removed pod's index back to its node (after its namespace is gone).
fn release(free: &mut [std::collections::BTreeSet<u8>], r: Option<Running>) {
    if let Some(r) = r {
        let (node, index) = (r.node, r.index);
        drop(r);
        free[node].insert(index);
    }
}

/// Deletes Pod `ns/name` with grace 0, on its uid; a Pod already gone counts as removed.
async fn remove_pod(client: &kube::Client, ns: &str, name: &str, uid: &str) -> Result<(), String> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let api: Api<PodObject> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Marks a Pod that could not run as Failed, with why.
async fn write_failed(
    client: &kube::Client,
    ns: &str,
    name: &str,
    why: &str,
) -> Result<(), String> {
    let status = json!({"status": {
        "phase": "Failed",
        "reason": "SandboxKubelet",
        "message": why,
        "conditions": [{"type": "Ready", "status": "False", "reason": "SandboxKubelet", "message": why}],
    }});
    let api: Api<PodObject> = Api::namespaced(client.clone(), ns);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn register_nodes(
    client: &kube::Client,
    cluster: &Cluster,
    zones: &[String],
) -> Result<(), String> {
    let api: Api<NodeObject> = Api::all(client.clone());
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    for n in &cluster.nodes {
        let k = usize::from(n.index);
        let name = crate::plan::node_name(k);
        let zone = zones
            .get(k % zones.len().max(1))
            .cloned()
            .unwrap_or_default();
        let node: NodeObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": zone,
            }},
        }))
        .map_err(|e| e.to_string())?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("creating Node {name}: {e}")),
        }
        let status = json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": n.addr.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "sandbox kubelet",
                            "lastHeartbeatTime": now}],
            "capacity": {"pods": "110", "cpu": "2", "memory": "4Gi"},
            "allocatable": {"pods": "110", "cpu": "2", "memory": "4Gi"},
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("status of Node {name}: {e}"))?;
    }
    Ok(())
}

/// The node a Pod goes to: the one its `kubernetes.io/hostname` selector names, else the
/// next in turn.
fn chosen_node(pod: &PodObject, nodes: usize, next: &mut usize) -> usize {
    let wanted = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .and_then(|s| s.get("kubernetes.io/hostname"))
        .and_then(|h| h.strip_prefix("node"))
        .and_then(|k| k.parse::<usize>().ok())
        .filter(|k| *k < nodes);
    wanted.unwrap_or_else(|| {
        let k = *next % nodes.max(1);
        *next += 1;
        k
    })
}

async fn bind(client: &kube::Client, ns: &str, name: &str, node: &str) -> Result<(), String> {
    let api: Api<PodObject> = Api::namespaced(client.clone(), ns);
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// The programs a sandbox pod may run: the sandbox has no images, and a pod's process runs
/// as root on the machine's filesystem, so only an interpreter the tests' apps use.
const POD_PROGRAMS: [&str; 1] = ["python3"];

fn start_pod(
    cluster: &Cluster,
    k: usize,
    free: &mut std::collections::BTreeSet<u8>,
    pod: &PodObject,
) -> Result<Running, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let c = spec.containers.first().ok_or("no container")?;
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let Some(program) = argv.first() else {
        return Err("the container has no command: images are not run here".into());
    };
    if !POD_PROGRAMS.contains(&program.as_str()) {
        return Err(format!(
            "the container runs {program:?}: a sandbox pod may run only {POD_PROGRAMS:?}"
        ));
    }
    let probe = Probe::of(c)?;
    let Some(&index) = free.first() else {
        return Err(format!("node{k} has no pod addresses left"));
    };
    let node = &cluster.nodes[k];
    let p = node.make_pod(index, &name).map_err(|e| e.to_string())?;
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut command = cmd::command(&p.ns.exec_argv(&refs)).map_err(|e| e.to_string())?;
    // The pod's environment only: not the test process's.
    command.env_clear();
    command.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    command.env("HOSTNAME", &name);
    for e in c.env.iter().flatten() {
        if let Some(v) = &e.value {
            command.env(&e.name, v);
        }
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", argv.join(" ")))?;
    free.remove(&index);
    Ok(Running {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: k,
        index,
        pod: p,
        container: c.name.clone(),
        started: k8s_openapi::jiff::Timestamp::now(),
        started_at: Instant::now(),
        child: Some(child),
        ready: probe.is_none(),
        probe,
        exited: None,
        deleting: None,
        sigterm_sent: false,
        written: None,
    })
}

/// Advances one pod: its process, its probe, its deletion.
fn tend(r: &mut Running, pod: &PodObject) {
    if r.exited.is_none()
        && let Some(c) = r.child.as_mut()
        && let Ok(Some(st)) = c.try_wait()
    {
        r.exited = Some(st.code().unwrap_or(137));
        r.ready = false;
    }
    if r.exited.is_none()
        && let Some(probe) = r.probe.as_mut()
    {
        r.ready = probe.tend(&r.pod.ns, r.started_at, r.ready);
    }
    if pod.metadata.deletion_timestamp.is_some() && r.deleting.is_none() {
        let c = pod.spec.as_ref().and_then(|s| s.containers.first());
        let pre_stop = c
            .and_then(|c| c.lifecycle.as_ref())
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map_or(0, |s| s.seconds.max(0) as u64);
        // The deletion's own grace period (`kubectl delete --grace-period`), else the spec's.
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let now = Instant::now();
        r.deleting = Some((
            now,
            now + Duration::from_secs(pre_stop),
            Duration::from_secs(grace),
        ));
    }
    if let Some((began, sigterm_at, grace)) = r.deleting
        && r.exited.is_none()
    {
        if !r.sigterm_sent && Instant::now() >= sigterm_at {
            r.sigterm_sent = true;
            if let Some(c) = &r.child {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        if began.elapsed() >= grace
            && let Some(c) = r.child.as_mut()
        {
            let _ = c.kill();
            let _ = c.wait();
            r.exited = Some(137);
            r.ready = false;
        }
    }
}

/// Whether the pod's process is done and the pod is being deleted: time to remove it.
fn finished(r: &Running) -> bool {
    r.deleting.is_some() && r.exited.is_some()
}

/// GET `path` on `127.0.0.1:port` inside the pod within `timeout`: a 2xx or 3xx status.
fn http_ok(ns: &Netns, port: u16, path: &str, timeout: Duration) -> bool {
    let path = path.to_owned();
    ns.run_in(move || {
        crate::apps::http_get((Ipv4Addr::LOCALHOST, port).into(), &path, timeout)
            .is_ok_and(|(code, _)| (200..400).contains(&code))
    })
    .unwrap_or(false)
}

async fn write_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    r: &mut Running,
    cluster: &Cluster,
) -> Result<(), String> {
    let ready = if r.ready { "True" } else { "False" };
    let phase = match r.exited {
        None => "Running",
        Some(0) => "Succeeded",
        Some(_) => "Failed",
    };
    let host = cluster.nodes[r.node].addr.to_string();
    let ip = r.pod.addr.to_string();
    let state = match r.exited {
        None => json!({"running": {"startedAt": r.started}}),
        Some(code) => json!({"terminated": {"exitCode": code, "reason": "Completed"}}),
    };
    let status = json!({"status": {
        "phase": phase,
        "hostIP": host, "hostIPs": [{"ip": host}],
        "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "containerStatuses": [{"name": r.container, "ready": r.ready, "started": r.exited.is_none(),
                               "restartCount": 0, "image": "sandbox", "imageID": "",
                               "state": state}],
    }});
    if r.written.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<PodObject> = Api::namespaced(client.clone(), ns);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| e.to_string())?;
    r.written = Some(status);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Container;

    fn container(probe: serde_json::Value) -> Container {
        serde_json::from_value(json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": probe,
        }))
        .unwrap()
    }

    #[test]
    fn a_probe_takes_the_api_servers_defaults_and_resolves_named_ports() {
        let p = Probe::of(&container(json!({"httpGet": {"port": "http"}})))
            .unwrap()
            .unwrap();
        assert_eq!((p.port, p.path.as_str()), (8080, "/"));
        assert_eq!(
            (p.period, p.timeout),
            (Duration::from_secs(10), Duration::from_secs(1))
        );
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        let err = Probe::of(&container(json!({"httpGet": {"port": "metrics"}}))).unwrap_err();
        assert!(err.contains("metrics"), "{err}");
        let err = Probe::of(&container(json!({"exec": {"command": ["true"]}}))).unwrap_err();
        assert!(err.contains("HTTP GET"), "{err}");
    }

    #[test]
    fn readiness_follows_the_success_and_failure_thresholds() {
        let mut p = Probe::of(&container(json!({
            "httpGet": {"port": 8080}, "successThreshold": 2, "failureThreshold": 3
        })))
        .unwrap()
        .unwrap();
        let mut ready = false;
        let mut seen = Vec::new();
        for ok in [
            true, false, true, true, false, false, true, false, false, false,
        ] {
            ready = p.record(ok, ready);
            seen.push(ready);
        }
        // Ready after two successes in a row; not ready only after three failures in a row.
        assert_eq!(
            seen,
            [
                false, false, false, true, true, true, true, true, true, false
            ]
        );
    }
}
