//! Spans (and metric data points) per second per core through the real agent:
//! `otlp` receiver (gRPC) → `batch` → `nop` exporter, in a separate `podscope` process.
//!
//! A load client in this process sends pre-encoded requests of 500 realistic items
//! (`podscope_core::fake_otlp::service_spans` / `service_points`) on several concurrent gRPC
//! streams; the agent's CPU time is read from `/proc/<pid>/stat` before and after, so "per core"
//! means items per CPU-second spent by the agent alone, whatever the client costs.
//!
//! Run: `cargo bench --bench otlp_throughput` (env `BENCH_SECONDS`, default 10).
//! Under `cargo test` (`--bench` absent) it does a 1-second smoke run.

use std::time::{Duration, Instant};

use podscope_core::otlp::{otlp, Encoding, RawCodec};
use podscope_core::{fake_otlp, Signal};
use podscope_integration::agent::{free_port, AgentProcess};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::Bytes;

mod proc_stat;
use proc_stat::cpu_seconds;

const ITEMS_PER_REQUEST: usize = 500;
const STREAMS: usize = 4;

/// A pre-encoded export request of 500 realistic items (see `fake_otlp::service_spans`).
fn request_body(signal: Signal) -> Bytes {
    let batch = match signal {
        Signal::Traces => fake_otlp::service_spans(ITEMS_PER_REQUEST),
        Signal::Metrics => fake_otlp::service_points(ITEMS_PER_REQUEST),
    };
    otlp(signal).encode_request(&batch, Encoding::Protobuf)
}

struct Measured {
    items: u64,
    wall: Duration,
    agent_cpu: f64,
}

async fn drive(endpoint: &str, signal: Signal, seconds: u64, pid: i32) -> Measured {
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let body = request_body(signal);
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let endpoint = endpoint.to_string();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let channel = tonic::transport::Endpoint::from_shared(endpoint)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut grpc = tonic::client::Grpc::new(channel);
            let path = otlp(signal).grpc_export_path();
            while Instant::now() < stop_at {
                grpc.ready().await.unwrap();
                grpc.unary(
                    tonic::Request::new(body.clone()),
                    PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await
                .expect("agent accepts");
                sent += ITEMS_PER_REQUEST as u64;
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
    for signal in [Signal::Traces, Signal::Metrics] {
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
