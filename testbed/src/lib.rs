//! sluice's sandbox: a cluster made of network namespaces, shared by the tests, the demo and
//! the benchmark.
//!
//! - [`netns`]: one network namespace, removed on drop; commands and threads inside it.
//! - [`cgroup`]: cgroup v2 directories for sandbox nodes and pods (socket LB attaches to a
//!   node's), which the processes started in their namespaces join.
//! - [`cluster`]: nodes, pods, a fabric and outside clients joined by veth pairs, with routes,
//!   forwarding, and TX checksum offload off on every veth; the [`plan`] of addresses.
//! - [`apps`]: real servers (python3 HTTP answering with the pod's name, UDP echo) and a real
//!   client (curl), all with bounded timeouts.
//! - [`daemon`]: a long-running process in a namespace, logging to a file, killed by its pid.
//! - [`agent`]: a `sluice agent` process in a node's namespace, its health and metrics.
//! - [`apiserver`]: a Kubernetes API test server (list, watch, 410 Gone, bookmarks) reached
//!   through an ordinary kubeconfig.
//! - [`controlplane`], [`kubelet`] and [`realcluster`]: the real control plane (etcd,
//!   kube-apiserver, kube-controller-manager, built by `./x setup`), our sandbox kubelet that
//!   runs its Pods, and both with an agent per node running as the RBAC of `deploy/rbac.yaml`.
//! - [`load`]: the benchmark's servers and closed-loop load generator (new connections,
//!   persistent connections, UDP), in Rust so the path is measured and not an interpreter.
//! - [`pktgen`]: the benchmark's packet generator (UDP frames through an `AF_PACKET` socket,
//!   bounded in time and count) and a device's received-packet counter.
//! - [`kubeproxy`]: kube-proxy's own rules (iptables, nftables) for the same Services, the
//!   benchmark's other side.
//! - [`report`]: the side-by-side benchmark's Markdown tables and SVG chart, from raw samples.
//! - [`privilege`]: the rule for tests that need root: skip loudly, or fail in CI.
//! - [`cmd`] and [`tools`]: the one way to start a process, and `tools.txt`, the list of every
//!   external command the project runs, which that one way enforces.
//!
//! Every name carries the creating process's pid and a counter, so tests run in parallel and a
//! sweep ([`netns::sweep_stale`]) can remove what a killed test run left behind.
pub mod agent;
pub mod apiserver;
pub mod apps;
pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod cmd;
pub mod controlplane;
pub mod daemon;
pub mod kubelet;
pub mod kubeproxy;
pub mod load;
pub mod netns;
pub mod pktgen;
pub mod plan;
pub mod privilege;
pub mod realcluster;
pub mod report;
pub mod tempdir;
pub mod tools;
pub mod vm;

pub use apiserver::ApiServer;
pub use apps::{
    Attempt, ClientLoop, Connect, HttpServer, KeepAlive, LoopEvent, LoopResult, RequestLoop,
    SctpEcho, SctpReply, Sniffer, UdpEcho, UdpOutcome, curl, http_get, http_many, http_upload,
    sctp_available, sctp_request, send_frame, tcp_connect, udp_connected, udp_request,
};
pub use bpffs::BpfFs;
pub use cluster::{Cluster, Node, Outside, Pod, PodNetwork};
pub use cmd::{CmdError, run};
pub use netns::Netns;
pub use privilege::{Privilege, kernel_has, privileged};
pub use tempdir::TempDir;
