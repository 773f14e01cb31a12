//! The `k8s_metadata` extension: the one place podscope talks to the Kubernetes API server.
//! It owns the client, the watch on this node's pods (and on namespaces and the node when
//! `extract` rules read their labels, and on every pod and Service of the cluster for the peer
//! index), and the caches those watches fill, trimmed on arrival (see `metadata.rs`). Readers
//! look it up by id: the `k8sattributes` processor enriches data from it, the eBPF receiver's
//! `cgroup_filter.pods` selects pods with it.
//!
//! Without an API server it runs in host mode: empty caches, no errors. It must not know
//! pipelines or data; new watches (CRDs, sessions) belong here, beside the pod watch, each
//! filling its own cache through `watch.rs`.

mod config;
mod metadata;
mod peers;
mod probes;
mod programs;
mod sessions;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::runtime::watcher::Event;
use podscope_core::component::create_extension;
use podscope_core::{BuildContext, Component, Extension, ExtensionBuilder, ExtensionFactory};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

pub use config::{
    AuthType, ExtractConfig, FieldExtract, FieldSource, FilterConfig, K8sMetadataConfig,
    LabelFilter, LabelOp, PeersConfig, DEFAULT_POD_DELETE_DELAY, METADATA_KEYS,
};
pub use metadata::{
    cronjob_from_job, deployment_from_replicaset, split_image, string_kv, Attr, AttrValue,
    Extractor, PodMeta,
};
pub use peers::{
    PeerIndex, PEER_NAMESPACE, PEER_POD, PEER_SERVICE, PEER_WORKLOAD_KIND, PEER_WORKLOAD_NAME,
};
pub use probes::{NamespaceProbe, NamespaceProbes, NodeProbeStatus, PROBE_KIND, PROBE_PLURAL};
pub use programs::{ClusterProgram, ClusterPrograms, NodeProgramStatus};
pub use sessions::{
    TraceSessionObject, TraceSessions, MERGED_STATUS_MANAGER, TRACE_SESSION_KIND,
    TRACE_SESSION_PLURAL,
};
pub use store::{Found, PodStore};

use crate::pods::PodSelector;

pub const FACTORY: ExtensionFactory = ExtensionFactory {
    type_name: "k8s_metadata",
    description: "Kubernetes client, this node's pod watch and the trimmed pod cache that k8sattributes and the eBPF receiver's pod filter read",
    signals: &[],
    create: create_extension::<K8sMetadataConfig>,
};

