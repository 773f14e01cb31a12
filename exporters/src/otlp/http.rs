//! OTLP/HTTP transport: protobuf (or JSON) bodies, gzip by default, encoded and compressed once
//! before they are queued, POSTed with the shared HTTP client.

use std::io::Write as _;

use async_trait::async_trait;
use bytes::Bytes;
use podscope_core::otlp::Encoding;
use podscope_core::{Batch, ConsumeError, Signal};

use super::config::{Compression, HttpEncoding, OtlpHttpConfig};
use super::{rejected_items, request_for, OtlpRequest};
use crate::helper::{Request, Sender, Sent};
use crate::http_client;

pub struct HttpSender {
    exporter: String,
    client: reqwest::Client,
    metrics_url: String,
    traces_url: String,
    profiles_url: String,
    logs_url: String,
    encoding: Encoding,
    compression: Compression,
}

impl HttpSender {
    pub fn new(config: &OtlpHttpConfig, exporter: String) -> anyhow::Result<HttpSender> {
        Ok(HttpSender {
            exporter,
            client: http_client::build(&config.headers, &config.tls, config.proxy_url.as_deref())?,
            metrics_url: config.signal_url(Signal::Metrics),
            traces_url: config.signal_url(Signal::Traces),
            profiles_url: config.signal_url(Signal::Profiles),
            logs_url: config.signal_url(Signal::Logs),
            encoding: match config.encoding {
                HttpEncoding::Proto => Encoding::Protobuf,
                HttpEncoding::Json => Encoding::Json,
            },
            compression: config.compression,
        })
    }

    /// The format tag of what this sender's requests carry.
    fn stored_format(&self) -> u8 {
        match (self.encoding, self.compression) {
            (Encoding::Protobuf, Compression::None) => super::STORED_PROTOBUF,
            (Encoding::Protobuf, Compression::Gzip) => super::STORED_PROTOBUF_GZIP,
            (Encoding::Json, Compression::None) => super::STORED_JSON,
            (Encoding::Json, Compression::Gzip) => super::STORED_JSON_GZIP,
        }
    }

    fn url(&self, signal: Signal) -> &str {
        match signal {
            Signal::Metrics => &self.metrics_url,
            Signal::Traces => &self.traces_url,
            Signal::Profiles => &self.profiles_url,
            Signal::Logs => &self.logs_url,
        }
    }
}

/// The statuses OTLP/HTTP says to retry (429, 502, 503, 504); every other failure is permanent.
pub fn is_retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

fn gzip(body: Bytes) -> Bytes {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&body)
        .and_then(|_| gz.finish())
        .map(Bytes::from)
        .expect("writing to a Vec cannot fail")
}

#[async_trait]
impl Sender for HttpSender {
    type Payload = OtlpRequest;

    const PERSISTENT: bool = true;

    fn stored_form(&self, request: &OtlpRequest) -> (u8, Bytes) {
        request.stored_form(self.stored_format())
    }

    fn restore(&self, signal: Signal, format: u8, body: Bytes) -> Result<OtlpRequest, String> {
        OtlpRequest::from_stored(signal, format, self.stored_format(), body)
    }

    fn requests(&self, batch: Batch) -> Result<Vec<Request<OtlpRequest>>, ConsumeError> {
        let compression = self.compression;
        Ok(vec![request_for(
            &batch,
            self.encoding,
            |body| match compression {
                Compression::Gzip => gzip(body),
                Compression::None => body,
            },
        )])
    }

    async fn send(&self, request: &OtlpRequest) -> Result<Sent, ConsumeError> {
        let url = self.url(request.signal.signal());
        let mut post = self
            .client
            .post(url)
            .header("content-type", self.encoding.content_type());
        if self.compression == Compression::Gzip {
            post = post.header("content-encoding", "gzip");
        }
        let response = post
            .body(request.body.clone())
            .send()
            .await
            .map_err(|e| http_client::transport_error(url, &e))?;
        let status = response.status();
        let retry_after = http_client::retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(http_client::refused(
                status,
                retry_after,
                &String::from_utf8_lossy(&body),
                is_retryable,
            ));
        }
        Ok(rejected_items(
            &self.exporter,
            request,
            &body,
            self.encoding,
        ))
    }
}
