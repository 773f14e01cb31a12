//! podscope beside rotel (a Rust OTLP collector, PyPI `rotel`, installed into `.cache/rotel` by
//! `scripts/install-deps.sh`) on the same OTLP load, in one run.
//!
//! Each collector runs `otlp → batch (8192 items, 200 ms) → discard` or `→ OTLP/gRPC export`
//! (compression `none` or `gzip`) to a sink (a podscope agent, `otlp → nop`, whose CPU is not
//! counted). Four clients in this process send pre-encoded requests of 500 items
//! (`podscope_testkit::fake_otlp::service_spans` / `service_points`: a resource with 4 attributes,
//! 6 attributes per span, 4 per data point, a quarter of the points histograms) over OTLP/HTTP
//! protobuf or OTLP/gRPC, each waiting for its answer before it sends again.
//!
//! Every measurement starts a fresh collector, so that its peak RSS (`ru_maxrss` from `wait4`)
//! belongs to that row alone. CPU per item is the collector's user + system time from the moment
//! the load starts (`/proc/<pid>/stat`) until it exited on SIGTERM (`wait4`), so it includes
//! delivering the last batch, divided by the items it acknowledged. Rows take turns, the two
//! collectors alternate who goes first, and every figure is the median over the rounds; the
//! ratio column is the median of the per-round ratios.
//!
//! Run: `cargo bench --bench otlp_peer` (env `BENCH_SECONDS` per measurement, default 5;
//! `BENCH_ROUNDS`, default 3; `ROTEL_AGENT` to use another rotel binary, `PODSCOPE_BIN` another
//! podscope build). Under `cargo test`
//! (`--bench` absent) it is a short smoke run of two rows.

use std::io::Write as _;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podscope_core::otlp::{otlp, Encoding, RawCodec};
use podscope_core::Signal;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_testkit::fake_otlp;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::Bytes;

mod proc_stat;
use proc_stat::cpu_seconds;

const ITEMS_PER_REQUEST: usize = 500;
const CLIENTS: usize = 4;

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Http,
    Grpc,
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    Discard,
    /// OTLP/gRPC export with this `compression`.
    Export(&'static str),
}

#[derive(Clone, Copy)]
struct Row {
    signal: Signal,
    protocol: Protocol,
    output: Output,
}

