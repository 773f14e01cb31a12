//! The `prometheus` exporter's endpoint behind TLS (client certificates required) and
//! authentication, scraped by a real Prometheus with `tls_config`, `basic_auth` and
//! `authorization` in its scrape configs, and refused to curl without credentials.

use std::time::Duration;

use podscope_core::config::parse_component_config;
use podscope_core::{BuildContext, Component as _, Consumer as _};
use podscope_exporters::prometheus::{PrometheusConfig, PrometheusExporter};
use podscope_integration::certs::TestPki;
use podscope_integration::prometheus::PrometheusServer;
use podscope_testkit::{fake_otlp, BuildContextForTests as _};

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
