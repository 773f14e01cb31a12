use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_core::config::parse_component_config;

use super::render::format_float;
use super::store::{Settings, Store};
use super::PrometheusConfig;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
    }
}

fn resource_metrics(metrics: Vec<Metric>) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![
                kv("host.name", "node-1"),
                int_kv("podscope.cgroup.id", 4242),
                kv("container.id", "abc"),
            ],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "podscope.receiver.ebpf".into(),
                version: "0.1.0".into(),
                ..Default::default()
            }),
            metrics,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn sum(
    name: &str,
    unit: &str,
    temporality: AggregationTemporality,
    points: Vec<(Vec<KeyValue>, i64)>,
) -> Metric {
    Metric {
        name: name.into(),
        description: format!("{name} help"),
        unit: unit.into(),
        data: Some(metric::Data::Sum(Sum {
            is_monotonic: true,
            aggregation_temporality: temporality as i32,
            data_points: points
                .into_iter()
                .map(|(attributes, v)| NumberDataPoint {
                    attributes,
                    value: Some(number_data_point::Value::AsInt(v)),
                    ..Default::default()
                })
                .collect(),
        })),
        ..Default::default()
    }
}

fn settings() -> Settings {
    let c: PrometheusConfig = parse_component_config(serde_json::Value::Null).unwrap();
    Settings {
        namespace: c.namespace,
        add_metric_suffixes: c.add_metric_suffixes,
        add_scope_labels: true,
        all_resource_attributes: false,
        promoted: c.promoted_resource_attributes,
        expiration: c.metric_expiration,
    }
}

const SCOPE: &str = r#"container_id="abc",host_name="node-1",otel_scope_name="podscope.receiver.ebpf",otel_scope_version="0.1.0""#;

#[test]
fn counters_gauges_and_target_info_render_as_text_0_0_4() {
    let mut store = Store::new(settings());
    let now = Instant::now();
    store.apply(
        &[resource_metrics(vec![
            sum(
                "podscope.syscalls",
                "{syscall}",
                AggregationTemporality::Cumulative,
                vec![(vec![kv("syscall.name", "read")], 42)],
            ),
            Metric {
                name: "queue.depth".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        value: Some(number_data_point::Value::AsDouble(2.5)),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            },
        ])],
        now,
    );
    let expected = format!(
        "# HELP podscope_syscalls_total podscope.syscalls help\n\
         # TYPE podscope_syscalls_total counter\n\
         podscope_syscalls_total{{{SCOPE},syscall_name=\"read\"}} 42\n\
         # TYPE queue_depth gauge\n\
         queue_depth{{{SCOPE}}} 2.5\n\
         # HELP target_info Target metadata\n\
         # TYPE target_info gauge\n\
         target_info{{container_id=\"abc\",host_name=\"node-1\",podscope_cgroup_id=\"4242\"}} 1\n"
    );
    assert_eq!(store.render(false), expected);
    let openmetrics = store.render(true);
    assert!(
        openmetrics.contains("# TYPE podscope_syscalls counter\n"),
        "{openmetrics}"
    );
    assert!(
        openmetrics.contains("podscope_syscalls_total{"),
        "{openmetrics}"
    );
    assert!(openmetrics.ends_with("# EOF\n"));
}

#[test]
fn nanosecond_exponential_histograms_become_second_buckets() {
    let mut store = Store::new(settings());
    let histogram = Metric {
        name: "podscope.sched.runqueue.latency".into(),
        unit: "ns".into(),
        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            data_points: vec![ExponentialHistogramDataPoint {
                count: 6,
                sum: Some(3000.0),
                scale: 0,
                zero_count: 1,
                // (512, 1024]: 2, (1024, 2048]: 0, (2048, 4096]: 3
                positive: Some(Buckets {
                    offset: 9,
                    bucket_counts: vec![2, 0, 3],
                }),
                ..Default::default()
            }],
        })),
        ..Default::default()
    };
    store.apply(&[resource_metrics(vec![histogram])], Instant::now());
    let text = store.render(false);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("podscope_sched"))
        .collect();
    let name = "podscope_sched_runqueue_latency_seconds";
    assert_eq!(
        lines,
        vec![
            format!("{name}_bucket{{{SCOPE},le=\"0\"}} 1"),
            format!("{name}_bucket{{{SCOPE},le=\"0.000001024\"}} 3"),
            format!("{name}_bucket{{{SCOPE},le=\"0.000002048\"}} 3"),
            format!("{name}_bucket{{{SCOPE},le=\"0.000004096\"}} 6"),
            format!("{name}_bucket{{{SCOPE},le=\"+Inf\"}} 6"),
            format!("{name}_sum{{{SCOPE}}} 0.000003"),
            format!("{name}_count{{{SCOPE}}} 6"),
        ]
    );
}

