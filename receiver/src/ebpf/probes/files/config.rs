use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.files:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
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
            max_entries: MapSizes::default(),
            capture_paths: false,
            top_paths: 20,
        }
    }
}

crate::ebpf::probes::probe_settings!(FilesProbeConfig);
