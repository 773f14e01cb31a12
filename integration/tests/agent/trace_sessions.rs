//! `TraceSession` objects end to end (root): the real `podscope` binary, its session extension
//! running the cluster's TraceSessions through the kernel trace object, against the fake API
//! server (watch, server-side apply of status, delete). Pods in kubelet-style cgroups made by the
//! test, all labelled `app=web`: two in namespace team-a (the second appears while the sessions
//! run), one in team-b. A session on one pod counts exactly the execs run in that pod's cgroup
//! and none of another pod's; a selector session counts both team-a pods' execs (the late one
//! joins) and none of team-b's; a session naming a pod of another namespace is refused with the
//! reason in its status; each ends at its duration or deadline (Completed, final counts kept);
//! the one with `ttlAfterFinished` is then deleted by the agent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_integration::status_server;
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};
use serde_json::{json, Value};

const NODE: &str = "node-sessions";

fn pod(namespace: &str, name: &str, uid: &str, container_id: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
                name: "app".into(),
                container_id: Some(format!("containerd://{container_id}")),
                image: "registry.example.com/app:1.0".into(),
                image_id: String::new(),
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A kubelet-style pod cgroup made for the test (removed when dropped), with the pod's uid and
/// its container's id.
fn pod_cgroup() -> (PodCgroup, String, String) {
    let (uid, container) = unique_ids();
    (PodCgroup::with_ids(&uid, &container), uid, container)
}

fn session(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "podscope.dev/v1alpha1",
        "kind": "TraceSession",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// Waits (at most 90 s) for `condition` to hold, returning its value.
async fn until<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The session's status once `check` accepts it.
async fn status_when(
    api: &FakeApiServer,
    namespace: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = api
            .custom("TraceSession", namespace, name)
            .map(|s| s["status"].clone())
            .unwrap_or_default();
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "TraceSession {namespace}/{name}: {what}: not within 90 s; last status: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This node's entry of a status.
fn node_entry(status: &Value) -> Option<&Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|entry| entry["node"] == NODE)
}

/// Runs `/bin/true` `n` times from inside `pod`, one exec each.
fn execs(pod: &PodCgroup, n: usize) {
    assert!(
        pod.exec_times("/bin/true", &[], n),
        "an exec of /bin/true failed"
    );
}

/// The real agent, running the fake API server's TraceSessions on [`NODE`]; `trace_sessions`:
/// more settings of `extensions.session.trace_sessions` (`key: value, …`).
async fn start_agent(
    api: &FakeApiServer,
    dir: &std::path::Path,
    trace_sessions: &str,
) -> AgentProcess {
    start_agent_configured(api, dir, trace_sessions, "sched: {}", None).await
}

/// As [`start_agent`], its eBPF receiver running `probes` (`name: {…}, …`) and reporting to
/// the session extension (the http exchanges, `top`'s counters).
async fn start_agent_with_probes(
    api: &FakeApiServer,
    dir: &std::path::Path,
    trace_sessions: &str,
    probes: &str,
) -> AgentProcess {
    start_agent_configured(api, dir, trace_sessions, probes, None).await
}

/// Where an agent exports sessions: the OTLP/gRPC port of a sink, and the port of the agent's
/// own OTLP/HTTP receiver, whose logs go to that sink too.
struct ExportPorts {
    sink_grpc: u16,
    otlp_http: u16,
}

/// What the export tests share: a pod `team-a/POD` in a kubelet-style cgroup, the fake API
/// server, an oteltest sink (a receiver this project did not write) and an agent exporting
/// sessions to it. Fields drop in order: the pod's processes first, the temporary files last.
struct ExportingAgent {
    pod: PodCgroup,
    agent: AgentProcess,
    api: FakeApiServer,
    sink: podscope_integration::oteltest::OteltestSink,
    ports: ExportPorts,
    _dir: tempfile::TempDir,
}

impl ExportingAgent {
    async fn start(pod_name: &str, trace_sessions: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = ExportPorts {
            sink_grpc: free_port(),
            otlp_http: free_port(),
        };
        let sink = podscope_integration::oteltest::OteltestSink::start(ports.sink_grpc);
        let (pod_cgroup, uid, container) = pod_cgroup();
        let api = FakeApiServer::start().await;
        api.apply_pod(pod("team-a", pod_name, &uid, &container));
        let agent = start_agent_exporting(&api, dir.path(), trace_sessions, Some(&ports)).await;
        ExportingAgent {
            pod: pod_cgroup,
            agent,
            api,
            sink,
            ports,
            _dir: dir,
        }
    }

    /// Stops the agent (SIGTERM: it sends what it holds) and reads what the sink decodes until
    /// it has been quiet for half a second. The API server stays, for the status.
    async fn stop_and_read(self, decoded: &mut Decoded) -> FakeApiServer {
        self.agent.sigterm();
        assert!(self.agent.wait(Duration::from_secs(20)).await.success());
        while let Ok(line) = self.sink.lines.recv_timeout(Duration::from_millis(500)) {
            decoded.take(&line);
        }
        self.api
    }
}

/// [`start_agent`], with `export`: a `trace_sessions` receiver in a logs and a metrics
/// pipeline to an `otlp` exporter, and an `otlp` receiver in the logs pipeline.
async fn start_agent_exporting(
    api: &FakeApiServer,
    dir: &std::path::Path,
    trace_sessions: &str,
    export: Option<&ExportPorts>,
) -> AgentProcess {
    start_agent_configured(api, dir, trace_sessions, "sched: {}", export).await
}

/// The agent of [`start_agent`] with its eBPF receiver's `probes` and, with `export`, the
/// pipelines of [`start_agent_exporting`].
async fn start_agent_configured(
    api: &FakeApiServer,
    dir: &std::path::Path,
    trace_sessions: &str,
    probes: &str,
    export: Option<&ExportPorts>,
) -> AgentProcess {
    let (receivers, exporters, pipelines) = match export {
        None => Default::default(),
        Some(ports) => (
            format!(
                "  trace_sessions: {{ extension: session }}\n  otlp: {{ protocols: {{ http: {{ endpoint: \"127.0.0.1:{}\" }} }} }}\n",
                ports.otlp_http
            ),
            format!(
                "  otlp: {{ endpoint: \"127.0.0.1:{}\", tls: {{ insecure: true }} }}\n",
                ports.sink_grpc
            ),
            "    logs: { receivers: [trace_sessions, otlp], exporters: [otlp] }\n    metrics/sessions: { receivers: [trace_sessions], exporters: [otlp] }\n".to_string(),
        ),
    };
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let telemetry_port = free_port();
    let trace_sessions = match trace_sessions {
        "" => String::new(),
        more => format!(", {more}"),
    };
    let config = format!(
        r#"
extensions:
  k8s_metadata:
    auth_type: kubeConfig
    filter: {{ node: {NODE} }}
  session:
    endpoint: 127.0.0.1:0
    node_name: {NODE}
    trace_sessions: {{ extension: k8s_metadata{trace_sessions} }}
receivers:
  ebpf:
    collection_interval: 1s
    session: session
    cgroup_filter: {{ include: ["/kubepods.slice/**"] }}
    probes: {{ {probes} }}
{receivers}exporters:
  nop: {{}}
{exporters}service:
  extensions: [k8s_metadata, session]
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [ebpf], exporters: [nop] }}
{pipelines}"#
    );
    AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await
}

