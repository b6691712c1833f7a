//! The privileged-test rule, exercised for real: this test binary re-runs itself as an
//! unprivileged user (uid 65534) and watches a privileged test skip loudly, or fail when
//! `SLUICE_REQUIRE_PRIVILEGED=1`.
use std::os::unix::process::CommandExt as _;

use testbed::require_privileged;

/// Needs root; the other tests run it as nobody. As root it simply passes its assertion.
#[test]
fn probe_needs_root() {
    require_privileged!("probe_needs_root");
    assert!(
        nix::unistd::geteuid().is_root(),
        "reached the body without root"
    );
}

/// Copying a binary and executing it races with any fork in another thread: the child holds
/// the copy's write descriptor until it execs, and executing the copy then fails with
/// ETXTBSY. The two tests that do it take turns, and retry that error.
static COPY_AND_EXEC: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_probe_as_nobody(require: bool) -> std::process::Output {
    let _turn = COPY_AND_EXEC.lock().unwrap_or_else(|e| e.into_inner());
    // Copy the binary somewhere any user can execute it; the checkout may not be.
    let dir = std::env::temp_dir().join(format!("sluice-probe-{}-{require}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("probe");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let mut perms = std::fs::metadata(&dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms).unwrap();
    let mut cmd = testbed::cmd::own_binary_copy(&exe);
    cmd.args([
        "--exact",
        "probe_needs_root",
        "--nocapture",
        "--test-threads=1",
    ])
    .env_remove(testbed::privilege::SKIP_LOG_ENV)
    .current_dir(&dir)
    .uid(65534)
    .gid(65534);
    if require {
        cmd.env(testbed::privilege::REQUIRE_ENV, "1");
    } else {
        cmd.env_remove(testbed::privilege::REQUIRE_ENV);
    }
    let mut tries = 0;
    let out = loop {
        match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn without_root_a_privileged_test_says_why_it_skipped() {
    require_privileged!("without_root_a_privileged_test_says_why_it_skipped");
    let out = run_probe_as_nobody(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a skip is not a failure outside CI: {stderr}"
    );
    assert!(
        stderr.contains("SKIPPED probe_needs_root: not running as root"),
        "expected a loud skip reason, got: {stderr}"
    );
}

#[test]
fn with_require_privileged_a_privileged_test_fails_instead_of_skipping() {
    require_privileged!("with_require_privileged_a_privileged_test_fails_instead_of_skipping");
    let out = run_probe_as_nobody(true);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "SLUICE_REQUIRE_PRIVILEGED=1 must fail the test: {all}"
    );
    assert!(
        all.contains("SLUICE_REQUIRE_PRIVILEGED=1 but this test cannot run"),
        "expected the reason in the failure, got: {all}"
    );
}
