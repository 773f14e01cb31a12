//! One lifecycle test over every registered component: build from its default config (or the
//! minimal settings below where a default cannot work, e.g. a required path) → start → consume →
//! shutdown; and shutdown without start is safe. A new component with required settings fails
//! here until it is given an entry in `settings_for`.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::metrics::v1::{
    metric, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope::registry;
use podscope_core::{Batch, BuildContext, ComponentKind, Consumer, ReceiverConsumers, Signal};
use podscope_testkit::{BuildContextForTests as _, Recorder};
use serde_json::{json, Value};

/// Settings for components whose defaults need something from the environment (a path, a port
/// that must not clash with a real agent on this machine).
fn settings_for(kind: ComponentKind, type_name: &str, dir: &std::path::Path) -> Value {
    let no_retry = json!({"enabled": false});
    match (kind, type_name) {
        // Every probe loads for real (CI runs as root); no interval passes during the test.
        (ComponentKind::Receiver, "ebpf") => json!({"collection_interval": "1h", "probes": {
            "process": {}, "syscalls": {}, "files": {"capture_paths": true}, "sched": {}, "block_io": {}, "tcp": {},
            // The http probe: the receiver is a traces source only with it on.
            "http": {},
            "profiling": {"off_cpu": true}}}),
        (ComponentKind::Receiver, "otlp") => json!({"protocols": {
            "grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}}),
        // A limit far above the test process's memory: data passes.
        (ComponentKind::Processor, "memory_limiter") => json!({"limit_mib": 65536}),
        (ComponentKind::Exporter, "file") => {
            json!({"path": dir.join(format!("{type_name}.jsonl"))})
        }
        // Not the default port: a real agent on this machine may hold it.
        (ComponentKind::Extension, "session") => json!({"endpoint": "127.0.0.1:0"}),
        (ComponentKind::Exporter, "pprof") => json!({"directory": dir.join("pprof")}),
        (ComponentKind::Exporter, "prometheus") => json!({"endpoint": "127.0.0.1:0"}),
        // Backends that are not running: the exporter must still start and shut down cleanly.
        (ComponentKind::Exporter, "otlp" | "jaeger") => {
            json!({"endpoint": "127.0.0.1:9", "retry_on_failure": no_retry, "tls": {"insecure": true}})
        }
        (ComponentKind::Exporter, "otlphttp") => {
            json!({"endpoint": "http://127.0.0.1:9", "retry_on_failure": no_retry})
        }
        (ComponentKind::Exporter, "prometheusremotewrite") => {
            json!({"endpoint": "http://127.0.0.1:9/api/v1/write", "retry_on_failure": no_retry})
        }
        _ => Value::Null,
    }
}

fn sample(signal: Signal) -> Batch {
    match signal {
        Signal::Metrics => Batch::metrics(vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "lifecycle.gauge".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: vec![NumberDataPoint::default(); 3],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }]),
        Signal::Traces => Batch::traces(vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![
                    Span {
                        name: "lifecycle".into(),
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        ..Default::default()
                    };
                    3
                ],
                ..Default::default()
            }],
            ..Default::default()
        }]),
        Signal::Profiles => podscope_testkit::fake_otlp::cpu_profile(3, &[]),
        Signal::Logs => podscope_testkit::fake_otlp::service_logs(3),
    }
}

