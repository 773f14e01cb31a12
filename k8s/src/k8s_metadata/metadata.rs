//! From a Kubernetes Pod (Namespace, Node) to the trimmed record the store keeps: the resource
//! attributes it will add, computed once when the object arrives, and the keys it is found by.
//!
//! Owners are resolved without watching ReplicaSets or Jobs cluster-wide:
//! - **Deployment**: a ReplicaSet made by a Deployment is named `<deployment>-<pod-template-hash>`
//!   and its pods carry the `pod-template-hash` label; when the owning ReplicaSet's name ends
//!   with `-<that hash>`, the rest is the Deployment. Wrong only for a ReplicaSet made by hand
//!   that imitates that naming (its pods would be said to belong to a Deployment that does not
//!   exist).
//! - **CronJob**: a Job made by a CronJob is named `<cronjob>-<scheduled time in minutes since
//!   the epoch>`; when the owning Job's name ends with `-` and 8 or more digits, the rest is the
//!   CronJob. Wrong for a Job made by hand with such a suffix (`backup-20240101`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use podscope_core::proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use regex::Regex;

use super::config::{ExtractConfig, FieldExtract, FieldSource};

/// One attribute as the store keeps it: key and value shared through the [`Interner`] (a
/// namespace, node, workload or image name is stored once for all its pods), turned into an
/// OTLP `KeyValue` only when added to data.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub key: Arc<str>,
    pub value: AttrValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(Arc<str>),
    Int(i64),
    /// A one-element string array (`container.image.tags`).
    StrList(Arc<str>),
}

impl Attr {
    pub fn to_key_value(&self) -> KeyValue {
        let value = match &self.value {
            AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
            AttrValue::Int(i) => any_value::Value::IntValue(*i),
            AttrValue::StrList(s) => any_value::Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::StringValue(s.to_string())),
                }],
            }),
        };
        KeyValue {
            key: self.key.to_string(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }
}

/// Shares equal strings between pods. Strings no pod uses any more are dropped by
/// [`Interner::shrink`].
#[derive(Debug, Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(existing) = self.strings.get(s) {
            return existing.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(new.clone());
        new
    }

    /// Forgets strings only the interner holds.
    pub fn shrink(&mut self) {
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// A container as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerMeta {
    /// Without the `containerd://` prefix; `None` until the container has started.
    pub id: Option<Arc<str>>,
    pub name: Arc<str>,
    /// This container's own attributes; the pod's come first (see [`PodMeta::attributes`]).
    pub attributes: Box<[Attr]>,
}

/// A pod as the store keeps it: only what enrichment and lookups need.
#[derive(Debug, Clone, PartialEq)]
pub struct PodMeta {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The IPs the pod holds, by which data may name it: empty for host-network pods (their IP
    /// is the node's) and for finished pods (see [`has_finished`]).
    pub ips: Box<[Arc<str>]>,
    /// Labels, kept for pod selectors (the eBPF receiver's kernel-side filter).
    pub labels: Box<[(Arc<str>, Arc<str>)]>,
    /// Attributes of the pod, for data of any of its containers or of none.
    pub attributes: Box<[Attr]>,
    pub containers: Box<[ContainerMeta]>,
}

impl PodMeta {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}

/// The part of the config that turns objects into attributes, compiled once.
#[derive(Debug, Clone)]
pub struct Extractor {
    metadata: Vec<String>,
    labels: Vec<CompiledRule>,
    annotations: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    rule: FieldExtract,
    regex: Option<Regex>,
}

pub const SERVICE_NAME_ANNOTATION: &str = "resource.opentelemetry.io/service.name";
pub const SERVICE_NAMESPACE_ANNOTATION: &str = "resource.opentelemetry.io/service.namespace";
pub const SERVICE_VERSION_ANNOTATION: &str = "resource.opentelemetry.io/service.version";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const VERSION_LABEL: &str = "app.kubernetes.io/version";

/// The workload a pod belongs to, resolved from its controller reference.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owners {
    pub replicaset: Option<String>,
    pub deployment: Option<String>,
    pub statefulset: Option<String>,
    pub daemonset: Option<String>,
    pub job: Option<String>,
    pub cronjob: Option<String>,
}

