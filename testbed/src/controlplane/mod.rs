//! The real Kubernetes control plane in the sandbox: etcd, kube-apiserver and
//! kube-controller-manager, built by `./x setup` at the versions of [`versions`], running in a
//! namespace of their own on the fabric at [`plan::CONTROL_PLANE`], so every node namespace
//! reaches them (the agents cannot reach the root namespace's loopback).
//!
//! - The API server advertises 198.18.0.5, so the `kubernetes` Service's endpoints never point
//!   outside the sandbox; its Service range and NodePort range are the sandbox plan's.
//! - Authentication by a token file (an `admin` in system:masters), authorization by RBAC, a
//!   fresh CA and serving certificate, and a fresh service-account signing key.
//! - kube-controller-manager runs the EndpointSlice, service-account, token, Deployment,
//!   ReplicaSet, namespace and garbage-collector controllers.
//! - Everything is killed, by the pids started, and its files removed when dropped.
pub mod pki;
pub mod versions;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{TempDir, cluster::Cluster, cmd::CmdError, daemon::Daemon, netns::Netns, plan};

/// How much of a component's log failure messages show (its end says why).
const LOG_TAIL: usize = 6000;
/// The API server's port.
pub const API_PORT: u16 = 6443;
/// The admin's bearer token (in system:masters). Sandbox-only.
const ADMIN_TOKEN: &str = "sluice-sandbox-admin";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "the control plane's {0} is not built ({1}): run `./x setup`, which builds it from the \
         Go module proxy"
    )]
    NotBuilt(&'static str, PathBuf),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not come up within {timeout:?}; its log:\n{log}")]
    NotReady {
        what: &'static str,
        timeout: Duration,
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// The control plane; see the module docs.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the processes, then the namespace, then the files.
    controller_manager: Option<Daemon>,
    apiserver: Option<Daemon>,
    etcd: Option<Daemon>,
    pub ns: Netns,
    dir: TempDir,
    /// Extra kube-apiserver flags this control plane was started with.
    apiserver_flags: Vec<String>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (with `extra_apiserver_flags`) and kube-controller-manager
    /// in a namespace joined to `cluster`'s fabric, and waits until the API server is ready.
    pub fn start(
        cluster: &Cluster,
        extra_apiserver_flags: &[&str],
    ) -> Result<Self, ControlPlaneError> {
        for b in versions::BINARIES {
            let p = versions::binary(b);
            if !p.is_file() {
                return Err(ControlPlaneError::NotBuilt(b, p));
            }
        }
        let ns = Netns::new("cp")?;
        cluster.join_fabric(&ns, "cp", plan::CONTROL_PLANE)?;
        // Keys and tokens inside: TempDir is the owner's only.
        let dir = TempDir::new("controlplane").map_err(io("creating the control plane's dir"))?;
        std::fs::create_dir_all(dir.join("etcd")).map_err(io("creating etcd's dir"))?;
        pki::write(
            dir.path(),
            &[
                IpAddr::V4(plan::CONTROL_PLANE),
                IpAddr::V4(kubernetes_service_ip()),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ],
        )?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n"),
        )
        .map_err(io("writing the token file"))?;
        let mut cp = Self {
            controller_manager: None,
            apiserver: None,
            etcd: None,
            ns,
            dir,
            apiserver_flags: extra_apiserver_flags
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        };
        cp.write_kubeconfig(&cp.admin_kubeconfig(), ADMIN_TOKEN)?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        cp.start_controller_manager()?;
        cp.wait_settled(Duration::from_secs(60))?;
        Ok(cp)
    }

    /// Waits until what every user of a fresh cluster relies on is there: the `kubernetes`
    /// Service's endpoint (the API server writes it after it is ready) and the `default`
    /// ServiceAccount (the controller manager makes it; Pods need it).
    fn wait_settled(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let endpoint = self
                .kubectl(&[
                    "get",
                    "endpointslices",
                    "-n",
                    "default",
                    "-l",
                    "kubernetes.io/service-name=kubernetes",
                    "-o",
                    "jsonpath={.items[*].endpoints[*].addresses[*]}",
                ])
                .is_ok_and(|o| o.trim() == plan::CONTROL_PLANE.to_string());
            if endpoint
                && self
                    .kubectl(&["get", "serviceaccount", "default", "-o", "name"])
                    .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(ControlPlaneError::NotReady {
            what: "the kubernetes Service's endpoint and the default ServiceAccount",
            timeout,
            log: self.logs(),
        })
    }

    fn daemon(&self, argv: &[String], log: &str) -> Result<Daemon, ControlPlaneError> {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        Ok(Daemon::start(&self.ns, &refs, &[], &self.dir.join(log))?)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn start_etcd(&mut self) -> Result<(), ControlPlaneError> {
        let argv: Vec<String> = [
            versions::binary("etcd").display().to_string(),
            "--name=cp".into(),
            format!("--data-dir={}", self.path("etcd")),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=cp=http://127.0.0.1:2380".into(),
            // A sandbox's store: no fsync, no metrics listener.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]
        .into();
        self.etcd = Some(self.daemon(&argv, "etcd.log")?);
        Ok(())
    }

    fn start_apiserver(&mut self) -> Result<(), ControlPlaneError> {
        let cidr = plan::cidr(plan::SERVICE_CIDR);
        let (np_lo, np_hi) = plan::NODE_PORT_RANGE;
        let issuer = format!("https://{}:{API_PORT}", plan::CONTROL_PLANE);
        let mut argv: Vec<String> = vec![
            versions::binary("kube-apiserver").display().to_string(),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--secure-port={API_PORT}"),
            format!("--advertise-address={}", plan::CONTROL_PLANE),
            // Only the sandbox address: nothing listens anywhere else.
            format!("--bind-address={}", plan::CONTROL_PLANE),
            format!("--service-cluster-ip-range={cidr}"),
            format!("--service-node-port-range={np_lo}-{np_hi}"),
            format!("--tls-cert-file={}", self.path("apiserver.crt")),
            format!("--tls-private-key-file={}", self.path("apiserver.key")),
            format!("--client-ca-file={}", self.path("ca.crt")),
            format!("--token-auth-file={}", self.path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer={issuer}"),
            format!("--service-account-key-file={}", self.path("sa.pub")),
            format!("--service-account-signing-key-file={}", self.path("sa.key")),
            // The DaemonSet's pod template asks for privileges (kubeadm allows them too).
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        argv.extend(self.apiserver_flags.iter().cloned());
        self.apiserver = Some(self.daemon(&argv, "kube-apiserver.log")?);
        self.wait_ready(Duration::from_secs(90))
    }

    fn start_controller_manager(&mut self) -> Result<(), ControlPlaneError> {
        let argv: Vec<String> = vec![
            versions::binary("kube-controller-manager").display().to_string(),
            format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            "--controllers=endpointslice,serviceaccount,serviceaccount-token,deployment,replicaset,namespace,garbagecollector".into(),
            format!("--service-account-private-key-file={}", self.path("sa.key")),
            format!("--root-ca-file={}", self.path("ca.crt")),
            "--use-service-account-credentials=false".into(),
            "--leader-elect=false".into(),
            // No HTTPS endpoint of its own: nothing listens beyond the API server.
            "--secure-port=0".into(),
        ];
        self.controller_manager = Some(self.daemon(&argv, "kube-controller-manager.log")?);
        Ok(())
    }

    /// Waits until `/readyz` answers ok.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(d) = self.apiserver.as_mut()
                && !d.running()
            {
                break;
            }
            if self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.trim() == "ok")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(ControlPlaneError::NotReady {
            what: "kube-apiserver",
            timeout,
            log: self
                .apiserver
                .as_ref()
                .map(|d| d.log_tail(LOG_TAIL))
                .unwrap_or_default(),
        })
    }

    /// Stops the API server (SIGKILL) and starts it again, waiting until it is ready; etcd and
    /// the controller manager keep running.
    pub fn restart_apiserver(&mut self) -> Result<(), ControlPlaneError> {
        self.apiserver = None;
        self.start_apiserver()
    }

    /// Stops the API server without starting it again (an outage).
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// `https://198.18.0.5:6443`.
    pub fn url(&self) -> String {
        format!("https://{}:{API_PORT}", plan::CONTROL_PLANE)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A kubeconfig for the admin (system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Writes a kubeconfig at `path` that reaches this API server with bearer `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), ControlPlaneError> {
        self.write_kubeconfig_via(path, token, &self.url())
    }

    /// [`Self::write_kubeconfig`] naming `server` as the API server's URL (the `kubernetes`
    /// Service's, `https://198.18.128.1:443`, as a pod's in-cluster config does).
    pub fn write_kubeconfig_via(
        &self,
        path: &Path,
        token: &str,
        server: &str,
    ) -> Result<(), ControlPlaneError> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sandbox\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: sandbox\n  context: {{cluster: sandbox, user: user}}\ncurrent-context: sandbox\n",
            self.ca_file().display()
        );
        // A bearer token: readable by the owner only.
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(io(format!("writing {}", path.display())))
    }

    /// Runs kubectl with `kubeconfig` (another user than the admin), inside the control
    /// plane's namespace; its output whether or not it succeeded.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
    ) -> Result<std::process::Output, CmdError> {
        let bin = versions::binary("kubectl").display().to_string();
        let kc = format!("--kubeconfig={}", kubeconfig.display());
        let mut argv = vec![bin.as_str(), kc.as_str()];
        argv.extend_from_slice(args);
        self.ns.exec_output(&argv, Duration::from_secs(60))
    }

    /// A kubeconfig at `path` for service account `namespace/name` (a token from the
    /// TokenRequest API, valid `hours`), as a pod of that service account would authenticate.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        hours: u32,
        path: &Path,
    ) -> Result<(), ControlPlaneError> {
        let duration = format!("--duration={hours}h");
        let token = self.kubectl(&["-n", namespace, "create", "token", name, &duration])?;
        self.write_kubeconfig(path, token.trim())
    }

    /// The token of the kubeconfig at `path` (one written by [`Self::write_kubeconfig`]).
    pub fn token_of(path: &Path) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
    }

    /// Runs kubectl as the admin, inside the control plane's namespace; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, CmdError> {
        self.kubectl_with_input(args, None)
    }

    /// [`ControlPlane::kubectl`] with `input` on stdin (`kubectl apply -f -`).
    pub fn kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, CmdError> {
        let bin = versions::binary("kubectl").display().to_string();
        let kc = format!("--kubeconfig={}", self.admin_kubeconfig().display());
        let mut argv = vec![bin.as_str(), kc.as_str()];
        argv.extend_from_slice(args);
        match input {
            Some(text) => self
                .ns
                .exec_with_input(&argv, text, Duration::from_secs(60)),
            None => self.ns.exec_timeout(&argv, Duration::from_secs(60)),
        }
    }

    /// The last lines each component logged, for failure messages.
    pub fn logs(&self) -> String {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.apiserver),
            ("kube-controller-manager", &self.controller_manager),
        ]
        .iter()
        .map(|(n, d)| {
            format!(
                "--- {n}:\n{}",
                d.as_ref()
                    .map(|d| d.log_tail(LOG_TAIL))
                    .unwrap_or_else(|| "(stopped)".into())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// The `kubernetes` Service's ClusterIP: the first address of the Service range.
pub fn kubernetes_service_ip() -> Ipv4Addr {
    Ipv4Addr::from(u32::from(plan::SERVICE_CIDR.0) + 1)
}
