//! Exporter throughput, in one run:
//! - OTLP/gRPC encode + send: spans/s and metric points/s from podscope's `otlp` exporter (in this
//!   process, sending queue on, 4 consumers) to a real `podscope` agent (`otlp` → `nop`) in
//!   another process; "per core" divides by this process's CPU time (the exporter's side).
//! - The same with the persistent sending queue (`sending_queue.storage`, a `file_storage` in a
//!   temporary directory, with and without fsync), and its disk bytes per item.
//! - Prometheus remote write: samples/s through translation, protobuf, snappy and HTTP to a sink.
//! - `/metrics` render time and size for 100,000 series.
//!
//! Run: `cargo bench --bench exporters` (`BENCH_BATCHES` for another count of 500-item batches
//! than 4000). Under `cargo test` it is a quick smoke run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podscope_core::config::parse_component_config;
use podscope_core::{Batch, BuildContext, ComponentId, ComponentKind, Exporter, ExporterBuilder};
use podscope_exporters::file_storage::{FileStorage, FileStorageConfig, StorageMetrics};
use podscope_exporters::otlp::OtlpGrpcConfig;
use podscope_exporters::prometheus::{PrometheusConfig, Settings, Store};
use podscope_exporters::prometheusremotewrite::RemoteWriteConfig;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_testkit::fake_otlp;
use podscope_testkit::BuildContextForTests as _;

const ITEMS_PER_BATCH: usize = 500;

fn spans() -> Batch {
    fake_otlp::spans(ITEMS_PER_BATCH, &[("service.name", "checkout")])
}

fn points(series_offset: usize, n: usize) -> Batch {
    fake_otlp::syscall_points(
        n,
        series_offset,
        &[("host.name", "node-1"), ("k8s.pod.name", "cart-1")],
    )
}

/// CPU seconds used by this process so far.
fn own_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

async fn drive(exporter: &Arc<dyn Exporter>, batch: &Batch, batches: usize) -> (f64, f64) {
    let (cpu0, t0) = (own_cpu(), Instant::now());
    for _ in 0..batches {
        exporter
            .consume(batch.clone())
            .await
            .expect("queue accepts");
    }
    exporter.shutdown().await.expect("drains");
    (t0.elapsed().as_secs_f64(), own_cpu() - cpu0)
}

