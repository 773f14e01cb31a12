//! Components, their factories and the registry table's row types.
//!
//! A component is a **config** (serde, validated), a **factory** row (type name, description,
//! signals, a `create` function that parses and validates the config) and a **runtime** built
//! from the validated config. The config struct itself is the builder: `create` returns it boxed
//! as a [`ReceiverBuilder`] / [`ProcessorBuilder`] / [`ExporterBuilder`], the config loader keeps
//! it, and the service calls `build` once the pipeline graph knows where the component's output
//! goes. Builders are `Any` so that tests can look at the settings they hold.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::batch::Signal;
use crate::config::{parse_component_config, ComponentConfig, FieldError};
use crate::consumer::Consumer;
use crate::health::Readiness;
use crate::telemetry::AgentTelemetry;

/// Receiver, processor, exporter or extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    Receiver,
    Processor,
    Exporter,
    Extension,
}

impl ComponentKind {
    /// The config section that holds components of this kind (`receivers`, …).
    pub fn section(self) -> &'static str {
        match self {
            ComponentKind::Receiver => "receivers",
            ComponentKind::Processor => "processors",
            ComponentKind::Exporter => "exporters",
            ComponentKind::Extension => "extensions",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Receiver => "receiver",
            ComponentKind::Processor => "processor",
            ComponentKind::Exporter => "exporter",
            ComponentKind::Extension => "extension",
        }
    }
}

/// A component id as written in config: `type[/name]`, e.g. `otlp`, `otlp/jaeger`, `batch/2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentId {
    type_name: String,
    name: Option<String>,
}

impl ComponentId {
    pub fn new(type_name: impl Into<String>, name: Option<String>) -> Self {
        ComponentId {
            type_name: type_name.into(),
            name,
        }
    }

    /// Parses `type[/name]`. The type is `[a-z0-9_]+` starting with a letter; the name may be any
    /// non-empty text without `/` or whitespace.
    pub fn parse(id: &str) -> Result<Self, String> {
        let (type_name, name) = match id.split_once('/') {
            Some((t, n)) => (t, Some(n)),
            None => (id, None),
        };
        let type_ok = type_name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
            && type_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !type_ok {
            return Err(format!(
                "invalid component id {id:?}: the type must be lowercase letters, digits and '_', starting with a letter"
            ));
        }
        if let Some(n) = name {
            if n.is_empty() || n.contains('/') || n.chars().any(char::is_whitespace) {
                return Err(format!(
                    "invalid component id {id:?}: the name after '/' must be non-empty, without '/' or spaces"
                ));
            }
        }
        Ok(ComponentId::new(type_name, name.map(str::to_string)))
    }

    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{}/{}", self.type_name, n),
            None => f.write_str(&self.type_name),
        }
    }
}

/// What a component gets from the service when it is built.
#[derive(Clone)]
pub struct BuildContext {
    pub id: ComponentId,
    /// Set for processors, which are built once per pipeline (`metrics`, `traces/2`, …).
    pub pipeline: Option<String>,
    /// The machine's host name (`host.name`).
    pub host_name: String,
    pub telemetry: AgentTelemetry,
    pub readiness: Readiness,
    /// State one component id shares across the pipelines it is built for (a processor's
    /// counters in both the metrics and traces pipelines).
    pub shared: SharedState,
    /// The agent's extensions, for the components that use them (empty when extensions
    /// themselves are built).
    pub extensions: Extensions,
}

/// One agent's per-component shared state, keyed by component id.
#[derive(Clone, Default)]
pub struct SharedState {
    inner: Arc<
        std::sync::Mutex<
            std::collections::HashMap<ComponentId, Arc<dyn std::any::Any + Send + Sync>>,
        >,
    >,
}

impl SharedState {
    /// The state of `id`, made by `make` the first time. `None` if another type was stored
    /// under `id` (two component types cannot share an id, so this is a bug).
    pub fn get_or_insert<T: Send + Sync + 'static>(
        &self,
        id: &ComponentId,
        make: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<Arc<T>> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(id) {
            return existing
                .clone()
                .downcast::<T>()
                .map_err(|_| anyhow::anyhow!("{id}: shared state of another type"));
        }
        let state = Arc::new(make()?);
        map.insert(id.clone(), state.clone());
        Ok(state)
    }
}

/// Lifecycle shared by every component. `shutdown` must be safe to call without `start` and must
/// flush what the component holds (a batch in progress, a queue) before returning.
#[async_trait]
pub trait Component: Send + Sync {
    async fn start(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A receiver produces batches into the consumers it was built with.
pub trait Receiver: Component {}

/// What a processor does to data, so that the service and fan-out know what to expect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The processor changes batches it receives (it copies shared data before writing).
    pub mutates_data: bool,
}

/// A processor is a consumer that forwards (possibly changed, merged or filtered) batches to the
/// next consumer it was built with.
pub trait Processor: Component + Consumer {
    fn capabilities(&self) -> Capabilities;

