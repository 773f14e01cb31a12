//! The http probe against real servers and clients (root only; CI runs as root): Python's
//! `http.server`, curl, each in a kubelet-style pod cgroup. Spans are asserted exactly: counts,
//! kinds, methods, paths, routes, status codes, trace ids and parents.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, ResourceMetrics};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use podscope_core::config::parse_component_config;
use podscope_core::{
    Batch, BuildContext, Component as _, ConsumeError, Consumer, ReceiverConsumers,
};
use podscope_receiver::ebpf::{EbpfReceiver, EbpfReceiverConfig};
use podscope_testkit::pod_cgroup::{unique_ids, wait_listening, PodCgroup};
use podscope_testkit::BuildContextForTests as _;

#[derive(Default)]
struct Collected(Mutex<Vec<Batch>>);

#[async_trait]
impl Consumer for Collected {
    async fn consume(&self, batch: Batch) -> Result<(), ConsumeError> {
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

/// A span with its resource's cgroup id, and its attributes as text.
#[derive(Debug, Clone)]
struct SeenSpan {
    cgroup: u64,
    container: String,
    span: Span,
}

impl SeenSpan {
    fn attr(&self, key: &str) -> String {
        text(attr(&self.span.attributes, key))
    }

    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// `kind method path route status` on one line, what most tests compare.
    fn summary(&self) -> String {
        format!(
            "{} {} {} {} {}",
            if self.span.kind == 2 {
                "SERVER"
            } else {
                "CLIENT"
            },
            self.attr("http.request.method"),
            self.attr("url.path"),
            self.attr("http.route"),
            self.attr("http.response.status_code"),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn text(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        None => "-".to_string(),
        other => format!("{other:?}"),
    }
}

impl Collected {
    fn spans(&self) -> Vec<SeenSpan> {
        let mut out = Vec::new();
        for batch in self.0.lock().unwrap().iter() {
            if let Batch::Traces(rss) = batch {
                for rs in rss.iter() {
                    out.extend(spans_of(rs));
                }
            }
        }
        out
    }

    fn metrics(&self) -> Vec<ResourceMetrics> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|b| match b {
                Batch::Metrics(rms) => Some(rms.to_vec()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

fn spans_of(rs: &ResourceSpans) -> Vec<SeenSpan> {
    let resource = rs.resource.clone().unwrap_or_default();
    let cgroup = match attr(&resource.attributes, "podscope.cgroup.id") {
        Some(any_value::Value::IntValue(id)) => *id as u64,
        _ => 0,
    };
    let container = text(attr(&resource.attributes, "container.id"));
    rs.scope_spans
        .iter()
        .flat_map(|s| &s.spans)
        .map(|span| SeenSpan {
            cgroup,
            container: container.clone(),
            span: span.clone(),
        })
        .collect()
}

struct Started {
    receiver: EbpfReceiver,
    spans: Arc<Collected>,
    metrics: Arc<Collected>,
    telemetry: podscope_core::telemetry::AgentTelemetry,
}

/// A started receiver with the http probe (and `http` settings) attached.
async fn start(http: serde_json::Value) -> Started {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs and need root"
    );
    let config: EbpfReceiverConfig = parse_component_config(serde_json::json!({
        "collection_interval": "1h",
        "cgroup_filter": {"include": ["/kubepods.slice/**"]},
        "probes": {"http": http},
    }))
    .unwrap();
    let ctx = BuildContext::for_tests("ebpf");
    let telemetry = ctx.telemetry.clone();
    let spans = Arc::new(Collected::default());
    let metrics = Arc::new(Collected::default());
    let receiver = EbpfReceiver::new(
        config,
        ctx,
        ReceiverConsumers {
            metrics: Some(metrics.clone()),
            traces: Some(spans.clone()),
            profiles: None,
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    assert!(
        receiver.skipped_probes().is_empty(),
        "{:?}",
        receiver.skipped_probes()
    );
    Started {
        receiver,
        spans,
        metrics,
        telemetry,
    }
}

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/http")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pod running `status_server.py` on a free port.
fn python_server(pod: &mut PodCgroup) -> u16 {
    let port = free_port();
    pod.spawn_shell(&format!(
        "exec /usr/bin/python3 {} {port}",
        tests_dir().join("status_server.py").display()
    ));
    wait_listening(port);
    port
}

/// Runs `sh -c script` in `pod` and waits for it (at most 60 s); its exit status.
fn run_in(pod: &mut PodCgroup, script: &str) -> i32 {
    let marker = std::env::temp_dir().join(format!("podscope-http-{}", unique_ids().1));
    pod.spawn_shell(&format!("{script}; echo $? > {}", marker.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = std::fs::read_to_string(&marker) {
            if status.ends_with('\n') {
                let _ = std::fs::remove_file(&marker);
                return status.trim().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{script} did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The spans of `cgroups`, once `n` are there (at most 20 s), in start order.
async fn wait_spans(spans: &Collected, cgroups: &[u64], n: usize) -> Vec<SeenSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen: Vec<SeenSpan> = spans
            .spans()
            .into_iter()
            .filter(|s| cgroups.contains(&s.cgroup))
            .collect();
        if seen.len() >= n || Instant::now() > deadline {
            seen.sort_by_key(|s| s.span.start_time_unix_nano);
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_server_and_curl_give_exact_server_and_client_spans_over_keep_alive() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({})).await;
    let port = python_server(&mut server);
    // One curl, one connection (keep-alive), four requests; a query string that must not show.
    let status = run_in(
        &mut client,
        &format!(
            "curl -sf -o /dev/null -o /dev/null -o /dev/null -o /dev/null --http1.1 \
             http://127.0.0.1:{port}/users/42?token=secret http://127.0.0.1:{port}/status/404 \
             http://127.0.0.1:{port}/status/500 http://127.0.0.1:{port}/users/43/orders; true"
        ),
    );
    assert_eq!(status, 0);
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 8).await;
    started.receiver.shutdown().await.unwrap();

    let server_spans: Vec<String> = spans
        .iter()
        .filter(|s| s.cgroup == server.id())
        .map(SeenSpan::summary)
        .collect();
    assert_eq!(
        server_spans,
        [
            "SERVER GET /users/42 /users/{id} 200",
            "SERVER GET /status/404 /status/{id} 404",
            "SERVER GET /status/500 /status/{id} 500",
            "SERVER GET /users/43/orders /users/{id}/orders 200",
        ]
    );
    let client_spans: Vec<String> = spans
        .iter()
        .filter(|s| s.cgroup == client.id())
        .map(SeenSpan::summary)
        .collect();
    assert_eq!(
        client_spans,
        [
            "CLIENT GET /users/42 - 200",
            "CLIENT GET /status/404 - 404",
            "CLIENT GET /status/500 - 500",
            "CLIENT GET /users/43/orders - 200",
        ]
    );
    assert_eq!(spans.len(), 8, "{spans:#?}");
    for s in &spans {
        assert!(!s.container.is_empty() && s.container != "-");
        assert!(s.span.end_time_unix_nano > s.span.start_time_unix_nano);
        assert!(!format!("{:?}", s.span.attributes).contains("secret"));
    }
    let first_server = spans.iter().find(|s| s.cgroup == server.id()).unwrap();
    assert_eq!(first_server.span.name, "GET /users/{id}");
    assert_eq!(first_server.attr("server.port"), port.to_string());
    assert_eq!(first_server.attr("client.address"), "127.0.0.1");
    assert_eq!(first_server.attr("network.protocol.version"), "1.1");
    assert_eq!(first_server.attr("url.scheme"), "http");
    // Status: 5xx is an error for both ends, 4xx for the client only.
    let error = |s: &SeenSpan| s.span.status.as_ref().map(|st| st.code).unwrap_or(0) == 2;
    let errors: Vec<(String, bool)> = spans
        .iter()
        .map(|s| (s.summary(), error(s)))
        .filter(|(_, e)| *e)
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    // Without propagation or a serving thread, curl's spans are roots; the server's joined them.
    for (client_span, server_span) in spans
        .iter()
        .filter(|s| s.cgroup == client.id())
        .zip(spans.iter().filter(|s| s.cgroup == server.id()))
    {
        assert_eq!(client_span.parent(), "");
        assert_eq!(server_span.trace_id(), client_span.trace_id());
        assert_eq!(server_span.parent(), client_span.span_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_traceparent_gives_that_trace_and_parent() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({})).await;
    let port = python_server(&mut server);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    run_in(
        &mut client,
        &format!(
            "curl -s -o /dev/null -H 'traceparent: 00-{trace}-{parent}-01' -H 'tracestate: v=1' \
             http://127.0.0.1:{port}/traced"
        ),
    );
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 2).await;
    started.receiver.shutdown().await.unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for s in &spans {
        // The header wins over the same-node join and over a new trace, at both ends.
        assert_eq!(s.trace_id(), trace, "{}", s.summary());
        assert_eq!(s.parent(), parent, "{}", s.summary());
    }
    let server_span = spans.iter().find(|s| s.cgroup == server.id()).unwrap();
    assert_eq!(server_span.span.trace_state, "v=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_two_local_services_is_one_trace() {
    let mut front = PodCgroup::new();
    let mut back = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({})).await;
    let front_port = python_server(&mut front);
    let back_port = python_server(&mut back);
    run_in(
        &mut client,
        &format!("curl -s -o /dev/null http://127.0.0.1:{front_port}/call/{back_port}/items/7"),
    );
    let cgroups = [front.id(), back.id(), client.id()];
    let spans = wait_spans(&started.spans, &cgroups, 4).await;
    started.receiver.shutdown().await.unwrap();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |cgroup: u64, kind: i32| {
        spans
            .iter()
            .find(|s| s.cgroup == cgroup && s.span.kind == kind)
            .unwrap_or_else(|| panic!("no span of kind {kind} in {cgroup}: {spans:#?}"))
    };
    let curl = find(client.id(), 3);
    let front_server = find(front.id(), 2);
    let front_client = find(front.id(), 3);
    let back_server = find(back.id(), 2);
    // curl → front (joined on the connection) → its call (same thread) → back (joined).
    assert_eq!(curl.parent(), "");
    assert_eq!(front_server.parent(), curl.span_id());
    assert_eq!(front_client.parent(), front_server.span_id());
    assert_eq!(back_server.parent(), front_client.span_id());
    for s in &spans {
        assert_eq!(s.trace_id(), curl.trace_id());
    }
    assert_eq!(back_server.summary(), "SERVER GET /items/7 /items/{id} 200");
    assert_eq!(front_client.attr("server.port"), back_port.to_string());
    // The callee's span lies within the caller's.
    assert!(front_client.span.start_time_unix_nano <= back_server.span.start_time_unix_nano);
    assert!(back_server.span.end_time_unix_nano <= front_client.span.end_time_unix_nano);
    assert!(front_client.span.end_time_unix_nano <= front_server.span.end_time_unix_nano);
}

/// docs/traces.md, "Trace context", rule 2 against rules 3 and 4: a request made while
/// serving one is that SERVER span's child, and a callee on this node joins its caller, unless
/// the application wrote its own `traceparent` into the request it makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outgoing_traceparent_wins_over_the_serving_thread_and_the_join() {
    let mut front = PodCgroup::new();
    let mut back = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({})).await;
    let front_port = python_server(&mut front);
    let back_port = python_server(&mut back);
    // curl's context reaches front; front, while serving it, calls back with a context of its
    // own (another trace, its own span as parent), as an SDK-instrumented application does.
    let (incoming_trace, incoming_parent) =
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (outgoing_trace, outgoing_parent) =
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let status = run_in(
        &mut client,
        &format!(
            "curl -sf -o /dev/null -H 'traceparent: 00-{incoming_trace}-{incoming_parent}-01' \
             -H 'X-Call-Context: 00-{outgoing_trace}-{outgoing_parent}-01' \
             http://127.0.0.1:{front_port}/call/{back_port}/items/7"
        ),
    );
    assert_eq!(status, 0);
    let cgroups = [front.id(), back.id(), client.id()];
    let spans = wait_spans(&started.spans, &cgroups, 4).await;
    started.receiver.shutdown().await.unwrap();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |cgroup: u64, kind: i32| {
        spans
            .iter()
            .find(|s| s.cgroup == cgroup && s.span.kind == kind)
            .unwrap_or_else(|| panic!("no span of kind {kind} in {cgroup}: {spans:#?}"))
    };
    let (curl, front_server, front_client, back_server) = (
        find(client.id(), 3),
        find(front.id(), 2),
        find(front.id(), 3),
        find(back.id(), 2),
    );
    let context = |s: &SeenSpan| (s.trace_id(), s.parent());
    let expect = |trace: &str, parent: &str| (trace.to_string(), parent.to_string());
    // curl wrote the first context (rule 2), front read it (rule 1).
    assert_eq!(context(curl), expect(incoming_trace, incoming_parent));
    assert_eq!(
        context(front_server),
        expect(incoming_trace, incoming_parent)
    );
    // front's call carries its own context: not front's SERVER span's child (rule 3)...
    assert_eq!(
        context(front_client),
        expect(outgoing_trace, outgoing_parent)
    );
    // ...and back read that context, rather than joining front's CLIENT span (rule 4).
    assert_eq!(
        context(back_server),
        expect(outgoing_trace, outgoing_parent)
    );
    assert_eq!(back_server.summary(), "SERVER GET /items/7 /items/{id} 200");
    assert_eq!(front_client.attr("server.port"), back_port.to_string());
    assert_eq!(
        front_server.summary(),
        format!("SERVER GET /call/{back_port}/items/7 /call/{{id}}/items/{{id}} 200")
    );
}

/// The agent's own counter `name`, from its telemetry text.
fn telemetry_counter(telemetry: &podscope_core::telemetry::AgentTelemetry, name: &str) -> u64 {
    telemetry
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_half_written_request_give_no_span_and_are_counted() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({})).await;
    let port = python_server(&mut server);
    // Binary garbage on one connection, a request head cut short on another (the client closes
    // before the blank line), then one good request: only that one is a span.
    let script = format!(
        "import socket, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(bytes(range(256)) * 4)\n\
         time.sleep(0.2)\n\
         s.close()\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(b'GET /half HTTP/1.1\\r\\nHost: x\\r\\n')\n\
         time.sleep(0.2)\n\
         s.close()\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(b'GET /whole HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
         s.recv(4096)\n\
         s.close()\n"
    );
    let file = std::env::temp_dir().join(format!("podscope-http-garbage-{}.py", port));
    std::fs::write(&file, script).unwrap();
    assert_eq!(
        run_in(&mut client, &format!("/usr/bin/python3 {}", file.display())),
        0
    );
    let _ = std::fs::remove_file(&file);
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 2).await;
    // Let anything late arrive, then check nothing more did.
    started.receiver.collect_now().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut spans_after: Vec<String> = started
        .spans
        .spans()
        .into_iter()
        .filter(|s| [server.id(), client.id()].contains(&s.cgroup))
        .map(|s| s.summary())
        .collect();
    spans_after.sort();
    started.receiver.shutdown().await.unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert_eq!(
        spans_after,
        [
            "CLIENT GET /whole - 200".to_string(),
            "SERVER GET /whole /whole 200".to_string()
        ]
    );
    assert!(
        telemetry_counter(&started.telemetry, "podscope_ebpf_http_not_parsed_total") >= 2,
        "the garbage connection, counted once from each end:\n{}",
        started.telemetry.encode_text()
    );
}

/// (metric, attributes `k=v,…`) → count, for one cgroup's RED histograms.
fn red_counts(rms: &[ResourceMetrics], cgroup: u64) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for rm in rms {
        let resource = rm.resource.clone().unwrap_or_default();
        if attr(&resource.attributes, "podscope.cgroup.id")
            != Some(&any_value::Value::IntValue(cgroup as i64))
        {
            continue;
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if let Some(metric::Data::ExponentialHistogram(h)) = &m.data {
                for p in &h.data_points {
                    let key = p
                        .attributes
                        .iter()
                        .map(|a| {
                            format!(
                                "{}={}",
                                a.key,
                                text(a.value.as_ref().and_then(|v| v.value.as_ref()))
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    out.insert((m.name.clone(), key), p.count);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_metrics_count_every_request_even_when_no_span_is_sampled() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    // The pods exist before the receiver starts: its cgroup filter lists them then.
    let started = start(serde_json::json!({"spans": {"sampling_ratio": 0.0}})).await;
    let port = python_server(&mut server);
    let urls: Vec<String> = (0..5)
        .map(|i| format!("http://127.0.0.1:{port}/items/{i}"))
        .chain(
            ["status/404".to_string(), "status/404".to_string()]
                .map(|p| format!("http://127.0.0.1:{port}/{p}")),
        )
        .collect();
    run_in(
        &mut client,
        &format!(
            "curl -s {} {}",
            "-o /dev/null ".repeat(urls.len()),
            urls.join(" ")
        ),
    );
    // Poll: the reader task records exchanges as it reads them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let counts = loop {
        started.receiver.collect_now().await.unwrap();
        let counts = red_counts(&started.metrics.metrics(), server.id());
        if counts.values().sum::<u64>() >= 7 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client_counts = red_counts(&started.metrics.metrics(), client.id());
    started.receiver.shutdown().await.unwrap();
    let server_attrs = |route: &str, status: u16| {
        let mut a = format!("http.request.method=GET,http.route={route},http.response.status_code={status},url.scheme=http,network.protocol.version=1.1");
        if status >= 500 {
            a.push_str(&format!(",error.type={status}"));
        }
        ("http.server.request.duration".to_string(), a)
    };
    assert_eq!(
        counts,
        BTreeMap::from([
            (server_attrs("/items/{id}", 200), 5),
            (server_attrs("/status/{id}", 404), 2),
        ])
    );
    let client_attrs = |status: u16, error: bool| {
        (
            "http.client.request.duration".to_string(),
            format!(
                "http.request.method=GET,server.address=127.0.0.1,server.port={port},http.response.status_code={status},url.scheme=http,network.protocol.version=1.1{}",
                if error { format!(",error.type={status}") } else { String::new() }
            ),
        )
    };
    assert_eq!(
        client_counts,
        BTreeMap::from([(client_attrs(200, false), 5), (client_attrs(404, true), 2)])
    );
    assert!(
        started
            .spans
            .spans()
            .iter()
            .all(|s| s.cgroup != server.id() && s.cgroup != client.id()),
        "sampling_ratio 0 sends no span"
    );
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made with openssl in `dir`: its
/// certificate and key files.
fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/install-deps.sh installs it)");
    assert!(status.success(), "openssl req");
    (cert, key)
}

/// nginx (Debian's) serving `/status/<code>` and 200 elsewhere, on a free port, over TLS with a
/// self-signed certificate when `tls`; its files live in `dir`.
fn nginx(pod: &mut PodCgroup, dir: &std::path::Path, tls: bool) -> u16 {
    let port = free_port();
    let ssl = if tls {
        self_signed(dir);
        format!(
            "ssl_certificate {0}/cert.pem; ssl_certificate_key {0}/key.pem;",
            dir.display()
        )
    } else {
        String::new()
    };
    let conf = format!(
        "user root; worker_processes 1; daemon off; pid {0}/nginx.pid; error_log {0}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {0}; proxy_temp_path {0}; fastcgi_temp_path {0}; uwsgi_temp_path {0}; scgi_temp_path {0};\n\
           server {{ listen 127.0.0.1:{port}{1}; {ssl}\n\
             location = /status/404 {{ return 404; }} location = /status/500 {{ return 500; }}\n\
             location / {{ return 200 \"ok\\n\"; }} }} }}\n",
        dir.display(),
        if tls { " ssl" } else { "" },
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    // On CPU 0 only, as wrk below: the agent's ring-buffer reader keeps the other CPU, so a
    // test's exact span counts depend on the reader keeping up, not on how fast this machine
    // serves (a quiet machine served 87 k requests/s to wrk on both CPUs and starved the reader).
    pod.spawn_shell(&format!(
        "exec taskset -c 0 nginx -p {0} -c {0}/nginx.conf",
        dir.display()
    ));
    wait_listening(port);
    port
}

/// The spans of curl asking nginx over HTTPS for `/users/42`, `/status/404` and `/status/500`,
/// as [`summaries_with_scheme`] writes them.
const HTTPS_USERS_404_500: [&str; 6] = [
    "CLIENT GET /status/404 - 404 https",
    "CLIENT GET /status/500 - 500 https",
    "CLIENT GET /users/42 - 200 https",
    "SERVER GET /status/404 /status/{id} 404 https",
    "SERVER GET /status/500 /status/{id} 500 https",
    "SERVER GET /users/42 /users/{id} 200 https",
];

/// Each span's [`SeenSpan::summary`] and `url.scheme`, sorted.
fn summaries_with_scheme(spans: &[SeenSpan]) -> Vec<String> {
    let mut summaries: Vec<String> = spans
        .iter()
        .map(|s| format!("{} {}", s.summary(), s.attr("url.scheme")))
        .collect();
    summaries.sort();
    summaries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_over_https_and_curl_give_the_same_spans_as_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    let started = start(serde_json::json!({})).await;
    let port = nginx(&mut server, dir.path(), true);
    let status = run_in(
        &mut client,
        &format!(
            "curl -sk --http1.1 -o /dev/null -o /dev/null -o /dev/null \
             https://127.0.0.1:{port}/users/42 https://127.0.0.1:{port}/status/404 \
             https://127.0.0.1:{port}/status/500"
        ),
    );
    assert_eq!(status, 0);
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 6).await;
    started.receiver.shutdown().await.unwrap();
    assert_eq!(summaries_with_scheme(&spans), HTTPS_USERS_404_500);
    // The same-node join works over TLS too: the sockets are the same.
    for server_span in spans.iter().filter(|s| s.cgroup == server.id()) {
        let client_span = spans
            .iter()
            .find(|c| c.cgroup == client.id() && c.attr("url.path") == server_span.attr("url.path"))
            .unwrap();
        assert_eq!(server_span.parent(), client_span.span_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_over_plain_http_with_curl() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    let started = start(serde_json::json!({})).await;
    let port = nginx(&mut server, dir.path(), false);
    run_in(
        &mut client,
        &format!(
            "curl -s -o /dev/null -o /dev/null http://127.0.0.1:{port}/a/1 http://127.0.0.1:{port}/status/404"
        ),
    );
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 4).await;
    started.receiver.shutdown().await.unwrap();
    let mut summaries: Vec<String> = spans.iter().map(SeenSpan::summary).collect();
    summaries.sort();
    assert_eq!(
        summaries,
        [
            "CLIENT GET /a/1 - 200",
            "CLIENT GET /status/404 - 404",
            "SERVER GET /a/1 /a/{id} 200",
            "SERVER GET /status/404 /status/{id} 404",
        ]
    );
}

/// A fake container image under `root`: `binaries` and the shared libraries they load (from
/// `ldd`), copied with the host's merged-/usr layout (`lib -> usr/lib`…). Copies are their own
/// inodes: uprobes on the host's libssl do not see the image's.
fn fake_image(root: &Path, binaries: &[&str]) {
    for link in ["bin", "lib", "lib64", "sbin"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(link)) {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
    }
    let mut files: Vec<PathBuf> = binaries.iter().map(PathBuf::from).collect();
    for binary in binaries {
        let ldd = std::process::Command::new("ldd")
            .arg(binary)
            .output()
            .expect("ldd");
        // `libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        files.extend(
            String::from_utf8_lossy(&ldd.stdout)
                .lines()
                .filter_map(|line| line.split("=>").last()?.split_whitespace().next())
                .filter(|path| path.starts_with('/'))
                .map(PathBuf::from),
        );
    }
    for file in files {
        // The file under its own name, in its directory's real place (/lib → /usr/lib).
        let dir = std::fs::canonicalize(file.parent().unwrap()).unwrap();
        let dest = root
            .join(dir.strip_prefix("/").unwrap())
            .join(file.file_name().unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if !dest.exists() {
            std::fs::copy(std::fs::canonicalize(&file).unwrap(), &dest).unwrap();
        }
    }
}

/// `argv` as a container's process: it joins `pod` and changes its root to `root` before exec
/// (so `argv[0]`, an absolute path, is the image's).
fn container_command(pod: &PodCgroup, root: &Path, argv: &[&str]) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    let procs = CString::new(
        pod.path()
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    let root = CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
    let mut command = std::process::Command::new(argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only open/write/close/chroot/chdir on C strings made before
    // the fork (async-signal-safe, no allocation).
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// issue 12 point 2 inside a container: the default `tls.libraries` find the libssl of a
/// process in a kubelet-style pod with its own root (a copy the host's uprobes do not cover),
/// and curl's HTTPS requests from there are spans like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_https_inside_a_container_uses_the_images_libssl_and_gives_spans() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    fake_image(image.path(), &["/usr/bin/curl", "/usr/bin/sleep"]);
    let mut server = PodCgroup::new();
    let client = PodCgroup::new();
    let started = start(serde_json::json!({})).await;
    let attachments = || {
        telemetry_counter(
            &started.telemetry,
            "podscope_ebpf_uprobe_container_attachments_total",
        )
    };
    let before = attachments();
    let port = nginx(&mut server, dir.path(), true);
    // The container's first process, as a runtime starts it; the next scan finds its root.
    let mut init = container_command(&client, image.path(), &["/usr/bin/sleep", "infinity"])
        .spawn()
        .expect("the container's first process");
    let root_link = PathBuf::from(format!("/proc/{}/root", init.id()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(&root_link).ok().as_deref() != Some(image.path()) {
        assert!(
            Instant::now() < deadline,
            "the container's root never changed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.receiver.collect_now().await.unwrap();
    // One file: the image's libssl.so.3, named by both /lib/… and /usr/lib/… patterns.
    assert_eq!(attachments() - before, 1);
    let curl = container_command(
        &client,
        image.path(),
        &[
            "/usr/bin/curl",
            "-sk",
            "--http1.1",
            &format!("https://127.0.0.1:{port}/users/42"),
            &format!("https://127.0.0.1:{port}/status/404"),
            &format!("https://127.0.0.1:{port}/status/500"),
        ],
    )
    .output()
    .expect("curl in the container");
    assert!(curl.status.success(), "{curl:?}");
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 6).await;
    started.receiver.shutdown().await.unwrap();
    let _ = init.kill();
    let _ = init.wait();
    assert_eq!(summaries_with_scheme(&spans), HTTPS_USERS_404_500);
    for s in spans.iter().filter(|s| s.cgroup == client.id()) {
        assert_eq!(s.container, client.container_id());
    }
}

/// A pod running `grpc_peer.py server` on a free port (TLS with `cert` and `key`).
fn grpc_server(pod: &mut PodCgroup, tls: Option<(&std::path::Path, &std::path::Path)>) -> u16 {
    let port = free_port();
    let tls = tls
        .map(|(cert, key)| format!(" {} {}", cert.display(), key.display()))
        .unwrap_or_default();
    pod.spawn_shell(&format!(
        "exec /usr/bin/python3 {} server {port}{tls}",
        tests_dir().join("grpc_peer.py").display()
    ));
    wait_listening(port);
    port
}

fn grpc_summary(s: &SeenSpan) -> String {
    format!(
        "{} {} {} {} {}",
        if s.span.kind == 2 { "SERVER" } else { "CLIENT" },
        s.span.name,
        s.attr("rpc.system"),
        s.attr("rpc.grpc.status_code"),
        s.span.status.as_ref().map(|st| st.code).unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_give_rpc_spans_with_status_codes() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    let started = start(serde_json::json!({})).await;
    let port = grpc_server(&mut server, None);
    assert_eq!(
        run_in(
            &mut client,
            &format!(
                "/usr/bin/python3 {} client {port} Add Fail Add",
                tests_dir().join("grpc_peer.py").display()
            )
        ),
        0
    );
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 6).await;
    started.receiver.shutdown().await.unwrap();
    let mut summaries: Vec<String> = spans.iter().map(grpc_summary).collect();
    summaries.sort();
    // NOT_FOUND is an error for the client, not for the server (semantic conventions).
    assert_eq!(
        summaries,
        [
            "CLIENT shop.Cart/Add grpc 0 0",
            "CLIENT shop.Cart/Add grpc 0 0",
            "CLIENT shop.Cart/Fail grpc 5 2",
            "SERVER shop.Cart/Add grpc 0 0",
            "SERVER shop.Cart/Add grpc 0 0",
            "SERVER shop.Cart/Fail grpc 5 0",
        ]
    );
    for s in &spans {
        assert_eq!(s.attr("rpc.service"), "shop.Cart");
        assert_eq!(s.attr("network.protocol.version"), "2");
    }
    // Stream ids are the same at both ends: each server span joins its client span.
    for server_span in spans.iter().filter(|s| s.cgroup == server.id()) {
        assert!(
            spans
                .iter()
                .any(|c| c.cgroup == client.id() && c.span_id() == server_span.parent()),
            "{server_span:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_syscall_hooks_give_the_same_spans() {
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    let started = start(serde_json::json!({"syscall_hooks": "raw"})).await;
    let port = python_server(&mut server);
    run_in(
        &mut client,
        &format!(
            "curl -s -o /dev/null -o /dev/null http://127.0.0.1:{port}/a/1 http://127.0.0.1:{port}/status/500"
        ),
    );
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 4).await;
    started.receiver.shutdown().await.unwrap();
    let mut summaries: Vec<String> = spans.iter().map(SeenSpan::summary).collect();
    summaries.sort();
    assert_eq!(
        summaries,
        [
            "CLIENT GET /a/1 - 200",
            "CLIENT GET /status/500 - 500",
            "SERVER GET /a/1 /a/{id} 200",
            "SERVER GET /status/500 /status/{id} 500",
        ]
    );
}

/// wrk's own count of the requests it completed (`N requests in …`).
fn wrk_requests(output: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrk_against_nginx_gives_one_client_span_per_request_wrk_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    // wrk and nginx share CPU 0 and the reader has CPU 1; and a ring buffer that holds the whole
    // second of events, so that none is lost while the reader waits for a CPU (losses are
    // counted, not asserted away).
    let started = start(serde_json::json!({"max_entries": {"http_events": 32 << 20}})).await;
    let port = nginx(&mut server, dir.path(), false);
    let out = dir.path().join("wrk.out");
    run_in(
        &mut client,
        &format!(
            "taskset -c 0 wrk -t1 -c2 -d1s http://127.0.0.1:{port}/items/9 > {}",
            out.display()
        ),
    );
    let counted = wrk_requests(&std::fs::read_to_string(&out).unwrap());
    assert!(counted > 10, "wrk made {counted} requests");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (clients, servers) = loop {
        let spans = started.spans.spans();
        let clients = spans.iter().filter(|s| s.cgroup == client.id()).count() as u64;
        let servers = spans.iter().filter(|s| s.cgroup == server.id()).count() as u64;
        if (clients >= counted && servers >= counted) || Instant::now() > deadline {
            break (clients, servers);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    started.receiver.shutdown().await.unwrap();
    // wrk counts the responses it read: so many CLIENT spans. nginx may have answered the
    // requests still in flight when wrk stopped (at most one per connection).
    assert_eq!(
        clients,
        counted,
        "{}",
        started
            .telemetry
            .encode_text()
            .lines()
            .filter(|l| l.contains("http") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        (counted..=counted + 2).contains(&servers),
        "{servers} server spans for {counted} requests"
    );
    for s in started
        .spans
        .spans()
        .iter()
        .filter(|s| s.cgroup == server.id())
    {
        assert_eq!(s.summary(), "SERVER GET /items/9 /items/{id} 200");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_gives_the_same_rpc_spans() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let mut server = PodCgroup::new();
    let mut client = PodCgroup::new();
    let started = start(serde_json::json!({})).await;
    let port = grpc_server(&mut server, Some((&cert, &key)));
    assert_eq!(
        run_in(
            &mut client,
            &format!(
                "/usr/bin/python3 {} client {port} {} Add Fail",
                tests_dir().join("grpc_peer.py").display(),
                cert.display()
            )
        ),
        0
    );
    let spans = wait_spans(&started.spans, &[server.id(), client.id()], 4).await;
    started.receiver.shutdown().await.unwrap();
    let mut summaries: Vec<String> = spans.iter().map(grpc_summary).collect();
    summaries.sort();
    assert_eq!(
        summaries,
        [
            "CLIENT shop.Cart/Add grpc 0 0",
            "CLIENT shop.Cart/Fail grpc 5 2",
            "SERVER shop.Cart/Add grpc 0 0",
            "SERVER shop.Cart/Fail grpc 5 0",
        ]
    );
}
