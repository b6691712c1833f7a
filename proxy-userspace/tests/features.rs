//! `sluice features`: what the running kernel has, asked of it, and what sluice does there.
//! The kernel matrix runs this on Debian's 5.10, 6.1 and 6.12, which backport none of these
//! facilities: there each answer must agree with the version that brought the facility.
use std::{path::Path, process::Stdio};

use testbed::require_privileged;

fn version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap(), parts.next().unwrap())
}

fn features(args: &[&str]) -> String {
    let out = testbed::cmd::command(&[Path::new(env!("CARGO_BIN_EXE_sluice"))])
        .unwrap()
        .arg("features")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice features failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_features_report_agrees_with_the_kernel_and_says_what_sluice_does() {
    require_privileged!("the_features_report_agrees_with_the_kernel_and_says_what_sluice_does");
    // A pin path no agent used (never made): the report says so, and reads no other pins.
    let pins = format!("/tmp/sluice-features-test-{}/none", std::process::id());
    let report: serde_json::Value =
        serde_json::from_str(&features(&["--pin-path", &pins, "-o", "json"])).unwrap();
    assert!(report["xdp_uplinks"].is_null(), "{report:#}");
    assert_eq!(report["pin_path"], pins.as_str());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(report["kernel"], release.trim());
    let v = version();
    let want = [
        ("tcx", (6, 6), "probe"),
        ("bpf_set_retval", (5, 18), "probe"),
        ("so_netns_cookie", (5, 14), "probe"),
        ("bpf_ktime_get_coarse_ns", (5, 11), "probe"),
        ("bpf_atomic_fetch_ops", (5, 12), "version"),
        ("fib_lookup_route_mtu", (5, 12), "version"),
    ];
    let got = report["facilities"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{report:#}");
    for (f, (name, since, found)) in got.iter().zip(want) {
        assert_eq!(f["name"], name);
        assert_eq!(f["since"], format!("{}.{}", since.0, since.1), "{name}");
        assert_eq!(f["found"], found, "{name}");
        assert_eq!(
            f["present"],
            v >= since,
            "{name} on {release}: present must follow the version on Debian's kernels"
        );
        assert!(
            !f["sluice"].as_str().unwrap().is_empty(),
            "{name} says what sluice does"
        );
    }
    // The table says the same.
    let table = features(&["--pin-path", &pins]);
    assert!(
        table.ends_with(&format!(
            "\nXDP on the uplinks: no agent's pins under {pins}\n"
        )),
        "{table}"
    );
    assert!(
        table.starts_with(&format!("kernel {}", release.trim())),
        "{table}"
    );
    let tcx = table.lines().find(|l| l.starts_with("tcx ")).unwrap();
    let here = if v >= (6, 6) { " yes " } else { " no " };
    assert!(tcx.contains(here), "{tcx}");
    if v < (6, 6) {
        assert!(tcx.contains("clsact"), "{tcx}");
    }
}
