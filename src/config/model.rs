//! The validated shape of a podscope config file (the OpenTelemetry Collector's shape).

use std::collections::BTreeMap;
use std::time::Duration;

use podscope_core::config::QueueSettings;
use podscope_core::{ComponentId, Signal};

/// A whole config file, every part validated against the registry.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where it came from (a path, or `<embedded default>`), for messages.
    pub source: String,
    pub receivers: BTreeMap<ComponentId, serde_json::Value>,
    pub processors: BTreeMap<ComponentId, serde_json::Value>,
    pub exporters: BTreeMap<ComponentId, serde_json::Value>,
    pub service: ServiceConfig,
    /// Things worth a log line that do not stop the agent (a component no pipeline uses).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
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
