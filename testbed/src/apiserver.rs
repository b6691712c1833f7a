//! A Kubernetes API server stand-in for the three resources sluice reads: Services (core/v1),
//! EndpointSlices (discovery.k8s.io/v1) and Nodes (core/v1).
//!
//! No real kube-apiserver can run on the test machines, so the agent's real kube-rs client
//! (`watcher(..).default_backoff().reflect(..)`, configured from an ordinary kubeconfig) talks to
//! this server instead and cannot tell the difference. Tests change the cluster through
//! [`ApiServer::create`], [`ApiServer::update`], [`ApiServer::apply`] and [`ApiServer::delete`]
//! (as if another client wrote through another API server), and inject the failures a watcher has
//! to survive: dropped watch connections ([`ApiServer::drop_watches`]), etcd compaction
//! ([`ApiServer::expire`]) and an outage ([`ApiServer::set_available`]).
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::Service;
//! use testbed::{ApiServer, Netns};
//!
//! let ns = Netns::new("api").unwrap();
//! let listener = ns.run_in(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
//! let api = ApiServer::start(listener).unwrap();
//! api.write_kubeconfig("/tmp/kubeconfig".as_ref()).unwrap();
//! let mut svc = Service::default();
//! svc.metadata.name = Some("web".into());
//! svc.metadata.namespace = Some("default".into());
//! api.create(&svc).unwrap();
//! ```
//!
//! # Faithful
//! - Paths, verbs and JSON: `/api/v1/{services,nodes}`, `/api/v1/namespaces/{ns}/services`,
//!   `/apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices`, each with `/{name}`; `/version`,
//!   `/healthz`, `/livez`, `/readyz`. Lists are `{kind: ServiceList, apiVersion, metadata:
//!   {resourceVersion, continue, remainingItemCount}, items}` with items in etcd key order
//!   (`namespace/name`) and, as the real server does, without `kind`/`apiVersion` on the items.
//!   Every error body is a `Status` (401 Unauthorized, 404 NotFound, 405 MethodNotAllowed,
//!   400 BadRequest, 422 Invalid, 410 Expired, 504 Timeout for a resourceVersion from the future).
//! - resourceVersion is one global counter, like the etcd revision; every write bumps it. The
//!   server sets `resourceVersion`, `uid`, `creationTimestamp`, `generation` (bumped when anything
//!   outside metadata and status changes) and a `managedFields` entry. An update that changes
//!   nothing is a no-op: same resourceVersion, no event.
//! - Defaulting as the real API server does it: Service `type`, `sessionAffinity`, port
//!   `protocol` and `targetPort`, `internalTrafficPolicy`, `externalTrafficPolicy`, `ipFamilies`,
//!   `ipFamilyPolicy`, `clusterIPs`, `status.loadBalancer`; clusterIP allocation from
//!   10.96.0.0/12 and nodePort allocation from 30000-32767 (carried over on update, conflicts
//!   rejected); EndpointSlice port `protocol`.
//! - List: `limit` + `continue` serve every page from the first page's snapshot (reconstructed
//!   from history); a continue token from before a compaction is 410 Expired. `resourceVersion`
//!   unset is a consistent read; `"0"` is "any", served whole (the limit is ignored, as the watch
//!   cache does); `N` with `resourceVersionMatch=Exact` (or no match but a limit, the legacy rule)
//!   is the snapshot at N, 410 if compacted; `NotOlderThan` serves the current state. The
//!   parameter validation the real server does (continue with resourceVersion, match without
//!   resourceVersion, ...) is there too. `fieldSelector` (`metadata.name`, `metadata.namespace`,
//!   with `=`, `==`, `!=`) and `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`,
//!   `k in (a,b)`, `k notin (a,b)`).
//! - Watch (`watch=true`): a 200 chunked stream of `{"type":..,"object":..}` lines. From
//!   resourceVersion N it replays the history after N, then streams live changes; `""`/`"0"` first
//!   sends synthetic ADDED events for the current state; a compacted N gives one ERROR event
//!   (410 Expired) and the end of the stream, as the watch cache does. A change that makes an
//!   object start or stop matching the selectors arrives as ADDED or DELETED. `timeoutSeconds`
//!   ends the stream cleanly; `allowWatchBookmarks=true` adds BOOKMARK events (only
//!   kind/apiVersion/metadata.resourceVersion); `sendInitialEvents=true` (streaming lists) sends
//!   the state then a BOOKMARK annotated `k8s.io/initial-events-end: "true"`. Each watch has its
//!   own bounded buffer: a watcher that falls too far behind has its stream ended, and never slows
//!   the others.
//! - HTTP/1.1 with keep-alive (hyper); bearer-token authentication on every path.
//!
//! # Simplified
//! - Read-only over HTTP: every write comes from the test through this type; POST, PUT, PATCH
//!   and DELETE over HTTP get 405. Deletion is immediate (no finalizers or deletionTimestamp).
//! - No content negotiation (always JSON, never protobuf or Table), no discovery documents
//!   (`/api`, `/apis`), no RBAC (a valid token may read everything), no TLS (the kubeconfig
//!   says `http://`), no anonymous access (401, as with `--anonymous-auth=false`).
//! - History is kept until [`ApiServer::expire`]; there is no periodic compaction. Expiry ends
//!   open watches with an ERROR 410 event, as a watch served straight from etcd does; the real
//!   watch cache would instead close them and let the re-watch fail. It also moves the
//!   resourceVersion one past the compaction point, as the unrelated writes of a real cluster
//!   (leases, events) do, so that a fresh list gives a watchable version.
//! - A watch without `timeoutSeconds` lasts 30 minutes (the real server picks 30 to 60), and no
//!   bookmark is sent just before the timeout. The default bookmark interval is 1 s (real: about
//!   a minute). Watches with a resourceVersion from the future fail at once instead of after 3 s.
//! - Only the field selectors every resource supports (`metadata.name`, `metadata.namespace`).
//!   Continue tokens are hex rather than base64, with the same content. Validation of the objects
//!   themselves is limited to name, namespace and allocation conflicts.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    convert::Infallible,
    fmt::Write as _,
    hash::{BuildHasher, Hasher, RandomState},
    io,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    ListableResource, Resource,
    api::{core::v1 as corev1, discovery::v1 as discoveryv1},
};
use serde::{Serialize, ser::SerializeMap};
use serde_json::{Map, Value, json};
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::{Instant, sleep_until},
};

use self::{
    query::Query,
    selector::{Fields, Labels},
};

/// How many changes a watch may fall behind before its stream is ended (the real server's
/// per-watcher buffer is of the same order).
const WATCH_BACKLOG: usize = 1024;
/// Lines queued between a watch's task and its HTTP response body.
const WATCH_BUFFER: usize = 16;
/// A watch without `timeoutSeconds` ends after this (the real server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// The Service CIDR clusterIPs are allocated from: 10.96.0.0/12, kubeadm's default.
const FIRST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 96, 0, 1]);
const LAST_CLUSTER_IP: u32 = u32::from_be_bytes([10, 111, 255, 254]);
/// The default nodePort range.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// The field manager named in the managedFields of every object this server writes.
const FIELD_MANAGER: &str = "testbed";

