//! The kernel facilities sluice uses beyond its 5.10 floor, found by asking the running
//! kernel where it can be asked (a probe program, a query, a socket option) and by its version
//! only where nothing can be asked; and what sluice does with or without each. `sluice
//! features` prints this report and the agent logs it at start, so an operator can check a
//! node before rolling out. ARCHITECTURE.md's kernel table is the same list.
use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};
use serde::Serialize;

use super::{AttachMode, kernel_release};

/// How a facility's presence was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Found {
    /// Asked of the kernel (a program loaded, a query, a socket option).
    Probe,
    /// Read off the kernel's version: nothing can ask without side effects.
    Version,
}

/// One facility of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Facility {
    /// A short stable name, for scripts.
    pub name: &'static str,
    /// The first Linux version that has it.
    pub since: &'static str,
    pub present: bool,
    pub found: Found,
    /// What sluice does on this kernel as a result.
    pub sluice: &'static str,
}

/// The report for the running kernel.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `uname -r`.
    pub kernel: String,
    pub facilities: Vec<Facility>,
    /// The XDP choice per uplink of the agent whose pins `sluice features` read: `None` when
    /// no agent has pinned anything there (or the report did not look), empty when every
    /// uplink is left to TC.
    pub xdp_uplinks: Option<Vec<super::PinnedUplink>>,
    /// Where those pins were looked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_path: Option<std::path::PathBuf>,
}

/// [`Facility::name`] of TCX links (6.6).
pub const TCX: &str = "tcx";
/// [`Facility::name`] of `bpf_set_retval` in cgroup programs (5.18).
pub const SET_RETVAL: &str = "bpf_set_retval";

impl Report {
    /// The facility called `name`.
    pub fn get(&self, name: &str) -> Option<&Facility> {
        self.facilities.iter().find(|f| f.name == name)
    }

    /// Whether this kernel has the facility called `name` (false for a name not reported).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some_and(|f| f.present)
    }
}

/// Whether cgroup socket programs may set the syscall's error (`bpf_set_retval`, 5.18):
/// a probe program that calls it, loaded as a cgroup sock_addr program.
pub fn has_set_retval() -> bool {
    helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
}

fn helper(program_type: ProgramType, helper: BpfHelper) -> bool {
    is_helper_supported(program_type, helper).unwrap_or(false)
}

/// Whether the programs may read `bpf_ktime_get_coarse_ns` (5.11+); the loader sets
/// `proxy_common::COARSE_CLOCK_GLOBAL` from it.
pub fn coarse_clock() -> bool {
    helper(
        ProgramType::SchedClassifier,
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
    )
}

