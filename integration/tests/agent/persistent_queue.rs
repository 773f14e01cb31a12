//! The persistent sending queue end to end, through the real `podscope` binary: a real OTLP
//! client (the opentelemetry-otlp span exporter) sends spans at a steady pace to the `otlp`
//! receiver; the pipeline has no entry queue and no batch processor, and the `otlp` exporter keeps
//! its queue in a `file_storage` extension; the backend is an OTLP receiver this project did not
//! write (the `oteltest` sinks: grpcio and the official Python `opentelemetry-proto`, see
//! `exporters/tests/oteltest_sink.py`).
//!
//! 1. The backend goes down and comes back: what was acknowledged meanwhile arrives, without a
//!    restart of the agent.
//! 2. The backend goes down again, the agent is SIGKILLed with a backlog on disk, restarted,
//!    and the backend comes back: every span the client was told was accepted arrives. Only the
//!    requests in flight at the kill may arrive twice (at least once where the backend had not
//!    acknowledged them before the kill, documented in docs/reliability.md).
//!
//! Longer variants (minutes of outage, repeated kills): `scripts/faults.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use podscope_integration::agent::{free_port, AgentProcess};
use tokio_util::sync::CancellationToken;

const SPANS_PER_EXPORT: u64 = 20;

fn span(export: u64, index: u64) -> SpanData {
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from((export as u128) + 1),
            SpanId::from(index + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: format!("request-{export}-{index}").into(),
        start_time: now,
        end_time: now + Duration::from_millis(3),
        attributes: vec![opentelemetry::KeyValue::new("http.request.method", "GET")],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Ok,
        instrumentation_scope: InstrumentationScope::builder("faults").build(),
    }
}

/// The oteltest sinks on a fixed gRPC port; every span name they decode goes into `received`
/// (with how often). Killed on drop.
struct Sink {
    child: Child,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Received = Arc<Mutex<BTreeMap<String, usize>>>;

fn start_sink(grpc_port: u16, received: &Received) -> Sink {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/oteltest/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps.sh (it installs oteltest from PyPI there)",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(root.join("exporters/tests/oteltest_sink.py"))
        .args([grpc_port.to_string(), free_port().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the oteltest sink");
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready) = mpsc::channel();
    let received = received.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line == "ready" {
                let _ = ready_tx.send(());
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            let mut received = received.lock().unwrap();
            for resource in value["request"]["resourceSpans"]
                .as_array()
                .into_iter()
                .flatten()
            {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let name = span["name"].as_str().unwrap_or_default().to_string();
                        *received.entry(name).or_default() += 1;
                    }
                }
            }
        }
    });
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("the sink starts within 30 s");
    Sink { child }
}

fn config(grpc_port: u16, sink_port: u16, telemetry_port: u16, storage: &Path) -> String {
    format!(
        r#"
extensions:
  file_storage:
    directory: {storage}
    fsync: true
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  otlp:
    endpoint: http://127.0.0.1:{sink_port}
    sending_queue:
      num_consumers: 2
      storage: file_storage
    retry_on_failure:
      initial_interval: 50ms
      max_interval: 200ms
      max_elapsed_time: 0s
service:
  extensions: [file_storage]
  shutdown_timeout: 5s
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [otlp]
      queue:
        enabled: false
"#,
        storage = storage.display()
    )
}

