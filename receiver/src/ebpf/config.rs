use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::Deserialize;

pub use super::probes::ProbesConfig;
use super::programs::{ProgramSpec, UserProgramsConfig};
use super::tenant::TenantProbesConfig;

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
    /// Users' own programs from local files, by name (`docs/programs.md`).
    pub programs: BTreeMap<String, ProgramSpec>,
    /// `EbpfProgram` objects of the cluster, and the limits every user program is held to.
    pub user_programs: UserProgramsConfig,
    /// What namespaced `Probe` objects may enable on this node (see `docs/programs.md`).
    pub tenant_probes: TenantProbesConfig,
    /// The `session` extension (in `service.extensions`) this receiver tells which of its probes
    /// attached and why others were skipped, for `kubectl podscope status`, and hands each
    /// collection's per-cgroup figures, for `kubectl podscope top`. Default none.
    pub session: Option<String>,
}

impl Default for EbpfReceiverConfig {
    fn default() -> Self {
        EbpfReceiverConfig {
            collection_interval: Duration::from_secs(10),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            cgroup_filter: CgroupFilterConfig::default(),
            probes: ProbesConfig::default(),
            programs: BTreeMap::new(),
            user_programs: UserProgramsConfig::default(),
            tenant_probes: TenantProbesConfig::default(),
            session: None,
        }
    }
}

/// `cgroup_filter:` — `*` matches within one path segment, `**` across segments. With `include`
/// or `pods`, a cgroup created under an include glob's fixed prefix (or in the kubelet's pod
/// tree) is observed from its creation, then kept or dropped once the next collection knows its
/// path: a new container is counted from its first event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupFilterConfig {
    /// Observe only cgroups matching one of these globs (empty: all).
    pub include: Vec<String>,
    /// Never observe cgroups matching one of these globs.
    pub exclude: Vec<String>,
    /// Also observe the cgroups of these pods, selected through a `k8s_metadata` extension's
    /// cache and kept current as pods come and go.
    pub pods: Option<PodFilterConfig>,
}

/// `cgroup_filter.pods:` — pods by namespace and labels.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodFilterConfig {
    /// The `k8s_metadata` extension (in `service.extensions`) whose cache knows the pods.
    pub extension: Option<String>,
    /// Or the `k8sattributes` processor (in a pipeline) whose extension that is. Neither set:
    /// processor `k8sattributes`.
    pub processor: Option<String>,
    /// Pods in any of these namespaces (any namespace when empty).
    pub namespaces: Vec<String>,
    /// A label selector, as `kubectl -l` takes it: `app=web,tier!=batch,env in (prod,staging)`.
    pub labels: Option<String>,
}

/// Where `cgroup_filter.pods` finds its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSource {
    Extension(podscope_core::ComponentId),
    Processor(podscope_core::ComponentId),
}

impl PodFilterConfig {
    /// The extension or processor named (the processor `k8sattributes` when neither is), or
    /// what is wrong with the setting, at its key.
    pub fn source(&self) -> Result<PodSource, FieldError> {
        let parse = |key: &str, id: &str| {
            podscope_core::ComponentId::parse(id)
                .map_err(|e| FieldError::new(format!("cgroup_filter.pods.{key}"), e))
        };
        match (&self.extension, &self.processor) {
            (Some(_), Some(_)) => Err(FieldError::new(
                "cgroup_filter.pods",
                "set extension or processor, not both",
            )),
            (Some(extension), None) => {
                let id = parse("extension", extension)?;
                if id.type_name() != "k8s_metadata" {
                    return Err(FieldError::new(
                        "cgroup_filter.pods.extension",
                        format!("{extension:?} is not a k8s_metadata extension id"),
                    ));
                }
                Ok(PodSource::Extension(id))
            }
            (None, processor) => {
                let processor = processor.as_deref().unwrap_or("k8sattributes");
                let id = parse("processor", processor)?;
                if id.type_name() != "k8sattributes" {
                    return Err(FieldError::new(
                        "cgroup_filter.pods.processor",
                        format!("{processor:?} is not a k8sattributes processor id"),
                    ));
                }
                Ok(PodSource::Processor(id))
            }
        }
    }
}

impl ComponentConfig for EbpfReceiverConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(session) = &self.session {
            match podscope_core::ComponentId::parse(session) {
                Ok(id) if id.type_name() == "session" => {}
                Ok(_) => errors.push(FieldError::new(
                    "session",
                    format!("{session:?} is not a session extension id"),
                )),
                Err(e) => errors.push(FieldError::new("session", e)),
            }
        }
        if self.collection_interval < Duration::from_millis(100) {
            errors.push(FieldError::new(
                "collection_interval",
                "must be at least 100ms",
            ));
        }
        let user_programs = !self.programs.is_empty() || self.user_programs.extension.is_some();
        let tenant_probes = self.tenant_probes.extension.is_some();
        if !self.probes.any_listed() && !user_programs && !tenant_probes {
            errors.push(FieldError::new(
                "probes",
                "list at least one probe: process, syscalls, files, sched, block_io, tcp, uprobes, http (or a user program, or tenant_probes)",
            ));
        }
        self.tenant_probes.validate(&mut errors);
        super::programs::validate_local(
            &self.programs,
            self.user_programs.extension.is_some(),
            &mut errors,
        );
        self.user_programs.validate(&mut errors);
        self.probes.validate(&mut errors);
        for (i, glob) in self.cgroup_filter.include.iter().enumerate() {
            if let Err(e) = super::cgroups::CgroupGlob::new(glob) {
                errors.push(FieldError::new(format!("cgroup_filter.include[{i}]"), e));
            }
        }
        if let Some(pods) = &self.cgroup_filter.pods {
            if let Err(e) = pods.source() {
                errors.push(e);
            }
            if let Some(labels) = &pods.labels {
                if let Err(e) = podscope_k8s::labels::parse_selector(labels) {
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
