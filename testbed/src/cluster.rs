//! A cluster in network namespaces:
//!
//! ```text
//!   pod ns (eth0) ==veth== (pvI) node ns (eth0) ==veth== (nK) fabric ns: bridge br0 (198.18.0.1)
//!                                                          (oJ) ==veth== (eth0) outside ns
//! ```
//! Each node's pods are wired in one of two shapes ([`PodNetwork`]):
//! - routed (Calico's): pods have a /32 and a default route via the node (198.19.k.1, held by
//!   every pod veth's node side); the node routes each pod's /32 to its veth;
//! - bridged (flannel's `cni0`): the pod veths' node sides are ports of a Linux bridge `cni0`
//!   holding 198.19.k.1/24; pods have a /24, so same-node pod-to-pod traffic is bridged, not
//!   routed.
//!
//! Nodes route other nodes' pod CIDRs via their uplinks (a host-gw CNI). Forwarding is on and
//! rp_filter off in nodes; TX checksum offload is off on both ends of every veth (and on the
//! bridge), so a wrong checksum is never hidden by the NIC model.
use std::net::Ipv4Addr;

use crate::{
    cgroup::{self, Cgroup},
    cmd::CmdError,
    netns::Netns,
    plan::{self, cidr},
};

/// A pod: a namespace with one veth (`eth0`) to its node.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    /// The pod's name (what its HTTP server answers with).
    pub name: String,
    pub addr: Ipv4Addr,
    /// The node side of the pod's veth, inside the node's namespace (`pv<i>`).
    pub host_veth: String,
    pub node: u8,
    /// Its cgroup (`pod<i>` under its node's), where its processes start, when the node has
    /// one.
    pub cgroup: Option<Cgroup>,
}

/// How a node's pods are wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// Calico's shape: one routed veth per pod, a /32 route each.
    Routed,
    /// flannel's shape: pod veths on a Linux bridge `cni0`; same-node traffic is bridged.
    Bridge,
}

/// The bridge of [`PodNetwork::Bridge`] nodes.
pub const POD_BRIDGE: &str = "cni0";

/// A node: a namespace with an uplink (`eth0`) to the fabric and one veth per pod.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pub index: u8,
    pub addr: Ipv4Addr,
    /// The uplink's name inside the node namespace.
    pub uplink: String,
    pub pod_network: PodNetwork,
    pub pods: Vec<Pod>,
    /// The node's cgroup tree ([`Cluster::add_cgroups`]): its own processes start in it, its
    /// pods' in theirs below it, as on a real node; socket LB attaches here.
    pub cgroup: Option<Cgroup>,
}

/// A client outside the cluster, on the fabric.
#[derive(Debug)]
pub struct Outside {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// Nodes, pods, outside clients and the fabric that joins them. Dropping it (also during a
/// panic) deletes every namespace it made and kills every process inside them.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: pods and nodes go before the fabric.
    pub nodes: Vec<Node>,
    pub outside: Vec<Outside>,
    pub fabric: Netns,
}

fn tx_off(ns: &Netns, dev: &str) -> Result<(), CmdError> {
    ns.exec(&["ethtool", "-K", dev, "tx", "off"]).map(drop)
}

impl Pod {
    /// Turns TX checksum offload on inside the pod, as on a real node: its TCP and UDP
    /// packets leave partially checksummed (the checksum field holds only the pseudo-header's
    /// sum), and the node side of its veth, where offload stays off, completes them when it
    /// sends, so a datapath that got the pseudo-header wrong yields a checksum the receiver
    /// rejects.
    pub fn offload_checksums(&self) -> Result<(), CmdError> {
        self.ns
            .exec(&["ethtool", "-K", "eth0", "tx", "on"])
            .map(drop)
    }
}

