//! The sync loop: keeps the maps equal to what the model says the objects want, writing only
//! what changed.
//!
//! It owns the [`Dataplane`] and runs on its own thread. Changes arrive on a channel and are
//! taken in batches (everything queued when the loop wakes), so a burst of events to one
//! Service costs one write.
//!
//! - Before the first full sync nothing is written: the maps keep serving what was adopted
//!   from the pins. The first full sync happens once every resource has been listed; it
//!   writes what differs from the adopted entries and only then removes adopted frontends no
//!   Service wants (stale entries).
//! - Incremental: a changed Service (or slice) is recomputed; frontends whose backends
//!   changed are upserted (the dataplane writes in the safe order), frontends it no longer has
//!   are removed.
//! - A frontend (address, port, protocol) belongs to the first Service that claims it; a
//!   second claimant is counted and logged and gets it when the first lets go.
//! - An invalid Service keeps whatever it had (its last good entries) and is counted; it never
//!   touches another Service's entries.
//! - A failed write (a full map) is reported and counted; the Service keeps its last good
//!   entries and is retried every second.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, mpsc::Receiver, mpsc::RecvTimeoutError},
    time::{Duration, Instant, SystemTime},
};

use super::{
    devices::{Devices, local_devices},
    metrics::{KindLabel, MapLabel, Metrics, TrafficPolicyLabel},
    server::Health,
    source::{Change, ObjectView, Resource},
};
use crate::{
    dataplane::{Dataplane, DataplaneError, socket::SocketTarget},
    model::{
        self, HealthCheck, InvalidService, Limits, NoLocalEndpoints, NodeContext, Outcome,
        ServiceKey, Skipped,
    },
    service::{Backends, Cidr4, Frontend, FrontendId, Protocol},
};

/// How often devices are re-checked and failed writes retried when nothing else happens.
const TICK: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

type Entries = BTreeMap<FrontendId, (Frontend, Backends)>;

/// Where NodePorts are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The Node object's addresses (InternalIP, ExternalIP): kube-proxy's `primary`.
    Primary,
    /// Every local address inside one of these prefixes.
    Cidrs(Vec<Cidr4>),
}

pub struct SyncConfig {
    pub node_name: String,
    pub nodeport_addresses: NodePortAddresses,
    pub limits: Limits,
    /// Socket LB's cgroup root, when it is on: the UDP sockets it connected to a backend
    /// that went away are destroyed in the namespaces of the processes under it.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// `--service-cidr`: Service CIDRs besides the ServiceCIDR objects the source lists.
    pub service_cidrs: Vec<Cidr4>,
    /// `--lb-algorithm maglev`.
    pub maglev_by_default: bool,
}

/// What the health check node ports must answer: where they listen (the NodePort addresses)
/// and, by Service, the port and its local endpoint count. The sync loop publishes it; the
/// HTTP side (`server::start_service_health`) follows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckState {
    pub addresses: Vec<Ipv4Addr>,
    pub services: BTreeMap<ServiceKey, HealthCheck>,
}

pub type HealthChecks = tokio::sync::watch::Sender<HealthCheckState>;

/// A pass of the sync loop: every Service, or the changed ones (kube-proxy's full and partial
/// syncs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Full,
    Partial,
}

pub struct Syncer {
    dp: Dataplane,
    view: Arc<dyn ObjectView>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    config: SyncConfig,
    devices: Devices,
    health_checks: HealthChecks,
    node: NodeContext,
    node_addrs: Vec<Ipv4Addr>,
    /// The own Node has been seen: its addresses (the default uplinks) are known.
    node_known: bool,
    /// When this agent started: trigger times from before are not its latency.
    started: SystemTime,
    /// (Service, frontend) conflicts already logged.
    conflicts_logged: BTreeSet<(ServiceKey, FrontendId)>,
    /// Whether the limit of SCTP frontends (the node's own processes cannot use them) was said.
    sctp_limit_said: bool,
    applied: HashMap<ServiceKey, Entries>,
    owners: HashMap<FrontendId, ServiceKey>,
    /// What the maps held at start, until the first full sync has claimed or removed it.
    adopted: Option<Entries>,
    invalid: BTreeMap<ServiceKey, InvalidService>,
    /// What each Service had left out at its last sync: each new one is logged once.
    skipped: HashMap<ServiceKey, Vec<Skipped>>,
    /// The kinds the invalid and skipped gauges have shown: they stay, at 0 once none is left.
    kinds_seen: (BTreeSet<&'static str>, BTreeSet<&'static str>),
    /// Services with ports whose externalTrafficPolicy Local finds no endpoint on this node
    /// (while others have some): how many such ports each.
    no_local_endpoints: HashMap<ServiceKey, NoLocalEndpoints>,
    /// Services that wanted a frontend another one holds.
    waiting: BTreeSet<ServiceKey>,
    retry: BTreeSet<ServiceKey>,
    listed: BTreeSet<Resource>,
    synced_once: bool,
    /// The oldest unwritten last-change-trigger-time of each Service.
    triggers: HashMap<ServiceKey, SystemTime>,
    /// UDP backends gone from their frontends in this pass, whose flows and connected sockets
    /// go.
    gone: HashSet<SocketTarget>,
    /// The Service CIDRs last written to the datapath.
    service_cidrs: Option<Vec<Cidr4>>,
}

