//! The `memory_limiter` in the real binary, with a hard limit of 2 MiB the agent is always above:
//! real OTLP clients we did not write (the generated OTLP gRPC client, the opentelemetry-otlp span
//! exporter, curl over HTTP) are refused with the retryable answers the OTLP specification gives
//! for overload — gRPC RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with `Retry-After` — and the
//! agent counts exactly the items it refused; nothing reaches the exporter.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use podscope_integration::agent::{free_port, AgentProcess};

const POINTS_PER_EXPORT: u64 = 7;

fn metrics_request() -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "overload.gauge".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: (0..POINTS_PER_EXPORT)
                            .map(|i| NumberDataPoint {
                                time_unix_nano: i + 1,
                                value: Some(number_data_point::Value::AsInt(i as i64)),
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

fn span(index: u64) -> SpanData {
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(1u128),
            SpanId::from(index + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: format!("refused-{index}").into(),
        start_time: now,
        end_time: now + Duration::from_millis(1),
        attributes: vec![],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Ok,
        instrumentation_scope: InstrumentationScope::builder("e2e").build(),
    }
}

fn metric_value(page: &str, series: &str) -> Option<u64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_soft_limit_otlp_clients_are_told_to_retry_and_refusals_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let (grpc_port, http_port, telemetry_port) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
      http:
        endpoint: 127.0.0.1:{http_port}
processors:
  memory_limiter:
    check_interval: 100ms
    limit_mib: 2
    spike_limit_mib: 1
exporters:
  file:
    path: {out}
service:
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [otlp]
      processors: [memory_limiter]
      exporters: [file]
    traces:
      receivers: [otlp]
      processors: [memory_limiter]
      exporters: [file]
"#,
        out = out.display()
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;

    // gRPC, the generated OTLP client: RESOURCE_EXHAUSTED with a RetryInfo saying when.
    let mut client = MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    for _ in 0..3 {
        let status = client.export(metrics_request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("above its soft memory limit of 1 MiB"),
            "{status:?}"
        );
        let details = tonic_types::StatusExt::get_details_retry_info(&status)
            .expect("RESOURCE_EXHAUSTED carries RetryInfo, so OTLP clients retry it");
        assert_eq!(details.retry_delay, Some(Duration::from_secs(1)));
    }

    // The opentelemetry-otlp span exporter retries while refused, then reports the failure.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("http://127.0.0.1:{grpc_port}"))
        .with_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let error = exporter
        .export((0..4).map(span).collect())
        .await
        .unwrap_err();
    assert!(
        format!("{error:?}").contains("gRPC code: ResourceExhausted"),
        "{error:?}"
    );

    // HTTP, curl: 429 with Retry-After.
    let body = dir.path().join("request.json");
    std::fs::write(
        &body,
        r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m","gauge":{"dataPoints":[{"asInt":"1"},{"asInt":"2"}]}}]}]}]}"#,
    )
    .unwrap();
    let curl = std::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", body.display()))
        .arg(format!("http://127.0.0.1:{http_port}/v1/metrics"))
        .output()
        .expect("curl runs");
    let answer = String::from_utf8_lossy(&curl.stdout).to_lowercase();
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("\"code\":8"), "{answer}");

    let page = reqwest::get(format!("http://127.0.0.1:{telemetry_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused_points = 3 * POINTS_PER_EXPORT + 2;
    for (series, expected) in [
        (
            r#"podscope_memory_limiter_refused_items_total{component="memory_limiter",signal="metrics"}"#,
            refused_points,
        ),
        (
            r#"podscope_receiver_refused_items_total{component="otlp",signal="metrics"}"#,
            refused_points,
        ),
        (
            r#"podscope_memory_limiter_limit_bytes{component="memory_limiter",limit="hard"}"#,
            2 * 1024 * 1024,
        ),
    ] {
        assert_eq!(
            metric_value(&page, series),
            Some(expected),
            "{series} in:\n{page}"
        );
    }
    // The span exporter retried on its own, because the refusal carried RetryInfo (without it,
    // OTLP clients must not retry RESOURCE_EXHAUSTED): each attempt's 4 spans were refused and
    // counted, by the receiver and the memory_limiter alike.
    let traces_refused = metric_value(
        &page,
        r#"podscope_memory_limiter_refused_items_total{component="memory_limiter",signal="traces"}"#,
    )
    .unwrap();
    assert!(
        traces_refused > 4 && traces_refused.is_multiple_of(4),
        "{traces_refused}"
    );
    assert_eq!(
        metric_value(
            &page,
            r#"podscope_receiver_refused_items_total{component="otlp",signal="traces"}"#
        ),
        Some(traces_refused)
    );
    let memory = metric_value(
        &page,
        r#"podscope_memory_limiter_memory_bytes{component="memory_limiter"}"#,
    )
    .expect("the memory gauge");
    assert!(memory > 2 * 1024 * 1024, "{memory}");

    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(30)).await.success());
    let written = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(written, "", "nothing refused reached the exporter");
}
