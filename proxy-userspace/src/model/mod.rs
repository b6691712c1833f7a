//! Kubernetes objects in, frontends and backends out.
//!
//! [`service_frontends`] applies kube-proxy's rules to one Service and its EndpointSlices: which
//! addresses and ports the Service answers on (ClusterIP, NodePort, LoadBalancer, externalIPs)
//! and which endpoints each of them sends traffic to. It is pure (no I/O, no clocks, no maps), so
//! parity with kube-proxy is proven here, on tables of cases, rather than on a cluster.
//!
//! References are to kube-proxy's source (kubernetes/kubernetes): `cmd/kube-proxy/app/server.go`
//! (which objects it watches), `pkg/proxy/serviceport.go` (`newBaseServiceInfo`: the frontends of
//! a service port) and `pkg/proxy/endpointslicecache.go` (the endpoints of a service port).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use crate::service::{
    Backend, Backends, Cidr4, Frontend, FrontendId, FrontendKind, Protocol, SourceRanges,
};

#[cfg(test)]
mod parity;
mod problems;
pub use problems::{InvalidService, Skipped};

/// The label that ties an EndpointSlice to its Service (`discovery.LabelServiceName`).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Objects with this label belong to another service proxy; kube-proxy started without
/// `--service-proxy-name` filters them out of its watches, and so does sluice.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on the slices of headless Services; kube-proxy filters
/// these out of its watches too (`v1.IsHeadlessService`).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// The namespace an object without one is in, as `kubectl apply` would put it.
const DEFAULT_NAMESPACE: &str = "default";

/// Names a Service: namespace and name. Displays as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ServiceKey {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a Service; a missing namespace is `default`.
    pub fn of_service(svc: &Service) -> ServiceKey {
        ServiceKey::new(
            namespace_or_default(svc.metadata.namespace.as_deref()),
            svc.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// The key of the Service a slice belongs to: its `kubernetes.io/service-name` label and its
    /// own namespace. `None` without the label (a slice no Service owns; kube-proxy skips those).
    pub fn of_slice(slice: &EndpointSlice) -> Option<ServiceKey> {
        let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
        if name.is_empty() {
            return None;
        }
        Some(ServiceKey::new(
            namespace_or_default(slice.metadata.namespace.as_deref()),
            name.clone(),
        ))
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn namespace_or_default(ns: Option<&str>) -> &str {
    match ns {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

/// What the model needs to know about the node it computes frontends for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name: endpoints whose `nodeName` is this one are local (kube-proxy's
    /// `IsLocal`).
    pub name: String,
    /// The addresses NodePorts are served on (kube-proxy's `--nodeport-addresses`), resolved
    /// by the agent.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// The node's `topology.kubernetes.io/zone` label: endpoints hinted for this zone are
    /// preferred (see [`Topology`]).
    pub zone: Option<String>,
    /// The node's primary address (kube-proxy's `nodeIP`: its first InternalIP, else
    /// ExternalIP). loadBalancerSourceRanges that hold it let the node's own connections
    /// through.
    pub node_ip: Option<Ipv4Addr>,
    /// The agent's `--lb-algorithm` is maglev: externalIP and LoadBalancer frontends choose by
    /// Maglev unless their Service's [`LB_ALGORITHM_ANNOTATION`] says `random`.
    pub maglev_by_default: bool,
}

/// The Service annotation that picks the backend choice of its externalIP and LoadBalancer
/// frontends: `random` or `maglev` (Cilium's `service.cilium.io/lb-algorithm` does the same).
pub const LB_ALGORITHM_ANNOTATION: &str = "sluice.io/lb-algorithm";

/// Whether the Service's externalIP and LoadBalancer frontends use Maglev: its annotation, else the
/// agent's default; an unknown value is a warning, and the default applies.
fn maglev(svc: &Service, node: &NodeContext, warnings: &mut Warnings) -> bool {
    let value = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    match value.map(String::as_str) {
        None => node.maglev_by_default,
        Some("maglev") => true,
        Some("random") => false,
        Some(other) => {
            warnings.push(Skipped::UnknownLbAlgorithm {
                value: other.to_owned(),
            });
            node.maglev_by_default
        }
    }
}

/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node's zone, from its [`ZONE_LABEL`] (none when unset or empty).
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// Bounds past which a Service is refused rather than programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// At most this many backends behind one service port.
    ///
    /// The default, 10,000, is far above what real Services carry (the EndpointSlice controller
    /// writes 100 endpoints per slice; the legacy Endpoints object stopped at 1,000), so hitting
    /// it means a runaway controller or a generated manifest gone wrong. Letting such a Service
    /// through would fill the maps every Service shares: each frontend takes one entry per
    /// backend plus one in `LB4_SERVICES` (`LB4_SERVICES_DEFAULT_MAX` = 65,536 entries), and a
    /// NodePort Service has a frontend per node address, so one absurd Service would starve all
    /// the others.
    pub max_backends_per_frontend: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_backends_per_frontend: 10_000,
        }
    }
}

/// What to do with one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not for this proxy: ExternalName, headless (clusterIP None), labelled
    /// service.kubernetes.io/service-proxy-name.
    Ignored { reason: &'static str },
    /// Frontends (sorted) each with its backends (sorted, deduplicated); `warnings` lists what
    /// was skipped (IPv6 address, ...), each once, for logging. `health_check`: the
    /// Service's `healthCheckNodePort`, which the node must answer. `no_local_endpoints`: its
    /// ports with a Local traffic policy that have endpoints, none on this node.
    Proxied {
        frontends: Vec<(Frontend, Backends)>,
        warnings: Vec<Skipped>,
        health_check: Option<HealthCheck>,
        no_local_endpoints: NoLocalEndpoints,
    },
    /// The Service cannot be programmed; nothing of it is programmed. For logs and a counter.
    Invalid { reason: InvalidService },
}

/// A Service's ports with endpoints, none of them on this node, by the Local policy that then
/// drops their traffic (what kube-proxy counts in
/// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// internalTrafficPolicy Local: traffic to the ClusterIP.
    pub internal: usize,
    /// externalTrafficPolicy Local: traffic from outside.
    pub external: usize,
}

impl NoLocalEndpoints {
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// A LoadBalancer Service with externalTrafficPolicy Local: its load balancer asks each node,
/// on `spec.healthCheckNodePort`, whether it has endpoints of the Service
/// (pkg/proxy/healthcheck/service_health.go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// This node's ready endpoints of the Service (distinct addresses over all its ports):
    /// terminating ones do not count, so that a load balancer drains the node.
    pub local_endpoints: usize,
}

/// The frontends of `svc` on this node and the backends of each, from `slices` (any slices:
/// those of other Services, of other address types and of other proxies are skipped).
pub fn service_frontends(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    limits: &Limits,
) -> Outcome {
    if let Some(reason) = ignored(svc) {
        return Outcome::Ignored { reason };
    }
    let mut warnings = Warnings::default();
    match proxied(svc, slices, node, limits, &mut warnings) {
        Ok((frontends, no_local_endpoints)) => Outcome::Proxied {
            frontends,
            warnings: warnings.0,
            health_check: health_check(svc, slices, node),
            no_local_endpoints,
        },
        Err(reason) => Outcome::Invalid { reason },
    }
}

/// The node's addresses from status.addresses (InternalIP first, then ExternalIP), IPv4 only,
/// deduplicated.
pub fn node_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for a in addresses.iter().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = a.address.parse::<Ipv4Addr>()
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    out
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending externalTrafficPolicy Cluster traffic to this
/// node (KEP-3836, kube-proxy's `NodeEligible`): not while the Node is being deleted or
/// carries the cluster autoscaler's to-be-deleted taint (whatever its effect).
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref());
    !taints
        .unwrap_or_default()
        .iter()
        .any(|t| t.key == TAINT_TO_BE_DELETED)
}

/// Why kube-proxy would leave `svc` alone, if it would.
fn ignored(svc: &Service) -> Option<&'static str> {
    let labels = svc.metadata.labels.as_ref();
    let has_label = |l: &str| labels.is_some_and(|ls| ls.contains_key(l));
    // cmd/kube-proxy/app/server.go: the informers carry the label selector
    // `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`, so kube-proxy
    // never sees these objects at all.
    if has_label(LABEL_SERVICE_PROXY_NAME) {
        return Some("labelled service.kubernetes.io/service-proxy-name: another proxy serves it");
    }
    if has_label(LABEL_HEADLESS) {
        return Some("labelled service.kubernetes.io/headless");
    }
    let spec = svc.spec.as_ref();
    // pkg/proxy/util ShouldSkipService: ExternalName Services are answered by DNS, and headless
    // ones (clusterIP None) by DNS with the pods' own addresses; neither gets proxy rules.
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Some("type ExternalName: answered by DNS with a CNAME, not proxied");
    }
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref());
    let first_cluster_ip = spec
        .and_then(|s| s.cluster_ips.as_deref())
        .and_then(|ips| ips.first())
        .map(String::as_str);
    if cluster_ip == Some("None") || first_cluster_ip == Some("None") {
        return Some("headless (clusterIP None): DNS answers with the pods' addresses");
    }
    None
}

/// What was skipped, each once, in the order found.
#[derive(Default)]
struct Warnings(Vec<Skipped>);

impl Warnings {
    fn push(&mut self, w: Skipped) {
        if !self.0.contains(&w) {
            self.0.push(w);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// One service port, validated.
struct Port<'a> {
    /// `None` and `""` are the same name (the unnamed port of a single-port Service).
    name: &'a str,
    port: u16,
    proto: Protocol,
    node_port: Option<u16>,
}

impl fmt::Display for Port<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "port {}/{}", self.port, self.proto)
        } else {
            write!(f, "port {:?} ({}/{})", self.name, self.port, self.proto)
        }
    }
}

