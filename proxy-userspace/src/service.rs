//! What a Service becomes on one node: frontends (an address, port and protocol clients
//! connect to) and the backends each sends traffic to. The model computes them, the sync loop
//! compares them, the dataplane writes them; this module is their one home, with no I/O and
//! nothing of the maps' layout.
use std::{fmt, net::Ipv4Addr};

use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
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

/// A frontend's backends, by where the traffic comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    /// For traffic from the node's pods, and from outside unless `external` is set.
    pub all: Vec<Backend>,
    /// externalTrafficPolicy Local: traffic from outside goes only to these (this node's
    /// endpoints), keeping the client's address; empty, it is dropped. `None`: to `all`.
    pub external: Option<Vec<Backend>>,
}

impl Backends {
    /// The same backends for every origin.
    pub fn all(all: Vec<Backend>) -> Self {
        Self {
            all,
            external: None,
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
