//! The chart's dashboards and alert rules against real data (issue 18 point 3): the real agent
//! runs the chart's own config (`helm/podscope/values.yaml`'s `config:`, its listen addresses
//! moved to free loopback ports, the API server reached by kubeconfig) next to a fake API server
//! that serves one Deployment's pod, whose kubelet-style cgroup runs a small workload (programs,
//! opens that fail, block I/O, TCP connections held, closed, refused and retransmitted; an HTTP
//! server on Python's `http.server` and a gRPC server on grpcio, called by curl and a grpcio client
//! with answers 200, 404 and 500, OK and NOT_FOUND). The chart's default config has the http,
//! syscalls, files and sched probes off; the test turns them on as a user does in the chart's
//! values (`config.receivers.ebpf.probes.http: {}`, one line each), so their panels run too. A real Prometheus
//! scrapes the agent's two endpoints with a `cluster` label, and every query the generator wrote
//! into `helm/podscope/tests/queries.json` — each dashboard variable, each panel's expression,
//! each alert's expression and the data it reads — is run with the dashboards' variables set to
//! that pod: each must evaluate, and each must return series (one at least with a number: a
//! quantile of no events is NaN, which a panel shows as no data), except those marked as needing
//! what cannot run here (their reason is printed).
//!
//! Losses are provoked so the agent-health panels and loss alerts have data: an OTLP exporter to
//! a closed port (failures, retries exhausted) with a one-item `drop_newest` queue (queue drops),
//! and failed watch requests at the API server (watch errors).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_integration::prometheus::PrometheusServer;
use podscope_testkit::pod_cgroup::unique_ids;
use podscope_testkit::{wait_listening, PodCgroup};

const NODE: &str = "node-dashboards";
const NAMESPACE: &str = "shop";
const POD: &str = "web-7d4b9c8f6-d4shb";
const WORKLOAD: &str = "web";
const CLUSTER: &str = "e2e";

/// The chart's `config:` block, dedented, with its endpoints on free loopback ports, a short
/// collection interval, the kubeconfig instead of the pod's service account, the opt-in probes
/// the panels need on (what `config: {receivers: {ebpf: {probes: {http: {}, …}}}}` in a user's
/// values merges in), the
/// memory_limiter's limits in MiB as the chart renders them, and the lossy exporter beside the
/// chart's.
fn chart_config(ports: &Ports) -> String {
    let values = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/podscope/values.yaml"
    ))
    .expect("helm/podscope/values.yaml");
    let mut config = String::new();
    for line in values.lines().skip_while(|l| *l != "config:").skip(1) {
        if !line.is_empty() && !line.starts_with("  ") && !line.starts_with('#') {
            break;
        }
        config.push_str(line.strip_prefix("  ").unwrap_or(line));
        config.push('\n');
    }
    let lossy = format!(
        "exporters:\n  otlp/unreachable:\n    endpoint: http://127.0.0.1:{}\n    retry_on_failure:\n      initial_interval: 100ms\n      max_elapsed_time: 5s\n    sending_queue:\n      queue_size: 1\n      num_consumers: 1\n      when_full: drop_newest\n",
        ports.closed
    );
    let edits = [
        ("0.0.0.0:4317", format!("127.0.0.1:{}", free_port())),
        ("0.0.0.0:4318", format!("127.0.0.1:{}", free_port())),
        ("0.0.0.0:9464", format!("127.0.0.1:{}", ports.prometheus)),
        ("0.0.0.0:8888", format!("127.0.0.1:{}", ports.telemetry)),
        ("collection_interval: 10s", "collection_interval: 1s".into()),
        (
            "      tcp: {}\n",
            "      tcp: {}\n      http: {}\n      syscalls: {by: group}\n      files: {}\n      sched: {}\n"
                .into(),
        ),
        ("auth_type: serviceAccount", "auth_type: kubeConfig".into()),
        // The memory_limiter's percentages as templates/configmap.yaml renders them from the
        // chart's `resources.limits.memory` (512Mi): this test's own cgroup has no limit.
        ("limit_percentage: 80\n", "limit_mib: 409\n".into()),
        (
            "spike_limit_percentage: 25\n",
            "spike_limit_mib: 128\n".into(),
        ),
        (
            "exporters: [prometheus]",
            "exporters: [prometheus, otlp/unreachable]".into(),
        ),
        ("exporters:\n", lossy),
    ];
    for (from, to) in edits {
        assert_eq!(
            config.matches(from).count(),
            1,
            "{from:?} once in the chart's config:\n{config}"
        );
        config = config.replacen(from, &to, 1);
    }
    config
}

struct Ports {
    prometheus: u16,
    telemetry: u16,
    /// Nothing listens here: connections are refused.
    closed: u16,
}

/// The http probe's test servers (Python's `http.server`, grpcio), shared with its receiver tests.
const HTTP_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/receiver/tests/http");

