//! OTLP/HTTP transport: protobuf (or JSON) bodies POSTed with reqwest, gzip by default.

use std::io::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use podscope_core::{Batch, ConsumeError, Signal};
use prost::Message as _;

use super::config::{Compression, HttpEncoding, OtlpHttpConfig};
use super::partial::PartialSuccess;
use crate::helper::Sender;

pub struct HttpSender {
    client: reqwest::Client,
    metrics_url: String,
    traces_url: String,
    encoding: HttpEncoding,
    compression: Compression,
    partial: PartialSuccess,
}

impl HttpSender {
    pub fn new(config: &OtlpHttpConfig, partial: PartialSuccess) -> anyhow::Result<HttpSender> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes())?,
                reqwest::header::HeaderValue::from_str(value)?,
            );
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5));
        if config.tls.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &config.tls.ca_file {
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
            let mut pem = std::fs::read(cert)?;
            pem.extend_from_slice(&std::fs::read(key)?);
            builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok(HttpSender {
            client: builder.build()?,
            metrics_url: config.signal_url("/v1/metrics", &config.metrics_endpoint),
            traces_url: config.signal_url("/v1/traces", &config.traces_endpoint),
            encoding: config.encoding,
            compression: config.compression,
            partial,
        })
    }
}

/// Seconds in a `Retry-After` header (delay-seconds or an HTTP date).
pub fn retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// HTTP status → retryable (429, 502, 503, 504, honouring `Retry-After`) or permanent.
pub fn classify(status: reqwest::StatusCode, retry: Option<Duration>, body: &str) -> ConsumeError {
    let message = format!(
        "HTTP {status}: {}",
        body.chars().take(200).collect::<String>()
    );
    match status.as_u16() {
        429 | 502 | 503 | 504 => ConsumeError::Retryable {
            reason: match status.as_u16() {
                429 => "http_429",
                502 => "http_502",
                503 => "http_503",
                _ => "http_504",
            },
            message,
            retry_after: retry,
        },
        400 => ConsumeError::permanent("http_400", message),
        401 | 403 => ConsumeError::permanent("http_unauthorized", message),
        404 => ConsumeError::permanent("http_404", message),
        413 => ConsumeError::permanent("http_413", message),
        _ => ConsumeError::permanent("http_error", message),
    }
}

#[async_trait]
impl Sender for HttpSender {
    async fn send(&self, batch: Batch) -> Result<(), ConsumeError> {
        let signal = batch.signal();
        let (url, body) = match (&batch, self.encoding) {
            (Batch::Metrics(rms), HttpEncoding::Proto) => (
                &self.metrics_url,
                ExportMetricsServiceRequest {
                    resource_metrics: rms.to_vec(),
                }
                .encode_to_vec(),
            ),
            (Batch::Traces(rss), HttpEncoding::Proto) => (
                &self.traces_url,
                ExportTraceServiceRequest {
                    resource_spans: rss.to_vec(),
                }
                .encode_to_vec(),
            ),
            (Batch::Metrics(rms), HttpEncoding::Json) => (
                &self.metrics_url,
                serde_json::to_vec(&ExportMetricsServiceRequest {
                    resource_metrics: rms.to_vec(),
                })
                .unwrap_or_default(),
            ),
            (Batch::Traces(rss), HttpEncoding::Json) => (
                &self.traces_url,
                serde_json::to_vec(&ExportTraceServiceRequest {
                    resource_spans: rss.to_vec(),
                })
                .unwrap_or_default(),
            ),
        };
        let content_type = match self.encoding {
            HttpEncoding::Proto => "application/x-protobuf",
            HttpEncoding::Json => "application/json",
        };
        let mut request = self.client.post(url).header("content-type", content_type);
        let body = if self.compression == Compression::Gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&body)
                .and_then(|_| gz.finish())
                .map_err(|e| ConsumeError::permanent("encode", e.to_string()))?
        } else {
            body
        };
        if self.compression == Compression::Gzip {
            request = request.header("content-encoding", "gzip");
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| ConsumeError::retryable("connection", format!("POST {url}: {e}")))?;
        let status = response.status();
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let bytes = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(classify(status, retry, &String::from_utf8_lossy(&bytes)));
        }
        let rejected = match (signal, self.encoding) {
            (Signal::Metrics, HttpEncoding::Proto) => {
                ExportMetricsServiceResponse::decode(bytes.as_ref())
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map(|p| (p.rejected_data_points, p.error_message))
            }
            (Signal::Traces, HttpEncoding::Proto) => {
                ExportTraceServiceResponse::decode(bytes.as_ref())
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map(|p| (p.rejected_spans, p.error_message))
            }
            (Signal::Metrics, HttpEncoding::Json) => {
                serde_json::from_slice::<ExportMetricsServiceResponse>(&bytes)
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map(|p| (p.rejected_data_points, p.error_message))
            }
            (Signal::Traces, HttpEncoding::Json) => {
                serde_json::from_slice::<ExportTraceServiceResponse>(&bytes)
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map(|p| (p.rejected_spans, p.error_message))
            }
        };
        if let Some((count, message)) = rejected {
            self.partial.report(signal, count, &message);
        }
        Ok(())
    }
}
