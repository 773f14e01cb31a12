use std::path::PathBuf;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

pub use super::probes::ProbesConfig;

/// `receivers: ebpf:` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfReceiverConfig {
    /// How often the kernel's maps become data points. Default 10s.
    #[serde(with = "humantime_serde")]
    pub collection_interval: Duration,
    /// Kernel BTF for CO-RE relocations. Default `/sys/kernel/btf/vmlinux`; point it at a BTF file
    /// (e.g. from BTFHub) on kernels that do not ship one.
    pub btf_path: PathBuf,
    /// Which cgroups are observed, by cgroup path glob (relative to the cgroup2 mount, e.g.
    /// `/kubepods.slice/**`). Unselected cgroups cost one map lookup in the kernel.
    pub cgroup_filter: CgroupFilterConfig,
    /// The probes to run. A probe is on when listed, even empty (`sched:`), unless
    /// `enabled: false`.
    pub probes: ProbesConfig,
}

impl Default for EbpfReceiverConfig {
    fn default() -> Self {
        EbpfReceiverConfig {
            collection_interval: Duration::from_secs(10),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            cgroup_filter: CgroupFilterConfig::default(),
            probes: ProbesConfig::default(),
        }
    }
}

/// `cgroup_filter:` — `*` matches within one path segment, `**` across segments.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupFilterConfig {
    /// Observe only cgroups matching one of these globs (empty: all).
    pub include: Vec<String>,
    /// Never observe cgroups matching one of these globs.
    pub exclude: Vec<String>,
    /// Also observe the cgroups of these pods, selected through a `k8sattributes` processor's
    /// cache and kept current as pods come and go.
    pub pods: Option<PodFilterConfig>,
}

/// `cgroup_filter.pods:` — pods by namespace and labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodFilterConfig {
    /// The `k8sattributes` processor (in this agent's config) whose cache knows the pods.
    pub processor: String,
    /// Pods in any of these namespaces (any namespace when empty).
    pub namespaces: Vec<String>,
    /// An equality-based label selector, as `kubectl -l` takes it: `app=web,tier!=batch`.
    pub labels: Option<String>,
}

impl Default for PodFilterConfig {
    fn default() -> Self {
        PodFilterConfig {
            processor: "k8sattributes".to_string(),
            namespaces: Vec::new(),
            labels: None,
        }
    }
}

impl ComponentConfig for EbpfReceiverConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.collection_interval < Duration::from_millis(100) {
            errors.push(FieldError::new(
                "collection_interval",
                "must be at least 100ms",
            ));
        }
        if !self.probes.any_listed() {
            errors.push(FieldError::new(
                "probes",
                "list at least one probe: process, syscalls, files, sched, block_io, tcp, uprobes, http",
            ));
        }
        self.probes.validate(&mut errors);
        for (i, glob) in self.cgroup_filter.include.iter().enumerate() {
            if let Err(e) = super::cgroups::CgroupGlob::new(glob) {
                errors.push(FieldError::new(format!("cgroup_filter.include[{i}]"), e));
            }
        }
        if let Some(pods) = &self.cgroup_filter.pods {
            match podscope_core::ComponentId::parse(&pods.processor) {
                Ok(id) if id.type_name() == "k8sattributes" => {}
                Ok(_) => errors.push(FieldError::new(
                    "cgroup_filter.pods.processor",
                    format!("{:?} is not a k8sattributes processor id", pods.processor),
                )),
                Err(e) => errors.push(FieldError::new("cgroup_filter.pods.processor", e)),
            }
            if let Some(labels) = &pods.labels {
                if let Err(e) = podscope_core::pods::parse_label_selector(labels) {
                    errors.push(FieldError::new("cgroup_filter.pods.labels", e));
                }
            }
        }
        for (i, glob) in self.cgroup_filter.exclude.iter().enumerate() {
            if let Err(e) = super::cgroups::CgroupGlob::new(glob) {
                errors.push(FieldError::new(format!("cgroup_filter.exclude[{i}]"), e));
            }
        }
        errors
    }
}
