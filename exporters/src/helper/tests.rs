use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::WhenFull;
use podscope_core::{Batch, BuildContext, ConsumeError};

use super::*;

fn spans(n: usize) -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: vec![Span::default(); n],
            ..Default::default()
        }],
        ..Default::default()
    }])
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
    async fn send(&self, _batch: Batch) -> Result<(), ConsumeError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.attempt_times
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.script.lock().unwrap().pop().unwrap_or(Ok(()))
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
    );
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
    let exporter = QueuedExporter::new(&ctx, settings(false), Scripted::new(vec![hint]));
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
    let exporter = QueuedExporter::new(&ctx, s, sender);
    exporter.start().await.unwrap();
    let error = exporter.consume(spans(2)).await.unwrap_err();
    assert_eq!(error.reason(), "timeout");
    assert!(exporter.sender().attempts.load(Ordering::SeqCst) >= 2);
    let text = telemetry.encode_text();
    assert!(
        text.contains(
            "podscope_exporter_send_failures_total{component=\"otlp\",reason=\"timeout\"}"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn permanent_errors_are_dropped_and_counted_once() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let bad = Err(ConsumeError::permanent("http_400", "bad request"));
    let exporter = QueuedExporter::new(&ctx, settings(true), Scripted::new(vec![bad]));
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
    let exporter = QueuedExporter::new(&ctx, s, Scripted::new(vec![]));
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
    let exporter = QueuedExporter::new(&ctx, settings(true), Scripted::new(vec![unavailable()]));
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

#[tokio::test]
async fn a_shutdown_deadline_stops_retries_and_counts_the_loss() {
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let down_forever: Vec<_> = (0..1000).map(|_| unavailable()).collect();
    let mut s = settings(true);
    s.retry_on_failure.initial_interval = Duration::from_secs(60);
    s.retry_on_failure.max_interval = Duration::from_secs(60);
    let exporter = Arc::new(QueuedExporter::new(&ctx, s, Scripted::new(down_forever)));
    exporter.start().await.unwrap();
    exporter.consume(spans(9)).await.unwrap();
    // The service gives shutdown 200 ms; the sender is waiting a minute to retry.
    let timed_out = tokio::time::timeout(Duration::from_millis(200), exporter.shutdown())
        .await
        .is_err();
    assert!(timed_out);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = "podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"shutdown\"} 9";
    while !telemetry.encode_text().contains(line) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drop not counted:\n{}",
            telemetry.encode_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
