//! Tests that need root either run, skip with a loud reason, or (in CI) fail.
//!
//! `SLUICE_REQUIRE_PRIVILEGED=1` turns every skip into a failure, so CI cannot pass by
//! skipping. A skip is also appended to the file named by `SLUICE_SKIP_LOG`, so that
//! `./x test` reports it as skipped rather than passed.

/// Whether this process may do what privileged tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    Available,
    Missing { reason: String },
}

/// The environment variable that makes a missing privilege a failure.
pub const REQUIRE_ENV: &str = "SLUICE_REQUIRE_PRIVILEGED";
/// The environment variable naming the file where skipped tests are recorded.
pub const SKIP_LOG_ENV: &str = "SLUICE_SKIP_LOG";

/// Checks for what privileged tests need: root (CAP_SYS_ADMIN + CAP_NET_ADMIN + CAP_BPF,
/// which in practice means euid 0 here) and `ip` (iproute2).
pub fn check() -> Privilege {
    if !nix::unistd::geteuid().is_root() {
        return Privilege::Missing {
            reason: "not running as root (needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN to \
                     create network namespaces and load eBPF programs)"
                .into(),
        };
    }
    // A look on PATH, not a run of `ip -V`: a spawn in a kernel VM under emulation, while
    // dozens of tests start at once, can outlast any sensible timeout, and a slow machine is
    // not a missing tool.
    if !crate::cmd::on_path("ip") {
        return Privilege::Missing {
            reason: "`ip` (iproute2) is not installed: run `./x setup`".into(),
        };
    }
    Privilege::Available
}

/// Decides for the test `test`: `true` means go on; `false` means the test was skipped (the
/// reason has been printed and logged). Panics instead of skipping when
/// `SLUICE_REQUIRE_PRIVILEGED=1`.
pub fn privileged(test: &str) -> bool {
    match check() {
        Privilege::Available => true,
        Privilege::Missing { reason } => {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{test}: {REQUIRE_ENV}=1 but this test cannot run: {reason}");
            }
            log_skip(test, &reason);
            false
        }
    }
}

/// Prints and records a skip, for `./x test` to count as skipped.
fn log_skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(path) = std::env::var(SKIP_LOG_ENV) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}\t{reason}");
        }
    }
}

/// For a test of a kernel facility: `false` (the test is skipped, and counted as skipped by
/// `./x test`, in CI too) when the running kernel lacks `facility`, as `has` says. Unlike a
/// missing privilege, this is no fault of the machine: the kernel matrix runs older kernels on
/// purpose, and a separate test proves what sluice does there instead.
pub fn kernel_has(test: &str, facility: &str, has: bool) -> bool {
    if !has {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        log_skip(
            test,
            &format!("this kernel ({}) lacks {facility}", release.trim()),
        );
    }
    has
}

/// At the top of a test that needs root: returns from the test (skipped) when it cannot run.
#[macro_export]
macro_rules! require_privileged {
    ($name:expr) => {
        if !$crate::privileged($name) {
            return;
        }
    };
}
