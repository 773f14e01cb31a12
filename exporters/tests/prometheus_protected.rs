//! The `prometheus` exporter's endpoint behind TLS (client certificates required) and
//! authentication, scraped by a real Prometheus with `tls_config`, `basic_auth` and
//! `authorization` in its scrape configs, and refused to curl without credentials; its
//! certificate and client CA rotated (`reload_interval`), checked with rustls clients.

use std::path::Path;
use std::time::Duration;

use podscope_core::config::parse_component_config;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{BuildContext, Component as _, Consumer as _};
use podscope_exporters::prometheus::{PrometheusConfig, PrometheusExporter};
use podscope_integration::certs::{
    presented_certificate, CertificateRotation, ClientIdentity, KeptHttpsConnection, TestPki,
};
use podscope_integration::prometheus::PrometheusServer;
use podscope_testkit::{agent_metric, fake_otlp, BuildContextForTests as _};

async fn exporter(auth: serde_json::Value, pki: &TestPki) -> PrometheusExporter {
    let config = serde_json::json!({
        "endpoint": "127.0.0.1:0",
        "tls": {
            "cert_file": pki.server_cert_file,
            "key_file": pki.server_key_file,
            "client_ca_file": pki.ca_file,
        },
        "auth": auth,
    });
    let config = parse_component_config::<PrometheusConfig>(config).expect("valid config");
    let exporter = PrometheusExporter::new(config, &BuildContext::for_tests("prometheus"));
    exporter.start().await.unwrap();
    exporter
        .consume(fake_otlp::service_points(4))
        .await
        .unwrap();
    exporter
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_with_client_certificates_basic_auth_and_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "scrape-token\n").unwrap();
    let hash = bcrypt::hash("hunter2", 4).unwrap();

    let basic = exporter(
        serde_json::json!({"basic_auth_users": {"prometheus": hash}}),
        &pki,
    )
    .await;
    let bearer = exporter(serde_json::json!({"bearer_token_file": token_file}), &pki).await;
    let basic_target = format!("localhost:{}", basic.local_addr().unwrap().port());
    let bearer_target = format!("localhost:{}", bearer.local_addr().unwrap().port());

    let tls = format!(
        "    tls_config:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n",
        pki.ca_file.display(),
        pki.client_cert_file.display(),
        pki.client_key_file.display()
    );
    let scrape_configs = format!(
        "  - job_name: basic
    scheme: https
    basic_auth: {{username: prometheus, password: hunter2}}
{tls}    static_configs: [{{targets: ['{basic_target}']}}]
  - job_name: basic_wrong_password
    scheme: https
    basic_auth: {{username: prometheus, password: wrong}}
{tls}    static_configs: [{{targets: ['{basic_target}']}}]
  - job_name: bearer
    scheme: https
    authorization: {{credentials_file: {token}}}
{tls}    static_configs: [{{targets: ['{bearer_target}']}}]
  - job_name: no_client_certificate
    scheme: https
    authorization: {{credentials_file: {token}}}
    tls_config: {{ca_file: {ca}}}
    static_configs: [{{targets: ['{bearer_target}']}}]
",
        token = token_file.display(),
        ca = pki.ca_file.display(),
    );
    let prometheus = PrometheusServer::start_with_scrape_configs(&scrape_configs).await;

    for (job, up) in [
        ("basic", "1"),
        ("basic_wrong_password", "0"),
        ("bearer", "1"),
        ("no_client_certificate", "0"),
    ] {
        let samples = prometheus
            .query_until_present(&format!("up{{job=\"{job}\"}}"), Duration::from_secs(30))
            .await;
        assert_eq!(samples.len(), 1, "{job}: {samples:?}");
        assert_eq!(samples[0].1, up, "up of job {job}");
    }
    // What the authorized scrapes brought in: the exporter's series.
    for job in ["basic", "bearer"] {
        let samples = prometheus
            .query_until_present(
                &format!("count({{job=\"{job}\", __name__!~\"up|scrape_.*\"}})"),
                Duration::from_secs(30),
            )
            .await;
        assert_ne!(samples[0].1, "0", "{job}");
    }

    // curl without credentials: 401 and the challenge.
    let args = [
        "-sS".to_string(),
        "-i".to_string(),
        "--cacert".to_string(),
        pki.ca_file.display().to_string(),
        "--cert".to_string(),
        pki.client_cert_file.display().to_string(),
        "--key".to_string(),
        pki.client_key_file.display().to_string(),
        format!("https://{basic_target}/metrics"),
    ];
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(out.starts_with("http/1.1 401"), "{out}");
    assert!(
        out.contains("\r\nwww-authenticate: basic realm=\"podscope\", charset=\"utf-8\"\r\n"),
        "{out}"
    );
    basic.shutdown().await.unwrap();
    bearer.shutdown().await.unwrap();
}