/// An `otlp` exporter (4 consumers, gzip) whose queue is in a `file_storage` at `dir`.
fn stored_otlp(port: u16, dir: &std::path::Path, fsync: bool) -> Arc<dyn Exporter> {
    let storage = FileStorage::open(
        FileStorageConfig {
            directory: dir.to_path_buf(),
            fsync,
            ..Default::default()
        },
        "file_storage",
        StorageMetrics::default(),
    )
    .unwrap();
    let mut ctx = BuildContext::for_tests("otlp");
    let storage_id = ComponentId::parse("file_storage").unwrap();
    ctx.extensions.insert(storage_id.clone(), Arc::new(storage));
    ctx.extensions
        .add_user(ComponentKind::Exporter, ctx.id.clone(), storage_id);
    let config: OtlpGrpcConfig = parse_component_config(serde_json::json!({
        "endpoint": format!("http://127.0.0.1:{port}"),
        "sending_queue": {"queue_size": 200_000, "num_consumers": 4, "storage": "file_storage"}
    }))
    .unwrap();
    Box::new(config).build(ctx).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // BENCH_BATCHES: another count (e.g. a shorter run on a loaded machine).
    let batches = match std::env::var("BENCH_BATCHES") {
        Ok(n) => n.parse().expect("BENCH_BATCHES is a number"),
        Err(_) if full => 4000,
        Err(_) => 20,
    };

    let grpc_port = free_port();
    let telemetry_port = free_port();
    let config = format!(
        "receivers:\n  otlp: {{protocols: {{grpc: {{endpoint: \"127.0.0.1:{grpc_port}\", max_recv_msg_size_mib: 64}}}}}}\nexporters:\n  nop:\nservice:\n  telemetry: {{metrics: {{address: \"127.0.0.1:{telemetry_port}\"}}, logs: {{level: warn}}}}\n  pipelines:\n    traces: {{receivers: [otlp], exporters: [nop]}}\n    metrics: {{receivers: [otlp], exporters: [nop]}}\n"
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let otlp = |compression: &str| -> Arc<dyn Exporter> {
        let config: OtlpGrpcConfig = parse_component_config(serde_json::json!({
            "endpoint": format!("http://127.0.0.1:{grpc_port}"),
            "compression": compression,
            "sending_queue": {"queue_size": 200_000, "num_consumers": 4}
        }))
        .unwrap();
        Box::new(config)
            .build(BuildContext::for_tests("otlp"))
            .unwrap()
    };
    println!("{:<44} {:>14} {:>16}", "", "items/s", "items/s per core");
    for compression in ["none", "gzip"] {
        for (name, batch) in [
            ("spans", spans()),
            ("metric points", points(0, ITEMS_PER_BATCH)),
        ] {
            let exporter = otlp(compression);
            exporter.start().await.unwrap();
            let (wall, cpu) = drive(&exporter, &batch, batches).await;
            let items = (batches * ITEMS_PER_BATCH) as f64;
            println!(
                "{:<44} {:>14.0} {:>16.0}",
                format!("otlp/gRPC {name}, compression {compression}"),
                items / wall,
                items / cpu.max(1e-3)
            );
        }
    }
    // The persistent queue: every request written (and with fsync flushed) before `consume`
    // returns, deleted once sent.
    for fsync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let exporter = stored_otlp(grpc_port, dir.path(), fsync);
        exporter.start().await.unwrap();
        let (wall, cpu) = drive(&exporter, &spans(), batches).await;
        let items = (batches * ITEMS_PER_BATCH) as f64;
        println!(
            "{:<44} {:>14.0} {:>16.0}",
            format!("otlp/gRPC spans, gzip, persistent, fsync {fsync}"),
            items / wall,
            items / cpu.max(1e-3)
        );
    }
    // Disk bytes per item: one batch queued while nothing listens.
    let dir = tempfile::tempdir().unwrap();
    let exporter = stored_otlp(free_port(), dir.path(), false);
    exporter.start().await.unwrap();
    exporter.consume(spans()).await.unwrap();
    let queued: u64 = std::fs::read_dir(dir.path().join("exporter_otlp"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // The backend never comes: giving up at the deadline keeps the file (dropping the future).
    let _ = tokio::time::timeout(Duration::from_millis(100), exporter.shutdown()).await;
    println!(
        "persistent queue on disk: {queued} bytes for {ITEMS_PER_BATCH} spans, {:.1} bytes/span",
        queued as f64 / ITEMS_PER_BATCH as f64
    );
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(30)).await.success());

    // Remote write into a sink that counts what it got.
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/write",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(body.len() as u64, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/write", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config: RemoteWriteConfig = parse_component_config(serde_json::json!({
        "endpoint": url, "sending_queue": {"queue_size": 200_000, "num_consumers": 2}
    }))
    .unwrap();
    let exporter: Arc<dyn Exporter> = Box::new(config)
        .build(BuildContext::for_tests("prometheusremotewrite"))
        .unwrap();
    exporter.start().await.unwrap();
    let rw_batches = batches / 4;
    let batch = points(0, 2000);
    let (wall, cpu) = drive(&exporter, &batch, rw_batches).await;
    let samples = (rw_batches * 2000) as f64;
    println!(
        "{:<44} {:>14.0} {:>16.0}",
        "remote write samples (2000 series/batch)",
        samples / wall,
        samples / cpu.max(1e-3)
    );
    assert!(received.load(Ordering::Relaxed) > 0);

    // /metrics with 100,000 series.
    let defaults = PrometheusConfig::default();
    let mut store = Store::new(Settings {
        namespace: String::new(),
        add_metric_suffixes: true,
        add_scope_labels: true,
        all_resource_attributes: false,
        promoted: defaults.promoted_resource_attributes,
        expiration: Duration::from_secs(300),
    });
    let series = if full { 100_000 } else { 1_000 };
    for offset in (0..series).step_by(10_000.min(series)) {
        let Batch::Metrics(rms) = points(offset, 10_000.min(series)) else {
            unreachable!()
        };
        store.apply(&rms, Instant::now());
    }
    let runs = if full { 10 } else { 1 };
    let t0 = Instant::now();
    let mut bytes = 0;
    for _ in 0..runs {
        bytes = store.render(false).len();
    }
    println!(
        "/metrics render, {} series: {:.1} ms, {:.1} MiB",
        store.series_count(),
        t0.elapsed().as_secs_f64() * 1000.0 / runs as f64,
        bytes as f64 / 1048576.0
    );
}