/// A Kubernetes API server for Services, EndpointSlices and Nodes, running on its own tokio
/// runtime so plain `#[test]` functions can use it. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    /// The raw (percent-encoded) query string, empty when there is none.
    pub query: String,
    /// The response status; 200 for a watch, whose stream went on after that.
    pub status: u16,
}

impl RequestLog {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        Query::parse(&self.query).get(name).map(str::to_owned)
    }

    /// Whether this was a watch request.
    pub fn is_watch(&self) -> bool {
        Query::parse(&self.query).flag("watch").unwrap_or(false)
    }
}

/// Why the test's own change to the cluster state was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "{api_version} {kind} is not served by the test API server: it serves only Services, \
         EndpointSlices and Nodes"
    )]
    UnsupportedKind {
        api_version: &'static str,
        kind: &'static str,
    },
    #[error("the {kind} could not be serialized to JSON")]
    Serialize {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {kind} did not serialize to a JSON object")]
    NotAnObject { kind: &'static str },
    #[error("the {kind} has no metadata.name: set one before storing it")]
    MissingName { kind: &'static str },
    #[error(
        "{kind} {name:?} is namespaced: set metadata.namespace (or pass a namespace to delete)"
    )]
    MissingNamespace { kind: &'static str, name: String },
    #[error("{kind} {key} already exists: use update or apply to change it")]
    AlreadyExists { kind: &'static str, key: String },
    #[error("{kind} {key} does not exist: create it first")]
    NotFound { kind: &'static str, key: String },
    #[error("{kind} {key} is invalid: {message}")]
    Invalid {
        kind: &'static str,
        key: String,
        message: String,
    },
}

impl ApiServer {
    /// Serves on an already-bound listener. Bind it inside a network namespace
    /// (`Netns::run_in(|| TcpListener::bind("127.0.0.1:0"))`) so an agent there can reach it.
    pub fn start(listener: std::net::TcpListener) -> io::Result<ApiServer> {
        Self::serve(listener)
    }

    /// Serves on 127.0.0.1 inside `ns` (a node), where the agent runs.
    pub fn start_in(ns: &crate::Netns) -> io::Result<ApiServer> {
        Self::serve(ns.run_in(|| std::net::TcpListener::bind("127.0.0.1:0"))??)
    }

    fn serve(listener: std::net::TcpListener) -> io::Result<ApiServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testbed-apiserver")
            .enable_all()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared::new());
        runtime.spawn(accept(listener, Arc::clone(&shared)));
        Ok(ApiServer {
            shared,
            addr,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bearer token clients must send (it is also in the kubeconfig).
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig for this server: cluster `http://addr`, a user with the bearer token, a
    /// context with namespace `default`, and that context as the current one.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: sluice-testbed\n  cluster:\n    server: http://{addr}\n\
             users:\n\
             - name: sluice-testbed\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: sluice-testbed\n  context:\n    cluster: sluice-testbed\n    \
             user: sluice-testbed\n    namespace: default\n\
             current-context: sluice-testbed\n\
             preferences: {{}}\n",
            addr = self.addr,
            token = self.shared.token,
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Stores a new object; returns its resourceVersion. Fails if it already exists.
    pub fn create<K: Resource + Serialize>(&self, obj: &K) -> Result<String, ApiError> {
        self.write(obj, WriteMode::Create)
    }

    /// Replaces an existing object, whatever resourceVersion the caller's copy carries; returns
    /// the new resourceVersion (the old one if nothing changed). Fails if it does not exist.
    pub fn update<K: Resource + Serialize>(&self, obj: &K) -> Result<String, ApiError> {
        self.write(obj, WriteMode::Update)
    }

    /// Creates or updates.
    pub fn apply<K: Resource + Serialize>(&self, obj: &K) -> Result<String, ApiError> {
        self.write(obj, WriteMode::Apply)
    }

    /// Deletes an object (at once: no finalizers); returns the resourceVersion of the deletion.
    /// `namespace` is required for Services and EndpointSlices, ignored for Nodes.
    pub fn delete<K: Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<String, ApiError> {
        let kind = Kind::of::<K>()?;
        let namespace = match (kind.namespaced(), namespace) {
            (false, _) => "",
            (true, Some(ns)) if !ns.is_empty() => ns,
            (true, _) => {
                return Err(ApiError::MissingNamespace {
                    kind: kind.kind(),
                    name: name.to_owned(),
                });
            }
        };
        let rv = self.shared.store().delete(kind, namespace, name)?;
        Ok(rv.to_string())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Ends every open watch stream abruptly: the connection closes without the final chunk, as
    /// when an API server restarts or a load balancer drops the connection.
    pub fn drop_watches(&self) {
        self.shared.control.send_modify(|c| c.watch_drops += 1);
    }

    /// Compaction: every resourceVersion up to now becomes too old. Open watches get an ERROR
    /// event (410 Expired) and end; later watches from an older version get the same event, and
    /// lists at an older exact version or with an older continue token get HTTP 410.
    pub fn expire(&self) {
        let mut store = self.shared.store();
        store.compact();
        // Under the store lock, so a watch starting now either sees the compaction or is
        // subscribed in time to be told about it (see `watch`).
        self.shared.control.send_modify(|c| c.expiries += 1);
    }

    /// Down: new connections are reset and every open connection (watches included) is closed.
    /// Up again: served as before, with the state intact (writes made meanwhile included).
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
        if !up {
            self.shared.connection_drops.send_modify(|n| *n += 1);
        }
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.shared.requests).clone()
    }

    /// How many watch responses are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The interval between BOOKMARK events on watches that allow them (1 s unless set).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.bookmark_interval.send_replace(interval);
    }

    fn write<K: Resource + Serialize>(&self, obj: &K, mode: WriteMode) -> Result<String, ApiError> {
        let kind = Kind::of::<K>()?;
        let value = serde_json::to_value(obj).map_err(|source| ApiError::Serialize {
            kind: K::KIND,
            source,
        })?;
        let rv = self.shared.store().write(kind, value, mode)?;
        Ok(rv.to_string())
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .field("resource_version", &self.resource_version())
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        // Dropping the tasks closes the listener and every connection. Waiting for that is not
        // allowed inside another runtime, so there the shutdown goes on in the background.
        if tokio::runtime::Handle::try_current().is_ok() {
            runtime.shutdown_background();
        } else {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// The three resources served, with their names taken from k8s-openapi so they are never typed
/// twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn of<K: Resource>() -> Result<Kind, ApiError> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.api_version() == K::API_VERSION && kind.kind() == K::KIND)
            .ok_or(ApiError::UnsupportedKind {
                api_version: K::API_VERSION,
                kind: K::KIND,
            })
    }

    fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.api_version() == group_version && kind.plural() == plural)
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => corev1::Service::API_VERSION,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::API_VERSION,
            Kind::Node => corev1::Node::API_VERSION,
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Service => corev1::Service::GROUP,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::GROUP,
            Kind::Node => corev1::Node::GROUP,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => corev1::Service::KIND,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::KIND,
            Kind::Node => corev1::Node::KIND,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => corev1::Service::LIST_KIND,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::LIST_KIND,
            Kind::Node => corev1::Node::LIST_KIND,
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => corev1::Service::URL_PATH_SEGMENT,
            Kind::EndpointSlice => discoveryv1::EndpointSlice::URL_PATH_SEGMENT,
            Kind::Node => corev1::Node::URL_PATH_SEGMENT,
        }
    }

    fn namespaced(self) -> bool {
        match self {
            Kind::Service | Kind::EndpointSlice => true,
            Kind::Node => false,
        }
    }

    /// The resource as the real server names it in messages: `services`,
    /// `endpointslices.discovery.k8s.io`.
    fn resource(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// The etcd-style key, whose byte order is the order of list items: `namespace/name`, or
    /// `name` for cluster-scoped kinds.
    fn key(self, namespace: &str, name: &str) -> String {
        if self.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_owned()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store: objects, history, resourceVersions.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    Create,
    Update,
    Apply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as kept in the history and sent to the watches.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    key: String,
    change: ChangeType,
    /// The object at this version; for a deletion, its last state with the deletion's version.
    object: Arc<Value>,
    /// The object before this change; `None` for an addition.
    previous: Option<Arc<Value>>,
}

struct Store {
    /// The last resourceVersion issued (the etcd revision).
    rv: u64,
    /// Versions up to this one have been compacted away.
    compacted: u64,
    objects: BTreeMap<(Kind, String), Arc<Value>>,
    /// Every change after `compacted`, oldest first.
    history: VecDeque<Arc<Change>>,
    /// Every change, to the open watches.
    changes: broadcast::Sender<Arc<Change>>,
    next_cluster_ip: u32,
    next_node_port: u16,
}

impl Store {
    fn new() -> Store {
        Store {
            rv: 1,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            changes: broadcast::channel(WATCH_BACKLOG).0,
            next_cluster_ip: FIRST_CLUSTER_IP,
            next_node_port: *NODE_PORTS.start(),
        }
    }

    fn write(&mut self, kind: Kind, mut obj: Value, mode: WriteMode) -> Result<u64, ApiError> {
        let (namespace, name) = identify(kind, &mut obj)?;
        let key = kind.key(&namespace, &name);
        let old = self.objects.get(&(kind, key.clone())).cloned();
        match (mode, &old) {
            (WriteMode::Create, Some(_)) => {
                return Err(ApiError::AlreadyExists {
                    kind: kind.kind(),
                    key,
                });
            }
            (WriteMode::Update, None) => {
                return Err(ApiError::NotFound {
                    kind: kind.kind(),
                    key,
                });
            }
            _ => {}
        }
        match kind {
            Kind::Service => self.default_service(&mut obj, old.as_deref(), &key)?,
            Kind::EndpointSlice => default_port_protocols(obj.get_mut("ports")),
            Kind::Node => {}
        }
        let now = now_rfc3339();
        let meta = object_field(obj.as_object_mut().expect("identify checked"), "metadata");
        if let Some(old) = &old {
            let old_meta = &old["metadata"];
            for field in [
                "uid",
                "creationTimestamp",
                "resourceVersion",
                "managedFields",
            ] {
                if let Some(value) = old_meta.get(field) {
                    meta.insert(field.to_owned(), value.clone());
                }
            }
            let generation = old_meta["generation"].as_u64().unwrap_or(1);
            let bump = u64::from(without_meta_and_status(old) != without_meta_and_status(&obj));
            obj["metadata"]["generation"] = json!(generation + bump);
            if obj == **old {
                // The real server does not write an unchanged object: no new version, no event.
                return Ok(self.rv_of(old));
            }
        } else {
            meta.insert("uid".to_owned(), json!(new_uid()));
            meta.insert("creationTimestamp".to_owned(), json!(now));
            meta.insert("generation".to_owned(), json!(1));
        }
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["managedFields"] = json!([{
            "manager": FIELD_MANAGER,
            "operation": "Update",
            "apiVersion": kind.api_version(),
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": {},
        }]);
        let object = Arc::new(obj);
        self.objects
            .insert((kind, key.clone()), Arc::clone(&object));
        let change = if old.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(Change {
            rv,
            kind,
            key,
            change,
            object,
            previous: old,
        });
        Ok(rv)
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<u64, ApiError> {
        let key = kind.key(namespace, name);
        let Some(old) = self.objects.remove(&(kind, key.clone())) else {
            return Err(ApiError::NotFound {
                kind: kind.kind(),
                key,
            });
        };
        self.rv += 1;
        let rv = self.rv;
        // The DELETED event carries the last state, stamped with the deletion's version.
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Change {
            rv,
            kind,
            key,
            change: ChangeType::Deleted,
            object: Arc::new(last),
            previous: Some(old),
        });
        Ok(rv)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(Arc::clone(&change));
        // No receivers just means no open watch.
        let _ = self.changes.send(change);
    }

    /// Compacts everything up to now, and moves the version on by one as a real cluster's other
    /// writes would, so a list made after this returns a version that can be watched from.
    fn compact(&mut self) {
        self.compacted = self.rv;
        self.rv += 1;
        self.history.clear();
    }

    fn rv_of(&self, obj: &Value) -> u64 {
        obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(self.rv)
    }

    /// The objects of `kind` as they were at version `rv` (which must not be compacted), by key.
    fn objects_at(&self, kind: Kind, rv: u64) -> BTreeMap<String, Arc<Value>> {
        let mut objects: BTreeMap<String, Arc<Value>> = self
            .objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, key), obj)| (key.clone(), Arc::clone(obj)))
            .collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.kind != kind {
                continue;
            }
            match &change.previous {
                Some(previous) => objects.insert(change.key.clone(), Arc::clone(previous)),
                None => objects.remove(&change.key),
            };
        }
        objects
    }

    fn services(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.objects
            .range((Kind::Service, String::new())..)
            .take_while(|((kind, _), _)| *kind == Kind::Service)
            .map(|((_, key), svc)| (key.as_str(), &**svc))
    }

    /// The Service defaulting and allocation the real API server does.
    fn default_service(
        &mut self,
        svc: &mut Value,
        old: Option<&Value>,
        key: &str,
    ) -> Result<(), ApiError> {
        let invalid = |message: String| ApiError::Invalid {
            kind: Kind::Service.kind(),
            key: key.to_owned(),
            message,
        };
        let root = svc.as_object_mut().expect("identify checked");
        object_field(root, "status")
            .entry("loadBalancer")
            .or_insert_with(|| json!({}));
        let spec = object_field(root, "spec");
        let old_spec = old.map(|old| &old["spec"]);
        let svc_type = spec
            .entry("type")
            .or_insert_with(|| json!("ClusterIP"))
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        spec.entry("sessionAffinity")
            .or_insert_with(|| json!("None"));
        default_port_protocols(spec.get_mut("ports"));
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                if let Some(number) = port.get("port").cloned() {
                    port.entry("targetPort").or_insert(number);
                }
            }
        }
        if svc_type == "ExternalName" {
            return Ok(());
        }
        spec.entry("internalTrafficPolicy")
            .or_insert_with(|| json!("Cluster"));

        // clusterIP: given, carried over from the stored object, or allocated.
        let given = nonempty_str(spec.get("clusterIP")).map(str::to_owned);
        let cluster_ip = match given {
            Some(ip) => {
                let carried = old_spec.and_then(|s| nonempty_str(s.get("clusterIP"))) == Some(&ip);
                if ip != "None" && !carried && self.cluster_ip_in_use(&ip, key) {
                    return Err(invalid(format!(
                        "spec.clusterIPs: Invalid value: [\"{ip}\"]: failed to allocate IP {ip}: \
                         provided IP is already allocated"
                    )));
                }
                ip
            }
            None => match old_spec.and_then(|s| nonempty_str(s.get("clusterIP"))) {
                Some(ip) => {
                    for field in ["clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                        if let Some(value) = old_spec.and_then(|s| s.get(field)) {
                            spec.entry(field).or_insert_with(|| value.clone());
                        }
                    }
                    ip.to_owned()
                }
                None => self.allocate_cluster_ip(key).ok_or_else(|| {
                    invalid("failed to allocate a clusterIP: the range is full".to_owned())
                })?,
            },
        };
        spec.insert("clusterIP".to_owned(), json!(cluster_ip));
        spec.entry("clusterIPs")
            .or_insert_with(|| json!([cluster_ip]));
        let family = if cluster_ip.contains(':') {
            "IPv6"
        } else {
            "IPv4"
        };
        spec.entry("ipFamilies").or_insert_with(|| json!([family]));
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| json!("SingleStack"));

        if svc_type != "NodePort" && svc_type != "LoadBalancer" {
            return Ok(());
        }
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| json!("Cluster"));
        let mut allocate_node_ports = true;
        if svc_type == "LoadBalancer" {
            allocate_node_ports = spec
                .entry("allocateLoadBalancerNodePorts")
                .or_insert_with(|| json!(true))
                .as_bool()
                .unwrap_or(true);
        }
        let mut used = self.node_ports_in_use(key);
        let old_ports = old_spec
            .and_then(|s| s["ports"].as_array())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let old_node_ports: BTreeSet<u64> = old_ports
            .iter()
            .filter_map(|p| p["nodePort"].as_u64())
            .chain(old_spec.and_then(|s| s["healthCheckNodePort"].as_u64()))
            .collect();
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for (i, port) in ports.iter_mut().enumerate() {
                match port["nodePort"].as_u64() {
                    Some(given) if !old_node_ports.contains(&given) => {
                        if !used.insert(given) {
                            return Err(invalid(format!(
                                "spec.ports[{i}].nodePort: Invalid value: {given}: provided port \
                                 is already allocated"
                            )));
                        }
                    }
                    Some(given) => {
                        used.insert(given);
                    }
                    None if allocate_node_ports => {
                        let carried = old_ports
                            .iter()
                            .find(|p| {
                                p["port"] == port["port"] && p["protocol"] == port["protocol"]
                            })
                            .and_then(|p| p["nodePort"].as_u64());
                        let node_port = match carried {
                            Some(carried) => carried,
                            None => self.allocate_node_port(&used).ok_or_else(|| {
                                invalid("failed to allocate a nodePort: the range is full".into())
                            })?,
                        };
                        used.insert(node_port);
                        port["nodePort"] = json!(node_port);
                    }
                    None => {}
                }
            }
        }
        let local = spec["externalTrafficPolicy"] == "Local";
        if svc_type == "LoadBalancer" && local && !spec.contains_key("healthCheckNodePort") {
            let port = match old_spec.and_then(|s| s["healthCheckNodePort"].as_u64()) {
                Some(carried) => carried,
                None => self.allocate_node_port(&used).ok_or_else(|| {
                    invalid("failed to allocate a healthCheckNodePort: the range is full".into())
                })?,
            };
            spec.insert("healthCheckNodePort".to_owned(), json!(port));
        }
        Ok(())
    }

    fn cluster_ip_in_use(&self, ip: &str, except: &str) -> bool {
        self.services()
            .any(|(key, svc)| key != except && svc["spec"]["clusterIP"] == ip)
    }

    fn allocate_cluster_ip(&mut self, key: &str) -> Option<String> {
        for _ in FIRST_CLUSTER_IP..=LAST_CLUSTER_IP {
            let candidate = Ipv4Addr::from(self.next_cluster_ip).to_string();
            self.next_cluster_ip = if self.next_cluster_ip >= LAST_CLUSTER_IP {
                FIRST_CLUSTER_IP
            } else {
                self.next_cluster_ip + 1
            };
            if !self.cluster_ip_in_use(&candidate, key) {
                return Some(candidate);
            }
        }
        None
    }

    fn node_ports_in_use(&self, except: &str) -> BTreeSet<u64> {
        self.services()
            .filter(|(key, _)| *key != except)
            .flat_map(|(_, svc)| {
                let spec = &svc["spec"];
                let ports = spec["ports"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                ports
                    .iter()
                    .filter_map(|p| p["nodePort"].as_u64())
                    .chain(spec["healthCheckNodePort"].as_u64())
            })
            .collect()
    }

    fn allocate_node_port(&mut self, used: &BTreeSet<u64>) -> Option<u64> {
        for _ in NODE_PORTS {
            let candidate = self.next_node_port;
            self.next_node_port = if candidate >= *NODE_PORTS.end() {
                *NODE_PORTS.start()
            } else {
                candidate + 1
            };
            if !used.contains(&u64::from(candidate)) {
                return Some(u64::from(candidate));
            }
        }
        None
    }
}