fn proxied(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    limits: &Limits,
    warnings: &mut Warnings,
) -> Result<(Vec<(Frontend, Backends)>, NoLocalEndpoints), InvalidService> {
    let key = ServiceKey::of_service(svc);
    let Some(spec) = svc.spec.as_ref() else {
        return Ok((Vec::new(), NoLocalEndpoints::default()));
    };
    let svc_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        // The API server rejects any other type; a manifest with a typo must not be read as
        // ClusterIP and silently lose its NodePorts.
        Some(other) => {
            return Err(InvalidService::UnknownType {
                type_: other.to_owned(),
            });
        }
    };
    let ports = service_ports(spec.ports.as_deref().unwrap_or_default())?;

    // Addresses by kind, each list in the Service's own order.
    // newBaseServiceInfo: GetClusterIPByFamily reads spec.clusterIPs, falling back to
    // spec.clusterIP for objects written before dual-stack. kube-proxy skips a Service without
    // a clusterIP altogether (ShouldSkipService); the API server always allocates one, so only
    // a hand-written manifest lacks it, and sluice then programs its other frontends rather
    // than silently nothing.
    let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut addresses: Vec<(Ipv4Addr, FrontendKind)> = Vec::new();
    for ip in cluster_ips.into_iter().filter(|ip| !ip.is_empty()) {
        if let Some(ip) = spec_ipv4("clusterIP", ip, warnings)? {
            addresses.push((ip, FrontendKind::ClusterIp));
        }
    }
    // newBaseServiceInfo: externalIPs of the proxy's family, whatever the type.
    for ip in spec.external_ips.as_deref().unwrap_or_default() {
        if let Some(ip) = spec_ipv4("externalIP", ip, warnings)? {
            addresses.push((ip, FrontendKind::ExternalIp));
        }
    }
    // As for nodePort: kube-proxy reads the status whatever the type; only LoadBalancer
    // Services are meant to have one.
    if svc_type == ServiceType::LoadBalancer {
        addresses.extend(load_balancer_ips(svc, warnings));
    }

    let sources = source_ranges(svc, node, &addresses, warnings);
    let affinity = session_affinity(svc)?;
    let maglev = maglev(svc, node, warnings);
    let ext_local = externally_accessible(svc, svc_type) && external_policy_local(svc);
    let mut frontends: BTreeMap<FrontendId, (FrontendKind, Backends)> = BTreeMap::new();
    let internal_local = internal_policy_local(svc);
    let mut no_local_endpoints = NoLocalEndpoints::default();
    for port in &ports {
        let endpoints = endpoints(&key, port, slices, node, warnings);
        if endpoints.len() > limits.max_backends_per_frontend {
            return Err(InvalidService::TooManyEndpoints {
                port: port.to_string(),
                count: endpoints.len(),
                limit: limits.max_backends_per_frontend,
            });
        }
        // Hints narrow the Cluster policy's endpoints only; a Local policy ignores them. Under
        // a hint-chosen topology some ready endpoint is admitted, so the terminating fallback
        // of `usable` (kube-proxy's, which ignores topology) is never reached with one.
        let topology = Topology::of(&endpoints);
        let cluster = Backends {
            affinity_timeout_s: affinity,
            ..Backends::all(usable(&endpoints, |e| topology.admits(e)))
        };
        // kube-proxy's hasEndpoints (CategorizeEndpoints' hasAnyEndpoints): some endpoint, on
        // any node, may serve. A Local policy with none here then drops rather than rejects.
        let has_endpoints = endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating));
        // internalTrafficPolicy Local: the ClusterIP's traffic (the node's pods' and its own)
        // goes only to this node's endpoints, with the same terminating fallback.
        let internal = if internal_local {
            let local = usable(&endpoints, |e| e.backend.local);
            Backends {
                no_local_endpoints: local.is_empty() && has_endpoints,
                all: local,
                ..cluster.clone()
            }
        } else {
            cluster.clone()
        };
        if internal.no_local_endpoints {
            no_local_endpoints.internal += 1;
        }
        let external = if ext_local {
            Backends {
                external: Some(usable(&endpoints, |e| e.backend.local)),
                ..cluster.clone()
            }
        } else {
            cluster.clone()
        };
        // kube-proxy's hasEndpoints && !hasExternalEndpoints: outside traffic is dropped.
        if has_endpoints && external.external.as_ref().is_some_and(Vec::is_empty) {
            no_local_endpoints.external += 1;
        }
        let mut wanted: Vec<(Ipv4Addr, u16, FrontendKind)> = addresses
            .iter()
            .map(|&(addr, kind)| (addr, port.port, kind))
            .collect();
        // NodePorts exist for types NodePort and LoadBalancer (a LoadBalancer may be created
        // without them: allocateLoadBalancerNodePorts false, nodePort unset). kube-proxy reads
        // nodePort whatever the type, relying on the API server to clear it when the type
        // changes; checking the type here keeps a stale field in a manifest from opening a port.
        if let Some(node_port) = port.node_port
            && svc_type != ServiceType::ClusterIp
        {
            wanted.extend(
                node.nodeport_addresses
                    .iter()
                    .map(|&addr| (addr, node_port, FrontendKind::NodePort)),
            );
        }
        let firewalled = Backends {
            sources: sources.clone(),
            ..external.clone()
        };
        for (addr, fport, kind) in wanted {
            let backends = match kind {
                FrontendKind::ClusterIp => &internal,
                FrontendKind::LoadBalancer => &firewalled,
                FrontendKind::NodePort | FrontendKind::ExternalIp => &external,
            };
            let id = FrontendId {
                addr,
                port: fport,
                proto: port.proto,
            };
            add_frontend(&mut frontends, id, kind, backends, warnings)?;
        }
    }
    let frontends = frontends
        .into_iter()
        .map(|(id, (kind, backends))| {
            (
                Frontend {
                    addr: id.addr,
                    port: id.port,
                    proto: id.proto,
                    kind,
                },
                // Maglev where a router may spread a flow over nodes: an address every node
                // serves (externalIPs, LoadBalancer IPs). A ClusterIP's clients are in the
                // cluster, and a NodePort is on one node's own address.
                Backends {
                    maglev: maglev
                        && matches!(kind, FrontendKind::ExternalIp | FrontendKind::LoadBalancer),
                    ..backends
                },
            )
        })
        .collect();
    Ok((frontends, no_local_endpoints))
}

/// Adds one frontend. The datapath keys frontends by address, port and protocol, so two
/// frontends of this Service on the same triple (an externalIP that is also the LoadBalancer
/// address, a node address listed as an externalIP) must become one. With the same backends
/// that is harmless: the widest kind is kept (reachable from the uplink beats pods only). With
/// different backends the Service is ambiguous and refused.
fn add_frontend(
    frontends: &mut BTreeMap<FrontendId, (FrontendKind, Backends)>,
    id: FrontendId,
    kind: FrontendKind,
    backends: &Backends,
    warnings: &mut Warnings,
) -> Result<(), InvalidService> {
    match frontends.get_mut(&id) {
        None => {
            frontends.insert(id, (kind, backends.clone()));
        }
        Some((old_kind, old_backends)) if old_backends.all == backends.all => {
            if *old_kind != kind {
                let wider = (*old_kind).max(kind);
                warnings.push(Skipped::MergedFrontend {
                    frontend: id,
                    first: *old_kind,
                    second: kind,
                    kept: wider,
                });
                *old_kind = wider;
                // Reachable from outside now: with the policy of the outside kinds. A
                // LoadBalancer address keeps its source ranges whatever else it also is
                // (kube-proxy's firewall goes by destination address and port alone).
                if kind != FrontendKind::ClusterIp {
                    let sources = old_backends.sources.take().or(backends.sources.clone());
                    *old_backends = Backends {
                        sources,
                        ..backends.clone()
                    };
                }
            }
        }
        Some((old_kind, _)) => {
            return Err(InvalidService::AmbiguousFrontend {
                frontend: id,
                first: *old_kind,
                second: kind,
            });
        }
    }
    Ok(())
}

/// Validates spec.ports as the API server would.
fn service_ports<'a>(ports: &'a [ServicePort]) -> Result<Vec<Port<'a>>, InvalidService> {
    let mut seen_port: BTreeSet<(i32, &str)> = BTreeSet::new();
    let mut seen_name: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut seen_node_port: BTreeSet<(i32, &str)> = BTreeSet::new();
    let mut out = Vec::new();
    for p in ports {
        let name = p.name.as_deref().unwrap_or_default();
        let label = if name.is_empty() {
            format!("port {}", p.port)
        } else {
            format!("port {name:?}")
        };
        let proto_name = p.protocol.as_deref().unwrap_or("TCP");
        let proto = match proto_name {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                return Err(InvalidService::UnknownProtocol {
                    port: label,
                    protocol: other.to_owned(),
                });
            }
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| InvalidService::PortOutOfRange {
                port: label.clone(),
                number: p.port,
            })?;
        // nodePort 0 (or absent) means none was allocated.
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(u16::try_from(n).ok().filter(|&n| n != 0).ok_or_else(|| {
                InvalidService::NodePortOutOfRange {
                    port: label.clone(),
                    number: n,
                }
            })?),
        };
        // The API server's validation refuses these duplicates; a Service that has them (from
        // a manifest) cannot be programmed unambiguously.
        if !seen_port.insert((p.port, proto_name)) {
            return Err(InvalidService::DuplicatePort {
                number: p.port,
                protocol: proto_name.to_owned(),
            });
        }
        if !seen_name.insert((name, proto_name)) {
            return Err(InvalidService::DuplicatePortName {
                name: name.to_owned(),
                protocol: proto_name.to_owned(),
            });
        }
        if let Some(n) = node_port
            && !seen_node_port.insert((i32::from(n), proto_name))
        {
            return Err(InvalidService::DuplicateNodePort {
                number: n,
                protocol: proto_name.to_owned(),
            });
        }
        out.push(Port {
            name,
            port,
            proto,
            node_port,
        });
    }
    Ok(out)
}

/// An IPv4 address from the Service's spec; IPv6 is skipped with a warning (this proxy is
/// IPv4-only, as a kube-proxy of the IPv4 family filters by family); anything else is an error.
fn spec_ipv4(
    field: &'static str,
    ip: &str,
    warnings: &mut Warnings,
) -> Result<Option<Ipv4Addr>, InvalidService> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
        Ok(IpAddr::V6(_)) => {
            warnings.push(Skipped::Ipv6 {
                field,
                value: ip.to_owned(),
            });
            Ok(None)
        }
        Err(_) => Err(InvalidService::NotAnIp {
            field,
            value: ip.to_owned(),
        }),
    }
}

/// status.loadBalancer.ingress addresses that should be programmed.
fn load_balancer_ips(svc: &Service, warnings: &mut Warnings) -> Vec<(Ipv4Addr, FrontendKind)> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut out = Vec::new();
    for ing in ingress {
        // Hostname-only entries (an ELB's DNS name) give nothing to match packets against.
        let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        // proxyutil.IsVIPMode (KEP-1860, kube-proxy 1.30+): only ipMode VIP (or unset) is
        // short-circuited on the node; with ipMode Proxy the load balancer terminates or
        // rewrites the traffic and must receive it, so no rule may capture it first.
        match ing.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                warnings.push(Skipped::UnknownIpMode {
                    ip: ip.to_owned(),
                    mode: other.to_owned(),
                });
                continue;
            }
        }
        // Written by a load-balancer controller rather than the user: a bad entry is skipped,
        // and the rest of the Service still works.
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => out.push((v4, FrontendKind::LoadBalancer)),
            Ok(IpAddr::V6(_)) => warnings.push(Skipped::Ipv6 {
                field: "load balancer ingress",
                value: ip.to_owned(),
            }),
            Err(_) => warnings.push(Skipped::IngressNotAnIp {
                value: ip.to_owned(),
            }),
        }
    }
    out
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (the API server's
/// default too), and the most the API server allows.
pub const AFFINITY_DEFAULT_TIMEOUT_S: u32 = 10_800;
pub const AFFINITY_MAX_TIMEOUT_S: u32 = 86_400;

/// spec.sessionAffinity: `ClientIP` gives its timeout (newBaseServiceInfo's
/// `stickyMaxAgeSeconds`), for every frontend of every port; `None` (or unset) gives none. The
/// API server defaults the timeout and keeps it within 1..=86400; a manifest that does not is
/// refused, as a type kube-proxy does not know is.
fn session_affinity(svc: &Service) -> Result<Option<u32>, InvalidService> {
    let spec = svc.spec.as_ref();
    match spec.and_then(|s| s.session_affinity.as_deref()) {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(AFFINITY_DEFAULT_TIMEOUT_S)),
                Some(t) if (1..=i64::from(AFFINITY_MAX_TIMEOUT_S)).contains(&i64::from(t)) => {
                    Ok(Some(t as u32))
                }
                Some(t) => Err(InvalidService::AffinityTimeoutOutOfRange { seconds: t }),
            }
        }
        Some(other) => Err(InvalidService::UnknownAffinity {
            value: other.to_owned(),
        }),
    }
}

