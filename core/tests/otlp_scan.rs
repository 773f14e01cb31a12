//! `podscope_core::otlp::scan` held to prost: what the check accepts, prost decodes to the same
//! item count, on every field of the schema and on randomly damaged requests.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, exponential_histogram_data_point::Buckets, metric, summary_data_point, Exemplar,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
use podscope_core::otlp::scan::{
    count_request_items, MessageSchema, Unchecked, RESOURCE_LOGS, RESOURCE_METRICS, RESOURCE_SPANS,
};
use podscope_core::otlp::{otlp, Encoding};
use podscope_core::{Batch, Signal};
use podscope_testkit::fake_otlp::{service_points, service_spans, string_kv};
use prost::Message as _;
use rand::{Rng, SeedableRng};

fn nested_value(depth: usize) -> AnyValue {
    let value = if depth == 0 {
        any_value::Value::BytesValue(vec![0xff, 0, 7])
    } else if depth.is_multiple_of(2) {
        any_value::Value::ArrayValue(ArrayValue {
            values: vec![
                nested_value(depth - 1),
                AnyValue {
                    value: Some(any_value::Value::DoubleValue(-1.5)),
                },
                AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                },
            ],
        })
    } else {
        any_value::Value::KvlistValue(KeyValueList {
            values: vec![KeyValue {
                key: "nested".into(),
                value: Some(nested_value(depth - 1)),
                key_strindex: 3,
            }],
        })
    };
    AnyValue { value: Some(value) }
}

fn attributes() -> Vec<KeyValue> {
    vec![
        string_kv("k", "välue"),
        KeyValue {
            key: "deep".into(),
            value: Some(nested_value(4)),
            ..Default::default()
        },
        KeyValue {
            key: "i".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(-42)),
            }),
            ..Default::default()
        },
    ]
}

fn resource() -> Option<Resource> {
    Some(Resource {
        attributes: attributes(),
        dropped_attributes_count: 2,
        entity_refs: vec![EntityRef {
            schema_url: "s".into(),
            r#type: "k8s.pod".into(),
            id_keys: vec!["k8s.pod.uid".into()],
            description_keys: vec!["k8s.pod.name".into()],
        }],
    })
}

/// An instrumentation scope using every field of its schema.
fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: "n".into(),
        version: "v".into(),
        attributes: attributes(),
        dropped_attributes_count: 1,
    })
}

/// Spans using every field of the trace schema.
fn every_span_field() -> Batch {
    let spans = (0..3)
        .map(|i| Span {
            trace_id: vec![i; 16],
            span_id: vec![i; 8],
            trace_state: "a=b".into(),
            parent_span_id: vec![9; 8],
            flags: 0x301,
            name: format!("span {i}"),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes: attributes(),
            dropped_attributes_count: 1,
            events: vec![span::Event {
                time_unix_nano: 3,
                name: "event".into(),
                attributes: attributes(),
                dropped_attributes_count: 4,
            }],
            dropped_events_count: 5,
            links: vec![span::Link {
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                trace_state: "c=d".into(),
                attributes: attributes(),
                dropped_attributes_count: 6,
                flags: 7,
            }],
            dropped_links_count: 8,
            status: Some(opentelemetry_proto::tonic::trace::v1::Status {
                message: "bad".into(),
                code: 2,
            }),
        })
        .collect();
    Batch::traces(vec![
        ResourceSpans {
            resource: resource(),
            scope_spans: vec![ScopeSpans {
                scope: scope(),
                spans,
                schema_url: "u".into(),
            }],
            schema_url: "u".into(),
        },
        ResourceSpans::default(),
    ])
}

/// Log records using every field of the logs schema.
fn every_log_record_field() -> Batch {
    let records = (0..4)
        .map(|i| LogRecord {
            time_unix_nano: 1,
            observed_time_unix_nano: 2,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: Some(nested_value(3)),
            attributes: attributes(),
            dropped_attributes_count: 1,
            flags: 1,
            trace_id: vec![i; 16],
            span_id: vec![i; 8],
            event_name: format!("event {i}"),
        })
        .collect();
    Batch::logs(vec![
        ResourceLogs {
            resource: resource(),
            scope_logs: vec![ScopeLogs {
                scope: scope(),
                log_records: records,
                schema_url: "u".into(),
            }],
            schema_url: "u".into(),
        },
        ResourceLogs::default(),
    ])
}

