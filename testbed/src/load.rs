//! The benchmark's servers and load generator: Rust threads whose sockets live in pod
//! namespaces, so the measured cost is the network path and not an interpreter.
//!
//! One small request/response protocol serves every measure. A request is [`MSG`] bytes; its
//! first byte says what the server does after replying: [`CLOSE`] (reply, then close: one
//! request per connection, as an HTTP/1.0 server does, so the client never holds TIME_WAIT)
//! or [`KEEP`] (reply and wait for the next request). The reply is [`MSG`] bytes starting with
//! the pod's name, so the client can tell which backend answered. UDP uses the same
//! datagrams.
//!
//! Load loops are bounded twice, by a duration and by a count of operations, and every socket
//! operation has a timeout, so nothing here runs unbounded.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

use crate::netns::Netns;

/// Size of every request and reply.
pub const MSG: usize = 64;
/// Request flag: reply, then close the connection.
pub const CLOSE: u8 = b'C';
/// Request flag: reply and keep the connection open.
pub const KEEP: u8 = b'K';

/// How long any single socket operation may block.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Threads per TCP server: enough for every persistent connection of a run to have its own.
const SERVER_THREADS: usize = 16;
/// Threads on a backend's UDP socket: as many as the bench's load workers, each blocked in
/// `recv_from` on the one socket (more of them wake in a herd for each datagram).
const UDP_SERVER_THREADS: usize = 2;

fn enter(ns_name: &str) -> std::io::Result<()> {
    let f = File::open(format!("/run/netns/{ns_name}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// The reply a server called `name` sends: its name, padded to [`MSG`] bytes.
fn reply_for(name: &str) -> [u8; MSG] {
    let mut r = [b' '; MSG];
    let n = name.len().min(MSG);
    r[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

/// The backend name in a reply.
fn name_of(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).trim_end().to_owned()
}

/// A TCP server and a UDP echo server in one pod, both answering with the pod's name. Dropping
/// it stops every thread.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    tcp: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl BenchServer {
    /// Listens on `port` (TCP and UDP, on every address of the pod `ns`), answering as `name`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> std::io::Result<Self> {
        let (tcp, udp) = ns.run_in(move || -> std::io::Result<_> {
            let any = SocketAddr::from(([0, 0, 0, 0], port));
            Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let reply = reply_for(name);
        let mut threads = Vec::new();
        for _ in 0..SERVER_THREADS {
            let l = tcp.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((conn, _)) = l.accept() {
                        serve_tcp(conn, &reply, &stop);
                    }
                }
            }));
        }
        // Several threads on the one UDP socket, as on the TCP listener: each datagram goes to
        // a thread that is free. With one thread, two clients' flows on the same backend (as a
        // Service's random choice often puts them) made it the bottleneck, and the UDP rate
        // fell five- to sevenfold in whichever cells that happened.
        udp.set_read_timeout(Some(Duration::from_millis(200)))?;
        for _ in 0..UDP_SERVER_THREADS {
            let u = udp.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; MSG];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = u.recv_from(&mut buf)
                        && n == MSG
                    {
                        let _ = u.send_to(&reply, peer);
                    }
                }
            }));
        }
        Ok(Self { stop, tcp, threads })
    }
}

fn serve_tcp(mut conn: TcpStream, reply: &[u8; MSG], stop: &AtomicBool) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let mut req = [0u8; MSG];
    while !stop.load(Ordering::Relaxed) {
        if conn.read_exact(&mut req).is_err() || conn.write_all(reply).is_err() {
            return;
        }
        if req[0] == CLOSE {
            return;
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown(2) wakes every thread blocked in accept(2) on the listener. The UDP thread
        // wakes on its read timeout (a shut-down UDP socket would hand std's recv_from an
        // empty peer address, which it asserts against).
        // SAFETY: the descriptor is owned by `self` and open until it is dropped.
        unsafe {
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One load run: closed-loop workers, each with one request outstanding at a time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Where to send requests; worker `w`'s `i`th operation goes to `targets[(w + i) % len]`
    /// (one target for a Service address; several for the direct path, spread like a
    /// balancer would).
    pub targets: Vec<SocketAddrV4>,
    pub workers: usize,
    /// Operations in this first stretch are not counted (connections set up, caches warm).
    pub warmup: Duration,
    /// The measured stretch, after the warmup.
    pub duration: Duration,
    /// A bound on counted operations per worker, whatever the duration.
    pub max_ops_per_worker: u64,
}

/// What a load run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Operations that completed within the measured stretch.
    pub ops: u64,
    /// Operations that failed (timeout, refused, reset, short reply).
    pub errors: u64,
    /// Operations that completed in the warm-up, not counted in `ops`.
    pub warmup_ops: u64,
    /// Length of the measured stretch (up to the last worker's end).
    pub elapsed: Duration,
    /// Latency of every counted operation, sorted, in ns.
    pub latencies_ns: Vec<u64>,
    /// Counted operations per answering backend.
    pub per_backend: BTreeMap<String, u64>,
}

impl LoadResult {
    /// Completed operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`th percentile latency (0 < p <= 100) in µs, or `None` with no samples.
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        percentile(&self.latencies_ns, p).map(|ns| ns as f64 / 1e3)
    }

    fn merge(&mut self, other: WorkerResult) {
        self.ops += other.latencies_ns.len() as u64;
        self.errors += other.errors;
        self.warmup_ops += other.warmup_ops;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.latencies_ns.extend(other.latencies_ns);
        for (k, v) in other.per_backend {
            *self.per_backend.entry(k).or_default() += v;
        }
    }
}

