//! The OTLP exporters against podscope's own `otlp` receiver (exact round trips) and against
//! small HTTP servers that answer with the faults the exporter must handle.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_core::config::parse_component_config;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{
    Batch, BuildContext, Component as _, ComponentConfig, Exporter, ExporterBuilder,
    ReceiverConsumers,
};
use podscope_receiver::otlp::{OtlpReceiver, OtlpReceiverConfig};
use podscope_testkit::{BuildContextForTests as _, Recorder};

use super::{OtlpGrpcConfig, OtlpHttpConfig};

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The exporter `settings` describe (an `otlp` or `otlphttp` config), built as component `id`
/// and started, with its metrics.
async fn started<C: ComponentConfig + ExporterBuilder>(
    settings: serde_json::Value,
    id: &str,
) -> (Arc<dyn Exporter>, AgentTelemetry) {
    let config: C = parse_component_config(settings).unwrap();
    let ctx = BuildContext::for_tests(id);
    let telemetry = ctx.telemetry.clone();
    let exporter = Box::new(config).build(ctx).unwrap();
    exporter.start().await.unwrap();
    (exporter, telemetry)
}

/// A started `otlp` exporter to `127.0.0.1:port` retrying every 50 to 200 ms, and its metrics.
async fn fast_retrying_exporter_to(port: u16) -> (Arc<dyn Exporter>, AgentTelemetry) {
    started::<OtlpGrpcConfig>(
        serde_json::json!({
            "endpoint": format!("http://127.0.0.1:{port}"),
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms", "randomization_factor": 0.0}
        }),
        "otlp",
    )
    .await
}

