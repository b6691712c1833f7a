//! Where the kernel matrix's pieces live (`./x test --kernel`): the Debian kernels it boots
//! and the virtualenv of virtme-ng, which boots them. Both are fetched by `./x setup` into the
//! cache beside the control plane, outside the repository, and kept across runs.
use std::path::PathBuf;

use crate::{
    controlplane::versions::cache_dir,
    tools::{self, Provider},
};

/// One kernel of the matrix: Debian's current image of a release line, from the suites that
/// carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// What `--kernel` takes and what test names carry: `5.10`, `6.1`, `6.12`.
    pub name: &'static str,
    /// `deb` lines' (archive, suite): the image is what `linux-image-amd64` depends on there.
    pub suites: &'static [(&'static str, &'static str)],
}

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

/// The matrix, oldest first: the oldest kernel sluice supports (bullseye's 5.10), bookworm's
/// 6.1, and bookworm-backports' 6.12 (the newest Debian 12 ships; TCX, 6.6, is in it).
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        suites: &[(DEBIAN, "bullseye"), (SECURITY, "bullseye-security")],
    },
    Kernel {
        name: "6.1",
        suites: &[(DEBIAN, "bookworm"), (SECURITY, "bookworm-security")],
    },
    Kernel {
        name: "6.12",
        suites: &[(DEBIAN, "bookworm-backports")],
    },
];

/// The kernel of the matrix called `name`.
pub fn kernel(name: &str) -> Option<Kernel> {
    KERNELS.iter().copied().find(|k| k.name == name)
}

/// Where kernel `name` is unpacked: `<cache>/kernels/<name>`, holding the package's tree and
/// `release` (its `uname -r`) once complete.
pub fn kernel_dir(name: &str) -> PathBuf {
    cache_dir().join("kernels").join(name)
}

/// The virtualenv of the `pip:` rows of tools.txt: `<cache>/vm/venv-<name>-<version>` of the
/// row that provides `cmd`.
pub fn venv_dir(cmd: &str) -> Option<PathBuf> {
    match tools::find(cmd)?.provider {
        Provider::Pip(spec) => Some(
            cache_dir()
                .join("vm")
                .join(format!("venv-{}", spec.replace("==", "-"))),
        ),
        _ => None,
    }
}

/// The path of `cmd`, a command of a `pip:` row, in its virtualenv.
pub fn venv_bin(cmd: &str) -> Option<PathBuf> {
    Some(venv_dir(cmd)?.join("bin").join(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vng_comes_from_a_versioned_virtualenv_and_every_kernel_has_a_suite() {
        let bin = venv_bin("vng").expect("vng is a pip: row");
        assert!(
            bin.ends_with("vm/venv-virtme-ng-1.42/bin/vng"),
            "{}",
            bin.display()
        );
        assert_eq!(venv_bin("ip"), None, "ip is no pip: row");
        for k in KERNELS {
            assert!(!k.suites.is_empty(), "{}", k.name);
            assert_eq!(kernel(k.name), Some(k));
        }
        assert_eq!(kernel("4.19"), None);
    }
}
