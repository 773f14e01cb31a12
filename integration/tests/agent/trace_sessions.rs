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
    until(&format!("TraceSession {namespace}/{name}: {what}"), || {
        let status = api.custom("TraceSession", namespace, name)?["status"].clone();
        check(&status).then_some(status)
    })
    .await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_sessions_count_their_pods_execs_exactly_end_on_time_and_are_deleted_after_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let (a1_uid, a1_container) = unique_ids();
    let a1 = PodCgroup::with_ids(&a1_uid, &a1_container);
    let (a2_uid, a2_container) = unique_ids();
    let a2 = PodCgroup::with_ids(&a2_uid, &a2_container);
    let (b_uid, b_container) = unique_ids();
    let b = PodCgroup::with_ids(&b_uid, &b_container);

    let api = FakeApiServer::start().await;
    api.apply_pod(pod("team-a", "web-a1", &a1_uid, &a1_container));
    api.apply_pod(pod("team-b", "web-b", &b_uid, &b_container));

    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let telemetry_port = free_port();
    let config = format!(
        r#"
extensions:
  k8s_metadata:
    auth_type: kubeConfig
    filter: {{ node: {NODE} }}
  session:
    endpoint: 127.0.0.1:0
    node_name: {NODE}
    trace_sessions: {{ extension: k8s_metadata }}
receivers:
  ebpf:
    collection_interval: 1s
    cgroup_filter: {{ include: ["/"] }}
    probes: {{ sched: {{}} }}
exporters:
  nop: {{}}
service:
  extensions: [k8s_metadata, session]
  telemetry: {{ metrics: {{ address: "127.0.0.1:{telemetry_port}" }} }}
  pipelines:
    metrics: {{ receivers: [ebpf], exporters: [nop] }}
"#
    );
    let _agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;

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

    // Both run here on web-a1: the kernel filter holds its cgroup before the status says so.
    for name in ["one-pod", "by-label"] {
        let running = status_when(&api, "team-a", name, "Running here", |s| {
            node_entry(s).is_some_and(|e| e["phase"] == "Running") && s["phase"] == "Running"
        })
        .await;
        assert_eq!(node_entry(&running).unwrap()["pods"], json!(["web-a1"]));
    }

    execs(&a1, 3);
    execs(&b, 4);
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
        json!({"nodes": 1, "events": {"exec": 3}, "lost": 0})
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
        json!({"nodes": 1, "events": {"exec": 5}, "lost": 0})
    );
    drop((a1, a2, b));
}
