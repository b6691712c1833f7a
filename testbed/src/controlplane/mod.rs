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
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    cluster::Cluster,
    cmd::{self, CmdError},
    netns::Netns,
    plan,
};

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

/// A process of the control plane, in its namespace, logging to a file; killed on drop.
#[derive(Debug)]
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &Netns, argv: &[String], log: &Path) -> Result<Self, ControlPlaneError> {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let file = File::create(log).map_err(io(format!("creating {}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let child = cmd::command(&ns.exec_argv(&refs))?
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| CmdError::Spawn {
                cmd: argv.join(" "),
                source,
            })?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // The end says why it failed.
        let start = text.len().saturating_sub(6000);
        text[text.ceil_char_boundary(start)..].to_owned()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

#[derive(Debug)]
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
        let dir = std::env::temp_dir().join(crate::netns::unique_name("controlplane"));
        std::fs::create_dir_all(dir.join("etcd"))
            .map_err(io("creating the control plane's dir"))?;
        let dir = TempDir(dir);
        pki::write(
            &dir.0,
            &[
                IpAddr::V4(plan::CONTROL_PLANE),
                IpAddr::V4(kubernetes_service_ip()),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ],
        )?;
        std::fs::write(
            dir.0.join("tokens.csv"),
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
        Ok(cp)
    }

    fn path(&self, file: &str) -> String {
        self.dir.0.join(file).display().to_string()
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
        self.etcd = Some(Daemon::start(
            &self.ns,
            &argv,
            &self.dir.0.join("etcd.log"),
        )?);
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
        self.apiserver = Some(Daemon::start(
            &self.ns,
            &argv,
            &self.dir.0.join("kube-apiserver.log"),
        )?);
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
        self.controller_manager = Some(Daemon::start(
            &self.ns,
            &argv,
            &self.dir.0.join("kube-controller-manager.log"),
        )?);
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
            log: self.apiserver.as_ref().map(Daemon::log).unwrap_or_default(),
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
        self.dir.0.join("ca.crt")
    }

    /// A kubeconfig for the admin (system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.0.join("admin.kubeconfig")
    }

    /// Writes a kubeconfig at `path` that reaches this API server with bearer `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), ControlPlaneError> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sandbox\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: sandbox\n  context: {{cluster: sandbox, user: user}}\ncurrent-context: sandbox\n",
            self.url(),
            self.ca_file().display()
        );
        std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
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
                    .map(Daemon::log)
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
