//! A private bpffs for tests that pin maps: mounted on a fresh temporary directory, unmounted
//! and removed on drop. The machine's own /sys/fs/bpf is never touched.
use std::path::{Path, PathBuf};

use crate::cmd::CmdError;

#[derive(Debug)]
pub struct BpfFs {
    dir: PathBuf,
}

impl BpfFs {
    pub fn new() -> Result<Self, CmdError> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("bpffs"));
        std::fs::create_dir_all(&dir).map_err(|source| CmdError::Spawn {
            cmd: format!("mkdir {}", dir.display()),
            source,
        })?;
        if let Err(source) = crate::cgroup::mount_fs("bpf", &dir) {
            let _ = std::fs::remove_dir(&dir);
            return Err(CmdError::Syscall {
                call: format!("mount(2) -t bpf bpf {}", dir.display()),
                source,
            });
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        crate::cgroup::unmount(&self.dir);
    }
}

/// Unmounts the private bpffs mounts of testbed processes that no longer run (a run killed
/// with SIGKILL or SIGTERM cannot unmount its own). Returns their paths.
pub fn sweep_stale() -> Vec<PathBuf> {
    let stale: Vec<PathBuf> = crate::cgroup::mounts_of("bpf")
        .into_iter()
        .filter(|m| {
            m.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(crate::cgroup::stale_name)
        })
        .collect();
    for m in &stale {
        crate::cgroup::unmount(m);
    }
    stale
}