/// Checks the name and namespace, sets apiVersion and kind, drops the fields only the server
/// sets; returns (namespace, name), namespace empty for cluster-scoped kinds.
fn identify(kind: Kind, obj: &mut Value) -> Result<(String, String), ApiError> {
    let Some(root) = obj.as_object_mut() else {
        return Err(ApiError::NotAnObject { kind: kind.kind() });
    };
    root.insert("apiVersion".to_owned(), json!(kind.api_version()));
    root.insert("kind".to_owned(), json!(kind.kind()));
    let meta = object_field(root, "metadata");
    let name = nonempty_str(meta.get("name"))
        .ok_or(ApiError::MissingName { kind: kind.kind() })?
        .to_owned();
    let namespace = if kind.namespaced() {
        nonempty_str(meta.get("namespace"))
            .ok_or_else(|| ApiError::MissingNamespace {
                kind: kind.kind(),
                name: name.clone(),
            })?
            .to_owned()
    } else {
        meta.remove("namespace");
        String::new()
    };
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generation",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(field);
    }
    Ok((namespace, name))
}

/// `protocol: TCP` on every port that has none (Service and EndpointSlice ports alike).
fn default_port_protocols(ports: Option<&mut Value>) {
    let ports = ports.and_then(Value::as_array_mut).into_iter().flatten();
    for port in ports.filter_map(Value::as_object_mut) {
        port.entry("protocol").or_insert_with(|| json!("TCP"));
    }
}

