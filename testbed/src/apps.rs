//! Real servers and clients, run inside namespaces, each bounded in time.
//!
//! - [`HttpServer`]: python3's http.server answering every GET with the pod's name.
//! - [`UdpEcho`]: a python3 UDP server answering `<pod name> <payload>`.
//! - [`curl`]: one HTTP request with curl, reporting the body and the peer curl talked to.
//! - [`udp_request`]: one UDP request and its reply, with the reply's source address.
//!
//! Servers are killed, by the pid we started, when dropped.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{cmd::CmdError, netns::Netns};

const HTTP_SERVER_PY: &str = r#"
import http.server, socketserver, sys
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Client", "%s:%d" % self.client_address)
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        # An upload: reads it whole and answers `<name> <bytes received>`.
        n, left = 0, int(self.headers.get("Content-Length", "0"))
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            n, left = n + len(chunk), left - len(chunk)
        body = ("%s %d\n" % (name, n)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
    def server_bind(self):
        # HTTPServer.server_bind looks the host's name up (socket.getfqdn). Inside a pod
        # namespace that is a DNS query to a resolver the sandbox cannot reach whenever the
        # machine's /etc/hosts lacks its hostname: 10 s of timeouts before "ready".
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = name, self.server_address[1]
s = S(("0.0.0.0", port), H)
print("ready", flush=True)
s.serve_forever()
"#;

const UDP_ECHO_PY: &str = r#"
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(name.encode() + b" " + data, peer)
"#;

const UDP_CLIENT_PY: &str = r#"
import socket, sys
addr, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.sendto(payload.encode(), (addr, port))
data, peer = s.recvfrom(65535)
print("%s:%d" % peer)
print(data.decode())
"#;

const SCTP_ECHO_PY: &str = r#"
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    try:
        c.settimeout(10)
        data = c.recv(65536)
        c.sendall(("%s %s:%d %s" % (name, peer[0], peer[1], data.decode())).encode())
    except Exception:
        pass
    c.close()
"#;

const SCTP_CLIENT_PY: &str = r#"
import socket, sys
addr, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.settimeout(timeout)
s.connect((addr, port))
s.sendall(payload.encode())
data = s.recv(65536)
print("%s:%d" % s.getpeername())
print(data.decode())
s.close()
"#;

/// Starts `argv` inside `ns` with stdout piped (stderr to ours); returns the child and the
/// command line, for error messages.
fn spawn_in(ns: &Netns, argv: &[&str]) -> Result<(Child, String), CmdError> {
    spawn_in_with(ns, argv, Stdio::null())
}

/// [`spawn_in`] with `stdin` for the process's standard input.
fn spawn_in_with(ns: &Netns, argv: &[&str], stdin: Stdio) -> Result<(Child, String), CmdError> {
    let full = ns.exec_argv(argv);
    let cmd = full.join(" ");
    let child = crate::cmd::command(&full)?
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    Ok((child, cmd))
}

/// Reads one line (without its newline) from `child`'s piped stdout, byte by byte so that
/// nothing after it is consumed; empty at end of file or without a piped stdout.
fn first_line(child: &mut Child) -> Vec<u8> {
    let mut line = Vec::new();
    let Some(stdout) = child.stdout.as_mut() else {
        return line;
    };
    let mut b = [0u8; 1];
    while std::io::Read::read(stdout, &mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    line
}

/// A server process started inside a namespace, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `argv` in `ns` and waits (at most 60 s) for it to print `ready`. python3 starts
    /// in well under a second here, but takes more than 10 s in a Linux 5.10 guest under
    /// software emulation (the kernel matrix), where a shorter wait failed a test that had
    /// nothing wrong with it.
    fn start(ns: &Netns, argv: &[&str], port: u16) -> Result<Self, CmdError> {
        let (mut child, cmd) = spawn_in(ns, argv)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let timeout = Duration::from_secs(60);
        match rx.recv_timeout(timeout) {
            Ok(line) if line.trim() == "ready" => Ok(Self { child, port }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(CmdError::Timeout { cmd, timeout })
            }
        }
    }

    /// The python3 server `script` (argv: the pod's name, the port) on `port` in `ns`.
    fn python(ns: &Netns, script: &str, name: &str, port: u16) -> Result<Self, CmdError> {
        let port_s = port.to_string();
        Self::start(ns, &["python3", "-c", script, name, &port_s], port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// python3's http.server on `0.0.0.0:port`, answering every GET with `<name>\n` (and a header
/// `X-Client` naming the address it saw the request come from), and every POST with
/// `<name> <bytes received>\n`.
#[derive(Debug)]
pub struct HttpServer(pub Server);

impl HttpServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self, CmdError> {
        Server::python(ns, HTTP_SERVER_PY, name, port).map(Self)
    }
}

/// A UDP server on `0.0.0.0:port` answering each datagram with `<name> <payload>`.
#[derive(Debug)]
pub struct UdpEcho(pub Server);

impl UdpEcho {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self, CmdError> {
        Server::python(ns, UDP_ECHO_PY, name, port).map(Self)
    }
}

/// An SCTP server (one-to-one style) on `0.0.0.0:port` answering each association's first
/// message with `<name> <client address:port as it saw it> <payload>`. Needs the kernel's SCTP
/// (the `sctp` module, which the kernel matrix's guests load).
#[derive(Debug)]
pub struct SctpEcho(pub Server);

impl SctpEcho {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self, CmdError> {
        Server::python(ns, SCTP_ECHO_PY, name, port).map(Self)
    }
}

/// Whether this kernel has SCTP loaded (it is not loaded here on demand: a test must not load
/// kernel modules into the machine it runs on).
pub fn sctp_available() -> bool {
    std::path::Path::new("/sys/module/sctp").exists()
}

/// What one SCTP request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SctpReply {
    /// The association's peer as the client's socket saw it (`getpeername`).
    pub peer: SocketAddrV4,
    /// The answering pod's name.
    pub server: String,
    /// The client's address and port as the server saw them.
    pub client: SocketAddrV4,
    pub payload: String,
}

/// Opens an SCTP association to `addr:port` from inside `ns`, sends `payload`, and reads the
/// answer of [`SctpEcho`], all within `timeout`.
pub fn sctp_request(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> Result<SctpReply, CmdError> {
    let out = python_client(ns, SCTP_CLIENT_PY, addr, port, payload, timeout)?;
    let mut lines = out.lines();
    let unparsed = || SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let peer = lines
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(unparsed);
    let answer = lines.next().unwrap_or_default();
    let mut words = answer.splitn(3, ' ');
    Ok(SctpReply {
        peer,
        server: words.next().unwrap_or_default().to_owned(),
        client: words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(unparsed),
        payload: words.next().unwrap_or_default().to_owned(),
    })
}

/// What one HTTP request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The body, trimmed: the answering pod's name.
    pub body: String,
    /// The address and port curl was connected to, as the client's socket saw it.
    pub peer: SocketAddrV4,
    /// The client's address and port as the server saw them (its `X-Client` header).
    pub client: Option<SocketAddrV4>,
}

/// One `GET http://addr:port/` with curl from inside `ns`, within `timeout`.
pub fn curl(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<HttpReply, CmdError> {
    let url = format!("http://{addr}:{port}/");
    let max = format!("{:.1}", timeout.as_secs_f64());
    let out = ns.exec_timeout(
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            &max,
            "-w",
            "\n%{remote_ip} %{remote_port} %header{x-client}",
            &url,
        ],
        timeout + Duration::from_secs(2),
    )?;
    let (body, peer) = out.rsplit_once('\n').unwrap_or(("", &out));
    let mut it = peer.split_whitespace();
    let ip = it.next().and_then(|s| s.parse().ok());
    let port = it.next().and_then(|s| s.parse().ok());
    let peer = match (ip, port) {
        (Some(ip), Some(port)) => SocketAddrV4::new(ip, port),
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    };
    Ok(HttpReply {
        body: body.trim().to_owned(),
        peer,
        client: it.next().and_then(|s| s.parse().ok()),
    })
}

/// An HTTP POST of `bytes` bytes to `addr:port` with curl from inside `ns`, within `timeout`;
/// returns the body (`<pod name> <bytes the server received>`). Large uploads need path-MTU
/// discovery to work end to end.
pub fn http_upload(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    bytes: usize,
    timeout: Duration,
) -> Result<String, CmdError> {
    let url = format!("http://{addr}:{port}/");
    let max = format!("{:.1}", timeout.as_secs_f64());
    let data = "x".repeat(bytes);
    let out = ns.exec_with_input(
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            &max,
            "-H",
            "Expect:",
            "--data-binary",
            "@-",
            &url,
        ],
        &data,
        timeout + Duration::from_secs(2),
    )?;
    Ok(out.trim().to_owned())
}

const UDP_CONNECTED_PY: &str = r#"
import socket, sys
addr, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.connect((addr, port))
try:
    s.send(payload.encode())
    data = s.recv(65535)
    print("OK %s:%d %s" % (s.getpeername() + (data.decode(),)))
except ConnectionRefusedError:
    print("REFUSED")
except socket.timeout:
    print("TIMEOUT")
"#;

/// What a connected UDP client got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpOutcome {
    /// A reply: the socket's peer and the data.
    Reply { peer: SocketAddrV4, data: String },
    /// ECONNREFUSED: an ICMP port unreachable matched the socket.
    Refused,
    /// Nothing within the timeout.
    Timeout,
}

