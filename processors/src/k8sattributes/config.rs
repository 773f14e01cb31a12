use std::time::Duration;

use podscope_core::{ComponentConfig, ComponentId, FieldError};
use podscope_k8s::k8s_metadata::{
    AuthType, ExtractConfig, FilterConfig, K8sMetadataConfig, DEFAULT_POD_DELETE_DELAY,
};
use serde::Deserialize;

/// `processors: k8sattributes:` settings, in the shape of the OpenTelemetry Collector's
/// k8sattributes processor.
///
/// The pods come from a `k8s_metadata` extension: the one `extension` names, or, when it names
/// none, one the processor runs for itself from `auth_type`, `filter`, `extract`,
/// `pod_delete_delay` and `peers.enabled` (the extension's settings, documented there). With
/// `extension` set those belong to the extension and are refused here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sAttributesConfig {
    /// The `k8s_metadata` extension (`extensions:` section, listed in `service.extensions`)
    /// whose pods this processor reads.
    pub extension: Option<String>,
    pub auth_type: Option<AuthType>,
    pub filter: Option<FilterConfig>,
    pub extract: Option<ExtractConfig>,
    #[serde(with = "humantime_serde::option")]
    pub pod_delete_delay: Option<Duration>,
    /// How a resource is matched to a pod, in order; the first rule that finds a pod wins.
    pub pod_association: Vec<AssociationRule>,
    /// Name the pod or Service at the other end of network data, from the extension's peer
    /// index.
    pub peers: PeersConfig,
    /// How often the cgroup id → path index is walked again (it is also walked on a miss, at
    /// most once per `cgroup_refresh_min_interval`).
    #[serde(with = "humantime_serde")]
    pub cgroup_refresh_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub cgroup_refresh_min_interval: Duration,
}

impl Default for K8sAttributesConfig {
    fn default() -> Self {
        K8sAttributesConfig {
            extension: None,
            auth_type: None,
            filter: None,
            extract: None,
            pod_delete_delay: None,
            pod_association: default_association(),
            peers: PeersConfig::default(),
            cgroup_refresh_interval: Duration::from_secs(30),
            cgroup_refresh_min_interval: Duration::from_secs(1),
        }
    }
}

/// `peers:` — the pod or Service at the other end of network data, named from the
/// extension's cluster-wide index of pod IPs and Service cluster IPs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Keep the index (a setting of the extension: see [`K8sAttributesConfig`]). Peers are
    /// named whenever the extension keeps it.
    pub enabled: Option<bool>,
    /// The data point / span attribute holding the peer's IP address.
    pub attribute: String,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            enabled: None,
            attribute: "network.peer.address".to_string(),
        }
    }
}

/// One `pod_association[]` rule: all its sources together identify a pod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssociationRule {
    pub sources: Vec<AssociationSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssociationSource {
    pub from: AssociationFrom,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationFrom {
    ResourceAttribute,
    /// The peer address of the connection that brought the data (the Collector's `connection`).
    Connection,
}

/// Resource attributes a single-source rule may name, and how each leads to a pod.
pub const ASSOCIATION_ATTRIBUTES: &[&str] = &[
    "container.id",
    "podscope.cgroup.path",
    "podscope.cgroup.id",
    "process.pid",
    "k8s.pod.uid",
    "k8s.pod.ip",
];

fn default_association() -> Vec<AssociationRule> {
    let single = |name: &str| AssociationRule {
        sources: vec![AssociationSource {
            from: AssociationFrom::ResourceAttribute,
            name: Some(name.to_string()),
        }],
    };
    let mut rules: Vec<AssociationRule> =
        ASSOCIATION_ATTRIBUTES.iter().map(|a| single(a)).collect();
    rules.push(AssociationRule {
        sources: vec![
            AssociationSource {
                from: AssociationFrom::ResourceAttribute,
                name: Some("k8s.pod.name".to_string()),
            },
            AssociationSource {
                from: AssociationFrom::ResourceAttribute,
                name: Some("k8s.namespace.name".to_string()),
            },
        ],
    });
    rules
}

/// What a validated association rule looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Association {
    ContainerId,
    CgroupPath,
    CgroupId,
    ProcessPid,
    PodUid,
    PodIp,
    PodNameAndNamespace,
}

