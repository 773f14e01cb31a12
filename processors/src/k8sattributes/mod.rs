//! The `k8sattributes` processor: adds the pod, container and workload a resource belongs to,
//! as OpenTelemetry resource attributes (`k8s.pod.name`, `k8s.deployment.name`, …).
//!
//! A resource is matched to a pod by the `pod_association` rules, in order: `container.id`, the
//! cgroup path or id the eBPF receiver records (`podscope.cgroup.path`, `podscope.cgroup.id`),
//! `process.pid` (through `/proc/<pid>/cgroup`), `k8s.pod.uid`, `k8s.pod.ip`, or pod name with
//! namespace. Pod metadata comes from a watch on this node's pods (see `watch.rs`), shared by
//! every pipeline the processor is in. Without an API server the processor runs in host mode and
//! still adds `container.id` and `host.name`.
//!
//! Attributes already on a resource are left as they are.

mod config;
mod metadata;
mod peers;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use podscope_core::cgroup::{self, CgroupIndex};
use podscope_core::component::create_processor;
use podscope_core::proto::tonic::common::v1::{any_value, KeyValue};
use podscope_core::{
    Batch, BuildContext, Capabilities, Component, ConsumeError, Consumer, Processor,
    ProcessorBuilder, ProcessorFactory, Signal,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

pub use config::{
    Association, AuthType, ExtractConfig, FieldExtract, FieldSource, FilterConfig,
    K8sAttributesConfig, METADATA_KEYS,
};
pub use metadata::{cronjob_from_job, deployment_from_replicaset, split_image, Extractor, PodMeta};
pub use peers::{
    PeerIndex, PEER_NAMESPACE, PEER_POD, PEER_SERVICE, PEER_WORKLOAD_KIND, PEER_WORKLOAD_NAME,
};
pub use store::{Found, PodStore};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "k8sattributes",
    description: "Adds Kubernetes pod, container and workload attributes (cgroup → container → pod → workload)",
    signals: &[Signal::Metrics, Signal::Traces],
    create: create_processor::<K8sAttributesConfig>,
};

