//! What a `file_storage` holds, in the agent's own telemetry: per storage, queue
//! (`exporter/<id>`, as the queue metrics name it) and signal, the bytes, requests and items of
//! its queue files, and the files set aside as corrupt.

use podscope_core::telemetry::{AgentTelemetry, SignalLabel};
use podscope_core::{ComponentId, Signal};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::disk_queue::StoredRequest;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoredLabels {
    /// The extension's id (`file_storage`, `file_storage/backup`).
    pub storage: String,
    /// `exporter/<id>`.
    pub queue: String,
    pub signal: SignalLabel,
}

/// The instruments every `file_storage` of the agent shares (registered once).
#[derive(Clone, Default)]
pub struct StorageMetrics {
    bytes: Family<StoredLabels, Gauge>,
    requests: Family<StoredLabels, Gauge>,
    items: Family<StoredLabels, Gauge>,
    corrupt: Family<StoredLabels, Counter>,
}

impl StorageMetrics {
    /// The instruments, registered in `telemetry` by the first `file_storage` built and shared
    /// by the others through `shared` (one registration per metric name).
    pub fn shared(
        shared: &podscope_core::component::SharedState,
        telemetry: &AgentTelemetry,
    ) -> anyhow::Result<StorageMetrics> {
        let key = ComponentId::new("FileStorageMetrics", None);
        let metrics = shared.get_or_insert(&key, || Ok(StorageMetrics::registered(telemetry)))?;
        Ok(StorageMetrics::clone(&metrics))
    }

    fn registered(telemetry: &AgentTelemetry) -> StorageMetrics {
        let metrics = StorageMetrics::default();
        telemetry.register(
            "file_storage_bytes",
            "Bytes of the queue files a file_storage holds (header and payload, as on disk)",
            metrics.bytes.clone(),
        );
        telemetry.register(
            "file_storage_requests",
            "Requests (one file each) a file_storage holds for an exporter's sending queue",
            metrics.requests.clone(),
        );
        telemetry.register(
            "file_storage_items",
            "Items in the requests a file_storage holds",
            metrics.items.clone(),
        );
        telemetry.register(
            "file_storage_corrupt_requests",
            "Queue files that failed their checks, set aside as .corrupt and skipped",
            metrics.corrupt.clone(),
        );
        metrics
    }

    /// The share of the queue of component `owner` in storage `storage`.
    pub fn for_queue(&self, storage: &str, owner: &str) -> QueueMetrics {
        QueueMetrics {
            metrics: self.clone(),
            storage: storage.to_string(),
            queue: format!("exporter/{owner}"),
        }
    }
}

/// One queue's series, kept equal to its files: a request counts from the moment its file is
/// in place (written, or found at start) until it is deleted or set aside.
#[derive(Clone)]
pub struct QueueMetrics {
    metrics: StorageMetrics,
    storage: String,
    queue: String,
}

impl QueueMetrics {
    fn labels(&self, signal: Signal) -> StoredLabels {
        StoredLabels {
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            signal: signal.into(),
        }
    }

    pub(super) fn held(&self, request: &StoredRequest) {
        self.add(request, 1);
    }

    pub(super) fn released(&self, request: &StoredRequest) {
        self.add(request, -1);
    }

    pub(super) fn set_aside(&self, request: &StoredRequest) {
        self.released(request);
        self.metrics
            .corrupt
            .get_or_create(&self.labels(request.signal))
            .inc();
    }

    fn add(&self, request: &StoredRequest, sign: i64) {
        let labels = self.labels(request.signal);
        let m = &self.metrics;
        m.bytes
            .get_or_create(&labels)
            .inc_by(sign * request.bytes as i64);
        m.requests.get_or_create(&labels).inc_by(sign);
        m.items
            .get_or_create(&labels)
            .inc_by(sign * request.items as i64);
    }
}
