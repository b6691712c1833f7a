//! The pinned control plane: which versions `./x setup` builds, and where the binaries are
//! cached (outside the repository; built once per version).
use std::path::PathBuf;

/// k8s.io/kubernetes, for kube-apiserver, kube-controller-manager and kubectl.
pub const KUBERNETES: &str = "v1.36.3";
/// The published staging modules (k8s.io/api, ...) of that release.
pub const KUBERNETES_STAGING: &str = "v0.36.3";
/// go.etcd.io/etcd/server/v3 (etcd >= 3.5: bookworm's 3.4 is too old for Kubernetes 1.36).
pub const ETCD: &str = "v3.6.8";
/// The Go both need at least (their go.mod says 1.26.0); setup fetches this one from the Go
/// module proxy when the machine's is missing or older.
pub const GO: &str = "1.26.8";

/// The binaries, in [`bin_dir`].
pub const BINARIES: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "etcd",
];

/// `$SLUICE_CACHE`, else `$XDG_CACHE_HOME/sluice`, else `~/.cache/sluice`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("sluice")
}

/// Where this version's binaries live: `<cache>/controlplane/k8s-<v>-etcd-<v>/bin`.
pub fn bin_dir() -> PathBuf {
    cache_dir()
        .join("controlplane")
        .join(format!("k8s-{KUBERNETES}-etcd-{ETCD}"))
        .join("bin")
}

/// The path of one of [`BINARIES`].
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}
