use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ExporterBuilder};
use podscope_testkit::BuildContextForTests as _;

use super::{encode_json_line, FileConfig};

fn spans(names: &[&str]) -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: names
                .iter()
                .enumerate()
                .map(|(i, n)| Span {
                    name: n.to_string(),
                    trace_id: vec![0xa1; 16],
                    span_id: vec![i as u8 + 1; 8],
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_000_250_000_000,
                    kind: 2,
                    attributes: vec![KeyValue {
                        key: "http.route".into(),
                        key_strindex: 0,
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue("/x".into())),
                        }),
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn counter(value: i64) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "podscope.syscalls".into(),
                data: Some(metric::Data::Sum(Sum {
                    is_monotonic: true,
                    aggregation_temporality: 2,
                    data_points: vec![NumberDataPoint {
                        start_time_unix_nano: 1,
                        time_unix_nano: u64::MAX - 1,
                        value: Some(number_data_point::Value::AsInt(value)),
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

#[test]
fn lines_are_otlp_json_and_decode_back_exactly() {
    let batch = spans(&["a", "b"]);
    let line = encode_json_line(&batch);
    assert_eq!(*line.last().unwrap(), b'\n');
    let text = std::str::from_utf8(&line).unwrap();
    // OTLP/JSON: camelCase keys, hex ids, 64-bit integers as decimal strings.
    assert!(
        text.contains(r#""traceId":"a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1""#),
        "{text}"
    );
    assert!(
        text.contains(r#""startTimeUnixNano":"1700000000000000000""#),
        "{text}"
    );
    let decoded: ExportTraceServiceRequest = serde_json::from_slice(&line).unwrap();
    let Batch::Traces(original) = &batch else {
        unreachable!()
    };
    assert_eq!(decoded.resource_spans, ***original);

    let metrics = counter(-7);
    let decoded: ExportMetricsServiceRequest =
        serde_json::from_slice(&encode_json_line(&metrics)).unwrap();
    let Batch::Metrics(original) = &metrics else {
        unreachable!()
    };
    assert_eq!(decoded.resource_metrics, ***original);
}

#[test]
fn profiles_are_one_otlp_json_line_with_their_dictionary() {
    let batch = podscope_testkit::fake_otlp::cpu_profile(3, &[("container.id", "abc")]);
    let line = encode_json_line(&batch);
    let text = std::str::from_utf8(&line).unwrap();
    assert!(text.starts_with(r#"{"resourceProfiles":"#), "{text}");
    assert!(text.contains(r#""dictionary":{"mappingTable":"#), "{text}");
    let decoded: opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest =
        serde_json::from_slice(&line).unwrap();
    let Batch::Profiles(original) = &batch else {
        unreachable!()
    };
    assert_eq!(decoded.resource_profiles, original.resource_profiles);
    assert_eq!(decoded.dictionary, original.dictionary);
}

#[tokio::test]
async fn appends_one_line_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let config: FileConfig = parse_component_config(serde_json::json!({"path": path})).unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("file"))
        .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans(&["one"])).await.unwrap();
    exporter.consume(counter(5)).await.unwrap();
    exporter.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with(r#"{"resourceSpans":"#), "{}", lines[0]);
    assert!(
        lines[1].starts_with(r#"{"resourceMetrics":"#),
        "{}",
        lines[1]
    );
}

#[test]
fn rotation_keeps_max_backups_with_the_newest_data_in_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let mut writer = super::writer::RotatingWriter::open(
        &path,
        Some(super::RotationConfig {
            max_megabytes: 1,
            max_backups: 2,
        }),
    )
    .unwrap();
    // 600 KiB lines: every line after the first rotates.
    let line = |tag: u8| {
        let mut l = vec![tag; 600 * 1024];
        l.push(b'\n');
        l
    };
    for tag in [b'a', b'b', b'c', b'd'] {
        writer.write_line(&line(tag)).unwrap();
    }
    let first_byte = |p: &std::path::Path| std::fs::read(p).unwrap()[0];
    assert_eq!(first_byte(&path), b'd');
    assert_eq!(first_byte(&dir.path().join("out.jsonl.1")), b'c');
    assert_eq!(first_byte(&dir.path().join("out.jsonl.2")), b'b');
    assert!(
        !dir.path().join("out.jsonl.3").exists(),
        "only max_backups are kept"
    );
}

#[tokio::test]
async fn a_missing_directory_fails_at_start_naming_the_path() {
    let config: FileConfig =
        parse_component_config(serde_json::json!({"path": "/nonexistent-dir/out.jsonl"})).unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("file"))
        .unwrap();
    let error = exporter.start().await.unwrap_err().to_string();
    assert!(error.contains("/nonexistent-dir/out.jsonl"), "{error}");
}

#[test]
fn path_is_required() {
    let errors = parse_component_config::<FileConfig>(serde_json::Value::Null).unwrap_err();
    assert!(
        errors[0].message.contains("missing field `path`"),
        "{:?}",
        errors
    );
}

/// Parses `line` with the official protobuf JSON parser (Python's `google.protobuf.json_format`
/// with the OTLP bindings, from the oteltest venv that `scripts/install-deps.sh` sets up) and
/// returns what it read for each double, as Python writes it.
fn doubles_read_by_protobuf(line: &[u8]) -> String {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".cache/oteltest/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps.sh",
        python.display()
    );
    let script = r#"
import sys
from google.protobuf.json_format import Parse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
request = Parse(sys.stdin.read(), ExportMetricsServiceRequest())
metrics = request.resource_metrics[0].scope_metrics[0].metrics
gauge = [repr(p.as_double) for p in metrics[0].gauge.data_points]
h = metrics[1].histogram.data_points[0]
print(gauge, repr(h.sum), [repr(b) for b in h.explicit_bounds], repr(h.min), repr(h.max))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(line).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "protobuf refused the line: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(line)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn nan_and_infinities_are_written_as_proto3_json_strings() {
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, Histogram, HistogramDataPoint};
    let point = |v: f64| NumberDataPoint {
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let batch = Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![
                Metric {
                    name: "g".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: vec![
                            point(f64::NAN),
                            point(f64::INFINITY),
                            point(f64::NEG_INFINITY),
                            point(1.5),
                        ],
                    })),
                    ..Default::default()
                },
                Metric {
                    name: "h".into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        aggregation_temporality: 2,
                        data_points: vec![HistogramDataPoint {
                            count: 2,
                            sum: Some(f64::NAN),
                            bucket_counts: vec![1, 1],
                            explicit_bounds: vec![f64::NEG_INFINITY],
                            min: Some(f64::NEG_INFINITY),
                            max: Some(f64::INFINITY),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }]);
    let line = encode_json_line(&batch);
    let text = String::from_utf8_lossy(&line);
    assert!(
        text.contains(r#""asDouble":"NaN""#) && !text.contains(r#""asDouble":null"#),
        "{text}"
    );
    assert_eq!(
        doubles_read_by_protobuf(&line),
        "['nan', 'inf', '-inf', '1.5'] nan ['-inf'] -inf inf"
    );
}
