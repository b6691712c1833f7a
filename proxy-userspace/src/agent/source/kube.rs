//! The API server source: one kube-rs watcher per resource, each feeding a reflector store
//! (`watcher(..).default_backoff().modify(drop managedFields).reflect(writer)`).
//!
//! Services, EndpointSlices and the own Node are required: the first full sync waits for
//! their lists. ServiceCIDRs (networking.k8s.io/v1, Kubernetes 1.33+) are watched only where
//! the API server's discovery lists them, and nothing waits for them: they only add drops of
//! traffic to unallocated ClusterIPs.
//!
//! - The initial list is awaited (one [`Change::Listed`] per resource) before the first full
//!   sync; until then the dataplane keeps serving what it adopted from the pinned maps.
//! - Watch errors are retried with kube-rs's default backoff (exponential, jittered, 800 ms to
//!   30 s); while the API server is unreachable nothing is written, so the last good state keeps
//!   serving.
//! - A watch that cannot resume (410 Gone) relists: the reflector swaps its store atomically at
//!   the end of the relist, and the sync loop then does a full sync, which changes only what
//!   differs. Nothing is flushed.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
    },
};

use super::{Change, ChangeTx, ObjectView, Resource, trigger_time};
use crate::{
    agent::metrics::Metrics, agent::metrics::SourceLabel, model::ServiceKey, service::Cidr4,
};

type SliceRef = ObjectRef<EndpointSlice>;

/// Which slices belong to which Service (by the `kubernetes.io/service-name` label).
#[derive(Default)]
struct SliceIndex {
    by_service: HashMap<ServiceKey, HashSet<SliceRef>>,
    owner: HashMap<SliceRef, ServiceKey>,
}

impl SliceIndex {
    /// Records `slice`; returns the Services whose slices changed (the old owner if the label
    /// moved, and the new one).
    fn apply(&mut self, slice: &EndpointSlice) -> Vec<ServiceKey> {
        let r = ObjectRef::from_obj(slice);
        let mut touched = self.remove(&r);
        if let Some(key) = ServiceKey::of_slice(slice) {
            self.by_service
                .entry(key.clone())
                .or_default()
                .insert(r.clone());
            self.owner.insert(r, key.clone());
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        touched
    }
    fn remove(&mut self, r: &SliceRef) -> Vec<ServiceKey> {
        let Some(key) = self.owner.remove(r) else {
            return Vec::new();
        };
        if let Some(set) = self.by_service.get_mut(&key) {
            set.remove(r);
            if set.is_empty() {
                self.by_service.remove(&key);
            }
        }
        vec![key]
    }
}

/// The objects as the reflectors hold them.
pub struct KubeView {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    index: Mutex<SliceIndex>,
    node_name: String,
}

impl ObjectView for KubeView {
    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }
    fn slices(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        index
            .by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|r| self.slices.get(r))
            .collect()
    }
    fn node(&self) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectRef::new(&self.node_name))
    }
    fn service_keys(&self) -> Vec<ServiceKey> {
        self.services
            .state()
            .iter()
            .map(|s| ServiceKey::of_service(s))
            .collect()
    }
    fn resources(&self) -> &'static [Resource] {
        &[Resource::Services, Resource::EndpointSlices, Resource::Node]
    }
    fn service_cidrs(&self) -> Vec<Cidr4> {
        self.service_cidrs
            .state()
            .iter()
            .filter_map(|o| o.spec.as_ref()?.cidrs.clone())
            .flatten()
            // IPv6 prefixes are for the IPv6 datapath to come.
            .filter_map(|c| c.parse::<Cidr4>().ok())
            .collect()
    }
}

