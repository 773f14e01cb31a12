//! The `prometheus` exporter: a scrape endpoint (`/metrics`) serving every series it received,
//! translated as the OpenTelemetry specification describes (names and labels sanitized, unit
//! suffixes, `_total` on monotonic counters, `otel_scope_*` labels, resource attributes in
//! `target_info` with the configured ones promoted to labels), exponential histograms as classic
//! buckets, deltas accumulated, values in base units. Text format 0.0.4, or OpenMetrics 1.0 when
//! the scraper's `Accept` asks for it. Series not updated for `metric_expiration` disappear.
//!
//! With `tls:` the endpoint serves HTTPS (client certificates required when `client_ca_file` is
//! set), and with `auth:` a scrape needs a bearer token or basic-auth credentials (401 with
//! `WWW-Authenticate` otherwise), as Prometheus' own web config offers.
//!
//! The parts, shared with `prometheusremotewrite`: `translate` (OTLP → observations, with the
//! naming rules of `names`), `store` (the series state: deltas accumulated, expiry), `render`
//! (series → samples → the text formats) and `exponential` (exponential histograms).

mod config;
mod exponential;
pub mod names;
pub mod render;
mod store;
#[cfg(test)]
mod tests;
mod translate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use podscope_core::component::create_exporter;
use podscope_core::server::{AuthSettings, Authenticator, ServerTlsSettings, TlsListener};
use podscope_core::telemetry::{AgentTelemetry, ItemReasonLabels};
use podscope_core::{
    Batch, BuildContext, Component, ConsumeError, Consumer, Exporter, ExporterBuilder,
    ExporterFactory, Signal,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{PrometheusConfig, ResourceToTelemetry};
pub use store::{Family, Kind, Labels, Series, Settings, Store, Value};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "prometheus",
    description: "Serves metrics on a Prometheus scrape endpoint (text 0.0.4 or OpenMetrics 1.0)",
    signals: &[Signal::Metrics],
    create: create_exporter::<PrometheusConfig>,
};

impl ExporterBuilder for PrometheusConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        Ok(Arc::new(PrometheusExporter::new(*self, &ctx)))
    }
}

pub struct PrometheusExporter {
    id: String,
    endpoint: String,
    tls: Option<ServerTlsSettings>,
    auth: Option<AuthSettings>,
    store: Arc<Mutex<Store>>,
    telemetry: AgentTelemetry,
    stop: CancellationToken,
    server: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    bound: Mutex<Option<SocketAddr>>,
}

impl PrometheusExporter {
    pub fn new(config: PrometheusConfig, ctx: &BuildContext) -> Self {
        let settings = Settings {
            namespace: config.namespace.clone(),
            add_metric_suffixes: config.add_metric_suffixes,
            add_scope_labels: config.add_scope_labels,
            all_resource_attributes: config.resource_to_telemetry_conversion.enabled,
            promoted: config.promoted_resource_attributes.clone(),
            expiration: config.metric_expiration,
        };
        PrometheusExporter {
            id: ctx.id.to_string(),
            endpoint: config.endpoint,
            tls: config.tls,
            auth: config.auth,
            store: Arc::new(Mutex::new(Store::new(settings))),
            telemetry: ctx.telemetry.clone(),
            stop: CancellationToken::new(),
            server: tokio::sync::Mutex::new(None),
            bound: Mutex::new(None),
        }
    }

    /// Where `/metrics` is served, once started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page a scraper would get now.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        store.expire(Instant::now());
        store.render(openmetrics)
    }
}

#[async_trait]
impl Consumer for PrometheusExporter {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        let Batch::Metrics(resource_metrics) = &batch else {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                "the prometheus exporter takes metrics only",
            ));
        };
        let taken = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(resource_metrics, Instant::now());
        self.telemetry
            .exporter_sent
            .get_or_create(&AgentTelemetry::items(&self.id, Signal::Metrics))
            .inc_by(taken as u64);
        let untranslatable = batch.item_count().saturating_sub(taken);
        if untranslatable > 0 {
            self.telemetry
                .exporter_dropped
                .get_or_create(&ItemReasonLabels {
                    component: self.id.clone(),
                    signal: Signal::Metrics.into(),
                    reason: "untranslatable".into(),
                })
                .inc_by(untranslatable as u64);
        }
        Ok(())
    }
}

#[async_trait]
impl Component for PrometheusExporter {
    async fn start(&self) -> anyhow::Result<()> {
        // Certificates and credentials are read now, so a bad file stops the start, named.
        let tls = self
            .tls
            .as_ref()
            .map(|tls| {
                tls.load(
                    &format!("exporters.{}.tls", self.id),
                    &[b"http/1.1"],
                    &self.telemetry,
                )
            })
            .transpose()?;
        let auth = self
            .auth
            .as_ref()
            .map(|auth| {
                Authenticator::new(auth, &format!("exporters.{}.auth", self.id)).map(Arc::new)
            })
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(&self.endpoint)
            .await
            .with_context(|| {
                format!(
                    "exporters.{}.endpoint: cannot listen on {}",
                    self.id, self.endpoint
                )
            })?;
        let address = listener.local_addr()?;
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(address);
        let app = Router::new()
            .route("/metrics", get(scrape))
            .with_state(ScrapeState {
                store: self.store.clone(),
                auth,
            });
        let stop = self.stop.clone();
        let id = self.id.clone();
        let secured = tls.is_some();
        *self.server.lock().await = Some(tokio::spawn(async move {
            let served = match tls {
                Some(tls) => match TlsListener::new(listener, tls) {
                    Ok(listener) => {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                    }
                    Err(e) => Err(e),
                },
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(exporter = %id, error = %e, "Prometheus endpoint stopped");
            }
        }));
        tracing::info!(exporter = %self.id, %address, tls = secured, "Prometheus metrics at /metrics");
        Ok(())
    }

    async fn shutdown(&self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(server) = self.server.lock().await.take() {
            server.await?;
        }
        Ok(())
    }
}

impl Exporter for PrometheusExporter {}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct ScrapeState {
    store: Arc<Mutex<Store>>,
    /// Credentials a scrape must carry, when `auth:` is set.
    auth: Option<Arc<Authenticator>>,
}

async fn scrape(State(state): State<ScrapeState>, headers: HeaderMap) -> Response {
    if let Some(auth) = &state.auth {
        if let Err(refused) = auth.check(&headers) {
            let mut response =
                (StatusCode::UNAUTHORIZED, format!("{}\n", refused.message)).into_response();
            for challenge in refused.challenges {
                response.headers_mut().append(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            return response;
        }
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let body = {
        let mut store = state.store.lock().unwrap_or_else(|e| e.into_inner());
        store.expire(Instant::now());
        store.render(openmetrics)
    };
    (
        [(
            header::CONTENT_TYPE,
            if openmetrics { OPENMETRICS } else { TEXT },
        )],
        body,
    )
        .into_response()
}
