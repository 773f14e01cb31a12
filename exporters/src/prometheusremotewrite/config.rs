use std::collections::BTreeMap;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

use crate::helper::{RetrySettings, SendingQueueSettings};
use crate::http_client::{validate_headers, validate_proxy_url, validate_tls};
use crate::tls::TlsSettings;

/// `exporters: prometheusremotewrite:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// The remote-write URL (required), e.g. `http://prometheus:9090/api/v1/write`.
    pub endpoint: String,
    /// HTTP headers sent with every request (e.g. authorization, tenant).
    pub headers: BTreeMap<String, String>,
    /// Labels added to every series (a label of the data with the same name wins).
    pub external_labels: BTreeMap<String, String>,
    /// Prefix for every metric name, empty by default.
    pub namespace: String,
    /// Samples per request at most; larger batches are split. Default 2000.
    pub max_samples_per_request: usize,
    /// Resource attributes copied onto every series (see the prometheus exporter).
    pub promoted_resource_attributes: Vec<String>,
    pub resource_to_telemetry_conversion: crate::prometheus::ResourceToTelemetry,
    pub tls: TlsSettings,
    /// Send through this HTTP proxy (`http://host:port`). Unset or empty: the `HTTP_PROXY`,
    /// `HTTPS_PROXY` and `NO_PROXY` environment variables apply.
    pub proxy_url: Option<String>,
    /// Time one request may take. Default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries on every 5xx and on 429, as the remote-write specification asks (never on other
    /// 4xx).
    pub retry_on_failure: RetrySettings,
    pub sending_queue: SendingQueueSettings,
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        RemoteWriteConfig {
            endpoint: String::new(),
            headers: BTreeMap::new(),
            external_labels: BTreeMap::new(),
            namespace: String::new(),
            max_samples_per_request: 2000,
            promoted_resource_attributes: crate::prometheus::PrometheusConfig::default()
                .promoted_resource_attributes,
            resource_to_telemetry_conversion: Default::default(),
            tls: TlsSettings::default(),
            proxy_url: None,
            timeout: Duration::from_secs(5),
            retry_on_failure: RetrySettings::default(),
            sending_queue: SendingQueueSettings::default(),
        }
    }
}

impl ComponentConfig for RemoteWriteConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.helper_settings().validate();
        if self.sending_queue.storage.is_some() {
            // Its requests hold series state of this run (deltas, shards): not kept on disk.
            errors.push(FieldError::new(
                "sending_queue.storage",
                "not supported by prometheusremotewrite (otlp, otlphttp and jaeger only)",
            ));
        }
        let ok = reqwest::Url::parse(&self.endpoint)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            errors.push(FieldError::new(
                "endpoint",
                format!(
                    "{:?} is not an http:// or https:// URL (required)",
                    self.endpoint
                ),
            ));
        }
        if self.max_samples_per_request == 0 {
            errors.push(FieldError::new(
                "max_samples_per_request",
                "must be at least 1",
            ));
        }
        for name in self.external_labels.keys() {
            if crate::prometheus::names::sanitize_label(name) != *name || name.starts_with("__") {
                errors.push(FieldError::new(
                    format!("external_labels.{name}"),
                    "not a valid Prometheus label name",
                ));
            }
        }
        validate_headers(&self.headers, &mut errors);
        validate_tls(&self.tls, &mut errors);
        validate_proxy_url(self.proxy_url.as_deref(), &mut errors);
        errors
    }
}
