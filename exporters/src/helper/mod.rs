//! The exporter helper: what every exporter needs around its transport — a bounded sending
//! queue, retries with exponential backoff for retryable errors, a timeout per attempt, and the
//! counting of what was sent, what failed and what was given up.
//!
//! An exporter implements [`Sender`] (encode + send one batch, classify errors as retryable or
//! permanent) and wraps it with [`QueuedExporter::new`], which implements
//! [`podscope_core::Exporter`].
//!
//! Who counts a loss: with the queue on, the exporter owns queued data, so what it gives up is
//! counted in `podscope_exporter_dropped_items_total`; with the queue off, the final error goes
//! back to the caller, which counts it.

mod config;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use podscope_core::config::QueueSettings;
use podscope_core::queue::{bounded_queue, QueueReceiver, QueueSender};
use podscope_core::telemetry::{AgentTelemetry, ComponentLabels, ItemReasonLabels, ReasonLabels};
use podscope_core::{Batch, BuildContext, Component, ConsumeError, Consumer, Exporter};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{HelperSettings, RetrySettings, SendingQueueSettings};

/// The exporter-specific part: send one batch to the backend.
#[async_trait]
pub trait Sender: Send + Sync + 'static {
    /// Called once before any send (connect, open a file, bind a port).
    async fn start(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Sends one batch. Classify failures: retryable (the backend may take it later) or permanent.
    async fn send(&self, batch: Batch) -> Result<(), ConsumeError>;

    /// Called at shutdown after the queue is drained (flush buffers, close files).
    async fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A [`Sender`] wrapped with the sending queue, retries and timeouts.
pub struct QueuedExporter<S: Sender> {
    core: Arc<SendCore<S>>,
    queue: Option<QueueSender>,
    pending_receiver: Mutex<Option<QueueReceiver>>,
    workers: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    num_consumers: usize,
}

struct SendCore<S> {
    id: String,
    sender: S,
    settings: HelperSettings,
    telemetry: AgentTelemetry,
    /// Fired when the service's shutdown deadline is reached: stop retrying, count, return.
    cancel: CancellationToken,
}

impl<S: Sender> QueuedExporter<S> {
    pub fn new(ctx: &BuildContext, settings: HelperSettings, sender: S) -> Arc<Self> {
        let id = ctx.id.to_string();
        let q = &settings.sending_queue;
        let (queue, receiver) = if q.enabled {
            let (tx, rx) = bounded_queue(
                format!("exporter/{id}"),
                &QueueSettings {
                    capacity: q.queue_size,
                    when_full: q.when_full,
                    block_timeout: q.block_timeout,
                },
                &ctx.telemetry,
            );
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Arc::new(QueuedExporter {
            num_consumers: q.num_consumers.max(1),
            core: Arc::new(SendCore {
                id,
                sender,
                settings,
                telemetry: ctx.telemetry.clone(),
                cancel: CancellationToken::new(),
            }),
            queue,
            pending_receiver: Mutex::new(receiver),
            workers: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    /// The wrapped sender (tests and exporters that expose state, e.g. a bound address).
    pub fn sender(&self) -> &S {
        &self.core.sender
    }
}

impl<S: Sender> SendCore<S> {
    /// Sends with retries. Returns the final error, if any, after counting it.
    async fn send_with_retry(&self, batch: Batch, owns_data: bool) -> Result<(), ConsumeError> {
        let retry = &self.settings.retry_on_failure;
        let first_attempt = Instant::now();
        let mut interval = retry.initial_interval;
        loop {
            let started = Instant::now();
            let attempt =
                tokio::time::timeout(self.settings.timeout, self.sender.send(batch.clone())).await;
            self.telemetry
                .exporter_send_duration
                .get_or_create(&ComponentLabels {
                    component: self.id.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            let error = match attempt {
                Ok(Ok(())) => {
                    self.telemetry
                        .exporter_sent
                        .get_or_create(&AgentTelemetry::items(&self.id, batch.signal()))
                        .inc_by(batch.item_count() as u64);
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => ConsumeError::retryable(
                    "timeout",
                    format!("send did not finish within {:?}", self.settings.timeout),
                ),
            };
            self.telemetry
                .exporter_send_failures
                .get_or_create(&ReasonLabels {
                    component: self.id.clone(),
                    reason: error.reason().to_string(),
                })
                .inc();
            let give_up = |reason: &str, error: ConsumeError| {
                if owns_data {
                    tracing::warn!(exporter = %self.id, items = batch.item_count(), %error, "dropping a batch ({reason})");
                    self.count_dropped(&batch, reason);
                }
                Err(error)
            };
            let retry_after = match &error {
                ConsumeError::Permanent { .. } => return give_up(error.reason(), error),
                ConsumeError::Retryable { retry_after, .. } => *retry_after,
            };
            if !retry.enabled {
                return give_up(error.reason(), error);
            }
            let wait =
                retry_after.unwrap_or_else(|| jittered(interval, retry.randomization_factor));
            if !retry.max_elapsed_time.is_zero()
                && first_attempt.elapsed() + wait > retry.max_elapsed_time
            {
                return give_up("retries_exhausted", error);
            }
            tracing::debug!(exporter = %self.id, %error, ?wait, "export failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return give_up("shutdown", error),
            }
            interval = interval.mul_f64(retry.multiplier).min(retry.max_interval);
        }
    }

    fn count_dropped(&self, batch: &Batch, reason: &str) {
        self.telemetry
            .exporter_dropped
            .get_or_create(&ItemReasonLabels {
                component: self.id.clone(),
                signal: batch.signal().into(),
                reason: reason.to_string(),
            })
            .inc_by(batch.item_count() as u64);
    }
}

fn jittered(interval: Duration, factor: f64) -> Duration {
    if factor <= 0.0 {
        return interval;
    }
    let scale = rand::rng().random_range((1.0 - factor)..=(1.0 + factor));
    interval.mul_f64(scale)
}

#[async_trait]
impl<S: Sender> Consumer for QueuedExporter<S> {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        match &self.queue {
            Some(queue) => queue.send(batch).await,
            None => self.core.send_with_retry(batch, false).await,
        }
    }
}

#[async_trait]
impl<S: Sender> Component for QueuedExporter<S> {
    async fn start(&self) -> anyhow::Result<()> {
        self.core.sender.start().await?;
        let receiver = self
            .pending_receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(receiver) = receiver {
            let mut workers = self.workers.lock().await;
            for _ in 0..self.num_consumers {
                let core = self.core.clone();
                let receiver = receiver.clone();
                workers.push(tokio::spawn(async move {
                    while let Some(batch) = receiver.recv().await {
                        // Errors are counted inside; the data was acknowledged when queued.
                        let _ = core.send_with_retry(batch, true).await;
                    }
                }));
            }
        }
        Ok(())
    }

    /// Closes the queue, lets the senders drain it and flushes. If the caller's deadline drops
    /// this future, retries stop and what is left is counted as dropped (`shutdown`).
    async fn shutdown(&self) -> anyhow::Result<()> {
        if let Some(queue) = &self.queue {
            queue.close();
        }
        let guard = self.core.cancel.clone().drop_guard();
        let workers: Vec<_> = std::mem::take(&mut *self.workers.lock().await);
        for worker in workers {
            worker.await?;
        }
        guard.disarm();
        // Started or not, a closed queue may still hold batches nobody will send.
        let never_started = self
            .pending_receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(receiver) = never_started {
            // The queue is closed: recv returns what is left, then None.
            while let Some(batch) = receiver.recv().await {
                self.core.count_dropped(&batch, "shutdown");
            }
        }
        self.core.sender.flush().await
    }
}

impl<S: Sender> Exporter for QueuedExporter<S> {}
