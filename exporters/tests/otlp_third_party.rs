//! The `otlp` (gRPC) and `otlphttp` exporters against an OTLP receiver this project did not write:
//! the sinks of `oteltest` (PyPI), the OpenTelemetry Python project's test harness, which decode
//! OTLP with grpcio and the official `opentelemetry-proto` Python bindings. `oteltest_sink.py`
//! starts them and prints each decoded request as a JSON line (protobuf's JSON mapping), which
//! this test compares with what was exported. `scripts/install-deps.sh` installs oteltest into
//! `.cache/oteltest`.
//!
//! The HTTP sink reads request bodies as they arrive and does not undo `Content-Encoding`, so the
//! HTTP exporter runs with `compression: none` here; gRPC runs with the default, gzip, which
//! grpcio decompresses. The sink looks the content type up case-sensitively; the driver script
//! makes that lookup case-insensitive, as HTTP requires (see the script).

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ExporterBuilder as _};
use podscope_exporters::otlp::{OtlpGrpcConfig, OtlpHttpConfig};
use podscope_testkit::BuildContextForTests as _;
use serde_json::{json, Value};

struct Sink {
    child: Child,
    lines: mpsc::Receiver<String>,
    grpc_port: u16,
    http_port: u16,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sink() -> Sink {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".cache/oteltest/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps.sh (it installs oteltest from PyPI there)",
        python.display()
    );
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut child = Command::new(python)
        .arg(root.join("exporters/tests/oteltest_sink.py"))
        .args([grpc_port.to_string(), http_port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the oteltest sink");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let sink = Sink {
        child,
        lines,
        grpc_port,
        http_port,
    };
    let first = sink
        .lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the sink starts within 30 s");
    assert_eq!(first, "ready");
    sink
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn spans(tag: &str) -> Batch {
    Batch::traces(vec![ResourceSpans {
        resource: Some(Resource {
            attributes: vec![string("service.name", "cart")],
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            spans: vec![Span {
                name: format!("GET /cart {tag}"),
                trace_id: vec![7; 16],
                span_id: vec![1; 8],
                kind: 2,
                start_time_unix_nano: 1_700_000_000_000_000_010,
                end_time_unix_nano: 1_700_000_000_000_000_020,
                attributes: vec![KeyValue {
                    key: "http.response.status_code".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(200)),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn points(tag: &str) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![string("k8s.pod.name", "web-1")],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: format!("queue.depth.{tag}"),
                unit: "{item}".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        time_unix_nano: 5,
                        value: Some(number_data_point::Value::AsDouble(1.5)),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn records(tag: &str) -> Batch {
    Batch::logs(vec![ResourceLogs {
        resource: Some(Resource {
            attributes: vec![string("k8s.node.name", "node-1")],
            ..Default::default()
        }),
        scope_logs: vec![ScopeLogs {
            log_records: vec![LogRecord {
                time_unix_nano: 1_700_000_000_000_000_030,
                severity_number: SeverityNumber::Warn as i32,
                severity_text: "WARN".into(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(format!(
                        "disk almost full {tag}"
                    ))),
                }),
                attributes: vec![string("podscope.session.name", "execs")],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn expected_records(tag: &str) -> Value {
    json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "k8s.node.name", "value": {"stringValue": "node-1"}}]},
        "scopeLogs": [{"logRecords": [{
            "timeUnixNano": "1700000000000000030",
            "severityNumber": "SEVERITY_NUMBER_WARN",
            "severityText": "WARN",
            "body": {"stringValue": format!("disk almost full {tag}")},
            "attributes": [{"key": "podscope.session.name", "value": {"stringValue": "execs"}}]
        }]}]
    }]})
}

/// What protobuf's JSON mapping (in the sink) makes of `spans(tag)`: 64-bit integers as strings,
/// bytes in base64, enums by name.
///
/// Except trace and span ids sent as OTLP/JSON: the OTLP specification requires them as hex
/// strings, where protobuf's generic mapping (all the sink has) expects base64. The sink reads the
/// hex text as base64 and prints it back unchanged, so what it shows for JSON requests is the hex
/// podscope sent.
fn expected_spans(tag: &str) -> Value {
    let (trace_id, span_id) = if tag.ends_with("json") {
        ("07".repeat(16), "01".repeat(8))
    } else {
        (
            "BwcHBwcHBwcHBwcHBwcHBw==".to_string(),
            "AQEBAQEBAQE=".to_string(),
        )
    };
    json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "cart"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id,
            "spanId": span_id,
            "name": format!("GET /cart {tag}"),
            "kind": "SPAN_KIND_SERVER",
            "startTimeUnixNano": "1700000000000000010",
            "endTimeUnixNano": "1700000000000000020",
            "attributes": [{"key": "http.response.status_code", "value": {"intValue": "200"}}]
        }]}]
    }]})
}

fn expected_points(tag: &str) -> Value {
    json!({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "k8s.pod.name", "value": {"stringValue": "web-1"}}]},
        "scopeMetrics": [{"metrics": [{
            "name": format!("queue.depth.{tag}"),
            "unit": "{item}",
            "gauge": {"dataPoints": [{"timeUnixNano": "5", "asDouble": 1.5}]}
        }]}]
    }]})
}

