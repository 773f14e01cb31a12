use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use regex::Regex;
use serde::Deserialize;

/// `extensions: k8s_metadata:` settings. The same keys, with the same meaning, are accepted by
/// a `k8sattributes` processor that names no extension (it then runs its own), so they follow
/// the OpenTelemetry Collector's k8sattributes processor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sMetadataConfig {
    /// How to reach the API server. Unset: in-cluster service account when running in a pod,
    /// else the kubeconfig (`KUBECONFIG` or `~/.kube/config`), else no API server (host mode).
    pub auth_type: Option<AuthType>,
    /// Which pods to watch. On a node, only the node's own pods.
    pub filter: FilterConfig,
    /// Which attributes the cache keeps for each pod and container.
    pub extract: ExtractConfig,
    /// How long a deleted pod's metadata is kept, so that late data from it is still enriched.
    #[serde(with = "humantime_serde")]
    pub pod_delete_delay: Duration,
    /// Opt-in: a cluster-wide index of pod IPs and Service cluster IPs, to name the peer at the
    /// other end of network data.
    pub peers: PeersConfig,
}

impl Default for K8sMetadataConfig {
    fn default() -> Self {
        K8sMetadataConfig {
            auth_type: None,
            filter: FilterConfig::default(),
            extract: ExtractConfig::default(),
            pod_delete_delay: DEFAULT_POD_DELETE_DELAY,
            peers: PeersConfig::default(),
        }
    }
}

pub const DEFAULT_POD_DELETE_DELAY: Duration = Duration::from_secs(60);

/// `peers:` — every pod and Service of the cluster (needs list/watch on pods and services in
/// every namespace).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    /// The pod's service account token and the `KUBERNETES_SERVICE_HOST` API server.
    #[serde(rename = "serviceAccount")]
    ServiceAccount,
    /// `KUBECONFIG`, else `~/.kube/config`.
    #[serde(rename = "kubeConfig")]
    KubeConfig,
    /// No API server: host mode (`container.id`, `host.name`).
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// The node whose pods are watched (`spec.nodeName`). Takes precedence over
    /// `node_from_env_var`.
    pub node: Option<String>,
    /// The environment variable holding the node name (the Helm chart sets it from
    /// `spec.nodeName` with the downward API). Default `NODE_NAME`.
    pub node_from_env_var: String,
    /// Only pods of this namespace.
    pub namespace: Option<String>,
    /// Only pods whose labels match all of these rules.
    pub labels: Vec<LabelFilter>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            node: None,
            node_from_env_var: "NODE_NAME".to_string(),
            namespace: None,
            labels: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelFilter {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub op: LabelOp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelOp {
    #[default]
    Equals,
    NotEquals,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Resource attributes to set, from the list in [`METADATA_KEYS`]. Default: all of them.
    pub metadata: Vec<String>,
    pub labels: Vec<FieldExtract>,
    pub annotations: Vec<FieldExtract>,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            metadata: METADATA_KEYS.iter().map(|k| k.to_string()).collect(),
            labels: Vec::new(),
            annotations: Vec::new(),
        }
    }
}

/// Every attribute `extract.metadata` may name.
pub const METADATA_KEYS: &[&str] = &[
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.pod.start_time",
    "k8s.pod.ip",
    "k8s.container.name",
    "k8s.container.restart_count",
    "container.id",
    "container.image.name",
    "container.image.tags",
    "k8s.node.name",
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "service.name",
    "service.namespace",
    "service.version",
];

/// One `extract.labels[]` / `extract.annotations[]` rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldExtract {
    /// The attribute name. Default `k8s.<from>.label.<key>` (`.annotation.` for annotations);
    /// with `key_regex`, `$1`… refer to its groups.
    #[serde(default)]
    pub tag_name: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// A regular expression matched against the whole key.
    #[serde(default)]
    pub key_regex: Option<String>,
    #[serde(default)]
    pub from: FieldSource,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldSource {
    #[default]
    Pod,
    Namespace,
    Node,
}

impl FieldSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldSource::Pod => "pod",
            FieldSource::Namespace => "namespace",
            FieldSource::Node => "node",
        }
    }
}

impl FieldExtract {
    pub fn compiled_regex(&self) -> Result<Option<Regex>, String> {
        match &self.key_regex {
            None => Ok(None),
            Some(re) => Regex::new(&format!("^(?:{re})$")).map(Some).map_err(|e| {
                // The regex crate's syntax errors are several lines with a caret diagram; the
                // last line says what is wrong.
                let text = e.to_string();
                let what = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or(&text)
                    .trim_start_matches("error: ");
                format!("invalid regular expression {re:?}: {what}")
            }),
        }
    }
}

impl K8sMetadataConfig {
    /// Whether any rule reads namespace (or node) labels/annotations: those need a watch on
    /// namespaces (nodes) too, and the matching RBAC.
    pub fn needs_source(&self, source: FieldSource) -> bool {
        self.extract
            .labels
            .iter()
            .chain(&self.extract.annotations)
            .any(|rule| rule.from == source)
    }
}

impl ComponentConfig for K8sMetadataConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, key) in self.extract.metadata.iter().enumerate() {
            if !METADATA_KEYS.contains(&key.as_str()) {
                errors.push(FieldError::new(
                    format!("extract.metadata[{i}]"),
                    format!(
                        "unknown attribute {key:?}; one of {}",
                        METADATA_KEYS.join(", ")
                    ),
                ));
            }
        }
        for (section, rules) in [
            ("labels", &self.extract.labels),
            ("annotations", &self.extract.annotations),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let at = format!("extract.{section}[{i}]");
                match (&rule.key, &rule.key_regex) {
                    (None, None) => errors.push(FieldError::new(&at, "needs key or key_regex")),
                    (Some(_), Some(_)) => {
                        errors.push(FieldError::new(&at, "key and key_regex are exclusive"))
                    }
                    _ => {}
                }
                if let Err(e) = rule.compiled_regex() {
                    errors.push(FieldError::new(format!("{at}.key_regex"), e));
                }
                if rule.tag_name.as_deref() == Some("") {
                    errors.push(FieldError::new(
                        format!("{at}.tag_name"),
                        "must not be empty",
                    ));
                }
            }
        }
        for (i, label) in self.filter.labels.iter().enumerate() {
            let needs_value = matches!(label.op, LabelOp::Equals | LabelOp::NotEquals);
            if needs_value != label.value.is_some() {
                errors.push(FieldError::new(
                    format!("filter.labels[{i}]"),
                    if needs_value {
                        "op equals / not-equals needs a value"
                    } else {
                        "op exists / does-not-exist takes no value"
                    },
                ));
            }
        }
        if self.filter.node.as_deref() == Some("") {
            errors.push(FieldError::new("filter.node", "must not be empty"));
        }
        errors
    }
}
