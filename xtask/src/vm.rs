//! The kernel matrix: `./x test --kernel 5.10|6.1|6.12|all [--full]`.
//!
//! Setup fetches what it needs into the cache (`testbed::vm` says where): virtme-ng in a
//! virtualenv, and each Debian kernel package, unpacked, its modules indexed. The runner boots
//! each kernel under virtme-ng with software emulation (no KVM here), the host's `/` shared
//! read-only, so the test binaries built on the host run unchanged in the guest; it runs the
//! kernel-sensitive tiers there and reads their results back into the one `summary:` line,
//! each test named with its kernel.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::vm::{Kernel, kernel_dir, venv_bin, venv_dir};

use crate::setup::say;

/// virtme-ng, from its `pip:` row in tools.txt, in its own virtualenv.
pub fn ensure_virtme() -> anyhow::Result<String> {
    let vng = venv_bin("vng").context("tools.txt has no pip: row for vng")?;
    if vng.is_file() {
        return Ok(format!("there ({})", vng.display()));
    }
    let Some(testbed::tools::Provider::Pip(spec)) = testbed::tools::find("vng").map(|t| t.provider)
    else {
        bail!("tools.txt's vng row is not a pip: row");
    };
    let venv = venv_dir("vng").expect("a pip: row");
    let _ = std::fs::remove_dir_all(&venv);
    say(&format!(
        "installing {spec} from PyPI into {}",
        venv.display()
    ));
    let venv_s = venv.to_string_lossy().into_owned();
    let st = testbed::cmd::command(&["python3", "-m", "venv", &venv_s])?
        .status()
        .context("starting python3 -m venv")?;
    if !st.success() {
        bail!("`python3 -m venv {venv_s}` failed ({st}): is python3-venv installed?");
    }
    let pip = venv.join("bin/pip");
    let mut install = testbed::cmd::command(&[pip.as_os_str()])?;
    install.args(["install", "-q", "--disable-pip-version-check", spec]);
    // pip trusts its own bundle of CA roots, not the machine's: a network that needs its own
    // root (added to the system's, as cargo, curl and go use) would fail it.
    let system_roots = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if std::env::var_os("PIP_CERT").is_none() && system_roots.is_file() {
        install.env("PIP_CERT", system_roots);
    }
    let st = install.status().context("starting pip")?;
    if !st.success() {
        let _ = std::fs::remove_dir_all(&venv);
        bail!(
            "`pip install {spec}` failed ({st}): PyPI may be unreachable. Run `./x setup` again once it answers"
        );
    }
    Ok(format!("{spec} installed"))
}

