//! The one interface between pipeline stages: something that takes a [`Batch`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::batch::Batch;

/// Why a consumer did not take a batch. The split follows the Collector: a **retryable** error
/// means "try again later" (the sender keeps the data, a receiver answers UNAVAILABLE / 503), a
/// **permanent** error means the data can never be accepted (it is dropped and counted).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConsumeError {
    #[error("{message} (retryable: {reason})")]
    Retryable {
        /// Low-cardinality label for metrics, e.g. `queue_full`, `unavailable`, `timeout`.
        reason: &'static str,
        message: String,
        /// A hint from the backend (gRPC RetryInfo, HTTP `Retry-After`).
        retry_after: Option<Duration>,
    },
    #[error("{message} (permanent: {reason})")]
    Permanent {
        reason: &'static str,
        message: String,
    },
}

impl ConsumeError {
    pub fn retryable(reason: &'static str, message: impl Into<String>) -> Self {
        ConsumeError::Retryable {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        ConsumeError::Permanent {
            reason,
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, ConsumeError::Retryable { .. })
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ConsumeError::Retryable { reason, .. } | ConsumeError::Permanent { reason, .. } => {
                reason
            }
        }
    }
}

/// A stage that accepts batches: a processor, an exporter, a queue or a fan-out.
#[async_trait]
pub trait Consumer: Send + Sync {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError>;
}

/// Hands each batch to several consumers. The batch is shared, not copied: a consumer that mutates
/// copies on write (see [`Batch::metrics_mut`]).
pub struct Fanout {
    consumers: Vec<Arc<dyn Consumer>>,
}

impl Fanout {
    /// One consumer is returned as is; several are wrapped in a fan-out.
    pub fn of(mut consumers: Vec<Arc<dyn Consumer>>) -> Arc<dyn Consumer> {
        if consumers.len() == 1 {
            return consumers.pop().expect("one consumer");
        }
        Arc::new(Fanout { consumers })
    }
}

#[async_trait]
impl Consumer for Fanout {
    /// Every consumer gets the batch even if an earlier one fails; the first error is returned, a
    /// permanent one in preference (retrying would duplicate data at consumers that succeeded).
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        let results =
            futures::future::join_all(self.consumers.iter().map(|c| c.consume(batch.clone())))
                .await;
        let mut first_error: Option<ConsumeError> = None;
        for error in results.into_iter().filter_map(Result::err) {
            match &first_error {
                Some(e) if !e.is_retryable() => {}
                Some(_) if error.is_retryable() => {}
                _ => first_error = Some(error),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A consumer that accepts and discards everything. Useful in benchmarks and lifecycle tests.
pub struct Discard;

#[async_trait]
impl Consumer for Discard {
    async fn consume(&self, _batch: Batch) -> Result<(), ConsumeError> {
        Ok(())
    }
}

/// A consumer that keeps every batch it is given: the end of a pipeline in tests and benchmarks.
#[derive(Default)]
pub struct Recorder {
    batches: std::sync::Mutex<Vec<Batch>>,
}

impl Recorder {
    /// Every batch so far, in arrival order.
    pub fn batches(&self) -> Vec<Batch> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Consumer for Recorder {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(batch);
        Ok(())
    }
}
