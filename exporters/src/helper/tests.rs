use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::WhenFull;
use podscope_core::{Batch, BuildContext, Component as _, ConsumeError, Consumer as _};
use podscope_testkit::BuildContextForTests as _;

use super::*;

fn spans(n: usize) -> Batch {
    podscope_testkit::fake_otlp::spans(n, &[])
}

/// Answers each attempt from a script, then succeeds; records attempt times.
struct Scripted {
    script: Mutex<Vec<Result<(), ConsumeError>>>,
    attempts: AtomicUsize,
    attempt_times: Mutex<Vec<tokio::time::Instant>>,
    delay: Duration,
}

impl Scripted {
    fn new(script: Vec<Result<(), ConsumeError>>) -> Self {
        Scripted {
            script: Mutex::new(script.into_iter().rev().collect()),
            attempts: AtomicUsize::new(0),
            attempt_times: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
        }
    }
}

#[async_trait]
impl Sender for Scripted {
    type Payload = ();

    fn requests(&self, batch: Batch) -> Result<Vec<Request<()>>, ConsumeError> {
        Ok(vec![Request::unordered((), batch.item_count())])
    }

    async fn send(&self, _payload: &()) -> Result<Sent, ConsumeError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.attempt_times
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.script
            .lock()
            .unwrap()
            .pop()
            .unwrap_or(Ok(()))
            .map(|()| Sent::default())
    }
}

fn settings(queue: bool) -> HelperSettings {
    HelperSettings {
        sending_queue: SendingQueueSettings {
            enabled: queue,
            queue_size: 100,
            num_consumers: 1,
            ..Default::default()
        },
        retry_on_failure: RetrySettings {
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(400),
            randomization_factor: 0.0,
            ..Default::default()
        },
        timeout: Duration::from_secs(1),
    }
}

fn unavailable() -> Result<(), ConsumeError> {
    Err(ConsumeError::retryable("unavailable", "backend down"))
}

fn metric_line(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

#[tokio::test(start_paused = true)]
async fn retries_with_exponential_backoff_then_succeeds() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let exporter = QueuedExporter::new(
        &ctx,
        settings(false),
        Scripted::new(vec![unavailable(), unavailable(), unavailable()]),
    )
    .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(4)).await.unwrap();
    let sender = exporter.sender();
    assert_eq!(sender.attempts.load(Ordering::SeqCst), 4);
    let times = sender.attempt_times.lock().unwrap().clone();
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        vec![
            Duration::from_millis(100),
            Duration::from_millis(150),
            Duration::from_millis(225)
        ]
    );
    let text = telemetry.encode_text();
    assert_eq!(
        metric_line(&text, "podscope_exporter_sent_items_total").as_deref(),
        Some("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 4")
    );
    assert_eq!(
        metric_line(&text, "podscope_exporter_send_failures_total").as_deref(),
        Some("podscope_exporter_send_failures_total{component=\"otlp\",reason=\"unavailable\"} 3")
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_hints_are_honoured() {
    let ctx = BuildContext::for_tests("otlp");
    let hint = Err(ConsumeError::Retryable {
        reason: "http_429",
        message: "slow down".into(),
        retry_after: Some(Duration::from_secs(7)),
    });
    let exporter = QueuedExporter::new(&ctx, settings(false), Scripted::new(vec![hint])).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(1)).await.unwrap();
    let times = exporter.sender().attempt_times.lock().unwrap().clone();
    assert_eq!(times[1] - times[0], Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn a_slow_attempt_times_out_and_is_retried() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let mut sender = Scripted::new(vec![]);
    sender.delay = Duration::from_secs(2); // longer than the 1 s timeout, every time
    let mut s = settings(false);
    s.retry_on_failure.max_elapsed_time = Duration::from_secs(3);
    let exporter = QueuedExporter::new(&ctx, s, sender).unwrap();
    exporter.start().await.unwrap();
    // Taken, then given up: the helper counts it, the caller has nothing left to retry.
    exporter.consume(spans(2)).await.unwrap();
    assert!(exporter.sender().attempts.load(Ordering::SeqCst) >= 2);
    let text = telemetry.encode_text();
    assert!(
        text.contains(
            "podscope_exporter_send_failures_total{component=\"otlp\",reason=\"timeout\"}"
        ),
        "{text}"
    );
    assert_eq!(
        metric_line(&text, "podscope_exporter_dropped_items_total").as_deref(),
        Some("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"retries_exhausted\"} 2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_hint_of_zero_never_makes_retries_faster_than_the_backoff() {
    let ctx = BuildContext::for_tests("otlp");
    let now = || {
        Err(ConsumeError::Retryable {
            reason: "resource_exhausted",
            message: "retry now".into(),
            retry_after: Some(Duration::ZERO),
        })
    };
    let exporter =
        QueuedExporter::new(&ctx, settings(false), Scripted::new(vec![now(), now()])).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(1)).await.unwrap();
    let times = exporter.sender().attempt_times.lock().unwrap().clone();
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        vec![Duration::from_millis(100), Duration::from_millis(150)]
    );
}

/// Turns a batch into one request per span, each in the partition its span index says, and
/// records the order in which they are sent.
struct Sharded {
    sent: Mutex<Vec<usize>>,
    refuse_first_of: Mutex<Vec<usize>>,
}

#[async_trait]
impl Sender for Sharded {
    type Payload = usize;
    const ORDERED: bool = true;

    fn requests(&self, batch: Batch) -> Result<Vec<Request<usize>>, ConsumeError> {
        let Batch::Traces(rss) = &batch else {
            unreachable!()
        };
        Ok(rss[0].scope_spans[0]
            .spans
            .iter()
            .map(|span| {
                let id = span.name.parse::<usize>().unwrap();
                Request {
                    payload: id,
                    items: 1,
                    order_key: (id % 2) as u64,
                }
            })
            .collect())
    }

    async fn send(&self, id: &usize) -> Result<Sent, ConsumeError> {
        let mut refuse = self.refuse_first_of.lock().unwrap();
        if let Some(i) = refuse.iter().position(|r| r == id) {
            refuse.remove(i);
            return Err(ConsumeError::retryable("unavailable", "once"));
        }
        self.sent.lock().unwrap().push(*id);
        Ok(Sent::default())
    }
}

fn named_spans(ids: std::ops::Range<usize>) -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: ids
                .map(|i| Span {
                    name: i.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }])
}

