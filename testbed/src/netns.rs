//! One network namespace that this process created, removed (with every process still in it)
//! when dropped, during a panic too.
use std::{
    fs::File,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use crate::cmd::{CmdError, output, output_with_input, run, run_timeout, stdout_of};

/// Every namespace this crate creates starts with this, then the creating pid.
pub const PREFIX: &str = "sluicet";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique name for a new namespace: `sluicet<pid>x<counter>-<role>`.
pub fn unique_name(role: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}x{n}-{role}", std::process::id())
}

/// A network namespace created with `ip netns add`. Dropping it kills the processes inside it
/// and deletes it, which also destroys its veth devices.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `unique_name(role)`, with loopback up.
    pub fn new(role: &str) -> Result<Self, CmdError> {
        let name = unique_name(role);
        run(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // IPv4 only until the IPv6 datapath lands: no router solicitations or DAD packets
        // appear unbidden, so tests can count every packet they cause.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`: configure this namespace without entering it.
    pub fn ip(&self, args: &[&str]) -> Result<String, CmdError> {
        let mut argv = vec!["ip", "-n", &self.name];
        argv.extend_from_slice(args);
        run(&argv)
    }

    /// Runs `argv` inside the namespace, bounded by `timeout`; returns stdout on success.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Result<String, CmdError> {
        run_timeout(&self.exec_argv(argv), timeout)
    }

    /// Runs `argv` inside the namespace, bounded by 10 s; returns stdout on success.
    pub fn exec(&self, argv: &[&str]) -> Result<String, CmdError> {
        self.exec_timeout(argv, Duration::from_secs(10))
    }

    /// Runs `argv` inside the namespace with `input` on its stdin, bounded by `timeout`, as
    /// kube-proxy pipes rules to `iptables-restore` and `nft -f -`; returns stdout on success.
    /// The command is started from a thread inside the namespace rather than through
    /// `ip netns exec`, so a caller timing it times the command alone.
    pub fn exec_with_input(
        &self,
        argv: &[&str],
        input: &str,
        timeout: Duration,
    ) -> Result<String, CmdError> {
        let owned: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let input = input.as_bytes().to_vec();
        let out = self
            .run_in(move || {
                let argv: Vec<&str> = owned.iter().map(String::as_str).collect();
                output_with_input(&argv, Some(input), timeout)
            })
            .map_err(|source| CmdError::Spawn {
                cmd: argv.join(" "),
                source,
            })??;
        stdout_of(argv, out)
    }

    /// Runs `argv` inside the namespace and returns its whole output, success or not.
    pub fn exec_output(
        &self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output, CmdError> {
        output(&self.exec_argv(argv), timeout)
    }

    /// The argv that runs `argv` inside this namespace (`ip netns exec <ns> ...`), for callers
    /// that spawn long-running processes themselves.
    pub fn exec_argv<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(argv);
        v
    }

    /// Sets a sysctl inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), CmdError> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Netlink sockets, device names and attachments made by `f` all belong to the namespace.
    /// Whatever `f` creates that detaches through netlink must also be dropped inside `f`.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        let handle =
            std::thread::spawn(move || setns(&file, CloneFlags::CLONE_NEWNET).map(|()| f()));
        match handle.join() {
            Ok(r) => r.map_err(std::io::Error::from),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_of(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

fn pids_of(name: &str) -> Vec<i32> {
    run(&["ip", "netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills what runs in namespace `name` (only processes we started live there) and deletes it.
fn remove(name: &str) {
    for pid in pids_of(name) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Err(e) = run(&["ip", "netns", "delete", name]) {
        eprintln!("testbed: could not delete network namespace {name}: {e}");
    }
}

/// The namespaces this crate created (any process) that still exist.
pub fn ours() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Removes namespaces left by testbed processes that no longer run (a test run killed with
/// SIGKILL cannot clean up after itself). Returns the names removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = orphaned();
    for name in &removed {
        remove(name);
    }
    // And their cgroups (after the namespaces, whose processes are gone by then), and their
    // bpffs mounts.
    removed.extend(
        crate::cgroup::sweep_stale()
            .iter()
            .chain(&crate::bpffs::sweep_stale())
            .map(|p| p.display().to_string()),
    );
    removed
}

/// Our namespaces whose creating process has exited: leaked, since `Netns` removes its
/// namespace on drop. Namespaces of a process still running (another test run) are not.
pub fn orphaned() -> Vec<String> {
    ours()
        .into_iter()
        .filter(|name| {
            name.strip_prefix(PREFIX)
                .and_then(|rest| rest.split('x').next())
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect()
}
