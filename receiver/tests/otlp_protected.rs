//! The `otlp` receiver behind TLS with client certificates and authentication, driven by clients
//! we did not write: tonic's TLS channel with the generated OTLP client (and a bearer token),
//! and curl over HTTPS (with basic auth). Certificates are made per test (rcgen); rotating them
//! (`reload_interval`) is checked with rustls clients that compare the certificate presented.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, ReceiverConsumers};
use podscope_integration::certs::{
    presented_certificate, CertificateRotation, KeptHttpsConnection, TestPki,
};
use podscope_receiver::otlp::{OtlpReceiver, OtlpReceiverConfig};
use podscope_testkit::{agent_metric, BuildContextForTests as _, Recorder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TOKEN: &str = "otlp-token-1234";

fn request(points: u64) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "protected.gauge".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: (0..points)
                            .map(|i| NumberDataPoint {
                                time_unix_nano: i + 1,
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
        }],
    }
}

struct Protected {
    receiver: OtlpReceiver,
    metrics: Arc<Recorder>,
    grpc_port: u16,
    http_port: u16,
}

async fn start(pki: &TestPki, dir: &Path) -> Protected {
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let hash = bcrypt::hash("hunter2", 4).unwrap();
    let config = serde_json::json!({
        "protocols": {
            "grpc": {
                "endpoint": "127.0.0.1:0",
                "tls": {
                    "cert_file": pki.server_cert_file,
                    "key_file": pki.server_key_file,
                    "client_ca_file": pki.ca_file,
                },
                "auth": {"bearer_token_file": token_file},
            },
            "http": {
                "endpoint": "127.0.0.1:0",
                "tls": {"cert_file": pki.server_cert_file, "key_file": pki.server_key_file},
                "auth": {"basic_auth_users": {"sender": hash}},
            },
        }
    });
    let config = parse_component_config::<OtlpReceiverConfig>(config).expect("valid config");
    let metrics = Arc::new(Recorder::default());
    let next = ReceiverConsumers {
        metrics: Some(metrics.clone()),
        ..Default::default()
    };
    let receiver = OtlpReceiver::new(config, &BuildContext::for_tests("otlp"), next);
    receiver.start().await.unwrap();
    let bound = receiver.bound_addresses();
    Protected {
        grpc_port: bound.grpc.unwrap().port(),
        http_port: bound.http.unwrap().port(),
        receiver,
        metrics,
    }
}

fn tls(pki: &TestPki, client: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca_file).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    tls
}

async fn connect(port: u16, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn with_token(token: &'static str) -> impl tonic::service::Interceptor {
    move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Ok(request)
    }
}

#[tokio::test]
async fn grpc_over_mutual_tls_with_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let running = start(&pki, dir.path()).await;
    let port = running.grpc_port;
    let client_identity = Some((
        pki.client_cert_file.as_path(),
        pki.client_key_file.as_path(),
    ));

    // Client certificate and token: accepted, every point delivered.
    let channel = connect(port, tls(&pki, client_identity)).await.unwrap();
    let mut client = MetricsServiceClient::with_interceptor(channel.clone(), with_token(TOKEN));
    client.export(request(5)).await.unwrap();
    assert_eq!(running.metrics.items(), 5);

    // A wrong token, or none: UNAUTHENTICATED, nothing delivered.
    let mut wrong = MetricsServiceClient::with_interceptor(channel.clone(), with_token("nope"));
    let status = wrong.export(request(3)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "invalid bearer token");
    let status = MetricsServiceClient::new(channel)
        .export(request(3))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "authorization required");

    // No client certificate, or one from another CA: the handshake fails.
    for identity in [
        None,
        Some((
            pki.stranger_cert_file.as_path(),
            pki.stranger_key_file.as_path(),
        )),
    ] {
        let refused = match connect(port, tls(&pki, identity)).await {
            Err(_) => true,
            Ok(channel) => MetricsServiceClient::with_interceptor(channel, with_token(TOKEN))
                .export(request(3))
                .await
                .is_err(),
        };
        assert!(refused, "a client without a valid certificate was served");
    }
    assert_eq!(running.metrics.items(), 5);
    running.receiver.shutdown().await.unwrap();
}

