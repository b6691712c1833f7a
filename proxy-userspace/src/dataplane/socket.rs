//! Socket-level load balancing: the cgroup `sock_addr` programs of `proxy-ebpf/src/sock.rs`,
//! attached to one cgroup v2 directory (the node's whole tree by default), so every socket of
//! a process under it has its Service destination translated at `connect()`/`sendmsg()`.
//!
//! - Which programs: `connect4`/`sendmsg4` that refuse a Service without endpoints with
//!   ECONNREFUSED (`bpf_set_retval`, Linux >= 5.18), else their `_eperm` variants; and
//!   `recvmsg4`, `getpeername4`. Loaded here, not at start-up: the `bpf_set_retval` variants
//!   would fail the verifier of an older kernel.
//! - Attachments are bpf links pinned under `<links_dir>/<hook>_<cgroup inode>`, so they
//!   outlive the agent; a restarted agent swaps its programs into them in place
//!   (`BPF_LINK_UPDATE`, no moment without them). Links pinned for another cgroup (an earlier
//!   `--cgroup-root`) are removed, which detaches them.
//! - `SOCK_CONFIG` holds the mode and the node's network namespace cookie, which `host-only`
//!   compares each socket's with.
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use proxy_common::{
    SOCK_CONFIG_MAP, SOCK_LB_ALL, SOCK_LB_HOST_ONLY, SOCK_LB_OFF, SOCK_REVNAT_MAP, SockConfig,
    SockRevKey, SockRevValue,
};

use super::{Dataplane, DataplaneError, FrontendId, Protocol, map_error, remove_pin};

/// A backend a frontend's sockets may have been sent to by socket LB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketTarget {
    pub frontend: FrontendId,
    pub backend: (Ipv4Addr, u16),
}

/// What socket-level load balancing translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    /// Every socket under the cgroup root: the node's own processes and its pods'.
    All,
    /// Only sockets of the node's own network namespace (hostNetwork); pods' traffic goes
    /// through the TC path, so a service mesh in the pod sees the Service address.
    HostOnly,
    /// None: the TC path translates pods' traffic; the node's own traffic is not translated.
    Off,
}

impl SocketLb {
    fn config_mode(self) -> u32 {
        match self {
            Self::All => SOCK_LB_ALL,
            Self::HostOnly => SOCK_LB_HOST_ONLY,
            Self::Off => SOCK_LB_OFF,
        }
    }
}

impl std::fmt::Display for SocketLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::HostOnly => "host-only",
            Self::Off => "off",
        })
    }
}

pub const SOCK_CONNECT4: &str = "sluice_sock_connect4";
pub const SOCK_SENDMSG4: &str = "sluice_sock_sendmsg4";
pub const SOCK_CONNECT4_EPERM: &str = "sluice_sock_connect4_eperm";
pub const SOCK_SENDMSG4_EPERM: &str = "sluice_sock_sendmsg4_eperm";
pub const SOCK_RECVMSG4: &str = "sluice_sock_recvmsg4";
pub const SOCK_GETPEERNAME4: &str = "sluice_sock_getpeername4";

/// The hooks, each with the program this kernel gets: (pin name, program).
pub fn socket_programs(set_retval: bool) -> [(&'static str, &'static str); 4] {
    let (connect, sendmsg) = if set_retval {
        (SOCK_CONNECT4, SOCK_SENDMSG4)
    } else {
        (SOCK_CONNECT4_EPERM, SOCK_SENDMSG4_EPERM)
    };
    [
        ("connect4", connect),
        ("sendmsg4", sendmsg),
        ("recvmsg4", SOCK_RECVMSG4),
        ("getpeername4", SOCK_GETPEERNAME4),
    ]
}

/// Where socket LB attaches.
#[derive(Clone, Debug)]
pub struct SocketLbConfig {
    pub mode: SocketLb,
    /// A cgroup v2 directory: every process under it is translated.
    pub cgroup: PathBuf,
    /// The node's network namespace cookie (`host-only` compares with it); 0: the kernel's
    /// initial namespace.
    pub host_netns_cookie: u64,
    /// Use the `bpf_set_retval` programs (ECONNREFUSED for Services without endpoints).
    pub set_retval: bool,
    /// Where the links are pinned.
    pub links_dir: PathBuf,
}

