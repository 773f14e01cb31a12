use std::path::PathBuf;
use std::time::Duration;

use podscope_core::{ComponentConfig, FieldError};
use serde::{Deserialize, Deserializer};

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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    #[serde(deserialize_with = "present_means_on")]
    pub process: Option<ProcessProbeConfig>,
    #[serde(deserialize_with = "present_means_on")]
    pub syscalls: Option<SyscallsProbeConfig>,
    #[serde(deserialize_with = "present_means_on")]
    pub files: Option<FilesProbeConfig>,
    #[serde(deserialize_with = "present_means_on")]
    pub sched: Option<BasicProbeConfig>,
    #[serde(deserialize_with = "present_means_on")]
    pub block_io: Option<BasicProbeConfig>,
    #[serde(deserialize_with = "present_means_on")]
    pub tcp: Option<TcpProbeConfig>,
    /// User functions to count, with a captured argument or return value (see `uprobes`).
    pub uprobes: Vec<super::uprobes::UprobeConfig>,
}

/// Settings every probe has.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BasicProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
}

impl Default for BasicProbeConfig {
    fn default() -> Self {
        BasicProbeConfig {
            enabled: true,
            required: false,
        }
    }
}

/// `probes.process:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessProbeConfig {
    pub enabled: bool,
    pub required: bool,
    /// Bytes of exec/exit events that wake the agent early; below that it reads them every
    /// `event_poll_interval`. Default 65536.
    pub wakeup_bytes: u64,
    /// Default 200ms.
    #[serde(with = "humantime_serde")]
    pub event_poll_interval: Duration,
}

impl Default for ProcessProbeConfig {
    fn default() -> Self {
        ProcessProbeConfig {
            enabled: true,
            required: false,
            wakeup_bytes: 65536,
            event_poll_interval: Duration::from_millis(200),
        }
    }
}

/// `probes.syscalls:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallsProbeConfig {
    pub enabled: bool,
    pub required: bool,
    /// Measure enter → exit latency (adds a hook on syscall entry). Default true; false keeps
    /// only counts and errors, at about half the cost.
    pub latency: bool,
    /// Count failed syscalls (needs the exit hook). Default true. With `errors: false` and
    /// `latency: false` the probe only counts, from one tp_btf hook on entry: the cheapest mode.
    pub errors: bool,
}

impl Default for SyscallsProbeConfig {
    fn default() -> Self {
        SyscallsProbeConfig {
            enabled: true,
            required: false,
            latency: true,
            errors: true,
        }
    }
}

/// `probes.tcp:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProbeConfig {
    pub enabled: bool,
    pub required: bool,
    /// Distinct (peer address, server port) pairs kept per cgroup; further peers are summed as
    /// `other`, so a port scan cannot blow up the series count. Default 100.
    pub max_peers: usize,
}

impl Default for TcpProbeConfig {
    fn default() -> Self {
        TcpProbeConfig {
            enabled: true,
            required: false,
            max_peers: 100,
        }
    }
}

/// `probes.files:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesProbeConfig {
    pub enabled: bool,
    pub required: bool,
    /// Count opens per path (successful opens only). Default false: paths can be sensitive and
    /// numerous.
    pub capture_paths: bool,
    /// With `capture_paths`: the paths reported per cgroup and interval, most opened first; the
    /// rest are summed as `other`. Default 20.
    pub top_paths: usize,
}

impl Default for FilesProbeConfig {
    fn default() -> Self {
        FilesProbeConfig {
            enabled: true,
            required: false,
            capture_paths: false,
            top_paths: 20,
        }
    }
}

fn present_means_on<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
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
        let p = &self.probes;
        if p.process.is_none()
            && p.syscalls.is_none()
            && p.files.is_none()
            && p.sched.is_none()
            && p.block_io.is_none()
            && p.tcp.is_none()
            && p.uprobes.is_empty()
        {
            errors.push(FieldError::new(
                "probes",
                "list at least one probe: process, syscalls, files, sched, block_io, tcp, uprobes",
            ));
        }
        for (i, entry) in p.uprobes.iter().enumerate() {
            entry.validate(&format!("probes.uprobes[{i}]"), &mut errors);
        }
        if p.tcp.as_ref().is_some_and(|t| t.max_peers == 0) {
            errors.push(FieldError::new(
                "probes.tcp.max_peers",
                "must be at least 1",
            ));
        }
        if let Some(files) = &p.files {
            if files.capture_paths && files.top_paths == 0 {
                errors.push(FieldError::new(
                    "probes.files.top_paths",
                    "must be at least 1 with capture_paths",
                ));
            }
        }
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
