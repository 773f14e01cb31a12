//! The `k8s_metadata` cache, read by `k8sattributes`, at the size of a large cluster's worth of
//! pods on one index:
//! - memory: resident memory added by 10 000 pods × 3 containers, applied as watch events
//!   (each pod as the API server sends it: labels, annotations, owner, statuses), printed;
//! - lookup: one resource matched by `container.id` and given its attributes, and a batch shaped
//!   like the eBPF receiver's output (resources of 20 data points), reported per data point.
//!
//! Run: `cargo bench -p podscope-processors --bench k8s_index` (memory line first, then
//! criterion). Under `cargo test` it runs once, as a smoke test.

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{criterion_group, Criterion, Throughput};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::watcher::Event;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use podscope_core::{
    Batch, BuildContext, ComponentConfig as _, ComponentId, ComponentKind, Processor,
    ProcessorBuilder as _, Signal,
};
use podscope_k8s::K8sMetadata;
use podscope_processors::k8sattributes::{K8sAttributesConfig, PodEnricher};
use podscope_testkit::BuildContextForTests as _;
use podscope_testkit::Discard;

const PODS: usize = 10_000;
const CONTAINERS: usize = 3;
const POINTS_PER_RESOURCE: usize = 20;

fn container_id(pod: usize, container: usize) -> String {
    format!("{:060x}{:04x}", pod, container)
}

fn uid(pod: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", pod, pod)
}