impl Syncer {
    pub fn new(
        dp: Dataplane,
        view: Arc<dyn ObjectView>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        config: SyncConfig,
        devices: Devices,
        health_checks: HealthChecks,
    ) -> Self {
        let adopted: Entries = dp
            .services()
            .into_iter()
            .map(|(fe, bes)| (fe.id(), (fe, bes.normalized())))
            .collect();
        if !adopted.is_empty() {
            tracing::info!(
                frontends = adopted.len(),
                "adopted the pinned maps; they keep serving until the first full sync"
            );
        }
        Self {
            dp,
            view,
            metrics,
            health,
            node: NodeContext {
                name: config.node_name.clone(),
                nodeport_addresses: Vec::new(),
                zone: None,
                node_ip: None,
                maglev_by_default: config.maglev_by_default,
            },
            config,
            devices,
            health_checks,
            node_addrs: Vec::new(),
            node_known: false,
            started: SystemTime::now(),
            conflicts_logged: BTreeSet::new(),
            sctp_limit_said: false,
            applied: HashMap::new(),
            owners: HashMap::new(),
            adopted: Some(adopted),
            invalid: BTreeMap::new(),
            skipped: HashMap::new(),
            kinds_seen: Default::default(),
            no_local_endpoints: HashMap::new(),
            waiting: BTreeSet::new(),
            retry: BTreeSet::new(),
            listed: BTreeSet::new(),
            synced_once: false,
            triggers: HashMap::new(),
            gone: HashSet::new(),
            service_cidrs: None,
        }
    }

    /// Once this agent's programs run on every device an earlier agent's did, copies what
    /// those wrote meanwhile into maps the load resized, and drops the old maps' pins.
    fn finish_resize(&mut self) {
        if !self.dp.resizing() || !self.devices.replaced_all(self.node_known) {
            return;
        }
        match self.dp.finish_resize() {
            Ok(copied) => tracing::info!(
                written = copied.written,
                deleted = copied.deleted,
                kept = copied.kept,
                lost = copied.lost,
                "resized maps: the old programs' last changes applied, the old maps' pins removed"
            ),
            Err(error) => tracing::warn!(
                %error,
                "could not finish resizing maps: tried again at the next device check"
            ),
        }
    }