/// The object without metadata and status: what `metadata.generation` tracks.
fn without_meta_and_status(obj: &Value) -> Map<String, Value> {
    let mut rest = obj.as_object().cloned().unwrap_or_default();
    rest.remove("metadata");
    rest.remove("status");
    rest
}

/// `map[key]` as an object, made one if it is missing or something else.
fn object_field<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let value = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    value.as_object_mut().expect("just made an object")
}

fn nonempty_str(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Now, to the second, as Kubernetes writes timestamps: `2025-01-02T03:04:05Z`.
fn now_rfc3339() -> String {
    use k8s_openapi::jiff::Timestamp;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or_default();
    Timestamp::from_second(seconds)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

fn random_u64() -> u64 {
    // RandomState is seeded randomly per process and varied per instance.
    RandomState::new().build_hasher().finish()
}

/// A random version-4 UUID, as the API server gives every object.
fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

// ---------------------------------------------------------------------------------------------
// Shared state, connections, routing.
// ---------------------------------------------------------------------------------------------

/// What open watches are told to do; every change ends them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    /// Bumped by `drop_watches`: end abruptly.
    watch_drops: u64,
    /// Bumped by `expire`: send ERROR 410, then end.
    expiries: u64,
}

struct Shared {
    store: Mutex<Store>,
    token: String,
    available: AtomicBool,
    control: watch::Sender<Control>,
    /// Bumped when the server goes down: every open connection closes.
    connection_drops: watch::Sender<u64>,
    bookmark_interval: watch::Sender<Duration>,
    requests: Mutex<Vec<RequestLog>>,
    open_watches: AtomicUsize,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            store: Mutex::new(Store::new()),
            token: format!("testbed-{:016x}{:016x}", random_u64(), random_u64()),
            available: AtomicBool::new(true),
            control: watch::Sender::new(Control::default()),
            connection_drops: watch::Sender::new(0),
            bookmark_interval: watch::Sender::new(DEFAULT_BOOKMARK_INTERVAL),
            requests: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .is_some_and(|(scheme, token)| {
                scheme.eq_ignore_ascii_case("bearer") && token.trim() == self.token
            })
    }

    /// Answers one request and logs it.
    fn serve(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let response = self.respond(req).unwrap_or_else(Failure::into_response);
        lock(&self.requests).push(RequestLog {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().unwrap_or_default().to_owned(),
            status: response.status().as_u16(),
        });
        response
    }

    fn respond(self: &Arc<Self>, req: &Request<Incoming>) -> Result<Response<Body>, Failure> {
        // Authentication comes first, as in the real server's handler chain.
        if !self.authorized(req.headers()) {
            return Err(Failure::unauthorized());
        }
        let route = Route::parse(req.uri().path()).ok_or_else(Failure::no_such_path)?;
        if req.method() != Method::GET {
            return Err(Failure::method_not_allowed());
        }
        let query = Query::parse(req.uri().query().unwrap_or_default());
        match route {
            Route::Version => Ok(json_response(StatusCode::OK, &version_info())),
            Route::Health => Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(full("ok"))
                .expect("a valid response")),
            Route::Resource {
                kind,
                namespace,
                name,
            } => {
                if query.flag("watch").unwrap_or(false) {
                    let filter = Filter::new(kind, namespace, name, &query)?;
                    self.watch(filter, &query)
                } else if let Some(name) = name {
                    self.get(kind, namespace.as_deref().unwrap_or_default(), &name)
                } else {
                    let filter = Filter::new(kind, namespace, None, &query)?;
                    self.list(&filter, &query)
                }
            }
        }
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Response<Body>, Failure> {
        let store = self.store();
        match store.objects.get(&(kind, kind.key(namespace, name))) {
            Some(obj) => Ok(json_response(StatusCode::OK, &**obj)),
            None => Err(Failure::not_found(kind, name)),
        }
    }

    fn list(&self, filter: &Filter, query: &Query) -> Result<Response<Body>, Failure> {
        let limit = match query.get("limit").filter(|l| !l.is_empty()) {
            None => None,
            Some(limit) => match limit.parse::<i64>() {
                Ok(n) if n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                Ok(_) => None,
                Err(_) => {
                    return Err(Failure::bad_request(format!(
                        "limit: invalid value {limit:?}: must be an integer"
                    )));
                }
            },
        };
        let rv = query.get("resourceVersion").unwrap_or_default();
        let version_match = query.get("resourceVersionMatch").unwrap_or_default();
        let token = query.get("continue").unwrap_or_default();
        validate_list_versions(rv, version_match, token)?;

        let store = self.store();
        let (snapshot, start, limit) = if !token.is_empty() {
            let token = ContinueToken::decode(token).ok_or_else(|| {
                Failure::bad_request("continue key is not valid: not a token this server issued")
            })?;
            if token.rv <= store.compacted {
                return Err(Failure::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            if token.rv > store.rv {
                return Err(Failure::bad_request(
                    "continue key is not valid: its resource version is in the future",
                ));
            }
            (token.rv, Some(token.start), limit)
        } else if rv.is_empty() {
            // A consistent read of the newest state.
            (store.rv, None, limit)
        } else {
            let requested = parse_rv(rv)?;
            let exact = version_match == "Exact" || (version_match.is_empty() && limit.is_some());
            if requested == 0 {
                // "Any" version, served from the watch cache, which ignores the limit.
                (store.rv, None, None)
            } else if requested > store.rv {
                return Err(Failure::too_large(requested, store.rv));
            } else if exact && requested <= store.compacted {
                return Err(Failure::expired(
                    "The resourceVersion for the provided list is too old.",
                ));
            } else if exact {
                (requested, None, limit)
            } else {
                (store.rv, None, limit)
            }
        };
        let objects = store.objects_at(filter.kind, snapshot);
        drop(store);

        let mut matching = objects
            .iter()
            .filter(|(key, _)| start.as_deref().is_none_or(|start| key.as_str() >= start))
            .filter(|(_, obj)| filter.matches(obj));
        let page: Vec<(&String, &Arc<Value>)> = matching
            .by_ref()
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        let remaining = matching.count();
        let continue_ = match page.last() {
            Some((last, _)) if remaining > 0 => Some(
                ContinueToken {
                    rv: snapshot,
                    start: format!("{last}\u{0}"),
                }
                .encode(),
            ),
            _ => None,
        };
        // The real server counts the rest only when no selector makes that expensive.
        let remaining_item_count = (continue_.is_some() && filter.selects_everything())
            .then(|| u64::try_from(remaining).unwrap_or(u64::MAX));
        let list = ListBody {
            kind: filter.kind.list_kind(),
            api_version: filter.kind.api_version(),
            metadata: ListMeta {
                resource_version: snapshot.to_string(),
                continue_,
                remaining_item_count,
            },
            items: page.into_iter().map(|(_, obj)| ListItem(obj)).collect(),
        };
        Ok(json_response(StatusCode::OK, &list))
    }

    fn watch(self: &Arc<Self>, filter: Filter, query: &Query) -> Result<Response<Body>, Failure> {
        let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
            None => DEFAULT_WATCH_TIMEOUT,
            Some(t) => match t.parse::<u64>() {
                Ok(0) => DEFAULT_WATCH_TIMEOUT,
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => {
                    return Err(Failure::bad_request(format!(
                        "timeoutSeconds: invalid value {t:?}: must be a non-negative integer"
                    )));
                }
            },
        };
        let bookmarks = query.flag("allowWatchBookmarks").unwrap_or(false);
        let send_initial_events = query.flag("sendInitialEvents");
        let version_match = query.get("resourceVersionMatch").unwrap_or_default();
        validate_watch_options(send_initial_events, version_match, bookmarks)?;
        let rv = query.get("resourceVersion").unwrap_or_default();
        let requested = match rv {
            "" | "0" => None,
            rv => Some(parse_rv(rv)?),
        };

        let store = self.store();
        let mut initial = Vec::new();
        let mut live = true;
        match (send_initial_events, requested) {
            (_, Some(requested)) if requested > store.rv => {
                initial.push(error_line(
                    &Failure::too_large(requested, store.rv).status(),
                ));
                live = false;
            }
            (Some(true), _) | (None, None) => {
                // Synthetic ADDED events for the current state ("Get State and Start at ..."),
                // and for a streaming list, the bookmark that says the state is complete.
                for obj in store.objects_at(filter.kind, store.rv).values() {
                    if filter.matches(obj) {
                        initial.push(event_line("ADDED", obj));
                    }
                }
                if send_initial_events == Some(true) {
                    initial.push(bookmark_line(filter.kind, store.rv, true));
                }
            }
            (_, Some(requested)) if requested <= store.compacted => {
                let expired = Failure::expired(format!(
                    "too old resource version: {requested} ({})",
                    store.compacted + 1
                ));
                initial.push(error_line(&expired.status()));
                live = false;
            }
            (_, Some(requested)) => {
                let replay = store.history.iter().filter(|change| change.rv > requested);
                initial.extend(replay.filter_map(|change| filter.event(change)));
            }
            // sendInitialEvents=false without a version: start now, with no initial events.
            (Some(false), None) => {}
        }
        let live = live.then(|| Live {
            changes: store.changes.subscribe(),
            progress: store.rv,
            bookmarks,
        });
        // Subscribed under the store lock, which `expire` holds while it signals: this watch
        // either started after the compaction or hears about it.
        let mut control = self.control.subscribe();
        drop(store);

        let started = *control.borrow_and_update();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let abort = Arc::new(Abort::default());
        let body = WatchBody {
            lines: rx,
            abort: Arc::clone(&abort),
            _open: OpenWatch::new(self),
        };
        let task = WatchTask {
            filter,
            tx,
            abort,
            control,
            started,
            bookmark_interval: self.bookmark_interval.subscribe(),
            deadline: Instant::now() + timeout,
            initial,
            live,
        };
        tokio::spawn(task.run());
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(body.boxed())
            .expect("a valid response"))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections until the runtime shuts down; while the server is down, resets them.
async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !shared.available.load(Ordering::SeqCst) {
            // Zero linger: closing sends a reset, as a client sees of a server that is gone.
            let _ = stream.set_zero_linger();
            continue;
        }
        // As Go's net package (and so kube-apiserver) does: watch events are small writes,
        // and Nagle plus the client's delayed ACK would hold each one back ~40 ms.
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, Arc::clone(&shared)));
    }
}

