//! Handing an already-acknowledged batch to the next stage without losing it.
//!
//! Stages that acknowledge before forwarding (the pipeline's entry queue, the batch processor)
//! cannot push an error back to the sender. They retry retryable errors with backoff — which also
//! holds back their own queue, so back-pressure reaches the receivers — until the next stage takes
//! the batch or the service's shutdown deadline cancels; then what is left is dropped and counted.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::consumer::{ConsumeError, Consumer};
use crate::telemetry::{AgentTelemetry, ItemReasonLabels};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Delivers `batch` to `next`, retrying retryable errors until `cancel` fires. Drops (counted in
/// `podscope_processor_dropped_items_total{component=stage}`) on a permanent error or on cancel.
/// Returns whether the batch was delivered.
pub async fn deliver_or_count(
    next: &dyn Consumer,
    batch: Batch,
    stage: &str,
    telemetry: &AgentTelemetry,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let error = match next.consume(batch.clone()).await {
            Ok(()) => return true,
            Err(e) => e,
        };
        match &error {
            ConsumeError::Permanent { .. } => {
                tracing::warn!(stage, error = %error, items = batch.item_count(), "next stage refused a batch permanently; dropped");
                count_drop(telemetry, stage, &batch, error.reason());
                return false;
            }
            ConsumeError::Retryable { retry_after, .. } => {
                let wait = retry_after.unwrap_or(backoff).min(MAX_BACKOFF);
                tracing::debug!(stage, error = %error, ?wait, "next stage busy; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => {
                        tracing::warn!(stage, items = batch.item_count(), "shutdown deadline reached with a batch undelivered; dropped");
                        count_drop(telemetry, stage, &batch, "shutdown");
                        return false;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn count_drop(telemetry: &AgentTelemetry, stage: &str, batch: &Batch, reason: &str) {
    telemetry
        .processor_dropped
        .get_or_create(&ItemReasonLabels {
            component: stage.to_string(),
            signal: batch.signal().into(),
            reason: reason.to_string(),
        })
        .inc_by(batch.item_count() as u64);
}