/// A client sending `SPANS_PER_EXPORT` spans every 20 ms until stopped; the spans of each
/// export it was told succeeded go into `acked`.
struct Load {
    acked: Arc<Mutex<BTreeSet<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(grpc_port: u16) -> Load {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (acked, stop) = (acked.clone(), stop.clone());
            async move {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(format!("http://127.0.0.1:{grpc_port}"))
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut export = 0u64;
                while !stop.is_cancelled() {
                    let spans: Vec<SpanData> =
                        (0..SPANS_PER_EXPORT).map(|i| span(export, i)).collect();
                    if exporter.export(spans).await.is_ok() {
                        acked
                            .lock()
                            .unwrap()
                            .extend((0..SPANS_PER_EXPORT).map(|i| format!("request-{export}-{i}")));
                    }
                    export += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Load { acked, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` spans beyond the current count were acknowledged.
    async fn wait_for_more(&self, more: usize) {
        let target = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "the client's exports stopped being acknowledged: {} of {target}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> BTreeSet<String> {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Waits until every name in `expected` was received, or fails naming how many are missing.
async fn wait_received(received: &Received, expected: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let received = received.lock().unwrap();
            expected
                .iter()
                .filter(|n| !received.contains_key(*n))
                .count()
        };
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {missing} of {} acknowledged spans never arrived",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_a_backend_outage_and_a_sigkill() {
    let storage = tempfile::tempdir().unwrap();
    let (grpc_port, sink_port, telemetry_port) = (free_port(), free_port(), free_port());
    let config = config(grpc_port, sink_port, telemetry_port, storage.path());
    let binary = env!("CARGO_BIN_EXE_podscope");
    let received: Received = Arc::default();

    let sink = start_sink(sink_port, &received);
    let agent = AgentProcess::start(binary, &config, telemetry_port).await;
    let load = Load::start(grpc_port);
    load.wait_for_more(200).await;

    // 1. The backend goes away and comes back; the agent keeps acknowledging meanwhile.
    drop(sink);
    match env_u64("PODSCOPE_FAULTS_OUTAGE_SECS") {
        // scripts/faults.sh: the outage lasts this long under load.
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => load.wait_for_more(400).await,
    }
    let sink = start_sink(sink_port, &received);
    let acked_so_far = load.acked.lock().unwrap().clone();
    wait_received(&received, &acked_so_far, "after the backend came back").await;

    // 2. Down again, a backlog builds up on disk, and the agent is killed (scripts/faults.sh:
    // several times) and restarted.
    drop(sink);
    let kills = env_u64("PODSCOPE_FAULTS_KILLS").unwrap_or(1);
    let mut agent = agent;
    let mut backlog = 0;
    for _ in 0..kills {
        load.wait_for_more(400).await;
        agent.sigkill();
        backlog = queued_requests(storage.path());
        assert!(backlog > 0, "the kill left nothing queued on disk");
        agent = AgentProcess::start(binary, &config, telemetry_port).await;
    }
    // The backlog found at start is in the agent's gauges (the backend is down: none sent yet,
    // and new requests add to it).
    let metrics_url = format!("http://127.0.0.1:{telemetry_port}/metrics");
    let held = "podscope_file_storage_requests{storage=\"file_storage\",queue=\"exporter/otlp\",signal=\"traces\"} ";
    let metrics = scrape(&metrics_url).await;
    assert!(
        counter(&metrics, held) >= backlog as u64,
        "{backlog} requests on disk at start: {metrics}"
    );
    let _sink = start_sink(sink_port, &received);
    load.wait_for_more(200).await;
    let acked = load.finish().await;
    wait_received(&received, &acked, "after the SIGKILL and restart").await;
    // Everything sent: the queue is empty on disk and in the gauges.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = scrape(&metrics_url).await;
        if counter(&metrics, held) == 0 && queued_requests(storage.path()) == 0 {
            assert!(metrics.contains(held), "{metrics}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never emptied: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(20)).await.success());
    let received = received.lock().unwrap();
    let twice: usize = received.values().filter(|&&n| n > 1).count();
    // Only what was on the wire when the backend went down (twice) or the agent died can come
    // twice: at most one request per consumer (2), each time.
    assert!(
        twice <= (2 + kills as usize) * 2 * SPANS_PER_EXPORT as usize,
        "{twice} spans arrived more than once"
    );
    eprintln!(
        "acknowledged {} spans, received {} distinct, {twice} more than once, backlog at the kill {backlog} requests",
        acked.len(),
        received.len()
    );
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// Request files in the exporter's queue folder.
fn queued_requests(storage: &Path) -> usize {
    std::fs::read_dir(storage.join("exporter_otlp"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "req"))
        .count()
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount (the test needs root)");
        assert!(status.success(), "mount -t tmpfs (the test needs root)");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The agent's own metrics page.
async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_and_counts_and_the_agent_keeps_running() {
    let disk = Tmpfs::mount("256k");
    let (grpc_port, sink_port, telemetry_port) = (free_port(), free_port(), free_port());
    let config = config(grpc_port, sink_port, telemetry_port, disk.dir.path());
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let metrics_url = format!("http://127.0.0.1:{telemetry_port}/metrics");
    let full = "podscope_exporter_dropped_items_total{component=\"otlp\",signal=\"traces\",reason=\"storage_full\"} ";

    // The backend is down: requests pile up on the 256 KiB filesystem until it is full.
    let load = Load::start(grpc_port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = scrape(&metrics_url).await;
        if counter(&metrics, full) >= 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disk never filled: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still taking data (and counting what it cannot keep).
    load.wait_for_more(100).await;
    let acked = load.finish().await;

    let received: Received = Arc::default();
    let _sink = start_sink(sink_port, &received);
    let metrics = scrape(&metrics_url).await;
    let dropped = counter(&metrics, full) as usize;
    let stored = acked.len() - dropped;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().len() < stored {
        assert!(Instant::now() < deadline, "stored spans never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(20)).await.success());
    let received = received.lock().unwrap();
    assert_eq!(
        received.len(),
        stored,
        "every span is sent or counted as dropped, once"
    );
    assert!(received.keys().all(|name| acked.contains(name)));
    eprintln!(
        "acknowledged {}, dropped storage_full {dropped}, delivered {}",
        acked.len(),
        received.len()
    );
}