/// A pod like a Deployment's on a busy cluster.
fn pod(i: usize) -> Pod {
    let deployment = format!("service-{}", i % 500);
    let hash = format!("{:09x}", i % 500);
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{deployment}-{hash}-{:05x}", i)),
            namespace: Some(format!("team-{}", i % 40)),
            uid: Some(uid(i)),
            resource_version: Some((1000 + i).to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), deployment.clone()),
                ("app.kubernetes.io/version".into(), "2.3.1".into()),
                ("app.kubernetes.io/part-of".into(), "shop".into()),
                ("pod-template-hash".into(), hash.clone()),
                ("team".into(), format!("team-{}", i % 40)),
                ("tier".into(), "backend".into()),
            ])),
            annotations: Some(BTreeMap::from([
                (
                    "kubectl.kubernetes.io/restartedAt".into(),
                    "2026-11-30T08:00:00Z".into(),
                ),
                ("prometheus.io/scrape".into(), "true".into()),
                ("prometheus.io/port".into(), "9090".into()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: format!("{deployment}-{hash}"),
                uid: uid(i + 1_000_000),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            containers: (0..CONTAINERS)
                .map(|c| Container {
                    name: format!("container-{c}"),
                    image: Some(format!("registry.example.com/shop/{deployment}-{c}:2.3.1")),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)),
            start_time: Some(Time("2026-11-30T08:00:00Z".parse().expect("a timestamp"))),
            container_statuses: Some(
                (0..CONTAINERS)
                    .map(|c| ContainerStatus {
                        name: format!("container-{c}"),
                        container_id: Some(format!("containerd://{}", container_id(i, c))),
                        image: format!("registry.example.com/shop/{deployment}-{c}:2.3.1"),
                        image_id: format!(
                            "registry.example.com/shop/{deployment}-{c}@sha256:{:064x}",
                            i
                        ),
                        ready: true,
                        restart_count: 0,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// The extension a host-mode `k8sattributes` runs for itself, filled with `PODS` pods by watch
/// events, and the processor reading it.
struct Filled {
    metadata: Arc<K8sMetadata>,
    enricher: Arc<PodEnricher>,
    processor: Arc<dyn Processor>,
}

fn filled() -> Filled {
    let config: K8sAttributesConfig =
        serde_json::from_value(serde_json::json!({"auth_type": "none"})).expect("config");
    assert!(config.validate().is_empty());
    let mut ctx = BuildContext::for_tests("k8sattributes");
    let metadata = Arc::new(K8sMetadata::new(config.own_extension(), &ctx).expect("extension"));
    metadata.apply_pod_events([Event::Init]);
    for i in 0..PODS {
        metadata.apply_pod_events([Event::InitApply(pod(i))]);
    }
    metadata.apply_pod_events([Event::InitDone]);
    let extension = ComponentId::parse("k8s_metadata/k8sattributes").expect("an id");
    ctx.extensions.insert(extension.clone(), metadata.clone());
    ctx.extensions
        .add_user(ComponentKind::Processor, ctx.id.clone(), extension);
    let shared = ctx.shared.clone();
    let processor = config
        .build(ctx.clone(), Signal::Metrics, Arc::new(Discard))
        .expect("build");
    // What every pipeline's instance of the processor shares, for the lookup entry points.
    let enricher = shared
        .get_or_insert::<PodEnricher>(&ctx.id, || anyhow::bail!("built above"))
        .expect("the processor's enricher");
    Filled {
        metadata,
        enricher,
        processor,
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// The resource the eBPF receiver sends for a container: host, cgroup id and path, container id.
fn ebpf_resource(pod: usize, container: usize) -> Vec<KeyValue> {
    let id = container_id(pod, container);
    vec![
        string("host.name", "node-a"),
        KeyValue {
            key: "podscope.cgroup.id".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(4242)),
            }),
            ..Default::default()
        },
        string(
            "podscope.cgroup.path",
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope", uid(pod).replace('-', "_")),
        ),
        string("container.id", &id),
    ]
}

fn batch(resources: usize) -> Batch {
    Batch::metrics(
        (0..resources)
            .map(|r| ResourceMetrics {
                resource: Some(Resource {
                    attributes: ebpf_resource(r * 7 % PODS, r % CONTAINERS),
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "podscope.syscalls".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: (0..POINTS_PER_RESOURCE)
                                .map(|_| NumberDataPoint::default())
                                .collect(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    )
}

fn memory() {
    let before = resident_bytes();
    let filled = filled();
    let after = resident_bytes();
    assert_eq!(filled.metadata.pods().len(), PODS);
    println!(
        "k8s_index/memory: {PODS} pods x {CONTAINERS} containers: {:.1} MiB resident added ({:.0} bytes per pod)",
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        (after.saturating_sub(before)) as f64 / PODS as f64
    );
}

fn lookups(c: &mut Criterion) {
    let Filled {
        enricher: shared,
        processor,
        ..
    } = filled();
    let mut group = c.benchmark_group("k8s_index");
    group.throughput(Throughput::Elements(1));
    let resource = ebpf_resource(4321, 1);
    group.bench_function("lookup_by_container_id", |b| {
        b.iter(|| shared.find(&resource).expect("a cached container"))
    });
    group.bench_function("enrich_one_resource", |b| {
        b.iter_batched(
            || resource.clone(),
            |mut attrs| {
                shared.enrich(&mut attrs);
                attrs
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // What the processor does to a batch (50 resources of 20 points each), per data point;
    // the batch is built and dropped outside the measurement.
    let resources = 50;
    group.throughput(Throughput::Elements(
        (resources * POINTS_PER_RESOURCE) as u64,
    ));
    let Batch::Metrics(input) = batch(resources) else {
        unreachable!("a metrics batch")
    };
    group.bench_function("enrich_batch_per_data_point", |b| {
        b.iter_batched(
            || input.to_vec(),
            |mut rms| {
                for rm in &mut rms {
                    let resource = rm.resource.get_or_insert_with(Default::default);
                    shared.enrich(&mut resource.attributes);
                }
                rms
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // The same through the processor's consume (the batch ends in a discarding consumer).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    group.bench_function("consume_batch_per_data_point", |b| {
        b.iter_batched(
            || Batch::metrics(input.to_vec()),
            |batch| runtime.block_on(processor.consume(batch)).expect("consume"),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, lookups);

fn main() {
    memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
