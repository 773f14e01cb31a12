//! The config file as a whole: YAML parsed with positions, `${env:…}` substituted, the top-level
//! sections dispatched to `components.rs` and `graph.rs`, and the service settings that are not
//! the pipeline graph (`telemetry`, `shutdown_timeout`). Also the error plumbing every part of
//! the loader shares. It validates no component itself.

use std::collections::BTreeSet;
use std::time::Duration;

use podscope_core::config::{parse_component_config, ComponentConfig};
use podscope_core::{ComponentKind, FieldError};
use serde::Deserialize;

use super::env;
use super::graph::ServiceGraph;
use super::model::{AgentConfig, LogEncoding, ServiceConfig, TelemetryConfig};
use super::yaml::{self, Key, Node, Position};
use super::ConfigError;
use crate::registry::Registry;

pub(super) struct Loader<'r> {
    source: String,
    pub(super) registry: &'r Registry,
    /// Where `${env:…}` references could not be resolved: settings holding one are not
    /// validated further, as their value is not known.
    pub(super) unresolved: Vec<Position>,
    errors: Vec<ConfigError>,
}

impl<'r> Loader<'r> {
    pub(super) fn new(source: &str, registry: &'r Registry) -> Self {
        Loader {
            source: source.to_string(),
            registry,
            unresolved: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub(super) fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }

    pub(super) fn error(
        &mut self,
        position: Position,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            source: self.source.clone(),
            line: position.line,
            column: position.column,
            path: path.into(),
            message: message.into(),
        });
    }

    /// The entries of a mapping node, reporting anything else and duplicate keys.
    pub(super) fn mapping<'n>(&mut self, node: &'n Node, path: &str) -> &'n [(Key, Node)] {
        if node.is_null() {
            return &[];
        }
        let Some(entries) = node.as_mapping() else {
            self.error(
                node.position,
                path,
                format!("expected a mapping, found {}", node.kind_name()),
            );
            return &[];
        };
        let mut seen = BTreeSet::new();
        for (key, _) in entries {
            if !seen.insert(key.text.as_str()) {
                self.error(key.position, join(path, &key.text), "duplicate key");
            }
        }
        entries
    }

    /// Reports a component's (or section's) field errors at the keys they name.
    pub(super) fn field_errors(
        &mut self,
        node: &Node,
        path: &str,
        key_position: Position,
        errors: Vec<FieldError>,
    ) {
        for e in errors {
            let position = if e.path.is_empty() {
                key_position
            } else {
                node.locate(&e.path, key_position)
            };
            let full = if e.path.is_empty() {
                path.to_string()
            } else {
                join(path, &e.path)
            };
            self.error(position, full, e.message);
        }
    }

    /// Deserializes a service-level section with serde, reporting errors at their keys.
    pub(super) fn typed<T: ComponentConfig>(
        &mut self,
        node: &Node,
        path: &str,
        key_position: Position,
    ) -> Option<T> {
        match parse_component_config::<T>(node.to_json()) {
            Ok(t) => Some(t),
            Err(errors) => {
                self.field_errors(node, path, key_position, errors);
                None
            }
        }
    }

    /// Reads the whole file. `None` when it cannot be read at all or lacks a service section;
    /// otherwise a config, to be used only if no error was reported.
    pub(super) fn load(
        &mut self,
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Option<AgentConfig> {
        let mut root = match yaml::parse(text) {
            Ok(root) => root,
            Err(e) => {
                self.error(e.position, "", format!("invalid YAML: {}", e.message));
                return None;
            }
        };
        let mut env_errors = Vec::new();
        env::substitute(&mut root, lookup, &mut env_errors);
        for e in &env_errors {
            let path = path_at(&root, e.position);
            self.error(e.position, path, e.message.clone());
        }
        self.unresolved = env_errors.iter().map(|e| e.position).collect();

        let mut sections = std::collections::BTreeMap::new();
        for (key, value) in self.mapping(&root, "") {
            match key.text.as_str() {
                "receivers" | "processors" | "exporters" | "extensions" | "service" => {
                    sections.insert(key.text.as_str(), value);
                }
                "connectors" => self.error(
                    key.position,
                    key.text.clone(),
                    "connectors are not supported by podscope",
                ),
                other => self.error(
                    key.position,
                    other.to_string(),
                    "unknown top-level key; expected receivers, processors, exporters, extensions or service",
                ),
            }
        }

        let registry = self.registry;
        let receivers = self.components(
            ComponentKind::Receiver,
            sections.get("receivers").copied(),
            &registry.receivers,
            |b| b.references(),
        );
        let processors = self.components(
            ComponentKind::Processor,
            sections.get("processors").copied(),
            &registry.processors,
            |b| b.references(),
        );
        let exporters = self.components(
            ComponentKind::Exporter,
            sections.get("exporters").copied(),
            &registry.exporters,
            |b| b.references(),
        );
        let extensions = self.components(
            ComponentKind::Extension,
            sections.get("extensions").copied(),
            &registry.extensions,
            |b| b.references(),
        );
        let Some(service_node) = sections.get("service") else {
            self.error(
                Position { line: 1, column: 1 },
                "service",
                "missing: a config needs service.pipelines with at least one pipeline",
            );
            return None;
        };
        let mut graph = ServiceGraph::new();
        graph.add(&receivers);
        graph.add(&processors);
        graph.add(&exporters);
        graph.add(&extensions);
        let mut service = self.service(service_node, &graph)?;
        let warnings = self.check_graph(&graph, &service);
        let mut running_extensions = extensions.into_builders();
        running_extensions.retain(|id, _| service.extensions.contains(id));
        let mut extension_users = graph.extension_users();
        self.implicit_extensions(
            &processors,
            &graph,
            &mut service,
            &mut running_extensions,
            &mut extension_users,
        );
        Some(AgentConfig {
            source: self.source.clone(),
            receivers: receivers.into_builders(),
            processors: processors.into_builders(),
            exporters: exporters.into_builders(),
            extensions: running_extensions,
            extension_users,
            service,
            warnings,
        })
    }

    /// `service:` — its own settings here, the pipelines in `graph.rs`.
    fn service(&mut self, node: &Node, graph: &ServiceGraph) -> Option<ServiceConfig> {
        let mut pipelines_node = None;
        let mut extensions = Vec::new();
        let mut telemetry = TelemetryConfig::default();
        let mut shutdown_timeout = Duration::from_secs(10);
        for (key, value) in self.mapping(node, "service") {
            let path = join("service", &key.text);
            match key.text.as_str() {
                "pipelines" => pipelines_node = Some((key, value)),
                "telemetry" => {
                    if let Some(t) = self.typed::<TelemetrySection>(value, &path, key.position) {
                        telemetry = TelemetryConfig {
                            metrics_address: t.metrics.address,
                            log_level: t.logs.level,
                            log_encoding: match t.logs.encoding {
                                LogEncodingName::Console => LogEncoding::Console,
                                LogEncodingName::Json => LogEncoding::Json,
                            },
                        };
                    }
                }
                "shutdown_timeout" => match value.to_json().as_str().map(humantime::parse_duration)
                {
                    Some(Ok(d)) if !d.is_zero() => shutdown_timeout = d,
                    Some(Ok(_)) => self.error(value.position, path, "must be greater than 0"),
                    Some(Err(e)) => {
                        self.error(value.position, path, format!("invalid duration: {e}"))
                    }
                    None => self.error(
                        value.position,
                        path,
                        "expected a duration such as 10s or 1m30s",
                    ),
                },
                "extensions" => extensions = self.extension_list(value, &path, graph),
                _ => self.error(
                    key.position,
                    path,
                    "unknown key; expected extensions, pipelines, telemetry or shutdown_timeout",
                ),
            }
        }
        let Some((pipelines_key, pipelines_value)) = pipelines_node else {
            self.error(
                node.position,
                "service.pipelines",
                "missing: at least one pipeline is needed",
            );
            return None;
        };
        let pipelines = self.pipelines(pipelines_key, pipelines_value, graph);
        Some(ServiceConfig {
            extensions,
            pipelines,
            telemetry,
            shutdown_timeout,
        })
    }
}