/// The running kernel's (major, minor), 0.0 when unreadable.
fn version() -> (u32, u32) {
    let release = kernel_release();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Asks the running kernel.
pub fn probe() -> Report {
    let v = version();
    let tcx = AttachMode::tcx_supported();
    let retval = has_set_retval();
    let coarse = coarse_clock();
    let cookie = super::socket::current_netns_cookie() != 0;
    let route_mtu = v >= (5, 12);
    let atomics = v >= (5, 12);
    let facilities = vec![
        Facility {
            name: TCX,
            since: "6.6",
            present: tcx,
            found: Found::Probe,
            sluice: if tcx {
                "attach mode auto: TCX links, ordered with other programs"
            } else {
                "attach mode auto: a clsact qdisc and filters; --attach-mode tcx is refused"
            },
        },
        Facility {
            name: SET_RETVAL,
            since: "5.18",
            present: retval,
            found: Found::Probe,
            sluice: if retval {
                "socket LB refuses a connect to a Service without endpoints with ECONNREFUSED"
            } else {
                "socket LB loads its _eperm programs: such a connect fails with EPERM"
            },
        },
        Facility {
            name: "so_netns_cookie",
            since: "5.14",
            present: cookie,
            found: Found::Probe,
            sluice: if cookie {
                "--socket-lb host-only tells the node's namespace by its cookie"
            } else {
                "--socket-lb host-only takes the initial namespace for the node's"
            },
        },
        Facility {
            name: "bpf_ktime_get_coarse_ns",
            since: "5.11",
            present: coarse,
            found: Found::Probe,
            sluice: if coarse {
                "the programs' clock (conntrack, affinity): a tick coarse, about 20 ns cheaper"
            } else {
                "the programs read the precise clock"
            },
        },
        Facility {
            name: "bpf_atomic_fetch_ops",
            since: "5.12",
            present: atomics,
            found: Found::Version,
            sluice: "not used: conntrack flags have a byte each, set only to 1",
        },
        Facility {
            name: "fib_lookup_route_mtu",
            since: "5.12",
            present: route_mtu,
            found: Found::Version,
            sluice: if route_mtu {
                "fragmentation needed reports the route's MTU"
            } else {
                "fragmentation needed reports 1280"
            },
        },
    ];
    Report {
        kernel: kernel_release(),
        facilities,
        xdp_uplinks: None,
        pin_path: None,
    }
}

/// [`probe`], with the XDP choice per uplink of the agent that pinned under `pin_path` (its
/// `--pin-path`), as seen from the calling thread's network namespace.
pub fn probe_node(pin_path: &std::path::Path) -> Report {
    Report {
        xdp_uplinks: super::pinned_uplinks(pin_path),
        pin_path: Some(pin_path.to_owned()),
        ..probe()
    }
}

impl std::fmt::Display for Report {
    /// A table: facility, since, here, how found, what sluice does.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        writeln!(
            f,
            "{:<24} {:<6} {:<4} {:<8} sluice",
            "FACILITY", "SINCE", "HERE", "FOUND BY"
        )?;
        for x in &self.facilities {
            writeln!(
                f,
                "{:<24} {:<6} {:<4} {:<8} {}",
                x.name,
                x.since,
                if x.present { "yes" } else { "no" },
                match x.found {
                    Found::Probe => "probe",
                    Found::Version => "version",
                },
                x.sluice
            )?;
        }
        let Some(pins) = &self.pin_path else {
            return Ok(());
        };
        let pins = pins.display();
        match &self.xdp_uplinks {
            None => writeln!(f, "\nXDP on the uplinks: no agent's pins under {pins}"),
            Some(u) if u.is_empty() => writeln!(
                f,
                "\nXDP on the uplinks (pins under {pins}): none, every uplink is left to TC"
            ),
            Some(uplinks) => {
                writeln!(f, "\nXDP on the uplinks (pins under {pins}):")?;
                writeln!(f, "{:<16} {:<8} {:<8} DRIVER", "DEVICE", "MODE", "XDP_TX")?;
                for u in uplinks {
                    writeln!(
                        f,
                        "{:<16} {:<8} {:<8} {}",
                        u.device,
                        u.mode,
                        u.tx.unwrap_or("off"),
                        u.driver.as_deref().unwrap_or("(not in this namespace)")
                    )?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::PinnedUplink;

    fn report(uplinks: Option<Vec<PinnedUplink>>) -> String {
        Report {
            kernel: "6.1.0".into(),
            facilities: Vec::new(),
            xdp_uplinks: uplinks,
            pin_path: Some("/sys/fs/bpf/sluice".into()),
        }
        .to_string()
    }

    #[test]
    fn the_table_shows_each_uplinks_xdp_choice_or_says_why_there_is_none() {
        let uplink = |device: &str, mode, tx, driver: Option<&str>| PinnedUplink {
            device: device.into(),
            mode,
            tx,
            driver: driver.map(Into::into),
        };
        let t = report(Some(vec![
            uplink("eth0", "native", Some("native"), Some("mlx5_core")),
            uplink("eth1", "generic", None, None),
        ]));
        let rows: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("DEVICE")).collect();
        assert_eq!(
            rows,
            [
                "DEVICE           MODE     XDP_TX   DRIVER",
                "eth0             native   native   mlx5_core",
                "eth1             generic  off      (not in this namespace)",
            ],
            "{t}"
        );
        assert!(t.contains("\nXDP on the uplinks (pins under /sys/fs/bpf/sluice):\n"));
        assert!(
            report(Some(Vec::new())).ends_with(
                "\nXDP on the uplinks (pins under /sys/fs/bpf/sluice): none, every uplink is left to TC\n"
            )
        );
        assert!(
            report(None)
                .ends_with("\nXDP on the uplinks: no agent's pins under /sys/fs/bpf/sluice\n")
        );
    }
}
