//! A sandbox kubelet (ours): it makes the real control plane's Pods real on the sandbox's
//! nodes, so that the real controllers produce real EndpointSlices.
//!
//! - Registers a Node object per sandbox node (InternalIP, hostname and zone labels, Ready),
//!   and keeps it: every [`HEARTBEAT`] it re-creates a Node that was deleted and writes the
//!   Ready condition again with a fresh `lastHeartbeatTime`.
//! - Schedules: a Pod without a node is bound to one (round robin, or the node its
//!   `kubernetes.io/hostname` node selector names) through the binding subresource.
//! - Runs: for each Pod bound to a sandbox node it makes the pod's network namespace and veth
//!   on that node (`Node::make_pod`, indexes 100 and up), runs the first container's command
//!   and args as a real process (`HOSTNAME` and literal `env` set; no images: the command must
//!   be one `tools.txt` lists, python3 in practice), and writes the Pod's status: phase,
//!   podIP, hostIP, and the Ready condition, after an HTTP GET readiness probe when one is
//!   given.
//! - Deletes: on a deletion timestamp it runs a `preStop.sleep` if given, sends SIGTERM,
//!   keeps the Pod as it is (terminating, still serving while ready, as the EndpointSlice
//!   controller then reports it) until the process exits or the grace period runs out
//!   (SIGKILL), then removes the namespace and the Pod (grace 0, on its uid).
//!
//! Not done: images and volumes, init and sidecar containers, restarts (a process that exits
//! leaves its Pod not ready, phase Failed or Succeeded), probes other than HTTP GET (liveness
//! and startup probes are ignored), resources, node leases (no node lifecycle controller runs to
//! read them). It polls the API every 100 ms rather than watching.
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
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
    pod: crate::cluster::Pod,
    child: Option<Child>,
    probe: Option<(u16, String)>,
    ready: bool,
    exited: Option<i32>,
    /// When deletion began, and when SIGTERM is due (after preStop).
    deleting: Option<(Instant, Instant, Duration)>,
    sigterm_sent: bool,
    last_probe: Option<Instant>,
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
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
                pods,
                errors,
            }),
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

fn node_name(k: usize) -> String {
    format!("node{k}")
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
        if v.len() < 100 {
            v.push(e);
        }
    };
    let client = match kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| e.to_string())
        .and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()))
    {
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
    let mut next_index: Vec<u8> = vec![FIRST_INDEX; cluster.nodes.len()];
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
                    match bound {
                        None if !deleting => {
                            let k = chosen_node(pod, cluster.nodes.len(), &mut round_robin);
                            if let Err(e) = bind(&client, &ns, &name, &node_name(k)).await {
                                note(format!("binding {ns}/{name}: {e}"));
                            }
                        }
                        None => {}
                        Some(node) => {
                            let Some(k) = (0..cluster.nodes.len()).find(|k| node_name(*k) == node)
                            else {
                                continue;
                            };
                            let key = (ns.clone(), name.clone());
                            let uid = pod.metadata.uid.clone().unwrap_or_default();
                            if running.get(&key).is_some_and(|r| r.uid != uid) {
                                // A new Pod of the same name: the old one is gone.
                                running.remove(&key);
                            }
                            if !running.contains_key(&key) && !deleting {
                                match start_pod(&cluster, k, &mut next_index[k], pod) {
                                    Ok(r) => {
                                        running.insert(key.clone(), r);
                                    }
                                    Err(e) => note(format!("running {ns}/{name}: {e}")),
                                }
                            }
                            if let Some(r) = running.get_mut(&key) {
                                tend(r, pod);
                                if let Err(e) = write_status(&client, &ns, &name, r, &cluster).await
                                {
                                    note(format!("status of {ns}/{name}: {e}"));
                                }
                                if finished(r) {
                                    let dp = DeleteParams {
                                        grace_period_seconds: Some(0),
                                        preconditions: Some(Preconditions {
                                            uid: Some(r.uid.clone()),
                                            resource_version: None,
                                        }),
                                        ..Default::default()
                                    };
                                    let api: Api<PodObject> = Api::namespaced(client.clone(), &ns);
                                    if let Err(e) = api.delete(&name, &dp).await {
                                        note(format!("removing {ns}/{name}: {e}"));
                                    }
                                    running.remove(&key);
                                }
                            }
                        }
                    }
                }
                // Pods gone from the API (deleted with grace 0 by someone else).
                running.retain(|(ns, name), _| {
                    items.iter().any(|p| {
                        p.metadata.namespace.as_deref() == Some(ns)
                            && p.metadata.name.as_deref() == Some(name)
                    })
                });
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
        let name = node_name(k);
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

fn start_pod(
    cluster: &Cluster,
    k: usize,
    next: &mut u8,
    pod: &PodObject,
) -> Result<Running, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let c = spec.containers.first().ok_or("no container")?;
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if argv.is_empty() {
        return Err("the container has no command: images are not run here".into());
    }
    if *next >= crate::plan::MAX_PODS_PER_NODE {
        return Err(format!("node{k} has no pod addresses left"));
    }
    let index = *next;
    *next += 1;
    let node = &cluster.nodes[k];
    let p = node.make_pod(index, &name).map_err(|e| e.to_string())?;
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut command = cmd::command(&p.ns.exec_argv(&refs)).map_err(|e| e.to_string())?;
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
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .and_then(|h| {
            let port = match &h.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                    u16::try_from(*n).ok()
                }
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(named) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(named))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }?;
            Some((port, h.path.clone().unwrap_or_else(|| "/".into())))
        });
    Ok(Running {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: k,
        pod: p,
        child: Some(child),
        ready: probe.is_none(),
        probe,
        exited: None,
        deleting: None,
        sigterm_sent: false,
        last_probe: None,
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
        && let Some((port, path)) = r.probe.clone()
        && r.last_probe
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
    {
        r.last_probe = Some(Instant::now());
        r.ready = http_ok(&r.pod.ns, port, &path);
    }
    if let Some(ts) = &pod.metadata.deletion_timestamp
        && r.deleting.is_none()
    {
        let _ = ts;
        let c = pod.spec.as_ref().and_then(|s| s.containers.first());
        let pre_stop = c
            .and_then(|c| c.lifecycle.as_ref())
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map_or(0, |s| s.seconds.max(0) as u64);
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
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

/// GET `path` on `127.0.0.1:port` inside the pod: a 2xx or 3xx status.
fn http_ok(ns: &Netns, port: u16, path: &str) -> bool {
    let path = path.to_owned();
    ns.run_in(move || {
        let Ok(mut s) = TcpStream::connect_timeout(
            &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        head.starts_with("HTTP/1.") && matches!(head.as_bytes().get(9), Some(b'2' | b'3'))
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
        None => json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}}),
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
        "containerStatuses": [{"name": "main", "ready": r.ready, "started": r.exited.is_none(),
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
