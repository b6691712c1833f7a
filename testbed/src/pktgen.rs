//! A packet generator for the benchmark's packet rate: UDP frames written straight to a device
//! with an `AF_PACKET` socket (this kernel has no pktgen module), from a thread inside a
//! namespace. Each send is one frame of one of a few flows, built once; the loop is bounded by
//! a duration and by a count, and stops by itself.
//!
//! What it measures is the path's cost per packet under a sender that never waits: on veths,
//! a frame sent is received by the peer on the sending CPU (in the softirq that follows the
//! send), so the rate is that of the whole chain, sender included, on one CPU; a receiver's
//! counters (not the sender's) say how many arrived.
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// What to send: `flows` UDP flows from `src` (source ports `src.port()`, `+1`, ...), flow `i`
/// to `dsts[i % dsts.len()]`, with `payload` bytes each, as frames from `smac` to `dmac` out
/// of `dev`. Several destinations spread the flows as a Service spreads them over its
/// backends, so that a path without a load balancer is measured with the same number of busy
/// receivers.
#[derive(Clone, Debug)]
pub struct Blast {
    pub dev: String,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: SocketAddrV4,
    pub dsts: Vec<SocketAddrV4>,
    pub flows: u16,
    pub payload: usize,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or after this many frames, whichever comes first.
    pub max_packets: u64,
}

/// What a blast did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    /// Sends the kernel refused (a full queue): not counted in `packets`.
    pub refused: u64,
    pub elapsed: Duration,
}

/// Ones' complement sum of `data` as 16-bit big-endian words, added to `sum`.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for w in data.chunks(2) {
        let hi = u32::from(w[0]) << 8;
        let lo = w.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One Ethernet + IPv4 + UDP frame of `b`'s flow `i` (source port `b.src.port() + i`, to
/// `b.dsts[i % len]`), checksums right.
pub fn udp_frame(b: &Blast, i: u16) -> Vec<u8> {
    let sport = b.src.port().wrapping_add(i);
    let dst = b.dsts[usize::from(i) % b.dsts.len()];
    let udp_len = 8 + b.payload;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&b.dmac);
    f.extend_from_slice(&b.smac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id 0, DF, TTL 64, UDP, checksum
    f.extend_from_slice(&b.src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let ip_csum = !fold(sum16(&f[ip_start..ip_start + 20], 0));
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let udp_start = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..b.payload).map(|i| b'a' + (i % 26) as u8));
    let pseudo = sum16(&b.src.ip().octets(), 0);
    let pseudo = sum16(&dst.ip().octets(), pseudo) + 17 + udp_len as u32;
    let mut csum = !fold(sum16(&f[udp_start..], pseudo));
    if csum == 0 {
        csum = 0xffff;
    }
    f[udp_start + 6..udp_start + 8].copy_from_slice(&csum.to_be_bytes());
    f
}

/// Sends `b` from a thread inside `ns`; returns what was sent.
pub fn blast(ns: &Netns, b: &Blast) -> std::io::Result<Sent> {
    let b = b.clone();
    ns.run_in(move || send_all(&b))?
}

fn send_all(b: &Blast) -> std::io::Result<Sent> {
    let ifindex = nix::net::if_::if_nametoindex(b.dev.as_str()).map_err(std::io::Error::from)?;
    if b.dsts.is_empty() {
        return Err(std::io::Error::other("a blast needs a destination"));
    }
    let frames: Vec<Vec<u8>> = (0..b.flows.max(1)).map(|i| udp_frame(b, i)).collect();
    // Protocol 0: this socket receives nothing.
    // SAFETY: a plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned from here on.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // Straight to the device's driver, past the qdisc, as a NIC's generator would.
    let one: libc::c_int = 1;
    // SAFETY: a valid option value of its size.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&b.dmac);
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            raw,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut packets, mut refused) = (0u64, 0u64);
    let t0 = Instant::now();
    'send: loop {
        for f in &frames {
            // SAFETY: `f` is a valid buffer of its length.
            let n = unsafe { libc::send(raw, f.as_ptr().cast(), f.len(), 0) };
            if n < 0 {
                refused += 1;
            } else {
                packets += 1;
            }
            if packets + refused >= b.max_packets {
                break 'send;
            }
        }
        // The clock is read once per round of flows: cheap beside the sends.
        if t0.elapsed() >= b.duration {
            break;
        }
    }
    Ok(Sent {
        packets,
        refused,
        elapsed: t0.elapsed(),
    })
}

/// The packets `dev` in `ns` has received since it was made (`ip -s link`'s RX packets), from
/// a 32-bit counter: compare two readings with a wrapping subtraction of their low 32 bits.
pub fn rx_packets(ns: &Netns, dev: &str) -> std::io::Result<u64> {
    link(ns, dev).map(|(rx, _)| rx)
}

/// The MAC address of `dev` in `ns`.
pub fn mac(ns: &Netns, dev: &str) -> std::io::Result<[u8; 6]> {
    link(ns, dev).map(|(_, mac)| mac)
}

fn link(ns: &Netns, dev: &str) -> std::io::Result<(u64, [u8; 6])> {
    let dev = dev.to_owned();
    // (sysfs shows the namespace that mounted it; getifaddrs answers for the thread's own.)
    ns.run_in(move || {
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).map_err(std::io::Error::from)?;
        link_of(ifindex)
    })?
}

/// RX packets and MAC address of the device `ifindex` of the calling thread's namespace, from
/// `getifaddrs`' link entries (AF_PACKET: a `sockaddr_ll`, and `struct rtnl_link_stats`).
fn link_of(ifindex: u32) -> std::io::Result<(u64, [u8; 6])> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap`, freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null()
            // SAFETY: a valid sockaddr from the list.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_PACKET
            && !ifa.ifa_data.is_null()
        {
            // SAFETY: an AF_PACKET address is a sockaddr_ll.
            let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
            if ll.sll_ifindex as u32 == ifindex {
                // SAFETY: for AF_PACKET entries, ifa_data is a `struct rtnl_link_stats`, whose
                // first field is rx_packets (a u32 since the device was made: it wraps).
                let rx = u64::from(unsafe { *(ifa.ifa_data as *const u32) });
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&ll.sll_addr[..6]);
                found = Some((rx, mac));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    found.ok_or_else(|| std::io::Error::other(format!("no link statistics for ifindex {ifindex}")))
}
