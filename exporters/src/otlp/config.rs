use std::collections::BTreeMap;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError, Signal};
use serde::Deserialize;

use crate::helper::{RetrySettings, SendingQueueSettings};
use crate::http_client::{validate_headers, validate_proxy_url, validate_tls};
use crate::tls::TlsSettings;

/// `compression:`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

/// `exporters: otlp:` (gRPC) and `jaeger:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpGrpcConfig {
    /// `host:port` (TLS unless `tls.insecure`), or `http://host:port` / `https://host:port`.
    /// Default `localhost:4317`.
    pub endpoint: String,
    /// gRPC metadata sent with every request (e.g. `authorization: Bearer …`).
    pub headers: BTreeMap<String, String>,
    /// `gzip` (default) or `none`.
    pub compression: Compression,
    pub tls: TlsSettings,
    /// Time one export attempt may take. Default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retry_on_failure: RetrySettings,
    pub sending_queue: SendingQueueSettings,
}

impl Default for OtlpGrpcConfig {
    fn default() -> Self {
        OtlpGrpcConfig {
            endpoint: "localhost:4317".to_string(),
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            tls: TlsSettings::default(),
            timeout: Duration::from_secs(5),
            retry_on_failure: RetrySettings::default(),
            sending_queue: SendingQueueSettings::default(),
        }
    }
}

impl OtlpGrpcConfig {
    /// The URL to connect to and whether it uses TLS.
    pub fn url(&self) -> (String, bool) {
        if let Some(rest) = self.endpoint.strip_prefix("http://") {
            (format!("http://{rest}"), false)
        } else if let Some(rest) = self.endpoint.strip_prefix("https://") {
            (format!("https://{rest}"), true)
        } else if self.tls.insecure {
            (format!("http://{}", self.endpoint), false)
        } else {
            (format!("https://{}", self.endpoint), true)
        }
    }
}

impl ComponentConfig for OtlpGrpcConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.helper_settings().validate();
        let (url, _) = self.url();
        if url
            .parse::<http::Uri>()
            .map(|u| u.host().is_none() || u.port().is_none())
            .unwrap_or(true)
        {
            errors.push(FieldError::new(
                "endpoint",
                format!(
                    "{:?} is not host:port or http(s)://host:port",
                    self.endpoint
                ),
            ));
        }
        validate_headers(&self.headers, &mut errors);
        self.tls.validate(&mut errors);
        errors
    }
}

/// `exporters: otlphttp:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpHttpConfig {
    /// Base URL; `/v1/metrics`, `/v1/traces`, `/v1/logs` and `/v1development/profiles` are
    /// appended.
    /// Default `http://localhost:4318`.
    pub endpoint: String,
    /// Full URL for metrics, instead of `<endpoint>/v1/metrics`.
    pub metrics_endpoint: Option<String>,
    /// Full URL for traces, instead of `<endpoint>/v1/traces`.
    pub traces_endpoint: Option<String>,
    /// Full URL for profiles, instead of `<endpoint>/v1development/profiles`.
    pub profiles_endpoint: Option<String>,
    /// Full URL for logs, instead of `<endpoint>/v1/logs`.
    pub logs_endpoint: Option<String>,
    /// `proto` (default) or `json`.
    pub encoding: HttpEncoding,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub tls: TlsSettings,
    /// Send through this HTTP proxy (`http://host:port`). Unset or empty: the `HTTP_PROXY`,
    /// `HTTPS_PROXY` and `NO_PROXY` environment variables apply.
    pub proxy_url: Option<String>,
    /// Time one export attempt may take. Default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub retry_on_failure: RetrySettings,
    pub sending_queue: SendingQueueSettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpEncoding {
    #[default]
    Proto,
    Json,
}

impl Default for OtlpHttpConfig {
    fn default() -> Self {
        OtlpHttpConfig {
            endpoint: "http://localhost:4318".to_string(),
            metrics_endpoint: None,
            traces_endpoint: None,
            profiles_endpoint: None,
            logs_endpoint: None,
            encoding: HttpEncoding::Proto,
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            tls: TlsSettings::default(),
            proxy_url: None,
            timeout: Duration::from_secs(5),
            retry_on_failure: RetrySettings::default(),
            sending_queue: SendingQueueSettings::default(),
        }
    }
}

impl OtlpHttpConfig {
    /// Where `signal` is sent: its own `*_endpoint`, or the OTLP path under `endpoint`.
    pub fn signal_url(&self, signal: Signal) -> String {
        let explicit = match signal {
            Signal::Metrics => &self.metrics_endpoint,
            Signal::Traces => &self.traces_endpoint,
            Signal::Profiles => &self.profiles_endpoint,
            Signal::Logs => &self.logs_endpoint,
        };
        explicit.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                self.endpoint.trim_end_matches('/'),
                podscope_core::otlp::otlp(signal).http_path()
            )
        })
    }
}

impl ComponentConfig for OtlpHttpConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.helper_settings().validate();
        for (key, url) in [
            ("endpoint", Some(self.endpoint.clone())),
            ("metrics_endpoint", self.metrics_endpoint.clone()),
            ("traces_endpoint", self.traces_endpoint.clone()),
            ("profiles_endpoint", self.profiles_endpoint.clone()),
            ("logs_endpoint", self.logs_endpoint.clone()),
        ] {
            if let Some(url) = url {
                let ok = reqwest::Url::parse(&url)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
                if !ok {
                    errors.push(FieldError::new(
                        key,
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        validate_headers(&self.headers, &mut errors);
        validate_tls(&self.tls, &mut errors);
        validate_proxy_url(self.proxy_url.as_deref(), &mut errors);
        errors
    }
}
