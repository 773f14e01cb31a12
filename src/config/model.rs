//! The validated shape of a podscope config file (the OpenTelemetry Collector's shape).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use podscope_core::config::QueueSettings;
use podscope_core::{
    ComponentId, ComponentKind, ExporterBuilder, ExtensionBuilder, ProcessorBuilder,
    ReceiverBuilder, Signal,
};

/// A whole config file, every part validated against the registry: each component's settings
/// already turned into the builder the service builds it with.
pub struct AgentConfig {
    /// Where it came from (a path, or `<embedded default>`), for messages.
    pub source: String,
    pub receivers: BTreeMap<ComponentId, Box<dyn ReceiverBuilder>>,
    pub processors: BTreeMap<ComponentId, Box<dyn ProcessorBuilder>>,
    pub exporters: BTreeMap<ComponentId, Box<dyn ExporterBuilder>>,
    /// The extensions that run: those `service.extensions` lists, and those processors made
    /// for themselves (see `ProcessorBuilder::implicit_extension`).
    pub extensions: BTreeMap<ComponentId, Box<dyn ExtensionBuilder>>,
    /// Which extensions each component uses: named in its settings, or made for it.
    pub extension_users: BTreeMap<(ComponentKind, ComponentId), Vec<ComponentId>>,
    pub service: ServiceConfig,
    /// Things worth a log line that do not stop the agent (a component no pipeline uses).
    pub warnings: Vec<String>,
}

impl AgentConfig {
    /// The validated settings of component `id` of `kind`, if it is defined with settings of
    /// type `T` (the component's config struct, which is its builder).
    pub fn settings<T: 'static>(&self, kind: ComponentKind, id: &str) -> Option<&T> {
        let id = ComponentId::parse(id).ok()?;
        let builder: &dyn Any = match kind {
            ComponentKind::Receiver => self.receivers.get(&id)?.as_ref(),
            ComponentKind::Processor => self.processors.get(&id)?.as_ref(),
            ComponentKind::Exporter => self.exporters.get(&id)?.as_ref(),
            ComponentKind::Extension => self.extensions.get(&id)?.as_ref(),
        };
        builder.downcast_ref()
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = |ids: Vec<&ComponentId>| ids.iter().map(ToString::to_string).collect::<Vec<_>>();
        f.debug_struct("AgentConfig")
            .field("source", &self.source)
            .field("receivers", &ids(self.receivers.keys().collect()))
            .field("processors", &ids(self.processors.keys().collect()))
            .field("exporters", &ids(self.exporters.keys().collect()))
            .field("extensions", &ids(self.extensions.keys().collect()))
            .field("service", &self.service)
            .field("warnings", &self.warnings)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The extensions to run, in start order: `service.extensions` as written, then those
    /// processors made for themselves.
    pub extensions: Vec<ComponentId>,
    /// In file order.
    pub pipelines: Vec<PipelineConfig>,
    pub telemetry: TelemetryConfig,
    /// How long a graceful shutdown may take before what is left is dropped and counted.
    /// `service.shutdown_timeout`, default 10s.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The pipeline id as written: `metrics`, `traces`, `metrics/other`.
    pub name: String,
    pub signal: Signal,
    pub receivers: Vec<ComponentId>,
    pub processors: Vec<ComponentId>,
    pub exporters: Vec<ComponentId>,
    /// The bounded queue between the receivers and the first processor (or the exporters).
    /// `service.pipelines.<id>.queue`.
    pub queue: QueueSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `service.telemetry.metrics.address`, default `127.0.0.1:8888`: `/metrics`, `/healthz`,
    /// `/readyz`.
    pub metrics_address: String,
    /// `service.telemetry.logs.level`, default `info`.
    pub log_level: String,
    /// `service.telemetry.logs.encoding`: `console` (default) or `json`.
    pub log_encoding: LogEncoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogEncoding {
    #[default]
    Console,
    Json,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_address: "127.0.0.1:8888".to_string(),
            log_level: "info".to_string(),
            log_encoding: LogEncoding::Console,
        }
    }
}
