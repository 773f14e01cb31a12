//! The processor over a `k8s_metadata` extension filled with watch events: which pod each
//! association rule finds, what is added (and never overwritten), what is counted when nothing
//! is found, peers, host mode, and the settings it refuses. What the cache keeps of a pod is
//! tested with the extension (`podscope_k8s`).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::runtime::watcher::Event;
use podscope_core::proto::tonic::common::v1::{any_value, KeyValue};
use podscope_core::proto::tonic::metrics::v1::{
    metric, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use podscope_core::proto::tonic::resource::v1::Resource;
use podscope_core::{Batch, BuildContext, ComponentConfig as _, ComponentId};
use podscope_k8s::k8s_metadata::string_kv;
use podscope_testkit::{BuildContextForTests as _, Recorder};
use serde_json::json;

use super::*;

const UID: &str = "7a1d6f2e-9c3b-4e8a-b5d4-0f1e2d3c4b5a";
const UID_: &str = "7a1d6f2e_9c3b_4e8a_b5d4_0f1e2d3c4b5a";
const APP_ID: &str = "4f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
const SIDECAR_ID: &str = "0f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";

/// Pod `web-7d4b9c8f6-x2x7k` of Deployment `web` in `shop`, containers `app` and `proxy`, as
/// the API server sends it.
fn web_pod() -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": "web-7d4b9c8f6-x2x7k", "namespace": "shop", "uid": UID,
            "labels": {"pod-template-hash": "7d4b9c8f6", "team": "payments", "tier": "frontend"},
            "annotations": {"owner.example.com/email": "pay@example.com"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-7d4b9c8f6", "uid": "rs-uid", "controller": true}],
        },
        "spec": {"nodeName": "node-a", "containers": [
            {"name": "app", "image": "registry.example.com:5000/shop/web:1.4.2"},
            {"name": "proxy", "image": "envoyproxy/envoy@sha256:abcd"},
        ]},
        "status": {
            "phase": "Running", "podIP": "10.1.2.3",
            "podIPs": [{"ip": "10.1.2.3"}, {"ip": "fd00::3"}],
            "containerStatuses": [
                {"name": "app", "containerID": format!("containerd://{APP_ID}"), "image": "web:1.4.2",
                 "imageID": "", "ready": true, "restartCount": 2},
                {"name": "proxy", "containerID": format!("containerd://{SIDECAR_ID}"), "image": "envoy",
                 "imageID": "", "ready": true, "restartCount": 0},
            ],
        },
    }))
    .expect("a pod")
}

fn config(settings: serde_json::Value) -> K8sAttributesConfig {
    serde_json::from_value(settings).expect("k8sattributes settings")
}

/// The extension a processor with `config` runs for itself, listed with `events` (a
/// complete list, so synced).
fn own_extension(config: &K8sAttributesConfig, pods: Vec<Pod>) -> Arc<K8sMetadata> {
    let ctx = BuildContext::for_tests("k8s_metadata/k8sattributes");
    let metadata = Arc::new(K8sMetadata::new(config.own_extension(), &ctx).unwrap());
    metadata.apply_pod_events(
        std::iter::once(Event::Init)
            .chain(pods.into_iter().map(Event::InitApply))
            .chain([Event::InitDone]),
    );
    metadata
}

/// A context for processor `id` using `metadata`, as the service makes it.
fn context(id: &str, metadata: &Arc<K8sMetadata>) -> BuildContext {
    let mut ctx = BuildContext::for_tests(id);
    let extension = ComponentId::parse("k8s_metadata/test").unwrap();
    ctx.extensions.insert(extension.clone(), metadata.clone());
    ctx.extensions
        .add_user(ComponentKind::Processor, ctx.id.clone(), extension);
    ctx
}

fn enricher(config: &K8sAttributesConfig, metadata: &Arc<K8sMetadata>) -> PodEnricher {
    let ctx = context("k8sattributes", metadata);
    PodEnricher::new(config, metadata.clone(), &ctx).unwrap()
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn pairs(attributes: &[KeyValue]) -> Pairs {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), value(kv)))
        .collect()
}