fn spans() -> Batch {
    Batch::traces(vec![ResourceSpans {
        scope_spans: vec![ScopeSpans {
            spans: vec![Span {
                name: "GET /cart".into(),
                trace_id: vec![7; 16],
                span_id: vec![1; 8],
                start_time_unix_nano: 10,
                end_time_unix_nano: 20,
                attributes: vec![KeyValue {
                    key: "k".into(),
                    key_strindex: 0,
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(3)),
                    }),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

fn points() -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "g".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        time_unix_nano: 5,
                        value: Some(number_data_point::Value::AsDouble(1.5)),
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

async fn receiver() -> (OtlpReceiver, Arc<Recorder>, Arc<Recorder>) {
    let config: OtlpReceiverConfig = parse_component_config(serde_json::json!({"protocols": {
        "grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}}))
    .unwrap();
    let (m, t) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let r = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers {
            metrics: Some(m.clone()),
            traces: Some(t.clone()),
            profiles: None,
            logs: None,
        },
    );
    r.start().await.unwrap();
    (r, m, t)
}

#[tokio::test]
async fn grpc_round_trip_is_exact() {
    let (r, m, t) = receiver().await;
    let endpoint = format!("http://{}", r.bound_addresses().grpc.unwrap());
    let config: OtlpGrpcConfig = parse_component_config(
        serde_json::json!({"endpoint": endpoint, "headers": {"x-tenant": "a"}}),
    )
    .unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("otlp"))
        .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans()).await.unwrap();
    exporter.consume(points()).await.unwrap();
    exporter.shutdown().await.unwrap(); // drains the sending queue
    assert_eq!(t.batches(), vec![spans()]);
    assert_eq!(m.batches(), vec![points()]);
    r.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_round_trip_is_exact_in_protobuf_and_json() {
    let (r, m, t) = receiver().await;
    let base = format!("http://{}", r.bound_addresses().http.unwrap());
    for encoding in ["proto", "json"] {
        let config: OtlpHttpConfig =
            parse_component_config(serde_json::json!({"endpoint": base, "encoding": encoding}))
                .unwrap();
        let exporter = Box::new(config)
            .build(BuildContext::for_tests("otlphttp"))
            .unwrap();
        exporter.start().await.unwrap();
        exporter.consume(spans()).await.unwrap();
        exporter.consume(points()).await.unwrap();
        exporter.shutdown().await.unwrap();
    }
    assert_eq!(t.batches(), vec![spans(), spans()]);
    assert_eq!(m.batches(), vec![points(), points()]);
    r.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_backend_down_at_start_gets_the_queued_data_once_it_is_up() {
    let port = free_port();
    let (exporter, telemetry) = fast_retrying_exporter_to(port).await;
    exporter.consume(spans()).await.unwrap(); // queued while nothing listens
    let failed = "podscope_exporter_send_failures_total{component=\"otlp\",reason=\"unavailable\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !telemetry.encode_text().contains(failed) {
        assert!(
            Instant::now() < deadline,
            "no failed attempt while the backend was down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Bring the backend up on that port.
    let config: OtlpReceiverConfig = parse_component_config(
        serde_json::json!({"protocols": {"grpc": {"endpoint": format!("127.0.0.1:{port}")}}}),
    )
    .unwrap();
    let collected = Arc::new(Recorder::default());
    let r = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers {
            metrics: None,
            traces: Some(collected.clone()),
            profiles: None,
            logs: None,
        },
    );
    r.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while collected.is_empty() {
        assert!(Instant::now() < deadline, "queued spans never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exporter.shutdown().await.unwrap();
    assert_eq!(collected.batches(), vec![spans()]);
    let text = telemetry.encode_text();
    assert!(
        text.contains("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 1"),
        "{text}"
    );
    r.shutdown().await.unwrap();
}

/// An OTLP/HTTP endpoint answering from a script of statuses, then 200.
async fn scripted_http(
    script: Vec<(u16, Option<&'static str>)>,
) -> (String, Arc<Mutex<Vec<Instant>>>) {
    use axum::http::StatusCode;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter().rev().collect::<Vec<_>>()));
    let seen = attempts.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move || {
            let seen = seen.clone();
            let script = script.clone();
            async move {
                seen.lock().unwrap().push(Instant::now());
                let (status, retry_after) = script.lock().unwrap().pop().unwrap_or((200, None));
                let mut response = axum::response::IntoResponse::into_response((
                    StatusCode::from_u16(status).unwrap(),
                    "scripted",
                ));
                if let Some(v) = retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", v.parse().unwrap());
                }
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, attempts)
}

#[tokio::test]
async fn http_429_with_retry_after_is_honoured_and_400_is_not_retried() {
    let (address, attempts) = scripted_http(vec![(429, Some("1")), (400, None)]).await;
    let (exporter, telemetry) = started::<OtlpHttpConfig>(
        serde_json::json!({
            "endpoint": address,
            "sending_queue": {"enabled": false},
            "retry_on_failure": {"initial_interval": "10ms", "max_interval": "10ms", "randomization_factor": 0.0}
        }),
        "otlphttp",
    )
    .await;
    // 429 (wait the 1 s it asks for, not the 10 ms backoff) → 400: permanent, not retried.
    exporter.consume(spans()).await.unwrap();
    assert!(telemetry.encode_text().contains(
        "podscope_exporter_dropped_items_total{component=\"otlphttp\",signal=\"traces\",reason=\"http_400\"} 1"
    ));
    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 2, "one retry after 429, none after 400");
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        times[1] - times[0]
    );
    exporter.consume(spans()).await.unwrap();
    assert_eq!(attempts.lock().unwrap().len(), 3);
}

#[test]
fn status_classification_follows_the_specification() {
    use tonic::Code;
    for (code, retryable) in [
        (Code::Unavailable, true),
        (Code::ResourceExhausted, false),
        (Code::DeadlineExceeded, true),
        (Code::Aborted, true),
        (Code::InvalidArgument, false),
        (Code::Unauthenticated, false),
        (Code::Internal, false),
    ] {
        assert_eq!(
            super::classify_grpc_status(&tonic::Status::new(code, "x")).is_retryable(),
            retryable,
            "{code:?}"
        );
    }
    for (status, retryable) in [
        (429, true),
        (502, true),
        (503, true),
        (504, true),
        (400, false),
        (401, false),
        (500, false),
    ] {
        assert_eq!(
            super::is_retryable_http_status(status),
            retryable,
            "{status}"
        );
    }
}

#[test]
fn endpoints_and_tls_settings_are_validated() {
    let errors = parse_component_config::<OtlpGrpcConfig>(serde_json::json!({
        "endpoint": "no-port", "tls": {"cert_file": "/nonexistent.pem"}
    }))
    .unwrap_err();
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["endpoint", "tls", "tls.cert_file"]);
    let config: OtlpGrpcConfig =
        parse_component_config(serde_json::json!({"endpoint": "collector:4317"})).unwrap();
    assert_eq!(
        config.url(),
        ("https://collector:4317".to_string(), true),
        "bare host:port means TLS, as in the Collector"
    );
    let config: OtlpGrpcConfig = parse_component_config(
        serde_json::json!({"endpoint": "collector:4317", "tls": {"insecure": true}}),
    )
    .unwrap();
    assert_eq!(config.url(), ("http://collector:4317".to_string(), false));
}

mod tls {
    //! TLS and mutual TLS against a tonic OTLP server with certificates from a test CA.

    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

    #[derive(Default, Clone)]
    struct RecordingTraceServer(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for RecordingTraceServer {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    struct Pki {
        dir: tempfile::TempDir,
        ca_pem: String,
        server: (String, String),
    }

    fn pki() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "podscope test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec![name.to_string()]).unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = leaf("localhost");
        let client = leaf("podscope-client");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), &client.0).unwrap();
        std::fs::write(dir.path().join("client.key"), &client.1).unwrap();
        Pki {
            dir,
            ca_pem: ca_cert.pem(),
            server,
        }
    }

    async fn tls_server(pki: &Pki, require_client_cert: bool) -> (u16, RecordingTraceServer) {
        let recorder = RecordingTraceServer::default();
        let mut tls =
            ServerTlsConfig::new().identity(Identity::from_pem(&pki.server.0, &pki.server.1));
        if require_client_cert {
            tls = tls.client_ca_root(Certificate::from_pem(&pki.ca_pem));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = TraceServiceServer::new(recorder.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(async move {
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap()
        });
        (port, recorder)
    }

    /// Whether one export went through (with no retries, a failure is dropped at once).
    async fn export_once(config: serde_json::Value) -> Result<(), String> {
        let (exporter, telemetry) = started::<OtlpGrpcConfig>(config, "otlp").await;
        exporter.consume(spans()).await.unwrap();
        let text = telemetry.encode_text();
        if text
            .contains("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 1")
        {
            Ok(())
        } else {
            Err(text)
        }
    }

    #[tokio::test]
    async fn tls_with_a_test_ca_and_mutual_tls() {
        let pki = pki();
        let path = |f: &str| pki.dir.path().join(f).display().to_string();
        let no_retry = serde_json::json!({"enabled": false});

        let (port, recorder) = tls_server(&pki, false).await;
        export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"), "tls": {"ca_file": path("ca.pem")},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await
        .unwrap();
        assert_eq!(
            recorder.0.lock().unwrap().len(),
            1,
            "TLS, server verified against the test CA"
        );

        // Without the CA the server's certificate is not trusted.
        let untrusted = export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"),
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await;
        assert!(untrusted.is_err());

        let (port, recorder) = tls_server(&pki, true).await;
        let without_client_cert = export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"), "tls": {"ca_file": path("ca.pem")},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await;
        assert!(
            without_client_cert.is_err(),
            "mTLS server refuses a client without a certificate"
        );
        export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"),
            "tls": {"ca_file": path("ca.pem"), "cert_file": path("client.pem"), "key_file": path("client.key")},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await
        .unwrap();
        assert_eq!(recorder.0.lock().unwrap().len(), 1, "mutual TLS");
    }

    #[tokio::test]
    async fn insecure_skip_verify_trusts_any_server_certificate() {
        let pki = pki();
        let path = |f: &str| pki.dir.path().join(f).display().to_string();
        let no_retry = serde_json::json!({"enabled": false});
        let (port, recorder) = tls_server(&pki, false).await;
        // No CA given: only skipping verification lets the export through.
        export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"), "tls": {"insecure_skip_verify": true},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await
        .unwrap();
        assert_eq!(recorder.0.lock().unwrap().len(), 1);
        // And it still presents a client certificate to a server that requires one.
        let (port, recorder) = tls_server(&pki, true).await;
        let without_client_cert = export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"), "tls": {"insecure_skip_verify": true},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await;
        assert!(without_client_cert.is_err());
        export_once(serde_json::json!({
            "endpoint": format!("localhost:{port}"),
            "tls": {"insecure_skip_verify": true, "cert_file": path("client.pem"), "key_file": path("client.key")},
            "sending_queue": {"enabled": false}, "retry_on_failure": no_retry
        }))
        .await
        .unwrap();
        assert_eq!(recorder.0.lock().unwrap().len(), 1);
    }
}

fn spans_n(n: usize) -> Batch {
    podscope_testkit::fake_otlp::spans(n, &[])
}

async fn grpc_receiver_on(port: u16) -> (OtlpReceiver, Arc<Recorder>) {
    let config: OtlpReceiverConfig = parse_component_config(
        serde_json::json!({"protocols": {"grpc": {"endpoint": format!("127.0.0.1:{port}")}}}),
    )
    .unwrap();
    let collected = Arc::new(Recorder::default());
    let r = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers {
            metrics: None,
            traces: Some(collected.clone()),
            profiles: None,
            logs: None,
        },
    );
    r.start().await.unwrap();
    (r, collected)
}

#[tokio::test]
async fn a_backend_down_mid_stream_gets_what_was_queued_and_overflow_is_counted() {
    let port = free_port();
    let (first, before) = grpc_receiver_on(port).await;
    let (exporter, telemetry) = started::<OtlpGrpcConfig>(
        serde_json::json!({
            "endpoint": format!("http://127.0.0.1:{port}"),
            "sending_queue": {"queue_size": 100, "num_consumers": 1, "when_full": "drop_newest"},
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms", "randomization_factor": 0.0, "max_elapsed_time": "0s"}
        }),
        "otlp",
    )
    .await;
    exporter.consume(spans_n(10)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while before.items() < 10 {
        assert!(Instant::now() < deadline, "first batch never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.shutdown().await.unwrap();

    // Down: one batch is taken by the sender and retried; the queue holds 100 more; the rest overflow.
    exporter.consume(spans_n(50)).await.unwrap();
    let failed = "podscope_exporter_send_failures_total{component=\"otlp\",reason=\"unavailable\"}";
    while !telemetry.encode_text().contains(failed) {
        assert!(
            Instant::now() < deadline,
            "no failed attempt while the backend was down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        exporter.consume(spans_n(50)).await.unwrap(); // 2 fit in the queue, 1 overflows
    }
    assert!(
        telemetry.encode_text().contains(
            "podscope_queue_dropped_items_total{queue=\"exporter/otlp\",signal=\"traces\"} 50"
        ),
        "{}",
        telemetry.encode_text()
    );

    let (second, after) = grpc_receiver_on(port).await;
    while after.items() < 150 {
        assert!(
            Instant::now() < deadline,
            "queued spans never arrived: {}",
            after.items()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    exporter.shutdown().await.unwrap();
    assert_eq!(
        after.items(),
        150,
        "the retried batch and the two queued ones, nothing else"
    );
    second.shutdown().await.unwrap();
}

mod backend_dies_mid_request {
    //! A real OTLP/gRPC server (opentelemetry-proto's generated trace service on tonic) that dies
    //! while it holds an Export call, then comes back on the same port: the batch in flight is
    //! retried, not dropped.

    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    /// Records each request; with `hang`, signals its arrival and never answers.
    #[derive(Clone)]
    struct Backend {
        received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        hang: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    }

    #[tonic::async_trait]
    impl TraceService for Backend {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            if let Some(arrived) = &self.hang {
                let _ = arrived.send(());
                std::future::pending::<()>().await;
            }
            self.received.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves `backend` on `port` in a runtime of its own, so that dropping the runtime kills
    /// the server and every connection it holds, as a process exit would.
    fn serve(port: u16, backend: Backend) -> tokio::runtime::Runtime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let _context = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(backend)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        drop(_context);
        runtime
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_connection_is_reset_is_retried_on_the_new_server() {
        let port = free_port();
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
        let dying = serve(
            port,
            Backend {
                received: Arc::default(),
                hang: Some(arrived_tx),
            },
        );
        let (exporter, telemetry) = fast_retrying_exporter_to(port).await;
        exporter.consume(spans_n(5)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), arrived.recv())
            .await
            .expect("the export reaches the first server");
        // The server dies inside Export; a new one takes its port.
        tokio::task::spawn_blocking(move || drop(dying))
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let revived = serve(
            port,
            Backend {
                received: received.clone(),
                hang: None,
            },
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the batch never reached the new server: {}",
                telemetry.encode_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exporter.shutdown().await.unwrap();
        let spans: usize = received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        assert_eq!(spans, 5);
        let text = telemetry.encode_text();
        assert!(
            text.contains(
                "podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 5"
            ),
            "{text}"
        );
        assert!(
            !text.contains("podscope_exporter_dropped_items_total"),
            "{text}"
        );
        tokio::task::spawn_blocking(move || drop(revived))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_retry_after_in_the_past_or_of_zero_never_retries_faster_than_the_initial_interval() {
    let (address, attempts) = scripted_http(vec![
        (503, Some("Thu, 01 Jan 1970 00:00:00 GMT")),
        (429, Some("0")),
    ])
    .await;
    let config: OtlpHttpConfig = parse_component_config(serde_json::json!({
        "endpoint": address,
        "sending_queue": {"enabled": false},
        "retry_on_failure": {"initial_interval": "300ms", "max_interval": "300ms", "randomization_factor": 0.0}
    }))
    .unwrap();
    let exporter = Box::new(config)
        .build(BuildContext::for_tests("otlphttp"))
        .unwrap();
    exporter.start().await.unwrap();
    exporter.consume(spans()).await.unwrap();
    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 3, "two refusals, then accepted");
    for gap in times.windows(2).map(|w| w[1] - w[0]) {
        assert!(gap >= Duration::from_millis(300), "retried after {gap:?}");
    }
}

mod partial_success {
    //! A backend that keeps a request but rejects some of its items: those are dropped, the rest
    //! sent, and the two add up to what was exported.

    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message as _;

    fn rejecting_two() -> ExportTraceServiceResponse {
        ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 2,
                error_message: "two spans are too old".into(),
            }),
        }
    }

    struct RejectsTwo;

    #[tonic::async_trait]
    impl TraceService for RejectsTwo {
        async fn export(
            &self,
            _request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(rejecting_two()))
        }
    }

    fn counted(text: &str) -> (bool, bool) {
        let prefix = |signal_line: &str| text.lines().any(|l| l == signal_line);
        (
            prefix("podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 3"),
            prefix("podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"rejected\"} 2"),
        )
    }

    #[tokio::test]
    async fn rejected_items_are_dropped_and_the_rest_sent_over_grpc_and_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(RejectsTwo)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(|| async {
                (
                    [("content-type", "application/x-protobuf")],
                    rejecting_two().encode_to_vec(),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        for (kind, endpoint) in [
            ("grpc", format!("http://{grpc}")),
            ("http", format!("http://{http}")),
        ] {
            let settings =
                serde_json::json!({"endpoint": endpoint, "sending_queue": {"enabled": false}});
            let (exporter, telemetry) = if kind == "grpc" {
                started::<OtlpGrpcConfig>(settings, "otlp").await
            } else {
                started::<OtlpHttpConfig>(settings, "otlp").await
            };
            exporter.consume(spans_n(5)).await.unwrap();
            exporter.shutdown().await.unwrap();
            let text = telemetry.encode_text();
            assert_eq!(counted(&text), (true, true), "{kind}: {text}");
        }
    }
}

mod persistent_queue {
    //! `sending_queue.storage`: what the exporter acknowledged survives a crash (its runtime
    //! dropped without shutdown, as a SIGKILL would leave it) and reaches a real OTLP/gRPC
    //! server (opentelemetry-proto's trace service on tonic) after the next start, in order.

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::file_storage::{FileStorage, FileStorageConfig, StorageMetrics};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use podscope_core::{ComponentId, ComponentKind, Extensions};

    /// Spans per request, in arrival order.
    #[derive(Clone, Default)]
    struct Backend(Arc<Mutex<Vec<usize>>>);

    #[tonic::async_trait]
    impl TraceService for Backend {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.lock().unwrap().push(spans);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn serve(runtime: &tokio::runtime::Runtime, port: u16, backend: Backend) {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let _context = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(backend)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
    }

    /// An `otlp` exporter to `port` keeping its queue in `dir` (a `file_storage` of
    /// `max_size_mib`), started, with its metrics.
    async fn stored_exporter(
        port: u16,
        dir: &Path,
        max_size_mib: u64,
    ) -> (Arc<dyn Exporter>, AgentTelemetry) {
        let mut ctx = BuildContext::for_tests("otlp");
        let storage = FileStorage::open(
            FileStorageConfig {
                directory: dir.to_path_buf(),
                max_size_mib,
                ..Default::default()
            },
            "file_storage",
            StorageMetrics::shared(&ctx.shared, &ctx.telemetry).unwrap(),
        )
        .unwrap();
        let storage_id = ComponentId::parse("file_storage").unwrap();
        let mut extensions = Extensions::default();
        extensions.insert(storage_id.clone(), Arc::new(storage));
        extensions.add_user(ComponentKind::Exporter, ctx.id.clone(), storage_id);
        ctx.extensions = extensions;
        let telemetry = ctx.telemetry.clone();
        let config: OtlpGrpcConfig = parse_component_config(serde_json::json!({
            "endpoint": format!("http://127.0.0.1:{port}"),
            "sending_queue": {"num_consumers": 1, "storage": "file_storage"},
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms", "randomization_factor": 0.0, "max_elapsed_time": "0s"}
        }))
        .unwrap();
        let exporter = Box::new(config).build(ctx).unwrap();
        exporter.start().await.unwrap();
        (exporter, telemetry)
    }

    fn queue_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("exporter_otlp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        files.sort();
        files
    }

    /// Accepts `sizes` batches with the backend down, then dies without shutdown; returns its
    /// metrics just before.
    fn accept_and_crash(port: u16, dir: &Path, sizes: &[usize]) -> String {
        let crashing = runtime();
        let metrics = crashing.block_on(async {
            let (exporter, telemetry) = stored_exporter(port, dir, 1024).await;
            for &n in sizes {
                exporter.consume(spans_n(n)).await.unwrap();
            }
            // Each retried at least once: nothing was sent before the crash.
            let failed =
                "podscope_exporter_send_failures_total{component=\"otlp\",reason=\"unavailable\"}";
            while !telemetry.encode_text().contains(failed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            telemetry.encode_text()
        });
        drop(crashing);
        metrics
    }

    /// The `file_storage` gauges of the `otlp` exporter's traces in `metrics`: bytes, requests,
    /// items.
    fn held(metrics: &str) -> [Option<u64>; 3] {
        let labels = r#"{storage="file_storage",queue="exporter/otlp",signal="traces"} "#;
        ["bytes", "requests", "items"].map(|gauge| {
            let series = format!("podscope_file_storage_{gauge}{labels}");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|value| value.parse().unwrap())
        })
    }

    /// Starts the exporter again with the backend up; returns what the backend got once it
    /// got `items` spans, and the exporter's metrics.
    fn restart_and_collect(port: u16, dir: &Path, items: usize) -> (Vec<usize>, String) {
        let backend = Backend::default();
        let server = runtime();
        serve(&server, port, backend.clone());
        let agent = runtime();
        let metrics = agent.block_on(async {
            let (exporter, telemetry) = stored_exporter(port, dir, 1024).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while backend.0.lock().unwrap().iter().sum::<usize>() < items {
                assert!(
                    Instant::now() < deadline,
                    "stored spans never arrived: {:?} {}",
                    backend.0.lock().unwrap(),
                    telemetry.encode_text()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            exporter.shutdown().await.unwrap();
            telemetry.encode_text()
        });
        let received = backend.0.lock().unwrap().clone();
        (received, metrics)
    }

    #[test]
    fn a_crash_with_the_backend_down_loses_nothing_and_the_next_start_sends_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let before = accept_and_crash(port, dir.path(), &[1, 2, 3, 4, 5]);
        let files = queue_files(dir.path(), "req");
        assert_eq!(files.len(), 5);
        let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        assert_eq!(held(&before), [Some(bytes), Some(5), Some(15)]);

        let (received, metrics) = restart_and_collect(port, dir.path(), 15);
        // Counted from the files found at start, then released as each was sent.
        assert_eq!(held(&metrics), [Some(0), Some(0), Some(0)], "{metrics}");
        assert_eq!(received, vec![1, 2, 3, 4, 5], "each once, oldest first");
        assert!(metrics.contains(
            "podscope_exporter_sent_items_total{component=\"otlp\",signal=\"traces\"} 15"
        ));
        assert!(
            !metrics.contains("podscope_exporter_dropped_items_total{"),
            "{metrics}"
        );
        assert!(queue_files(dir.path(), "req").is_empty(), "sent: deleted");
    }

    #[test]
    fn a_corrupt_queue_file_is_skipped_counted_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        accept_and_crash(port, dir.path(), &[1, 2, 3]);
        let files = queue_files(dir.path(), "req");
        let mut bytes = std::fs::read(&files[1]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&files[1], bytes).unwrap();

        let (received, metrics) = restart_and_collect(port, dir.path(), 4);
        assert_eq!(received, vec![1, 3]);
        assert!(
            metrics.contains(
                "podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"corrupt\"} 2"
            ),
            "{metrics}"
        );
        assert_eq!(
            queue_files(dir.path(), "corrupt"),
            vec![files[1].with_extension("corrupt")]
        );
        let labels = r#"{storage="file_storage",queue="exporter/otlp",signal="traces"}"#;
        for expected in [
            format!("podscope_file_storage_corrupt_requests_total{labels} 1"),
            // The other two sent and deleted: nothing held.
            format!("podscope_file_storage_requests{labels} 0"),
            format!("podscope_file_storage_bytes{labels} 0"),
        ] {
            assert!(
                metrics.lines().any(|l| l == expected),
                "{expected}: {metrics}"
            );
        }
    }

    #[test]
    fn past_the_size_limit_requests_are_dropped_and_counted_and_the_exporter_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let agent = runtime();
        let backend = Backend::default();
        let server = runtime();
        agent.block_on(async {
            let (exporter, telemetry) = stored_exporter(port, dir.path(), 1).await;
            // About 90 KiB each on disk: eleven fit in 1 MiB, the rest do not.
            for _ in 0..20 {
                exporter.consume(spans_n(500)).await.unwrap();
            }
            let metrics = telemetry.encode_text();
            let dropped = "podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"storage_full\"} ";
            let line = metrics
                .lines()
                .find(|l| l.starts_with(dropped))
                .unwrap_or_else(|| panic!("no storage_full drops: {metrics}"));
            let dropped: usize = line[dropped.len()..].parse().unwrap();
            let stored = queue_files(dir.path(), "req").len() * 500;
            assert!(dropped > 0 && stored > 0, "{dropped} dropped, {stored} stored");
            assert_eq!(dropped + stored, 20 * 500);
            let used: u64 = queue_files(dir.path(), "req")
                .iter()
                .map(|f| f.metadata().unwrap().len())
                .sum();
            assert!(used <= 1024 * 1024, "{used} bytes on disk");
            let labels = r#"{storage="file_storage",queue="exporter/otlp",signal="traces"}"#;
            let files = queue_files(dir.path(), "req").len();
            for expected in [
                format!("podscope_file_storage_bytes{labels} {used}"),
                format!("podscope_file_storage_requests{labels} {files}"),
                format!("podscope_file_storage_items{labels} {stored}"),
            ] {
                assert!(metrics.lines().any(|l| l == expected), "{expected}: {metrics}");
            }

            // Still running: the backend comes up and gets exactly what was stored.
            serve(&server, port, backend.clone());
            let deadline = Instant::now() + Duration::from_secs(20);
            while backend.0.lock().unwrap().iter().sum::<usize>() < stored {
                assert!(Instant::now() < deadline, "stored spans never arrived: {:?}", backend.0.lock().unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            exporter.shutdown().await.unwrap();
            assert_eq!(backend.0.lock().unwrap().iter().sum::<usize>(), stored);
        });
    }
}
