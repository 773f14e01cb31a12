//! Loading podscope's Collector-style YAML config: parsing with positions, `${env:VAR}`
//! substitution, component config validation through the registry, pipeline checks. Every error
//! names file, line, column and key path, and all errors are reported at once, in file order.
//!
//! The loader decides nothing about running: it returns a validated [`AgentConfig`] whose
//! component sections the service hands back to the registry's factories.

mod env;
mod model;
mod yaml;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use podscope_core::config::{parse_component_config, ComponentConfig, QueueSettings};
use podscope_core::{ComponentId, ComponentKind, FieldError, Signal};
use serde::Deserialize;

pub use model::{AgentConfig, LogEncoding, PipelineConfig, ServiceConfig, TelemetryConfig};
use yaml::{Key, Node, Position};

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

/// [`load_str`] against a given registry and environment (tests use their own).
pub fn load_with(
    text: &str,
    source: &str,
    registry: &Registry,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<AgentConfig, ConfigErrors> {
    let mut loader = Loader {
        source: source.to_string(),
        registry,
        unresolved: Vec::new(),
        errors: Vec::new(),
        references: Vec::new(),
    };
    let config = loader.load(text, lookup);
    if loader.errors.is_empty() {
        Ok(config.expect("a config when there are no errors"))
    } else {
        let mut errors = loader.errors;
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        Err(ConfigErrors(errors))
    }
}

struct Loader<'r> {
    source: String,
    registry: &'r Registry,
    /// Where `${env:…}` references could not be resolved: settings holding one are not
    /// validated further, as their value is not known.
    unresolved: Vec<Position>,
    errors: Vec<ConfigError>,
    /// Settings that name another component: where, their full key path, what they name.
    references: Vec<(Position, String, podscope_core::ComponentReference)>,
}

/// A component section as found: its id, where its key stands, and its settings.
struct Defined {
    raw: serde_json::Value,
}

