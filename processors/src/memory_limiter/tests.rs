use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Processor, ProcessorBuilder, Signal};
use podscope_testkit::{fake_otlp, BuildContextForTests as _, Recorder};

use super::*;

const MIB: u64 = 1024 * 1024;

fn config(json: serde_json::Value) -> Result<MemoryLimiterConfig, Vec<String>> {
    parse_component_config::<MemoryLimiterConfig>(json)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}

/// A memory_limiter with 80 MiB soft / 100 MiB hard whose memory use the test sets.
fn limiter_with_usage(
    ctx: BuildContext,
    next: Arc<Recorder>,
) -> (Arc<dyn Processor>, Arc<AtomicU64>, Arc<MemoryLimiter>) {
    let config = config(serde_json::json!({"limit_mib": 100, "spike_limit_mib": 20})).unwrap();
    let usage = Arc::new(AtomicU64::new(0));
    let source: UsageSource = {
        let usage = usage.clone();
        Arc::new(move || Ok(usage.load(Ordering::SeqCst)))
    };
    let limits = config.limits(None).unwrap();
    let processor =
        build_processor(&config, limits, source, ctx.clone(), Signal::Traces, next).unwrap();
    let limiter = ctx
        .shared
        .get_or_insert::<MemoryLimiter>(&ctx.id, || unreachable!("built above"))
        .unwrap();
    (processor, usage, limiter)
}

fn counter(telemetry: &AgentTelemetry, name: &str) -> u64 {
    let text = telemetry.encode_text();
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .map(|value| value.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[test]
fn limits_as_the_collector_computes_them() {
    let absolute = config(serde_json::json!({"limit_mib": 100, "spike_limit_mib": 30})).unwrap();
    assert_eq!(
        absolute.limits(None),
        Ok(Limits {
            soft: 70 * MIB,
            hard: 100 * MIB
        })
    );
    let default_spike = config(serde_json::json!({"limit_mib": 100})).unwrap();
    assert_eq!(default_spike.limits(None).unwrap().soft, 80 * MIB);
    let percent =
        config(serde_json::json!({"limit_percentage": 80, "spike_limit_percentage": 25})).unwrap();
    assert_eq!(
        percent.limits(Some(1000 * MIB)),
        Ok(Limits {
            soft: 550 * MIB,
            hard: 800 * MIB
        })
    );
    assert!(percent
        .limits(None)
        .unwrap_err()
        .contains("container memory limit"));
}

#[test]
fn bad_settings_are_named() {
    let errors = config(serde_json::json!({})).unwrap_err();
    assert!(errors[0].contains("limit_mib"), "{errors:?}");
    let errors = config(serde_json::json!({"limit_mib": 10, "spike_limit_mib": 10})).unwrap_err();
    assert!(
        errors[0].contains("spike_limit_mib: must be below limit_mib (10)"),
        "{errors:?}"
    );
    let errors = config(serde_json::json!({"limit_percentage": 101})).unwrap_err();
    assert!(errors[0].contains("limit_percentage"), "{errors:?}");
    let errors = config(serde_json::json!({"limit_mib": 10, "check_interval": "0s"})).unwrap_err();
    assert!(errors[0].contains("check_interval"), "{errors:?}");
    let errors = config(serde_json::json!({"limit_mib": 10, "limit_percentage": 50})).unwrap_err();
    assert!(errors[0].contains("not both"), "{errors:?}");
}

#[tokio::test]
async fn passes_below_refuses_above_soft_and_drops_above_hard() {
    let ctx = BuildContext::for_tests("memory_limiter");
    let telemetry = ctx.telemetry.clone();
    let next = Arc::new(Recorder::default());
    let (processor, usage, limiter) = limiter_with_usage(ctx, next.clone());
    let admission = processor
        .admission()
        .expect("a memory_limiter checks admission");

    usage.store(50 * MIB, Ordering::SeqCst);
    processor.start().await.unwrap();
    let batch = fake_otlp::spans(3, &[]);
    admission.admit(&batch).unwrap();
    processor.consume(batch).await.unwrap();
    assert_eq!(next.items(), 3);

    // Above the soft limit (80 MiB): refused, retryable, at the entry and in the pipeline.
    usage.store(90 * MIB, Ordering::SeqCst);
    limiter.check();
    let refused = admission.admit(&fake_otlp::spans(4, &[])).unwrap_err();
    assert!(refused.is_memory_limited(), "{refused}");
    assert!(refused
        .to_string()
        .contains("uses 90 MiB, above its soft memory limit of 80 MiB"));
    let refused = processor
        .consume(fake_otlp::spans(5, &[]))
        .await
        .unwrap_err();
    assert!(refused.is_memory_limited());
    assert_eq!(next.items(), 3);
    assert_eq!(
        counter(&telemetry, "podscope_memory_limiter_refused_items_total"),
        9
    );

    // Above the hard limit (100 MiB): what reaches the processor is dropped and counted.
    usage.store(101 * MIB, Ordering::SeqCst);
    limiter.check();
    processor.consume(fake_otlp::spans(6, &[])).await.unwrap();
    assert_eq!(next.items(), 3);
    assert_eq!(
        counter(&telemetry, "podscope_memory_limiter_dropped_items_total"),
        6
    );
    assert!(admission.admit(&fake_otlp::spans(1, &[])).is_err());
    assert_eq!(
        counter(&telemetry, "podscope_memory_limiter_refused_items_total"),
        10
    );
    assert_eq!(
        counter(&telemetry, "podscope_memory_limiter_memory_bytes"),
        101 * MIB
    );

    // Back below: data flows again.
    usage.store(10 * MIB, Ordering::SeqCst);
    limiter.check();
    processor.consume(fake_otlp::spans(2, &[])).await.unwrap();
    assert_eq!(next.items(), 5);
    processor.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn measures_every_check_interval_while_started() {
    let ctx = BuildContext::for_tests("memory_limiter");
    let next = Arc::new(Recorder::default());
    let (processor, usage, _) = limiter_with_usage(ctx, next.clone());
    let admission = processor.admission().unwrap();
    processor.start().await.unwrap();
    admission.admit(&fake_otlp::spans(1, &[])).unwrap();
    usage.store(90 * MIB, Ordering::SeqCst);
    // The default check_interval is 1 s: the new figure counts once a check ran.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(admission.admit(&fake_otlp::spans(1, &[])).is_err());
    processor.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_measurement_serves_every_pipeline_of_an_id() {
    let ctx = BuildContext::for_tests("memory_limiter");
    let metrics_ctx = BuildContext {
        pipeline: Some("metrics".into()),
        ..ctx.clone()
    };
    let config = config(serde_json::json!({"limit_mib": 64})).unwrap();
    let a = config
        .build(ctx, Signal::Traces, Arc::new(Recorder::default()))
        .unwrap();
    let b = config
        .build(
            metrics_ctx.clone(),
            Signal::Metrics,
            Arc::new(Recorder::default()),
        )
        .unwrap();
    a.start().await.unwrap();
    b.start().await.unwrap();
    let text = metrics_ctx.telemetry.encode_text();
    assert_eq!(
        text.matches("# TYPE podscope_memory_limiter_memory_bytes")
            .count(),
        1,
        "{text}"
    );
    // This test process's real resident set was measured.
    assert!(
        counter(
            &metrics_ctx.telemetry,
            "podscope_memory_limiter_memory_bytes"
        ) > MIB
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[test]
fn resident_set_is_read_from_proc() {
    let bytes = resident_set_bytes().unwrap();
    assert!(bytes > MIB && bytes < 64 * 1024 * MIB, "{bytes}");
}
