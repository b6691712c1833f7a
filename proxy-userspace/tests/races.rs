//! Races between CPUs on one conntrack entry: the real programs through BPF_PROG_TEST_RUN on
//! two threads at once. A binary of its own, so that no other test takes the CPUs the races
//! need (cargo runs test binaries one after another), and its tests one at a time.
mod common;

use std::net::Ipv4Addr;

use common::*;
use proxy_common::*;
use sluice::dataplane::{
    Backend, Dataplane, DataplaneConfig, FROM_POD, FrontendKind, Protocol, TO_POD,
};
use testbed::require_privileged;

const VIP: &str = "198.18.128.1:80";

/// Runs `rounds` rounds of program runs at the same instant on two CPUs: `setup(r)` first (on
/// this thread), then this thread runs `mine(r)` while a second thread, released by a spin
/// gate, runs `theirs(r)` (the two start within about a microsecond, inside the window in
/// which one program is between reading and writing an entry). Each is a program and a
/// packet. Returns each round's two results, in order. Bounded by `rounds`.
#[allow(clippy::type_complexity)]
fn at_once(
    dp: &Dataplane,
    rounds: u32,
    setup: impl Fn(u32),
    mine: impl Fn(u32) -> (&'static str, Vec<u8>),
    theirs: impl Fn(u32) -> (&'static str, Vec<u8>) + Sync,
) -> Vec<((u32, Vec<u8>), (u32, Vec<u8>))> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let go = AtomicU32::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (go, theirs) = (&go, &theirs);
        s.spawn(move || {
            for r in 0..rounds {
                while go.load(Ordering::Acquire) != r + 1 {
                    std::hint::spin_loop();
                }
                let (prog, pkt) = theirs(r);
                if tx.send(run(dp, prog, &pkt)).is_err() {
                    return;
                }
            }
        });
        (0..rounds)
            .map(|r| {
                setup(r);
                let (prog, pkt) = mine(r);
                go.store(r + 1, Ordering::Release);
                let a = run(dp, prog, &pkt);
                let b = rx.recv().expect("the other CPU's run");
                (a, b)
            })
            .collect()
    })
}

/// The race tests run one at a time: each needs both CPUs.
static BOTH_CPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn two_packets_of_a_new_udp_flow_at_once_on_two_cpus_go_to_one_backend() {
    require_privileged!("two_packets_of_a_new_udp_flow_at_once_on_two_cpus_go_to_one_backend");
    let _cpus = BOTH_CPUS.lock().unwrap_or_else(|e| e.into_inner());
    // Batches of new flows until enough of them met the other CPU's flow mid-creation (the
    // case at stake); bounded.
    const BATCH: u32 = 1000;
    const BATCHES: u32 = 10;
    let mut dp = Dataplane::load_with(DataplaneConfig {
        conntrack_max: 4 * BATCH * BATCHES,
        ..Default::default()
    })
    .unwrap();
    let vip = sa("198.18.128.53:53");
    let backends: Vec<Backend> = (0..16)
        .map(|i| be(&format!("198.19.1.{}:5353", 10 + i)))
        .collect();
    dp.upsert_service(
        fe("198.18.128.53:53", Protocol::Udp, FrontendKind::ClusterIp),
        &backends,
    )
    .unwrap();
    let mut rounds = 0;
    let mut lost = 0;
    for batch in 0..BATCHES {
        // A DNS forwarder's two threads sending from one socket: each round a new client port.
        let datagram = |r: u32| {
            let port = 20000 + (batch * BATCH + r) as u16;
            let client = std::net::SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), port);
            (FROM_POD, udp(client, vip, b"query"))
        };
        let results = at_once(&dp, BATCH, |_| {}, datagram, datagram);
        for (r, ((va, a), (vb, b))) in results.iter().enumerate() {
            assert_eq!((*va, *vb), (TC_ACT_UNSPEC, TC_ACT_UNSPEC), "round {r}");
            let (a, b) = (check(a), check(b));
            assert_eq!(
                a.dst, b.dst,
                "batch {batch} round {r}: one flow, two backends"
            );
            assert_eq!(a.src, b.src, "batch {batch} round {r}");
        }
        rounds += BATCH;
        lost = dp.counters().unwrap()[CTR_NEW_FLOW_RACE_LOST as usize].packets;
        if lost >= 100 {
            break;
        }
    }
    eprintln!("rounds: {rounds}, races lost (the case at stake): {lost}");
    assert!(
        lost > 0,
        "in {rounds} rounds no packet met the other CPU's new flow: the race was not exercised"
    );
    // One flow each: a service entry and one reverse entry, none left behind by the loser.
    let ct = dp.conntrack().unwrap();
    let reverse = ct
        .iter()
        .filter(|e| e.kind == sluice::dataplane::CtKind::Reverse)
        .count();
    assert_eq!(reverse, rounds as usize, "one reverse entry per flow");
    assert_eq!(ct.len(), 2 * rounds as usize);
    let c = dp.counters().unwrap();
    assert_eq!(
        c[CTR_NEW_FLOW as usize].packets,
        u64::from(rounds),
        "one new flow per round, the other packet a hit (or a lost race)"
    );
    assert_eq!(c[CTR_CT_HIT as usize].packets, u64::from(rounds));
}

