//! The `k8sattributes` processor: adds the pod, container and workload a resource belongs to,
//! as OpenTelemetry resource attributes (`k8s.pod.name`, `k8s.deployment.name`, …).
//!
//! Pods come from a `k8s_metadata` extension (`podscope_k8s`), the one `extension` names or one
//! the processor runs for itself from its own settings. One file per job:
//! - `config.rs`: the settings, and the extension settings a processor without `extension`
//!   carries;
//! - `association.rs`: which pod a resource belongs to, by the `pod_association` rules, in
//!   order: `container.id`, the cgroup path or id the eBPF receiver records
//!   (`podscope.cgroup.path`, `podscope.cgroup.id`), `process.pid` (through
//!   `/proc/<pid>/cgroup`), `k8s.pod.uid`, `k8s.pod.ip`, or pod name with namespace;
//! - `processor.rs`: adding the found pod's attributes (and peers') to batches.
//!
//! Without an API server the extension runs in host mode and the processor still adds
//! `container.id` and `host.name`. Attributes already on a resource are left as they are.

mod association;
mod config;
mod processor;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use podscope_core::component::create_processor;
use podscope_core::{
    BuildContext, ComponentId, ComponentKind, ComponentReference, Consumer, ExtensionBuilder,
    Processor, ProcessorBuilder, ProcessorFactory, Signal,
};
use podscope_k8s::K8sMetadata;

pub use config::{
    Association, AssociationFrom, AssociationRule, AssociationSource, K8sAttributesConfig,
    PeersConfig,
};
pub use processor::{K8sAttributesProcessor, PodEnricher};

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "k8sattributes",
    description: "Adds Kubernetes pod, container and workload attributes (cgroup → container → pod → workload)",
    signals: &[Signal::Metrics, Signal::Traces, Signal::Profiles, Signal::Logs],
    create: create_processor::<K8sAttributesConfig>,
};

impl ProcessorBuilder for K8sAttributesConfig {
    fn build(
        &self,
        ctx: BuildContext,
        signal: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>> {
        let metadata = ctx
            .extensions
            .used_by::<K8sMetadata>(ComponentKind::Processor, &ctx.id)?;
        let enricher = ctx
            .shared
            .get_or_insert(&ctx.id, || PodEnricher::new(self, metadata, &ctx))?;
        Ok(Arc::new(K8sAttributesProcessor {
            enricher,
            signal,
            next,
        }))
    }

    /// `extension` names the `k8s_metadata` extension whose pods it reads.
    fn references(&self) -> Vec<ComponentReference> {
        self.extension_id()
            .map(|id| ComponentReference::extension("extension", id))
            .into_iter()
            .collect()
    }

    /// Without `extension`, its own `k8s_metadata/<own id>` (`/` in the id becomes `.`), made
    /// from its settings: configs written before extensions keep working.
    fn implicit_extension(
        &self,
        own: &ComponentId,
    ) -> Option<(ComponentId, Box<dyn ExtensionBuilder>)> {
        if self.extension.is_some() {
            return None;
        }
        let id = ComponentId::new("k8s_metadata", Some(own.to_string().replace('/', ".")));
        Some((id, Box::new(self.own_extension())))
    }
}
