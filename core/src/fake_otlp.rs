//! Synthetic OTLP data for tests and benchmarks, one generator for all of them: HTTP server
//! spans, syscall-count data points and CPU profiles shaped like what podscope carries,
//! deterministic (ids and values from the index) so that round trips can be compared exactly.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, Line, Location, Mapping, Profile, ProfilesData, ResourceProfiles, Sample,
    ScopeProfiles, Stack, ValueType,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};

use crate::Batch;

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

/// An on-CPU profile (`samples`/`count`, period 1/19 s) of `n` samples under one resource:
/// sample `i` has the two-frame stack `work_<i>` ← `main` in `/bin/app` (build id `ab` × 20) and
/// the value `i + 1`.
pub fn cpu_profile(n: usize, resource_attributes: &[(&str, &str)]) -> Batch {
    let mut d = crate::profiles::empty_dictionary();
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
}
