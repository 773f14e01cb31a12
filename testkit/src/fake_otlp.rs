//! Synthetic OTLP data for tests and benchmarks, one generator for all of them: HTTP server
//! spans, syscall-count data points and CPU profiles shaped like what podscope carries, deterministic (ids and
//! values from the index) so that round trips can be compared exactly. [`service_spans`] and
//! [`service_points`] are sized like what an instrumented service sends (a resource with 4
//! attributes, 6 attributes per span, 4 per data point, histograms among the points): benchmarks
//! of the OTLP path use them, so that costs per item are the ones users see.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, Line, Location, Mapping, Profile, ProfilesData, ResourceProfiles, Sample,
    ScopeProfiles, Stack, ValueType,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};

use podscope_core::Batch;

/// A string attribute.
pub fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn resource(attributes: &[(&str, &str)]) -> Option<Resource> {
    (!attributes.is_empty()).then(|| Resource {
        attributes: attributes.iter().map(|(k, v)| string_kv(k, v)).collect(),
        ..Default::default()
    })
}

/// `n` server spans `GET /api/cart` (trace and span ids `i + 1`, 3 ms long, method and route
/// attributes) under one resource.
pub fn spans(n: usize, resource_attributes: &[(&str, &str)]) -> Batch {
    Batch::traces(vec![ResourceSpans {
        resource: resource(resource_attributes),
        scope_spans: vec![ScopeSpans {
            spans: (0..n)
                .map(|i| Span {
                    trace_id: (i as u128 + 1).to_be_bytes().to_vec(),
                    span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                    name: "GET /api/cart".into(),
                    kind: span::SpanKind::Server as i32,
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_000_003_000_000,
                    attributes: vec![
                        string_kv("http.request.method", "GET"),
                        string_kv("http.route", "/api/cart"),
                    ],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// `n` data points of the cumulative sum `podscope.syscalls`, one series each
/// (`syscall.name` = `sys_<first_series + i>`, value `i`), under one resource.
pub fn syscall_points(
    n: usize,
    first_series: usize,
    resource_attributes: &[(&str, &str)],
) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        resource: resource(resource_attributes),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "podscope.syscalls".into(),
                unit: "{syscall}".into(),
                data: Some(metric::Data::Sum(Sum {
                    is_monotonic: true,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    data_points: (0..n)
                        .map(|i| NumberDataPoint {
                            attributes: vec![string_kv(
                                "syscall.name",
                                &format!("sys_{}", first_series + i),
                            )],
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

/// The resource of the realistic generators: 4 attributes, as a Kubernetes workload's SDK sets.
fn service_resource() -> Option<Resource> {
    resource(&[
        ("service.name", "checkout"),
        ("service.version", "2.14.1"),
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "checkout-7d9f8b6c5-x2x7q"),
    ])
}

fn service_scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: "io.opentelemetry.instrumentation.http".into(),
        version: "2.9.0".into(),
        ..Default::default()
    })
}

const ROUTES: [&str; 4] = [
    "/api/cart",
    "/api/cart/items",
    "/api/checkout",
    "/api/orders",
];
const METHODS: [&str; 2] = ["GET", "POST"];
const STATUS_CODES: [i64; 3] = [200, 201, 503];

/// `n` HTTP server spans as an instrumented service sends them: trace, span and parent ids from
/// the index, a name, kind, start and end time, status, and 6 attributes (method, route, path,
/// status code, server address, user agent); one resource of 4 attributes and one scope.
pub fn service_spans(n: usize) -> Batch {
    let spans = (0..n)
        .map(|i| {
            let (route, method) = (ROUTES[i % ROUTES.len()], METHODS[i % METHODS.len()]);
            let code = STATUS_CODES[i % STATUS_CODES.len()];
            let start = 1_700_000_000_000_000_000 + i as u64 * 1_000_000;
            Span {
                trace_id: (i as u128 + 1).to_be_bytes().to_vec(),
                span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                parent_span_id: (i as u64 + 1_000_000).to_be_bytes().to_vec(),
                name: format!("{method} {route}"),
                kind: span::SpanKind::Server as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 3_000_000 + i as u64 % 1000,
                attributes: vec![
                    string_kv("http.request.method", method),
                    string_kv("http.route", route),
                    string_kv("url.path", &format!("{route}/{}", i % 1000)),
                    int_kv("http.response.status_code", code),
                    string_kv("server.address", "checkout.shop.svc.cluster.local"),
                    string_kv("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
                ],
                status: Some(Status {
                    code: if code >= 500 {
                        status::StatusCode::Error as i32
                    } else {
                        status::StatusCode::Unset as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    Batch::traces(vec![ResourceSpans {
        resource: service_resource(),
        scope_spans: vec![ScopeSpans {
            scope: service_scope(),
            spans,
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// `n` log records as a service writes them: times and bodies from the index, a severity, 2
/// attributes (method, route); the service's resource and scope.
pub fn service_logs(n: usize) -> Batch {
    let records = (0..n)
        .map(|i| {
            let (route, method) = (ROUTES[i % ROUTES.len()], METHODS[i % METHODS.len()]);
            LogRecord {
                time_unix_nano: 1_700_000_000_000_000_000 + i as u64 * 1_000_000,
                severity_number: SeverityNumber::Info as i32,
                severity_text: "INFO".into(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(format!(
                        "{method} {route} handled (request {i})"
                    ))),
                }),
                attributes: vec![
                    string_kv("http.request.method", method),
                    string_kv("http.route", route),
                ],
                ..Default::default()
            }
        })
        .collect();
    Batch::logs(vec![ResourceLogs {
        resource: service_resource(),
        scope_logs: vec![ScopeLogs {
            scope: service_scope(),
            log_records: records,
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// `n` data points of an HTTP service's metrics, one series each, 4 attributes per point
/// (method, route, status code, server address), in four metrics that take turns: the
/// `http.server.request.duration` histogram (14 buckets), the `http.server.request.body.size`
/// cumulative sum, the `http.server.active_requests` gauge and the `http.server.response.body.size`
/// sum. One resource of 4 attributes and one scope.
pub fn service_points(n: usize) -> Batch {
    const BOUNDS: [f64; 13] = [
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    ];
    let time = 1_700_000_000_000_000_000;
    let attributes = |i: usize| {
        vec![
            string_kv("http.request.method", METHODS[i % METHODS.len()]),
            string_kv("http.route", ROUTES[(i / 2) % ROUTES.len()]),
            int_kv("http.response.status_code", STATUS_CODES[(i / 8) % 3]),
            string_kv("server.address", &format!("checkout-{}.shop", i / 24)),
        ]
    };
    let number = |i: usize| NumberDataPoint {
        attributes: attributes(i),
        start_time_unix_nano: time - 60_000_000_000,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsInt(i as i64 * 7)),
        ..Default::default()
    };
    let sum = |points| {
        metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })
    };
    let mut metrics = [
        ("http.server.request.duration", "s", Vec::new()),
        ("http.server.request.body.size", "By", Vec::new()),
        ("http.server.active_requests", "{request}", Vec::new()),
        ("http.server.response.body.size", "By", Vec::new()),
    ];
    for i in 0..n {
        metrics[i % 4].2.push(i);
    }
    let metrics = metrics
        .into_iter()
        .enumerate()
        .filter(|(_, (_, _, indices))| !indices.is_empty())
        .map(|(kind, (name, unit, indices))| {
            let data = match kind {
                0 => metric::Data::Histogram(Histogram {
                    data_points: indices
                        .into_iter()
                        .map(|i| {
                            let bucket_counts: Vec<u64> = (0..=BOUNDS.len() as u64)
                                .map(|b| (i as u64 + b) % 17)
                                .collect();
                            HistogramDataPoint {
                                attributes: attributes(i),
                                start_time_unix_nano: time - 60_000_000_000,
                                time_unix_nano: time,
                                count: bucket_counts.iter().sum(),
                                sum: Some(i as f64 * 0.125),
                                bucket_counts,
                                explicit_bounds: BOUNDS.to_vec(),
                                min: Some(0.001),
                                max: Some(7.0),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
                2 => metric::Data::Gauge(Gauge {
                    data_points: indices.into_iter().map(number).collect(),
                }),
                _ => sum(indices.into_iter().map(number).collect()),
            };
            Metric {
                name: name.into(),
                unit: unit.into(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    Batch::metrics(vec![ResourceMetrics {
        resource: service_resource(),
        scope_metrics: vec![ScopeMetrics {
            scope: service_scope(),
            metrics,
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// An on-CPU profile (`samples`/`count`, period 1/19 s) of `n` samples under one resource:
/// sample `i` has the two-frame stack `work_<i>` ← `main` in `/bin/app` (build id `ab` × 20) and
/// the value `i + 1`.
pub fn cpu_profile(n: usize, resource_attributes: &[(&str, &str)]) -> Batch {
    let mut d = podscope_core::profiles::empty_dictionary();
    let mut string = |text: &str| {
        d.string_table.push(text.to_string());
        (d.string_table.len() - 1) as i32
    };
    let (samples, count, cpu, nanoseconds) = (
        string("samples"),
        string("count"),
        string("cpu"),
        string("nanoseconds"),
    );
    let app = string("/bin/app");
    let build_id_key = string("process.executable.build_id.gnu");
    let names: Vec<i32> = std::iter::once(string("main"))
        .chain((0..n).map(|i| string(&format!("work_{i}"))))
        .collect();
    d.attribute_table.push(
        opentelemetry_proto::tonic::profiles::v1development::KeyValueAndUnit {
            key_strindex: build_id_key,
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue("ab".repeat(20))),
            }),
            unit_strindex: 0,
        },
    );
    d.mapping_table.push(Mapping {
        memory_limit: u64::MAX,
        filename_strindex: app,
        attribute_indices: vec![1],
        ..Default::default()
    });
    for (i, &name) in names.iter().enumerate() {
        d.function_table.push(Function {
            name_strindex: name,
            system_name_strindex: name,
            filename_strindex: app,
            start_line: 0,
        });
        d.location_table.push(Location {
            mapping_index: 1,
            address: 0x1000 + 0x10 * i as u64,
            lines: vec![Line {
                function_index: i as i32 + 1,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    for i in 0..n {
        // Location 1 is main's; work_<i>'s is i + 2.
        d.stack_table.push(Stack {
            location_indices: vec![i as i32 + 2, 1],
        });
    }
    Batch::profiles(ProfilesData {
        resource_profiles: vec![ResourceProfiles {
            resource: resource(resource_attributes),
            scope_profiles: vec![ScopeProfiles {
                profiles: vec![Profile {
                    sample_type: Some(ValueType {
                        type_strindex: samples,
                        unit_strindex: count,
                    }),
                    samples: (0..n)
                        .map(|i| Sample {
                            stack_index: i as i32 + 1,
                            values: vec![i as i64 + 1],
                            ..Default::default()
                        })
                        .collect(),
                    time_unix_nano: 1_700_000_000_000_000_000,
                    duration_nano: 10_000_000_000,
                    period_type: Some(ValueType {
                        type_strindex: cpu,
                        unit_strindex: nanoseconds,
                    }),
                    period: 1_000_000_000 / 19,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        dictionary: Some(d),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_identities_are_as_asked() {
        let s = spans(3, &[("service.name", "checkout")]);
        assert_eq!(s.item_count(), 3);
        let Batch::Traces(rs) = &s else {
            panic!("traces")
        };
        let ids: Vec<u64> = rs[0].scope_spans[0]
            .spans
            .iter()
            .map(|s| u64::from_be_bytes(s.span_id[..].try_into().unwrap()))
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
        let p = syscall_points(2, 10, &[]);
        assert_eq!(p.item_count(), 2);
        let Batch::Metrics(rm) = &p else {
            panic!("metrics")
        };
        assert!(rm[0].resource.is_none());
        let Some(metric::Data::Sum(sum)) = &rm[0].scope_metrics[0].metrics[0].data else {
            panic!("a sum")
        };
        assert_eq!(
            sum.data_points[1].attributes,
            vec![string_kv("syscall.name", "sys_11")]
        );
    }

    #[test]
    fn service_items_are_sized_like_a_service_sends_them() {
        let spans = service_spans(500);
        assert_eq!(spans.item_count(), 500);
        let Batch::Traces(rss) = &spans else {
            panic!("traces")
        };
        assert_eq!(rss[0].resource.as_ref().unwrap().attributes.len(), 4);
        assert!(rss[0].scope_spans[0]
            .spans
            .iter()
            .all(|s| s.attributes.len() == 6));
        let points = service_points(501);
        assert_eq!(points.item_count(), 501);
        let Batch::Metrics(rms) = &points else {
            panic!("metrics")
        };
        let metrics = &rms[0].scope_metrics[0].metrics;
        let per_metric: Vec<usize> = metrics
            .iter()
            .map(podscope_core::batch::metric_points)
            .collect();
        assert_eq!(per_metric, vec![126, 125, 125, 125]);
        let Some(metric::Data::Histogram(h)) = &metrics[0].data else {
            panic!("a histogram first")
        };
        assert_eq!(h.data_points[0].attributes.len(), 4);
        assert_eq!(h.data_points[0].bucket_counts.len(), 14);
    }
}