/// Sends `payload` over a UDP socket *connected* to `addr:port` from inside `ns` and waits
/// `timeout`: a connected socket learns of an ICMP port unreachable (ECONNREFUSED) only when
/// the error quotes the packet it sent, to the address it connected to.
pub fn udp_connected(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> Result<UdpOutcome, CmdError> {
    let out = python_client(ns, UDP_CONNECTED_PY, addr, port, payload, timeout)?;
    let line = out.trim();
    Ok(match line {
        "REFUSED" => UdpOutcome::Refused,
        "TIMEOUT" => UdpOutcome::Timeout,
        _ => {
            let rest = line.strip_prefix("OK ").unwrap_or(line);
            let (peer, data) = rest.split_once(' ').unwrap_or((rest, ""));
            UdpOutcome::Reply {
                peer: peer
                    .parse()
                    .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
                data: data.to_owned(),
            }
        }
    })
}

/// What one UDP request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    /// The reply's source address as the client's socket saw it.
    pub from: SocketAddrV4,
    /// The reply: `<pod name> <payload>` from [`UdpEcho`].
    pub data: String,
}

/// Runs the python client `script` (argv: address, port, payload, timeout) inside `ns`.
fn python_client(
    ns: &Netns,
    script: &str,
    addr: Ipv4Addr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> Result<String, CmdError> {
    ns.exec_timeout(
        &[
            "python3",
            "-c",
            script,
            &addr.to_string(),
            &port.to_string(),
            payload,
            &format!("{:.1}", timeout.as_secs_f64()),
        ],
        timeout + Duration::from_secs(5),
    )
}

/// Sends `payload` to `addr:port` over UDP from inside `ns` and waits `timeout` for a reply.
pub fn udp_request(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> Result<UdpReply, CmdError> {
    let out = python_client(ns, UDP_CLIENT_PY, addr, port, payload, timeout)?;
    let mut lines = out.lines();
    let from = lines
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    Ok(UdpReply {
        from,
        data: lines.next().unwrap_or_default().to_owned(),
    })
}

const HTTP_MANY_PY: &str = r#"
import socket, sys
addr, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for i in range(n):
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        peer = "%s:%d" % s.getpeername()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
        print("OK", peer, body, flush=True)
    except Exception as e:
        print("ERR", type(e).__name__, str(e).replace("\n", " "), flush=True)
"#;

/// The outcome of one of [`http_many`]'s connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The peer the client's socket was connected to, and the body (the pod's name).
    Ok {
        peer: SocketAddrV4,
        body: String,
    },
    Err(String),
}

/// `n` HTTP requests from inside `ns`, each on a new TCP connection, one after the other
/// (python3, each connection bounded by `timeout`).
pub fn http_many(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    n: u32,
    timeout: Duration,
) -> Result<Vec<Attempt>, CmdError> {
    let out = ns.exec_timeout(
        &[
            "python3",
            "-c",
            HTTP_MANY_PY,
            &addr.to_string(),
            &port.to_string(),
            &n.to_string(),
            &format!("{:.1}", timeout.as_secs_f64()),
        ],
        timeout * n + Duration::from_secs(10),
    )?;
    Ok(out
        .lines()
        .map(|l| {
            let mut it = l.splitn(3, ' ');
            match (it.next(), it.next(), it.next()) {
                (Some("OK"), Some(peer), Some(body)) => match peer.parse() {
                    Ok(peer) => Attempt::Ok {
                        peer,
                        body: body.to_owned(),
                    },
                    Err(_) => Attempt::Err(l.to_owned()),
                },
                _ => Attempt::Err(l.to_owned()),
            }
        })
        .collect())
}

const KEEPALIVE_PY: &str = r#"
import http.client, os, sys, time
addr, port, n, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
# Optional: a path whose creation ends the requests early (KeepAlive::stop).
stop = sys.argv[5] if len(sys.argv) > 5 else None
c = http.client.HTTPConnection(addr, port, timeout=5)
c.connect()
print("PEER %s:%d LOCAL %s:%d" % (c.sock.getpeername() + c.sock.getsockname()), flush=True)
for i in range(n):
    try:
        c.request("GET", "/")
        r = c.getresponse()
        print("OK", r.read().decode().strip(), flush=True)
    except Exception as e:
        print("ERR", type(e).__name__, e, flush=True)
        break
    if stop and os.path.exists(stop):
        break
    time.sleep(interval)
print("DONE", flush=True)
"#;

/// One long-lived HTTP/1.1 connection making `n` requests, `interval` apart, in the
/// background. [`KeepAlive::finish`] waits for it and returns what it printed.
#[derive(Debug)]
pub struct KeepAlive {
    child: Child,
    /// Lines already read by [`KeepAlive::connected`].
    read: Vec<String>,
    /// For [`KeepAlive::until_stopped`]: the path whose creation ends the requests.
    stop: Option<std::path::PathBuf>,
}

impl KeepAlive {
    pub fn start(
        ns: &Netns,
        addr: Ipv4Addr,
        port: u16,
        n: u32,
        interval: Duration,
    ) -> Result<Self, CmdError> {
        let (a, p, n, i) = (
            addr.to_string(),
            port.to_string(),
            n.to_string(),
            format!("{:.3}", interval.as_secs_f64()),
        );
        let (child, _) = spawn_in(ns, &["python3", "-c", KEEPALIVE_PY, &a, &p, &n, &i])?;
        Ok(Self {
            child,
            read: Vec::new(),
            stop: None,
        })
    }

    /// [`KeepAlive::start`] that goes on until [`KeepAlive::stop`] (at most `max` requests):
    /// for a test whose steps take as long as the machine makes them.
    pub fn until_stopped(
        ns: &Netns,
        addr: Ipv4Addr,
        port: u16,
        max: u32,
        interval: Duration,
    ) -> Result<Self, CmdError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let stop = std::env::temp_dir().join(format!(
            "sluice-keepalive-{}-{}.stop",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let (a, p, n, i, f) = (
            addr.to_string(),
            port.to_string(),
            max.to_string(),
            format!("{:.3}", interval.as_secs_f64()),
            stop.display().to_string(),
        );
        let (child, _) = spawn_in(ns, &["python3", "-c", KEEPALIVE_PY, &a, &p, &n, &i, &f])?;
        Ok(Self {
            child,
            read: Vec::new(),
            stop: Some(stop),
        })
    }

    /// Ends the requests of [`KeepAlive::until_stopped`] after the one under way, and returns
    /// the output lines as [`KeepAlive::finish`] does.
    pub fn stop(self, timeout: Duration) -> Vec<String> {
        if let Some(path) = &self.stop {
            let _ = std::fs::write(path, b"");
        }
        self.finish(timeout)
    }

    /// Waits until the connection is made, however slowly python starts (a guest under
    /// software emulation takes seconds), and returns its `PEER ...` line; `None` if the
    /// client ended first (its connect failed: the client's own 5 s timeout bounds this).
    pub fn connected(&mut self) -> Option<String> {
        self.child.stdout.as_ref()?;
        let line = String::from_utf8_lossy(&first_line(&mut self.child)).into_owned();
        self.read.push(line.clone());
        line.starts_with("PEER ").then_some(line)
    }

    /// Waits (at most `timeout`) and returns the output lines: `PEER ...`, then `OK <body>`
    /// per request, then `DONE`.
    pub fn finish(mut self, timeout: Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
        }
        let mut lines = std::mem::take(&mut self.read);
        lines.extend(out.lines().map(str::to_owned));
        lines
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.stop {
            let _ = std::fs::remove_file(path);
        }
    }
}

const SNIFF_PY: &str = r#"
import os, socket, sys, time, select
iface, src, dst, n, grace = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
# ETH_P_ALL: only such sockets see outgoing packets too.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((iface, 0))
print("ready", flush=True)
# Until n are seen; once stdin closes (the traffic was sent), for at most `grace` more. A
# bound of its own too, in case the test never closes it.
end = time.time() + 600
got = 0
watch = [s, sys.stdin]
while got < n and time.time() < end:
    r, _, _ = select.select(watch, [], [], max(0.0, end - time.time()))
    if sys.stdin in r:
        if not os.read(sys.stdin.fileno(), 1):
            watch = [s]
            end = min(end, time.time() + grace)
        continue
    if not r:
        break
    frame = s.recv(65535)
    ip = frame[14:]
    if frame[12:14] == b"\x08\x00" and len(ip) >= 20 and socket.inet_ntoa(ip[12:16]) == src and socket.inet_ntoa(ip[16:20]) == dst:
        print(ip.hex(), flush=True)
        got += 1
"#;

/// Captures (AF_PACKET) the IPv4 packets from `src` to `dst` seen on `iface` in `ns`, both
/// directions of the device, until `n` are seen, or until `grace` after [`Sniffer::finish`]
/// (the traffic was sent). The capture has no deadline while the test sends, however slowly a
/// guest under software emulation starts the senders.
#[derive(Debug)]
pub struct Sniffer {
    child: Child,
}

impl Sniffer {
    pub fn start(
        ns: &Netns,
        iface: &str,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        n: u32,
        grace: Duration,
    ) -> Result<Self, CmdError> {
        let (s, d, n, t) = (
            src.to_string(),
            dst.to_string(),
            n.to_string(),
            format!("{:.1}", grace.as_secs_f64()),
        );
        let (mut child, cmd) = spawn_in_with(
            ns,
            &["python3", "-c", SNIFF_PY, iface, &s, &d, &n, &t],
            Stdio::piped(),
        )?;
        // Wait for "ready" without consuming more than that line.
        let line = first_line(&mut child);
        if line != b"ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CmdError::Timeout {
                cmd,
                timeout: Duration::from_secs(0),
            });
        }
        Ok(Self { child })
    }

    /// Tells the capture the traffic was sent, waits for it to end (at most its grace), and
    /// returns the IPv4 packets it saw.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        drop(self.child.stdin.take());
        // Read to the end before waiting: a capture bigger than the pipe's buffer (64 KiB of
        // hex, some 20 full-size packets) blocks the sniffer until it is read.
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
        }
        let _ = self.child.wait();
        out.lines()
            .filter_map(|l| {
                (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(l.get(i..i + 2)?, 16).ok())
                    .collect()
            })
            .collect()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SEND_FRAME_PY: &str = r#"
