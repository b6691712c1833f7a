//! The agent's HTTP endpoints, as kube-proxy has them:
//! - metrics (`--metrics-bind-address`, default 127.0.0.1:10249): `GET /metrics`;
//! - health (`--healthz-bind-address`, default 0.0.0.0:10256): `GET /healthz` (and its alias
//!   `/readyz`: 200 once the first full sync is done, while the sync loop keeps up and the node
//!   is eligible for load-balancer traffic (KEP-3836: not while the Node is being deleted or
//!   carries the `ToBeDeletedByClusterAutoscaler` taint); 503 otherwise) and `GET /livez` (200
//!   while the sync loop is alive, whatever the node);
//! - one health check node port per LoadBalancer Service with externalTrafficPolicy Local
//!   (`spec.healthCheckNodePort`), on each NodePort address: 200 when the node has ready
//!   endpoints of the Service and the agent is healthy, 503 otherwise, with kube-proxy's body
//!   (pkg/proxy/healthcheck/service_health.go). Any path and method, as kube-proxy answers.
//!
//! Nothing else listens. Metrics and health answer GET and HEAD only.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{
    metrics::{CodeLabel, Metrics},
    sync::{HealthCheckState, HealthChecks},
};
use crate::dataplane::PinnedMaps;

/// How long the sync loop may be silent, or a change wait, before /healthz and /livez fail.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the sync loop tells the health endpoint.
#[derive(Debug)]
pub struct Health {
    synced: AtomicBool,
    /// KEP-3836: the Node is neither being deleted nor tainted for deletion. True until the
    /// Node says otherwise (a Node not seen yet, or none in manifests mode, is eligible).
    node_eligible: AtomicBool,
    inner: Mutex<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    heartbeat: Instant,
    last_sync: Option<SystemTime>,
    pending_since: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            synced: AtomicBool::new(false),
            node_eligible: AtomicBool::new(true),
            inner: Mutex::new(HealthInner {
                heartbeat: Instant::now(),
                last_sync: None,
                pending_since: None,
            }),
        }
    }
}

impl Health {
    /// The sync loop is alive.
    pub fn beat(&self) {
        self.lock().heartbeat = Instant::now();
    }
    /// A change is waiting to be written.
    pub fn pending(&self) {
        let mut h = self.lock();
        h.pending_since.get_or_insert_with(Instant::now);
    }
    /// Everything received so far is written.
    pub fn synced(&self, full: bool) {
        if full {
            self.synced.store(true, Ordering::Release);
        }
        let mut h = self.lock();
        h.pending_since = None;
        h.last_sync = Some(SystemTime::now());
        h.heartbeat = Instant::now();
    }
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
    /// Sets the node's eligibility; true if it changed.
    pub fn set_node_eligible(&self, eligible: bool) -> bool {
        self.node_eligible.swap(eligible, Ordering::AcqRel) != eligible
    }
    fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Acquire)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn live(&self) -> bool {
        self.lock().heartbeat.elapsed() < HEALTH_TIMEOUT
    }
    /// The sync loop has synced once and keeps up (kube-proxy's `Health().Healthy`; the
    /// node's eligibility is not part of it).
    fn healthy(&self) -> bool {
        let h = self.lock();
        self.is_synced()
            && h.heartbeat.elapsed() < HEALTH_TIMEOUT
            && h.pending_since.is_none_or(|p| p.elapsed() < HEALTH_TIMEOUT)
    }
    /// kube-proxy's body: `lastUpdated`, `currentTime`, for /healthz `nodeEligible`, and
    /// `healthy` (the sync's health alone, so a 503 may say healthy: true).
    fn json(&self, with_node: bool) -> String {
        let healthy = self.healthy();
        let h = self.lock();
        let ts = |t: SystemTime| {
            jiff::Timestamp::try_from(t).map_or_else(|_| "unknown".into(), |t| t.to_string())
        };
        let node = if with_node {
            format!("\"nodeEligible\":{},", self.node_eligible())
        } else {
            String::new()
        };
        format!(
            "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\",{node}\"healthy\":{healthy}}}\n",
            h.last_sync.map_or_else(|| "never".into(), ts),
            ts(SystemTime::now()),
        )
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn serve<F>(listener: TcpListener, any_method: bool, handler: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp =
                    if !any_method && req.method() != Method::GET && req.method() != Method::HEAD {
                        reply(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "GET only\n".into(),
                        )
                    } else {
                        handler(&req)
                    };
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// The conntrack table is walked for its fill at most this often (a full map is two system
/// calls per entry; scrapes in between show the last count).
const CT_FILL_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the metrics endpoint; `pins` is where the datapath counters are read at each scrape
/// (and the conntrack table's fill, at most every [`CT_FILL_EVERY`]).
pub async fn start_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    pins: std::path::PathBuf,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let last_fill = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    tokio::spawn(serve(listener, false, move |req: &Request<Incoming>| {
        if req.uri().path() != "/metrics" {
            return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
        }
        if let Ok(maps) = PinnedMaps::open(&pins) {
            if let Ok(c) = maps.counters() {
                metrics.set_datapath_counters(&c);
            }
            let mut last = last_fill.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= CT_FILL_EVERY) {
                // A walk of a full table takes a few hundred ms (about 2 us an entry): the
                // worker hands its other tasks on meanwhile.
                match tokio::task::block_in_place(|| maps.conntrack_fill()) {
                    Ok(f) => metrics.set_conntrack_fill(&f),
                    Err(e) => tracing::warn!(error = %e, "reading the conntrack table's fill"),
                }
                *last = Some(std::time::Instant::now());
            }
        }
        reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    }));
    Ok(bound)
}

