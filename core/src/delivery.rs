//! Handing an already-acknowledged batch to the next stage without losing or repeating it.
//!
//! Stages that acknowledge before forwarding (the pipeline's entry queue, the batch processor)
//! cannot push an error back to the sender. They retry retryable errors with backoff — which also
//! holds back their own queue, so back-pressure reaches the receivers — until the next stage takes
//! the batch or the service's shutdown deadline cancels; then what is left is dropped and counted.
//!
//! The end of a pipeline is a [`Fanout`] to its exporters that delivers to each exporter on its
//! own: an exporter that took the batch is never given it again because another one refused, and
//! what one exporter never takes is counted as that exporter's drop. This module must not decide
//! anything per component kind beyond that: it only moves batches and counts.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::batch::Batch;
use crate::consumer::{ConsumeError, Consumer};
use crate::telemetry::{AgentTelemetry, ItemReasonLabels};

/// Retries of an acknowledged batch: fast at first (a queue frees up quickly), at most every 5 s.
fn delivery_backoff() -> Backoff {
    Backoff::new(BackoffPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(5),
        multiplier: 2.0,
        randomization_factor: 0.0,
        max_elapsed: None,
    })
}

/// Where a stage counts what it drops: a counter family and the `component` label to use.
#[derive(Clone)]
pub struct DropCounter {
    family: Family<ItemReasonLabels, Counter>,
    component: String,
}

impl DropCounter {
    /// `podscope_processor_dropped_items_total{component=stage}`: a pipeline stage's drops.
    pub fn stage(telemetry: &AgentTelemetry, stage: &str) -> DropCounter {
        DropCounter {
            family: telemetry.processor_dropped.clone(),
            component: stage.to_string(),
        }
    }

    /// `podscope_exporter_dropped_items_total{component=exporter}`: what an exporter never got.
    pub fn exporter(telemetry: &AgentTelemetry, exporter: &str) -> DropCounter {
        DropCounter {
            family: telemetry.exporter_dropped.clone(),
            component: exporter.to_string(),
        }
    }

    pub fn count(&self, batch: &Batch, reason: &str) {
        self.family
            .get_or_create(&ItemReasonLabels {
                component: self.component.clone(),
                signal: batch.signal().into(),
                reason: reason.to_string(),
            })
            .inc_by(batch.item_count() as u64);
    }

    pub fn component(&self) -> &str {
        &self.component
    }
}

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
    deliver(next, batch, &DropCounter::stage(telemetry, stage), cancel).await
}

/// [`deliver_or_count`], counting drops with `drops`.
pub async fn deliver(
    next: &dyn Consumer,
    batch: Batch,
    drops: &DropCounter,
    cancel: &CancellationToken,
) -> bool {
    let stage = drops.component();
    let mut backoff = delivery_backoff();
    loop {
        // Past the deadline nothing is tried any more: what is left is counted at once.
        if cancel.is_cancelled() {
            return give_up_at_deadline(drops, &batch);
        }
        let error = match next.consume(batch.clone()).await {
            Ok(()) => return true,
            Err(e) => e,
        };
        match &error {
            ConsumeError::Permanent { .. } => {
                tracing::warn!(stage, error = %error, items = batch.item_count(), "next stage refused a batch permanently; dropped");
                drops.count(&batch, error.reason());
                return false;
            }
            ConsumeError::Retryable { retry_after, .. } => {
                let wait = backoff
                    .next_wait(*retry_after)
                    .expect("delivery retries have no time limit");
                tracing::debug!(stage, error = %error, ?wait, "next stage busy; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return give_up_at_deadline(drops, &batch),
                }
            }
        }
    }
}

fn give_up_at_deadline(drops: &DropCounter, batch: &Batch) -> bool {
    tracing::warn!(
        stage = drops.component(),
        items = batch.item_count(),
        "shutdown deadline reached with a batch undelivered; dropped"
    );
    drops.count(batch, "shutdown");
    false
}

/// The end of a pipeline: hands each batch to every exporter and delivers it to each on its own
/// (retrying only the exporters that refused for now), so one exporter that refuses never makes
/// another receive a batch twice. What an exporter never takes is counted as its drop
/// (`podscope_exporter_dropped_items_total`, reason `shutdown` or its permanent error).
///
/// It acknowledges once every exporter has taken the batch or given it up, so it never returns an
/// error: it must sit behind a stage that already acknowledged (the pipeline's entry queue).
pub struct Fanout {
    branches: Vec<(Arc<dyn Consumer>, DropCounter)>,
    cancel: CancellationToken,
}

impl Fanout {
    /// `branches` are the exporters with the counter of what each never takes; `cancel` is the
    /// shutdown deadline.
    pub fn new(branches: Vec<(Arc<dyn Consumer>, DropCounter)>, cancel: CancellationToken) -> Self {
        Fanout { branches, cancel }
    }
}

#[async_trait]
impl Consumer for Fanout {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        // The batch is shared, not copied: a consumer that mutates copies on write.
        futures::future::join_all(
            self.branches
                .iter()
                .map(|(next, drops)| deliver(next.as_ref(), batch.clone(), drops, &self.cancel)),
        )
        .await;
        Ok(())
    }
}
