//! Component sections (`receivers:`, `processors:`, `exporters:`): each id parsed, its type
//! looked up in the registry, its settings parsed and validated by the factory into the builder
//! the service builds the component with. What a component's settings name of other components
//! is collected here and checked against the pipeline graph in `graph.rs`.

use std::collections::BTreeMap;

use podscope_core::component::Factory;
use podscope_core::{ComponentId, ComponentKind, ComponentReference};

use super::document::{join, Loader};
use super::yaml::{Node, Position};

/// One kind's components as defined in the file, in id order.
pub(super) struct Section<B: ?Sized> {
    pub kind: ComponentKind,
    pub defined: BTreeMap<ComponentId, Defined<B>>,
}

pub(super) struct Defined<B: ?Sized> {
    /// Where the component's key stands.
    pub key: Position,
    /// `None` when the settings were refused (or hold an unresolved `${env:…}`): the id still
    /// counts as defined for the pipelines, and the errors say what is wrong.
    pub builder: Option<Box<B>>,
    /// Settings that name another component: where each stands, its full key path, and what it
    /// names.
    pub references: Vec<(Position, String, ComponentReference)>,
}

impl<B: ?Sized> Section<B> {
    /// The builders, once the whole file loaded without errors (so every one is there).
    pub fn into_builders(self) -> BTreeMap<ComponentId, Box<B>> {
        self.defined
            .into_iter()
            .filter_map(|(id, d)| Some((id, d.builder?)))
            .collect()
    }
}

impl Loader<'_> {
    /// One component section: every id parsed, its type looked up among `factories` and its
    /// settings turned into a builder by the factory.
    pub(super) fn components<B: ?Sized>(
        &mut self,
        kind: ComponentKind,
        node: Option<&Node>,
        factories: &[&'static Factory<B>],
        references: impl Fn(&B) -> Vec<ComponentReference>,
    ) -> Section<B> {
        let mut section = Section {
            kind,
            defined: BTreeMap::new(),
        };
        let Some(node) = node else { return section };
        let name = kind.section();
        for (key, value) in self.mapping(node, name) {
            let path = join(name, &key.text);
            let id = match ComponentId::parse(&key.text) {
                Ok(id) => id,
                Err(message) => {
                    self.error(key.position, path, message);
                    continue;
                }
            };
            let mut defined = Defined {
                key: key.position,
                builder: None,
                references: Vec::new(),
            };
            if self.unresolved.iter().any(|p| value.contains(*p)) {
                section.defined.insert(id, defined);
                continue;
            }
            let Some(factory) = factories.iter().find(|f| f.type_name == id.type_name()) else {
                let known: Vec<&str> = factories.iter().map(|f| f.type_name).collect();
                self.error(
                    key.position,
                    path,
                    format!(
                        "unknown {} type {:?}; known types: {}",
                        kind.as_str(),
                        id.type_name(),
                        known.join(", ")
                    ),
                );
                continue;
            };
            match (factory.create)(value.to_json()) {
                Err(field_errors) => {
                    self.field_errors(value, &path, key.position, field_errors);
                }
                Ok(builder) => {
                    for reference in references(&*builder) {
                        let position = value.locate(&reference.field, key.position);
                        let full = join(&path, &reference.field);
                        defined.references.push((position, full, reference));
                    }
                    defined.builder = Some(builder);
                }
            }
            section.defined.insert(id, defined);
        }
        section
    }
}
