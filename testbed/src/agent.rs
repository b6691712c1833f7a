//! A `sluice agent` process run inside a node's namespace, as the DaemonSet runs it on a
//! node: the real binary, its real flags, its health and metrics endpoints reached over HTTP
//! inside that namespace. Killed (by its pid) on drop.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{cmd::CmdError, netns::Netns};

/// The agent's endpoints inside its namespace (kube-proxy's ports).
pub const METRICS: &str = "http://127.0.0.1:10249/metrics";
pub const HEALTHZ: &str = "http://127.0.0.1:10256/healthz";

#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    ns_name: String,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `binary agent ARGS...` in `ns`; its stderr (the log) goes to `log`.
    pub fn start(ns: &Netns, binary: &Path, args: &[String], log: &Path) -> Result<Self, CmdError> {
        let mut argv: Vec<String> = vec![binary.display().to_string(), "agent".into()];
        argv.extend(args.iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let full = ns.exec_argv(&refs);
        let spawn_err = |source| CmdError::Spawn {
            cmd: full.join(" "),
            source,
        };
        let file = File::create(log).map_err(spawn_err)?;
        let child = crate::cmd::command(&full)?
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(spawn_err)?;
        Ok(Self {
            child,
            ns_name: ns.name().to_owned(),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn get(&self, url: &str) -> Option<(u16, String)> {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a DaemonSet rolling update) and wait for the exit; returns whether it exited
    /// by itself within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
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
