//! End to end through the real `podscope` binary and a Kubernetes API server reached through a
//! kubeconfig (the fake in `podscope_integration::fake_kube`, checked against kubectl in its own
//! test): a shell runs in a kubelet-style cgroup made by the test, the API server serves its pod
//! (owned by ReplicaSet `web-7d4b9c8f6` of Deployment `web`), and the eBPF receiver's data for
//! that cgroup leaves the agent carrying the pod's `k8s.*` attributes. Then the API server goes
//! away (data keeps flowing, still enriched, `/readyz` says why it is not ready), comes back
//! (ready again), and the pod is deleted (data within `pod_delete_delay` is still enriched).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use podscope_integration::agent::{free_port, AgentProcess};
use podscope_integration::fake_kube::FakeApiServer;
use podscope_testkit::pod_cgroup::unique_ids;
use podscope_testkit::PodCgroup;

const NODE: &str = "node-e2e";

fn pod(name: &str, uid: &str, node: &str, container_id: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            labels: Some(BTreeMap::from([
                ("pod-template-hash".into(), "7d4b9c8f6".into()),
                ("app".into(), "web".into()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "web-7d4b9c8f6".into(),
                uid: "5f0c1e2d-0000-4000-8000-000000000001".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.example.com/shop/web:1.4.2".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.244.1.7".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "app".into(),
                container_id: Some(format!("containerd://{container_id}")),
                image: "registry.example.com/shop/web:1.4.2".into(),
                image_id: "registry.example.com/shop/web@sha256:00".into(),
                ready: true,
                restart_count: 1,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Resource attributes of every ResourceMetrics in the file from line `from` on, as strings.
fn resources(out: &Path, from: usize) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut found = Vec::new();
    // The last line may still be being written: only whole lines.
    let complete = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    for line in complete.lines().skip(from) {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        for rm in value["resourceMetrics"].as_array().into_iter().flatten() {
            let mut attrs = BTreeMap::new();
            for kv in rm["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let v = &kv["value"];
                let text = v["stringValue"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| v["intValue"].as_str().map(str::to_string))
                    .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
                    .unwrap_or_else(|| v.to_string());
                attrs.insert(kv["key"].as_str().unwrap().to_string(), text);
            }
            found.push(attrs);
        }
    }
    found
}

fn line_count(out: &Path) -> usize {
    std::fs::read_to_string(out)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits (at most 60 s) for a resource of `cgroup_path` written after line `from`.
async fn next_resource_of(out: &Path, from: usize, cgroup_path: &str) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = resources(out, from)
            .into_iter()
            .find(|r| r.get("podscope.cgroup.path").map(String::as_str) == Some(cgroup_path))
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no data for {cgroup_path} after line {from} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn agent_metrics(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("agent /metrics")
        .text()
        .await
        .unwrap()
}

/// Waits (at most 60 s) until the agent's `/metrics` contains `line`.
async fn wait_for_metric(port: u16, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent_metrics(port).await.contains(line) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in /metrics within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most 60 s) until `/readyz` answers `ready`, returning its last body.
async fn wait_for_readyz(port: u16, ready: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .expect("agent /readyz");
        let ok = response.status().is_success();
        let body = response.text().await.unwrap();
        if ok == ready {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {body:?} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_enriched(r: &BTreeMap<String, String>, uid: &str, container_id: &str, when: &str) {
    let expected = [
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "web-7d4b9c8f6-x2x7k"),
        ("k8s.pod.uid", uid),
        ("k8s.pod.ip", "10.244.1.7"),
        ("k8s.node.name", NODE),
        ("k8s.container.name", "app"),
        ("k8s.container.restart_count", "1"),
        ("container.id", container_id),
        ("container.image.name", "registry.example.com/shop/web"),
        ("k8s.deployment.name", "web"),
        ("k8s.replicaset.name", "web-7d4b9c8f6"),
        ("service.name", "web"),
        ("service.namespace", "shop"),
        ("service.version", "1.4.2"),
    ];
    for (key, value) in expected {
        assert_eq!(
            r.get(key).map(String::as_str),
            Some(value),
            "{when}: {key} in {r:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_data_is_enriched_through_an_api_outage_and_after_the_pod_is_deleted() {
    let (uid, container_id) = unique_ids();
    let mut cgroup = PodCgroup::with_ids(&uid, &container_id);
    let cgroup_path = cgroup.relative_path().to_string();
    cgroup.spawn_shell("while :; do cat /proc/loadavg >/dev/null; sleep 0.05; done");

    let api = FakeApiServer::start().await;
    api.apply_pod(pod("web-7d4b9c8f6-x2x7k", &uid, NODE, &container_id));
    // Another node's pod: the agent must not even receive it.
    api.apply_pod(pod(
        "web-7d4b9c8f6-other",
        "5f0c1e2d-0000-4000-8000-0000000000ff",
        "node-elsewhere",
        &"f".repeat(64),
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let out = dir.path().join("out.jsonl");
    let telemetry_port = free_port();
    let config = format!(
        r#"
receivers:
  ebpf:
    collection_interval: 300ms
    cgroup_filter:
      include: ["{cgroup_path}"]
    probes:
      syscalls: {{ latency: false, errors: false, required: true }}
processors:
  k8sattributes:
    auth_type: kubeConfig
    pod_delete_delay: 120s
exporters:
  file:
    path: {out}
service:
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [ebpf]
      processors: [k8sattributes]
      exporters: [file]
"#,
        out = out.display()
    );
    // Ready means the pod list is synced: the first data is enriched.
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
    )
    .await;
    let first = next_resource_of(&out, 0, &cgroup_path).await;
    assert_enriched(&first, &uid, &container_id, "with the API server up");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("/api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-e2e")),
        "the pod list must be scoped to the node: {:?}",
        api.requests()
    );
    let metrics = agent_metrics(telemetry_port).await;
    assert!(
        metrics.contains(
            r#"podscope_k8s_metadata_pods{extension="extension/k8s_metadata/k8sattributes",state="live"} 1"#
        ),
        "only this node's pod is cached:\n{metrics}"
    );

    // The API server goes away: data keeps flowing, enriched from the cache.
    api.stop().await;
    let why = wait_for_readyz(telemetry_port, false).await;
    assert!(why.contains("pod metadata not synced"), "{why}");
    let during = next_resource_of(&out, line_count(&out), &cgroup_path).await;
    assert_enriched(&during, &uid, &container_id, "with the API server down");

    // It comes back: the watch resumes and the agent is ready again.
    api.restart().await;
    wait_for_readyz(telemetry_port, true).await;

    // History compacted (410 Expired on the open watch) and the relist meets 503s: the agent
    // relists through them and is ready again, still enriching. Ready means listed; the watch
    // that follows must be open, or there is nothing to expire (and kube's client retries the
    // 503s of a watch request itself, so nothing would fail).
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.open_watches() == 0 {
        assert!(Instant::now() < deadline, "no watch open again within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.fail_next(3, 503);
    api.expire_history();
    let why = wait_for_readyz(telemetry_port, false).await;
    assert!(why.contains("pod metadata not synced"), "{why}");
    wait_for_readyz(telemetry_port, true).await;
    let relisted = next_resource_of(&out, line_count(&out), &cgroup_path).await;
    assert_enriched(&relisted, &uid, &container_id, "after 410 and 503s");

    // The pod is deleted: within pod_delete_delay its data is still enriched.
    assert!(api.delete_pod("shop", "web-7d4b9c8f6-x2x7k"));
    wait_for_metric(
        telemetry_port,
        r#"podscope_k8s_metadata_pods{extension="extension/k8s_metadata/k8sattributes",state="deleted"} 1"#,
    )
    .await;
    let after = next_resource_of(&out, line_count(&out), &cgroup_path).await;
    assert_enriched(&after, &uid, &container_id, "after the pod was deleted");

    let metrics = agent_metrics(telemetry_port).await;
    assert!(
        metrics.contains(r#"podscope_k8s_metadata_watch_errors_total{extension="extension/k8s_metadata/k8sattributes",resource="pods"}"#),
        "the outage is counted:\n{metrics}"
    );
    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}

/// `cgroup_filter.pods` selects cgroups in the kernel by namespace and labels, through the
/// k8sattributes processor's own extension, and follows pods as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_filter_selects_pods_through_the_processors_extension() {
    let config = |out: &str, telemetry_port: u16| {
        format!(
            r#"
receivers:
  ebpf:
    collection_interval: 300ms
    cgroup_filter:
      pods:
        namespaces: [shop]
        labels: app=web,pod-template-hash
    probes:
      syscalls: {{ latency: false, errors: false, required: true }}
processors:
  k8sattributes:
    auth_type: kubeConfig
    filter:
      node: {NODE}
exporters:
  file:
    path: {out}
service:
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [ebpf]
      processors: [k8sattributes]
      exporters: [file]
"#
        )
    };
    the_kernel_filter_selects_pods_and_follows_new_pods(config).await;
}

/// The same with a `k8s_metadata` extension both the receiver and the processor name, and a
/// set-based selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_filter_selects_pods_through_a_named_extension() {
    let config = |out: &str, telemetry_port: u16| {
        format!(
            r#"
extensions:
  k8s_metadata/node:
    auth_type: kubeConfig
    filter:
      node: {NODE}
receivers:
  ebpf:
    collection_interval: 300ms
    cgroup_filter:
      pods:
        extension: k8s_metadata/node
        namespaces: [shop]
        labels: app in (web, api),pod-template-hash
    probes:
      syscalls: {{ latency: false, errors: false, required: true }}
processors:
  k8sattributes:
    extension: k8s_metadata/node
exporters:
  file:
    path: {out}
service:
  extensions: [k8s_metadata/node]
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [ebpf]
      processors: [k8sattributes]
      exporters: [file]
"#
        )
    };
    the_kernel_filter_selects_pods_and_follows_new_pods(config).await;
}

/// Three pods in kubelet-style cgroups: one the filter selects, one of another namespace, one
/// the API server lists only later; `config` gives the agent's config for an output file and a
/// telemetry port.
async fn the_kernel_filter_selects_pods_and_follows_new_pods(config: impl Fn(&str, u16) -> String) {
    let script = "while :; do cat /proc/loadavg >/dev/null; sleep 0.05; done";
    let (web_uid, web_container) = unique_ids();
    let mut web = PodCgroup::with_ids(&web_uid, &web_container);
    web.spawn_shell(script);
    // Same labels, other namespace: never selected.
    let (db_uid, db_container) = unique_ids();
    let mut db = PodCgroup::with_ids(&db_uid, &db_container);
    db.spawn_shell(script);
    // A pod the API server does not know yet, running already.
    let (late_uid, late_container) = unique_ids();
    let mut late = PodCgroup::with_ids(&late_uid, &late_container);
    late.spawn_shell(script);

    let api = FakeApiServer::start().await;
    api.apply_pod(pod("web-7d4b9c8f6-x2x7k", &web_uid, NODE, &web_container));
    let mut other = pod("web-7d4b9c8f6-db000", &db_uid, NODE, &db_container);
    other.metadata.namespace = Some("backoffice".into());
    api.apply_pod(other);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let out = dir.path().join("out.jsonl");
    let telemetry_port = free_port();
    let config = config(&out.display().to_string(), telemetry_port);
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let first = next_resource_of(&out, 0, web.relative_path()).await;
    assert_enriched(&first, &web_uid, &web_container, "selected pod");
    // Three more collections of the selected pod, and still nothing of the others.
    for _ in 0..3 {
        next_resource_of(&out, line_count(&out), web.relative_path()).await;
    }
    let seen: Vec<String> = resources(&out, 0)
        .into_iter()
        .filter_map(|r| r.get("podscope.cgroup.path").cloned())
        .collect();
    assert!(
        seen.iter().all(|p| p == web.relative_path()),
        "only the selected pod's cgroup is observed: {seen:?}"
    );

    // The late pod appears in the API: the kernel filter takes it in without a restart.
    api.apply_pod(pod("web-7d4b9c8f6-late0", &late_uid, NODE, &late_container));
    let late_data = next_resource_of(&out, line_count(&out), late.relative_path()).await;
    assert_eq!(
        late_data.get("k8s.pod.name").map(String::as_str),
        Some("web-7d4b9c8f6-late0")
    );
    assert!(
        !resources(&out, 0)
            .iter()
            .any(|r| r.get("podscope.cgroup.path").map(String::as_str) == Some(db.relative_path())),
        "the other namespace's pod is never observed"
    );

    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}

/// `peers.enabled`: data naming a peer address says which pod (on any node) or Service it is,
/// from a cluster-wide watch of pods and services. The data arrives over OTLP from a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_addresses_are_named_after_their_pod_or_service() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;

    let api = FakeApiServer::start().await;
    let mut remote = pod(
        "web-7d4b9c8f6-remote",
        "5f0c1e2d-0000-4000-8000-00000000beef",
        "node-elsewhere",
        &"e".repeat(64),
    );
    remote.status.as_mut().unwrap().pod_ip = Some("10.244.2.9".into());
    api.apply_pod(remote);
    api.apply_service(k8s_openapi::api::core::v1::Service {
        metadata: ObjectMeta {
            name: Some("cart".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let out = dir.path().join("out.jsonl");
    let (telemetry_port, grpc_port) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
processors:
  k8sattributes:
    auth_type: kubeConfig
    filter:
      node: {NODE}
    peers:
      enabled: true
exporters:
  file:
    path: {out}
service:
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [otlp]
      processors: [k8sattributes]
      exporters: [file]
"#,
        out = out.display()
    );
    // Ready once the node's pods and the cluster's pods and services are listed.
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let mut client = MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    let (_, attrs) = export_points(
        &mut client,
        &out,
        &[],
        &["10.244.2.9", "10.96.0.10", "10.1.1.1"],
    )
    .await;
    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
    assert_eq!(
        attrs,
        vec![
            attributes(&[
                ("network.peer.address", "10.244.2.9"),
                ("k8s.peer.namespace.name", "shop"),
                ("k8s.peer.pod.name", "web-7d4b9c8f6-remote"),
                ("k8s.peer.workload.name", "web"),
                ("k8s.peer.workload.kind", "Deployment"),
            ]),
            attributes(&[
                ("network.peer.address", "10.96.0.10"),
                ("k8s.peer.namespace.name", "shop"),
                ("k8s.peer.service.name", "cart"),
            ]),
            attributes(&[("network.peer.address", "10.1.1.1")]),
        ]
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/services?")),
        "services are watched cluster-wide: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("fieldSelector")),
        "pods are watched cluster-wide for peers: {requests:?}"
    );
}

/// A pod IP reused by a new pod while the finished pod that had it is still listed (a Job's pod
/// keeps `status.podIP` after it succeeded), then deleted: the IP names the running pod, in the
/// node's own cache (`k8s.pod.ip` association) and in the cluster-wide peer index, whatever the
/// order of updates. Data arrives over OTLP from a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pod_ip_names_the_running_pod_not_the_finished_one() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;

    const REUSED: &str = "10.244.1.50";
    let running_uid = "5f0c1e2d-0000-4000-8000-0000000000a1";
    let finished_uid = "5f0c1e2d-0000-4000-8000-0000000000f1";
    let running = |ip: &str| {
        let mut p = pod("web-7d4b9c8f6-reuse", running_uid, NODE, &"a1".repeat(32));
        p.status.as_mut().unwrap().pod_ip = Some(ip.into());
        p
    };
    let finished = |label: &str| {
        let mut p = pod("backup-29012345-x1", finished_uid, NODE, &"f1".repeat(32));
        p.metadata.owner_references.as_mut().unwrap()[0].kind = "Job".into();
        p.metadata.owner_references.as_mut().unwrap()[0].name = "backup-29012345".into();
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("revision".into(), label.into());
        let status = p.status.as_mut().unwrap();
        status.phase = Some("Succeeded".into());
        status.pod_ip = Some(REUSED.into());
        p
    };
    let api = FakeApiServer::start().await;
    api.apply_pod(finished("1"));
    api.apply_pod(running(REUSED));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let out = dir.path().join("out.jsonl");
    let (telemetry_port, grpc_port) = (free_port(), free_port());
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
processors:
  k8sattributes:
    auth_type: kubeConfig
    filter:
      node: {NODE}
    pod_association:
      - sources: [{{ from: resource_attribute, name: k8s.pod.ip }}]
    pod_delete_delay: 1s
    peers:
      enabled: true
exporters:
  file:
    path: {out}
service:
  telemetry:
    metrics:
      address: 127.0.0.1:{telemetry_port}
  pipelines:
    metrics:
      receivers: [otlp]
      processors: [k8sattributes]
      exporters: [file]
"#,
        out = out.display()
    );
    let agent = AgentProcess::start_with_env(
        env!("CARGO_BIN_EXE_podscope"),
        &config,
        telemetry_port,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let mut client = MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    let running_resource = attributes(&[
        ("host.name", "sender"),
        ("k8s.pod.ip", REUSED),
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "web-7d4b9c8f6-reuse"),
        ("k8s.pod.uid", running_uid),
        ("k8s.node.name", NODE),
        ("k8s.deployment.name", "web"),
        ("k8s.replicaset.name", "web-7d4b9c8f6"),
        ("service.name", "web"),
        ("service.namespace", "shop"),
    ]);
    let running_peer = attributes(&[
        ("network.peer.address", REUSED),
        ("k8s.peer.namespace.name", "shop"),
        ("k8s.peer.pod.name", "web-7d4b9c8f6-reuse"),
        ("k8s.peer.workload.name", "web"),
        ("k8s.peer.workload.kind", "Deployment"),
    ]);
    assert_eq!(
        export_by_ip(&mut client, &out, REUSED).await,
        (running_resource.clone(), running_peer.clone()),
        "both listed: the running pod owns the IP"
    );

    // The finished pod changes after the running one (its owner relabels it): the IP stays with
    // the running pod.
    api.apply_pod(finished("2"));
    wait_until_seen(&mut client, &out, &api, "10.244.1.61").await;
    assert_eq!(
        export_by_ip(&mut client, &out, REUSED).await,
        (running_resource.clone(), running_peer.clone()),
        "after the finished pod was updated"
    );

    // The finished pod is deleted, and purged after pod_delete_delay: the IP stays too.
    assert!(api.delete_pod("shop", "backup-29012345-x1"));
    wait_until_seen(&mut client, &out, &api, "10.244.1.62").await;
    assert_eq!(
        export_by_ip(&mut client, &out, REUSED).await,
        (running_resource.clone(), running_peer.clone()),
        "after the finished pod was deleted"
    );
    wait_for_metric(
        telemetry_port,
        r#"podscope_k8s_metadata_pods{extension="extension/k8s_metadata/k8sattributes",state="deleted"} 0"#,
    )
    .await;
    assert_eq!(
        export_by_ip(&mut client, &out, REUSED).await,
        (running_resource, running_peer),
        "after the finished pod was purged"
    );

    agent.sigterm();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "podscope exited with {status:?}");
}

/// `pairs` as the string attributes the tests compare.
fn attributes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

type MetricsClient =
    opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient<
        tonic::transport::Channel,
    >;

/// Exports one data point whose resource has `k8s.pod.ip` = `ip` and whose attribute
/// `network.peer.address` = `ip`, and returns both attribute sets as the agent wrote them.
async fn export_by_ip(
    client: &mut MetricsClient,
    out: &Path,
    ip: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let resource = [("host.name", "sender"), ("k8s.pod.ip", ip)];
    let (resource, mut points) = export_points(client, out, &resource, &[ip]).await;
    (resource, points.remove(0))
}

/// Exports one resource with attributes `resource` and a data point per address in `peers`
/// (`network.peer.address`), and returns the resource's and each point's attributes as the agent
/// wrote them to `out`.
async fn export_points(
    client: &mut MetricsClient,
    out: &Path,
    resource: &[(&str, &str)],
    peers: &[&str],
) -> (BTreeMap<String, String>, Vec<BTreeMap<String, String>>) {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    let kv = |(key, value): &(&str, &str)| KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    };
    let before = line_count(out);
    client
        .export(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: resource.iter().map(kv).collect(),
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "app.connections".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: peers
                                .iter()
                                .map(|peer| NumberDataPoint {
                                    attributes: vec![kv(&("network.peer.address", peer))],
                                    time_unix_nano: 1,
                                    value: Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(1)),
                                    ..Default::default()
                                })
                                .collect(),
                            aggregation_temporality: 2,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .await
        .expect("the agent accepts the metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    while line_count(out) == before {
        assert!(Instant::now() < deadline, "nothing written within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(out).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().nth(before).unwrap()).unwrap();
    let strings = |attributes: &serde_json::Value| -> BTreeMap<String, String> {
        attributes
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                (
                    kv["key"].as_str().unwrap().to_string(),
                    kv["value"]["stringValue"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let rm = &line["resourceMetrics"][0];
    let points = rm["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| strings(&p["attributes"]))
        .collect();
    (strings(&rm["resource"]["attributes"]), points)
}

/// Applies a running pod on the node with IP `marker` and waits until both the node's cache and
/// the peer index name it: watch events arrive in order, so every change made before is applied.
async fn wait_until_seen(
    client: &mut MetricsClient,
    out: &Path,
    api: &FakeApiServer,
    marker: &str,
) {
    let name = format!("marker-{}", marker.replace('.', "-"));
    let mut p = pod(
        &name,
        &format!(
            "5f0c1e2d-0000-4000-8000-{:012}",
            marker
                .replace('.', "")
                .parse::<u64>()
                .expect("an IPv4 address")
        ),
        NODE,
        &"0".repeat(64),
    );
    p.status.as_mut().unwrap().container_statuses = None;
    p.status.as_mut().unwrap().pod_ip = Some(marker.into());
    api.apply_pod(p);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (resource, peer) = export_by_ip(client, out, marker).await;
        if resource.get("k8s.pod.name") == Some(&name)
            && peer.get("k8s.peer.pod.name") == Some(&name)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not seen by the agent within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
