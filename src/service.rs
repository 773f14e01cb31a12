//! Builds pipelines from a validated config and runs them.
//!
//! Graph (per pipeline): receivers → the pipeline's bounded entry queue → processors, in order →
//! fan-out to the exporters. A receiver or exporter named in several pipelines is one instance
//! shared by them; processors are built once per pipeline, as in the Collector.
//!
//! Fan-out never repeats data (see ARCHITECTURE.md, "Fan-out"): a receiver's batch enters the
//! entry queues of all its pipelines or of none ([`QueueGroup`]), and a pipeline delivers to each
//! of its exporters on its own ([`Fanout`]), counting what one exporter never takes as that
//! exporter's drop.
//!
//! A processor may also check batches before they enter its pipeline's queue (the
//! `memory_limiter`'s soft limit, [`podscope_core::admission`]); a receiver's batch is checked
//! against every pipeline it feeds before any queue takes it.
//!
//! Extensions are built first, in `service.extensions` order, and handed to every other
//! component in its [`BuildContext`] with what each uses.
//!
//! Lifecycle: start extensions, exporters, then processors (last first), then the pipeline
//! queues' workers, then receivers, so every stage starts with a live consumer. Shutdown runs
//! the other way round: receivers stop, each pipeline queue drains into its processors,
//! processors flush, exporters drain — all within `service.shutdown_timeout`; whatever is still
//! held when the deadline passes is dropped and counted before `shutdown` returns. Extensions
//! stop last (last started first), once nothing uses them any more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use podscope_core::admission::AdmissionGate;
use podscope_core::delivery::{deliver_or_count, DropCounter, Fanout};
use podscope_core::health::Readiness;
use podscope_core::queue::{bounded_queue, QueueGroup, QueueReceiver, QueueSender};
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{
    Batch, BuildContext, Component, ComponentId, ConsumeError, Consumer, Exporter, Extension,
    Extensions, Processor, Receiver, ReceiverConsumers, Signal,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, PipelineConfig};

/// A pipeline's entry queue and the task that feeds its first stage.
struct RunningPipeline {
    name: String,
    queue: QueueSender<Batch>,
    receiver: Option<QueueReceiver<Batch>>,
    head: Arc<dyn Consumer>,
    /// First processor first.
    processors: Vec<(ComponentId, Arc<dyn Processor>)>,
    worker: Option<JoinHandle<()>>,
}

/// Everything built from one config, ready to start.
pub struct Service {
    /// In start order.
    extensions: Vec<(ComponentId, Arc<dyn Extension>)>,
    receivers: Vec<(ComponentId, Box<dyn Receiver>)>,
    pipelines: Vec<RunningPipeline>,
    exporters: Vec<(ComponentId, Arc<dyn Exporter>)>,
    telemetry: AgentTelemetry,
    readiness: Readiness,
    shutdown_timeout: Duration,
    /// Fired when the shutdown deadline is reached: stages stop retrying, drop and count.
    deadline: CancellationToken,
}

/// What shutdown managed within its deadline.
#[derive(Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// False when the deadline passed before every stage had flushed.
    pub completed_in_time: bool,
    /// Components whose shutdown returned an error, with the error.
    pub errors: Vec<String>,
}

