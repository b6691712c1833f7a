//! Destroying the UDP sockets that socket LB connected to a backend that went away.
//!
//! A connected UDP socket was translated once, at `connect()`; its `send()`s never pass a
//! socket program again, so after its backend is gone it would keep sending to a dead pod (or
//! to whatever gets its address next): the most reported complaint about Cilium's and
//! Calico's socket LB. The agent finds such sockets by their cookies (kept in
//! `LB4_SOCK_REVNAT` with the backend they were sent to) and destroys them with netlink
//! `SOCK_DESTROY` (sock_diag, `CONFIG_INET_DIAG_DESTROY`): the application's next `recv()` or
//! `send()` fails with ECONNABORTED, and a client that reconnects is translated afresh, to a
//! live backend. sock_diag sees one network namespace, so this runs in each namespace of the
//! processes under the cgroup root, and in the agent's own.
use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

/// `struct inet_diag_sockid` (linux/inet_diag.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg` (the part before its attributes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(std::mem::size_of::<SockId>() == 48);
const _: () = assert!(std::mem::size_of::<Request>() == 56);
const _: () = assert!(std::mem::size_of::<Msg>() == 72);

fn cookie_of(id: &SockId) -> u64 {
    u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32)
}

/// What destroying found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Network namespaces looked at.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub sockets: usize,
}

/// Destroys the UDP sockets whose cookie is in `cookies`, in the agent's network namespace and
/// in that of every process under `cgroup_root`.
pub fn destroy_udp(cgroup_root: &Path, cookies: &HashSet<u64>) -> std::io::Result<Destroyed> {
    let mut done = Destroyed::default();
    if cookies.is_empty() {
        return Ok(done);
    }
    for ns in namespaces(cgroup_root) {
        let cookies = cookies.clone();
        // A thread of its own enters the namespace, so this one stays where it is.
        let n = std::thread::spawn(move || -> std::io::Result<usize> {
            if let Some(ns) = ns {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            destroy_here(&cookies)
        })
        .join()
        .map_err(|_| std::io::Error::other("the sock_diag thread panicked"))?;
        match n {
            Ok(n) => {
                done.namespaces += 1;
                done.sockets += n;
            }
            // The namespace's last process exited meanwhile: nothing to destroy there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The network namespaces to look in: `None` (the agent's own) and one open handle per other
/// namespace of the processes under `cgroup_root`.
fn namespaces(cgroup_root: &Path) -> Vec<Option<File>> {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut seen: BTreeMap<(u64, u64), File> = BTreeMap::new();
    let mut dirs = vec![cgroup_root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let path = format!("/proc/{pid}/ns/net");
            // Opened before its identity is read: the handle pins the namespace even if the
            // process exits now and its pid is reused.
            let Ok(f) = File::open(&path) else { continue };
            let Ok(m) = f.metadata() else { continue };
            let id = (m.dev(), m.ino());
            if Some(id) != own {
                seen.entry(id).or_insert(f);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    std::iter::once(None)
        .chain(seen.into_values().map(Some))
        .collect()
}

/// In the calling thread's namespace: dumps the IPv4 UDP sockets and destroys those with a
/// cookie in `cookies`. Returns how many it destroyed.
fn destroy_here(cookies: &HashSet<u64>) -> std::io::Result<usize> {
    let sock = open_sock_diag()?;
    let dump = Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        ..Default::default()
    };
    send(
        &sock,
        SOCK_DIAG_BY_FAMILY,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        &dump,
    )?;
    let mut victims = Vec::new();
    read_replies(&sock, |ty, payload| {
        if ty == SOCK_DIAG_BY_FAMILY && payload.len() >= std::mem::size_of::<Msg>() {
            // SAFETY: Msg is plain integers and `payload` holds at least its size.
            let msg: Msg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
            if cookies.contains(&cookie_of(&msg.id)) {
                victims.push(msg.id);
            }
        }
    })?;
    let mut destroyed = 0;
    for id in victims {
        let req = Request {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id,
            ..Default::default()
        };
        send(
            &sock,
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            &req,
        )?;
        match read_replies(&sock, |_, _| {}) {
            Ok(()) => destroyed += 1,
            // Closed by its owner meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(destroyed)
}

fn open_sock_diag() -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the result is checked and owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one netlink message of `ty` with `req` as its payload.
fn send(sock: &OwnedFd, ty: u16, flags: u16, req: &Request) -> std::io::Result<()> {
    let len = std::mem::size_of::<libc::nlmsghdr>() + std::mem::size_of::<Request>();
    let hdr = libc::nlmsghdr {
        nlmsg_len: len as u32,
        nlmsg_type: ty,
        nlmsg_flags: flags,
        nlmsg_seq: 1,
        nlmsg_pid: 0,
    };
    let mut buf = Vec::with_capacity(len);
    // SAFETY: both are plain-old-data structs; their bytes are read as they are.
    unsafe {
        buf.extend_from_slice(std::slice::from_raw_parts(
            (&raw const hdr).cast::<u8>(),
            std::mem::size_of::<libc::nlmsghdr>(),
        ));
        buf.extend_from_slice(std::slice::from_raw_parts(
            (req as *const Request).cast::<u8>(),
            std::mem::size_of::<Request>(),
        ));
    }
    // SAFETY: sends `buf`, which is `len` bytes, on our socket (to the kernel: no address).
    let n = unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink replies until NLMSG_DONE or an NLMSG_ERROR (an ack is an error of 0, any
/// other is returned), handing each other message's type and payload to `each`.
fn read_replies(sock: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let hdr_len = std::mem::size_of::<libc::nlmsghdr>();
    loop {
        // SAFETY: receives into `buf`, of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let data = &buf[..n as usize];
        let mut off = 0;
        while off + hdr_len <= data.len() {
            // SAFETY: nlmsghdr is plain integers and `hdr_len` bytes are there.
            let hdr: libc::nlmsghdr =
                unsafe { std::ptr::read_unaligned(data[off..].as_ptr().cast()) };
            let len = hdr.nlmsg_len as usize;
            if len < hdr_len || off + len > data.len() {
                return Err(std::io::Error::other("a malformed sock_diag reply"));
            }
            let payload = &data[off + hdr_len..off + len];
            match hdr.nlmsg_type {
                t if t == libc::NLMSG_DONE as u16 => return Ok(()),
                t if t == libc::NLMSG_ERROR as u16 => {
                    let err = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::from_raw_os_error(-err))
                    };
                }
                t => each(t, payload),
            }
            // Messages are 4-byte aligned.
            off += (len + 3) & !3;
        }
    }
}
