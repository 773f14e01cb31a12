//! Checks a pipeline makes before its entry queue takes a receiver's batch.
//!
//! The entry queue acknowledges a batch before its processors see it, so a processor that must
//! turn data away while the sender can still keep it (the `memory_limiter` above its soft
//! limit) cannot do so from its `consume`: by then the receiver has answered. Such a processor
//! hands the service an [`Admission`] as well, and the service asks it, for every pipeline a
//! receiver feeds, before the batch enters any of their queues ([`AdmissionGate`]). A refusal
//! reaches the receiver as the error, so an OTLP client is told to retry and the eBPF receiver
//! counts the interval as refused.

use std::sync::Arc;

use async_trait::async_trait;

use crate::batch::Batch;
use crate::consumer::{ConsumeError, Consumer};

/// A pipeline's check before its entry queue takes a batch. It must be cheap: it runs on every
/// receiver request.
pub trait Admission: Send + Sync {
    /// `Err` refuses the batch for every pipeline (the caller keeps it).
    fn admit(&self, batch: &Batch) -> Result<(), ConsumeError>;
}

/// Asks every admission check first, then hands the batch on.
pub struct AdmissionGate {
    checks: Vec<Arc<dyn Admission>>,
    next: Arc<dyn Consumer>,
}

impl AdmissionGate {
    /// `next` itself when there is nothing to check.
    pub fn wrap(checks: Vec<Arc<dyn Admission>>, next: Arc<dyn Consumer>) -> Arc<dyn Consumer> {
        if checks.is_empty() {
            next
        } else {
            Arc::new(AdmissionGate { checks, next })
        }
    }
}

#[async_trait]
impl Consumer for AdmissionGate {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        for check in &self.checks {
            check.admit(&batch)?;
        }
        self.next.consume(batch).await
    }
}
