//! The `prometheusremotewrite` exporter: remote write 1.0 (protobuf `WriteRequest`, snappy,
//! `X-Prometheus-Remote-Write-Version: 0.1.0`), with the same OTel → Prometheus translation as
//! the `prometheus` exporter (names, labels, base units, classic buckets, deltas accumulated),
//! external labels, requests split by sample count, retries on 5xx and 429 only.
//!
//! Each batch is translated once; retries resend the same requests, and only those not yet
//! accepted, so a retry neither double-counts a delta nor resends what Prometheus already took.

mod config;
pub mod request;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use podscope_core::component::create_exporter;
use podscope_core::{
    Batch, BuildContext, ConsumeError, Exporter, ExporterBuilder, ExporterFactory, Signal,
};

pub use config::RemoteWriteConfig;

use crate::helper::{QueuedExporter, Sender};
use crate::prometheus::{Settings, Store};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "prometheusremotewrite",
    description:
        "Sends metrics with Prometheus remote write 1.0 (snappy protobuf, retries on 5xx/429)",
    signals: &[Signal::Metrics],
    create: create_exporter::<RemoteWriteConfig>,
};

impl ExporterBuilder for RemoteWriteConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &self.headers {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes())?,
                reqwest::header::HeaderValue::from_str(value)?,
            );
        }
        let mut client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5));
        if self.tls.insecure_skip_verify {
            client = client.danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &self.tls.ca_file {
            client =
                client.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) {
            let mut pem = std::fs::read(cert)?;
            pem.extend_from_slice(&std::fs::read(key)?);
            client = client.identity(reqwest::Identity::from_pem(&pem)?);
        }
        let store = Store::new(Settings {
            namespace: self.namespace.clone(),
            add_metric_suffixes: true,
            add_scope_labels: true,
            all_resource_attributes: self.resource_to_telemetry_conversion.enabled,
            promoted: self.promoted_resource_attributes.clone(),
            expiration: Duration::from_secs(3600),
        });
        let sender = RemoteWriteSender {
            client: client.build()?,
            endpoint: self.endpoint.clone(),
            external_labels: self.external_labels.clone(),
            max_samples: self.max_samples_per_request,
            state: Mutex::new(State {
                store,
                pending: VecDeque::new(),
            }),
        };
        Ok(QueuedExporter::new(&ctx, self.helper_settings(), sender))
    }
}

/// Requests built for a batch, and which of them the backend has accepted.
struct Translated {
    /// The batch's data address: the same for every retry of that batch.
    batch: usize,
    bodies: Vec<(Vec<u8>, bool)>,
}

struct State {
    store: Store,
    /// Recently translated batches (bounded: retries happen while a batch is in flight).
    pending: VecDeque<Translated>,
}

const PENDING_LIMIT: usize = 64;

struct RemoteWriteSender {
    client: reqwest::Client,
    endpoint: String,
    external_labels: std::collections::BTreeMap<String, String>,
    max_samples: usize,
    state: Mutex<State>,
}

fn batch_address(batch: &Batch) -> usize {
    match batch {
        Batch::Metrics(rms) => Arc::as_ptr(rms) as usize,
        Batch::Traces(rss) => Arc::as_ptr(rss) as usize,
    }
}

impl RemoteWriteSender {
    /// The bodies still to send for `batch`, translating it on first sight.
    fn bodies_to_send(&self, batch: &Batch) -> Result<Vec<(usize, Vec<u8>)>, ConsumeError> {
        let Batch::Metrics(rms) = batch else {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                "remote write takes metrics only",
            ));
        };
        let address = batch_address(batch);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.pending.iter().any(|t| t.batch == address) {
            let now = Instant::now();
            // Only deltas need the history; forget series not seen for an hour.
            state.store.expire(now);
            state.store.apply(rms, now);
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let samples = state.store.updated_samples();
            let bodies =
                request::build_requests(samples, &self.external_labels, now_ms, self.max_samples)
                    .iter()
                    .map(|r| (request::encode(r), false))
                    .collect();
            if state.pending.len() >= PENDING_LIMIT {
                state.pending.pop_front();
            }
            state.pending.push_back(Translated {
                batch: address,
                bodies,
            });
        }
        let translated = state
            .pending
            .iter()
            .find(|t| t.batch == address)
            .expect("just inserted");
        Ok(translated
            .bodies
            .iter()
            .enumerate()
            .filter(|(_, (_, sent))| !sent)
            .map(|(i, (body, _))| (i, body.clone()))
            .collect())
    }

    fn mark_sent(&self, batch: usize, index: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = state.pending.iter_mut().find(|t| t.batch == batch) {
            t.bodies[index].1 = true;
        }
    }

    fn forget(&self, batch: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pending.retain(|t| t.batch != batch);
    }
}

#[async_trait]
impl Sender for RemoteWriteSender {
    async fn send(&self, batch: Batch) -> Result<(), ConsumeError> {
        let address = batch_address(&batch);
        for (index, body) in self.bodies_to_send(&batch)? {
            let response = self
                .client
                .post(&self.endpoint)
                .header("content-encoding", "snappy")
                .header("content-type", "application/x-protobuf")
                .header("x-prometheus-remote-write-version", "0.1.0")
                .header(
                    "user-agent",
                    concat!("podscope/", env!("CARGO_PKG_VERSION")),
                )
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    ConsumeError::retryable("connection", format!("POST {}: {e}", self.endpoint))
                })?;
            let status = response.status();
            if !status.is_success() {
                let retry = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::otlp::retry_after);
                let text = response.text().await.unwrap_or_default();
                let error = crate::otlp::classify_http_status(status, retry, &text);
                if !error.is_retryable() {
                    self.forget(address);
                }
                return Err(error);
            }
            self.mark_sent(address, index);
        }
        self.forget(address);
        Ok(())
    }
}
