//! A `sluice agent` process run inside a node's namespace, as the DaemonSet runs it on a
//! node: the real binary, its real flags, its health and metrics endpoints reached over HTTP
//! inside that namespace. Killed (by its pid) on drop.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::{TempDir, cmd::CmdError, daemon::Daemon, netns::Netns};

/// How long a test lets an agent take to become healthy: loading the programs is most of it,
/// under a second here but up to a minute per agent in a Linux 5.10 guest under software
/// emulation (the kernel matrix), where a node's three agents verify at once on two CPUs. A
/// bound on a hang, not a speed goal: the benchmark measures start-up.
pub const START_LIMIT: Duration = Duration::from_secs(300);

/// The flags every sandbox agent runs with: its node's name, the sandbox's pod devices
/// (`pv*`), the sandbox's hairpin address and its own pin path, then `extra` (the source:
/// `--manifests DIR` or `--kubeconfig FILE`, and anything else). Socket LB is off unless
/// `extra` sets `--socket-lb` (with the node's `--cgroup-root`): a test that means the TC path
/// says so, and no agent attaches to a cgroup the test did not make.
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
    if !extra.contains(&"--socket-lb") {
        a.extend(["--socket-lb".to_owned(), "off".to_owned()]);
    }
    a
}

/// Refuses agent flags that would attach socket programs anywhere but a cgroup the sandbox
/// made: socket LB on needs `--cgroup-root` naming one of ours (`<cgroup2>/sluicet...`), since
/// the agent's default is the machine's whole tree.
pub fn check_socket_lb_scope(args: &[String]) -> Result<(), String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    if value("--socket-lb") == Some("off") {
        return Ok(());
    }
    let Some(root) = value("--cgroup-root") else {
        return Err(
            "socket LB is on (the agent's default) without --cgroup-root: it would \
                    attach to the machine's whole cgroup tree; pass --socket-lb off or a \
                    sandbox node's cgroup"
                .into(),
        );
    };
    let ours = crate::cgroup::is_sandbox_cgroup(Path::new(root));
    if ours {
        Ok(())
    } else {
        Err(format!(
            "--cgroup-root {root} is not a cgroup the sandbox made (a {}... directory in a \
             cgroup2 mount)",
            crate::netns::PREFIX
        ))
    }
}

/// `sluice services -o json` of the agent pinned at `pins`, run by `binary` inside `ns`; empty
/// if it fails (no agent has pinned there yet).
/// The Node objects of `c`'s nodes, as their kubelets register them (name and InternalIP),
/// for a manifests directory.
pub fn node_objects(c: &crate::Cluster) -> Vec<serde_json::Value> {
    c.nodes
        .iter()
        .map(|n| {
            serde_json::json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": crate::plan::node_name(usize::from(n.index))},
                   "status": {"addresses": [{"type": "InternalIP", "address": n.addr.to_string()}]}})
        })
        .collect()
}

pub fn services_json(ns: &Netns, binary: &Path, pins: &Path) -> Vec<serde_json::Value> {
    cli_json(ns, binary, pins, "services")
}

/// `sluice SUBCOMMAND -o json` (`services`, `conntrack`) of the agent pinned at `pins`; empty
/// if it fails.
pub fn cli_json(
    ns: &Netns,
    binary: &Path,
    pins: &Path,
    subcommand: &str,
) -> Vec<serde_json::Value> {
    let (bin, pins) = (binary.display().to_string(), pins.display().to_string());
    ns.exec(&[&bin, subcommand, "-o", "json", "--pin-path", &pins])
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
        if let Err(why) = check_socket_lb_scope(args) {
            panic!("refusing to start the agent: {why}");
        }
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

    /// The datapath counter `verdict` (`sluice_datapath_packets_total{verdict=...}`), 0 if
    /// not exported.
    pub fn packets(&self, verdict: &str) -> f64 {
        self.metric(&format!(
            "sluice_datapath_packets_total{{verdict=\"{verdict}\"}}"
        ))
        .unwrap_or(0.0)
    }

    /// [`AgentProcess::wait_healthy`] with [`START_LIMIT`]: what tests use.
    pub fn wait_started(&mut self) {
        self.wait_healthy(START_LIMIT);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Vec<String> {
        flags.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_sandbox_agent_attaches_socket_programs_outside_a_sandbox_cgroup() {
        // The agent's default is the machine's whole tree: refused.
        assert!(check_socket_lb_scope(&args(&["--node-name", "node0"])).is_err());
        assert!(check_socket_lb_scope(&args(&["--socket-lb", "all"])).is_err());
        // A cgroup root that is not one the sandbox made: refused.
        let root = crate::cgroup::mount()
            .unwrap_or_else(|_| "/sys/fs/cgroup".into())
            .display()
            .to_string();
        for dir in [root.clone(), format!("{root}/system.slice")] {
            assert!(
                check_socket_lb_scope(&args(&["--socket-lb", "all", "--cgroup-root", &dir]))
                    .is_err(),
                "{dir}"
            );
        }
        // Off: nothing attaches.
        assert!(check_socket_lb_scope(&args(&["--socket-lb", "off"])).is_ok());
        // What sandbox_args gives a test that does not ask for socket LB.
        let a = sandbox_args("node0", Path::new("/x"), &["--manifests", "/m"]);
        assert!(check_socket_lb_scope(&a).is_ok(), "{a:?}");
    }
}
