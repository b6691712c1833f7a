//! Sharing the hook: a program attached after sluice's on the same TC hook (a CNI's, a
//! monitoring tool's) still runs for every packet sluice lets go on, translated or untouched.
//! sluice returns TC_ACT_UNSPEC (TCX_NEXT) for those; TC_ACT_OK would end the chain there.
//!
//! The later program is the object's empty `sluice_pass`, loaded a second time and attached
//! after sluice's on both hooks of every pod device: last in the TCX chain, or a clsact filter
//! at a later priority. The kernel's run-time statistics count its runs and sluice's.
mod common;

use std::{
    sync::mpsc::{Receiver, Sender, channel},
    time::{Duration, Instant},
};

use aya::programs::{LinkOrder, SchedClassifier, TcAttach, TcAttachType, tc::NlOptions};
use common::NodeDataplane;
use proxy_common::{CTR_NEW_FLOW, CTR_REPLY};
use sluice::dataplane::{
    AttachMode, Backend, Dataplane, DataplaneConfig, EBPF_OBJECT, FROM_POD, Frontend, FrontendKind,
    PASS, Protocol, TO_POD,
};
use testbed::{Cluster, UdpEcho, plan, require_privileged, udp_request};

/// The empty program, attached after sluice's on `devices` (both hooks), in `ns`; its runs.
struct Later {
    ask: Option<Sender<Sender<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Later {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which detaches the program.
        self.ask.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Later {
    fn start(ns: &str, devices: Vec<String>, mode: AttachMode) -> Self {
        let ns = ns.to_owned();
        let (ask, asked): (Sender<Sender<u64>>, Receiver<Sender<u64>>) = channel();
        let (ready_tx, ready) = channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut ebpf = aya::EbpfLoader::new().load(EBPF_OBJECT).unwrap();
            let prog: &mut SchedClassifier = ebpf.program_mut(PASS).unwrap().try_into().unwrap();
            prog.load().unwrap();
            for dev in &devices {
                let dev = std::ffi::CString::new(dev.as_str()).unwrap();
                for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                    let at = match mode {
                        AttachMode::Tcx => TcAttach::Tcx {
                            attach_type: hook,
                            order: LinkOrder::last(),
                        },
                        // sluice's filter is the first on the hook: the kernel gave it
                        // priority 49152; a larger number runs later.
                        AttachMode::Clsact => TcAttach::Netlink {
                            parent: hook.into(),
                            options: NlOptions {
                                priority: 49153,
                                ..Default::default()
                            },
                        },
                    };
                    prog.attach(&dev, at).unwrap();
                }
            }
            ready_tx.send(()).unwrap();
            for reply in asked {
                let _ = reply.send(prog.info().unwrap().run_count());
            }
        });
        ready.recv_timeout(Duration::from_secs(30)).unwrap();
        Self {
            ask: Some(ask),
            thread: Some(thread),
        }
    }

    fn runs(&self) -> u64 {
        let (tx, rx) = channel();
        self.ask.as_ref().unwrap().send(tx).unwrap();
        rx.recv().unwrap()
    }
}

fn a_later_program_sees_what_sluice_lets_go_on(mode: AttachMode) {
    // The kernel counts program runs while this is held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(0, "web").unwrap();
    let _echo = UdpEcho::start(&c.pod("web").ns, "web", 5353).unwrap();
    let dp = NodeDataplane::start_mode(
        &c.nodes[0],
        DataplaneConfig {
            conntrack_max: 4096,
            ..Default::default()
        },
        mode,
    );
    let vip = plan::cluster_ip(1);
    let web = Backend {
        addr: c.pod("web").addr,
        port: 5353,
        local: true,
    };
    dp.with(move |dp| {
        dp.upsert_service(
            Frontend {
                addr: vip,
                port: 53,
                proto: Protocol::Udp,
                kind: FrontendKind::ClusterIp,
            },
            &[web],
        )
    })
    .unwrap();
    let devices = c.nodes[0]
        .pods
        .iter()
        .map(|p| p.host_veth.clone())
        .collect();
    let later = Later::start(c.nodes[0].ns.name(), devices, mode);
    let sluice_runs = || {
        dp.with(|dp| {
            [FROM_POD, TO_POD]
                .iter()
                .map(|p| dp.run_stats(p).unwrap().1)
                .sum::<u64>()
        })
    };
    let (sluice0, later0) = (sluice_runs(), later.runs());
    // Translated both ways (to the backend, and its replies back from the Service), and
    // untouched (the replies at the backend's device, ARP).
    for i in 0..5 {
        let r = udp_request(
            &c.pod("client").ns,
            vip,
            53,
            &format!("q{i}"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(r.data.starts_with("web "), "answered: {}", r.data);
    }
    let counters = dp.with(|dp| dp.counters().unwrap());
    assert!(
        counters[CTR_NEW_FLOW as usize].packets >= 1 && counters[CTR_REPLY as usize].packets >= 5
    );
    // Every run of sluice's programs on these devices let the packet go on, so the later
    // program ran as often. (A packet in flight between the two is waited for.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, l) = (sluice_runs() - sluice0, later.runs() - later0);
        if s == l && s >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: sluice's programs ran {s} times, the program after them {l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_program_after_sluice_under_tcx_sees_every_packet_sluice_lets_go_on() {
    let name = "a_program_after_sluice_under_tcx_sees_every_packet_sluice_lets_go_on";
    require_privileged!(name);
    if !testbed::kernel_has(name, "TCX (Linux 6.6)", AttachMode::tcx_supported()) {
        return;
    }
    a_later_program_sees_what_sluice_lets_go_on(AttachMode::Tcx);
}

/// On every kernel: auto picks TCX exactly where the kernel has it, and TCX asked for where
/// it has none is refused at once, naming TCX and the kernel version that brings it. (Which
/// branch runs depends on the kernel: the kernel matrix runs both.)
#[test]
fn tcx_is_used_where_the_kernel_has_it_and_refused_by_name_where_not() {
    require_privileged!("tcx_is_used_where_the_kernel_has_it_and_refused_by_name_where_not");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap(), parts.next().unwrap());
    // Debian's kernels, which the matrix runs, do not backport TCX: the version tells.
    let has = version >= (6, 6);
    assert_eq!(AttachMode::tcx_supported(), has, "the probe on {release}");
    let c = Cluster::new(1).unwrap();
    let dev = c.nodes[0].uplink.clone();
    let (auto, attached) = c.nodes[0]
        .ns
        .run_in(move || {
            let mut dp = Dataplane::load_with(DataplaneConfig::default()).unwrap();
            let tcx = dp.attach(FROM_POD, &dev, TcAttachType::Ingress, AttachMode::Tcx);
            (AttachMode::best_available(), tcx.map_err(|e| e.to_string()))
        })
        .unwrap();
    if has {
        assert_eq!(auto, AttachMode::Tcx);
        attached.expect("TCX attaches where the kernel has it");
    } else {
        assert_eq!(auto, AttachMode::Clsact);
        let err = attached.expect_err("TCX is refused where the kernel has none");
        assert!(
            err.contains("TCX") && err.contains("Linux 6.6") && err.contains(release.trim()),
            "the error names TCX, the version that has it and this kernel: {err}"
        );
    }
}

#[test]
fn a_program_after_sluice_under_clsact_sees_every_packet_sluice_lets_go_on() {
    require_privileged!("a_program_after_sluice_under_clsact_sees_every_packet_sluice_lets_go_on");
    a_later_program_sees_what_sluice_lets_go_on(AttachMode::Clsact);
}