impl Owners {
    /// The name `service.name` falls back to: the outermost workload.
    fn workload_name(&self) -> Option<&str> {
        self.deployment
            .as_deref()
            .or(self.replicaset.as_deref())
            .or(self.statefulset.as_deref())
            .or(self.daemonset.as_deref())
            .or(self.cronjob.as_deref())
            .or(self.job.as_deref())
    }
}

pub fn owners(pod: &Pod) -> Owners {
    let mut owners = Owners::default();
    let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first())
    else {
        return owners;
    };
    let labels = pod.metadata.labels.as_ref();
    match owner.kind.as_str() {
        "ReplicaSet" => {
            owners.deployment = labels
                .and_then(|l| l.get("pod-template-hash"))
                .and_then(|hash| deployment_from_replicaset(&owner.name, hash));
            owners.replicaset = Some(owner.name.clone());
        }
        "StatefulSet" => owners.statefulset = Some(owner.name.clone()),
        "DaemonSet" => owners.daemonset = Some(owner.name.clone()),
        "Job" => {
            owners.cronjob = cronjob_from_job(&owner.name);
            owners.job = Some(owner.name.clone());
        }
        _ => {}
    }
    owners
}

/// `web-7d4b9c8f6` with hash `7d4b9c8f6` → `web`.
pub fn deployment_from_replicaset(replicaset: &str, pod_template_hash: &str) -> Option<String> {
    let name = replicaset
        .strip_suffix(pod_template_hash)?
        .strip_suffix('-')?;
    (!name.is_empty()).then(|| name.to_string())
}

/// `backup-29012345` → `backup`.
pub fn cronjob_from_job(job: &str) -> Option<String> {
    let (name, suffix) = job.rsplit_once('-')?;
    (!name.is_empty() && suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.to_string())
}

/// `registry:5000/team/app:1.2@sha256:…` → (`registry:5000/team/app`, Some(`1.2`)).
pub fn split_image(image: &str) -> (String, Option<String>) {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' separates the tag; one before it is a registry port.
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (
                without_digest[..at].to_string(),
                Some(without_digest[at + 1..].to_string()),
            )
        }
        None => (without_digest.to_string(), None),
    }
}