/// Serves one HTTP/1.1 connection (keep-alive) until it ends or the server goes down.
async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let mut drops = shared.connection_drops.subscribe();
    // Checked after subscribing, so a `set_available(false)` in between is not missed.
    if !shared.available.load(Ordering::SeqCst) {
        let _ = stream.set_zero_linger();
        return;
    }
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&service_shared);
        async move { Ok::<_, Infallible>(shared.serve(&req)) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // A failed connection (the client went away, a watch was aborted) just ends.
        _ = conn => {}
        _ = drops.changed() => {}
    }
}

enum Route {
    Version,
    Health,
    Resource {
        kind: Kind,
        namespace: Option<String>,
        name: Option<String>,
    },
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let (group_version, rest) = match segments.as_slice() {
            ["version"] => return Some(Route::Version),
            ["healthz" | "livez" | "readyz"] => return Some(Route::Health),
            ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(*namespace), rest),
            rest => (None, rest),
        };
        let (plural, name) = match rest {
            [plural] => (*plural, None),
            [plural, name] => (*plural, Some(*name)),
            _ => return None,
        };
        let kind = Kind::from_path(&group_version, plural)?;
        if (namespace.is_some() && !kind.namespaced()) || namespace == Some("") || name == Some("")
        {
            return None;
        }
        Some(Route::Resource {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
        })
    }
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0",
        "gitCommit": "60a317eadfcb839692a5551a0e3f2e5a6f3e4d4f",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T13:00:22Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn parse_rv(rv: &str) -> Result<u64, Failure> {
    rv.parse()
        .map_err(|_| Failure::bad_request(format!("invalid resource version: {rv:?}")))
}

