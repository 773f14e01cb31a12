//! The fault suite's exporter cases (issue 17 point 5), through the real `podscope` binary: an
//! OTLP/gRPC client sends spans to the agent's `otlp` receiver, and its `otlphttp` exporter sends
//! them on to a backend on loopback that answers from a script, as a struggling backend does:
//! slowly (past the exporter's `timeout`), with 5xx, with 429 and `Retry-After`, or with a
//! permanent 4xx. The backend records when each attempt arrived, so the retry timing is observed
//! where it matters; the agent's own counters say what it did. Each case takes a few seconds.
//!
//! `scripts/faults.sh backend` runs them with longer waits (`PODSCOPE_FAULTS_RETRY_AFTER_SECS`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use podscope_integration::agent::{free_port, AgentProcess};

/// What the backend does with one attempt.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// This status, with this `Retry-After` (seconds) if any; the data is not kept.
    Refuse(u16, Option<u64>),
    /// Take this long, then accept.
    Slow(Duration),
}

/// One attempt as the backend saw it.
#[derive(Debug, Clone)]
struct Attempt {
    at: Instant,
    spans: Vec<String>,
}

#[derive(Default)]
struct BackendState {
    /// Answers for the next attempts, first first; then every attempt is accepted.
    script: Vec<Answer>,
    attempts: Vec<Attempt>,
    /// Span name → how often it was accepted.
    accepted: BTreeMap<String, usize>,
}

#[derive(Clone)]
struct Backend {
    port: u16,
    state: Arc<Mutex<BackendState>>,
}