/// The pod's IPs (`status.podIP`, then the rest of `status.podIPs`); none for a host-network
/// pod, whose IP is the node's and names no pod.
pub fn pod_ips(pod: &Pod) -> Vec<&str> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Vec::new();
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<&str> = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten();
    for ip in status
        .and_then(|s| s.pod_ip.as_deref())
        .into_iter()
        .chain(listed.map(|i| i.ip.as_str()))
    {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// Whether the pod has finished (`Succeeded` or `Failed`). Its sandbox is gone and the network
/// may have given its IP to a new pod, though the API server keeps listing it in `status.podIP`
/// (a Job's pods stay until the Job is deleted), so it holds no IP in the indexes.
pub fn has_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Strips the runtime scheme from `status.containerStatuses[].containerID`.
pub fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

fn str_attr(interner: &mut Interner, key: &str, value: &str) -> Attr {
    Attr {
        key: interner.get(key),
        value: AttrValue::Str(interner.get(value)),
    }
}

pub fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

impl Extractor {
    pub fn new(extract: &ExtractConfig) -> Result<Extractor, String> {
        let compile = |rules: &[FieldExtract]| {
            rules
                .iter()
                .map(|rule| {
                    Ok(CompiledRule {
                        rule: rule.clone(),
                        regex: rule.compiled_regex()?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Extractor {
            metadata: extract.metadata.clone(),
            labels: compile(&extract.labels)?,
            annotations: compile(&extract.annotations)?,
        })
    }

    fn wants(&self, key: &str) -> bool {
        self.metadata.iter().any(|k| k == key)
    }

    /// Attributes from `extract.labels` / `extract.annotations` rules of one source.
    fn fields(
        &self,
        source: FieldSource,
        labels: Option<&BTreeMap<String, String>>,
        annotations: Option<&BTreeMap<String, String>>,
        interner: &mut Interner,
    ) -> Vec<Attr> {
        let mut out = Vec::new();
        for (kind, rules, map) in [
            ("label", &self.labels, labels),
            ("annotation", &self.annotations, annotations),
        ] {
            let Some(map) = map else { continue };
            for compiled in rules.iter().filter(|c| c.rule.from == source) {
                let rule = &compiled.rule;
                let default_name = |key: &str| format!("k8s.{}.{kind}.{key}", source.as_str());
                if let Some(key) = &rule.key {
                    if let Some(value) = map.get(key) {
                        let name = rule.tag_name.clone().unwrap_or_else(|| default_name(key));
                        out.push(str_attr(interner, &name, value));
                    }
                } else if let Some(regex) = &compiled.regex {
                    for (key, value) in map {
                        let Some(captures) = regex.captures(key) else {
                            continue;
                        };
                        let name = match &rule.tag_name {
                            Some(template) => {
                                let mut name = String::new();
                                captures.expand(template, &mut name);
                                name
                            }
                            None => default_name(key),
                        };
                        out.push(str_attr(interner, &name, value));
                    }
                }
            }
        }
        out
    }

    /// Trims a pod to what the store keeps. `None` for a pod without namespace, name or UID.
    pub fn pod(&self, pod: &Pod, interner: &mut Interner) -> Option<PodMeta> {
        let meta = &pod.metadata;
        let (namespace, name, uid) = (
            meta.namespace.as_deref()?,
            meta.name.as_deref()?,
            meta.uid.as_deref()?,
        );
        let status = pod.status.as_ref();
        let spec = pod.spec.as_ref();
        let ips = pod_ips(pod);
        let empty = BTreeMap::new();
        let labels = meta.labels.as_ref().unwrap_or(&empty);
        let annotations = meta.annotations.as_ref();
        let owners = owners(pod);

        let mut attrs = Vec::new();
        let mut put = |interner: &mut Interner, key: &str, value: Option<&str>| {
            if let Some(value) = value {
                if self.wants(key) {
                    attrs.push(str_attr(interner, key, value));
                }
            }
        };
        put(interner, "k8s.namespace.name", Some(namespace));
        put(interner, "k8s.pod.name", Some(name));
        put(interner, "k8s.pod.uid", Some(uid));
        let start_time = status
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string());
        put(interner, "k8s.pod.start_time", start_time.as_deref());
        put(interner, "k8s.pod.ip", ips.first().copied());
        put(
            interner,
            "k8s.node.name",
            spec.and_then(|s| s.node_name.as_deref()),
        );
        put(
            interner,
            "k8s.deployment.name",
            owners.deployment.as_deref(),
        );
        put(
            interner,
            "k8s.replicaset.name",
            owners.replicaset.as_deref(),
        );
        put(
            interner,
            "k8s.statefulset.name",
            owners.statefulset.as_deref(),
        );
        put(interner, "k8s.daemonset.name", owners.daemonset.as_deref());
        put(interner, "k8s.job.name", owners.job.as_deref());
        put(interner, "k8s.cronjob.name", owners.cronjob.as_deref());
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        // service.name: the annotation, the app.kubernetes.io/name label, the workload, the pod.
        let service_name = annotation(SERVICE_NAME_ANNOTATION)
            .or(labels.get(NAME_LABEL).map(String::as_str))
            .or(owners.workload_name())
            .unwrap_or(name);
        put(interner, "service.name", Some(service_name));
        put(
            interner,
            "service.namespace",
            Some(annotation(SERVICE_NAMESPACE_ANNOTATION).unwrap_or(namespace)),
        );
        // service.version: the annotation, the app.kubernetes.io/version label, else (per
        // container) the image tag.
        let pod_version = annotation(SERVICE_VERSION_ANNOTATION)
            .or(labels.get(VERSION_LABEL).map(String::as_str));
        put(interner, "service.version", pod_version);
        attrs.extend(self.fields(FieldSource::Pod, Some(labels), annotations, interner));

        let statuses = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
                    .chain(s.ephemeral_container_statuses.iter().flatten())
            })
            .collect::<Vec<_>>();
        let spec_images: BTreeMap<&str, &str> = spec
            .into_iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
            .collect();
        let mut names: Vec<&str> = spec_images.keys().copied().collect();
        for status in &statuses {
            if !names.contains(&status.name.as_str()) {
                names.push(&status.name);
            }
        }
        let mut containers = Vec::with_capacity(names.len());
        for container_name in names {
            let status = statuses.iter().find(|s| s.name == container_name);
            let id = status
                .and_then(|s| s.container_id.as_deref())
                .map(bare_container_id)
                .filter(|id| !id.is_empty());
            // The spec's image is what the user wrote; the status's may be resolved to a digest.
            let image = spec_images
                .get(container_name)
                .copied()
                .or(status.map(|s| s.image.as_str()));
            let (image_name, tag) = image.map(split_image).unzip();
            let tag = tag.flatten();
            let mut c = Vec::new();
            let mut put = |interner: &mut Interner, key: &str, value: AttrValue| {
                if self.wants(key) {
                    c.push(Attr {
                        key: interner.get(key),
                        value,
                    });
                }
            };
            let value = AttrValue::Str(interner.get(container_name));
            put(interner, "k8s.container.name", value);
            if let Some(status) = status {
                put(
                    interner,
                    "k8s.container.restart_count",
                    AttrValue::Int(i64::from(status.restart_count)),
                );
            }
            if let Some(id) = id {
                // Unique per container: not worth interning.
                put(interner, "container.id", AttrValue::Str(Arc::from(id)));
            }
            if let Some(image_name) = &image_name {
                let value = AttrValue::Str(interner.get(image_name));
                put(interner, "container.image.name", value);
            }
            if let Some(tag) = &tag {
                let value = AttrValue::StrList(interner.get(tag));
                put(interner, "container.image.tags", value);
                if pod_version.is_none() {
                    let value = AttrValue::Str(interner.get(tag));
                    put(interner, "service.version", value);
                }
            }
            containers.push(ContainerMeta {
                id: id.map(Arc::from),
                name: interner.get(container_name),
                attributes: c.into(),
            });
        }
        Some(PodMeta {
            uid: Arc::from(uid),
            namespace: interner.get(namespace),
            name: Arc::from(name),
            // A finished pod's IP may already be another pod's: it is described, not indexed.
            ips: if has_finished(pod) {
                Box::default()
            } else {
                ips.into_iter().map(Arc::from).collect()
            },
            labels: labels
                .iter()
                .map(|(k, v)| (interner.get(k), interner.get(v)))
                .collect(),
            attributes: attrs.into(),
            containers: containers.into(),
        })
    }

    /// Attributes from a namespace's labels and annotations (`from: namespace` rules).
    pub fn namespace(&self, namespace: &Namespace, interner: &mut Interner) -> Arc<[Attr]> {
        self.fields(
            FieldSource::Namespace,
            namespace.metadata.labels.as_ref(),
            namespace.metadata.annotations.as_ref(),
            interner,
        )
        .into()
    }

    /// Attributes from the node's labels and annotations (`from: node` rules).
    pub fn node(&self, node: &Node, interner: &mut Interner) -> Arc<[Attr]> {
        self.fields(
            FieldSource::Node,
            node.metadata.labels.as_ref(),
            node.metadata.annotations.as_ref(),
            interner,
        )
        .into()
    }
}
