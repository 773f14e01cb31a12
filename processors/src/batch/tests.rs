use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ConsumeError, Consumer, ProcessorBuilder, Signal};
use podscope_testkit::BuildContextForTests as _;
use tokio::sync::mpsc;

use super::BatchConfig;

fn spans(n: usize) -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: (0..n)
                .map(|i| Span {
                    name: format!("s{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// Forwards every batch it gets to a channel the test reads.
struct Collect(mpsc::UnboundedSender<Batch>);

#[async_trait]
impl Consumer for Collect {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.0.send(batch).expect("test reads");
        Ok(())
    }
}

struct RefuseForever;

#[async_trait]
impl Consumer for RefuseForever {
    async fn consume(&self, _batch: Batch) -> Result<(), ConsumeError> {
        Err(ConsumeError::permanent("bad_data", "refused by test"))
    }
}

fn config(yaml_like: serde_json::Value) -> BatchConfig {
    parse_component_config::<BatchConfig>(yaml_like).expect("valid config")
}

#[tokio::test]
async fn sends_when_size_is_reached_without_waiting_for_the_timeout() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = BuildContext::for_tests("batch");
    let p = config(serde_json::json!({"send_batch_size": 10, "timeout": "1h"}))
        .build(ctx, Signal::Traces, Arc::new(Collect(tx)))
        .unwrap();
    p.start().await.unwrap();
    for _ in 0..3 {
        p.consume(spans(4)).await.unwrap();
    }
    let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("size trigger fires")
        .unwrap();
    assert_eq!(batch.item_count(), 12);
    p.shutdown().await.unwrap();
    assert!(rx.try_recv().is_err(), "nothing else was held");
}

#[tokio::test(start_paused = true)]
async fn sends_after_timeout_counted_from_the_first_item() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let p = config(serde_json::json!({"send_batch_size": 100, "timeout": "200ms"}))
        .build(
            BuildContext::for_tests("batch"),
            Signal::Traces,
            Arc::new(Collect(tx)),
        )
        .unwrap();
    p.start().await.unwrap();
    let started = tokio::time::Instant::now();
    p.consume(spans(3)).await.unwrap();
    p.consume(spans(2)).await.unwrap();
    let batch = rx.recv().await.unwrap();
    assert_eq!(batch.item_count(), 5);
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn splits_at_send_batch_max_size_and_flushes_on_shutdown() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let p = config(serde_json::json!({
        "send_batch_size": 5, "send_batch_max_size": 5, "timeout": "1h"
    }))
    .build(
        BuildContext::for_tests("batch"),
        Signal::Traces,
        Arc::new(Collect(tx)),
    )
    .unwrap();
    p.start().await.unwrap();
    p.consume(spans(12)).await.unwrap();
    p.consume(spans(3)).await.unwrap();
    // 12 reaches the size at once: 5 + 5 + 2; the 3 wait for more and are flushed by shutdown.
    p.shutdown().await.unwrap();
    let mut sizes = Vec::new();
    while let Ok(b) = rx.try_recv() {
        sizes.push(b.item_count());
    }
    assert_eq!(sizes, vec![5, 5, 2, 3]);
}

#[tokio::test]
async fn a_permanent_downstream_error_is_dropped_and_counted() {
    let ctx = BuildContext::for_tests("batch");
    let telemetry = ctx.telemetry.clone();
    let p = config(serde_json::json!({"send_batch_size": 1}))
        .build(
            BuildContext {
                pipeline: Some("traces".into()),
                ..ctx
            },
            Signal::Traces,
            Arc::new(RefuseForever),
        )
        .unwrap();
    p.start().await.unwrap();
    p.consume(spans(7)).await.unwrap();
    p.shutdown().await.unwrap();
    let text = telemetry.encode_text();
    assert!(
        text.contains(
            "podscope_processor_dropped_items_total{component=\"processor/batch/traces\",signal=\"traces\",reason=\"bad_data\"} 7"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn refuses_the_other_signal_and_data_after_shutdown() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let p = config(serde_json::Value::Null)
        .build(
            BuildContext::for_tests("batch"),
            Signal::Metrics,
            Arc::new(Collect(tx)),
        )
        .unwrap();
    // Shutdown before start is safe.
    p.shutdown().await.unwrap();
    assert_eq!(
        p.consume(spans(1)).await.unwrap_err().reason(),
        "wrong_signal"
    );
    assert_eq!(
        p.consume(Batch::metrics(vec![]))
            .await
            .unwrap_err()
            .reason(),
        "shutting_down"
    );
}

#[test]
fn defaults_and_validation() {
    let c = parse_component_config::<BatchConfig>(serde_json::Value::Null).unwrap();
    assert_eq!(c, BatchConfig::default());
    assert_eq!(c.send_batch_size, 8192);
    assert_eq!(c.timeout, Duration::from_millis(200));
    let errors = parse_component_config::<BatchConfig>(serde_json::json!({
        "send_batch_size": 100, "send_batch_max_size": 10, "timeout": "0s"
    }))
    .unwrap_err();
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["send_batch_max_size", "timeout"]);
}
