use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum,
};
use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ExporterBuilder};
use podscope_testkit::BuildContextForTests as _;
use prost::Message as _;

use super::request::WriteRequest;
use super::RemoteWriteConfig;

fn delta(value: i64) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "opens".into(),
                unit: "{open}".into(),
                data: Some(metric::Data::Sum(Sum {
                    is_monotonic: true,
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    data_points: vec![NumberDataPoint {
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

/// A remote-write endpoint answering from a script of statuses (then 204), recording what it got.
async fn endpoint(
    script: Vec<u16>,
) -> (
    String,
    Arc<Mutex<Vec<(u16, WriteRequest, Vec<(String, String)>)>>>,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter().rev().collect::<Vec<_>>()));
    let seen = log.clone();
    let app = axum::Router::new().route(
        "/api/v1/write",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                let script = script.clone();
                async move {
                    let status = script.lock().unwrap().pop().unwrap_or(204);
                    let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
                    let request = WriteRequest::decode(raw.as_slice()).unwrap();
                    let hs = [
                        "content-encoding",
                        "content-type",
                        "x-prometheus-remote-write-version",
                    ]
                    .iter()
                    .map(|h| (h.to_string(), headers[*h].to_str().unwrap().to_string()))
                    .collect();
                    seen.lock().unwrap().push((status, request, hs));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/write", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

fn value_of(request: &WriteRequest) -> f64 {
    request.timeseries[0].samples[0].value
}

#[tokio::test]
async fn retries_on_503_resend_the_same_samples_and_deltas_are_not_counted_twice() {
    let (url, log) = endpoint(vec![503]).await;
    let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
        "endpoint": url,
        "external_labels": {"cluster": "test"},
        "sending_queue": {"enabled": false},
        "retry_on_failure": {"initial_interval": "10ms", "max_interval": "10ms"}
    }))
    .unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("prometheusremotewrite"))
        .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(delta(3)).await.unwrap();
    exporter.consume(delta(4)).await.unwrap();
    let log = log.lock().unwrap();
    let statuses: Vec<u16> = log.iter().map(|e| e.0).collect();
    assert_eq!(statuses, vec![503, 204, 204]);
    // The retry carried the same cumulative value; the next batch added its delta once.
    assert_eq!(
        log.iter().map(|e| value_of(&e.1)).collect::<Vec<_>>(),
        vec![3.0, 3.0, 7.0]
    );
    let labels: Vec<(String, String)> = log[1].1.timeseries[0]
        .labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    assert_eq!(
        labels,
        vec![
            ("__name__".into(), "opens_total".into()),
            ("cluster".into(), "test".into())
        ]
    );
    assert_eq!(
        log[1].2,
        vec![
            ("content-encoding".into(), "snappy".into()),
            ("content-type".into(), "application/x-protobuf".into()),
            ("x-prometheus-remote-write-version".into(), "0.1.0".into()),
        ]
    );
}

#[tokio::test]
async fn a_400_is_not_retried_and_is_counted_as_dropped() {
    let (url, log) = endpoint(vec![400]).await;
    let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
        "endpoint": url, "retry_on_failure": {"initial_interval": "10ms", "max_interval": "10ms"}
    }))
    .unwrap();
    let ctx = BuildContext::for_tests("prometheusremotewrite");
    let telemetry = ctx.telemetry.clone();
    let exporter = Box::new(config).build(ctx).unwrap();
    exporter.start().await.unwrap();
    exporter.consume(delta(1)).await.unwrap(); // queued
    exporter.shutdown().await.unwrap();
    assert_eq!(log.lock().unwrap().len(), 1);
    assert!(telemetry.encode_text().contains(
        "podscope_exporter_dropped_items_total{component=\"prometheusremotewrite\",signal=\"metrics\",reason=\"http_400\"} 1"
    ));
}

