use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.syscalls:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallsProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
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
            max_entries: MapSizes::default(),
            latency: true,
            errors: true,
        }
    }
}

crate::ebpf::probes::probe_settings!(SyscallsProbeConfig);
