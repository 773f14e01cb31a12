use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_core::config::parse_component_config;

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
