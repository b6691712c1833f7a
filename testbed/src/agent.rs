//! A `sluice agent` process run inside a node's namespace, as the DaemonSet runs it on a
//! node: the real binary, its real flags, its health and metrics endpoints reached over HTTP
//! inside that namespace. Killed (by its pid) on drop.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::{TempDir, cmd::CmdError, daemon::Daemon, netns::Netns};

/// The flags every sandbox agent runs with: its node's name, the sandbox's pod devices
/// (`pv*`), the sandbox's hairpin address and its own pin path, then `extra` (the source:
/// `--manifests DIR` or `--kubeconfig FILE`, and anything else).
pub fn sandbox_args(node: &str, pins: &Path, extra: &[&str]) -> Vec<String> {
    let hairpin = crate::plan::HAIRPIN_SNAT.to_string();
    let pins = pins.display().to_string();
    let mut a: Vec<String> = [
        "--node-name",
        node,
        "--pod-interfaces",
        "pv*",
        "--hairpin-snat-address",
        &hairpin,
        "--pin-path",
        &pins,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

/// `sluice services -o json` of the agent pinned at `pins`, run by `binary` inside `ns`; empty
/// if it fails (no agent has pinned there yet).
pub fn services_json(ns: &Netns, binary: &Path, pins: &Path) -> Vec<serde_json::Value> {
    let (bin, pins) = (binary.display().to_string(), pins.display().to_string());
    ns.exec(&[&bin, "services", "-o", "json", "--pin-path", &pins])
        .ok()
        .and_then(|out| serde_json::from_str(&out).ok())
        .unwrap_or_default()
}

/// A directory of manifests (what `sluice agent --manifests` reads), removed on drop. Objects
/// are written as JSON, which is YAML.
#[derive(Debug)]
pub struct ManifestsDir(TempDir);

impl ManifestsDir {
    pub fn new() -> std::io::Result<Self> {
        TempDir::new("manifests").map(Self)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `objects` as file `name` (one document each), replacing it.
    pub fn write(&self, name: &str, objects: &[serde_json::Value]) -> std::io::Result<()> {
        let text: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
        // Write then rename, so the agent never reads half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text.join("\n---\n"))?;
        std::fs::rename(&tmp, self.0.join(name))
    }

    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.0.join(name))
    }
}

/// The agent's endpoints inside its namespace (kube-proxy's ports).
pub const METRICS: &str = "http://127.0.0.1:10249/metrics";
pub const HEALTHZ: &str = "http://127.0.0.1:10256/healthz";

#[derive(Debug)]
pub struct AgentProcess {
    d: Daemon,
    ns_name: String,
}

impl AgentProcess {
    /// Starts `binary agent ARGS...` in `ns`; its output (the log) goes to `log`.
    pub fn start(ns: &Netns, binary: &Path, args: &[String], log: &Path) -> Result<Self, CmdError> {
        let bin = binary.display().to_string();
        let mut argv: Vec<&str> = vec![&bin, "agent"];
        argv.extend(args.iter().map(String::as_str));
        let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        Ok(Self {
            d: Daemon::start(ns, &argv, &[("RUST_LOG", &level)], log)?,
            ns_name: ns.name().to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.d.pid()
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        self.d.log()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.d.running()
    }

    /// GET `url` from inside the agent's namespace: the status code and body, or None if
    /// nothing answers.
    pub fn get(&self, url: &str) -> Option<(u16, String)> {
        let out = crate::cmd::command(&[
            "ip",
            "netns",
            "exec",
            &self.ns_name,
            "curl",
            "-s",
            "-m",
            "2",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .ok()?
        .output()
        .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_owned()))
    }

    /// GET /healthz: the status code, or None if nothing answers.
    pub fn healthz(&self) -> Option<u16> {
        self.get(HEALTHZ).map(|(c, _)| c)
    }

    /// The metrics text.
    pub fn metrics(&self) -> String {
        self.get(METRICS).map(|(_, b)| b).unwrap_or_default()
    }

    /// The value of the sample `name` (with its labels exactly as written, e.g.
    /// `sluice_map_full_errors_total{map="LB4_SERVICES"}`), if exported.
    pub fn metric(&self, name: &str) -> Option<f64> {
        parse_metric(&self.metrics(), name)
    }

    /// Waits until /healthz answers 200 (the first full sync is done). Panics with the log if
    /// it does not within `timeout` or the process exits.
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.running() {
                panic!(
                    "the agent exited before becoming healthy; its log:\n{}",
                    self.log()
                );
            }
            if self.healthz() == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the agent was not healthy within {timeout:?}; its log:\n{}",
            self.log()
        );
    }

    /// SIGKILL, as a crash or an OOM kill would do, and reap it.
    pub fn kill9(&mut self) {
        self.d.kill();
    }

    /// SIGTERM (a DaemonSet rolling update) and wait for the exit; returns whether it exited
    /// by itself within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.d.terminate(timeout)
    }
}

/// The value of sample `name` in Prometheus text `text`.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; returns whether it did.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
