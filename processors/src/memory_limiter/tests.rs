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

/// A memory_limiter with 80 MiB soft / 100 MiB hard whose memory use the test sets, and which
/// never trims.
fn limiter_with_usage(
    ctx: BuildContext,
    next: Arc<Recorder>,
) -> (Arc<dyn Processor>, Arc<AtomicU64>, Arc<MemoryLimiter>) {
    let usage = Arc::new(AtomicU64::new(0));
    let (processor, limiter) = limiter_with_heap(ctx, next, usage.clone(), None);
    (processor, usage, limiter)
}

/// The same limiter with `heap` as its allocator.
fn limiter_with_heap(
    ctx: BuildContext,
    next: Arc<Recorder>,
    usage: Arc<AtomicU64>,
    heap: Option<Arc<dyn FreeHeap>>,
) -> (Arc<dyn Processor>, Arc<MemoryLimiter>) {
    let config = config(serde_json::json!({"limit_mib": 100, "spike_limit_mib": 20})).unwrap();
    let source: UsageSource = {
        let usage = usage.clone();
        Arc::new(move || Ok(usage.load(Ordering::SeqCst)))
    };
    let limits = config.limits(None).unwrap();
    let processor = build_processor(
        &config,
        limits,
        source,
        heap,
        ctx.clone(),
        Signal::Traces,
        next,
    )
    .unwrap();
    let limiter = ctx
        .shared
        .get_or_insert::<MemoryLimiter>(&ctx.id, || unreachable!("built above"))
        .unwrap();
    (processor, limiter)
}

