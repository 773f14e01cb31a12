//! The `batch` processor: groups incoming data into larger batches, counted in items (data
//! points or spans), and sends a batch when it reaches `send_batch_size` or when `timeout` has
//! passed since its first item. `send_batch_max_size` splits what is sent.
//!
//! Like the Collector's, it acknowledges data once it holds it; what it cannot deliver later is
//! retried until the shutdown deadline and then dropped and counted
//! (`podscope_processor_dropped_items_total`). Its intake is a small bounded channel, so a slow
//! downstream holds back the pipeline queue in front of it.

mod config;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use podscope_core::component::create_processor;
use podscope_core::delivery::deliver_or_count;
use podscope_core::{
    Batch, BuildContext, Capabilities, Component, ConsumeError, Consumer, Processor,
    ProcessorBuilder, ProcessorFactory, Signal,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::BatchConfig;

pub const FACTORY: ProcessorFactory = ProcessorFactory {
    type_name: "batch",
    description:
        "Groups data into batches of send_batch_size items (data points or spans) or per timeout",
    signals: &[
        Signal::Metrics,
        Signal::Traces,
        Signal::Profiles,
        Signal::Logs,
    ],
    create: create_processor::<BatchConfig>,
};

/// Batches waiting for the batching task; small on purpose: the pipeline queue is the buffer.
const INTAKE_CAPACITY: usize = 8;

impl ProcessorBuilder for BatchConfig {
    fn build(
        &self,
        ctx: BuildContext,
        signal: Signal,
        next: Arc<dyn Consumer>,
    ) -> anyhow::Result<Arc<dyn Processor>> {
        let (tx, rx) = mpsc::channel(INTAKE_CAPACITY);
        let stage = match &ctx.pipeline {
            Some(p) => format!("processor/{}/{}", ctx.id, p),
            None => format!("processor/{}", ctx.id),
        };
        Ok(Arc::new(BatchProcessor {
            config: self.clone(),
            signal,
            next,
            stage,
            ctx,
            intake: Mutex::new(Some(tx)),
            pending_intake: Mutex::new(Some(rx)),
            task: tokio::sync::Mutex::new(None),
            cancel: CancellationToken::new(),
        }))
    }
}

pub struct BatchProcessor {
    config: BatchConfig,
    signal: Signal,
    next: Arc<dyn Consumer>,
    /// Name used in logs and drop counters.
    stage: String,
    ctx: BuildContext,
    /// `None` once shut down.
    intake: Mutex<Option<mpsc::Sender<Batch>>>,
    /// The receiving end until `start` hands it to the batching task.
    pending_intake: Mutex<Option<mpsc::Receiver<Batch>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Fired when the shutdown deadline is near: stop retrying, drop and count.
    cancel: CancellationToken,
}

impl BatchProcessor {
    fn sender(&self) -> Option<mpsc::Sender<Batch>> {
        self.intake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Consumer for BatchProcessor {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        if batch.signal() != self.signal {
            return Err(ConsumeError::permanent(
                "wrong_signal",
                format!(
                    "{} handles {}, got {}",
                    self.stage,
                    self.signal,
                    batch.signal()
                ),
            ));
        }
        let Some(tx) = self.sender() else {
            return Err(ConsumeError::retryable(
                "shutting_down",
                format!("{} is shut down", self.stage),
            ));
        };
        tx.send(batch).await.map_err(|_| {
            ConsumeError::retryable("shutting_down", format!("{} is shut down", self.stage))
        })
    }
}

#[async_trait]
impl Component for BatchProcessor {
    async fn start(&self) -> anyhow::Result<()> {
        let Some(rx) = self
            .pending_intake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            anyhow::bail!("{} started twice", self.stage);
        };
        let batcher = Batcher {
            config: self.config.clone(),
            next: self.next.clone(),
            stage: self.stage.clone(),
            telemetry: self.ctx.telemetry.clone(),
            cancel: self.cancel.clone(),
        };
        *self.task.lock().await = Some(tokio::spawn(batcher.run(rx)));
        Ok(())
    }

    /// Stops the intake, sends what is held and returns once it is delivered (or dropped and
    /// counted if the caller's deadline cancels this future — then the task is told to give up).
    async fn shutdown(&self) -> anyhow::Result<()> {
        // Dropping the last sender ends the batching task once the intake is drained.
        self.intake.lock().unwrap_or_else(|e| e.into_inner()).take();
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let guard = self.cancel.clone().drop_guard();
            let result = task.await;
            guard.disarm();
            result?;
        }
        Ok(())
    }
}

impl Processor for BatchProcessor {
    fn capabilities(&self) -> Capabilities {
        // Merging builds new batches; the inputs are never written.
        Capabilities {
            mutates_data: false,
        }
    }
}

/// The batching task's state.
struct Batcher {
    config: BatchConfig,
    next: Arc<dyn Consumer>,
    stage: String,
    telemetry: podscope_core::telemetry::AgentTelemetry,
    cancel: CancellationToken,
}

impl Batcher {
    async fn run(self, mut rx: mpsc::Receiver<Batch>) {
        let mut pending: Option<Batch> = None;
        let mut flush_at = Instant::now();
        loop {
            tokio::select! {
                received = rx.recv() => {
                    let Some(batch) = received else { break };
                    if batch.is_empty() {
                        continue;
                    }
                    match &mut pending {
                        None => {
                            flush_at = Instant::now() + self.config.timeout;
                            pending = Some(batch);
                        }
                        Some(held) => {
                            if let Err(other) = held.append(batch) {
                                // consume() checks the signal, so this cannot happen; keep it anyway.
                                tracing::error!(stage = %self.stage, signal = %other.signal(), "mixed signals in one batch processor");
                            }
                        }
                    }
                    if pending.as_ref().is_some_and(|p| p.item_count() >= self.config.send_batch_size) {
                        self.flush(pending.take()).await;
                    }
                }
                _ = tokio::time::sleep_until(flush_at), if pending.is_some() => {
                    self.flush(pending.take()).await;
                }
            }
        }
        self.flush(pending.take()).await;
    }

    async fn flush(&self, batch: Option<Batch>) {
        let Some(batch) = batch else { return };
        for part in batch.split(self.config.send_batch_max_size) {
            deliver_or_count(
                self.next.as_ref(),
                part,
                &self.stage,
                &self.telemetry,
                &self.cancel,
            )
            .await;
        }
    }
}
