//! Where the agent's objects come from, and how it hears that they changed.
//!
//! Two sources fill the same [`ObjectView`] and send the same [`Change`]s to the sync loop:
//! - [`kube`]: kube-rs watchers with reflectors over Services, EndpointSlices and the own Node;
//! - [`manifests`]: a directory of YAML files, polled for changes.
//!
//! The view holds the objects; a change names only what changed. The sync loop reads the view
//! when it gets to the change, so a burst of changes to one Service is written once.
use std::{sync::Arc, time::SystemTime};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use crate::{model::ServiceKey, service::Cidr4};

pub mod kube;
pub mod manifests;

/// The annotation the EndpointSlice controller sets to the time of the change (a Pod becoming
/// ready, a Service's selector changing) that led to the slice's latest version.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A resource a source lists and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
    ServiceCidrs,
}

/// What the sync loop is told.
#[derive(Clone, Debug)]
pub enum Change {
    /// A Service was created, changed or deleted.
    Service(ServiceKey),
    /// An EndpointSlice of this Service changed; `trigger` is its last-change-trigger-time.
    Slices {
        service: ServiceKey,
        trigger: Option<SystemTime>,
    },
    /// The own Node changed (its addresses decide the NodePort frontends and the uplinks).
    Node,
    /// A complete list of `resource` is in the view: the first one, or a relist after the
    /// watch could not resume (410 Gone). The sync loop does a full sync once every resource
    /// has been listed, and again after each relist; entries are never flushed meanwhile.
    Listed(Resource),
    /// Devices or addresses changed (netlink), or a periodic re-check is due.
    Devices,
    /// The cluster's ServiceCIDR objects changed.
    ServiceCidrs,
    /// Stop: the process is exiting.
    Shutdown,
}

/// Where the sync loop reads the objects.
pub trait ObjectView: Send + Sync {
    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>>;
    fn slices(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>>;
    fn node(&self) -> Option<Arc<Node>>;
    fn service_keys(&self) -> Vec<ServiceKey>;
    /// The resources this source must have listed before the first full sync.
    fn resources(&self) -> &'static [Resource];
    /// The IPv4 prefixes of the cluster's ServiceCIDR objects (networking.k8s.io/v1,
    /// Kubernetes 1.33+), where the source has them. Not a resource the first sync waits for:
    /// an API server without them, or a source that lists none, leaves `--service-cidr`.
    fn service_cidrs(&self) -> Vec<Cidr4> {
        Vec::new()
    }
}

/// The trigger time of a slice, if it has a parseable one.
pub fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let value = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let ts: jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// Sends on the sync loop's channel; a closed channel means the agent is stopping.
pub type ChangeTx = std::sync::mpsc::Sender<Change>;
