//! Shared by the integration tests: packets built and checked with etherparse, so no checksum
//! is ever verified by the code that computed it.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{Icmpv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_common::{CTR_MAX, Counter};
use sluice::dataplane::Dataplane;

/// What sluice returns for a packet that goes on (untouched or translated): TC_ACT_UNSPEC,
/// -1 (TCX_NEXT), so later programs on the hook run too.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
/// The destination of the test frames: the test run's device's address (the loopback
/// device's, all zeros), so that the kernel takes them as this host's (`PACKET_HOST`), as the
/// frames an uplink's programs translate are.
pub const MAC_B: [u8; 6] = [0; 6];
/// Another host's MAC address: a frame for it is `PACKET_OTHERHOST` here.
pub const MAC_OTHER_HOST: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

pub fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

#[derive(Clone, Copy, Default)]
pub struct Tcp {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}
pub const SYN: Tcp = Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Tcp = Tcp {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const ACK: Tcp = Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const FIN_ACK: Tcp = Tcp {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};
pub const RST: Tcp = Tcp {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};

pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, f: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 64240);
    if f.syn {
        b = b.syn();
    }
    if f.ack {
        b = b.ack(1);
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// An ICMP destination unreachable with `code` from `from` to `to`, quoting `quoted` (a frame:
/// its IP header, without options, and 8 bytes, as RFC 792 has it).
pub fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, code: u8, quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4_raw(3, code, [0; 4]);
    let q = &quoted[14..14 + 28];
    let mut v = Vec::new();
    b.write(&mut v, q).unwrap();
    v
}

/// Runs `program` once on `pkt`; returns the verdict and the packet as it left.
pub fn run(dp: &Dataplane, program: &'static str, pkt: &[u8]) -> (u32, Vec<u8>) {
    run_ctx(dp, program, pkt, None)
}

/// [`run`] on a GSO packet: the test run's `__sk_buff` says `gso_size` (one segment's payload).
pub fn run_gso(dp: &Dataplane, program: &'static str, pkt: &[u8], gso_size: u32) -> (u32, Vec<u8>) {
    // `struct __sk_buff` up to and including `gso_size` (offset 176), all else zero, as the
    // kernel's test run requires of the fields it does not take.
    let mut ctx = [0u8; 180];
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    ctx[164..168].copy_from_slice(&2u32.to_ne_bytes()); // gso_segs
    run_ctx(dp, program, pkt, Some(&ctx))
}

/// [`run`] as if the packet arrived on device `ifindex` (the test run's `__sk_buff` says so).
pub fn run_on(dp: &Dataplane, program: &'static str, pkt: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    // `struct __sk_buff` up to and including `ifindex` (offset 40), all else zero.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    run_ctx(dp, program, pkt, Some(&ctx))
}

/// What an XDP program returns for a packet it drops.
pub const XDP_DROP: u32 = 1;
/// What an XDP program returns for a packet it passes to the stack (and so to TC).
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Runs the XDP program `program` once on `pkt`; returns the verdict and the packet as it left.
/// The test run's packet comes in on the loopback device.
pub fn run_xdp(dp: &Dataplane, program: &'static str, pkt: &[u8]) -> (u32, Vec<u8>) {
    run_xdp_ctx(dp, program, pkt, None).unwrap()
}

/// [`run_xdp`] as if the packet came in on device `ifindex` (the test run's `xdp_md` says
/// so). `None` if the kernel takes no context for an XDP test run (before Linux 5.14).
pub fn run_xdp_on(
    dp: &Dataplane,
    program: &'static str,
    pkt: &[u8],
    ifindex: u32,
) -> Option<(u32, Vec<u8>)> {
    // `struct xdp_md`: data, data_end (the packet's length), data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    match run_xdp_ctx(dp, program, pkt, Some(&ctx)) {
        Ok(r) => Some(r),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
        Err(e) => panic!("XDP test run on ifindex {ifindex}: {e}"),
    }
}

fn run_xdp_ctx(
    dp: &Dataplane,
    program: &'static str,
    pkt: &[u8],
    ctx: Option<&[u8]>,
) -> std::io::Result<(u32, Vec<u8>)> {
    let prog = dp.xdp_program(program).unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat: 1,
            ..Default::default()
        })
        .map_err(|e| match e {
            aya::programs::ProgramError::SyscallError(s) => s.io_error,
            other => std::io::Error::other(other.to_string()),
        })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// [`run`] `n` times back to back inside one test run (no system call between the runs): the
