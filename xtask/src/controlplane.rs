//! Builds the real Kubernetes control plane the tests run (kube-apiserver,
//! kube-controller-manager, kubectl, etcd) from source, at the versions pinned in
//! `testbed::controlplane::versions`, with Go through the Go module proxy. No registry serves
//! these as binaries. Built once per version into a cache outside the repository; never
//! committed.
//!
//! k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with `./staging` paths,
//! so `go install` of it is refused. A wrapper module requires it and replaces each staging
//! module, listed from kubernetes' own go.mod, with its published `v0.X.Y`. etcd's main
//! module has the same shape; a wrapper calls `etcdmain.Main` from go.etcd.io/etcd/server/v3.
//!
//! Go: the machine's `go` if it is new enough, else the pinned toolchain fetched from the Go
//! module proxy (`golang.org/toolchain`, the zip `GOTOOLCHAIN` itself downloads) into the
//! cache, checked against its pinned SHA-256 before it is unpacked.
//!
//! Every `go` command runs with the module proxy only (no `direct` fallback to origin
//! repositories), sum.golang.org checking every module, and its module and build caches under
//! the cache directory, and is stopped after [`GO_STEP_LIMIT`].
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use testbed::controlplane::versions::{
    BINARIES, ETCD, GO, GO_STEP_LIMIT, GO_ZIP_SHA256, KUBERNETES, KUBERNETES_STAGING, bin_dir,
    cache_dir,
};

const PROXY: &str = "https://proxy.golang.org";

/// What the build did, for setup's report.
pub fn ensure_built() -> anyhow::Result<String> {
    let bin = bin_dir();
    if BINARIES.iter().all(|b| bin.join(b).is_file()) {
        return Ok(format!(
            "Kubernetes {KUBERNETES} and etcd {ETCD} there ({})",
            bin.display()
        ));
    }
    let t = Instant::now();
    let go = go_binary().context("no Go toolchain to build the control plane with")?;
    crate::setup::say(&format!(
        "building kube-apiserver, kube-controller-manager, kubectl ({KUBERNETES}) and etcd \
         ({ETCD}) with {} into {} (a cold build, modules included, takes 5 to 8 minutes on 2 cores)",
        go.display(),
        bin.display()
    ));
    let src = bin.parent().expect("bin has a parent").join("src");
    let k8s = src.join("kubernetes");
    let etcd = src.join("etcd");
    std::fs::create_dir_all(&k8s).context("creating the build directory")?;
    std::fs::create_dir_all(&etcd).context("creating the build directory")?;
    write_kubernetes_wrapper(&k8s)?;
    write_etcd_wrapper(&etcd)?;
    let tmp = bin.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).context("creating the output directory")?;
    for (dir, what, packages) in [
        (
            &k8s,
            "Kubernetes",
            vec![
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "k8s.io/kubernetes/cmd/kubectl",
            ],
        ),
        (&etcd, "etcd", vec!["."]),
    ] {
        let step = Instant::now();
        go_run(&go, dir, &["mod", "tidy"], what)?;
        let out = if packages == ["."] {
            tmp.join("etcd").display().to_string()
        } else {
            format!("{}/", tmp.display())
        };
        let mut args = vec!["build", "-trimpath", "-o", out.as_str()];
        args.extend(packages.iter().copied());
        go_run(&go, dir, &args, what)?;
        crate::setup::say(&format!(
            "  {what} built in {:.0} s",
            step.elapsed().as_secs_f64()
        ));
    }
    for b in BINARIES {
        ensure!(tmp.join(b).is_file(), "the build left no {b}");
    }
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::rename(&tmp, &bin).context("moving the binaries into place")?;
    let peak = peak_child_rss_mib();
    Ok(format!(
        "built in {:.0} s (the largest resident size of any process setup waited for: {peak} \
         MiB) into {}",
        t.elapsed().as_secs_f64(),
        bin.display()
    ))
}

