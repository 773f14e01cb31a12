//! A bounded queue between two stages, sized in items (data points or spans).
//!
//! Room is taken in two steps: [`QueueSender::reserve`] waits for room (or finds the queue full),
//! then [`Reservation::commit`] puts what the batch became into the queue. Between the two the
//! caller may turn the batch into something else (an exporter's requests) knowing it will be
//! taken, and several queues can be reserved before any is committed ([`commit_all`]), so a batch
//! enters all of them or none.
//!
//! When full, a queue either makes the sender wait (`block`, up to `block_timeout`, then refuses
//! with a retryable error so that a receiver can answer UNAVAILABLE / 503) or drops the incoming
//! batch and counts it (`when_full: drop_newest`). A queue may have several partitions, each
//! drained in order by its own consumer, sharing one capacity.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batch::{Batch, Signal};
use crate::config::{QueueSettings, WhenFull};
use crate::consumer::{ConsumeError, Consumer};
use crate::telemetry::{AgentTelemetry, QueueItemLabels, QueueLabels};

struct Entry<T> {
    value: T,
    /// Room taken in the queue; given back when the entry is taken out.
    _room: Option<OwnedSemaphorePermit>,
}

struct Shared {
    name: String,
    settings: QueueSettings,
    room: Arc<Semaphore>,
    telemetry: AgentTelemetry,
    /// Held while entries go in and while the queue closes, so a commit is all-or-nothing.
    closed: Mutex<bool>,
}

impl Shared {
    fn update_size_gauge(&self) {
        self.telemetry
            .queue_size
            .get_or_create(&QueueLabels {
                queue: self.name.clone(),
            })
            .set(self.used() as i64);
    }

    fn used(&self) -> usize {
        self.settings.capacity - self.room.available_permits().min(self.settings.capacity)
    }

    fn lock_closed(&self) -> MutexGuard<'_, bool> {
        self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> ConsumeError {
        ConsumeError::retryable(
            "shutting_down",
            format!("queue {} is closed: the agent is shutting down", self.name),
        )
    }
}

/// The sending half.
pub struct QueueSender<T> {
    shared: Arc<Shared>,
    partitions: Vec<async_channel::Sender<Entry<T>>>,
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        QueueSender {
            shared: self.shared.clone(),
            partitions: self.partitions.clone(),
        }
    }
}

/// The receiving half of one partition. Clone it to add consumers (of a queue whose order does
/// not matter).
pub struct QueueReceiver<T> {
    shared: Arc<Shared>,
    rx: async_channel::Receiver<Entry<T>>,
}

impl<T> Clone for QueueReceiver<T> {
    fn clone(&self) -> Self {
        QueueReceiver {
            shared: self.shared.clone(),
            rx: self.rx.clone(),
        }
    }
}

/// Creates a queue named `name` (the `queue` label of its metrics) with one partition.
pub fn bounded_queue<T>(
    name: impl Into<String>,
    settings: &QueueSettings,
    telemetry: &AgentTelemetry,
) -> (QueueSender<T>, QueueReceiver<T>) {
    let (tx, mut receivers) = partitioned_queue(name, settings, 1, telemetry);
    (tx, receivers.pop().expect("one partition"))
}

/// Creates a queue with `partitions` partitions (at least one) sharing its capacity; entries
/// come out of each partition in the order they went in.
pub fn partitioned_queue<T>(
    name: impl Into<String>,
    settings: &QueueSettings,
    partitions: usize,
    telemetry: &AgentTelemetry,
) -> (QueueSender<T>, Vec<QueueReceiver<T>>) {
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
        closed: Mutex::new(false),
    });
    telemetry
        .queue_capacity
        .get_or_create(&QueueLabels { queue: name })
        .set(capacity as i64);
    shared.update_size_gauge();
    let (senders, receivers) = (0..partitions.max(1))
        .map(|_| {
            let (tx, rx) = async_channel::unbounded();
            (
                tx,
                QueueReceiver {
                    shared: shared.clone(),
                    rx,
                },
            )
        })
        .unzip();
    (
        QueueSender {
            shared,
            partitions: senders,
        },
        receivers,
    )
}

