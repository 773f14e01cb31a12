//! The receiver against real OTLP clients: the opentelemetry-otlp span exporter (gRPC and
//! HTTP/protobuf), the generated OTLP gRPC client with gzip, and raw HTTP requests for JSON and for
//! malformed input.

use std::io::Write as _;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_testkit::BuildContextForTests as _;

use super::{OtlpReceiver, OtlpReceiverConfig};

/// Collects batches, or refuses them with a configured error.
#[derive(Default)]
struct TestConsumer {
    batches: Mutex<Vec<Batch>>,
    refuse_with: Mutex<Option<ConsumeError>>,
}

#[async_trait]
impl Consumer for TestConsumer {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        if let Some(e) = self.refuse_with.lock().unwrap().clone() {
            return Err(e);
        }
        self.batches.lock().unwrap().push(batch);
        Ok(())
    }
}

impl TestConsumer {
    fn span_names(&self) -> Vec<String> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| match b {
                Batch::Traces(rss) => rss
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .flat_map(|ss| &ss.spans)
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>(),
                _ => panic!("another signal in the traces consumer"),
            })
            .collect()
    }

    fn items(&self) -> usize {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .map(Batch::item_count)
            .sum()
    }
}

struct Running {
    receiver: OtlpReceiver,
    metrics: Arc<TestConsumer>,
    traces: Arc<TestConsumer>,
    grpc: String,
    http: String,
}

impl Running {
    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

async fn start(signals: &[&str]) -> Running {
    let config: OtlpReceiverConfig = parse_component_config(serde_json::json!({"protocols": {
        "grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}}))
    .unwrap();
    let metrics = Arc::new(TestConsumer::default());
    let traces = Arc::new(TestConsumer::default());
    let next = ReceiverConsumers {
        metrics: signals
            .contains(&"metrics")
            .then(|| metrics.clone() as Arc<dyn Consumer>),
        traces: signals
            .contains(&"traces")
            .then(|| traces.clone() as Arc<dyn Consumer>),
        profiles: None,
        logs: None,
    };
    let receiver = OtlpReceiver::new(config, &BuildContext::for_tests("otlp"), next);
    receiver.start().await.unwrap();
    let bound = receiver.bound_addresses();
    Running {
        grpc: format!("http://{}", bound.grpc.unwrap()),
        http: format!("http://{}", bound.http.unwrap()),
        receiver,
        metrics,
        traces,
    }
}

fn span(name: &str, id: u64) -> SpanData {
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Client,
        name: name.to_string().into(),
        start_time: now,
        end_time: now + Duration::from_millis(1),
        attributes: vec![KeyValue::new("peer.service", "db")],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("test").build(),
    }
}

fn gauge_request(points: usize) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "queue.depth".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: vec![NumberDataPoint::default(); points],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test]
async fn spans_from_the_opentelemetry_otlp_grpc_exporter_arrive_exactly() {
    let r = start(&["traces"]).await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(r.grpc.clone())
        .build()
        .unwrap();
    exporter
        .export(vec![span("SELECT", 1), span("INSERT", 2)])
        .await
        .unwrap();
    exporter.export(vec![span("UPDATE", 3)]).await.unwrap();
    assert_eq!(r.traces.span_names(), vec!["SELECT", "INSERT", "UPDATE"]);
    let batches = r.traces.batches.lock().unwrap().clone();
    let Batch::Traces(rss) = &batches[0] else {
        unreachable!()
    };
    let first = &rss[0].scope_spans[0].spans[0];
    assert_eq!(first.span_id, 1u64.to_be_bytes().to_vec());
    assert_eq!(first.attributes[0].key, "peer.service");
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_from_the_opentelemetry_otlp_http_exporter_arrive_exactly() {
    let r = start(&["traces"]).await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", r.http))
        .build()
        .unwrap();
    exporter
        .export(vec![span("GET", 1), span("PUT", 2)])
        .await
        .unwrap();
    assert_eq!(r.traces.span_names(), vec!["GET", "PUT"]);
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn gzip_metrics_over_grpc() {
    let r = start(&["metrics", "traces"]).await;
    let mut client = MetricsServiceClient::connect(r.grpc.clone())
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    client.export(gauge_request(5)).await.unwrap();
    assert_eq!(r.metrics.items(), 5);
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn otlp_json_over_http() {
    let r = start(&["traces"]).await;
    let body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"cart"}}]},
      "scopeSpans":[{"scope":{"name":"manual"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
      "spanId":"eee19b7ec3c1b174","name":"checkout","kind":2,"startTimeUnixNano":"1544712660000000000",
      "endTimeUnixNano":"1544712661000000000","attributes":[{"key":"http.response.status_code","value":{"intValue":"200"}}]}]}]}]}"#;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/traces", r.http))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let batches = r.traces.batches.lock().unwrap().clone();
    let Batch::Traces(rss) = &batches[0] else {
        unreachable!()
    };
    let s = &rss[0].scope_spans[0].spans[0];
    assert_eq!(s.name, "checkout");
    assert_eq!(s.trace_id[..4], [0x5b, 0x8e, 0xff, 0xf7]);
    assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1_000_000_000);
    assert_eq!(
        s.attributes[0].value.as_ref().unwrap().value,
        Some(any_value::Value::IntValue(200))
    );
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn gzip_protobuf_over_http() {
    let r = start(&["metrics"]).await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&prost::Message::encode_to_vec(&gauge_request(3)))
        .unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/metrics", r.http))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(r.metrics.items(), 3);
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_http_payloads_get_400_or_415_and_the_next_request_works() {
    let r = start(&["traces"]).await;
    let client = reqwest::Client::new();
    let post = |ct: &'static str, body: &'static [u8]| {
        client
            .post(format!("{}/v1/traces", r.http))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let bad_proto = post("application/x-protobuf", b"\xff\xff\xff\xff")
        .await
        .unwrap();
    assert_eq!(bad_proto.status(), 400);
    let bad_json = post("application/json", b"{\"resourceSpans\": [")
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let text = bad_json.text().await.unwrap();
    assert!(text.contains("malformed OTLP JSON"), "{text}");
    let wrong_type = post("text/plain", b"hello").await.unwrap();
    assert_eq!(wrong_type.status(), 415);
    let good = post(
        "application/json",
        br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"ok"}]}]}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(good.status(), 200);
    assert_eq!(r.traces.span_names(), vec!["ok"]);
    r.receiver.shutdown().await.unwrap();
}

