//! `./x test` (`cargo xtask test`): every tier in one run, then a check that nothing was left behind.
//!
//! Tiers: unit tests (model, plan, ABI), packet tests through BPF_PROG_TEST_RUN, sandbox
//! end-to-end tests in network namespaces. They are all `cargo test` tests; the privileged
//! ones skip loudly without root, and fail instead under `SLUICE_REQUIRE_PRIVILEGED=1` (CI).
//! Skips are collected through `SLUICE_SKIP_LOG` and reported as skipped, never as passed.
//! With `--kernel`, the kernel matrix (`vm.rs`) runs in virtual machines beside the host's
//! tiers, at the lowest CPU priority; its output follows theirs and its results join the same
//! summary, each test named with its kernel.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};
use testbed::privilege::SKIP_LOG_ENV;

#[derive(Default, Debug, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Adds up one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
pub fn add_result_line(t: &mut Totals, line: &str) {
    let Some(rest) = line.trim().strip_prefix("test result: ") else {
        return;
    };
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => t.passed += n,
            "failed" => t.failed += n,
            "ignored" => t.ignored += n,
            _ => {}
        }
    }
}

/// What `./x test` runs.
pub struct Plan<'a> {
    /// Extra arguments for the host's `cargo test` (a name filter, say).
    pub cargo_args: &'a [String],
    /// The matrix's kernels (none: the host only).
    pub kernels: &'static [testbed::vm::Kernel],
    /// Every kernel-sensitive tier on every kernel, not the chosen ones.
    pub full: bool,
    /// The matrix only, without the host's tiers.
    pub kernels_only: bool,
}

pub fn run(plan: &Plan) -> anyhow::Result<()> {
    let cargo_args = plan.cargo_args;
    let root = crate::workspace_root();
    let privileged = nix::unistd::geteuid().is_root();
    if privileged {
        let stale = testbed::netns::sweep_stale();
        if !stale.is_empty() {
            eprintln!(
                "test: removed namespaces left by killed runs: {}",
                stale.join(" ")
            );
        }
    }
    let skip_log = root.join("target").join("test-skips.log");
    std::fs::create_dir_all(root.join("target")).context("creating target/")?;
    let _ = std::fs::remove_file(&skip_log);

    let mut totals = Totals::default();
    // The kernel matrix, each kernel in a virtual machine, starts first, beside the host's
    // tiers, at the lowest CPU priority (`vm::run_matrix`); its output comes after theirs.
    let matrix = if plan.kernels.is_empty() {
        None
    } else {
        let bins = crate::vm::test_binaries()?;
        println!(
            "the kernel matrix runs beside the host's tiers: Linux {} (live in target/vm/*/console.log)",
            plan.kernels
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(crate::vm::run_matrix(plan.kernels, plan.full, bins))
    };
    let mut host_ok = true;
    if !plan.kernels_only {
        host_ok = host_tiers(&root, cargo_args, &skip_log, privileged, &mut totals)?;
    }
    let outcomes = match matrix {
        Some(m) => m
            .join()
            .map_err(|_| anyhow::anyhow!("the kernel matrix's thread panicked"))?,
        None => Vec::new(),
    };
    let mut vm_skips = Vec::new();
    for o in outcomes {
        for l in &o.console {
            println!("{l}");
        }
        totals.passed += o.totals.passed;
        totals.failed += o.totals.failed + o.broken.len() as u64;
        totals.ignored += o.totals.ignored;
        for b in &o.broken {
            println!("FAILED: {b}");
        }
        vm_skips.extend(o.skips);
    }

    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .chain(vm_skips)
        .collect();
    // A skipped test returns early and cargo counts it as passed: count it as skipped instead.
    let skipped = skips.len() as u64 + totals.ignored;
    let passed = totals.passed.saturating_sub(skips.len() as u64);

    let mut leftovers = Vec::new();
    if privileged {
        // Every test process has exited: what they left is orphaned. (Namespaces of another
        // run still going on this machine are that run's business.)
        leftovers = testbed::netns::sweep_stale();
    }
    for s in &skips {
        println!("skipped: {s}");
    }
    if !leftovers.is_empty() {
        println!(
            "cleanup: the tests left these namespaces behind: {}",
            leftovers.join(" ")
        );
    }
    println!(
        "summary: {passed} passed, {} failed, {skipped} skipped",
        totals.failed
    );
    if !host_ok || totals.failed > 0 {
        bail!("tests failed");
    }
    if !leftovers.is_empty() {
        bail!("the tests left network namespaces behind: cleanup is broken");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The host's tiers: `cargo test` of the workspace, then the demo in both modes. Whether
/// `cargo test` itself succeeded (its counts go into `totals`).
fn host_tiers(
    root: &std::path::Path,
    cargo_args: &[String],
    skip_log: &std::path::Path,
    privileged: bool,
    totals: &mut Totals,
) -> anyhow::Result<bool> {
    let mut child = testbed::cmd::command(&["cargo"])?
        .current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args)
        .env(SKIP_LOG_ENV, skip_log)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        add_result_line(totals, &line);
    }
    let status = child.wait().context("waiting for cargo test")?;

    // The last tier: the README's main command, checked once, as a user would run it, in
    // both modes.
    for (flags, control_plane) in [("--once", false), ("--once --control-plane", true)] {
        if !privileged {
            testbed::privileged(&format!("xtask demo {flags}"));
            continue;
        }
        println!("running the demo: ./x demo {flags}");
        match crate::demo::run(true, control_plane, crate::demo::Build::AsBuilt) {
            Ok(()) => totals.passed += 1,
            Err(e) => {
                println!("demo {flags} FAILED: {e:#}");
                totals.failed += 1;
            }
        }
    }

    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_added_up_and_other_lines_ignored() {
        let mut t = Totals::default();
        for l in [
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "test result: FAILED. 6 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.34s",
            "test foo ... ok",
            "running 3 tests",
        ] {
            add_result_line(&mut t, l);
        }
        assert_eq!(
            t,
            Totals {
                passed: 9,
                failed: 2,
                ignored: 1
            }
        );
    }
}