/// spec.loadBalancerSourceRanges, for the Service's LoadBalancer frontends (newBaseServiceInfo
/// and the proxiers' firewall chains): each entry trimmed of spaces (validation lets them
/// through), IPv4 ones kept; an entry that is no CIDR is skipped with a warning, as kube-proxy
/// skips it. `None` when no IPv4 range is left: every client may connect, as with kube-proxy,
/// whose firewall is per family. When a range holds the node's address, the node may connect,
/// and so may the load balancer addresses themselves (a node that has a VIP as a local address
/// reaches it with that source).
fn source_ranges(
    svc: &Service,
    node: &NodeContext,
    addresses: &[(Ipv4Addr, FrontendKind)],
    warnings: &mut Warnings,
) -> Option<SourceRanges> {
    let ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let mut cidrs = Vec::new();
    for raw in ranges {
        let range = raw.trim();
        match parse_cidr(range) {
            Some(IpCidr::V4(c)) => cidrs.push(c.network()),
            Some(IpCidr::V6) => warnings.push(Skipped::Ipv6 {
                field: "loadBalancerSourceRange",
                value: range.to_owned(),
            }),
            None => warnings.push(Skipped::SourceRangeNotACidr { value: raw.clone() }),
        }
    }
    if cidrs.is_empty() {
        return None;
    }
    let from_node = node
        .node_ip
        .is_some_and(|ip| cidrs.iter().any(|c| c.contains(ip)));
    if from_node {
        cidrs.extend(
            addresses
                .iter()
                .filter(|(_, kind)| *kind == FrontendKind::LoadBalancer)
                .map(|(addr, _)| Cidr4::host(*addr)),
        );
    }
    cidrs.sort();
    cidrs.dedup();
    Some(SourceRanges { cidrs, from_node })
}

enum IpCidr {
    V4(Cidr4),
    V6,
}

/// A CIDR as Go's `netutils.ParseCIDRSloppy` reads it: an address, `/`, a decimal prefix length
/// within the family's bits; an IPv4 address may have leading zeros in its parts (read as
/// decimal). Bits past the prefix are allowed (they are masked off).
fn parse_cidr(s: &str) -> Option<IpCidr> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    if addr.contains(':') {
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        return (len <= 128).then_some(IpCidr::V6);
    }
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    if parts.next().is_some() || len > 32 {
        return None;
    }
    Some(IpCidr::V4(Cidr4 {
        addr: Ipv4Addr::from(octets),
        prefix: len,
    }))
}

/// One endpoint of one service port, with its conditions as kube-proxy reads them
/// (pkg/proxy/endpointslicecache.go): ready unset counts as ready, serving unset as serving,
/// terminating unset as not terminating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    backend: Backend,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Its `hints.forNodes`, against this node.
    node_hint: Hint,
    /// Its `hints.forZones`, against this node's zone.
    zone_hint: Hint,
}

/// An endpoint's topology hints (set by the EndpointSlice controller for
/// `trafficDistribution` PreferSameNode, PreferSameZone or PreferClose, and for topology-aware
/// routing), read against this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hint {
    /// No hint of this kind.
    Absent,
    /// Hinted for this node (or its zone).
    Here,
    /// Hinted for others only (a node without a zone label matches no zone hint).
    Elsewhere,
}

impl Hint {
    /// The hint made of `names` (none: absent), for the node or zone `here`.
    fn of<'a>(names: impl IntoIterator<Item = &'a str>, here: Option<&str>) -> Self {
        let mut hint = Self::Absent;
        for name in names {
            if Some(name) == here {
                return Self::Here;
            }
            hint = Self::Elsewhere;
        }
        hint
    }
}

/// Which of a port's endpoints traffic with the Cluster policy may use, from the ready
/// endpoints' hints (kube-proxy's `topologyModeFromHints`, pkg/proxy/topology.go):
/// - [`Topology::SameNode`] when every ready endpoint has a node hint and one is for this
///   node;
/// - else [`Topology::SameZone`] when every ready endpoint has a zone hint and one is for this
///   node's zone;
/// - else [`Topology::Any`]: one endpoint without a hint, or none for here, and the hints are
///   ignored, so traffic never goes nowhere because of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

impl Topology {
    fn of(list: &[Endpoint]) -> Self {
        let ready: Vec<&Endpoint> = list.iter().filter(|e| e.ready).collect();
        let prefer = |hint: fn(&Endpoint) -> Hint| {
            !ready.is_empty()
                && ready.iter().all(|e| hint(e) != Hint::Absent)
                && ready.iter().any(|e| hint(e) == Hint::Here)
        };
        if prefer(|e| e.node_hint) {
            Self::SameNode
        } else if prefer(|e| e.zone_hint) {
            Self::SameZone
        } else {
            Self::Any
        }
    }

    /// kube-proxy's `availableForTopology`.
    fn admits(self, e: &Endpoint) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode => e.node_hint == Hint::Here,
            Self::SameZone => e.zone_hint == Hint::Here,
        }
    }
}

/// Whether any of `slices` still lists `addr` on `port`/`proto`, whatever its conditions: a
/// terminating endpoint is not gone (its connections go on until they end), one that no slice
/// lists is.
pub fn slices_list(slices: &[&EndpointSlice], addr: Ipv4Addr, port: u16, proto: Protocol) -> bool {
    let addr = addr.to_string();
    let proto = proto.to_string();
    slices.iter().any(|s| {
        s.address_type == "IPv4"
            && s.ports.iter().flatten().any(|p| {
                p.port == Some(i32::from(port)) && p.protocol.as_deref().unwrap_or("TCP") == proto
            })
            && s.endpoints.iter().any(|e| e.addresses.contains(&addr))
    })
}

/// The endpoints of `list` that new connections may use, as kube-proxy's
/// `CategorizeEndpoints` chooses them (pkg/proxy/topology.go, KEP-1669): the ready ones; when
/// none is ready, the serving and terminating ones; never one that is not serving. `keep`
/// narrows the list first (to this node's endpoints for externalTrafficPolicy Local).
fn usable(list: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<Backend> {
    let kept: Vec<&Endpoint> = list.iter().filter(|e| keep(e)).collect();
    let ready: Vec<Backend> = kept.iter().filter(|e| e.ready).map(|e| e.backend).collect();
    if !ready.is_empty() {
        return ready;
    }
    kept.iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| e.backend)
        .collect()
}

/// Whether kube-proxy treats the Service as reachable from outside
/// (`apiservice.ExternallyAccessible`): type NodePort or LoadBalancer, or externalIPs.
fn externally_accessible(svc: &Service, svc_type: ServiceType) -> bool {
    svc_type != ServiceType::ClusterIp
        || svc
            .spec
            .as_ref()
            .and_then(|s| s.external_ips.as_ref())
            .is_some_and(|ips| !ips.is_empty())
}

fn internal_policy_local(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.internal_traffic_policy.as_deref())
        == Some("Local")
}

fn external_policy_local(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        == Some("Local")
}

/// The health check node port of a LoadBalancer Service with externalTrafficPolicy Local
/// (`NeedsHealthCheck`), and this node's ready endpoints of it.
fn health_check(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Option<HealthCheck> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || !external_policy_local(svc) {
        return None;
    }
    let node_port = u16::try_from(spec.health_check_node_port?)
        .ok()
        .filter(|p| *p != 0)?;
    let key = ServiceKey::of_service(svc);
    // Distinct addresses over the endpoints of every service port, as kube-proxy counts its
    // per-port endpoint map.
    let mut ignored = Warnings::default();
    let ports = service_ports(spec.ports.as_deref().unwrap_or_default()).ok()?;
    let mut local: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for port in &ports {
        for e in endpoints(&key, port, slices, node, &mut ignored) {
            if e.ready && e.backend.local {
                local.insert(e.backend.addr);
            }
        }
    }
    Some(HealthCheck {
        node_port,
        local_endpoints: local.len(),
    })
}

/// The proxied IPv4 slices of Service `key`, with each of their endpoints.
fn slice_endpoints<'a>(
    key: &ServiceKey,
    slices: &[&'a EndpointSlice],
) -> impl Iterator<
    Item = (
        &'a EndpointSlice,
        &'a k8s_openapi::api::discovery::v1::Endpoint,
    ),
> {
    let mine: Vec<&'a EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|slice| ServiceKey::of_slice(slice).as_ref() == Some(key))
        .filter(|slice| {
            !slice.metadata.labels.as_ref().is_some_and(|l| {
                l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
            })
        })
        // IPv6 and FQDN slices are for other proxies (or the other family's kube-proxy).
        .filter(|slice| slice.address_type == "IPv4")
        .collect();
    mine.into_iter()
        .flat_map(|slice| slice.endpoints.iter().map(move |ep| (slice, ep)))
}

