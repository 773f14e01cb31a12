//! The `trace_sessions` receiver: brings the `TraceSession`s with `export: true` that a
//! `session` extension runs on this node into the agent's pipelines. In a logs pipeline, every
//! event of such a session is one OTLP log record; in a metrics pipeline, the node's summary of
//! the session (events per probe, dropped, lost, duration quantiles) at each status tick and at
//! the end of each run.
//!
//! It registers with the extension when built, so that the extension's sessions know export is
//! possible (without such a receiver a session asking for it is refused, `ExportUnavailable`).
//! When the agent stops, it ends the extension's session runs before it sends what it holds:
//! receivers stop before the pipelines drain and extensions stop after, so the runs' last
//! summaries (phase `AgentStopped`) would otherwise come too late for the pipelines.
//! It must not slow the sessions down: they hand over without waiting, into a bounded queue per
//! signal whose overflow is dropped and counted as refused items of this receiver
//! (`podscope_receiver_refused_items_total`), like the batches its pipelines refuse.

mod config;
mod encode;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use podscope_core::component::create_receiver;
use podscope_core::{
    Batch, BuildContext, Component, ComponentReference, Consumer, Receiver, ReceiverBuilder,
    ReceiverConsumers, ReceiverFactory, Signal,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::TraceSessionsReceiverConfig;
pub use encode::{
    log_records, summary_metrics, summary_points, PHASE, PHASES, PROBE, SESSION_NAME,
};

use crate::session::{
    ExportedEvent, ExportedSummary, SessionExportSink, SessionExports, SessionExtension,
};

pub const FACTORY: ReceiverFactory = ReceiverFactory {
    type_name: "trace_sessions",
    description: "Exports the TraceSessions with export: true of a session extension: events as logs, summaries as metrics",
    signals: &[Signal::Logs, Signal::Metrics],
    create: create_receiver::<TraceSessionsReceiverConfig>,
};

/// Log records sent in one batch at most (what was queued when the first arrived).
const MAX_RECORDS_PER_BATCH: usize = 1024;
/// How long a stopping receiver waits for the session runs to end and hand their last summaries
/// over (a run's bpftrace program prints its maps first); later ones are refused and counted.
const RUNS_END_WITHIN: Duration = Duration::from_secs(5);

impl ReceiverBuilder for TraceSessionsReceiverConfig {
    fn build(
        self: Box<Self>,
        ctx: BuildContext,
        next: ReceiverConsumers,
    ) -> anyhow::Result<Box<dyn Receiver>> {
        let id = self.extension_id().map_err(anyhow::Error::msg)?;
        let extension = ctx
            .extensions
            .get::<SessionExtension>(&id)
            .map_err(|e| anyhow::anyhow!("receiver {}: extension: {e}", ctx.id))?;
        let (events_tx, events_rx) = match &next.logs {
            Some(_) => {
                let (tx, rx) = mpsc::channel(self.queue_capacity);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (summaries_tx, summaries_rx) = match &next.metrics {
            Some(_) => {
                let (tx, rx) = mpsc::channel(self.queue_capacity);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        extension.register_export(Arc::new(SessionExportSink {
            receiver: ctx.id.to_string(),
            events: events_tx,
            summaries: summaries_tx,
            telemetry: ctx.telemetry.clone(),
        }));
        Ok(Box::new(TraceSessionsReceiver {
            id: ctx.id.to_string(),
            exports: extension.session_exports(),
            waiting: Mutex::new(Some(Waiting {
                events: events_rx.zip(next.logs),
                summaries: summaries_rx.zip(next.metrics),
            })),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    /// `extension` names the `session` extension.
    fn references(&self) -> Vec<ComponentReference> {
        self.extension_id()
            .map(|id| ComponentReference::extension("extension", id))
            .into_iter()
            .collect()
    }
}

/// The queues and their pipelines, until `start` hands them to the tasks.
struct Waiting {
    events: Option<(mpsc::Receiver<ExportedEvent>, Arc<dyn Consumer>)>,
    summaries: Option<(mpsc::Receiver<ExportedSummary>, Arc<dyn Consumer>)>,
}

pub struct TraceSessionsReceiver {
    id: String,
    /// The extension's exports, whose session runs it ends when it stops.
    exports: Arc<SessionExports>,
    waiting: Mutex<Option<Waiting>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

#[async_trait]
impl Component for TraceSessionsReceiver {
    async fn start(&self) -> anyhow::Result<()> {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(waiting) = waiting else {
            anyhow::bail!("receiver {} started twice", self.id);
        };
        if let Some((events, next)) = waiting.events {
            self.tasks.spawn(send_events(
                events,
                next,
                self.stop.clone(),
                self.id.clone(),
            ));
        }
        if let Some((summaries, next)) = waiting.summaries {
            self.tasks.spawn(send_summaries(
                summaries,
                next,
                self.stop.clone(),
                self.id.clone(),
            ));
        }
        Ok(())
    }

    /// Ends the session runs (the first receiver of the extension to stop does), so that their
    /// last summaries are queued; sends what is queued, then stops.
    async fn shutdown(&self) -> anyhow::Result<()> {
        if !self.exports.end_runs(RUNS_END_WITHIN).await {
            tracing::warn!(receiver = %self.id, within = ?RUNS_END_WITHIN, "TraceSession runs still ending; their last summaries will be refused and counted");
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        Ok(())
    }
}

impl Receiver for TraceSessionsReceiver {}

/// The next item of `queue`, or `None` once it is closed or the receiver stops.
async fn next_item<T>(queue: &mut mpsc::Receiver<T>, stop: &CancellationToken) -> Option<T> {
    tokio::select! {
        item = queue.recv() => item,
        // What is still queued at the stop goes out before the task ends.
        _ = stop.cancelled() => queue.try_recv().ok(),
    }
}

/// A refused batch was counted by the pipeline's entry (refused items of this receiver); it is
/// logged here, and not retried: the sessions' status and logs keep what it held.
fn refused(receiver: &str, signal: Signal, error: &podscope_core::ConsumeError) {
    tracing::warn!(receiver = %receiver, %signal, %error, "the pipeline refused a batch of exported TraceSession data: dropped");
}

async fn send_events(
    mut queue: mpsc::Receiver<ExportedEvent>,
    next: Arc<dyn Consumer>,
    stop: CancellationToken,
    receiver: String,
) {
    while let Some(first) = next_item(&mut queue, &stop).await {
        let mut events = vec![first];
        while events.len() < MAX_RECORDS_PER_BATCH {
            match queue.try_recv() {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        let batch = Batch::logs(log_records(&events, SystemTime::now()));
        if let Err(error) = next.consume(batch).await {
            refused(&receiver, Signal::Logs, &error);
        }
    }
}

async fn send_summaries(
    mut queue: mpsc::Receiver<ExportedSummary>,
    next: Arc<dyn Consumer>,
    stop: CancellationToken,
    receiver: String,
) {
    while let Some(summary) = next_item(&mut queue, &stop).await {
        let batch = Batch::metrics(vec![summary_metrics(&summary)]);
        if let Err(error) = next.consume(batch).await {
            refused(&receiver, Signal::Metrics, &error);
        }
    }
}