    /// Runs until [`Change::Shutdown`] or until every sender is gone.
    pub fn run(mut self, rx: Receiver<Change>) {
        self.write_service_cidrs();
        self.refresh_node();
        self.devices
            .reconcile(&mut self.dp, &self.node_addrs, self.node_known);
        self.finish_resize();
        let mut last_tick = Instant::now();
        loop {
            let wait = if self.retry.is_empty() { TICK } else { RETRY };
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(c) => batch.push(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            batch.extend(rx.try_iter());
            self.health.beat();

            let mut dirty = BTreeSet::new();
            let mut full = false;
            let mut node_changed = false;
            let mut devices = last_tick.elapsed() >= TICK;
            for change in batch {
                match change {
                    Change::Service(k) => {
                        self.metrics.service_changes.inc();
                        dirty.insert(k);
                    }
                    Change::Slices { service, trigger } => {
                        self.metrics.endpoint_changes.inc();
                        // kube-proxy's rule: a trigger from before this process started
                        // measures the downtime, not the programming.
                        if let Some(t) = trigger.filter(|t| *t >= self.started) {
                            let e = self.triggers.entry(service.clone()).or_insert(t);
                            *e = (*e).min(t);
                        }
                        dirty.insert(service);
                    }
                    Change::Node => node_changed = true,
                    Change::Listed(r) => {
                        self.listed.insert(r);
                        // A relist after the first sync: compare everything, flush nothing.
                        full |= self.synced_once;
                    }
                    Change::Devices => devices = true,
                    Change::ServiceCidrs => self.write_service_cidrs(),
                    Change::Shutdown => return,
                }
            }
            // Addresses come and go with devices too (CIDR --nodeport-addresses).
            if (node_changed || devices) && self.refresh_node() {
                full = true;
                devices = true;
            }
            if devices || node_changed {
                last_tick = Instant::now();
                self.devices
                    .reconcile(&mut self.dp, &self.node_addrs, self.node_known);
                self.finish_resize();
                // Addresses whose last frontend went leave the ingress filter once no flow
                // to them lives, and ports whose frontend went leave their address's port
                // filter likewise; earlier SNAT addresses lose their mark once no flow is
                // SNATed to them.
                match self.dp.retire_fe_addrs() {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(addresses = n, "retired frontend addresses removed"),
                    Err(error) => tracing::warn!(%error, "could not tidy the frontend addresses"),
                }
            }
            if !self.synced_once {
                if self
                    .view
                    .resources()
                    .iter()
                    .all(|r| self.listed.contains(r))
                {
                    full = true;
                } else {
                    if !dirty.is_empty() {
                        self.health.pending();
                    }
                    continue;
                }
            }
            if !full && dirty.is_empty() && self.retry.is_empty() {
                continue;
            }
            let start = Instant::now();
            let kind = if full {
                self.retry.append(&mut dirty);
                self.full_sync();
                Pass::Full
            } else {
                dirty.append(&mut self.retry);
                for key in &dirty {
                    self.sync_service(key);
                }
                Pass::Partial
            };
            self.finish_pass(kind, start);
        }
    }

    /// Writes the Service CIDRs (`--service-cidr` and the source's ServiceCIDR objects) when
    /// they changed. Too many for the datapath is logged and counted, and the last good ones
    /// stay in force.
    fn write_service_cidrs(&mut self) {
        let mut cidrs: Vec<Cidr4> = self
            .config
            .service_cidrs
            .iter()
            .copied()
            .chain(self.view.service_cidrs())
            .map(Cidr4::network)
            .collect();
        cidrs.sort();
        cidrs.dedup();
        if self.service_cidrs.as_ref() == Some(&cidrs) {
            return;
        }
        match self.dp.set_service_cidrs(&cidrs) {
            Ok(()) => {
                let shown: Vec<String> = cidrs.iter().map(Cidr4::to_string).collect();
                tracing::info!(
                    cidrs = %shown.join(","),
                    "Service CIDRs: new traffic from pods and the node to their unallocated \
                     addresses is dropped"
                );
                self.service_cidrs = Some(cidrs);
            }
            Err(error) => {
                self.count_write_error(&error);
                let error = super::chain(&error);
                tracing::error!(%error, "could not write the Service CIDRs");
            }
        }
    }

    fn finish_pass(&mut self, kind: Pass, start: Instant) {
        // Services that lost a conflict get another chance when frontends were freed.
        let waiting = std::mem::take(&mut self.waiting);
        for key in waiting {
            self.sync_service(&key);
        }
        self.forget_gone_flows();
        self.destroy_gone_sockets();
        let m = &self.metrics;
        let took = start.elapsed().as_secs_f64();
        m.sync_duration.observe(took);
        match kind {
            Pass::Full => m.sync_full_duration.observe(took),
            Pass::Partial => m.sync_partial_duration.observe(took),
        }
        let internal = self
            .no_local_endpoints
            .values()
            .map(|n| n.internal)
            .sum::<usize>();
        let external = self
            .no_local_endpoints
            .values()
            .map(|n| n.external)
            .sum::<usize>();
        for (policy, n) in [("internal", internal), ("external", external)] {
            m.no_local_endpoints
                .get_or_create(&TrafficPolicyLabel {
                    traffic_policy: policy.into(),
                })
                .set(n as i64);
        }
        m.services.set(self.applied.len() as i64);
        m.frontends.set(self.owners.len() as i64);
        m.backends.set(
            self.applied
                .values()
                .flat_map(|e| e.values())
                .map(|(_, b)| b.all.len() as i64)
                .sum(),
        );
        m.invalid_services.set(self.invalid.len() as i64);
        let invalid = self.invalid.values().map(InvalidService::kind);
        set_by_kind(&m.invalid_services_by_kind, &mut self.kinds_seen.0, invalid);
        let skipped = self.skipped.values().flatten().map(Skipped::kind);
        set_by_kind(&m.skipped_service_parts, &mut self.kinds_seen.1, skipped);
        if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            m.last_sync.set(d.as_secs_f64());
        }
        self.health.synced(self.synced_once);
    }