#[test]
fn deltas_accumulate_and_old_series_expire() {
    let mut s = settings();
    s.expiration = Duration::from_secs(60);
    let mut store = Store::new(s);
    let t0 = Instant::now();
    let delta = |v| {
        sum(
            "podscope.files.path_opens",
            "{open}",
            AggregationTemporality::Delta,
            vec![(vec![kv("file.path", "/etc/hosts")], v)],
        )
    };
    store.apply(&[resource_metrics(vec![delta(3)])], t0);
    store.apply(
        &[resource_metrics(vec![delta(4)])],
        t0 + Duration::from_secs(10),
    );
    let text = store.render(false);
    assert!(
        text.contains(r#"podscope_files_path_opens_total{container_id="abc",file_path="/etc/hosts",host_name="node-1",otel_scope_name="podscope.receiver.ebpf",otel_scope_version="0.1.0"} 7"#),
        "{text}"
    );
    store.expire(t0 + Duration::from_secs(71));
    assert_eq!(store.series_count(), 0);
}

#[test]
fn colliding_label_names_join_their_values() {
    let mut store = Store::new(settings());
    let m = sum(
        "c",
        "",
        AggregationTemporality::Cumulative,
        vec![(vec![kv("a.b", "1"), kv("a_b", "2")], 1)],
    );
    store.apply(&[resource_metrics(vec![m])], Instant::now());
    assert!(
        store.render(false).contains("a_b=\"1;2\""),
        "{}",
        store.render(false)
    );
}

fn exponential(
    temporality: AggregationTemporality,
    scale: i32,
    zero_count: u64,
    negative: (i32, Vec<u64>),
    positive: (i32, Vec<u64>),
) -> Metric {
    let count = zero_count + negative.1.iter().sum::<u64>() + positive.1.iter().sum::<u64>();
    let buckets = |(offset, bucket_counts): (i32, Vec<u64>)| {
        (!bucket_counts.is_empty()).then_some(Buckets {
            offset,
            bucket_counts,
        })
    };
    Metric {
        name: "latency".into(),
        description: "Latency".into(),
        unit: "s".into(),
        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
            aggregation_temporality: temporality as i32,
            data_points: vec![ExponentialHistogramDataPoint {
                count,
                sum: Some(1.0),
                scale,
                zero_count,
                negative: buckets(negative),
                positive: buckets(positive),
                ..Default::default()
            }],
        })),
        ..Default::default()
    }
}

/// `(le, cumulative count)` of every `latency_seconds_bucket` line, in page order.
fn buckets_of(page: &str) -> Vec<(String, u64)> {
    page.lines()
        .filter(|l| l.starts_with("latency_seconds_bucket{"))
        .map(|l| {
            let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let count = l.rsplit_once(' ').unwrap().1.parse().unwrap();
            (le.to_string(), count)
        })
        .collect()
}

fn le(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(l, c)| (l.to_string(), *c)).collect()
}

/// The `latency` buckets rendered after applying each histogram as a batch of its own, in order.
fn buckets_after(histograms: Vec<Metric>) -> Vec<(String, u64)> {
    let mut store = Store::new(settings());
    for histogram in histograms {
        store.apply(&[resource_metrics(vec![histogram])], Instant::now());
    }
    buckets_of(&store.render(false))
}

#[test]
fn delta_exponential_histograms_with_moving_offsets_add_up_bucket_by_bucket() {
    let delta = AggregationTemporality::Delta;
    assert_eq!(
        buckets_after(vec![
            exponential(delta, 0, 0, (0, vec![]), (0, vec![1, 1])),
            exponential(delta, 0, 0, (0, vec![]), (2, vec![3])),
        ]),
        le(&[("2", 1), ("4", 2), ("8", 5), ("+Inf", 5)])
    );
}