impl Service {
    /// Builds every component of every pipeline from the builders the config loader validated.
    /// Nothing runs until [`Service::start`].
    pub fn build(
        mut config: AgentConfig,
        telemetry: AgentTelemetry,
        readiness: Readiness,
    ) -> anyhow::Result<Service> {
        let host_name = host_name();
        let shared = podscope_core::SharedState::default();
        let deadline = CancellationToken::new();
        let mut extensions = Extensions::default();
        let context =
            |id: &ComponentId, pipeline: Option<&str>, extensions: &Extensions| BuildContext {
                id: id.clone(),
                pipeline: pipeline.map(str::to_string),
                host_name: host_name.clone(),
                telemetry: telemetry.clone(),
                readiness: readiness.clone(),
                shared: shared.clone(),
                extensions: extensions.clone(),
            };

        // Extensions first: the other components look up the ones they use while they are built.
        let mut extension_order = Vec::new();
        for id in &config.service.extensions {
            let builder = config
                .extensions
                .remove(id)
                .with_context(|| format!("extension {id} is not defined"))?;
            // An extension sees those listed before it (one may name another, see
            // `ExtensionBuilder::references`).
            let extension = builder
                .build(context(id, None, &extensions))
                .with_context(|| format!("building extension {id}"))?;
            extensions.insert(id.clone(), extension.clone());
            extension_order.push((id.clone(), extension));
        }
        for ((kind, id), uses) in &config.extension_users {
            for extension in uses {
                extensions.add_user(*kind, id.clone(), extension.clone());
            }
        }
        let context = |id: &ComponentId, pipeline: Option<&str>| context(id, pipeline, &extensions);

        // Exporters: one instance per id used by any pipeline.
        let mut exporters: BTreeMap<ComponentId, Arc<dyn Exporter>> = BTreeMap::new();
        for pipeline in &config.service.pipelines {
            for id in &pipeline.exporters {
                if exporters.contains_key(id) {
                    continue;
                }
                let builder = config
                    .exporters
                    .remove(id)
                    .with_context(|| format!("exporter {id} is not defined"))?;
                let exporter = builder
                    .build(context(id, None))
                    .with_context(|| format!("building exporter {id}"))?;
                exporters.insert(id.clone(), exporter);
            }
        }

        // Pipelines: processors chained from the last to the first, then the entry queue.
        let mut pipelines = Vec::new();
        for pipeline in &config.service.pipelines {
            let branches = pipeline
                .exporters
                .iter()
                .map(|id| {
                    (
                        exporters[id].clone() as Arc<dyn Consumer>,
                        DropCounter::exporter(&telemetry, &id.to_string()),
                    )
                })
                .collect();
            let mut next: Arc<dyn Consumer> = Arc::new(Fanout::new(branches, deadline.clone()));
            let mut processors = Vec::new();
            for id in pipeline.processors.iter().rev() {
                let builder = config
                    .processors
                    .get(id)
                    .with_context(|| format!("processor {id} is not defined"))?;
                let processor = builder
                    .build(context(id, Some(&pipeline.name)), pipeline.signal, next)
                    .with_context(|| {
                        format!("building processor {id} in pipeline {}", pipeline.name)
                    })?;
                next = processor.clone() as Arc<dyn Consumer>;
                processors.push((id.clone(), processor));
            }
            processors.reverse();
            let (queue, receiver) = bounded_queue(
                format!("pipeline/{}", pipeline.name),
                &pipeline.queue,
                &telemetry,
            );
            pipelines.push(RunningPipeline {
                name: pipeline.name.clone(),
                queue,
                receiver: Some(receiver),
                head: next,
                processors,
                worker: None,
            });
        }

        // Receivers: one instance per id; each signal goes to every pipeline that lists it.
        let mut receiver_ids: Vec<&ComponentId> = Vec::new();
        for pipeline in &config.service.pipelines {
            for id in &pipeline.receivers {
                if !receiver_ids.contains(&id) {
                    receiver_ids.push(id);
                }
            }
        }
        let mut receivers = Vec::new();
        for id in receiver_ids {
            let mut consumers = ReceiverConsumers::default();
            for signal in Signal::ALL {
                let fed: Vec<(&PipelineConfig, &RunningPipeline)> = config
                    .service
                    .pipelines
                    .iter()
                    .zip(&pipelines)
                    .filter(|(p, _)| p.signal == signal && p.receivers.contains(id))
                    .collect();
                if fed.is_empty() {
                    continue;
                }
                // Checks such as the memory_limiter's soft limit run before any queue (or a
                // pipeline without one) takes the batch, so the receiver can still tell its
                // client to retry.
                let admissions = fed
                    .iter()
                    .flat_map(|(_, running)| &running.processors)
                    .filter_map(|(_, processor)| processor.admission())
                    .collect();
                let (queued, direct): (Vec<_>, Vec<_>) =
                    fed.into_iter().partition(|(p, _)| p.queue.enabled);
                let entry = PipelineEntry {
                    queued: (!queued.is_empty()).then(|| {
                        QueueGroup::new(queued.iter().map(|(_, r)| r.queue.clone()).collect())
                    }),
                    direct: direct.iter().map(|(_, r)| r.head.clone()).collect(),
                };
                let observed: Arc<dyn Consumer> = Arc::new(ObservedReceiverOutput {
                    receiver: id.to_string(),
                    next: AdmissionGate::wrap(admissions, Arc::new(entry)),
                    telemetry: telemetry.clone(),
                });
                match signal {
                    Signal::Metrics => consumers.metrics = Some(observed),
                    Signal::Traces => consumers.traces = Some(observed),
                    Signal::Profiles => consumers.profiles = Some(observed),
                    Signal::Logs => consumers.logs = Some(observed),
                }
            }
            let builder = config
                .receivers
                .remove(id)
                .with_context(|| format!("receiver {id} is not defined"))?;
            let receiver = builder
                .build(context(id, None), consumers)
                .with_context(|| format!("building receiver {id}"))?;
            receivers.push((id.clone(), receiver));
        }

        Ok(Service {
            extensions: extension_order,
            receivers,
            pipelines,
            exporters: exporters.into_iter().collect(),
            telemetry,
            readiness,
            shutdown_timeout: config.service.shutdown_timeout,
            deadline,
        })
    }