pub(super) fn join(prefix: &str, key: &str) -> String {
    podscope_core::config::join_path(prefix, key)
}

/// The key path of the value standing at `position` (for errors found before paths are known).
fn path_at(root: &Node, position: Position) -> String {
    fn walk(node: &Node, position: Position, path: &str) -> Option<String> {
        if node.position == position {
            return Some(path.to_string());
        }
        match &node.value {
            yaml::Value::Mapping(entries) => entries
                .iter()
                .find_map(|(k, v)| walk(v, position, &join(path, &k.text))),
            yaml::Value::Sequence(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, position, &format!("{path}[{i}]"))),
            yaml::Value::Scalar { .. } => None,
        }
    }
    walk(root, position, "").unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
struct TelemetrySection {
    metrics: TelemetryMetricsSection,
    logs: TelemetryLogsSection,
}

impl ComponentConfig for TelemetrySection {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self
            .metrics
            .address
            .parse::<std::net::SocketAddr>()
            .is_err()
            && self
                .metrics
                .address
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            errors.push(FieldError::new("metrics.address", "expected host:port"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.logs.level) {
            errors.push(FieldError::new(
                "logs.level",
                format!("invalid level or filter: {e}"),
            ));
        }
        errors
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TelemetryMetricsSection {
    address: String,
}

impl Default for TelemetryMetricsSection {
    fn default() -> Self {
        TelemetryMetricsSection {
            address: TelemetryConfig::default().metrics_address,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TelemetryLogsSection {
    level: String,
    encoding: LogEncodingName,
}

impl Default for TelemetryLogsSection {
    fn default() -> Self {
        TelemetryLogsSection {
            level: "info".to_string(),
            encoding: LogEncodingName::Console,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum LogEncodingName {
    #[default]
    Console,
    Json,
}