#[test]
fn delta_exponential_histograms_of_different_scales_merge_on_the_coarser_one() {
    let delta = AggregationTemporality::Delta;
    // Scale 1: (1, √2] 1, (√2, 2] 2, (2, 2√2] 4 — then scale 0: (1, 2] 8.
    assert_eq!(
        buckets_after(vec![
            exponential(delta, 1, 0, (0, vec![]), (0, vec![1, 2, 4])),
            exponential(delta, 0, 0, (0, vec![]), (0, vec![8])),
        ]),
        le(&[("2", 11), ("4", 15), ("+Inf", 15)])
    );
}

#[test]
fn negative_and_zero_buckets_are_counted() {
    let cumulative = AggregationTemporality::Cumulative;
    // Negative bucket 0 holds [-2, -1), the zero bucket 0, positive bucket 0 (1, 2].
    assert_eq!(
        buckets_after(vec![exponential(
            cumulative,
            0,
            1,
            (0, vec![4]),
            (0, vec![2])
        )]),
        le(&[("-1", 4), ("0", 5), ("2", 7), ("+Inf", 7)])
    );
}

#[test]
fn bucket_bounds_are_exact_and_never_overflow_into_a_second_inf() {
    let cumulative = AggregationTemporality::Cumulative;
    // Scale 3: bucket 7 ends at 2^(8/8) = 2 exactly.
    assert_eq!(
        buckets_after(vec![exponential(
            cumulative,
            3,
            0,
            (0, vec![]),
            (7, vec![1])
        )]),
        le(&[("2", 1), ("+Inf", 1)])
    );
    // Scale -9: bucket 0 ends at 2^512, bucket 1 at 2^1024, which no f64 holds.
    assert_eq!(
        buckets_after(vec![exponential(
            cumulative,
            -9,
            0,
            (0, vec![]),
            (0, vec![1, 1, 1])
        )]),
        vec![(format_float(2f64.powi(512)), 1), ("+Inf".to_string(), 3)]
    );
}

#[test]
fn point_attributes_named_le_or_quantile_do_not_clash_with_bucket_labels() {
    let mut store = Store::new(settings());
    let mut histogram = exponential(
        AggregationTemporality::Cumulative,
        0,
        0,
        (0, vec![]),
        (0, vec![1]),
    );
    if let Some(metric::Data::ExponentialHistogram(h)) = &mut histogram.data {
        h.data_points[0].attributes = vec![kv("le", "fr")];
    }
    let summary = Metric {
        name: "rpc.duration".into(),
        description: "RPC duration".into(),
        data: Some(metric::Data::Summary(Summary {
            data_points: vec![SummaryDataPoint {
                count: 1,
                sum: 2.0,
                quantile_values: vec![ValueAtQuantile {
                    quantile: 0.5,
                    value: 2.0,
                }],
                attributes: vec![kv("quantile", "p50")],
                ..Default::default()
            }],
        })),
        ..Default::default()
    };
    store.apply(
        &[resource_metrics(vec![histogram, summary])],
        Instant::now(),
    );
    let page = store.render(false);
    assert!(
        page.contains(
            "latency_seconds_bucket{container_id=\"abc\",host_name=\"node-1\",key_le=\"fr\",\
             otel_scope_name=\"podscope.receiver.ebpf\",otel_scope_version=\"0.1.0\",le=\"2\"} 1\n"
        ),
        "{page}"
    );
    assert!(
        page.contains(
            "rpc_duration{container_id=\"abc\",host_name=\"node-1\",key_quantile=\"p50\",\
             otel_scope_name=\"podscope.receiver.ebpf\",otel_scope_version=\"0.1.0\",quantile=\"0.5\"} 2\n"
        ),
        "{page}"
    );
    assert_eq!(
        podscope_integration::prometheus::promtool_findings(&page),
        "",
        "{page}"
    );
}

