//! podscope's `prometheusremotewrite` exporter writes into a real Prometheus (2.x with
//! `--web.enable-remote-write-receiver`); the series are queried back with their labels and
//! exact values.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, ExponentialHistogram,
    ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_core::config::parse_component_config;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{Batch, BuildContext, Exporter, ExporterBuilder};
use podscope_exporters::prometheusremotewrite::RemoteWriteConfig;
use podscope_integration::prometheus::PrometheusServer;
use podscope_testkit::BuildContextForTests as _;

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

/// A relay between the exporter and Prometheus: forwards each remote-write request unchanged,
/// except that it answers 503 itself while `down`, and to every `fail_every`-th request (the
/// first attempt of it: the retry goes through).
struct Relay {
    url: String,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(prometheus: &PrometheusServer, fail_every: usize) -> Relay {
        let target = format!("http://{}/api/v1/write", prometheus.address);
        let down = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::new();
        let is_down = down.clone();
        let app = axum::Router::new().route(
            "/write",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (client, target, is_down) =
                        (client.clone(), target.clone(), is_down.clone());
                    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        if is_down.load(Ordering::SeqCst)
                            || (fail_every > 0 && n.is_multiple_of(fail_every))
                        {
                            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                        }
                        let mut request = client.post(&target).body(body);
                        for (name, value) in &headers {
                            if name != "host" && name != "content-length" {
                                request = request.header(name, value);
                            }
                        }
                        let response = request.send().await.expect("prometheus answers");
                        let status =
                            axum::http::StatusCode::from_u16(response.status().as_u16()).unwrap();
                        (status, response.text().await.unwrap_or_default())
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/write", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Relay { url, down, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One gauge point of `name` observed at `time_unix_nano`.
fn gauge(name: &str, time_unix_nano: u64, value: f64) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: name.into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        time_unix_nano,
                        value: Some(number_data_point::Value::AsDouble(value)),
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

/// Every `(unix seconds, value)` Prometheus holds for `selector` over the last two hours.
async fn samples(prometheus: &PrometheusServer, selector: &str) -> Vec<(f64, String)> {
    let response: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/query", prometheus.address))
        .query(&[("query", format!("{selector}[2h]"))])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|series| series["values"].as_array().cloned().unwrap_or_default())
        .map(|pair| {
            (
                pair[0].as_f64().unwrap(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn exporter_to(url: &str, settings: serde_json::Value) -> (Arc<dyn Exporter>, AgentTelemetry) {
    let mut config = serde_json::json!({
        "endpoint": url,
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms", "randomization_factor": 0.0}
    });
    for (key, value) in settings.as_object().unwrap() {
        config[key] = value.clone();
    }
    let config: RemoteWriteConfig = parse_component_config(config).unwrap();
    let ctx = BuildContext::for_tests("prometheusremotewrite");
    let telemetry = ctx.telemetry.clone();
    (Box::new(config).build(ctx).unwrap(), telemetry)
}

fn dropped(telemetry: &AgentTelemetry) -> u64 {
    telemetry
        .encode_text()
        .lines()
        .filter(|l| l.starts_with("podscope_exporter_dropped_items_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_carry_the_time_their_point_was_observed() {
    let prometheus = PrometheusServer::start(&[]).await;
    let (exporter, telemetry) = exporter_to(
        &format!("http://{}/api/v1/write", prometheus.address),
        serde_json::json!({"sending_queue": {"enabled": false}}),
    );
    exporter.start().await.unwrap();
    let half_an_hour_ago = now_nanos() - 30 * 60 * 1_000_000_000;
    exporter
        .consume(gauge("rw.old.point", half_an_hour_ago, 42.0))
        .await
        .unwrap();
    exporter.shutdown().await.unwrap();
    assert_eq!(dropped(&telemetry), 0, "{}", telemetry.encode_text());
    assert_eq!(
        samples(&prometheus, "rw_old_point").await,
        vec![(
            (half_an_hour_ago / 1_000_000) as f64 / 1000.0,
            "42".to_string()
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_keeps_its_order_with_several_senders_and_retries_in_flight() {
    let prometheus = PrometheusServer::start(&[]).await;
    // Every third request is refused once, so retries overlap later requests.
    let relay = Relay::start(&prometheus, 3).await;
    let (exporter, telemetry) = exporter_to(
        &relay.url,
        serde_json::json!({"sending_queue": {"num_consumers": 4}}),
    );
    exporter.start().await.unwrap();
    let first = now_nanos() - 10 * 60 * 1_000_000_000;
    let points = 30u64;
    for i in 0..points {
        exporter
            .consume(gauge("rw.sequence", first + i * 1_000_000_000, i as f64))
            .await
            .unwrap();
    }
    exporter.shutdown().await.unwrap();
    assert_eq!(dropped(&telemetry), 0, "{}", telemetry.encode_text());
    let expected: Vec<(f64, String)> = (0..points)
        .map(|i| {
            (
                ((first + i * 1_000_000_000) / 1_000_000) as f64 / 1000.0,
                i.to_string(),
            )
        })
        .collect();
    assert_eq!(samples(&prometheus, "rw_sequence").await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_batch_is_given_up_the_next_one_is_sent_with_its_own_data() {
    let prometheus = PrometheusServer::start(&[]).await;
    let relay = Relay::start(&prometheus, 0).await;
    let (exporter, telemetry) = exporter_to(
        &relay.url,
        serde_json::json!({
            "sending_queue": {"enabled": false},
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "50ms", "max_elapsed_time": "300ms"}
        }),
    );
    exporter.start().await.unwrap();
    let t0 = now_nanos() - 60 * 1_000_000_000;
    relay.down.store(true, Ordering::SeqCst);
    let _ = exporter.consume(gauge("rw.state", t0, 1.0)).await;
    assert_eq!(
        dropped(&telemetry),
        1,
        "retries exhausted: {}",
        telemetry.encode_text()
    );
    relay.down.store(false, Ordering::SeqCst);
    let t1 = t0 + 1_000_000_000;
    exporter.consume(gauge("rw.state", t1, 2.0)).await.unwrap();
    exporter.shutdown().await.unwrap();
    assert_eq!(
        samples(&prometheus, "rw_state").await,
        vec![((t1 / 1_000_000) as f64 / 1000.0, "2".to_string())]
    );
}
