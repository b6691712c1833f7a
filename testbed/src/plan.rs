//! The sandbox's address plan. Everything is inside 198.18.0.0/15 (RFC 2544 benchmarking
//! space), so no address here can ever be a real host. Each sandbox has its own namespaces, so
//! every sandbox uses the same plan without clashing.
//!
//! | what                          | addresses                          |
//! |-------------------------------|------------------------------------|
//! | fabric router (bridge)        | 198.18.0.1/24                      |
//! | node k uplink                 | 198.18.0.(10+k)/24                 |
//! | outside client j              | 198.18.0.(100+j)/24                |
//! | pods of node k                | 198.19.k.0/24; gateway 198.19.k.1, pod i 198.19.k.(10+i) |
//! | Service ClusterIPs            | 198.18.128.0/18                    |
//! | externalIPs, LoadBalancer IPs | 198.18.192.0/18                    |
//! | hairpin SNAT address          | 198.18.127.254 (assigned nowhere)  |
//! | the control plane (API server)| 198.18.0.5/24 on the fabric         |
use std::net::Ipv4Addr;

/// The whole range the sandbox may use; nothing outside it is ever a target.
pub const RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
pub const FABRIC_PREFIX: u8 = 24;
pub const FABRIC_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 128, 0), 18);
pub const EXTERNAL_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 192, 0), 18);
/// The control plane's address on the fabric: kube-apiserver listens (and advertises) here.
pub const CONTROL_PLANE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
/// The NodePort range the control plane allocates from (the API server's default).
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// The source address hairpin flows are SNATed to: assigned to no device, so the node routes
/// packets from it, and pods send replies to it through their default route (the node).
pub const HAIRPIN_SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 127, 254);

/// At most this many nodes, outside clients, and pods per node.
pub const MAX_NODES: u8 = 64;
pub const MAX_OUTSIDE: u8 = 64;
pub const MAX_PODS_PER_NODE: u8 = 200;

/// Node k's name (its Node object's, and the agent's `--node-name`).
pub fn node_name(k: usize) -> String {
    format!("node{k}")
}

pub fn node_addr(k: u8) -> Ipv4Addr {
    assert!(k < MAX_NODES, "node index {k} out of the plan");
    Ipv4Addr::new(198, 18, 0, 10 + k)
}

pub fn outside_addr(j: u8) -> Ipv4Addr {
    assert!(j < MAX_OUTSIDE, "outside index {j} out of the plan");
    Ipv4Addr::new(198, 18, 0, 100 + j)
}

/// The pod CIDR of node `k` (a /24).
pub fn pod_cidr(k: u8) -> (Ipv4Addr, u8) {
    assert!(k < MAX_NODES, "node index {k} out of the plan");
    (Ipv4Addr::new(198, 19, k, 0), 24)
}

/// The address pods of node `k` use as their gateway (held by every pod veth's node side).
pub fn pod_gateway(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, k, 1)
}

pub fn pod_addr(k: u8, i: u8) -> Ipv4Addr {
    assert!(i < MAX_PODS_PER_NODE, "pod index {i} out of the plan");
    Ipv4Addr::new(198, 19, k, 10 + i)
}

/// The `n`th ClusterIP (n < 16382).
pub fn cluster_ip(n: u16) -> Ipv4Addr {
    assert!(
        n < (1 << 14) - 2,
        "ClusterIP index {n} out of the service CIDR"
    );
    let v = u32::from(SERVICE_CIDR.0) + 1 + u32::from(n);
    Ipv4Addr::from(v)
}

/// The `n`th external (externalIP or LoadBalancer) address (n < 16382).
pub fn external_ip(n: u16) -> Ipv4Addr {
    assert!(
        n < (1 << 14) - 2,
        "external IP index {n} out of the external CIDR"
    );
    Ipv4Addr::from(u32::from(EXTERNAL_CIDR.0) + 1 + u32::from(n))
}

/// Whether `a` is inside the sandbox's range (198.18.0.0/15).
pub fn in_range(a: Ipv4Addr) -> bool {
    u32::from(a) >> (32 - RANGE.1) == u32::from(RANGE.0) >> (32 - RANGE.1)
}

/// `a/prefix` as text, for `ip`.
pub fn cidr((a, p): (Ipv4Addr, u8)) -> String {
    format!("{a}/{p}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_planned_address_is_inside_198_18_0_0_15() {
        let mut all = vec![
            FABRIC_ROUTER,
            SERVICE_CIDR.0,
            EXTERNAL_CIDR.0,
            HAIRPIN_SNAT,
            CONTROL_PLANE,
        ];
        for k in 0..MAX_NODES {
            all.extend([node_addr(k), pod_gateway(k), pod_cidr(k).0]);
            all.extend([pod_addr(k, 0), pod_addr(k, MAX_PODS_PER_NODE - 1)]);
        }
        for j in 0..MAX_OUTSIDE {
            all.push(outside_addr(j));
        }
        all.extend([
            cluster_ip(0),
            cluster_ip(16381),
            external_ip(0),
            external_ip(16381),
        ]);
        for a in all {
            assert!(in_range(a), "{a} is outside 198.18.0.0/15");
        }
    }

    #[test]
    fn in_range_rejects_neighbours_of_the_range() {
        for a in ["198.17.255.255", "198.20.0.0", "10.0.0.1", "192.168.1.1"] {
            assert!(!in_range(a.parse().unwrap()), "{a} must not be in range");
        }
    }

    #[test]
    fn service_and_external_ranges_do_not_overlap_nodes_or_pods() {
        let svc = |a: Ipv4Addr| u32::from(a) >> 14 == u32::from(SERVICE_CIDR.0) >> 14;
        let ext = |a: Ipv4Addr| u32::from(a) >> 14 == u32::from(EXTERNAL_CIDR.0) >> 14;
        for k in 0..MAX_NODES {
            for a in [node_addr(k), pod_addr(k, 0), pod_gateway(k)] {
                assert!(!svc(a) && !ext(a), "{a} overlaps a service range");
            }
        }
        assert!(svc(cluster_ip(16381)) && !ext(cluster_ip(16381)));
        assert!(ext(external_ip(0)) && !svc(external_ip(0)));
    }
}