fn span_names(body: &[u8]) -> Vec<String> {
    let request: serde_json::Value = serde_json::from_slice(body).expect("an OTLP/JSON request");
    let mut names = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                names.push(span["name"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    names
}

async fn backend(script: Vec<Answer>) -> Backend {
    let state = Arc::new(Mutex::new(BackendState {
        script,
        ..Default::default()
    }));
    let shared = state.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let state = shared.clone();
            async move {
                let spans = span_names(&body);
                let answer = {
                    let mut state = state.lock().unwrap();
                    let answer = (!state.script.is_empty()).then(|| state.script.remove(0));
                    state.attempts.push(Attempt {
                        at: Instant::now(),
                        spans: spans.clone(),
                    });
                    answer
                };
                match answer {
                    Some(Answer::Refuse(status, retry_after)) => {
                        let mut response =
                            (StatusCode::from_u16(status).unwrap(), "scripted refusal")
                                .into_response();
                        if let Some(seconds) = retry_after {
                            response
                                .headers_mut()
                                .insert("retry-after", seconds.to_string().parse().unwrap());
                        }
                        return response;
                    }
                    // A client that gave up drops this future: what it sent is not kept.
                    Some(Answer::Slow(delay)) => tokio::time::sleep(delay).await,
                    None => {}
                }
                let mut kept = state.lock().unwrap();
                for name in spans {
                    *kept.accepted.entry(name).or_default() += 1;
                }
                ([("content-type", "application/json")], "{}".to_string()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Backend { port, state }
}

/// An agent whose `otlphttp` exporter sends to `backend`: JSON without compression (the backend
/// reads it), retries from 100 ms doubling to 400 ms without jitter, each attempt at most 1 s.
async fn agent(backend: &Backend) -> (AgentProcess, u16, u16) {
    let (grpc_port, telemetry_port) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:{backend_port}
    encoding: json
    compression: none
    timeout: 1s
    retry_on_failure:
      initial_interval: 100ms
      multiplier: 2
      max_interval: 400ms
      randomization_factor: 0
      max_elapsed_time: 60s
service:
  shutdown_timeout: 2s
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [otlphttp]
"#,
        backend_port = backend.port
    );
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    (agent, grpc_port, telemetry_port)
}

/// Sends one export request of `n` spans named `<prefix>-<i>`; the agent accepts it.
async fn send_spans(grpc_port: u16, prefix: &str, n: usize) {
    let spans = (0..n)
        .map(|i| Span {
            trace_id: vec![1; 16],
            span_id: ((i as u64) + 1).to_be_bytes().to_vec(),
            name: format!("{prefix}-{i}"),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_003_000_000,
            ..Default::default()
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "faults".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut client = TraceServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .expect("connect to the agent's OTLP receiver");
    client
        .export(request)
        .await
        .expect("the agent accepts the spans");
}

async fn agent_metrics(telemetry_port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{telemetry_port}/metrics"))
        .await
        .expect("agent /metrics")
        .text()
        .await
        .unwrap()
}

/// The value of the series `series` (name and labels, exactly as exposed), 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Polls the agent's counters until `condition` holds, at most 90 s (the long variant's
/// `Retry-After` is 30 s).
async fn until_metrics(
    telemetry_port: u16,
    what: &str,
    condition: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = agent_metrics(telemetry_port).await;
        if condition(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen within 90 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SENT: &str = r#"podscope_exporter_sent_items_total{component="otlphttp",signal="traces"}"#;

fn failures(reason: &str) -> String {
    format!(r#"podscope_exporter_send_failures_total{{component="otlphttp",reason="{reason}"}}"#)
}

fn dropped(reason: &str) -> String {
    format!(
        r#"podscope_exporter_dropped_items_total{{component="otlphttp",signal="traces",reason="{reason}"}}"#
    )
}

/// SIGTERM, and a clean exit within 10 s (no crash after the fault).
async fn stop(agent: AgentProcess) {
    agent.sigterm();
    let status = agent.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "podscope exited with {status}");
}

fn assert_no_drops(text: &str) {
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("podscope_exporter_dropped_items_total{")),
        "nothing may be dropped:\n{text}"
    );
}

fn snapshot(backend: &Backend) -> (Vec<Attempt>, BTreeMap<String, usize>) {
    let state = backend.state.lock().unwrap();
    (state.attempts.clone(), state.accepted.clone())
}

fn names(prefix: &str, n: usize) -> BTreeMap<String, usize> {
    (0..n).map(|i| (format!("{prefix}-{i}"), 1)).collect()
}

/// The time between attempts, as the backend saw them (printed for BENCHMARKS.md).
fn gaps(attempts: &[Attempt]) -> Vec<Duration> {
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    eprintln!("attempts {}, gaps between them {gaps:?}", attempts.len());
    gaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_retried_no_sooner_than_the_backend_asks() {
    let wait: u64 = std::env::var("PODSCOPE_FAULTS_RETRY_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let backend = backend(vec![
        Answer::Refuse(429, Some(wait)),
        Answer::Refuse(429, Some(1)),
    ])
    .await;
    let (agent, grpc_port, telemetry_port) = agent(&backend).await;
    send_spans(grpc_port, "throttled", 5).await;
    let text = until_metrics(telemetry_port, "5 spans sent", |t| value(t, SENT) == 5.0).await;

    let (attempts, accepted) = snapshot(&backend);
    assert_eq!(
        attempts.len(),
        3,
        "two refusals, then the attempt that passed: {attempts:?}"
    );
    let gaps = gaps(&attempts);
    // The backoff alone would have retried after 100 ms and 200 ms.
    assert!(
        gaps[0] >= Duration::from_secs(wait),
        "first retry after {:?}, Retry-After {wait} s",
        gaps[0]
    );
    assert!(
        gaps[1] >= Duration::from_secs(1),
        "second retry after {:?}, Retry-After 1 s",
        gaps[1]
    );
    assert!(
        attempts.iter().all(|a| a.spans.len() == 5),
        "each attempt carries the whole batch"
    );
    assert_eq!(accepted, names("throttled", 5), "every span accepted once");
    assert_eq!(value(&text, &failures("http_429")), 2.0, "{text}");
    assert_no_drops(&text);
    stop(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_5xx_are_retried_with_growing_backoff_until_the_backend_recovers() {
    let backend = backend(vec![
        Answer::Refuse(503, None),
        Answer::Refuse(502, None),
        Answer::Refuse(504, None),
        Answer::Refuse(503, None),
    ])
    .await;
    let (agent, grpc_port, telemetry_port) = agent(&backend).await;
    send_spans(grpc_port, "unavailable", 4).await;
    let text = until_metrics(telemetry_port, "4 spans sent", |t| value(t, SENT) == 4.0).await;

    let (attempts, accepted) = snapshot(&backend);
    assert_eq!(
        attempts.len(),
        5,
        "four refusals, then the attempt that passed: {attempts:?}"
    );
    let gaps = gaps(&attempts);
    // initial_interval 100 ms, doubling, capped at max_interval 400 ms, no jitter.
    for (gap, least) in gaps.iter().zip([100, 200, 400, 400]) {
        assert!(
            *gap >= Duration::from_millis(least),
            "retry after {gap:?}, backoff {least} ms: {gaps:?}"
        );
    }
    assert_eq!(
        accepted,
        names("unavailable", 4),
        "every span accepted once"
    );
    assert_eq!(value(&text, &failures("http_503")), 2.0, "{text}");
    assert_eq!(value(&text, &failures("http_502")), 1.0, "{text}");
    assert_eq!(value(&text, &failures("http_504")), 1.0, "{text}");
    assert_no_drops(&text);
    stop(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_4xx_is_dropped_and_counted_and_never_retried() {
    let backend = backend(vec![Answer::Refuse(400, None)]).await;
    let (agent, grpc_port, telemetry_port) = agent(&backend).await;
    send_spans(grpc_port, "malformed", 3).await;
    // Dropped means given up: the batch is gone, no retry can follow.
    let text = until_metrics(telemetry_port, "3 spans dropped", |t| {
        value(t, &dropped("http_400")) == 3.0
    })
    .await;
    assert_eq!(value(&text, &failures("http_400")), 1.0, "{text}");
    assert_eq!(value(&text, SENT), 0.0, "{text}");

    // The exporter goes on: the next batch is sent, and the refused one never came back.
    send_spans(grpc_port, "fine", 2).await;
    until_metrics(telemetry_port, "2 spans sent", |t| value(t, SENT) == 2.0).await;
    let (attempts, accepted) = snapshot(&backend);
    assert_eq!(
        attempts.len(),
        2,
        "the refused batch once, then the next: {attempts:?}"
    );
    assert_eq!(attempts[0].spans.len(), 3);
    assert_eq!(accepted, names("fine", 2));
    stop(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_the_timeout_is_given_up_on_and_retried() {
    // The first attempt would take a minute; the exporter's timeout is 1 s. Had the exporter
    // waited for it, there would be no second attempt before the test ends.
    let backend = backend(vec![Answer::Slow(Duration::from_secs(60))]).await;
    let (agent, grpc_port, telemetry_port) = agent(&backend).await;
    send_spans(grpc_port, "slow", 3).await;
    let text = until_metrics(telemetry_port, "3 spans sent", |t| value(t, SENT) == 3.0).await;
    let (attempts, accepted) = snapshot(&backend);
    assert_eq!(
        attempts.len(),
        2,
        "the slow attempt, then the retry: {attempts:?}"
    );
    let gap = gaps(&attempts)[0];
    // Given up after the 1 s timeout (counted from before the request reached the backend),
    // then retried after the 100 ms backoff.
    assert!(gap >= Duration::from_secs(1), "retry after {gap:?}");
    assert_eq!(
        accepted,
        names("slow", 3),
        "the abandoned attempt was not kept, the retry was"
    );
    assert_eq!(value(&text, &failures("timeout")), 1.0, "{text}");
    assert_no_drops(&text);
    stop(agent).await;
}

/// A program with one function to trace: it reads counts from stdin, calls `fault_step` that
/// many times for each, and says `done <round>` after each; it exits at the end of its input.
const UPROBE_TARGET_C: &str = r#"
#include <stdio.h>
__attribute__((noinline, used)) int fault_step(int i) { __asm__ volatile(""); return i * 2 + 1; }
int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    int n, rounds = 0;
    long sum = 0;
    while (scanf("%d", &n) == 1) {
        for (int i = 0; i < n; i++) sum += fault_step(i);
        printf("done %d\n", ++rounds);
    }
    return sum < 0;
}
"#;

/// The calls the agent's Prometheus exporter shows for the `fault_steps` counter (every series).
async fn fault_steps(prometheus_port: u16) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{prometheus_port}/metrics"))
        .await
        .expect("the agent's prometheus exporter")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            name == "fault_steps" || name == "fault_steps_total"
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn until_fault_steps(prometheus_port: u16, calls: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = fault_steps(prometheus_port).await;
        if seen == calls {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fault_steps is {seen} after 30 s, want {calls}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most 30 s) until `file` holds the line `line`.
async fn until_line(file: &std::path::Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(file).is_ok_and(|t| t.lines().any(|l| l == line)) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in {} after 30 s",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A uprobe's binary deleted while attached, then its process (the container's) exiting and its
/// cgroup removed: the agent keeps counting on the deleted file's inode, keeps running and
/// stops cleanly; started again with the binary gone, it skips the entry and says so
/// (`podscope_ebpf_probe_skipped{probe="uprobes"} 1`) and runs without it. Root only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uprobe_target_deleted_and_its_container_exiting_leave_the_agent_running() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let target = podscope_integration::test_programs::compile_c(
        dir.path(),
        "fault-target",
        UPROBE_TARGET_C,
        &["-O1"],
    );
    let fifo = dir.path().join("commands");
    let out = dir.path().join("out");
    let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0, "mkfifo");

    let (prometheus_port, telemetry_port) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  ebpf:
    collection_interval: 1s
    probes:
      uprobes:
        - binary: {target}
          symbol: fault_step
          metric:
            name: fault_steps
exporters:
  prometheus:
    endpoint: 127.0.0.1:{prometheus_port}
service:
  shutdown_timeout: 2s
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [ebpf]
      exporters: [prometheus]
"#,
        target = target.display()
    );
    // The kernel memory of the entry's hits map: there once the entry is loaded; a hash map
    // without preallocation, it grows with the series in it and shrinks when they are removed.
    let hits_memory = r#"podscope_ebpf_map_memory_bytes{probe="uprobes",map="uprobe_hits"}"#;
    let skipped = r#"podscope_ebpf_probe_skipped{probe="uprobes"}"#;
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let text = agent_metrics(telemetry_port).await;
    assert!(
        value(&text, hits_memory) > 0.0,
        "the uprobe entry is loaded:\n{text}"
    );
    assert_eq!(value(&text, skipped), 0.0, "{text}");

    let mut pod = podscope_testkit::PodCgroup::new();
    pod.spawn_shell(&format!(
        "exec {} < {} > {}",
        target.display(),
        fifo.display(),
        out.display()
    ));
    // Opening a FIFO for writing waits for its reader: the program has started.
    let mut commands =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo))
            .await
            .unwrap()
            .expect("open the program's input");
    writeln!(commands, "5").unwrap();
    until_line(&out, "done 1").await;
    until_fault_steps(prometheus_port, 5.0).await;

    // The binary is deleted while attached and running: the probe is on its inode, still there.
    std::fs::remove_file(&target).unwrap();
    writeln!(commands, "3").unwrap();
    until_line(&out, "done 2").await;
    until_fault_steps(prometheus_port, 8.0).await;
    let with_series = value(&agent_metrics(telemetry_port).await, hits_memory);

    // The container's process exits and its cgroup goes.
    drop(commands);
    let events = pod.path().join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&events).is_ok_and(|e| e.contains("populated 0")) {
        assert!(
            Instant::now() < deadline,
            "the program did not exit at the end of its input"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(pod);
    // Collections go on past the exit: the exited process's series is reported a last time,
    // then removed from the kernel map.
    until_metrics(telemetry_port, "the exited process's series removed", |t| {
        let memory = value(t, hits_memory);
        memory > 0.0 && memory < with_series
    })
    .await;
    until_fault_steps(prometheus_port, 8.0).await;
    stop(agent).await;

    // Started again with the binary gone: the entry is skipped, counted, and the agent runs.
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let text = agent_metrics(telemetry_port).await;
    assert_eq!(value(&text, skipped), 1.0, "{text}");
    stop(agent).await;
}

/// Runs podman with `args`; fails the test with podman's stderr if it fails. Returns stdout.
fn podman(args: &[&str]) -> String {
    let output = std::process::Command::new("podman")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("podman runs (scripts/install-deps.sh installs it)");
    assert!(
        output.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// An image holding only the fault target, statically linked, at `/fault-target`: built here
/// `FROM scratch` (no registry, no network); removed on drop.
struct TargetImage {
    name: String,
}

impl TargetImage {
    fn build(dir: &std::path::Path) -> TargetImage {
        let context = dir.join("image");
        std::fs::create_dir_all(&context).unwrap();
        podscope_integration::test_programs::compile_c(
            &context,
            "fault-target",
            UPROBE_TARGET_C,
            &["-O1", "-static"],
        );
        let containerfile = context.join("Containerfile");
        std::fs::write(
            &containerfile,
            "FROM scratch\nCOPY fault-target /fault-target\n",
        )
        .unwrap();
        let name = format!(
            "localhost/podscope-fault-target:{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        podman(&[
            "build",
            "--quiet",
            "--network",
            "none",
            "--tag",
            &name,
            "--file",
            containerfile.to_str().unwrap(),
            context.to_str().unwrap(),
        ]);
        TargetImage { name }
    }
}

impl Drop for TargetImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["rmi", "--force", &self.name])
            .output();
    }
}

/// The fault target running in a container of `TargetImage` under podman + runc, without a
/// network: its input is written here, its output goes to a file. Removed on drop.
struct TargetContainer {
    name: String,
    podman_run: std::process::Child,
    input: Option<std::process::ChildStdin>,
    out: std::path::PathBuf,
    /// The container's process as the host sees it.
    pid: u32,
}

impl TargetContainer {
    async fn start(image: &TargetImage, name: &str, out: std::path::PathBuf) -> TargetContainer {
        let mut podman_run = std::process::Command::new("podman")
            .args([
                "run",
                "--rm",
                "--interactive",
                "--name",
                name,
                // crun refuses hybrid cgroup hosts like this one; podman's default ulimits are
                // above what an unprivileged sandbox may set, these are not.
                "--runtime",
                "runc",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                &image.name,
                "/fault-target",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .spawn()
            .expect("podman run");
        let input = podman_run.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            let inspected = std::process::Command::new("podman")
                .args(["inspect", "--format", "{{.State.Pid}}", name])
                .output()
                .expect("podman inspect");
            let pid: u32 = String::from_utf8_lossy(&inspected.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            if pid > 0 {
                break pid;
            }
            if let Ok(Some(status)) = podman_run.try_wait() {
                panic!("podman run {name} exited before the container ran: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "container {name} not running after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        TargetContainer {
            name: name.to_string(),
            podman_run,
            input,
            out,
            pid,
        }
    }

    /// Has the program call `fault_step` `calls` times and waits until it says `done <round>`.
    async fn call(&mut self, calls: u32, round: u32) {
        use std::io::Write as _;
        let input = self.input.as_mut().expect("the container's input is open");
        writeln!(input, "{calls}").unwrap();
        input.flush().unwrap();
        until_line(&self.out, &format!("done {round}")).await;
    }

    /// Waits (at most 30 s) until `podman run` has returned, the container gone.
    async fn until_exited(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.podman_run.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "container {} still running after 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TargetContainer {
    fn drop(&mut self) {
        drop(self.input.take());
        let _ = std::process::Command::new("podman")
            .args(["rm", "--force", "--ignore", "--time", "0", &self.name])
            .output();
        let _ = self.podman_run.kill();
        let _ = self.podman_run.wait();
    }
}

/// The `fault_steps` calls of one process (its `process.pid` label) at the Prometheus exporter.
async fn fault_steps_of(prometheus_port: u16, pid: u32) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{prometheus_port}/metrics"))
        .await
        .expect("the agent's prometheus exporter")
        .text()
        .await
        .unwrap();
    let label = format!("process_pid=\"{pid}\"");
    text.lines()
        .filter(|l| l.starts_with("fault_steps") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A `container:` uprobe entry on a real container (issue 17 point 5): podman + runc run an
/// image built here, and the agent resolves the entry's path inside the container's root
/// filesystem (overlayfs). The binary is deleted inside the running container, then the
/// container is killed: every call before the faults is counted exactly, the deleted file's calls
/// too (the kernel's uprobe is on the image layer's file, which the deletion only hides), the
/// agent detaches once the container is gone and says so
/// (`podscope_ebpf_uprobe_container_detachments_total`), attaches again to the next container of
/// the image, keeps running and stops cleanly. Root only; no network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_uprobe_target_deleted_in_the_container_and_the_container_killed_leave_the_agent_running(
) {
    let dir = tempfile::tempdir().unwrap();
    let image = TargetImage::build(dir.path());
    let (prometheus_port, telemetry_port) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  ebpf:
    collection_interval: 1s
    probes:
      uprobes:
        - binary: container:/fault-target
          symbol: fault_step
          metric:
            name: fault_steps
exporters:
  prometheus:
    endpoint: 127.0.0.1:{prometheus_port}
service:
  shutdown_timeout: 2s
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [ebpf]
      exporters: [prometheus]
"#
    );
    let attachments = "podscope_ebpf_uprobe_container_attachments_total";
    let detachments = "podscope_ebpf_uprobe_container_detachments_total";
    let skipped = r#"podscope_ebpf_probe_skipped{probe="uprobes"}"#;
    let agent = AgentProcess::start(env!("CARGO_BIN_EXE_podscope"), &config, telemetry_port).await;
    let text = agent_metrics(telemetry_port).await;
    assert_eq!(value(&text, skipped), 0.0, "{text}");
    let attached_before = value(&text, attachments);
    let detached_before = value(&text, detachments);

    let name = format!("podscope-fault-{}", std::process::id());
    let mut first =
        TargetContainer::start(&image, &format!("{name}-1"), dir.path().join("out-1")).await;
    // Calls before the attachment are not counted: wait for it.
    until_metrics(
        telemetry_port,
        "the uprobe attached in the container",
        |t| value(t, attachments) == attached_before + 1.0,
    )
    .await;
    first.call(5, 1).await;
    until_fault_steps(prometheus_port, 5.0).await;
    assert_eq!(fault_steps_of(prometheus_port, first.pid).await, 5.0);

    // The binary deleted inside the running container: gone from the container's filesystem,
    // still counted (the process runs the image layer's file, where the uprobe is).
    let inside = std::path::PathBuf::from(format!("/proc/{}/root/fault-target", first.pid));
    std::fs::remove_file(&inside).expect("delete the binary inside the container");
    assert!(!inside.exists(), "{} still there", inside.display());
    first.call(3, 2).await;
    until_fault_steps(prometheus_port, 8.0).await;

    // The container killed while attached: detached once no container uses the file, nothing
    // counted twice or lost, the agent still ready.
    podman(&["kill", "--signal", "KILL", &first.name]);
    first.until_exited().await;
    let text = until_metrics(telemetry_port, "the uprobe detached", |t| {
        value(t, detachments) == detached_before + 1.0
    })
    .await;
    assert_eq!(value(&text, attachments), attached_before + 1.0, "{text}");
    assert_eq!(value(&text, skipped), 0.0, "{text}");
    assert_eq!(fault_steps(prometheus_port).await, 8.0);
    let ready = reqwest::get(format!("http://127.0.0.1:{telemetry_port}/readyz"))
        .await
        .expect("the agent's /readyz");
    assert!(ready.status().is_success(), "{}", ready.status());

    // The next container of the image (its file intact there) is attached and counted.
    let mut second =
        TargetContainer::start(&image, &format!("{name}-2"), dir.path().join("out-2")).await;
    until_metrics(
        telemetry_port,
        "the uprobe attached in the second container",
        |t| value(t, attachments) == attached_before + 2.0,
    )
    .await;
    second.call(4, 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fault_steps_of(prometheus_port, second.pid).await != 4.0 {
        assert!(
            Instant::now() < deadline,
            "the second container's 4 calls not counted after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its input closed, it exits: detached again.
    drop(second.input.take());
    second.until_exited().await;
    until_metrics(
        telemetry_port,
        "the uprobe detached from the second container",
        |t| value(t, detachments) == detached_before + 2.0,
    )
    .await;
    stop(agent).await;
}
