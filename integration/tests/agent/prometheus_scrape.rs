//! A real Prometheus scrapes the real agent: OTLP metrics sent to podscope's `otlp` receiver come
//! out of its `prometheus` exporter, are scraped by Prometheus 2.x and queried back with the
//! translated names, labels and exact values; the page passes `promtool check metrics` cleanly.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::prometheus::{promtool_findings, PrometheusServer};

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn request() -> ExportMetricsServiceRequest {
    let counter = |route: &str, value: i64| NumberDataPoint {
        attributes: vec![kv("http.route", route)],
        start_time_unix_nano: 1,
        time_unix_nano: 2,
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "checkout"),
                    kv("k8s.namespace.name", "shop"),
                    kv("k8s.pod.name", "checkout-1"),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "app.requests".into(),
                        description: "Requests served".into(),
                        unit: "{request}".into(),
                        data: Some(metric::Data::Sum(Sum {
                            is_monotonic: true,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            data_points: vec![counter("/cart", 7), counter("/pay", 11)],
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: "app.queue.size".into(),
                        description: "Items waiting".into(),
                        unit: "{item}".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![NumberDataPoint {
                                value: Some(number_data_point::Value::AsDouble(3.5)),
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: "app.latency".into(),
                        description: "Request latency".into(),
                        unit: "ns".into(),
                        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            data_points: vec![ExponentialHistogramDataPoint {
                                count: 5,
                                sum: Some(5_000_000.0),
                                scale: 0,
                                positive: Some(Buckets {
                                    offset: 19,
                                    bucket_counts: vec![2, 3],
                                }), // (2^19, 2^20]: 2, (2^20, 2^21]: 3
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_agent_and_queries_back_exact_values() {
    let grpc_port = free_port();
    let scrape_port = free_port();
    let telemetry_port = free_port();
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{grpc_port}" }} }} }}
exporters:
  prometheus: {{ endpoint: "127.0.0.1:{scrape_port}" }}
service:
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [prometheus] }}
"#
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let mut client = MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    client.export(request()).await.unwrap();

    let page = reqwest::get(format!("http://127.0.0.1:{scrape_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        promtool_findings(&page),
        "",
        "promtool findings on:\n{page}"
    );
    let openmetrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{scrape_port}/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(openmetrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(openmetrics.text().await.unwrap().ends_with("# EOF\n"));

    let prometheus = PrometheusServer::start(&[format!("127.0.0.1:{scrape_port}")]).await;
    let limit = Duration::from_secs(60);
    let cart = prometheus
        .query_until_present(r#"app_requests_total{http_route="/cart"}"#, limit)
        .await;
    assert_eq!(cart.len(), 1);
    assert_eq!(cart[0].1, "7");
    assert_eq!(
        cart[0].0["job"], "podscope",
        "Prometheus' own job label wins over the exporter's"
    );
    assert_eq!(
        cart[0].0["exported_job"], "checkout",
        "service.name became the job label"
    );
    assert_eq!(cart[0].0["k8s_namespace_name"], "shop");
    assert_eq!(cart[0].0["k8s_pod_name"], "checkout-1");
    let pay = prometheus
        .query_until_present(r#"app_requests_total{http_route="/pay"}"#, limit)
        .await;
    assert_eq!(pay[0].1, "11");
    let queue = prometheus
        .query_until_present("app_queue_size", limit)
        .await;
    assert_eq!(queue[0].1, "3.5");
    // 2^20 ns = 0.001048576 s: two observations at or below it, five in all.
    let le = prometheus
        .query_until_present(r#"app_latency_seconds_bucket{le="0.001048576"}"#, limit)
        .await;
    assert_eq!(le[0].1, "2");
    let sum = prometheus
        .query_until_present("app_latency_seconds_sum", limit)
        .await;
    assert_eq!(sum[0].1, "0.005");

    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(30)).await.success());
}