import socket, sys
iface, hexframe = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
s.send(bytes.fromhex(hexframe))
"#;

/// Sends one raw Ethernet frame out of `iface` in `ns` (AF_PACKET), exactly as given.
pub fn send_frame(ns: &Netns, iface: &str, frame: &[u8]) -> Result<(), CmdError> {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    ns.exec(&["python3", "-c", SEND_FRAME_PY, iface, &hex])
        .map(drop)
}

/// One HTTP/1.0 GET of `path` from the calling thread's namespace, on a new connection, within
/// `timeout` for the connect and again for the answer: the status code and the body, trimmed.
pub fn http_get(
    to: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: sandbox\r\n\r\n").as_bytes())?;
    let mut text = Vec::new();
    s.take(1 << 20).read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    Ok((status, body.trim().to_owned()))
}

/// What a [`RequestLoop`] saw.
#[derive(Debug, Default)]
pub struct LoopResult {
    /// Requests answered 200, by body (the pod's name, for the sandbox's servers).
    pub answered_by: std::collections::BTreeMap<String, u64>,
    /// Requests that failed or were answered otherwise.
    pub failed: u64,
    /// The first few failures: when (since the start) and why.
    pub failures: Vec<(Duration, String)>,
}

impl LoopResult {
    pub fn ok(&self) -> u64 {
        self.answered_by.values().sum()
    }
}

