//! The pipeline graph: `service.pipelines` (each a signal with receivers, processors, exporters
//! and an entry queue), checked against the components defined and the signals their types
//! handle; the settings by which one component names another (defined, and running); and what is
//! defined but never runs (a warning).

use std::collections::{BTreeMap, BTreeSet};

use podscope_core::config::{ComponentConfig, QueueSettings};
use podscope_core::{
    ComponentId, ComponentKind, ComponentReference, ExtensionBuilder, FieldError, ProcessorBuilder,
    Signal,
};
use serde::Deserialize;

use super::components::Section;
use super::document::{join, Loader};
use super::model::{PipelineConfig, ServiceConfig};
use super::yaml::{self, Key, Node, Position};

/// What the pipelines are checked against: the ids defined per kind, and the references
/// between components found in their settings.
pub(super) struct ServiceGraph {
    defined: BTreeMap<ComponentKind, BTreeSet<ComponentId>>,
    references: Vec<Reference>,
}

/// A setting of component `from` that names another component.
struct Reference {
    from: (ComponentKind, ComponentId),
    position: Position,
    path: String,
    names: ComponentReference,
}

impl ServiceGraph {
    pub fn new() -> Self {
        ServiceGraph {
            defined: BTreeMap::new(),
            references: Vec::new(),
        }
    }

    pub fn add<B: ?Sized>(&mut self, section: &Section<B>) {
        let ids = self.defined.entry(section.kind).or_default();
        for (id, defined) in &section.defined {
            ids.insert(id.clone());
            for (position, path, names) in &defined.references {
                self.references.push(Reference {
                    from: (section.kind, id.clone()),
                    position: *position,
                    path: path.clone(),
                    names: names.clone(),
                });
            }
        }
    }

    fn is_defined(&self, kind: ComponentKind, id: &ComponentId) -> bool {
        self.defined.get(&kind).is_some_and(|ids| ids.contains(id))
    }

    /// The extensions components name in their settings, by component.
    pub fn extension_users(&self) -> BTreeMap<(ComponentKind, ComponentId), Vec<ComponentId>> {
        let mut users: BTreeMap<_, Vec<ComponentId>> = BTreeMap::new();
        for reference in &self.references {
            if reference.names.kind == ComponentKind::Extension {
                users
                    .entry(reference.from.clone())
                    .or_default()
                    .push(reference.names.id.clone());
            }
        }
        users
    }
}

/// Whether component `id` of `kind` runs: a pipeline lists it, or for an extension,
/// `service.extensions` does.
fn runs(service: &ServiceConfig, kind: ComponentKind, id: &ComponentId) -> bool {
    let listed = |list: fn(&PipelineConfig) -> &Vec<ComponentId>| {
        service.pipelines.iter().any(|p| list(p).contains(id))
    };
    match kind {
        ComponentKind::Receiver => listed(|p| &p.receivers),
        ComponentKind::Processor => listed(|p| &p.processors),
        ComponentKind::Exporter => listed(|p| &p.exporters),
        ComponentKind::Extension => service.extensions.contains(id),
    }
}

/// Why a component of `kind` that does not run does not, for messages.
fn not_running(kind: ComponentKind) -> &'static str {
    match kind {
        ComponentKind::Extension => "not in service.extensions",
        _ => "in no pipeline",
    }
}

