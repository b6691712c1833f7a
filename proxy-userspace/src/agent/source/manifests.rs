//! The manifests source: Services, EndpointSlices and Nodes from a directory of ordinary
//! Kubernetes YAML (what `kubectl apply -f DIR` takes), for nodes without an API server.
//!
//! The directory is polled for changes (names, sizes and mtimes; a ConfigMap mount's symlink
//! swap counts). A load that fails is logged with file and line and counted; the last good
//! objects stay in force. Each good load is compared with the previous one and only the
//! Services that differ (or whose slices differ) are sent to the sync loop.
use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use super::{Change, ChangeTx, ObjectView, Resource, trigger_time};
use crate::{
    agent::metrics::Metrics,
    manifests::{self, Objects},
    model::ServiceKey,
};

/// How often the directory is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub struct ManifestView {
    objects: RwLock<Objects>,
    node_name: String,
}

impl ManifestView {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects> {
        self.objects.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectView for ManifestView {
    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.read().services.get(key).cloned().map(Arc::new)
    }
    fn slices(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>> {
        self.read()
            .slices_of(key)
            .into_iter()
            .cloned()
            .map(Arc::new)
            .collect()
    }
    fn node(&self) -> Option<Arc<Node>> {
        self.read()
            .nodes
            .get(&self.node_name)
            .cloned()
            .map(Arc::new)
    }
    fn service_keys(&self) -> Vec<ServiceKey> {
        self.read().services.keys().cloned().collect()
    }
    fn resources(&self) -> &'static [Resource] {
        &[Resource::Services, Resource::EndpointSlices, Resource::Node]
    }
}

/// The Services whose object or slices differ between `old` and `new`, with the newest
/// trigger time among their changed slices.
fn changes(old: &Objects, new: &Objects) -> Vec<Change> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&ServiceKey> =
        old.services.keys().chain(new.services.keys()).collect();
    for key in keys {
        if old.services.get(key) != new.services.get(key) {
            out.push(Change::Service(key.clone()));
        }
    }
    let mut slice_keys: std::collections::BTreeMap<ServiceKey, Option<std::time::SystemTime>> =
        Default::default();
    for (id, slice) in old.slices.iter().chain(new.slices.iter()) {
        if old.slices.get(id) != new.slices.get(id)
            && let Some(key) = ServiceKey::of_slice(slice)
        {
            let t = slice_keys.entry(key).or_default();
            if new.slices.get(id) == Some(slice) {
                *t = (*t).max(trigger_time(slice));
            }
        }
    }
    for (service, trigger) in slice_keys {
        out.push(Change::Slices { service, trigger });
    }
    if old.nodes != new.nodes {
        out.push(Change::Node);
    }
    out
}

/// Loads `dir` once (an error is logged and the view starts empty, listed only when a load
/// succeeds), then polls it on the current tokio runtime.
pub fn start(
    dir: PathBuf,
    node_name: &str,
    tx: ChangeTx,
    metrics: Arc<Metrics>,
) -> Arc<ManifestView> {
    let view = Arc::new(ManifestView {
        objects: RwLock::new(Objects::default()),
        node_name: node_name.to_owned(),
    });
    let v = view.clone();
    tokio::spawn(async move {
        let mut seen = None;
        let mut listed = false;
        let mut last_error = String::new();
        loop {
            let print = manifests::fingerprint(&dir).ok();
            if print.is_none() || print != seen {
                seen = print;
                let loaded = {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || manifests::load_dir(&dir)).await
                };
                match loaded {
                    Ok(Ok(new)) => {
                        last_error.clear();
                        let changed = {
                            let mut objects = v.objects.write().unwrap_or_else(|p| p.into_inner());
                            let changed = changes(&objects, &new);
                            *objects = new;
                            changed
                        };
                        tracing::info!(dir = %dir.display(), changes = changed.len(), "manifests loaded");
                        for c in changed {
                            let _ = tx.send(c);
                        }
                        if !listed {
                            listed = true;
                            for r in [Resource::Services, Resource::EndpointSlices, Resource::Node]
                            {
                                let _ = tx.send(Change::Listed(r));
                            }
                        }
                    }
                    Ok(Err(error)) => {
                        metrics.manifest_errors.inc();
                        // Once per distinct error: a missing directory is re-checked each poll.
                        if error.to_string() != last_error {
                            last_error = error.to_string();
                            tracing::error!(%error, "manifests not loaded; the last good state stays in force");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "manifest loader panicked"),
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    });
    view
}