impl Loader<'_> {
    fn error(&mut self, position: Position, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            source: self.source.clone(),
            line: position.line,
            column: position.column,
            path: path.into(),
            message: message.into(),
        });
    }

    /// The entries of a mapping node, reporting anything else and duplicate keys.
    fn mapping<'n>(&mut self, node: &'n Node, path: &str) -> &'n [(Key, Node)] {
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

    fn load(&mut self, text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Option<AgentConfig> {
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

        let mut sections: BTreeMap<&str, &Node> = BTreeMap::new();
        for (key, value) in self.mapping(&root, "") {
            match key.text.as_str() {
                "receivers" | "processors" | "exporters" | "service" => {
                    sections.insert(key.text.as_str(), value);
                }
                "extensions" | "connectors" => self.error(
                    key.position,
                    key.text.clone(),
                    format!("{} are not supported by podscope", key.text),
                ),
                other => self.error(
                    key.position,
                    other.to_string(),
                    "unknown top-level key; expected receivers, processors, exporters or service",
                ),
            }
        }

        let receivers =
            self.components(ComponentKind::Receiver, sections.get("receivers").copied());
        let processors = self.components(
            ComponentKind::Processor,
            sections.get("processors").copied(),
        );
        let exporters =
            self.components(ComponentKind::Exporter, sections.get("exporters").copied());
        let service = match sections.get("service") {
            Some(node) => self.service(node, &receivers, &processors, &exporters),
            None => {
                self.error(
                    Position { line: 1, column: 1 },
                    "service",
                    "missing: a config needs service.pipelines with at least one pipeline",
                );
                None
            }
        };

        let mut warnings = Vec::new();
        if let Some(service) = &service {
            for (kind, defined) in [
                (
                    ComponentKind::Receiver,
                    receivers.keys().collect::<Vec<_>>(),
                ),
                (ComponentKind::Processor, processors.keys().collect()),
                (ComponentKind::Exporter, exporters.keys().collect()),
            ] {
                for id in defined {
                    let used = service.pipelines.iter().any(|p| {
                        let list = match kind {
                            ComponentKind::Receiver => &p.receivers,
                            ComponentKind::Processor => &p.processors,
                            ComponentKind::Exporter => &p.exporters,
                        };
                        list.contains(id)
                    });
                    if !used {
                        warnings.push(format!(
                            "{}.{id} is defined but no pipeline uses it",
                            kind.section()
                        ));
                    }
                }
            }
        }

        if let Some(service) = &service {
            for (position, path, reference) in std::mem::take(&mut self.references) {
                let defined = match reference.kind {
                    ComponentKind::Receiver => receivers.contains_key(&reference.id),
                    ComponentKind::Processor => processors.contains_key(&reference.id),
                    ComponentKind::Exporter => exporters.contains_key(&reference.id),
                };
                let in_pipeline = service.pipelines.iter().any(|p| {
                    match reference.kind {
                        ComponentKind::Receiver => &p.receivers,
                        ComponentKind::Processor => &p.processors,
                        ComponentKind::Exporter => &p.exporters,
                    }
                    .contains(&reference.id)
                });
                let (section, id) = (reference.kind.section(), &reference.id);
                if !defined {
                    self.error(position, path, format!("{section}.{id} is not defined"));
                } else if !in_pipeline {
                    self.error(
                        position,
                        path,
                        format!("{section}.{id} is defined but in no pipeline, so it never runs"),
                    );
                }
            }
        }

        let service = service?;
        let raw = |m: BTreeMap<ComponentId, (Position, Defined)>| -> BTreeMap<ComponentId, serde_json::Value> {
            m.into_iter().map(|(id, (_, d))| (id, d.raw)).collect()
        };
        Some(AgentConfig {
            source: self.source.clone(),
            receivers: raw(receivers),
            processors: raw(processors),
            exporters: raw(exporters),
            service,
            warnings,
        })
    }

    /// One of `receivers:`, `processors:`, `exporters:`: every id parsed, its type looked up and
    /// its settings validated by the factory.
    fn components(
        &mut self,
        kind: ComponentKind,
        node: Option<&Node>,
    ) -> BTreeMap<ComponentId, (Position, Defined)> {
        let mut out = BTreeMap::new();
        let Some(node) = node else { return out };
        let section = kind.section();
        for (key, value) in self.mapping(node, section) {
            let path = join(section, &key.text);
            let id = match ComponentId::parse(&key.text) {
                Ok(id) => id,
                Err(message) => {
                    self.error(key.position, path, message);
                    continue;
                }
            };
            let raw = value.to_json();
            if self.unresolved.iter().any(|p| value.contains(*p)) {
                out.insert(id, (key.position, Defined { raw }));
                continue;
            }
            let created = self
                .registry
                .check_config(kind, id.type_name(), raw.clone());
            match created {
                None => {
                    let known = self.registry.type_names(kind).join(", ");
                    self.error(
                        key.position,
                        path,
                        format!(
                            "unknown {} type {:?}; known types: {known}",
                            kind.as_str(),
                            id.type_name()
                        ),
                    );
                    continue;
                }
                Some(Err(field_errors)) => {
                    self.field_errors(value, &path, key.position, field_errors);
                }
                Some(Ok(references)) => {
                    for reference in references {
                        let position = value.locate(&reference.field, key.position);
                        let full = join(&path, &reference.field);
                        self.references.push((position, full, reference));
                    }
                }
            }
            out.insert(id, (key.position, Defined { raw }));
        }
        out
    }

    fn field_errors(
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

    fn service(
        &mut self,
        node: &Node,
        receivers: &BTreeMap<ComponentId, (Position, Defined)>,
        processors: &BTreeMap<ComponentId, (Position, Defined)>,
        exporters: &BTreeMap<ComponentId, (Position, Defined)>,
    ) -> Option<ServiceConfig> {
        let mut pipelines_node = None;
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
                "extensions" => self.error(
                    key.position,
                    path,
                    "extensions are not supported by podscope",
                ),
                _ => self.error(
                    key.position,
                    path,
                    "unknown key; expected pipelines, telemetry or shutdown_timeout",
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
        let mut pipelines = Vec::new();
        let entries = self.mapping(pipelines_value, "service.pipelines");
        if entries.is_empty() {
            self.error(
                pipelines_key.position,
                "service.pipelines",
                "at least one pipeline is needed",
            );
        }
        for (key, value) in entries {
            if let Some(p) = self.pipeline(key, value, receivers, processors, exporters) {
                pipelines.push(p);
            }
        }
        Some(ServiceConfig {
            pipelines,
            telemetry,
            shutdown_timeout,
        })
    }

    fn pipeline(
        &mut self,
        key: &Key,
        node: &Node,
        receivers: &BTreeMap<ComponentId, (Position, Defined)>,
        processors: &BTreeMap<ComponentId, (Position, Defined)>,
        exporters: &BTreeMap<ComponentId, (Position, Defined)>,
    ) -> Option<PipelineConfig> {
        let path = join("service.pipelines", &key.text);
        let signal_name = key.text.split('/').next().unwrap_or_default();
        let signal = match Signal::parse(signal_name) {
            Some(s) => Some(s),
            None => {
                let hint = if signal_name == "logs" {
                    " (logs are not supported yet)"
                } else {
                    ""
                };
                self.error(
                    key.position,
                    path.clone(),
                    format!("unknown signal {signal_name:?}{hint}; a pipeline id is metrics[/name] or traces[/name]"),
                );
                None
            }
        };
        if key
            .text
            .split_once('/')
            .is_some_and(|(_, name)| name.is_empty() || name.contains('/'))
        {
            self.error(
                key.position,
                path.clone(),
                "invalid pipeline id: the name after '/' must be non-empty, without '/'",
            );
        }
        let mut lists: BTreeMap<&str, Vec<ComponentId>> = BTreeMap::new();
        let mut queue = QueueSettings::default();
        for (k, v) in self.mapping(node, &path) {
            let item_path = join(&path, &k.text);
            match k.text.as_str() {
                "receivers" | "processors" | "exporters" => {
                    let (kind, defined) = match k.text.as_str() {
                        "receivers" => (ComponentKind::Receiver, receivers),
                        "processors" => (ComponentKind::Processor, processors),
                        _ => (ComponentKind::Exporter, exporters),
                    };
                    let ids = self.id_list(v, &item_path, kind, defined, signal);
                    lists.insert(kind.section(), ids);
                }
                "queue" => {
                    if let Some(q) = self.typed::<QueueSettingsConfig>(v, &item_path, k.position) {
                        queue = q.0;
                    }
                }
                _ => self.error(
                    k.position,
                    item_path,
                    "unknown key; expected receivers, processors, exporters or queue",
                ),
            }
        }
        let receivers_list = lists.remove("receivers").unwrap_or_default();
        let exporters_list = lists.remove("exporters").unwrap_or_default();
        if receivers_list.is_empty() {
            self.error(
                key.position,
                join(&path, "receivers"),
                "a pipeline needs at least one receiver",
            );
        }
        if exporters_list.is_empty() {
            self.error(
                key.position,
                join(&path, "exporters"),
                "a pipeline needs at least one exporter",
            );
        }
        Some(PipelineConfig {
            name: key.text.clone(),
            signal: signal?,
            receivers: receivers_list,
            processors: lists.remove("processors").unwrap_or_default(),
            exporters: exporters_list,
            queue,
        })
    }

    fn id_list(
        &mut self,
        node: &Node,
        path: &str,
        kind: ComponentKind,
        defined: &BTreeMap<ComponentId, (Position, Defined)>,
        signal: Option<Signal>,
    ) -> Vec<ComponentId> {
        let items: Vec<&Node> = match &node.value {
            yaml::Value::Sequence(items) => items.iter().collect(),
            _ if node.is_null() => Vec::new(),
            _ => {
                self.error(
                    node.position,
                    path,
                    format!(
                        "expected a list of {} ids, found {}",
                        kind.as_str(),
                        node.kind_name()
                    ),
                );
                return Vec::new();
            }
        };
        let mut ids = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let text = match &item.value {
                yaml::Value::Scalar { text, .. } => text.clone(),
                _ => {
                    self.error(
                        item.position,
                        item_path,
                        format!(
                            "expected a {} id, found {}",
                            kind.as_str(),
                            item.kind_name()
                        ),
                    );
                    continue;
                }
            };
            let id = match ComponentId::parse(&text) {
                Ok(id) => id,
                Err(message) => {
                    self.error(item.position, item_path, message);
                    continue;
                }
            };
            if ids.contains(&id) {
                self.error(item.position, item_path, format!("{id} is listed twice"));
                continue;
            }
            if !defined.contains_key(&id) {
                self.error(
                    item.position,
                    item_path,
                    format!(
                        "{} {id} is not defined in the {} section",
                        kind.as_str(),
                        kind.section()
                    ),
                );
            } else if let Some(signal) = signal {
                if let Some(signals) = self.registry.signals(kind, id.type_name()) {
                    if !signals.contains(&signal) {
                        let handles: Vec<&str> = signals.iter().map(|s| s.as_str()).collect();
                        self.error(
                            item.position,
                            item_path,
                            format!(
                                "{} {id} does not handle {signal} (it handles {})",
                                kind.as_str(),
                                handles.join(", ")
                            ),
                        );
                    }
                }
            }
            ids.push(id);
        }
        ids
    }

    /// Deserializes a service-level section with serde, reporting errors at their keys.
    fn typed<T: ComponentConfig>(
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
}

fn join(prefix: &str, key: &str) -> String {
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

#[derive(Deserialize)]
#[serde(transparent)]
struct QueueSettingsConfig(QueueSettings);

impl ComponentConfig for QueueSettingsConfig {
    fn validate(&self) -> Vec<FieldError> {
        self.0.validate("")
    }
}
