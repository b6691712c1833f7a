//! Malformed packets: random mutations of valid frames (truncated, bad lengths, IP options,
//! fragments, bad checksums, odd TCP flags, other protocols and ethertypes) through every TC
//! program and the XDP program. Nothing crashes, every frame lands in exactly one verdict
//! counter (XDP's: in `xdp_seen` and one other `xdp_*`), and real traffic interleaved with
//! them loses nothing: first through BPF_PROG_TEST_RUN, then on the sandbox's real devices
//! while real connections run.
//!
//! The generator is seeded, so a failure names the frame that caused it and repeats. Every
//! frame's outer addresses are forced into 198.18.0.0/15, the sandbox's range.
mod common;

use std::{net::SocketAddrV4, time::Duration};

use common::*;
use proxy_common::*;
use sluice::dataplane::{
    Backend, Counters, Dataplane, DataplaneConfig, FROM_POD, FROM_UPLINK, Frontend, FrontendKind,
    Protocol, TO_POD, TO_UPLINK, XDP_FROM_UPLINK,
};
use testbed::{Attempt, Cluster, HttpServer, http_many, plan, require_privileged};

fn verdicts(c: &Counters) -> u64 {
    (0..CTR_MAX)
        .filter(|i| !NOT_VERDICTS.contains(i))
        .map(|i| c[i as usize].packets)
        .sum()
}

fn seen(c: &Counters) -> u64 {
    c[CTR_SEEN as usize].packets
}

/// XDP's own account: what it saw, and the sum of its outcomes (one per packet).
fn xdp_account(c: &Counters) -> (u64, u64) {
    (
        c[CTR_XDP_SEEN as usize].packets,
        XDP_OUTCOMES.iter().map(|&i| c[i as usize].packets).sum(),
    )
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

const VIP: &str = "198.18.128.1:80";
// Addresses no pod of the sandbox holds, so no mutated frame can touch a real connection.
const POD: &str = "198.19.0.210:40000";
const BACKEND: &str = "198.19.0.220:8080";

/// Valid frames of every kind the programs parse, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let (pod, vip, be) = (sa(POD), sa(VIP), sa(BACKEND));
    let np = sa(NODE_PORT);
    let client = sa(CLIENT);
    let mut with_options = tcp(pod, vip, SYN, b"");
    // Two NOPs and an end-of-options word: IHL 6.
    with_options.splice(34..34, [1, 1, 1, 0]);
    with_options[14] = 0x46;
    with_options[17] += 4;
    // Another node's direct-server-return SYN to a pod here: the option names the NodePort.
    let mut dsr = tcp(client, be, SYN, b"");
    let mut opt = vec![0x9a, 8];
    opt.extend_from_slice(&np.port().to_be_bytes());
    opt.extend_from_slice(&np.ip().octets());
    dsr.splice(34..34, opt);
    dsr[14] = 0x47;
    dsr[17] += 8;
    // To the test run's device's MAC address (the loopback device's): a frame for this host.
    dsr[..6].copy_from_slice(&[0; 6]);
    vec![
        tcp(pod, vip, SYN, b""),
        tcp(pod, vip, ACK, b"GET / HTTP/1.0\r\n\r\n"),
        tcp(pod, vip, FIN_ACK, b""),
        tcp(pod, vip, RST, b""),
        tcp(pod, SocketAddrV4::new(*vip.ip(), 81), SYN, b""),
        tcp(pod, be, SYN, b""),
        tcp(be, pod, SYN_ACK, b""),
        udp(pod, SocketAddrV4::new(*vip.ip(), 53), b"query"),
        udp(pod, be, b""),
        tcp(client, np, SYN, b""),
        tcp(sa(REMOTE), client, SYN_ACK, b""),
        icmp_error(*be.ip(), *pod.ip(), 3, &tcp(pod, be, SYN, b"")),
        icmp_error(*be.ip(), *pod.ip(), 3, &udp(pod, be, b"q")),
        with_options,
        dsr,
    ]
}

