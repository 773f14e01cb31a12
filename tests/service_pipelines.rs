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

/// Sum of every sample of the agent's own metrics whose line starts with `prefix` (a metric name
/// and the start of its labels), 0 when there is none.
fn total(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// `exporter_sent + exporter_dropped` (every reason) for one exporter.
fn sent_and_dropped(text: &str, exporter: &str) -> (u64, u64) {
    (
        total(
            text,
            &format!("podscope_exporter_sent_items_total{{component=\"{exporter}\""),
        ),
        total(
            text,
            &format!("podscope_exporter_dropped_items_total{{component=\"{exporter}\""),
        ),
    )
}

/// A loopback port on which a connection is refused: an OTLP backend that is down.
fn down_port() -> u16 {
    free_port()
}

/// Exports `requests` requests of `per_request` spans each, retrying each one on UNAVAILABLE (as
/// an OTLP client does) until it is accepted; returns how many attempts were refused.
async fn export_with_client_retries(port: u16, requests: usize, per_request: usize) -> usize {
    let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    for _ in 0..requests {
        loop {
            match client.export(spans(per_request)).await {
                Ok(_) => break,
                Err(status) if status.code() == tonic::Code::Unavailable => refused += 1,
                Err(status) => panic!("export refused for good: {status}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the receiver kept refusing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    refused
}

/// An `otlp` exporter to a backend that is down, with a one-item blocking sending queue and short
/// retries: it refuses most batches for a while (`queue_full`) and gives up on what it took.
fn down_exporter(port: u16) -> String {
    format!(
        r#"{{ endpoint: "http://127.0.0.1:{port}",
             sending_queue: {{ queue_size: 1, num_consumers: 1, block_timeout: 200ms }},
             retry_on_failure: {{ initial_interval: 50ms, max_interval: 50ms, max_elapsed_time: 300ms }} }}"#
    )
}

/// Runs a service with an `otlp` receiver, a `file` exporter and `otlp/down` (see
/// [`down_exporter`]) wired by `pipelines`, exports `requests` requests of `per_request` spans
/// (retrying refusals as a client does) and shuts down. Returns the spans in the file, the
/// agent's metrics and how many attempts the client saw refused.
async fn export_with_one_exporter_down(
    pipelines: &str,
    requests: usize,
    per_request: usize,
) -> (usize, String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{port}" }} }} }}
exporters:
  file: {{ path: {file} }}
  otlp/down: {down}
service:
  pipelines:
{pipelines}
"#,
        file = dir.path().join("out.jsonl").display(),
        down = down_exporter(down_port()),
    );
    let config = load_str(&config, "one-exporter-down.yaml").unwrap();
    let telemetry = AgentTelemetry::new();
    let mut service = Service::build(config, telemetry.clone(), Readiness::default()).unwrap();
    service.start().await.unwrap();
    let refused = export_with_client_retries(port, requests, per_request).await;
    let report = service.shutdown().await;
    assert!(report.errors.is_empty(), "{report:?}");
    (
        spans_in(&dir.path().join("out.jsonl")),
        telemetry.encode_text(),
        refused,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_exporter_never_makes_its_pipeline_resend_to_the_others() {
    let pipelines = "    traces: { receivers: [otlp], exporters: [file, otlp/down] }";
    let (in_file, text, _) = export_with_one_exporter_down(pipelines, 4, 5).await;
    // The healthy exporter has every span exactly once.
    assert_eq!(in_file, 20);
    assert_eq!(sent_and_dropped(&text, "file"), (20, 0), "{text}");
    // The one whose backend is down gave every span up, and said so.
    assert_eq!(sent_and_dropped(&text, "otlp/down"), (0, 20), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_retry_after_one_pipeline_refused_reaches_the_others_once() {
    let pipelines = "    traces/healthy: { receivers: [otlp], exporters: [file] }
    traces/stuck:
      receivers: [otlp]
      exporters: [otlp/down]
      queue: { capacity: 5, block_timeout: 100ms }";
    let (in_file, text, refused) = export_with_one_exporter_down(pipelines, 6, 5).await;
    assert!(
        refused > 0,
        "the stuck pipeline never refused: nothing was tested"
    );
    assert_eq!(in_file, 30);
    assert_eq!(
        total(
            &text,
            "podscope_receiver_accepted_items_total{component=\"otlp\""
        ),
        30,
        "{text}"
    );
    assert_eq!(sent_and_dropped(&text, "file"), (30, 0), "{text}");
    assert_eq!(sent_and_dropped(&text, "otlp/down"), (0, 30), "{text}");
}

/// An HTTP client that sends the headers of an OTLP/HTTP request and then nothing: it returns
/// once the receiver is reading the body (it asked for `100 Continue` and got it).
async fn stalled_http_client(port: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /v1/traces HTTP/1.1\r\nhost: podscope\r\ncontent-type: application/x-protobuf\r\n\
              content-length: 1000\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("100 Continue") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the receiver asks for the body")
            .unwrap();
        assert!(n > 0, "the receiver closed the connection");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

/// What the stalled client is told once it is dropped by the receiver: the status line.
async fn answer_to(mut stream: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen)).await;
    String::from_utf8_lossy(&seen)
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1") && !l.contains("100 Continue"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TCP server that accepts connections and never answers (an OTLP backend that hangs).
struct SilentBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SilentBackend {
    async fn start() -> SilentBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        SilentBackend { port, task }
    }
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_item_is_sent_or_counted_as_dropped_when_shutdown_runs_out_of_time() {
    let backend = SilentBackend::start().await;
    let (grpc, http) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{grpc}" }}, http: {{ endpoint: "127.0.0.1:{http}" }} }} }}
exporters:
  otlp/silent:
    endpoint: http://127.0.0.1:{silent}
    timeout: 60s
    sending_queue: {{ num_consumers: 1 }}
service:
  shutdown_timeout: 2s
  pipelines:
    traces: {{ receivers: [otlp], exporters: [otlp/silent] }}
"#,
        silent = backend.port
    );
    let config = load_str(&config, "silent-backend.yaml").unwrap();
    let telemetry = AgentTelemetry::new();
    let mut service = Service::build(config, telemetry.clone(), Readiness::default()).unwrap();
    service.start().await.unwrap();
    export_with_client_retries(grpc, 10, 10).await;
    let stalled = stalled_http_client(http).await;

    let report = service.shutdown().await;
    assert!(
        !report.completed_in_time,
        "the backend never answers: {report:?}"
    );
    let text = telemetry.encode_text();
    assert_eq!(
        total(
            &text,
            "podscope_receiver_accepted_items_total{component=\"otlp\""
        ),
        100,
        "{text}"
    );
    assert_eq!(sent_and_dropped(&text, "otlp/silent"), (0, 100), "{text}");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http_client_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ http: {{ endpoint: "127.0.0.1:{http}" }} }} }}
exporters:
  file: {{ path: {file} }}
service:
  shutdown_timeout: 20s
  pipelines:
    traces: {{ receivers: [otlp], exporters: [file] }}
"#,
        file = dir.path().join("out.jsonl").display(),
    );
    let config = load_str(&config, "stalled-client.yaml").unwrap();
    let mut service = Service::build(config, AgentTelemetry::new(), Readiness::default()).unwrap();
    service.start().await.unwrap();
    let stalled = stalled_http_client(http).await;
    let report = service.shutdown().await;
    assert!(
        report.completed_in_time && report.errors.is_empty(),
        "{report:?}"
    );
    // The client is told to send its request again (elsewhere): 503, as for a full pipeline.
    assert_eq!(answer_to(stalled).await, "HTTP/1.1 503 Service Unavailable");
}