/// Sends raw bytes as a gRPC request body, to test undecodable input.
#[derive(Default)]
struct RawBytesCodec;

struct RawEncoder;
struct NothingDecoder<T>(PhantomData<T>);

impl tonic::codec::Codec for RawBytesCodec {
    type Encode = Vec<u8>;
    type Decode = ExportTraceServiceRequest;
    type Encoder = RawEncoder;
    type Decoder = NothingDecoder<ExportTraceServiceRequest>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        NothingDecoder(PhantomData)
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<T: Default> tonic::codec::Decoder for NothingDecoder<T> {
    type Item = T;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        _src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<T>, tonic::Status> {
        Ok(Some(T::default()))
    }
}

#[tokio::test]
async fn malformed_grpc_payload_is_invalid_argument_and_the_next_request_works() {
    let r = start(&["traces"]).await;
    let channel = r.channel().await;
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let status = raw
        .unary(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff]),
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                .parse()
                .unwrap(),
            RawBytesCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut client = TraceServiceClient::new(channel);
    let request = ExportTraceServiceRequest {
        resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
            scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                spans: vec![opentelemetry_proto::tonic::trace::v1::Span {
                    name: "after".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    client.export(request).await.unwrap();
    assert_eq!(r.traces.span_names(), vec!["after"]);
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refusing_pipeline_makes_clients_retry() {
    let r = start(&["metrics"]).await;
    *r.metrics.refuse_with.lock().unwrap() = Some(ConsumeError::Retryable {
        reason: "queue_full",
        message: "pipeline queue is full".into(),
        retry_after: Some(Duration::from_secs(3)),
    });
    let mut client = MetricsServiceClient::connect(r.grpc.clone()).await.unwrap();
    let status = client.export(gauge_request(1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/metrics", r.http))
        .header("content-type", "application/x-protobuf")
        .body(prost::Message::encode_to_vec(&gauge_request(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");
    *r.metrics.refuse_with.lock().unwrap() = Some(ConsumeError::permanent("bad_data", "no"));
    assert_eq!(
        client.export(gauge_request(1)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    r.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_signal_without_pipeline_is_unimplemented_or_404() {
    let r = start(&["metrics"]).await;
    let mut client = TraceServiceClient::connect(r.grpc.clone()).await.unwrap();
    let status = client
        .export(ExportTraceServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/traces", r.http))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    r.receiver.shutdown().await.unwrap();
}

#[test]
fn config_protocols_like_the_collector() {
    let on: OtlpReceiverConfig =
        parse_component_config(serde_json::json!({"protocols": {"grpc": null}})).unwrap();
    assert_eq!(on.protocols.grpc.unwrap().endpoint, "0.0.0.0:4317");
    assert!(on.protocols.http.is_none());
    let errors = parse_component_config::<OtlpReceiverConfig>(serde_json::Value::Null).unwrap_err();
    assert_eq!(errors[0].path, "protocols");
    let errors = parse_component_config::<OtlpReceiverConfig>(
        serde_json::json!({"protocols": {"http": {"endpoint": "localhost"}}}),
    )
    .unwrap_err();
    assert_eq!(errors[0].path, "protocols.http.endpoint");
}

#[tokio::test]
async fn a_taken_port_fails_start_naming_the_endpoint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = taken.local_addr().unwrap().to_string();
    let config: OtlpReceiverConfig =
        parse_component_config(serde_json::json!({"protocols": {"grpc": {"endpoint": endpoint}}}))
            .unwrap();
    let receiver = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers::default(),
    );
    let error = format!("{:#}", receiver.start().await.unwrap_err());
    assert!(
        error.contains(&format!(
            "receivers.otlp.protocols.grpc.endpoint: cannot listen on {endpoint}"
        )),
        "{error}"
    );
}

#[tokio::test]
async fn a_grpc_call_still_sending_at_shutdown_is_told_to_retry_and_does_not_hold_shutdown() {
    let r = start(&["traces"]).await;
    let channel = r.channel().await;
    let mut stalled = tonic::client::Grpc::new(channel.clone());
    stalled.ready().await.unwrap();
    // A request whose message never comes.
    let call = tokio::spawn(async move {
        stalled
            .client_streaming(
                tonic::Request::new(futures::stream::pending::<Vec<u8>>()),
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                    .parse()
                    .unwrap(),
                RawBytesCodec,
            )
            .await
    });
    // A complete call on the same connection after it: the stalled one's headers went first.
    TraceServiceClient::new(channel)
        .export(ExportTraceServiceRequest::default())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), r.receiver.shutdown())
        .await
        .expect("shutdown does not wait for the stalled client")
        .unwrap();
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