/// The endpoints of one service port, from every IPv4 slice of the Service, sorted and
/// deduplicated (pkg/proxy/endpointslicecache.go), with their conditions.
fn endpoints(
    key: &ServiceKey,
    port: &Port<'_>,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    warnings: &mut Warnings,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for (slice, ep) in slice_endpoints(key, slices) {
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        for sp in slice.ports.as_deref().unwrap_or_default() {
            // Ports are matched by name and protocol, not number: a named targetPort can be a
            // different number in every pod, and the slice carries the number it resolved to.
            if sp.name.as_deref().unwrap_or_default() != port.name
                || sp.protocol.as_deref().unwrap_or("TCP") != port.proto.to_string()
            {
                continue;
            }
            // kube-proxy skips ports without a number ("TODO: handle nil ports to mean all").
            let Some(number) = sp.port else { continue };
            let Some(number) = u16::try_from(number).ok().filter(|&n| n != 0) else {
                warnings.push(Skipped::EndpointPortOutOfRange {
                    slice: slice_name.to_string(),
                    port: port.to_string(),
                    number,
                });
                continue;
            };
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready) != Some(false);
            let serving = c.and_then(|c| c.serving) != Some(false);
            let terminating = c.and_then(|c| c.terminating) == Some(true);
            let local =
                !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
            let hints = ep.hints.as_ref();
            let node_hint = Hint::of(
                hints
                    .and_then(|h| h.for_nodes.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(|n| n.name.as_str()),
                Some(node.name.as_str()).filter(|n| !n.is_empty()),
            );
            let zone_hint = Hint::of(
                hints
                    .and_then(|h| h.for_zones.as_deref())
                    .unwrap_or_default()
                    .iter()
                    .map(|z| z.name.as_str()),
                node.zone.as_deref(),
            );
            // kube-proxy uses addresses[0] only; the API calls the addresses of one endpoint
            // fungible, and the EndpointSlice controller writes exactly one, so every one of
            // them is taken here.
            for a in &ep.addresses {
                match a.parse::<Ipv4Addr>() {
                    Ok(addr) => {
                        let e = Endpoint {
                            backend: Backend {
                                addr,
                                port: number,
                                local,
                            },
                            ready,
                            serving,
                            terminating,
                            node_hint,
                            zone_hint,
                        };
                        // The same address in two slices (a move between slices): the more
                        // usable condition wins.
                        let slot = out.entry((addr, number)).or_insert(e);
                        if (e.ready, e.serving) > (slot.ready, slot.serving) {
                            *slot = e;
                        }
                    }
                    Err(_) => warnings.push(Skipped::EndpointNotIpv4 {
                        slice: slice_name.to_string(),
                        value: a.clone(),
                    }),
                }
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const TCP: Protocol = Protocol::Tcp;
    const UDP: Protocol = Protocol::Udp;
    use FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn fe(addr: &str, port: u16, proto: Protocol, kind: FrontendKind) -> Frontend {
        Frontend {
            addr: ip(addr),
            port,
            proto,
            kind,
        }
    }

    fn be(addr: &str, port: u16) -> Backend {
        Backend {
            addr: ip(addr),
            port,
            local: false,
        }
    }

    /// A Service in namespace `default`, named `web`, from the YAML-like `spec`.
    fn svc(spec: Value) -> Service {
        svc_with(json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec}))
    }

    fn svc_with(object: Value) -> Service {
        serde_json::from_value(object).expect("a valid Service")
    }

    /// An IPv4 EndpointSlice of default/web.
    fn slice(name: &str, ports: Value, endpoints: Value) -> EndpointSlice {
        slice_with(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    fn slice_with(object: Value) -> EndpointSlice {
        serde_json::from_value(object).expect("a valid EndpointSlice")
    }

    /// Two ready pods behind the unnamed TCP port 8080.
    fn two_pods() -> EndpointSlice {
        slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}]),
        )
    }

    fn node(addrs: &[&str]) -> NodeContext {
        NodeContext {
            name: "node-a".into(),
            nodeport_addresses: addrs.iter().map(|a| ip(a)).collect(),
            zone: Some("zone-a".into()),
            node_ip: addrs.first().map(|a| ip(a)),
            maglev_by_default: false,
        }
    }

    fn outcome(svc: &Service, slices: &[&EndpointSlice], node: &NodeContext) -> Outcome {
        service_frontends(svc, slices, node, &Limits::default())
    }

    /// The frontends (with both backend lists) and warnings of a Service that must be
    /// proxied.
    #[track_caller]
    fn proxied_all(
        svc: &Service,
        slices: &[&EndpointSlice],
        node: &NodeContext,
    ) -> (Vec<(Frontend, Backends)>, Vec<Skipped>) {
        match outcome(svc, slices, node) {
            Outcome::Proxied {
                frontends,
                warnings,
                ..
            } => (frontends, warnings),
            other => panic!("expected the Service to be proxied, got {other:?}"),
        }
    }

    /// The frontends and warnings of a Service that must be proxied, the same backends for
    /// every origin (no externalTrafficPolicy Local).
    #[track_caller]
    fn proxied(
        svc: &Service,
        slices: &[&EndpointSlice],
        node: &NodeContext,
    ) -> (Vec<(Frontend, Vec<Backend>)>, Vec<Skipped>) {
        let (frontends, warnings) = proxied_all(svc, slices, node);
        let frontends = frontends
            .into_iter()
            .map(|(fe, b)| {
                assert_eq!(
                    b.external, None,
                    "{fe}: unexpected backends for outside traffic"
                );
                (fe, b.all)
            })
            .collect();
        (frontends, warnings)
    }

    #[track_caller]
    fn frontends(
        svc: &Service,
        slices: &[&EndpointSlice],
        node: &NodeContext,
    ) -> Vec<(Frontend, Vec<Backend>)> {
        let (frontends, warnings) = proxied(svc, slices, node);
        assert!(
            warnings.is_empty(),
            "expected no warnings, got {warnings:?}"
        );
        frontends
    }

    #[track_caller]
    fn invalid_reason(svc: &Service, slices: &[&EndpointSlice], limits: &Limits) -> InvalidService {
        match service_frontends(svc, slices, &node(&[]), limits) {
            Outcome::Invalid { reason } => reason,
            other => panic!("expected the Service to be invalid, got {other:?}"),
        }
    }

    #[test]
    fn cluster_ip_service_has_one_frontend_per_port_with_the_ready_pods() {
        let s =
            svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}));
        assert_eq!(
            frontends(&s, &[&two_pods()], &node(&["192.168.1.1"])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![be("10.1.0.1", 8080), be("10.1.0.2", 8080)]
            )]
        );
    }

    #[test]
    fn service_key_displays_as_namespace_slash_name_and_defaults_the_namespace() {
        let s = svc_with(json!({"metadata": {"name": "web"}}));
        assert_eq!(ServiceKey::of_service(&s).to_string(), "default/web");
        let sl = slice_with(json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": []
        }));
        assert_eq!(
            ServiceKey::of_slice(&sl),
            Some(ServiceKey::new("shop", "web"))
        );
        let orphan =
            slice_with(json!({"metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": []}));
        assert_eq!(ServiceKey::of_slice(&orphan), None);
    }

    #[test]
    fn dual_stack_cluster_ips_program_the_ipv4_one_and_warn_about_ipv6() {
        // Either order: IPv6-primary and IPv4-primary dual-stack Services.
        for cluster_ips in [
            json!(["fd00::10", "10.96.0.10"]),
            json!(["10.96.0.10", "fd00::10"]),
        ] {
            let s = svc(json!({
                "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]
            }));
            let (fes, warnings) = proxied(&s, &[&two_pods()], &node(&[]));
            let addrs: Vec<_> = fes.iter().map(|(f, _)| (f.addr, f.kind)).collect();
            assert_eq!(
                addrs,
                vec![(ip("10.96.0.10"), ClusterIp)],
                "for clusterIPs {cluster_ips}"
            );
            assert_eq!(
                warnings,
                vec![Skipped::Ipv6 {
                    field: "clusterIP",
                    value: "fd00::10".into()
                }]
            );
        }
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_empty() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "clusterIPs": [], "ports": [{"port": 80}]}));
        let fes = frontends(&s, &[], &node(&[]));
        assert_eq!(fes, vec![(fe("10.96.0.10", 80, TCP, ClusterIp), vec![])]);
    }

    #[test]
    fn an_unparseable_cluster_ip_makes_the_service_invalid() {
        let s = svc(json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}));
        assert_eq!(
            invalid_reason(&s, &[], &Limits::default()),
            InvalidService::NotAnIp {
                field: "clusterIP",
                value: "10.96.0.300".into()
            }
        );
    }

    #[test]
    fn services_kube_proxy_does_not_serve_are_ignored() {
        let cases = [
            (
                "ExternalName",
                svc(
                    json!({"type": "ExternalName", "externalName": "db.example.com",
                           "ports": [{"port": 5432}]}),
                ),
                "ExternalName",
            ),
            (
                "headless",
                svc(json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]})),
                "headless",
            ),
            (
                "another proxy's",
                svc_with(json!({
                    "metadata": {"name": "web", "namespace": "default",
                                 "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
                })),
                "service-proxy-name",
            ),
        ];
        for (what, s, expected) in cases {
            match outcome(&s, &[&two_pods()], &node(&["192.168.1.1"])) {
                Outcome::Ignored { reason } => assert!(
                    reason.contains(expected),
                    "{what}: reason {reason:?} should mention {expected:?}"
                ),
                other => panic!("{what}: expected Ignored, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_service_without_any_address_has_no_frontends() {
        let s = svc(json!({"ports": [{"port": 80}]}));
        assert_eq!(
            frontends(&s, &[&two_pods()], &node(&["192.168.1.1"])),
            vec![]
        );
    }

    #[test]
    fn node_port_is_served_on_every_node_address() {
        let s = svc(json!({
            "type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "nodePort": 30080}]
        }));
        let fes = frontends(&s, &[&two_pods()], &node(&["192.168.1.1", "203.0.113.7"]));
        let pods = vec![be("10.1.0.1", 8080), be("10.1.0.2", 8080)];
        assert_eq!(
            fes,
            vec![
                (fe("10.96.0.10", 80, TCP, ClusterIp), pods.clone()),
                (fe("192.168.1.1", 30080, TCP, NodePort), pods.clone()),
                (fe("203.0.113.7", 30080, TCP, NodePort), pods),
            ]
        );
    }

    #[test]
    fn node_port_zero_or_on_a_cluster_ip_service_gives_no_node_port_frontend() {
        for (what, spec) in [
            (
                "nodePort 0",
                json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                                  "ports": [{"port": 80, "nodePort": 0}]}),
            ),
            (
                "type ClusterIP",
                json!({"type": "ClusterIP", "clusterIP": "10.96.0.10",
                                      "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
        ] {
            let fes = frontends(&svc(spec), &[], &node(&["192.168.1.1"]));
            assert_eq!(
                fes,
                vec![(fe("10.96.0.10", 80, TCP, ClusterIp), vec![])],
                "{what}"
            );
        }
    }

    #[test]
    fn load_balancer_serves_its_ingress_ip_on_the_service_port_and_node_ports() {
        let s = svc_with(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.50", "ipMode": "VIP"},
                {"ip": "203.0.113.51"},
                {"hostname": "lb.example.com"}
            ]}}
        }));
        let fes = frontends(&s, &[], &node(&["192.168.1.1"]));
        let got: Vec<Frontend> = fes.into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            vec![
                fe("10.96.0.10", 80, TCP, ClusterIp),
                fe("192.168.1.1", 30080, TCP, NodePort),
                fe("203.0.113.50", 80, TCP, LoadBalancer),
                fe("203.0.113.51", 80, TCP, LoadBalancer),
            ]
        );
    }

    #[test]
    fn load_balancer_ingress_with_ip_mode_proxy_is_not_programmed() {
        let s = svc_with(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50", "ipMode": "Proxy"}]}}
        }));
        let fes = frontends(&s, &[], &node(&["192.168.1.1"]));
        assert_eq!(fes, vec![(fe("10.96.0.10", 80, TCP, ClusterIp), vec![])]);
    }

    /// loadBalancerSourceRanges, row by row (newBaseServiceInfo's trimming and family filter,
    /// the iptables and nftables proxiers' firewall chains and `allowFromNode`). Each row: the
    /// ranges, the node's primary address, the ranges the LoadBalancer frontend gets (and
    /// whether the node may connect), or `None` for no firewall; and how many warnings.
    #[test]
    fn load_balancer_source_ranges_as_kube_proxy_reads_them() {
        type Row = (
            &'static str,
            Vec<&'static str>,
            Option<&'static str>,
            Option<(Vec<&'static str>, bool)>,
            usize,
        );
        let vip = "203.0.113.50/32";
        let rows: Vec<Row> = vec![
            (
                "no ranges: no firewall",
                vec![],
                Some("192.168.1.1"),
                None,
                0,
            ),
            (
                "one range",
                vec!["198.51.100.0/24"],
                Some("192.168.1.1"),
                Some((vec!["198.51.100.0/24"], false)),
                0,
            ),
            (
                "padding is trimmed (validation lets it through)",
                vec![" 198.51.100.0/24 "],
                Some("192.168.1.1"),
                Some((vec!["198.51.100.0/24"], false)),
                0,
            ),
            (
                "bits past the prefix are masked, as net.ParseCIDR does",
                vec!["10.1.2.3/8"],
                Some("192.168.1.1"),
                Some((vec!["10.0.0.0/8"], false)),
                0,
            ),
            (
                "leading zeros read as decimal (ParseCIDRSloppy)",
                vec!["010.000.0.0/8"],
                Some("192.168.1.1"),
                Some((vec!["10.0.0.0/8"], false)),
                0,
            ),
            (
                "duplicates once",
                vec!["198.51.100.0/24", "198.51.100.9/24"],
                Some("192.168.1.1"),
                Some((vec!["198.51.100.0/24"], false)),
                0,
            ),
            (
                "a range holding the node's address lets the node and the VIP through",
                vec!["192.168.0.0/16"],
                Some("192.168.1.1"),
                Some((vec!["192.168.0.0/16", vip], true)),
                0,
            ),
            (
                "everything",
                vec!["0.0.0.0/0"],
                Some("192.168.1.1"),
                Some((vec!["0.0.0.0/0", vip], true)),
                0,
            ),
            (
                "the node's address not yet known: the node is not let through",
                vec!["192.168.0.0/16"],
                None,
                Some((vec!["192.168.0.0/16"], false)),
                0,
            ),
            (
                "only IPv6 ranges: none for IPv4, so no firewall (kube-proxy's is per family)",
                vec!["2001:db8::/32"],
                Some("192.168.1.1"),
                None,
                1,
            ),
            (
                "IPv6 skipped, IPv4 kept",
                vec!["2001:db8::/32", "198.51.100.0/24"],
                Some("192.168.1.1"),
                Some((vec!["198.51.100.0/24"], false)),
                1,
            ),
            (
                "an entry that is no CIDR is skipped, the rest kept",
                vec!["not-a-cidr", "198.51.100.0/24"],
                Some("192.168.1.1"),
                Some((vec!["198.51.100.0/24"], false)),
                1,
            ),
            (
                "an address without a length is no CIDR",
                vec!["198.51.100.7"],
                Some("192.168.1.1"),
                None,
                1,
            ),
            (
                "a length past 32 is no CIDR",
                vec!["198.51.100.0/33"],
                Some("192.168.1.1"),
                None,
                1,
            ),
        ];
        let cidr = |c: &str| c.parse::<Cidr4>().unwrap();
        for (name, ranges, node_ip, want, want_warnings) in rows {
            let s = svc_with(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                    "externalIPs": ["198.51.100.80"],
                    "loadBalancerSourceRanges": ranges,
                    "ports": [{"port": 80, "nodePort": 30080}]
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
            }));
            let mut n = node(&["192.168.1.1"]);
            n.node_ip = node_ip.map(ip);
            let (got, warnings) = proxied_all(&s, &[&two_pods()], &n);
            assert_eq!(warnings.len(), want_warnings, "{name}: {warnings:?}");
            let want = want.map(|(cidrs, from_node)| SourceRanges {
                cidrs: cidrs.into_iter().map(cidr).collect(),
                from_node,
            });
            for (f, b) in &got {
                let expected = if f.kind == LoadBalancer { &want } else { &None };
                assert_eq!(&b.sources, expected, "{name}: {f} ({:?})", f.kind);
            }
            assert!(got.iter().any(|(f, _)| f.kind == LoadBalancer), "{name}");
        }
    }

    /// `sluice.io/lb-algorithm` and `--lb-algorithm`: Maglev for externalIPs and LoadBalancer
    /// IPs (addresses every node serves), never a ClusterIP or a NodePort; the annotation beats
    /// the default; an unknown value is a warning and the default applies.
    #[test]
    fn the_lb_algorithm_annotation_and_default_give_maglev_to_outside_frontends_only() {
        let with = |annotation: Option<&str>| {
            let mut meta = json!({"name": "web", "namespace": "default"});
            if let Some(a) = annotation {
                meta["annotations"] = json!({LB_ALGORITHM_ANNOTATION: a});
            }
            svc_with(json!({
                "metadata": meta,
                "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                         "externalIPs": ["198.51.100.80"],
                         "ports": [{"port": 80, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
            }))
        };
        let random = node(&["192.168.1.1"]);
        let maglev = NodeContext {
            maglev_by_default: true,
            ..random.clone()
        };
        let (random, maglev) = (&random, &maglev);
        let rows: Vec<(&str, Option<&str>, &NodeContext, bool, bool)> = vec![
            ("default random", None, random, false, false),
            ("default maglev", None, maglev, true, false),
            ("annotated maglev", Some("maglev"), random, true, false),
            ("annotated random", Some("random"), maglev, false, false),
            (
                "unknown value, default random",
                Some("ring-hash"),
                random,
                false,
                true,
            ),
            (
                "unknown value, default maglev",
                Some("ring-hash"),
                maglev,
                true,
                true,
            ),
        ];
        for (name, annotation, node, want, warned) in rows {
            let (frontends, warnings) = proxied_all(&with(annotation), &[&two_pods()], node);
            assert_eq!(frontends.len(), 4, "{name}");
            for (f, b) in &frontends {
                let outside_vip = matches!(
                    f.kind,
                    FrontendKind::ExternalIp | FrontendKind::LoadBalancer
                );
                assert_eq!(b.maglev, want && outside_vip, "{name}: {f}");
            }
            let unknown = Skipped::UnknownLbAlgorithm {
                value: "ring-hash".into(),
            };
            assert_eq!(warnings.contains(&unknown), warned, "{name}: {warnings:?}");
        }
    }

    /// sessionAffinity, row by row (newBaseServiceInfo's `stickyMaxAgeSeconds`; the API
    /// server's defaulting and validation, which a manifest may skip): the timeout every
    /// frontend of the Service gets, or why it is refused.
    #[test]
    fn session_affinity_as_kube_proxy_reads_it() {
        type Row = (&'static str, Value, Result<Option<u32>, InvalidService>);
        let rows: Vec<Row> = vec![
            ("unset", json!({}), Ok(None)),
            ("None", json!({"sessionAffinity": "None"}), Ok(None)),
            (
                "ClientIP, the API server's default timeout",
                json!({"sessionAffinity": "ClientIP"}),
                Ok(Some(10_800)),
            ),
            (
                "ClientIP, its own timeout",
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                Ok(Some(60)),
            ),
            (
                "the longest the API server allows",
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86_400}}}),
                Ok(Some(86_400)),
            ),
            (
                "longer",
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86_401}}}),
                Err(InvalidService::AffinityTimeoutOutOfRange { seconds: 86_401 }),
            ),
            (
                "zero",
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
                Err(InvalidService::AffinityTimeoutOutOfRange { seconds: 0 }),
            ),
            (
                "a type the API does not have",
                json!({"sessionAffinity": "Cookie"}),
                Err(InvalidService::UnknownAffinity {
                    value: "Cookie".into(),
                }),
            ),
        ];
        for (name, fields, want) in rows {
            let mut spec = json!({
                "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "externalIPs": ["198.51.100.80"],
                "ports": [{"port": 80, "nodePort": 30080}]
            });
            for (k, v) in fields.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let s = svc_with(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": spec,
                "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
            }));
            match (outcome(&s, &[&two_pods()], &node(&["192.168.1.1"])), want) {
                (Outcome::Proxied { frontends, .. }, Ok(timeout)) => {
                    assert_eq!(frontends.len(), 4, "{name}");
                    for (f, b) in &frontends {
                        assert_eq!(b.affinity_timeout_s, timeout, "{name}: {f}");
                    }
                }
                (Outcome::Invalid { reason }, Err(want)) => assert_eq!(reason, want, "{name}"),
                (got, want) => panic!("{name}: {got:?}, want {want:?}"),
            }
        }
    }

    /// internalTrafficPolicy Local, row by row (kube-proxy's `CategorizeEndpoints` for a
    /// Service that `UsesLocalEndpoints`, and the proxiers' "has no local endpoints" DROP):
    /// the ClusterIP's backends (pods' and the node's traffic), whether it drops rather than
    /// rejects, and the NodePort's backends for the node's pods, which the Cluster policy
    /// serves (kube-proxy's short-circuit of pod traffic to external destinations).
    #[test]
    fn internal_traffic_policy_local_as_kube_proxy_categorizes_endpoints() {
        type Row = (
            &'static str,
            Value,
            Vec<&'static str>,
            bool,
            Vec<&'static str>,
        );
        let rows: Vec<Row> = vec![
            (
                "a local and a remote endpoint: the local one",
                json!([
                    ep("10.1.0.1", "node-a", true, true, false),
                    ep("10.1.0.2", "node-b", true, true, false)
                ]),
                vec!["10.1.0.1"],
                false,
                vec!["10.1.0.1", "10.1.0.2"],
            ),
            (
                "only remote endpoints: none, and dropped",
                json!([ep("10.1.0.2", "node-b", true, true, false)]),
                vec![],
                true,
                vec!["10.1.0.2"],
            ),
            (
                "no endpoints at all: rejected, as without the policy",
                json!([]),
                vec![],
                false,
                vec![],
            ),
            (
                "the local one terminating but serving, a remote one ready: the local one",
                json!([
                    ep("10.1.0.1", "node-a", false, true, true),
                    ep("10.1.0.2", "node-b", true, true, false)
                ]),
                vec!["10.1.0.1"],
                false,
                vec!["10.1.0.2"],
            ),
            (
                "the local one not serving: dropped",
                json!([
                    ep("10.1.0.1", "node-a", false, false, true),
                    ep("10.1.0.2", "node-b", true, true, false)
                ]),
                vec![],
                true,
                vec!["10.1.0.2"],
            ),
            (
                "only remote endpoints, terminating but serving: some may serve, so dropped",
                json!([ep("10.1.0.2", "node-b", false, true, true)]),
                vec![],
                true,
                vec!["10.1.0.2"],
            ),
            (
                "hints do not narrow a Local policy",
                json!([
                    hinted("10.1.0.1", "node-a", true, &["zone-b"], &[]),
                    hinted("10.1.0.2", "node-b", true, &["zone-a"], &[])
                ]),
                vec!["10.1.0.1"],
                false,
                vec!["10.1.0.2"],
            ),
        ];
        for (name, eps, cluster_ip, drops, node_port) in rows {
            let s = svc(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                "internalTrafficPolicy": "Local",
                "ports": [{"port": 80, "nodePort": 30080}]}));
            let sl = slice("web-1", json!([{"port": 8080}]), eps);
            let (got, _) = proxied_all(&s, &[&sl], &node(&["192.168.1.1"]));
            let addrs = |b: &Backends| -> Vec<String> {
                b.all.iter().map(|b| b.addr.to_string()).collect()
            };
            let of = |kind| &got.iter().find(|(f, _)| f.kind == kind).unwrap().1;
            assert_eq!(addrs(of(ClusterIp)), cluster_ip, "{name}: ClusterIP");
            assert_eq!(of(ClusterIp).no_local_endpoints, drops, "{name}: dropped");
            assert_eq!(addrs(of(NodePort)), node_port, "{name}: NodePort");
            assert!(!of(NodePort).no_local_endpoints, "{name}");
        }
        // The default, Cluster: every endpoint.
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([ep("10.1.0.2", "node-b", true, true, false)]),
        );
        let (got, _) = proxied_all(&s, &[&sl], &node(&["192.168.1.1"]));
        assert_eq!(got[0].1.all.len(), 1);
        assert!(!got[0].1.no_local_endpoints);
    }

    /// The externalIP comes first and the LoadBalancer address merges into it: the one
    /// frontend is firewalled, as kube-proxy's firewall goes by destination alone.
    #[test]
    fn a_load_balancer_address_that_is_also_another_frontend_keeps_its_source_ranges() {
        let s = svc_with(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer", "externalIPs": ["203.0.113.50"],
                "loadBalancerSourceRanges": ["198.51.100.0/24"], "ports": [{"port": 80}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
        }));
        let (fes, _) = proxied_all(&s, &[&two_pods()], &node(&[]));
        assert_eq!(fes.len(), 1, "{fes:?}");
        assert_eq!(fes[0].0.kind, LoadBalancer);
        assert_eq!(
            fes[0].1.sources.as_ref().map(|s| s.cidrs.clone()),
            Some(vec!["198.51.100.0/24".parse().unwrap()])
        );
        // The node address as load balancer address, its port the nodePort: the NodePort
        // frontend comes after and merges into the firewalled one, which stays firewalled.
        let s = svc_with(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer", "loadBalancerSourceRanges": ["198.51.100.0/24"],
                "ports": [{"port": 30080, "nodePort": 30080}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "192.168.1.1"}]}}
        }));
        let (fes, _) = proxied_all(&s, &[&two_pods()], &node(&["192.168.1.1"]));
        assert_eq!(fes.len(), 1, "{fes:?}");
        assert_eq!(fes[0].0.kind, LoadBalancer);
        assert!(fes[0].1.sources.is_some(), "{fes:?}");
    }

    #[test]
    fn external_ips_are_frontends_on_the_service_port() {
        let s = svc(json!({
            "clusterIP": "10.96.0.10", "externalIPs": ["198.51.100.1", "2001:db8::1"],
            "ports": [{"port": 80}]
        }));
        let (fes, warnings) = proxied(&s, &[&two_pods()], &node(&[]));
        let got: Vec<Frontend> = fes.into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            vec![
                fe("10.96.0.10", 80, TCP, ClusterIp),
                fe("198.51.100.1", 80, TCP, ExternalIp)
            ]
        );
        assert_eq!(
            warnings,
            vec![Skipped::Ipv6 {
                field: "externalIP",
                value: "2001:db8::1".into()
            }]
        );
    }

    #[test]
    fn an_external_ip_equal_to_the_load_balancer_ip_is_programmed_once() {
        let s = svc_with(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "externalIPs": ["203.0.113.50"], "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
        }));
        let (fes, warnings) = proxied(&s, &[], &node(&[]));
        assert_eq!(
            fes,
            vec![(fe("203.0.113.50", 80, TCP, LoadBalancer), vec![])]
        );
        assert_eq!(
            warnings.len(),
            1,
            "expected a warning about the merge, got {warnings:?}"
        );
    }

    #[test]
    fn named_target_ports_are_matched_by_port_name_across_two_ports() {
        // targetPort "http" and "metrics" resolve to different numbers; the slice carries them
        // under the service ports' names.
        let s = svc(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "web", "port": 80, "targetPort": "http"},
                      {"name": "metrics", "port": 9090, "targetPort": "metrics"}]
        }));
        let sl = slice(
            "web-1",
            json!([{"name": "metrics", "port": 9100, "protocol": "TCP"},
                   {"name": "web", "port": 8080, "protocol": "TCP"}]),
            json!([{"addresses": ["10.1.0.1"]}]),
        );
        assert_eq!(
            frontends(&s, &[&sl], &node(&[])),
            vec![
                (
                    fe("10.96.0.10", 80, TCP, ClusterIp),
                    vec![be("10.1.0.1", 8080)]
                ),
                (
                    fe("10.96.0.10", 9090, TCP, ClusterIp),
                    vec![be("10.1.0.1", 9100)]
                ),
            ]
        );
    }

    // A rolling update between two versions of a Deployment whose container port named
    // "http" moved from 8080 to 9080: the EndpointSlice controller writes one slice per port
    // mapping (endpointslice's reconciler groups endpoints by their resolved ports), and each
    // endpoint keeps the number of its own pod (endpointslicecache.go builds the list per
    // slice port); old pods terminating meanwhile serve only while no new one is ready.
    #[test]
    fn a_named_target_port_renumbered_in_a_rolling_update_keeps_each_pods_own_number() {
        let s = svc(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "web", "port": 80, "targetPort": "http"}]
        }));
        let old = |ready: bool| {
            slice(
                "web-old",
                json!([{"name": "web", "port": 8080, "protocol": "TCP"}]),
                json!([{"addresses": ["10.1.0.1"],
                        "conditions": {"ready": ready, "serving": true, "terminating": !ready}}]),
            )
        };
        let new = |ready: bool| {
            slice(
                "web-new",
                json!([{"name": "web", "port": 9080, "protocol": "TCP"}]),
                json!([{"addresses": ["10.1.0.2"], "conditions": {"ready": ready}}]),
            )
        };
        let backends = |slices: &[&EndpointSlice]| {
            frontends(&s, slices, &node(&[]))
                .into_iter()
                .map(|(_, b)| b)
                .collect::<Vec<_>>()
        };
        // Mid-rollout: both versions ready, each on its own number.
        assert_eq!(
            backends(&[&old(true), &new(true)]),
            vec![vec![be("10.1.0.1", 8080), be("10.1.0.2", 9080)]]
        );
        // The new pod not yet ready, the old one terminating: the old one still serves.
        assert_eq!(
            backends(&[&old(false), &new(false)]),
            vec![vec![be("10.1.0.1", 8080)]]
        );
        // The old pod terminating, the new one ready: only the new one takes new flows.
        assert_eq!(
            backends(&[&old(false), &new(true)]),
            vec![vec![be("10.1.0.2", 9080)]]
        );
    }

    #[test]
    fn an_unnamed_service_port_matches_an_unnamed_or_empty_named_slice_port() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        for ports in [json!([{"port": 8080}]), json!([{"name": "", "port": 8080}])] {
            let sl = slice("web-1", ports.clone(), json!([{"addresses": ["10.1.0.1"]}]));
            assert_eq!(
                frontends(&s, &[&sl], &node(&[])),
                vec![(
                    fe("10.96.0.10", 80, TCP, ClusterIp),
                    vec![be("10.1.0.1", 8080)]
                )],
                "slice ports {ports}"
            );
        }
    }

    #[test]
    fn slice_ports_of_another_protocol_or_without_a_number_are_not_used() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-1",
            json!([{"port": 8080, "protocol": "UDP"}, {"name": ""}]),
            json!([{"addresses": ["10.1.0.1"]}]),
        );
        assert_eq!(
            frontends(&s, &[&sl], &node(&[])),
            vec![(fe("10.96.0.10", 80, TCP, ClusterIp), vec![])]
        );
    }

    #[test]
    fn not_ready_endpoints_are_excluded_and_unknown_readiness_counts_as_ready() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.3"], "conditions": {}},
                {"addresses": ["10.1.0.4"]},
            ]),
        );
        assert_eq!(
            frontends(&s, &[&sl], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![
                    be("10.1.0.1", 8080),
                    be("10.1.0.3", 8080),
                    be("10.1.0.4", 8080)
                ]
            )]
        );
    }

    #[test]
    fn slices_that_are_not_this_services_ipv4_slices_are_ignored() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let eps = json!([{"addresses": ["10.9.9.9"]}]);
        let cases = [
            (
                "another service's",
                slice_with(json!({
                    "metadata": {"name": "api-1", "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "api"}},
                    "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps,
                })),
            ),
            (
                "same name, another namespace",
                slice_with(json!({
                    "metadata": {"name": "web-1", "namespace": "shop",
                                 "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps,
                })),
            ),
            (
                "IPv6",
                slice_with(json!({
                    "metadata": {"name": "web-v6", "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv6", "ports": [{"port": 8080}],
                    "endpoints": [{"addresses": ["fd00::1"]}],
                })),
            ),
            (
                "another proxy's",
                slice_with(json!({
                    "metadata": {"name": "web-2", "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "web",
                                            "service.kubernetes.io/service-proxy-name": "other"}},
                    "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps,
                })),
            ),
        ];
        for (what, other) in cases {
            assert_eq!(
                frontends(&s, &[&two_pods(), &other], &node(&[])),
                vec![(
                    fe("10.96.0.10", 80, TCP, ClusterIp),
                    vec![be("10.1.0.1", 8080), be("10.1.0.2", 8080)]
                )],
                "the {what} slice must not add backends"
            );
        }
    }

    #[test]
    fn endpoints_in_several_slices_are_deduplicated_and_sorted() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let a = slice(
            "web-a",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.9"]}, {"addresses": ["10.1.0.2"]}]),
        );
        let b = slice(
            "web-b",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.1"]}]),
        );
        assert_eq!(
            frontends(&s, &[&a, &b], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![
                    be("10.1.0.1", 8080),
                    be("10.1.0.2", 8080),
                    be("10.1.0.9", 8080)
                ]
            )]
        );
    }

    #[test]
    fn every_address_of_an_endpoint_is_a_backend_and_bad_ones_are_warned_about() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.1", "10.1.0.5", "not-an-ip"]}]),
        );
        let (fes, warnings) = proxied(&s, &[&sl], &node(&[]));
        assert_eq!(
            fes,
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![be("10.1.0.1", 8080), be("10.1.0.5", 8080)]
            )]
        );
        assert_eq!(
            warnings,
            vec![Skipped::EndpointNotIpv4 {
                slice: "web-1".into(),
                value: "not-an-ip".into()
            }]
        );
    }

    #[test]
    fn udp_ports_get_udp_frontends_and_the_udp_slice_port() {
        let s = svc(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
        }));
        let sl = slice(
            "web-1",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"},
                   {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}]),
            json!([{"addresses": ["10.1.0.1"]}]),
        );
        assert_eq!(
            frontends(&s, &[&sl], &node(&[])),
            vec![
                (
                    fe("10.96.0.10", 53, TCP, ClusterIp),
                    vec![be("10.1.0.1", 5354)]
                ),
                (
                    fe("10.96.0.10", 53, UDP, ClusterIp),
                    vec![be("10.1.0.1", 5353)]
                ),
            ]
        );
    }

    #[test]
    fn sctp_ports_get_sctp_frontends_with_their_node_ports_and_the_sctp_slice_port() {
        let s = svc(json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "web", "port": 80},
                      {"name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30868}]
        }));
        let sl = slice(
            "web-1",
            json!([{"name": "web", "port": 8080, "protocol": "TCP"},
                   {"name": "sig", "port": 3869, "protocol": "SCTP"}]),
            json!([{"addresses": ["10.1.0.1"]}]),
        );
        let (fes, warnings) = proxied(&s, &[&sl], &node(&["192.168.0.1"]));
        assert!(warnings.is_empty(), "{warnings:?}");
        let sctp: Vec<_> = fes
            .iter()
            .filter(|(f, _)| f.proto == Protocol::Sctp)
            .cloned()
            .collect();
        assert_eq!(
            sctp,
            vec![
                (
                    fe("10.96.0.10", 3868, Protocol::Sctp, ClusterIp),
                    vec![be("10.1.0.1", 3869)]
                ),
                (
                    fe("192.168.0.1", 30868, Protocol::Sctp, NodePort),
                    vec![be("10.1.0.1", 3869)]
                ),
            ]
        );
    }

    #[test]
    fn malformed_services_are_invalid_with_a_reason() {
        use InvalidService::*;
        let p = |s: &str| s.to_owned();
        let cases = [
            (
                "unknown protocol",
                json!([{"port": 80, "protocol": "ICMP"}]),
                UnknownProtocol {
                    port: p("port 80"),
                    protocol: p("ICMP"),
                },
            ),
            (
                "lower-case protocol",
                json!([{"port": 80, "protocol": "tcp"}]),
                UnknownProtocol {
                    port: p("port 80"),
                    protocol: p("tcp"),
                },
            ),
            (
                "port 0",
                json!([{"port": 0}]),
                PortOutOfRange {
                    port: p("port 0"),
                    number: 0,
                },
            ),
            (
                "port 70000",
                json!([{"port": 70000}]),
                PortOutOfRange {
                    port: p("port 70000"),
                    number: 70000,
                },
            ),
            (
                "negative port",
                json!([{"port": -1}]),
                PortOutOfRange {
                    port: p("port -1"),
                    number: -1,
                },
            ),
            (
                "nodePort 70000",
                json!([{"port": 80, "nodePort": 70000}]),
                NodePortOutOfRange {
                    port: p("port 80"),
                    number: 70000,
                },
            ),
            (
                "same port and protocol twice",
                json!([{"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]),
                DuplicatePort {
                    number: 80,
                    protocol: p("TCP"),
                },
            ),
            (
                "same name and protocol twice",
                json!([{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
                DuplicatePortName {
                    name: p("a"),
                    protocol: p("TCP"),
                },
            ),
            (
                "same nodePort and protocol twice",
                json!([{"name": "a", "port": 80, "nodePort": 30080},
                       {"name": "b", "port": 81, "nodePort": 30080}]),
                DuplicateNodePort {
                    number: 30080,
                    protocol: p("TCP"),
                },
            ),
        ];
        for (what, ports, want) in cases {
            let s = svc(json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": ports}));
            let reason = invalid_reason(&s, &[], &Limits::default());
            assert_eq!(reason, want, "{what}");
        }
        // And each says what is wrong in words.
        assert_eq!(
            DuplicatePort {
                number: 80,
                protocol: p("TCP")
            }
            .to_string(),
            "two ports are 80/TCP; each port and protocol may appear once"
        );
    }

    #[test]
    fn the_same_port_number_on_tcp_and_udp_is_valid() {
        let s = svc(json!({"clusterIP": "10.96.0.10",
                           "ports": [{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}]}));
        assert_eq!(frontends(&s, &[], &node(&[])).len(), 2);
    }

    #[test]
    fn an_unknown_service_type_is_invalid() {
        let s =
            svc(json!({"type": "Nodeport", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        assert_eq!(
            invalid_reason(&s, &[], &Limits::default()),
            InvalidService::UnknownType {
                type_: "Nodeport".into()
            }
        );
    }

    #[test]
    fn an_absurd_number_of_endpoints_makes_the_service_invalid() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let limits = Limits {
            max_backends_per_frontend: 2,
        };
        let three = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.3"]}]),
        );
        assert_eq!(
            invalid_reason(&s, &[&three], &limits),
            InvalidService::TooManyEndpoints {
                port: "port 80/TCP".into(),
                count: 3,
                limit: 2
            }
        );
        // At the limit it is fine.
        assert!(matches!(
            service_frontends(&s, &[&two_pods()], &node(&[]), &limits),
            Outcome::Proxied { .. }
        ));
    }

    #[test]
    fn a_service_without_ready_endpoints_keeps_its_frontend_with_no_backends() {
        // The datapath rejects traffic to a frontend with no backends, as kube-proxy's REJECT
        // rule does, rather than letting it through to nothing.
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let all_down = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.1"], "conditions": {"ready": false}}]),
        );
        for slices in [vec![], vec![&all_down]] {
            assert_eq!(
                frontends(&s, &slices, &node(&[])),
                vec![(fe("10.96.0.10", 80, TCP, ClusterIp), vec![])]
            );
        }
    }

    #[test]
    fn node_addresses_lists_internal_then_external_ipv4_without_duplicates() {
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": "node0"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node0"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalIP", "address": "192.168.1.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "ExternalIP", "address": "192.168.1.1"},
                {"type": "InternalDNS", "address": "node0.internal"},
            ]}
        }))
        .unwrap();
        assert_eq!(
            node_addresses(&n),
            vec![ip("192.168.1.1"), ip("203.0.113.7")]
        );
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(node_addresses(&bare), Vec::<Ipv4Addr>::new());
    }

    /// An endpoint on `node` with the given conditions, as the EndpointSlice controller
    /// writes them.
    fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
        json!({"addresses": [addr], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn local_be(addr: &str, port: u16) -> Backend {
        Backend {
            local: true,
            ..be(addr, port)
        }
    }

    // pkg/proxy/topology_test.go TestCategorizeEndpoints, "Cluster traffic policy, endpoints
    // not ready" and "iTP: Local, eTP: Cluster, some endpoints local" rows; KEP-1669.
    #[test]
    fn new_connections_use_ready_endpoints_then_serving_terminating_ones_never_not_serving() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let mixed = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                ep("10.1.0.1", "node-a", true, true, false),
                ep("10.1.0.2", "node-b", false, true, true),
                ep("10.1.0.3", "node-b", false, false, true),
            ]),
        );
        assert_eq!(
            frontends(&s, &[&mixed], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![local_be("10.1.0.1", 8080)]
            )],
            "the ready endpoint only"
        );
        let draining = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                ep("10.1.0.2", "node-b", false, true, true),
                ep("10.1.0.3", "node-b", false, false, true),
                ep("10.1.0.4", "node-b", false, false, false),
            ]),
        );
        assert_eq!(
            frontends(&s, &[&draining], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![be("10.1.0.2", 8080)]
            )],
            "none ready: the serving, terminating one, never the one not serving"
        );
        // endpointslicecache.go: serving unset counts as serving.
        let unset = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.1.0.6"], "nodeName": "node-b",
                    "conditions": {"ready": false, "terminating": true}}]),
        );
        assert_eq!(
            frontends(&s, &[&unset], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![be("10.1.0.6", 8080)]
            )]
        );
    }

    #[test]
    fn an_endpoint_is_local_when_its_node_name_is_this_nodes() {
        let s = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                ep("10.1.0.1", "node-a", true, true, false),
                ep("10.1.0.2", "node-b", true, true, false),
                {"addresses": ["10.1.0.3"]},
            ]),
        );
        assert_eq!(
            frontends(&s, &[&sl], &node(&[])),
            vec![(
                fe("10.96.0.10", 80, TCP, ClusterIp),
                vec![
                    local_be("10.1.0.1", 8080),
                    be("10.1.0.2", 8080),
                    be("10.1.0.3", 8080)
                ]
            )]
        );
    }

    fn local_policy_service(kind: &str) -> Service {
        svc(
            json!({"type": kind, "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                   "externalIPs": ["192.0.2.7"], "healthCheckNodePort": 32100,
                   "ports": [{"port": 80, "nodePort": 30080}]}),
        )
    }

    // pkg/proxy/topology_test.go "eTP: Local, with a local endpoint": external traffic to
    // the local endpoints, internal (cluster) traffic to all; iptables proxier: pod traffic to
    // external destinations short-circuits to the cluster policy chain.
    #[test]
    fn external_traffic_policy_local_sends_outside_traffic_to_this_nodes_endpoints_only() {
        let s = local_policy_service("NodePort");
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                ep("10.1.0.1", "node-a", true, true, false),
                ep("10.1.0.2", "node-b", true, true, false),
            ]),
        );
        let (got, warnings) = proxied_all(&s, &[&sl], &node(&["192.168.1.1"]));
        assert!(warnings.is_empty(), "{warnings:?}");
        let all = vec![local_be("10.1.0.1", 8080), be("10.1.0.2", 8080)];
        let outside = Backends {
            all: all.clone(),
            external: Some(vec![local_be("10.1.0.1", 8080)]),
            sources: None,
            affinity_timeout_s: None,
            no_local_endpoints: false,
            maglev: false,
        };
        assert_eq!(
            got,
            vec![
                (
                    fe("10.96.0.10", 80, TCP, ClusterIp),
                    Backends::all(all.clone())
                ),
                (fe("192.0.2.7", 80, TCP, ExternalIp), outside.clone()),
                (fe("192.168.1.1", 30080, TCP, NodePort), outside),
            ]
        );
    }

    // topology_test.go "eTP: Local, only terminating local endpoints" (KEP-1669): outside
    // traffic falls back to the serving and terminating local ones; with none at all, the
    // list is empty and the datapath drops outside traffic, as kube-proxy does.
    #[test]
    fn local_policy_falls_back_to_terminating_local_endpoints_and_else_to_none() {
        let s = local_policy_service("NodePort");
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                ep("10.1.0.1", "node-a", false, true, true),
                ep("10.1.0.2", "node-b", true, true, false),
            ]),
        );
        let (got, _) = proxied_all(&s, &[&sl], &node(&["192.168.1.1"]));
        let np = &got.iter().find(|(f, _)| f.kind == NodePort).unwrap().1;
        assert_eq!(np.all, vec![be("10.1.0.2", 8080)]);
        assert_eq!(np.external, Some(vec![local_be("10.1.0.1", 8080)]));

        let remote_only = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([ep("10.1.0.2", "node-b", true, true, false)]),
        );
        let (got, _) = proxied_all(&s, &[&remote_only], &node(&["192.168.1.1"]));
        let np = &got.iter().find(|(f, _)| f.kind == NodePort).unwrap().1;
        assert_eq!(np.external, Some(vec![]));
        assert_eq!(np.all, vec![be("10.1.0.2", 8080)]);
    }

    /// An endpoint of node `node` (`node-a` is this node) with topology hints; not ready means
    /// serving and terminating.
    fn hinted(addr: &str, node: &str, ready: bool, zones: &[&str], nodes: &[&str]) -> Value {
        let names = |v: &[&str]| v.iter().map(|n| json!({"name": n})).collect::<Vec<_>>();
        let mut hints = serde_json::Map::new();
        if !zones.is_empty() {
            hints.insert("forZones".into(), json!(names(zones)));
        }
        if !nodes.is_empty() {
            hints.insert("forNodes".into(), json!(names(nodes)));
        }
        json!({"addresses": [addr], "nodeName": node, "hints": hints,
               "conditions": {"ready": ready, "serving": true, "terminating": !ready}})
    }

    /// Topology hints, row by row as kube-proxy's `TestCategorizeEndpoints`
    /// (pkg/proxy/topology_test.go; its case names are quoted) and `topologyModeFromHints`
    /// (pkg/proxy/topology.go) for the node hints of PreferSameNode, which the EndpointSlice
    /// controller writes for `trafficDistribution` (the proxy reads only the hints). Each row:
    /// this node's zone, the endpoints, whether the Service has externalTrafficPolicy Local,
    /// and the endpoints of traffic with the Cluster policy (the ClusterIP's) and with the
    /// Local one (outside traffic to the NodePort).
    #[test]
    fn topology_hints_choose_endpoints_as_kube_proxy_does() {
        type Row = (
            &'static str,
            Option<&'static str>,
            Vec<Value>,
            bool,
            Vec<&'static str>,
            Option<Vec<&'static str>>,
        );
        let h = hinted;
        let rows: Vec<Row> = vec![
            (
                "should use topology since all endpoints have hints, node has a zone label and there are endpoints for the node's zone",
                Some("zone-a"),
                vec![
                    h("10.1.2.3", "n", true, &["zone-a"], &[]),
                    h("10.1.2.4", "n", true, &["zone-b"], &[]),
                    h("10.1.2.5", "n", true, &["zone-c"], &[]),
                    h("10.1.2.6", "n", true, &["zone-a"], &[]),
                ],
                false,
                vec!["10.1.2.3", "10.1.2.6"],
                None,
            ),
            (
                "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                Some("zone-a"),
                vec![
                    h("10.1.2.3", "node-a", true, &["zone-a"], &[]),
                    h("10.1.2.4", "node-a", true, &["zone-b"], &[]),
                    h("10.1.2.5", "n", true, &["zone-c"], &[]),
                    h("10.1.2.6", "n", true, &["zone-a"], &[]),
                ],
                true,
                vec!["10.1.2.3", "10.1.2.6"],
                Some(vec!["10.1.2.3", "10.1.2.4"]),
            ),
            (
                "empty node labels",
                None,
                vec![h("10.1.2.3", "n", true, &["zone-a"], &[])],
                false,
                vec!["10.1.2.3"],
                None,
            ),
            (
                "node in different zone, no endpoint filtering",
                Some("zone-b"),
                vec![h("10.1.2.3", "n", true, &["zone-a"], &[])],
                false,
                vec!["10.1.2.3"],
                None,
            ),
            (
                "unready endpoint",
                Some("zone-a"),
                vec![
                    h("10.1.2.3", "n", true, &["zone-a"], &[]),
                    h("10.1.2.4", "n", true, &["zone-b"], &[]),
                    h("10.1.2.5", "n", true, &["zone-c"], &[]),
                    h("10.1.2.6", "n", false, &["zone-a"], &[]),
                ],
                false,
                vec!["10.1.2.3"],
                None,
            ),
            (
                "only unready endpoints in same zone (should not filter)",
                Some("zone-a"),
                vec![
                    h("10.1.2.3", "n", false, &["zone-a"], &[]),
                    h("10.1.2.4", "n", true, &["zone-b"], &[]),
                    h("10.1.2.5", "n", true, &["zone-c"], &[]),
                    h("10.1.2.6", "n", false, &["zone-a"], &[]),
                ],
                false,
                vec!["10.1.2.4", "10.1.2.5"],
                None,
            ),
            (
                "missing hints, no filtering applied",
                Some("zone-a"),
                vec![
                    h("10.1.2.3", "n", true, &["zone-a"], &[]),
                    h("10.1.2.4", "n", true, &["zone-b"], &[]),
                    h("10.1.2.5", "n", true, &[], &[]),
                    h("10.1.2.6", "n", true, &["zone-a"], &[]),
                ],
                false,
                vec!["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
                None,
            ),
            (
                "multiple hints per endpoint, filtering includes any endpoint with zone included",
                Some("zone-c"),
                vec![
                    h("10.1.2.3", "n", true, &["zone-a", "zone-b", "zone-c"], &[]),
                    h("10.1.2.4", "n", true, &["zone-b", "zone-c"], &[]),
                    h("10.1.2.5", "n", true, &["zone-b", "zone-d"], &[]),
                    h("10.1.2.6", "n", true, &["zone-c"], &[]),
                ],
                false,
                vec!["10.1.2.3", "10.1.2.4", "10.1.2.6"],
                None,
            ),
            (
                "conflicting topology and localness require merging allEndpoints",
                Some("zone-a"),
                vec![
                    h("10.0.0.0", "node-a", true, &["zone-a"], &[]),
                    h("10.0.0.1", "node-a", true, &["zone-b"], &[]),
                    h("10.0.0.2", "n", true, &["zone-a"], &[]),
                    h("10.0.0.3", "n", true, &["zone-b"], &[]),
                ],
                true,
                vec!["10.0.0.0", "10.0.0.2"],
                Some(vec!["10.0.0.0", "10.0.0.1"]),
            ),
            // topologyModeFromHints: every ready endpoint hinted for a node, one for this
            // node: PreferSameNode, before zones.
            (
                "node hints for this node win over zone hints",
                Some("zone-a"),
                vec![
                    h("10.2.0.1", "node-a", true, &["zone-a"], &["node-a"]),
                    h("10.2.0.2", "n", true, &["zone-a"], &["node-b"]),
                    h("10.2.0.3", "n", true, &["zone-b"], &["node-c"]),
                ],
                false,
                vec!["10.2.0.1"],
                None,
            ),
            (
                "node hints need no zone hints",
                None,
                vec![
                    h("10.2.0.1", "node-a", true, &[], &["node-a"]),
                    h("10.2.0.2", "n", true, &[], &["node-b"]),
                ],
                false,
                vec!["10.2.0.1"],
                None,
            ),
            (
                "no node hint for this node: zone hints decide",
                Some("zone-a"),
                vec![
                    h("10.2.0.1", "n", true, &["zone-a"], &["node-b"]),
                    h("10.2.0.2", "n", true, &["zone-b"], &["node-c"]),
                ],
                false,
                vec!["10.2.0.1"],
                None,
            ),
            (
                "an endpoint without a node hint: zone hints decide",
                Some("zone-a"),
                vec![
                    h("10.2.0.1", "node-a", true, &["zone-b"], &["node-a"]),
                    h("10.2.0.2", "n", true, &["zone-a"], &[]),
                ],
                false,
                vec!["10.2.0.2"],
                None,
            ),
            (
                "an unready endpoint's missing node hint does not count",
                None,
                vec![
                    h("10.2.0.1", "node-a", true, &[], &["node-a"]),
                    h("10.2.0.2", "n", true, &[], &["node-b"]),
                    h("10.2.0.3", "n", false, &[], &[]),
                ],
                false,
                vec!["10.2.0.1"],
                None,
            ),
            (
                "no ready endpoint: hints ignored, the terminating ones serve",
                Some("zone-a"),
                vec![
                    h("10.2.0.1", "n", false, &["zone-a"], &["node-a"]),
                    h("10.2.0.2", "n", false, &["zone-b"], &["node-b"]),
                ],
                false,
                vec!["10.2.0.1", "10.2.0.2"],
                None,
            ),
            (
                "node hints ignore the Local policy's endpoints",
                Some("zone-a"),
                vec![
                    h("10.2.0.1", "n", true, &[], &["node-a"]),
                    h("10.2.0.2", "node-a", true, &[], &["node-b"]),
                ],
                true,
                vec!["10.2.0.1"],
                Some(vec!["10.2.0.2"]),
            ),
        ];
        for (name, zone, endpoints, etp_local, cluster, local) in rows {
            let s = svc(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                "externalTrafficPolicy": if etp_local { "Local" } else { "Cluster" },
                "ports": [{"port": 80, "nodePort": 30080}]}));
            let sl = slice("web-1", json!([{"port": 80}]), json!(endpoints));
            let n = NodeContext {
                zone: zone.map(String::from),
                ..node(&["192.168.1.1"])
            };
            let (got, _) = proxied_all(&s, &[&sl], &n);
            let addrs = |v: &[Backend]| v.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
            let of = |kind| &got.iter().find(|(f, _)| f.kind == kind).unwrap().1;
            assert_eq!(addrs(&of(ClusterIp).all), cluster, "{name}: Cluster policy");
            assert_eq!(
                of(NodePort).external.as_deref().map(addrs),
                local.map(|l| l.iter().map(|a| a.to_string()).collect()),
                "{name}: Local policy"
            );
        }
    }

    // topology_test.go "empty zone label": a zone label that is empty is no zone.
    #[test]
    fn the_node_zone_comes_from_its_label_and_an_empty_one_is_none() {
        let node = |labels: Value| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": labels}}))
                .unwrap()
        };
        assert_eq!(
            node_zone(&node(json!({ZONE_LABEL: "zone-a"}))),
            Some("zone-a".into())
        );
        assert_eq!(node_zone(&node(json!({ZONE_LABEL: ""}))), None);
        assert_eq!(node_zone(&node(json!({}))), None);
    }

    // iptables/nftables proxier syncProxyRules: a port counts in
    // sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"} when it has
    // endpoints (hasEndpoints) and its external policy finds none (!hasExternalEndpoints);
    // not when it has no endpoints at all (rejected, not dropped), nor under eTP Cluster.
    #[test]
    fn ports_with_endpoints_but_none_local_under_a_local_policy_are_counted() {
        let two_ports = svc(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100,
            "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                      {"name": "b", "port": 81, "nodePort": 30081}]}));
        let count = |s: &Service, eps: Value| {
            let sl = slice(
                "web-1",
                json!([{"name": "a", "port": 8080}, {"name": "b", "port": 8081}]),
                eps,
            );
            match outcome(s, &[&sl], &node(&["192.168.1.1"])) {
                Outcome::Proxied {
                    no_local_endpoints, ..
                } => no_local_endpoints,
                other => panic!("{other:?}"),
            }
        };
        let remote = json!([ep("10.1.0.2", "node-b", true, true, false)]);
        assert_eq!(
            count(&two_ports, remote.clone()).external,
            2,
            "both ports, none local"
        );
        let local = json!([ep("10.1.0.1", "node-a", true, true, false)]);
        assert_eq!(count(&two_ports, local).external, 0, "a local endpoint");
        assert_eq!(
            count(&two_ports, json!([])).external,
            0,
            "no endpoints: rejected, not counted"
        );
        let mut cluster = two_ports.clone();
        cluster.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
        assert_eq!(count(&cluster, remote.clone()).external, 0, "eTP Cluster");
        let mut internal_only = two_ports.clone();
        internal_only.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert_eq!(
            count(&internal_only, remote.clone()).external,
            0,
            "not externally accessible"
        );
        // internalTrafficPolicy Local counts as "internal", each port once, the same way.
        let mut both = two_ports.clone();
        both.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        assert_eq!(
            count(&both, remote.clone()),
            NoLocalEndpoints {
                internal: 2,
                external: 2
            }
        );
        assert!(count(&both, json!([])).is_zero(), "no endpoints: rejected");
        internal_only.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        assert_eq!(
            count(&internal_only, remote),
            NoLocalEndpoints {
                internal: 2,
                external: 0
            }
        );
    }

    // service_health.go: only Ready local endpoints count (distinct addresses), so a load
    // balancer drains a node whose endpoints are terminating; only LoadBalancer Services with
    // externalTrafficPolicy Local have a health check node port (NeedsHealthCheck).
    #[test]
    fn the_health_check_node_port_counts_ready_local_endpoints() {
        let sl = slice(
            "web-1",
            json!([{"port": 8080}, {"name": "b", "port": 9090}]),
            json!([
                ep("10.1.0.1", "node-a", true, true, false),
                ep("10.1.0.5", "node-a", false, true, true),
                ep("10.1.0.2", "node-b", true, true, false),
            ]),
        );
        let hc = |s: &Service| match outcome(s, &[&sl], &node(&["192.168.1.1"])) {
            Outcome::Proxied { health_check, .. } => health_check,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            hc(&local_policy_service("LoadBalancer")),
            Some(HealthCheck {
                node_port: 32100,
                local_endpoints: 1
            })
        );
        assert_eq!(hc(&local_policy_service("NodePort")), None);
        let cluster = svc(json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                                 "ports": [{"port": 80, "nodePort": 30080}]}));
        assert_eq!(hc(&cluster), None);
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let node = |v: Value| -> Node { serde_json::from_value(v).unwrap() };
        assert!(node_eligible(&node(json!({"metadata": {"name": "n"}}))));
        assert!(node_eligible(&node(json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}))));
        assert!(!node_eligible(&node(json!({"metadata": {"name": "n",
            "deletionTimestamp": "2026-11-30T12:00:00Z"}}))));
        assert!(!node_eligible(&node(json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000",
                                 "effect": "PreferNoSchedule"}]}}))));
    }
}