/// packet each run sees is what the run before left, so only a packet its program leaves as
/// it was makes sense here. Returns the verdict.
pub fn run_repeated(dp: &Dataplane, program: &'static str, pkt: &[u8], n: u32) -> u32 {
    let prog = dp.program(program).unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat: n,
        ..Default::default()
    })
    .unwrap()
    .return_value
}

fn run_ctx(
    dp: &Dataplane,
    program: &'static str,
    pkt: &[u8],
    ctx: Option<&[u8]>,
) -> (u32, Vec<u8>) {
    let prog = dp.program(program).unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat: 1,
            ..Default::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// What a translated TCP/UDP packet says, after checking every checksum independently.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    pub udp_checksum: Option<u16>,
}

/// The packet parsed, and its IPv4 part, after checking its header checksum independently.
fn checked_ipv4<'a>(s: &'a SlicedPacket<'a>, pkt: &[u8]) -> &'a etherparse::Ipv4Slice<'a> {
    let Some(NetSlice::Ipv4(ip)) = &s.net else {
        panic!("not IPv4: {pkt:02x?}")
    };
    let h = ip.header();
    assert_eq!(
        h.header_checksum(),
        h.to_header().calc_header_checksum(),
        "IPv4 header checksum is wrong"
    );
    ip
}

/// Parses `pkt` and panics unless its IPv4 header checksum and TCP/UDP checksum are right.
pub fn check(pkt: &[u8]) -> Seen {
    let s = SlicedPacket::from_ethernet(pkt).expect("the packet parses");
    let h = checked_ipv4(&s, pkt).header();
    let (sport, dport, payload, udp_checksum) = match &s.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.calc_checksum_ipv4(h.source(), h.destination()).unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum is wrong");
            (
                t.source_port(),
                t.destination_port(),
                t.payload().to_vec(),
                None,
            )
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4_raw(h.source(), h.destination(), u.payload())
                    .unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum is wrong");
            }
            (
                u.source_port(),
                u.destination_port(),
                u.payload().to_vec(),
                Some(u.checksum()),
            )
        }
        other => panic!("not TCP or UDP: {other:?}"),
    };
    Seen {
        src: SocketAddrV4::new(h.source_addr(), sport),
        dst: SocketAddrV4::new(h.destination_addr(), dport),
        payload,
        udp_checksum,
    }
}

/// An ICMP error, after checking its IPv4 and ICMP checksums independently.
#[derive(Debug)]
pub struct Icmp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub type_: u8,
    pub code: u8,
    /// The quoted original packet (IPv4 header + 8 bytes).
    pub quoted: Vec<u8>,
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
}

pub fn check_icmp(pkt: &[u8]) -> Icmp {
    let s = SlicedPacket::from_ethernet(pkt).expect("the ICMP packet parses");
    let h = checked_ipv4(&s, pkt).header();
    let Some(TransportSlice::Icmpv4(i)) = &s.transport else {
        panic!("not ICMP: {:?}", s.transport)
    };
    let want = Icmpv4Header::with_checksum(i.icmp_type(), i.payload()).checksum;
    assert_eq!(i.checksum(), want, "ICMP checksum is wrong");
    Icmp {
        src: h.source_addr(),
        dst: h.destination_addr(),
        type_: i.type_u8(),
        code: i.code_u8(),
        quoted: i.payload().to_vec(),
        eth_src: pkt[6..12].try_into().unwrap(),
        eth_dst: pkt[0..6].try_into().unwrap(),
    }
}

/// The counters' change between two reads.
pub fn delta(
    before: &[Counter; CTR_MAX as usize],
    after: &[Counter; CTR_MAX as usize],
    i: u32,
) -> u64 {
    after[i as usize].packets - before[i as usize].packets
}

type Job = Box<dyn FnOnce(&mut Dataplane) + Send>;

/// A [`Dataplane`] living on a thread inside a node's network namespace, so that attaching
/// and detaching (netlink) happen there and never in the root namespace. Drop it before the
/// cluster it belongs to.
pub struct NodeDataplane {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NodeDataplane {
    /// Loads the dataplane in `node`'s namespace and attaches it to every pod device and the
    /// uplink, in the best mode the kernel has.
    pub fn start(node: &testbed::Node, config: sluice::dataplane::DataplaneConfig) -> Self {
        Self::start_mode(
            node,
            config,
            sluice::dataplane::AttachMode::best_available(),
        )
    }