/// Waits until just after the kernel's monotonic clock (what trace events are stamped with)
/// starts a new second, so that a short burst of events falls in one second of the rate cap.
/// Not a readiness wait: the cap counts per second of the events' own timestamps.
async fn at_start_of_a_monotonic_second() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let to_next = 1_000_000_000 - now.tv_nsec as u64 + 20_000_000;
    tokio::time::sleep(Duration::from_nanos(to_next)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_sessions_count_their_pods_execs_exactly_end_on_time_and_are_deleted_after_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a1_uid, a1_container) = pod_cgroup();
    let (a2, a2_uid, a2_container) = pod_cgroup();
    let (b, b_uid, b_container) = pod_cgroup();

    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a1", &a1_uid, &a1_container));
    api.apply_pod(pod("team-b", "web-b", &b_uid, &b_container));

    let _agent = start_agent(&api, dir.path(), "").await;

    // One pod by name, ended by its duration, deleted 2 s after.
    api.apply_custom(session(
        "team-a",
        "one-pod",
        json!({"targets": {"pods": ["web-a1"]}, "probes": ["exec"], "duration": "30s", "ttlAfterFinished": "2s"}),
    ));
    // Every app=web pod of team-a (not team-b's, though it has the label), ended by a deadline.
    let deadline = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(35))
        .unwrap();
    let deadline = k8s_openapi::jiff::Timestamp::from_second(deadline.as_second()).unwrap();
    api.apply_custom(session(
        "team-a",
        "by-label",
        json!({"targets": {"podSelector": {"matchLabels": {"app": "web"}}}, "probes": ["exec"], "deadline": deadline.to_string()}),
    ));
    // Summaries: the commands executed and the processes' lifetimes.
    api.apply_custom(session(
        "team-a",
        "summaries",
        json!({"targets": {"pods": ["web-a1"]}, "probes": ["exec", "exit"], "duration": "60s"}),
    ));
    // A pod of another namespace: refused.
    api.apply_custom(session(
        "team-a",
        "outside",
        json!({"targets": {"pods": ["team-b/web-b"]}, "probes": ["exec"], "duration": "30s"}),
    ));

    let refused = status_when(&api, "team-a", "outside", "Failed", |s| {
        s["phase"] == "Failed"
    })
    .await;
    assert_eq!(refused["reason"], "TargetOutsideNamespace", "{refused}");
    assert_eq!(
        refused["message"],
        "spec.targets.pods[0]: pod team-b/web-b is in namespace team-b, outside the session's namespace team-a; a TraceSession traces pods of its own namespace only"
    );
    assert!(node_entry(&refused).is_none(), "nothing ran: {refused}");
    // Export asked of an agent with no trace_sessions receiver: refused, not run unexported.
    api.apply_custom(session(
        "team-a",
        "exported",
        json!({"targets": {"pods": ["web-a1"]}, "probes": ["exec"], "duration": "30s", "export": true}),
    ));
    let refused = status_when(&api, "team-a", "exported", "Failed", |s| {
        s["phase"] == "Failed"
    })
    .await;
    assert_eq!(refused["reason"], "ExportUnavailable", "{refused}");
    assert_eq!(
        refused["message"],
        format!("spec.export: the agent on node {NODE} cannot export this session: no trace_sessions receiver naming this session extension is in a logs or metrics pipeline of the agent")
    );
    assert!(node_entry(&refused).is_none(), "nothing ran: {refused}");

    // Both run here on web-a1: the kernel filter holds its cgroup before the status says so.
    for name in ["one-pod", "by-label", "summaries"] {
        let running = status_when(&api, "team-a", name, "Running here", |s| {
            node_entry(s).is_some_and(|e| e["phase"] == "Running") && s["phase"] == "Running"
        })
        .await;
        assert_eq!(node_entry(&running).unwrap()["pods"], json!(["web-a1"]));
    }

    execs(&a1, 3);
    execs(&b, 4);
    // The top commands, and the exits: the three /bin/true processes (and the test's own child
    // that ran them in the pod), with their lifetimes' quantiles.
    let summarized = status_when(
        &api,
        "team-a",
        "summaries",
        "3 execs and their exits",
        |s| {
            node_entry(s).is_some_and(|e| {
                e["top"]["exec"] == json!([{"key": "/bin/true", "count": 3}])
                    && e["top"]["exit"][0] == json!({"key": "true", "count": 3})
            })
        },
    )
    .await;
    let entry = node_entry(&summarized).unwrap();
    let exits: u64 = entry["top"]["exit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["count"].as_u64().unwrap())
        .sum();
    assert_eq!(entry["events"]["exit"], exits, "{summarized}");
    let lifetimes = &entry["durations"]["exit"];
    assert_eq!(lifetimes["count"], exits, "{summarized}");
    let (p50, p90, p99) = (
        lifetimes["p50"].as_u64().unwrap(),
        lifetimes["p90"].as_u64().unwrap(),
        lifetimes["p99"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p90 && p90 <= p99, "{lifetimes}");
    // One node: the merged summary is its entry's.
    assert_eq!(summarized["summary"]["top"], entry["top"]);
    assert_eq!(summarized["summary"]["durations"], entry["durations"]);
    // A pod appearing under the selector joins the running session.
    api.apply_pod(pod("team-a", "web-a2", &a2_uid, &a2_container));
    status_when(&api, "team-a", "by-label", "web-a2 joined", |s| {
        node_entry(s).is_some_and(|e| e["pods"] == json!(["web-a1", "web-a2"]))
    })
    .await;
    execs(&a2, 2);

    let counted = status_when(&api, "team-a", "by-label", "5 execs counted", |s| {
        node_entry(s).is_some_and(|e| e["events"]["exec"] == 5)
    })
    .await;
    assert_eq!(counted["phase"], "Running", "{counted}");

    // Ended by the duration: Completed, the pod's 3 execs exactly (none of web-a2's or
    // team-b's), nothing lost.
    let completed = status_when(&api, "team-a", "one-pod", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    let entry = node_entry(&completed).unwrap();
    assert_eq!(entry["phase"], "Completed", "{completed}");
    assert_eq!(entry["events"], json!({"exec": 3}), "{completed}");
    assert_eq!(entry["lost"], 0);
    assert_eq!(entry["pods"], json!(["web-a1"]));
    assert_eq!(
        completed["summary"],
        json!({"nodes": 1, "events": {"exec": 3}, "lost": 0, "dropped": 0, "top": {"exec": [{"key": "/bin/true", "count": 3}]}, "durations": {}})
    );
    assert_eq!(completed["reason"], "Ended");
    assert_eq!(completed["completionTime"], completed["endTime"]);

    // Its TTL passed: the agent deleted it.
    until("one-pod deleted after its ttlAfterFinished", || {
        api.custom("TraceSession", "team-a", "one-pod")
            .is_none()
            .then_some(())
    })
    .await;

    // Ended by its deadline: both team-a pods' execs, 3 + 2, none of team-b's 4.
    let completed = status_when(&api, "team-a", "by-label", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    let entry = node_entry(&completed).unwrap();
    assert_eq!(entry["events"], json!({"exec": 5}), "{completed}");
    assert_eq!(entry["pods"], json!(["web-a1", "web-a2"]));
    assert_eq!(completed["endTime"], deadline.to_string());
    assert_eq!(
        completed["summary"],
        json!({"nodes": 1, "events": {"exec": 5}, "lost": 0, "dropped": 0, "top": {"exec": [{"key": "/bin/true", "count": 5}]}, "durations": {}})
    );
    drop((a1, a2, b));
}

/// The caps of `trace_sessions` (here 2 running sessions per namespace, 5 events per second):
/// team-a's third session waits, Pending with the reason, while team-b's runs; it starts when
/// team-a's first ends. Each session counts at most 5 execs per second and counts the rest as
/// dropped, per node and merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_runs_at_most_its_cap_of_sessions_and_each_counts_at_most_its_event_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_uid, a_container) = pod_cgroup();
    let (b, b_uid, b_container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a", &a_uid, &a_container));
    api.apply_pod(pod("team-b", "web-b", &b_uid, &b_container));
    let _agent = start_agent(
        &api,
        dir.path(),
        "max_running_per_namespace: 2, max_events_per_second: 5",
    )
    .await;

    // Created in this order (and named so: sessions created in the same second run by name).
    let execs_of = |pod: &str, duration: &str| json!({"targets": {"pods": [pod]}, "probes": ["exec"], "duration": duration});
    api.apply_custom(session("team-a", "a-first", execs_of("web-a", "25s")));
    api.apply_custom(session("team-a", "b-second", execs_of("web-a", "90s")));
    api.apply_custom(session("team-a", "c-third", execs_of("web-a", "90s")));
    api.apply_custom(session("team-b", "other", execs_of("web-b", "90s")));

    for (namespace, name) in [
        ("team-a", "a-first"),
        ("team-a", "b-second"),
        ("team-b", "other"),
    ] {
        status_when(&api, namespace, name, "Running here", |s| {
            node_entry(s).is_some_and(|e| e["phase"] == "Running") && s["phase"] == "Running"
        })
        .await;
    }
    let waiting = status_when(&api, "team-a", "c-third", "Pending", |s| {
        s["phase"] == "Pending"
    })
    .await;
    assert_eq!(waiting["reason"], "NamespaceSessionLimit", "{waiting}");
    assert_eq!(
        waiting["message"],
        "namespace team-a runs 2 TraceSession(s) already, the most the agents allow (trace_sessions.max_running_per_namespace); this one starts when one of them ends"
    );
    assert!(node_entry(&waiting).is_none(), "it runs nowhere: {waiting}");

    // 8 execs in one second: 5 counted, 3 dropped, by each session of the pod.
    at_start_of_a_monotonic_second().await;
    execs(&a, 8);
    for name in ["a-first", "b-second"] {
        // The merged summary is written after the node's entry, in a patch of its own.
        let capped = status_when(&api, "team-a", name, "8 execs seen", |s| {
            node_entry(s).is_some_and(|e| e["dropped"] == 3 && e["events"]["exec"] == 5)
                && s["summary"]["events"]["exec"] == 5
        })
        .await;
        assert_eq!(capped["summary"]["dropped"], 3, "{capped}");
        assert_eq!(capped["summary"]["events"], json!({"exec": 5}), "{capped}");
    }
    // The other namespace's session is not capped by team-a's.
    execs(&b, 1);
    status_when(&api, "team-b", "other", "1 exec", |s| {
        node_entry(s).is_some_and(|e| e["events"]["exec"] == 1 && e["dropped"] == 0)
    })
    .await;

    // a-first ends: its slot goes to c-third.
    let ended = status_when(&api, "team-a", "a-first", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    assert_eq!(
        ended["summary"],
        json!({"nodes": 1, "events": {"exec": 5}, "lost": 0, "dropped": 3, "top": {"exec": [{"key": "/bin/true", "count": 5}]}, "durations": {}})
    );
    status_when(&api, "team-a", "c-third", "Running here", |s| {
        node_entry(s).is_some_and(|e| e["phase"] == "Running") && s["phase"] == "Running"
    })
    .await;
    at_start_of_a_monotonic_second().await;
    execs(&a, 2);
    let third = status_when(&api, "team-a", "c-third", "2 execs", |s| {
        node_entry(s).is_some_and(|e| e["events"]["exec"] == 2)
    })
    .await;
    assert_eq!(node_entry(&third).unwrap()["dropped"], 0, "{third}");
    // A new second: b-second keeps these 2 as well, 7 in all, 3 dropped.
    let second = status_when(&api, "team-a", "b-second", "7 execs", |s| {
        node_entry(s).is_some_and(|e| e["events"]["exec"] == 7)
    })
    .await;
    assert_eq!(
        second["summary"],
        json!({"nodes": 1, "events": {"exec": 7}, "lost": 0, "dropped": 3, "top": {"exec": [{"key": "/bin/true", "count": 7}]}, "durations": {}})
    );
    drop((a, b));
}

/// `spec.bpftrace`: refused (Failed, `BpftraceDisabled`, naming the setting) by an agent that
/// does not allow it, whatever `bpftrace.enabled` says; run by one with
/// `trace_sessions.allow_bpftrace`, filtered to the session's pod by `$session_cgroups`, its
/// output lines counted: its BEGIN line and one per exec in the pod, none for the other pod's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bpftrace_session_runs_only_where_allowed_and_counts_its_programs_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_uid, a_container) = pod_cgroup();
    let (other, other_uid, other_container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a", &a_uid, &a_container));
    api.apply_pod(pod("team-a", "db", &other_uid, &other_container));
    let program = r#"BEGIN { printf("ready\n"); } tracepoint:sched:sched_process_exec /$session_cgroups/ { printf("%s\n", comm); }"#;
    let bpftrace_session = |pod: &str, duration: &str| json!({"targets": {"pods": [pod]}, "bpftrace": program, "duration": duration});

    {
        let _refusing = start_agent(&api, dir.path(), "").await;
        // Refused before its pods are looked at: it names none that runs, so that the allowing
        // agent below has nothing of it to run.
        api.apply_custom(session(
            "team-a",
            "refused",
            bpftrace_session("not-running", "60s"),
        ));
        let refused = status_when(&api, "team-a", "refused", "Failed", |s| {
            s["phase"] == "Failed"
        })
        .await;
        assert_eq!(refused["reason"], "BpftraceDisabled", "{refused}");
        assert_eq!(
            refused["message"],
            format!("spec.bpftrace: the agent on node {NODE} does not run bpftrace programs of TraceSessions; the cluster admin allows them with extensions.session.trace_sessions.allow_bpftrace: true (a bpftrace program is arbitrary kernel code run as root)")
        );
        assert!(node_entry(&refused).is_none(), "nothing ran: {refused}");
    }

    let _allowing = start_agent(&api, dir.path(), "allow_bpftrace: true").await;
    api.apply_custom(session("team-a", "execs", bpftrace_session("web-a", "20s")));
    // BEGIN runs once every probe is attached: its line says the program is ready.
    status_when(&api, "team-a", "execs", "bpftrace ready", |s| {
        node_entry(s).is_some_and(|e| e["phase"] == "Running" && e["events"]["bpftrace"] == 1)
    })
    .await;
    execs(&a, 4);
    execs(&other, 3);
    status_when(&api, "team-a", "execs", "4 exec lines", |s| {
        node_entry(s).is_some_and(|e| e["events"]["bpftrace"] == 5)
    })
    .await;
    let completed = status_when(&api, "team-a", "execs", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    let entry = node_entry(&completed).unwrap();
    assert_eq!(entry["events"], json!({"bpftrace": 5}), "{completed}");
    assert_eq!(
        completed["summary"],
        json!({"nodes": 1, "events": {"bpftrace": 5}, "lost": 0, "dropped": 0, "top": {}, "durations": {}})
    );
    drop((a, other));
}

/// `spec.schedule`: every 15 s (a seconds field) a run of 10 s. Each run counts its own execs
/// (2 in the first, 3 in the second); between runs the session is Scheduled with its last run's
/// summary, `lastScheduleTime` and `runs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_session_runs_at_each_firing_and_counts_each_runs_execs() {
    let dir = tempfile::tempdir().unwrap();
    let (web, uid, container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a", &uid, &container));
    let _agent = start_agent(&api, dir.path(), "").await;
    api.apply_custom(session(
        "team-a",
        "every-15s",
        json!({"targets": {"pods": ["web-a"]}, "probes": ["exec"], "schedule": "*/15 * * * * *", "duration": "10s"}),
    ));

    let mut schedule_times = Vec::new();
    for (run, n) in [(1, 2), (2, 3)] {
        status_when(&api, "team-a", "every-15s", "running its next run", |s| {
            node_entry(s).is_some_and(|e| e["phase"] == "Running" && e["run"] == run)
        })
        .await;
        execs(&web, n);
        let ended = status_when(&api, "team-a", "every-15s", "that run ended", |s| {
            node_entry(s).is_some_and(|e| e["phase"] == "Completed" && e["run"] == run)
                && s["phase"] == "Scheduled"
        })
        .await;
        assert_eq!(
            node_entry(&ended).unwrap()["events"],
            json!({"exec": n}),
            "{ended}"
        );
        assert_eq!(ended["runs"], run, "{ended}");
        assert_eq!(ended["reason"], "Scheduled", "{ended}");
        assert_eq!(
            ended["summary"],
            json!({"nodes": 1, "events": {"exec": n}, "lost": 0, "dropped": 0, "top": {"exec": [{"key": "/bin/true", "count": n}]}, "durations": {}})
        );
        let last: k8s_openapi::jiff::Timestamp =
            ended["lastScheduleTime"].as_str().unwrap().parse().unwrap();
        assert_eq!(last.as_second() % 15, 0, "{ended}");
        assert_eq!(ended["startTime"], ended["lastScheduleTime"]);
        assert_eq!(
            ended["endTime"],
            (last + k8s_openapi::jiff::SignedDuration::from_secs(10)).to_string()
        );
        schedule_times.push(last.as_second());
    }
    assert_eq!(schedule_times[1] - schedule_times[0], 15);
    drop(web);
}

/// `probes: [http]`: refused (Failed, naming what to enable) by an agent without the http
/// probe; run by one with it: one event per request the pod served (none of another pod's),
/// the top `METHOD ROUTE STATUS` keys (the route the probe inferred) and the latencies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_session_counts_its_pods_requests_by_route_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (mut web, web_uid, web_container) = pod_cgroup();
    let (mut db, db_uid, db_container) = pod_cgroup();
    let (mut client, _, _) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web", &web_uid, &web_container));
    api.apply_pod(pod("team-a", "db", &db_uid, &db_container));
    let http_session = |duration: &str| json!({"targets": {"pods": ["web"]}, "probes": ["http"], "duration": duration});
    {
        let _without_http = start_agent(&api, dir.path(), "").await;
        api.apply_custom(session("team-a", "refused", http_session("60s")));
        let refused = status_when(&api, "team-a", "refused", "Failed", |s| {
            s["phase"] == "Failed"
        })
        .await;
        assert_eq!(refused["reason"], "NodeFailed", "{refused}");
        assert_eq!(
            refused["message"],
            format!("node {NODE}: probe http: no ebpf receiver with the http probe reports to this session extension; enable the ebpf receiver's `http` probe (receivers.ebpf.probes.http) and name this extension in its `session:` setting")
        );
    }
    let _agent = start_agent_with_probes(&api, dir.path(), "", "http: {}").await;
    let web_port = status_server::start_in(&mut web);
    let db_port = status_server::start_in(&mut db);
    api.apply_custom(session("team-a", "requests", http_session("25s")));
    status_when(&api, "team-a", "requests", "Running here", |s| {
        node_entry(s).is_some_and(|e| e["phase"] == "Running") && s["phase"] == "Running"
    })
    .await;
    let get = |port: u16, path: &str| format!("curl -s -o /dev/null http://127.0.0.1:{port}{path}");
    let script = [
        get(web_port, "/ok"),
        get(web_port, "/ok"),
        get(web_port, "/status/404"),
        get(db_port, "/status/500"),
        get(web_port, "/status/503"),
    ]
    .join(" && ");
    assert_eq!(run_in(&mut client, &script).await, 0, "curl failed");
    let counted = status_when(&api, "team-a", "requests", "4 requests", |s| {
        node_entry(s).is_some_and(|e| e["events"]["http"] == 4)
    })
    .await;
    let entry = node_entry(&counted).unwrap();
    assert_eq!(
        entry["top"]["http"],
        json!([
            {"key": "GET /ok 200", "count": 2},
            {"key": "GET /status/{id} 404", "count": 1},
            {"key": "GET /status/{id} 503", "count": 1},
        ]),
        "{counted}"
    );
    let latencies = &entry["durations"]["http"];
    assert_eq!(latencies["count"], 4, "{counted}");
    let (p50, p99) = (
        latencies["p50"].as_u64().unwrap(),
        latencies["p99"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99, "{latencies}");
    let completed = status_when(&api, "team-a", "requests", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    assert_eq!(
        completed["summary"]["events"],
        json!({"http": 4}),
        "{completed}"
    );
    assert_eq!(completed["summary"]["top"], entry["top"]);
    assert_eq!(completed["summary"]["lost"], 0);
    drop((web, db, client));
}

/// Runs `script` with sh inside `pod` (everything it starts is the pod's); its exit status.
async fn run_in(pod: &mut PodCgroup, script: &str) -> i32 {
    let marker = std::env::temp_dir().join(format!("podscope-sessions-{}", unique_ids().1));
    pod.spawn_shell(&format!("{script}; echo $? > {}", marker.display()));
    let status = until(&format!("{script} finished"), || {
        std::fs::read_to_string(&marker)
            .ok()
            .filter(|status| status.ends_with('\n'))
    })
    .await;
    let _ = std::fs::remove_file(&marker);
    status.trim().parse().expect("an exit status")
}

/// `probes: [top]`: each interval a row per pod; the status's `podCounters` has the pod's
/// totals since its first collection: exactly the 7 opens its process made then, CPU seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_session_totals_its_pods_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (mut web, uid, container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web", &uid, &container));
    let _agent = start_agent_with_probes(&api, dir.path(), "", "files: {}, syscalls: {}").await;
    // Started (its own opens done) before the session: it then opens /dev/null 7 times when
    // told to. Waiting is stat() and sleep, no open.
    let ready = dir.path().join("ready");
    let go = dir.path().join("go");
    web.spawn_shell(&format!(
        "exec /usr/bin/python3 -c 'import os, time\nopen(\"{ready}\", \"w\").close()\nwhile not os.path.exists(\"{go}\"): time.sleep(0.05)\nfor _ in range(7): os.close(os.open(\"/dev/null\", os.O_RDONLY))\nwhile True: time.sleep(1)'",
        ready = ready.display(),
        go = go.display()
    ));
    until("the workload started", || ready.exists().then_some(())).await;
    api.apply_custom(session(
        "team-a",
        "counters",
        json!({"targets": {"pods": ["web"]}, "probes": ["top"], "duration": "30s"}),
    ));
    // Its totals start at the first collection after it joined: `opens` appears then.
    let started = status_when(&api, "team-a", "counters", "the pod's totals start", |s| {
        node_entry(s).is_some_and(|e| e["podCounters"][0]["opens"].is_u64())
    })
    .await;
    assert_eq!(
        node_entry(&started).unwrap()["podCounters"][0]["opens"],
        0,
        "{started}"
    );
    std::fs::write(&go, "").unwrap();
    let counted = status_when(&api, "team-a", "counters", "7 opens", |s| {
        node_entry(s).is_some_and(|e| e["podCounters"][0]["opens"] == 7)
    })
    .await;
    let row = &node_entry(&counted).unwrap()["podCounters"][0];
    assert_eq!(row["pod"], "web", "{counted}");
    assert!(row["syscalls"].as_u64().unwrap() > 0, "{row}");
    assert!(row["cpuSeconds"].as_f64().unwrap() >= 0.0, "{row}");
    let completed = status_when(&api, "team-a", "counters", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    let pods = &completed["summary"]["podCounters"];
    assert_eq!(pods.as_array().unwrap().len(), 1, "{completed}");
    assert_eq!(pods[0]["opens"], 7, "{completed}");
    // One event per pod and interval: as many as the pod's samples.
    assert_eq!(
        completed["summary"]["events"]["top"], pods[0]["samples"],
        "{completed}"
    );
    assert!(pods[0]["samples"].as_u64().unwrap() >= 3, "{completed}");
    drop(web);
}

/// `probes: [profile]`: the pod's process spends its time in `burn_leaf`; the summary's
/// functions by samples have it first, and the samples are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_session_finds_the_function_its_pod_spins_in() {
    let dir = tempfile::tempdir().unwrap();
    let (mut busy, uid, container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "busy", &uid, &container));
    let burn = podscope_integration::test_programs::compile_burn(dir.path());
    busy.spawn_shell(&format!("exec {} 600", burn.display()));
    let _agent = start_agent(&api, dir.path(), "").await;
    api.apply_custom(session(
        "team-a",
        "cpu",
        json!({"targets": {"pods": ["busy"]}, "probes": ["profile"], "duration": "8s"}),
    ));
    let completed = status_when(&api, "team-a", "cpu", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    let summary = &completed["summary"];
    let samples = summary["events"]["profile"].as_u64().unwrap();
    assert!(samples > 0, "{completed}");
    assert_eq!(
        summary["top"]["profile"][0]["key"], "burn_leaf",
        "{completed}"
    );
    let by_function: u64 = summary["top"]["profile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["count"].as_u64().unwrap())
        .sum();
    assert!(by_function <= samples, "{completed}");
    drop(busy);
}

/// A bpftrace session over a selector: a pod that joins later is added to `$session_cgroups`
/// (the program runs again over both pods' cgroups, printing its BEGIN line again), and the
/// lines are counted across: each pod's execs, none of a pod outside the selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bpftrace_session_follows_a_pod_that_joins_late_and_keeps_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_uid, a_container) = pod_cgroup();
    let (late, late_uid, late_container) = pod_cgroup();
    let (other, other_uid, other_container) = pod_cgroup();
    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a", &a_uid, &a_container));
    let mut db = pod("team-a", "db", &other_uid, &other_container);
    db.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
    api.apply_pod(db);
    let _agent = start_agent(&api, dir.path(), "allow_bpftrace: true").await;
    let program = r#"BEGIN { printf("ready\n"); } tracepoint:sched:sched_process_exec /$session_cgroups/ { printf("%s\n", comm); }"#;
    api.apply_custom(session(
        "team-a",
        "web-execs",
        json!({"targets": {"podSelector": {"matchLabels": {"app": "web"}}}, "bpftrace": program, "duration": "40s"}),
    ));
    let lines =
        |n: u64| move |s: &Value| node_entry(s).is_some_and(|e| e["events"]["bpftrace"] == n);
    status_when(&api, "team-a", "web-execs", "bpftrace ready", lines(1)).await;
    execs(&a, 2);
    status_when(&api, "team-a", "web-execs", "web-a's 2 execs", lines(3)).await;
    // The late pod joins: the program runs again (its BEGIN line once more) over both pods.
    api.apply_pod(pod("team-a", "web-late", &late_uid, &late_container));
    let joined = status_when(
        &api,
        "team-a",
        "web-execs",
        "restarted with web-late",
        |s| node_entry(s).is_some_and(|e| e["pods"] == json!(["web-a", "web-late"])) && lines(4)(s),
    )
    .await;
    assert_eq!(joined["phase"], "Running", "{joined}");
    execs(&late, 3);
    execs(&a, 1);
    execs(&other, 2);
    status_when(&api, "team-a", "web-execs", "4 more exec lines", lines(8)).await;
    let completed = status_when(&api, "team-a", "web-execs", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    assert_eq!(
        node_entry(&completed).unwrap()["events"],
        json!({"bpftrace": 8}),
        "{completed}"
    );
    assert_eq!(completed["summary"]["events"], json!({"bpftrace": 8}));
    drop((a, late, other));
}

/// Attribute `key` of an OTLP attribute list in protobuf's JSON mapping, as text.
fn attribute(attributes: &Value, key: &str) -> Option<String> {
    let value = &attributes.as_array()?.iter().find(|kv| kv["key"] == key)?["value"];
    value["stringValue"]
        .as_str()
        .map(str::to_string)
        .or_else(|| value["intValue"].as_str().map(str::to_string))
}

/// What the sink decoded: log records, and the data points of `podscope.session.*` metrics
/// (name, attributes, value as text).
#[derive(Default)]
struct Decoded {
    records: Vec<Value>,
    points: Vec<(String, Value, String)>,
}

impl Decoded {
    fn take(&mut self, line: &str) {
        let decoded: Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(decoded["transport"], "grpc", "{decoded}");
        let request = &decoded["request"];
        match decoded["signal"].as_str() {
            Some("logs") => {
                for rl in request["resourceLogs"].as_array().into_iter().flatten() {
                    for sl in rl["scopeLogs"].as_array().into_iter().flatten() {
                        for record in sl["logRecords"].as_array().into_iter().flatten() {
                            let mut record = record.clone();
                            record["resource"] = rl["resource"].clone();
                            self.records.push(record);
                        }
                    }
                }
            }
            Some("metrics") => {
                for rm in request["resourceMetrics"].as_array().into_iter().flatten() {
                    for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                        for metric in sm["metrics"].as_array().into_iter().flatten() {
                            let name = metric["name"].as_str().unwrap_or_default();
                            let data = if metric["sum"].is_object() {
                                &metric["sum"]
                            } else {
                                &metric["gauge"]
                            };
                            for point in data["dataPoints"].as_array().into_iter().flatten() {
                                let value = point["asInt"].as_str().unwrap_or_default();
                                self.points.push((
                                    name.to_string(),
                                    point["attributes"].clone(),
                                    value.to_string(),
                                ));
                            }
                        }
                    }
                }
            }
            other => panic!("unexpected signal {other:?}: {decoded}"),
        }
    }

    /// The values of `metric`'s points of session `session`, in the order they came.
    fn values(&self, metric: &str, session: &str, probe: Option<&str>) -> Vec<String> {
        self.points
            .iter()
            .filter(|(name, attributes, _)| {
                name == metric
                    && attribute(attributes, "podscope.session.name").as_deref() == Some(session)
                    && attribute(attributes, "podscope.probe").as_deref() == probe
            })
            .map(|(_, _, value)| value.clone())
            .collect()
    }

    fn records_of(&self, session: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| {
                attribute(&r["attributes"], "podscope.session.name").as_deref() == Some(session)
            })
            .collect()
    }
}

/// Issue 16's export path, checked at a receiver this project did not write (the oteltest sink:
/// grpcio and the official Python OTLP bindings): a session with `export: true` counting a
/// pod's execs exactly sends each exec as one log record (its session, pod and fields as
/// attributes) and its summary as metrics whose event count is the same; the agent's OTLP
/// receiver takes logs into the same pipeline. An agent with no `trace_sessions` receiver
/// refuses such a session (the other tests' agents).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_session_reaches_a_third_party_otlp_receiver_as_one_log_record_per_event_and_its_counts(
) {
    let setup = ExportingAgent::start("web-a1", "").await;
    let api = &setup.api;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    api.apply_custom(session(
        "team-a",
        "exported",
        json!({"targets": {"pods": ["web-a1"]}, "probes": ["exec"], "duration": "20s", "export": true}),
    ));
    status_when(api, "team-a", "exported", "Running here", |s| {
        node_entry(s).is_some_and(|e| e["phase"] == "Running")
    })
    .await;
    execs(&setup.pod, 3);
    // A client's log record through the agent's OTLP/HTTP receiver, to the same sink.
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/logs", setup.ports.otlp_http))
        .header("content-type", "application/json")
        .body(r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":"1800000000000000000","body":{"stringValue":"hello from a client"}}]}]}]}"#)
        .send()
        .await
        .expect("the OTLP receiver answers");
    assert_eq!(response.status(), 200);

    let completed = status_when(api, "team-a", "exported", "Completed", |s| {
        s["phase"] == "Completed"
    })
    .await;
    assert_eq!(
        node_entry(&completed).unwrap()["events"],
        json!({"exec": 3})
    );

    // Until the sink has the three records, the client's and the final count; then the agent
    // stops (sending what it holds) and the rest is read: nothing more of the session.
    let mut decoded = Decoded::default();
    until(
        "the sink decoded the session's records and final count",
        || {
            decoded.read(&setup.sink);
            let counts = decoded.values("podscope.session.events", "exported", Some("exec"));
            let client = decoded
                .records
                .iter()
                .any(|r| r["body"]["stringValue"] == "hello from a client");
            (decoded.records_of("exported").len() >= 3
                && client
                && counts.last().map(String::as_str) == Some("3"))
            .then_some(())
        },
    )
    .await;
    setup.stop_and_read(&mut decoded).await;

    let records = decoded.records_of("exported");
    assert_eq!(records.len(), 3, "one record per exec: {records:#?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for record in &records {
        let a = &record["attributes"];
        assert_eq!(
            attribute(a, "k8s.namespace.name").as_deref(),
            Some("team-a")
        );
        assert_eq!(attribute(a, "k8s.pod.name").as_deref(), Some("web-a1"));
        assert_eq!(attribute(a, "podscope.probe").as_deref(), Some("exec"));
        assert_eq!(
            attribute(a, "podscope.event.filename").as_deref(),
            Some("/bin/true"),
            "{record}"
        );
        assert_eq!(
            attribute(&record["resource"]["attributes"], "k8s.node.name").as_deref(),
            Some(NODE)
        );
        let body = record["body"]["stringValue"].as_str().unwrap();
        assert!(
            body.starts_with("exec ") && body.contains(" filename=/bin/true"),
            "{body}"
        );
        // Wall-clock time of the exec (the kernel's clock moved to the epoch).
        let time: u64 = record["timeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(
            started <= time && time <= now,
            "{time} not in [{started}, {now}]"
        );
    }
    // The summaries: cumulative, ending at the status's count; nothing dropped or lost.
    let counts = decoded.values("podscope.session.events", "exported", Some("exec"));
    assert_eq!(counts.last().map(String::as_str), Some("3"), "{counts:?}");
    assert!(
        counts.iter().all(|c| c.parse::<u64>().unwrap() <= 3),
        "{counts:?}"
    );
    let last = |metric: &str| decoded.values(metric, "exported", None).last().cloned();
    assert_eq!(last("podscope.session.dropped").as_deref(), Some("0"));
    assert_eq!(last("podscope.session.lost").as_deref(), Some("0"));
    let (_, attributes, _) = decoded
        .points
        .iter()
        .find(|(name, _, _)| name == "podscope.session.events")
        .unwrap();
    assert_eq!(
        attribute(attributes, "k8s.namespace.name").as_deref(),
        Some("team-a")
    );
}

impl Decoded {
    /// The values of session `session`'s `podscope.session.phase` points of `phase`, in the
    /// order they came (one per summary).
    fn phase_values(&self, session: &str, phase: &str) -> Vec<String> {
        self.points
            .iter()
            .filter(|(name, attributes, _)| {
                name == "podscope.session.phase"
                    && attribute(attributes, "podscope.session.name").as_deref() == Some(session)
                    && attribute(attributes, "phase").as_deref() == Some(phase)
            })
            .map(|(_, _, value)| value.clone())
            .collect()
    }

    /// Reads what the sink has decoded so far.
    fn read(&mut self, sink: &podscope_integration::oteltest::OteltestSink) {
        while let Ok(line) = sink.lines.try_recv() {
            self.take(&line);
        }
    }
}

/// The pid of the `bpftrace` the agent `agent` runs (its child).
fn bpftrace_child_of(agent: i32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces, so split after its ')'.
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let parent: i32 = rest.split(' ').nth(1)?.parse().ok()?;
            (comm == "bpftrace" && parent == agent).then_some(pid)
        })
}

/// A run that fails exports its end: an exported bpftrace session whose program dies
/// (killed here, after its BEGIN line and one line per exec of 2) is Failed on the node with the
/// reason, and its final summary reaches the OTLP sink once: phase Failed (1, the other phases
/// 0) and the run's 3 lines, and nothing of the session after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_session_whose_bpftrace_program_fails_exports_its_final_summary_as_failed() {
    let setup = ExportingAgent::start("web-a", "allow_bpftrace: true").await;
    let api = &setup.api;
    let program = r#"BEGIN { printf("ready\n"); } tracepoint:sched:sched_process_exec /$session_cgroups/ { printf("%s\n", comm); }"#;
    api.apply_custom(session(
        "team-a",
        "failing",
        json!({"targets": {"pods": ["web-a"]}, "bpftrace": program, "duration": "120s", "export": true}),
    ));
    let lines = |n: u64| {
        move |s: &Value| {
            node_entry(s).is_some_and(|e| e["phase"] == "Running" && e["events"]["bpftrace"] == n)
        }
    };
    status_when(api, "team-a", "failing", "bpftrace ready", lines(1)).await;
    execs(&setup.pod, 2);
    status_when(api, "team-a", "failing", "2 exec lines", lines(3)).await;

    let bpftrace = until("the agent's bpftrace process", || {
        bpftrace_child_of(setup.agent.pid())
    })
    .await;
    // SAFETY: kill sends a signal to the test's own agent's child.
    assert_eq!(unsafe { libc::kill(bpftrace, libc::SIGKILL) }, 0);

    let failed = status_when(api, "team-a", "failing", "Failed", |s| {
        s["phase"] == "Failed"
    })
    .await;
    let entry = node_entry(&failed).unwrap();
    assert_eq!(entry["phase"], "Failed", "{failed}");
    assert_eq!(entry["events"], json!({"bpftrace": 3}), "{failed}");
    let message = entry["message"].as_str().unwrap();
    assert!(
        message.starts_with("bpftrace exited with signal: 9 (SIGKILL)"),
        "{message}"
    );

    let mut decoded = Decoded::default();
    until("the sink decoded the Failed summary", || {
        decoded.read(&setup.sink);
        decoded
            .phase_values("failing", "Failed")
            .contains(&"1".to_string())
            .then_some(())
    })
    .await;
    // Later ticks would have come within a second: none may, the run is over.
    setup.stop_and_read(&mut decoded).await;
    let failed_phase = decoded.phase_values("failing", "Failed");
    assert_eq!(
        failed_phase.iter().filter(|v| *v == "1").count(),
        1,
        "one final summary: {failed_phase:?}"
    );
    assert_eq!(failed_phase.last().map(String::as_str), Some("1"));
    for other in ["Running", "Completed", "AgentStopped"] {
        let values = decoded.phase_values("failing", other);
        assert_eq!(values.len(), failed_phase.len(), "{other}: {values:?}");
        assert_eq!(values.last().map(String::as_str), Some("0"), "{other}");
    }
    let counts = decoded.values("podscope.session.events", "failing", Some("bpftrace"));
    assert_eq!(counts.last().map(String::as_str), Some("3"), "{counts:?}");
}

/// The agent's stop exports a run's end: SIGTERM to an agent running an exported
/// session (3 execs counted): before its pipelines drain, the run's final summary reaches the
/// OTLP sink once, its counts (3 execs, nothing dropped or lost) with phase AgentStopped; the
/// status keeps the last tick's entry (the session runs again when an agent is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopping_exports_its_running_sessions_final_counts_as_agent_stopped() {
    let setup = ExportingAgent::start("web-a", "").await;
    let api = &setup.api;
    api.apply_custom(session(
        "team-a",
        "stopped",
        json!({"targets": {"pods": ["web-a"]}, "probes": ["exec"], "duration": "300s", "export": true}),
    ));
    status_when(api, "team-a", "stopped", "Running here", |s| {
        node_entry(s).is_some_and(|e| e["phase"] == "Running")
    })
    .await;
    execs(&setup.pod, 3);
    status_when(api, "team-a", "stopped", "3 execs", |s| {
        node_entry(s).is_some_and(|e| e["events"]["exec"] == 3)
    })
    .await;

    let mut decoded = Decoded::default();
    until("a tick's summary at the sink", || {
        decoded.read(&setup.sink);
        (!decoded.phase_values("stopped", "Running").is_empty()).then_some(())
    })
    .await;
    let api = setup.stop_and_read(&mut decoded).await;

    let stopped = decoded.phase_values("stopped", "AgentStopped");
    assert_eq!(
        stopped.iter().filter(|v| *v == "1").count(),
        1,
        "one final summary: {stopped:?}"
    );
    assert_eq!(stopped.last().map(String::as_str), Some("1"), "the last");
    let running = decoded.phase_values("stopped", "Running");
    assert_eq!(running.last().map(String::as_str), Some("0"), "{running:?}");
    let counts = decoded.values("podscope.session.events", "stopped", Some("exec"));
    assert_eq!(counts.last().map(String::as_str), Some("3"), "{counts:?}");
    let last = |metric: &str| decoded.values(metric, "stopped", None).last().cloned();
    assert_eq!(last("podscope.session.dropped").as_deref(), Some("0"));
    assert_eq!(last("podscope.session.lost").as_deref(), Some("0"));
    // The status is not written at the stop: its entry is the last tick's.
    let status = api.custom("TraceSession", "team-a", "stopped").unwrap()["status"].clone();
    let entry = node_entry(&status).unwrap();
    assert_eq!(entry["phase"], "Running", "{status}");
    assert_eq!(entry["events"], json!({"exec": 3}), "{status}");
}
