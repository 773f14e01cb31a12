//! The exporter helper: what every exporter needs around its transport — turning a batch into
//! requests once, a bounded sending queue of those requests, retries with backoff for retryable
//! errors, a timeout per attempt, and the counting of what was sent, what failed and what was
//! given up.
//!
//! An exporter implements [`Sender`]: [`Sender::requests`] turns a batch into what goes on the
//! wire (encoded bodies, remote-write shards) — called once per batch, before the queue — and
//! [`Sender::send`] sends one request. [`QueuedExporter::new`] wraps it as a
//! [`podscope_core::Exporter`]. Retries resend the request as it was built: nothing is encoded,
//! translated or accumulated twice.
//!
//! With the queue on, `consume` returns once the queue has room for the batch; the requests of
//! a sender whose order does not matter are then built in a task of their own, so that the one
//! task feeding an exporter (a pipeline's batch processor) is not held up by encoding and
//! compressing. An ordered sender builds them before `consume` returns.
//!
//! With a persistent queue (`sending_queue.storage`, see `crate::file_storage`), `consume`
//! builds the requests and writes each to disk before it returns; a request is deleted once
//! sent or given up, and one still queued when the agent stops stays on disk (not counted as
//! dropped) and is queued again, oldest first, by the next `start`.
//!
//! Who counts a loss: the helper owns a batch once it took it (room in the queue, or with the
//! queue off, turned into requests); from then on every item ends in
//! `podscope_exporter_sent_items_total` or `podscope_exporter_dropped_items_total` (by reason:
//! the permanent error, `rejected` by the backend, `retries_exhausted`, `shutdown`,
//! `untranslatable` for items no request carries, or the sender's error for a batch it could
//! not encode once taken), and `consume` returns `Ok`. A batch it did not take (the queue stayed
//! full, the agent is stopping, an ordered sender or one without a queue cannot encode it) comes
//! back as an error and stays the caller's.

mod config;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use podscope_core::backoff::{Backoff, BackoffPolicy};
use podscope_core::config::QueueSettings;
use podscope_core::queue::{partitioned_queue, QueueReceiver, QueueSender, Reservation};
use podscope_core::telemetry::{AgentTelemetry, ComponentLabels, ItemReasonLabels, ReasonLabels};
use podscope_core::{
    Batch, BuildContext, Component, ComponentKind, ConsumeError, Consumer, Exporter, Signal,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::file_storage::{DiskQueue, FileStorage, StoreError, StoredRequest};

pub use config::{HelperSettings, RetrySettings, SendingQueueSettings};

/// One request built from a batch, as it waits in the sending queue.
pub struct Request<P> {
    /// What [`Sender::send`] sends.
    pub payload: P,
    /// Items (data points or spans) of the batch it carries: what is counted as sent or dropped.
    pub items: usize,
    /// For a sender with [`Sender::ORDERED`]: requests with the same key are sent one after the
    /// other, in the order they were built. Ignored otherwise.
    pub order_key: u64,
}

impl<P> Request<P> {
    /// A request whose order does not matter.
    pub fn unordered(payload: P, items: usize) -> Request<P> {
        Request {
            payload,
            items,
            order_key: 0,
        }
    }
}

/// What the backend did with a request it accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Items it rejected (OTLP partial success): dropped, reason `rejected`.
    pub rejected: usize,
}