/// The real server's checks of resourceVersion, resourceVersionMatch and continue on a list.
fn validate_list_versions(rv: &str, version_match: &str, token: &str) -> Result<(), Failure> {
    match version_match {
        "" => {}
        "Exact" | "NotOlderThan" if !token.is_empty() => {
            return Err(Failure::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when \
                 continue is provided",
            ));
        }
        "Exact" | "NotOlderThan" if rv.is_empty() => {
            return Err(Failure::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless \
                 resourceVersion is provided",
            ));
        }
        "Exact" if rv == "0" => {
            return Err(Failure::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden \
                 for resourceVersion \"0\"",
            ));
        }
        "Exact" | "NotOlderThan" => {}
        other => {
            return Err(Failure::invalid(format!(
                "resourceVersionMatch: Unsupported value: {other:?}: supported values: \
                 \"Exact\", \"NotOlderThan\""
            )));
        }
    }
    if !token.is_empty() && !rv.is_empty() && rv != "0" {
        return Err(Failure::bad_request(
            "specifying resource version is not allowed when using continue",
        ));
    }
    Ok(())
}

/// The real server's checks of sendInitialEvents, resourceVersionMatch and allowWatchBookmarks
/// on a watch.
fn validate_watch_options(
    send_initial_events: Option<bool>,
    version_match: &str,
    bookmarks: bool,
) -> Result<(), Failure> {
    let problem = match (send_initial_events, version_match) {
        (Some(_), m) if m != "NotOlderThan" => Some(
            "sendInitialEvents: Forbidden: sendInitialEvents requires setting \
             resourceVersionMatch to NotOlderThan",
        ),
        (Some(_), _) if !bookmarks => Some(
            "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting \
             allowWatchBookmarks to true",
        ),
        (None, m) if !m.is_empty() => Some(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided",
        ),
        _ => None,
    };
    match problem {
        Some(problem) => Err(Failure::invalid(problem)),
        None => Ok(()),
    }
}

/// Which objects a list or watch wants: the kind, the namespace and name from the path, and the
/// selectors.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    labels: Labels,
    fields: Fields,
}

