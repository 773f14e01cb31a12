//! The extension's caches filled from watch events as the API server sends them: what a pod
//! becomes (attributes, owners, service.*), how lookups find it, deletes, relists, IP reuse,
//! the peer index, pod selection, and the settings' refusals.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::watcher::Event;
use podscope_core::proto::tonic::common::v1::{any_value, KeyValue};
use podscope_core::{BuildContext, Component as _, ComponentConfig as _};
use podscope_testkit::BuildContextForTests as _;

use super::metadata::Interner;
use super::watch::apply_pod_event;
use super::*;
use crate::labels::parse_selector;

const NODE: &str = "node-a";
const UID: &str = "7a1d6f2e-9c3b-4e8a-b5d4-0f1e2d3c4b5a";
const APP_ID: &str = "4f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
const SIDECAR_ID: &str = "0f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";

/// A pod as the API server sends it: `web-7d4b9c8f6-x2x7k` of Deployment `web`, two
/// containers, running on `node-a`.
fn web_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web-7d4b9c8f6-x2x7k".into()),
            namespace: Some("shop".into()),
            uid: Some(UID.into()),
            labels: Some(BTreeMap::from([
                ("pod-template-hash".into(), "7d4b9c8f6".into()),
                ("team".into(), "payments".into()),
                ("tier".into(), "frontend".into()),
            ])),
            annotations: Some(BTreeMap::from([(
                "owner.example.com/email".into(),
                "pay@example.com".into(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "web-7d4b9c8f6".into(),
                uid: "rs-uid".into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![
                Container {
                    name: "app".into(),
                    image: Some("registry.example.com:5000/shop/web:1.4.2".into()),
                    ..Default::default()
                },
                Container {
                    name: "proxy".into(),
                    image: Some("envoyproxy/envoy@sha256:abcd".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some("10.1.2.3".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.1.2.3".into(),
                },
                PodIP {
                    ip: "fd00::3".into(),
                },
            ]),
            start_time: Some(Time("2026-11-30T08:00:00Z".parse().unwrap())),
            container_statuses: Some(vec![
                ContainerStatus {
                    name: "app".into(),
                    container_id: Some(format!("containerd://{APP_ID}")),
                    image: "registry.example.com:5000/shop/web:1.4.2".into(),
                    restart_count: 2,
                    ..Default::default()
                },
                ContainerStatus {
                    name: "proxy".into(),
                    container_id: Some(format!("containerd://{SIDECAR_ID}")),
                    image: "envoyproxy/envoy@sha256:abcd".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
    }
}

fn config(json: serde_json::Value) -> K8sMetadataConfig {
    serde_json::from_value(json).unwrap()
}

fn store_with(config: &K8sMetadataConfig, events: Vec<Event<Pod>>) -> (PodStore, Extractor) {
    let extractor = Extractor::new(&config.extract).unwrap();
    let mut store = PodStore::new(config.pod_delete_delay);
    for event in events {
        apply_pod_event(&mut store, &extractor, event, Instant::now());
    }
    (store, extractor)
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a
                .values
                .iter()
                .map(|v| match &v.value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            format!("[{}]", items.join(","))
        }
        other => format!("{other:?}"),
    }
}

fn pairs(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), value(kv)))
        .collect()
}

fn found_pairs(found: &Found) -> Vec<(String, String)> {
    let kvs: Vec<KeyValue> = found.attributes().map(Attr::to_key_value).collect();
    pairs(&kvs)
}

fn expected(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_deployment_container_gets_every_attribute() {
    let (store, _) = store_with(
        &K8sMetadataConfig::default(),
        vec![Event::Init, Event::InitApply(web_pod()), Event::InitDone],
    );
    let found = store
        .by_container_id(APP_ID)
        .expect("app container indexed");
    assert_eq!(
        found_pairs(&found),
        expected(&[
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "web-7d4b9c8f6-x2x7k"),
            ("k8s.pod.uid", UID),
            ("k8s.pod.start_time", "2026-11-30T08:00:00Z"),
            ("k8s.pod.ip", "10.1.2.3"),
            ("k8s.node.name", NODE),
            ("k8s.deployment.name", "web"),
            ("k8s.replicaset.name", "web-7d4b9c8f6"),
            ("service.name", "web"),
            ("service.namespace", "shop"),
            ("k8s.container.name", "app"),
            ("k8s.container.restart_count", "2"),
            ("container.id", APP_ID),
            ("container.image.name", "registry.example.com:5000/shop/web"),
            ("container.image.tags", "[1.4.2]"),
            ("service.version", "1.4.2"),
        ])
    );
    // A digest-only image has no tag, so no service.version either.
    let proxy = store.by_container_id(SIDECAR_ID).unwrap();
    let proxy = found_pairs(&proxy);
    assert!(proxy.contains(&("container.image.name".into(), "envoyproxy/envoy".into())));
    assert!(!proxy
        .iter()
        .any(|(k, _)| k == "container.image.tags" || k == "service.version"));
    // Both IPs find the pod; pod-level attributes have no container ones.
    let by_ip = store.by_ip("fd00::3").unwrap();
    assert_eq!(&*by_ip.pod.uid, UID);
    assert!(!found_pairs(&by_ip)
        .iter()
        .any(|(k, _)| k == "k8s.container.name"));
}

#[test]
fn owners_and_service_name_follow_the_documented_rules() {
    let with_owner = |kind: &str, name: &str| {
        let mut pod = web_pod();
        pod.metadata.owner_references.as_mut().unwrap()[0].kind = kind.into();
        pod.metadata.owner_references.as_mut().unwrap()[0].name = name.into();
        pod
    };
    let only = vec![
        "k8s.deployment.name",
        "k8s.replicaset.name",
        "k8s.statefulset.name",
        "k8s.daemonset.name",
        "k8s.job.name",
        "k8s.cronjob.name",
        "service.name",
    ];
    let cfg = config(serde_json::json!({"extract": {"metadata": only}}));
    let extractor = Extractor::new(&cfg.extract).unwrap();
    let mut interner = Interner::default();
    let mut attrs = |pod: Pod| {
        let meta = extractor.pod(&pod, &mut interner).unwrap();
        let kvs: Vec<KeyValue> = meta.attributes.iter().map(Attr::to_key_value).collect();
        pairs(&kvs)
    };
    assert_eq!(
        attrs(with_owner("StatefulSet", "db")),
        expected(&[("k8s.statefulset.name", "db"), ("service.name", "db")])
    );
    assert_eq!(
        attrs(with_owner("DaemonSet", "agent")),
        expected(&[("k8s.daemonset.name", "agent"), ("service.name", "agent")])
    );
    assert_eq!(
        attrs(with_owner("Job", "backup-29012345")),
        expected(&[
            ("k8s.job.name", "backup-29012345"),
            ("k8s.cronjob.name", "backup"),
            ("service.name", "backup"),
        ])
    );
    // A ReplicaSet whose name does not end with the pod's template hash: no Deployment.
    assert_eq!(
        attrs(with_owner("ReplicaSet", "handmade")),
        expected(&[
            ("k8s.replicaset.name", "handmade"),
            ("service.name", "handmade")
        ])
    );
    // No owner: the pod's own name.
    let mut bare = web_pod();
    bare.metadata.owner_references = None;
    assert_eq!(
        attrs(bare.clone()),
        expected(&[("service.name", "web-7d4b9c8f6-x2x7k")])
    );
    // The app.kubernetes.io/name label beats the workload; the annotation beats both.
    bare.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app.kubernetes.io/name".into(), "storefront".into());
    assert_eq!(
        attrs(bare.clone()),
        expected(&[("service.name", "storefront")])
    );
    bare.metadata.annotations.as_mut().unwrap().insert(
        "resource.opentelemetry.io/service.name".into(),
        "checkout".into(),
    );
    assert_eq!(attrs(bare), expected(&[("service.name", "checkout")]));

    assert_eq!(
        deployment_from_replicaset("web-7d4b9c8f6", "7d4b9c8f6").as_deref(),
        Some("web")
    );
    assert_eq!(
        deployment_from_replicaset("web7d4b9c8f6", "7d4b9c8f6"),
        None
    );
    assert_eq!(deployment_from_replicaset("-7d4b9c8f6", "7d4b9c8f6"), None);
    assert_eq!(cronjob_from_job("report-2901234").as_deref(), None);
    assert_eq!(
        cronjob_from_job("nightly-report-29012345").as_deref(),
        Some("nightly-report")
    );
    assert_eq!(cronjob_from_job("29012345"), None);
    assert_eq!(split_image("nginx"), ("nginx".into(), None));
    assert_eq!(
        split_image("nginx:1.25"),
        ("nginx".into(), Some("1.25".into()))
    );
    assert_eq!(
        split_image("localhost:5000/nginx"),
        ("localhost:5000/nginx".into(), None)
    );
    assert_eq!(
        split_image("localhost:5000/a/nginx:v2@sha256:00"),
        ("localhost:5000/a/nginx".into(), Some("v2".into()))
    );
}

#[test]
fn deleted_pods_stay_for_the_delay_then_go() {
    let cfg = config(serde_json::json!({"pod_delete_delay": "60s"}));
    let (mut store, extractor) = store_with(&cfg, vec![Event::Apply(web_pod())]);
    let t0 = Instant::now();
    apply_pod_event(&mut store, &extractor, Event::Delete(web_pod()), t0);
    assert!(store.by_container_id(APP_ID).is_some());
    assert_eq!(store.purge(t0 + Duration::from_secs(59)), 0);
    assert!(store.by_ip("10.1.2.3").is_some());
    assert_eq!(store.purge(t0 + Duration::from_secs(60)), 1);
    assert!(store.by_container_id(APP_ID).is_none());
    assert!(store.by_ip("10.1.2.3").is_none());
    assert!(store.by_name("shop", "web-7d4b9c8f6-x2x7k").is_none());
    assert!(store.is_empty());
}

#[test]
fn a_new_pod_reusing_a_deleted_pods_ip_keeps_it_after_the_purge() {
    let cfg = K8sMetadataConfig::default();
    let (mut store, extractor) = store_with(&cfg, vec![Event::Apply(web_pod())]);
    let t0 = Instant::now();
    apply_pod_event(&mut store, &extractor, Event::Delete(web_pod()), t0);
    let mut next = web_pod();
    next.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
    next.metadata.name = Some("web-7d4b9c8f6-zzzzz".into());
    next.status.as_mut().unwrap().container_statuses = None;
    apply_pod_event(&mut store, &extractor, Event::Apply(next), t0);
    assert_eq!(
        &*store.by_ip("10.1.2.3").unwrap().pod.name,
        "web-7d4b9c8f6-zzzzz"
    );
    store.purge(t0 + Duration::from_secs(3600));
    assert_eq!(
        &*store.by_ip("10.1.2.3").unwrap().pod.name,
        "web-7d4b9c8f6-zzzzz"
    );
    assert_eq!(store.len(), 1);
}

/// `web_pod` finished (a Job's pod that succeeded): still listed, with its old IP.
fn finished_pod() -> Pod {
    let mut pod = web_pod();
    pod.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
    pod.metadata.name = Some("backup-29012345-x1".into());
    pod.status.as_mut().unwrap().phase = Some("Succeeded".into());
    pod.status.as_mut().unwrap().container_statuses = None;
    pod
}

#[test]
fn a_finished_pod_keeps_no_ip_a_running_pod_took() {
    let cfg = K8sMetadataConfig::default();
    let mut running = web_pod();
    running.status.as_mut().unwrap().phase = Some("Running".into());
    // The finished pod is updated after the running one took its IP, in both orders of listing.
    for events in [
        vec![Event::Apply(finished_pod()), Event::Apply(running.clone())],
        vec![Event::Apply(running.clone()), Event::Apply(finished_pod())],
    ] {
        let (mut store, extractor) = store_with(&cfg, events);
        assert_eq!(
            &*store.by_ip("10.1.2.3").unwrap().pod.name,
            "web-7d4b9c8f6-x2x7k"
        );
        // Its data is still described with the IP it had.
        let finished = store.by_name("shop", "backup-29012345-x1").unwrap();
        assert!(found_pairs(&finished).contains(&("k8s.pod.ip".into(), "10.1.2.3".into())));
        let t0 = Instant::now();
        apply_pod_event(&mut store, &extractor, Event::Delete(finished_pod()), t0);
        store.purge(t0 + cfg.pod_delete_delay);
        assert_eq!(
            &*store.by_ip("10.1.2.3").unwrap().pod.name,
            "web-7d4b9c8f6-x2x7k"
        );
        // The running pod finishes in turn: nobody holds the IP.
        let mut done = running.clone();
        done.status.as_mut().unwrap().phase = Some("Failed".into());
        apply_pod_event(&mut store, &extractor, Event::Apply(done), t0);
        assert!(store.by_ip("10.1.2.3").is_none());
    }
}

#[test]
fn a_peer_ip_names_the_pod_that_holds_it() {
    let peer_name = |index: &PeerIndex, ip: &str| {
        index.lookup(ip).and_then(|attrs| {
            attrs
                .iter()
                .find(|a| &*a.key == PEER_POD)
                .map(|a| value(&a.to_key_value()))
        })
    };
    let mut index = PeerIndex::default();
    index.apply_pod_event(Event::Init);
    index.apply_pod_event(Event::InitApply(finished_pod()));
    index.apply_pod_event(Event::InitApply(web_pod()));
    index.apply_pod_event(Event::InitDone);
    assert_eq!(
        peer_name(&index, "10.1.2.3").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    // The finished pod changes, then is deleted: the IP stays with the running pod.
    index.apply_pod_event(Event::Apply(finished_pod()));
    assert_eq!(
        peer_name(&index, "10.1.2.3").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    index.apply_pod_event(Event::Delete(finished_pod()));
    assert_eq!(
        peer_name(&index, "10.1.2.3").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    assert_eq!(
        peer_name(&index, "fd00::3").as_deref(),
        Some("web-7d4b9c8f6-x2x7k")
    );
    // A new pod takes the IP before the old one's delete arrives: the delete leaves it alone.
    let mut successor = web_pod();
    successor.metadata.uid = Some("22222222-2222-3333-4444-555555555555".into());
    successor.metadata.name = Some("web-7d4b9c8f6-next0".into());
    index.apply_pod_event(Event::Apply(successor));
    index.apply_pod_event(Event::Delete(web_pod()));
    assert_eq!(
        peer_name(&index, "10.1.2.3").as_deref(),
        Some("web-7d4b9c8f6-next0")
    );
    // A pod that finishes gives its IPs up.
    let mut done = web_pod();
    done.metadata.uid = Some("22222222-2222-3333-4444-555555555555".into());
    done.metadata.name = Some("web-7d4b9c8f6-next0".into());
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    index.apply_pod_event(Event::Apply(done));
    assert_eq!(index.len(), (0, 0));
}

#[test]
fn a_relist_marks_pods_it_no_longer_lists_as_deleted() {
    let cfg = K8sMetadataConfig::default();
    let mut other = web_pod();
    other.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
    other.metadata.name = Some("other".into());
    other.status = None;
    let (mut store, extractor) = store_with(
        &cfg,
        vec![
            Event::Init,
            Event::InitApply(web_pod()),
            Event::InitApply(other),
            Event::InitDone,
        ],
    );
    assert_eq!(store.len(), 2);
    // The watch broke (410 Gone) and the relist no longer has `other`.
    let t0 = Instant::now();
    for event in [Event::Init, Event::InitApply(web_pod()), Event::InitDone] {
        apply_pod_event(&mut store, &extractor, event, t0);
    }
    assert!(
        store.by_name("shop", "other").is_some(),
        "kept for the delay"
    );
    store.purge(t0 + cfg.pod_delete_delay);
    assert!(store.by_name("shop", "other").is_none());
    assert!(store.by_name("shop", "web-7d4b9c8f6-x2x7k").is_some());
}

#[test]
fn namespace_and_node_rules_give_context_attributes() {
    let cfg = config(serde_json::json!({
        "extract": {
            "metadata": ["k8s.pod.name"],
            "labels": [
                {"key": "team"},
                {"key_regex": "ti(.*)", "tag_name": "shop.$1"},
                {"key": "env", "from": "namespace", "tag_name": "deployment.environment.name"},
            ],
            "annotations": [{"key": "owner.example.com/email", "tag_name": "owner"}],
        }
    }));
    let metadata = K8sMetadata::new(cfg, &BuildContext::for_tests("k8s_metadata")).unwrap();
    metadata.apply_pod_events([Event::Apply(web_pod())]);
    let shop = |env: &str| Namespace {
        metadata: ObjectMeta {
            name: Some("shop".into()),
            labels: Some(BTreeMap::from([("env".into(), env.into())])),
            ..Default::default()
        },
        ..Default::default()
    };
    metadata.apply_namespace_events([Event::Init, Event::InitApply(shop("prod")), Event::InitDone]);
    let pods = metadata.pods();
    let found = pods.by_container_id(APP_ID).unwrap();
    assert_eq!(
        found_pairs(&found),
        expected(&[
            ("k8s.pod.name", "web-7d4b9c8f6-x2x7k"),
            ("k8s.pod.label.team", "payments"),
            ("shop.er", "frontend"),
            ("owner", "pay@example.com"),
        ])
    );
    let [namespace, node] = pods.context_attributes(&found.pod);
    let namespace: Vec<KeyValue> = namespace.unwrap().iter().map(Attr::to_key_value).collect();
    assert_eq!(
        pairs(&namespace),
        expected(&[("deployment.environment.name", "prod")])
    );
    assert!(node.is_none());
    drop(pods);
    metadata.apply_namespace_events([Event::Delete(shop("prod"))]);
    let pods = metadata.pods();
    assert!(pods.context_attributes(&found.pod)[0].is_none());
}

#[test]
fn the_peer_index_names_pods_and_services_and_forgets_what_a_relist_lost() {
    let metadata = K8sMetadata::new(
        config(serde_json::json!({"peers": {"enabled": true}})),
        &BuildContext::for_tests("k8s_metadata"),
    )
    .unwrap();
    assert!(metadata.indexes_peers());
    let mut host_net = web_pod();
    host_net.metadata.uid = Some("33333333-2222-3333-4444-555555555555".into());
    host_net.metadata.name = Some("node-exporter".into());
    host_net.spec.as_mut().unwrap().host_network = Some(true);
    host_net.status.as_mut().unwrap().pod_ip = Some("192.168.0.10".into());
    host_net.status.as_mut().unwrap().pod_ips = None;
    let mut stale = web_pod();
    stale.metadata.uid = Some("44444444-2222-3333-4444-555555555555".into());
    stale.metadata.name = Some("gone".into());
    stale.status.as_mut().unwrap().pod_ip = Some("10.9.9.9".into());
    stale.status.as_mut().unwrap().pod_ips = None;
    let service = |name: &str, cluster_ip: &str| k8s_openapi::api::core::v1::Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    metadata.apply_peer_events(
        [
            Event::Init,
            Event::InitApply(stale),
            Event::InitDone,
            // A relist that no longer has `stale`.
            Event::Init,
            Event::InitApply(web_pod()),
            Event::InitApply(host_net),
            Event::InitDone,
        ],
        [
            Event::Init,
            Event::InitApply(service("cart", "10.96.0.12")),
            Event::InitApply(service("headless", "None")),
            Event::InitDone,
        ],
    );
    let peer = |ip: &str| {
        metadata.peer(ip).map(|attrs| {
            let kvs: Vec<KeyValue> = attrs.iter().map(Attr::to_key_value).collect();
            pairs(&kvs)
        })
    };
    assert_eq!(
        peer("fd00::3"),
        Some(expected(&[
            (PEER_NAMESPACE, "shop"),
            (PEER_POD, "web-7d4b9c8f6-x2x7k"),
            (PEER_WORKLOAD_NAME, "web"),
            (PEER_WORKLOAD_KIND, "Deployment"),
        ]))
    );
    assert_eq!(
        peer("10.96.0.12"),
        Some(expected(&[
            (PEER_NAMESPACE, "shop"),
            (PEER_SERVICE, "cart")
        ]))
    );
    // The host-network pod's IP is the node's: not a pod. Gone from the relist: forgotten at
    // once (IPs are reused).
    assert_eq!(peer("192.168.0.10"), None);
    assert_eq!(peer("10.9.9.9"), None);
}

#[test]
fn pods_are_selected_by_namespace_and_labels_while_they_live() {
    let metadata = K8sMetadata::new(
        K8sMetadataConfig::default(),
        &BuildContext::for_tests("k8s_metadata"),
    )
    .unwrap();
    let mut changes = metadata.changes();
    metadata.apply_pod_events([Event::Init, Event::InitApply(web_pod()), Event::InitDone]);
    assert!(
        changes.has_changed().unwrap(),
        "readers are told pods changed"
    );
    changes.mark_unchanged();
    let selector = |namespaces: &[&str], labels: &str| PodSelector {
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        labels: parse_selector(labels).unwrap(),
    };
    assert!(metadata.pod_selected(UID, &selector(&[], "")));
    assert!(metadata.pod_selected(
        UID,
        &selector(&["shop"], "team=payments,tier in (frontend)")
    ));
    assert!(!metadata.pod_selected(UID, &selector(&["backoffice"], "")));
    assert!(!metadata.pod_selected(UID, &selector(&["shop"], "team!=payments")));
    assert!(!metadata.pod_selected("11111111-2222-3333-4444-555555555555", &selector(&[], "")));
    // A deleted pod is kept for late data, but selects nothing.
    metadata.apply_pod_events([Event::Delete(web_pod())]);
    assert!(changes.has_changed().unwrap());
    assert!(metadata.pods().by_pod_uid(UID, None).is_some());
    assert!(!metadata.pod_selected(UID, &selector(&[], "")));
}

#[tokio::test]
async fn without_an_api_server_it_runs_in_host_mode() {
    let ctx = BuildContext::for_tests("k8s_metadata");
    let readiness = ctx.readiness.clone();
    let metadata =
        K8sMetadata::new(config(serde_json::json!({"auth_type": "none"})), &ctx).unwrap();
    metadata.start().await.unwrap();
    readiness.set_pipelines_started(true);
    assert_eq!(readiness.check(), Ok(()), "host mode waits for nothing");
    assert!(!metadata.synced());
    assert!(metadata.pods().is_empty());
    metadata.shutdown().await.unwrap();
}

#[test]
fn the_pod_watch_asks_for_the_filter_labels() {
    let cfg = config(serde_json::json!({"filter": {"labels": [
        {"key": "tier", "value": "web"},
        {"key": "track", "op": "not-equals", "value": "canary"},
        {"key": "team", "op": "exists"},
        {"key": "legacy", "op": "does-not-exist"},
    ]}}));
    assert_eq!(
        watch::label_selector(&cfg).unwrap().to_string(),
        "tier=web,track!=canary,team,!legacy"
    );
    assert!(watch::label_selector(&K8sMetadataConfig::default()).is_none());
}

#[test]
fn config_errors_name_the_key() {
    let cfg = config(serde_json::json!({
        "extract": {
            "metadata": ["k8s.pod.name", "k8s.pod.nmae"],
            "labels": [{"key_regex": "("}, {}],
        },
        "filter": {"labels": [{"key": "a", "op": "exists", "value": "b"}], "node": ""},
    }));
    let errors: Vec<String> = cfg.validate().iter().map(|e| e.to_string()).collect();
    let text = errors.join("\n");
    for needle in [
        "extract.metadata[1]: unknown attribute \"k8s.pod.nmae\"",
        "extract.labels[0].key_regex:",
        "extract.labels[1]: needs key or key_regex",
        "filter.labels[0]: op exists / does-not-exist takes no value",
        "filter.node: must not be empty",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert_eq!(errors.len(), 5, "{text}");
}
