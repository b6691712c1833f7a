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
    process::{Child, Command, Stdio},
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
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
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

/// A server process started inside a namespace, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `argv` in `ns` and waits (at most 10 s) for it to print `ready`.
    fn start(ns: &Netns, argv: &[&str], port: u16) -> Result<Self, CmdError> {
        let full = ns.exec_argv(argv);
        let cmd = full.join(" ");
        let mut child = Command::new(full[0])
            .args(&full[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| CmdError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let timeout = Duration::from_secs(10);
        match rx.recv_timeout(timeout) {
            Ok(line) if line.trim() == "ready" => Ok(Self { child, port }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(CmdError::Timeout { cmd, timeout })
            }
        }
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

/// python3's http.server on `0.0.0.0:port`, answering every GET with `<name>\n`.
#[derive(Debug)]
pub struct HttpServer(pub Server);

impl HttpServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self, CmdError> {
        let port_s = port.to_string();
        Server::start(ns, &["python3", "-c", HTTP_SERVER_PY, name, &port_s], port).map(Self)
    }
}

/// A UDP server on `0.0.0.0:port` answering each datagram with `<name> <payload>`.
#[derive(Debug)]
pub struct UdpEcho(pub Server);

impl UdpEcho {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self, CmdError> {
        let port_s = port.to_string();
        Server::start(ns, &["python3", "-c", UDP_ECHO_PY, name, &port_s], port).map(Self)
    }
}

/// What one HTTP request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The body, trimmed: the answering pod's name.
    pub body: String,
    /// The address and port curl was connected to, as the client's socket saw it.
    pub peer: SocketAddrV4,
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
            "\n%{remote_ip} %{remote_port}",
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

/// Sends `payload` to `addr:port` over UDP from inside `ns` and waits `timeout` for a reply.
pub fn udp_request(
    ns: &Netns,
    addr: Ipv4Addr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> Result<UdpReply, CmdError> {
    let out = ns.exec_timeout(
        &[
            "python3",
            "-c",
            UDP_CLIENT_PY,
            &addr.to_string(),
            &port.to_string(),
            payload,
            &format!("{:.1}", timeout.as_secs_f64()),
        ],
        timeout + Duration::from_secs(5),
    )?;
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