    /// Starts exporters, processors, pipeline queues and receivers, in that order. On error the
    /// stages already started are shut down again.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if let Err(error) = self.start_all().await {
            self.shutdown().await;
            return Err(error);
        }
        self.readiness.set_pipelines_started(true);
        tracing::info!(
            pipelines = self.pipelines.len(),
            receivers = self.receivers.len(),
            exporters = self.exporters.len(),
            "everything is ready; data is flowing"
        );
        Ok(())
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for (id, extension) in &self.extensions {
            extension
                .start()
                .await
                .with_context(|| format!("starting extension {id}"))?;
        }
        for (id, exporter) in &self.exporters {
            exporter
                .start()
                .await
                .with_context(|| format!("starting exporter {id}"))?;
        }
        for pipeline in &mut self.pipelines {
            for (id, processor) in pipeline.processors.iter().rev() {
                processor.start().await.with_context(|| {
                    format!("starting processor {id} in pipeline {}", pipeline.name)
                })?;
            }
            let receiver = pipeline.receiver.take().expect("started once");
            pipeline.worker = Some(tokio::spawn(feed_pipeline(
                receiver,
                pipeline.head.clone(),
                format!("pipeline/{}", pipeline.name),
                self.telemetry.clone(),
                self.deadline.clone(),
            )));
        }
        for (id, receiver) in &self.receivers {
            receiver
                .start()
                .await
                .with_context(|| format!("starting receiver {id}"))?;
        }
        Ok(())
    }

    /// Stops receivers, drains pipelines and flushes exporters within `shutdown_timeout`. Safe to
    /// call on a service that was never started.
    ///
    /// Past the deadline every stage gives up: pipeline deliveries see the deadline token, and
    /// components give up when their unfinished `shutdown` is dropped. So all of them are asked
    /// at once, dropped, and asked again to return once they have counted what they dropped: at
    /// most [`GIVE_UP`] and [`COUNT_DROPS`] more.
    pub async fn shutdown(&mut self) -> ShutdownReport {
        self.readiness.set_pipelines_started(false);
        let mut errors = Vec::new();
        let completed_in_time =
            tokio::time::timeout(self.shutdown_timeout, self.shutdown_in_order(&mut errors))
                .await
                .is_ok();
        if !completed_in_time {
            tracing::warn!(timeout = ?self.shutdown_timeout, "shutdown deadline reached; dropping what is left");
            self.deadline.cancel();
            for grace in [GIVE_UP, COUNT_DROPS] {
                let _ = tokio::time::timeout(grace, self.shutdown_at_once(&mut errors)).await;
            }
        }
        // Extensions last: until here a stage may still have looked something up in one.
        for (id, extension) in self.extensions.iter().rev() {
            let stopped =
                tokio::time::timeout(COUNT_DROPS, shut_down("extension", id, extension.as_ref()));
            match stopped.await {
                Ok(error) => note_all(&mut errors, error),
                Err(_) => note(
                    &mut errors,
                    format!("extension {id}: did not stop within {COUNT_DROPS:?}"),
                ),
            }
        }
        ShutdownReport {
            completed_in_time,
            errors,
        }
    }

    async fn shutdown_in_order(&mut self, errors: &mut Vec<String>) {
        for (id, receiver) in &self.receivers {
            note_all(errors, shut_down("receiver", id, receiver.as_ref()).await);
        }
        for pipeline in &mut self.pipelines {
            note_all(errors, pipeline.drain().await);
        }
        for (id, exporter) in &self.exporters {
            note_all(errors, shut_down("exporter", id, exporter.as_ref()).await);
        }
    }

    /// Every stage's shutdown at once, for after the deadline.
    async fn shutdown_at_once(&mut self, errors: &mut Vec<String>) {
        let receivers = futures::future::join_all(
            self.receivers
                .iter()
                .map(|(id, receiver)| shut_down("receiver", id, receiver.as_ref())),
        );
        let pipelines =
            futures::future::join_all(self.pipelines.iter_mut().map(RunningPipeline::drain));
        let exporters = futures::future::join_all(
            self.exporters
                .iter()
                .map(|(id, exporter)| shut_down("exporter", id, exporter.as_ref())),
        );
        let (receivers, pipelines, exporters) = tokio::join!(receivers, pipelines, exporters);
        note_all(errors, receivers.into_iter().flatten());
        note_all(errors, pipelines.into_iter().flatten());
        note_all(errors, exporters.into_iter().flatten());
    }
}

