//! The service's graph: one receiver shared by two pipelines, fan-out to several exporters, and a
//! failed start that leaves nothing running.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope::config::load_str;
use podscope::service::Service;
use podscope_core::health::Readiness;
use podscope_core::telemetry::AgentTelemetry;
use podscope_integration::agent::free_port;

fn spans(n: usize) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: (0..n)
                    .map(|i| Span {
                        name: format!("s{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn spans_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["resourceSpans"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|rs| rs["scopeSpans"].as_array().unwrap())
                .map(|ss| ss["spans"].as_array().unwrap().len())
                .sum::<usize>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_receiver_feeds_every_pipeline_and_each_fans_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{port}" }} }} }}
processors:
  batch: {{ timeout: 50ms }}
exporters:
  file/a: {{ path: {a} }}
  file/b: {{ path: {b} }}
  file/c: {{ path: {c} }}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [file/a]
    traces/copy:
      receivers: [otlp]
      exporters: [file/b, file/c]
"#,
        a = dir.path().join("a.jsonl").display(),
        b = dir.path().join("b.jsonl").display(),
        c = dir.path().join("c.jsonl").display(),
    );
    let config = load_str(&config, "fanout.yaml").unwrap();
    let telemetry = AgentTelemetry::new();
    let readiness = Readiness::default();
    let mut service = Service::build(config, telemetry.clone(), readiness.clone()).unwrap();
    assert!(readiness.check().is_err(), "not ready before start");
    service.start().await.unwrap();
    assert_eq!(readiness.check(), Ok(()));

    let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    for _ in 0..4 {
        client.export(spans(25)).await.unwrap();
    }
    let report = service.shutdown().await;
    assert!(
        report.completed_in_time && report.errors.is_empty(),
        "{report:?}"
    );
    for file in ["a", "b", "c"] {
        assert_eq!(
            spans_in(&dir.path().join(format!("{file}.jsonl"))),
            100,
            "file/{file}"
        );
    }
    let text = telemetry.encode_text();
    assert!(
        text.contains(
            "podscope_receiver_accepted_items_total{component=\"otlp\",signal=\"traces\"} 100"
        ),
        "{text}"
    );
    for exporter in ["file/a", "file/b", "file/c"] {
        let line = format!(
            "podscope_exporter_sent_items_total{{component=\"{exporter}\",signal=\"traces\"}} 100"
        );
        assert!(text.contains(&line), "missing {line}\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_names_the_cause_and_releases_what_started() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let free = free_port();
    let config = format!(
        r#"
receivers:
  otlp/first: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{free}" }} }} }}
  otlp/second: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{taken_port}" }} }} }}
exporters:
  nop:
service:
  pipelines:
    traces: {{ receivers: [otlp/first, otlp/second], exporters: [nop] }}
"#
    );
    let config = load_str(&config, "clash.yaml").unwrap();
    let readiness = Readiness::default();
    let mut service = Service::build(config, AgentTelemetry::new(), readiness.clone()).unwrap();
    let error = format!("{:#}", service.start().await.unwrap_err());
    assert!(
        error.contains(&format!("receivers.otlp/second.protocols.grpc.endpoint: cannot listen on 127.0.0.1:{taken_port}")),
        "{error}"
    );
    assert!(readiness.check().is_err());
    // The first receiver was stopped again: its port is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", free)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {free} still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