fn curl(args: &[&str]) -> (String, String) {
    let output = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        String::from_utf8_lossy(&output.stdout).to_lowercase(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls_with_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let running = start(&pki, dir.path()).await;
    let url = format!("https://localhost:{}/v1/metrics", running.http_port);
    let body = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m","gauge":{"dataPoints":[{"asInt":"1"},{"asInt":"2"},{"asInt":"3"}]}}]}]}]}"#;
    let ca = pki.ca_file.to_str().unwrap().to_string();

    let answers = tokio::task::spawn_blocking(move || {
        let common = [
            "--cacert",
            &ca,
            "-H",
            "Content-Type: application/json",
            "--data",
            body,
        ];
        let with = |extra: &[&str]| {
            let mut args: Vec<&str> = common.to_vec();
            args.extend_from_slice(extra);
            args.push(&url);
            curl(&args)
        };
        (
            with(&["-u", "sender:hunter2"]),
            with(&[]),
            with(&["-u", "sender:wrong"]),
        )
    })
    .await
    .unwrap();
    let (accepted, anonymous, wrong) = answers;
    assert!(accepted.0.starts_with("http/1.1 200"), "{accepted:?}");
    assert_eq!(running.metrics.items(), 3);
    for (refused, message) in [
        (anonymous, "authorization required"),
        (wrong, "invalid user name or password"),
    ] {
        assert!(refused.0.starts_with("http/1.1 401"), "{refused:?}");
        assert!(
            refused
                .0
                .contains("\r\nwww-authenticate: basic realm=\"podscope\", charset=\"utf-8\"\r\n"),
            "{refused:?}"
        );
        assert!(refused.0.contains(message), "{refused:?}");
    }
    assert_eq!(running.metrics.items(), 3);

    // Plain HTTP to the TLS port is not served.
    let plain = format!("http://127.0.0.1:{}/v1/metrics", running.http_port);
    let (out, _) = tokio::task::spawn_blocking(move || curl(&["--data", "x", &plain]))
        .await
        .unwrap();
    assert!(!out.contains("200 ok"), "{out}");
    running.receiver.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_start_naming_the_setting_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let not_a_cert = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_a_cert, "hello").unwrap();
    let config = serde_json::json!({"protocols": {"grpc": {
        "endpoint": "127.0.0.1:0",
        "tls": {"cert_file": not_a_cert, "key_file": pki.server_key_file},
    }}});
    let config = parse_component_config::<OtlpReceiverConfig>(config).expect("the file exists");
    let receiver = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers::default(),
    );
    let error = format!("{:#}", receiver.start().await.unwrap_err());
    assert_eq!(
        error,
        format!(
            "receivers.otlp.protocols.grpc.tls.cert_file: {}: no PEM certificate in it",
            not_a_cert.display()
        )
    );

    // A missing file, likewise.
    let missing = serde_json::json!({"protocols": {"http": {
        "endpoint": "127.0.0.1:0",
        "tls": {"cert_file": "/nonexistent/server.pem", "key_file": pki.server_key_file},
    }}});
    let config = parse_component_config::<OtlpReceiverConfig>(missing).unwrap();
    let receiver = OtlpReceiver::new(
        config,
        &BuildContext::for_tests("otlp"),
        ReceiverConsumers::default(),
    );
    let error = format!("{:#}", receiver.start().await.unwrap_err());
    assert!(
        error.starts_with(
            "receivers.otlp.protocols.http.tls.cert_file: /nonexistent/server.pem: cannot read PEM certificates"
        ),
        "{error}"
    );
}