impl ExtensionBuilder for K8sMetadataConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Extension>> {
        Ok(Arc::new(K8sMetadata::new(*self, &ctx)?))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PodLabels {
    extension: String,
    state: &'static str,
}

/// The running extension: the caches, and the watches filling them while started.
pub struct K8sMetadata {
    config: K8sMetadataConfig,
    /// `extension/<id>`, as `/readyz`, logs and metrics name it.
    component: String,
    readiness: podscope_core::health::Readiness,
    store: Arc<RwLock<PodStore>>,
    extractor: Arc<Extractor>,
    /// Set once the pod watch has listed every pod; host mode leaves it false.
    synced: Arc<AtomicBool>,
    watch_errors: Family<watch::WatchLabels, prometheus_client::metrics::counter::Counter>,
    /// Live pods, deleted pods kept for the delay.
    pods: [Gauge; 2],
    /// Cluster-wide pod and Service IPs (`peers.enabled`).
    peers: Arc<RwLock<PeerIndex>>,
    /// Bumped on every pod change, for components that select pods.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    watch: tokio::sync::Mutex<Option<(CancellationToken, Vec<tokio::task::JoinHandle<()>>)>>,
    /// The client, node and watch context while watching a cluster, for watches started on
    /// request (users' programs).
    cluster: tokio::sync::Mutex<Option<(kube::Client, String, watch::WatchContext)>>,
    /// The `EbpfProgram` watch, once a component asked for it.
    programs: tokio::sync::Mutex<Option<ClusterPrograms>>,
    /// The `Probe` watch, once a component asked for it.
    probes: tokio::sync::Mutex<Option<NamespaceProbes>>,
    /// The `TraceSession` watch, once a component asked for it.
    trace_sessions: tokio::sync::Mutex<Option<TraceSessions>>,
}

impl K8sMetadata {
    /// The extension with empty caches; nothing is watched before [`Component::start`].
    pub fn new(config: K8sMetadataConfig, ctx: &BuildContext) -> anyhow::Result<K8sMetadata> {
        let extractor = Extractor::new(&config.extract).map_err(anyhow::Error::msg)?;
        let component = format!("extension/{}", ctx.id);
        let pods_family = Family::<PodLabels, Gauge>::default();
        let pods_in_state = |state| {
            pods_family
                .get_or_create(&PodLabels {
                    extension: component.clone(),
                    state,
                })
                .clone()
        };
        let metadata = K8sMetadata {
            component: component.clone(),
            readiness: ctx.readiness.clone(),
            store: Arc::new(RwLock::new(PodStore::new(config.pod_delete_delay))),
            extractor: Arc::new(extractor),
            synced: Arc::default(),
            watch_errors: Family::default(),
            pods: [pods_in_state("live"), pods_in_state("deleted")],
            peers: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            watch: tokio::sync::Mutex::new(None),
            cluster: tokio::sync::Mutex::new(None),
            programs: tokio::sync::Mutex::new(None),
            probes: tokio::sync::Mutex::new(None),
            trace_sessions: tokio::sync::Mutex::new(None),
            config,
        };
        let t = &ctx.telemetry;
        t.register(
            "k8s_metadata_watch_errors",
            "Failed Kubernetes list/watch attempts of a k8s_metadata extension (each is retried with backoff)",
            metadata.watch_errors.clone(),
        );
        t.register(
            "k8s_metadata_pods",
            "Pods in a k8s_metadata extension's cache: live, and deleted but kept for pod_delete_delay",
            pods_family,
        );
        Ok(metadata)
    }

    /// The node's pods, for lookups (by container id, pod UID, IP, name). Hold the guard only
    /// for the lookup: the watch waits for it.
    pub fn pods(&self) -> RwLockReadGuard<'_, PodStore> {
        // A panic while holding the lock leaves the maps consistent (each update is one insert
        // or remove), so a poisoned lock is still usable.
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the pod watch has listed every pod (false in host mode, and until the first
    /// list is done).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether the cluster-wide peer index is kept (`peers.enabled`).
    pub fn indexes_peers(&self) -> bool {
        self.config.peers.enabled
    }

    /// The pod or Service holding `ip` anywhere in the cluster, as `k8s.peer.*` attributes.
    pub fn peer(&self, ip: &str) -> Option<Arc<[Attr]>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(ip)
            .cloned()
    }

    /// Whether the live pod with this UID is one `selector` selects. Unknown and deleted pods
    /// are selected by nothing.
    pub fn pod_selected(&self, pod_uid: &str, selector: &PodSelector) -> bool {
        self.pods()
            .live_pod(pod_uid)
            .is_some_and(|pod| selector.selects(pod))
    }

    /// Changes whenever pods come, go or change (the value itself means nothing).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The cluster's `EbpfProgram` objects, watched from the first call on (until the
    /// extension stops); `None` in host mode or before the extension started.
    pub async fn cluster_programs(&self) -> Option<ClusterPrograms> {
        let mut programs = self.programs.lock().await;
        if let Some(existing) = programs.as_ref() {
            return Some(existing.clone());
        }
        let (client, node, ctx) = self.cluster.lock().await.clone()?;
        let mut watch = self.watch.lock().await;
        let (cancel, tasks) = watch.as_mut()?;
        let (started, new_tasks) = ClusterPrograms::start(client, node, ctx, cancel.clone());
        tasks.extend(new_tasks);
        tracing::info!(extension = %self.component, "watching EbpfProgram objects");
        *programs = Some(started.clone());
        Some(started)
    }