#[tokio::test]
async fn an_ordered_sender_keeps_each_partition_in_order_through_retries() {
    let ctx = BuildContext::for_tests("prometheusremotewrite");
    let mut s = settings(true);
    s.sending_queue.num_consumers = 2;
    s.retry_on_failure.initial_interval = Duration::from_millis(20);
    s.retry_on_failure.max_interval = Duration::from_millis(20);
    let sender = Sharded {
        sent: Mutex::new(Vec::new()),
        refuse_first_of: Mutex::new(vec![2, 5]),
    };
    let exporter = QueuedExporter::new(&ctx, s, sender).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(named_spans(0..5)).await.unwrap();
    exporter.consume(named_spans(5..10)).await.unwrap();
    exporter.shutdown().await.unwrap();
    let sent = exporter.sender().sent.lock().unwrap().clone();
    let even: Vec<_> = sent.iter().copied().filter(|i| i % 2 == 0).collect();
    let odd: Vec<_> = sent.iter().copied().filter(|i| i % 2 == 1).collect();
    assert_eq!(even, vec![0, 2, 4, 6, 8]);
    assert_eq!(odd, vec![1, 3, 5, 7, 9]);
}

#[tokio::test]
async fn permanent_errors_are_dropped_and_counted_once() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let bad = Err(ConsumeError::permanent("http_400", "bad request"));
    let exporter = QueuedExporter::new(&ctx, settings(true), Scripted::new(vec![bad])).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(6)).await.unwrap(); // queued: accepted
    exporter.shutdown().await.unwrap();
    assert_eq!(
        exporter.sender().attempts.load(Ordering::SeqCst),
        1,
        "never retried"
    );
    let text = telemetry.encode_text();
    assert_eq!(
        metric_line(&text, "podscope_exporter_dropped_items_total").as_deref(),
        Some("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"http_400\"} 6")
    );
}

#[tokio::test]
async fn drop_newest_queue_counts_overflow() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let mut s = settings(true);
    s.sending_queue.queue_size = 5;
    s.sending_queue.when_full = WhenFull::DropNewest;
    // Not started: nothing drains the queue.
    let exporter = QueuedExporter::new(&ctx, s, Scripted::new(vec![])).unwrap();
    exporter.consume(spans(5)).await.unwrap();
    exporter.consume(spans(3)).await.unwrap();
    let text = telemetry.encode_text();
    assert!(
        text.contains(
            "podscope_queue_dropped_items_total{queue=\"exporter/otlp\",signal=\"traces\"} 3"
        ),
        "{text}"
    );
    // Shutdown without start is safe, and counts what it could never send.
    exporter.shutdown().await.unwrap();
    let text = telemetry.encode_text();
    assert!(text.contains("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"shutdown\"} 5"), "{text}");
}

