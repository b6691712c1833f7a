//! The first program of the pipeline, `sluice_count`: it loads (the verifier accepts it),
//! counts what it sees, and changes nothing. Packets are built with etherparse.
use std::time::Duration;

use aya::programs::{TcAttachType, TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use proxy_common::{CTR_IPV4, CTR_OTHER, CTR_SEEN};
use sluice::dataplane::{AttachMode, COUNT_PROGRAM, Dataplane};
use testbed::{Cluster, HttpServer, curl, require_privileged};

const TC_ACT_OK: i32 = 0;

fn tcp_packet() -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 19, 0, 10], [198, 18, 128, 1], 64)
        .tcp(40000, 80, 1, 64240)
        .syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).unwrap();
    v
}

fn arp_packet() -> Vec<u8> {
    let mut v = vec![0xff; 6];
    v.extend([2, 0, 0, 0, 0, 1]);
    v.extend([0x08, 0x06]); // ARP
    v.extend([0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4 request
    v.extend([
        2, 0, 0, 0, 0, 1, 198, 19, 0, 10, 0, 0, 0, 0, 0, 0, 198, 19, 0, 1,
    ]);
    v
}

#[test]
fn counter_counts_ipv4_and_other_packets_and_passes_them_unchanged() {
    require_privileged!("counter_counts_ipv4_and_other_packets_and_passes_them_unchanged");
    let dp = Dataplane::load().expect("the verifier accepts sluice_count");
    let prog = dp.program(COUNT_PROGRAM).unwrap();
    for (pkt, repeat) in [(tcp_packet(), 3u32), (arp_packet(), 2)] {
        let mut out = vec![0u8; pkt.len() + 64];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            r.return_value as i32, TC_ACT_OK,
            "the counter passes every packet"
        );
        assert_eq!(&out[..pkt.len()], &pkt[..], "the counter changes no byte");
    }
    let c = dp.counters().unwrap();
    let tcp_len = tcp_packet().len() as u64;
    let arp_len = arp_packet().len() as u64;
    assert_eq!(c[CTR_SEEN as usize].packets, 5);
    assert_eq!(c[CTR_IPV4 as usize].packets, 3);
    assert_eq!(c[CTR_IPV4 as usize].bytes, 3 * tcp_len);
    assert_eq!(c[CTR_OTHER as usize].packets, 2);
    assert_eq!(c[CTR_OTHER as usize].bytes, 2 * arp_len);
    assert_eq!(c[CTR_SEEN as usize].bytes, 3 * tcp_len + 2 * arp_len);
}

fn rx_packets(c: &Cluster, dev: &str) -> u64 {
    c.nodes[0]
        .ns
        .exec(&[
            "cat",
            &format!("/sys/class/net/{dev}/statistics/rx_packets"),
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Attaches the counter at TC ingress of a pod's veth on the node, sends real HTTP traffic
/// from the pod, and checks the counter saw exactly the packets the device received.
fn counts_real_packets(mode: AttachMode) {
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(0, "server").unwrap();
    let _http = HttpServer::start(&c.pod("server").ns, "server", 8080).unwrap();
    let dev = c.pod("client").host_veth.clone();
    let dev2 = dev.clone();
    let (to_test, from_test) = std::sync::mpsc::channel::<()>();
    let (to_main, counts) = std::sync::mpsc::channel();
    // The dataplane lives on a thread inside the node namespace, so that attaching and
    // detaching (netlink) happen there and never in the root namespace.
    let node = c.nodes[0].ns.name().to_owned();
    let worker = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{node}")).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut dp = Dataplane::load().unwrap();
        dp.attach(COUNT_PROGRAM, &dev2, TcAttachType::Ingress, mode)
            .unwrap();
        to_main.send(dp.counters().unwrap()).unwrap();
        from_test.recv().unwrap();
        to_main.send(dp.counters().unwrap()).unwrap();
        from_test.recv().unwrap();
        drop(dp); // detach
        to_main.send([Default::default(); 3]).unwrap();
    });
    let before = counts.recv().unwrap();
    let rx_before = rx_packets(&c, &dev);
    for _ in 0..5 {
        let r = curl(
            &c.pod("client").ns,
            c.pod("server").addr,
            8080,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.body, "server");
    }
    // Let the last FIN/ACKs arrive before reading.
    std::thread::sleep(Duration::from_millis(300));
    to_test.send(()).unwrap();
    let after = counts.recv().unwrap();
    let rx_after = rx_packets(&c, &dev);
    let seen = after[CTR_SEEN as usize].packets - before[CTR_SEEN as usize].packets;
    let ipv4 = after[CTR_IPV4 as usize].packets - before[CTR_IPV4 as usize].packets;
    assert!(
        ipv4 >= 5 * 5,
        "5 HTTP exchanges are at least 25 IPv4 packets from the client, counted {ipv4}"
    );
    assert_eq!(
        seen,
        rx_after - rx_before,
        "the counter saw every packet {dev} received ({mode})"
    );

    // After detaching, traffic still flows and is no longer counted by anyone.
    to_test.send(()).unwrap();
    counts.recv().unwrap();
    worker.join().unwrap();
    let r = curl(
        &c.pod("client").ns,
        c.pod("server").addr,
        8080,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.body, "server", "traffic flows after detach");
    let tc = c.nodes[0]
        .ns
        .exec(&["tc", "filter", "show", "dev", &dev, "ingress"])
        .unwrap();
    assert!(
        !tc.contains("sluice_count"),
        "the clsact filter is gone after detach: {tc}"
    );
}

#[test]
fn counter_attached_with_tcx_sees_every_packet_a_pod_sends() {
    require_privileged!("counter_attached_with_tcx_sees_every_packet_a_pod_sends");
    counts_real_packets(AttachMode::Tcx);
}

#[test]
fn counter_attached_with_clsact_sees_every_packet_a_pod_sends() {
    require_privileged!("counter_attached_with_clsact_sees_every_packet_a_pod_sends");
    counts_real_packets(AttachMode::Clsact);
}
