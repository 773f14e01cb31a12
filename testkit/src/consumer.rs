//! The ends of a pipeline under test: a consumer that keeps every batch and one that drops them.

use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
use podscope_core::{Batch, ConsumeError, Consumer};

/// A consumer that accepts and discards everything: the end of a pipeline in benchmarks and
/// lifecycle tests.
pub struct Discard;

#[async_trait]
impl Consumer for Discard {
    async fn consume(&self, _batch: Batch) -> Result<(), ConsumeError> {
        Ok(())
    }
}

/// A consumer that accepts and keeps every batch it is given, in arrival order.
#[derive(Default)]
pub struct Recorder {
    batches: Mutex<Vec<Batch>>,
}

impl Recorder {
    // A test that panicked while holding the lock must not hide what was recorded.
    fn lock(&self) -> MutexGuard<'_, Vec<Batch>> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every batch so far, in arrival order.
    pub fn batches(&self) -> Vec<Batch> {
        self.lock().clone()
    }

    /// How many batches arrived so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no batch arrived yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// How many items (spans, data points) arrived so far.
    pub fn items(&self) -> usize {
        self.lock().iter().map(Batch::item_count).sum()
    }

    /// Every resource of the metrics batches after the first `skip` batches.
    pub fn metrics_since(&self, skip: usize) -> Vec<ResourceMetrics> {
        self.lock()
            .iter()
            .skip(skip)
            .flat_map(|batch| match batch {
                Batch::Metrics(rms) => rms.to_vec(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The resources of the last batch if it holds metrics, else none.
    pub fn last_metrics(&self) -> Vec<ResourceMetrics> {
        match self.lock().last() {
            Some(Batch::Metrics(rms)) => rms.to_vec(),
            _ => Vec::new(),
        }
    }
}

#[async_trait]
impl Consumer for Recorder {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.lock().push(batch);
        Ok(())
    }
}