/// The exporter-specific part: build requests from batches and send them.
#[async_trait]
pub trait Sender: Send + Sync + 'static {
    /// What one send carries.
    type Payload: Send + Sync + 'static;

    /// When true, requests with the same [`Request::order_key`] reach the backend in the order
    /// they were built, even with several consumers and retries: each consumer drains its own
    /// partition of the queue (remote write: a series' samples must arrive in time order).
    const ORDERED: bool = false;

    /// Called once before any send (connect, open a file, bind a port).
    async fn start(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Turns a batch into its requests. Called once per batch the helper takes (an error means
    /// it did not take it); it may keep state (remote write accumulates deltas).
    fn requests(&self, batch: Batch) -> Result<Vec<Request<Self::Payload>>, ConsumeError>;

    /// Sends one request. Classify failures: retryable (the backend may take it later) or
    /// permanent.
    async fn send(&self, payload: &Self::Payload) -> Result<Sent, ConsumeError>;

    /// Called at shutdown after the queue is drained (flush buffers, close files).
    async fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// True when [`Sender::stored_form`] and [`Sender::restore`] keep a payload on disk,
    /// so the sender can have a persistent queue (`sending_queue.storage`).
    const PERSISTENT: bool = false;

    /// What a persistent queue keeps for a payload: a tag of the sender's for its format, and
    /// its encoded bytes as they are (nothing is encoded again).
    fn stored_form(&self, payload: &Self::Payload) -> (u8, Bytes) {
        let _ = payload;
        (0, Bytes::new())
    }

    /// The payload back from [`Sender::stored_form`]'s parts, written by this exporter in this
    /// or an earlier run (maybe with other settings: refuse rather than send it wrong).
    fn restore(&self, signal: Signal, format: u8, stored: Bytes) -> Result<Self::Payload, String> {
        let _ = (signal, format, stored);
        Err("this exporter cannot keep its queue on disk".to_string())
    }
}

/// A request in the sending queue.
struct Queued<P> {
    request: Request<P>,
    signal: Signal,
    /// Its file, with a persistent queue: deleted once the request is sent or given up, kept
    /// when the agent stops before that (the next start sends it).
    stored: Option<StoredRequest>,
}

type Partitions<P> = Vec<QueueReceiver<Queued<P>>>;

/// A [`Sender`] wrapped with the sending queue, retries and timeouts.
pub struct QueuedExporter<S: Sender> {
    core: Arc<SendCore<S>>,
    queue: Option<QueueSender<Queued<S::Payload>>>,
    /// The queue's partitions until `start` gives each its consumer.
    pending: Mutex<Option<Partitions<S::Payload>>>,
    workers: TaskTracker,
    /// Tasks building the requests of batches the queue has room for (unordered senders).
    encoders: TaskTracker,
    num_consumers: usize,
    /// Held from building requests until they are queued (or sent, with the queue off), for
    /// ordered senders and persistent queues: requests enter the queue in the order they were
    /// built (and written).
    order: tokio::sync::Mutex<()>,
    /// With a persistent queue: true once what an earlier run left is back in the queue; new
    /// batches wait for it, so they queue behind the old ones.
    replayed: Arc<tokio::sync::watch::Sender<bool>>,
}

struct SendCore<S> {
    id: String,
    sender: S,
    settings: HelperSettings,
    telemetry: AgentTelemetry,
    /// Fired when the service's shutdown deadline is reached: stop retrying, count, return.
    cancel: CancellationToken,
    /// The persistent queue's folder (`sending_queue.storage`).
    storage: Option<Arc<DiskQueue>>,
}

impl<S: Sender> QueuedExporter<S> {
    /// The exporter; with `sending_queue.storage`, its queue is opened in that `file_storage`
    /// extension (an error if the sender cannot persist its requests, or the folder cannot be
    /// opened).
    pub fn new(
        ctx: &BuildContext,
        settings: HelperSettings,
        sender: S,
    ) -> anyhow::Result<Arc<Self>> {
        let id = ctx.id.to_string();
        let q = &settings.sending_queue;
        let storage = match &q.storage {
            Some(name) if q.enabled => {
                anyhow::ensure!(
                    S::PERSISTENT,
                    "exporter {id}: sending_queue.storage is not supported by this exporter (otlp, otlphttp and jaeger only)"
                );
                let extension = ctx
                    .extensions
                    .used_by::<FileStorage>(ComponentKind::Exporter, &ctx.id)
                    .with_context(|| format!("exporter {id}: sending_queue.storage {name}"))?;
                Some(Arc::new(extension.open_queue(&id)?))
            }
            _ => None,
        };
        let num_consumers = q.num_consumers.max(1);
        let (queue, pending) = if q.enabled {
            // Ordered senders get one partition per consumer; the others share one.
            let partitions = if S::ORDERED { num_consumers } else { 1 };
            let (tx, rx) = partitioned_queue(
                format!("exporter/{id}"),
                &QueueSettings {
                    enabled: true,
                    capacity: q.queue_size,
                    when_full: q.when_full,
                    block_timeout: q.block_timeout,
                },
                partitions,
                &ctx.telemetry,
            );
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Ok(Arc::new(QueuedExporter {
            num_consumers,
            core: Arc::new(SendCore {
                id,
                sender,
                settings,
                telemetry: ctx.telemetry.clone(),
                cancel: CancellationToken::new(),
                storage,
            }),
            queue,
            pending: Mutex::new(pending),
            workers: TaskTracker::new(),
            encoders: TaskTracker::new(),
            order: tokio::sync::Mutex::new(()),
            replayed: Arc::new(tokio::sync::watch::Sender::new(false)),
        }))
    }

    /// The wrapped sender (tests and exporters that expose state, e.g. a bound address).
    pub fn sender(&self) -> &S {
        &self.core.sender
    }
}

const SHUTDOWN: &str = "shutdown";

/// Why a request was not sent: the reason it is counted under, and the last error.
struct GiveUp {
    reason: String,
    error: Option<ConsumeError>,
}

impl GiveUp {
    fn because(error: ConsumeError) -> GiveUp {
        GiveUp {
            reason: error.reason().to_string(),
            error: Some(error),
        }
    }

    fn shutdown(error: Option<ConsumeError>) -> GiveUp {
        GiveUp {
            reason: SHUTDOWN.to_string(),
            error,
        }
    }
}

impl<S: Sender> SendCore<S> {
    /// The batch's requests; items none of them carries (no form on the wire, e.g. a data point
    /// without a value) are dropped here, reason `untranslatable`.
    fn requests(&self, batch: Batch) -> Result<Vec<Request<S::Payload>>, ConsumeError> {
        let (items, signal) = (batch.item_count(), batch.signal());
        let requests = self.sender.requests(batch)?;
        let carried: usize = requests.iter().map(|r| r.items).sum();
        if carried < items {
            self.count_dropped(items - carried, signal, "untranslatable");
        }
        Ok(requests)
    }

    /// Builds the batch's requests and commits them with the room reserved for it.
    fn build_and_commit(
        &self,
        reservation: Reservation<Queued<S::Payload>>,
        partitions: u64,
        batch: Batch,
    ) -> Result<(), ConsumeError> {
        let signal = batch.signal();
        let entries = self
            .requests(batch)?
            .into_iter()
            .map(|request| {
                let partition = (request.order_key % partitions) as usize;
                let items = request.items;
                let stored = None;
                (
                    partition,
                    Queued {
                        request,
                        signal,
                        stored,
                    },
                    items,
                )
            })
            .collect::<Vec<_>>();
        let built: usize = entries.iter().map(|e| e.2).sum();
        if let Err(error) = reservation.commit(entries, signal) {
            // Built (and maybe accounted in the sender's state) but the queue closed meanwhile:
            // the batch is ours now, so its loss is counted here rather than retried upstream.
            tracing::warn!(exporter = %self.id, items = built, %error, "dropping a batch (shutdown)");
            self.count_dropped(built, signal, "shutdown");
        }
        Ok(())
    }

    /// Sends one request with retries until it is sent, refused for good, out of time or past
    /// the shutdown deadline; counts the outcome either way. A stored request is deleted from
    /// disk once it is settled, and kept (not counted) when the agent stops first.
    async fn deliver(&self, queued: Queued<S::Payload>) {
        let Queued {
            request,
            signal,
            stored,
        } = queued;
        match (self.send_with_retries(&request).await, stored) {
            (Ok(sent), stored) => {
                self.count_sent(&request, signal, sent);
                self.forget(stored);
            }
            (Err(GiveUp { reason, .. }), Some(stored)) if reason == SHUTDOWN => {
                tracing::info!(exporter = %self.id, items = request.items, path = %stored.path.display(), "stopping with a request unsent; it stays queued on disk for the next start");
            }
            (Err(GiveUp { reason, error }), stored) => {
                self.give_up(&request, signal, &reason, error.as_ref());
                self.forget(stored);
            }
        }
    }

    fn forget(&self, stored: Option<StoredRequest>) {
        if let (Some(storage), Some(stored)) = (&self.storage, stored) {
            storage.remove(&stored);
        }
    }

    async fn send_with_retries(&self, request: &Request<S::Payload>) -> Result<Sent, GiveUp> {
        let retry = &self.settings.retry_on_failure;
        let mut backoff = Backoff::new(BackoffPolicy {
            initial: retry.initial_interval,
            max: retry.max_interval,
            multiplier: retry.multiplier,
            randomization_factor: retry.randomization_factor,
            max_elapsed: (!retry.max_elapsed_time.is_zero()).then_some(retry.max_elapsed_time),
        });
        loop {
            if self.cancel.is_cancelled() {
                return Err(GiveUp::shutdown(None));
            }
            let started = Instant::now();
            let attempt = tokio::select! {
                biased;
                attempt = tokio::time::timeout(self.settings.timeout, self.sender.send(&request.payload)) => attempt,
                // An attempt still running at the deadline is abandoned: counted as dropped.
                _ = self.cancel.cancelled() => return Err(GiveUp::shutdown(None)),
            };
            self.telemetry
                .exporter_send_duration
                .get_or_create(&ComponentLabels {
                    component: self.id.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            let error = match attempt {
                Ok(Ok(sent)) => return Ok(sent),
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
            let hint = match &error {
                ConsumeError::Permanent { .. } => return Err(GiveUp::because(error)),
                ConsumeError::Retryable { retry_after, .. } => *retry_after,
            };
            if !retry.enabled {
                return Err(GiveUp::because(error));
            }
            let Some(wait) = backoff.next_wait(hint) else {
                return Err(GiveUp {
                    reason: "retries_exhausted".to_string(),
                    error: Some(error),
                });
            };
            tracing::debug!(exporter = %self.id, %error, ?wait, "export failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return Err(GiveUp::shutdown(Some(error))),
            }
        }
    }

    /// Puts what an earlier run left on disk back in the queue, oldest first, waiting for room
    /// whatever `when_full` says (it was acknowledged long ago). A file that fails its checks is
    /// skipped, logged with its path and counted (reason `corrupt`). Ends early when the queue
    /// closes: the rest stays on disk.
    async fn replay(&self, queue: &QueueSender<Queued<S::Payload>>, recovered: Vec<StoredRequest>) {
        let Some(storage) = &self.storage else {
            return;
        };
        if !recovered.is_empty() {
            let items: usize = recovered.iter().map(|r| r.items).sum();
            tracing::info!(exporter = %self.id, requests = recovered.len(), items, dir = %storage.dir().display(), "sending what the last run left queued on disk");
        }
        for stored in recovered {
            let (disk, file) = (storage.clone(), stored.clone());
            let payload = tokio::task::spawn_blocking(move || disk.read(&file))
                .await
                .map_err(|panicked| panicked.to_string())
                .and_then(|read| read.map_err(|corrupt| corrupt.reason))
                .and_then(|(format, bytes)| self.sender.restore(stored.signal, format, bytes));
            let payload = match payload {
                Ok(payload) => payload,
                Err(reason) => {
                    tracing::error!(exporter = %self.id, path = %stored.path.display(), items = stored.items, %reason, "skipping a corrupt queue file (renamed to .corrupt)");
                    storage.quarantine(&stored);
                    self.count_dropped(stored.items, stored.signal, "corrupt");
                    continue;
                }
            };
            let Ok(reservation) = queue.reserve_owned(stored.items).await else {
                return;
            };
            let (items, signal) = (stored.items, stored.signal);
            let queued = Queued {
                request: Request::unordered(payload, items),
                signal,
                stored: Some(stored),
            };
            if reservation
                .commit(vec![(0, queued, items)], signal)
                .is_err()
            {
                return;
            }
        }
    }

    fn count_sent(&self, request: &Request<S::Payload>, signal: Signal, sent: Sent) {
        let rejected = sent.rejected.min(request.items);
        self.telemetry
            .exporter_sent
            .get_or_create(&AgentTelemetry::items(&self.id, signal))
            .inc_by((request.items - rejected) as u64);
        if rejected > 0 {
            self.count_dropped(rejected, signal, "rejected");
        }
    }

    fn give_up(
        &self,
        request: &Request<S::Payload>,
        signal: Signal,
        reason: &str,
        error: Option<&ConsumeError>,
    ) {
        match error {
            Some(error) => {
                tracing::warn!(exporter = %self.id, items = request.items, %error, "dropping a request ({reason})")
            }
            None => {
                tracing::warn!(exporter = %self.id, items = request.items, "dropping a request ({reason})")
            }
        }
        self.count_dropped(request.items, signal, reason);
    }

    fn count_dropped(&self, items: usize, signal: Signal, reason: &str) {
        self.telemetry
            .exporter_dropped
            .get_or_create(&ItemReasonLabels {
                component: self.id.clone(),
                signal: signal.into(),
                reason: reason.to_string(),
            })
            .inc_by(items as u64);
    }
}

impl<S: Sender> QueuedExporter<S> {
    /// Builds the batch's requests and puts them in the queue, once the queue has room.
    async fn enqueue(
        &self,
        queue: &QueueSender<Queued<S::Payload>>,
        batch: Batch,
    ) -> Result<(), ConsumeError> {
        if let Some(storage) = &self.core.storage {
            return self.enqueue_stored(queue, storage, batch).await;
        }
        let (items, signal) = (batch.item_count(), batch.signal());
        let reservation = queue.reserve(items).await?;
        if !reservation.has_room() {
            // drop_newest and full: counted by the queue, nothing to build.
            return reservation.commit(Vec::new(), signal);
        }
        let partitions = queue.partitions() as u64;
        if S::ORDERED {
            let _in_order = self.in_order().await;
            return self.core.build_and_commit(reservation, partitions, batch);
        }
        let core = self.core.clone();
        self.encoders.spawn(async move {
            if let Err(error) = core.build_and_commit(reservation, partitions, batch) {
                tracing::warn!(exporter = %core.id, items, %error, "dropping a batch it cannot encode");
                core.count_dropped(items, signal, error.reason());
            }
        });
        Ok(())
    }

    /// With a persistent queue: builds the batch's requests and writes each to disk before
    /// returning, so an `Ok` means the batch survives a crash. A request the storage cannot take
    /// (size limit, full disk, I/O error) is dropped and counted, with the error logged.
    async fn enqueue_stored(
        &self,
        queue: &QueueSender<Queued<S::Payload>>,
        storage: &Arc<DiskQueue>,
        batch: Batch,
    ) -> Result<(), ConsumeError> {
        let (items, signal) = (batch.item_count(), batch.signal());
        let block_timeout = self.core.settings.sending_queue.block_timeout;
        let mut replayed = self.replayed.subscribe();
        if tokio::time::timeout(block_timeout, replayed.wait_for(|done| *done))
            .await
            .is_err()
        {
            return Err(ConsumeError::retryable(
                "queue_full",
                format!(
                    "exporter {} is still queueing what the last run left on disk",
                    self.core.id
                ),
            ));
        }
        let reservation = queue.reserve(items).await?;
        if !reservation.has_room() {
            return reservation.commit(Vec::new(), signal);
        }
        // Files are numbered in the order they are written; the queue gets them in that order.
        let _in_order = self.order.lock().await;
        let mut entries = Vec::new();
        for request in self.core.requests(batch)? {
            let (format, bytes) = self.core.sender.stored_form(&request.payload);
            let (disk, items) = (storage.clone(), request.items);
            let written =
                tokio::task::spawn_blocking(move || disk.append(signal, items, format, &bytes))
                    .await
                    .unwrap_or_else(|panicked| {
                        Err(StoreError::Io {
                            path: storage.dir().to_path_buf(),
                            error: std::io::Error::other(panicked.to_string()),
                        })
                    });
            match written {
                Ok(stored) => {
                    let stored = Some(stored);
                    entries.push((
                        0,
                        Queued {
                            request,
                            signal,
                            stored,
                        },
                        items,
                    ));
                }
                Err(error) => {
                    tracing::error!(exporter = %self.core.id, items, %error, "dropping a request its queue storage cannot take");
                    self.core.count_dropped(items, signal, error.reason());
                }
            }
        }
        if reservation.commit(entries, signal).is_err() {
            // Stopping: the requests are on disk, and the next start sends them.
            tracing::info!(exporter = %self.core.id, items, "stopping; a batch just written stays queued on disk for the next start");
        }
        Ok(())
    }

    /// With the queue off: builds the requests and sends each with retries, in the caller's task.
    async fn send_now(&self, batch: Batch) -> Result<(), ConsumeError> {
        let signal = batch.signal();
        let _in_order = self.in_order().await;
        for request in self.core.requests(batch)? {
            let stored = None;
            self.core
                .deliver(Queued {
                    request,
                    signal,
                    stored,
                })
                .await;
        }
        Ok(())
    }

    async fn in_order(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if S::ORDERED {
            Some(self.order.lock().await)
        } else {
            None
        }
    }
}

#[async_trait]
impl<S: Sender> Consumer for QueuedExporter<S> {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        match &self.queue {
            Some(queue) => self.enqueue(queue, batch).await,
            None => self.send_now(batch).await,
        }
    }
}

#[async_trait]
impl<S: Sender> Component for QueuedExporter<S> {
    async fn start(&self) -> anyhow::Result<()> {
        self.core.sender.start().await?;
        let partitions = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for partition in partitions.into_iter().flatten() {
            // One consumer per partition keeps an ordered sender's order; otherwise they share.
            let consumers = if S::ORDERED { 1 } else { self.num_consumers };
            for _ in 0..consumers {
                let (core, partition) = (self.core.clone(), partition.clone());
                self.workers.spawn(async move {
                    while let Some(queued) = partition.recv().await {
                        core.deliver(queued).await;
                    }
                });
            }
        }
        match (&self.core.storage, &self.queue) {
            (Some(storage), Some(queue)) => {
                let recovered = storage.take_recovered();
                let (core, queue, replayed) =
                    (self.core.clone(), queue.clone(), self.replayed.clone());
                // A worker like the senders: closing the queue at shutdown ends it too.
                self.workers.spawn(async move {
                    core.replay(&queue, recovered).await;
                    replayed.send_replace(true);
                });
            }
            _ => {
                self.replayed.send_replace(true);
            }
        }
        Ok(())
    }

    /// Closes the queue, lets the senders drain it and flushes. If the caller drops this future
    /// unfinished (its deadline passed), retries stop and what is left is counted as dropped
    /// (`shutdown`); calling it again then waits until that counting is done.
    async fn shutdown(&self) -> anyhow::Result<()> {
        // Batches taken before shutdown enter the queue before it closes.
        self.encoders.close();
        self.encoders.wait().await;
        if let Some(queue) = &self.queue {
            queue.close();
        }
        let give_up = self.core.cancel.clone().drop_guard();
        self.workers.close();
        self.workers.wait().await;
        give_up.disarm();
        // Never started: the closed queue still holds what nobody will send.
        let never_started = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for partition in never_started.into_iter().flatten() {
            while let Some(queued) = partition.recv().await {
                // A stored request stays on disk for the next start.
                if queued.stored.is_none() {
                    self.core
                        .count_dropped(queued.request.items, queued.signal, SHUTDOWN);
                }
            }
        }
        self.core.sender.flush().await
    }
}

impl<S: Sender> Exporter for QueuedExporter<S> {}