    /// Forgets the UDP flows conntrack pinned to the backends gone in this pass, so their next
    /// packets go to a live backend (kube-proxy deletes their conntrack entries likewise).
    fn forget_gone_flows(&mut self) {
        if self.gone.is_empty() {
            return;
        }
        match self.dp.forget_udp_flows(&self.gone) {
            Ok(n) => {
                self.metrics.udp_flows_forgotten.inc_by(n as u64);
                if n > 0 {
                    tracing::debug!(flows = n, "UDP flows to gone backends forgotten");
                }
            }
            Err(error) => {
                tracing::warn!(error = %super::chain(&error), "could not forget the UDP flows to gone backends");
            }
        }
    }

    /// Destroys the UDP sockets socket LB connected to the backends gone in this pass, so their
    /// owners reconnect to live ones (kube-proxy flushes UDP conntrack for the same reason).
    fn destroy_gone_sockets(&mut self) {
        let gone = std::mem::take(&mut self.gone);
        let Some(cgroup) = &self.config.socket_lb_cgroup else {
            return;
        };
        if gone.is_empty() {
            return;
        }
        let keys = match self.dp.sockets_to(&gone) {
            Ok(k) => k,
            Err(error) => {
                tracing::warn!(error = %super::chain(&error), "could not read the socket reverse map");
                return;
            }
        };
        if keys.is_empty() {
            return;
        }
        let cookies: HashSet<u64> = keys.iter().map(|k| k.cookie).collect();
        match super::sockets::destroy_udp(cgroup, &cookies) {
            Ok(d) => {
                self.metrics.sockets_destroyed.inc_by(d.sockets as u64);
                tracing::info!(
                    sockets = d.sockets,
                    namespaces = d.namespaces,
                    backends = gone.len(),
                    "destroyed UDP sockets connected to backends that went away"
                );
            }
            Err(error) => {
                self.metrics.socket_destroy_errors.inc();
                tracing::warn!(%error, "destroying UDP sockets of removed backends failed (needs CONFIG_INET_DIAG_DESTROY)");
            }
        }
        if let Err(error) = self.dp.forget_sockets(&keys) {
            tracing::warn!(error = %super::chain(&error), "could not clean the socket reverse map");
        }
    }

    /// Notes the UDP backends `before` had that `after` (None: the frontend is gone) does
    /// not, and that no slice of the Service lists any more.
    fn note_gone(
        &mut self,
        fe: &Frontend,
        before: &Backends,
        after: Option<&Backends>,
        slices: &[&k8s_openapi::api::discovery::v1::EndpointSlice],
    ) {
        if fe.proto != Protocol::Udp {
            return;
        }
        for b in &before.all {
            let kept =
                after.is_some_and(|a| a.all.iter().any(|x| x.addr == b.addr && x.port == b.port));
            if !kept && (after.is_none() || !model::slices_list(slices, b.addr, b.port, fe.proto)) {
                self.gone.insert(SocketTarget {
                    frontend: fe.id(),
                    backend: (b.addr, b.port),
                });
            }
        }
    }