/// The nearest-rank percentile of sorted `v`.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[derive(Default)]
struct WorkerResult {
    errors: u64,
    warmup_ops: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
    per_backend: BTreeMap<String, u64>,
}

/// One operation: sends a request and waits for the reply; returns the answering backend.
type Op<'a> = dyn FnMut(usize) -> std::io::Result<String> + 'a;

/// Runs `make_op(worker)`'s operations on `spec.workers` threads inside `ns` (`None`: the
/// caller's own namespace).
fn drive<F>(ns: Option<&Netns>, spec: &LoadSpec, make_op: F) -> std::io::Result<LoadResult>
where
    F: Fn(usize) -> Box<Op<'static>> + Send + Sync + 'static,
{
    assert!(!spec.targets.is_empty() && spec.workers > 0);
    let make_op = Arc::new(make_op);
    let start = Instant::now();
    let begin = start + spec.warmup;
    let end = begin + spec.duration;
    let mut handles = Vec::new();
    for w in 0..spec.workers {
        let name = ns.map(|n| n.name().to_owned());
        let make_op = make_op.clone();
        let max = spec.max_ops_per_worker;
        handles.push(std::thread::spawn(
            move || -> std::io::Result<WorkerResult> {
                if let Some(name) = &name {
                    enter(name)?;
                }
                let mut op = make_op(w);
                let mut r = WorkerResult {
                    latencies_ns: Vec::with_capacity(4096),
                    ..Default::default()
                };
                let mut i = w;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end || r.latencies_ns.len() as u64 >= max {
                        break;
                    }
                    let res = op(i);
                    let t1 = Instant::now();
                    i += 1;
                    if t0 < begin {
                        r.warmup_ops += u64::from(res.is_ok());
                        continue;
                    }
                    match res {
                        Ok(backend) => {
                            r.latencies_ns.push((t1 - t0).as_nanos() as u64);
                            *r.per_backend.entry(backend).or_default() += 1;
                        }
                        Err(_) => r.errors += 1,
                    }
                }
                r.elapsed = Instant::now().saturating_duration_since(begin);
                Ok(r)
            },
        ));
    }
    let mut total = LoadResult::default();
    for h in handles {
        let r = h.join().expect("a load worker panicked")?;
        total.merge(r);
    }
    total.latencies_ns.sort_unstable();
    Ok(total)
}

fn request(flag: u8) -> [u8; MSG] {
    let mut r = [b'.'; MSG];
    r[0] = flag;
    r
}

/// One request per TCP connection: connect, send, read the reply and the server's close. The
/// latency is connect to close.
pub fn tcp_new_connections(ns: &Netns, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    tcp_new_connections_in(Some(ns), spec)
}

fn tcp_new_connections_in(ns: Option<&Netns>, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    let targets = spec.targets.clone();
    drive(ns, spec, move |_| {
        let targets = targets.clone();
        Box::new(move |i| {
            let to = SocketAddr::V4(targets[i % targets.len()]);
            let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(&request(CLOSE))?;
            let mut buf = [0u8; MSG];
            s.read_exact(&mut buf)?;
            // The server closes first (so TIME_WAIT stays on its side); the response is
            // complete at end of file, as an HTTP/1.0 client sees it.
            let mut rest = [0u8; 1];
            if s.read(&mut rest)? != 0 {
                return Err(std::io::Error::other("the server sent more than one reply"));
            }
            Ok(name_of(&buf))
        })
    })
}

