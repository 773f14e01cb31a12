//! End to end through the real `podscope` binary: a real OTLP client (the opentelemetry-otlp
//! span exporter, and the generated OTLP gRPC metrics client) sends spans and metrics to the
//! `otlp` receiver → `batch` → `file` exporter; SIGTERM arrives mid-stream; after a clean exit,
//! every item the receiver acknowledged is in the file, exactly once. And with one exporter's
//! backend down, another exporter of the same pipeline still gets each item exactly once.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use podscope_integration::agent::{free_port, AgentProcess};

const SPANS_PER_EXPORT: u64 = 50;
const POINTS_PER_EXPORT: u64 = 20;

fn span(trace: u64, index: u64) -> SpanData {
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from((trace as u128) + 1),
            SpanId::from(index + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: format!("request-{trace}-{index}").into(),
        start_time: now,
        end_time: now + Duration::from_millis(3),
        attributes: vec![opentelemetry::KeyValue::new("http.request.method", "GET")],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Ok,
        instrumentation_scope: InstrumentationScope::builder("e2e").build(),
    }
}

fn metrics_request(export: u64) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "e2e.gauge".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: (0..POINTS_PER_EXPORT)
                            .map(|i| NumberDataPoint {
                                // The point's identity: export number and index.
                                time_unix_nano: export * 1000 + i + 1,
                                value: Some(
                                    opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(
                                        i as i64,
                                    ),
                                ),
                                ..Default::default()
                            })
                            .collect(),
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_item_reaches_the_file_across_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let grpc_port = free_port();
    let telemetry_port = free_port();
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
processors:
  batch:
    send_batch_size: 500
    timeout: 100ms
exporters:
  file:
    path: {out}
service:
  shutdown_timeout: 20s
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [file]
    metrics:
      receivers: [otlp]
      processors: [batch]
      exporters: [file]
"#,
        out = out.display()
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let endpoint = format!("http://127.0.0.1:{grpc_port}");

    let span_exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut metrics_client = MetricsServiceClient::connect(endpoint).await.unwrap();

    let mut acked_spans = BTreeSet::new();
    let mut acked_points = BTreeSet::new();
    let mut export = 0u64;
    let mut sigterm_sent = false;
    loop {
        let spans: Vec<SpanData> = (0..SPANS_PER_EXPORT).map(|i| span(export, i)).collect();
        let spans_ok = span_exporter.export(spans).await.is_ok();
        if spans_ok {
            acked_spans.extend((0..SPANS_PER_EXPORT).map(|i| format!("request-{export}-{i}")));
        }
        let points_ok = metrics_client.export(metrics_request(export)).await.is_ok();
        if points_ok {
            acked_points.extend((0..POINTS_PER_EXPORT).map(|i| export * 1000 + i + 1));
        }
        export += 1;
        if export == 40 && !sigterm_sent {
            // The agent's own metrics count exactly what its receiver acknowledged.
            let metrics = reqwest::get(format!("http://127.0.0.1:{telemetry_port}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for (signal, acked) in [
                ("traces", acked_spans.len()),
                ("metrics", acked_points.len()),
            ] {
                let line = format!(
                    "podscope_receiver_accepted_items_total{{component=\"otlp\",signal=\"{signal}\"}} {acked}"
                );
                assert!(
                    metrics.lines().any(|l| l == line),
                    "missing {line:?} in:\n{metrics}"
                );
            }
            agent.sigterm();
            sigterm_sent = true;
        }
        if sigterm_sent && !spans_ok && !points_ok {
            break; // the receiver has stopped
        }
        assert!(
            export < 100_000,
            "the agent never stopped receiving after SIGTERM"
        );
    }
    eprintln!(
        "acknowledged {} spans and {} points over {export} exports",
        acked_spans.len(),
        acked_points.len()
    );
    let status = agent.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "podscope exited with {status:?}");

    let text = std::fs::read_to_string(&out).unwrap();
    let mut span_names = Vec::new();
    let mut point_ids = Vec::new();
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        for rs in value["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    span_names.push(s["name"].as_str().unwrap().to_string());
                }
            }
        }
        for rm in value["resourceMetrics"].as_array().into_iter().flatten() {
            for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    for p in m["gauge"]["dataPoints"].as_array().into_iter().flatten() {
                        let t = &p["timeUnixNano"];
                        let id = t
                            .as_u64()
                            .or_else(|| t.as_str().and_then(|s| s.parse().ok()));
                        point_ids.push(id.expect("timeUnixNano is a number or a decimal string"));
                    }
                }
            }
        }
    }
    let written_spans: BTreeSet<String> = span_names.iter().cloned().collect();
    let written_points: BTreeSet<u64> = point_ids.iter().copied().collect();
    assert_eq!(
        written_spans.len(),
        span_names.len(),
        "no span is written twice"
    );
    assert_eq!(
        written_points.len(),
        point_ids.len(),
        "no point is written twice"
    );
    let lost_spans: Vec<_> = acked_spans.difference(&written_spans).collect();
    let lost_points: Vec<_> = acked_points.difference(&written_points).collect();
    assert!(
        lost_spans.is_empty(),
        "acknowledged spans missing from the file: {lost_spans:?}"
    );
    assert!(
        lost_points.is_empty(),
        "acknowledged points missing: {lost_points:?}"
    );
    // Only an export in flight when the receiver stopped may be written without its ack.
    assert!(written_spans.len() as u64 <= acked_spans.len() as u64 + SPANS_PER_EXPORT);
    assert!(written_points.len() as u64 <= acked_points.len() as u64 + POINTS_PER_EXPORT);
    assert!(
        acked_spans.len() as u64 >= 40 * SPANS_PER_EXPORT,
        "data flowed before SIGTERM"
    );
}