/// Debian's current image of kernel `k`, unpacked into the cache with its modules indexed.
/// Kept until its directory is removed: a warm run needs no network.
pub fn ensure_kernel(k: Kernel) -> anyhow::Result<String> {
    let dir = kernel_dir(k.name);
    if let Ok(release) = std::fs::read_to_string(dir.join("release")) {
        return Ok(format!("there ({})", release.trim()));
    }
    let work = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&work);
    let apt = work.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(d)).context("creating the kernel's apt directories")?;
    }
    let sources: String = k
        .suites
        .iter()
        .map(|(archive, suite)| format!("deb {archive} {suite} main\n"))
        .collect();
    std::fs::write(apt.join("sources.list"), sources)?;
    // A private configuration: the machine's own sources, lists and cache are not touched.
    let opts: Vec<String> = [
        ("Dir::Etc::SourceList", apt.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", apt.join("lists")),
        ("Dir::Cache", apt.join("cache")),
    ]
    .iter()
    .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={}", v.display())])
    .collect();
    let suites: Vec<&str> = k.suites.iter().map(|s| s.1).collect();
    let apt_cmd = |argv: &[&str]| -> anyhow::Result<std::process::Output> {
        let mut c = testbed::cmd::command(argv)?;
        c.args(&opts).current_dir(&work);
        let out = c
            .output()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{}` for {} failed ({}): {}",
                argv.join(" "),
                suites.join(", "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    };
    apt_cmd(&["apt-get", "update", "-q"])?;
    let deps = apt_cmd(&["apt-cache", "depends", "linux-image-amd64"])?;
    let deps = String::from_utf8_lossy(&deps.stdout);
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| {
            format!(
                "linux-image-amd64 of {} depends on no image: {deps}",
                suites.join(", ")
            )
        })?
        .to_owned();
    say(&format!(
        "  kernel {}: downloading {pkg} from {}",
        k.name,
        suites.join(", ")
    ));
    apt_cmd(&["apt-get", "download", "-q", &pkg])?;
    let deb = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let tree = work.join("tree");
    testbed::cmd::run_timeout(
        &[
            "dpkg-deb",
            "-x",
            &deb.to_string_lossy(),
            &tree.to_string_lossy(),
        ],
        Duration::from_secs(300),
    )
    .context("unpacking the kernel package")?;
    let release = std::fs::read_dir(tree.join("lib/modules"))
        .context("the kernel package has no lib/modules")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package's lib/modules is empty")?;
    anyhow::ensure!(
        tree.join(format!("boot/vmlinuz-{release}")).is_file(),
        "the kernel package has no boot/vmlinuz-{release}"
    );
    // dpkg-deb does not run the package's depmod: modprobe in the guest needs its index.
    testbed::cmd::run_timeout(
        &["depmod", "-b", &tree.to_string_lossy(), &release],
        Duration::from_secs(300),
    )
    .context("indexing the kernel's modules")?;
    std::fs::remove_file(&deb)?;
    std::fs::remove_dir_all(&apt)?;
    std::fs::write(work.join("release"), format!("{release}\n"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&work, &dir).context("moving the kernel into place")?;
    Ok(format!("{pkg} ({release}) installed"))
}

/// A test binary and the tests of it to run in a guest (libtest name filters; none: all;
/// and names to skip).
#[derive(Debug, Clone, Copy)]
struct Run {
    bin: &'static str,
    filters: &'static [&'static str],
    skips: &'static [&'static str],
}

impl Run {
    /// Every test of `bin`.
    const fn all(bin: &'static str) -> Self {
        Self {
            bin,
            filters: &[],
            skips: &[],
        }
    }

    /// The tests of `bin` whose names contain one of `filters`.
    const fn only(bin: &'static str, filters: &'static [&'static str]) -> Self {
        Self {
            bin,
            filters,
            skips: &[],
        }
    }

    /// The tests of `bin` whose names contain none of `skips`.
    const fn except(bin: &'static str, skips: &'static [&'static str]) -> Self {
        Self {
            bin,
            filters: &[],
            skips,
        }
    }
}

/// The pinning tests of a map size changed across a restart (`dataplane/resize.rs`): run on the
/// host only. What they use (bpffs renames, `BPF_NOEXIST`/`BPF_EXIST` updates, LRU maps) is
/// older than 5.10 and unchanged since, and in the guests they cost minutes of the matrix, the
/// longest part of CI.
const RESIZE_TESTS: &[&str] = &["map_size", "resize", "shrinking"];

/// On every kernel: the kernel facilities report, the programs through BPF_PROG_TEST_RUN,
/// pinning and adoption (map resizes on the host only), attaching in both modes beside another program, and a Service end to
/// end in the sandbox (TCP spread over backends, the clsact attachment translating and
/// detaching, and SCTP, which this machine's kernel lacks, with its checksums).
const QUICK: &[Run] = &[
    Run::all("features"),
    Run::all("packets"),
    Run::except("pinning", RESIZE_TESTS),
    Run::all("chaining"),
    Run::only(
        "sandbox",
        &[
            "three_hundred_connections_to_a_cluster_ip",
            "the_clsact_attachment_of_older_kernels",
            "sctp_reaches_backends",
        ],
    ),
];

/// On the oldest kernel, besides [`QUICK`]: the features of this wave where 5.10 lacks what
/// newer kernels have (no TCX, no `bpf_set_retval`, no `SO_NETNS_COOKIE`), chosen to fit about
/// 10 minutes of guest time: from the three-node cluster, every path under strict rp_filter
/// (pods across nodes, routed and bridged, TCP, UDP and ICMP errors; NodePort from outside to
/// a local backend and, SNATed and redirected, to a remote one); socket-level
/// load balancing for node processes, its refusal without endpoints (EPERM before 5.18), and
/// connected UDP moved off a removed backend (netlink SOCK_DESTROY); the agent killed under
/// load and succeeded (clsact), and TCX asked for and refused.
const OLDEST: &[Run] = &[
    Run::only(
        "cluster",
        &["every_path_works_with_strict_reverse_path_filtering"],
    ),
    Run::only(
        "socketlb",
        &[
            "a_node_process_reaches_cluster_ip_node_port_and_external_ip_over_tcp_and_udp",
            "a_service_without_endpoints_is_refused_at_connect",
            "a_connected_udp_client_is_answered_by_a_live_backend_within_1s_of_its_backends_removal",
        ],
    ),
    Run::only(
        "agent",
        &["a_killed_agent", "an_attach_mode_the_kernel_lacks"],
    ),
];

/// With `--full`: every kernel-sensitive tier, whole, on every kernel.
const FULL: &[&str] = &[
    "features",
    "packets",
    "pinning",
    "chaining",
    "fuzz",
    "feaddrs",
    "sandbox",
    "forwarding",
    "cluster",
    "socketlb",
    "podclients",
    "races",
    "agent",
];

/// What to run on kernel `k`: [`FULL`] when asked for, else [`QUICK`], and [`OLDEST`] too on
/// the oldest kernel of the matrix.
fn runs_for(k: Kernel, full: bool) -> Vec<Run> {
    if full {
        return FULL.iter().map(|b| Run::all(b)).collect();
    }
    let mut runs = QUICK.to_vec();
    if k.name == testbed::vm::KERNELS[0].name {
        runs.extend_from_slice(OLDEST);
    }
    runs
}

/// Bounds, generous for software emulation on two cores: a test binary, and booting.
const BINARY_LIMIT: Duration = Duration::from_secs(1500);
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The marker lines of the guest script, which the host reads to tell a binary that ended from
/// one that never did.
const BEGIN: &str = "sluice-vm: begin ";
const END: &str = "sluice-vm: end ";

/// What one kernel's guest reported, for the summary.
#[derive(Debug, Default)]
pub struct Outcome {
    pub totals: crate::test::Totals,
    /// Skipped tests, named with the kernel.
    pub skips: Vec<String>,
    /// Failures that no test result line counted (a binary that crashed, timed out or never
    /// ran; a guest that did not boot), named with the kernel.
    pub broken: Vec<String>,
    /// What the guest printed, each line prefixed with the kernel (also in
    /// `target/vm/<kernel>/console.log` as it comes).
    pub console: Vec<String>,
}

/// sluice's integration test binaries: name -> (executable, package directory).
pub type Binaries = std::collections::BTreeMap<String, (PathBuf, PathBuf)>;

/// Builds the workspace's tests (as the host's `cargo test` would, so that it then builds
/// nothing) and lists sluice's integration test binaries.
pub fn test_binaries() -> anyhow::Result<Binaries> {
    let out = testbed::cmd::command(&["cargo"])?
        .current_dir(crate::workspace_root())
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(name), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let pkg = Path::new(manifest).parent().unwrap_or(Path::new("/"));
        // The integration tests of sluice's own crate (testbed has binaries of the same names).
        if msg["target"]["kind"][0] != "test" || !pkg.ends_with("proxy-userspace") {
            continue;
        }
        bins.insert(name.to_owned(), (PathBuf::from(exe), pkg.to_path_buf()));
    }
    Ok(bins)
}

/// The guest's script: the kernel facilities the tests need, then each binary in turn,
/// bracketed by the markers, its output on the console.
fn guest_script(runs: &[Run], bins: &Binaries, out: &Path) -> anyhow::Result<String> {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by `./x test --kernel`; run in the guest by virtme-ng.\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         ulimit -l unlimited\n\
         for m in veth sch_ingress cls_bpf tun sctp; do modprobe $m || echo \"sluice-vm: no module $m\"; done\n\
         export SLUICE_REQUIRE_PRIVILEGED=1 RUST_BACKTRACE=1\n",
    );
    s += &format!(
        "export {}={}\n",
        testbed::privilege::SKIP_LOG_ENV,
        out.join("skips.log").display()
    );
    for r in runs {
        let (exe, pkg) = bins
            .get(r.bin)
            .with_context(|| format!("cargo built no test binary `{}`", r.bin))?;
        let filters: String = r
            .filters
            .iter()
            .map(|f| format!(" '{f}'"))
            .chain(r.skips.iter().map(|f| format!(" --skip '{f}'")))
            .collect();
        s += &format!(
            "echo '{BEGIN}{bin}'\n[ -x '{exe}' ] || echo 'sluice-vm: {exe} is not visible in the guest: virtme-ng gives it its own /var/tmp and /run, so keep the workspace elsewhere'\ncd '{pkg}'\ntimeout -s KILL {limit} '{exe}' --test-threads=2{filters} 2>&1\necho \"{END}{bin} $?\"\n",
            bin = r.bin,
            pkg = pkg.display(),
            limit = BINARY_LIMIT.as_secs(),
            exe = exe.display(),
        );
    }
    Ok(s)
}

/// Reads the guest's console: the marker lines bracket each binary, the `test result:` lines
/// between them are added up, and a binary that exited non-zero without a failed test, or
/// never ended, is a failure of its own.
struct GuestLog {
    tag: String,
    o: Outcome,
    ended: std::collections::BTreeSet<String>,
    current: Option<(Instant, crate::test::Totals)>,
}

impl GuestLog {
    fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            o: Outcome::default(),
            ended: Default::default(),
            current: None,
        }
    }

    /// Takes one console line; returns what to say when a binary ended.
    fn line(&mut self, line: &str) -> Option<String> {
        if line.starts_with(BEGIN) {
            self.current = Some((Instant::now(), crate::test::Totals::default()));
        } else if let Some(rest) = line.strip_prefix(END) {
            let (bin, code) = rest.rsplit_once(' ').unwrap_or((rest, "?"));
            let (began, totals) = self.current.take()?;
            if code != "0" && totals.failed == 0 {
                self.o.broken.push(format!(
                    "{} {bin} exited {code} with no test failed",
                    self.tag
                ));
            }
            self.ended.insert(bin.to_owned());
            return Some(format!(
                "{bin}: {} passed, {} failed in {:.0} s (exit {code})",
                totals.passed,
                totals.failed,
                began.elapsed().as_secs_f64()
            ));
        } else if let Some((_, totals)) = self.current.as_mut() {
            crate::test::add_result_line(totals, line);
            crate::test::add_result_line(&mut self.o.totals, line);
        }
        None
    }

    /// The outcome, once the guest is gone: each of `runs` that never ended is a failure.
    fn finish(mut self, runs: &[Run], why: &str) -> Outcome {
        for r in runs {
            if !self.ended.contains(r.bin) {
                self.o
                    .broken
                    .push(format!("{} {} never finished ({why})", self.tag, r.bin));
            }
        }
        self.o
    }
}

/// Runs the matrix on `kernels`, one after the other, at the lowest CPU priority: started
/// beside the host's tiers, it takes only the CPU they leave (they run as if it were not
/// there), and all of it once they are done. Errors (a kernel not set up, vng missing) are
/// failures of that kernel.
pub fn run_matrix(
    kernels: &'static [Kernel],
    full: bool,
    bins: Binaries,
) -> std::thread::JoinHandle<Vec<Outcome>> {
    std::thread::spawn(move || {
        // SAFETY: setpriority with who=0 sets this thread's nice value (Linux), which the
        // guests' processes inherit; it touches no memory of ours.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        kernels
            .iter()
            .map(|k| {
                run_kernel(*k, full, &bins).unwrap_or_else(|e| Outcome {
                    broken: vec![format!("[linux {}] did not run: {e:#}", k.name)],
                    ..Default::default()
                })
            })
            .collect()
    })
}

/// Boots kernel `k` (set up already) and runs its tiers in it.
fn run_kernel(k: Kernel, full: bool, bins: &Binaries) -> anyhow::Result<Outcome> {
    let runs = runs_for(k, full);
    let dir = kernel_dir(k.name);
    let release = std::fs::read_to_string(dir.join("release"))
        .with_context(|| format!("kernel {} is not set up", k.name))?;
    let release = release.trim();
    let out = crate::workspace_root().join("target/vm").join(k.name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).context("creating target/vm")?;
    let script = out.join("guest.sh");
    std::fs::write(&script, guest_script(&runs, bins, &out)?)?;
    let vng = venv_bin("vng").context("no vng row")?;
    let path = format!(
        "{}:{}",
        vng.parent().expect("a bin directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let tag = format!("[linux {}]", k.name);
    let mut console = std::io::LineWriter::new(std::fs::File::create(out.join("console.log"))?);
    let mut lines = vec![format!(
        "{tag} booted {release} under virtme-ng (software emulation), ran: {}",
        runs.iter().map(|r| r.bin).collect::<Vec<_>>().join(", ")
    )];
    let stderr = std::fs::File::create(out.join("vng.stderr"))?;
    let kernel_image = dir.join(format!("tree/boot/vmlinuz-{release}"));
    let mut child = testbed::cmd::command(&[vng.as_os_str()])?
        .args(["--disable-kvm", "-m", "2G", "-p", "2"])
        .arg(format!("--rwdir={}", out.display()))
        .arg("-r")
        .arg(&kernel_image)
        .arg("-e")
        .arg(format!("sh {}", script.display()))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting vng")?;
    // Killed if the guest outlives every binary's bound plus booting.
    let limit = BOOT_LIMIT + BINARY_LIMIT * runs.len() as u32;
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_secs(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let start = Instant::now();
    let mut log = GuestLog::new(&tag);
    let mut printed = 0usize;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.unwrap_or_default();
        printed += 1;
        let _ = writeln!(console, "{line}");
        lines.push(format!("{tag} {line}"));
        if let Some(said) = log.line(&line) {
            lines.push(format!("{tag} {said}"));
        }
    }
    let status = child.wait().context("waiting for vng")?;
    let _ = watchdog.join();
    let took = start.elapsed();
    let stderr_path = out.join("vng.stderr");
    let mut o = log.finish(
        &runs,
        &format!("vng {status}; see {}", stderr_path.display()),
    );
    if let Some(why) = silent_guest(
        printed,
        &status.to_string(),
        took,
        limit,
        &std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    ) {
        o.broken.push(format!("{tag} {why}"));
    }
    o.skips = std::fs::read_to_string(out.join("skips.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| format!("{tag} {l}"))
        .collect();
    lines.push(format!(
        "{tag} done in {:.0} s: {} passed, {} failed",
        start.elapsed().as_secs_f64(),
        o.totals.passed,
        o.totals.failed + o.broken.len() as u64
    ));
    o.console = lines;
    Ok(o)
}

/// Why a guest said nothing, when it did not: a guest that printed no line at all never
/// reached its script, and the binaries' "never finished" alone does not say so. The message
/// carries the end of vng's stderr (where virtme-ng and QEMU say what failed) and whether the
/// watchdog killed it.
fn silent_guest(
    printed: usize,
    status: &str,
    took: Duration,
    limit: Duration,
    stderr: &str,
) -> Option<String> {
    if printed > 0 {
        return None;
    }
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let killed = if took >= limit {
        format!(
            ", killed by the watchdog at its {} s bound",
            limit.as_secs()
        )
    } else {
        String::new()
    };
    Some(format!(
        "the guest printed nothing: vng {status} after {:.0} s{killed}. It never reached its \
         script (a boot failure, or QEMU refused to start; under software emulation a machine \
         busy with other work can also stall the boot). vng's stderr ends:\n{}",
        took.as_secs_f64(),
        if tail.is_empty() {
            "(empty)".to_owned()
        } else {
            tail.join("\n")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNS: &[Run] = &[
        Run::all("packets"),
        Run::only("sandbox", &["three_hundred"]),
        Run::all("cluster"),
    ];

    fn read(lines: &[&str]) -> Outcome {
        let mut log = GuestLog::new("[linux 5.10]");
        for l in lines {
            log.line(l);
        }
        log.finish(RUNS, "vng exited")
    }

    #[test]
    fn results_are_added_up_and_a_binary_that_crashed_or_never_ran_is_a_failure() {
        let o = read(&[
            "sluice-vm: begin packets",
            "test a ... ok",
            "test result: ok. 26 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9s",
            "sluice-vm: end packets 0",
            // Killed by its bound: no result line, exit 137.
            "sluice-vm: begin sandbox",
            "test three_hundred ... ",
            "sluice-vm: end sandbox 137",
            // The guest died here: cluster never began.
        ]);
        assert_eq!(o.totals.passed, 26);
        assert_eq!(o.totals.failed, 0);
        assert_eq!(
            o.broken,
            [
                "[linux 5.10] sandbox exited 137 with no test failed",
                "[linux 5.10] cluster never finished (vng exited)"
            ]
        );
    }

    #[test]
    fn failed_tests_are_counted_once_and_lines_outside_a_binary_are_ignored() {
        let o = read(&[
            "test result: ok. 99 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
            "sluice-vm: begin packets",
            "test result: FAILED. 24 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9s",
            "sluice-vm: end packets 101",
            "sluice-vm: begin sandbox",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 10 filtered out; finished in 9s",
            "sluice-vm: end sandbox 0",
            "sluice-vm: begin cluster",
            "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9s",
            "sluice-vm: end cluster 0",
        ]);
        assert_eq!((o.totals.passed, o.totals.failed), (38, 2));
        assert!(o.broken.is_empty(), "{:?}", o.broken);
    }

    #[test]
    fn the_guest_script_runs_each_binary_bounded_between_markers() {
        let mut bins = std::collections::BTreeMap::new();
        for r in RUNS {
            bins.insert(
                r.bin.to_owned(),
                (
                    PathBuf::from(format!("/w/target/debug/deps/{}-1", r.bin)),
                    PathBuf::from("/w/proxy-userspace"),
                ),
            );
        }
        let s = guest_script(RUNS, &bins, Path::new("/w/target/vm/5.10")).unwrap();
        assert!(s.contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(s.contains("export SLUICE_REQUIRE_PRIVILEGED=1"));
        assert!(s.contains("SLUICE_SKIP_LOG=/w/target/vm/5.10/skips.log"));
        assert!(s.contains(
            "timeout -s KILL 1500 '/w/target/debug/deps/sandbox-1' --test-threads=2 'three_hundred' 2>&1"
        ));
        let skipping = guest_script(
            &[Run::except("packets", &["a", "b"])],
            &bins,
            Path::new("/w"),
        )
        .unwrap();
        assert!(
            skipping.contains("--test-threads=2 --skip 'a' --skip 'b' 2>&1"),
            "{skipping}"
        );
        let order: Vec<&str> = s
            .lines()
            .filter(|l| l.contains("sluice-vm: begin") || l.contains("sluice-vm: end"))
            .collect();
        assert_eq!(order.len(), 6, "{s}");
        assert!(order[0].contains("begin packets") && order[5].contains("end cluster"));
        bins.remove("cluster");
        assert!(
            guest_script(RUNS, &bins, Path::new("/o")).is_err(),
            "a missing binary is an error"
        );
    }

    #[test]
    fn a_guest_that_printed_nothing_says_so_with_the_end_of_vngs_stderr() {
        assert!(silent_guest(3, "exit status: 0", Duration::ZERO, Duration::MAX, "").is_none());
        let stderr: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let why = silent_guest(
            0,
            "exit status: 255",
            Duration::from_secs(82),
            Duration::from_secs(3000),
            &stderr,
        )
        .unwrap();
        assert!(
            why.contains("printed nothing: vng exit status: 255 after 82 s."),
            "{why}"
        );
        assert!(
            why.contains("line 5\n") && why.ends_with("line 19"),
            "the last 15 lines: {why}"
        );
        assert!(!why.contains("line 4\n"), "{why}");
        let killed = silent_guest(
            0,
            "signal: 9",
            Duration::from_secs(3000),
            Duration::from_secs(3000),
            "",
        )
        .unwrap();
        assert!(
            killed.contains("killed by the watchdog at its 3000 s bound")
                && killed.ends_with("(empty)"),
            "{killed}"
        );
    }

    #[test]
    fn the_oldest_kernel_runs_more_and_full_runs_everything() {
        let [oldest, middle, _] = testbed::vm::KERNELS;
        let names = |k, full| runs_for(k, full).iter().map(|r| r.bin).collect::<Vec<_>>();
        assert!(names(oldest, false).contains(&"cluster"));
        assert!(!names(middle, false).contains(&"cluster"));
        assert!(names(middle, false).contains(&"packets"));
        assert_eq!(names(middle, true).len(), FULL.len());
        for k in [oldest, middle] {
            let runs = runs_for(k, false);
            let p: Vec<Run> = runs.into_iter().filter(|r| r.bin == "pinning").collect();
            assert_eq!(p.len(), 1, "one run of a binary per guest");
            assert_eq!(
                p[0].skips, RESIZE_TESTS,
                "the resize tests run on the host only"
            );
        }
    }
}