/// Binds the health endpoint.
/// Answers are counted by status in `kubeproxy_proxy_healthz_total` and
/// `kubeproxy_proxy_livez_total`, as kube-proxy does.
pub async fn start_health(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, false, move |req: &Request<Incoming>| {
        let (ok, with_node, counted) = match req.uri().path() {
            "/healthz" | "/readyz" => (
                health.healthy() && health.node_eligible(),
                true,
                &metrics.healthz,
            ),
            "/livez" => (health.live(), false, &metrics.livez),
            _ => return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        counted
            .get_or_create(&CodeLabel {
                code: status.as_u16().to_string(),
            })
            .inc();
        let mut r = reply(status, "application/json", health.json(with_node));
        r.headers_mut().insert(
            "x-content-type-options",
            hyper::header::HeaderValue::from_static("nosniff"),
        );
        r
    }));
    Ok(bound)
}

/// kube-proxy's answer on a health check node port (service_health.go `hcHandler`).
fn service_health_reply(
    key: &crate::model::ServiceKey,
    local_endpoints: usize,
    healthy: bool,
) -> Response<Full<Bytes>> {
    let status = if local_endpoints != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        key.namespace, key.name
    );
    let mut r = reply(status, "application/json", body);
    let h = r.headers_mut();
    h.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "x-load-balancing-endpoint-weight",
        hyper::header::HeaderValue::from(local_endpoints),
    );
    r
}

/// Serves the health check node ports the sync loop publishes, opening and closing listeners
/// as Services and NodePort addresses come and go. A port that cannot be bound is logged
/// (once per address and port) and tried again at the next change.
pub fn start_service_health(checks: &HealthChecks, health: Arc<Health>) {
    let mut rx = checks.subscribe();
    tokio::spawn(async move {
        let mut open: std::collections::BTreeMap<SocketAddr, tokio::task::JoinHandle<()>> =
            std::collections::BTreeMap::new();
        let mut failed: std::collections::BTreeSet<SocketAddr> = std::collections::BTreeSet::new();
        loop {
            let state: HealthCheckState = rx.borrow_and_update().clone();
            let mut wanted: std::collections::BTreeMap<SocketAddr, crate::model::ServiceKey> =
                std::collections::BTreeMap::new();
            for (key, hc) in &state.services {
                for a in &state.addresses {
                    wanted.insert(SocketAddr::from((*a, hc.node_port)), key.clone());
                }
            }
            open.retain(|addr, task| {
                let keep = wanted.contains_key(addr);
                if !keep {
                    task.abort();
                    tracing::info!(%addr, "health check node port closed");
                }
                keep
            });
            for (addr, key) in wanted {
                if open.contains_key(&addr) {
                    continue;
                }
                match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        failed.remove(&addr);
                        tracing::info!(%addr, service = %key, "health check node port open");
                        let rx = rx.clone();
                        let health = health.clone();
                        let port = addr.port();
                        open.insert(
                            addr,
                            tokio::spawn(serve(listener, true, move |_req: &Request<Incoming>| {
                                // The Service that holds this port now (it may have moved).
                                let state = rx.borrow();
                                let found =
                                    state.services.iter().find(|(_, hc)| hc.node_port == port);
                                match found {
                                    Some((key, hc)) => service_health_reply(
                                        key,
                                        hc.local_endpoints,
                                        health.healthy(),
                                    ),
                                    None => reply(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "text/plain",
                                        "no Service\n".into(),
                                    ),
                                }
                            })),
                        );
                    }
                    Err(error) => {
                        if failed.insert(addr) {
                            tracing::warn!(%addr, service = %key, %error, "health check node port could not be opened; trying again every 2 s");
                        }
                    }
                }
            }
            // Ports that could not be bound (still held by an agent on its way out, say)
            // are tried again every 2 s, not only at the next change.
            if failed.is_empty() {
                if rx.changed().await.is_err() {
                    return;
                }
            } else {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    });
}
