//! A bounded queue of batches between two stages, sized in items (data points or spans).
//!
//! When full it either blocks the sender (up to `block_timeout`, then refuses with a retryable
//! error so a receiver can answer UNAVAILABLE / 503) or drops the incoming batch and counts it
//! (`when_full: drop_newest`). Several consumers may take from one queue.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batch::Batch;
use crate::config::{QueueSettings, WhenFull};
use crate::consumer::{ConsumeError, Consumer};
use crate::telemetry::{AgentTelemetry, QueueItemLabels, QueueLabels};

struct Entry {
    batch: Batch,
    /// Room taken in the queue; given back when the batch is taken out.
    _room: OwnedSemaphorePermit,
}

struct Shared {
    name: String,
    settings: QueueSettings,
    room: Arc<Semaphore>,
    telemetry: AgentTelemetry,
}

impl Shared {
    fn update_size_gauge(&self) {
        let used =
            self.settings.capacity - self.room.available_permits().min(self.settings.capacity);
        self.telemetry
            .queue_size
            .get_or_create(&QueueLabels {
                queue: self.name.clone(),
            })
            .set(used as i64);
    }
}

/// The sending half; also a [`Consumer`], so a stage can push into it directly.
#[derive(Clone)]
pub struct QueueSender {
    shared: Arc<Shared>,
    tx: async_channel::Sender<Entry>,
}

/// The receiving half. Clone it to add consumers.
#[derive(Clone)]
pub struct QueueReceiver {
    shared: Arc<Shared>,
    rx: async_channel::Receiver<Entry>,
}

/// Creates a queue named `name` (used as the `queue` label of its metrics).
pub fn bounded_queue(
    name: impl Into<String>,
    settings: &QueueSettings,
    telemetry: &AgentTelemetry,
) -> (QueueSender, QueueReceiver) {
    let name = name.into();
    let capacity = settings.capacity.max(1);
    let shared = Arc::new(Shared {
        settings: QueueSettings {
            capacity,
            ..settings.clone()
        },
        room: Arc::new(Semaphore::new(capacity)),
        telemetry: telemetry.clone(),
        name: name.clone(),
    });
    telemetry
        .queue_capacity
        .get_or_create(&QueueLabels { queue: name })
        .set(capacity as i64);
    shared.update_size_gauge();
    let (tx, rx) = async_channel::unbounded();
    (
        QueueSender {
            shared: shared.clone(),
            tx,
        },
        QueueReceiver { shared, rx },
    )
}

impl QueueSender {
    /// Queues the batch, applying the `when_full` policy.
    pub async fn send(&self, batch: Batch) -> Result<(), ConsumeError> {
        let shared = &self.shared;
        // A batch larger than the whole queue takes all of it rather than never fitting.
        let needed = batch.item_count().min(shared.settings.capacity) as u32;
        let room = match shared.settings.when_full {
            WhenFull::Block => {
                let acquire = shared.room.clone().acquire_many_owned(needed);
                match tokio::time::timeout(shared.settings.block_timeout, acquire).await {
                    Ok(Ok(room)) => room,
                    Ok(Err(_closed)) => return Err(self.closed_error()),
                    Err(_timeout) => {
                        return Err(ConsumeError::retryable(
                            "queue_full",
                            format!(
                                "queue {} is full ({} items) and stayed full for {:?}",
                                shared.name,
                                shared.settings.capacity,
                                shared.settings.block_timeout
                            ),
                        ))
                    }
                }
            }
            WhenFull::DropNewest => match shared.room.clone().try_acquire_many_owned(needed) {
                Ok(room) => room,
                Err(tokio::sync::TryAcquireError::Closed) => return Err(self.closed_error()),
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    shared
                        .telemetry
                        .queue_dropped
                        .get_or_create(&QueueItemLabels {
                            queue: shared.name.clone(),
                            signal: batch.signal().into(),
                        })
                        .inc_by(batch.item_count() as u64);
                    return Ok(());
                }
            },
        };
        self.tx
            .send(Entry { batch, _room: room })
            .await
            .map_err(|_| self.closed_error())?;
        shared.update_size_gauge();
        Ok(())
    }

    /// Stops accepting; consumers still drain what is queued, then see the end.
    pub fn close(&self) {
        self.tx.close();
        self.shared.room.close();
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    fn closed_error(&self) -> ConsumeError {
        ConsumeError::retryable(
            "shutting_down",
            format!(
                "queue {} is closed: the agent is shutting down",
                self.shared.name
            ),
        )
    }
}

#[async_trait]
impl Consumer for QueueSender {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.send(batch).await
    }
}

impl QueueReceiver {
    /// The next batch, or `None` once the queue is closed and empty.
    pub async fn recv(&self) -> Option<Batch> {
        let entry = self.rx.recv().await.ok()?;
        let batch = entry.batch;
        drop(entry._room);
        self.shared.update_size_gauge();
        Some(batch)
    }

    /// Items waiting.
    pub fn len_items(&self) -> usize {
        self.shared.settings.capacity
            - self
                .shared
                .room
                .available_permits()
                .min(self.shared.settings.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn spans(n: usize) -> Batch {
        Batch::traces(vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span::default(); n],
                ..Default::default()
            }],
            ..Default::default()
        }])
    }

    fn settings(capacity: usize, when_full: WhenFull) -> QueueSettings {
        QueueSettings {
            capacity,
            when_full,
            block_timeout: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn blocking_queue_refuses_with_retryable_error_when_full() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue("q", &settings(10, WhenFull::Block), &telemetry);
        tx.send(spans(6)).await.unwrap();
        let err = tx.send(spans(6)).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.reason(), "queue_full");
        assert_eq!(rx.len_items(), 6);
        assert_eq!(rx.recv().await.unwrap().item_count(), 6);
        // Room is back once the batch is taken out.
        tx.send(spans(10)).await.unwrap();
        assert_eq!(rx.len_items(), 10);
    }

    #[tokio::test]
    async fn blocked_sender_proceeds_when_room_frees() {
        let telemetry = AgentTelemetry::new();
        let mut s = settings(4, WhenFull::Block);
        s.block_timeout = Duration::from_secs(30);
        let (tx, rx) = bounded_queue("q", &s, &telemetry);
        tx.send(spans(4)).await.unwrap();
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(spans(3)).await }
        });
        assert_eq!(rx.recv().await.unwrap().item_count(), 4);
        sender.await.unwrap().unwrap();
        assert_eq!(rx.recv().await.unwrap().item_count(), 3);
    }

    #[tokio::test]
    async fn drop_newest_counts_what_it_drops() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue(
            "exporter/debug",
            &settings(5, WhenFull::DropNewest),
            &telemetry,
        );
        tx.send(spans(5)).await.unwrap();
        tx.send(spans(2)).await.unwrap(); // dropped
        tx.close();
        assert_eq!(rx.recv().await.unwrap().item_count(), 5);
        assert!(rx.recv().await.is_none());
        let text = telemetry.encode_text();
        assert!(
            text.contains(
                "podscope_queue_dropped_items_total{queue=\"exporter/debug\",signal=\"traces\"} 2"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn close_lets_consumers_drain() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue("q", &settings(100, WhenFull::Block), &telemetry);
        for _ in 0..3 {
            tx.send(spans(1)).await.unwrap();
        }
        tx.close();
        assert_eq!(
            tx.send(spans(1)).await.unwrap_err().reason(),
            "shutting_down"
        );
        let mut drained = 0;
        while let Some(b) = rx.recv().await {
            drained += b.item_count();
        }
        assert_eq!(drained, 3);
    }
}
