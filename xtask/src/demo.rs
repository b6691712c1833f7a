//! `cargo xtask demo`: sluice at work on a sandbox cluster.
//!
//! Until the agent lands: a node with two backend pods serving the example app and a client
//! pod; `sluice count` runs on the node, attaching the pod-side datapath program (with no
//! Services in its maps) at TC ingress of the client pod's veth, while the client calls both
//! backends and the demo prints who answered and the program's counters, which show the
//! traffic passing untouched. `--once` runs the checks and exits with their status. The agent
//! issue turns this into the Service demo.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use testbed::{Cluster, HttpServer, curl};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(once: bool) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces and loads eBPF programs: run it as root"
    );
    let root = crate::workspace_root();
    let st = Command::new("cargo")
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--package",
            "proxy-userspace",
            "--bin",
            "sluice",
        ])
        .status()
        .context("building sluice")?;
    ensure!(st.success(), "building sluice failed");
    let sluice = root.join("target/debug/sluice");
    testbed::netns::sweep_stale();

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        )
    }
    .context("installing the Ctrl-C handler")?;

    let mut c = Cluster::new(1)?;
    let backends = ["service-test-7d4f9-a", "service-test-7d4f9-b"];
    for b in backends {
        c.add_pod(0, b)?;
    }
    c.add_pod(0, "client")?;
    let _servers: Vec<HttpServer> = backends
        .iter()
        .map(|b| HttpServer::start(&c.pod(b).ns, b, 8080))
        .collect::<Result<_, _>>()?;
    let client = c.pod("client");
    let dev = client.host_veth.clone();
    println!(
        "sandbox: node {} ({}), backends {} ({}) and {} ({}), client {}",
        c.nodes[0].ns.name(),
        c.nodes[0].addr,
        backends[0],
        c.pod(backends[0]).addr,
        backends[1],
        c.pod(backends[1]).addr,
        client.addr
    );

    let sluice_s = sluice.to_str().context("non-UTF-8 path")?;
    let argv = c.nodes[0]
        .ns
        .exec_argv(&[sluice_s, "count", "--interface", &dev]);
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sluice count")?;
    let stdout = child.stdout.take().context("piped")?;
    let _sluice = KillOnDrop(child);
    let last = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let last = last.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("attached") {
                    let _ = tx.send(line.clone());
                }
                *last.lock().expect("lock") = line;
            }
        });
    }
    let attached = rx
        .recv_timeout(Duration::from_secs(10))
        .context("sluice count did not attach within 10 s (see its log above)")?;
    println!("sluice: {attached}");

    let rounds = if once { 10 } else { usize::MAX };
    let mut answered = std::collections::BTreeMap::new();
    let mut failures = 0;
    for i in 0..rounds {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        let backend = c.pod(backends[i % 2]);
        match curl(&client.ns, backend.addr, 8080, Duration::from_secs(3)) {
            Ok(r) => {
                println!("client -> {}:8080 answered by {}", backend.addr, r.body);
                *answered.entry(r.body).or_insert(0) += 1;
            }
            Err(e) => {
                println!("client -> {}:8080 FAILED: {e}", backend.addr);
                failures += 1;
            }
        }
        if i % 2 == 1 {
            std::thread::sleep(Duration::from_millis(if once { 600 } else { 1000 }));
            println!("counter on {dev}: {}", last.lock().expect("lock"));
        }
    }
    if once {
        // The counter prints once a second: wait for a line that covers the last request.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let counted = last.lock().expect("lock").clone();
    if once {
        ensure!(failures == 0, "{failures} requests failed");
        for b in backends {
            ensure!(
                answered.get(b).copied().unwrap_or(0) == 5,
                "{b} did not answer 5 times: {answered:?}"
            );
        }
        // With no Services in its maps the program passes every packet untouched.
        let passed: u64 = counted
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pass_no_match="))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if passed < 50 {
            bail!(
                "the program passed {passed} packets untouched for 10 HTTP exchanges, expected \
                 at least 50"
            );
        }
        println!(
            "demo: ok: 10 requests answered by {answered:?}; {passed} packets passed untouched"
        );
    }
    Ok(())
}