fn expected(list: &[(&str, &str)]) -> Pairs {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(podscope_core::proto::tonic::common::v1::AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn get(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).map(value)
}

#[test]
fn pod_then_container_then_namespace_attributes_are_added() {
    let cfg = config(json!({
        "extract": {
            "metadata": ["k8s.pod.name", "k8s.container.name"],
            "labels": [
                {"key": "team"},
                {"key": "env", "from": "namespace", "tag_name": "deployment.environment.name"},
            ],
        }
    }));
    let metadata = own_extension(&cfg, vec![web_pod()]);
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": "shop", "labels": {"env": "prod"}}
    }))
    .unwrap();
    metadata.apply_namespace_events([Event::Apply(namespace)]);
    let mut attrs = vec![string_kv("container.id", APP_ID)];
    enricher(&cfg, &metadata).enrich(&mut attrs);
    assert_eq!(
        pairs(&attrs),
        expected(&[
            ("container.id", APP_ID),
            ("k8s.pod.name", "web-7d4b9c8f6-x2x7k"),
            ("k8s.pod.label.team", "payments"),
            ("k8s.container.name", "app"),
            ("deployment.environment.name", "prod"),
            ("host.name", "test-host"),
        ])
    );
}

#[test]
fn association_by_each_rule() {
    let cfg = K8sAttributesConfig::default();
    let metadata = own_extension(&cfg, vec![web_pod()]);
    let shared = enricher(&cfg, &metadata);
    let enrich = |attrs: Vec<KeyValue>| {
        let mut attrs = attrs;
        shared.enrich(&mut attrs);
        attrs
    };
    let systemd = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{SIDECAR_ID}.scope"
    );
    let cases: Vec<(Vec<KeyValue>, Option<&str>)> = vec![
        (vec![string_kv("container.id", APP_ID)], Some("app")),
        (
            vec![string_kv("podscope.cgroup.path", &systemd)],
            Some("proxy"),
        ),
        (vec![string_kv("k8s.pod.uid", UID)], None),
        (vec![string_kv("k8s.pod.ip", "10.1.2.3")], None),
        (
            vec![
                string_kv("k8s.pod.name", "web-7d4b9c8f6-x2x7k"),
                string_kv("k8s.namespace.name", "shop"),
            ],
            None,
        ),
    ];
    for (attrs, container) in cases {
        let what = format!("{:?}", pairs(&attrs));
        let out = enrich(attrs);
        assert_eq!(get(&out, "k8s.pod.uid").as_deref(), Some(UID), "{what}");
        assert_eq!(
            get(&out, "k8s.deployment.name").as_deref(),
            Some("web"),
            "{what}"
        );
        assert_eq!(
            get(&out, "k8s.container.name").as_deref(),
            container,
            "{what}"
        );
    }
    // A container the pod status does not list yet (just started): the pod from the path's
    // UID, and container.id from the path.
    let new_id = "ab".repeat(32);
    let out = enrich(vec![string_kv(
        "podscope.cgroup.path",
        &format!("/kubepods/burstable/pod{UID}/{new_id}"),
    )]);
    assert_eq!(
        get(&out, "k8s.pod.name").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    assert_eq!(get(&out, "container.id"), Some(new_id));
    assert_eq!(get(&out, "k8s.container.name"), None);
    // Attributes already on the resource are kept.
    let out = enrich(vec![
        string_kv("container.id", APP_ID),
        string_kv("service.name", "mine"),
    ]);
    assert_eq!(get(&out, "service.name").as_deref(), Some("mine"));
    assert_eq!(out.iter().filter(|kv| kv.key == "service.name").count(), 1);
}

#[test]
fn a_process_is_associated_through_its_cgroup() {
    // This test's own process: whatever its cgroup, association must not fail or invent a pod.
    let cfg = K8sAttributesConfig::default();
    let metadata = own_extension(&cfg, vec![web_pod()]);
    let mut attrs = vec![int("process.pid", i64::from(std::process::id()))];
    enricher(&cfg, &metadata).enrich(&mut attrs);
    assert_eq!(get(&attrs, "k8s.pod.name"), None);
    assert_eq!(get(&attrs, "host.name").as_deref(), Some("test-host"));
}

