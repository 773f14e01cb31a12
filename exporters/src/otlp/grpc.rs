//! OTLP/gRPC transport: the generated OTLP clients over one tonic channel.

use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use podscope_core::{Batch, ConsumeError};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::{Compression, OtlpGrpcConfig};
use super::partial::PartialSuccess;
use crate::helper::Sender;

pub struct GrpcSender {
    channel: Channel,
    metadata: MetadataMap,
    compression: Compression,
    partial: PartialSuccess,
}

impl GrpcSender {
    pub fn new(config: &OtlpGrpcConfig, partial: PartialSuccess) -> anyhow::Result<GrpcSender> {
        let (url, tls) = config.url();
        if tls && config.tls.insecure_skip_verify {
            // Our connector does the TLS; tonic must not (see `insecure.rs`).
            let plain = url.replacen("https://", "http://", 1);
            let endpoint = Endpoint::from_shared(plain)?.connect_timeout(Duration::from_secs(5));
            let identity = match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(cert), Some(key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                _ => None,
            };
            let connector = super::insecure::SkipVerifyConnector::new(
                identity,
                config.tls.server_name_override.clone(),
            )?;
            return Ok(GrpcSender {
                channel: endpoint.connect_with_connector_lazy(connector),
                metadata: metadata(config)?,
                compression: config.compression,
                partial,
            });
        }
        let mut endpoint =
            Endpoint::from_shared(url.clone())?.connect_timeout(Duration::from_secs(5));
        if tls {
            let mut tls_config = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &config.tls.ca_file {
                tls_config = tls_config.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
                tls_config = tls_config.identity(Identity::from_pem(
                    std::fs::read(cert)?,
                    std::fs::read(key)?,
                ));
            }
            if let Some(name) = &config.tls.server_name_override {
                tls_config = tls_config.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls_config)?;
        }
        // Lazy: a backend that is down at start is retried like any other failure.
        let channel = endpoint.connect_lazy();
        Ok(GrpcSender {
            channel,
            metadata: metadata(config)?,
            compression: config.compression,
            partial,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request
    }
}

/// `headers:` as gRPC metadata.
fn metadata(config: &OtlpGrpcConfig) -> anyhow::Result<MetadataMap> {
    let mut metadata = MetadataMap::new();
    for (name, value) in &config.headers {
        let key = MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())?;
        metadata.insert(key, MetadataValue::try_from(value.as_str())?);
    }
    Ok(metadata)
}

/// gRPC status → retryable or permanent, as the OTLP specification lists them. A `RetryInfo`
/// detail sets the wait; RESOURCE_EXHAUSTED is retryable only with one (the server says it can
/// recover), else permanent.
pub fn classify(status: &tonic::Status) -> ConsumeError {
    use tonic::Code::*;
    use tonic_types::StatusExt as _;
    let message = format!("{}: {}", status.code(), status.message());
    let retry_info = status.get_details_retry_info();
    let hint = retry_info.as_ref().and_then(|r| r.retry_delay);
    let retryable = |reason: &'static str, message: String| ConsumeError::Retryable {
        reason,
        message,
        retry_after: hint,
    };
    match status.code() {
        ResourceExhausted if retry_info.is_some() => retryable("resource_exhausted", message),
        ResourceExhausted => ConsumeError::permanent("resource_exhausted", message),
        Unavailable => retryable("unavailable", message),
        DeadlineExceeded => retryable("deadline_exceeded", message),
        Aborted => retryable("aborted", message),
        Cancelled => retryable("cancelled", message),
        OutOfRange => retryable("out_of_range", message),
        DataLoss => retryable("data_loss", message),
        InvalidArgument => ConsumeError::permanent("invalid_argument", message),
        Unauthenticated => ConsumeError::permanent("unauthenticated", message),
        PermissionDenied => ConsumeError::permanent("permission_denied", message),
        Unimplemented => ConsumeError::permanent("unimplemented", message),
        _ => ConsumeError::permanent("grpc_error", message),
    }
}

#[async_trait]
impl Sender for GrpcSender {
    async fn send(&self, batch: Batch) -> Result<(), ConsumeError> {
        match batch {
            Batch::Metrics(rms) => {
                let mut client = MetricsServiceClient::new(self.channel.clone());
                if self.compression == Compression::Gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                let request = ExportMetricsServiceRequest {
                    resource_metrics: rms.to_vec(),
                };
                let response = client
                    .export(self.request(request))
                    .await
                    .map_err(|s| classify(&s))?;
                if let Some(p) = response.into_inner().partial_success {
                    self.partial.report(
                        podscope_core::Signal::Metrics,
                        p.rejected_data_points,
                        &p.error_message,
                    );
                }
            }
            Batch::Traces(rss) => {
                let mut client = TraceServiceClient::new(self.channel.clone());
                if self.compression == Compression::Gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                let request = ExportTraceServiceRequest {
                    resource_spans: rss.to_vec(),
                };
                let response = client
                    .export(self.request(request))
                    .await
                    .map_err(|s| classify(&s))?;
                if let Some(p) = response.into_inner().partial_success {
                    self.partial.report(
                        podscope_core::Signal::Traces,
                        p.rejected_spans,
                        &p.error_message,
                    );
                }
            }
        }
        Ok(())
    }
}
