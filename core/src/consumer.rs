//! The one interface between pipeline stages: something that takes a [`Batch`].

use std::time::Duration;

use async_trait::async_trait;

use crate::batch::Batch;

/// The reason of [`ConsumeError::memory_limited`].
pub const MEMORY_LIMITED: &str = "memory_limited";

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

    /// Refused because the agent is short of memory (the `memory_limiter`'s soft limit): the
    /// sender should retry after `retry_after`. Receivers answer OTLP/gRPC RESOURCE_EXHAUSTED
    /// and OTLP/HTTP 429 for it, as the Collector does, instead of UNAVAILABLE / 503.
    pub fn memory_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        ConsumeError::Retryable {
            reason: MEMORY_LIMITED,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    /// See [`ConsumeError::memory_limited`].
    pub fn is_memory_limited(&self) -> bool {
        matches!(self, ConsumeError::Retryable { reason, .. } if *reason == MEMORY_LIMITED)
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
///
/// `Ok` means the stage took the batch: it now sends it, holds it, or has dropped and counted
/// it. An error means it did not, and the caller still owns the batch: retry it later
/// (retryable) or drop and count it (permanent).
#[async_trait]
pub trait Consumer: Send + Sync {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError>;
}