#[test]
fn endpoint_is_required() {
    let errors = parse_component_config::<RemoteWriteConfig>(serde_json::Value::Null).unwrap_err();
    assert_eq!(errors[0].path, "endpoint");
}

#[tokio::test]
async fn every_5xx_and_429_is_retried_and_other_statuses_are_not() {
    for (status, retried) in [
        (429, true),
        (500, true),
        (501, true),
        (502, true),
        (503, true),
        (504, true),
        (507, true),
        (400, false),
        (401, false),
        (403, false),
        (404, false),
        (409, false),
        (413, false),
        (422, false),
    ] {
        let (url, log) = endpoint(vec![status]).await;
        let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
            "endpoint": url,
            "sending_queue": {"enabled": false},
            "retry_on_failure": {"initial_interval": "10ms", "max_interval": "10ms"}
        }))
        .unwrap();
        let ctx = BuildContext::for_tests("prometheusremotewrite");
        let telemetry = ctx.telemetry.clone();
        let exporter = Box::new(config).build(ctx).unwrap();
        exporter.start().await.unwrap();
        let _ = exporter.consume(delta(1)).await;
        exporter.shutdown().await.unwrap();
        let statuses: Vec<u16> = log.lock().unwrap().iter().map(|e| e.0).collect();
        let text = telemetry.encode_text();
        if retried {
            assert_eq!(statuses, vec![status, 204], "{status} is retried");
            assert!(
                text.contains("podscope_exporter_sent_items_total{component=\"prometheusremotewrite\",signal=\"metrics\"} 1"),
                "{status}: {text}"
            );
        } else {
            assert_eq!(statuses, vec![status], "{status} is not retried");
            assert!(
                text.contains(&format!("podscope_exporter_dropped_items_total{{component=\"prometheusremotewrite\",signal=\"metrics\",reason=\"http_{status}\"}} 1")),
                "{status}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn sent_and_dropped_add_up_to_the_data_points_of_the_batch() {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    let (url, log) = endpoint(vec![]).await;
    let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
        "endpoint": url, "sending_queue": {"enabled": false}
    }))
    .unwrap();
    let ctx = BuildContext::for_tests("prometheusremotewrite");
    let telemetry = ctx.telemetry.clone();
    let exporter = Box::new(config).build(ctx).unwrap();
    exporter.start().await.unwrap();
    // Three points, one without a value; the resource also makes a target_info series.
    let mut batch = delta(1);
    if let Batch::Metrics(rms) = &mut batch {
        let rm = &mut std::sync::Arc::make_mut(rms)[0];
        rm.resource = Some(Resource {
            attributes: vec![KeyValue {
                key: "os.type".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("linux".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        if let Some(metric::Data::Sum(sum)) = &mut rm.scope_metrics[0].metrics[0].data {
            let mut other = sum.data_points[0].clone();
            other.attributes.push(KeyValue {
                key: "path".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("/etc".into())),
                }),
                ..Default::default()
            });
            sum.data_points.push(other);
            sum.data_points.push(NumberDataPoint::default());
        }
    }
    assert_eq!(batch.item_count(), 3);
    exporter.consume(batch).await.unwrap();
    exporter.shutdown().await.unwrap();
    let names: Vec<String> = log.lock().unwrap()[0]
        .1
        .timeseries
        .iter()
        .map(|ts| {
            ts.labels
                .iter()
                .find(|l| l.name == "__name__")
                .unwrap()
                .value
                .clone()
        })
        .collect();
    assert_eq!(names, vec!["opens_total", "opens_total", "target_info"]);
    let text = telemetry.encode_text();
    assert!(text.contains("podscope_exporter_sent_items_total{component=\"prometheusremotewrite\",signal=\"metrics\"} 2"), "{text}");
    assert!(text.contains("podscope_exporter_dropped_items_total{component=\"prometheusremotewrite\",signal=\"metrics\",reason=\"untranslatable\"} 1"), "{text}");
}
