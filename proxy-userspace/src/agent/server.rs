//! The agent's two HTTP endpoints, as kube-proxy has them:
//! - metrics (`--metrics-bind-address`, default 127.0.0.1:10249): `GET /metrics`;
//! - health (`--healthz-bind-address`, default 0.0.0.0:10256): `GET /healthz` (and its alias
//!   `/readyz`: 200 once the first full sync is done and the sync loop keeps up; 503 otherwise)
//!   and `GET /livez` (200 while the sync loop is alive).
//!
//! Nothing else listens. Both answer GET and HEAD only.
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

use super::metrics::Metrics;
use crate::dataplane::PinnedMaps;

/// How long the sync loop may be silent, or a change wait, before /healthz and /livez fail.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the sync loop tells the health endpoint.
#[derive(Debug)]
pub struct Health {
    synced: AtomicBool,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn live(&self) -> bool {
        self.lock().heartbeat.elapsed() < HEALTH_TIMEOUT
    }
    fn healthy(&self) -> bool {
        let h = self.lock();
        self.is_synced()
            && h.heartbeat.elapsed() < HEALTH_TIMEOUT
            && h.pending_since.is_none_or(|p| p.elapsed() < HEALTH_TIMEOUT)
    }
    fn json(&self) -> String {
        let h = self.lock();
        let ts = |t: SystemTime| {
            jiff::Timestamp::try_from(t).map_or_else(|_| "unknown".into(), |t| t.to_string())
        };
        format!(
            "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\", \"synced\": {}}}\n",
            h.last_sync.map_or_else(|| "never".into(), ts),
            ts(SystemTime::now()),
            self.is_synced()
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

async fn serve<F>(listener: TcpListener, handler: F)
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
                let resp = if req.method() != Method::GET && req.method() != Method::HEAD {
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

/// Binds the metrics endpoint; `pins` is where the datapath counters are read at each scrape.
pub async fn start_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    pins: std::path::PathBuf,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, move |req: &Request<Incoming>| {
        if req.uri().path() != "/metrics" {
            return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
        }
        if let Ok(c) = PinnedMaps::open(&pins).and_then(|m| m.counters()) {
            metrics.set_datapath_counters(&c);
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
pub async fn start_health(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, move |req: &Request<Incoming>| {
        let ok = match req.uri().path() {
            "/healthz" | "/readyz" => health.healthy(),
            "/livez" => health.live(),
            _ => return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        reply(status, "application/json", health.json())
    }));
    Ok(bound)
}