/// What a batch becomes in a queue: `(partition, value, items)` for each value queued.
pub type Parts<T> = Vec<(usize, T, usize)>;

/// Room for one batch of `items` items in a queue, or the knowledge that it has none
/// (`drop_newest`). Dropping it unused gives the room back. It holds the queue, so that what the
/// batch becomes can be built and committed in another task.
pub struct Reservation<T> {
    queue: QueueSender<T>,
    items: usize,
    room: Option<OwnedSemaphorePermit>,
}

impl<T> QueueSender<T> {
    /// Room for `items` items, waiting for it as `when_full` says. A batch larger than the whole
    /// queue takes all of it rather than never fitting.
    pub async fn reserve(&self, items: usize) -> Result<Reservation<T>, ConsumeError> {
        let shared = &self.shared;
        let needed = items.min(shared.settings.capacity) as u32;
        let room = match shared.settings.when_full {
            WhenFull::Block => {
                let acquire = shared.room.clone().acquire_many_owned(needed);
                match tokio::time::timeout(shared.settings.block_timeout, acquire).await {
                    Ok(Ok(room)) => Some(room),
                    Ok(Err(_closed)) => return Err(shared.closed_error()),
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
                Ok(room) => Some(room),
                Err(tokio::sync::TryAcquireError::Closed) => return Err(shared.closed_error()),
                Err(tokio::sync::TryAcquireError::NoPermits) => None,
            },
        };
        Ok(Reservation {
            queue: self.clone(),
            items,
            room,
        })
    }

    /// Room for `items` items, waiting as long as it takes whatever `when_full` says: for what
    /// the stage already owns and no policy may drop (a persistent queue's backlog at start).
    /// Fails only once the queue closed.
    pub async fn reserve_owned(&self, items: usize) -> Result<Reservation<T>, ConsumeError> {
        let shared = &self.shared;
        let needed = items.min(shared.settings.capacity) as u32;
        match shared.room.clone().acquire_many_owned(needed).await {
            Ok(room) => Ok(Reservation {
                queue: self.clone(),
                items,
                room: Some(room),
            }),
            Err(_closed) => Err(shared.closed_error()),
        }
    }

    /// Queues one value of `items` items in the first partition, applying the `when_full` policy.
    pub async fn send(&self, value: T, items: usize, signal: Signal) -> Result<(), ConsumeError> {
        self.reserve(items)
            .await?
            .commit(vec![(0, value, items)], signal)
    }

    /// Stops accepting; consumers still drain what is queued, then see the end.
    pub fn close(&self) {
        let mut closed = self.shared.lock_closed();
        *closed = true;
        for partition in &self.partitions {
            partition.close();
        }
        self.shared.room.close();
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// How many partitions the queue has.
    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }
}

impl<T> Reservation<T> {
    /// False when the queue was full (`drop_newest`): committing will drop and count the batch,
    /// so there is no need to build what would have been queued.
    pub fn has_room(&self) -> bool {
        self.room.is_some()
    }

    /// Puts the batch in the queue as `entries` (`(partition, value, items)`, partitions taken
    /// modulo the queue's), or counts its items as dropped if the queue had no room.
    pub fn commit(self, entries: Parts<T>, signal: Signal) -> Result<(), ConsumeError> {
        let shared = self.queue.shared.clone();
        let closed = shared.lock_closed();
        if *closed {
            return Err(shared.closed_error());
        }
        self.commit_locked(entries, signal);
        Ok(())
    }

