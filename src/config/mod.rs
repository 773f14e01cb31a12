//! Loading podscope's Collector-style YAML config. Every error names file, line, column and key
//! path, and all errors are reported at once, in file order.
//!
//! One file per job:
//! - `document.rs`: the file as a whole — YAML with positions (`yaml.rs`), `${env:…}`
//!   substitution (`env.rs`), the top-level sections and the service settings that are not the
//!   pipeline graph;
//! - `components.rs`: each component section, parsed and validated by its factory into the
//!   builder the service will build it with;
//! - `graph.rs`: the pipeline graph — pipelines, the components they list, the settings by which
//!   one component names another, and what is defined but unused.
//!
//! The loader decides nothing about running: it returns an [`AgentConfig`] holding the
//! validated builders, which the service builds without parsing anything again.

mod components;
mod document;
mod env;
mod graph;
mod model;
mod yaml;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;

pub use model::{AgentConfig, LogEncoding, PipelineConfig, ServiceConfig, TelemetryConfig};

use crate::registry::Registry;

/// The default config, compiled into the binary (`podscope run` with no `--config`).
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/default.yaml");

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub line: usize,
    pub column: usize,
    /// Full key path, e.g. `exporters.otlp/jaeger.endpoint`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.source, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

pub fn load_file(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let source = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, &source),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            source,
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

pub fn load_default() -> Result<AgentConfig, ConfigErrors> {
    load_str(DEFAULT_CONFIG, "<embedded default>")
}

pub fn load_str(text: &str, source: &str) -> Result<AgentConfig, ConfigErrors> {
    load_with(text, source, &Registry::builtin(), &|name| {
        std::env::var(name).ok()
    })
}

/// A YAML document (a user program's spec) as JSON, or the syntax error with its position.
pub fn yaml_to_json(text: &str) -> Result<serde_json::Value, String> {
    yaml::parse(text)
        .map(|node| node.to_json())
        .map_err(|e| format!("{}:{}: {}", e.position.line, e.position.column, e.message))
}

/// [`load_str`] against a given registry and environment (tests use their own).
pub fn load_with(
    text: &str,
    source: &str,
    registry: &Registry,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<AgentConfig, ConfigErrors> {
    let mut loader = document::Loader::new(source, registry);
    let config = loader.load(text, lookup);
    match (config, loader.into_errors()) {
        (Some(config), errors) if errors.is_empty() => Ok(config),
        (_, mut errors) => {
            errors.sort_by_key(|e| (e.line, e.column));
            errors.dedup();
            Err(ConfigErrors(errors))
        }
    }
}
