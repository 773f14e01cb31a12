//! What the http probe costs an HTTP server, measured side by side in one run: wrk against nginx
//! (one worker, keep-alive, a 3-byte body) with nothing attached and with the http probe
//! (default settings, both ends traced, spans and RED built and discarded), rows interleaved
//! over rounds; each probe row is compared with the mean of the baselines right before and
//! after it, and medians are reported: throughput loss and added latency per request. Also the
//! probe's kernel map memory, and the events it lost (a full ring buffer) at that load.
//!
//! Run: `cargo bench --bench http_overhead` (root; nginx and wrk from scripts/install-deps.sh;
//! env BENCH_ROUNDS (5), BENCH_SECONDS (5)). Under `cargo test` it is a quick smoke run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_integration::agent::free_port;
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};

struct Discard;

#[async_trait]
impl Consumer for Discard {
    async fn consume(&self, _: Batch) -> Result<(), ConsumeError> {
        Ok(())
    }
}

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child: SIGQUIT is nginx's graceful stop of its workers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}

fn nginx() -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = format!(
        "user root; worker_processes 1; daemon off; master_process on; pid {0}/nginx.pid; error_log {0}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {0}; proxy_temp_path {0}; fastcgi_temp_path {0}; uwsgi_temp_path {0}; scgi_temp_path {0};\n\
           server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdin(Stdio::null())
        .spawn()
        .expect("nginx (scripts/install-deps.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child,
        port,
        _dir: dir,
    }
}

/// Requests/s and mean latency (µs) of one wrk run.
fn wrk(port: u16, seconds: u64) -> (f64, f64) {
    let output = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"));
    let latency = text
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next()? == "Latency").then(|| micros(fields.next()?))?
        })
        .unwrap_or_else(|| panic!("no Latency in wrk's output:\n{text}"));
    (rps, latency)
}

/// wrk's `123.45us`, `1.20ms`, `1.00s` in µs.
fn micros(text: &str) -> Option<f64> {
    for (unit, scale) in [("us", 1.0), ("ms", 1e3), ("s", 1e6)] {
        if let Some(n) = text.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// A started receiver with the http probe, and the telemetry it counts into.
async fn probe() -> (EbpfReceiver, podscope_core::telemetry::AgentTelemetry) {
    let config: EbpfReceiverConfig = parse_component_config(
        serde_json::json!({"collection_interval": "1h", "probes": {"http": {}}}),
    )
    .unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(Arc::new(Discard)),
            traces: Some(Arc::new(Discard)),
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    assert!(
        receiver.skipped_probes().is_empty(),
        "{:?}",
        receiver.skipped_probes()
    );
    (receiver, telemetry)
}

/// A counter of the agent's telemetry text (0 if absent).
fn counter(telemetry: &podscope_core::telemetry::AgentTelemetry, series: &str) -> f64 {
    telemetry
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("http_overhead: needs root (eBPF); skipped");
        return;
    }
    let quick = std::env::args().all(|a| a != "--bench");
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, seconds) = if quick {
        (1, 1)
    } else {
        (env("BENCH_ROUNDS", 5), env("BENCH_SECONDS", 5))
    };
    let server = nginx();
    let mut losses = Vec::new();
    let mut added_latency = Vec::new();
    let mut rows = Vec::new();
    let mut memory = 0;
    let (mut events, mut lost) = (0.0, 0.0);
    let mut previous = wrk(server.port, seconds);
    for round in 0..rounds {
        let (receiver, telemetry) = probe().await;
        let with = wrk(server.port, seconds);
        receiver.collect_now().await.unwrap();
        memory = receiver
            .map_memory()
            .iter()
            .filter(|m| m.probe == "http")
            .map(|m| m.bytes)
            .sum::<u64>();
        receiver.shutdown().await.unwrap();
        events += counter(
            &telemetry,
            "podscope_ebpf_ringbuf_events_total{ring=\"http_events\"}",
        );
        lost += counter(
            &telemetry,
            "podscope_ebpf_ringbuf_lost_events_total{ring=\"http_events\"}",
        );
        let after = wrk(server.port, seconds);
        let base_rps = (previous.0 + after.0) / 2.0;
        let base_latency = (previous.1 + after.1) / 2.0;
        let loss = (base_rps - with.0) / base_rps * 100.0;
        losses.push(loss);
        added_latency.push(with.1 - base_latency);
        rows.push(format!(
            "round {}: without {:.0} req/s ({:.1} µs), with the http probe {:.0} req/s ({:.1} µs), without {:.0} req/s ({:.1} µs): loss {loss:.1} %",
            round + 1,
            previous.0,
            previous.1,
            with.0,
            with.1,
            after.0,
            after.1
        ));
        previous = after;
    }
    for row in &rows {
        println!("{row}");
    }
    println!(
        "http probe, wrk -t1 -c8 against nginx (keep-alive): median throughput loss {:.1} % (target ≤ 5 %), median added latency {:.1} µs per request, kernel map memory {:.1} KiB, events read {events:.0}, lost {lost:.0} ({:.2} %)",
        median(losses),
        median(added_latency),
        memory as f64 / 1024.0,
        lost / (events + lost).max(1.0) * 100.0
    );
}