#[test]
fn a_fin_on_one_cpu_while_another_forwards_the_flow_is_not_lost() {
    require_privileged!("a_fin_on_one_cpu_while_another_forwards_the_flow_is_not_lost");
    let _cpus = BOTH_CPUS.lock().unwrap_or_else(|e| e.into_inner());
    // The window (a CPU between reading the state and writing it back) is a few dozen ns, so
    // the client's CPU forwards a burst of ACKs inside one test run, with no system call
    // between them, and the backend's FIN comes in the middle of it: the FIN's bit is written
    // while one of the ACKs is between its read and its write. For the burst, each packet
    // must leave as it came: the Service's backend is its own address (a translation that
    // changes nothing, through the same conntrack code as any other).
    const RACE_ROUNDS: u32 = 800;
    const BURST: u32 = 20_000;
    let mut dp = Dataplane::load_with(DataplaneConfig {
        conntrack_max: 4 * RACE_ROUNDS,
        ..Default::default()
    })
    .unwrap();
    dp.upsert_service(fe(VIP, Protocol::Tcp, FrontendKind::ClusterIp), &[be(VIP)])
        .unwrap();
    let backend = sa(VIP);
    let client =
        |r: u32| std::net::SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 20000 + r as u16);
    for r in 0..RACE_ROUNDS {
        let c = client(r);
        // An established connection.
        establish(&dp, c, sa(VIP), backend);
        let started = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let burst = s.spawn(|| {
                let ack = tcp(c, sa(VIP), ACK, b"data");
                started.store(true, std::sync::atomic::Ordering::Release);
                run_repeated(&dp, FROM_POD, &ack, BURST)
            });
            while !started.load(std::sync::atomic::Ordering::Acquire) {
                std::hint::spin_loop();
            }
            // Into the middle of the burst (some milliseconds long).
            std::thread::sleep(std::time::Duration::from_micros(500));
            let (v, _) = run(&dp, TO_POD, &tcp(backend, c, FIN_ACK, b""));
            assert_eq!(v, TC_ACT_UNSPEC, "round {r}");
            assert_eq!(burst.join().unwrap(), TC_ACT_UNSPEC, "round {r}");
        });
        // The client closes too, and the last ACKs.
        run(&dp, FROM_POD, &tcp(c, sa(VIP), FIN_ACK, b""));
        run(&dp, TO_POD, &tcp(backend, c, ACK, b""));
    }
    let ct = dp.conntrack().unwrap();
    assert_eq!(ct.len(), 2 * RACE_ROUNDS as usize);
    let mut open = 0;
    for e in &ct {
        let state = e.entry.state();
        let closed = state & CT_FLAG_FIN_FWD != 0 && state & CT_FLAG_FIN_REPLY != 0;
        if !closed || lifetime_left_s(e) > 10.0 {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "every entry of the {RACE_ROUNDS} closed flows is closed and lives at most 10 s"
    );
}
