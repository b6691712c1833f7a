//! The agent's Prometheus metrics (text format on `--metrics-bind-address`, `/metrics`).
//!
//! Names follow kube-proxy's where one exists (`kubeproxy_network_programming_duration_seconds`
//! becomes `sluice_network_programming_duration_seconds`, with the same meaning: from the
//! EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to the map write).
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
pub struct SyncLabel {
    pub kind: String,
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
    /// Trigger time of an EndpointSlice change to the moment its frontends were written.
    pub programming_latency: Histogram,
    pub syncs: Family<SyncLabel, Counter>,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub invalid_services: Gauge,
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
    pub packets: Family<VerdictLabel, Counter>,
    pub bytes: Family<VerdictLabel, Counter>,
    pub conntrack_capacity: Gauge,
    pub conntrack_held: Gauge,
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
        let mut r = Registry::with_prefix("sluice");
        // 100 us .. ~105 s: a map write takes microseconds; kube-proxy's buckets start at 250 ms.
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 21));
        let programming_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 21));
        let m = Self {
            sync_duration,
            programming_latency,
            syncs: Family::default(),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            invalid_services: Gauge::default(),
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
            packets: Family::default(),
            bytes: Family::default(),
            conntrack_capacity: Gauge::default(),
            conntrack_held: Gauge::default(),
            conntrack_live: Family::default(),
            conntrack_flows: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "sync_duration_seconds",
            "Time of one pass of the sync loop: a batch of changes or a full sync",
            m.sync_duration.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its frontends being written to the maps",
            m.programming_latency.clone(),
        );
        r.register(
            "syncs",
            "Passes of the sync loop, by kind (full or incremental)",
            m.syncs.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last completed sync pass",
            m.last_sync.clone(),
        );
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
            "Size of the conntrack table (two entries per flow; the least recently used is evicted when it is full)",
            m.conntrack_capacity.clone(),
        );
        r.register(
            "conntrack_entries",
            "Entries the conntrack table holds, live or expired (an expired one stays until its room is needed)",
            m.conntrack_held.clone(),
        );
        r.register(
            "conntrack_live_entries",
            "Live conntrack entries, by kind (service: client to frontend; reverse: after translation)",
            m.conntrack_live.clone(),
        );
        r.register(
            "conntrack_flows",
            "Live flows by state (tcp_opening: half-open, what a SYN flood makes; tcp_established; tcp_closing; udp)",
            m.conntrack_flows.clone(),
        );
        Self { registry: r, ..m }
    }

    /// Copies the conntrack table's fill into the exported gauges.
    pub fn set_conntrack_fill(&self, f: &CtFill) {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.conntrack_capacity, u64::from(f.capacity));
        set(&self.conntrack_held, f.held);
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
