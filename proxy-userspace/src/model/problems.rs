//! What the model finds wrong with a Service, as values: tests match the variants, and the
//! agent logs each once and compares them by value. Their `Display` is the operator's message.
use std::fmt;

use crate::service::{FrontendId, FrontendKind};

/// Why a Service cannot be programmed: nothing of it is (the agent keeps its last good
/// entries and counts the event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidService {
    /// spec.type is none of ClusterIP, NodePort, LoadBalancer and ExternalName.
    UnknownType { type_: String },
    /// A port's protocol is none of TCP, UDP and SCTP (`port` names the port).
    UnknownProtocol { port: String, protocol: String },
    /// A port number outside 1-65535.
    PortOutOfRange { port: String, number: i32 },
    /// A nodePort outside 1-65535.
    NodePortOutOfRange { port: String, number: i32 },
    /// Two ports with the same number and protocol.
    DuplicatePort { number: i32, protocol: String },
    /// Two ports with the same name and protocol: their endpoints cannot be told apart.
    DuplicatePortName { name: String, protocol: String },
    /// Two ports with the same nodePort and protocol.
    DuplicateNodePort { number: u16, protocol: String },
    /// An address field that is no IP address.
    NotAnIp { field: &'static str, value: String },
    /// More endpoints behind one port than [`super::Limits`] allows.
    TooManyEndpoints {
        port: String,
        count: usize,
        limit: usize,
    },
    /// One address, port and protocol is a frontend of two service ports whose endpoints
    /// differ.
    AmbiguousFrontend {
        frontend: FrontendId,
        first: FrontendKind,
        second: FrontendKind,
    },
    /// sessionAffinityConfig.clientIP.timeoutSeconds outside 1-86400.
    AffinityTimeoutOutOfRange { seconds: i32 },
    /// spec.sessionAffinity is neither None nor ClientIP.
    UnknownAffinity { value: String },
}

impl InvalidService {
    /// The variant's name in snake case: a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownType { .. } => "unknown_type",
            Self::UnknownProtocol { .. } => "unknown_protocol",
            Self::PortOutOfRange { .. } => "port_out_of_range",
            Self::NodePortOutOfRange { .. } => "node_port_out_of_range",
            Self::DuplicatePort { .. } => "duplicate_port",
            Self::DuplicatePortName { .. } => "duplicate_port_name",
            Self::DuplicateNodePort { .. } => "duplicate_node_port",
            Self::NotAnIp { .. } => "not_an_ip",
            Self::TooManyEndpoints { .. } => "too_many_endpoints",
            Self::AmbiguousFrontend { .. } => "ambiguous_frontend",
            Self::AffinityTimeoutOutOfRange { .. } => "affinity_timeout_out_of_range",
            Self::UnknownAffinity { .. } => "unknown_affinity",
        }
    }
}

impl fmt::Display for InvalidService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownType { type_ } => write!(
                f,
                "unknown type {type_:?} (expected ClusterIP, NodePort, LoadBalancer or ExternalName)"
            ),
            Self::UnknownProtocol { port, protocol } => write!(
                f,
                "{port}: unknown protocol {protocol:?} (expected TCP, UDP or SCTP)"
            ),
            Self::PortOutOfRange { port, number } => {
                write!(f, "{port}: port {number} is outside 1-65535")
            }
            Self::NodePortOutOfRange { port, number } => {
                write!(f, "{port}: nodePort {number} is outside 1-65535")
            }
            Self::DuplicatePort { number, protocol } => write!(
                f,
                "two ports are {number}/{protocol}; each port and protocol may appear once"
            ),
            Self::DuplicatePortName { name, protocol } => write!(
                f,
                "two {protocol} ports are named {name:?}: their endpoints cannot be told apart; \
                 give each port its own name"
            ),
            Self::DuplicateNodePort { number, protocol } => write!(
                f,
                "two ports have nodePort {number}/{protocol}; each nodePort may appear once"
            ),
            Self::NotAnIp { field, value } => write!(f, "{field} {value:?} is not an IP address"),
            Self::TooManyEndpoints { port, count, limit } => write!(
                f,
                "{port}: absurd number of endpoints: {count} > {limit} (the per-frontend limit)"
            ),
            Self::AmbiguousFrontend {
                frontend,
                first,
                second,
            } => write!(
                f,
                "{frontend} is a frontend of two service ports with different endpoints (as \
                 {first:?} and as {second:?}); change the ports or addresses so each address, \
                 port and protocol names one service port"
            ),
            Self::AffinityTimeoutOutOfRange { seconds } => write!(
                f,
                "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside 1-{}",
                super::AFFINITY_MAX_TIMEOUT_S
            ),
            Self::UnknownAffinity { value } => write!(
                f,
                "unknown sessionAffinity {value:?} (expected None or ClientIP)"
            ),
        }
    }
}

