//! The pieces every podscope component shares: the OTLP batch that flows through pipelines, the
//! component traits and factories, bounded queues, component configuration helpers and the agent's
//! own telemetry.
//!
//! This crate must stay small and free of any particular receiver, processor or exporter: those live
//! in `receiver/`, `processors/` and `exporters/`, and the root crate wires them together.

pub mod admission;
pub mod backoff;
pub mod batch;
pub mod component;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod health;
pub mod otlp;
pub mod profiles;
pub mod queue;
pub mod server;
pub mod session;
pub mod telemetry;

pub use batch::{Batch, Signal};
pub use component::{
    BuildContext, Capabilities, Component, ComponentId, ComponentKind, ComponentReference,
    Exporter, ExporterBuilder, ExporterFactory, Extension, ExtensionBuilder, ExtensionFactory,
    Extensions, Processor, ProcessorBuilder, ProcessorFactory, Receiver, ReceiverBuilder,
    ReceiverConsumers, ReceiverFactory, SharedState,
};
pub use config::{ComponentConfig, FieldError};
pub use consumer::{ConsumeError, Consumer};
pub use opentelemetry_proto as proto;