impl AssociationRule {
    pub fn resolve(&self) -> Result<Association, String> {
        let mut names = Vec::new();
        for source in &self.sources {
            match (source.from, source.name.as_deref()) {
                (AssociationFrom::Connection, _) => {
                    return Err("from: connection is not supported: podscope's receivers do not record the sender's address; use from: resource_attribute".to_string())
                }
                (AssociationFrom::ResourceAttribute, None) => {
                    return Err("from: resource_attribute needs a name".to_string())
                }
                (AssociationFrom::ResourceAttribute, Some(name)) => names.push(name),
            }
        }
        names.sort_unstable();
        Ok(match names.as_slice() {
            ["container.id"] => Association::ContainerId,
            ["podscope.cgroup.path"] => Association::CgroupPath,
            ["podscope.cgroup.id"] => Association::CgroupId,
            ["process.pid"] => Association::ProcessPid,
            ["k8s.pod.uid"] => Association::PodUid,
            ["k8s.pod.ip"] => Association::PodIp,
            ["k8s.namespace.name", "k8s.pod.name"] => Association::PodNameAndNamespace,
            [] => return Err("a rule needs at least one source".to_string()),
            other => {
                return Err(format!(
                    "cannot identify a pod from {other:?}: use one of {ASSOCIATION_ATTRIBUTES:?}, or k8s.pod.name with k8s.namespace.name"
                ))
            }
        })
    }
}

impl K8sAttributesConfig {
    /// The id of the extension `extension` names (unset or invalid: `None`).
    pub fn extension_id(&self) -> Option<ComponentId> {
        ComponentId::parse(self.extension.as_deref()?).ok()
    }

    /// The settings of the extension this processor runs for itself when it names none.
    pub fn own_extension(&self) -> K8sMetadataConfig {
        K8sMetadataConfig {
            auth_type: self.auth_type,
            filter: self.filter.clone().unwrap_or_default(),
            extract: self.extract.clone().unwrap_or_default(),
            pod_delete_delay: self.pod_delete_delay.unwrap_or(DEFAULT_POD_DELETE_DELAY),
            peers: podscope_k8s::k8s_metadata::PeersConfig {
                enabled: self.peers.enabled.unwrap_or(false),
            },
        }
    }

    /// The keys set here that belong to the extension.
    fn extension_keys_set(&self) -> Vec<&'static str> {
        [
            ("auth_type", self.auth_type.is_some()),
            ("filter", self.filter.is_some()),
            ("extract", self.extract.is_some()),
            ("pod_delete_delay", self.pod_delete_delay.is_some()),
            ("peers.enabled", self.peers.enabled.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(key, _)| key)
        .collect()
    }
}

impl ComponentConfig for K8sAttributesConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        match self.extension.as_deref().map(ComponentId::parse) {
            None => errors.extend(self.own_extension().validate()),
            Some(Err(e)) => errors.push(FieldError::new("extension", e)),
            Some(Ok(id)) if id.type_name() != "k8s_metadata" => errors.push(FieldError::new(
                "extension",
                format!("{id} is not a k8s_metadata extension id"),
            )),
            Some(Ok(id)) => {
                for key in self.extension_keys_set() {
                    errors.push(FieldError::new(
                        key,
                        format!(
                            "belongs to the extension: this processor reads the pods of extensions.{id}, so set it there"
                        ),
                    ));
                }
            }
        }
        for (i, rule) in self.pod_association.iter().enumerate() {
            if let Err(e) = rule.resolve() {
                errors.push(FieldError::new(format!("pod_association[{i}]"), e));
            }
        }
        if self.peers.attribute.is_empty() {
            errors.push(FieldError::new("peers.attribute", "must not be empty"));
        }
        if self.cgroup_refresh_interval.is_zero() {
            errors.push(FieldError::new(
                "cgroup_refresh_interval",
                "must be greater than 0",
            ));
        }
        errors
    }
}