    /// The cluster's `Probe` objects (every namespace), watched from the first call on (until
    /// the extension stops); `None` in host mode or before the extension started.
    pub async fn namespace_probes(&self) -> Option<NamespaceProbes> {
        let mut probes = self.probes.lock().await;
        if let Some(existing) = probes.as_ref() {
            return Some(existing.clone());
        }
        let (client, node, ctx) = self.cluster.lock().await.clone()?;
        let mut watch = self.watch.lock().await;
        let (cancel, tasks) = watch.as_mut()?;
        let (started, task) = NamespaceProbes::start(client, node, ctx, cancel.clone());
        tasks.push(task);
        tracing::info!(extension = %self.component, "watching Probe objects");
        *probes = Some(started.clone());
        Some(started)
    }

    /// The cluster's `TraceSession` objects (every namespace), watched from the first call on
    /// (until the extension stops); `None` in host mode or before the extension started.
    pub async fn trace_sessions(&self) -> Option<TraceSessions> {
        let mut sessions = self.trace_sessions.lock().await;
        if let Some(existing) = sessions.as_ref() {
            return Some(existing.clone());
        }
        let (client, node, ctx) = self.cluster.lock().await.clone()?;
        let mut watch = self.watch.lock().await;
        let (cancel, tasks) = watch.as_mut()?;
        let (started, task) = TraceSessions::start(client, node, ctx, cancel.clone());
        tasks.push(task);
        tracing::info!(extension = %self.component, "watching TraceSession objects");
        *sessions = Some(started.clone());
        Some(started)
    }

    /// Applies pod watch events as the watch would (tests and benchmarks fill the cache this
    /// way); a complete list marks the cache synced.
    pub fn apply_pod_events(&self, events: impl IntoIterator<Item = Event<Pod>>) {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        for event in events {
            if watch::apply_pod_event(&mut store, &self.extractor, event, Instant::now()) {
                self.synced.store(true, Ordering::SeqCst);
            }
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies namespace watch events as the watch would (tests fill the cache this way).
    pub fn apply_namespace_events(&self, events: impl IntoIterator<Item = Event<Namespace>>) {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        for event in events {
            watch::apply_namespace_event(&mut store, &self.extractor, event);
        }
    }

    /// Applies cluster-wide pod and Service events to the peer index (tests fill it this way).
    pub fn apply_peer_events(
        &self,
        pods: impl IntoIterator<Item = Event<Pod>>,
        services: impl IntoIterator<Item = Event<Service>>,
    ) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        for event in pods {
            peers.apply_pod_event(event);
        }
        for event in services {
            peers.apply_service_event(event);
        }
    }
}

#[async_trait]
impl Component for K8sMetadata {
    async fn start(&self) -> anyhow::Result<()> {
        match watch::connect(&self.config).await? {
            watch::Source::Host { why } => {
                tracing::info!(
                    extension = %self.component,
                    "no Kubernetes API server ({why}): host mode, no pod metadata"
                );
            }
            watch::Source::Cluster { client, node } => {
                tracing::info!(extension = %self.component, node = %node, "watching this node's pods");
                let cancel = CancellationToken::new();
                let ctx = watch::WatchContext {
                    store: self.store.clone(),
                    extractor: self.extractor.clone(),
                    readiness: self.readiness.clone(),
                    component: self.component.clone(),
                    watch_errors: self.watch_errors.clone(),
                    pods: self.pods.clone(),
                    synced: self.synced.clone(),
                    changes: self.changes.clone(),
                    peers: self.peers.clone(),
                };
                let tasks = watch::spawn_watches(
                    client.clone(),
                    node.clone(),
                    &self.config,
                    ctx.clone(),
                    cancel.clone(),
                );
                *self.cluster.lock().await = Some((client, node, ctx));
                *self.watch.lock().await = Some((cancel, tasks));
            }
        }
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        self.cluster.lock().await.take();
        self.programs.lock().await.take();
        self.probes.lock().await.take();
        self.trace_sessions.lock().await.take();
        if let Some((cancel, tasks)) = self.watch.lock().await.take() {
            cancel.cancel();
            for task in tasks {
                let _ = task.await;
            }
        }
        self.readiness.set_ready(&self.component);
        self.readiness
            .set_ready(&watch::peers_readiness_key(&self.component));
        Ok(())
    }
}

impl Extension for K8sMetadata {}