impl Loader<'_> {
    /// `service.pipelines`: at least one, each checked.
    pub(super) fn pipelines(
        &mut self,
        key: &Key,
        node: &Node,
        graph: &ServiceGraph,
    ) -> Vec<PipelineConfig> {
        let entries = self.mapping(node, "service.pipelines");
        if entries.is_empty() {
            self.error(
                key.position,
                "service.pipelines",
                "at least one pipeline is needed",
            );
        }
        entries
            .iter()
            .filter_map(|(key, value)| self.pipeline(key, value, graph))
            .collect()
    }

    /// `service.extensions`: the extensions to run, each defined and listed once.
    pub(super) fn extension_list(
        &mut self,
        node: &Node,
        path: &str,
        graph: &ServiceGraph,
    ) -> Vec<ComponentId> {
        self.id_list(node, path, ComponentKind::Extension, graph, None)
    }

    /// After the whole file is read: every reference between components names one that is
    /// defined and runs; returns a warning for each component that never runs.
    pub(super) fn check_graph(
        &mut self,
        graph: &ServiceGraph,
        service: &ServiceConfig,
    ) -> Vec<String> {
        for reference in &graph.references {
            let (kind, id) = (reference.names.kind, &reference.names.id);
            let section = kind.section();
            if !graph.is_defined(kind, id) {
                self.error(
                    reference.position,
                    &reference.path,
                    format!("{section}.{id} is not defined"),
                );
            } else if !runs(service, kind, id) {
                self.error(
                    reference.position,
                    &reference.path,
                    format!(
                        "{section}.{id} is defined but {}, so it never runs",
                        not_running(kind)
                    ),
                );
            }
        }
        let mut warnings = Vec::new();
        for (kind, ids) in &graph.defined {
            for id in ids {
                if !runs(service, *kind, id) {
                    let unused = match kind {
                        ComponentKind::Extension => "is not in service.extensions",
                        _ => "no pipeline uses it",
                    };
                    warnings.push(format!("{}.{id} is defined but {unused}", kind.section()));
                }
            }
        }
        warnings
    }

    /// The extensions processors in a pipeline make for themselves (a `k8sattributes` without
    /// `extension:` gets its own `k8s_metadata`): added to those that run, after the listed
    /// ones, with the processor as their user.
    pub(super) fn implicit_extensions(
        &mut self,
        processors: &Section<dyn ProcessorBuilder>,
        graph: &ServiceGraph,
        service: &mut ServiceConfig,
        running: &mut BTreeMap<ComponentId, Box<dyn ExtensionBuilder>>,
        users: &mut BTreeMap<(ComponentKind, ComponentId), Vec<ComponentId>>,
    ) {
        for (id, defined) in &processors.defined {
            let Some(builder) = &defined.builder else {
                continue;
            };
            if !runs(service, ComponentKind::Processor, id) {
                continue;
            }
            let Some((extension_id, extension)) = builder.implicit_extension(id) else {
                continue;
            };
            if graph.is_defined(ComponentKind::Extension, &extension_id) {
                self.error(
                    defined.key,
                    join("processors", &id.to_string()),
                    format!(
                        "names no extension, so it makes its own, extensions.{extension_id}, but this file defines an extension of that id: name it with `extension:`, or give it another id"
                    ),
                );
                continue;
            }
            service.extensions.push(extension_id.clone());
            running.insert(extension_id.clone(), extension);
            users
                .entry((ComponentKind::Processor, id.clone()))
                .or_default()
                .push(extension_id);
        }
    }

    fn pipeline(&mut self, key: &Key, node: &Node, graph: &ServiceGraph) -> Option<PipelineConfig> {
        let path = join("service.pipelines", &key.text);
        let signal_name = key.text.split('/').next().unwrap_or_default();
        let signal = match Signal::parse(signal_name) {
            Some(s) => Some(s),
            None => {
                let signals: Vec<&str> = Signal::ALL.iter().map(|s| s.as_str()).collect();
                self.error(
                    key.position,
                    path.clone(),
                    format!(
                        "unknown signal {signal_name:?}; a pipeline id is <signal>[/name] with a signal of {}",
                        signals.join(", ")
                    ),
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
        let mut lists: BTreeMap<ComponentKind, Vec<ComponentId>> = BTreeMap::new();
        let mut queue = QueueSettings::default();
        for (k, v) in self.mapping(node, &path) {
            let item_path = join(&path, &k.text);
            let kind = match k.text.as_str() {
                "receivers" => ComponentKind::Receiver,
                "processors" => ComponentKind::Processor,
                "exporters" => ComponentKind::Exporter,
                "queue" => {
                    if let Some(q) = self.typed::<QueueSettingsConfig>(v, &item_path, k.position) {
                        queue = q.0;
                    }
                    continue;
                }
                _ => {
                    self.error(
                        k.position,
                        item_path,
                        "unknown key; expected receivers, processors, exporters or queue",
                    );
                    continue;
                }
            };
            let ids = self.id_list(v, &item_path, kind, graph, signal);
            lists.insert(kind, ids);
        }
        let mut list = |kind| lists.remove(&kind).unwrap_or_default();
        let (receivers, processors, exporters) = (
            list(ComponentKind::Receiver),
            list(ComponentKind::Processor),
            list(ComponentKind::Exporter),
        );
        for (ids, kind) in [
            (&receivers, ComponentKind::Receiver),
            (&exporters, ComponentKind::Exporter),
        ] {
            if ids.is_empty() {
                self.error(
                    key.position,
                    join(&path, kind.section()),
                    format!("a pipeline needs at least one {}", kind.as_str()),
                );
            }
        }
        Some(PipelineConfig {
            name: key.text.clone(),
            signal: signal?,
            receivers,
            processors,
            exporters,
            queue,
        })
    }

    /// A pipeline's list of component ids: each defined, listed once, and able to handle the
    /// pipeline's signal.
    fn id_list(
        &mut self,
        node: &Node,
        path: &str,
        kind: ComponentKind,
        graph: &ServiceGraph,
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
            if !graph.is_defined(kind, &id) {
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
}

#[derive(Deserialize)]
#[serde(transparent)]
struct QueueSettingsConfig(QueueSettings);

impl ComponentConfig for QueueSettingsConfig {
    fn validate(&self) -> Vec<FieldError> {
        self.0.validate("")
    }
}
