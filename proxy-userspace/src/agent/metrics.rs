//! The agent's Prometheus metrics (text format on `--metrics-bind-address`, `/metrics`).
//!
//! One name per meaning. Where kube-proxy has a metric of the same meaning, sluice exports it
//! under kube-proxy's name, type and labels (pkg/proxy/metrics/metrics.go; `ip_family` is
//! always `IPv4`), so that dashboards and alerts written for kube-proxy keep working:
//! [`KUBE_PROXY_NAMES`]. Everything else is sluice's own, named `sluice_*`.
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::COUNTER_NAMES;

use crate::dataplane::{Counters, CtFill};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// The kube-proxy metrics sluice exports, as they appear on `/metrics` (counters with their
/// `_total`), each with the same meaning as kube-proxy's.
pub const KUBE_PROXY_NAMES: &[&str] = &[
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "kubeproxy_proxy_healthz_total",
    "kubeproxy_proxy_livez_total",
];

/// An uplink, the XDP mode it has (`native`, `generic`, or `off`: TC alone), and whether XDP
/// sends the packets of flows SNATed to the node out itself there (`tx`: `on` or `off`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdpLabel {
    pub device: String,
    pub mode: String,
    pub tx: String,
}

impl XdpLabel {
    pub fn new(device: &str, mode: &str, tx: bool) -> Self {
        Self {
            device: device.to_owned(),
            mode: mode.to_owned(),
            tx: if tx { "on" } else { "off" }.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    /// One pass of the sync loop (a batch of changes, or a full sync).
    pub sync_duration: Histogram,
    /// The same, of full syncs only.
    pub sync_full_duration: Histogram,
    /// The same, of passes over changed Services only.
    pub sync_partial_duration: Histogram,
    /// Trigger time of an EndpointSlice change to the moment its frontends were written.
    pub programming_latency: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    /// EndpointSlice events received (added, changed, deleted).
    pub endpoint_changes: Counter,
    /// Service events received.
    pub service_changes: Counter,
    /// Service ports with a Local traffic policy, endpoints, and none of them on this node,
    /// by policy (`internal`, `external`).
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    /// Answers of `/healthz` (and `/readyz`), by HTTP status.
    pub healthz: Family<CodeLabel, Counter>,
    /// Answers of `/livez`, by HTTP status.
    pub livez: Family<CodeLabel, Counter>,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub invalid_services: Gauge,
    /// Services currently invalid, by why (`InvalidService::kind`).
    pub invalid_services_by_kind: Family<KindLabel, Gauge>,
    /// Parts of Services left out while the rest is programmed, by what
    /// (`Skipped::kind`: `ipv6`, `merged_frontend`, ...).
    pub skipped_service_parts: Family<KindLabel, Gauge>,
    pub invalid_service_events: Counter,
    pub frontend_conflicts: Counter,
    pub write_errors: Counter,
    pub sockets_destroyed: Counter,
    pub udp_flows_forgotten: Counter,
    pub socket_destroy_errors: Counter,
    pub map_full: Family<MapLabel, Counter>,
    pub source_errors: Family<SourceLabel, Counter>,
    pub manifest_errors: Counter,
    pub attached_devices: Family<RoleLabel, Gauge>,
    pub attach_errors: Counter,
    pub xdp_uplinks: Family<XdpLabel, Gauge>,
    pub packets: Family<VerdictLabel, Counter>,
    pub bytes: Family<VerdictLabel, Counter>,
    pub conntrack_capacity: Gauge,
    pub conntrack_held: Gauge,
    pub conntrack_new_capacity: Gauge,
    pub conntrack_new_held: Gauge,
    pub conntrack_live: Family<KindLabel, Gauge>,
    pub conntrack_flows: Family<StateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        // 100 us .. ~105 s: a map write takes microseconds, where kube-proxy's buckets start at
        // 1 ms (syncs) and 250 ms (programming); quantiles over either read the same.
        let seconds = || Histogram::new(exponential_buckets(0.0001, 2.0, 21));
        let m = Self {
            sync_duration: seconds(),
            sync_full_duration: seconds(),
            sync_partial_duration: seconds(),
            programming_latency: seconds(),
            last_sync: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            invalid_services: Gauge::default(),
            invalid_services_by_kind: Family::default(),
            skipped_service_parts: Family::default(),
            invalid_service_events: Counter::default(),
            frontend_conflicts: Counter::default(),
            write_errors: Counter::default(),
            sockets_destroyed: Counter::default(),
            udp_flows_forgotten: Counter::default(),
            socket_destroy_errors: Counter::default(),
            map_full: Family::default(),
            source_errors: Family::default(),
            manifest_errors: Counter::default(),
            attached_devices: Family::default(),
            attach_errors: Counter::default(),
            xdp_uplinks: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_held: Gauge::default(),
            conntrack_new_capacity: Gauge::default(),
            conntrack_new_held: Gauge::default(),
            conntrack_live: Family::default(),
            conntrack_flows: Family::default(),
            registry: Registry::default(),
        };
        let kube = root.sub_registry_with_prefix("kubeproxy");
        kube.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        kube.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        kube.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        kube.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        let ipv4 = kube.sub_registry_with_label(("ip_family".into(), "IPv4".into()));
        ipv4.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        ipv4.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        ipv4.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        ipv4.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        ipv4.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.programming_latency.clone(),
        );
        ipv4.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        let r = root.sub_registry_with_prefix("sluice");
        r.register(
            "services",
            "Services programmed (with at least one frontend)",
            m.services.clone(),
        );
        r.register("frontends", "Frontends in the maps", m.frontends.clone());
        r.register(
            "backends",
            "Backend slots in the maps (summed over frontends)",
            m.backends.clone(),
        );
        r.register(
            "invalid_services",
            "Services currently skipped as invalid (bad port, unknown protocol, too many endpoints)",
            m.invalid_services.clone(),
        );
        r.register(
            "invalid_services_by_kind",
            "Services currently skipped as invalid, by why",
            m.invalid_services_by_kind.clone(),
        );
        r.register(
            "skipped_service_parts",
            "Parts of Services left out while the rest is programmed (an IPv6 address, a bad endpoint), by what",
            m.skipped_service_parts.clone(),
        );
        r.register(
            "invalid_service_events",
            "Times a Service was found invalid and skipped",
            m.invalid_service_events.clone(),
        );
        r.register(
            "frontend_conflicts",
            "Times a Service asked for a frontend another Service already holds",
            m.frontend_conflicts.clone(),
        );
        r.register(
            "map_write_errors",
            "Failed map writes (the Service keeps its last good entries and is retried)",
            m.write_errors.clone(),
        );
        r.register(
            "sockets_destroyed",
            "UDP sockets connected (by socket LB) to a backend that went away, destroyed so that they reconnect",
            m.sockets_destroyed.clone(),
        );
        r.register(
            "udp_flows_forgotten",
            "UDP conntrack flows pinned to a backend that left its Service, removed so that their next packet picks a live one",
            m.udp_flows_forgotten.clone(),
        );
        r.register(
            "socket_destroy_errors",
            "Failed attempts to destroy such sockets (the kernel may lack CONFIG_INET_DIAG_DESTROY)",
            m.socket_destroy_errors.clone(),
        );
        r.register(
            "map_full_errors",
            "Writes refused because a map is full, by map",
            m.map_full.clone(),
        );
        r.register(
            "source_errors",
            "Errors from the API server watch, by resource (retried with backoff)",
            m.source_errors.clone(),
        );
        r.register(
            "manifest_errors",
            "Manifest directory loads that failed (the last good state stays in force)",
            m.manifest_errors.clone(),
        );
        r.register(
            "attached_devices",
            "Devices the datapath is attached to, by role (pod or uplink)",
            m.attached_devices.clone(),
        );
        r.register(
            "attach_errors",
            "Failed attachments to devices (retried, except to a device that is not Ethernet)",
            m.attach_errors.clone(),
        );
        r.register(
            "xdp_uplinks",
            "Attached uplinks by device, XDP mode (native, generic, or off: TC alone) and whether XDP forwards flows SNATed to the node (tx); 1 per uplink",
            m.xdp_uplinks.clone(),
        );
        r.register(
            "datapath_packets",
            "Packets seen by the datapath, by verdict (from the pinned per-CPU counters)",
            m.packets.clone(),
        );
        r.register(
            "datapath_bytes",
            "Bytes seen by the datapath, by verdict",
            m.bytes.clone(),
        );
        r.register(
            "conntrack_capacity_entries",
            "Size of the conntrack table of established flows (two entries per flow; the least recently used is evicted when it is full)",
            m.conntrack_capacity.clone(),
        );
        r.register(
            "conntrack_entries",
            "Entries the conntrack table of established flows holds, live or expired (an expired one stays until its room is needed)",
            m.conntrack_held.clone(),
        );
        r.register(
            "conntrack_new_capacity_entries",
            "Size of the conntrack table of flows not yet established (half-open TCP, unanswered UDP); a flood of new flows fills this one only",
            m.conntrack_new_capacity.clone(),
        );
        r.register(
            "conntrack_new_entries",
            "Entries the conntrack table of flows not yet established holds, live or expired",
            m.conntrack_new_held.clone(),
        );
        r.register(
            "conntrack_live_entries",
            "Live conntrack entries, by kind (service: client to frontend; reverse: after translation)",
            m.conntrack_live.clone(),
        );
        r.register(
            "conntrack_flows",
            "Live flows by state (tcp_opening: half-open, what a SYN flood makes; tcp_established; tcp_closing; udp; sctp)",
            m.conntrack_flows.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }

    /// Copies the conntrack table's fill into the exported gauges.
    pub fn set_conntrack_fill(&self, f: &CtFill) {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.conntrack_capacity, u64::from(f.capacity));
        set(&self.conntrack_held, f.held);
        set(&self.conntrack_new_capacity, u64::from(f.new_capacity));
        set(&self.conntrack_new_held, f.new_held);
        for (kind, v) in [("service", f.live_service), ("reverse", f.live_reverse)] {
            let label = KindLabel {
                kind: kind.to_owned(),
            };
            set(&self.conntrack_live.get_or_create(&label), v);
        }
        for (state, v) in [
            ("tcp_opening", f.tcp_opening),
            ("tcp_established", f.tcp_established),
            ("tcp_closing", f.tcp_closing),
            ("udp", f.udp),
            ("sctp", f.sctp),
        ] {
            let label = StateLabel {
                state: state.to_owned(),
            };
            set(&self.conntrack_flows.get_or_create(&label), v);
        }
    }