    /// Recomputes the node's addresses and zone; true if the NodePort addresses, the primary
    /// address or the zone changed (every Service is then synced again).
    fn refresh_node(&mut self) -> bool {
        // A Node that is not (or no longer) there keeps its last known addresses: losing the
        // object must not take NodePorts and uplinks away.
        let mut changed = false;
        if let Some(node) = self.view.node() {
            self.node_addrs = model::node_addresses(&node);
            self.node_known = true;
            // Endpoints hinted for this zone are preferred: a new zone changes backends.
            let zone = model::node_zone(&node);
            if zone != self.node.zone {
                tracing::info!(?zone, "node zone ({})", model::ZONE_LABEL);
                self.node.zone = zone;
                changed = true;
            }
            let eligible = model::node_eligible(&node);
            if self.health.set_node_eligible(eligible) {
                tracing::info!(
                    eligible,
                    "node eligibility for externalTrafficPolicy Cluster traffic (KEP-3836): /healthz follows it"
                );
            }
        }
        // loadBalancerSourceRanges let the node through if they hold its primary address.
        let node_ip = self.node_addrs.first().copied();
        if node_ip != self.node.node_ip {
            self.node.node_ip = node_ip;
            changed = true;
        }
        // Until the Node is known, the SNAT adopted from the pins (if any) stays.
        let snat = self.node_addrs.first().copied();
        if self.node_known && self.dp.config().snat != snat {
            match self.dp.set_snat(snat) {
                Ok(()) => tracing::info!(
                    ?snat,
                    "SNAT for traffic from outside to other nodes' endpoints"
                ),
                Err(error) => {
                    tracing::error!(error = %super::chain(&error), "writing the SNAT configuration failed")
                }
            }
        }
        let nodeport_addresses = match &self.config.nodeport_addresses {
            NodePortAddresses::Primary => self.node_addrs.clone(),
            NodePortAddresses::Cidrs(cidrs) => {
                let mut v: Vec<Ipv4Addr> = local_devices()
                    .into_values()
                    .flatten()
                    .filter(|a| cidrs.iter().any(|c| c.contains(*a)))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
        };
        if nodeport_addresses != self.node.nodeport_addresses {
            tracing::info!(addresses = ?nodeport_addresses, "NodePort addresses");
            self.health_checks.send_if_modified(|s| {
                s.addresses.clone_from(&nodeport_addresses);
                true
            });
            self.node.nodeport_addresses = nodeport_addresses;
            changed = true;
        }
        changed
    }

    /// Every Service, compared with the maps; then adopted entries nobody claimed are removed.
    fn full_sync(&mut self) {
        self.refresh_node();
        let mut keys: BTreeSet<ServiceKey> = self.view.service_keys().into_iter().collect();
        keys.extend(self.applied.keys().cloned());
        keys.append(&mut self.retry);
        for key in &keys {
            self.sync_service(key);
        }
        if let Some(stale) = self.adopted.take() {
            let mut removed = 0;
            for (fe_id, (fe, bes)) in stale {
                if self.owners.contains_key(&fe_id) {
                    continue;
                }
                match self.dp.remove_service(fe) {
                    Ok(()) => {
                        removed += 1;
                        self.note_gone(&fe, &bes, None, &[]);
                    }
                    Err(error) => self.write_error(&fe, error),
                }
            }
            if removed > 0 {
                tracing::info!(removed, "removed stale frontends left by an earlier agent");
            }
        }
        if !self.synced_once {
            tracing::info!(
                services = self.applied.len(),
                frontends = self.owners.len(),
                invalid = self.invalid.len(),
                "first full sync done"
            );
        }
        self.synced_once = true;
    }

    /// Counts a failed map write, and a full map by name.
    fn count_write_error(&self, error: &DataplaneError) {
        self.metrics.write_errors.inc();
        if let DataplaneError::MapFull { map, .. } = error {
            self.metrics
                .map_full
                .get_or_create(&MapLabel {
                    map: (*map).to_owned(),
                })
                .inc();
        }
    }

    fn write_error(&mut self, fe: &Frontend, error: DataplaneError) {
        self.count_write_error(&error);
        let error = super::chain(&error);
        tracing::error!(frontend = %fe, %error, "map write failed");
    }

    /// What the model wants for `key` now; `None`: keep what it has (it is invalid).
    fn desired(&mut self, key: &ServiceKey) -> Option<Entries> {
        let Some(svc) = self.view.service(key) else {
            self.invalid.remove(key);
            self.skipped.remove(key);
            self.no_local_endpoints.remove(key);
            self.set_health_check(key, None);
            return Some(Entries::new());
        };
        let slices = self.view.slices(key);
        let refs: Vec<_> = slices.iter().map(|s| s.as_ref()).collect();
        match model::service_frontends(&svc, &refs, &self.node, &self.config.limits) {
            Outcome::Ignored { reason } => {
                self.invalid.remove(key);
                self.skipped.remove(key);
                self.no_local_endpoints.remove(key);
                self.set_health_check(key, None);
                tracing::debug!(service = %key, reason, "not proxied");
                Some(Entries::new())
            }
            Outcome::Invalid { reason } => {
                self.metrics.invalid_service_events.inc();
                if self.invalid.get(key) != Some(&reason) {
                    tracing::warn!(service = %key, %reason, "invalid Service skipped; it keeps its last good entries");
                }
                self.invalid.insert(key.clone(), reason);
                None
            }
            Outcome::Proxied {
                frontends,
                warnings,
                health_check,
                no_local_endpoints,
            } => {
                self.invalid.remove(key);
                if no_local_endpoints.is_zero() {
                    self.no_local_endpoints.remove(key);
                } else {
                    self.no_local_endpoints
                        .insert(key.clone(), no_local_endpoints);
                }
                self.set_health_check(key, health_check);
                let before = self.skipped.remove(key).unwrap_or_default();
                for w in warnings.iter().filter(|w| !before.contains(w)) {
                    tracing::warn!(service = %key, skipped = %w, kind = w.kind(), "part of a Service left out");
                }
                if !warnings.is_empty() {
                    self.skipped.insert(key.clone(), warnings);
                }
                Some(
                    frontends
                        .into_iter()
                        .map(|(fe, bes)| (fe.id(), (fe, bes.normalized())))
                        .collect(),
                )
            }
        }
    }

    /// Brings one Service's entries in line with what it wants.
    fn sync_service(&mut self, key: &ServiceKey) {
        let Some(desired) = self.desired(key) else {
            self.triggers.remove(key);
            self.claim_adopted_for_invalid(key);
            return;
        };
        let slices = self.view.slices(key);
        let slices: Vec<_> = slices.iter().map(|s| s.as_ref()).collect();
        let old = self.applied.remove(key).unwrap_or_default();
        let mut new = Entries::new();
        let mut written = 0usize;
        let mut failed = false;
        for (fe_id, (fe, bes)) in desired {
            if let Some(owner) = self.owners.get(&fe_id)
                && owner != key
            {
                if self.conflicts_logged.insert((key.clone(), fe_id)) {
                    self.metrics.frontend_conflicts.inc();
                    tracing::warn!(service = %key, frontend = %fe, holder = %owner, "frontend already held by another Service; skipped");
                }
                self.waiting.insert(key.clone());
                continue;
            }
            let entry = (fe, bes);
            let adopted = self.adopted.as_mut().and_then(|a| a.remove(&fe_id));
            let adopted_same = adopted.as_ref() == Some(&entry);
            if let Some((_, before)) = old.get(&fe_id).or(adopted.as_ref()) {
                let before = before.clone();
                self.note_gone(&entry.0, &before, Some(&entry.1), &slices);
            }
            if entry.0.proto == Protocol::Sctp && !self.sctp_limit_said {
                self.sctp_limit_said = true;
                tracing::warn!(
                    service = %key,
                    frontend = %entry.0,
                    "SCTP frontends serve pods and outside clients; the node's own processes \
                     cannot use them (socket LB translates TCP and UDP only): their packets are \
                     dropped at the uplink, counted as drop_node_sctp_to_service"
                );
            }
            if old.get(&fe_id) != Some(&entry) && !adopted_same {
                if let Err(error) = self.dp.upsert_frontend(entry.0, &entry.1) {
                    self.write_error(&entry.0, error);
                    failed = true;
                    // The dataplane rolled back: the frontend still has what it had, which
                    // this Service now holds (and removes if it stops wanting it).
                    if let Some(prev) = old.get(&fe_id).cloned().or(adopted) {
                        self.owners.insert(fe_id, key.clone());
                        new.insert(fe_id, prev);
                    } else {
                        self.owners.remove(&fe_id);
                    }
                    continue;
                }
                written += 1;
            }
            self.owners.insert(fe_id, key.clone());
            new.insert(fe_id, entry);
        }
        let mut removed = 0usize;
        for (fe_id, (fe, bes)) in old {
            if new.contains_key(&fe_id) {
                continue;
            }
            match self.dp.remove_service(fe) {
                Ok(()) => {
                    removed += 1;
                    self.note_gone(&fe, &bes, None, &[]);
                    self.owners.remove(&fe_id);
                    // Someone may have been waiting for it.
                    if !self.waiting.is_empty() {
                        self.retry.extend(self.waiting.iter().cloned());
                    }
                }
                Err(error) => {
                    self.write_error(&fe, error);
                    failed = true;
                    new.insert(fe_id, (fe, bes));
                }
            }
        }
        if failed {
            self.retry.insert(key.clone());
        }
        if written + removed > 0 {
            tracing::info!(
                service = %key,
                frontends = new.len(),
                backends = new.values().map(|(_, b)| b.all.len()).max().unwrap_or(0),
                written,
                removed,
                "programmed"
            );
        }
        if !new.is_empty() {
            self.applied.insert(key.clone(), new);
        }
        if !failed && let Some(t) = self.triggers.remove(key) {
            let latency = SystemTime::now().duration_since(t).unwrap_or_default();
            self.metrics
                .programming_latency
                .observe(latency.as_secs_f64());
        }
    }
}

impl Syncer {
    /// An invalid Service keeps its last good entries, also across a restart: before the first
    /// full sync, the adopted frontends on its addresses (ClusterIPs, externalIPs,
    /// LoadBalancer IPs, and its nodePorts on the node) become its own, so the stale sweep
    /// leaves them alone.
    fn claim_adopted_for_invalid(&mut self, key: &ServiceKey) {
        let (Some(adopted), Some(svc)) = (self.adopted.as_mut(), self.view.service(key)) else {
            return;
        };
        let parse = |v: &str| v.parse::<Ipv4Addr>().ok();
        let spec = svc.spec.as_ref();
        let mut addrs: BTreeSet<Ipv4Addr> = BTreeSet::new();
        if let Some(spec) = spec {
            addrs.extend(spec.cluster_ip.as_deref().and_then(parse));
            for list in [&spec.cluster_ips, &spec.external_ips]
                .into_iter()
                .flatten()
            {
                addrs.extend(list.iter().filter_map(|a| parse(a)));
            }
        }
        let lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        for ing in lb.and_then(|l| l.ingress.as_ref()).into_iter().flatten() {
            addrs.extend(ing.ip.as_deref().and_then(parse));
        }
        let node_ports: BTreeSet<u16> = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
            .collect();
        let mine: Vec<FrontendId> = adopted
            .keys()
            .filter(|id| {
                addrs.contains(&id.addr)
                    || (node_ports.contains(&id.port)
                        && self.node.nodeport_addresses.contains(&id.addr))
            })
            .copied()
            .collect();
        let entries = self.applied.entry(key.clone()).or_default();
        for fe_id in mine {
            if self.owners.contains_key(&fe_id) {
                continue;
            }
            if let Some(entry) = adopted.remove(&fe_id) {
                self.owners.insert(fe_id, key.clone());
                entries.insert(fe_id, entry);
            }
        }
        if entries.is_empty() {
            self.applied.remove(key);
        }
    }
}

impl Syncer {
    /// Publishes the health check node port of `key` (or its absence) to the HTTP side.
    fn set_health_check(&self, key: &ServiceKey, hc: Option<HealthCheck>) {
        self.health_checks.send_if_modified(|s| match hc {
            Some(hc) if s.services.get(key) != Some(&hc) => {
                s.services.insert(key.clone(), hc);
                true
            }
            Some(_) => false,
            None => s.services.remove(key).is_some(),
        });
    }
}

/// Sets `family` to how many of `kinds` there are of each kind; kinds in `seen` (those shown
/// before) and not among them go to 0.
fn set_by_kind(
    family: &prometheus_client::metrics::family::Family<
        KindLabel,
        prometheus_client::metrics::gauge::Gauge,
    >,
    seen: &mut BTreeSet<&'static str>,
    kinds: impl Iterator<Item = &'static str>,
) {
    let mut n: BTreeMap<&'static str, i64> = seen.iter().map(|k| (*k, 0)).collect();
    for k in kinds {
        *n.entry(k).or_default() += 1;
    }
    for (kind, count) in n {
        seen.insert(kind);
        family
            .get_or_create(&KindLabel { kind: kind.into() })
            .set(count);
    }
}