#[tokio::test]
async fn shutdown_drains_the_queue() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let exporter =
        QueuedExporter::new(&ctx, settings(true), Scripted::new(vec![unavailable()])).unwrap();
    exporter.start().await.unwrap();
    for _ in 0..10 {
        exporter.consume(spans(2)).await.unwrap();
    }
    exporter.shutdown().await.unwrap();
    let text = telemetry.encode_text();
    assert_eq!(
        metric_line(&text, "podscope_exporter_sent_items_total").as_deref(),
        Some("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 20")
    );
}

/// Builds its requests only once the test opens the gate (or after 5 s, noting that nobody
/// did), and can refuse to build them at all.
struct Gated {
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
    held_the_caller: std::sync::atomic::AtomicBool,
    encodable: bool,
}

impl Gated {
    fn new(encodable: bool) -> (Self, std::sync::mpsc::Sender<()>) {
        let (open, gate) = std::sync::mpsc::channel();
        let sender = Gated {
            gate: Mutex::new(gate),
            held_the_caller: Default::default(),
            encodable,
        };
        (sender, open)
    }
}

#[async_trait]
impl Sender for Gated {
    type Payload = ();

    fn requests(&self, batch: Batch) -> Result<Vec<Request<()>>, ConsumeError> {
        let gate = self.gate.lock().unwrap();
        if gate.recv_timeout(Duration::from_secs(5)).is_err() {
            self.held_the_caller.store(true, Ordering::SeqCst);
        }
        if !self.encodable {
            return Err(ConsumeError::permanent("unencodable", "no wire form"));
        }
        Ok(vec![Request::unordered((), batch.item_count())])
    }

    async fn send(&self, _payload: &()) -> Result<Sent, ConsumeError> {
        Ok(Sent::default())
    }
}

/// The task feeding an exporter (a pipeline's batch processor) goes on with its next batch
/// while the last one is encoded; shutdown still waits for it to be built and sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_sender_builds_requests_outside_the_callers_task() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let (sender, open) = Gated::new(true);
    let exporter = QueuedExporter::new(&ctx, settings(true), sender).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(3)).await.unwrap();
    open.send(()).unwrap(); // only now can the batch be encoded
    exporter.shutdown().await.unwrap();
    assert!(!exporter.sender().held_the_caller.load(Ordering::SeqCst));
    assert_eq!(
        metric_line(
            &telemetry.encode_text(),
            "podscope_exporter_sent_items_total"
        )
        .as_deref(),
        Some("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 3")
    );
}

/// A batch taken (the queue had room) that the sender then cannot encode is the exporter's
/// loss, counted with the sender's reason: the caller was already told it was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_batch_that_cannot_be_encoded_is_counted_as_dropped() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let (sender, open) = Gated::new(false);
    let exporter = QueuedExporter::new(&ctx, settings(true), sender).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(3)).await.unwrap();
    open.send(()).unwrap();
    exporter.shutdown().await.unwrap();
    assert_eq!(
        metric_line(&telemetry.encode_text(), "podscope_exporter_dropped_items_total").as_deref(),
        Some("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"unencodable\"} 3")
    );
}

#[tokio::test]
async fn a_shutdown_deadline_stops_retries_and_counts_the_loss() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let down_forever: Vec<_> = (0..1000).map(|_| unavailable()).collect();
    let mut s = settings(true);
    s.retry_on_failure.initial_interval = Duration::from_secs(60);
    s.retry_on_failure.max_interval = Duration::from_secs(60);
    let exporter = Arc::new(QueuedExporter::new(&ctx, s, Scripted::new(down_forever)).unwrap());
    exporter.start().await.unwrap();
    exporter.consume(spans(9)).await.unwrap(); // taken by the sender, retried
    for _ in 0..3 {
        exporter.consume(spans(2)).await.unwrap(); // waiting in the queue
    }
    // The service gives shutdown 200 ms; the sender is waiting a minute to retry.
    let timed_out = tokio::time::timeout(Duration::from_millis(200), exporter.shutdown())
        .await
        .is_err();
    assert!(timed_out);
    // Asked again, shutdown returns once everything it gave up is counted.
    exporter.shutdown().await.unwrap();
    assert_eq!(
        metric_line(&telemetry.encode_text(), "podscope_exporter_dropped_items_total").as_deref(),
        Some("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"shutdown\"} 15")
    );
    assert_eq!(
        exporter.sender().attempts.load(Ordering::SeqCst),
        1,
        "nothing sent past the deadline"
    );
}

#[test]
fn settings_validation_reports_paths() {
    let mut s = HelperSettings::default();
    s.sending_queue.num_consumers = 0;
    s.retry_on_failure.multiplier = 0.5;
    s.timeout = Duration::ZERO;
    let paths: Vec<_> = s.validate().into_iter().map(|e| e.path).collect();
    assert_eq!(
        paths,
        vec![
            "sending_queue.num_consumers",
            "retry_on_failure.multiplier",
            "timeout"
        ]
    );
}