const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {LIMIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_receiver_starts_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    for factory in registry::receivers() {
        let name = factory.type_name;
        let settings = settings_for(ComponentKind::Receiver, name, dir.path());
        let consumers = || {
            let mut c = ReceiverConsumers::default();
            for s in factory.signals {
                let collected: Arc<dyn Consumer> = Arc::new(Recorder::default());
                match s {
                    Signal::Metrics => c.metrics = Some(collected),
                    Signal::Traces => c.traces = Some(collected),
                    Signal::Profiles => c.profiles = Some(collected),
                    Signal::Logs => c.logs = Some(collected),
                }
            }
            c
        };
        // The extensions its settings name, built from their own test settings (not started).
        let mut ctx = BuildContext::for_tests(name);
        let references = (factory.create)(settings.clone())
            .unwrap_or_else(|e| panic!("receiver {name}: test settings refused: {e:?}"))
            .references();
        for reference in references {
            if reference.kind != ComponentKind::Extension {
                continue;
            }
            let type_name = reference.id.type_name();
            let extension = registry::extensions()
                .into_iter()
                .find(|f| f.type_name == type_name)
                .and_then(|f| {
                    (f.create)(settings_for(
                        ComponentKind::Extension,
                        type_name,
                        dir.path(),
                    ))
                    .ok()
                })
                .unwrap_or_else(|| panic!("receiver {name}: extension {type_name} not available"))
                .build(BuildContext::for_tests(&reference.id.to_string()))
                .unwrap_or_else(|e| panic!("receiver {name}: its extension: {e:#}"));
            ctx.extensions.insert(reference.id, extension);
        }
        let build = || {
            (factory.create)(settings.clone())
                .unwrap_or_else(|e| panic!("receiver {name}: test settings refused: {e:?}"))
                .build(ctx.clone(), consumers())
                .unwrap_or_else(|e| panic!("receiver {name}: build failed: {e:#}"))
        };
        let never_started = build();
        within(name, never_started.shutdown()).await.unwrap();
        let receiver = build();
        within(name, receiver.start())
            .await
            .unwrap_or_else(|e| panic!("receiver {name}: start failed: {e:#}"));
        within(name, receiver.shutdown())
            .await
            .unwrap_or_else(|e| panic!("receiver {name}: shutdown failed: {e:#}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_processor_forwards_what_it_consumes() {
    let dir = tempfile::tempdir().unwrap();
    for factory in registry::processors() {
        let name = factory.type_name;
        for &signal in factory.signals {
            let settings = settings_for(ComponentKind::Processor, name, dir.path());
            let builder = (factory.create)(settings.clone())
                .unwrap_or_else(|e| panic!("processor {name}: test settings refused: {e:?}"));
            // The extension a processor makes for itself runs around it, as in the service.
            let mut ctx = BuildContext::for_tests(name);
            let own = builder.implicit_extension(&ctx.id).map(|(id, extension)| {
                let extension = extension
                    .build(BuildContext::for_tests(&id.to_string()))
                    .unwrap_or_else(|e| panic!("processor {name}: its extension: {e:#}"));
                ctx.extensions.insert(id.clone(), extension.clone());
                ctx.extensions
                    .add_user(ComponentKind::Processor, ctx.id.clone(), id);
                extension
            });
            let next = Arc::new(Recorder::default());
            let build = |next: Arc<Recorder>| {
                builder
                    .build(ctx.clone(), signal, next)
                    .unwrap_or_else(|e| panic!("processor {name}: build failed: {e:#}"))
            };
            within(name, build(Arc::new(Recorder::default())).shutdown())
                .await
                .unwrap();
            let processor = build(next.clone());
            if let Some(extension) = &own {
                within(name, extension.start()).await.unwrap();
            }
            within(name, processor.start()).await.unwrap();
            within(name, processor.consume(sample(signal)))
                .await
                .unwrap_or_else(|e| panic!("processor {name} refused {signal}: {e}"));
            within(name, processor.shutdown()).await.unwrap();
            if let Some(extension) = &own {
                within(name, extension.shutdown()).await.unwrap();
            }
            assert_eq!(
                next.items(),
                3,
                "processor {name} forwarded every {signal} item by shutdown"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exporter_consumes_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    for factory in registry::exporters() {
        let name = factory.type_name;
        let settings = settings_for(ComponentKind::Exporter, name, dir.path());
        let build = || {
            (factory.create)(settings.clone())
                .unwrap_or_else(|e| panic!("exporter {name}: test settings refused: {e:?}"))
                .build(BuildContext::for_tests(name))
                .unwrap_or_else(|e| panic!("exporter {name}: build failed: {e:#}"))
        };
        within(name, build().shutdown()).await.unwrap();
        let exporter = build();
        within(name, exporter.start())
            .await
            .unwrap_or_else(|e| panic!("exporter {name}: start failed: {e:#}"));
        for &signal in factory.signals {
            // A backend that is down may refuse; what matters is no hang and no panic.
            let _ = within(name, exporter.consume(sample(signal))).await;
        }
        within(name, exporter.shutdown())
            .await
            .unwrap_or_else(|e| panic!("exporter {name}: shutdown failed: {e:#}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_extension_starts_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    for factory in registry::extensions() {
        let name = factory.type_name;
        let settings = settings_for(ComponentKind::Extension, name, dir.path());
        let build = || {
            (factory.create)(settings.clone())
                .unwrap_or_else(|e| panic!("extension {name}: test settings refused: {e:?}"))
                .build(BuildContext::for_tests(name))
                .unwrap_or_else(|e| panic!("extension {name}: build failed: {e:#}"))
        };
        within(name, build().shutdown()).await.unwrap();
        let extension = build();
        within(name, extension.start())
            .await
            .unwrap_or_else(|e| panic!("extension {name}: start failed: {e:#}"));
        within(name, extension.shutdown())
            .await
            .unwrap_or_else(|e| panic!("extension {name}: shutdown failed: {e:#}"));
    }
}

#[test]
fn registry_types_are_unique_and_described() {
    let mut seen = std::collections::BTreeSet::new();
    let rows = registry::receivers()
        .into_iter()
        .map(|f| ("receiver", f.type_name, f.description, f.signals))
        .chain(
            registry::processors()
                .into_iter()
                .map(|f| ("processor", f.type_name, f.description, f.signals)),
        )
        .chain(
            registry::exporters()
                .into_iter()
                .map(|f| ("exporter", f.type_name, f.description, f.signals)),
        )
        .chain(
            registry::extensions()
                .into_iter()
                .map(|f| ("extension", f.type_name, f.description, f.signals)),
        );
    for (kind, type_name, description, signals) in rows {
        assert!(
            seen.insert((kind, type_name)),
            "{kind} {type_name} registered twice"
        );
        assert!(
            !description.is_empty() && !description.contains('\n'),
            "{kind} {type_name}: one-line description"
        );
        // Extensions are in no pipeline; every other component handles some signal.
        assert_eq!(
            signals.is_empty(),
            kind == "extension",
            "{kind} {type_name}: signals {signals:?}"
        );
    }
}
