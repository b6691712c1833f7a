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
/// The SHA-256 of that Go's zip on the module proxy (`golang.org/toolchain@v0.0.1-go<GO>.linux-
/// <arch>`), per Go architecture; setup refuses a download that differs. Taken from zips that
/// `go mod download` had verified against sum.golang.org.
pub const GO_ZIP_SHA256: [(&str, &str); 2] = [
    (
        "amd64",
        "30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7",
    ),
    (
        "arm64",
        "02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99",
    ),
];
/// The longest a `go` command of the build may take before setup stops it (a cold build is
/// about 5 minutes on 2 cores; a stalled download must not hang setup).
pub const GO_STEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(45 * 60);

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
