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

use async_trait::async_trait;
use podscope_core::backoff::{Backoff, BackoffPolicy};
use podscope_core::config::QueueSettings;
use podscope_core::queue::{partitioned_queue, QueueReceiver, QueueSender, Reservation};
use podscope_core::telemetry::{AgentTelemetry, ComponentLabels, ItemReasonLabels, ReasonLabels};
use podscope_core::{Batch, BuildContext, Component, ConsumeError, Consumer, Exporter, Signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
}

/// A request in the sending queue.
struct Queued<P> {
    request: Request<P>,
    signal: Signal,
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
    /// ordered senders: requests enter the queue in the order they were built.
    order: tokio::sync::Mutex<()>,
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
        let num_consumers = q.num_consumers.max(1);
        let (queue, pending) = if q.enabled {
            // Ordered senders get one partition per consumer; the others share one.
            let partitions = if S::ORDERED { num_consumers } else { 1 };
            let (tx, rx) = partitioned_queue(
                format!("exporter/{id}"),
                &QueueSettings {
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
        Arc::new(QueuedExporter {
            num_consumers,
            core: Arc::new(SendCore {
                id,
                sender,
                settings,
                telemetry: ctx.telemetry.clone(),
                cancel: CancellationToken::new(),
            }),
            queue,
            pending: Mutex::new(pending),
            workers: TaskTracker::new(),
            encoders: TaskTracker::new(),
            order: tokio::sync::Mutex::new(()),
        })
    }

    /// The wrapped sender (tests and exporters that expose state, e.g. a bound address).
    pub fn sender(&self) -> &S {
        &self.core.sender
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
                (partition, Queued { request, signal }, items)
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
    /// the shutdown deadline; counts the outcome either way.
    async fn deliver(&self, queued: Queued<S::Payload>) {
        let Queued { request, signal } = queued;
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
                return self.give_up(&request, signal, "shutdown", None);
            }
            let started = Instant::now();
            let attempt = tokio::select! {
                biased;
                attempt = tokio::time::timeout(self.settings.timeout, self.sender.send(&request.payload)) => attempt,
                // An attempt still running at the deadline is abandoned: counted as dropped.
                _ = self.cancel.cancelled() => return self.give_up(&request, signal, "shutdown", None),
            };
            self.telemetry
                .exporter_send_duration
                .get_or_create(&ComponentLabels {
                    component: self.id.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            let error = match attempt {
                Ok(Ok(sent)) => return self.count_sent(&request, signal, sent),
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
                ConsumeError::Permanent { .. } => {
                    return self.give_up(&request, signal, error.reason(), Some(&error))
                }
                ConsumeError::Retryable { retry_after, .. } => *retry_after,
            };
            if !retry.enabled {
                return self.give_up(&request, signal, error.reason(), Some(&error));
            }
            let Some(wait) = backoff.next_wait(hint) else {
                return self.give_up(&request, signal, "retries_exhausted", Some(&error));
            };
            tracing::debug!(exporter = %self.id, %error, ?wait, "export failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return self.give_up(&request, signal, "shutdown", Some(&error)),
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

    /// With the queue off: builds the requests and sends each with retries, in the caller's task.
    async fn send_now(&self, batch: Batch) -> Result<(), ConsumeError> {
        let signal = batch.signal();
        let _in_order = self.in_order().await;
        for request in self.core.requests(batch)? {
            self.core.deliver(Queued { request, signal }).await;
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
                self.core
                    .count_dropped(queued.request.items, queued.signal, "shutdown");
            }
        }
        self.core.sender.flush().await
    }
}

impl<S: Sender> Exporter for QueuedExporter<S> {}