/// Shuts one component down; its error, if any, named.
async fn shut_down(kind: &str, id: &ComponentId, component: &dyn Component) -> Option<String> {
    component
        .shutdown()
        .await
        .err()
        .map(|e| format!("{kind} {id}: {e:#}"))
}

/// How long stages get, once the deadline passed, to give up what they hold.
const GIVE_UP: Duration = Duration::from_millis(250);
/// How long they then get to count what they gave up.
const COUNT_DROPS: Duration = Duration::from_secs(1);

impl RunningPipeline {
    /// Closes the entry queue, lets the worker feed what is queued to the processors, and shuts
    /// the processors down (first first, so each flushes into a live one). Returns the errors.
    async fn drain(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        self.queue.close();
        if let Some(worker) = self.worker.as_mut() {
            if let Err(e) = worker.await {
                errors.push(format!("pipeline {}: {e}", self.name));
            }
            self.worker = None;
        }
        for (id, processor) in &self.processors {
            if let Err(e) = processor.shutdown().await {
                errors.push(format!("processor {id} in pipeline {}: {e:#}", self.name));
            }
        }
        errors
    }
}

/// Adds an error once (stages asked again after the deadline may repeat theirs).
fn note(errors: &mut Vec<String>, error: String) {
    if !errors.contains(&error) {
        errors.push(error);
    }
}

fn note_all(errors: &mut Vec<String>, new: impl IntoIterator<Item = String>) {
    for error in new {
        note(errors, error);
    }
}

/// Moves batches from a pipeline's entry queue into its first stage until the queue is closed
/// and empty.
async fn feed_pipeline(
    queue: QueueReceiver<Batch>,
    head: Arc<dyn Consumer>,
    stage: String,
    telemetry: AgentTelemetry,
    deadline: CancellationToken,
) {
    while let Some(batch) = queue.recv().await {
        deliver_or_count(head.as_ref(), batch, &stage, &telemetry, &deadline).await;
    }
}

/// Where a receiver's batch of one signal goes: the entry queues of its pipelines (all or none),
/// then the first stage of each pipeline whose queue is off (`queue.enabled: false`), whose
/// answer is the receiver's. A batch refused there after the queues took it reaches them again
/// when the client retries: at least once, for a receiver in several pipelines.
struct PipelineEntry {
    queued: Option<QueueGroup>,
    direct: Vec<Arc<dyn Consumer>>,
}

#[async_trait]
impl Consumer for PipelineEntry {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        if let Some(queued) = &self.queued {
            queued.consume(batch.clone()).await?;
        }
        for head in &self.direct {
            head.consume(batch.clone()).await?;
        }
        Ok(())
    }
}

/// Counts what a receiver's pipelines accept and refuse, so no receiver has to.
struct ObservedReceiverOutput {
    receiver: String,
    next: Arc<dyn Consumer>,
    telemetry: AgentTelemetry,
}

#[async_trait]
impl Consumer for ObservedReceiverOutput {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        let items = batch.item_count() as u64;
        let labels = AgentTelemetry::items(&self.receiver, batch.signal());
        let result = self.next.consume(batch).await;
        match &result {
            Ok(()) => self
                .telemetry
                .receiver_accepted
                .get_or_create(&labels)
                .inc_by(items),
            Err(_) => self
                .telemetry
                .receiver_refused
                .get_or_create(&labels)
                .inc_by(items),
        };
        result
    }
}

/// The machine's host name, for `host.name`. Falls back to `localhost` rather than failing.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