#[test]
fn unresolved_data_is_counted_by_reason() {
    let cfg = K8sAttributesConfig::default();
    let ctx = BuildContext::for_tests("k8sattributes");
    let telemetry = ctx.telemetry.clone();
    let metadata = Arc::new(K8sMetadata::new(cfg.own_extension(), &ctx).unwrap());
    let shared = PodEnricher::new(&cfg, metadata.clone(), &ctx).unwrap();
    shared.enrich(&mut vec![string_kv("service.name", "x")]);
    shared.enrich(&mut vec![string_kv("container.id", APP_ID)]);
    metadata.apply_pod_events([Event::Init, Event::InitDone]);
    shared.enrich(&mut vec![string_kv("container.id", APP_ID)]);
    let text = telemetry.encode_text();
    for line in [
        r#"podscope_k8sattributes_unresolved_resources_total{processor="processor/k8sattributes",reason="no_identity"} 1"#,
        r#"podscope_k8sattributes_unresolved_resources_total{processor="processor/k8sattributes",reason="not_synced"} 1"#,
        r#"podscope_k8sattributes_unresolved_resources_total{processor="processor/k8sattributes",reason="not_found"} 1"#,
        r#"podscope_k8sattributes_enriched_resources_total{processor="processor/k8sattributes"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[test]
fn config_errors_name_the_key() {
    let errors = |settings: serde_json::Value| -> Vec<String> {
        config(settings)
            .validate()
            .iter()
            .map(|e| e.to_string())
            .collect()
    };
    // Without `extension`, the extension's settings are checked here.
    assert_eq!(
        errors(json!({
            "extract": {"labels": [{}]},
            "pod_association": [{"sources": [{"from": "connection"}]}],
            "peers": {"attribute": ""},
        })),
        vec![
            "extract.labels[0]: needs key or key_regex",
            "pod_association[0]: from: connection is not supported: podscope's receivers do not record the sender's address; use from: resource_attribute",
            "peers.attribute: must not be empty",
        ]
    );
    // With it, they belong to the extension.
    let owned = "belongs to the extension: this processor reads the pods of extensions.k8s_metadata/node, so set it there";
    assert_eq!(
        errors(json!({
            "extension": "k8s_metadata/node",
            "auth_type": "none",
            "filter": {"node": "a"},
            "extract": {},
            "pod_delete_delay": "1s",
            "peers": {"enabled": true, "attribute": "server.address"},
        })),
        [
            "auth_type",
            "filter",
            "extract",
            "pod_delete_delay",
            "peers.enabled"
        ]
        .map(|key| format!("{key}: {owned}"))
    );
    assert_eq!(
        errors(json!({"extension": "batch"})),
        vec!["extension: batch is not a k8s_metadata extension id"]
    );
    let bad = AssociationRule {
        sources: vec![AssociationSource {
            from: AssociationFrom::ResourceAttribute,
            name: Some("k8s.pod.name".into()),
        }],
    };
    assert!(bad
        .resolve()
        .unwrap_err()
        .contains("k8s.pod.name with k8s.namespace.name"));
}

#[test]
fn without_extension_it_makes_its_own_from_its_settings() {
    let own = |settings: serde_json::Value, id: &str| {
        let id = ComponentId::parse(id).unwrap();
        config(settings)
            .implicit_extension(&id)
            .map(|(extension, _)| extension.to_string())
    };
    assert_eq!(
        own(json!({}), "k8sattributes").as_deref(),
        Some("k8s_metadata/k8sattributes")
    );
    assert_eq!(
        own(json!({}), "k8sattributes/shop").as_deref(),
        Some("k8s_metadata/k8sattributes.shop")
    );
    assert_eq!(
        own(json!({"extension": "k8s_metadata"}), "k8sattributes"),
        None
    );
    let cfg =
        config(json!({"auth_type": "none", "pod_delete_delay": "2m", "peers": {"enabled": true}}));
    let extension = cfg.own_extension();
    assert_eq!(
        extension.auth_type,
        Some(podscope_k8s::k8s_metadata::AuthType::None)
    );
    assert_eq!(
        extension.pod_delete_delay,
        std::time::Duration::from_secs(120)
    );
    assert!(extension.peers.enabled);
}

fn metrics_batch(resource: Vec<KeyValue>, peers: &[&str]) -> Batch {
    Batch::metrics(vec![ResourceMetrics {
        resource: Some(Resource {
            attributes: resource,
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "podscope.tcp.connections".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: peers
                        .iter()
                        .map(|peer| NumberDataPoint {
                            attributes: vec![string_kv("network.peer.address", peer)],
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }])
}

/// Attributes as (key, value) text pairs, in order.
type Pairs = Vec<(String, String)>;

/// (resource attributes, each data point's attributes) of the first resource of `batch`.
fn first_resource(batch: &Batch) -> (Pairs, Vec<Pairs>) {
    let Batch::Metrics(rms) = batch else {
        panic!("metrics")
    };
    let Some(metric::Data::Sum(sum)) = &rms[0].scope_metrics[0].metrics[0].data else {
        panic!("a sum")
    };
    (
        pairs(&rms[0].resource.as_ref().unwrap().attributes),
        sum.data_points
            .iter()
            .map(|p| pairs(&p.attributes))
            .collect(),
    )
}

/// What processor `id` with `config`, reading `metadata`, makes of `batch`.
async fn processed(
    config: &K8sAttributesConfig,
    id: &str,
    metadata: &Arc<K8sMetadata>,
    batch: Batch,
) -> Batch {
    let sink = Arc::new(Recorder::default());
    let processor = config
        .build(context(id, metadata), batch.signal(), sink.clone())
        .unwrap();
    processor.consume(batch).await.unwrap();
    processor.shutdown().await.unwrap();
    sink.batches().remove(0)
}

#[tokio::test]
async fn host_mode_adds_container_id_and_host_name() {
    let cfg = config(json!({"auth_type": "none"}));
    let ctx = BuildContext::for_tests("k8s_metadata/k8sattributes");
    let metadata = Arc::new(K8sMetadata::new(cfg.own_extension(), &ctx).unwrap());
    use podscope_core::Component as _;
    metadata.start().await.unwrap();
    let path = format!("/kubepods/burstable/pod{UID}/{APP_ID}");
    let batch = metrics_batch(vec![string_kv("podscope.cgroup.path", &path)], &[]);
    let out = processed(&cfg, "k8sattributes", &metadata, batch).await;
    metadata.shutdown().await.unwrap();
    assert_eq!(
        first_resource(&out).0,
        expected(&[
            ("podscope.cgroup.path", &path),
            ("container.id", APP_ID),
            ("host.name", "test-host"),
        ])
    );
}

#[tokio::test]
async fn peers_are_named_when_the_extension_indexes_them() {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.12"},
    }))
    .unwrap();
    for (enabled, named) in [(true, true), (false, false)] {
        let cfg = config(json!({"auth_type": "none", "peers": {"enabled": enabled}}));
        let metadata = own_extension(&cfg, Vec::new());
        metadata.apply_peer_events(
            [Event::Init, Event::InitApply(web_pod()), Event::InitDone],
            [
                Event::Init,
                Event::InitApply(service.clone()),
                Event::InitDone,
            ],
        );
        let batch = metrics_batch(Vec::new(), &["fd00::3", "10.96.0.12", "10.1.1.1"]);
        let out = processed(&cfg, "k8sattributes", &metadata, batch).await;
        let points = first_resource(&out).1;
        let peer = |ip: &str, attrs: &[(&str, &str)]| {
            let mut all = vec![("network.peer.address", ip)];
            if named {
                all.extend_from_slice(attrs);
            }
            expected(&all)
        };
        assert_eq!(
            points,
            vec![
                peer(
                    "fd00::3",
                    &[
                        ("k8s.peer.namespace.name", "shop"),
                        ("k8s.peer.pod.name", "web-7d4b9c8f6-x2x7k"),
                        ("k8s.peer.workload.name", "web"),
                        ("k8s.peer.workload.kind", "Deployment"),
                    ]
                ),
                peer(
                    "10.96.0.12",
                    &[
                        ("k8s.peer.namespace.name", "shop"),
                        ("k8s.peer.service.name", "cart"),
                    ]
                ),
                expected(&[("network.peer.address", "10.1.1.1")]),
            ],
            "peers.enabled: {enabled}"
        );
    }
}

#[tokio::test]
async fn processors_naming_one_extension_read_one_cache() {
    let metadata = own_extension(&K8sAttributesConfig::default(), vec![web_pod()]);
    let by_ip = config(json!({
        "extension": "k8s_metadata/test",
        "pod_association": [{"sources": [{"from": "resource_attribute", "name": "k8s.pod.ip"}]}],
    }));
    let by_container = config(json!({"extension": "k8s_metadata/test"}));
    for (cfg, resource) in [
        (by_ip, string_kv("k8s.pod.ip", "fd00::3")),
        (by_container, string_kv("container.id", SIDECAR_ID)),
    ] {
        let batch = metrics_batch(vec![resource], &[]);
        let out = processed(&cfg, "k8sattributes/x", &metadata, batch).await;
        let (attrs, _) = first_resource(&out);
        assert!(
            attrs.contains(&("k8s.pod.uid".to_string(), UID.to_string())),
            "{attrs:?}"
        );
    }
}

#[tokio::test]
async fn profiles_of_a_container_get_its_pod_attributes() {
    let cfg = config(json!({}));
    let metadata = own_extension(&cfg, vec![web_pod()]);
    let batch = podscope_testkit::fake_otlp::cpu_profile(2, &[("container.id", APP_ID)]);
    let out = processed(&cfg, "k8sattributes", &metadata, batch.clone()).await;
    let (Batch::Profiles(before), Batch::Profiles(after)) = (&batch, &out) else {
        panic!("profiles")
    };
    let attributes = &after.resource_profiles[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes;
    assert_eq!(
        get(attributes, "k8s.pod.name").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    assert_eq!(
        get(attributes, "k8s.container.name").as_deref(),
        Some("app")
    );
    assert_eq!(
        get(attributes, "k8s.deployment.name").as_deref(),
        Some("web")
    );
    // Samples and their dictionary pass unchanged.
    assert_eq!(after.dictionary, before.dictionary);
    assert_eq!(
        after.resource_profiles[0].scope_profiles,
        before.resource_profiles[0].scope_profiles
    );
}
