//! OTLP exporters: `otlp` (gRPC), `otlphttp` (HTTP, protobuf or JSON) and `jaeger` (an `otlp`
//! preset for Jaeger, which ingests OTLP natively since 1.35: traces only, default
//! `localhost:4317`). All send through the exporter helper (sending queue, retries with backoff
//! honouring server hints, timeout per attempt).

mod config;
mod grpc;
mod http;
mod insecure;
mod partial;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use podscope_core::component::create_exporter;
use podscope_core::config::parse_component_config;
use podscope_core::{
    BuildContext, ComponentConfig, Exporter, ExporterBuilder, ExporterFactory, FieldError, Signal,
};
use serde::Deserialize;

pub use config::{Compression, HttpEncoding, OtlpGrpcConfig, OtlpHttpConfig, TlsSettings};
pub use grpc::classify as classify_grpc_status;
pub use http::{classify as classify_http_status, retry_after};

use crate::helper::QueuedExporter;
use partial::PartialSuccess;

pub const OTLP: ExporterFactory = ExporterFactory {
    type_name: "otlp",
    description: "Sends metrics and traces over OTLP/gRPC (gzip, TLS, retries, sending queue)",
    signals: &[Signal::Metrics, Signal::Traces],
    create: create_exporter::<OtlpGrpcConfig>,
};

pub const OTLP_HTTP: ExporterFactory = ExporterFactory {
    type_name: "otlphttp",
    description: "Sends metrics and traces over OTLP/HTTP, protobuf or JSON (gzip, TLS, retries)",
    signals: &[Signal::Metrics, Signal::Traces],
    create: create_exporter::<OtlpHttpConfig>,
};

pub const JAEGER: ExporterFactory = ExporterFactory {
    type_name: "jaeger",
    description: "Sends traces to Jaeger over OTLP/gRPC (an otlp preset, default localhost:4317)",
    signals: &[Signal::Traces],
    create: create_exporter::<JaegerConfig>,
};

fn partial(ctx: &BuildContext) -> PartialSuccess {
    PartialSuccess {
        exporter: ctx.id.to_string(),
        telemetry: ctx.telemetry.clone(),
    }
}

impl ExporterBuilder for OtlpGrpcConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let sender = grpc::GrpcSender::new(&self, partial(&ctx))?;
        Ok(QueuedExporter::new(&ctx, self.helper_settings(), sender))
    }
}

impl ExporterBuilder for OtlpHttpConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let sender = http::HttpSender::new(&self, partial(&ctx))?;
        Ok(QueuedExporter::new(&ctx, self.helper_settings(), sender))
    }
}

/// `exporters: jaeger:` — exactly the `otlp` settings; only the factory differs (traces only).
#[derive(Debug, Clone)]
pub struct JaegerConfig(pub OtlpGrpcConfig);

impl<'de> Deserialize<'de> for JaegerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        OtlpGrpcConfig::deserialize(deserializer).map(JaegerConfig)
    }
}

impl ComponentConfig for JaegerConfig {
    fn validate(&self) -> Vec<FieldError> {
        self.0.validate()
    }
}

impl ExporterBuilder for JaegerConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        Box::new(self.0).build(ctx)
    }
}

/// For tests and tools: an `otlp` config from JSON.
pub fn otlp_config(raw: serde_json::Value) -> Result<OtlpGrpcConfig, Vec<FieldError>> {
    parse_component_config(raw)
}