impl Row {
    fn name(&self) -> String {
        let input = match self.protocol {
            Protocol::Http => "HTTP",
            Protocol::Grpc => "gRPC",
        };
        let output = match self.output {
            Output::Discard => "discard".to_string(),
            Output::Export(compression) => format!("OTLP/gRPC export, {compression}"),
        };
        format!("{} {input} → batch → {output}", self.signal)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Podscope,
    Rotel,
}

/// What one measurement found.
#[derive(Clone, Copy)]
struct Measured {
    ns_per_item: f64,
    peak_rss_mib: f64,
    items: u64,
}

/// A collector process under test.
struct Collector {
    child: Child,
    /// Config file and rotel's pid and log files; removed on drop.
    _dir: tempfile::TempDir,
}

impl Collector {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and reaps the process: (CPU seconds over its whole life, peak RSS in MiB).
    fn stop(mut self) -> (f64, f64) {
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut status = 0;
            // SAFETY: wait4 fills `status` and `usage`; the pid is our unreaped child.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let reaped = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut usage) };
            if reaped == self.pid() {
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                return (
                    secs(usage.ru_utime) + secs(usage.ru_stime),
                    usage.ru_maxrss as f64 / 1024.0,
                );
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "collector {} did not exit within 30 s of SIGTERM",
                    self.pid()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The podscope under test: this build's, or `PODSCOPE_BIN` (to compare two builds in one run).
fn podscope_binary() -> String {
    std::env::var("PODSCOPE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_podscope").to_string())
}

fn rotel_binary() -> String {
    if let Ok(path) = std::env::var("ROTEL_AGENT") {
        return path;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/rotel/lib");
    let found = std::fs::read_dir(venv).ok().and_then(|pythons| {
        pythons
            .flatten()
            .map(|p| p.path().join("site-packages/rotel/rotel-agent"))
            .find(|p| p.exists())
    });
    match found {
        Some(path) => path.display().to_string(),
        None => panic!("rotel is not installed in {venv}: run scripts/install-deps.sh"),
    }
}

/// Waits until something accepts connections on `port` (at most 30 s).
async fn wait_listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("collector exited before it listened on {port}: {status:?}");
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(peer: Peer, row: Row, port: u16, sink: u16) -> Collector {
    let dir = tempfile::tempdir().expect("temp dir");
    let (grpc, http) = match row.protocol {
        Protocol::Grpc => (port, free_port()),
        Protocol::Http => (free_port(), port),
    };
    let mut child = match peer {
        Peer::Podscope => {
            let exporter = match row.output {
                Output::Discard => "nop: {}".to_string(),
                Output::Export(compression) => format!(
                    "otlp: {{ endpoint: \"http://127.0.0.1:{sink}\", compression: {compression} }}"
                ),
            };
            let name = exporter.split(':').next().unwrap();
            let telemetry = free_port();
            let config = format!(
                r#"receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "127.0.0.1:{grpc}" }}
      http: {{ endpoint: "127.0.0.1:{http}" }}
processors:
  batch: {{ send_batch_size: 8192, timeout: 200ms }}
exporters:
  {exporter}
service:
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry}" }}, logs: {{ level: warn }} }}
  pipelines:
    traces: {{ receivers: [otlp], processors: [batch], exporters: [{name}] }}
    metrics: {{ receivers: [otlp], processors: [batch], exporters: [{name}] }}
"#
            );
            let path = dir.path().join("podscope.yaml");
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(config.as_bytes()))
                .expect("write config");
            Command::new(podscope_binary())
                .args(["run", "--config"])
                .arg(&path)
                .stdin(Stdio::null())
                .spawn()
                .expect("start podscope")
        }
        Peer::Rotel => {
            let mut command = Command::new(rotel_binary());
            command
                .arg("start")
                .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
                .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
                .args(["--batch-max-size", "8192", "--batch-timeout", "200ms"])
                .arg("--pid-file")
                .arg(dir.path().join("rotel.pid"))
                .arg("--log-file")
                .arg(dir.path().join("rotel.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            match row.output {
                Output::Discard => command.args(["--exporter", "blackhole"]),
                Output::Export(compression) => command
                    .args(["--exporter", "otlp"])
                    .args([
                        "--otlp-exporter-endpoint",
                        &format!("http://127.0.0.1:{sink}"),
                    ])
                    .args(["--otlp-exporter-compression", compression]),
            };
            command.spawn().expect("start rotel")
        }
    };
    wait_listening(grpc, &mut child).await;
    wait_listening(http, &mut child).await;
    Collector { child, _dir: dir }
}

/// Sends `body` from [`CLIENTS`] clients for `seconds`; returns the items acknowledged.
async fn load(row: Row, port: u16, body: Bytes, seconds: f64) -> u64 {
    let stop_at = Instant::now() + Duration::from_secs_f64(seconds);
    let wire = otlp(row.signal);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let body = body.clone();
        clients.push(tokio::spawn(async move {
            let mut requests = 0u64;
            match row.protocol {
                Protocol::Grpc => {
                    let channel =
                        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                            .unwrap()
                            .connect()
                            .await
                            .expect("connect over gRPC");
                    let mut grpc = tonic::client::Grpc::new(channel);
                    while Instant::now() < stop_at {
                        grpc.ready().await.expect("gRPC channel ready");
                        let path = PathAndQuery::from_static(wire.grpc_export_path());
                        grpc.unary(tonic::Request::new(body.clone()), path, RawCodec)
                            .await
                            .expect("the collector accepts");
                        requests += 1;
                    }
                }
                Protocol::Http => {
                    let client = reqwest::Client::new();
                    let url = format!("http://127.0.0.1:{port}{}", wire.http_path());
                    while Instant::now() < stop_at {
                        let response = client
                            .post(&url)
                            .header("content-type", "application/x-protobuf")
                            .body(body.clone())
                            .send()
                            .await
                            .expect("the collector answers");
                        assert!(response.status().is_success(), "{}", response.status());
                        response.bytes().await.expect("response body");
                        requests += 1;
                    }
                }
            }
            requests * ITEMS_PER_REQUEST as u64
        }));
    }
    let mut items = 0;
    for client in clients {
        items += client.await.expect("client task");
    }
    items
}

/// Items of `signal` the sink has accepted so far, from its telemetry.
async fn sink_accepted(telemetry: u16, signal: Signal) -> u64 {
    let page = reqwest::get(format!("http://127.0.0.1:{telemetry}/metrics"))
        .await
        .expect("sink telemetry")
        .text()
        .await
        .expect("sink telemetry page");
    let label = format!("signal=\"{signal}\"");
    page.lines()
        .filter(|l| l.starts_with("podscope_receiver_accepted_items_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Sink {
    _agent: AgentProcess,
    grpc: u16,
    telemetry: u16,
}

async fn measure(peer: Peer, row: Row, body: &Bytes, seconds: f64, sink: &Sink) -> Measured {
    let port = free_port();
    let collector = start(peer, row, port, sink.grpc).await;
    let before = sink_accepted(sink.telemetry, row.signal).await;
    let cpu_before = cpu_seconds(collector.pid());
    let items = load(row, port, body.clone(), seconds).await;
    if let Output::Export(_) = row.output {
        // Everything acknowledged reaches the sink before the collector is stopped, so the CPU
        // figure includes exporting it all.
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink_accepted(sink.telemetry, row.signal).await - before < items {
            assert!(
                Instant::now() < deadline,
                "the sink did not get all {items} items from the collector within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (cpu_total, peak_rss_mib) = collector.stop();
    Measured {
        ns_per_item: (cpu_total - cpu_before) * 1e9 / items as f64,
        peak_rss_mib,
        items,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (seconds, rounds) = if full {
        (env("BENCH_SECONDS", 5.0), env("BENCH_ROUNDS", 3.0) as usize)
    } else {
        (0.5, 1)
    };
    let mut rows = Vec::new();
    for signal in [Signal::Traces, Signal::Metrics] {
        for output in [
            Output::Discard,
            Output::Export("none"),
            Output::Export("gzip"),
        ] {
            for protocol in [Protocol::Http, Protocol::Grpc] {
                rows.push(Row {
                    signal,
                    protocol,
                    output,
                });
            }
        }
    }
    if !full {
        rows.retain(|r| {
            (r.signal == Signal::Traces
                && r.protocol == Protocol::Grpc
                && r.output == Output::Discard)
                || (r.signal == Signal::Metrics
                    && r.protocol == Protocol::Http
                    && r.output == Output::Export("gzip"))
        });
    }
    let body = |signal: Signal| {
        let batch = match signal {
            Signal::Traces => fake_otlp::service_spans(ITEMS_PER_REQUEST),
            Signal::Metrics => fake_otlp::service_points(ITEMS_PER_REQUEST),
            Signal::Profiles | Signal::Logs => {
                unreachable!("no row of this signal: the comparison is of traces and metrics")
            }
        };
        otlp(signal).encode_request(&batch, Encoding::Protobuf)
    };
    let bodies = [body(Signal::Traces), body(Signal::Metrics)];
    let body_of = |signal: Signal| &bodies[(signal == Signal::Metrics) as usize];

    let sink_grpc = free_port();
    let sink_telemetry = free_port();
    let sink_config = format!(
        "receivers:\n  otlp: {{protocols: {{grpc: {{endpoint: \"127.0.0.1:{sink_grpc}\", max_recv_msg_size_mib: 64}}}}}}\nexporters:\n  nop:\nservice:\n  telemetry: {{metrics: {{address: \"127.0.0.1:{sink_telemetry}\"}}, logs: {{level: warn}}}}\n  pipelines:\n    traces: {{receivers: [otlp], exporters: [nop]}}\n    metrics: {{receivers: [otlp], exporters: [nop]}}\n"
    );
    let sink = Sink {
        _agent: AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &sink_config, sink_telemetry)
            .await,
        grpc: sink_grpc,
        telemetry: sink_telemetry,
    };

    println!(
        "{} rounds of {seconds} s per collector and row, {} B per span request, {} B per data point request; load average at start {}",
        rounds,
        bodies[0].len(),
        bodies[1].len(),
        load_average()
    );
    // results[row] = per round (podscope, rotel)
    let mut results: Vec<Vec<(Measured, Measured)>> = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for (i, row) in rows.iter().enumerate() {
            let order = if (round + i) % 2 == 0 {
                [Peer::Podscope, Peer::Rotel]
            } else {
                [Peer::Rotel, Peer::Podscope]
            };
            let mut podscope = None;
            let mut rotel = None;
            for peer in order {
                let m = measure(peer, *row, body_of(row.signal), seconds, &sink).await;
                match peer {
                    Peer::Podscope => podscope = Some(m),
                    Peer::Rotel => rotel = Some(m),
                }
            }
            let (p, r) = (podscope.unwrap(), rotel.unwrap());
            println!(
                "round {} | {:<52} | podscope {:>6.0} ns/item {:>6.1} MiB {:>9} items | rotel {:>6.0} ns/item {:>6.1} MiB {:>9} items | ratio {:.2}",
                round + 1,
                row.name(),
                p.ns_per_item,
                p.peak_rss_mib,
                p.items,
                r.ns_per_item,
                r.peak_rss_mib,
                r.items,
                p.ns_per_item / r.ns_per_item
            );
            results[i].push((p, r));
        }
    }
    println!("load average at the end {}", load_average());
    println!();
    println!("| path | podscope ns CPU/item | rotel ns CPU/item | ratio (median of rounds) | peak RSS podscope / rotel (MiB) |");
    println!("|---|---|---|---|---|");
    for (row, measured) in rows.iter().zip(&results) {
        let p = median(measured.iter().map(|m| m.0.ns_per_item).collect());
        let r = median(measured.iter().map(|m| m.1.ns_per_item).collect());
        let ratio = median(
            measured
                .iter()
                .map(|m| m.0.ns_per_item / m.1.ns_per_item)
                .collect(),
        );
        let p_rss = median(measured.iter().map(|m| m.0.peak_rss_mib).collect());
        let r_rss = median(measured.iter().map(|m| m.1.peak_rss_mib).collect());
        println!(
            "| {} | {p:.0} | {r:.0} | {ratio:.2} | {p_rss:.0} / {r_rss:.0} |",
            row.name()
        );
    }
    drop(sink);
}