/// Data points of every type, using every field of the metrics schema.
fn every_point_field() -> Batch {
    let exemplars = vec![
        Exemplar {
            filtered_attributes: attributes(),
            time_unix_nano: 1,
            span_id: vec![1; 8],
            trace_id: vec![2; 16],
            value: Some(exemplar::Value::AsDouble(0.5)),
        },
        Exemplar {
            value: Some(exemplar::Value::AsInt(-3)),
            ..Default::default()
        },
    ];
    let number = NumberDataPoint {
        attributes: attributes(),
        start_time_unix_nano: 1,
        time_unix_nano: 2,
        exemplars: exemplars.clone(),
        flags: 1,
        value: Some(
            opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(1.5),
        ),
    };
    let metrics = vec![
        Metric {
            name: "g".into(),
            description: "d".into(),
            unit: "1".into(),
            metadata: attributes(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![number.clone(); 2],
            })),
        },
        Metric {
            name: "exp".into(),
            data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![
                    ExponentialHistogramDataPoint {
                        attributes: attributes(),
                        start_time_unix_nano: 1,
                        time_unix_nano: 2,
                        count: 9,
                        sum: Some(3.0),
                        scale: -2,
                        zero_count: 1,
                        positive: Some(Buckets {
                            offset: -3,
                            bucket_counts: vec![1, 300, 70_000],
                        }),
                        negative: Some(Buckets {
                            offset: 2,
                            bucket_counts: vec![5],
                        }),
                        flags: 0,
                        exemplars: exemplars.clone(),
                        min: Some(-1.0),
                        max: Some(8.0),
                        zero_threshold: 0.001,
                    };
                    3
                ],
                aggregation_temporality: 1,
            })),
            ..Default::default()
        },
        Metric {
            name: "summary".into(),
            data: Some(metric::Data::Summary(Summary {
                data_points: vec![SummaryDataPoint {
                    attributes: attributes(),
                    start_time_unix_nano: 1,
                    time_unix_nano: 2,
                    count: 4,
                    sum: 10.0,
                    quantile_values: vec![summary_data_point::ValueAtQuantile {
                        quantile: 0.5,
                        value: 2.0,
                    }],
                    flags: 1,
                }],
            })),
            ..Default::default()
        },
        Metric {
            name: "empty".into(),
            ..Default::default()
        },
    ];
    let Batch::Metrics(service) = service_points(9) else {
        unreachable!()
    };
    let mut resource_metrics = service.to_vec();
    resource_metrics.push(ResourceMetrics {
        resource: resource(),
        scope_metrics: vec![ScopeMetrics {
            scope: None,
            metrics,
            schema_url: "u".into(),
        }],
        schema_url: "u".into(),
    });
    Batch::metrics(resource_metrics)
}

fn schema(signal: Signal) -> &'static MessageSchema {
    match signal {
        Signal::Traces => &RESOURCE_SPANS,
        Signal::Metrics => &RESOURCE_METRICS,
        Signal::Logs => &RESOURCE_LOGS,
        Signal::Profiles => unreachable!("profiles are decoded, never scanned"),
    }
}

/// What prost makes of `body`: the item count, or `None` if it refuses it.
fn prost_items(signal: Signal, body: &[u8]) -> Option<usize> {
    let batch = match signal {
        Signal::Traces => {
            Batch::traces(ExportTraceServiceRequest::decode(body).ok()?.resource_spans)
        }
        Signal::Metrics => Batch::metrics(
            ExportMetricsServiceRequest::decode(body)
                .ok()?
                .resource_metrics,
        ),
        Signal::Logs => Batch::logs(ExportLogsServiceRequest::decode(body).ok()?.resource_logs),
        Signal::Profiles => unreachable!("profiles are decoded, never scanned"),
    };
    Some(batch.item_count())
}