/// Starts the watchers on the current tokio runtime: Services, EndpointSlices and this Node,
/// and ServiceCIDRs where the API server serves them.
pub fn start(
    client: Client,
    node_name: &str,
    watch_timeout: u32,
    tx: ChangeTx,
    metrics: Arc<Metrics>,
) -> Arc<KubeView> {
    let (services, services_w) = reflector::store();
    let (slices, slices_w) = reflector::store();
    let (nodes, nodes_w) = reflector::store();
    let (service_cidrs, service_cidrs_w) = reflector::store();
    let view = Arc::new(KubeView {
        services,
        slices,
        nodes,
        service_cidrs,
        index: Mutex::new(SliceIndex::default()),
        node_name: node_name.to_owned(),
    });

    // Services.
    {
        let tx = tx.clone();
        let metrics = metrics.clone();
        let stream = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().timeout(watch_timeout),
        )
        .reflect(services_w);
        tokio::spawn(drive(
            stream,
            Resource::Services,
            metrics,
            move |ev| match ev {
                Event::Apply(s) | Event::Delete(s) => {
                    let _ = tx.send(Change::Service(ServiceKey::of_service(&s)));
                }
                Event::InitDone => {
                    let _ = tx.send(Change::Listed(Resource::Services));
                }
                Event::Init | Event::InitApply(_) => {}
            },
        ));
    }

    // EndpointSlices, with the Service -> slices index kept beside the store. A relist builds
    // a new index and swaps it in at InitDone, as the reflector does with its store.
    {
        let tx = tx.clone();
        let metrics = metrics.clone();
        let view = view.clone();
        let mut relist: Option<SliceIndex> = None;
        let stream = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().timeout(watch_timeout),
        )
        .reflect(slices_w);
        tokio::spawn(drive(
            stream,
            Resource::EndpointSlices,
            metrics,
            move |ev| {
                let mut index = view.index.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    Event::Apply(s) => {
                        let trigger = trigger_time(&s);
                        for service in index.apply(&s) {
                            let _ = tx.send(Change::Slices { service, trigger });
                        }
                    }
                    Event::Delete(s) => {
                        for service in index.remove(&ObjectRef::from_obj(&s)) {
                            let _ = tx.send(Change::Slices {
                                service,
                                trigger: trigger_time(&s),
                            });
                        }
                    }
                    Event::Init => relist = Some(SliceIndex::default()),
                    Event::InitApply(s) => {
                        relist.get_or_insert_with(SliceIndex::default).apply(&s);
                    }
                    Event::InitDone => {
                        *index = relist.take().unwrap_or_default();
                        let _ = tx.send(Change::Listed(Resource::EndpointSlices));
                    }
                }
            },
        ));
    }

    // ServiceCIDRs, where the API server serves them.
    {
        let tx = tx.clone();
        let metrics = metrics.clone();
        let client = client.clone();
        tokio::spawn(async move {
            if !serves_service_cidrs(&client).await {
                tracing::info!(
                    "the API server has no ServiceCIDRs (Kubernetes < 1.33): only \
                     --service-cidr names the Service CIDRs"
                );
                return;
            }
            let stream = watcher(
                Api::<ServiceCIDR>::all(client),
                watcher::Config::default().timeout(watch_timeout),
            )
            .reflect(service_cidrs_w);
            drive(
                stream,
                Resource::ServiceCidrs,
                metrics,
                move |ev| match ev {
                    Event::Apply(_) | Event::Delete(_) | Event::InitDone => {
                        let _ = tx.send(Change::ServiceCidrs);
                    }
                    Event::Init | Event::InitApply(_) => {}
                },
            )
            .await;
        });
    }

    // The own Node only.
    {
        let config = watcher::Config::default()
            .timeout(watch_timeout)
            .fields(&format!("metadata.name={node_name}"));
        let stream = watcher(Api::<Node>::all(client), config).reflect(nodes_w);
        tokio::spawn(drive(stream, Resource::Node, metrics, move |ev| match ev {
            Event::Apply(_) | Event::Delete(_) => {
                let _ = tx.send(Change::Node);
            }
            Event::InitDone => {
                let _ = tx.send(Change::Node);
                let _ = tx.send(Change::Listed(Resource::Node));
            }
            Event::Init | Event::InitApply(_) => {}
        }));
    }
    view
}

/// Whether the API server's discovery lists `servicecidrs` in networking.k8s.io/v1. Asked
/// until it answers: a 404 (an older server, or one without discovery documents) is no.
async fn serves_service_cidrs(client: &Client) -> bool {
    loop {
        match client
            .list_api_group_resources("networking.k8s.io/v1")
            .await
        {
            Ok(list) => return list.resources.iter().any(|r| r.name == "servicecidrs"),
            Err(kube::Error::Api(e)) if e.code == 404 => return false,
            Err(error) => {
                tracing::debug!(%error, "discovery of ServiceCIDRs failed; asking again");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
}

/// The watcher of one resource, with managedFields dropped (the agent never reads them and they
/// are often the bulk of an object).
fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| {
            o.meta_mut().managed_fields = None;
        })
}

/// Polls a reflected watch stream for ever, handing each event to `on_event` and counting
/// errors (the backoff in the stream spaces the retries).
async fn drive<K, S>(
    stream: S,
    resource: Resource,
    metrics: Arc<Metrics>,
    mut on_event: impl FnMut(Event<K>) + Send,
) where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let label = SourceLabel {
        resource: format!("{resource:?}"),
    };
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                if failing {
                    tracing::info!(?resource, "watch recovered");
                    failing = false;
                }
                on_event(ev);
            }
            Err(error) => {
                metrics.source_errors.get_or_create(&label).inc();
                if !failing {
                    tracing::warn!(?resource, %error, "watch failed; the maps keep their last good state while it retries");
                } else {
                    tracing::debug!(?resource, %error, "watch still failing");
                }
                failing = true;
            }
        }
    }
}
