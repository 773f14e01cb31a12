//! The `prometheusremotewrite` exporter: remote write 1.0 (protobuf `WriteRequest`, snappy,
//! `X-Prometheus-Remote-Write-Version: 0.1.0`), with the same OTel → Prometheus translation and
//! series state as the `prometheus` exporter (names, labels, base units, classic buckets, deltas
//! accumulated), external labels, samples stamped with their point's time, requests split by
//! sample count, retries on every 5xx and on 429.
//!
//! A batch becomes requests once, when the sending queue takes it: the store takes in its deltas
//! then and never again, and retries resend those requests as they are. Series are sharded over
//! the sending queue's consumers (one shard each), as Prometheus' own remote write does, so that
//! each series' samples arrive in time order even with retries in flight.

mod config;
pub mod request;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use podscope_core::component::create_exporter;
use podscope_core::{
    Batch, BuildContext, ConsumeError, Exporter, ExporterBuilder, ExporterFactory, Signal,
};

pub use config::RemoteWriteConfig;

use crate::helper::{QueuedExporter, Request, Sender, Sent};
use crate::http_client;
use crate::prometheus::{Settings, Store};

pub const FACTORY: ExporterFactory = ExporterFactory {
    type_name: "prometheusremotewrite",
    description:
        "Sends metrics with Prometheus remote write 1.0 (snappy protobuf, retries on 5xx/429)",
    signals: &[Signal::Metrics],
    create: create_exporter::<RemoteWriteConfig>,
};

/// Series not updated for this long are forgotten: only deltas need the history.
const SERIES_EXPIRATION: Duration = Duration::from_secs(3600);

impl ExporterBuilder for RemoteWriteConfig {
    fn build(self: Box<Self>, ctx: BuildContext) -> anyhow::Result<Arc<dyn Exporter>> {
        let store = Store::new(Settings {
            namespace: self.namespace.clone(),
            add_metric_suffixes: true,
            add_scope_labels: true,
            all_resource_attributes: self.resource_to_telemetry_conversion.enabled,
            promoted: self.promoted_resource_attributes.clone(),
            expiration: SERIES_EXPIRATION,
        });
        let queue = &self.sending_queue;
        let sender = RemoteWriteSender {
            client: http_client::build(&self.headers, &self.tls, self.proxy_url.as_deref())?,
            endpoint: self.endpoint.clone(),
            external_labels: self.external_labels.clone(),
            max_samples: self.max_samples_per_request,
            shards: if queue.enabled {
                queue.num_consumers
            } else {
                1
            },
            store: Mutex::new(store),
        };
        QueuedExporter::new(&ctx, self.helper_settings(), sender).map(|e| e as _)
    }
}

/// What remote write retries: every 5xx and 429; any other status is permanent.
pub fn is_retryable(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

struct RemoteWriteSender {
    client: reqwest::Client,
    endpoint: String,
    external_labels: std::collections::BTreeMap<String, String>,
    max_samples: usize,
    shards: usize,
    store: Mutex<Store>,
}

#[async_trait]
impl Sender for RemoteWriteSender {
    /// One snappy-compressed `WriteRequest`.
    type Payload = Bytes;

    const ORDERED: bool = true;

    fn requests(&self, batch: Batch) -> Result<Vec<Request<Bytes>>, ConsumeError> {
        let Batch::Metrics(rms) = &batch else {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                "remote write takes metrics only",
            ));
        };
        let now = Instant::now();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        store.expire(now);
        store.apply(rms, now);
        Ok(request::build_requests(
            &store,
            &self.external_labels,
            now_ms,
            self.shards,
            self.max_samples,
        )
        .into_iter()
        .map(|(shard, write, items)| Request {
            payload: Bytes::from(request::encode(&write)),
            items,
            order_key: shard as u64,
        })
        .collect())
    }

    async fn send(&self, body: &Bytes) -> Result<Sent, ConsumeError> {
        let response = self
            .client
            .post(&self.endpoint)
            .header("content-encoding", "snappy")
            .header("content-type", "application/x-protobuf")
            .header("x-prometheus-remote-write-version", "0.1.0")
            .body(body.clone())
            .send()
            .await
            .map_err(|e| http_client::transport_error(&self.endpoint, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Sent::default());
        }
        let retry_after = http_client::retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        Err(http_client::refused(
            status,
            retry_after,
            &text,
            is_retryable,
        ))
    }
}