/// One to four mutations of `frame`; its outer addresses are then put back in the sandbox's
/// range.
fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = f.len();
        match rng.below(10) {
            // Truncated, but never below an Ethernet header: no device delivers less, and
            // BPF_PROG_TEST_RUN refuses it.
            0 if len > 14 => f.truncate(14 + rng.below(len - 14)),
            1 | 2 => {
                if len > 0 {
                    let i = rng.below(len.min(80));
                    f[i] = rng.byte();
                }
            }
            3 if len > 14 => f[14] = 0x40 | (rng.byte() & 0x0f), // IHL
            4 if len > 17 => {
                // The total length: too short, too long, or 0 (BIG TCP's mark).
                let v = [0, 20, rng.byte() as u16, u16::MAX][rng.below(4)];
                f[16..18].copy_from_slice(&v.to_be_bytes());
            }
            5 if len > 21 => {
                // A fragment: more fragments, an offset, or both.
                let v = [0x2000u16, 0x0001, 0x2001, rng.next() as u16][rng.below(4)];
                f[20..22].copy_from_slice(&v.to_be_bytes());
            }
            6 if len > 23 => f[23] = [1, 6, 17, 132, rng.byte()][rng.below(5)],
            7 if len > 47 => f[47] = rng.byte(), // TCP flags
            8 => f.extend((0..rng.below(64)).map(|_| rng.byte())),
            9 if len > 13 => f[12..14].copy_from_slice(&[0x88, 0xb5]), // not IPv4
            _ => {}
        }
    }
    if f.len() >= 34 {
        f[26] = 198;
        f[27] = 18 | (f[27] & 1);
        f[30] = 198;
        f[31] = 18 | (f[31] & 1);
    }
    f
}

const PROGRAMS: [&str; 4] = [FROM_POD, TO_POD, FROM_UPLINK, TO_UPLINK];
const VALID: [u32; 3] = [TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT];
/// The XDP program sends nothing out here: the test run's device is not let send.
const XDP_VALID: [u32; 2] = [XDP_PASS, XDP_DROP];
/// A NodePort on the node address whose endpoint is local: new flows to it start at XDP.
const LOCAL_NODE_PORT: &str = "198.18.0.10:30081";