    /// `commit`, with the queue's close lock held by the caller.
    fn commit_locked(mut self, entries: Parts<T>, signal: Signal) {
        let queue = &self.queue;
        let Some(room) = self.room.take() else {
            queue
                .shared
                .telemetry
                .queue_dropped
                .get_or_create(&QueueItemLabels {
                    queue: queue.shared.name.clone(),
                    signal: signal.into(),
                })
                .inc_by(self.items as u64);
            return;
        };
        // Each entry carries its share of the room, so taking it out frees exactly that; the
        // last one carries what is left.
        let count = entries.len();
        let mut room = Some(room);
        for (i, (partition, value, items)) in entries.into_iter().enumerate() {
            let share = if i + 1 == count {
                room.take()
            } else {
                room.as_mut()
                    .and_then(|r| r.split(items.min(r.num_permits())))
            };
            let sent = queue.partitions[partition % queue.partitions.len()].try_send(Entry {
                value,
                _room: share,
            });
            // Unbounded and not closed (the close lock is held): it cannot fail.
            debug_assert!(sent.is_ok());
        }
        queue.shared.update_size_gauge();
    }
}

/// Commits reservations in several queues at once: the batch enters every queue or none (when
/// one of them closed meanwhile). `commits` holds each reservation with its entries; each queue
/// appears once.
pub fn commit_all<T>(
    commits: Vec<(Reservation<T>, Parts<T>)>,
    signal: Signal,
) -> Result<(), ConsumeError> {
    // Locks are taken in the callers' order; `close` takes one lock only, so this cannot deadlock.
    let shared: Vec<Arc<Shared>> = commits
        .iter()
        .map(|(reservation, _)| reservation.queue.shared.clone())
        .collect();
    let guards: Vec<_> = shared.iter().map(|s| s.lock_closed()).collect();
    if let Some(i) = guards.iter().position(|closed| **closed) {
        return Err(shared[i].closed_error());
    }
    for (reservation, entries) in commits {
        reservation.commit_locked(entries, signal);
    }
    drop(guards);
    Ok(())
}

/// The entry queues of the pipelines one receiver feeds with one signal: a batch enters every
/// one of them or none. A queue that stays full (`block`) refuses for all, so the client's retry
/// can never bring a second copy to the pipelines that would have taken the first; a full
/// `drop_newest` queue drops its copy (counted) without holding back the others.
pub struct QueueGroup {
    queues: Vec<QueueSender<Batch>>,
}

impl QueueGroup {
    /// Each queue once, in a fixed order (reservations are taken in that order).
    pub fn new(queues: Vec<QueueSender<Batch>>) -> QueueGroup {
        QueueGroup { queues }
    }
}

#[async_trait]
impl Consumer for QueueGroup {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        let items = batch.item_count();
        let mut commits = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            // A refusal here releases the room already reserved in the others.
            commits.push((queue.reserve(items).await?, vec![(0, batch.clone(), items)]));
        }
        commit_all(commits, batch.signal())
    }
}

impl<T> QueueReceiver<T> {
    /// The next value, or `None` once the queue is closed and this partition is empty.
    pub async fn recv(&self) -> Option<T> {
        let entry = self.rx.recv().await.ok()?;
        let Entry { value, _room } = entry;
        drop(_room);
        self.shared.update_size_gauge();
        Some(value)
    }