/// Request/response on long-lived TCP connections, one per worker (worker `w` connects to
/// `targets[w % len]`). The latency is one request's round trip.
pub fn tcp_persistent(ns: &Netns, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    tcp_persistent_in(Some(ns), spec)
}

fn tcp_persistent_in(ns: Option<&Netns>, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    let targets = spec.targets.clone();
    drive(ns, spec, move |w| {
        let to = SocketAddr::V4(targets[w % targets.len()]);
        let mut conn: Option<TcpStream> = None;
        Box::new(move |_| {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                conn = Some(s);
            }
            let s = conn.as_mut().expect("just connected");
            let mut buf = [0u8; MSG];
            let res = s
                .write_all(&request(KEEP))
                .and_then(|()| s.read_exact(&mut buf));
            if let Err(e) = res {
                conn = None;
                return Err(e);
            }
            Ok(name_of(&buf))
        })
    })
}

/// UDP request/response on one connected socket per worker (worker `w` sends to
/// `targets[w % len]`). A lost datagram counts as an error after the I/O timeout.
pub fn udp_request_response(ns: &Netns, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    udp_request_response_in(Some(ns), spec)
}

fn udp_request_response_in(ns: Option<&Netns>, spec: &LoadSpec) -> std::io::Result<LoadResult> {
    let targets = spec.targets.clone();
    drive(ns, spec, move |w| {
        let to = targets[w % targets.len()];
        let mut sock: Option<UdpSocket> = None;
        Box::new(move |_| {
            if sock.is_none() {
                let s = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
                s.connect(to)?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                sock = Some(s);
            }
            let s = sock.as_ref().expect("just bound");
            s.send(&request(KEEP))?;
            let mut buf = [0u8; MSG];
            let n = s.recv(&mut buf)?;
            if n != MSG {
                return Err(std::io::Error::other(format!("a {n}-byte reply")));
            }
            Ok(name_of(&buf))
        })
    })
}

/// What a load run does: [`tcp_new_connections`], [`tcp_persistent`] or
/// [`udp_request_response`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    TcpNew,
    TcpPersistent,
    Udp,
}

/// Runs `kind` in a process of its own started inside `ns`, and so in the namespace's cgroup
/// when it has one ([`crate::cgroup::assign`]): a pod's client process, whose sockets the
/// cgroup's socket programs see. (Threads cannot join another cgroup without their whole
/// process.) `exe` is the calling binary, which must call [`child_main`] before anything else.
pub fn run_in_child(
    ns: &Netns,
    exe: &std::path::Path,
    kind: Kind,
    spec: &LoadSpec,
) -> std::io::Result<LoadResult> {
    let exe = exe.to_string_lossy().into_owned();
    let input = serde_json::to_vec(&(kind, spec)).map_err(std::io::Error::other)?;
    // Every operation is bounded by its I/O timeout, so the run ends by then.
    let timeout = spec.warmup + spec.duration + Duration::from_secs(60);
    let out =
        crate::cmd::output_with_input(&ns.exec_argv(&[&exe, CHILD_FLAG]), Some(input), timeout)
            .map_err(std::io::Error::other)?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "the load process failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)
}

/// The argument that makes a binary the load process of [`run_in_child`].
pub const CHILD_FLAG: &str = "--load-child";

/// When this process was started by [`run_in_child`]: runs the load it was given on stdin in
/// its own namespace, writes the result to stdout and exits. Otherwise returns.
pub fn child_main() {
    if std::env::args().nth(1).as_deref() != Some(CHILD_FLAG) {
        return;
    }
    let result = (|| -> std::io::Result<LoadResult> {
        let (kind, spec): (Kind, LoadSpec) =
            serde_json::from_reader(std::io::stdin().lock()).map_err(std::io::Error::other)?;
        match kind {
            Kind::TcpNew => tcp_new_connections_in(None, &spec),
            Kind::TcpPersistent => tcp_persistent_in(None, &spec),
            Kind::Udp => udp_request_response_in(None, &spec),
        }
    })();
    match result.and_then(|r| {
        serde_json::to_writer(std::io::stdout().lock(), &r).map_err(std::io::Error::other)
    }) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("load process: {e}");
            std::process::exit(1)
        }
    }
}

/// Prepares a client namespace for many short connections: the whole ephemeral port range,
/// and TIME_WAIT reuse for outgoing connections.
pub fn tune_client(ns: &Netns) -> Result<(), crate::CmdError> {
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.1), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn replies_carry_the_backend_name() {
        assert_eq!(name_of(&reply_for("backend-a")), "backend-a");
        assert_eq!(reply_for("x").len(), MSG);
    }
}
