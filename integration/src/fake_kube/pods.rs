//! Pods as the kubelet reports them, for tests that apply them to the fake API server: running,
//! scheduled, with their containers' runtime ids (e.g. those of `PodCgroup`s) and
//! `status.podIP` 127.0.0.1, where the fake's `pods/portforward` reaches a pod's ports.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

/// The labels the Helm chart puts on every agent pod (what `kubectl podscope` looks for).
pub const AGENT_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "podscope"),
    ("app.kubernetes.io/component", "agent"),
];

/// A running pod on `node` whose containers (name, runtime id such as `containerd://…`) run.
pub fn running_pod(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    containers: &[(&str, &str)],
) -> Pod {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| {
            json!({"name": name, "containerID": id, "ready": true, "restartCount": 0,
                   "image": "registry.example/app:1", "imageID": "",
                   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(|(name, _)| json!({"name": name, "image": "registry.example/app:1"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": specs},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": statuses}
    }))
    .expect("a pod")
}

/// The chart's agent pod `podscope-<node>` in `namespace`, its session endpoint on port
/// `session_port` (the container port named `session`, as the chart declares it).
pub fn agent_pod(namespace: &str, node: &str, session_port: u16) -> Pod {
    let pod = running_pod(
        namespace,
        &format!("podscope-{node}"),
        node,
        &AGENT_LABELS,
        &[("agent", "containerd://agent")],
    );
    let mut pod = serde_json::to_value(pod).expect("pod to JSON");
    pod["spec"]["containers"][0]["ports"] =
        json!([{"name": "session", "containerPort": session_port, "protocol": "TCP"}]);
    serde_json::from_value(pod).expect("an agent pod")
}