    /// A check the pipeline makes before its entry queue takes a receiver's batch (see
    /// [`crate::admission`]); most processors have none.
    fn admission(&self) -> Option<Arc<dyn crate::admission::Admission>> {
        None
    }
}

/// An exporter is the last consumer of a pipeline.
pub trait Exporter: Component + Consumer {}

/// An extension holds what several components share and no pipeline carries (a Kubernetes
/// client with its watches and caches): the components that use it look it up by id in
/// [`BuildContext::extensions`] and downcast it to its type. Extensions start before every
/// pipeline and stop after them.
pub trait Extension: Component + std::any::Any {}

/// The agent's extensions by id, and which extensions each component uses (named in its
/// settings, or made for it, see [`ProcessorBuilder::implicit_extension`]).
#[derive(Clone, Default)]
pub struct Extensions {
    by_id: BTreeMap<ComponentId, Arc<dyn Extension>>,
    used_by: BTreeMap<(ComponentKind, ComponentId), Vec<ComponentId>>,
}

impl Extensions {
    pub fn insert(&mut self, id: ComponentId, extension: Arc<dyn Extension>) {
        self.by_id.insert(id, extension);
    }

    /// Records that component `id` of `kind` uses extension `extension`.
    pub fn add_user(&mut self, kind: ComponentKind, id: ComponentId, extension: ComponentId) {
        let uses = self.used_by.entry((kind, id)).or_default();
        if !uses.contains(&extension) {
            uses.push(extension);
        }
    }

    /// Extension `id`, as the type `T` its user expects.
    pub fn get<T: Extension>(&self, id: &ComponentId) -> anyhow::Result<Arc<T>> {
        let extension = self
            .by_id
            .get(id)
            .ok_or_else(|| anyhow::anyhow!("extension {id} is not running in this agent"))?;
        let any: Arc<dyn std::any::Any + Send + Sync> = extension.clone();
        any.downcast::<T>()
            .map_err(|_| anyhow::anyhow!("extension {id} is not a {}", short_type_name::<T>()))
    }

    /// The extension of type `T` that component `id` of `kind` uses.
    pub fn used_by<T: Extension>(
        &self,
        kind: ComponentKind,
        id: &ComponentId,
    ) -> anyhow::Result<Arc<T>> {
        let uses = self
            .used_by
            .get(&(kind, id.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        uses.iter()
            .find_map(|used| self.get::<T>(used).ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} {id} uses no {} extension",
                    kind.as_str(),
                    short_type_name::<T>()
                )
            })
    }
}

/// `K8sMetadata` for `podscope_k8s::K8sMetadata`, for messages.
fn short_type_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit("::").next().unwrap_or(name)
}

/// Where a receiver sends each signal it produces: the pipelines that list it. `None` for a
/// signal no pipeline takes from this receiver.
#[derive(Clone, Default)]
pub struct ReceiverConsumers {
    pub metrics: Option<Arc<dyn Consumer>>,
    pub traces: Option<Arc<dyn Consumer>>,
    pub profiles: Option<Arc<dyn Consumer>>,
    pub logs: Option<Arc<dyn Consumer>>,
}

impl ReceiverConsumers {
    pub fn get(&self, signal: Signal) -> Option<&Arc<dyn Consumer>> {
        match signal {
            Signal::Metrics => self.metrics.as_ref(),
            Signal::Traces => self.traces.as_ref(),
            Signal::Profiles => self.profiles.as_ref(),
            Signal::Logs => self.logs.as_ref(),
        }
    }
}

/// A setting that names another component (the eBPF receiver's `cgroup_filter.pods.processor`,
/// a processor's `extension`): the config loader checks that the component is defined and runs
/// (is in a pipeline, or for an extension in `service.extensions`), and the service records a
/// named extension as used by the component that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentReference {
    /// Key path within the referring component's settings.
    pub field: String,
    pub kind: ComponentKind,
    pub id: ComponentId,
}

impl ComponentReference {
    /// The setting `field` names the extension `id`.
    pub fn extension(field: &str, id: ComponentId) -> Self {
        ComponentReference {
            field: field.to_string(),
            kind: ComponentKind::Extension,
            id,
        }
    }

    /// The setting `field` names the processor `id`.
    pub fn processor(field: &str, id: ComponentId) -> Self {
        ComponentReference {
            field: field.to_string(),
            kind: ComponentKind::Processor,
            id,
        }
    }