#[test]
fn a_hundred_thousand_malformed_frames_crash_nothing_and_each_lands_in_one_counter() {
    require_privileged!(
        "a_hundred_thousand_malformed_frames_crash_nothing_and_each_lands_in_one_counter"
    );
    in_node(|_| {
        let mut dp = Dataplane::load_with(DataplaneConfig {
            conntrack_max: 65_536,
            hairpin_snat: Some(plan::HAIRPIN_SNAT),
            snat: Some(sa(NODE_PORT).ip().to_owned()),
            snat_ports: SNAT_PORTS,
            ..Default::default()
        })
        .unwrap();
        let vip = sa(VIP);
        let backend = |s: &str, local| Backend {
            addr: *sa(s).ip(),
            port: sa(s).port(),
            local,
        };
        for (port, proto) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
            let fe = Frontend {
                addr: *vip.ip(),
                port,
                proto,
                kind: FrontendKind::ClusterIp,
            };
            dp.upsert_service(fe, &[backend(BACKEND, true)]).unwrap();
        }
        let np = sa(NODE_PORT);
        let fe = Frontend {
            addr: *np.ip(),
            port: np.port(),
            proto: Protocol::Tcp,
            kind: FrontendKind::NodePort,
        };
        dp.upsert_service(fe, &[backend(REMOTE, false)]).unwrap();
        let local = sa(LOCAL_NODE_PORT);
        let fe = Frontend {
            addr: *local.ip(),
            port: local.port(),
            proto: Protocol::Tcp,
            kind: FrontendKind::NodePort,
        };
        dp.upsert_service(fe, &[backend(BACKEND, true)]).unwrap();

        // A real flow before the storm, whose next packets must still find their backend.
        let live = sa("198.19.0.11:41000");
        let (_, out) = run(&dp, FROM_POD, &tcp(live, vip, SYN, b""));
        assert_eq!(check(&out).dst, sa(BACKEND));

        let seeds = seeds();
        let mut rng = Rng(0x5eed_0ff0_0d00);
        let before = dp.counters().unwrap();
        let mut runs = 0u64;
        let mut xdp_runs = 0u64;
        let mut i = 0u32;
        while i < 100_000 {
            let seed = &seeds[rng.below(seeds.len())];
            let frame = mutate(&mut rng, seed);
            // One frame in five through XDP, the others through the four TC programs.
            let pick = rng.below(PROGRAMS.len() + 1);
            if pick == PROGRAMS.len() {
                if frame.len() < 14 {
                    // BPF_PROG_TEST_RUN refuses an XDP frame without an Ethernet header.
                    continue;
                }
                let (verdict, _) = run_xdp(&dp, XDP_FROM_UPLINK, &frame);
                xdp_runs += 1;
                i += 1;
                assert!(
                    XDP_VALID.contains(&verdict),
                    "frame {i} through XDP: verdict {verdict}\n{frame:02x?}"
                );
            } else {
                let program = PROGRAMS[pick];
                if frame.len() < 34 && frame[12..14] == [0x08, 0x00] {
                    // BPF_PROG_TEST_RUN refuses an IPv4 frame without a whole IP header (a
                    // real device delivers it: the test below sends such frames).
                    continue;
                }
                let (verdict, _) = run(&dp, program, &frame);
                runs += 1;
                i += 1;
                assert!(
                    VALID.contains(&verdict),
                    "frame {i} through {program}: verdict {verdict}\n{frame:02x?}"
                );
            }
            if i.is_multiple_of(10_000) {
                // Real traffic in between: the live flow keeps its backend, its reply is
                // translated, and a new flow is made.
                let (v, out) = run(&dp, FROM_POD, &tcp(live, vip, ACK, b"x"));
                assert_eq!(
                    (v, check(&out).dst),
                    (TC_ACT_UNSPEC, sa(BACKEND)),
                    "after {i}"
                );
                let (_, out) = run(&dp, TO_POD, &tcp(sa(BACKEND), live, ACK, b"y"));
                assert_eq!(check(&out).src, vip, "after {i}");
                let fresh = SocketAddrV4::new(*live.ip(), 42000 + (i / 10_000) as u16);
                let (_, out) = run(&dp, FROM_POD, &tcp(fresh, vip, SYN, b""));
                assert_eq!(check(&out).dst, sa(BACKEND), "after {i}");
                runs += 3;
                // And a new flow from outside starts at XDP.
                let outside = SocketAddrV4::new(*sa(CLIENT).ip(), 43000 + (i / 10_000) as u16);
                let (v, out) = run_xdp(&dp, XDP_FROM_UPLINK, &tcp(outside, local, SYN, b""));
                assert_eq!(
                    (v, check(&out).dst),
                    (XDP_PASS, sa(BACKEND)),
                    "XDP after {i}"
                );
                xdp_runs += 1;
            }
        }
        let after = dp.counters().unwrap();
        assert_eq!(seen(&after) - seen(&before), runs, "every run was seen");
        assert_eq!(
            verdicts(&after) - verdicts(&before),
            runs,
            "and each landed in exactly one verdict counter"
        );
        assert!(
            delta(&before, &after, CTR_PASS_MALFORMED) > 1_000
                && delta(&before, &after, CTR_PASS_FRAGMENT) > 1_000,
            "the storm was malformed enough to matter"
        );
        assert!(
            delta(&before, &after, CTR_DSR_NOTED) > 100,
            "the storm reached the direct-server-return note"
        );
        let (xdp_before, xdp_after) = (xdp_account(&before), xdp_account(&after));
        assert_eq!(
            (xdp_after.0 - xdp_before.0, xdp_after.1 - xdp_before.1),
            (xdp_runs, xdp_runs),
            "every XDP run seen, and counted once more as one of XDP's outcomes"
        );
        let reached =
            [CTR_XDP_TO_TC_NOT_SERVICE, CTR_XDP_NEW_FLOW].map(|c| delta(&before, &after, c));
        assert!(
            reached[0] > 1_000 && reached[1] >= 10,
            "the storm reached XDP's parse and its new flows: {reached:?}"
        );
    });
}

