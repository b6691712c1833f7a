//! The dataplane: the eBPF object embedded in this binary, its programs and its maps.
//!
//! Programs attach at TC with TCX on kernels that have it (6.6+) and through a `clsact` qdisc
//! and a netlink filter otherwise, so the same binary runs from 5.10 on.
use std::ffi::CString;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{TcAttach, TcError, qdisc_add_clsact},
    },
    util::KernelVersion,
};
use proxy_common::{CTR_MAX, Counter, PKT_COUNTERS_MAP};

/// The eBPF object built by build.rs (aya-build) from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// The program that counts every packet on its device and passes it unchanged.
pub const COUNT_PROGRAM: &str = "sluice_count";

/// Every program in the object; [`Dataplane::load`] loads them all, so the verifier checks
/// each one at start-up rather than at first attach.
pub const PROGRAMS: &[&str] = &[COUNT_PROGRAM];

/// What can go wrong in the dataplane; each message says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the eBPF object failed (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN, \
         and Linux >= 5.10): {source}"
    )]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error(
        "program {program} is not in the eBPF object: the binary and proxy-ebpf are out of step"
    )]
    MissingProgram { program: &'static str },
    #[error("map {map} is not in the eBPF object: the binary and proxy-ebpf are out of step")]
    MissingMap { map: &'static str },
    #[error("program {program} failed to load; the verifier said:\n{source}")]
    Verifier {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("interface name {interface:?} contains a NUL byte")]
    BadInterface { interface: String },
    #[error(
        "adding the clsact qdisc to {interface} failed (is it up, and do we have CAP_NET_ADMIN?): {source}"
    )]
    Clsact {
        interface: String,
        #[source]
        source: TcError,
    },
    #[error("attaching {program} at {hook:?} of {interface} ({mode}) failed: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        hook: TcAttachType,
        mode: AttachMode,
        #[source]
        source: ProgramError,
    },
    #[error("reading map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// How a program is attached to a TC hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel >= 6.6): no qdisc, ordered with other programs, gone with the link.
    Tcx,
    /// A `clsact` qdisc and a direct-action netlink filter (kernels 5.10 to 6.5).
    Clsact,
}

impl AttachMode {
    /// The best mode this kernel supports.
    pub fn for_running_kernel() -> Self {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Clsact,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        })
    }
}

/// The loaded eBPF object. Dropping it detaches its programs and unloads what is not pinned.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the embedded object and every program in it (the verifier runs here).
    pub fn load() -> Result<Self, DataplaneError> {
        raise_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source })?;
        for &program in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or(DataplaneError::MissingProgram { program })?;
            prog.load()
                .map_err(|source| DataplaneError::Verifier { program, source })?;
        }
        Ok(Self { ebpf })
    }

    /// The loaded program `name`, for attaching it or running it through BPF_PROG_TEST_RUN.
    pub fn program(&self, program: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .program(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { program })
    }

    /// Attaches `program` at `hook` of `interface`, in the calling thread's network namespace.
    /// The attachment lives as long as this `Dataplane`.
    pub fn attach(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: TcAttachType,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        let name = CString::new(interface).map_err(|_| DataplaneError::BadInterface {
            interface: interface.to_owned(),
        })?;
        if mode == AttachMode::Clsact {
            match qdisc_add_clsact(&name) {
                Ok(()) => {}
                // Another program (or an earlier run) already added it: that is fine.
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(DataplaneError::Clsact {
                        interface: interface.to_owned(),
                        source,
                    });
                }
            }
        }
        let attach = match mode {
            AttachMode::Tcx => TcAttach::Tcx {
                attach_type: hook,
                order: Default::default(),
            },
            AttachMode::Clsact => TcAttach::Netlink {
                parent: hook.into(),
                options: Default::default(),
            },
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { program })?;
        prog.attach(&name, attach)
            .map_err(|source| DataplaneError::Attach {
                program,
                interface: interface.to_owned(),
                hook,
                mode,
                source,
            })?;
        Ok(())
    }

    /// The packet counters, summed over every CPU, indexed by `proxy_common::CTR_*`.
    pub fn counters(&self) -> Result<[Counter; CTR_MAX as usize], DataplaneError> {
        let map = PKT_COUNTERS_MAP;
        let counters: PerCpuArray<_, Counter> = self
            .ebpf
            .map(map)
            .ok_or(DataplaneError::MissingMap { map })
            .and_then(|m| {
                PerCpuArray::try_from(m).map_err(|source| DataplaneError::Map { map, source })
            })?;
        let mut out = [Counter::default(); CTR_MAX as usize];
        for (index, total) in (0..CTR_MAX).zip(out.iter_mut()) {
            let per_cpu = counters
                .get(&index, 0)
                .map_err(|source| DataplaneError::Map { map, source })?;
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        Ok(out)
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones charge the cgroup and
/// may refuse the call (EPERM in some containers), which is then harmless.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; kernels >= 5.11 do not need it"
        );
    }
}
