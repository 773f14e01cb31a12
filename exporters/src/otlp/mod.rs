//! OTLP exporters: `otlp` (gRPC), `otlphttp` (HTTP, protobuf or JSON) and `jaeger` (an `otlp`
//! preset for Jaeger, which ingests OTLP natively since 1.35: traces only, default
//! `localhost:4317`). All send through the exporter helper (sending queue, retries with backoff
//! honouring server hints, timeout per attempt). A batch is encoded once, into an
//! [`OtlpRequest`], before it is queued; the encoding of each signal is
//! [`podscope_core::otlp`]'s, shared with the `otlp` receiver.

mod config;
mod grpc;
mod http;
mod insecure;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use podscope_core::component::create_exporter;
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, ComponentConfig, ComponentReference, Exporter, ExporterBuilder,
    ExporterFactory, FieldError, Signal,
};
use serde::Deserialize;

use bytes::Bytes;
use podscope_core::otlp::{Encoding, OtlpSignal};

pub use config::{Compression, HttpEncoding, OtlpGrpcConfig, OtlpHttpConfig};
pub use grpc::classify as classify_grpc_status;
pub use http::is_retryable as is_retryable_http_status;

use crate::helper::{QueuedExporter, Request, Sent};

pub const OTLP: ExporterFactory = ExporterFactory {
    type_name: "otlp",
    description:
        "Sends metrics, traces, logs and profiles over OTLP/gRPC (gzip, TLS, retries, sending queue)",
    signals: &[Signal::Metrics, Signal::Traces, Signal::Profiles, Signal::Logs],
    create: create_exporter::<OtlpGrpcConfig>,
};

pub const OTLP_HTTP: ExporterFactory = ExporterFactory {
    type_name: "otlphttp",
    description:
        "Sends metrics, traces, logs and profiles over OTLP/HTTP, protobuf or JSON (gzip, TLS, retries)",
    signals: &[Signal::Metrics, Signal::Traces, Signal::Profiles, Signal::Logs],
    create: create_exporter::<OtlpHttpConfig>,
};

pub const JAEGER: ExporterFactory = ExporterFactory {
    type_name: "jaeger",
    description: "Sends traces to Jaeger over OTLP/gRPC (an otlp preset, default localhost:4317)",
    signals: &[Signal::Traces],
    create: create_exporter::<JaegerConfig>,
};

/// An export request as it waits in the sending queue: encoded (and for HTTP compressed) once.
pub struct OtlpRequest {
    signal: &'static dyn OtlpSignal,
    body: Bytes,
}

impl OtlpRequest {
    /// What a persistent queue keeps: the body as sent, tagged with `format`.
    fn stored_form(&self, format: u8) -> (u8, Bytes) {
        (format, self.body.clone())
    }

    /// The request back from a persistent queue, if it was stored in `format`.
    fn from_stored(
        signal: Signal,
        stored_format: u8,
        format: u8,
        body: Bytes,
    ) -> Result<OtlpRequest, String> {
        if stored_format != format {
            return Err(format!(
                "stored in format {} ({}), but this exporter now sends {} ({}): its encoding or compression changed",
                stored_format,
                format_name(stored_format),
                format,
                format_name(format)
            ));
        }
        Ok(OtlpRequest {
            signal: podscope_core::otlp::otlp(signal),
            body,
        })
    }
}

/// Format tags of stored OTLP requests: what the body is.
const STORED_PROTOBUF: u8 = 1;
const STORED_PROTOBUF_GZIP: u8 = 2;
const STORED_JSON: u8 = 3;
const STORED_JSON_GZIP: u8 = 4;

fn format_name(format: u8) -> &'static str {
    match format {
        STORED_PROTOBUF => "protobuf",
        STORED_PROTOBUF_GZIP => "gzip-compressed protobuf",
        STORED_JSON => "JSON",
        STORED_JSON_GZIP => "gzip-compressed JSON",
        _ => "unknown",
    }
}

/// The request for a batch, encoded with `encoding` and passed through `compress`.
fn request_for(
    batch: &Batch,
    encoding: Encoding,
    compress: impl FnOnce(Bytes) -> Bytes,
) -> Request<OtlpRequest> {
    let signal = podscope_core::otlp::otlp(batch.signal());
    let body = compress(signal.encode_request(batch, encoding));
    Request::unordered(OtlpRequest { signal, body }, batch.item_count())
}

/// What the backend's (successful) response says it rejected: logged here, counted by the
/// helper. A response that cannot be read still means the request was taken.
fn rejected_items(exporter: &str, request: &OtlpRequest, body: &[u8], encoding: Encoding) -> Sent {
    let partial = match request.signal.decode_response(body, encoding) {
        Ok(Some(partial)) => partial,
        Ok(None) => return Sent::default(),
        Err(error) => {
            tracing::warn!(exporter, %error, "backend accepted a request with an unreadable response");
            return Sent::default();
        }
    };
    tracing::warn!(exporter, signal = %request.signal.signal(), rejected = partial.rejected, message = partial.message, "backend rejected part of a request");
    Sent {
        rejected: partial.rejected.max(0) as usize,
    }
}

impl ExporterBuilder for OtlpGrpcConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let sender = grpc::GrpcSender::new(&self, ctx.id.to_string())?;
        QueuedExporter::new(&ctx, self.helper_settings(), sender).map(|e| e as _)
    }

    fn references(&self) -> Vec<ComponentReference> {
        self.sending_queue.storage_reference().into_iter().collect()
    }
}

impl ExporterBuilder for OtlpHttpConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let sender = http::HttpSender::new(&self, ctx.id.to_string())?;
        QueuedExporter::new(&ctx, self.helper_settings(), sender).map(|e| e as _)
    }

    fn references(&self) -> Vec<ComponentReference> {
        self.sending_queue.storage_reference().into_iter().collect()
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

    fn references(&self) -> Vec<ComponentReference> {
        self.0.references()
    }
}

/// For tests and tools: an `otlp` config from JSON.
pub fn otlp_config(raw: serde_json::Value) -> Result<OtlpGrpcConfig, Vec<FieldError>> {
    parse_component_config(raw)
}