fn counter(telemetry: &AgentTelemetry, name: &str) -> u64 {
    let text = telemetry.encode_text();
    text.lines()
        .find(|line| line.starts_with(name) && !line[name.len()..].starts_with('_'))
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

/// An allocator whose freed heap the test sets. As glibc's, a trim takes the resident part of it
/// off the usage the limiter measures, and leaves the freed-heap figure as it was (the chunks
/// stay free; their pages are released).
struct TestHeap {
    usage: Arc<AtomicU64>,
    free: AtomicU64,
    resident_free: AtomicU64,
    trims: AtomicU64,
}

impl TestHeap {
    fn new(usage: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(TestHeap {
            usage,
            free: AtomicU64::new(0),
            resident_free: AtomicU64::new(0),
            trims: AtomicU64::new(0),
        })
    }
}

impl FreeHeap for TestHeap {
    fn free_bytes(&self) -> Option<u64> {
        Some(self.free.load(Ordering::SeqCst))
    }

    fn trim(&self) {
        self.trims.fetch_add(1, Ordering::SeqCst);
        let resident = self.resident_free.swap(0, Ordering::SeqCst);
        self.usage.fetch_sub(resident, Ordering::SeqCst);
    }
}

/// A limiter with a test heap: `(processor, usage, heap, limiter)`.
fn limiter_with_test_heap(
    ctx: BuildContext,
) -> (
    Arc<dyn Processor>,
    Arc<AtomicU64>,
    Arc<TestHeap>,
    Arc<MemoryLimiter>,
) {
    let usage = Arc::new(AtomicU64::new(0));
    let heap = TestHeap::new(usage.clone());
    let (processor, limiter) = limiter_with_heap(
        ctx,
        Arc::new(Recorder::default()),
        usage.clone(),
        Some(heap.clone() as Arc<dyn FreeHeap>),
    );
    (processor, usage, heap, limiter)
}

fn trims(telemetry: &AgentTelemetry, reason: &str) -> u64 {
    let text = telemetry.encode_text();
    let prefix = format!(
        "podscope_memory_limiter_heap_trims_total{{component=\"memory_limiter\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0, |value| value.parse().unwrap())
}

/// The trims by reason, the bytes they gave back and the memory measured after the last check.
fn assert_trim_figures(
    telemetry: &AgentTelemetry,
    soft_limit: u64,
    free_heap: u64,
    trimmed_bytes: u64,
    memory_bytes: u64,
) {
    assert_eq!(trims(telemetry, "soft_limit"), soft_limit);
    assert_eq!(trims(telemetry, "free_heap"), free_heap);
    assert_eq!(
        counter(
            telemetry,
            "podscope_memory_limiter_heap_trimmed_bytes_total"
        ),
        trimmed_bytes
    );
    assert_eq!(
        counter(telemetry, "podscope_memory_limiter_memory_bytes"),
        memory_bytes
    );
}

#[tokio::test(start_paused = true)]
async fn freed_heap_is_given_back_before_refusing() {
    let ctx = BuildContext::for_tests("memory_limiter");
    let telemetry = ctx.telemetry.clone();
    let (processor, usage, heap, limiter) = limiter_with_test_heap(ctx);
    let admission = processor.admission().unwrap();

    // 90 MiB is above the 80 MiB soft limit, but 30 MiB of it is freed heap: trimmed, measured
    // again at 60 MiB, and nothing is refused.
    usage.store(90 * MIB, Ordering::SeqCst);
    heap.free.store(30 * MIB, Ordering::SeqCst);
    heap.resident_free.store(30 * MIB, Ordering::SeqCst);
    limiter.check();
    admission.admit(&fake_otlp::spans(2, &[])).unwrap();
    assert_trim_figures(&telemetry, 1, 0, 30 * MIB, 60 * MIB);

    // Above the soft limit with nothing to give back: refused. Within 10 s of the last
    // pressure trim no other is made; after it, one more (it does not help either).
    usage.store(95 * MIB, Ordering::SeqCst);
    limiter.check();
    assert!(admission.admit(&fake_otlp::spans(3, &[])).is_err());
    assert_eq!(heap.trims.load(Ordering::SeqCst), 1);
    tokio::time::advance(PRESSURE_TRIM_GAP - Duration::from_millis(1)).await;
    limiter.check();
    assert_eq!(heap.trims.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    limiter.check();
    assert_eq!(heap.trims.load(Ordering::SeqCst), 2);
    assert!(admission.admit(&fake_otlp::spans(3, &[])).is_err());
    assert_trim_figures(&telemetry, 2, 0, 30 * MIB, 95 * MIB);
    assert_eq!(
        counter(&telemetry, "podscope_memory_limiter_refused_items_total"),
        6
    );
}

#[tokio::test(start_paused = true)]
async fn freed_heap_is_given_back_once_it_grew_by_the_setting() {
    let ctx = BuildContext::for_tests("memory_limiter");
    let telemetry = ctx.telemetry.clone();
    let (_processor, usage, heap, limiter) = limiter_with_test_heap(ctx);
    let trim_count = || heap.trims.load(Ordering::SeqCst);
    let set_heap = |free: u64, resident_free: u64| {
        heap.free.store(free * MIB, Ordering::SeqCst);
        heap.resident_free
            .store(resident_free * MIB, Ordering::SeqCst);
    };

    // The default trim_free_heap_mib is 4. At the first check 3 MiB is freed: not enough.
    usage.store(40 * MIB, Ordering::SeqCst);
    set_heap(3, 3);
    limiter.check();
    assert_eq!(trim_count(), 0);

    // 4 MiB more resident, still 3 MiB freed: the growth is data, counted from 44 MiB on.
    usage.store(44 * MIB, Ordering::SeqCst);
    limiter.check();
    assert_eq!(trim_count(), 0);

    // 6 MiB freed, but the allocator is asked only once a minute unless the resident set grew
    // by 4 MiB (47 is 3 above 44).
    usage.store(47 * MIB, Ordering::SeqCst);
    set_heap(6, 6);
    limiter.check();
    assert_eq!(trim_count(), 0);
    tokio::time::advance(FREE_HEAP_POLL).await;
    limiter.check();
    assert_eq!(trim_count(), 1);
    assert_trim_figures(&telemetry, 0, 1, 6 * MIB, 41 * MIB);

    // After the trim the allocator still counts 6 MiB freed (released pages): only what is
    // freed beyond that low point counts. The resident set grows by 4 MiB to 45 with 8 MiB
    // freed: 2 above the low point, no trim.
    usage.store(45 * MIB, Ordering::SeqCst);
    set_heap(8, 2);
    limiter.check();
    assert_eq!(trim_count(), 1);
    // Some freed chunks are used again (5 MiB freed: the new low point), then 4 MiB more are
    // freed: given back at the next minute's question.
    set_heap(5, 0);
    tokio::time::advance(FREE_HEAP_POLL).await;
    limiter.check();
    assert_eq!(trim_count(), 1);
    set_heap(9, 4);
    tokio::time::advance(FREE_HEAP_POLL - Duration::from_millis(1)).await;
    limiter.check();
    assert_eq!(trim_count(), 1, "not asked again before a minute passed");
    tokio::time::advance(Duration::from_millis(1)).await;
    limiter.check();
    assert_eq!(trim_count(), 2);
    assert_trim_figures(&telemetry, 0, 2, 10 * MIB, 41 * MIB);
}

#[test]
fn trimming_only_under_pressure_when_the_growth_setting_is_0() {
    let parsed = config(serde_json::json!({"limit_mib": 100, "trim_free_heap_mib": 0})).unwrap();
    assert_eq!(parsed.trim_free_heap_mib, 0);
    assert_eq!(
        config(serde_json::json!({"limit_mib": 100}))
            .unwrap()
            .trim_free_heap_mib,
        4
    );
}

/// The real allocator: memory freed in the middle of the heap (kept from the top by a live
/// allocation after it) stays resident until trimmed, and the trim gives it back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn glibc_gives_freed_heap_back_when_trimmed() {
    let heap = process_heap().expect("glibc trims");
    // 64 MiB in 4 KiB blocks (below glibc's mmap threshold, above its per-thread caches),
    // written so that they are resident; every 64th is kept so the free ones are not at the top.
    let mut blocks: Vec<Option<Box<[u8]>>> = (0..16_384)
        .map(|i| Some(vec![(i % 251) as u8 + 1; 4096].into_boxed_slice()))
        .collect();
    std::hint::black_box(&blocks);
    for (i, block) in blocks.iter_mut().enumerate() {
        if i % 64 != 63 {
            *block = None;
        }
    }
    let free = heap.free_bytes().unwrap();
    assert!(free >= 60 * MIB, "glibc holds {free} freed bytes");
    let before = resident_set_bytes().unwrap();
    heap.trim();
    let after = resident_set_bytes().unwrap();
    // Other tests of this binary allocate meanwhile: most, not all, of the 63 MiB.
    assert!(
        before.saturating_sub(after) >= 32 * MIB,
        "resident {before} before the trim, {after} after"
    );
    std::hint::black_box(&blocks);
}