/// A part of a Service left out while the rest is programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// An IPv6 address or range in `field`: sluice proxies IPv4 only, as a kube-proxy of the
    /// IPv4 family filters by family.
    Ipv6 { field: &'static str, value: String },
    /// Two frontends of the Service on one address, port and protocol with the same
    /// endpoints, programmed once as the wider kind.
    MergedFrontend {
        frontend: FrontendId,
        first: FrontendKind,
        second: FrontendKind,
        kept: FrontendKind,
    },
    /// A load balancer ingress with an ipMode other than VIP and Proxy.
    UnknownIpMode { ip: String, mode: String },
    /// A load balancer ingress whose ip is no IP address.
    IngressNotAnIp { value: String },
    /// A loadBalancerSourceRanges entry that is no CIDR.
    SourceRangeNotACidr { value: String },
    /// An EndpointSlice port outside 1-65535.
    EndpointPortOutOfRange {
        slice: String,
        port: String,
        number: i32,
    },
    /// An endpoint address that is no IPv4 address.
    EndpointNotIpv4 { slice: String, value: String },
    /// A `sluice.io/lb-algorithm` annotation that is neither `random` nor `maglev`: the
    /// agent's `--lb-algorithm` applies instead.
    UnknownLbAlgorithm { value: String },
}

impl Skipped {
    /// The variant's name in snake case: a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ipv6 { .. } => "ipv6",
            Self::MergedFrontend { .. } => "merged_frontend",
            Self::UnknownIpMode { .. } => "unknown_ip_mode",
            Self::IngressNotAnIp { .. } => "ingress_not_an_ip",
            Self::SourceRangeNotACidr { .. } => "source_range_not_a_cidr",
            Self::EndpointPortOutOfRange { .. } => "endpoint_port_out_of_range",
            Self::EndpointNotIpv4 { .. } => "endpoint_not_ipv4",
            Self::UnknownLbAlgorithm { .. } => "unknown_lb_algorithm",
        }
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ipv6 { field, value } => write!(
                f,
                "{field} {value} skipped: IPv6 is not proxied (IPv4 only)"
            ),
            Self::MergedFrontend {
                frontend,
                first,
                second,
                kept,
            } => write!(
                f,
                "{frontend} is both a {first:?} and a {second:?} frontend; programmed once, as \
                 {kept:?}"
            ),
            Self::UnknownIpMode { ip, mode } => write!(
                f,
                "load balancer ingress {ip} skipped: unknown ipMode {mode:?}"
            ),
            Self::IngressNotAnIp { value } => write!(
                f,
                "load balancer ingress {value:?} skipped: not an IP address"
            ),
            Self::SourceRangeNotACidr { value } => {
                write!(f, "loadBalancerSourceRange {value:?} skipped: not a CIDR")
            }
            Self::EndpointPortOutOfRange {
                slice,
                port,
                number,
            } => write!(
                f,
                "EndpointSlice {slice}: port {number} for {port} skipped: outside 1-65535"
            ),
            Self::EndpointNotIpv4 { slice, value } => write!(
                f,
                "EndpointSlice {slice}: endpoint address {value:?} skipped: not an IPv4 address"
            ),
            Self::UnknownLbAlgorithm { value } => write!(
                f,
                "annotation {} {value:?} ignored (expected random or \
                 maglev): the agent's --lb-algorithm applies",
                super::LB_ALGORITHM_ANNOTATION
            ),
        }
    }
}