fn batches() -> Vec<Batch> {
    vec![
        service_spans(20),
        service_points(21),
        every_span_field(),
        every_point_field(),
        every_log_record_field(),
        Batch::empty(Signal::Traces),
    ]
}

#[test]
fn counts_the_items_prost_decodes() {
    for batch in batches() {
        let body = otlp(batch.signal()).encode_request(&batch, Encoding::Protobuf);
        assert_eq!(
            count_request_items(schema(batch.signal()), &body),
            Ok(batch.item_count()),
            "{} of {:?}",
            batch.item_count(),
            batch.signal()
        );
    }
}

/// Random damage to valid requests: whatever the check accepts, prost decodes to as many
/// items. (It may refuse what prost accepts; the caller then decodes.)
#[test]
fn accepts_only_what_prost_decodes_to_the_same_count() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let (mut accepted, mut refused) = (0, 0);
    for batch in batches().into_iter().filter(|b| !b.is_empty()) {
        let signal = batch.signal();
        let body = otlp(signal)
            .encode_request(&batch, Encoding::Protobuf)
            .to_vec();
        for _ in 0..4000 {
            let mut damaged = body.clone();
            for _ in 0..rng.random_range(1..=3) {
                let at = rng.random_range(0..damaged.len());
                match rng.random_range(0..5) {
                    0 => damaged[at] ^= 1 << rng.random_range(0..8),
                    1 => damaged[at] = rng.random(),
                    2 => damaged.truncate(at),
                    3 => damaged.insert(at, rng.random()),
                    _ => {
                        damaged.remove(at);
                    }
                }
                if damaged.is_empty() {
                    break;
                }
            }
            match count_request_items(schema(signal), &damaged) {
                Ok(items) => {
                    accepted += 1;
                    assert_eq!(
                        prost_items(signal, &damaged),
                        Some(items),
                        "{signal} request {damaged:?}"
                    );
                }
                Err(Unchecked) => refused += 1,
            }
        }
    }
    // Both outcomes happen, so the assertion above was exercised.
    assert!(accepted > 1000 && refused > 1000, "{accepted} / {refused}");
}

/// Bytes of a length-delimited field.
fn field_bytes(tag: u32, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(content.len() as u64, &mut out);
    out.extend_from_slice(content);
    out
}

#[test]
fn a_metric_data_met_twice_counts_as_prost_merges_it() {
    let gauge = |points| Metric {
        name: "m".into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint::default(); points],
        })),
        ..Default::default()
    };
    let Batch::Metrics(sum) = service_points(2) else {
        unreachable!()
    };
    let sum = sum[0].scope_metrics[0].metrics[1].clone(); // a sum of 1 point
    for (parts, expected) in [
        (vec![gauge(2), gauge(3)], 5),    // the same variant merges
        (vec![gauge(2), sum.clone()], 1), // another one replaces it
        (vec![sum, gauge(3)], 3),
    ] {
        let metric: Vec<u8> = parts.iter().flat_map(|m| m.encode_to_vec()).collect();
        let body = field_bytes(1, &field_bytes(2, &field_bytes(2, &metric)));
        assert_eq!(prost_items(Signal::Metrics, &body), Some(expected));
        assert_eq!(count_request_items(&RESOURCE_METRICS, &body), Ok(expected));
    }
}

#[test]
fn refuses_what_it_cannot_forward_as_is() {
    let batch = service_spans(2);
    let body = otlp(Signal::Traces).encode_request(&batch, Encoding::Protobuf);
    // An unknown field next to the items: valid, but not only items.
    let mut extra = body.to_vec();
    extra.extend(field_bytes(7, b"x"));
    assert_eq!(prost_items(Signal::Traces, &extra), Some(2));
    assert_eq!(count_request_items(&RESOURCE_SPANS, &extra), Err(Unchecked));
    // A span name that is not UTF-8.
    let bad = body.to_vec();
    let at = bad.windows(3).position(|w| w == b"GET").unwrap();
    let mut bad = bad;
    bad[at] = 0xff;
    assert_eq!(prost_items(Signal::Traces, &bad), None);
    assert_eq!(count_request_items(&RESOURCE_SPANS, &bad), Err(Unchecked));
}
