//! Delivery of acknowledged batches: a fan-out gives each exporter the batch once, whatever the
//! others answer; retries back off; at the shutdown deadline what was never taken is counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use podscope_core::delivery::{deliver_or_count, DropCounter, Fanout};
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{Batch, ConsumeError, Consumer};
use podscope_testkit::{fake_otlp, Recorder};
use tokio_util::sync::CancellationToken;

fn spans(n: usize) -> Batch {
    fake_otlp::spans(n, &[])
}

/// Refuses the first `refusals` batches with `error`, then takes everything.
struct RefusesFirst {
    refusals: usize,
    error: ConsumeError,
    attempts: AtomicUsize,
}

#[async_trait]
impl Consumer for RefusesFirst {
    async fn consume(&self, _batch: Batch) -> Result<(), ConsumeError> {
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        if n < self.refusals {
            Err(self.error.clone())
        } else {
            Ok(())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_exporter_gets_the_batch_once_whatever_the_others_answer() {
    let telemetry = AgentTelemetry::new();
    let healthy = Arc::new(Recorder::default());
    let busy = Arc::new(RefusesFirst {
        refusals: 3,
        error: ConsumeError::retryable("queue_full", "full"),
        attempts: AtomicUsize::new(0),
    });
    let broken = Arc::new(RefusesFirst {
        refusals: usize::MAX,
        error: ConsumeError::permanent("wrong_signal", "no"),
        attempts: AtomicUsize::new(0),
    });
    let fanout = Fanout::new(
        vec![
            (
                healthy.clone(),
                DropCounter::exporter(&telemetry, "healthy"),
            ),
            (busy.clone(), DropCounter::exporter(&telemetry, "busy")),
            (broken.clone(), DropCounter::exporter(&telemetry, "broken")),
        ],
        CancellationToken::new(),
    );
    fanout.consume(spans(4)).await.unwrap();
    assert_eq!(healthy.batches(), vec![spans(4)]);
    assert_eq!(
        busy.attempts.load(Ordering::SeqCst),
        4,
        "retried until taken"
    );
    assert_eq!(broken.attempts.load(Ordering::SeqCst), 1, "never retried");
    let text = telemetry.encode_text();
    assert!(
        text.contains("podscope_exporter_dropped_items_total{component=\"broken\",signal=\"traces\",reason=\"wrong_signal\"} 4"),
        "{text}"
    );
    assert!(!text.contains("component=\"busy\""), "{text}");
}

#[tokio::test(start_paused = true)]
async fn at_the_deadline_a_refusing_exporter_drops_what_it_never_took() {
    let telemetry = AgentTelemetry::new();
    let full = Arc::new(RefusesFirst {
        refusals: usize::MAX,
        error: ConsumeError::retryable("queue_full", "full"),
        attempts: AtomicUsize::new(0),
    });
    let deadline = CancellationToken::new();
    let fanout = Fanout::new(
        vec![(full.clone(), DropCounter::exporter(&telemetry, "full"))],
        deadline.clone(),
    );
    let delivery = tokio::spawn(async move { fanout.consume(spans(2)).await });
    tokio::time::sleep(Duration::from_secs(60)).await;
    deadline.cancel();
    delivery.await.unwrap().unwrap();
    assert!(telemetry.encode_text().contains(
        "podscope_exporter_dropped_items_total{component=\"full\",signal=\"traces\",reason=\"shutdown\"} 2"
    ));
}

#[tokio::test(start_paused = true)]
async fn retries_wait_at_least_the_backoff_even_when_told_zero() {
    let telemetry = AgentTelemetry::new();
    let busy = RefusesFirst {
        refusals: 2,
        error: ConsumeError::Retryable {
            reason: "unavailable",
            message: "later".into(),
            retry_after: Some(Duration::ZERO),
        },
        attempts: AtomicUsize::new(0),
    };
    let started = tokio::time::Instant::now();
    assert!(
        deliver_or_count(
            &busy,
            spans(1),
            "pipeline/x",
            &telemetry,
            &CancellationToken::new()
        )
        .await
    );
    // 50 ms, then 100 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(150));
}
