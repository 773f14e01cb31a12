use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

use crate::helper::{HelperSettings, RetrySettings, SendingQueueSettings};

/// `compression:`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

/// `tls:` — TLS to the backend (rustls).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Plain text, no TLS (gRPC only; for otlphttp the `http://` scheme says it). Default false.
    pub insecure: bool,
    /// PEM CA bundle to verify the server with (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Server name to verify instead of the endpoint's host.
    pub server_name_override: Option<String>,
    /// Accept any server certificate (testing only: it defeats TLS; the server must still hold
    /// the key of the certificate it shows).
    pub insecure_skip_verify: bool,
}

impl TlsSettings {
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        if self.cert_file.is_some() != self.key_file.is_some() {
            errors.push(FieldError::new(
                "tls",
                "cert_file and key_file go together (mutual TLS)",
            ));
        }
        for (key, path) in [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    errors.push(FieldError::new(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
    }
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
    pub fn helper_settings(&self) -> HelperSettings {
        HelperSettings {
            sending_queue: self.sending_queue.clone(),
            retry_on_failure: self.retry_on_failure.clone(),
            timeout: self.timeout,
        }
    }

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

fn validate_headers(headers: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            errors.push(FieldError::new(
                format!("headers.{name}"),
                "not a valid header name and value",
            ));
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
    /// Base URL; `/v1/metrics` and `/v1/traces` are appended. Default `http://localhost:4318`.
    pub endpoint: String,
    /// Full URL for metrics, instead of `<endpoint>/v1/metrics`.
    pub metrics_endpoint: Option<String>,
    /// Full URL for traces, instead of `<endpoint>/v1/traces`.
    pub traces_endpoint: Option<String>,
    /// `proto` (default) or `json`.
    pub encoding: HttpEncoding,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub tls: TlsSettings,
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
            encoding: HttpEncoding::Proto,
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            tls: TlsSettings::default(),
            timeout: Duration::from_secs(5),
            retry_on_failure: RetrySettings::default(),
            sending_queue: SendingQueueSettings::default(),
        }
    }
}

impl OtlpHttpConfig {
    pub fn helper_settings(&self) -> HelperSettings {
        HelperSettings {
            sending_queue: self.sending_queue.clone(),
            retry_on_failure: self.retry_on_failure.clone(),
            timeout: self.timeout,
        }
    }

    pub fn signal_url(&self, path: &str, explicit: &Option<String>) -> String {
        explicit
            .clone()
            .unwrap_or_else(|| format!("{}{path}", self.endpoint.trim_end_matches('/')))
    }
}

impl ComponentConfig for OtlpHttpConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.helper_settings().validate();
        for (key, url) in [
            ("endpoint", Some(self.endpoint.clone())),
            ("metrics_endpoint", self.metrics_endpoint.clone()),
            ("traces_endpoint", self.traces_endpoint.clone()),
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
        self.tls.validate(&mut errors);
        errors
    }
}