async fn export(exporter: std::sync::Arc<dyn podscope_core::Exporter>, tag: &str) {
    exporter.start().await.unwrap();
    exporter.consume(spans(tag)).await.unwrap();
    exporter.consume(points(tag)).await.unwrap();
    exporter.consume(records(tag)).await.unwrap();
    // Shutdown drains the sending queue: every request was answered by then.
    exporter.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_otlp_receiver_decodes_exactly_what_was_exported() {
    let sink = start_sink();

    let grpc: OtlpGrpcConfig = parse_component_config(json!({
        "endpoint": format!("http://127.0.0.1:{}", sink.grpc_port),
        "headers": {"authorization": "Bearer t0ken"},
    }))
    .unwrap();
    assert_eq!(
        grpc.compression,
        podscope_exporters::otlp::Compression::Gzip,
        "gzip is the default"
    );
    export(
        Box::new(grpc)
            .build(BuildContext::for_tests("otlp"))
            .unwrap(),
        "grpc",
    )
    .await;
    for encoding in ["proto", "json"] {
        let http: OtlpHttpConfig = parse_component_config(json!({
            "endpoint": format!("http://127.0.0.1:{}", sink.http_port),
            "encoding": encoding,
            "compression": "none",
            "headers": {"x-tenant": "shop"},
        }))
        .unwrap();
        export(
            Box::new(http)
                .build(BuildContext::for_tests("otlphttp"))
                .unwrap(),
            &format!("http-{encoding}"),
        )
        .await;
    }

    let mut received: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < 9 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = sink.lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "only {} of 9 requests reached the sink: {received:#?}",
                received.len()
            )
        });
        received.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    let find = |transport: &str, signal: &str, tag: &str| -> &Value {
        received
            .iter()
            .find(|r| {
                r["transport"] == transport
                    && r["signal"] == signal
                    && r["request"].to_string().contains(tag)
            })
            .unwrap_or_else(|| panic!("no {transport} {signal} request {tag}: {received:#?}"))
    };
    for (transport, tag, header, value) in [
        ("grpc", "grpc", "authorization", "Bearer t0ken"),
        ("http", "http-proto", "x-tenant", "shop"),
        ("http", "http-json", "x-tenant", "shop"),
    ] {
        let traces = find(transport, "traces", tag);
        assert_eq!(traces["request"], expected_spans(tag), "{transport} {tag}");
        assert_eq!(traces["headers"][header], value, "{traces:#?}");
        let metrics = find(transport, "metrics", tag);
        assert_eq!(
            metrics["request"],
            expected_points(tag),
            "{transport} {tag}"
        );
        let logs = find(transport, "logs", tag);
        assert_eq!(logs["request"], expected_records(tag), "{transport} {tag}");
    }
    let json_traces = find("http", "traces", "http-json");
    assert_eq!(json_traces["headers"]["content-type"], "application/json");
    let proto_traces = find("http", "traces", "http-proto");
    assert_eq!(
        proto_traces["headers"]["content-type"],
        "application/x-protobuf"
    );
}
