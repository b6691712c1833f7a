//! A sandbox cluster on the real control plane, as the tests, the demo and the bench run it:
//! the [`ControlPlane`], the sandbox [`Kubelet`] registering every node, `deploy/rbac.yaml`
//! applied for real, and a `sluice agent` per node (its own bpffs, the sandbox's flags, see
//! [`agent::sandbox_args`]) authenticating as that service account, with a token from the
//! TokenRequest API as a DaemonSet's pod would. Everything goes on drop: the agents, then the
//! kubelet and its pods, then the control plane, then the cluster's namespaces.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    BpfFs, Cluster, TempDir,
    agent::{self, AgentProcess},
    cmd::CmdError,
    controlplane::{ControlPlane, ControlPlaneError},
    kubelet::{Kubelet, KubeletError, PodInfo},
};

/// How long an agent may take to become healthy (its first full sync).
const AGENT_HEALTHY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RealClusterError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(transparent)]
    Kubelet(#[from] KubeletError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RealClusterError {
    let what = what.into();
    move |source| RealClusterError::Io { what, source }
}

/// A file of the repository (testbed lives one level below its root).
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The example app of `deploy/examples/service-test.yaml` as the control plane takes it: its
/// Deployment and Service, without the EndpointSlice that manifests mode needs (here the
/// EndpointSlice controller writes it).
pub fn example_app() -> Result<String, RealClusterError> {
    let path = repo_file("deploy/examples/service-test.yaml");
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    Ok(text
        .split("\n---\n")
        .filter(|d| !d.contains("kind: EndpointSlice"))
        .collect::<Vec<_>>()
        .join("\n---\n"))
}

/// How a [`RealCluster`] is started.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// Extra kube-apiserver flags.
    pub apiserver_flags: &'a [&'a str],
    /// Extra `sluice agent` flags, after the sandbox's.
    pub agent_flags: &'a [&'a str],
    /// Node k's zone is `zones[k % len]`.
    pub zones: &'a [&'a str],
    /// Socket LB on (`--socket-lb all`): the nodes and pods get cgroups, and each agent
    /// attaches to its node's. Off: the TC path alone.
    pub socket_lb: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            apiserver_flags: &[],
            agent_flags: &[],
            zones: &["zone-a", "zone-b"],
            socket_lb: false,
        }
    }
}

/// How long the agents' token lasts (the demo may run live for a day).
pub const TOKEN_HOURS: u32 = 24;

/// See the module docs. Field order is drop order.
pub struct RealCluster {
    /// One per node; `None` while a test has it stopped.
    pub agents: Vec<Option<AgentProcess>>,
    pub kubelet: Kubelet,
    pub cp: ControlPlane,
    bpffs: Vec<BpfFs>,
    /// The agents' kubeconfig (service account kube-system/sluice).
    pub kubeconfig: PathBuf,
    agent_flags: Vec<String>,
    /// The kubeconfig and the agents' logs.
    dir: TempDir,
    sluice: PathBuf,
    /// How many agents were started so far (each gets its own log).
    started: usize,
    pub c: Arc<Cluster>,
}

impl RealCluster {
    /// Starts the control plane for `c`, the kubelet, applies `deploy/rbac.yaml`, and starts
    /// the `sluice` binary as an agent on every node, waiting until each is healthy.
    pub fn start(mut c: Cluster, sluice: &Path, opts: Options) -> Result<Self, RealClusterError> {
        if opts.socket_lb {
            c.add_cgroups().map_err(io("making the nodes' cgroups"))?;
        }
        let c = Arc::new(c);
        let dir = TempDir::new("realcluster").map_err(io("creating the cluster's dir"))?;
        let cp = ControlPlane::start(&c, opts.apiserver_flags)?;
        let kubelet = Kubelet::start(c.clone(), &cp.ns, &cp.admin_kubeconfig(), opts.zones)?;
        let rbac = repo_file("deploy/rbac.yaml");
        cp.kubectl(&["apply", "-f", &rbac.display().to_string()])?;
        let kubeconfig = dir.join("sluice.kubeconfig");
        cp.service_account_kubeconfig("kube-system", "sluice", TOKEN_HOURS, &kubeconfig)?;
        let n = c.nodes.len();
        let mut rc = Self {
            agents: (0..n).map(|_| None).collect(),
            kubelet,
            cp,
            bpffs: Vec::new(),
            kubeconfig,
            agent_flags: opts.agent_flags.iter().map(|f| (*f).to_owned()).collect(),
            dir,
            sluice: sluice.to_owned(),
            started: 0,
            c,
        };
        for k in 0..n {
            rc.bpffs.push(BpfFs::new()?);
            rc.start_agent(k)?;
        }
        Ok(rc)
    }