    /// Copies the datapath's counters into the exported ones (called at scrape time).
    pub fn set_datapath_counters(&self, counters: &Counters) {
        for (name, c) in COUNTER_NAMES.iter().zip(counters.iter()) {
            let label = VerdictLabel {
                verdict: (*name).to_owned(),
            };
            self.packets
                .get_or_create(&label)
                .inner()
                .store(c.packets, std::sync::atomic::Ordering::Relaxed);
            self.bytes
                .get_or_create(&label)
                .inner()
                .store(c.bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` whose name is `name` (a histogram's `_count`, `_sum` and
    /// `_bucket` lines count as its own).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let sample = l.split(['{', ' ']).next().unwrap_or_default();
                sample == name
                    || ["_count", "_sum", "_bucket"]
                        .iter()
                        .any(|suffix| sample.strip_suffix(suffix) == Some(name))
            })
            .collect()
    }

    #[test]
    fn kube_proxy_metrics_have_kube_proxy_names_types_and_labels() {
        let m = Metrics::new();
        m.sync_duration.observe(0.01);
        m.sync_full_duration.observe(0.01);
        m.programming_latency.observe(0.5);
        m.endpoint_changes.inc();
        m.service_changes.inc();
        for policy in ["internal", "external"] {
            m.no_local_endpoints
                .get_or_create(&TrafficPolicyLabel {
                    traffic_policy: policy.into(),
                })
                .set(0);
        }
        let code = CodeLabel { code: "200".into() };
        m.healthz.get_or_create(&code).inc();
        m.livez.get_or_create(&code).inc();
        let text = m.encode();
        for name in KUBE_PROXY_NAMES {
            assert!(!samples(&text, name).is_empty(), "{name} missing:\n{text}");
        }
        // Types as kube-proxy declares them.
        for (name, kind) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
            ),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
            ),
            ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
            ("kubeproxy_proxy_healthz", "counter"),
        ] {
            let line = format!("# TYPE {name} {kind}");
            assert!(text.contains(&line), "no `{line}`:\n{text}");
        }
        // Labels as kube-proxy's: ip_family where kube-proxy has it, nothing else added.
        for line in samples(&text, "kubeproxy_sync_proxy_rules_duration_seconds") {
            assert!(line.contains("ip_family=\"IPv4\""), "{line}");
        }
        assert_eq!(
            samples(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            ["kubeproxy_sync_proxy_rules_endpoint_changes_total 1"]
        );
        assert_eq!(
            samples(&text, "kubeproxy_proxy_healthz_total"),
            ["kubeproxy_proxy_healthz_total{code=\"200\"} 1"]
        );
        let no_local = samples(&text, "kubeproxy_sync_proxy_rules_no_local_endpoints_total");
        assert_eq!(no_local.len(), 2, "{no_local:?}");
        assert!(
            no_local
                .iter()
                .all(|l| l.contains("ip_family=\"IPv4\"") && l.contains("traffic_policy="))
        );
        // One name per meaning: no sluice_ twin of any of them.
        for twin in [
            "sluice_sync_duration_seconds",
            "sluice_network_programming_duration_seconds",
            "sluice_syncs",
            "sluice_last_sync_timestamp_seconds",
        ] {
            assert!(
                samples(&text, twin).is_empty()
                    && samples(&text, &format!("{twin}_total")).is_empty(),
                "{twin} exported"
            );
        }
        // sluice's own keep their prefix.
        assert!(!samples(&text, "sluice_map_write_errors_total").is_empty());
    }
}
