//! The processor itself: for each resource, the pod association finds the pod in the
//! extension's cache and the pod's (and container's, namespace's, node's) attributes are added;
//! with a peer index, data points and spans naming a peer address get `k8s.peer.*`. What one
//! processor id shares across its pipelines (the association with its cgroup index, the
//! counters) is a [`PodEnricher`].

use std::sync::Arc;

use async_trait::async_trait;
use podscope_core::proto::tonic::common::v1::KeyValue;
use podscope_core::{
    Batch, BuildContext, Capabilities, Component, ConsumeError, Consumer, Processor, Signal,
};
use podscope_k8s::k8s_metadata::{string_kv, Found};
use podscope_k8s::K8sMetadata;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::association::{string_attr, PodAssociation};
use super::config::K8sAttributesConfig;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ProcessorLabels {
    processor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct UnresolvedLabels {
    processor: String,
    reason: &'static str,
}

/// Why a resource was not matched to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unresolved {
    /// No container, pod or cgroup attribute to go by.
    NoIdentity,
    /// Host mode, or the extension's first list is not done.
    NotSynced,
    /// Not in the cache.
    NotFound,
}

impl Unresolved {
    const ALL: [Unresolved; 3] = [
        Unresolved::NoIdentity,
        Unresolved::NotSynced,
        Unresolved::NotFound,
    ];

    fn reason(self) -> &'static str {
        match self {
            Unresolved::NoIdentity => "no_identity",
            Unresolved::NotSynced => "not_synced",
            Unresolved::NotFound => "not_found",
        }
    }
}

/// What every pipeline's instance of one `k8sattributes` id shares.
pub struct PodEnricher {
    metadata: Arc<K8sMetadata>,
    association: PodAssociation,
    /// `processor/<id>`, as logs and metrics name it.
    component: String,
    host_name: String,
    peer_attribute: String,
    enriched: Counter,
    /// One series per reason, in the order of [`Unresolved::ALL`]: the processor keeps each
    /// series' handle (a clone shares the value) and counts without a label lookup.
    unresolved: [Counter; 3],
}

impl PodEnricher {
    pub fn new(
        config: &K8sAttributesConfig,
        metadata: Arc<K8sMetadata>,
        ctx: &BuildContext,
    ) -> anyhow::Result<PodEnricher> {
        let association = PodAssociation::new(config).map_err(anyhow::Error::msg)?;
        let component = format!("processor/{}", ctx.id);
        let labels = ProcessorLabels {
            processor: component.clone(),
        };
        let enriched_family = Family::<ProcessorLabels, Counter>::default();
        let unresolved_family = Family::<UnresolvedLabels, Counter>::default();
        let unresolved = Unresolved::ALL.map(|u| {
            unresolved_family
                .get_or_create(&UnresolvedLabels {
                    processor: component.clone(),
                    reason: u.reason(),
                })
                .clone()
        });
        let enricher = PodEnricher {
            metadata,
            association,
            host_name: ctx.host_name.clone(),
            peer_attribute: config.peers.attribute.clone(),
            enriched: enriched_family.get_or_create(&labels).clone(),
            unresolved,
            component,
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
        Ok(enricher)
    }

    /// The extension whose pods this processor reads.
    pub fn metadata(&self) -> &Arc<K8sMetadata> {
        &self.metadata
    }

    /// The pod (and container) `attributes` belong to, without changing them.
    pub fn find(&self, attributes: &[KeyValue]) -> Option<Found> {
        self.association
            .associate(attributes, &self.metadata.pods())
            .0
    }

    /// Adds the attributes of the pod (and container) `attributes` belongs to.
    pub fn enrich(&self, attributes: &mut Vec<KeyValue>) {
        let store = self.metadata.pods();
        let (found, identity) = self.association.associate(attributes, &store);
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
                let why = if !identity.identified {
                    Unresolved::NoIdentity
                } else if !self.metadata.synced() {
                    Unresolved::NotSynced
                } else {
                    Unresolved::NotFound
                };
                self.unresolved[why as usize].inc();
            }
        }
        drop(store);
        if let Some(id) = identity.container_id {
            if !has(attributes, "container.id") {
                attributes.push(string_kv("container.id", &id));
            }
        }
        if !has(attributes, "host.name") {
            attributes.push(string_kv("host.name", &self.host_name));
        }
    }

    /// Adds the peer pod or Service named by the `peers.attribute` address, if known.
    pub fn enrich_peer(&self, attributes: &mut Vec<KeyValue>) {
        let Some(ip) = string_attr(attributes, &self.peer_attribute) else {
            return;
        };
        let Some(found) = self.metadata.peer(ip) else {
            return;
        };
        for attr in found.iter() {
            if !attributes.iter().any(|kv| *kv.key == *attr.key) {
                attributes.push(attr.to_key_value());
            }
        }
    }
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

pub struct K8sAttributesProcessor {
    pub(super) enricher: Arc<PodEnricher>,
    pub(super) signal: Signal,
    pub(super) next: Arc<dyn Consumer>,
}

impl K8sAttributesProcessor {
    /// What this processor id shares across pipelines: for tests and benchmarks that drive
    /// enrichment directly.
    pub fn enricher(&self) -> &Arc<PodEnricher> {
        &self.enricher
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
                    self.enricher.component,
                    self.signal,
                    batch.signal()
                ),
            ));
        }
        let peers = self.enricher.metadata.indexes_peers();
        if let Some(metrics) = batch.metrics_mut() {
            for rm in metrics {
                let resource = rm.resource.get_or_insert_with(Default::default);
                self.enricher.enrich(&mut resource.attributes);
                if peers {
                    for metric in rm.scope_metrics.iter_mut().flat_map(|s| &mut s.metrics) {
                        for_each_point_attributes(metric, |attrs| self.enricher.enrich_peer(attrs));
                    }
                }
            }
        } else if let Some(traces) = batch.traces_mut() {
            for rs in traces {
                let resource = rs.resource.get_or_insert_with(Default::default);
                self.enricher.enrich(&mut resource.attributes);
                if peers {
                    for span in rs.scope_spans.iter_mut().flat_map(|s| &mut s.spans) {
                        self.enricher.enrich_peer(&mut span.attributes);
                    }
                }
            }
        } else if let Some(logs) = batch.logs_mut() {
            // Like spans: the resource, and peers named in a record's attributes.
            for rl in logs {
                let resource = rl.resource.get_or_insert_with(Default::default);
                self.enricher.enrich(&mut resource.attributes);
                if peers {
                    for record in rl.scope_logs.iter_mut().flat_map(|s| &mut s.log_records) {
                        self.enricher.enrich_peer(&mut record.attributes);
                    }
                }
            }
        } else if let Some(profiles) = batch.profiles_mut() {
            // Profiles have no peer addresses: only their resources are enriched.
            for rp in &mut profiles.resource_profiles {
                let resource = rp.resource.get_or_insert_with(Default::default);
                self.enricher.enrich(&mut resource.attributes);
            }
        }
        self.next.consume(batch).await
    }
}

/// The extension starts before the pipelines and stops after them: nothing to do here.
#[async_trait]
impl Component for K8sAttributesProcessor {}

impl Processor for K8sAttributesProcessor {
    fn capabilities(&self) -> Capabilities {
        Capabilities { mutates_data: true }
    }
}