impl Dataplane {
    /// Loads the socket programs and attaches them to `cfg.cgroup` (or, with mode off,
    /// removes every pinned socket link), then writes the mode and the host's cookie.
    pub fn set_socket_lb(&mut self, cfg: &SocketLbConfig) -> Result<(), DataplaneError> {
        let pin_dir = &cfg.links_dir;
        std::fs::create_dir_all(pin_dir).map_err(|source| DataplaneError::PinPath {
            path: pin_dir.clone(),
            source,
        })?;
        let keep = if cfg.mode == SocketLb::Off {
            None
        } else {
            Some(cgroup_inode(&cfg.cgroup)?)
        };
        // Links of another cgroup (or all of them, when off) go: removing the pin detaches.
        for entry in std::fs::read_dir(pin_dir)
            .map_err(|source| DataplaneError::PinPath {
                path: pin_dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ino = name
                .rsplit_once('_')
                .and_then(|(_, i)| i.parse::<u64>().ok());
            if keep.is_none() || ino != keep {
                remove_pin(&entry.path())?;
                tracing::info!(pin = %entry.path().display(), "removed a socket LB link");
            }
        }
        if let Some(ino) = keep {
            let cgroup =
                std::fs::File::open(&cfg.cgroup).map_err(|source| DataplaneError::Cgroup {
                    path: cfg.cgroup.clone(),
                    source,
                })?;
            for (hook, program) in socket_programs(cfg.set_retval) {
                let pin = pin_dir.join(format!("{hook}_{ino}"));
                self.attach_socket_program(program, &cgroup, &pin)?;
            }
        }
        self.write_sock_config(cfg.mode.config_mode(), cfg.host_netns_cookie)
    }

    fn attach_socket_program(
        &mut self,
        program: &'static str,
        cgroup: &std::fs::File,
        pin: &Path,
    ) -> Result<(), DataplaneError> {
        let prog: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { program })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Verifier {
                program,
                source: Box::new(source),
            })?;
        }
        let attach_error = |source: ProgramError| DataplaneError::CgroupAttach {
            program,
            source: Box::new(source),
        };
        if let Ok(old) = PinnedLink::from_pin(pin) {
            match CgroupSockAddrLink::try_from(FdLink::from(old)) {
                Ok(link) => match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin holds the link; our fd to it can go.
                        drop(prog.take_link(id).map_err(attach_error)?);
                        return Ok(());
                    }
                    Err(error) => {
                        // Its cgroup is gone, or it cannot be updated: attach afresh.
                        tracing::warn!(%error, pin = %pin.display(), "replacing a socket LB link that could not be updated");
                        remove_pin(pin)?;
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, pin = %pin.display(), "replacing a pin that is not a cgroup link");
                    remove_pin(pin)?;
                }
            }
        }
        // Links always allow other programs on the same hook (Cilium's, Calico's); the flags
        // of a link must be 0, which is what `Single` gives.
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_error)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(attach_error)?)
            .map_err(|e| attach_error(e.into()))?;
        link.pin(pin).map_err(|source| DataplaneError::PinnedLink {
            path: pin.to_owned(),
            source: Box::new(source),
        })?;
        Ok(())
    }

    /// The sockets socket LB sent to one of `targets`, by their reverse entries.
    pub fn sockets_to(
        &self,
        targets: &HashSet<SocketTarget>,
    ) -> Result<Vec<SockRevKey>, DataplaneError> {
        let map = SOCK_REVNAT_MAP;
        let revnat: HashMap<&MapData, SockRevKey, SockRevValue> = self.open(map)?;
        Ok(revnat
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let Some(proto) = Protocol::from_number(v.proto) else {
                    return false;
                };
                targets.contains(&SocketTarget {
                    frontend: FrontendId {
                        addr: Ipv4Addr::from(u32::from_be(v.addr_be)),
                        port: u16::from_be(v.port_be),
                        proto,
                    },
                    backend: (
                        Ipv4Addr::from(u32::from_be(k.addr_be)),
                        u16::from_be(k.port_be),
                    ),
                })
            })
            .map(|(k, _)| k)
            .collect())
    }

    /// Removes the reverse entries of sockets that are gone.
    pub fn forget_sockets(&mut self, keys: &[SockRevKey]) -> Result<(), DataplaneError> {
        for k in keys {
            self.remove::<SockRevKey, SockRevValue>(SOCK_REVNAT_MAP, k)?;
        }
        Ok(())
    }

    fn write_sock_config(
        &mut self,
        mode: u32,
        host_netns_cookie: u64,
    ) -> Result<(), DataplaneError> {
        let map = SOCK_CONFIG_MAP;
        let mut cfg: Array<_, SockConfig> = self.open_mut(map)?;
        let value = SockConfig {
            host_netns_cookie,
            mode,
            _pad: 0,
        };
        cfg.set(0, &value, 0).map_err(map_error(map, "write"))
    }
}

/// The inode of a cgroup directory (its id), which names the links attached to it.
fn cgroup_inode(path: &Path) -> Result<u64, DataplaneError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| DataplaneError::Cgroup {
            path: path.to_owned(),
            source,
        })
}

/// The network namespace cookie of the calling thread's namespace (`SO_NETNS_COOKIE`, Linux
/// 5.14); 0 where the kernel lacks it (the programs then take the initial namespace).
pub fn current_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret == 0 { cookie } else { 0 }
}

/// The host's cgroup v2 mount point, from `/proc/self/mountinfo` (often /sys/fs/cgroup; on
/// hybrid hierarchies /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&text)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "30 24 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      41 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      42 30 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"),
            None
        );
    }

    #[test]
    fn older_kernels_get_the_programs_that_do_not_set_the_error() {
        assert_eq!(socket_programs(true)[0], ("connect4", SOCK_CONNECT4));
        assert_eq!(socket_programs(false)[0], ("connect4", SOCK_CONNECT4_EPERM));
        assert_eq!(socket_programs(false)[1], ("sendmsg4", SOCK_SENDMSG4_EPERM));
    }
}