/// An exporter on a free port with `tls` settings, started, and its agent telemetry.
async fn reloading_exporter(tls: serde_json::Value) -> (PrometheusExporter, AgentTelemetry) {
    let config = serde_json::json!({"endpoint": "127.0.0.1:0", "tls": tls});
    let config = parse_component_config::<PrometheusConfig>(config).expect("valid config");
    let ctx = BuildContext::for_tests("prometheus");
    let exporter = PrometheusExporter::new(config, &ctx);
    exporter.start().await.unwrap();
    (exporter, ctx.telemetry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_scrapes_and_a_mismatched_key_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut rotation = CertificateRotation::new(dir.path());
    let (a, b) = (rotation.a.clone(), rotation.b.clone());
    let ca_file = rotation.pki.ca_file.clone();
    let (exporter, telemetry) = reloading_exporter(serde_json::json!({
        "cert_file": rotation.volume.cert_file(),
        "key_file": rotation.volume.key_file(),
        "reload_interval": "100ms",
    }))
    .await;
    exporter
        .consume(fake_otlp::service_points(4))
        .await
        .unwrap();
    let addr = exporter.local_addr().unwrap();
    let presented = || async {
        presented_certificate(addr, &ca_file, b"http/1.1")
            .await
            .unwrap()
    };
    let reloads = "podscope_server_tls_reloads_total{endpoint=\"exporters.prometheus\"}";
    let failures = "podscope_server_tls_reload_failures_total{endpoint=\"exporters.prometheus\"}";

    assert_eq!(presented().await, a);
    let mut kept = KeptHttpsConnection::open(addr, &ca_file).await.unwrap();
    assert_eq!(kept.certificate, a);
    let (status, page) = kept
        .request("GET", "/metrics", "text/plain", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let page = String::from_utf8(page).unwrap();
    assert_eq!(agent_metric(&telemetry, reloads), Some(0.0));

    // Rotated to B, both files at once: new handshakes get B, once reloaded.
    rotation.rotate_to_b();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while presented().await != b {
        assert!(tokio::time::Instant::now() < give_up, "B never presented");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent_metric(&telemetry, reloads), Some(1.0));

    // B's certificate with A's key: refused by the key check, counted once, B stays.
    let b_cert = std::fs::read(&rotation.b_cert_file).unwrap();
    let a_key = std::fs::read(&rotation.pki.server_key_file).unwrap();
    rotation.volume.replace(&b_cert, &a_key);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent_metric(&telemetry, failures) == Some(0.0) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the mismatched key was never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(presented().await, b);
    assert_eq!(agent_metric(&telemetry, failures), Some(1.0));
    assert_eq!(agent_metric(&telemetry, reloads), Some(1.0));

    // The connection from before the rotation still scrapes, the same page.
    let (status, again) = kept
        .request("GET", "/metrics", "text/plain", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(again).unwrap(), page);
    exporter.shutdown().await.unwrap();
}

/// Whether a scrape presenting `identity` gets its page, on a new connection.
async fn scrape_as(
    addr: std::net::SocketAddr,
    ca_file: &Path,
    identity: ClientIdentity<'_>,
) -> bool {
    match KeptHttpsConnection::open_as(addr, ca_file, Some(identity)).await {
        Ok(mut connection) => matches!(
            connection
                .request("GET", "/metrics", "text/plain", b"")
                .await,
            Ok((200, _))
        ),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_decides_which_client_certificates_new_connections_accept() {
    let dir = tempfile::tempdir().unwrap();
    let [ours, theirs] = ["ours", "theirs"].map(|name| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        TestPki::generate(&dir.path().join(name))
    });
    // Replaced by a rename, as a Secret volume does.
    let client_ca_file = dir.path().join("client-ca.pem");
    std::fs::copy(&ours.ca_file, &client_ca_file).unwrap();
    let (exporter, telemetry) = reloading_exporter(serde_json::json!({
        "cert_file": ours.server_cert_file,
        "key_file": ours.server_key_file,
        "client_ca_file": client_ca_file,
        "reload_interval": "100ms",
    }))
    .await;
    let addr = exporter.local_addr().unwrap();
    let our_client = (
        ours.client_cert_file.as_path(),
        ours.client_key_file.as_path(),
    );
    let their_client = (
        theirs.client_cert_file.as_path(),
        theirs.client_key_file.as_path(),
    );
    assert!(scrape_as(addr, &ours.ca_file, our_client).await);
    assert!(!scrape_as(addr, &ours.ca_file, their_client).await);

    let staged = dir.path().join("client-ca.pem.new");
    std::fs::copy(&theirs.ca_file, &staged).unwrap();
    std::fs::rename(&staged, &client_ca_file).unwrap();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while !scrape_as(addr, &ours.ca_file, their_client).await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the new client CA never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!scrape_as(addr, &ours.ca_file, our_client).await);
    let reloads = "podscope_server_tls_reloads_total{endpoint=\"exporters.prometheus\"}";
    assert_eq!(agent_metric(&telemetry, reloads), Some(1.0));
    exporter.shutdown().await.unwrap();
}