/// The pod of Deployment `web` (through ReplicaSet `web-7d4b9c8f6`) on this node.
fn web_pod(uid: &str, container_id: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": POD, "namespace": NAMESPACE, "uid": uid,
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6",
                "uid": "5f0c1e2d-0000-4000-8000-000000000018", "controller": true}]
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "registry.example.com/shop/web:1.4.2"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.18", "containerStatuses": [{
            "name": "app", "containerID": format!("containerd://{container_id}"), "ready": true, "restartCount": 0,
            "image": "registry.example.com/shop/web:1.4.2", "imageID": "registry.example.com/shop/web@sha256:00"}]}
    }))
    .expect("a valid Pod")
}

/// The dashboards' variables as Grafana would set them to look at the test's pod.
fn substitute(query: &str, telemetry_target: &str) -> String {
    query
        .replace("$__rate_interval", "20s")
        .replace("$cluster", CLUSTER)
        .replace("$namespace", NAMESPACE)
        .replace("$workload", WORKLOAD)
        .replace("$pod", POD)
        .replace("$instance", telemetry_target)
}

/// One query of `queries.json`, made runnable: what to run, and what its result must show.
struct Check {
    source: String,
    query: String,
    /// A label every returned series must carry with this value (variables), if any.
    label: Option<(String, String)>,
    /// False for alert conditions: they must evaluate, and fire only on trouble.
    needs_series: bool,
    /// Why it may return nothing here (the data needs what does not run here).
    skip: Option<String>,
}

fn checks(telemetry_target: &str) -> Vec<Check> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/podscope/tests/queries.json"
    ))
    .expect("helm/podscope/tests/queries.json (scripts/generate-dashboards.py writes it)");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON list");
    let expected_label = BTreeMap::from([
        ("cluster", CLUSTER.to_string()),
        ("k8s_namespace_name", NAMESPACE.to_string()),
        ("service_name", WORKLOAD.to_string()),
        ("k8s_pod_name", POD.to_string()),
        ("instance", telemetry_target.to_string()),
    ]);
    let mut out = Vec::new();
    for entry in &entries {
        let source = entry["source"].as_str().expect("source").to_string();
        let skip = entry["skip"].as_str().map(str::to_string);
        if let Some(variable) = entry["variable"].as_str() {
            // label_values(SELECTOR, LABEL): the values of LABEL among SELECTOR's series.
            let inner = variable
                .strip_prefix("label_values(")
                .and_then(|v| v.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{source}: not label_values(…): {variable}"));
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            let label = label.trim().to_string();
            let value = expected_label
                .get(label.as_str())
                .unwrap_or_else(|| panic!("{source}: no expected value for label {label}"))
                .clone();
            out.push(Check {
                query: format!(
                    "count by ({label}) ({})",
                    substitute(selector, telemetry_target)
                ),
                source,
                label: Some((label, value)),
                needs_series: true,
                skip,
            });
            continue;
        }
        let expr = entry["expr"].as_str().expect("expr");
        let signal = entry["signal"].as_str();
        out.push(Check {
            source: source.clone(),
            query: substitute(expr, telemetry_target),
            label: None,
            needs_series: signal.is_none(),
            skip: skip.clone(),
        });
        if let Some(signal) = signal {
            out.push(Check {
                source: format!("{source} (the data it reads)"),
                query: substitute(signal, telemetry_target),
                label: None,
                needs_series: true,
                skip,
            });
        }
    }
    out
}

/// One series of an instant query's result.
#[derive(Debug)]
struct Sample {
    labels: serde_json::Value,
    /// NaN where the query divides zero by zero: a quantile or a ratio of rates with no
    /// events in the window, which a panel shows as no data.
    value: f64,
}

