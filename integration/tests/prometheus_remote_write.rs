//! podscope's `prometheusremotewrite` exporter writes into a real Prometheus (2.x with
//! `--web.enable-remote-write-receiver`); the series are queried back with their labels and
//! exact values.

use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ExporterBuilder};
use podscope_exporters::prometheusremotewrite::RemoteWriteConfig;
use podscope_integration::prometheus::PrometheusServer;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn batch() -> Batch {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    Batch::metrics(vec![ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![
                kv("k8s.namespace.name", "shop"),
                kv("k8s.pod.name", "cart-1"),
            ],
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![
                Metric {
                    name: "podscope.syscalls".into(),
                    unit: "{syscall}".into(),
                    data: Some(metric::Data::Sum(Sum {
                        is_monotonic: true,
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        data_points: vec![NumberDataPoint {
                            attributes: vec![kv("syscall.name", "read")],
                            time_unix_nano: now,
                            value: Some(number_data_point::Value::AsInt(1234)),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                },
                Metric {
                    name: "podscope.sched.runqueue.latency".into(),
                    unit: "ns".into(),
                    data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        data_points: vec![ExponentialHistogramDataPoint {
                            count: 4,
                            sum: Some(4000.0),
                            positive: Some(Buckets {
                                offset: 9,
                                bucket_counts: vec![1, 3],
                            }),
                            time_unix_nano: now,
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_written_to_prometheus_are_queried_back_with_labels_and_values() {
    let prometheus = PrometheusServer::start(&[]).await;
    let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
        "endpoint": format!("http://{}/api/v1/write", prometheus.address),
        "external_labels": {"cluster": "ci"},
        "sending_queue": {"enabled": false},
        "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"}
    }))
    .unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("prometheusremotewrite"))
        .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(batch()).await.unwrap();

    let limit = Duration::from_secs(30);
    let read = prometheus
        .query_until_present(r#"podscope_syscalls_total{syscall_name="read"}"#, limit)
        .await;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].1, "1234");
    assert_eq!(read[0].0["cluster"], "ci");
    assert_eq!(read[0].0["k8s_namespace_name"], "shop");
    assert_eq!(read[0].0["k8s_pod_name"], "cart-1");
    assert_eq!(
        read[0].0["otel_scope_name"],
        serde_json::Value::Null,
        "no scope name was set"
    );
    let bucket = prometheus
        .query_until_present(
            r#"podscope_sched_runqueue_latency_seconds_bucket{le="0.000001024"}"#,
            limit,
        )
        .await;
    assert_eq!(bucket[0].1, "1");
    let count = prometheus
        .query_until_present("podscope_sched_runqueue_latency_seconds_count", limit)
        .await;
    assert_eq!(count[0].1, "4");
    exporter.shutdown().await.unwrap();
}
