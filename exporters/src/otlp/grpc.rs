//! OTLP/gRPC transport: each signal's `Export` method over one tonic channel, with requests
//! encoded before they are queued (so the call passes the bytes through).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::uri::PathAndQuery;
use podscope_core::otlp::{Encoding, RawCodec};
use podscope_core::{Batch, ConsumeError, Signal};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::{Compression, OtlpGrpcConfig};
use super::{rejected_items, request_for, OtlpRequest};
use crate::helper::{Request, Sender, Sent};

pub struct GrpcSender {
    exporter: String,
    channel: Channel,
    metadata: MetadataMap,
    compression: Compression,
}

impl GrpcSender {
    pub fn new(config: &OtlpGrpcConfig, exporter: String) -> anyhow::Result<GrpcSender> {
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
                exporter,
                channel: endpoint.connect_with_connector_lazy(connector),
                metadata: metadata(config)?,
                compression: config.compression,
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
            exporter,
            channel,
            metadata: metadata(config)?,
            compression: config.compression,
        })
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
/// recover), else permanent. A status the server never sent — the connection failed, was reset
/// or closed mid-call, which tonic reports as UNKNOWN with the transport error as its source —
/// is retryable, as the HTTP exporter treats a failed request.
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
        Unknown if std::error::Error::source(status).is_some() => retryable("transport", message),
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
    type Payload = OtlpRequest;

    const PERSISTENT: bool = true;

    /// Always plain protobuf: tonic compresses at send time.
    fn stored_form(&self, request: &OtlpRequest) -> (u8, Bytes) {
        request.stored_form(super::STORED_PROTOBUF)
    }

    fn restore(&self, signal: Signal, format: u8, body: Bytes) -> Result<OtlpRequest, String> {
        OtlpRequest::from_stored(signal, format, super::STORED_PROTOBUF, body)
    }

    fn requests(&self, batch: Batch) -> Result<Vec<Request<OtlpRequest>>, ConsumeError> {
        // tonic compresses at send time (gzip); the protobuf is encoded here, once.
        Ok(vec![request_for(&batch, Encoding::Protobuf, |body| body)])
    }

    async fn send(&self, request: &OtlpRequest) -> Result<Sent, ConsumeError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc.ready().await.map_err(|e| {
            ConsumeError::retryable("unavailable", format!("gRPC channel not ready: {e}"))
        })?;
        let mut call = tonic::Request::new(request.body.clone());
        *call.metadata_mut() = self.metadata.clone();
        let path = PathAndQuery::from_static(request.signal.grpc_export_path());
        let response = grpc
            .unary(call, path, RawCodec)
            .await
            .map_err(|s| classify(&s))?;
        Ok(rejected_items(
            &self.exporter,
            request,
            response.get_ref(),
            Encoding::Protobuf,
        ))
    }
}