/// Runs an instant query: `Err` when Prometheus refuses it (a parse or evaluation error),
/// else the result's series.
async fn query(prometheus: &PrometheusServer, promql: &str) -> Result<Vec<Sample>, String> {
    let body = reqwest::Client::new()
        .get(format!("http://{}/api/v1/query", prometheus.address))
        .query(&[("query", promql)])
        .send()
        .await
        .map_err(|e| format!("query failed: {e}"))?
        .text()
        .await
        .map_err(|e| format!("query failed: {e}"))?;
    let response: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if response["status"] != "success" {
        return Err(format!("{}: {}", response["errorType"], response["error"]));
    }
    Ok(response["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| Sample {
            labels: r["metric"].clone(),
            value: r["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN),
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_series_from_a_real_agent() {
    // The pod and its workload.
    let (uid, container_id) = unique_ids();
    let mut cgroup = PodCgroup::with_ids(&uid, &container_id);
    // Accepts and holds every connection (the pod always has one open, renewed each round, so
    // each collection samples an open connection's RTT).
    let server = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let server_port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in server.incoming().flatten() {
            held.push(stream);
        }
    });
    // Its accept queue holds one connection and is never drained: the kernel drops the SYNs of
    // the connections after it, and their senders retransmit them.
    let full = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    // SAFETY: listen(2) on a socket this test owns; a second listen() only sets the backlog.
    assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0, "listen");
    let full_port = full.local_addr().unwrap().port();
    let ports = Ports {
        prometheus: free_port(),
        telemetry: free_port(),
        closed: free_port(),
    };
    let io_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory on disk");
    // The pod serves HTTP and gRPC and calls itself (Debian's python3: the PATH one is a pyenv
    // shim, and Debian's grpcio uses the system's libraries).
    let http_port = free_port();
    let grpc_port = free_port();
    cgroup.spawn_shell(&format!(
        "exec /usr/bin/python3 {HTTP_TESTS}/status_server.py {http_port}"
    ));
    cgroup.spawn_shell(&format!(
        "exec /usr/bin/python3 {HTTP_TESTS}/grpc_peer.py server {grpc_port}"
    ));
    wait_listening(http_port);
    wait_listening(grpc_port);
    cgroup.spawn_shell(&format!(
        "while :; do /usr/bin/python3 {HTTP_TESTS}/grpc_peer.py client {grpc_port} Add Fail Add 2>/dev/null; sleep 0.5; done"
    ));
    cgroup.spawn_shell(&format!(
        r#"exec bash -c '
while :; do
  exec 5>&-; exec 5<>/dev/tcp/127.0.0.1/{server_port}; echo held >&5
  cat /proc/loadavg >/dev/null
  cat /nonexistent/file 2>/dev/null
  exec 3<>/dev/tcp/127.0.0.1/{server_port}; echo hello >&3; exec 3>&-
  (exec 4<>/dev/tcp/127.0.0.1/{closed}) 2>/dev/null
  (timeout 2 bash -c "exec 6<>/dev/tcp/127.0.0.1/{full_port}" 2>/dev/null &)
  dd if=/dev/zero of={dir}/block bs=64k count=8 oflag=direct conv=fsync 2>/dev/null
  curl -s -o /dev/null -o /dev/null -o /dev/null http://127.0.0.1:{http_port}/users/42 http://127.0.0.1:{http_port}/status/404 http://127.0.0.1:{http_port}/status/500
  sleep 0.2
done'"#,
        closed = ports.closed,
        dir = io_dir.path().display()
    ));

    let api = FakeApiServer::start().await;
    api.apply_pod(web_pod(&uid, &container_id));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &chart_config(&ports),
        ports.telemetry,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
    )
    .await;
    // Watch errors: the pods' history is compacted and the relist meets 503s (as in
    // k8s_enrichment.rs); the agent relists through them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.open_watches() == 0 {
        assert!(Instant::now() < deadline, "no pod watch open within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.fail_next(3, 503);
    api.expire_history();

    let telemetry_target = format!("127.0.0.1:{}", ports.telemetry);
    // honor_labels as the chart's ServiceMonitor: series keep the job the agent derives.
    let prometheus = PrometheusServer::start_with_scrape_configs(&format!(
        "  - job_name: podscope\n    honor_labels: true\n    static_configs:\n      - targets: [\"127.0.0.1:{}\", \"{telemetry_target}\"]\n        labels:\n          cluster: {CLUSTER}\n",
        ports.prometheus
    ))
    .await;

    let checks = checks(&telemetry_target);
    assert!(checks.len() > 50, "queries.json lists every query");
    // Poll until every query that must return series does (rates need a few scrapes, the
    // provoked losses a retry budget), at most 120 s; then report every one that did not.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<&Check> = checks.iter().filter(|c| c.skip.is_none()).collect();
    let mut failures = Vec::new();
    loop {
        failures.clear();
        let mut still = Vec::new();
        for check in pending {
            match query(&prometheus, &check.query).await {
                Err(e) => failures.push(format!("{}: {e}\n    {}", check.source, check.query)),
                Ok(series) if series.is_empty() && check.needs_series => {
                    failures.push(format!("{}: no series\n    {}", check.source, check.query));
                    still.push(check);
                }
                Ok(series) if check.needs_series && !series.iter().any(|s| s.value.is_finite()) => {
                    failures.push(format!(
                        "{}: no series with a number (a panel shows no data): {series:?}\n    {}",
                        check.source, check.query
                    ));
                    still.push(check);
                }
                Ok(series) => {
                    if let Some((label, value)) = &check.label {
                        if !series
                            .iter()
                            .any(|s| s.labels[label.as_str()] == value.as_str())
                        {
                            failures.push(format!(
                                "{}: no series with {label}={value:?}: {series:?}",
                                check.source
                            ));
                            still.push(check);
                        }
                    }
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Queries whose data cannot exist here must still parse and evaluate.
    for check in checks.iter().filter(|c| c.skip.is_some()) {
        if let Err(e) = query(&prometheus, &check.query).await {
            failures.push(format!("{}: {e}\n    {}", check.source, check.query));
        }
        eprintln!(
            "skipped (no data here): {}: {}",
            check.source,
            check.skip.as_deref().unwrap_or_default()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        checks.len(),
        failures.join("\n")
    );
    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}