    /// The optional setting `field` (`value` as written) as a reference to an extension: none
    /// when unset or not a valid id, which the component's `validate` reports instead.
    pub fn extension_setting(field: &str, value: Option<&str>) -> Option<Self> {
        let id = ComponentId::parse(value?).ok()?;
        Some(Self::extension(field, id))
    }
}

pub trait ReceiverBuilder: Send + std::any::Any {
    fn build(
        self: Box<Self>,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Box<dyn Receiver>>;

    /// Other components this one's settings name.
    fn references(&self) -> Vec<ComponentReference> {
        Vec::new()
    }
}

/// Processors are built once per pipeline that lists them, so `build` may be called several
/// times.
pub trait ProcessorBuilder: Send + std::any::Any {
    fn build(
        &self,
        ctx: BuildContext,
        signal: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>>;

    /// Other components this one's settings name.
    fn references(&self) -> Vec<ComponentReference> {
        Vec::new()
    }

    /// An extension made for this processor from its own settings, when it names none (a
    /// `k8sattributes` processor without `extension:` gets its own `k8s_metadata`): its id,
    /// chosen from the processor's id `own`, and its builder. The service runs it like any
    /// extension and records this processor as its user.
    fn implicit_extension(
        &self,
        own: &ComponentId,
    ) -> Option<(ComponentId, Box<dyn ExtensionBuilder>)> {
        let _ = own;
        None
    }
}

pub trait ExporterBuilder: Send + std::any::Any {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>>;

    /// Other components this one's settings name (`sending_queue.storage`).
    fn references(&self) -> Vec<ComponentReference> {
        Vec::new()
    }
}

pub trait ExtensionBuilder: Send + std::any::Any {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Extension>>;

    /// Other extensions this one's settings name (the session extension's
    /// `trace_sessions.extension`): they must be built, so listed in `service.extensions`,
    /// before it.
    fn references(&self) -> Vec<ComponentReference> {
        Vec::new()
    }
}

/// Parses and validates a component's raw config section (`null` means all defaults).
pub type CreateFn<B> = fn(serde_json::Value) -> Result<Box<B>, Vec<FieldError>>;

/// One row of the registry table, for each kind.
pub struct Factory<B: ?Sized> {
    pub type_name: &'static str,
    /// One line for `podscope components`.
    pub description: &'static str,
    /// The signals it handles; none for extensions, which are in no pipeline.
    pub signals: &'static [Signal],
    pub create: CreateFn<B>,
}

pub type ReceiverFactory = Factory<dyn ReceiverBuilder>;
pub type ProcessorFactory = Factory<dyn ProcessorBuilder>;
pub type ExporterFactory = Factory<dyn ExporterBuilder>;
pub type ExtensionFactory = Factory<dyn ExtensionBuilder>;

/// `create` for a receiver whose config struct builds it.
pub fn create_receiver<C: ComponentConfig + ReceiverBuilder>(
    raw: serde_json::Value,
) -> Result<Box<dyn ReceiverBuilder>, Vec<FieldError>> {
    Ok(Box::new(parse_component_config::<C>(raw)?))
}

/// `create` for a processor whose config struct builds it.
pub fn create_processor<C: ComponentConfig + ProcessorBuilder>(
    raw: serde_json::Value,
) -> Result<Box<dyn ProcessorBuilder>, Vec<FieldError>> {
    Ok(Box::new(parse_component_config::<C>(raw)?))
}

/// `create` for an extension whose config struct builds it.
pub fn create_extension<C: ComponentConfig + ExtensionBuilder>(
    raw: serde_json::Value,
) -> Result<Box<dyn ExtensionBuilder>, Vec<FieldError>> {
    Ok(Box::new(parse_component_config::<C>(raw)?))
}

/// `create` for an exporter whose config struct builds it.
pub fn create_exporter<C: ComponentConfig + ExporterBuilder>(
    raw: serde_json::Value,
) -> Result<Box<dyn ExporterBuilder>, Vec<FieldError>> {
    Ok(Box::new(parse_component_config::<C>(raw)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_ids_parse_like_the_collector() {
        let id = ComponentId::parse("otlp/jaeger").unwrap();
        assert_eq!((id.type_name(), id.name()), ("otlp", Some("jaeger")));
        assert_eq!(id.to_string(), "otlp/jaeger");
        assert_eq!(ComponentId::parse("batch").unwrap().name(), None);
        for bad in [
            "", "Otlp", "otlp/", "otlp/a/b", "1otlp", "ot-lp", "otlp/a b",
        ] {
            assert!(
                ComponentId::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
