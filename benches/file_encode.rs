//! Spans and data points per second through the `file` exporter's encode step (batch → one
//! OTLP-JSON line), the part of the exporter that costs CPU. Criterion reports items/s and bytes/s.
//!
//! Run: `cargo bench --bench file_encode`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::Batch;
use podscope_exporters::file::encode_json_line;

fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn spans(n: usize) -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: (0..n)
                .map(|i| Span {
                    trace_id: (i as u128 + 1).to_be_bytes().to_vec(),
                    span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                    name: "GET /api/cart".into(),
                    kind: 2,
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_000_003_000_000,
                    attributes: vec![
                        attr("http.request.method", "GET"),
                        attr("http.route", "/api/cart"),
                    ],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn points(n: usize) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "podscope.syscalls".into(),
                data: Some(metric::Data::Sum(Sum {
                    is_monotonic: true,
                    aggregation_temporality: 2,
                    data_points: (0..n)
                        .map(|i| NumberDataPoint {
                            attributes: vec![attr("syscall", "read")],
                            time_unix_nano: 1_700_000_000_000_000_000,
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
    }])
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("file_encode");
    for (name, batch) in [("spans", spans(1000)), ("data_points", points(1000))] {
        let bytes = encode_json_line(&batch).len() as u64;
        group.throughput(Throughput::Elements(1000));
        group.bench_with_input(BenchmarkId::new(name, 1000), &batch, |b, batch| {
            b.iter(|| encode_json_line(batch))
        });
        group.throughput(Throughput::Bytes(bytes));
        group.bench_with_input(
            BenchmarkId::new(format!("{name}_bytes"), 1000),
            &batch,
            |b, batch| b.iter(|| encode_json_line(batch)),
        );
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