/// One delta sum point of +1 for `requests.total`.
fn plus_one() -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "requests".into(),
                    data: Some(metric::Data::Sum(Sum {
                        is_monotonic: true,
                        aggregation_temporality: AggregationTemporality::Delta as i32,
                        data_points: vec![NumberDataPoint {
                            value: Some(number_data_point::Value::AsInt(1)),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn page(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The value of the first sample line starting with `prefix`.
fn value(page: &str, prefix: &str) -> Option<u64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// The layout of `configs/kubernetes.yaml` (an OTLP exporter and the Prometheus endpoint in one
/// metrics pipeline) with the OTLP backend down: the deltas reach the scrape page exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_whose_backend_is_down_never_multiplies_another_exporters_data() {
    let (grpc_port, scrape_port, telemetry_port) = (free_port(), free_port(), free_port());
    let down = free_port();
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{grpc_port}" }} }} }}
exporters:
  otlp:
    endpoint: http://127.0.0.1:{down}
    sending_queue: {{ queue_size: 1, num_consumers: 1, block_timeout: 200ms }}
    retry_on_failure: {{ initial_interval: 50ms, max_interval: 50ms, max_elapsed_time: 300ms }}
  prometheus: {{ endpoint: "127.0.0.1:{scrape_port}" }}
service:
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [otlp, prometheus] }}
"#
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let mut client = MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    for _ in 0..4 {
        client.export(plus_one()).await.unwrap();
    }
    // Wait until the exporter whose backend is down has given up every point: by then its
    // refusals have had every chance to make the pipeline resend.
    let telemetry = format!("http://127.0.0.1:{telemetry_port}/metrics");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = page(&telemetry).await;
        let dropped: u64 = text
            .lines()
            .filter(|l| l.starts_with("podscope_exporter_dropped_items_total{component=\"otlp\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum();
        if dropped == 4 {
            assert_eq!(
                value(
                    &text,
                    "podscope_receiver_accepted_items_total{component=\"otlp\",signal=\"metrics\"}"
                ),
                Some(4)
            );
            assert_eq!(
                value(&text, "podscope_exporter_sent_items_total{component=\"prometheus\",signal=\"metrics\"}"),
                Some(4),
                "{text}"
            );
            assert_eq!(
                value(
                    &text,
                    "podscope_exporter_sent_items_total{component=\"otlp\""
                ),
                None
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scrape = page(&format!("http://127.0.0.1:{scrape_port}/metrics")).await;
    assert_eq!(value(&scrape, "requests_total "), Some(4), "{scrape}");
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(30)).await.success());
}
