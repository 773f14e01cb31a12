use serde::Deserialize;

use crate::ebpf::probes::MapSizes;

/// `probes.tcp:`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProbeConfig {
    /// Default true.
    pub enabled: bool,
    /// Fail startup if the probe cannot attach (default false: log one line and go on).
    pub required: bool,
    /// Kernel map sizes by map name (see [`MapSizes`]).
    pub max_entries: MapSizes,
    /// Distinct (peer address, server port) pairs kept per cgroup; further peers are summed as
    /// `other`, so a port scan cannot blow up the series count. Default 100.
    pub max_peers: usize,
}

impl Default for TcpProbeConfig {
    fn default() -> Self {
        TcpProbeConfig {
            enabled: true,
            required: false,
            max_entries: MapSizes::default(),
            max_peers: 100,
        }
    }
}

crate::ebpf::probes::probe_settings!(TcpProbeConfig);