    /// Items waiting, in every partition.
    pub fn len_items(&self) -> usize {
        self.shared.used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(capacity: usize, when_full: WhenFull) -> QueueSettings {
        QueueSettings {
            enabled: true,
            capacity,
            when_full,
            block_timeout: Duration::from_millis(50),
        }
    }

    const TRACES: Signal = Signal::Traces;

    #[tokio::test]
    async fn blocking_queue_refuses_with_retryable_error_when_full() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue("q", &settings(10, WhenFull::Block), &telemetry);
        tx.send("a", 6, TRACES).await.unwrap();
        let err = tx.send("b", 6, TRACES).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.reason(), "queue_full");
        assert_eq!(rx.len_items(), 6);
        assert_eq!(rx.recv().await, Some("a"));
        // Room is back once the entry is taken out.
        tx.send("c", 10, TRACES).await.unwrap();
        assert_eq!(rx.len_items(), 10);
    }

    #[tokio::test]
    async fn blocked_sender_proceeds_when_room_frees() {
        let telemetry = AgentTelemetry::new();
        let mut s = settings(4, WhenFull::Block);
        s.block_timeout = Duration::from_secs(30);
        let (tx, rx) = bounded_queue("q", &s, &telemetry);
        tx.send(4, 4, TRACES).await.unwrap();
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(3, 3, TRACES).await }
        });
        assert_eq!(rx.recv().await, Some(4));
        sender.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn drop_newest_counts_what_it_drops() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue(
            "exporter/debug",
            &settings(5, WhenFull::DropNewest),
            &telemetry,
        );
        tx.send(5, 5, TRACES).await.unwrap();
        let full = tx.reserve(2).await.unwrap();
        assert!(!full.has_room());
        full.commit(vec![(0, 2, 2)], TRACES).unwrap(); // dropped
        tx.close();
        assert_eq!(rx.recv().await, Some(5));
        assert_eq!(rx.recv().await, None);
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
            tx.send(1, 1, TRACES).await.unwrap();
        }
        tx.close();
        assert_eq!(
            tx.send(1, 1, TRACES).await.unwrap_err().reason(),
            "shutting_down"
        );
        let mut drained = 0;
        while let Some(items) = rx.recv().await {
            drained += items;
        }
        assert_eq!(drained, 3);
    }

    #[tokio::test]
    async fn an_unused_reservation_gives_its_room_back() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = bounded_queue::<u8>("q", &settings(10, WhenFull::Block), &telemetry);
        let reservation = tx.reserve(10).await.unwrap();
        assert_eq!(rx.len_items(), 10);
        drop(reservation);
        assert_eq!(rx.len_items(), 0);
        tx.send(1, 10, TRACES).await.unwrap();
    }

    #[tokio::test]
    async fn partitions_share_the_capacity_and_keep_their_order() {
        let telemetry = AgentTelemetry::new();
        let (tx, rx) = partitioned_queue("q", &settings(10, WhenFull::Block), 2, &telemetry);
        let reservation = tx.reserve(6).await.unwrap();
        reservation
            .commit(vec![(0, "a1", 2), (1, "b1", 3), (2, "a2", 1)], TRACES)
            .unwrap();
        assert_eq!(rx[0].len_items(), 6);
        assert_eq!(tx.reserve(5).await.err().unwrap().reason(), "queue_full");
        assert_eq!(rx[0].recv().await, Some("a1"));
        assert_eq!(rx[0].recv().await, Some("a2"));
        // Each entry frees its own share.
        assert_eq!(rx[0].len_items(), 3);
        assert_eq!(rx[1].recv().await, Some("b1"));
        assert_eq!(rx[1].len_items(), 0);
    }

    #[tokio::test]
    async fn a_batch_enters_every_queue_or_none() {
        let telemetry = AgentTelemetry::new();
        let (a, a_rx) = bounded_queue("a", &settings(10, WhenFull::Block), &telemetry);
        let (b, b_rx) = bounded_queue("b", &settings(10, WhenFull::Block), &telemetry);
        let commits = vec![
            (a.reserve(1).await.unwrap(), vec![(0, 1, 1)]),
            (b.reserve(1).await.unwrap(), vec![(0, 1, 1)]),
        ];
        commit_all(commits, TRACES).unwrap();
        let commits = vec![
            (a.reserve(1).await.unwrap(), vec![(0, 2, 1)]),
            (b.reserve(1).await.unwrap(), vec![(0, 2, 1)]),
        ];
        b.close(); // after the reservations, before the commit
        assert_eq!(
            commit_all(commits, TRACES).unwrap_err().reason(),
            "shutting_down"
        );
        a.close();
        assert_eq!(a_rx.recv().await, Some(1));
        assert_eq!(a_rx.recv().await, None, "nothing of the second batch");
        assert_eq!(b_rx.recv().await, Some(1));
        assert_eq!(b_rx.recv().await, None);
    }
}