    /// [`NodeDataplane::start`] with the attachment mode chosen by the caller.
    pub fn start_mode(
        node: &testbed::Node,
        config: sluice::dataplane::DataplaneConfig,
        mode: sluice::dataplane::AttachMode,
    ) -> Self {
        let ns = node.ns.name().to_owned();
        let pods: Vec<String> = node.pods.iter().map(|p| p.host_veth.clone()).collect();
        let uplink = node.uplink.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut dp = Dataplane::load_with(config).expect("the dataplane loads");
            for dev in &pods {
                dp.attach_pod_device(dev, mode)
                    .expect("attach to a pod device");
            }
            dp.attach_uplink(&uplink, mode)
                .expect("attach to the uplink");
            ready_tx.send(()).unwrap();
            for job in rx {
                job(&mut dp);
            }
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the dataplane started in the node namespace");
        Self {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    /// Runs `f` on the dataplane and returns its result.
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Dataplane) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .as_ref()
            .unwrap()
            .send(Box::new(move |dp| {
                let _ = tx.send(f(dp));
            }))
            .unwrap();
        rx.recv().expect("the dataplane thread answered")
    }
}

impl Drop for NodeDataplane {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// A node for the datapath's own forwarding (SNAT, FIB redirect), in a namespace of its own.

/// The node: its uplink `v0` holds NODE; the other node (a gateway to its pods) and the
/// outside client are permanent neighbours, so the FIB lookups resolve them.
pub const NODE: &str = "198.18.0.10";
pub const OTHER_NODE: &str = "198.18.0.11";
pub const CLIENT: &str = "198.18.0.100:40000";
pub const NODE_PORT: &str = "198.18.0.10:30080";
/// A pod on the other node, and one on a node behind a narrower path (MTU 1300).
pub const REMOTE: &str = "198.19.1.10:8080";
pub const NARROW: &str = "198.19.2.10:8080";
pub const OTHER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0];
pub const SNAT_PORTS: (u16, u16) = (20000, 20009);

/// The namespace: routes to the other nodes' pods, neighbours that never need resolving.
pub fn node_ns() -> testbed::Netns {
    let ns = testbed::Netns::new("fib").unwrap();
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .unwrap();
    ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "v0"])
        .unwrap();
    for dev in ["v0", "v1"] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let client = sa(CLIENT).ip().to_string();
    for (addr, m) in [(OTHER_NODE, OTHER_MAC), (client.as_str(), CLIENT_MAC)] {
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            &mac(m),
            "dev",
            "v0",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    ns.ip(&["route", "add", "198.19.1.0/24", "via", OTHER_NODE])
        .unwrap();
    ns.ip(&[
        "route",
        "add",
        "198.19.2.0/24",
        "via",
        OTHER_NODE,
        "mtu",
        "lock",
        "1300",
    ])
    .unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns
}

/// The MAC address of the namespace's `v0`.
pub fn v0_mac(ns: &str) -> [u8; 6] {
    let out = testbed::run(&["ip", "-n", ns, "-o", "link", "show", "v0"]).unwrap();
    let m = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap();
    let mut mac = [0u8; 6];
    for (b, h) in mac.iter_mut().zip(m.split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap();
    }
    mac
}

/// Runs `f` on a thread inside a fresh node namespace (given its name); the namespace goes
/// when it returns or panics.
pub fn in_node(f: impl FnOnce(&str) + Send + 'static) {
    let ns = node_ns();
    let name = ns.name().to_owned();
    ns.run_in(move || f(&name)).unwrap();
}

/// A frontend at `addr` ("a.b.c.d:port").
pub fn fe(
    addr: &str,
    proto: sluice::dataplane::Protocol,
    kind: sluice::dataplane::FrontendKind,
) -> sluice::dataplane::Frontend {
    let a = sa(addr);
    sluice::dataplane::Frontend {
        addr: *a.ip(),
        port: a.port(),
        proto,
        kind,
    }
}

/// A local backend at `addr`.
pub fn be(addr: &str) -> sluice::dataplane::Backend {
    let a = sa(addr);
    sluice::dataplane::Backend {
        addr: *a.ip(),
        port: a.port(),
        local: true,
    }
}

/// `clock`'s time now, in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Seconds until conntrack entry `e` expires.
pub fn lifetime_left_s(e: &sluice::dataplane::CtEntry) -> f64 {
    let now = clock_ns(libc::CLOCK_MONOTONIC);
    (e.expires_ns() as f64 - now as f64) / 1e9
}