impl Node {
    /// Makes pod number `i` of this node, called `name` (its namespace, veth `pv<i>`, address
    /// and routes), without recording it in the node: for a sandbox kubelet that keeps its own
    /// pods. Index `i` must be unused on this node.
    pub fn make_pod(&self, i: u8, name: &str) -> Result<Pod, CmdError> {
        let node = self.index;
        let addr = plan::pod_addr(node, i);
        let gw = plan::pod_gateway(node);
        let ns = Netns::new(&format!("pod{node}-{i}"))?;
        let host_veth = format!("pv{i}");
        let bridged = self.pod_network == PodNetwork::Bridge;
        veth_into(&self.ns, &host_veth, &ns)?;
        if bridged {
            // A port of the bridge, which holds the gateway; the pod's /24 is on-link.
            self.ns
                .ip(&["link", "set", &host_veth, "master", POD_BRIDGE, "up"])?;
        } else {
            // Every pod veth's node side holds the pods' gateway address, so pods ARP for it
            // there, and the node routes the pod's /32 to it.
            self.ns
                .ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_veth])?;
            self.ns.ip(&["link", "set", &host_veth, "up"])?;
            self.ns
                .sysctl(&format!("net.ipv4.conf.{host_veth}.rp_filter"), "0")?;
            self.ns.ip(&[
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                &host_veth,
                "scope",
                "link",
            ])?;
        }
        tx_off(&self.ns, &host_veth)?;
        let prefix = if bridged { plan::pod_cidr(node).1 } else { 32 };
        ns.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        tx_off(&ns, "eth0")?;
        if !bridged {
            ns.ip(&[
                "route",
                "add",
                &gw.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
        }
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
            "dev",
            "eth0",
        ])?;
        let cgroup = match &self.cgroup {
            Some(parent) => {
                let cg = parent
                    .child(&format!("pod{i}"))
                    .map_err(|source| CmdError::Spawn {
                        cmd: format!("mkdir {}/pod{i}", parent.path().display()),
                        source,
                    })?;
                cgroup::assign(&ns, &cg);
                Some(cg)
            }
            None => None,
        };
        Ok(Pod {
            ns,
            name: name.to_owned(),
            addr,
            host_veth,
            node,
            cgroup,
        })
    }
}

impl Cluster {
    /// A fabric and `nodes` routed nodes without pods.
    pub fn new(nodes: u8) -> Result<Self, CmdError> {
        Self::with(&vec![PodNetwork::Routed; usize::from(nodes)])
    }