/// Polls `condition` every 50 ms until it holds, failing the test after `deadline`.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> F,
) {
    let give_up = tokio::time::Instant::now() + deadline;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_presented_to_new_connections_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut rotation = CertificateRotation::new(dir.path());
    let (a, b) = (rotation.a.clone(), rotation.b.clone());
    assert_ne!(a, b);
    let ca_file = rotation.pki.ca_file.clone();
    let rotating = serde_json::json!({
        "cert_file": rotation.volume.cert_file(),
        "key_file": rotation.volume.key_file(),
        "reload_interval": "100ms",
    });
    let config = serde_json::json!({"protocols": {
        "grpc": {"endpoint": "127.0.0.1:0", "tls": rotating},
        "http": {"endpoint": "127.0.0.1:0", "tls": rotating},
    }});
    let config = parse_component_config::<OtlpReceiverConfig>(config).expect("valid config");
    let ctx = BuildContext::for_tests("otlp");
    let telemetry = ctx.telemetry.clone();
    let metrics = Arc::new(Recorder::default());
    let next = ReceiverConsumers {
        metrics: Some(metrics.clone()),
        ..Default::default()
    };
    let receiver = OtlpReceiver::new(config, &ctx, next);
    receiver.start().await.unwrap();
    let bound = receiver.bound_addresses();
    let endpoints = [
        (
            bound.grpc.unwrap(),
            &b"h2"[..],
            "receivers.otlp.protocols.grpc",
        ),
        (
            bound.http.unwrap(),
            &b"http/1.1"[..],
            "receivers.otlp.protocols.http",
        ),
    ];
    let presented = |addr, alpn: &'static [u8]| {
        let ca = ca_file.clone();
        async move { presented_certificate(addr, &ca, alpn).await.unwrap() }
    };
    for (addr, alpn, _) in endpoints {
        assert_eq!(presented(addr, alpn).await, a);
    }
    let body = br#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m","gauge":{"dataPoints":[{"asInt":"1"},{"asInt":"2"}]}}]}]}]}"#;
    let mut kept = KeptHttpsConnection::open(bound.http.unwrap(), &ca_file)
        .await
        .unwrap();
    assert_eq!(kept.certificate, a);
    let (status, _) = kept
        .request("POST", "/v1/metrics", "application/json", body)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(metrics.items(), 2);

    // Both files replaced at once, as a Secret update does: new handshakes get B.
    rotation.rotate_to_b();
    for (addr, alpn, endpoint) in endpoints {
        until(
            &format!("{endpoint} to present the new certificate"),
            Duration::from_secs(20),
            || async { presented(addr, alpn).await == b },
        )
        .await;
        let reloads = format!("podscope_server_tls_reloads_total{{endpoint=\"{endpoint}\"}}");
        assert_eq!(agent_metric(&telemetry, &reloads), Some(1.0), "{endpoint}");
    }
    // gRPC is served with B: a new channel, trusting the CA, exports.
    let channel = connect(bound.grpc.unwrap().port(), tls(&rotation.pki, None))
        .await
        .unwrap();
    MetricsServiceClient::new(channel)
        .export(request(3))
        .await
        .unwrap();
    assert_eq!(metrics.items(), 5);

    // A broken pair (the certificate file is not PEM): logged, counted once, B stays.
    let b_key = std::fs::read(&rotation.b_key_file).unwrap();
    rotation.volume.replace(b"not a certificate\n", &b_key);
    for (addr, alpn, endpoint) in endpoints {
        let failures =
            format!("podscope_server_tls_reload_failures_total{{endpoint=\"{endpoint}\"}}");
        until(
            &format!("{endpoint} to count the broken pair"),
            Duration::from_secs(20),
            || async { agent_metric(&telemetry, &failures) != Some(0.0) },
        )
        .await;
        assert_eq!(presented(addr, alpn).await, b, "{endpoint}");
        assert_eq!(agent_metric(&telemetry, &failures), Some(1.0), "{endpoint}");
        let reloads = format!("podscope_server_tls_reloads_total{{endpoint=\"{endpoint}\"}}");
        assert_eq!(agent_metric(&telemetry, &reloads), Some(1.0), "{endpoint}");
    }

    // The connection made before both changes still serves requests, with its certificate A.
    let (status, _) = kept
        .request("POST", "/v1/metrics", "application/json", body)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(kept.certificate, a);
    assert_eq!(metrics.items(), 7);
    receiver.shutdown().await.unwrap();
}
