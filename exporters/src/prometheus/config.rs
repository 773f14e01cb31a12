use std::time::Duration;

use podscope_core::server::{AuthSettings, ServerTlsSettings};
use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

/// `exporters: prometheus:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// host:port serving `/metrics`. Default `0.0.0.0:9464`.
    pub endpoint: String,
    /// Prefix for every metric name (e.g. `node`), empty by default.
    pub namespace: String,
    /// Series not updated for this long disappear from the page. Default 5m.
    #[serde(with = "humantime_serde")]
    pub metric_expiration: Duration,
    /// Unit suffixes (`_seconds`, `_bytes`) and `_total` on counters, as the OpenTelemetry
    /// specification translates names. Default true.
    pub add_metric_suffixes: bool,
    /// `otel_scope_name` / `otel_scope_version` labels on every series. Default true.
    pub add_scope_labels: bool,
    pub resource_to_telemetry_conversion: ResourceToTelemetry,
    /// Resource attributes copied onto every series as labels (the rest go to `target_info`).
    /// Default: `host.name`, `container.id`, `podscope.cgroup.path`, `k8s.namespace.name`,
    /// `k8s.pod.name`, `k8s.container.name` — what tells podscope's per-container series apart.
    pub promoted_resource_attributes: Vec<String>,
    /// Serve `/metrics` over TLS (`cert_file`, `key_file`, `client_ca_file` to require client
    /// certificates), as Prometheus' own web config does. Default: plain HTTP.
    pub tls: Option<ServerTlsSettings>,
    /// Require a bearer token and/or basic auth (bcrypt hashes) to scrape. Default: none.
    pub auth: Option<AuthSettings>,
}

/// `resource_to_telemetry_conversion:` — copy every resource attribute onto every series.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceToTelemetry {
    /// Default false.
    pub enabled: bool,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            endpoint: "0.0.0.0:9464".to_string(),
            namespace: String::new(),
            metric_expiration: Duration::from_secs(300),
            add_metric_suffixes: true,
            add_scope_labels: true,
            resource_to_telemetry_conversion: ResourceToTelemetry::default(),
            promoted_resource_attributes: [
                "host.name",
                "container.id",
                "podscope.cgroup.path",
                "k8s.namespace.name",
                "k8s.pod.name",
                "k8s.container.name",
            ]
            .map(str::to_string)
            .to_vec(),
            tls: None,
            auth: None,
        }
    }
}

impl ComponentConfig for PrometheusConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let ok = self
            .endpoint
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            errors.push(FieldError::new(
                "endpoint",
                format!("{:?} is not host:port (e.g. 0.0.0.0:9464)", self.endpoint),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate("tls", &mut errors);
        }
        if let Some(auth) = &self.auth {
            auth.validate("auth", &mut errors);
        }
        if self.metric_expiration.is_zero() {
            errors.push(FieldError::new(
                "metric_expiration",
                "must be greater than 0",
            ));
        }
        if !self.namespace.is_empty()
            && super::names::sanitize_name(&self.namespace) != self.namespace
        {
            errors.push(FieldError::new(
                "namespace",
                "may contain only letters, digits and '_', not starting with a digit",
            ));
        }
        errors
    }
}