/// New connections one after another, each an HTTP GET, from a thread inside a namespace to
/// one address, until stopped or bounded by count and time: the load under which tests change
/// things and count what was lost.
pub struct RequestLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<LoopResult>,
}

impl RequestLoop {
    /// Starts it: a request every `pause` (plus its own time), at most `limit` requests and
    /// `max` in all.
    pub fn start(
        ns: &Netns,
        to: std::net::SocketAddr,
        pause: Duration,
        limit: u64,
        max: Duration,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        let file = std::fs::File::open(format!("/run/netns/{}", ns.name()))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = LoopResult::default();
            if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                r.failed += 1;
                r.failures.push((Duration::ZERO, format!("setns: {e}")));
                return r;
            }
            let start = std::time::Instant::now();
            let mut n = 0;
            while !stop2.load(Ordering::SeqCst) && n < limit && start.elapsed() < max {
                n += 1;
                match http_get(to, "/", Duration::from_secs(2)) {
                    Ok((200, body)) => *r.answered_by.entry(body).or_default() += 1,
                    other => {
                        r.failed += 1;
                        if r.failures.len() < 20 {
                            r.failures.push((start.elapsed(), format!("{other:?}")));
                        }
                    }
                }
                std::thread::sleep(pause);
            }
            r
        });
        Ok(Self { stop, thread })
    }

    /// Stops it and returns what it saw.
    pub fn stop(self) -> LoopResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

