//! The real agent traces a chain of two local services with its `http` probe and exports the
//! spans through the `jaeger` preset (OTLP/gRPC) to a receiver this project did not write: the
//! oteltest sink the exporter tests use (grpcio and the official Python OTLP bindings), where
//! the trace is checked: one trace, the expected tree. Root only (eBPF, pod cgroups).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::oteltest::OteltestSink;
use podscope_integration::status_server;
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use serde_json::Value;

/// A span as the sink decoded it, with its resource's container id.
#[derive(Debug, Clone)]
struct SinkSpan {
    container: String,
    kind: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

fn spans_of(request: &Value) -> Vec<SinkSpan> {
    let mut out = Vec::new();
    for rs in request["resourceSpans"].as_array().into_iter().flatten() {
        let container = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "container.id")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_string();
                out.push(SinkSpan {
                    container: container.clone(),
                    kind: text("kind"),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent: text("parentSpanId"),
                });
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_local_services_reaches_a_third_party_otlp_receiver_through_the_jaeger_preset_as_one_trace(
) {
    let sink_port = free_port();
    let sink = OteltestSink::start(sink_port);
    let (mut front, mut back, mut client) = (PodCgroup::new(), PodCgroup::new(), PodCgroup::new());
    let telemetry_port = free_port();
    let config = format!(
        "receivers:\n  ebpf:\n    collection_interval: 1h\n    cgroup_filter:\n      include: [\"/kubepods.slice/**\"]\n    probes:\n      http:\n\
         processors:\n  batch:\n    timeout: 100ms\n\
         exporters:\n  jaeger:\n    endpoint: 127.0.0.1:{sink_port}\n    tls:\n      insecure: true\n\
         service:\n  telemetry:\n    metrics:\n      address: 127.0.0.1:{telemetry_port}\n  pipelines:\n    traces:\n      receivers: [ebpf]\n      processors: [batch]\n      exporters: [jaeger]\n"
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let front_port = status_server::start_in(&mut front);
    let back_port = status_server::start_in(&mut back);
    let done = std::env::temp_dir().join(format!("podscope-jaeger-{}", unique_ids().1));
    client.spawn_shell(&format!(
        "curl -s -o /dev/null http://127.0.0.1:{front_port}/call/{back_port}/items/7; touch {}",
        done.display()
    ));
    let containers: HashMap<String, &str> =
        [(&front, "front"), (&back, "back"), (&client, "client")]
            .into_iter()
            .map(|(pod, name)| {
                let id = pod
                    .relative_path()
                    .rsplit_once("cri-containerd-")
                    .and_then(|(_, rest)| rest.strip_suffix(".scope"))
                    .expect("a containerd scope")
                    .to_string();
                (id, name)
            })
            .collect();

    // Collect what the sink decodes until the four spans of our pods are there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut spans: Vec<(String, SinkSpan)> = Vec::new();
    while spans.len() < 4 && Instant::now() < deadline {
        let Ok(line) = sink.lines.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let decoded: Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(decoded["transport"], "grpc");
        assert_eq!(decoded["signal"], "traces");
        for span in spans_of(&decoded["request"]) {
            if let Some(name) = containers.get(&span.container) {
                spans.push((name.to_string(), span));
            }
        }
    }
    assert!(done.exists(), "curl finished");
    let _ = std::fs::remove_file(&done);
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(20)).await.success());

    let find = |who: &str, kind: &str| {
        spans
            .iter()
            .find(|(name, s)| name == who && s.kind == kind)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no {kind} span of {who}: {spans:#?}"))
    };
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let curl = find("client", "SPAN_KIND_CLIENT");
    let front_server = find("front", "SPAN_KIND_SERVER");
    let front_client = find("front", "SPAN_KIND_CLIENT");
    let back_server = find("back", "SPAN_KIND_SERVER");
    assert_eq!(curl.parent, "");
    assert_eq!(front_server.parent, curl.span_id);
    assert_eq!(front_client.parent, front_server.span_id);
    assert_eq!(back_server.parent, front_client.span_id);
    for (_, s) in &spans {
        assert_eq!(s.trace_id, curl.trace_id);
    }
    assert_eq!(front_server.name, "GET /call/{id}/items/{id}");
    assert_eq!(back_server.name, "GET /items/{id}");
    assert_eq!(curl.name, "GET");
}