#[test]
fn malformed_frames_on_a_real_device_leave_real_connections_whole() {
    require_privileged!("malformed_frames_on_a_real_device_leave_real_connections_whole");
    let mut c = Cluster::new(1).unwrap();
    c.add_pod(0, "client").unwrap();
    c.add_pod(0, "web").unwrap();
    let _server = HttpServer::start(&c.pod("web").ns, "web", 8080).unwrap();
    let dp = NodeDataplane::start(
        &c.nodes[0],
        DataplaneConfig {
            hairpin_snat: Some(plan::HAIRPIN_SNAT),
            conntrack_max: 65_536,
            ..Default::default()
        },
    );
    let vip = plan::cluster_ip(0);
    let web = c.pod("web").addr;
    dp.with(move |dp| {
        dp.upsert_service(
            Frontend {
                addr: vip,
                port: 80,
                proto: Protocol::Tcp,
                kind: FrontendKind::ClusterIp,
            },
            &[Backend {
                addr: web,
                port: 8080,
                local: true,
            }],
        )
    })
    .unwrap();
    let before = dp.with(|dp| dp.counters().unwrap());
    // The storm, from the client pod's own device, while the same pod makes real connections.
    // It goes on until the connections are done, at least 100,000 frames and at most
    // 2,000,000.
    let client = c.pod("client");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sender = stop.clone();
    let sender = client
        .ns
        .run_in(move || {
            std::thread::spawn(move || {
                let sock = RawSocket::open("eth0").unwrap();
                let seeds = seeds();
                let mut rng = Rng(0xdead_beef_0bad_f00d);
                let mut sent = 0u64;
                while sent < 100_000
                    || (!stop_sender.load(std::sync::atomic::Ordering::Relaxed) && sent < 2_000_000)
                {
                    let seed = &seeds[rng.below(seeds.len())];
                    let frame = mutate(&mut rng, seed);
                    sent += u64::from(sock.send(&frame));
                }
                sent
            })
        })
        .unwrap();
    let attempts = http_many(&client.ns, vip, 80, 200, Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let attempts = attempts.unwrap();
    let failed: Vec<_> = attempts
        .iter()
        .filter(|a| !matches!(a, Attempt::Ok { body, .. } if body == "web"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {failed:?}",
        failed.len()
    );
    std::thread::sleep(Duration::from_millis(200));
    let after = dp.with(|dp| dp.counters().unwrap());
    assert!(
        seen(&after) - seen(&before) >= sent,
        "every one of the {sent} frames was seen"
    );
    assert_eq!(
        verdicts(&after) - verdicts(&before),
        seen(&after) - seen(&before),
        "and landed in exactly one verdict counter"
    );
}

/// An AF_PACKET socket bound to one device of the calling thread's namespace, sending frames
/// exactly as given.
struct RawSocket(std::os::fd::OwnedFd, libc::sockaddr_ll);

impl RawSocket {
    fn open(dev: &str) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain libc calls; the descriptor is owned from here on.
        let (fd, ifindex) = unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            (fd, libc::if_nametoindex(name.as_ptr()))
        };
        if fd < 0 || ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        Ok(Self(fd, addr))
    }

    /// Sends `frame`: whether it went (the kernel refuses one too short for the device).
    fn send(&self, frame: &[u8]) -> bool {
        use std::os::fd::AsRawFd as _;
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.1 as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n >= 0
    }
}