impl ProcessorBuilder for K8sAttributesConfig {
    fn build(
        &self,
        ctx: BuildContext,
        signal: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>> {
        let shared = ctx
            .shared
            .get_or_insert(&ctx.id, || Shared::new(self.clone(), &ctx))?;
        ctx.shared.publish_pod_directory(&ctx.id, shared.clone());
        Ok(Arc::new(K8sAttributesProcessor {
            shared,
            signal,
            next,
        }))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ProcessorLabels {
    processor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PodLabels {
    processor: String,
    state: &'static str,
}

/// Why a resource was not matched to a pod: nothing to go by; host mode or the first list not
/// done; not in the cache.
const UNRESOLVED_REASONS: [&str; 3] = ["no_identity", "not_synced", "not_found"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct UnresolvedLabels {
    processor: String,
    reason: &'static str,
}

/// What every pipeline's instance of one `k8sattributes` id shares: the store, the watch, the
/// cgroup index.
pub struct Shared {
    config: K8sAttributesConfig,
    rules: Vec<Association>,
    component: String,
    host_name: String,
    readiness: podscope_core::health::Readiness,
    store: Arc<RwLock<PodStore>>,
    extractor: Arc<Extractor>,
    cgroups: Mutex<CgroupCache>,
    proc_root: PathBuf,
    /// Set once the pod watch has listed every pod; host mode leaves it false.
    synced: Arc<std::sync::atomic::AtomicBool>,
    enriched: Counter,
    /// Unresolved resources by reason, in the order of [`UNRESOLVED_REASONS`].
    unresolved: [Counter; 3],
    watch_errors: Family<watch::WatchLabels, Counter>,
    /// Live pods, deleted pods kept for the delay.
    pods: [Gauge; 2],
    /// Cluster-wide pod and Service IPs (`peers.enabled`).
    peers: Arc<RwLock<peers::PeerIndex>>,
    /// Bumped on every pod change, for components that select pods (see `PodDirectory`).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Pipelines started; the watch runs from the first start to the last shutdown.
    started: AtomicUsize,
    watch: tokio::sync::Mutex<Option<(CancellationToken, Vec<tokio::task::JoinHandle<()>>)>>,
}

/// The cgroup id → path index, walked again on an interval and on a miss (at most once per
/// `min_interval`, so unknown ids cannot make it walk for every batch).
struct CgroupCache {
    index: Option<CgroupIndex>,
    refreshed: Option<Instant>,
    interval: Duration,
    min_interval: Duration,
}

impl CgroupCache {
    fn path(&mut self, id: u64) -> Option<String> {
        let index = self.index.as_mut()?;
        let now = Instant::now();
        let due = |min: Duration| {
            self.refreshed
                .is_none_or(|at| now.duration_since(at) >= min)
        };
        if due(self.interval) || (index.path(id).is_none() && due(self.min_interval)) {
            index.refresh();
            self.refreshed = Some(now);
        }
        index.path(id).map(str::to_string)
    }
}

impl Shared {
    fn new(config: K8sAttributesConfig, ctx: &BuildContext) -> anyhow::Result<Shared> {
        let rules = config
            .pod_association
            .iter()
            .map(|r| r.resolve().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let extractor = Extractor::new(&config).map_err(anyhow::Error::msg)?;
        let component = format!("processor/{}", ctx.id);
        // One series each, labelled with the processor; the processor keeps the series' handle
        // (a clone shares the value) and updates it without a label lookup.
        let labels = ProcessorLabels {
            processor: component.clone(),
        };
        let enriched_family = Family::<ProcessorLabels, Counter>::default();
        let unresolved_family = Family::<UnresolvedLabels, Counter>::default();
        let unresolved = UNRESOLVED_REASONS.map(|reason| {
            unresolved_family
                .get_or_create(&UnresolvedLabels {
                    processor: component.clone(),
                    reason,
                })
                .clone()
        });
        let pods_family = Family::<PodLabels, Gauge>::default();
        let pods_in_state = |state| {
            pods_family
                .get_or_create(&PodLabels {
                    processor: component.clone(),
                    state,
                })
                .clone()
        };
        let shared = Shared {
            rules,
            component: component.clone(),
            host_name: ctx.host_name.clone(),
            readiness: ctx.readiness.clone(),
            store: Arc::new(RwLock::new(PodStore::new(config.pod_delete_delay))),
            extractor: Arc::new(extractor),
            cgroups: Mutex::new(CgroupCache {
                index: cgroup::cgroup2_mount().map(CgroupIndex::new),
                refreshed: None,
                interval: config.cgroup_refresh_interval,
                min_interval: config.cgroup_refresh_min_interval,
            }),
            proc_root: PathBuf::from("/proc"),
            synced: Arc::default(),
            enriched: enriched_family.get_or_create(&labels).clone(),
            unresolved,
            watch_errors: Family::default(),
            pods: [pods_in_state("live"), pods_in_state("deleted")],
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            peers: Arc::default(),
            started: AtomicUsize::new(0),
            watch: tokio::sync::Mutex::new(None),
            config,
        };
        let t = &ctx.telemetry;
        t.register(
            "k8sattributes_enriched_resources",
            "Resources the k8sattributes processor matched to a pod",
            enriched_family,
        );
        t.register(
            "k8sattributes_unresolved_resources",
            "Resources the k8sattributes processor could not match to a pod, by reason (no_identity: no container, pod or cgroup attribute to go by; not_synced: host mode, or pod metadata not listed yet; not_found: not in the pod cache)",
            unresolved_family,
        );
        t.register(
            "k8sattributes_watch_errors",
            "Failed Kubernetes list/watch attempts (each is retried with backoff)",
            shared.watch_errors.clone(),
        );
        t.register(
            "k8sattributes_pods",
            "Pods in the k8sattributes cache: live, and deleted but kept for pod_delete_delay",
            pods_family,
        );
        Ok(shared)
    }

    async fn start(&self) -> anyhow::Result<()> {
        if self.started.fetch_add(1, Ordering::SeqCst) > 0 {
            return Ok(());
        }
        match watch::connect(&self.config).await {
            Err(e) => {
                self.started.fetch_sub(1, Ordering::SeqCst);
                Err(e.context(self.component.clone()))
            }
            Ok(watch::Source::Host { why }) => {
                tracing::info!(
                    processor = %self.component,
                    "no Kubernetes API server ({why}): host mode, adding container.id and host.name only"
                );
                Ok(())
            }
            Ok(watch::Source::Cluster { client, node }) => {
                tracing::info!(processor = %self.component, node = %node, "watching this node's pods");
                let cancel = CancellationToken::new();
                let tasks = watch::spawn_watches(
                    client,
                    node,
                    &self.config,
                    watch::WatchContext {
                        store: self.store.clone(),
                        extractor: self.extractor.clone(),
                        readiness: self.readiness.clone(),
                        component: self.component.clone(),
                        watch_errors: self.watch_errors.clone(),
                        pods: self.pods.clone(),
                        synced: self.synced.clone(),
                        changes: self.changes.clone(),
                        peers: self.peers.clone(),
                    },
                    cancel.clone(),
                );
                *self.watch.lock().await = Some((cancel, tasks));
                Ok(())
            }
        }
    }

    async fn shutdown(&self) {
        // Saturating: shutdown without start must be harmless.
        let previous = self
            .started
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if previous != 1 {
            return;
        }
        if let Some((cancel, tasks)) = self.watch.lock().await.take() {
            cancel.cancel();
            for task in tasks {
                let _ = task.await;
            }
        }
        self.readiness.set_ready(&self.component);
    }

    /// Applies pod watch events as the watch would (tests and benchmarks fill the cache this
    /// way); a complete list marks the cache synced.
    pub fn apply_pod_events(
        &self,
        events: impl IntoIterator<Item = kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Pod>>,
    ) {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        for event in events {
            if watch::apply_pod_event(&mut store, &self.extractor, event, Instant::now()) {
                self.synced.store(true, Ordering::SeqCst);
            }
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Pods in the cache.
    pub fn cached_pods(&self) -> usize {
        self.store.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds the peer pod or Service named by the `peers.attribute` address, if known.
    pub fn enrich_peer(&self, attributes: &mut Vec<KeyValue>) {
        let Some(ip) = string_attr(attributes, &self.config.peers.attribute) else {
            return;
        };
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let Some(found) = peers.lookup(ip) else {
            return;
        };
        for attr in found.iter() {
            if !attributes.iter().any(|kv| *kv.key == *attr.key) {
                attributes.push(attr.to_key_value());
            }
        }
    }

    /// Applies cluster-wide pod and Service events to the peer index (tests fill it this way).
    pub fn apply_peer_events(
        &self,
        pods: impl IntoIterator<Item = kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Pod>>,
        services: impl IntoIterator<
            Item = kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Service>,
        >,
    ) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        for event in pods {
            peers.apply_pod_event(event);
        }
        for event in services {
            peers.apply_service_event(event);
        }
    }

    /// The pod (and container) `attributes` belong to, without changing them.
    pub fn find(&self, attributes: &[KeyValue]) -> Option<Found> {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        self.associate(attributes, &store).0
    }

    /// Adds the attributes of the pod (and container) `attributes` belongs to.
    pub fn enrich(&self, attributes: &mut Vec<KeyValue>) {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        let (found, identity) = self.associate(attributes, &store);
        let has = |attrs: &[KeyValue], key: &str| attrs.iter().any(|kv| kv.key == key);
        match &found {
            Some(found) => {
                self.enriched.inc();
                let [namespace, node] = store.context_attributes(&found.pod);
                for attr in found
                    .attributes()
                    .chain(namespace.into_iter().flat_map(|a| a.iter()))
                    .chain(node.into_iter().flat_map(|a| a.iter()))
                {
                    if !has(attributes, &attr.key) {
                        attributes.push(attr.to_key_value());
                    }
                }
            }
            None => {
                // Indexes into UNRESOLVED_REASONS.
                let reason = if !identity.identified {
                    0
                } else if !self.synced.load(Ordering::Relaxed) {
                    1
                } else {
                    2
                };
                self.unresolved[reason].inc();
            }
        }
        drop(store);
        if let Some(id) = identity.container_id {
            if !has(attributes, "container.id") {
                attributes.push(metadata::string_kv("container.id", &id));
            }
        }
        if !has(attributes, "host.name") {
            attributes.push(metadata::string_kv("host.name", &self.host_name));
        }
    }

    /// The pod (and container) the attributes name, and what was learnt on the way even when
    /// the pod is unknown.
    fn associate(&self, attributes: &[KeyValue], store: &PodStore) -> (Option<Found>, Identity) {
        let mut identity = Identity::default();
        for rule in &self.rules {
            let found = match rule {
                Association::ContainerId => {
                    string_attr(attributes, "container.id").and_then(|id| {
                        identity.identified = true;
                        store.by_container_id(id)
                    })
                }
                Association::CgroupPath => string_attr(attributes, "podscope.cgroup.path")
                    .and_then(|path| from_cgroup_path(path, store, &mut identity)),
                Association::CgroupId => {
                    int_attr(attributes, "podscope.cgroup.id").and_then(|id| {
                        let path = self
                            .cgroups
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .path(id as u64)?;
                        from_cgroup_path(&path, store, &mut identity)
                    })
                }
                Association::ProcessPid => int_attr(attributes, "process.pid").and_then(|pid| {
                    let pid = u32::try_from(pid).ok()?;
                    let path = cgroup::process_cgroup_path(&self.proc_root, pid)?;
                    from_cgroup_path(&path, store, &mut identity)
                }),
                Association::PodUid => string_attr(attributes, "k8s.pod.uid").and_then(|uid| {
                    identity.identified = true;
                    store.by_pod_uid(uid, None)
                }),
                Association::PodIp => string_attr(attributes, "k8s.pod.ip").and_then(|ip| {
                    identity.identified = true;
                    store.by_ip(ip)
                }),
                Association::PodNameAndNamespace => {
                    match (
                        string_attr(attributes, "k8s.namespace.name"),
                        string_attr(attributes, "k8s.pod.name"),
                    ) {
                        (Some(ns), Some(name)) => {
                            identity.identified = true;
                            store.by_name(ns, name)
                        }
                        _ => None,
                    }
                }
            };
            if found.is_some() {
                return (found, identity);
            }
        }
        (None, identity)
    }
}

/// What association learnt besides the pod.
#[derive(Debug, Default)]
struct Identity {
    /// Some attribute named a container, pod or cgroup.
    identified: bool,
    /// A container id read from a cgroup path: added as `container.id` when the data has none.
    container_id: Option<String>,
}

fn from_cgroup_path(path: &str, store: &PodStore, identity: &mut Identity) -> Option<Found> {
    let parsed = cgroup::parse_container_cgroup(path)?;
    identity.identified = true;
    if let Some(id) = &parsed.container_id {
        identity.container_id.get_or_insert_with(|| id.clone());
        if let Some(found) = store.by_container_id(id) {
            return Some(found);
        }
    }
    let uid = parsed.pod_uid.as_deref()?;
    store.by_pod_uid(uid, parsed.container_id.as_deref())
}

/// Calls `f` with the attributes of every data point of `metric`, whatever its type.
fn for_each_point_attributes(
    metric: &mut podscope_core::proto::tonic::metrics::v1::Metric,
    mut f: impl FnMut(&mut Vec<KeyValue>),
) {
    use podscope_core::proto::tonic::metrics::v1::metric::Data;
    match &mut metric.data {
        Some(Data::Gauge(g)) => g.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Some(Data::Sum(s)) => s.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Some(Data::Histogram(h)) => h.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        Some(Data::ExponentialHistogram(h)) => {
            h.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
        }
        Some(Data::Summary(s)) => s.data_points.iter_mut().for_each(|p| f(&mut p.attributes)),
        None => {}
    }
}

fn string_attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        }
    })
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            // Some SDKs send pids as strings.
            any_value::Value::StringValue(s) => s.parse().ok(),
            _ => None,
        }
    })
}

impl podscope_core::pods::PodDirectory for Shared {
    fn pod_matches(
        &self,
        pod_uid: &str,
        namespaces: &[String],
        labels: &[podscope_core::pods::LabelRequirement],
    ) -> bool {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        let Some(pod) = store.live_pod(pod_uid) else {
            return false;
        };
        (namespaces.is_empty() || namespaces.iter().any(|ns| **ns == *pod.namespace))
            && labels.iter().all(|r| r.matches(|k| pod.label(k)))
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

pub struct K8sAttributesProcessor {
    shared: Arc<Shared>,
    signal: Signal,
    next: Arc<dyn Consumer>,
}

impl K8sAttributesProcessor {
    /// The shared state: for tests and benchmarks that drive enrichment directly.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

#[async_trait]
impl Consumer for K8sAttributesProcessor {
    async fn consume(&self, mut batch: Batch) -> Result<(), ConsumeError> {
        if batch.signal() != self.signal {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                format!(
                    "{} handles {}, got {}",
                    self.shared.component,
                    self.signal,
                    batch.signal()
                ),
            ));
        }
        let peers = self.shared.config.peers.enabled;
        if let Some(metrics) = batch.metrics_mut() {
            for rm in metrics {
                let resource = rm.resource.get_or_insert_with(Default::default);
                self.shared.enrich(&mut resource.attributes);
                if peers {
                    for metric in rm.scope_metrics.iter_mut().flat_map(|s| &mut s.metrics) {
                        for_each_point_attributes(metric, |attrs| self.shared.enrich_peer(attrs));
                    }
                }
            }
        } else if let Some(traces) = batch.traces_mut() {
            for rs in traces {
                let resource = rs.resource.get_or_insert_with(Default::default);
                self.shared.enrich(&mut resource.attributes);
                if peers {
                    for span in rs.scope_spans.iter_mut().flat_map(|s| &mut s.spans) {
                        self.shared.enrich_peer(&mut span.attributes);
                    }
                }
            }
        }
        self.next.consume(batch).await
    }
}

#[async_trait]
impl Component for K8sAttributesProcessor {
    async fn start(&self) -> anyhow::Result<()> {
        self.shared.start().await
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        self.shared.shutdown().await;
        Ok(())
    }
}

impl Processor for K8sAttributesProcessor {
    fn capabilities(&self) -> Capabilities {
        Capabilities { mutates_data: true }
    }
}
