use podscope_core::FieldError;
use serde::Deserialize;

use crate::ebpf::probes::ProbesConfig;
use crate::ebpf::profiling::ProfilingProbeConfig;
use crate::ebpf::{HttpProbeConfig, TcpProbeConfig};

/// The built-in probes a `Probe` can ask for: those that count per cgroup and need nothing of
/// the user but the pods (not `process`, whose exec/exit stream is the agent's, nor `uprobes`,
/// which name binaries and symbols).
pub const TENANT_KINDS: &[&str] = &[
    "syscalls",
    "files",
    "sched",
    "block_io",
    "tcp",
    "http",
    "profiling",
];

/// `tenant_probes:` — what namespaced `Probe` objects may enable on this node, and what they
/// may cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantProbesConfig {
    /// The `k8s_metadata` extension (in `service.extensions`) whose `Probe` watch and pod cache
    /// serve them; unset: `Probe` objects are not acted on.
    pub extension: Option<String>,
    /// At most this many Probes have an instance on this node at once; a further one fails
    /// with the reason (default 8).
    pub max_probes: usize,
    /// The kernel memory of all Probes' instances together (default 256 MiB); a Probe whose
    /// instance would go over fails with the reason.
    pub max_map_memory_bytes: u64,
    /// The probes a Probe may enable, each with the settings its instances start from (as under
    /// `probes:`); a Probe may lower http's `spans.sampling_ratio` and profiling's `frequency`
    /// below these, nothing else. Default: `tcp`, `http` and `profiling` with their defaults.
    pub probes: ProbesConfig,
}

impl Default for TenantProbesConfig {
    fn default() -> Self {
        TenantProbesConfig {
            extension: None,
            max_probes: 8,
            max_map_memory_bytes: 256 << 20,
            probes: ProbesConfig {
                tcp: Some(TcpProbeConfig::default()),
                http: Some(HttpProbeConfig::default()),
                profiling: Some(ProfilingProbeConfig::default()),
                ..ProbesConfig::default()
            },
        }
    }
}

impl TenantProbesConfig {
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        if let Some(extension) = &self.extension {
            match podscope_core::ComponentId::parse(extension) {
                Ok(id) if id.type_name() == "k8s_metadata" => {}
                Ok(_) => errors.push(FieldError::new(
                    "tenant_probes.extension",
                    format!("{extension:?} is not a k8s_metadata extension id"),
                )),
                Err(e) => errors.push(FieldError::new("tenant_probes.extension", e)),
            }
        }
        if self.max_probes == 0 {
            errors.push(FieldError::new(
                "tenant_probes.max_probes",
                "must be at least 1 (leave tenant_probes.extension unset to ignore Probes)",
            ));
        }
        for kind in self.probes.listed_names() {
            if !TENANT_KINDS.contains(&kind) {
                errors.push(FieldError::new(
                    format!("tenant_probes.probes.{kind}"),
                    format!(
                        "a Probe cannot enable {kind}; it may enable: {}",
                        TENANT_KINDS.join(", ")
                    ),
                ));
            }
        }
        let mut probe_errors = Vec::new();
        self.probes.validate(&mut probe_errors);
        errors.extend(probe_errors.into_iter().map(|e| FieldError {
            path: format!("tenant_probes.{}", e.path),
            message: e.message,
        }));
    }

    /// The kinds a Probe may enable here: listed, on, and of [`TENANT_KINDS`].
    pub fn allowed(&self) -> Vec<&'static str> {
        self.probes
            .enabled_names()
            .into_iter()
            .filter(|k| TENANT_KINDS.contains(k))
            .collect()
    }
}