/// Runs `go ARGS` in `dir` with the module proxy and cache settings of the build.
fn go_run(go: &Path, dir: &Path, args: &[&str], what: &str) -> anyhow::Result<()> {
    let mut argv = vec![go.to_str().context("non-UTF-8 Go path")?];
    argv.extend_from_slice(args);
    let go_cache = cache_dir().join("go");
    let mut child = testbed::cmd::command(&argv)?
        .current_dir(dir)
        // The wrapper modules are ours: -mod=mod lets `go mod tidy` and the build record
        // what they need; never use the machine's vendor or workspace settings.
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOWORK", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        // The module proxy only, every module checked against the checksum database.
        .env("GOPROXY", PROXY)
        .env("GOSUMDB", "sum.golang.org")
        .env_remove("GONOSUMDB")
        .env_remove("GONOSUMCHECK")
        .env_remove("GOPRIVATE")
        .env_remove("GONOPROXY")
        .env_remove("GOINSECURE")
        // Its caches beside the binaries, not in the user's ~/go.
        .env("GOMODCACHE", go_cache.join("mod"))
        .env("GOCACHE", go_cache.join("build"))
        .env("GOPATH", go_cache.join("path"))
        .spawn()
        .with_context(|| format!("starting go {}", args.join(" ")))?;
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().context("waiting for go")? {
            break st;
        }
        if start.elapsed() > GO_STEP_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`go {}` for {what} did not finish within {GO_STEP_LIMIT:?}; stopped. Is the Go \
                 module proxy ({PROXY}) slow or stalled? Run `./x setup` again; what was \
                 downloaded is kept",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !st.success() {
        bail!(
            "`go {}` for {what} failed ({st}) in {}: is the Go module proxy ({PROXY}) \
             reachable? Run `./x setup` again once it is; what was downloaded is kept",
            args.join(" "),
            dir.display()
        );
    }
    Ok(())
}

/// The Go to build with: the machine's if at least [`GO`], else the pinned one from the
/// module proxy, cached.
fn go_binary() -> anyhow::Result<PathBuf> {
    if let Some(v) = testbed::cmd::output(&["go", "env", "GOVERSION"], Duration::from_secs(30))
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        && version_at_least(v.trim_start_matches("go"), GO)
    {
        return Ok(PathBuf::from("go"));
    }
    let root = cache_dir().join(format!("go{GO}"));
    let go = root.join("bin/go");
    if go.is_file() {
        return Ok(go);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no Go toolchain for {other}: install Go {GO} or newer"),
    };
    let Some((_, want)) = GO_ZIP_SHA256.iter().find(|(a, _)| *a == arch) else {
        bail!("no pinned checksum of Go {GO} for {arch}: install Go {GO} or newer");
    };
    let version = format!("v0.0.1-go{GO}.linux-{arch}");
    let url = format!("{PROXY}/golang.org/toolchain/@v/{version}.zip");
    crate::setup::say(&format!("fetching Go {GO} from the module proxy: {url}"));
    let zip = cache_dir().join(format!("go{GO}.zip"));
    std::fs::create_dir_all(cache_dir()).context("creating the cache")?;
    let zip_s = zip.to_str().context("non-UTF-8 cache path")?;
    testbed::cmd::run_timeout(
        &["curl", "-sSf", "--retry", "3", "-o", zip_s, &url],
        Duration::from_secs(600),
    )
    .with_context(|| format!("downloading {url}: is the Go module proxy reachable?"))?;
    let got = sha256_hex(&zip)?;
    if got != *want {
        let _ = std::fs::remove_file(&zip);
        bail!("{url} has SHA-256 {got}, not the pinned {want}: refused");
    }
    // The zip holds golang.org/toolchain@<version>/{bin,pkg,src,...}.
    let staging = cache_dir().join(format!("go{GO}.unzip"));
    let _ = std::fs::remove_dir_all(&staging);
    let staging_s = staging.to_str().context("non-UTF-8 cache path")?;
    testbed::cmd::run_timeout(
        &[
            "python3",
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
            zip_s,
            staging_s,
        ],
        Duration::from_secs(600),
    )
    .context("unpacking the Go toolchain")?;
    let inner = staging.join(format!("golang.org/toolchain@{version}"));
    // zipfile does not keep the executable bits.
    for dir in ["bin", "pkg/tool"] {
        make_executable(&inner.join(dir))?;
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&inner, &root).context("moving the Go toolchain into place")?;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&zip);
    ensure!(go.is_file(), "the Go toolchain has no bin/go");
    Ok(go)
}

fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn make_executable(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            make_executable(&p)?;
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// Whether dotted version `v` is at least `min` (`1.26.8` >= `1.26.0`).
fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> {
        s.split(['.', '-', ' '])
            .map_while(|p| p.parse().ok())
            .collect()
    };
    parse(v) >= parse(min)
}

/// The wrapper module for kube-apiserver, kube-controller-manager and kubectl: it requires
/// k8s.io/kubernetes and replaces each staging module by its published version, as listed in
/// kubernetes' own go.mod (fetched from the module proxy).
fn write_kubernetes_wrapper(dir: &Path) -> anyhow::Result<()> {
    let url = format!("{PROXY}/k8s.io/kubernetes/@v/{KUBERNETES}.mod");
    let upstream = testbed::cmd::run_timeout(
        &["curl", "-sSf", "--retry", "3", &url],
        Duration::from_secs(120),
    )
    .with_context(|| format!("fetching {url}: is the Go module proxy reachable?"))?;
    let staging = staging_modules(&upstream);
    ensure!(
        staging.len() > 10,
        "{url} lists only {} staging replacements",
        staging.len()
    );
    let go = upstream
        .lines()
        .find_map(|l| l.strip_prefix("go "))
        .unwrap_or(GO)
        .trim();
    let mut m = format!(
        "// Generated by `./x setup` (xtask/src/controlplane.rs); not part of sluice.\nmodule sluice.local/controlplane\n\ngo {go}\n\nrequire k8s.io/kubernetes {KUBERNETES}\n\nreplace (\n"
    );
    for s in &staging {
        m.push_str(&format!("\t{s} => {s} {KUBERNETES_STAGING}\n"));
    }
    m.push_str(")\n");
    std::fs::write(dir.join("go.mod"), m).context("writing the wrapper go.mod")?;
    std::fs::write(
        dir.join("tools.go"),
        "//go:build tools\n\npackage tools\n\nimport (\n\t_ \"k8s.io/kubernetes/cmd/kube-apiserver\"\n\t_ \"k8s.io/kubernetes/cmd/kube-controller-manager\"\n\t_ \"k8s.io/kubernetes/cmd/kubectl\"\n)\n",
    )
    .context("writing tools.go")
}

/// The modules kubernetes' go.mod replaces with `./staging/...` paths.
fn staging_modules(go_mod: &str) -> Vec<String> {
    go_mod
        .lines()
        .filter_map(|l| {
            let (module, target) = l.trim().split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

fn write_etcd_wrapper(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("go.mod"),
        format!(
            "// Generated by `./x setup` (xtask/src/controlplane.rs); not part of sluice.\nmodule sluice.local/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD}\n"
        ),
    )
    .context("writing the etcd wrapper go.mod")?;
    std::fs::write(
        dir.join("main.go"),
        "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n",
    )
    .context("writing the etcd wrapper main.go")
}

/// The largest resident size any waited-for child reached, in MiB.
fn peak_child_rss_mib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_or(0, |u| u.max_rss() / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_replacements_are_read_from_kubernetes_go_mod() {
        let m = "module k8s.io/kubernetes\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.2.3\n)\n";
        assert_eq!(staging_modules(m), ["k8s.io/api", "k8s.io/client-go"]);
    }

    #[test]
    fn go_versions_compare_by_number() {
        assert!(version_at_least("1.26.8", "1.26.8"));
        assert!(version_at_least("1.27.0", "1.26.8"));
        assert!(version_at_least("1.26.10", "1.26.8"));
        assert!(!version_at_least("1.26.7", "1.26.8"));
        assert!(!version_at_least("1.19.8", "1.26.8"));
    }
}
