//! The one table of every component podscope can run. Adding a component = one line here.
//!
//! [`Registry`] is that table as a value, so tests can add components of their own.

use podscope_core::{
    ComponentKind, ExporterFactory, ExtensionFactory, ProcessorFactory, ReceiverFactory, Signal,
};

pub fn receivers() -> Vec<&'static ReceiverFactory> {
    vec![
        &podscope_receiver::ebpf::FACTORY,
        &podscope_receiver::otlp::FACTORY,
        &podscope_receiver::trace_sessions::FACTORY,
    ]
}

pub fn processors() -> Vec<&'static ProcessorFactory> {
    vec![
        &podscope_processors::batch::FACTORY,
        &podscope_processors::k8sattributes::FACTORY,
        &podscope_processors::memory_limiter::FACTORY,
    ]
}

pub fn exporters() -> Vec<&'static ExporterFactory> {
    vec![
        &podscope_exporters::debug::FACTORY,
        &podscope_exporters::file::FACTORY,
        &podscope_exporters::nop::FACTORY,
        &podscope_exporters::otlp::OTLP,
        &podscope_exporters::otlp::OTLP_HTTP,
        &podscope_exporters::otlp::JAEGER,
        &podscope_exporters::prometheus::FACTORY,
        &podscope_exporters::pprof::FACTORY,
        &podscope_exporters::prometheusremotewrite::FACTORY,
    ]
}

pub fn extensions() -> Vec<&'static ExtensionFactory> {
    vec![
        &podscope_k8s::k8s_metadata::FACTORY,
        &podscope_exporters::file_storage::FACTORY,
        &crate::session_profiles::FACTORY,
    ]
}

/// A set of component factories to validate configs against.
#[derive(Clone)]
pub struct Registry {
    pub receivers: Vec<&'static ReceiverFactory>,
    pub processors: Vec<&'static ProcessorFactory>,
    pub exporters: Vec<&'static ExporterFactory>,
    pub extensions: Vec<&'static ExtensionFactory>,
}

impl Registry {
    /// Every component podscope ships.
    pub fn builtin() -> Registry {
        Registry {
            receivers: receivers(),
            processors: processors(),
            exporters: exporters(),
            extensions: extensions(),
        }
    }

    pub fn receiver(&self, type_name: &str) -> Option<&'static ReceiverFactory> {
        self.receivers
            .iter()
            .copied()
            .find(|f| f.type_name == type_name)
    }

    pub fn processor(&self, type_name: &str) -> Option<&'static ProcessorFactory> {
        self.processors
            .iter()
            .copied()
            .find(|f| f.type_name == type_name)
    }

    pub fn exporter(&self, type_name: &str) -> Option<&'static ExporterFactory> {
        self.exporters
            .iter()
            .copied()
            .find(|f| f.type_name == type_name)
    }

    pub fn extension(&self, type_name: &str) -> Option<&'static ExtensionFactory> {
        self.extensions
            .iter()
            .copied()
            .find(|f| f.type_name == type_name)
    }

    /// The signals a component type handles; `None` for an unknown type.
    pub fn signals(&self, kind: ComponentKind, type_name: &str) -> Option<&'static [Signal]> {
        match kind {
            ComponentKind::Receiver => self.receiver(type_name).map(|f| f.signals),
            ComponentKind::Processor => self.processor(type_name).map(|f| f.signals),
            ComponentKind::Exporter => self.exporter(type_name).map(|f| f.signals),
            ComponentKind::Extension => self.extension(type_name).map(|f| f.signals),
        }
    }
}
