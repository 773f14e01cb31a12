//! The one table of every component podscope can run. Adding a component = one line here.

use podscope_core::{ExporterFactory, ProcessorFactory, ReceiverFactory};

pub fn receivers() -> Vec<&'static ReceiverFactory> {
    vec![&podscope_receiver::otlp::FACTORY]
}

pub fn processors() -> Vec<&'static ProcessorFactory> {
    vec![&podscope_processors::batch::FACTORY]
}

pub fn exporters() -> Vec<&'static ExporterFactory> {
    vec![
        &podscope_exporters::debug::FACTORY,
        &podscope_exporters::file::FACTORY,
        &podscope_exporters::nop::FACTORY,
    ]
}

pub fn receiver(type_name: &str) -> Option<&'static ReceiverFactory> {
    receivers().into_iter().find(|f| f.type_name == type_name)
}

pub fn processor(type_name: &str) -> Option<&'static ProcessorFactory> {
    processors().into_iter().find(|f| f.type_name == type_name)
}

pub fn exporter(type_name: &str) -> Option<&'static ExporterFactory> {
    exporters().into_iter().find(|f| f.type_name == type_name)
}
