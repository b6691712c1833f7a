//! What a Service becomes on one node: frontends (an address, port and protocol clients
//! connect to) and the backends each sends traffic to. The model computes them, the sync loop
//! compares them, the dataplane writes them; this module is their one home, with no I/O and
//! nothing of the maps' layout.
use std::{fmt, net::Ipv4Addr};

use proxy_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Sctp => IPPROTO_SCTP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// What kind of address a frontend is; decides where it is reachable from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// Reachable from pods (and the node), not from the uplink.
    ClusterIp,
    /// A node address with a nodePort: reachable from pods and from outside.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// A frontend's identity in the maps: two frontends with the same address, port and protocol
/// are the same entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendId {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// A Service frontend: an address, port and protocol that clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub kind: FrontendKind,
}

impl Frontend {
    pub fn id(&self) -> FrontendId {
        FrontendId {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id().fmt(f)
    }
}

/// A backend: where a frontend's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on this node (its `nodeName` is this node's name, as kube-proxy
    /// decides). Traffic from outside to an endpoint elsewhere is SNATed to the node.
    pub local: bool,
}

/// An IPv4 prefix (`--nodeport-addresses`, loadBalancerSourceRanges). Displays and orders by
/// address then length; the address may have bits past the prefix, which never count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr4 {
    /// The prefix as a mask (host order).
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The same prefix with the bits past it cleared (`10.1.2.3/8` is `10.0.0.0/8`), as Go's
    /// `net.ParseCIDR` gives it.
    pub fn network(self) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }

    /// A single address.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, prefix: 32 }
    }
}

impl fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr4 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (want a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length 0..=32"))?;
        Ok(Self { addr, prefix })
    }
}

/// loadBalancerSourceRanges of a LoadBalancer frontend: the clients that may open flows to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRanges {
    /// The ranges (networks, sorted, without duplicates): a client whose address is in none
    /// is dropped.
    pub cidrs: Vec<Cidr4>,
    /// A range holds the node's address: the node's own connections may use the frontend.
    /// (Socket LB decides by this, as it cannot know a socket's source address at `connect()`.)
    pub from_node: bool,
}

/// A frontend's backends, by where the traffic comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    /// For traffic from the node's pods, and from outside unless `external` is set.
    pub all: Vec<Backend>,
    /// externalTrafficPolicy Local: traffic from outside goes only to these (this node's
    /// endpoints), keeping the client's address; empty, it is dropped. `None`: to `all`.
    pub external: Option<Vec<Backend>>,
    /// loadBalancerSourceRanges: traffic from a client outside them goes nowhere (it is
    /// dropped). `None`: every client.
    pub sources: Option<SourceRanges>,
    /// sessionAffinity ClientIP: a client's new flow goes to the backend its last new flow
    /// went to, if that was less than this many seconds ago and the backend is still here.
    /// `None`: each new flow chooses afresh.
    pub affinity_timeout_s: Option<u32>,
    /// `all` is empty because internalTrafficPolicy Local leaves none of the Service's
    /// endpoints, which are on other nodes: new flows are dropped, as kube-proxy drops them
    /// ("has no local endpoints"), not refused as for a Service without endpoints.
    pub no_local_endpoints: bool,
    /// `--lb-algorithm maglev` (or the Service's `sluice.io/lb-algorithm: maglev`): a new
    /// flow takes the backend of `all` that Maglev's table gives its tuple, the same on every
    /// node (`dataplane/maglev.rs`); else one at random. Only for externalIP and LoadBalancer
    /// frontends, the addresses every node serves (an ECMP router in front of the nodes is
    /// what needs it).
    pub maglev: bool,
}

impl Backends {
    /// The same backends for every origin.
    pub fn all(all: Vec<Backend>) -> Self {
        Self {
            all,
            external: None,
            sources: None,
            affinity_timeout_s: None,
            no_local_endpoints: false,
            maglev: false,
        }
    }

    /// Sorted and without duplicates, each list on its own.
    pub fn normalized(mut self) -> Self {
        self.all.sort();
        self.all.dedup();
        if let Some(e) = &mut self.external {
            e.sort();
            e.dedup();
        }
        if let Some(s) = &mut self.sources {
            s.cidrs.sort();
            s.cidrs.dedup();
        }
        self
    }

    /// How many backends both lists hold (a backend in both counts twice).
    pub fn len(&self) -> usize {
        self.all.len() + self.external.as_ref().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