    /// The agent of node `k`'s pin path.
    pub fn pins(&self, k: usize) -> PathBuf {
        self.bpffs[k].path().join("sluice")
    }

    /// The command line of node `k`'s agent (after `sluice agent`).
    pub fn agent_args(&self, k: usize) -> Vec<String> {
        self.agent_args_with(k, &self.kubeconfig, &[])
    }

    /// Node `k`'s agent's command line with another kubeconfig and `extra` flags.
    pub fn agent_args_with(&self, k: usize, kubeconfig: &Path, extra: &[&str]) -> Vec<String> {
        let kc = kubeconfig.display().to_string();
        let mut flags = vec!["--kubeconfig", kc.as_str()];
        let cgroup = self.c.nodes[k]
            .cgroup
            .as_ref()
            .map(|c| c.path().display().to_string());
        if let Some(cg) = &cgroup {
            flags.extend(["--socket-lb", "all", "--cgroup-root", cg.as_str()]);
        }
        flags.extend(self.agent_flags.iter().map(String::as_str));
        flags.extend_from_slice(extra);
        agent::sandbox_args(&format!("node{k}"), &self.pins(k), &flags)
    }

    /// Starts (again) the agent of node `k` and waits until it is healthy (panics with its
    /// log if it is not).
    pub fn start_agent(&mut self, k: usize) -> Result<(), RealClusterError> {
        let args = self.agent_args(k);
        let mut a = self.spawn_agent(k, &args)?;
        a.wait_healthy(AGENT_HEALTHY);
        self.agents[k] = Some(a);
        Ok(())
    }

    /// Stops node `k`'s agent and starts `sluice agent ARGS` there instead, without waiting
    /// for it; the caller owns it.
    pub fn spawn_agent(
        &mut self,
        k: usize,
        args: &[String],
    ) -> Result<AgentProcess, RealClusterError> {
        self.agents[k] = None;
        let log = self.dir.join(format!("agent-node{k}-{}.log", self.started));
        self.started += 1;
        Ok(AgentProcess::start(
            &self.c.nodes[k].ns,
            &self.sluice,
            args,
            &log,
        )?)
    }

    /// Node `k` as after a reboot: its agent stopped and its pins gone (a fresh bpffs), so its
    /// programs are detached and its maps empty.
    pub fn reboot_node(&mut self, k: usize) -> Result<(), RealClusterError> {
        self.agents[k] = None;
        self.bpffs[k] = BpfFs::new()?;
        Ok(())
    }

    /// `sluice services -o json` on node `k`.
    pub fn services(&self, k: usize) -> Vec<serde_json::Value> {
        agent::services_json(&self.c.nodes[k].ns, &self.sluice, &self.pins(k))
    }

    /// The kubelet's ready pods whose name starts with `prefix`.
    pub fn ready_pods(&self, prefix: &str) -> Vec<PodInfo> {
        self.kubelet
            .pods()
            .into_iter()
            .filter(|p| p.ready && p.name.starts_with(prefix))
            .collect()
    }

    /// The names of [`Self::ready_pods`].
    pub fn ready_names(&self, prefix: &str) -> BTreeSet<String> {
        self.ready_pods(prefix)
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// Everything that says what went wrong: the agents' logs, the kubelet's pods and errors,
    /// the control plane's logs.
    pub fn diagnose(&self) -> String {
        let agents: String = self
            .agents
            .iter()
            .enumerate()
            .filter_map(|(k, a)| {
                a.as_ref()
                    .map(|a| format!("--- agent on node{k}:\n{}\n", a.log()))
            })
            .collect();
        format!(
            "{agents}--- kubelet: pods {:?}, errors {:?}\n{}",
            self.kubelet.pods(),
            self.kubelet.errors(),
            self.cp.logs()
        )
    }
}