    /// A fabric and one node per entry of `nodes`, its pods wired that way.
    pub fn with(nodes: &[PodNetwork]) -> Result<Self, CmdError> {
        assert!(nodes.len() <= usize::from(plan::MAX_NODES));
        let fabric = Netns::new("fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&[
            "addr",
            "add",
            &format!("{}/{}", plan::FABRIC_ROUTER, plan::FABRIC_PREFIX),
            "dev",
            "br0",
        ])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Self {
            nodes: Vec::new(),
            outside: Vec::new(),
            fabric,
        };
        for (k, net) in nodes.iter().enumerate() {
            cluster.add_node(k as u8, *net)?;
        }
        // Every node reaches every other node's pods through that node's uplink.
        for node in &cluster.nodes {
            for other in &cluster.nodes {
                if other.index != node.index {
                    node.ns.ip(&[
                        "route",
                        "add",
                        &cidr(plan::pod_cidr(other.index)),
                        "via",
                        &other.addr.to_string(),
                    ])?;
                }
            }
        }
        Ok(cluster)
    }

    /// Joins namespace `ns` (device `eth0` at `addr`) to the fabric bridge through port `port`
    /// (a control plane's namespace, say; nodes and outside clients join this way too).
    pub fn join_fabric(&self, ns: &Netns, port: &str, addr: Ipv4Addr) -> Result<(), CmdError> {
        veth_into(&self.fabric, port, ns)?;
        self.fabric
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        tx_off(&self.fabric, port)?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{}", plan::FABRIC_PREFIX),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        tx_off(ns, "eth0")?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &plan::FABRIC_ROUTER.to_string(),
        ])?;
        Ok(())
    }

    fn add_node(&mut self, k: u8, pod_network: PodNetwork) -> Result<(), CmdError> {
        let ns = Netns::new(&format!("node{k}"))?;
        let addr = plan::node_addr(k);
        self.join_fabric(&ns, &format!("n{k}"), addr)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Off, as many CNIs leave it; `tests/cluster.rs` turns it strict to show that every
        // path works either way.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        if pod_network == PodNetwork::Bridge {
            ns.ip(&["link", "add", POD_BRIDGE, "type", "bridge"])?;
            let gw = format!("{}/{}", plan::pod_gateway(k), plan::pod_cidr(k).1);
            ns.ip(&["addr", "add", &gw, "dev", POD_BRIDGE])?;
            ns.ip(&["link", "set", POD_BRIDGE, "up"])?;
            tx_off(&ns, POD_BRIDGE)?;
        }
        self.nodes.push(Node {
            ns,
            index: k,
            addr,
            uplink: "eth0".into(),
            pod_network,
            pods: Vec::new(),
            cgroup: None,
        });
        Ok(())
    }

    /// Gives every node a cgroup under the cgroup v2 mount (`...-node<k>`), and its pods
    /// theirs below it (pods added later get one too): from then on the processes started in
    /// those namespaces run in them.
    pub fn add_cgroups(&mut self) -> std::io::Result<()> {
        for n in &mut self.nodes {
            if n.cgroup.is_some() {
                continue;
            }
            let cg = Cgroup::new(&format!("node{}", n.index))?;
            cgroup::assign(&n.ns, &cg);
            for (i, p) in n.pods.iter_mut().enumerate() {
                let pc = cg.child(&format!("pod{i}"))?;
                cgroup::assign(&p.ns, &pc);
                p.cgroup = Some(pc);
            }
            n.cgroup = Some(cg);
        }
        Ok(())
    }

    /// Lowers the MTU of node `node`'s link to the fabric (both ends) to `mtu`, and tells the
    /// other nodes, as a CNI whose path to that node is narrower would (a locked route MTU:
    /// unlocked, the FIB lookup that forwarding programs use ignores it and takes the device's,
    /// while the kernel's own forwarding honours it), so that they answer oversized packets
    /// with ICMP fragmentation needed instead of losing them in the fabric's bridge.
    pub fn narrow_link(&self, node: u8, mtu: u16) -> Result<(), CmdError> {
        let mtu_s = mtu.to_string();
        let n = &self.nodes[usize::from(node)];
        n.ns.ip(&["link", "set", "eth0", "mtu", &mtu_s])?;
        self.fabric
            .ip(&["link", "set", &format!("n{node}"), "mtu", &mtu_s])?;
        for other in self.nodes.iter().filter(|o| o.index != node) {
            other.ns.ip(&[
                "route",
                "replace",
                &cidr(plan::pod_cidr(node)),
                "via",
                &n.addr.to_string(),
                "mtu",
                "lock",
                &mtu_s,
            ])?;
        }
        Ok(())
    }

    /// Adds a pod called `name` on node `node`; returns it.
    pub fn add_pod(&mut self, node: u8, name: &str) -> Result<&Pod, CmdError> {
        let n = &mut self.nodes[usize::from(node)];
        let i = u8::try_from(n.pods.len()).expect("pod count fits the plan");
        let pod = n.make_pod(i, name)?;
        n.pods.push(pod);
        Ok(n.pods.last().expect("just pushed"))
    }

    /// Adds a client outside the cluster, on the fabric; returns it.
    pub fn add_outside(&mut self) -> Result<&Outside, CmdError> {
        let j = u8::try_from(self.outside.len()).expect("outside count fits the plan");
        let ns = Netns::new(&format!("out{j}"))?;
        let addr = plan::outside_addr(j);
        self.join_fabric(&ns, &format!("o{j}"), addr)?;
        self.outside.push(Outside { ns, addr });
        Ok(self.outside.last().expect("just pushed"))
    }

    /// Routes `net` from outside client `j` (and the fabric) through node `node`, as an
    /// upstream router does for externalIPs and LoadBalancer addresses.
    pub fn route_outside_via(
        &self,
        j: usize,
        net: (Ipv4Addr, u8),
        node: u8,
    ) -> Result<(), CmdError> {
        let via = plan::node_addr(node).to_string();
        self.outside[j]
            .ns
            .ip(&["route", "add", &cidr(net), "via", &via])?;
        Ok(())
    }

    /// Every pod of every node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod called {name} in the sandbox"))
    }

    /// The names of every namespace of this cluster.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.fabric.name().to_owned()];
        for n in &self.nodes {
            v.push(n.ns.name().to_owned());
            v.extend(n.pods.iter().map(|p| p.ns.name().to_owned()));
        }
        v.extend(self.outside.iter().map(|o| o.ns.name().to_owned()));
        v
    }
}

/// A veth pair: `name` in `ns`, its peer `eth0` in `into`.
fn veth_into(ns: &Netns, name: &str, into: &Netns) -> Result<(), CmdError> {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        into.name(),
    ])
    .map(drop)
}