const TCP_CONNECT_PY: &str = r#"
import errno, socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((addr, port))
    print("OK %s:%d" % s.getpeername())
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print("ERR %s" % errno.errorcode.get(e.errno, str(e.errno)))
"#;

/// What a TCP `connect()` from a process got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// Connected; the peer as `getpeername()` shows it.
    Connected(SocketAddrV4),
    /// Failed with this errno's name (`ECONNREFUSED`, `EPERM`, ...).
    Failed(String),
    Timeout,
}

/// One TCP `connect()` to `addr:port` from a python3 process inside `ns`.
pub fn tcp_connect(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<Connect, CmdError> {
    let out = ns.exec_timeout(
        &[
            "python3",
            "-c",
            TCP_CONNECT_PY,
            &addr.to_string(),
            &port.to_string(),
            &format!("{:.1}", timeout.as_secs_f64()),
        ],
        timeout + Duration::from_secs(5),
    )?;
    let line = out.trim();
    Ok(if let Some(peer) = line.strip_prefix("OK ") {
        Connect::Connected(
            peer.parse()
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        )
    } else if let Some(e) = line.strip_prefix("ERR ") {
        Connect::Failed(e.to_owned())
    } else {
        Connect::Timeout
    })
}

const CLIENT_LOOP_PY: &str = r#"
import errno, socket, sys, time
proto, addr, port, secs, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
t0 = time.monotonic()
def now():
    return "%.3f" % (time.monotonic() - t0)
def err(e):
    return errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
s = None
n = 0
while time.monotonic() - t0 < secs and n < 100000:
    n += 1
    try:
        if proto == "tcp":
            c = socket.create_connection((addr, port), timeout=2)
            c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            d = b""
            while True:
                b = c.recv(4096)
                if not b:
                    break
                d += b
            c.close()
            head, _, body = d.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
                raise OSError(0, "bad answer")
            print("OK", now(), body.decode().strip(), flush=True)
        else:
            if s is None:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(0.5)
                s.connect((addr, port))
            s.send(b"hi")
            d = s.recv(65535)
            print("OK", now(), d.decode().split()[0], flush=True)
    except Exception as e:
        print("ERR", now(), err(e), flush=True)
        if s is not None:
            s.close()
            s = None
    time.sleep(pause)
print("END", now(), flush=True)
"#;

/// One event of a [`ClientLoop`]: seconds since its start, and who answered or what failed.
#[derive(Debug, Clone, PartialEq)]
pub enum LoopEvent {
    Answered(f64, String),
    Failed(f64, String),
}

/// A client process in a namespace (so in its cgroup, where socket LB translates it), calling
/// `addr:port` over and over for at most `secs` seconds: TCP (a new connection and an HTTP GET
/// each time) or UDP (one connected socket, opened again after an error). Killed by its pid
/// when dropped.
pub struct ClientLoop {
    d: crate::daemon::Daemon,
    _dir: crate::TempDir,
    started: std::time::Instant,
}

impl ClientLoop {
    pub fn start(
        ns: &Netns,
        udp: bool,
        addr: Ipv4Addr,
        port: u16,
        secs: f64,
        pause: Duration,
    ) -> Result<Self, CmdError> {
        let dir = crate::TempDir::new("clientloop").map_err(|source| CmdError::Spawn {
            cmd: "a directory for the client loop's log".into(),
            source,
        })?;
        let log = dir.join("events");
        let d = crate::daemon::Daemon::start(
            ns,
            &[
                "python3",
                "-c",
                CLIENT_LOOP_PY,
                if udp { "udp" } else { "tcp" },
                &addr.to_string(),
                &port.to_string(),
                &secs.to_string(),
                &pause.as_secs_f64().to_string(),
            ],
            &[],
            &log,
        )?;
        Ok(Self {
            d,
            _dir: dir,
            started: std::time::Instant::now(),
        })
    }

    /// Seconds since it was started (its events' clock, give or take the interpreter's
    /// start-up).
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// What it has seen so far.
    pub fn events(&self) -> Vec<LoopEvent> {
        self.d
            .log()
            .lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                let (kind, t, what) = (it.next()?, it.next()?.parse().ok()?, it.next()?);
                match kind {
                    "OK" => Some(LoopEvent::Answered(t, what.to_owned())),
                    "ERR" => Some(LoopEvent::Failed(t, what.to_owned())),
                    _ => None,
                }
            })
            .collect()
    }

    /// Waits (at most `limit`) until it has ended by itself; then its events.
    pub fn wait(&mut self, limit: Duration) -> Vec<LoopEvent> {
        let start = std::time::Instant::now();
        while self.d.running() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.events()
    }
}
