//! cgroup v2 directories the sandbox makes for its nodes and pods, as a real node has its own
//! tree with its pods under it: `<cgroup2>/sluicet<pid>x<n>-node<k>/pod<i>`. Socket programs
//! of a sandbox agent attach to its node's directory, never to the machine's root.
//!
//! Each node's directory is reached through a cgroup2 mount of its own on a private temporary
//! directory (the same hierarchy as the machine's, mounted again, as Cilium mounts it at
//! /run/cilium/cgroupv2): `ip netns exec` remounts /sys, so the machine's mount is not
//! visible to an agent started in a node's namespace. The mount goes when the cgroup does.
//!
//! - Only processes the tests start go in: a namespace can be given a cgroup ([`assign`]),
//!   and [`crate::cmd::command`] then starts every `ip netns exec NS ...` of that namespace
//!   inside it (the child joins before it execs, so nothing it does escapes the cgroup).
//! - Dropping a [`Cgroup`] (also while panicking) kills what is left in it (ours, by pid),
//!   then removes it; [`sweep_stale`] removes the directories of a run killed outright.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{netns::Netns, netns::PREFIX};

/// Namespace name -> the cgroup its processes go into.
static ASSIGNED: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// The cgroup2 mount points in `/proc/self/mountinfo`, the machine's first.
fn cgroup2_mounts() -> Vec<PathBuf> {
    mounts_of("cgroup2")
}

/// Where file systems of type `fstype` are mounted, from /proc/self/mountinfo.
pub(crate) fn mounts_of(fstype: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == fstype)
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect()
}

/// The machine's cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hierarchies): the first cgroup2 mount that is not one of ours.
pub fn mount() -> std::io::Result<PathBuf> {
    cgroup2_mounts()
        .into_iter()
        .find(|m| !is_ours(m))
        .ok_or_else(|| std::io::Error::other("no cgroup2 mount in /proc/self/mountinfo"))
}

/// Whether `path`'s last component is a name the sandbox made.
fn is_ours(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(PREFIX))
}

/// Whether `path` is a cgroup the sandbox made: a directory named by the sandbox inside a
/// cgroup2 mount.
pub fn is_sandbox_cgroup(path: &Path) -> bool {
    is_ours(path)
        && cgroup2_mounts().iter().any(|m| {
            path.strip_prefix(m)
                .is_ok_and(|rest| rest.components().count() >= 1)
        })
}

/// The cgroup2 hierarchy mounted on a private directory; unmounted and removed on drop.
#[derive(Debug)]
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("cgroup2"));
        std::fs::create_dir(&dir)?;
        if let Err(e) = mount_fs("cgroup2", &dir) {
            let _ = std::fs::remove_dir(&dir);
            return Err(std::io::Error::other(format!(
                "mount -t cgroup2 cgroup2 {}: {e}",
                dir.display()
            )));
        }
        Ok(Self { dir })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.dir);
    }
}

/// Mounts a fresh instance of the pseudo file system `fstype` (bpf, cgroup2) on `dir`, by the
/// mount(2) call itself: spawning mount(8) from a test process with many threads took over
/// 10 s at times in the 5.10 guest under software emulation, and failed a pinning test.
pub(crate) fn mount_fs(fstype: &str, dir: &Path) -> std::io::Result<()> {
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Unmounts `dir` (umount(2)) and removes it; a failure is reported on stderr, since callers
/// are drops and sweeps.
pub(crate) fn unmount(dir: &Path) {
    if let Err(e) = nix::mount::umount(dir) {
        eprintln!("testbed: could not unmount {}: {e}", dir.display());
    }
    let _ = std::fs::remove_dir(dir);
}

/// A cgroup directory this process made; removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    // Field order is drop order: the directory goes (Drop) before the mount.
    path: PathBuf,
    _mount: std::sync::Arc<Mount>,
}

impl Cgroup {
    /// Makes `unique_name(role)` at the top of the cgroup v2 hierarchy, reached through a
    /// mount of its own.
    pub fn new(role: &str) -> std::io::Result<Self> {
        let m = std::sync::Arc::new(Mount::new()?);
        let path = m.dir.join(crate::netns::unique_name(role));
        std::fs::create_dir(&path)?;
        Ok(Self { path, _mount: m })
    }

    /// Makes `name` inside this one (a pod's under its node's).
    pub fn child(&self, name: &str) -> std::io::Result<Self> {
        let path = self.path.join(name);
        std::fs::create_dir(&path)?;
        Ok(Self {
            path,
            _mount: self._mount.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The processes in this cgroup itself (not its children).
    pub fn procs(&self) -> Vec<i32> {
        procs(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(mut a) = ASSIGNED.lock()
            && let Some(map) = a.as_mut()
        {
            map.retain(|_, p| !p.starts_with(&self.path));
        }
        remove(&self.path);
    }
}

/// From now on, processes started in `ns` (`ip netns exec`) start in `cgroup`.
pub fn assign(ns: &Netns, cgroup: &Cgroup) {
    let mut a = ASSIGNED.lock().unwrap_or_else(|e| e.into_inner());
    a.get_or_insert_with(HashMap::new)
        .insert(ns.name().to_owned(), cgroup.path.clone());
}

/// The cgroup assigned to namespace `ns_name`, if any.
pub fn assigned(ns_name: &str) -> Option<PathBuf> {
    let a = ASSIGNED.lock().unwrap_or_else(|e| e.into_inner());
    a.as_ref()?.get(ns_name).cloned()
}

fn procs(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills what is left in `path` and below (only processes the tests started go there), then
/// removes the directories, deepest first.
fn remove(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = procs(path);
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = std::fs::remove_dir(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("testbed: could not remove cgroup {}: {e}", path.display());
    }
}

/// Whether a sandbox name was made by a process that no longer runs.
/// Whether `name` is one of ours whose creating process no longer runs.
pub(crate) fn stale_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.split('x').next())
        .and_then(|p| p.parse::<i32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the cgroups and cgroup2 mounts of testbed processes that no longer run (a run
/// killed with SIGKILL). Returns their paths.
pub fn sweep_stale() -> Vec<PathBuf> {
    let Ok(root) = mount() else {
        return Vec::new();
    };
    let mounts: Vec<PathBuf> = cgroup2_mounts()
        .into_iter()
        .filter(|m| {
            m.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(stale_name)
        })
        .collect();
    for m in &mounts {
        unmount(m);
    }
    let stale: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(stale_name))
        .map(|e| e.path())
        .collect();
    for p in &stale {
        remove(p);
    }
    stale.into_iter().chain(mounts).collect()
}
