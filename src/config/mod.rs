//! Loading podscope's Collector-style YAML config: parsing with positions, `${env:VAR}`
//! substitution, component config validation through the registry, pipeline checks. Every error
//! names file, line, column and key path, and all errors are reported at once.

mod model;

pub use model::{AgentConfig, LogEncoding, PipelineConfig, ServiceConfig, TelemetryConfig};
