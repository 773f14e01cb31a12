//! Spans (and metric data points) per second per core through the real agent:
//! `otlp` receiver (gRPC) → `batch` → `nop` exporter, in a separate `podscope` process.
//!
//! A load client in this process sends pre-built requests of 500 realistic items
//! (`podscope_testkit::fake_otlp::service_spans` / `service_points`: spans with 6 attributes, a
//! resource with 4) on several concurrent gRPC streams; the agent's CPU time is read from
//! `/proc/<pid>/stat` before and after, so "per core" means items per CPU-second spent by the
//! agent alone, whatever the client costs.
//!
//! Run: `cargo bench --bench otlp_throughput` (env `BENCH_SECONDS`, default 10).
//! Under `cargo test` (`--bench` absent) it does a 1-second smoke run.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use podscope_core::Batch;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_testkit::fake_otlp;

mod proc_stat;
use proc_stat::cpu_seconds;

const ITEMS_PER_REQUEST: usize = 500;
const STREAMS: usize = 4;

/// 500 realistic spans (see `fake_otlp::service_spans`) as one export request.
fn spans_request() -> ExportTraceServiceRequest {
    let Batch::Traces(resource_spans) = fake_otlp::service_spans(ITEMS_PER_REQUEST) else {
        unreachable!("service_spans makes traces")
    };
    ExportTraceServiceRequest {
        resource_spans: resource_spans.to_vec(),
    }
}

/// 500 realistic data points (see `fake_otlp::service_points`) as one export request.
fn metrics_request() -> ExportMetricsServiceRequest {
    let Batch::Metrics(resource_metrics) = fake_otlp::service_points(ITEMS_PER_REQUEST) else {
        unreachable!("service_points makes metrics")
    };
    ExportMetricsServiceRequest {
        resource_metrics: resource_metrics.to_vec(),
    }
}

struct Measured {
    items: u64,
    wall: Duration,
    agent_cpu: f64,
}

async fn drive(endpoint: &str, signal: &str, seconds: u64, pid: i32) -> Measured {
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let endpoint = endpoint.to_string();
        let signal = signal.to_string();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            if signal == "traces" {
                let mut client = TraceServiceClient::connect(endpoint).await.unwrap();
                let request = spans_request();
                while Instant::now() < stop_at {
                    client.export(request.clone()).await.expect("agent accepts");
                    sent += ITEMS_PER_REQUEST as u64;
                }
            } else {
                let mut client = MetricsServiceClient::connect(endpoint).await.unwrap();
                let request = metrics_request();
                while Instant::now() < stop_at {
                    client.export(request.clone()).await.expect("agent accepts");
                    sent += ITEMS_PER_REQUEST as u64;
                }
            }
            sent
        }));
    }
    let mut items = 0;
    for t in tasks {
        items += t.await.unwrap();
    }
    Measured {
        items,
        wall: started.elapsed(),
        agent_cpu: cpu_seconds(pid) - cpu_before,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let seconds: u64 = if benchmarking {
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10)
    } else {
        1
    };
    let grpc_port = free_port();
    let telemetry_port = free_port();
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "127.0.0.1:{grpc_port}" }}
processors:
  batch: {{ send_batch_size: 8192, timeout: 200ms }}
exporters:
  nop:
service:
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }}, logs: {{ level: warn }} }}
  pipelines:
    traces: {{ receivers: [otlp], processors: [batch], exporters: [nop] }}
    metrics: {{ receivers: [otlp], processors: [batch], exporters: [nop] }}
"#
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    println!(
        "{:<8} {:>12} {:>14} {:>16} {:>18}",
        "signal", "items", "items/s", "agent cores", "items/s per core"
    );
    for signal in ["traces", "metrics"] {
        let m = drive(&endpoint, signal, seconds, agent.pid()).await;
        let per_sec = m.items as f64 / m.wall.as_secs_f64();
        println!(
            "{:<8} {:>12} {:>14.0} {:>16.2} {:>18.0}",
            signal,
            m.items,
            per_sec,
            m.agent_cpu / m.wall.as_secs_f64(),
            m.items as f64 / m.agent_cpu.max(0.001)
        );
        assert!(m.items > 0, "the agent accepted no {signal}");
    }
    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "agent exited with {status:?}");
}