/// A TCP connection from `client` to `frontend`, opened through a pod's programs: the
/// client's SYN (`sluice_from_pod`), `backend`'s SYN-ACK (`sluice_to_pod`), the client's ACK.
pub fn establish(
    dp: &Dataplane,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
) {
    run(
        dp,
        sluice::dataplane::FROM_POD,
        &tcp(client, frontend, SYN, b""),
    );
    run(
        dp,
        sluice::dataplane::TO_POD,
        &tcp(backend, client, SYN_ACK, b""),
    );
    run(
        dp,
        sluice::dataplane::FROM_POD,
        &tcp(client, frontend, ACK, b""),
    );
}

/// `frame` (Ethernet, IPv4 without options) with the direct-server-return option naming
/// `frontend` after its IPv4 header, as the ingress node writes it: type 0x9a, length 8, the
/// port, the address; header length, total length and checksum to match. Its destination MAC
/// is the test run's device's (the loopback device's, all zero): a frame for this host.
pub fn with_dsr_option(frame: &[u8], frontend: SocketAddrV4) -> Vec<u8> {
    let mut v = frame[..34].to_vec();
    v[..6].copy_from_slice(&MAC_B);
    v.extend_from_slice(&[0x9a, 8]);
    v.extend_from_slice(&frontend.port().to_be_bytes());
    v.extend_from_slice(&frontend.ip().octets());
    v.extend_from_slice(&frame[34..]);
    v[14] = 0x47;
    let tot = u16::from_be_bytes([v[16], v[17]]) + 8;
    v[16..18].copy_from_slice(&tot.to_be_bytes());
    set_ip_checksum(&mut v);
    v
}

/// The IPv4 header checksum of `frame`'s header, written in place.
pub fn set_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let mut sum: u32 = frame[14..14 + ihl]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Splits an IPv4 frame into fragments of `chunk` bytes of IP payload each (a multiple of 8),
/// all with IP id `id`, as a sender's kernel does for a datagram bigger than the MTU.
pub fn fragment(frame: &[u8], chunk: usize, id: u16) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0);
    let hdr = 14 + usize::from(frame[14] & 0x0f) * 4;
    let payload = &frame[hdr..];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut f = frame[..hdr].to_vec();
            let more = (i + 1) * chunk < payload.len();
            let frag_off = (i * chunk / 8) as u16 | if more { 0x2000 } else { 0 };
            f[16..18].copy_from_slice(&((hdr - 14 + part.len()) as u16).to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            f[20..22].copy_from_slice(&frag_off.to_be_bytes());
            f.extend_from_slice(part);
            set_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// Puts fragments (in order) back into one frame, as the receiver's kernel does. Panics unless
/// each fragment's IPv4 header checksum is right and all of them name one datagram (addresses,
/// id, protocol) with offsets that follow on; check the frame with [`check`].
pub fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let first = &frags[0];
    let hdr = 14 + usize::from(first[14] & 0x0f) * 4;
    let mut frame = first[..hdr].to_vec();
    for (i, f) in frags.iter().enumerate() {
        let mut again = f.clone();
        set_ip_checksum(&mut again);
        assert_eq!(
            again[24..26],
            f[24..26],
            "fragment {i}: IPv4 header checksum is wrong"
        );
        assert_eq!(
            f[26..34],
            first[26..34],
            "fragment {i}: another pair of addresses"
        );
        assert_eq!(f[18..20], first[18..20], "fragment {i}: another IP id");
        assert_eq!(f[23], first[23], "fragment {i}: another protocol");
        let frag_off = u16::from_be_bytes([f[20], f[21]]);
        assert_eq!(
            usize::from(frag_off & 0x1fff) * 8,
            frame.len() - hdr,
            "fragment {i}: offset"
        );
        assert_eq!(
            frag_off & 0x2000 != 0,
            i + 1 < frags.len(),
            "fragment {i}: MF"
        );
        let len = usize::from(u16::from_be_bytes([f[16], f[17]]));
        frame.extend_from_slice(&f[hdr..14 + len]);
    }
    let tot = (frame.len() - 14) as u16;
    frame[16..18].copy_from_slice(&tot.to_be_bytes());
    frame[20..22].copy_from_slice(&[0, 0]);
    set_ip_checksum(&mut frame);
    frame
}