impl Filter {
    fn new(
        kind: Kind,
        namespace: Option<String>,
        name: Option<String>,
        query: &Query,
    ) -> Result<Filter, Failure> {
        let labels = Labels::parse(query.get("labelSelector").unwrap_or_default())
            .map_err(Failure::bad_request)?;
        let fields = Fields::parse(query.get("fieldSelector").unwrap_or_default())
            .map_err(Failure::bad_request)?;
        Ok(Filter {
            kind,
            namespace,
            name,
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or_default();
        let name = meta["name"].as_str().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.labels.matches(obj)
            && self.fields.matches(namespace, name)
    }

    fn selects_everything(&self) -> bool {
        self.name.is_none() && self.labels.is_empty() && self.fields.is_empty()
    }

    /// The watch event `change` makes for this filter, if any. As in the watch cache, an object
    /// that starts matching arrives as ADDED and one that stops matching as DELETED (its previous
    /// state, with the new version).
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.kind != self.kind {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.previous.as_deref().is_some_and(|p| self.matches(p));
        match (change.change, before, now) {
            (ChangeType::Added, _, true) => Some(event_line("ADDED", &change.object)),
            (ChangeType::Modified, true, true) => Some(event_line("MODIFIED", &change.object)),
            (ChangeType::Modified, false, true) => Some(event_line("ADDED", &change.object)),
            (ChangeType::Modified, true, false) => {
                let mut gone = change.previous.as_deref()?.clone();
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(event_line("DELETED", &gone))
            }
            (ChangeType::Deleted, _, true) => Some(event_line("DELETED", &change.object)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses: JSON bodies, Status errors, watch streams.
// ---------------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, WatchAborted>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values and the list body always serialize")
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(to_json(value)))
        .expect("a valid response")
}

#[derive(Serialize)]
struct ListBody<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: ListMeta,
    items: Vec<ListItem<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_item_count: Option<u64>,
}

/// A list item as the real server writes it: without `kind` and `apiVersion`.
struct ListItem<'a>(&'a Value);

impl Serialize for ListItem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(fields) = self.0.as_object() else {
            return self.0.serialize(serializer);
        };
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in fields {
            if key != "kind" && key != "apiVersion" {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// A continue token: the snapshot's version and the key to start from, as the real server's
/// (hex here rather than base64).
struct ContinueToken {
    rv: u64,
    start: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        let json = to_json(&json!({"v": "meta.k8s.io/v1", "rv": self.rv, "start": self.start}));
        json.iter().fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
    }

    fn decode(token: &str) -> Option<ContinueToken> {
        if !token.len().is_multiple_of(2) || !token.is_ascii() {
            return None;
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let value: Value = serde_json::from_slice(&bytes).ok()?;
        Some(ContinueToken {
            rv: value["rv"].as_u64()?,
            start: value["start"].as_str()?.to_owned(),
        })
    }
}

/// An error answered as a `Status` object.
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Failure {
        let message = format!(
            "ListOptions.meta.k8s.io \"\" is invalid: {}",
            message.into()
        );
        Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }

    fn unauthorized() -> Failure {
        Failure::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }

    fn no_such_path() -> Failure {
        Failure {
            details: Some(json!({})),
            ..Failure::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    fn not_found(kind: Kind, name: &str) -> Failure {
        let mut details = json!({"name": name, "kind": kind.plural()});
        if !kind.group().is_empty() {
            details["group"] = json!(kind.group());
        }
        Failure {
            details: Some(details),
            ..Failure::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} {name:?} not found", kind.resource()),
            )
        }
    }

    fn method_not_allowed() -> Failure {
        Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn expired(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::GONE, "Expired", message)
    }

    fn too_large(requested: u64, current: u64) -> Failure {
        Failure {
            details: Some(json!({
                "causes": [{
                    "reason": "ResourceVersionTooLarge",
                    "message": "Too large resource version",
                }],
                "retryAfterSeconds": 1,
            })),
            ..Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!("Too large resource version: {requested}, current: {current}"),
            )
        }
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn into_response(self) -> Response<Body> {
        json_response(self.code, &self.status())
    }
}

#[derive(Serialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type")]
    event: &'static str,
    object: &'a Value,
}

fn line(value: &impl Serialize) -> Bytes {
    let mut line = to_json(value);
    line.push(b'\n');
    Bytes::from(line)
}

fn event_line(event: &'static str, object: &Value) -> Bytes {
    line(&WatchEvent { event, object })
}

fn error_line(status: &Value) -> Bytes {
    event_line("ERROR", status)
}

/// A BOOKMARK: an empty object of the kind carrying only a resourceVersion (and, at the end of
/// a streaming list's initial events, the annotation that says so).
fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut object = json!({
        "kind": kind.kind(),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &object)
}

/// The error that makes hyper abort a watch response: the connection closes mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("the test API server dropped this watch")]
struct WatchAborted;

/// Set by the watch task to make its response body fail at once, even while idle.
#[derive(Default)]
struct Abort {
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl Abort {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Counts an open watch response for as long as its body lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: &Arc<Shared>) -> OpenWatch {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        OpenWatch(Arc::clone(shared))
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A watch response body: the lines its task sends, each written as one chunk.
struct WatchBody {
    lines: mpsc::Receiver<Bytes>,
    abort: Arc<Abort>,
    _open: OpenWatch,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = WatchAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WatchAborted>>> {
        self.abort.waker.register(cx.waker());
        if self.abort.requested.load(Ordering::SeqCst) {
            return Poll::Ready(Some(Err(WatchAborted)));
        }
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}

enum Flow {
    Continue,
    End,
}

/// The live part of a watch.
struct Live {
    changes: broadcast::Receiver<Arc<Change>>,
    /// The newest version this watch has seen every change up to: what a bookmark reports.
    progress: u64,
    bookmarks: bool,
}

/// One watch: sends the initial lines, then live changes and bookmarks, until the timeout, the
/// client leaving, falling too far behind, or the test dropping or expiring watches.
struct WatchTask {
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    abort: Arc<Abort>,
    control: watch::Receiver<Control>,
    started: Control,
    bookmark_interval: watch::Receiver<Duration>,
    deadline: Instant,
    initial: Vec<Bytes>,
    live: Option<Live>,
}

impl WatchTask {
    async fn run(mut self) {
        for line in std::mem::take(&mut self.initial) {
            if let Flow::End = self.emit(line).await {
                return;
            }
        }
        // Without a live part (an ERROR was the whole answer) the stream ends cleanly here.
        let Some(mut live) = self.live.take() else {
            return;
        };
        let mut last_bookmark = Instant::now();
        loop {
            let next_bookmark = last_bookmark + *self.bookmark_interval.borrow();
            let flow = tokio::select! {
                changed = self.control.changed() => self.on_control(changed.is_ok()),
                () = self.tx.closed() => Flow::End,
                () = sleep_until(self.deadline) => Flow::End,
                changed = self.bookmark_interval.changed() => match changed {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::End,
                },
                () = sleep_until(next_bookmark), if live.bookmarks => {
                    last_bookmark = Instant::now();
                    self.emit(bookmark_line(self.filter.kind, live.progress, false)).await
                }
                received = live.changes.recv() => match received {
                    Ok(change) => {
                        live.progress = live.progress.max(change.rv);
                        match self.filter.event(&change) {
                            Some(line) => self.emit(line).await,
                            None => Flow::Continue,
                        }
                    }
                    // Too far behind: end the stream, as the real server does with a watcher
                    // that does not keep up; the client resumes from its last version.
                    Err(broadcast::error::RecvError::Lagged(_)) => Flow::End,
                    Err(broadcast::error::RecvError::Closed) => {
                        self.abort.request();
                        Flow::End
                    }
                },
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    /// Sends one line, unless the test ends the watch while the client is not reading.
    async fn emit(&mut self, line: Bytes) -> Flow {
        loop {
            tokio::select! {
                sent = self.tx.send(line.clone()) => {
                    return if sent.is_ok() { Flow::Continue } else { Flow::End };
                }
                changed = self.control.changed() => {
                    if let Flow::End = self.on_control(changed.is_ok()) {
                        return Flow::End;
                    }
                }
            }
        }
    }

    fn on_control(&mut self, alive: bool) -> Flow {
        let now = *self.control.borrow_and_update();
        if !alive || now.watch_drops != self.started.watch_drops {
            self.abort.request();
            return Flow::End;
        }
        if now.expiries != self.started.expiries {
            let expired =
                Failure::expired("The resourceVersion for the provided watch is too old.");
            // If the client is not reading, the buffer may be full: then the stream just ends,
            // and the client's next watch from its old version gets the 410.
            let _ = self.tx.try_send(error_line(&expired.status()));
            return Flow::End;
        }
        Flow::Continue
    }
}

// ---------------------------------------------------------------------------------------------
// Query strings and selectors.
// ---------------------------------------------------------------------------------------------

mod query {
    /// A decoded query string; the first of repeated parameters wins.
    pub(super) struct Query(Vec<(String, String)>);

    impl Query {
        pub(super) fn parse(raw: &str) -> Query {
            let pairs = raw.split('&').filter(|pair| !pair.is_empty());
            Query(
                pairs
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        (decode(key), decode(value))
                    })
                    .collect(),
            )
        }

        pub(super) fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, value)| value.as_str())
        }

        /// A boolean parameter read as the real server reads it: present and not `0`, `f` or
        /// `false` (any case) is true.
        pub(super) fn flag(&self, key: &str) -> Option<bool> {
            self.get(key).map(|value| {
                !(value == "0"
                    || value.eq_ignore_ascii_case("f")
                    || value.eq_ignore_ascii_case("false"))
            })
        }
    }

    /// Percent-decoding of `application/x-www-form-urlencoded` (`+` is a space).
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                    match hex
                        .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
                    {
                        Some(byte) => {
                            out.push(byte);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

mod selector {
    use serde_json::Value;

    /// A parsed `labelSelector`: every requirement must hold.
    #[derive(Debug, Default)]
    pub(super) struct Labels(Vec<LabelRequirement>);

    #[derive(Debug)]
    enum LabelRequirement {
        Equals(String, String),
        NotEquals(String, String),
        In(String, Vec<String>),
        NotIn(String, Vec<String>),
        Exists(String),
        NotExists(String),
    }

    impl Labels {
        pub(super) fn parse(selector: &str) -> Result<Labels, String> {
            split_outside_parentheses(selector)
                .into_iter()
                .map(str::trim)
                .filter(|term| !term.is_empty())
                .map(parse_requirement)
                .collect::<Result<Vec<_>, _>>()
                .map(Labels)
        }

        pub(super) fn is_empty(&self) -> bool {
            self.0.is_empty()
        }

        pub(super) fn matches(&self, obj: &Value) -> bool {
            let labels = obj["metadata"]["labels"].as_object();
            let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            self.0.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
                LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
                LabelRequirement::In(key, values) => {
                    label(key).is_some_and(|l| values.iter().any(|v| v == l))
                }
                LabelRequirement::NotIn(key, values) => {
                    label(key).is_none_or(|l| values.iter().all(|v| v != l))
                }
                LabelRequirement::Exists(key) => label(key).is_some(),
                LabelRequirement::NotExists(key) => label(key).is_none(),
            })
        }
    }

    fn split_outside_parentheses(selector: &str) -> Vec<&str> {
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0_usize, 0);
        for (i, c) in selector.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    terms.push(&selector[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&selector[start..]);
        terms
    }

    fn parse_requirement(term: &str) -> Result<LabelRequirement, String> {
        let unparsable = || format!("unable to parse requirement: {term:?}");
        if let Some(key) = term.strip_prefix('!') {
            return Ok(LabelRequirement::NotExists(
                label_key(key).ok_or_else(unparsable)?,
            ));
        }
        if let Some(open) = term.find('(') {
            let inner = term[open + 1..].strip_suffix(')').ok_or_else(unparsable)?;
            let mut head = term[..open].split_whitespace();
            let (key, operator) = (head.next(), head.next());
            let key = key.and_then(label_key).ok_or_else(unparsable)?;
            let values = inner
                .split(',')
                .map(|v| label_value(v).ok_or_else(unparsable))
                .collect::<Result<Vec<_>, _>>()?;
            if head.next().is_some() || values.iter().all(String::is_empty) {
                return Err(unparsable());
            }
            return match operator {
                Some("in") => Ok(LabelRequirement::In(key, values)),
                Some("notin") => Ok(LabelRequirement::NotIn(key, values)),
                _ => Err(unparsable()),
            };
        }
        if let Some((key, value)) = term.split_once("!=") {
            let key = label_key(key).ok_or_else(unparsable)?;
            return Ok(LabelRequirement::NotEquals(
                key,
                label_value(value).ok_or_else(unparsable)?,
            ));
        }
        if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            let key = label_key(key).ok_or_else(unparsable)?;
            return Ok(LabelRequirement::Equals(
                key,
                label_value(value).ok_or_else(unparsable)?,
            ));
        }
        Ok(LabelRequirement::Exists(
            label_key(term).ok_or_else(unparsable)?,
        ))
    }

    /// A label key: `[prefix/]name` of letters, digits, `-`, `_`, `.`.
    fn label_key(key: &str) -> Option<String> {
        let key = key.trim();
        let valid = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        valid.then(|| key.to_owned())
    }

    /// A label value: possibly empty, of letters, digits, `-`, `_`, `.`.
    fn label_value(value: &str) -> Option<String> {
        let value = value.trim();
        let valid = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        valid.then(|| value.to_owned())
    }

    /// A parsed `fieldSelector` over the fields every resource supports.
    #[derive(Debug, Default)]
    pub(super) struct Fields(Vec<FieldRequirement>);

    #[derive(Debug)]
    struct FieldRequirement {
        field: Field,
        value: String,
        equal: bool,
    }

    #[derive(Debug, Clone, Copy)]
    enum Field {
        Name,
        Namespace,
    }

    impl Fields {
        pub(super) fn parse(selector: &str) -> Result<Fields, String> {
            let terms = selector.split(',').map(str::trim).filter(|t| !t.is_empty());
            terms
                .map(|term| {
                    let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                        (f, v, false)
                    } else if let Some((f, v)) = term.split_once("==") {
                        (f, v, true)
                    } else if let Some((f, v)) = term.split_once('=') {
                        (f, v, true)
                    } else {
                        return Err(format!("invalid selector: {term:?}; can't understand it"));
                    };
                    let field = match field.trim() {
                        "metadata.name" => Field::Name,
                        "metadata.namespace" => Field::Namespace,
                        other => return Err(format!("field label not supported: {other}")),
                    };
                    Ok(FieldRequirement {
                        field,
                        value: value.trim().to_owned(),
                        equal,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Fields)
        }

        pub(super) fn is_empty(&self) -> bool {
            self.0.is_empty()
        }

        pub(super) fn matches(&self, namespace: &str, name: &str) -> bool {
            self.0.iter().all(|r| {
                let actual = match r.field {
                    Field::Name => name,
                    Field::Namespace => namespace,
                };
                (actual == r.value) == r.equal
            })
        }
    }
}