mod exponential_to_classic {
    //! The classic buckets rendered from exponential histograms, checked against the raw values
    //! the histograms were built from: every `le` bucket holds exactly the values at or below its
    //! bound, whatever the scale, the signs and the merging of deltas at different scales.

    use proptest::prelude::*;

    use super::*;

    /// A value strictly inside bucket `index` of `scale` (a quarter of a bucket of any finer scale
    /// up to 3 steps away from its edges, so no rounding can move it across one), negated or zero
    /// as `sign` says.
    #[derive(Debug, Clone, Copy)]
    struct Value {
        sign: i8,
        index: i32,
        /// Position inside the bucket, in 32nds of its width (odd: never on a finer edge).
        position: u8,
    }

    impl Value {
        fn at(self, scale: i32) -> f64 {
            let log2 = (self.index as f64 + self.position as f64 / 32.0) / 2f64.powi(scale);
            self.sign as f64 * log2.exp2()
        }

        /// The bucket holding this value at `scale + finer`.
        fn finer_index(self, finer: u32) -> i32 {
            (self.index << finer) + ((self.position as i32) << finer) / 32
        }
    }

    fn values() -> impl Strategy<Value = Vec<Value>> {
        let value = (-1i8..=1, -12i32..12, 0u8..16).prop_map(|(sign, index, p)| Value {
            sign,
            index,
            position: 2 * p + 1,
        });
        proptest::collection::vec(value, 1..40)
    }

    /// An exponential histogram point of `values`, each in its bucket at `scale + finer`.
    fn point(values: &[Value], scale: i32, finer: u32) -> Metric {
        let dense = |sign: i8| -> (i32, Vec<u64>) {
            let indices: Vec<i32> = values
                .iter()
                .filter(|v| v.sign == sign)
                .map(|v| v.finer_index(finer))
                .collect();
            let (Some(&low), Some(&high)) = (indices.iter().min(), indices.iter().max()) else {
                return (0, Vec::new());
            };
            let mut counts = vec![0u64; (high - low + 1) as usize];
            for i in indices {
                counts[(i - low) as usize] += 1;
            }
            (low, counts)
        };
        let zero = values.iter().filter(|v| v.sign == 0).count() as u64;
        exponential(
            AggregationTemporality::Delta,
            scale + finer as i32,
            zero,
            dense(-1),
            dense(1),
        )
    }

    /// Checks a rendered page against the raw values: one `+Inf` holding them all, increasing
    /// bounds, and each bucket counting exactly the values at or below its bound.
    fn check(page: &str, raw: &[f64]) -> Result<(), TestCaseError> {
        let buckets = buckets_of(page);
        let (last, bounded) = buckets.split_last().expect("at least +Inf");
        prop_assert_eq!(last, &("+Inf".to_string(), raw.len() as u64), "{}", page);
        let mut previous = f64::NEG_INFINITY;
        for (le, cumulative) in bounded {
            let bound: f64 = le.parse().unwrap();
            prop_assert!(
                bound.is_finite() && bound > previous,
                "{le} after {previous}: {page}"
            );
            previous = bound;
            let expected = raw.iter().filter(|&&v| v <= bound).count() as u64;
            prop_assert_eq!(*cumulative, expected, "le={}: {}", le, page);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn classic_buckets_count_exactly_the_values_below_their_bound(
            values in values(),
            scale in -3i32..=4,
        ) {
            let mut store = Store::new(settings());
            store.apply(&[resource_metrics(vec![point(&values, scale, 0)])], Instant::now());
            let raw: Vec<f64> = values.iter().map(|v| v.at(scale)).collect();
            check(&store.render(false), &raw)?;
        }

        #[test]
        fn deltas_at_different_scales_merge_without_losing_a_value(
            first in values(),
            second in values(),
            scale in -3i32..=4,
            finer in 0u32..=3,
        ) {
            let mut store = Store::new(settings());
            let now = Instant::now();
            store.apply(&[resource_metrics(vec![point(&first, scale, finer)])], now);
            store.apply(&[resource_metrics(vec![point(&second, scale, 0)])], now);
            let raw: Vec<f64> = first.iter().chain(&second).map(|v| v.at(scale)).collect();
            check(&store.render(false), &raw)?;
        }
    }
}