/// What a device without checksum offload does to a partially checksummed packet before it
/// sends it (the kernel's `skb_checksum_help`): sums the bytes from `start` (the frame offset
/// of the L4 header the sender set) to the end, and writes the folded sum at `start + offset`,
/// 0 as 0xffff.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) {
    let mut sum: u32 = pkt[start..]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    pkt[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
}

/// CRC32c bit by bit (RFC 9260 appendix A): SCTP's checksum, computed independently of the
/// datapath's incremental update.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut r = !0u32;
    for &b in data {
        r ^= u32::from(b);
        for _ in 0..8 {
            r = if r & 1 != 0 {
                (r >> 1) ^ 0x82F6_3B78
            } else {
                r >> 1
            };
        }
    }
    !r
}

/// An SCTP packet from `src` to `dst` with verification tag 7 and `chunks` (whole chunks), its
/// checksum computed (stored little-endian, as Linux and RFC 9260 have it).
pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, chunks: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(12 + chunks.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&7u32.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    l4.extend_from_slice(chunks);
    let crc = crc32c(&l4);
    l4[8..12].copy_from_slice(&crc.to_le_bytes());
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.ip().octets(), dst.ip().octets(), 64);
    let mut v = Vec::new();
    b.write(&mut v, etherparse::IpNumber(132), &l4).unwrap();
    v
}

/// What a translated SCTP packet says, after checking its IPv4 header checksum and, unless it
/// is 0 (offloaded, or RFC 9653's zero checksum), its CRC32c.
#[derive(Debug, PartialEq, Eq)]
pub struct SctpSeen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub checksum: u32,
    /// The SCTP packet (common header and chunks), as the IP length bounds it.
    pub l4: Vec<u8>,
}

pub fn check_sctp(pkt: &[u8]) -> SctpSeen {
    let s = SlicedPacket::from_ethernet(pkt).expect("the packet parses");
    let ip = checked_ipv4(&s, pkt);
    let h = ip.header();
    assert_eq!(h.protocol().0, 132, "not SCTP");
    let l4 = ip.payload().payload.to_vec();
    let checksum = u32::from_le_bytes(l4[8..12].try_into().unwrap());
    if checksum != 0 {
        let mut zeroed = l4.clone();
        zeroed[8..12].fill(0);
        assert_eq!(checksum, crc32c(&zeroed), "SCTP checksum is wrong");
    }
    SctpSeen {
        src: SocketAddrV4::new(h.source_addr(), u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddrV4::new(h.destination_addr(), u16::from_be_bytes([l4[2], l4[3]])),
        checksum,
        l4,
    }
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let uts = nix::sys::utsname::uname().unwrap();
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Makes the veths `devs` of `ns` take XDP frames (what native XDP_TX or XDP_REDIRECT onto a
/// veth needs of the receiving end): `sluice_xdp_pass` attached in native mode, for as long as
/// the returned object lives.
pub fn take_xdp_frames(ns: &testbed::Netns, devs: &[String]) -> aya::Ebpf {
    let devs = devs.to_vec();
    ns.run_in(move || {
        let mut ebpf = aya::Ebpf::load(sluice::dataplane::EBPF_OBJECT).unwrap();
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(sluice::dataplane::XDP_PASS)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().unwrap();
        for dev in &devs {
            let name = std::ffi::CString::new(dev.as_str()).unwrap();
            prog.attach(name.as_c_str(), aya::programs::XdpMode::Driver)
                .unwrap_or_else(|e| panic!("native XDP on {dev}: {e}"));
        }
        ebpf
    })
    .unwrap()
}

/// A dataplane's conntrack with the times left out, in order: what two paths that record a
/// flow alike leave.
pub fn recorded(dp: &Dataplane) -> Vec<String> {
    let mut v: Vec<String> = dp
        .conntrack()
        .unwrap()
        .into_iter()
        .map(|mut e| {
            e.entry.seen_ns = 0;
            format!("{e:?}")
        })
        .collect();
    v.sort();
    v
}

/// Lets XDP send from the test run's device (the loopback device, where its packets come in)
/// and from `v0` (where the route to the remote endpoints leaves), in native mode.
pub fn let_xdp_send(dp: &mut sluice::dataplane::Dataplane) {
    for dev in ["lo", "v0"] {
        let index = nix::net::if_::if_nametoindex(dev).unwrap();
        dp.set_xdp_tx(index, Some(sluice::dataplane::XdpMode::Native))
            .unwrap();
    }
}
